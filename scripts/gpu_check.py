"""Every GPU figure the project quotes, measured in one run: `bash scripts/gpu_check.sh` (see there).

1. Train step of a 1B Llama-shaped model in bf16: diffusion at attention ratio 1 and 0.5 against the
   causal-LM step, with MFU (`adapt bench --parts train`), with SDPA and, where installed, flash-attention 2.
2. Sampling tokens/s against the same model's KV-cached `generate` (`adapt bench --parts sampling`).
3. `adapt train` under DeepSpeed ZeRO-2 and ZeRO-3 on the one GPU (one process under torchrun): step
   time, tokens/s and peak memory, next to what `adapt plan` predicts for the same run.

Writes OUT/gpu_check.json (every figure) and OUT/gpu_check.md (the table for docs/performance.md).
`--device cpu --quick` runs the same path with a tiny model in a few minutes (CI).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# (model, batch, seq_len, train repeats, sampling length, sampling steps) for a full and a quick run.
SIZES = {False: ("llama-1b", 8, 2048, 10, 256, [32, 64]), True: ("tiny-llama", 2, 32, 2, 16, [4])}
TRAIN_STEPS = {False: 10, True: 3}
ZERO_CONFIGS = {"zero2": "recipes/deepspeed/zero2.json", "zero3": "recipes/deepspeed/zero3.json"}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu")
    parser.add_argument("--quick", action="store_true", help="a tiny model and few repeats: a smoke run")
    parser.add_argument("--out", default="gpu-check", help="folder for gpu_check.json and gpu_check.md")
    parser.add_argument("--train-run", choices=list(ZERO_CONFIGS), help=argparse.SUPPRESS)  # the child process
    args = parser.parse_args()
    out = Path(args.out)
    if args.train_run:
        return _train_run(args.train_run, out, args.device, args.quick)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    results = {"device": args.device, "quick": args.quick, "bench": _benches(args.device, args.quick),
               "train_runs": [_launch_train_run(name, out, args.device, args.quick) for name in ZERO_CONFIGS]}
    results["seconds"] = time.perf_counter() - started
    (out / "gpu_check.json").write_text(json.dumps(results, indent=2) + "\n")
    table = markdown(results)
    (out / "gpu_check.md").write_text(table + "\n")
    print(table)
    print(f"gpu_check: wrote {out / 'gpu_check.json'} and {out / 'gpu_check.md'} in {results['seconds']:.0f} s")
    return 0


def _benches(device: str, quick: bool) -> dict:
    import importlib.util

    from adapt.bench import BenchSettings, run

    model, batch, seq_len, repeats, length, steps = SIZES[quick]
    common = dict(model=model, device=device, batch=batch, seq_len=seq_len, repeats=repeats, quick=quick)
    # dtype: the bench's default, the device's native one (bf16 on the GPU; adapt.bench.native_dtype says why)
    benches = {"train_sdpa": run(BenchSettings(**common, parts=["train"]))}
    if device != "cpu" and importlib.util.find_spec("flash_attn") is not None:
        benches["train_flash_attention_2"] = run(BenchSettings(**common, attn="flash_attention_2", parts=["train"]))
    # One threshold (Fast-dLLM's 0.9) under each cache and as a block model: every row within the 8 minutes.
    benches["sampling"] = run(BenchSettings(**common, parts=["sampling"], sample_length=length, sample_steps=steps,
                                            sample_batch=[1, 8], sample_thresholds=[0.9]))
    return benches


# ---------------------------------------------------------------------------- ZeRO-2 / ZeRO-3 train runs

def _launch_train_run(name: str, out: Path, device: str, quick: bool) -> dict:
    """One `adapt train` process under torchrun (DeepSpeed needs its process group), reporting to a file."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1",
               __file__, "--train-run", name, "--out", str(out), "--device", device] + (["--quick"] if quick else [])
    child = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    if child.returncode != 0:
        return {"name": name, "error": (child.stdout + child.stderr)[-2000:]}
    return json.loads((out / f"{name}.json").read_text())


def _train_run(name: str, out: Path, device: str, quick: bool) -> int:
    import torch

    from adapt.plan import PlanSettings, plan
    from adapt.recipe import load_recipe
    from adapt.train import train

    recipe = load_recipe(None, _train_overrides(name, out, device, quick))
    gpu, gpu_memory = _gpu_name(device)
    predicted = plan(recipe, PlanSettings(gpus=1, gpu=gpu, gpu_memory=gpu_memory))  # before: a prediction
    if device == "cpu":
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM from here: the run's own peak
    result = train(recipe, overwrite=True)
    if device == "cpu":
        peak = _status_bytes("VmHWM")
    else:
        peak = torch.cuda.max_memory_allocated()
    records = [json.loads(line) for line in (Path(recipe.output_dir) / "metrics.jsonl").read_text().splitlines()]
    speeds = [r["tokens_per_s"] for r in records if "tokens_per_s" in r][1:]  # the first step warms up
    report = {"name": name, "steps": result.steps, "tokens_per_s": statistics.median(speeds),
              "peak_bytes": peak, "peak_is": "process RSS" if device == "cpu" else "torch.cuda.max_memory_allocated",
              "plan_bytes": predicted["per_gpu_bytes"]["total"], "plan": predicted["per_gpu_bytes"]}
    (out / f"{name}.json").write_text(json.dumps(report, indent=2))
    return 0


def _train_overrides(name: str, out: Path, device: str, quick: bool) -> list[str]:
    model_dir, corpus = _prepare(out, quick)
    model, batch, seq_len, *_ = SIZES[quick]
    return [f"model.path={model_dir}", "model.mask_token=reuse", "model.mask_token_id=0",
            f"model.dtype={'float32' if device == 'cpu' else 'bfloat16'}",
            f"data.path={corpus}", f"data.seq_len={seq_len}", f"train.batch_size={batch}",
            f"train.max_steps={TRAIN_STEPS[quick]}", "train.eval_batches=0", "train.log_every=1",
            f"train.mixed_precision={'no' if device == 'cpu' else 'bf16'}",
            f"train.gradient_checkpointing={'false' if quick else 'true'}", "checkpoint.every=0",
            "logging.tensorboard=false", "logging.progress_bar=false",
            f"distributed.deepspeed_config={ROOT / ZERO_CONFIGS[name]}", f"output_dir={out / ('run-' + name)}"]


def _prepare(out: Path, quick: bool) -> tuple[Path, Path]:
    """The bench model saved as a folder (once) and a synthetic corpus: throughput needs no real text."""
    import torch

    from adapt.bench import load_bench_model

    model_dir, corpus = out / "model", out / "corpus.jsonl"
    if not (model_dir / "config.json").is_file():
        model, tokenizer, _ = load_bench_model(SIZES[quick][0], torch.bfloat16 if not quick else torch.float32,
                                               torch.device("cpu"), "sdpa")
        model.save_pretrained(model_dir)
        tokenizer.save_pretrained(model_dir)
    if not corpus.is_file():
        words = " ".join(f"w{i % 50}" for i in range(4000))
        corpus.write_text("".join(json.dumps({"text": words}) + "\n" for _ in range(200)))
    return model_dir, corpus


def _gpu_name(device: str) -> tuple[str, str | None]:
    """The plan's GPU name and the device's memory (None on CPU: the plan's default GPU)."""
    import torch

    if device == "cpu":
        return "H100", None
    name = torch.cuda.get_device_name()
    known = next((gpu for gpu in ("H200", "H100", "A100") if gpu in name), "H100")
    return known, f"{torch.cuda.get_device_properties(0).total_memory}B"


def _status_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


# ------------------------------------------------------------------------------------------------ report

def markdown(results: dict) -> str:
    lines = [f"GPU check on {results['device']}{' (quick)' if results['quick'] else ''}", "",
             "| measurement | figure |", "|---|---|"]
    for name, bench in results["bench"].items():
        for row, figures in bench.get("train", {}).items():
            cells = [f"{figures['median_s']:.3f} s", f"peak {_size(figures['peak_bytes'])}"]
            if "time_ratio" in figures:
                cells.append(f"{figures['time_ratio']:.2f}x causal")
            if "mfu" in figures:
                cells.append(f"MFU {figures['mfu']:.1%}")
            lines.append(f"| {name} {bench['model']} {row} (batch {bench['batch']} x {bench['seq_len']}) | "
                         f"{', '.join(cells)} |")
        for row in bench.get("sampling", []):
            lines.append(f"| sampling {json.dumps({k: v for k, v in row.items() if not isinstance(v, float)})} | "
                         + ", ".join(f"{k} {v:.3g}" for k, v in row.items() if isinstance(v, float)) + " |")
    for run in results["train_runs"]:
        if "error" in run:
            lines.append(f"| adapt train {run['name']} | failed: see gpu_check.json |")
            continue
        lines.append(f"| adapt train {run['name']}, 1 process | {run['tokens_per_s']:.0f} tokens/s, peak "
                     f"{_size(run['peak_bytes'])} ({run['peak_is']}), adapt plan {_size(run['plan_bytes'])} |")
    return "\n".join(lines)


def _size(nbytes: float) -> str:
    return f"{nbytes / 2**30:.2f} GiB" if nbytes >= 2**30 else f"{nbytes / 2**20:.1f} MiB"


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.exit(main())
