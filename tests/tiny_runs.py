"""The builders every test file shares: tiny models, the tiny corpus and recipes on disk, a trained model.

One corpus builder and one causal-model builder serve all tests (conftest.py offers the trained model
as the `trained` fixture); test modules import from here, never from each other.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import yaml

import adapt
from adapt.diffusion import DiffusionConfig
from adapt.hybrid import HybridMode
from adapt.presets import tiny_model, tiny_tokenizer
from adapt.recipe import Recipe, load_recipe

# Subprocesses run offline, with the repository importable, whatever the caller's environment.
ROOT = Path(__file__).resolve().parents[1]  # the repository
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
# `adapt plan`'s Llama-2-7B: its config alone (no weights), for recipes/llama2-7b.yaml
LLAMA2_7B = [f"model.path={ROOT / 'recipes/models/llama2-7b/config.json'}"]


def causal_folder(path: Path, family: str = "llama", tokenizer: bool = True) -> Path:
    """A tiny causal LM saved as safetensors (+ tokenizer): what `adapt train` starts from.

    A folder that holds one already is kept, so recipe builders can ask for it on every call.
    """
    path = Path(path)
    if not (path / "config.json").is_file():
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


def diffusion_model(family: str = "llama", ratio: float = 1.0, attn_implementation: str | None = None):
    """A tiny model of `family` with a new mask token, at attention `ratio` (1 = bidirectional), and its tokenizer."""
    model, tokenizer = tiny_model(family, attn_implementation=attn_implementation), tiny_tokenizer()
    adapt.ensure_mask_token(model, tokenizer, "add")
    adapt.set_attention(model, ratio)
    return model, tokenizer


HYBRID_DRAFT = 4  # draft block of the tiny hybrid model


def hybrid_model(family="llama", impl=None, draft_size=HYBRID_DRAFT):
    """An untrained hybrid conversion of a tiny model: (model, tokenizer, config)."""
    model, tokenizer = tiny_model(family, attn_implementation=impl), tiny_tokenizer()
    adapt.ensure_mask_token(model, tokenizer, "add")
    config = dataclasses.replace(DiffusionConfig.from_model_config(model.config), mode=HybridMode(draft_size))
    config.save_to(model.config)
    return model.eval(), tokenizer, config


def student_and_teacher():
    """A tiny Llama with a mask token (a student, causal as loaded), a frozen copy of its source (the
    teacher), and the student's DiffusionConfig."""
    model, tokenizer = tiny_model("llama"), tiny_tokenizer()
    teacher = tiny_model("llama")
    adapt.ensure_mask_token(model, tokenizer, "add")
    return model, teacher, DiffusionConfig.from_model_config(model.config)


def save_adapted(trained, folder: Path, chat_template: str | None = None) -> Path:
    """The trained tiny model (the `trained` fixture) saved as a diffusion checkpoint, folder/adapted, its
    tokenizer with `chat_template`; the shared model is left causal, as the fixture gives it."""
    import copy

    model, tokenizer, _ = trained
    tokenizer = copy.deepcopy(tokenizer)
    tokenizer.chat_template = chat_template
    adapt.set_attention(model, 1.0)
    adapt.save_checkpoint(model, tokenizer, folder / "adapted")
    adapt.set_attention(model, 0.0)
    return folder / "adapted"


def adapted_and_source(trained, folder: Path, chat_template: str | None = None) -> None:
    """`save_adapted`, and the causal model it came from beside it (folder/source)."""
    save_adapted(trained, folder, chat_template)
    model, tokenizer, _ = trained
    model.save_pretrained(folder / "source")
    tokenizer.save_pretrained(folder / "source")


def other_tokenizer_folder(path: Path) -> Path:
    """A tiny causal LM whose tokenizer gives the tiny vocabulary's words other ids (no specials): a teacher
    or source that a tiny student must refuse."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    causal_folder(path, tokenizer=False)
    backend = Tokenizer(models.WordLevel({f"w{i}": i for i in range(128)}, unk_token="w0"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="w0").save_pretrained(path)
    return path


def diffusion_folder(path: Path, family: str = "llama") -> Path:
    """A tiny diffusion checkpoint written by `save_checkpoint`: what generate/infill/eval/push read."""
    return adapt.save_checkpoint(*diffusion_model(family), path)


def big_llama(folder: Path) -> tuple[Path, int]:
    """A Llama of 154M parameters saved in bf16 (with the tiny tokenizer), and its bytes in float32 (617 MB):
    big enough for a loader's memory to show. Its vocabulary is the tiny tokenizer's, so adding the mask
    token resizes the embeddings."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = tiny_tokenizer()
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=1024, intermediate_size=2816, num_hidden_layers=12,
                         num_attention_heads=16, num_key_value_heads=16, max_position_embeddings=256,
                         tie_word_embeddings=False, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    model = LlamaForCausalLM(config)
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    model.to(torch.bfloat16).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder, weight_bytes


def memory_status(field: str) -> int:
    """A /proc/self/status memory figure in bytes (VmRSS: now; VmHWM: the peak, which writing "5" to
    /proc/self/clear_refs restarts from the current RSS)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def corpus(path: Path, docs: int = 80, seed: int = 0) -> Path:
    """A jsonl file of documents that cycle through ten words in order: easy to learn, so a loss must fall fast."""
    rng = random.Random(seed)
    with Path(path).open("w") as f:
        for _ in range(docs):
            start, length = rng.randrange(3, 100), rng.randrange(20, 60)
            f.write(json.dumps({"text": " ".join(f"w{10 + (start + i) % 10}" for i in range(length))}) + "\n")
    return Path(path)


def recipe(folder: Path, name: str = "recipe", **settings) -> Path:
    """A recipe file for a few-second CPU run on the tiny model; `section__key=value` overrides settings."""
    data = folder / "corpus.jsonl"
    if not data.exists():
        corpus(data)
    values = {
        "model": {"path": str(causal_folder(folder / "causal"))},
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


SEQ_LEN = 32  # of the runs `recipe_for` builds


def recipe_for(folder: Path, *overrides: str, output: str = "run") -> Recipe:
    """The loaded `Recipe` of a few-second run with its own validation file; `key=value` overrides settings."""
    train_file, validation_file = folder / "train.jsonl", folder / "validation.jsonl"
    if not train_file.exists():
        corpus(train_file)
        corpus(validation_file, docs=10, seed=1)
    base = [
        f"model.path={causal_folder(folder / 'causal')}", f"data.path={train_file}",
        f"data.validation_path={validation_file}", f"data.seq_len={SEQ_LEN}", "train.batch_size=4",
        "train.max_steps=6", "train.anneal_steps=4", "train.eval_batches=2", "optim.lr=3e-3", "optim.warmup_steps=1",
        "checkpoint.every=0", "logging.tensorboard=false", f"output_dir={folder / output}",
    ]
    return load_recipe(None, base + list(overrides))


SENTENCE = "<s> w5 w6 w7 w8 w9 w10 w11 w12"


def train_tiny_model():
    """(model, tokenizer, config): a tiny Llama trained for a few steps on SENTENCE, both as a diffusion
    model (ratio 1) and as an AR model (ratio 0), so both ways of scoring know its continuations."""
    import torch

    from adapt.diffusion import DiffusionConfig, diffusion_loss

    torch.manual_seed(0)
    model, tokenizer = tiny_model("llama"), tiny_tokenizer()
    adapt.ensure_mask_token(model, tokenizer, "add")
    config = DiffusionConfig.from_model_config(model.config)
    ids = tokenizer(SENTENCE, return_tensors="pt").input_ids.repeat(8, 1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(60):
        adapt.set_attention(model, 1.0)
        loss = diffusion_loss(model, ids, config, generator=generator).loss
        adapt.set_attention(model, 0.0)
        loss = loss + model(input_ids=ids, labels=ids).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval(), tokenizer, config


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


def assert_close_tensors(expected: dict, got: dict, label: str = "") -> None:
    """The same tensors up to float summation order (runs that split the same work differently)."""
    import torch

    assert expected.keys() == got.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], atol=2e-5, rtol=1e-4, msg=f"{label}{name}")


def step_records(run_dir) -> list[dict]:
    """The per-step lines of a run's metrics.jsonl (validation lines left out)."""
    lines = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return [line for line in lines if "loss" in line]


def noise_from_the_data(input_ids, config, training, maskable, *, t=None, mask=None, generator=None):
    """A stand-in for `draw_noise` whose noise depends on each sequence alone, so any split of a batch
    into micro-batches or processes sees the same levels and masks."""
    import torch

    t = 0.25 + 0.5 * (input_ids[:, 1] % 2).float()
    positions = torch.arange(input_ids.shape[1])
    return t, maskable & ((input_ids + positions) % 3 == 0)


def train_two_processes(recipe: Recipe, folder: Path, launcher: str = "torchrun") -> subprocess.CompletedProcess:
    """`adapt train` of `recipe` (written to folder/<output name>.yaml) in two CPU processes, under torchrun
    or accelerate launch (its 2-process CPU config)."""
    root = Path(__file__).resolve().parents[1]
    recipe_file = Path(folder) / f"{Path(recipe.output_dir).name}.yaml"
    recipe_file.write_text(yaml.safe_dump(recipe.to_dict()))
    if launcher == "torchrun":
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    else:
        command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                   str(root / "recipes/accelerate/cpu-2proc.yaml"), "--main_process_port", str(free_port())]
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    return subprocess.run([*command, "-m", "adapt", "train", str(recipe_file)], cwd=root, env=env,
                          capture_output=True, text=True, timeout=600)


def wait_until(condition, what: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


@contextmanager
def serving(folder: Path, *flags):
    """`adapt serve FOLDER FLAGS` in its own process on a free port: its base URL while the block runs; then
    it is stopped, and its output must hold no traceback."""
    import httpx

    def up() -> bool:
        assert process.poll() is None, f"the server ended: {process.communicate()[0]}"
        try:
            return httpx.get(f"{url}/health").status_code == 200
        except httpx.TransportError:
            return False

    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "adapt", "serve", str(folder), "--port", str(port),
                                *map(str, flags)], env={**ENV, "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until(up, what="the server to start")
        yield url
    finally:
        process.terminate()
        output = process.communicate(timeout=30)[0]
        assert "Traceback" not in output, output


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now, for a launcher's rendezvous."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def peak_rss_below(report: str, weight_bytes: int) -> list[dict]:
    """The reports of ranks 0 and 1 of a load-once test (`report`.RANK, JSON with RSS `before` and `peak`),
    after checking that each process grew by less than one copy of the weights while loading."""
    results = []
    for rank in (0, 1):
        result = json.loads(Path(f"{report}.{rank}").read_text())
        grown = result["peak"] - result["before"]
        print(f"rank {rank}: RSS {result['before'] / 2**20:.0f} MiB before loading, peak {result['peak'] / 2**20:.0f} "
              f"MiB (+{grown / 2**20:.0f} MiB) against one copy of the weights: {weight_bytes / 2**20:.0f} MiB")
        assert grown < weight_bytes, f"rank {rank} grew by {grown} bytes, a whole copy is {weight_bytes}"
        results.append(result)
    return results
