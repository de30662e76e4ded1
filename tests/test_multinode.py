"""Two "nodes" on this machine: two `torchrun --nnodes 2 --node_rank {0,1}` launchers on 127.0.0.1, one
CPU process each, as a two-node job starts them. Under ZeRO-2 and FSDP2 they train exactly what one
process with two accumulation steps trains; SIGTERM to one node's launcher makes both processes
checkpoint and stop, and `resume=auto` continues to the same weights.

Each launch takes 30-90 s on 2 cores (process start-up, DeepSpeed import), hence `slow`.
"""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from adapt.train import complete_checkpoints, train

from .tiny_runs import ENV, assert_close_tensors, free_port, recipe_for, step_records, tensors

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow
BACKENDS = {"zero2": ["distributed.deepspeed_config=" + str(ROOT / "recipes/deepspeed/zero2.json")],
            "fsdp": ["distributed.backend=fsdp"]}
STEPS = 3


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    """One process, two accumulation steps: what the two nodes must train."""
    root = tmp_path_factory.mktemp("multinode")
    recipe = recipe_for(root, "train.grad_accum=2", "train.batch_size=2", f"train.max_steps={STEPS}", output="single")
    return root, train(recipe), _losses(recipe.output_dir)


def _launch_nodes(recipe_file: Path, *overrides: str) -> list[tuple[subprocess.Popen, Path]]:
    """One torchrun launcher per node, node 0 holding the rendezvous on a free local port; each node's
    output goes to a file beside the recipe (a pipe nobody reads could fill and stall it)."""
    port = free_port()
    env = dict(ENV, TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
    nodes = []
    for rank in (0, 1):
        log = recipe_file.with_suffix(f".node{rank}.log")
        with log.open("w") as out:
            nodes.append((subprocess.Popen(
                [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
                 "--node_rank", str(rank), "--master_addr", "127.0.0.1", "--master_port", str(port),
                 "-m", "adapt", "train", str(recipe_file), *overrides],
                cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT), log))
    return nodes


def _finish(nodes) -> list[tuple[int, str]]:
    """(exit code, output) of each node's launcher once it ends."""
    return [(process.wait(timeout=600), log.read_text()) for process, log in nodes]


def _write_recipe(root: Path, name: str, *overrides: str):
    recipe = recipe_for(root, "train.batch_size=2", *overrides, output=name)
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(recipe.to_dict()))
    return recipe, path


@pytest.mark.parametrize("backend", list(BACKENDS))
def test_two_nodes_match_one_process(single, backend):
    root, reference, reference_losses = single
    recipe, path = _write_recipe(root, backend, f"train.max_steps={STEPS}", *BACKENDS[backend])
    for code, output in _finish(_launch_nodes(path)):
        assert code == 0, output[-3000:]
    losses = _losses(recipe.output_dir)
    print(f"{backend} on two nodes: losses {losses} (one process: {reference_losses})")
    assert losses == pytest.approx(reference_losses, abs=1e-5)
    assert_close_tensors(tensors(reference.model_dir), tensors(Path(recipe.output_dir) / "model"), f"{backend}: ")


def test_sigterm_to_one_node_checkpoints_both_and_resume_continues(tmp_path):
    steps = 40
    reference = train(recipe_for(tmp_path, "train.grad_accum=2", "train.batch_size=2", f"train.max_steps={steps}",
                                 "train.eval_batches=0", output="single"))
    recipe, path = _write_recipe(tmp_path, "stopped", f"train.max_steps={steps}", "train.eval_batches=0",
                                 *BACKENDS["zero2"])
    nodes = _launch_nodes(path)
    (node0, log0), (node1, _) = nodes
    deadline = time.monotonic() + 300
    while "\nstep " not in log0.read_text():  # rank 0 logs every step
        assert node0.poll() is None and time.monotonic() < deadline, log0.read_text()[-3000:]
        time.sleep(0.2)
    node1.send_signal(signal.SIGTERM)
    results = _finish(nodes)
    assert all(code != 0 for code, _ in results), "the run finished before the signal arrived"
    for rank, (_, output) in enumerate(results):
        assert "stopped by SIGTERM" in output, f"node {rank}: {output[-3000:]}"
    (checkpoint,) = complete_checkpoints(Path(recipe.output_dir))
    stopped_at = json.loads((checkpoint / "trainer_state.json").read_text())["step"]
    assert 0 < stopped_at < steps
    assert not (Path(recipe.output_dir) / "model").exists()

    for code, output in _finish(_launch_nodes(path, "resume=auto")):
        assert code == 0, output[-3000:]
    print(f"stopped at step {stopped_at} of {steps}, resumed on two nodes")
    assert_close_tensors(tensors(reference.model_dir), tensors(Path(recipe.output_dir) / "model"))


def _losses(output_dir) -> list[float]:
    return [record["loss"] for record in step_records(output_dir)]
