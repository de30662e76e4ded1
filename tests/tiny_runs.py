"""Tiny models, corpora and recipes on disk, shared by the reliability, interruption and safety tests."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import yaml

import adapt
from adapt.presets import tiny_model, tiny_tokenizer

# Subprocesses run offline, with the repository importable, whatever the caller's environment.
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}


def causal_folder(path: Path, family: str = "llama", tokenizer: bool = True) -> Path:
    """A tiny causal LM saved as safetensors (+ tokenizer): what `adapt train` starts from."""
    tiny_model(family).save_pretrained(path)
    if tokenizer:
        tiny_tokenizer().save_pretrained(path)
    return path


def pickle_folder(path: Path, family: str = "llama") -> Path:
    """A tiny causal LM whose only weights are a pickle (pytorch_model.bin), as old checkpoints ship."""
    import torch

    model = tiny_model(family)
    path.mkdir(parents=True)
    model.config.save_pretrained(path)
    torch.save(model.state_dict(), path / "pytorch_model.bin")
    tiny_tokenizer().save_pretrained(path)
    return path


def diffusion_folder(path: Path, family: str = "llama") -> Path:
    """A tiny diffusion checkpoint written by `save_checkpoint`: what generate/infill/eval/push read."""
    model, tokenizer = tiny_model(family), tiny_tokenizer()
    adapt.ensure_mask_token(model, tokenizer, "add")
    adapt.set_attention(model, 1.0)
    return adapt.save_checkpoint(model, tokenizer, path)


def corpus(path: Path, documents: int = 60, words: int = 40) -> Path:
    """A jsonl corpus of word-id documents the tiny tokenizer knows."""
    lines = [json.dumps({"text": " ".join(f"w{(7 * d + 3 * i) % 120 + 3}" for i in range(words))})
             for d in range(documents)]
    path.write_text("\n".join(lines) + "\n")
    return path


def recipe(folder: Path, name: str = "recipe", **settings) -> Path:
    """A recipe for a few-second CPU run on the tiny model; `section__key=value` overrides settings."""
    model = folder / "causal"
    if not model.exists():
        causal_folder(model)
    data = folder / "corpus.jsonl"
    if not data.exists():
        corpus(data)
    values = {
        "model": {"path": str(model)},
        "data": {"path": str(data), "seq_len": 32, "validation_fraction": 0.1},
        "train": {"batch_size": 2, "max_steps": 4, "anneal_steps": 2, "eval_batches": 1, "eval_samples": 1},
        "optim": {"lr": 1e-3, "warmup_steps": 0},
        "checkpoint": {"every": 1, "keep": 100},
        "logging": {"tensorboard": False, "progress_bar": False},
        "output_dir": str(folder / f"run-{name}"),
    }
    for key, value in settings.items():
        section, _, field = key.partition("__")
        if field:
            values.setdefault(section, {})[field] = value
        else:
            values[section] = value
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(values))
    return path


def run_cli(*args, env=None, timeout=300) -> subprocess.CompletedProcess:
    """`python -m adapt ARGS` in a fresh interpreter, as a user runs it."""
    return subprocess.run([sys.executable, "-m", "adapt", *map(str, args)], capture_output=True, text=True,
                          env=env or ENV, timeout=timeout)


def tensors(folder: Path) -> dict:
    """Every tensor of the safetensors files in `folder`, by name."""
    from safetensors.torch import load_file

    found = {}
    for file in sorted(Path(folder).glob("*.safetensors")):
        found.update(load_file(file))
    return found


def assert_same_tensors(a: dict, b: dict) -> None:
    import torch

    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
