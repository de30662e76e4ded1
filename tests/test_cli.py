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
