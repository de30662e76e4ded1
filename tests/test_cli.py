"""The CLI contract: one line on stderr, exit code 2, no traceback for bad input."""

import argparse
import json
import subprocess
import sys
from dataclasses import fields

import pytest

import adapt
from adapt.bench import BenchSettings
from adapt.cli import build_parser, main
from adapt.evaluate.tasks import EvalSettings
from adapt.flags import settings_from
from adapt.presets import tiny_model, tiny_tokenizer
from adapt.sampling import SamplingOptions
from adapt.settings import default_of


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
                               "--num-samples", "3", "--seed", "7", "--allow-longer", "--cache", "none",
                               "--no-stop-at-eos"])
    assert _sampling_options(given) == SamplingOptions(strategy="margin", temperature=0.0, top_k=5, top_p=0.9,
                                                       block_size=2, num_samples=3, seed=7, progress=None,
                                                       allow_longer=True, cache="none", stop_at_eos=False)
    threshold = parser.parse_args(["infill", "m", "a [MASK] b", "--threshold", "0.9"])
    assert _sampling_options(threshold) == SamplingOptions(threshold=0.9, progress=None)


def _flags(command: str) -> dict[str, list[str]]:
    """{destination: option strings} of the flags of one `adapt` command."""
    (commands,) = [a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    return {action.dest: action.option_strings for action in commands.choices[command]._actions}


@pytest.mark.parametrize("argv, settings, not_flags", [
    (["generate", "m", "--length", "4", "--steps", "2"], SamplingOptions, {"progress"}),  # a bar on terminals
    (["infill", "m", "a [MASK] b"], SamplingOptions, {"progress"}),
    # eval draws one sample per call, without a bar, seeded by its own --seed (EvalSettings.seed)
    (["eval", "m", "--task", "elbo"], SamplingOptions, {"progress", "num_samples", "seed"}),
    (["eval", "m", "--task", "elbo"], EvalSettings, {"sampling"}),  # its flags: the SamplingOptions case above
    (["bench"], BenchSettings, set()),
], ids=["generate", "infill", "eval-sampling", "eval", "bench"])
def test_every_setting_has_its_flag_with_the_field_default(argv, settings, not_flags):
    """A field without a flag would silently keep its default whatever the user wants: every field (but
    the few listed here, with their reason) is the flag --field-name (--no-field-name for a bool that
    defaults to True), and what the flag parses to when it is left out is the field's default."""
    flags, args = _flags(argv[0]), build_parser().parse_args(argv)
    for field in fields(settings):
        if field.name in not_flags:
            continue
        assert field.name in flags, f"{settings.__name__}.{field.name} has no flag on adapt {argv[0]}"
        (flag,) = flags[field.name]
        assert flag.removeprefix("--").removeprefix("no-") == field.name.replace("_", "-")
        assert getattr(args, field.name) == default_of(settings, field.name), field.name


def test_list_flags_take_several_values_and_a_list_that_may_be_empty_takes_none():
    args = build_parser().parse_args(["bench", "--sample-steps", "4", "8", "--sample-thresholds", "--parts", "elbo"])
    assert settings_from(args, BenchSettings) == BenchSettings(sample_steps=[4, 8], sample_thresholds=[],
                                                               parts=["elbo"])


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
