"""ZeRO-3 builds the model inside deepspeed.zero.Init: no process holds a whole copy while it loads.

A Llama of 154M parameters (a bf16 checkpoint loaded as float32: 617 MB, as every process held it
before) is loaded by two CPU processes under ZeRO-3. Each process's peak RSS while `load_model` runs
stays below one copy of the weights, the decoder's weights are partitioned, the new mask token's rows
are the mean of the existing rows, and the first step trains exactly what one process with two
accumulation steps trains (which is what the earlier load-everything path trained).

glibc keeps freed blocks below its dynamic mmap threshold on the heap, so RSS would also count memory
zero.Init has already freed; MALLOC_MMAP_THRESHOLD_ fixes the threshold at 1 MiB for the measurement.

Run as a script under torchrun, this file is the worker that loads and reports its memory.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ZERO3 = ROOT / "recipes/deepspeed/zero3.json"


def _worker(recipe_path: str, report: str) -> None:
    import torch

    from adapt.recipe import load_recipe
    from adapt.train.backends import open_backend
    from adapt.train.build import load_model
    from tests.tiny_runs import memory_status

    recipe = load_recipe(recipe_path)
    backend = open_backend(recipe, Path(recipe.output_dir))  # registers the ZeRO-3 config with transformers
    before = memory_status("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # restart the peak (VmHWM) from the current RSS
    model, tokenizer, diffusion = load_model(recipe, backend)
    peak = memory_status("VmHWM")
    # transformers resizes the embeddings outside zero.Init (whole on every process, partitioned later
    # by deepspeed.initialize); the decoder's weights are partitioned from the start.
    embedding = model.get_input_embeddings().weight
    mask_row = embedding[diffusion.mask_token_id].clone()
    mean_row = embedding[:diffusion.mask_token_id].mean(dim=0)
    rows = embedding.shape[0]
    decoder = [p for name, p in model.named_parameters() if ".layers." in name]
    result = {"rank": backend.accelerator.process_index, "before": before, "peak": peak,
              "partitioned": all(hasattr(p, "ds_id") and p.numel() == 0 for p in decoder),
              "mask_row_is_mean": torch.equal(mask_row, mean_row), "rows": rows}
    Path(f"{report}.{result['rank']}").write_text(json.dumps(result))


@pytest.mark.slow
def test_zero3_loads_partitioned_and_trains_the_same(tmp_path):
    import yaml

    from adapt.train import train

    from .tiny_runs import ENV, assert_close_tensors, big_llama, peak_rss_below, recipe_for, step_records, tensors

    folder, weight_bytes = big_llama(tmp_path / "causal")  # recipe_for's model folder
    common = ["train.batch_size=2", "train.max_steps=1", "train.eval_batches=0", "model.dtype=float32"]
    reference = train(recipe_for(tmp_path, *common, "train.grad_accum=2", output="single"))

    recipe = recipe_for(tmp_path, *common, f"distributed.deepspeed_config={ZERO3}", output="zero3")
    recipe_file = tmp_path / "zero3.yaml"
    recipe_file.write_text(yaml.safe_dump(recipe.to_dict()))
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    env = dict(ENV, TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
    report = tmp_path / "load.json"
    load = subprocess.run([*torchrun, __file__, str(recipe_file), str(report)], cwd=ROOT,
                          env=dict(env, MALLOC_MMAP_THRESHOLD_=str(2**20)),
                          capture_output=True, text=True, timeout=600)
    assert load.returncode == 0, load.stdout[-3000:] + load.stderr[-3000:]
    for result in peak_rss_below(report, weight_bytes):
        assert result["partitioned"] and result["mask_row_is_mean"] and result["rows"] % 64 == 0

    run = subprocess.run([*torchrun, "-m", "adapt", "train", str(recipe_file)], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    loss = step_records(recipe.output_dir)[0]["loss"]
    print(f"first-step loss: ZeRO-3 {loss:.6f}, one process {reference.first_loss:.6f}")
    assert loss == pytest.approx(reference.first_loss, abs=1e-5)
    assert_close_tensors(tensors(reference.model_dir), tensors(Path(recipe.output_dir) / "model"))


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    _worker(sys.argv[1], sys.argv[2])
