"""Where a run's figures go: stdout, output_dir/metrics.jsonl, TensorBoard / W&B, a progress bar."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

from ..atomic import write_text_atomically

METRICS_FILE = "metrics.jsonl"


def log(accelerator, message: str) -> None:
    if accelerator.is_main_process:
        print(f"adapt train: {message}", flush=True)


def warn(accelerator, message: str) -> None:
    if accelerator.is_main_process:
        print(f"adapt train: warning: {message}", file=sys.stderr, flush=True)


class Reporter:
    """Writes each record (a step's or a validation's figures) everywhere it goes; main process only."""

    def __init__(self, accelerator, recipe, output_dir: Path, step: int):
        self.accelerator = accelerator
        self.metrics_file = output_dir / METRICS_FILE
        if accelerator.is_main_process:
            output_dir.mkdir(parents=True, exist_ok=True)
            forget_metrics_after(self.metrics_file, step)
        self.trackers = _start_trackers(accelerator, recipe, output_dir)
        self.progress = _progress_bar(accelerator, recipe, step)

    def write(self, record: dict) -> None:
        if not self.accelerator.is_main_process:
            return
        with self.metrics_file.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self.trackers:
            self.accelerator.log({k: v for k, v in record.items() if k != "step"}, step=record["step"])
        line = "  ".join(f"{k} {_fmt(v)}" for k, v in record.items())
        if self.progress is not None:
            self.progress.write(line)
        else:
            print(line, flush=True)

    def advance(self) -> None:
        if self.progress is not None:
            self.progress.update(1)

    def close(self) -> None:
        """Close the bar and end the trackers. Ending them destroys the process group (accelerate's
        `end_training`), so this comes after every collective of the run, the export's included."""
        if self.progress is not None:
            self.progress.close()
        if self.trackers:
            self.accelerator.end_training()


def forget_metrics_after(metrics_file: Path, step: int) -> None:
    """Drop the records of steps after `step`: a run killed between checkpoints logged steps that the
    resumed run repeats, and each step must appear once in metrics.jsonl. A line cut off by the kill
    goes too."""
    if not metrics_file.is_file():
        return

    def logged_step(line: str) -> float:
        try:
            return json.loads(line)["step"]
        except (ValueError, KeyError, TypeError):
            return math.inf

    lines = metrics_file.read_text().splitlines(keepends=True)
    kept = [line for line in lines if logged_step(line) <= step]
    if len(kept) < len(lines):
        write_text_atomically(metrics_file, "".join(kept))


def _start_trackers(accelerator, recipe, output_dir: Path) -> bool:
    if not (recipe.logging.tensorboard or recipe.logging.wandb):
        return False
    flat = {}
    for section, values in recipe.to_dict().items():
        if isinstance(values, dict):
            flat.update({f"{section}.{k}": v for k, v in values.items() if isinstance(v, (int, float, str, bool))})
        elif isinstance(values, (int, float, str, bool)):
            flat[section] = values
    run_name = output_dir.name or "adapt"
    init_kwargs = {"wandb": {"name": run_name}} if recipe.logging.wandb else {}
    accelerator.init_trackers(recipe.logging.project if recipe.logging.wandb else run_name, config=flat,
                              init_kwargs=init_kwargs)
    return True


def _progress_bar(accelerator, recipe, step: int):
    if not (recipe.logging.progress_bar and accelerator.is_main_process and sys.stderr.isatty()):
        return None
    from tqdm.auto import tqdm

    return tqdm(total=recipe.train.max_steps, initial=step, desc="adapt train", unit="step", dynamic_ncols=True)


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1e5 else f"{value:.3e}"
    return str(value)
