"""Mask token choice and the safe model loader."""

import pytest
import torch

import adapt
from adapt.block import BlockMode
from adapt.diffusion import DiffusionConfig
from adapt.presets import FAMILIES, VOCAB, tiny_model, tiny_tokenizer


PADDED_ROWS = -(-(VOCAB + 1) // 64) * 64  # the mask row, then padding to a multiple of 64 for tensor cores


@pytest.mark.parametrize("family", ["gpt2", "llama"])  # GPT-2 ties input and output embeddings, Llama does not
def test_add_appends_a_row_initialised_to_the_mean(family):
    model, tokenizer = tiny_model(family), tiny_tokenizer()
    tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    assert tied == (family == "gpt2")
    inputs_before = model.get_input_embeddings().weight.detach().clone()
    head_before = model.get_output_embeddings().weight.detach().clone()

    mask_id = adapt.ensure_mask_token(model, tokenizer, strategy="add")

    assert mask_id == VOCAB and tokenizer.mask_token_id == mask_id
    assert tokenizer.convert_ids_to_tokens(mask_id) == tokenizer.mask_token
    embeddings = model.get_input_embeddings().weight
    assert PADDED_ROWS > VOCAB + 1
    assert embeddings.shape[0] == PADDED_ROWS and model.get_output_embeddings().weight.shape[0] == PADDED_ROWS
    assert torch.equal(embeddings[:VOCAB], inputs_before)
    for row in (mask_id, PADDED_ROWS - 1):  # the mask row and the padding rows: the mean, not random values
        torch.testing.assert_close(embeddings[row], inputs_before.mean(dim=0))
        torch.testing.assert_close(model.get_output_embeddings().weight[row], head_before.mean(dim=0))
    assert (model.get_output_embeddings().weight is embeddings) == tied
    assert DiffusionConfig.from_model_config(model.config).mask_token_id == mask_id
    assert model.config.diffusion["mask_token_strategy"] == "add"
    assert model.config.diffusion["vocab_size"] == VOCAB + 1
    with torch.no_grad():  # the model runs on the new id; the diffusion logits never cover the padding rows
        assert model(input_ids=torch.tensor([[1, mask_id]])).logits.shape[-1] == PADDED_ROWS
        hidden = torch.zeros(3, model.config.hidden_size)
        assert adapt.diffusion.output_logits(model, hidden).shape == (3, VOCAB + 1)


def test_add_keeps_an_existing_mask_token_and_spare_rows():
    model, tokenizer = tiny_model("llama"), tiny_tokenizer()
    first = adapt.ensure_mask_token(model, tokenizer, "add")
    second = adapt.ensure_mask_token(model, tokenizer, "add")
    assert first == second and model.get_input_embeddings().weight.shape[0] == PADDED_ROWS


def test_reuse_takes_the_given_id_without_resizing():
    model, tokenizer = tiny_model("llama"), tiny_tokenizer()
    before = model.get_input_embeddings().weight.detach().clone()
    assert adapt.ensure_mask_token(model, tokenizer, "reuse", token_id=77) == 77
    assert torch.equal(model.get_input_embeddings().weight, before)
    assert model.config.diffusion["mask_token_id"] == 77 and model.config.diffusion["mask_token_strategy"] == "reuse"


@pytest.mark.parametrize(
    "strategy,token_id,match",
    [("reuse", None, "needs token_id"), ("reuse", VOCAB, "needs token_id"), ("add", 5, "only with strategy"),
     ("guess", None, "must be 'add' or 'reuse'")],
)
def test_mask_token_arguments_are_validated(strategy, token_id, match):
    with pytest.raises(ValueError, match=match):
        adapt.ensure_mask_token(tiny_model("llama"), tiny_tokenizer(), strategy, token_id)


def test_ensure_mask_token_keeps_other_diffusion_settings():
    model = tiny_model("llama")
    DiffusionConfig(mode=BlockMode(4), objective="cart", tokens_trained=3).save_to(model.config)
    adapt.ensure_mask_token(model, tiny_tokenizer(), "reuse", token_id=9)
    config = DiffusionConfig.from_model_config(model.config)
    assert (config.mode, config.objective, config.tokens_trained, config.mask_token_id) == (BlockMode(4), "cart", 3, 9)


def _save(tmp_path, family="llama"):
    model, tokenizer = tiny_model(family), tiny_tokenizer()
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    return model


def test_load_model_round_trip(tmp_path):
    original = _save(tmp_path)
    model, tokenizer = adapt.load_model(tmp_path)
    ids = torch.tensor([[1, 5, 9, 11]])
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(input_ids=ids).logits, original(input_ids=ids).logits)
    assert model.config._attn_implementation == "sdpa" and tokenizer.eos_token == "</s>"


def test_load_model_uses_eager_for_families_without_sdpa(tmp_path):
    _save(tmp_path, "gemma2")
    model, _ = adapt.load_model(tmp_path)
    assert model.config._attn_implementation == "eager"


def test_missing_path_is_a_user_error(tmp_path):
    with pytest.raises(adapt.UserError, match="model path not found"):
        adapt.load_model(tmp_path / "nope")


def test_pickle_only_checkpoints_are_refused_unless_allowed(tmp_path):
    model = tiny_model("llama")
    model.save_pretrained(tmp_path, safe_serialization=False) if _supports_pickle_save() else _write_pickle(model, tmp_path)
    tiny_tokenizer().save_pretrained(tmp_path)
    with pytest.raises(adapt.UserError, match="--allow-pickle"):
        adapt.load_model(tmp_path)
    loaded, _ = adapt.load_model(tmp_path, allow_pickle=True)
    assert torch.equal(loaded.get_input_embeddings().weight, model.get_input_embeddings().weight)


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_loads_from_its_saved_folder(tmp_path, family):
    # transformers 5 writes is_decoder: false into GPT-NeoX configs: the loader must not read it as an encoder
    model = tiny_model(family)
    model.save_pretrained(tmp_path)
    tiny_tokenizer().save_pretrained(tmp_path)
    loaded, _ = adapt.load_model(tmp_path)
    assert torch.equal(loaded.get_input_embeddings().weight, model.get_input_embeddings().weight)


def test_encoder_only_models_are_refused(tmp_path):
    from transformers import BertConfig, BertModel

    BertModel(BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=64)).save_pretrained(tmp_path)
    with pytest.raises(adapt.UserError, match="no causal-LM head"):
        adapt.load_model(tmp_path)


def test_missing_tokenizer_is_a_user_error(tmp_path):
    tiny_model("llama").save_pretrained(tmp_path)
    with pytest.raises(adapt.UserError, match="tokenizer"):
        adapt.load_model(tmp_path)


def _supports_pickle_save():
    import inspect

    from transformers import PreTrainedModel

    return "safe_serialization" in inspect.signature(PreTrainedModel.save_pretrained).parameters


def _write_pickle(model, folder):
    model.config.save_pretrained(folder)
    torch.save(model.state_dict(), folder / "pytorch_model.bin")
