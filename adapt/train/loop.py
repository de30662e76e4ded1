"""The training loop: continued pretraining under the diffusion objective, on accelerate.

One loop for every scale; what differs between one process, DDP, ZeRO and FSDP2 is in backends.py.
The objective is a small module whose forward is `diffusion_loss`, so every wrapper sees an ordinary
forward/backward.

Reproducibility: the noise levels, the corruption and the annealed attention mask of a micro-batch are
drawn from a generator seeded by (seed, global micro-batch index). They depend on the data, not on how
the batch is split over processes or accumulation steps, and nothing about them needs saving to resume.
The loss of a step is normalised by the count (masked or maskable tokens, `loss_norm`) of the whole
step, over micro-batches and processes, so the objective does not change with grad_accum or world size.

Layout of output_dir:
    checkpoints/step-000100/   backend state + data position + trainer_state.json (checkpoint.py)
    logs/                      TensorBoard event files
    metrics.jsonl              one line per logged step / validation
    model/                     the exported diffusion checkpoint (LoRA merged)
    models/step-000100/        the model at that step (checkpoint.export_every; for progress curves)
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import math
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F

from ..attention import get_attention_ratio, set_attention
from ..diffusion import (TeacherTerm, complementary_pairs, draw_noise, elbo_nll, loss_denominator, maskable_positions,
                         objective_of)
from ..forward import predict_logits
from ..plan import check_memory
from ..recipe import Recipe
from ..structure import decoder_layers
from .backends import open_backend
from .alignment import load_alignment
from .distill import load_teacher, student_continuations
from .build import ModelWithLoss, apply_lora, load_model, make_scheduler, param_groups, scheduled_lr
from .checkpoint import (PROGRESS_EXPORTS, delete_previous_run, load_checkpoint, model_shapes, previous_run,
                         resume_checkpoint, run_inputs, save_checkpoint)
from .collectives import all_reduce_sum
from .export import export_model
from .lock import run_lock
from .report import Reporter, log, warn
from .state import Run, TrainResult
from .stops import Interrupted, NumericalFault, Stopping, StopSignal


def train(recipe: Recipe, *, overwrite: bool = False) -> TrainResult:
    """Run a recipe to the end (or to a signal) and export the result to output_dir/model.

    A fresh run (resume: null) refuses an output_dir that holds a previous run unless `overwrite`, which
    deletes that run's checkpoints, logs, metrics and model first. The run holds output_dir's lock
    throughout (lock.py): a second run on the same folder is refused.
    """
    with run_lock(recipe.output_dir, reads=run_inputs(recipe)):
        return _run_to_the_end(recipe, overwrite)


def _run_to_the_end(recipe: Recipe, overwrite: bool) -> TrainResult:
    run = start_run(recipe, overwrite)
    try:
        micro_batches = run.train_blocks.batches(recipe.train.batch_size, rank=run.accelerator.process_index,
                                                 world_size=run.accelerator.num_processes)
        run.wrapped.train()
        while run.step < recipe.train.max_steps:
            position, micro_steps = run.train_blocks.state_dict(), run.accelerator.step
            try:
                record = train_step(run, micro_batches)
            except Stopping as stop:  # between micro-batches: the weights are still the last step's
                # Back to the step's start, as its checkpoint records it: its batches were drawn and some run
                # (accelerate counted them towards gradient accumulation) but none was applied.
                run.train_blocks.load_state_dict(position)
                run.accelerator.step = micro_steps
                raise Interrupted(stop.signum, save_checkpoint(run)) from None
            end_of_step(run, record)
        model_dir = export_model(run)
    finally:
        run.stop.restore()
        run.reporter.close()
    return TrainResult(model_dir, run.step, run.tokens_trained, run.first_loss, run.last_loss, run.validation)


def start_run(recipe: Recipe, overwrite: bool, *, module: type[ModelWithLoss] = ModelWithLoss,
              open_data=None) -> Run:
    """Everything the loop needs, built from the recipe, and restored from a checkpoint when resuming.

    Another loop on the same machinery (`adapt rl`) passes the `module` the backend wraps (its forward is
    that loop's) and `open_data(recipe, tokenizer, accelerator) -> (train, validation)`, what stands for
    the corpus: anything with `state_dict`/`load_state_dict`, which checkpoints save as the data position."""
    from accelerate.utils import set_seed

    output_dir = Path(recipe.output_dir)
    backend = open_backend(recipe, output_dir)
    previous = previous_run(output_dir, overwrite) if recipe.resume is None else []
    resume_from = resume_checkpoint(recipe)
    if recipe.resume is not None and resume_from is None:
        log(backend.accelerator, f"nothing to resume in {output_dir} (no complete checkpoint); starting a fresh run")

    set_seed(recipe.train.seed)
    # As the backend holds it: a whole copy, ZeRO-3's slices, or FSDP2's meta device until prepare shards it.
    model, tokenizer, diffusion = load_model(recipe, backend)
    if open_data is None:  # the corpus loop, whose micro-batches `adapt plan` estimates (not rl's rollouts)
        check_memory(recipe, model, backend.accelerator.device, backend.accelerator.num_processes, _local_processes())
    anneal_from = get_attention_ratio(model)  # the source's: a continued diffusion model stays bidirectional
    objective = objective_of(diffusion, recipe.diffusion)
    alignment = load_alignment(recipe, model, backend.accelerator.device)  # None unless align.weight > 0
    teacher = load_teacher(recipe, tokenizer, backend.accelerator.device)  # None unless distill.weight > 0
    if recipe.train.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if recipe.lora.r > 0:
        model = apply_lora(model, recipe, diffusion)
    shapes = model_shapes(model)
    wrapped, optimizer, scheduler = backend.prepare(module(model, diffusion, recipe.diffusion, objective),
                                                    partial(param_groups, optim=recipe.optim),
                                                    partial(make_scheduler, recipe=recipe))
    train_blocks, validation_blocks = (open_data or _open_corpus)(recipe, tokenizer, backend.accelerator)
    delete_previous_run(previous, backend.accelerator)  # every check passed: only now is the old run replaced
    run = Run(recipe, backend, wrapped, objective, optimizer, scheduler, tokenizer, diffusion, train_blocks,
              validation_blocks, shapes, anneal_from, tokens_trained=diffusion.tokens_trained, alignment=alignment,
              teacher=teacher)
    if resume_from is not None:
        load_checkpoint(run, resume_from)
        log(run.accelerator, f"resumed from {resume_from} at step {run.step}")
    run.reporter = Reporter(run.accelerator, recipe, output_dir, run.step)
    run.stop = StopSignal()
    return run


def _local_processes() -> int:
    """Processes on this machine, as torchrun and accelerate launch say (1 when run directly)."""
    import os

    return int(os.environ.get("LOCAL_WORLD_SIZE", "1"))


def _open_corpus(recipe: Recipe, tokenizer, accelerator):
    """The training blocks, and the validation blocks where the run validates (else None)."""
    from ..data import open_dataset

    train_blocks = open_dataset(recipe.data, tokenizer, split="train")  # first: it names an empty corpus
    validation_blocks = open_dataset(recipe.data, tokenizer, split="validation") if recipe.train.eval_batches else None
    return train_blocks, validation_blocks


@dataclass
class MicroBatch:
    batch: dict  # input_ids, attention_mask, never_mask on the device
    generator: torch.Generator  # draws its noise and its annealed attention mask
    t: torch.Tensor
    mask: torch.Tensor  # the corrupted positions
    counts: torch.Tensor  # (masked tokens, loss denominator, maskable tokens: the AR loss's), float64
    tokens: int  # non-padding tokens read from the data (a complementary pair's sequence counts once)


def train_step(run: Run, micro_batches) -> dict:
    """One optimizer step over `grad_accum` micro-batches; updates the run's progress, returns its record."""
    accelerator, accum, world = run.accelerator, run.recipe.train.grad_accum, run.accelerator.num_processes
    started = time.perf_counter()
    mode, ratio = run.layout_at(run.step)
    lr = scheduled_lr(run.scheduler, run.recipe)  # the rate this step's update uses, before multipliers
    on_policy = run.teacher is not None and run.recipe.distill.on_policy_at(run.step)
    micros = [_draw_micro_batch(run, next(micro_batches), micro, on_policy) for micro in range(accum)]
    num_masked, denominator, maskable = all_reduce_sum(sum(m.counts for m in micros)).tolist()
    if run.objective.needs_calibration():
        _calibrate(run, micros, mode, ratio)
    if run.alignment is not None and run.alignment.faded_out_at(run.step):
        run.alignment = None  # its weight is 0 from here on: free the source's weights
    align_weight = run.alignment.weight_at(run.step) if run.alignment is not None else 0.0
    aligned = _aligned_positions(micros) if align_weight > 0 else None  # None: no alignment term this step
    # loss, masked CE sum, tokens, alignment distance sum, AR CE sum (a hybrid model's), teacher KL sum
    totals = torch.zeros(6, dtype=torch.float64, device=accelerator.device)
    finite, grad_norm = True, None
    for index, micro in enumerate(micros):
        if index:  # a long step stops between its micro-batches, before its update (Stopping)
            run.stop.check(accelerator.device)
        set_attention(run.inner_model, ratio, generator=micro.generator)
        with accelerator.accumulate(run.wrapped), accelerator.autocast():
            micro_loss, out, distance = _micro_objective(run, micro, (denominator, maskable, num_masked), mode,
                                                         aligned, align_weight, on_policy)
            # The loss is already normalised over every micro-batch and process; accelerate (or DeepSpeed)
            # divides by grad_accum and the gradient all-reduce averages over processes: undo both.
            accelerator.backward(micro_loss * (accum * world))
            if accelerator.sync_gradients:
                grad_norm, finite = _clip_and_check(run, totals[0] + micro_loss.detach())
            if finite or accelerator.scaler is not None:  # else skip: NaN/inf would poison the weights
                run.optimizer.step()
            run.optimizer.zero_grad(set_to_none=True)
        ar_sum = 0.0 if out.ar_ce is None else out.ar_ce.item() * float(micro.counts[2])
        kl_sum = 0.0 if out.distill_kl is None else out.distill_kl.item() * out.num_masked
        totals += torch.tensor([micro_loss.item(), out.unweighted.item() * out.num_masked, micro.tokens, distance,
                                ar_sum, kl_sum], dtype=torch.float64, device=accelerator.device)
    run.scheduler.step()
    loss, ce_sum, tokens, distance, ar_sum, kl_sum = all_reduce_sum(totals).tolist()
    run.step += 1
    run.tokens_trained += int(tokens)
    record = {"step": run.step, "loss": loss, "masked_ce": ce_sum / max(num_masked, 1),
              **({"ar_ce": ar_sum / max(maskable, 1)} if mode.has_ar_head else {}),
              **({"distill_kl": kl_sum / max(num_masked, 1), "on_policy": on_policy} if run.teacher is not None else {}),
              "ratio": ratio,
              **mode.fields(),
              **({"align_loss": distance / max(aligned, 1), "align_weight": align_weight}
                 if aligned is not None else {}), "lr": lr,
              "grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
              "tokens_per_s": tokens / (time.perf_counter() - started), "tokens_trained": run.tokens_trained}
    _count_finite(run, record, finite)
    return record


def _micro_objective(run: Run, micro: MicroBatch, denominators: tuple[float, float, float], mode,
                     aligned: float | None, align_weight: float, on_policy: bool = False):
    """This micro-batch's share of the step's objective (differentiable), its diffusion loss, and the
    sum of its alignment distances (0.0 without alignment, `aligned` None). Every term is divided by a
    count of the whole step: the diffusion loss, a hybrid model's AR loss and the teacher KL by
    `denominators` (the loss's, the maskable and the masked tokens), the alignment by `aligned`."""
    alignment = run.alignment if aligned is not None else None
    watching = alignment.watch(run.inner_model) if alignment is not None else contextlib.nullcontext([])
    with watching as states:
        out = run.wrapped(**micro.batch, t=micro.t, mask=micro.mask, denominator=denominators[0],
                          ar_denominator=denominators[1],
                          teacher=_teacher_term(run, micro, denominators[2], on_policy),
                          mode=mode, generator=micro.generator)
    if alignment is None:
        return out.loss, out, 0.0
    distance = alignment.distance_sum(states, micro.batch)
    return out.loss + align_weight * distance / max(aligned, 1), out, distance.item()


def _teacher_term(run: Run, micro: MicroBatch, masked: float, on_policy: bool) -> TeacherTerm | None:
    """The teacher's logits at this micro-batch's masked positions and how they join the loss (None
    without a teacher): divided by the step's masked tokens, like the diffusion loss of `loss_norm: masked`;
    the whole loss on an on-policy step."""
    if run.teacher is None:
        return None
    settings = run.recipe.distill
    return TeacherTerm(run.teacher.logits_at(micro.batch, micro.mask), settings.weight, settings.temperature, masked,
                       alone=on_policy)


@torch.no_grad()
def _calibrate(run: Run, micros: list[MicroBatch], mode, ratio: float) -> None:
    """Run the step's forwards once more without gradients (their attention draws replayed) and hand the
    objective the sums it asked for, over every micro-batch and process (score-entropy: the mean log Z
    of the step's masked outputs, its offset). Through the wrapped module, so the backends' hooks gather
    the weights."""
    totals = None
    for micro in micros:
        state = micro.generator.get_state()
        set_attention(run.inner_model, ratio, generator=micro.generator)
        with run.accelerator.autocast():
            out = run.wrapped(**micro.batch, t=micro.t, mask=micro.mask, mode=mode)
        totals = out.calibration if totals is None else totals + out.calibration
        micro.generator.set_state(state)  # the step's own forward draws the same attention again
    message = run.objective.calibrate(all_reduce_sum(totals))
    log(run.accelerator, f"{message} at step {run.step + 1}, recorded in the objective's state")


def _aligned_positions(micros: list[MicroBatch]) -> float:
    """The non-padding positions of the whole step, every micro-batch and process: what the alignment
    distances are divided by."""
    local = sum(micro.batch["attention_mask"].sum() for micro in micros).double().reshape(1)
    return all_reduce_sum(local).item()


def _draw_micro_batch(run: Run, batch: dict, micro: int, on_policy: bool = False) -> MicroBatch:
    """The next micro-batch with its noise drawn, so the whole step's counts are known before any forward;
    `on_policy`: its continuations written by the student first."""
    accelerator, config, training = run.accelerator, run.diffusion, run.recipe.diffusion
    batch = {k: v.to(accelerator.device) for k, v in batch.items()}
    index = (run.step * run.recipe.train.grad_accum + micro) * accelerator.num_processes + accelerator.process_index
    generator = micro_batch_generator(run.recipe.train.seed, index, accelerator.device)
    if on_policy:
        batch = _on_policy_batch(run, batch, generator)
    maskable = maskable_positions(batch["input_ids"], batch["attention_mask"], batch["never_mask"])
    t, mask = draw_noise(batch["input_ids"], config, training, maskable, generator=generator)
    tokens = int(batch["attention_mask"].sum())
    if training.complementary_masks:  # the denominator then counts both copies: each is one more sample
        batch, maskable, t, mask = complementary_pairs(batch, maskable, t, mask)
    counts = torch.tensor([float(mask.sum()), float(loss_denominator(training, mask, maskable)), float(maskable.sum())],
                          dtype=torch.float64, device=accelerator.device)
    return MicroBatch(batch, generator, t, mask, counts, tokens)


def _on_policy_batch(run: Run, batch: dict, generator: torch.Generator) -> dict:
    """`batch` continued by the student as the step trains it (its layout and attention ratio), with the
    whole weights (ZeRO-3 and FSDP2 gather them, as for validation); seeded from the micro-batch's
    generator, so a resumed run writes the same continuations."""
    mode, ratio = run.layout_at(run.step)
    seed = int(torch.randint(2**62, (1,), generator=generator, device=generator.device))
    set_attention(run.inner_model, ratio, generator=generator)
    with run.backend.full_weights(run.wrapped), run.accelerator.autocast():
        return student_continuations(run.inner_model, dataclasses.replace(run.diffusion, mode=mode), batch,
                                     run.recipe.distill, seed)


def micro_batch_generator(seed: int, index: int, device) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed * 1_000_003 + index)


def _clip_and_check(run: Run, local_loss: torch.Tensor):
    """The global gradient norm (clipped to max_grad_norm) and whether the step's numbers are finite
    on every process. fp16's loss scaler skips overflowing steps and lowers its scale itself: there only
    a non-finite loss counts, and its step goes to the scaler (which will skip it)."""
    grad_norm = run.backend.clip_gradients(run.wrapped, run.recipe.train.max_grad_norm)
    bad_losses = all_reduce_sum((~torch.isfinite(local_loss)).double().reshape(1)).item()
    checked_norm = None if run.accelerator.scaler is not None else grad_norm
    return grad_norm, bad_losses == 0 and (checked_norm is None or math.isfinite(float(checked_norm)))


def _count_finite(run: Run, record: dict, finite: bool) -> None:
    run.nonfinite_in_a_row = 0 if finite else run.nonfinite_in_a_row + 1
    if not finite:
        record["skipped"] = True
        warn(run.accelerator, f"step {run.step}: non-finite loss or gradient (loss {record['loss']}, grad norm "
                              f"{record['grad_norm']}); optimizer step skipped ({run.nonfinite_in_a_row} in a row, "
                              f"the run stops at train.max_nonfinite_steps = {run.recipe.train.max_nonfinite_steps})")
    run.first_loss = record["loss"] if run.first_loss is None else run.first_loss
    run.last_loss = record["loss"]


def end_of_step(run: Run, record: dict) -> None:
    """Report the step; validate and checkpoint when due; stop on a signal or on repeated non-finite steps."""
    train, step = run.recipe.train, run.step
    last = step == train.max_steps
    if step % train.log_every == 0 or last:
        run.reporter.write(record)
    run.reporter.advance()
    if run.validation_blocks is not None and ((train.eval_every and step % train.eval_every == 0) or last):
        try:
            with run.stop.checked_before_every_call(decoder_layers(run.inner_model)[0], run.accelerator.device):
                run.validation = validate(run, record["ratio"])
        except Stopping:
            pass  # the step is complete, so is its checkpoint below; only this validation is left out
        else:
            run.validation["step"] = step
            run.reporter.write(run.validation)
        run.wrapped.train()

    exports = run.recipe.checkpoint.export_every
    if exports and step % exports == 0 and not last:  # the last step's model is the final export
        export_model(run, run.output_dir / PROGRESS_EXPORTS / f"step-{step:06d}")
    signum = run.stop.agreed(run.accelerator.device)
    fault = run.nonfinite_in_a_row >= train.max_nonfinite_steps
    every = run.recipe.checkpoint.every
    if fault or signum is not None or (every and step % every == 0) or last:
        checkpoint = save_checkpoint(run)
        if fault:
            raise NumericalFault(
                f"stopped at step {step} after {run.nonfinite_in_a_row} steps in a row with a non-finite loss or "
                f"gradient (all skipped); {checkpoint} holds the last finite weights; lower optim.lr or check "
                "the data, then continue with --resume", checkpoint)
        if signum is not None:
            raise Interrupted(signum, checkpoint)


def validate(run: Run, ratio: float) -> dict:
    """Held-out negative ELBO per token at the current attention ratio, summed over all processes; for a
    model with an AR head (hybrid) also its AR head's exact NLL per token on the same tokens (`val_ar_*`).

    The validation split gives every process the same number of batches (ZeRO-3 and FSDP need all ranks
    in every forward); a fixed generator makes successive validations comparable.
    """
    accelerator, train, inner = run.accelerator, run.recipe.train, run.inner_model
    was_training = inner.training
    inner.eval()
    batches = itertools.islice(run.validation_blocks.batches(  # drawn one at a time: eval_batches may be many
        train.batch_size, rank=accelerator.process_index, world_size=accelerator.num_processes), train.eval_batches)
    generator = micro_batch_generator(train.seed + 1, accelerator.process_index, accelerator.device)
    set_attention(inner, ratio, generator=generator)
    totals = torch.zeros(3, dtype=torch.float64, device=accelerator.device)  # ELBO, tokens, AR NLL
    with run.backend.full_weights(run.wrapped):
        for batch in batches:
            batch = {k: v.to(accelerator.device) for k, v in batch.items()}
            targets = ~batch["never_mask"] & maskable_positions(batch["input_ids"], batch["attention_mask"])
            with accelerator.autocast():
                elbo = elbo_nll(inner, batch["input_ids"], run.diffusion, n_samples=train.eval_samples,
                                target_mask=targets, attention_mask=batch["attention_mask"],
                                generator=generator, objective=run.objective)
                ar_nll = _ar_nll(run, inner, batch, targets)
            totals += torch.stack([elbo.nll.sum(), elbo.num_tokens.sum().double(), ar_nll])
    totals = all_reduce_sum(totals)
    inner.train(was_training)
    per_token, ar_per_token = (totals[0] / totals[1].clamp(min=1)).item(), (totals[2] / totals[1].clamp(min=1)).item()
    figures = {"val_elbo_nll": per_token, "val_elbo_ppl": math.exp(min(per_token, 50.0)), "val_tokens": int(totals[1])}
    if run.diffusion.mode.has_ar_head:
        figures.update({"val_ar_nll": ar_per_token, "val_ar_ppl": math.exp(min(ar_per_token, 50.0))})
    return figures


def _ar_nll(run: Run, model, batch: dict, targets: torch.Tensor) -> torch.Tensor:
    """The AR head's summed NLL of `targets` (float64), from the clean stream alone (the model run
    causally); 0 for a model without an AR head."""
    if not run.diffusion.mode.has_ar_head:
        return torch.zeros((), dtype=torch.float64, device=targets.device)
    logits = predict_logits(model, batch["input_ids"], targets, attention_mask=batch["attention_mask"])
    return F.cross_entropy(logits.float(), batch["input_ids"][targets], reduction="sum").double()
