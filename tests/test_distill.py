"""Teacher KL while converting: the term against an independent computation, zero where the student reads
exactly the teacher's context, the same objective however a step is split (micro-batches, processes),
every mode, and the refusals."""

import dataclasses
import math
import re
from pathlib import Path

import pytest
import torch

import adapt
from adapt.diffusion import TeacherTerm, diffusion_loss
from adapt.errors import UserError
from adapt.objectives import teacher_kl

from .tiny_runs import (LLAMA2_7B, ROOT, assert_close_tensors, causal_folder, hybrid_model, noise_from_the_data,
                        recipe_for, step_records, student_and_teacher, train_two_processes)
from .tiny_runs import tensors as weights


def test_the_kl_is_the_teachers_against_the_students_at_the_temperature():
    generator = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(5, 12, generator=generator), torch.randn(5, 10, generator=generator)
    for temperature in (1.0, 2.0):
        p = (teacher.double() / temperature).softmax(-1)
        q = (student[:, :10].double() / temperature).log_softmax(-1)  # the student's extra rows are no tokens
        expected = temperature ** 2 * (p * (p.log() - q)).sum(-1)
        torch.testing.assert_close(teacher_kl(student, teacher, temperature).double(), expected, rtol=1e-5, atol=1e-6)
    assert teacher_kl(teacher, teacher, 1.0).abs().max() < 1e-6


def test_the_term_joins_the_loss_divided_by_the_masked_tokens():
    from adapt.forward import predict_logits

    model, teacher, config = student_and_teacher()
    ids = torch.randint(3, 100, (2, 12), generator=torch.Generator().manual_seed(1))
    mask = torch.zeros_like(ids, dtype=torch.bool)
    mask[:, 3:9:2] = True
    with torch.no_grad():
        plain = diffusion_loss(model, ids, config, t=torch.full((2,), 0.5), mask=mask)
        teacher_logits = predict_logits(teacher, ids, mask)
        student = predict_logits(model, ids.masked_fill(mask, config.mask_token_id), mask)
        out = diffusion_loss(model, ids, config, t=torch.full((2,), 0.5), mask=mask,
                             teacher=TeacherTerm(teacher_logits, weight=0.5, temperature=2.0))
    kl = teacher_kl(student, teacher_logits, 2.0)
    torch.testing.assert_close(out.loss, plain.loss + 0.5 * kl.sum() / mask.sum(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.distill_kl, kl.mean(), rtol=1e-5, atol=1e-6)


def test_the_kl_is_zero_where_the_student_reads_the_teachers_context():
    """Causal attention, and each masked token the last of its row: its prediction reads exactly the clean
    prefix the teacher reads, with the source's weights, so the two distributions are the same."""
    from adapt.forward import predict_logits

    model, teacher, config = student_and_teacher()
    ids = torch.randint(3, 100, (3, 10), generator=torch.Generator().manual_seed(2))
    mask = torch.zeros_like(ids, dtype=torch.bool)
    mask[:, -1] = True
    with torch.no_grad():
        out = diffusion_loss(model, ids, config, t=torch.ones(3), mask=mask,
                             teacher=TeacherTerm(predict_logits(teacher, ids, mask), weight=1.0, temperature=1.0))
    assert out.distill_kl.abs() < 1e-5


def test_the_objective_does_not_depend_on_how_a_step_is_split(tmp_path, monkeypatch):
    import adapt.train.loop

    monkeypatch.setattr(adapt.train.loop, "draw_noise", noise_from_the_data)
    common = ("train.max_steps=2", "train.anneal_steps=1", "train.eval_batches=0", "optim.warmup_steps=0",
              "distill.weight=0.7", "distill.temperature=2")
    whole = adapt.train.train(recipe_for(tmp_path, "train.batch_size=2", "train.grad_accum=1", *common, output="whole"))
    split = adapt.train.train(recipe_for(tmp_path, "train.batch_size=1", "train.grad_accum=2", *common, output="split"))
    for a, b in zip(step_records(Path(whole.model_dir).parent), step_records(Path(split.model_dir).parent), strict=True):
        assert a["distill_kl"] > 0
        for key in ("loss", "distill_kl", "grad_norm"):
            assert a[key] == pytest.approx(b[key], rel=1e-5), key
    assert_close_tensors(weights(whole.model_dir), weights(split.model_dir))


@pytest.mark.parametrize("mode", [[], ["diffusion.mode=block", "diffusion.block_size=4"],
                                  ["diffusion.mode=hybrid", "diffusion.draft_size=4"]],
                         ids=["bidirectional", "block", "hybrid"])
def test_the_teacher_teaches_every_mode(tmp_path, mode):
    adapt.train.train(recipe_for(tmp_path, "train.max_steps=2", "train.eval_batches=0", "distill.weight=1", *mode))
    records = step_records(tmp_path / "run")
    assert all(math.isfinite(r["loss"]) and r["distill_kl"] > 0 for r in records)


def test_another_causal_model_with_the_same_tokenizer_can_teach(tmp_path):
    other = causal_folder(tmp_path / "other", family="qwen2")
    adapt.train.train(recipe_for(tmp_path, "train.max_steps=1", "train.eval_batches=0", "distill.weight=1",
                                 f"distill.teacher={other}"))
    assert step_records(tmp_path / "run")[0]["distill_kl"] > 0


def test_a_teacher_with_another_tokenizer_is_refused(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    other = causal_folder(tmp_path / "other", tokenizer=False)
    vocab = {f"w{i}": i for i in range(128)}  # the same words at other ids
    backend = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="w0").save_pretrained(other)
    recipe = recipe_for(tmp_path, "train.max_steps=1", "distill.weight=1", f"distill.teacher={other}")
    with pytest.raises(UserError, match=re.escape(f"distill.teacher {other}: its tokenizer differs from the student's")):
        adapt.train.train(recipe)


@pytest.mark.parametrize("override,message", [("distill.temperature=0", "distill.temperature = 0.0 is out of range"),
                                              ("distill.weight=-1", "distill.weight = -1.0 is out of range")])
def test_bad_distillation_settings_name_the_key(tmp_path, override, message):
    with pytest.raises(UserError, match=re.escape(message)):
        recipe_for(tmp_path, override)


def test_plan_counts_the_teacher_and_its_logits():
    from adapt.plan import PlanSettings, plan
    from adapt.recipe import load_recipe


    base = [str(ROOT / "recipes/llama2-7b.yaml"), *LLAMA2_7B]
    plain = plan(load_recipe(base[0], base[1:]), PlanSettings(gpus=8))["per_gpu_bytes"]
    taught = plan(load_recipe(base[0], [*base[1:], "distill.weight=1"]), PlanSettings(gpus=8))["per_gpu_bytes"]
    assert taught["distill_teacher"] == 2 * 6_738_415_616  # a bf16 copy of the source's parameters
    assert taught["teacher_logits"] > 0 and not {"distill_teacher", "teacher_logits"} & set(plain)


ZERO2 = f"distributed.deepspeed_config={Path(__file__).resolve().parents[1] / 'recipes/deepspeed/zero2.json'}"
# on-policy from the first step: under FSDP2 the student samples before the wrapped module's first forward
ON_POLICY_FIRST = ("distill.on_policy_every=1", "distill.on_policy_tokens=8", "distill.on_policy_steps=4")


@pytest.mark.slow  # a minute or two on 2 busy cores
@pytest.mark.parametrize("settings", [(ZERO2,), (ZERO2, *ON_POLICY_FIRST), ("distributed.backend=fsdp", *ON_POLICY_FIRST)],
                         ids=["zero2", "zero2-on-policy", "fsdp2-on-policy"])
def test_two_processes_give_one_processes_loss(tmp_path, settings):
    """The teacher runs whole on each process, on that process's micro-batches; the KL is divided by the
    masked tokens of the whole step, over both processes: two processes = one process. An on-policy
    step's continuations are seeded by the global micro-batch, so they too are the same."""
    common = ("train.max_steps=2", "train.eval_batches=0", "distill.weight=0.7", "diffusion.t_min=0.4",
              "diffusion.t_max=0.4", *settings[1:])  # one fixed level: the same noise whatever the split
    reference = adapt.train.train(recipe_for(tmp_path, "train.grad_accum=2", "train.batch_size=2", *common,
                                             output="single"))
    recipe = recipe_for(tmp_path, "train.batch_size=2", *common, settings[0], output="two")
    run = train_two_processes(recipe, tmp_path)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    for a, b in zip(step_records(tmp_path / "single"), step_records(recipe.output_dir), strict=True):
        for key in ("loss", "distill_kl", "grad_norm"):
            assert b[key] == pytest.approx(a[key], rel=1e-5), key
    assert_close_tensors(weights(reference.model_dir), weights(Path(recipe.output_dir) / "model"))


ON_POLICY = ("distill.weight=0.5", "distill.on_policy_every=2", "distill.on_policy_tokens=8",
             "distill.on_policy_steps=4")


def test_an_on_policy_step_learns_the_teachers_kl_alone_on_the_students_continuation(tmp_path):
    adapt.train.train(recipe_for(tmp_path, "train.max_steps=4", "train.eval_batches=0", *ON_POLICY))
    records = step_records(tmp_path / "run")
    assert [r["on_policy"] for r in records] == [False, True, False, True]
    for r in records:
        assert r["distill_kl"] > 0
        if r["on_policy"]:  # the loss is the weighted KL alone: no CE on the student's own tokens
            assert r["loss"] == pytest.approx(0.5 * r["distill_kl"], rel=1e-5)
        else:
            assert r["loss"] > 0.5 * r["distill_kl"] * 1.01


@pytest.mark.parametrize("mode", [[], ["diffusion.mode=block", "diffusion.block_size=4"],
                                  ["diffusion.mode=hybrid", "diffusion.draft_size=4"]],
                         ids=["bidirectional", "block", "hybrid"])
def test_the_student_writes_only_the_continuation_and_only_it_is_scored(mode):
    from adapt.recipe import DistillSection
    from adapt.train.distill import student_continuations


    if mode and mode[0].endswith("hybrid"):
        model, _, config = hybrid_model()
    else:
        model, _, config = student_and_teacher()
        if mode:
            from adapt.block import BlockMode
            config = dataclasses.replace(config, mode=BlockMode(4))
    ids = torch.randint(3, 100, (2, 16), generator=torch.Generator().manual_seed(4))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "never_mask": torch.zeros_like(ids, dtype=torch.bool)}
    settings = DistillSection(weight=1.0, on_policy_every=1, on_policy_tokens=8, on_policy_steps=8)
    out = student_continuations(model, config, batch, settings, seed=7)
    assert torch.equal(out["input_ids"][:, :8], ids[:, :8])
    assert (out["input_ids"] != config.mask_token_id).all() and not torch.equal(out["input_ids"][:, 8:], ids[:, 8:])
    assert out["never_mask"][:, :8].all() and not out["never_mask"][:, 8:].any()
    again = student_continuations(model, config, batch, settings, seed=7)
    assert torch.equal(again["input_ids"], out["input_ids"])  # seeded: a resumed run writes the same tokens


def test_a_resumed_on_policy_run_ends_with_the_uninterrupted_runs_weights(tmp_path):
    """Killed before the last step's checkpoint (an on-policy step): resuming writes the same continuations."""
    import shutil

    common = ("train.max_steps=4", "train.eval_batches=0", "checkpoint.every=1", *ON_POLICY)
    run = adapt.train.train(recipe_for(tmp_path, *common))
    straight = weights(run.model_dir)
    shutil.rmtree(tmp_path / "run" / "checkpoints" / "step-000004")
    shutil.rmtree(run.model_dir)
    resumed = weights(adapt.train.train(recipe_for(tmp_path, *common, "resume=auto")).model_dir)
    assert straight.keys() == resumed.keys() and all(torch.equal(straight[n], resumed[n]) for n in straight)


@pytest.mark.parametrize("override,message", [
    (("distill.on_policy_every=2",), "distill.on_policy_every needs a teacher"),
    (("distill.weight=1", "distill.on_policy_every=2", "distill.on_policy_tokens=32"), "leaves no prompt"),
    (("distill.weight=1", "distill.on_policy_every=2", "distill.on_policy_tokens=8", "distill.on_policy_steps=9"),
     "distill.on_policy_steps = 9 is more than the 8 tokens"),
])
def test_bad_on_policy_settings_name_the_key(tmp_path, override, message):
    with pytest.raises(UserError, match=re.escape(message)):
        recipe_for(tmp_path, *override)
