"""The two levers that keep the AR model's knowledge while it becomes a diffusion model: learning-rate
multipliers per kind of parameter (embeddings, attention, MLP, norms, head) and alignment of hidden
states to the frozen source. Each is proved by what it must do: every parameter in exactly one group
at the right rate, a zero multiplier leaves its weights bit-equal, the alignment is exactly zero where
the adapted model computes what the source does, and the objective does not depend on how a step is
split into micro-batches."""

import dataclasses
import gc
import json
import math
import weakref
from pathlib import Path

import pytest
import torch

import adapt
from adapt.block import BlockMode
from adapt.diffusion import DiffusionConfig, DiffusionTraining, diffusion_loss
from adapt.errors import UserError
from adapt.objectives import MaskedDiffusion
from adapt.presets import FAMILIES, tiny_model, tiny_tokenizer
from adapt.recipe import OptimSection, Recipe
from adapt.train import train
from adapt.train.alignment import Alignment
from adapt.train.build import ModelWithLoss, apply_lora, param_groups, parameter_kinds

from .tiny_runs import (assert_close_tensors, causal_folder, diffusion_model, noise_from_the_data, recipe_for,
                        step_records, train_two_processes)
from .tiny_runs import tensors as weights

MULTIPLIERS = {"embeddings": 0.5, "attention": 2.0, "mlp": 0.25, "norms": 1.5, "head": 3.0}

# The families' own names for each kind, as an oracle independent of the structural classification
# (checked in this order: Qwen3's q_norm sits inside self_attn and is a norm).
NAME_HINTS = [("norms", ("norm", "ln_")), ("embeddings", ("embed", "wte", "wpe")), ("head", ("lm_head",)),
              ("attention", ("attn", "attention")), ("mlp", ("mlp",))]


def kind_by_name(name: str) -> str:
    return next(kind for kind, hints in NAME_HINTS if any(hint in name for hint in hints))


def objective_of(family: str, lora: bool) -> ModelWithLoss:
    model, tokenizer = tiny_model(family), tiny_tokenizer()
    adapt.ensure_mask_token(model, tokenizer, "add")
    config = DiffusionConfig.from_model_config(model.config)
    if lora:
        recipe = Recipe()
        recipe.lora.r = 4
        model = apply_lora(model, recipe, config)
    return ModelWithLoss(model, config, DiffusionTraining(), MaskedDiffusion(DiffusionTraining()))


def optim_with(multipliers: dict) -> OptimSection:
    recipe = Recipe()
    recipe.optim.lr = 1e-3
    for kind, value in multipliers.items():
        setattr(recipe.optim.lr_multipliers, kind, value)
    return recipe.optim


# ---- learning-rate multipliers --------------------------------------------------------------------

@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
@pytest.mark.parametrize("family", FAMILIES)
def test_every_trainable_parameter_is_in_exactly_one_group_of_its_kind(family, lora):
    objective = objective_of(family, lora)
    groups = param_groups(objective, optim_with(MULTIPLIERS))
    trainable = {id(p): name for name, p in objective.named_parameters() if p.requires_grad}
    grouped = [id(p) for group in groups for p in group["params"]]
    assert sorted(grouped) == sorted(trainable), "a trainable parameter is missing from, or twice in, the groups"
    for group in groups:
        assert group["lr"] == pytest.approx(1e-3 * MULTIPLIERS[group["kind"]])
        for param in group["params"]:
            assert kind_by_name(trainable[id(param)]) == group["kind"], trainable[id(param)]
    kinds = {group["kind"] for group in groups}
    assert {"attention", "mlp", "embeddings"} <= kinds  # LoRA adapts both; the mask row trains
    assert ("norms" in kinds) == (not lora)
    tied = objective.model.get_output_embeddings().weight is objective.model.get_input_embeddings().weight
    if not lora:  # a tied head is the embedding matrix: in embeddings, with no head group of its own
        assert ("head" in kinds) == (not tied)


def test_equal_multipliers_make_the_single_group_of_a_run_without_multipliers():
    objective = objective_of("llama", lora=False)
    (group,) = param_groups(objective, optim_with(dict.fromkeys(MULTIPLIERS, 0.5)))
    assert [id(p) for p in group["params"]] == [id(p) for p in objective.parameters()]
    assert group["lr"] == pytest.approx(5e-4)


def test_each_group_steps_at_base_rate_times_multiplier_and_a_zero_multiplier_freezes(tmp_path):
    from adapt.train.loop import start_run, train_step

    recipe = recipe_for(tmp_path, "optim.warmup_steps=0", "optim.schedule=cosine", "train.max_steps=4",
                        "optim.lr_multipliers.mlp=0", "optim.lr_multipliers.attention=2",
                        "optim.lr_multipliers.norms=0.5", "train.eval_batches=0")
    run = start_run(recipe, overwrite=False)
    try:
        kinds = parameter_kinds(run.inner_model)
        before = {name: p.detach().clone() for name, p in run.inner_model.named_parameters()}
        batches = run.train_blocks.batches(recipe.train.batch_size)
        run.wrapped.train()
        records = [train_step(run, batches) for _ in range(2)]
    finally:
        run.stop.restore()
        run.reporter.close()
    # transformers' cosine schedule without warmup: 0.5 (1 + cos(pi s / S)) after s of S steps
    factor = 0.5 * (1 + math.cos(math.pi * 2 / 4))
    multiplier = {"embeddings": 1.0, "attention": 2.0, "mlp": 0.0, "norms": 0.5, "head": 1.0}
    for group in run.optimizer.param_groups:
        assert group["lr"] == pytest.approx(3e-3 * multiplier[group["kind"]] * factor, rel=1e-12)
    assert [r["lr"] for r in records] == pytest.approx([3e-3, 3e-3 * 0.5 * (1 + math.cos(math.pi / 4))])
    for name, param in run.inner_model.named_parameters():
        if kinds[name] == "mlp":
            assert torch.equal(param, before[name]), f"{name} moved at multiplier 0"
        else:
            assert not torch.equal(param, before[name]), f"{name} did not move"


def test_a_bad_multiplier_or_layer_is_one_clear_error(tmp_path):
    with pytest.raises(UserError, match=r"optim.lr_multipliers.mlp = -1.0 is out of range"):
        recipe_for(tmp_path, "optim.lr_multipliers.mlp=-1")
    with pytest.raises(UserError, match=r"unknown key optim.lr_multipliers.ffn"):
        recipe_for(tmp_path, "optim.lr_multipliers.ffn=0.1")
    with pytest.raises(UserError, match=r"align.layers: 2 is not a layer of this 2-layer model; use indices from -2"):
        train(recipe_for(tmp_path, "align.weight=1", "align.layers=[2]"))
    with pytest.raises(UserError, match=r"align.layers is empty"):
        recipe_for(tmp_path, "align.weight=1", "align.layers=[]")


def test_resuming_with_other_multipliers_is_refused_in_one_line_and_with_the_same_ones_goes_on(tmp_path):
    common = ("train.max_steps=2", "checkpoint.every=2", "train.eval_batches=0")
    train(recipe_for(tmp_path, *common, "optim.lr_multipliers.mlp=0.1"))
    more = ("train.max_steps=3", "resume=auto")
    with pytest.raises(UserError, match=r"optimizer groups embeddings, attention, mlp, norms, head \(optim.lr_multipliers "
                                        r".*\) but this run has all; resume with the lr_multipliers it was trained with"):
        train(recipe_for(tmp_path, *common, *more))
    resumed = train(recipe_for(tmp_path, *common, *more, "optim.lr_multipliers.mlp=0.1"))
    assert resumed.steps == 3


# ---- representation alignment ---------------------------------------------------------------------

def source_and_adapted(family: str = "llama"):
    """The tiny causal model, and the same weights with a new mask token, still causal (not yet trained)."""
    adapted, _ = diffusion_model(family, ratio=0.0)
    return tiny_model(family), adapted, DiffusionConfig.from_model_config(adapted.config)


@pytest.mark.parametrize("family", ["llama", "gpt2", "gpt_neox"])
def test_the_unchanged_model_at_causal_attention_on_clean_input_is_at_distance_zero(family):
    source, adapted, config = source_and_adapted(family)
    alignment = Alignment(source, [0, 1], weight=1.0)
    ids = torch.randint(3, 100, (2, 12))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    nothing = torch.zeros_like(ids, dtype=torch.bool)
    with alignment.watch(adapted) as states:  # the training forward, masking nothing, at ratio 0
        diffusion_loss(adapted, ids, config, t=torch.full((2,), 0.5), mask=nothing)
    assert alignment.distance_sum(states, batch).item() == pytest.approx(0.0, abs=1e-6)
    # the layers are paired by index: layer 0 against the source's layer 1 is far from zero
    crossed = Alignment(source, [1, 0], weight=1.0)
    assert crossed.distance_sum(states, batch).item() > 1e-2
    adapt.set_attention(adapted, 1.0)  # bidirectional: the states change
    with alignment.watch(adapted) as states:
        diffusion_loss(adapted, ids, config, t=torch.full((2,), 0.5), mask=nothing)
    assert alignment.distance_sum(states, batch).item() > 1e-3


def test_block_mode_aligns_the_noisy_copy():
    """At block size 1 the noisy copy is causal over the clean prefix plus its own token: exactly the
    source wherever that token is clean. So the distance is zero with nothing masked, and only masked
    positions add to it (the clean copy would be at zero even then)."""
    source, adapted, config = source_and_adapted()
    alignment = Alignment(source, [1], weight=1.0)
    ids = torch.randint(3, 100, (2, 12))
    padding = torch.ones_like(ids)
    padding[1, -3:] = 0  # padding positions count for nothing
    batch = {"input_ids": ids, "attention_mask": padding}

    def distance(mask):
        with alignment.watch(adapted) as states:
            diffusion_loss(adapted, ids, dataclasses.replace(config, mode=BlockMode(1)), t=torch.full((2,), 0.5),
                           mask=mask, attention_mask=padding)
        return alignment.distance_sum(states, batch).item()

    nothing = torch.zeros_like(ids, dtype=torch.bool)
    assert distance(nothing) == pytest.approx(0.0, abs=1e-6)
    masked = nothing.clone()
    masked[:, 4] = True
    assert distance(masked) > 1e-3


def _split_runs(tmp_path, *settings):
    common = ("train.max_steps=2", "train.anneal_steps=1", "train.eval_batches=0", "optim.warmup_steps=0", *settings)
    whole = train(recipe_for(tmp_path, "train.batch_size=4", "train.grad_accum=1", *common, output="whole"))
    split = train(recipe_for(tmp_path, "train.batch_size=2", "train.grad_accum=2", *common, output="split"))
    return [step_records(Path(result.model_dir).parent) for result in (whole, split)], whole, split


def test_the_alignment_does_not_depend_on_how_a_step_is_split(tmp_path, monkeypatch):
    import adapt.train.loop

    monkeypatch.setattr(adapt.train.loop, "draw_noise", noise_from_the_data)
    (whole, split), whole_run, split_run = _split_runs(tmp_path, "align.weight=2", "align.layers=[0,-1]")
    for a, b in zip(whole, split):
        for key in ("loss", "masked_ce", "align_loss", "grad_norm"):
            assert a[key] == pytest.approx(b[key], rel=1e-5), (key, a[key], b[key])
    assert_close_tensors(weights(whole_run.model_dir), weights(split_run.model_dir))
    # The term is in the objective: the loss is the diffusion loss plus weight x align_loss.
    unaligned = train(recipe_for(tmp_path, "train.batch_size=4", "train.max_steps=1", "train.anneal_steps=1",
                                 "train.eval_batches=0", output="unaligned"))
    first = step_records(Path(unaligned.model_dir).parent)[0]
    assert "align_loss" not in first
    assert whole[0]["loss"] == pytest.approx(first["loss"] + 2 * whole[0]["align_loss"], rel=1e-5)


def test_a_fading_alignment_weight_falls_to_zero_with_the_annealing_and_then_runs_no_source(tmp_path, monkeypatch):
    import adapt.train.loop

    assert [Alignment(None, [0], 2.0, fade_steps=4).weight_at(step) for step in range(6)] == [1.5, 1.0, 0.5, 0, 0, 0]
    assert Alignment(None, [0], 2.0).weight_at(10**6) == 2.0  # constant without fading
    monkeypatch.setattr(adapt.train.loop, "draw_noise", noise_from_the_data)
    source_forwards = []
    distance_sum = Alignment.distance_sum
    monkeypatch.setattr(Alignment, "distance_sum", lambda self, *a: source_forwards.append(1) or distance_sum(self, *a))
    # After each step: is the source still held, and is it still anywhere in memory (a weak reference)?
    sources, held, alive = [], [], []
    end_of_step = adapt.train.loop.end_of_step

    def watch_the_source(run, record):
        if run.alignment is not None and not sources:
            sources.append(weakref.ref(run.alignment.source))
        gc.collect()
        held.append(run.alignment is not None)
        alive.append(sources[0]() is not None)
        end_of_step(run, record)

    monkeypatch.setattr(adapt.train.loop, "end_of_step", watch_the_source)
    common = ("train.max_steps=3", "train.anneal_steps=2", "train.eval_batches=0", "optim.warmup_steps=0")
    faded = train(recipe_for(tmp_path, *common, "align.weight=2", "align.fade_with_annealing=true", output="faded"))
    records = step_records(Path(faded.model_dir).parent)
    assert records[0]["align_weight"] == 1.0 and records[0]["align_loss"] > 0  # 2 x (1 - 1/2) at step 0
    assert all("align_loss" not in r for r in records[1:]) and len(source_forwards) == 1
    assert held == alive == [True, False, False]  # dropped at the step its weight is 0, and freed
    monkeypatch.setattr(adapt.train.loop, "end_of_step", end_of_step)
    plain = step_records(Path(train(recipe_for(tmp_path, *common, output="plain")).model_dir).parent)
    assert records[0]["loss"] == pytest.approx(plain[0]["loss"] + records[0]["align_loss"], rel=1e-5)


def sft_file(folder: Path) -> Path:
    """Prompt/response rows: the prompt is never masked, the response ends with EOS."""
    path = folder / "sft.jsonl"
    rows = [{"prompt": " ".join(f"w{3 + (i + j) % 40}" for j in range(4 + i % 5)),
             "response": " " + " ".join(f"w{60 + (i * j) % 50}" for j in range(3 + i % 7))} for i in range(30)]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.mark.parametrize("mode", ["bidirectional", "block", "sft"])
def test_both_levers_train_in_every_mode(tmp_path, mode):
    settings = {"bidirectional": [], "block": ["diffusion.mode=block", "diffusion.block_size=8"],
                "sft": ["data.format=sft", f"data.path={sft_file(tmp_path)}", "data.validation_path=null",
                        "data.validation_fraction=0.2"]}[mode]
    recipe = recipe_for(tmp_path, "train.max_steps=2", "train.eval_batches=0", "optim.warmup_steps=0",
                        "optim.lr_multipliers.mlp=0", "align.weight=1", *settings)
    result = train(recipe)
    records = step_records(recipe.output_dir)
    assert all(math.isfinite(r["align_loss"]) and r["align_loss"] > 0 for r in records)
    source, trained = weights(causal_folder(tmp_path / "causal")), weights(result.model_dir)
    mlp = [name for name in source if ".mlp." in name]
    attention = [name for name in source if ".self_attn." in name]
    assert mlp and all(torch.equal(trained[name], source[name]) for name in mlp)
    assert all(not torch.equal(trained[name], source[name]) for name in attention)


def test_the_alignment_trains_with_gradient_checkpointing_and_lora(tmp_path):
    common = ("train.max_steps=2", "train.eval_batches=0", "align.weight=1", "optim.lr_multipliers.attention=2")
    plain = train(recipe_for(tmp_path, *common, output="plain"))
    checkpointed = train(recipe_for(tmp_path, *common, "train.gradient_checkpointing=true", output="checkpointed"))
    # recomputation in backward neither records states twice nor changes the gradients
    for a, b in zip(step_records(Path(plain.model_dir).parent), step_records(Path(checkpointed.model_dir).parent)):
        assert a["align_loss"] == pytest.approx(b["align_loss"], rel=1e-5)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)
    lora = recipe_for(tmp_path, *common, "lora.r=4", output="lora")
    train(lora)
    assert all(r["align_loss"] > 0 for r in step_records(lora.output_dir))


# ---- the levers across processes (ZeRO-2/3, FSDP2: each process holds the whole frozen source) ----

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
BACKENDS = {"zero2": [f"distributed.deepspeed_config={RECIPES / 'deepspeed/zero2.json'}"],
            "zero3": [f"distributed.deepspeed_config={RECIPES / 'deepspeed/zero3.json'}"],
            "fsdp": ["distributed.backend=fsdp"]}
LEVERS = ("train.max_steps=2", "train.eval_batches=0", "optim.lr_multipliers.mlp=0",
          "optim.lr_multipliers.attention=2", "align.weight=1", "align.layers=[0,-1]",
          "diffusion.objective=score-entropy")  # its offset: the mean over every micro-batch and process


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    root = tmp_path_factory.mktemp("levers")
    result = train(recipe_for(root, "train.grad_accum=2", "train.batch_size=2", *LEVERS, output="single"))
    return root, result


@pytest.mark.slow  # 1-8 minutes each on 2 busy cores
@pytest.mark.parametrize("name", list(BACKENDS))
def test_two_processes_with_both_levers_match_one_process(one_process, name):
    """Parameter groups built before ZeRO wraps the optimizer (from ZeRO-3's partitioned parameters, by
    their real shapes) and after FSDP2 shards the model; the frozen source whole on each process; the
    score-entropy offset measured over both processes' masked tokens."""
    root, reference = one_process
    recipe = recipe_for(root, "train.batch_size=2", *LEVERS, *BACKENDS[name], output=name)
    run = train_two_processes(recipe, root)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    for a, b in zip(step_records(Path(reference.model_dir).parent), step_records(recipe.output_dir), strict=True):
        for key in ("loss", "align_loss", "grad_norm"):
            assert b[key] == pytest.approx(a[key], rel=1e-5), (name, key)
    assert_close_tensors(weights(reference.model_dir), weights(Path(recipe.output_dir) / "model"), f"{name}: ")
    offsets = [adapt.load(folder)[2].objective_state["offset"]
               for folder in (reference.model_dir, Path(recipe.output_dir) / "model")]
    assert offsets[1] == pytest.approx(offsets[0], rel=1e-6)
