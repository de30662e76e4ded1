"""scripts/reproduce.py end to end on a tiny model: every run trains and is scored, the report and plot
are written, and a second invocation reruns nothing (an interrupted reproduction continues)."""

import math
import re
import subprocess
import sys
from pathlib import Path

import pytest

from .tiny_runs import causal_folder, corpus

pytestmark = pytest.mark.slow

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "reproduce.py"
RUN_NAMES = ["adapt", "scratch", "scratch_lr", "noshift", "noanneal", "block4", "block32"]


def reproduce(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=1200)


def test_reproduction_reports_every_run_and_a_second_invocation_reruns_nothing(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    corpus(data / "train.jsonl")
    corpus(data / "validation.jsonl", docs=10, seed=1)
    out, docs, model = tmp_path / "out", tmp_path / "docs", causal_folder(tmp_path / "causal")
    args = ["--model", str(model), "--data", str(data), "--out", str(out), "--docs", str(docs),
            "--steps", "4", "--eval-every", "2", "--batch-size", "2", "--seq-len", "32", "--eval-blocks", "3",
            "--samples", "2", "--choice-tasks", "--extra", "train.eval_batches=1", "train.eval_samples=2"]

    first = reproduce(*args)
    assert first.returncode == 0, first.stderr[-2000:]
    commands = (out / "commands.txt").read_text().splitlines()
    assert [c.split()[3] for c in commands] == ["train"] * 7 + ["eval"] * 8
    assert (docs / "reproduction_elbo.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = (docs / "results.md").read_text()
    rows = {line.split("|")[1].strip().split(":")[0]: line for line in report.splitlines() if line.startswith("| ")}
    for name in RUN_NAMES + ["AR source (exact perplexity)"]:
        perplexity = float(rows[name].split("|")[2].split()[0])
        assert math.isfinite(perplexity) and perplexity > 1, rows[name]
    assert len(re.findall(r"nats per token from (adapt|block4|block32),", report)) == 6
    assert "not timed" not in report

    second = reproduce(*args)
    assert second.returncode == 0, second.stderr[-2000:]
    assert (out / "commands.txt").read_text().splitlines() == commands  # nothing trained or scored again
    assert all(f"reproduce: {name} is trained already" in second.stdout for name in RUN_NAMES)
    assert (docs / "results.md").read_text().split("## Hardware")[0] == report.split("## Hardware")[0]


def test_missing_inputs_stop_before_any_work_with_one_line(tmp_path):
    result = reproduce("--model", str(tmp_path / "nothing"), "--data", str(tmp_path), "--out", str(tmp_path / "out"))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"reproduce: no model at {tmp_path / 'nothing'}; run: python scripts/prepare_smollm2.py --out {tmp_path / 'nothing'}"]
    assert not (tmp_path / "out").exists()
