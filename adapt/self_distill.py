"""`adapt distill`: parallel-decoding distillation of a diffusion model on its own outputs (dParallel, d3LLM).

Two stages, each resumable:

1. **Targets.** For every prompt of `--data` the model writes its own answer with the sampler (or, with
   `targets="source"`, its AR source writes it greedily or by sampling, as the sampler's temperature
   says), into OUT/targets.jsonl as `prompt`/`response` rows. The answers go to
   OUT/targets.jsonl.partial a line at a time; a stopped run continues after its last whole line, and the
   file takes its final name once every prompt has its answer.
2. **Training** (`TRAINING` below, then the caller's `key=value` overrides): SFT on those rows,
   LoRA by default, with the complementary mask (every answer token a target once per pair) and the
   certainty term on the tokens the model already predicts right (`diffusion.certainty_weight`), so that
   its right predictions become confident and a confidence threshold commits more of them a step. The run
   is `adapt train`'s, in OUT: checkpoints, `--resume` semantics (always on here) and the export to OUT/model.

Learning from its own trajectories keeps what the model does, and the certainty term only sharpens it: the
answers should not change much, while the steps they take fall (measure both: `adapt bench`, generative
perplexity under the source).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from .data_errors import reading
from .errors import UserError
from .recipe import Recipe, load_recipe

# The training's recipe under the caller's overrides (saved whole as OUT/recipe.yaml): dParallel's choices.
TRAINING = {
    # prompt + answer; longer rows are cut. No EOS filler after the answer (padding, no target): the answers
    # have the sampler's fixed length, so nothing is learnt there but EOS, the easiest target, which the
    # certainty term made confident enough for a confidence-first sampler to commit first (measured: every
    # unconditional sample of a distilled bidirectional SmolLM2 came out empty).
    "data": {"format": "sft", "seq_len": 256, "sft_padding": "pad"},
    # the model is already a diffusion model: its attention stays as saved; no held-out split of its own answers
    "train": {"batch_size": 4, "max_steps": 200, "anneal_steps": 1, "eval_batches": 0},
    # every answer token a target once per pair (t_max 0.999: the band symmetric about 1/2 with eps 1e-3),
    # normalised as LLaDA's SFT; certainty forcing at dParallel's weight and temperature
    "diffusion": {"complementary_masks": True, "t_max": 0.999, "loss_norm": "tokens", "certainty_weight": 2.0,
                  "certainty_temperature": 0.5},
    "optim": {"lr": 1e-4, "warmup_steps": 10},
    "lora": {"r": 16, "alpha": 32},
    "checkpoint": {"every": 50},
    "logging": {"tensorboard": False},
}
TARGETS_FILE = "targets.jsonl"
TARGETS = ("self", "source")
MAX_PROMPT_CHARS = 100_000  # one prompt; longer ones are refused, not tokenized


def check_distill_output(out: Path, *inputs: str | None) -> None:
    """`out` must be writable and new, empty or a previous distill run (which continues), and neither hold
    nor sit inside what the command reads (the model, the prompts)."""
    from .convert import RECIPE_FILE
    from .outputs import check_output
    from .train.checkpoint import RUN_ARTEFACTS
    from .train.lock import LOCK_FILE, refuse_if_held

    check_output(out, folder=True, reads=inputs)
    refuse_if_held(out)
    ours = {RECIPE_FILE, LOCK_FILE, TARGETS_FILE, TARGETS_FILE + ".partial", *RUN_ARTEFACTS}
    others = sorted(p.name for p in out.iterdir() if p.name not in ours) if out.is_dir() else []
    if others:
        raise UserError(f"{out} already holds other files ({', '.join(others[:3])}); give --out a new or empty "
                        "folder (or that of a previous distill run, to continue it)")


def read_prompts(path: str | os.PathLike) -> list[str]:
    """The prompts of a .txt file (one a line) or a .jsonl file (a `prompt` field a row), in order."""
    return [row["prompt"] for row in read_prompt_rows(path)]


def read_prompt_rows(path: str | os.PathLike, name: str = "--data") -> list[dict]:
    """The rows of a .txt file (a prompt a line: {"prompt": line}) or a .jsonl file (objects with a `prompt`
    string, other fields kept), in order; `name` is what the user gave the path as, for the messages."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise UserError(f"{name} {path}: no such file; give a .txt file (a prompt a line) or .jsonl (a 'prompt' field)")
    if path.suffix not in (".txt", ".jsonl"):
        raise UserError(f"{name} {path}: a {path.suffix or 'suffixless'} file; give .txt (a prompt a line) or "
                        ".jsonl (a 'prompt' field a row)")
    with reading([path]):  # bytes that are not UTF-8: the byte and line, as for every corpus
        text = path.read_text(encoding="utf-8")
    rows = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        row = {"prompt": line} if path.suffix == ".txt" else _row_of(line, path, number, name)
        if len(row["prompt"]) > MAX_PROMPT_CHARS:
            raise UserError(f"{name} {path}, line {number}: a prompt of {len(row['prompt']):,} characters (at most "
                            f"{MAX_PROMPT_CHARS:,}); shorten it")
        rows.append(row)
    if not rows:
        raise UserError(f"{name} {path} has no prompts; give a file with at least one prompt")
    return rows


def _row_of(line: str, path: Path, number: int, name: str) -> dict:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as err:
        raise UserError(f"{name} {path}, line {number}: not JSON ({err.msg}); write one object a line") from None
    if not isinstance(row, dict) or not isinstance(row.get("prompt"), str):
        raise UserError(f"{name} {path}, line {number}: no 'prompt' string; give each row a 'prompt' field")
    return row


def write_targets(model, tokenizer, prompts: list[str], out: Path, *, length: int, steps: int | None, options,
                  answer=None) -> Path:
    """OUT/targets.jsonl: one `prompt`/`response` row per prompt, continuing a stopped run's partial file.

    `answer(prompt) -> str` writes a response (None: the diffusion model with the sampler's `options`)."""
    from .sampling import generate

    final, partial = out / TARGETS_FILE, out / (TARGETS_FILE + ".partial")
    if final.exists():
        _check_same_prompts(_rows(final), prompts, final)
        return final
    done = _rows(partial) if partial.exists() else []
    _check_same_prompts(done, prompts, partial)
    partial.write_text("".join(json.dumps(row) + "\n" for row in done), encoding="utf-8")  # drops a torn last line
    answer = answer or (lambda prompt: generate(model, tokenizer, prompt, length=length, steps=steps,
                                                options=options)[0])
    with partial.open("a", encoding="utf-8") as file:
        for prompt in prompts[len(done):]:
            file.write(json.dumps({"prompt": prompt, "response": answer(prompt)}) + "\n")
            file.flush()
    os.replace(partial, final)
    return final


def _rows(path: Path) -> list[dict]:
    """The whole rows of a targets file; a last line cut short by a stop is left out."""
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            break
    return rows


def _check_same_prompts(rows: list[dict], prompts: list[str], path: Path) -> None:
    if [row.get("prompt") for row in rows] != prompts[:len(rows)] or len(rows) > len(prompts):
        raise UserError(f"{path} holds answers to other prompts than --data's; give --out a new folder, or the "
                        "prompts that run was given")


def source_answerer(source_path: str, tokenizer, *, length: int, options, dtype=None, device=None):
    """`answer(prompt)` by the AR source: its own `generate` (greedy at temperature 0, else sampling with
    the options' temperature, top-k and top-p), refused when its tokenizer differs from the model's."""
    import torch

    from .modeling import load_model
    from .train.distill import check_same_tokenizer

    source, source_tokenizer = load_model(source_path, dtype=dtype)
    check_same_tokenizer(tokenizer, source_tokenizer, f"--source {source_path}", "the student's")
    source.to(device or "cpu").eval()
    sampling = {"do_sample": False} if options.temperature == 0 else {
        "do_sample": True, "temperature": options.temperature, "top_k": options.top_k or 0, "top_p": options.top_p or 1.0}
    generator_seed = options.seed

    @torch.no_grad()
    def answer(prompt: str) -> str:
        if generator_seed is not None:
            torch.manual_seed(generator_seed)
        ids = tokenizer(prompt, return_tensors="pt").input_ids.to(source.device)
        out = source.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=length,
                              pad_token_id=tokenizer.eos_token_id, **sampling)
        return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    return answer


def distill_recipe(model: str, targets: Path, out: Path, overrides: list[str] = ()) -> Recipe:
    """`TRAINING` for `model` on `targets`, writing to `out`, resuming what is there."""
    base = {**TRAINING, "model": {"path": model}, "data": {**TRAINING["data"], "path": str(targets)},
            "output_dir": str(out), "resume": "auto"}
    return load_recipe(None, list(overrides), base=base)

