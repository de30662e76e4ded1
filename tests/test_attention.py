"""The attention controller, proved by perturbation on every family and implementation."""

import pytest
import torch

import adapt
from adapt.attention import annealed_mask
from adapt.presets import VOCAB, tiny_model

from .conftest import FAMILY_IMPLS

L = 12


def _tokens(batch=2, length=L, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (batch, length), generator=g)


def _perturb_last(ids):
    other = ids.clone()
    other[:, -1] = (other[:, -1] + 1 - 3) % (VOCAB - 3) + 3
    return other


@pytest.mark.parametrize("family,impl", FAMILY_IMPLS)
def test_ratio_zero_is_bit_equal_to_the_unpatched_model(family, impl):
    reference = tiny_model(family, impl)
    patched = tiny_model(family, impl)
    ids = _tokens()
    with torch.no_grad():
        expected = reference(input_ids=ids).logits
        adapt.set_attention(patched, 1.0)  # go there and back: ratio 0 must undo everything
        adapt.set_attention(patched, 0.5)
        adapt.set_attention(patched, 0.0)
        assert torch.equal(patched(input_ids=ids).logits, expected)


@pytest.mark.parametrize("family,impl", FAMILY_IMPLS)
def test_bidirectional_sees_the_future_and_causal_does_not(family, impl):
    model = tiny_model(family, impl)
    ids = _tokens()
    changed = _perturb_last(ids)
    with torch.no_grad():
        causal_delta = (model(input_ids=ids).logits[:, 0] - model(input_ids=changed).logits[:, 0]).abs().max()
        adapt.set_attention(model, 1.0)
        bidir_delta = (model(input_ids=ids).logits[:, 0] - model(input_ids=changed).logits[:, 0]).abs().max()
    assert causal_delta == 0
    assert bidir_delta > 1e-6


@pytest.mark.parametrize("family,impl", FAMILY_IMPLS)
def test_partial_ratio_matches_an_explicit_mask(family, impl):
    """At 0 < r < 1 the forward equals one run with the annealed mask drawn from the same generator."""
    model = tiny_model(family, impl)
    ids = _tokens()
    adapt.set_attention(model, 0.5, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        annealed = model(input_ids=ids).logits
        adapt.set_attention(model, 0.0)
        mask = annealed_mask(2, L, 0.5, generator=torch.Generator().manual_seed(7))
        if impl == "eager":
            mask = torch.zeros(mask.shape).masked_fill_(~mask, torch.finfo(torch.float32).min)
        explicit = model(input_ids=ids, attention_mask=mask).logits
        causal = model(input_ids=ids).logits
    torch.testing.assert_close(annealed, explicit)
    assert not torch.allclose(annealed, causal)  # some future positions were really visible


@pytest.mark.parametrize("family,impl", FAMILY_IMPLS)
def test_padding_is_honoured_at_every_ratio(family, impl):
    """Changing a padded (masked-out) token never changes the outputs at real positions."""
    model = tiny_model(family, impl)
    ids = _tokens()
    padding = torch.ones_like(ids)
    padding[:, -3:] = 0  # right padding: the last three keys are hidden
    changed = ids.clone()
    changed[:, -3:] = 5
    for ratio in (0.0, 0.5, 1.0):
        adapt.set_attention(model, ratio, generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            a = model(input_ids=ids, attention_mask=padding).logits[:, :-3]
            adapt.set_attention(model, ratio, generator=torch.Generator().manual_seed(1))
            b = model(input_ids=changed, attention_mask=padding).logits[:, :-3]
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b, msg=f"padding leaked at ratio {ratio}")


def test_left_padding_gives_finite_outputs_while_annealing():
    model = tiny_model("llama", "sdpa")
    ids = _tokens()
    padding = torch.ones_like(ids)
    padding[0, :4] = 0
    adapt.set_attention(model, 0.3)
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=ids, attention_mask=padding).logits).all()


def test_annealed_visibility_frequency_matches_the_ratio():
    length, batch, ratio = 64, 32, 0.3
    mask = annealed_mask(batch, length, ratio, generator=torch.Generator().manual_seed(0))
    future = torch.triu(torch.ones(length, length, dtype=torch.bool), diagonal=1)
    visible = mask[:, 0][:, future].float()
    n = visible.numel()
    # binomial standard error; 5 sigma keeps the test from flaking while still catching a wrong rate
    assert abs(visible.mean().item() - ratio) < 5 * (ratio * (1 - ratio) / n) ** 0.5
    assert mask[:, 0][:, ~future].all()  # the causal part is always visible


def test_masks_are_drawn_fresh_each_forward():
    model = tiny_model("llama", "sdpa")
    ids = _tokens()
    adapt.set_attention(model, 0.5, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        first, second = model(input_ids=ids).logits, model(input_ids=ids).logits
    assert not torch.equal(first, second)


def test_ratio_one_runs_the_fused_kernel_without_a_mask(monkeypatch):
    model = tiny_model("llama", "sdpa")
    adapt.set_attention(model, 1.0)
    seen = []
    original = torch.nn.functional.scaled_dot_product_attention

    def spy(*args, **kwargs):
        seen.append((kwargs.get("attn_mask"), kwargs.get("is_causal")))
        return original(*args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    with torch.no_grad():
        model(input_ids=_tokens())
    assert seen and all(mask is None and causal is False for mask, causal in seen)


def test_partial_ratio_builds_one_bool_mask_per_forward(monkeypatch):
    model = tiny_model("llama", "sdpa")
    adapt.set_attention(model, 0.5)
    masks = []
    original = torch.nn.functional.scaled_dot_product_attention

    def spy(*args, **kwargs):
        masks.append(kwargs.get("attn_mask"))
        return original(*args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    with torch.no_grad():
        model(input_ids=_tokens())
    assert len(masks) == 2  # two layers, both given the same tensor
    assert masks[0] is masks[1] and masks[0].dtype == torch.bool and masks[0].shape == (2, 1, L, L)


def test_flash_attention_refuses_a_partial_ratio():
    model = tiny_model("llama", "sdpa")
    model.config._attn_implementation = "flash_attention_2"  # no kernel on CPU; the check must come first
    with pytest.raises(ValueError, match="cannot apply a partial attention mask"):
        adapt.set_attention(model, 0.5)
    adapt.set_attention(model, 1.0)  # ratio 1 goes through is_causal, which flash attention honours
    assert model.config.is_causal is False


@pytest.mark.parametrize("ratio", [-0.1, 1.5, float("nan")])
def test_ratio_out_of_range_is_a_clear_value_error(ratio):
    with pytest.raises(ValueError, match=r"must be in \[0, 1\]"):
        adapt.set_attention(tiny_model("gpt2"), ratio)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_state_survives_save_and_reload(tmp_path, family):
    from transformers import AutoModelForCausalLM

    model = tiny_model(family, "sdpa")
    adapt.set_attention(model, 1.0)
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    ids = _tokens()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, model(input_ids=ids).logits)
        delta = reloaded(input_ids=ids).logits[:, 0] - reloaded(input_ids=_perturb_last(ids)).logits[:, 0]
    assert delta.abs().max() > 1e-6
    assert adapt.get_attention_ratio(reloaded) == 1.0


def test_works_through_peft_wrappers():
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny_model("llama"), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    ids = _tokens()
    adapt.set_attention(model, 1.0)
    with torch.no_grad():
        delta = model(input_ids=ids).logits[:, 0] - model(input_ids=_perturb_last(ids)).logits[:, 0]
    assert delta.abs().max() > 1e-6
