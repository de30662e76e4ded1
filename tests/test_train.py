"""The training loop on one CPU process: it learns, resumes bit-exactly, checkpoints on signals, trains
LoRA adapters and new rows only (merged on export), and never masks SFT prompts or padding."""

import dataclasses
import json
import os
import random
import shutil
import signal
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import adapt.data
import adapt.diffusion
import adapt.train.backends
from adapt.diffusion import DiffusionConfig, diffusion_loss
from adapt.errors import UserError
from adapt.train import Interrupted, complete_checkpoints, train

from .tiny_runs import SEQ_LEN, assert_close_tensors, noise_from_the_data, recipe_for, step_records
from .tiny_runs import tensors as weights  # every tensor of a model folder


# ---- a helper of this file's own tests (the shared builders are in tiny_runs.py) ----------------

def sft_corpus(root: Path, rows: int = 40) -> Path:
    """Prompts use words w3..w49, responses w60..w119, so a masked position tells which part it was."""
    rng = random.Random(1)
    path = Path(root) / "sft.jsonl"
    with path.open("w") as f:
        for _ in range(rows):
            prompt = " ".join(f"w{rng.randrange(3, 50)}" for _ in range(rng.randrange(3, 10)))
            response = " ".join(f"w{rng.randrange(60, 120)}" for _ in range(rng.randrange(2, 12)))
            f.write(json.dumps({"prompt": prompt, "response": " " + response}) + "\n")
    return path


# ---- tests ----------------------------------------------------------------------------------------

def test_training_lowers_the_loss_and_exports_a_diffusion_checkpoint(tmp_path):
    recipe = recipe_for(tmp_path, "train.max_steps=40", "train.anneal_steps=1", "optim.warmup_steps=2",
                        "logging.tensorboard=true")
    result = train(recipe)

    import adapt

    before, tokenizer = adapt.load_model(recipe.model.path)
    adapt.ensure_mask_token(before, tokenizer, "add")
    after, _, config = adapt.load(result.model_dir)
    assert config.tokens_trained == result.tokens_trained == 40 * 4 * SEQ_LEN
    assert config.mask_token_id == tokenizer.mask_token_id
    assert config.trained_with == dataclasses.asdict(recipe.diffusion)  # the record of what it was trained with
    assert config.base_model == recipe.model.path

    # The same blocks, noise levels and masks for both models, at the trained (bidirectional) attention.
    blocks = adapt.data.open_dataset(recipe.data, tokenizer, split="validation")
    batch = next(blocks.batches(8))
    generator = torch.Generator().manual_seed(0)
    t = torch.full((8,), 0.5)
    mask = torch.rand(batch["input_ids"].shape, generator=generator) < 0.5
    losses = []
    for model in (before, after):
        adapt.set_attention(model, 1.0)
        with torch.no_grad():
            losses.append(diffusion_loss(model.eval(), batch["input_ids"], config, t=t, mask=mask).loss.item())
    assert losses[1] < 0.6 * losses[0], losses

    lines = [json.loads(line) for line in (Path(recipe.output_dir) / "metrics.jsonl").read_text().splitlines()]
    steps = [line for line in lines if "loss" in line]
    assert [s["step"] for s in steps] == list(range(1, 41))
    assert {"loss", "masked_ce", "ratio", "lr", "grad_norm", "tokens_per_s"} <= set(steps[0])
    assert "val_elbo_nll" in lines[-1]
    assert list((Path(recipe.output_dir) / "logs").rglob("events.out.tfevents.*")), "no TensorBoard events"


def test_attention_ratio_follows_the_optimizer_step(tmp_path):  # with gradient checkpointing
    recipe = recipe_for(tmp_path, "train.max_steps=4", "train.grad_accum=2", "train.anneal_steps=3",
                        "train.eval_batches=0", "train.gradient_checkpointing=true")
    train(recipe)
    lines = [json.loads(line) for line in (Path(recipe.output_dir) / "metrics.jsonl").read_text().splitlines()]
    assert [line["ratio"] for line in lines] == [1 / 3, 2 / 3, 1.0, 1.0]
    assert [line["tokens_trained"] for line in lines] == [2 * 4 * SEQ_LEN * k for k in (1, 2, 3, 4)]


class SignalAfter:
    """Wraps the training blocks: sends `signum` to this process while batch `after` is being consumed."""

    def __init__(self, blocks, signum: int, after: int):
        self.blocks, self.signum, self.after = blocks, signum, after

    def batches(self, *args, **kwargs):
        for i, batch in enumerate(self.blocks.batches(*args, **kwargs), start=1):
            if i == self.after:
                os.kill(os.getpid(), self.signum)
            yield batch

    def state_dict(self):
        return self.blocks.state_dict()

    def load_state_dict(self, state):
        self.blocks.load_state_dict(state)


@pytest.mark.parametrize("signum, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_signal_checkpoints_and_resume_ends_with_identical_weights(tmp_path, monkeypatch, signum, code):
    uninterrupted = train(recipe_for(tmp_path, "train.grad_accum=2", output="straight"))

    open_dataset = adapt.data.open_dataset

    def interrupting(config, tokenizer, split="train"):
        blocks = open_dataset(config, tokenizer, split)
        return SignalAfter(blocks, signum, after=5) if split == "train" else blocks

    monkeypatch.setattr(adapt.data, "open_dataset", interrupting)
    recipe = recipe_for(tmp_path, "train.grad_accum=2", output="interrupted")
    with pytest.raises(Interrupted) as stop:
        train(recipe)
    assert stop.value.exit_code == code
    # batch 5 is the first micro-batch of step 3, drawn with the second before either trains: the step stops
    # between them, before its update, and the checkpoint is step 2's with the data rewound to step 3's start
    assert [p.name for p in complete_checkpoints(recipe.output_dir)] == ["step-000002"]
    assert signal.getsignal(signum) is not None and not (Path(recipe.output_dir) / "model").exists()

    monkeypatch.setattr(adapt.data, "open_dataset", open_dataset)
    with pytest.raises(UserError, match="already has checkpoints"):
        train(recipe)
    resumed = train(recipe_for(tmp_path, "train.grad_accum=2", "resume=auto", output="interrupted"))
    assert resumed.steps == uninterrupted.steps == 6
    assert resumed.tokens_trained == uninterrupted.tokens_trained
    a, b = weights(uninterrupted.model_dir), weights(resumed.model_dir)
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_a_run_killed_between_checkpoints_resumes_with_each_step_logged_once(tmp_path):
    def logged(run_dir: Path) -> list[dict]:  # everything but the wall-clock speed
        records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        return [{k: v for k, v in record.items() if k != "tokens_per_s"} for record in records]

    straight = train(recipe_for(tmp_path, "checkpoint.every=3", "train.eval_every=2", output="straight"))
    killed = recipe_for(tmp_path, "checkpoint.every=3", "train.eval_every=2", output="killed")
    train(killed)
    # as if killed (SIGKILL, OOM) after logging step 6 and half a line, before its checkpoint and export
    run_dir = Path(killed.output_dir)
    shutil.rmtree(run_dir / "checkpoints" / "step-000006")
    shutil.rmtree(run_dir / "model")
    with (run_dir / "metrics.jsonl").open("a") as f:
        f.write('{"step": 7, "lo')
    resumed = train(recipe_for(tmp_path, "checkpoint.every=3", "train.eval_every=2", "resume=auto", output="killed"))
    assert resumed.steps == 6
    records = logged(run_dir)
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4, 5, 6]
    assert records == logged(Path(straight.model_dir).parent)  # resumed bit-exactly, so the same figures


def test_checkpoints_keep_the_newest_and_ignore_unfinished_ones(tmp_path, monkeypatch, capsys):  # under bf16 autocast
    monkeypatch.setattr(adapt.train.backends, "cpu_has_native_bf16", lambda: False)
    recipe = recipe_for(tmp_path, "checkpoint.every=2", "checkpoint.keep=2", "train.eval_batches=0",
                        "train.mixed_precision=bf16")
    train(recipe)
    # a CPU that would emulate bf16 is told so once, with the setting that fixes it
    assert capsys.readouterr().err.count("no native bf16") == 1
    unfinished = Path(recipe.output_dir) / "checkpoints" / ".tmp-step-000008"
    unfinished.mkdir()
    assert [p.name for p in complete_checkpoints(recipe.output_dir)] == ["step-000004", "step-000006"]
    state = json.loads((complete_checkpoints(recipe.output_dir)[-1] / "trainer_state.json").read_text())
    assert state["step"] == 6 and state["recipe"]["train"]["anneal_steps"] == 4
    assert DiffusionConfig.from_dict(state["diffusion"]).mask_token_id is not None
    assert json.loads((complete_checkpoints(recipe.output_dir)[-1] / "data_rank0.json").read_text())


def test_lora_trains_adapters_and_the_mask_row_only_and_merges_exactly(tmp_path):
    import adapt
    from adapt.train.backends import SingleBackend
    from adapt.train.build import apply_lora, load_model

    recipe = recipe_for(tmp_path, "lora.r=4", "lora.alpha=8", "train.max_steps=3", "train.eval_batches=0")
    result = train(recipe)

    original, _, diffusion = load_model(recipe, SingleBackend)
    original_state = {k: v.clone() for k, v in original.state_dict().items()}
    peft_model = apply_lora(original, recipe, diffusion)
    saved = load_file(str(complete_checkpoints(recipe.output_dir)[-1] / "model.safetensors"))
    missing, unexpected = peft_model.load_state_dict({k.removeprefix("model."): v for k, v in saved.items()}, strict=False)
    assert not unexpected and not [k for k in missing if "lora" in k or "token_adapter" in k]

    trained = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    assert trained and all("lora_" in n or "trainable_tokens" in n for n in trained)
    base = {n.replace("base_model.model.", "").replace(".base_layer", ""): p
            for n, p in peft_model.named_parameters() if not p.requires_grad}
    for name, value in base.items():
        if name in original_state:
            assert torch.equal(value, original_state[name]), f"{name} changed under LoRA"

    merged, tokenizer, config = adapt.load(result.model_dir)
    mask_id = config.mask_token_id
    embed = merged.get_input_embeddings().weight
    before = original_state["model.embed_tokens.weight"]
    changed_rows = (embed != before).any(dim=1).nonzero().flatten().tolist()
    assert changed_rows == [mask_id], changed_rows

    ids = torch.tensor([[1, 5, mask_id, 9, mask_id, 40, 7, 3]])
    for model in (peft_model, merged):
        adapt.set_attention(model, 1.0)  # a partial ratio would draw a different mask for each model
    with torch.no_grad():
        expected = peft_model.eval()(input_ids=ids).logits
        got = merged(input_ids=ids).logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("padding", ["eos", "pad"])
def test_sft_never_masks_the_prompt_or_padding(tmp_path, monkeypatch, padding):
    seen = []
    corrupt = adapt.diffusion.corrupt

    def recording(input_ids, t, maskable, mask_token_id, **kwargs):
        noisy, mask = corrupt(input_ids, t, maskable, mask_token_id, **kwargs)
        seen.append((input_ids.clone(), mask.clone()))
        return noisy, mask

    monkeypatch.setattr(adapt.diffusion, "corrupt", recording)
    data = sft_corpus(tmp_path)
    recipe = recipe_for(tmp_path, "data.format=sft", f"data.path={data}", "data.validation_path=null",
                        "data.validation_fraction=0.2", "train.anneal_steps=1", "train.max_steps=3",
                        f"data.sft_padding={padding}")
    train(recipe)
    masked = torch.cat([ids[mask] for ids, mask in seen])
    assert masked.numel() > 0
    words = masked[(masked != 2)]  # EOS ends each response and is a target
    assert (words >= 60).all(), "a prompt token or padding was masked"


# ---- method: continuing, normalisation, the logged rate -------------------------------------------

def test_continuing_an_adapted_checkpoint_keeps_its_bidirectional_attention(tmp_path):
    import adapt

    adapted = train(recipe_for(tmp_path, "train.max_steps=2", "train.anneal_steps=1", "train.eval_batches=0",
                               output="adapted"))
    # The default anneal_steps (10,000) would restart the schedule near causal attention (ratio 1e-4).
    continued = recipe_for(tmp_path, f"model.path={adapted.model_dir}", "train.max_steps=2",
                           "train.anneal_steps=10000", "train.eval_batches=0", output="continued")
    result = train(continued)
    assert [s["ratio"] for s in step_records(continued.output_dir)] == [1.0, 1.0]
    _, _, config = adapt.load(result.model_dir)
    assert config.annealing_finished
    assert config.tokens_trained == result.tokens_trained == adapted.tokens_trained + 2 * 4 * SEQ_LEN


@pytest.mark.parametrize("loss_norm", ["masked", "tokens"])
def test_the_objective_does_not_depend_on_how_a_step_is_split(tmp_path, monkeypatch, loss_norm):
    import adapt.train.loop

    monkeypatch.setattr(adapt.train.loop, "draw_noise", noise_from_the_data)
    common = ("train.max_steps=2", "train.anneal_steps=1", "train.eval_batches=0", "optim.warmup_steps=0",
              f"diffusion.loss_norm={loss_norm}")
    whole = train(recipe_for(tmp_path, "train.batch_size=2", "train.grad_accum=1", *common, output="whole"))
    split = train(recipe_for(tmp_path, "train.batch_size=1", "train.grad_accum=2", *common, output="split"))
    for a, b in zip(step_records(Path(whole.model_dir).parent), step_records(Path(split.model_dir).parent)):
        for key in ("loss", "masked_ce", "grad_norm"):
            assert a[key] == pytest.approx(b[key], rel=1e-5), (key, a[key], b[key])
    assert_close_tensors(weights(whole.model_dir), weights(split.model_dir))


def test_the_logged_learning_rate_is_the_one_the_step_used(tmp_path):
    recipe = recipe_for(tmp_path, "train.max_steps=4", "optim.warmup_steps=2", "optim.schedule=constant",
                        "optim.lr=1e-3", "train.eval_batches=0")
    train(recipe)
    assert [s["lr"] for s in step_records(recipe.output_dir)] == pytest.approx([0.0, 5e-4, 1e-3, 1e-3])


@pytest.mark.parametrize("lora", [[], ["lora.r=4", "lora.alpha=8"]], ids=["full", "lora"])
def test_models_exported_mid_run_are_the_checkpointed_weights_and_leave_training_unchanged(tmp_path, lora):
    plain = train(recipe_for(tmp_path, *lora, output="plain"))
    recipe = recipe_for(tmp_path, *lora, "checkpoint.export_every=2", "checkpoint.every=2", "checkpoint.keep=10",
                        output="exporting")
    exporting = train(recipe)
    for name, tensor in weights(plain.model_dir).items():  # the copy exported mid-run is not the one trained
        assert torch.equal(tensor, weights(exporting.model_dir)[name]), name

    exports = sorted(p.name for p in (Path(recipe.output_dir) / "models").iterdir())
    assert exports == ["step-000002", "step-000004"]  # the last step's model is output_dir/model
    for step in (2, 4):
        model, _, config = adapt.load(Path(recipe.output_dir) / "models" / f"step-{step:06d}")
        assert config.tokens_trained == step * 4 * SEQ_LEN
        assert adapt.get_attention_ratio(model) == pytest.approx(min(1.0, step / 4))  # anneal_steps=4
        if not lora:  # the export holds the weights of that step's checkpoint
            saved = load_file(str(Path(recipe.output_dir) / "checkpoints" / f"step-{step:06d}" / "model.safetensors"))
            for name, tensor in model.state_dict().items():
                assert torch.equal(tensor, saved[f"model.{name}"]), name
