"""The objectives (mdm, score-entropy, cart) and the variance levers (complementary masks, noise band).

Each property is checked against an independent computation: SEDD's score entropy in its own form
(rate x [sum of scores - ratio log score + K(ratio)]), the absorbing reverse step written from the
scores, CART weights worked out by hand, and the complementary pair's masks and weights.
"""

import dataclasses
import json
import math
import re
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

import adapt
from adapt.bidirectional import BidirectionalMode
from adapt.block import BlockMode
from adapt.diffusion import DiffusionConfig, DiffusionTraining, diffusion_loss, draw_noise, elbo_nll, maskable_positions
from adapt.hybrid import HybridMode
from adapt.forward import predict_logits
from adapt.objectives import CART, MaskedDiffusion, cart_weights, score_entropy
from adapt.errors import UserError
from adapt.presets import VOCAB, tiny_model, tiny_tokenizer
from adapt.sampling import SamplingOptions, _draw
from adapt.train import train
from adapt.train.loop import _draw_micro_batch

from .tiny_runs import (assert_same_tensors, diffusion_folder, diffusion_model, noise_from_the_data, recipe_for, run_cli,
                        step_records)
from .tiny_runs import tensors as weights


def _model_and_config(**overrides):
    model, _ = diffusion_model("llama")
    return model, dataclasses.replace(DiffusionConfig.from_model_config(model.config), **overrides)


def _batch(config, batch=3, length=12, seed=0):
    """Token ids below the mask's, and a prompt of 3 tokens to keep clean (SFT)."""
    ids = torch.randint(3, config.mask_token_id, (batch, length), generator=torch.Generator().manual_seed(seed))
    never_mask = torch.zeros_like(ids, dtype=torch.bool)
    never_mask[:, :3] = True
    return ids, never_mask


class NormalisedScores(nn.Module):
    """A head whose outputs are log-probabilities over every token but the mask, so that the log scores
    log r(t) + outputs are the true ratio's scale times a distribution (RADD's normalised scores)."""

    def __init__(self, head: nn.Module, config: DiffusionConfig):
        super().__init__()
        self.head, self.config = head, config

    def forward(self, hidden):
        logits = self.head(hidden)[..., :self.config.vocab_size]
        logits = logits.index_fill(-1, torch.tensor([self.config.mask_token_id]), -torch.inf)
        return logits.log_softmax(dim=-1)


@pytest.mark.parametrize("mode", [BidirectionalMode(), BlockMode(4)], ids=["bidirectional", "block"])
def test_score_entropy_of_normalised_scores_is_exactly_the_mdm_loss(mode):
    model, config = _model_and_config(mode=mode)
    model.lm_head = NormalisedScores(model.lm_head, config)
    ids, never_mask = _batch(config)
    score = dataclasses.replace(config, objective="score-entropy")

    def loss(settings):
        return diffusion_loss(model, ids, settings, never_mask=never_mask, generator=torch.Generator().manual_seed(1))

    mdm, sedd = loss(config), loss(score)
    assert mdm.num_masked == sedd.num_masked > 0
    torch.testing.assert_close(sedd.loss, mdm.loss, rtol=1e-6, atol=0)
    def bound(settings):
        return elbo_nll(model, ids, settings, n_samples=3, target_mask=~never_mask,
                        generator=torch.Generator().manual_seed(2)).nll

    torch.testing.assert_close(bound(score), bound(config), rtol=1e-6, atol=0)


def test_score_entropy_is_sedds_form_for_the_absorbing_log_linear_process():
    """SEDD's entropy per masked token: sigma'(t) [sum_y s_y - r log s_x0 + r (log r - 1)], with mask
    probability 1 - exp(-sigma(t)) = t, s_y = r exp(outputs[y]) and r = exp(-sigma) / (1 - exp(-sigma))."""
    generator = torch.Generator().manual_seed(0)
    vocab, mask_id, count = 11, 10, 64
    outputs = 3 * torch.randn(count, vocab, generator=generator, dtype=torch.float64)
    targets = torch.randint(0, mask_id, (count,), generator=generator)
    t = 1e-3 + (1 - 2e-3) * torch.rand(count, generator=generator, dtype=torch.float64)

    sigma = -torch.log1p(-t)
    rate, ratio = 1 / (1 - t), torch.exp(-sigma) / -torch.expm1(-sigma)
    scores = ratio[:, None] * outputs[:, :mask_id].exp()
    sedd = rate * (scores.sum(dim=1) - ratio * scores.gather(1, targets[:, None]).squeeze(1).log()
                   + ratio * (ratio.log() - 1))
    torch.testing.assert_close(score_entropy(outputs, targets, mask_id) / t, sedd, rtol=1e-10, atol=1e-10)


def test_score_entropy_trains_the_unnormalised_outputs():
    model, config = _model_and_config(objective="score-entropy")
    ids, never_mask = _batch(config, batch=4)
    t = torch.tensor([0.2, 0.4, 0.6, 0.8])
    mask = maskable_positions(ids, never_mask=never_mask) & (torch.arange(ids.shape[1]) % 2 == 1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(6):
        loss = diffusion_loss(model, ids, config, never_mask=never_mask, t=t, mask=mask).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert all(math.isfinite(x) for x in losses)
    assert losses[-1] < 0.5 * losses[0], losses


def test_score_entropy_measures_its_offset_at_the_first_step_and_a_resumed_run_keeps_it(tmp_path, monkeypatch):
    """An AR head's logits have log Z far from 0 (27.5 for SmolLM2-135M; here a tiny Llama's final norm
    scaled up to get there), and read as log scores exp(log Z) is the loss. The first step measures the
    mean log Z of its masked tokens (checked against the model's plain forward) and subtracts it; the
    export records it, and a run resumed from a checkpoint keeps it: bit-identical to an uninterrupted one."""
    import adapt.train.loop as loop

    sharp = tiny_model("llama")
    with torch.no_grad():
        sharp.model.norm.weight.mul_(100)
    sharp.save_pretrained(tmp_path / "sharp")
    tiny_tokenizer().save_pretrained(tmp_path / "sharp")
    monkeypatch.setattr(loop, "draw_noise", noise_from_the_data)
    measured, measure = [], loop._calibrate

    def measure_and_check(run, micros, mode, ratio):
        (micro,), config = micros, run.diffusion  # batch 4, one micro-batch, one process
        raw = diffusion_loss(run.inner_model, config=config, **micro.batch, t=micro.t, mask=micro.mask).loss
        measure(run, micros, mode, ratio)
        noisy = micro.batch["input_ids"].masked_fill(micro.mask, config.mask_token_id)
        with torch.no_grad():  # ratio 1 (anneal_steps 1): no random attention draws
            logits = run.inner_model(input_ids=noisy).logits[:, :-1][micro.mask[:, 1:]][:, :config.vocab_size]
        logits[:, config.mask_token_id] = -torch.inf
        measured.append((run.objective.offset, torch.logsumexp(logits.double(), dim=-1).mean().item(), raw.item()))

    monkeypatch.setattr(loop, "_calibrate", measure_and_check)
    common = (f"model.path={tmp_path / 'sharp'}", "diffusion.objective=score-entropy", "train.max_steps=4",
              "train.anneal_steps=1", "train.eval_batches=0", "checkpoint.every=2")
    straight = train(recipe_for(tmp_path, *common, output="straight"))
    ((offset, log_z, raw),) = measured  # measured once, at the first step
    assert log_z > 20 and offset == pytest.approx(log_z, rel=1e-5)
    first = step_records(tmp_path / "straight")[0]
    assert math.isfinite(raw) and first["loss"] < 1e-6 * raw  # the raw outputs' loss is about exp(log Z)
    assert adapt.load(straight.model_dir)[2].objective_state == {"offset": offset}
    killed = recipe_for(tmp_path, *common, output="killed")
    train(killed)
    shutil.rmtree(Path(killed.output_dir) / "checkpoints" / "step-000004")  # as if killed after step 4
    shutil.rmtree(Path(killed.output_dir) / "model")
    resumed = train(recipe_for(tmp_path, *common, "resume=auto", output="killed"))
    assert len(measured) == 2  # the killed run's first step; the resumed run took the checkpoint's
    assert_same_tensors(weights(straight.model_dir), weights(resumed.model_dir))


@pytest.mark.parametrize("steps_left,steps", [(7, 8), (3, 8), (1, 4)])  # t < 1: r(1) = 0
def test_the_samplers_distribution_is_the_absorbing_reverse_step_of_the_scores(steps_left, steps):
    """From t = k/T to s = (k-1)/T a masked position becomes y != mask with probability
    s_y(t) (exp(sigma_t - sigma_s) - 1) = s_y (t - s)/(1 - t) (the exact reverse step, SEDD's Tweedie
    step): given that it leaves the mask, y follows the normalised scores, which is the sampler's
    softmax over the outputs (the log r(t) offset cancels); and with normalised scores it leaves the
    mask with probability 1/k, the rate the `random` strategy commits at."""
    t, s = steps_left / steps, (steps_left - 1) / steps
    generator = torch.Generator().manual_seed(steps_left)
    vocab, mask_id = 13, 12
    outputs = 2 * torch.randn(5, vocab, generator=generator, dtype=torch.float64)
    for normalised in (False, True):
        if normalised:
            outputs[:, mask_id] = -torch.inf
            outputs = outputs.log_softmax(dim=-1)
        scores = (1 - t) / t * outputs[:, :mask_id].exp()
        leave = scores * (t - s) / (1 - t)
        wanted = leave / leave.sum(dim=1, keepdim=True)
        tokens, minus_entropy = _draw(outputs.clone(), mask_id, SamplingOptions(strategy="entropy", temperature=0),
                                      torch.Generator().manual_seed(0))
        assert torch.equal(tokens, wanted.argmax(dim=1))
        torch.testing.assert_close(minus_entropy.double(), (wanted * wanted.log()).sum(dim=1), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(leave.sum(dim=1), torch.full((5,), 1 / steps_left, dtype=torch.float64))


# CART by hand, p = 1/2: a clean token at distance d adds (1/2) (1/2) (1/2)^(d-1) = 0.25, 0.125, 0.0625,
# 0.03125, ... Positions 0..5, masked {1, 2, 4}, clean {0, 3, 5}.
CART_MASK = torch.tensor([[False, True, True, False, True, False]])
CART_BIDIRECTIONAL = [0, 0.25 + 0.125 + 0.03125, 0.125 + 0.25 + 0.0625, 0, 0.03125 + 0.25 + 0.25, 0]
# Blocks of 3: a token sees the clean tokens of its block and every token of the blocks before it (none of
# the masked tokens is the first of its block, which would see none of its own block with the shift).
CART_BLOCKS = [0, 0.25, 0.125, 0, 0.25 + 0.25 + (0.03125 + 0.0625 + 0.125), 0]
# Position 5 is padding: it is no context.
CART_PADDED = [0, 0.25 + 0.125, 0.125 + 0.25, 0, 0.03125 + 0.25, 0]


@pytest.mark.parametrize("mode,padded,expected",
                         [(BidirectionalMode(), False, CART_BIDIRECTIONAL), (BlockMode(3), False, CART_BLOCKS),
                          (BidirectionalMode(), True, CART_PADDED)], ids=["bidirectional", "block", "padding"])
def test_cart_weights_are_the_hand_computed_ones(mode, padded, expected):
    real = torch.ones_like(CART_MASK)
    real[0, 5] = not padded
    weights = cart_weights(CART_MASK, real, 0.5, *mode.context_visibility(6, shift=True))
    torch.testing.assert_close(weights, torch.tensor([expected]), rtol=0, atol=1e-7)


def test_cart_weight_of_a_blocks_first_token_counts_only_what_its_prediction_reads():
    """With the shift, the first token of a block is predicted at the last position of the block before,
    read from the clean copy: the clean tokens of its own block are not in its context. Blocks of 4,
    p = 0.1, only position 4 masked: its weight is the four tokens before it, 0.05 (1 + 0.9 + 0.81 + 0.729)
    = 0.172, not 0.307 with positions 5-7 counted. Without the shift it is predicted in its own noisy
    block, which does read them."""
    mask = torch.zeros(1, 8, dtype=torch.bool)
    mask[0, 4] = True
    real = torch.ones_like(mask)
    before = 0.05 * (1 + 0.9 + 0.81 + 0.729)
    shifted = cart_weights(mask, real, 0.1, *BlockMode(4).context_visibility(8, shift=True))[0, 4]
    unshifted = cart_weights(mask, real, 0.1, *BlockMode(4).context_visibility(8, shift=False))[0, 4]
    assert shifted.item() == pytest.approx(before) and round(before, 3) == 0.172
    assert unshifted.item() == pytest.approx(before + 0.05 * (1 + 0.9 + 0.81)) and round(unshifted.item(), 3) == 0.307


def test_cart_weights_the_masked_ce_in_the_loss():
    model, config = _model_and_config(objective="cart")
    training = DiffusionTraining(objective="cart", cart_p=0.5, loss_norm="tokens")
    ids, _ = _batch(config, batch=1, length=6)
    out = diffusion_loss(model, ids, config, training, mask=CART_MASK, t=torch.tensor([0.5]))
    ce = nn.functional.cross_entropy(predict_logits(model, ids.masked_fill(CART_MASK, config.mask_token_id),
                                                    CART_MASK), ids[CART_MASK], reduction="none")
    expected = (ce * torch.tensor(CART_BIDIRECTIONAL)[CART_MASK[0]]).sum() / 5  # 5 maskable positions
    torch.testing.assert_close(out.loss, expected, rtol=1e-6, atol=0)


def _fake_run(config, training, seed=0):
    """What `_draw_micro_batch` reads of a run."""
    accelerator = SimpleNamespace(device=torch.device("cpu"), num_processes=1, process_index=0)
    recipe = SimpleNamespace(train=SimpleNamespace(grad_accum=1, seed=seed), diffusion=training)
    return SimpleNamespace(accelerator=accelerator, recipe=recipe, diffusion=config, step=0)


@pytest.mark.parametrize("loss_norm", ["masked", "tokens"])
def test_complementary_masks_score_every_maskable_token_once_per_pair(loss_norm):
    config = DiffusionConfig(mask_token_id=VOCAB - 1)
    training = DiffusionTraining(complementary_masks=True, t_min=0.2, t_max=0.8, loss_norm=loss_norm)
    ids, never_mask = _batch(config, batch=3, length=16)
    attention_mask = torch.ones_like(ids)
    attention_mask[2, 12:] = 0  # a padded row
    batch = {"input_ids": ids, "attention_mask": attention_mask, "never_mask": never_mask}
    micro = _draw_micro_batch(_fake_run(config, training), batch, 0)

    maskable = maskable_positions(ids, attention_mask, never_mask)
    for name, values in batch.items():
        assert torch.equal(micro.batch[name], torch.cat([values, values])), name
    first, second = micro.mask[:3], micro.mask[3:]
    assert not (first & second).any() and torch.equal(first | second, maskable)
    torch.testing.assert_close(micro.t[3:], 1 - micro.t[:3])
    assert ((0.2 <= micro.t) & (micro.t <= 0.8)).all()  # both copies train inside the band
    weights = MaskedDiffusion(training).weights(micro.t, micro.mask, None, BidirectionalMode(), True)
    rows = micro.mask.nonzero()[:, 0]
    torch.testing.assert_close(weights, torch.where(rows < 3, 1 / micro.t[rows % 3], 1 / (1 - micro.t[rows % 3])))
    # Both copies are samples: the pair masks each maskable token once; "tokens" counts both copies.
    copies = 1 if loss_norm == "masked" else 2
    assert micro.counts.tolist() == [float(maskable.sum()), float(copies * maskable.sum()), float(2 * maskable.sum())]
    assert micro.tokens == int(attention_mask.sum())  # the data's tokens, each pair's sequence once


def test_noise_levels_stay_in_the_band():
    config, training = DiffusionConfig(mask_token_id=VOCAB - 1), DiffusionTraining(t_min=0.3, t_max=0.6)
    ids = torch.zeros(20_000, 2, dtype=torch.long)
    t, _ = draw_noise(ids, config, training, maskable_positions(ids), generator=torch.Generator().manual_seed(0))
    assert 0.3 <= t.min() < 0.301 and 0.599 < t.max() <= 0.6
    assert abs(t.mean().item() - 0.45) < 0.005
    assert DiffusionTraining().noise_band == (DiffusionTraining().eps, 1.0)  # the default is the old U(eps, 1)


@pytest.mark.parametrize("overrides,message", [
    (["diffusion.t_min=0.5", "diffusion.t_max=0.4"], "diffusion.t_min = 0.5 must be in (0, t_max = 0.4]"),
    (["diffusion.t_max=0"], "diffusion.t_max = 0.0 is out of range"),
    (["diffusion.complementary_masks=true"], "diffusion.complementary_masks needs a noise band symmetric about 1/2"),
    # t + (1 - t) in the band only if it is symmetric: 0.2-0.4 would train the second copy at 0.6-0.8
    (["diffusion.complementary_masks=true", "diffusion.t_min=0.2", "diffusion.t_max=0.4"],
     "with t_min = 0.2 set t_max: 0.8"),
    (["diffusion.objective=sedd"], "diffusion.objective = 'sedd' (str) is not a valid choice"),
    (["diffusion.cart_p=0"], "diffusion.cart_p = 0.0 is out of range; it must be in (0, 1]"),
    (["diffusion.block_size=4"], "diffusion.block_size is a setting of mode 'block' and diffusion.mode is not set"),
    (["diffusion.mode=bidirectional", "diffusion.block_size=4"], "and diffusion.mode is 'bidirectional'"),
    (["diffusion.mode=block"], "diffusion.mode: block needs diffusion.block_size"),
    (["train.eps=0.01"], "train.eps has moved to diffusion.eps"),
])
def test_bad_objective_settings_name_the_key_and_the_fix(tmp_path, overrides, message):
    with pytest.raises(UserError, match=re.escape(message)):
        recipe_for(tmp_path, *overrides)


def test_bad_objective_settings_exit_2_with_one_line(tmp_path):
    recipe = recipe_for(tmp_path)  # writes the tiny model and corpus the command line then refers to
    path = tmp_path / "recipe.json"
    path.write_text(json.dumps(recipe.to_dict()))
    result = run_cli("train", path, "diffusion.complementary_masks=true")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "adapt train: error: diffusion.complementary_masks needs a noise band symmetric about 1/2 (t_min + t_max = "
        "1), so that the copy at level 1 - t stays in the band; with t_min = 0.001 set t_max: 0.999"]


def test_checkpoints_from_before_the_choice_load_as_mdm(tmp_path):
    folder = diffusion_folder(tmp_path / "old")
    config_file = folder / "config.json"
    config = json.loads(config_file.read_text())
    config["diffusion"]["objective"] = "masked-diffusion"
    config_file.write_text(json.dumps(config))
    _, _, loaded = adapt.load(folder)
    assert loaded.objective == "mdm"


def _sft_data(folder):
    path = folder / "sft.jsonl"
    rows = [{"prompt": " ".join(f"w{10 + (i + j) % 10}" for j in range(6)),
             "response": " ".join(f"w{10 + (i + 2 * j) % 10}" for j in range(8))} for i in range(40)]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.mark.parametrize("data", ["pretrain", "sft"])
@pytest.mark.parametrize("mode", [BidirectionalMode(), BlockMode(4), HybridMode(4)], ids=["bidirectional", "block", "hybrid"])
@pytest.mark.parametrize("objective", ["mdm", "score-entropy", "cart"])
def test_every_objective_trains_in_every_mode_and_the_export_records_it(tmp_path, objective, mode, data):
    """One step of each objective x mode x data kind; the SFT runs also turn both variance levers on
    (complementary masks, a noise band), so every lever meets every objective and mode."""
    settings = [f"diffusion.objective={objective}", "train.max_steps=1", "train.eval_batches=0",
                "optim.warmup_steps=0", *(f"diffusion.{key}={value}" for key, value in mode.to_dict().items())]
    if data == "sft":
        settings += [f"data.path={_sft_data(tmp_path)}", "data.format=sft", "diffusion.complementary_masks=true",
                     "diffusion.t_min=0.1", "diffusion.t_max=0.9"]
    result = train(recipe_for(tmp_path, *settings))
    (record,) = step_records(tmp_path / "run")
    assert math.isfinite(record["loss"]) and record["loss"] > 0 and not record.get("skipped")
    assert record["tokens_trained"] == 4 * 32  # batch 4 x seq_len 32: a complementary pair counts once
    _, _, config = adapt.load(result.model_dir)
    exported = json.loads((result.model_dir / "config.json").read_text())["diffusion"]
    assert config.objective == exported["objective"] == objective
    assert config.mode == mode and exported["mode"] == mode.name
    assert exported["trained_with"]["complementary_masks"] == (data == "sft")
