"""Two CPU processes under torchrun (DDP, DeepSpeed ZeRO-2, ZeRO-3, FSDP2) and accelerate launch train
exactly what one process with two accumulation steps trains: the same losses and the same weights.

The noise of each micro-batch is seeded by its global index and rank r of a global batch gets the blocks
one process would read in its r-th micro-step, so the runs must agree up to float summation order.
Each run takes 20-60 s on 2 cores (process start-up, DeepSpeed import), hence `slow`.
"""

from pathlib import Path

import pytest

from adapt.train import train

from .tiny_runs import assert_close_tensors, recipe_for, step_records, tensors, train_two_processes

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow

LAUNCHERS = {
    "ddp": ("torchrun", []),
    "zero2": ("torchrun", ["distributed.deepspeed_config=" + str(ROOT / "recipes/deepspeed/zero2.json")]),
    "zero3": ("torchrun", ["distributed.deepspeed_config=" + str(ROOT / "recipes/deepspeed/zero3.json")]),
    "fsdp": ("torchrun", ["distributed.backend=fsdp"]),
    "accelerate-ddp": ("accelerate", []),
}


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    root = tmp_path_factory.mktemp("distributed")
    recipe = recipe_for(root, "train.grad_accum=2", "train.batch_size=2", "train.max_steps=3", output="single")
    result = train(recipe)
    return root, result, _losses(recipe.output_dir)


@pytest.mark.parametrize("name", list(LAUNCHERS))
def test_two_processes_match_one_process(single, name):
    root, reference, reference_losses = single
    launcher, extra = LAUNCHERS[name]
    # With the recipes' default tracker (TensorBoard), whose end once destroyed the process group before
    # the export gathered and wrote the model.
    recipe = recipe_for(root, "train.batch_size=2", "train.max_steps=3", "logging.tensorboard=true", *extra,
                        output=name)
    run = train_two_processes(recipe, root, launcher)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "2 process(es)" in run.stdout
    assert (Path(recipe.output_dir) / "model" / "config.json").is_file()
    assert list((Path(recipe.output_dir) / "logs").rglob("events.out.tfevents.*")), "no TensorBoard events"

    losses = _losses(recipe.output_dir)
    print(f"{name}: first-step loss {losses[0]:.6f} (one process: {reference_losses[0]:.6f})")
    assert losses == pytest.approx(reference_losses, abs=1e-5)
    assert_close_tensors(tensors(reference.model_dir), tensors(Path(recipe.output_dir) / "model"), f"{name}: ")


def _losses(output_dir) -> list[float]:
    return [record["loss"] for record in step_records(output_dir)]
