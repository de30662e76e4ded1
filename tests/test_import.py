"""Import of DiffuGPT / DiffuLLaMA checkpoints, built here as tiny synthetic checkpoints laid out the same way.

The reference is each original's own computation: DiffuGPT's wrapper embeds the tokens with
`embed_tokens`, runs `denoise_model` (the GPT-2 body) on the embeddings with full attention and applies
`lm_head`; DiffuLLaMA is a Llama forward with full attention. Full attention is given to the reference
as an explicit all-True 4D mask, independent of adapt's attention controller.
"""

import json

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import adapt
from adapt.cli import main
from adapt.errors import UserError
from adapt.importers import import_checkpoint
from adapt.presets import tiny_model, tiny_tokenizer

MASK_ID = 100  # inside the tiny vocabulary (the real checkpoints reuse 10541 and 811)


class DiffuGPTWrapper(nn.Module):
    """The layout of DiffuGPT's training wrapper: embed_tokens / denoise_model (GPT-2 body, no wte) / lm_head."""

    def __init__(self, gpt2):
        super().__init__()
        self.embed_tokens = gpt2.transformer.wte
        self.denoise_model = gpt2.transformer
        self.lm_head = gpt2.lm_head
        del self.denoise_model.wte

    def forward(self, input_ids):
        full = torch.ones(input_ids.shape[0], 1, input_ids.shape[1], input_ids.shape[1], dtype=torch.bool)
        hidden = self.denoise_model(inputs_embeds=self.embed_tokens(input_ids), attention_mask=full).last_hidden_state
        return self.lm_head(hidden)


def save_base(folder, family):
    """The AR base model's folder (config + tokenizer), as `--base` would point to."""
    model, tokenizer = tiny_model(family, seed=1), tiny_tokenizer()
    model.config.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def plain_state(module):
    return {k: v.detach().clone().contiguous() for k, v in module.state_dict().items()}


@pytest.mark.parametrize("with_config", [True, False])
def test_diffugpt_import_reproduces_the_original_logits(tmp_path, with_config):
    gpt2 = tiny_model("gpt2", seed=3)
    original = DiffuGPTWrapper(gpt2).eval()
    src = tmp_path / "diffugpt"
    src.mkdir()
    state = plain_state(original)
    assert {"embed_tokens.weight", "denoise_model.wpe.weight", "denoise_model.h.0.attn.c_attn.weight",
            "denoise_model.ln_f.weight", "lm_head.weight"} <= set(state)
    save_file(state, src / "model.safetensors")
    if with_config:
        gpt2.config.save_pretrained(src)
    base = save_base(tmp_path / "gpt2-base", "gpt2")

    out = import_checkpoint(src, format="diffugpt", base=str(base), out_dir=tmp_path / "out", mask_token_id=MASK_ID)
    model, tokenizer, diffusion = adapt.load(out)
    ids = torch.randint(3, 120, (2, 12))
    changed = ids.clone()
    changed[:, -1] = 7
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, original(ids), rtol=1e-5, atol=1e-5)
        assert not torch.allclose(original(ids)[:, 0], original(changed)[:, 0])  # the reference is bidirectional
    assert (diffusion.mask_token_id, diffusion.mask_token_strategy, diffusion.shift) == (MASK_ID, "reuse", True)
    assert diffusion.base_model == str(base) and diffusion.annealing_finished
    assert adapt.get_attention_ratio(model) == 1.0 and tokenizer.mask_token_id == MASK_ID
    assert len(adapt.generate(model, tokenizer, "w5", length=4, steps=2, seed=0)) == 1


def test_diffugpt_padded_vocabulary_rows_are_never_predicted(tmp_path):
    """DiffuGPT pads GPT-2's vocabulary; the padding rows are no tokens, so their logits are dropped."""
    gpt2 = tiny_model("gpt2", seed=3)
    vocab = len(tiny_tokenizer())
    gpt2.resize_token_embeddings(vocab + 8, mean_resizing=False)
    original = DiffuGPTWrapper(gpt2).eval()
    src = tmp_path / "diffugpt"
    src.mkdir()
    save_file(plain_state(original), src / "model.safetensors")
    out = import_checkpoint(src, format="diffugpt", base=str(save_base(tmp_path / "gpt2-base", "gpt2")),
                            out_dir=tmp_path / "out", mask_token_id=MASK_ID)
    model, tokenizer, diffusion = adapt.load(out)
    assert model.get_input_embeddings().weight.shape[0] == vocab + 8 and diffusion.vocab_size == vocab
    hidden = torch.randn(3, model.config.n_embd)
    with torch.no_grad():
        torch.testing.assert_close(adapt.diffusion.output_logits(model, hidden), original.lm_head(hidden)[:, :vocab])


@pytest.mark.parametrize("layout", ["plain", "wrapper"])
def test_diffullama_import_reproduces_the_original_logits(tmp_path, layout):
    llama = tiny_model("llama", seed=4)
    src = tmp_path / "diffullama"
    if layout == "plain":  # the published DiffuLLaMA: an ordinary Llama folder
        llama.save_pretrained(src)
        tiny_tokenizer().save_pretrained(src)
    else:  # DiffuLLaMA's training wrapper over Llama
        src.mkdir()
        state = {("embed_tokens." + k[len("model.embed_tokens."):] if k.startswith("model.embed_tokens.")
                  else "denoise_model." + k[len("model."):] if k.startswith("model.") else k): v
                 for k, v in plain_state(llama).items()}
        save_file(state, src / "model.safetensors")
        llama.config.save_pretrained(src)
    base = save_base(tmp_path / "llama-base", "llama")

    assert main(["import", str(src), "--format", "diffullama", "--base", str(base), "--out", str(tmp_path / "out"),
                 "--mask-id", str(MASK_ID)]) == 0
    model, _, diffusion = adapt.load(tmp_path / "out")
    ids = torch.randint(3, 120, (2, 12))
    full = torch.ones(2, 1, 12, 12, dtype=torch.bool)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, llama(input_ids=ids, attention_mask=full).logits,
                                   rtol=1e-5, atol=1e-5)
    assert diffusion.mask_token_id == MASK_ID and json.loads((tmp_path / "out" / "config.json").read_text())["auto_map"]


def test_default_mask_ids_are_the_published_ones(tmp_path):
    llama = tiny_model("llama")
    llama.save_pretrained(tmp_path / "src")
    # the tiny vocabulary has no id 811: the default is applied and refused with a clear message
    with pytest.raises(UserError, match="mask token id 811 is outside the vocabulary"):
        import_checkpoint(tmp_path / "src", format="diffullama", base=str(save_base(tmp_path / "b", "llama")),
                          out_dir=tmp_path / "out")


def test_bad_imports_are_clear_errors(tmp_path, capsys):
    llama = tiny_model("llama")
    llama.save_pretrained(tmp_path / "src")
    base = str(save_base(tmp_path / "b", "llama"))
    assert main(["import", str(tmp_path / "src"), "--format", "diffugpt", "--base", base,
                 "--out", str(tmp_path / "out")]) == 2
    assert "diffugpt checkpoints are gpt2 models" in capsys.readouterr().err
    assert main(["import", str(tmp_path / "nothing"), "--format", "diffullama", "--base", base,
                 "--out", str(tmp_path / "out")]) == 2
    assert "checkpoint folder not found" in capsys.readouterr().err
    (tmp_path / "src" / "model.safetensors").rename(tmp_path / "src" / "weights.txt")
    with pytest.raises(UserError, match="no weights"):
        import_checkpoint(tmp_path / "src", format="diffullama", base=base, out_dir=tmp_path / "out", mask_token_id=5)
