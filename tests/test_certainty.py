"""dParallel's certainty forcing: the entropy of right predictions only, against an independent
computation; joined to the loss as the CE terms are; its gradient leaves wrong predictions alone."""

import pytest
import torch

from adapt.diffusion import DiffusionTraining, diffusion_loss
from adapt.errors import UserError
from adapt.forward import predict_logits
from adapt.objectives import certainty_entropy

from .tiny_runs import student_and_teacher


def test_the_term_is_the_entropy_of_right_predictions_at_the_temperature():
    logits = torch.tensor([[4.0, 1.0, 0.0, 9.0], [0.0, 3.0, 1.0, 9.0], [2.0, 2.0, 0.0, 9.0]])  # id 3: the mask
    targets = torch.tensor([0, 2, 0])  # right, wrong, a tie that argmax resolves to 0: right
    for temperature in (1.0, 0.5):
        p = (logits[:, :3].double() / temperature).softmax(-1)
        entropy = -(p * p.log()).sum(-1)
        expected = entropy * torch.tensor([1.0, 0.0, 1.0], dtype=torch.float64)
        got = certainty_entropy(logits, targets, temperature, mask_token_id=3).double()
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-7)


def test_the_term_joins_the_loss_divided_as_the_ce_is_and_pulls_only_right_predictions():
    model, _, config = student_and_teacher()
    ids = torch.randint(3, 100, (2, 12), generator=torch.Generator().manual_seed(3))
    mask = torch.zeros_like(ids, dtype=torch.bool)
    mask[:, 2:10] = True
    t = torch.full((2,), 0.5)
    with torch.no_grad():
        logits = predict_logits(model, ids.masked_fill(mask, config.mask_token_id), mask)
    # make some predictions right: the targets become the model's own argmax at every other masked token
    own = ids.clone()
    own[mask] = torch.where(torch.arange(int(mask.sum())) % 2 == 0, logits.argmax(-1), ids[mask])
    for norm in ("masked", "tokens"):
        plain = DiffusionTraining(loss_norm=norm)
        forced = DiffusionTraining(loss_norm=norm, certainty_weight=2.0, certainty_temperature=0.5)
        with torch.no_grad():
            base = diffusion_loss(model, own, config, plain, t=t, mask=mask)
            out = diffusion_loss(model, own, config, forced, t=t, mask=mask)
        entropy = certainty_entropy(logits, own[mask], 0.5, config.mask_token_id)
        denominator = mask.sum() if norm == "masked" else (~torch.zeros_like(mask)).sum() - 2  # position 0 never
        assert (entropy > 0).sum() >= int(mask.sum()) // 2
        torch.testing.assert_close(out.loss, base.loss + 2.0 * entropy.sum() / denominator, rtol=1e-5, atol=1e-6)

    logits = logits.clone().requires_grad_()
    certainty_entropy(logits, own[mask], 0.5, config.mask_token_id).sum().backward()
    wrong = logits.detach().argmax(-1) != own[mask]
    assert wrong.any() and logits.grad[wrong].abs().max() == 0 and logits.grad[~wrong].abs().max() > 0


@pytest.mark.parametrize("override", [{"certainty_weight": -1.0}, {"certainty_temperature": 0.0}])
def test_bad_certainty_settings_are_refused(override):
    with pytest.raises(UserError, match=f"diffusion.{next(iter(override))}"):
        DiffusionTraining(**override)
