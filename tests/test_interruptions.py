"""A run survives preemption, kill -9, a crash while saving and numerical faults, and loses nothing.

Properties proved here:
- SIGTERM / SIGINT: the step in progress finishes, a complete checkpoint is written, and the process
  exits 143 / 130 (distinct codes; `adapt.train.EXIT_CODES`); the checkpoint resumes.
- kill -9 at a random step, then `--resume`: the final weights equal an uninterrupted run's bit for bit.
- a crash in the middle of writing a checkpoint leaves the previous checkpoints intact; resume ignores
  the half-written folder and still ends with the uninterrupted run's weights.
- non-finite loss or gradient: the optimizer step is skipped (weights unchanged) with a warning; after
  `train.max_nonfinite_steps` in a row the run stops with a checkpoint of finite weights (exit code 3);
  weights that became non-finite are never written to a checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import random
import signal
import subprocess
import sys
import time

import pytest
import torch

from adapt.cli import main
from adapt.errors import UserError
from adapt.recipe import load_recipe
from adapt.train import EXIT_CODES, EXIT_NONFINITE, NumericalFault, complete_checkpoints, train

from .tiny_runs import ENV, assert_same_tensors, corpus, diffusion_folder, recipe, run_cli, tensors

STEPS = 6


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted run: (its folder, its exported weights)."""
    folder = tmp_path_factory.mktemp("reference")
    result = train(load_recipe(recipe(folder, "reference", train__max_steps=STEPS)))
    return folder, tensors(result.model_dir)


def _start(recipe_path, *args) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "adapt", "train", str(recipe_path), *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)


def _wait_for(process: subprocess.Popen, prefix: str) -> str:
    for line in process.stdout:
        if line.startswith(prefix):
            return line
    raise AssertionError(f"the run ended before printing {prefix!r}: {process.stderr.read()[-2000:]}")


# SIGINT's checkpoint and exit code are also proved in-process by tests/test_train.py; its real-signal
# run here is in the slow set.
@pytest.mark.parametrize("signum", [pytest.param(signal.SIGTERM, id="SIGTERM"),
                                    pytest.param(signal.SIGINT, id="SIGINT", marks=pytest.mark.slow)])
def test_a_signal_writes_a_complete_checkpoint_and_exits_with_its_code(tmp_path, signum):
    path = recipe(tmp_path, train__max_steps=100_000, checkpoint__every=0, train__eval_batches=0)
    process = _start(path)
    _wait_for(process, "step ")
    process.send_signal(signum)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == EXIT_CODES[signum] == {signal.SIGTERM: 143, signal.SIGINT: 130}[signum]
    assert "Traceback" not in stderr
    assert f"stopped by {signal.Signals(signum).name}" in stderr.strip().splitlines()[-1]
    (checkpoint,) = complete_checkpoints(tmp_path / "run-recipe")
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    assert 0 < state["step"] < 100_000
    assert not list((tmp_path / "run-recipe" / "checkpoints").glob(".tmp-*"))
    assert not (tmp_path / "run-recipe" / "model").exists()
    # That such a checkpoint resumes to the uninterrupted run's weights is proved in-process by
    # tests/test_train.py::test_signal_checkpoints_and_resume_ends_with_identical_weights.


def _stopped_within_seconds(process: subprocess.Popen, signum: int) -> str:
    """Send `signum` to the still-running `process`; its stderr once it has exited, well before the hours
    its work would take (generously bounded: these machines are noisy)."""
    assert process.poll() is None, f"the work ended before the signal: {process.stderr.read()[-2000:]}"
    process.send_signal(signum)
    sent = time.monotonic()
    _, stderr = process.communicate(timeout=120)
    assert time.monotonic() - sent < 30, f"took {time.monotonic() - sent:.0f} s to stop"
    assert process.returncode == EXIT_CODES[signum], stderr[-2000:]
    assert "Traceback" not in stderr
    return stderr


@pytest.mark.slow
def test_a_signal_during_a_long_validation_stops_it_and_keeps_the_steps_checkpoint(tmp_path):
    """train.eval_samples at its bound (1024 forwards per validation batch) once made a validation that
    ignored SIGTERM for hours: every forward now checks the stop vote; the step's checkpoint is written."""
    from adapt.train.lock import LOCK_FILE

    path = recipe(tmp_path, train__max_steps=3, train__eval_every=1, train__eval_batches=1000,
                  train__eval_samples=1024, checkpoint__every=0)
    process = _start(path)
    _wait_for(process, "step 1 ")  # validation follows at once
    time.sleep(2)
    stderr = _stopped_within_seconds(process, signal.SIGTERM)
    assert "stopped by SIGTERM" in stderr.strip().splitlines()[-1]
    run = tmp_path / "run-recipe"
    assert [p.name for p in complete_checkpoints(run)] == ["step-000001"]
    assert "val_elbo_nll" not in (run / "metrics.jsonl").read_text()  # the cut validation is not reported
    assert not (run / LOCK_FILE).exists()


@pytest.mark.slow
def test_eval_stops_within_seconds_of_sigterm(tmp_path):
    """`adapt eval` has no checkpoint to write: it stops where it is, with one line and exit code 143."""
    model, data = diffusion_folder(tmp_path / "diffusion"), corpus(tmp_path / "corpus.jsonl")
    process = subprocess.Popen([sys.executable, "-m", "adapt", "eval", str(model), "--task", "elbo", "--data", str(data),
                                "--samples", "1024", "--seq-len", "32", "--output", str(tmp_path / "eval.json")],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    time.sleep(15)  # loading or scoring: either stops
    stderr = _stopped_within_seconds(process, signal.SIGTERM)
    assert stderr.strip().splitlines() == ["adapt eval: stopped by SIGTERM"]
    assert not (tmp_path / "eval.json").exists()


def test_a_signal_landing_during_the_stop_vote_counts_at_the_next_vote(monkeypatch):
    """Processes must stop at the same step. A signal that arrives while this process waits in the vote's
    all-reduce was not in its vote, so the other processes (which reduced a 0) go on; stopping here now
    would leave them blocked in the next step's collectives (a two-node run died this way in CI)."""
    from adapt.train import stops

    stop = stops.StopSignal()
    try:
        def vote_then_signal(values):
            stop._handle(signal.SIGTERM, None)  # delivered while the collective is in flight
            return values  # one process: the reduced vote is its own
        monkeypatch.setattr(stops, "all_reduce_sum", vote_then_signal)
        assert stop.agreed("cpu") is None
        monkeypatch.setattr(stops, "all_reduce_sum", lambda values: values)
        assert stop.agreed("cpu") == signal.SIGTERM  # the next vote carries it
    finally:
        stop.restore()
    other = stops.StopSignal()
    try:
        monkeypatch.setattr(stops, "all_reduce_sum", lambda values: values + 1)  # another process saw one
        assert other.agreed("cpu") == signal.SIGTERM
    finally:
        other.restore()


def test_kill_9_at_a_random_step_then_resume_gives_the_uninterrupted_weights(tmp_path, reference):
    _, expected = reference
    path = recipe(tmp_path, train__max_steps=STEPS)
    kill_after = random.randint(1, STEPS - 2)
    process = _start(path)
    _wait_for(process, f"adapt train: checkpoint {tmp_path / 'run-recipe' / 'checkpoints'}/step-{kill_after:06d}")
    process.kill()  # SIGKILL: no handler runs; whatever was being written stays half-written
    process.communicate(timeout=60)
    assert process.returncode == -signal.SIGKILL
    survivors = complete_checkpoints(tmp_path / "run-recipe")
    assert survivors and int(survivors[-1].name.split("-")[1]) >= kill_after
    assert not (tmp_path / "run-recipe" / "model").exists()

    resumed = run_cli("train", path, "--resume")
    assert resumed.returncode == 0, f"killed after step {kill_after}: {resumed.stderr[-2000:]}"
    assert f"resumed from {survivors[-1]}" in resumed.stdout
    assert_same_tensors(tensors(tmp_path / "run-recipe" / "model"), expected)


def test_a_crash_while_writing_a_checkpoint_keeps_the_previous_one(tmp_path, reference, monkeypatch):
    from accelerate import Accelerator

    _, expected = reference
    path = recipe(tmp_path, train__max_steps=STEPS)
    real_save_state = Accelerator.save_state
    calls = []

    def crash_on_the_third(self, output_dir=None, **kwargs):
        calls.append(output_dir)
        real_save_state(self, output_dir, **kwargs)  # the files land in the temporary folder...
        if len(calls) == 3:
            raise OSError("No space left on device")  # ...and the writer dies before finishing

    monkeypatch.setattr(Accelerator, "save_state", crash_on_the_third)
    with pytest.raises(UserError, match="writing .*step-000003 failed: No space"):  # one line, naming it
        train(load_recipe(path))
    run = tmp_path / "run-recipe"
    assert [p.name for p in complete_checkpoints(run)] == ["step-000001", "step-000002"]
    assert not (run / "checkpoints" / ".tmp-step-000003").exists()  # the half-written folder is removed

    monkeypatch.setattr(Accelerator, "save_state", real_save_state)
    result = train(load_recipe(path, ["resume=auto"]))
    assert_same_tensors(tensors(result.model_dir), expected)
    assert [p.name for p in complete_checkpoints(run)][-1] == f"step-{STEPS:06d}"


# -- numerical faults ----------------------------------------------------------------------------


def _poison_losses(monkeypatch, bad_calls):
    """Make the training loss NaN on the given (1-based) micro-batches, as a diverging run would."""
    import adapt.train.build

    real_loss = adapt.train.build.diffusion_loss
    count = {"calls": 0}

    def loss(*args, **kwargs):
        out = real_loss(*args, **kwargs)
        count["calls"] += 1
        if count["calls"] in bad_calls:
            return dataclasses.replace(out, loss=out.loss * float("nan"))
        return out

    monkeypatch.setattr(adapt.train.build, "diffusion_loss", loss)


def _weights(checkpoint) -> dict:
    return tensors(checkpoint)


def test_a_non_finite_step_is_skipped_with_a_warning(tmp_path, monkeypatch, capsys):
    _poison_losses(monkeypatch, bad_calls={2})
    path = recipe(tmp_path, train__max_steps=4, train__max_nonfinite_steps=2)
    result = train(load_recipe(path))
    run = tmp_path / "run-recipe"
    checkpoints = {p.name: p for p in complete_checkpoints(run)}
    assert_same_tensors(_weights(checkpoints["step-000002"]), _weights(checkpoints["step-000001"]))
    assert not torch.equal(_weights(checkpoints["step-000003"])["model.model.norm.weight"],
                           _weights(checkpoints["step-000002"])["model.model.norm.weight"])
    assert all(torch.isfinite(t).all() for t in tensors(result.model_dir).values())
    assert "step 2: non-finite loss or gradient" in capsys.readouterr().err
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r.get("skipped")] == [2]


def test_consecutive_non_finite_steps_stop_the_run_with_a_finite_checkpoint(tmp_path, monkeypatch, capsys):
    _poison_losses(monkeypatch, bad_calls=set(range(3, 100)))
    path = recipe(tmp_path, train__max_steps=8, train__max_nonfinite_steps=2)
    assert main(["train", str(path)]) == EXIT_NONFINITE == 3
    err = capsys.readouterr().err.strip().splitlines()
    assert "after 2 steps in a row with a non-finite loss or gradient" in err[-1]
    run = tmp_path / "run-recipe"
    assert [p.name for p in complete_checkpoints(run)][-1] == "step-000004"
    last = _weights(run / "checkpoints" / "step-000004")
    assert_same_tensors(last, _weights(run / "checkpoints" / "step-000002"))
    assert not (run / "model").exists()  # a run that stopped is not exported as if it had finished
    # the stop is a checkpoint like any other: fix the cause and continue
    monkeypatch.undo()
    assert train(load_recipe(path, ["resume=auto"])).steps == 8


def test_non_finite_weights_are_never_written_to_a_checkpoint(tmp_path, monkeypatch, capsys):
    real_step = torch.optim.AdamW.step
    count = {"steps": 0}

    def step_then_overflow(self, *args, **kwargs):
        out = real_step(self, *args, **kwargs)
        count["steps"] += 1
        if count["steps"] == 3:
            with torch.no_grad():
                self.param_groups[0]["params"][0].fill_(float("inf"))
        return out

    monkeypatch.setattr(torch.optim.AdamW, "step", step_then_overflow)
    path = recipe(tmp_path, train__max_steps=5)
    with pytest.raises(NumericalFault, match="weights became non-finite by step 3") as stop:
        train(load_recipe(path))
    assert stop.value.exit_code == EXIT_NONFINITE and stop.value.checkpoint is None
    run = tmp_path / "run-recipe"
    assert [p.name for p in complete_checkpoints(run)] == ["step-000001", "step-000002"]
    assert not list((run / "checkpoints").glob(".tmp-*")) and not (run / "model").exists()
    for checkpoint in complete_checkpoints(run):
        assert all(torch.isfinite(t).all() for t in _weights(checkpoint).values())
