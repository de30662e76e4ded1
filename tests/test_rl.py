"""`adapt rl` end to end on a tiny model: the held-out reward rises, every figure is logged, a run stopped
between the iterations of a rollout resumes bit-exactly, LoRA with a KL to the reference exports a
loadable model, and bad input is one line with exit code 2."""

import json
import shutil
from pathlib import Path

import pytest

from adapt.cli import main
from adapt.recipe import load_recipe
from adapt.rl import train_rl

from .tiny_runs import causal_folder, diffusion_folder, step_records
from .tiny_runs import tensors as weights


def _recipe(folder: Path, *overrides: str, output: str = "run"):
    """An rl recipe on a tiny bidirectional model: 8 training prompts, 6 held out, the format reward
    'the completion contains w7', G = 8 completions of 6 tokens, 2 prompts a step."""
    model = folder / "model"  # a test may have put another model there
    if not model.exists():
        diffusion_folder(model)
    if not (folder / "prompts.txt").exists():
        (folder / "prompts.txt").write_text("".join(f"w{10 + i} w{20 + i} w{30 + i}\n" for i in range(8)))
        (folder / "held_out.txt").write_text("".join(f"w{50 + i} w{60 + i}\n" for i in range(6)))
    base = [f"model.path={model}", f"rl.prompts={folder / 'prompts.txt'}", f"rl.eval_prompts={folder / 'held_out.txt'}",
            "rl.rewards=[format]", "rl.format_pattern=w7", "rl.num_generations=8", "rl.completion_length=6",
            "train.grad_accum=2", "train.max_steps=4", "optim.lr=3e-3", "optim.schedule=constant",
            "logging.tensorboard=false", "checkpoint.every=0", f"output_dir={folder / output}"]
    return load_recipe(None, base + list(overrides))


def _records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_the_held_out_reward_rises_and_every_figure_is_logged(tmp_path):
    recipe = _recipe(tmp_path, "train.max_steps=20", "rl.eval_every=10", "logging.tensorboard=true")
    train_rl(recipe)
    run_dir = Path(recipe.output_dir)
    held_out = [r for r in _records(run_dir) if "eval_reward" in r]
    assert [r["step"] for r in held_out] == [0, 10, 20]
    before, after = held_out[0], held_out[-1]
    print(f"held-out reward {before['eval_reward']:.3f} +- {before['eval_reward_se']:.3f} -> "
          f"{after['eval_reward']:.3f} +- {after['eval_reward_se']:.3f}")
    assert after["eval_reward"] > before["eval_reward"] + 0.3
    assert after["eval_reward"] - before["eval_reward"] > 3 * (before["eval_reward_se"] + after["eval_reward_se"])
    steps = step_records(run_dir)
    assert [r["step"] for r in steps] == list(range(1, 21))
    for key in ("reward", "reward_std", "reward_format", "kl", "clip_fraction", "completion_length", "reward_errors"):
        assert all(key in r for r in steps), key
    assert list((run_dir / "logs").rglob("events.out.tfevents.*"))


def test_a_run_stopped_within_a_rollout_resumes_bit_exactly(tmp_path):
    """mu = 2: steps 1 and 3 learn from the rollouts drawn at steps 0 and 2. Killed after the checkpoint of
    step 3 (before step 4, the second iteration of a rollout), the resumed run learns from the same
    completions and old log-probabilities, so its weights and figures are those of a straight run."""
    def logged(run_dir):
        return [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in _records(run_dir)]

    common = ("rl.iterations=2", "rl.estimator=diffu-grpo", "rl.prompt_mask_prob=0.3")
    straight = train_rl(_recipe(tmp_path, *common, output="straight"))
    killed = _recipe(tmp_path, *common, "checkpoint.every=1", "checkpoint.keep=10", output="killed")
    train_rl(killed)
    run_dir = Path(killed.output_dir)
    shutil.rmtree(run_dir / "checkpoints" / "step-000004")
    shutil.rmtree(run_dir / "model")
    state = json.loads((run_dir / "checkpoints" / "step-000003" / "data_rank0.json").read_text())
    assert len(state["rollout"]["groups"]) == 2 and len(state["rollout"]["groups"][0]["old_logps"]) == 1
    resumed = train_rl(_recipe(tmp_path, *common, "checkpoint.every=1", "checkpoint.keep=10", "resume=auto",
                               output="killed"))
    assert resumed.steps == 4 and resumed.tokens_trained == straight.tokens_trained
    a, b = weights(straight.model_dir), weights(resumed.model_dir)
    assert a.keys() == b.keys() and all((a[name] == b[name]).all() for name in a)
    assert logged(run_dir) == logged(Path(straight.model_dir).parent)
    assert [r["iteration"] for r in step_records(run_dir)] == [0, 1, 0, 1]


def test_lora_with_a_kl_to_the_reference_exports_a_loadable_model(tmp_path):
    from adapt.export import load

    recipe = _recipe(tmp_path, "lora.r=4", "rl.kl_weight=0.1", "rl.iterations=2", "train.max_steps=2",
                     "rl.eval_prompts=null")
    result = train_rl(recipe)
    steps = step_records(Path(recipe.output_dir))
    assert steps[0]["kl"] == 0  # the policy is the reference until its first update
    assert steps[1]["kl"] > 0
    model, tokenizer, config = load(result.model_dir)
    assert config.mask_token_id is not None and not any("lora" in name for name, _ in model.named_parameters())


@pytest.mark.parametrize("mode, settings", [
    ("block", ["rl.estimator=coupled"]),
    ("hybrid", ["rl.estimator=ar", "rl.decoding=verify"]),
    ("hybrid", ["rl.estimator=diffu-grpo", "rl.decoding=diffusion"]),
])
def test_every_mode_samples_and_estimates_as_it_decodes(tmp_path, mode, settings):
    """A block model (its blocks, exact cache) and a hybrid one (its AR head verifying and exact, or its
    drafts diffusion-decoded and estimated): on a rollout's first step the ratio is 1 and nothing is clipped
    (with token weights 1 the loss is then 0: a group's advantages sum to 0); its second step learns from
    the same rollout."""
    import dataclasses

    import adapt
    from adapt.block import BlockMode
    from adapt.diffusion import DiffusionConfig
    from adapt.hybrid import HybridMode
    from adapt.presets import tiny_model, tiny_tokenizer

    model, tokenizer = tiny_model("llama"), tiny_tokenizer()
    adapt.ensure_mask_token(model, tokenizer, "add")
    kind = BlockMode(block_size=4) if mode == "block" else HybridMode(draft_size=2)
    config = dataclasses.replace(DiffusionConfig.from_model_config(model.config), mode=kind)
    adapt.save_checkpoint(model, tokenizer, tmp_path / "model", diffusion=config)
    recipe = _recipe(tmp_path, *settings, "rl.iterations=2", "train.max_steps=2", "rl.eval_prompts=null")
    train_rl(recipe)
    first, second = step_records(Path(recipe.output_dir))
    assert first["clip_fraction"] == 0
    if recipe.rl.estimator != "coupled":  # coupled's weights differ between rows (an empty half halves them)
        assert first["loss"] == pytest.approx(0, abs=1e-6)
    assert second["reward"] == first["reward"] and second["iteration"] == 1


def _refused(capsys, code: int, message: str) -> None:
    err = capsys.readouterr().err.strip()
    assert code == 2 and message in err and len(err.splitlines()) == 1, err


def _write(tmp_path, capsys) -> Path:
    """The recipe as a file, the model's progress bars cleared from the captured output."""
    import yaml

    path = tmp_path / "rl.yaml"
    path.write_text(yaml.safe_dump(_recipe(tmp_path).to_dict()))
    capsys.readouterr()
    return path


@pytest.mark.parametrize("overrides, message", [
    (["rl.num_generations=1"], "rl.num_generations = 1 is out of range"),
    (["rl.rewards=[no_such_reward_module:score]"], "cannot import no_such_reward_module"),
    (["rl.completion_length=300"], "the longest prompt (3 tokens) and rl.completion_length (300)"),
    (["rl.estimator=ar"], "this bidirectional model has none"),
    (["rl.steps=7"], "rl.steps = 7 is more than the 6 tokens"),
    (["train.batch_size=4"], "train.batch_size is not read by adapt rl"),
    (["rl.decoding=verify"], "decoding 'verify' checks drafts with the model's AR head"),
])
def test_bad_input_is_one_line(tmp_path, capsys, overrides, message):
    path = _write(tmp_path, capsys)
    _refused(capsys, main(["rl", str(path), *overrides]), message)


def test_a_causal_lm_and_the_wrong_command_are_refused(tmp_path, capsys):
    causal = causal_folder(tmp_path / "causal")
    path = _write(tmp_path, capsys)
    _refused(capsys, main(["rl", str(path), f"model.path={causal}"]), "is a causal LM")
    _refused(capsys, main(["rl", str(path), "rl.kl_weight=0.1", f"rl.reference={causal}"]),
             "is not a diffusion model with the policy's mask token")
    _refused(capsys, main(["train", str(path)]), "run it with adapt rl")
    _refused(capsys, main(["rl", str(path), "rl.prompts=", "data.path=corpus.txt"]), "rl.prompts is not set")


@pytest.mark.slow
@pytest.mark.parametrize("backend, overrides", [
    ("ddp", []),
    ("deepspeed", [f"distributed.deepspeed_config={Path(__file__).resolve().parents[1] / 'recipes/deepspeed/zero3.json'}"]),
    ("fsdp", ["distributed.backend=fsdp"]),
])
def test_two_processes_learn_what_one_process_does(tmp_path, backend, overrides):
    """Two processes (DDP, ZeRO-3, FSDP2: sampling and the estimators run on gathered weights), one prompt
    a process, against one process accumulating the same two prompts: the prompts, the samples and the
    noise depend on the global prompt index alone, so the weights agree up to the order of float sums."""
    import os
    import subprocess
    import sys

    import yaml

    from .tiny_runs import assert_close_tensors

    one = train_rl(_recipe(tmp_path, "rl.iterations=2", "train.max_steps=2", output="one"))
    two = _recipe(tmp_path, "rl.iterations=2", "train.max_steps=2", "train.grad_accum=1", *overrides, output="two")
    path = tmp_path / "two.yaml"
    path.write_text(yaml.safe_dump(two.to_dict()))
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "adapt", "rl", str(path)], cwd=root, capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false"))
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"backend {backend}, 2 process(es)" in done.stdout
    assert_close_tensors(weights(one.model_dir), weights(Path(two.output_dir) / "model"))
    first = [r for r in step_records(Path(two.output_dir))]
    assert [r["reward"] for r in first] == [r["reward"] for r in step_records(Path(one.model_dir).parent)]


def test_the_kinds_of_draws_never_share_a_generator_stream():
    """Noise, samples and held-out samples from distinct streams, distinct in the low 32 bits of the seed,
    all that a CPU generator keeps."""
    from types import SimpleNamespace

    from adapt.rl.run import DRAWS, _draws

    run = SimpleNamespace(recipe=SimpleNamespace(train=SimpleNamespace(seed=3)),
                          accelerator=SimpleNamespace(device="cpu"))
    seeds = [_draws(run, kind, index).initial_seed() % 2**32 for kind in DRAWS for index in range(2000)]
    assert len(set(seeds)) == len(seeds)
