"""The CLI contract: one line on stderr, exit code 2, no traceback for bad input."""

import json
import subprocess
import sys

import adapt
from adapt.cli import main
from adapt.presets import tiny_model, tiny_tokenizer


def test_info_reports_the_diffusion_settings(tmp_path, capsys):
    model, tokenizer = tiny_model("llama"), tiny_tokenizer()
    adapt.ensure_mask_token(model, tokenizer, "add")
    adapt.set_attention(model, 1.0)
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    capsys.readouterr()  # saving imports DeepSpeed (through accelerate), which logs to stdout once per process
    assert main(["info", str(tmp_path)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["attention_ratio"] == 1.0 and info["diffusion"]["mask_token_strategy"] == "add"


def test_bad_input_is_one_line_and_exit_code_2(tmp_path):
    result = subprocess.run([sys.executable, "-m", "adapt", "info", str(tmp_path / "missing")],
                            capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "Traceback" not in result.stderr
    assert "model path not found" in result.stderr


def test_generate_and_infill_flags_are_the_sampling_options_with_their_defaults():
    from dataclasses import replace

    from adapt.cli import _sampling_options, build_parser
    from adapt.sampling import DEFAULT_MASK_MARKER, DEFAULT_SPAN_LENGTH, SamplingOptions

    parser = build_parser()
    generate = parser.parse_args(["generate", "m", "--length", "4", "--steps", "2"])
    infill = parser.parse_args(["infill", "m", "a [MASK] b"])
    for args in (generate, infill):
        assert _sampling_options(args) == replace(SamplingOptions(), progress=None)  # a bar on terminals
    assert (infill.span_length, infill.mask_marker) == (DEFAULT_SPAN_LENGTH, DEFAULT_MASK_MARKER)
    given = parser.parse_args(["generate", "m", "--length", "4", "--steps", "2", "--strategy", "margin",
                               "--temperature", "0", "--top-k", "5", "--top-p", "0.9", "--block-size", "2",
                               "--num-samples", "3", "--seed", "7"])
    assert _sampling_options(given) == SamplingOptions(strategy="margin", temperature=0.0, top_k=5, top_p=0.9,
                                                       block_size=2, num_samples=3, seed=7, progress=None)


def test_a_bad_generate_flag_is_refused_before_the_model_loads(tmp_path, capsys):
    assert main(["generate", str(tmp_path / "missing"), "--length", "4", "--steps", "2", "--top-p", "2"]) == 2
    assert "top_p = 2.0 is out of range; it must be in (0, 1]" in capsys.readouterr().err


def test_the_command_starts_without_torch():
    """`adapt` imports its libraries inside main(), where Ctrl-C is one line and exit code 130."""
    import subprocess
    import sys

    code = "import sys, adapt, adapt.cli; print('torch' in sys.modules, adapt.__version__)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.split() == ["False", "0.1.0"], result.stderr
