"""Export and load: round trips, the config and card, atomic writes, and remote code without adapt."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import yaml

import adapt
from adapt.cli import main
from adapt.diffusion import DiffusionConfig
from adapt.errors import UserError
from adapt.export import REMOTE_CODE_FILES, check_export, save_checkpoint
from adapt.presets import tiny_model, tiny_tokenizer


def diffusion_model(family="llama", ratio=1.0, strategy="add"):
    model, tokenizer = tiny_model(family), tiny_tokenizer()
    if strategy == "add":
        adapt.ensure_mask_token(model, tokenizer, "add")
    else:
        adapt.ensure_mask_token(model, tokenizer, "reuse", token_id=100)
    adapt.set_attention(model, ratio)
    return model, tokenizer


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_round_trip_gives_identical_logits_from_sharded_safetensors(tmp_path, family):
    model, tokenizer = diffusion_model(family)
    out = save_checkpoint(model, tokenizer, tmp_path / "ckpt", max_shard_size="40KB")
    shards = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"].values()
    assert len(set(shards)) > 1
    loaded, loaded_tokenizer, diffusion = adapt.load(out)
    ids = torch.randint(3, 120, (2, 16))
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, loaded(input_ids=ids).logits)
    assert adapt.get_attention_ratio(loaded) == 1.0 and loaded.config.is_causal is False
    assert diffusion.mask_token_id == loaded_tokenizer.mask_token_id == model.config.diffusion["mask_token_id"]
    assert adapt.generate(loaded, loaded_tokenizer, "w5", length=6, steps=3, seed=0) == \
        adapt.generate(model, tokenizer, "w5", length=6, steps=3, seed=0)


def test_config_and_model_card(tmp_path):
    model, tokenizer = diffusion_model()
    config = adapt.DiffusionConfig.from_model_config(model.config)
    config.base_model, config.tokens_trained = "HuggingFaceTB/SmolLM2-135M", 123456
    card = {"license": "apache-2.0", "datasets": ["brown"], "evaluation": {"elbo_perplexity": 41.25}}
    out = save_checkpoint(model, tokenizer, tmp_path / "ckpt", diffusion=config, card=card)

    saved = json.loads((out / "config.json").read_text())
    assert saved["diffusion"] == {**config.to_dict(), "annealing_finished": True}
    assert saved["auto_map"] == {"AutoModelForCausalLM": "modeling_adapt_diffusion.AdaptDiffusionLlamaForCausalLM"}
    assert saved["is_causal"] is False and saved["attention_ratio"] == 1.0
    assert all((out / name).read_text() == (Path(adapt.__file__).parent / name).read_text()
               for name in REMOTE_CODE_FILES)  # verbatim copies: one sampler

    readme = (out / "README.md").read_text()
    metadata = yaml.safe_load(readme.split("---")[1])
    assert metadata["base_model"] == "HuggingFaceTB/SmolLM2-135M"
    assert metadata["library_name"] == "transformers" and metadata["license"] == "apache-2.0"
    assert metadata["datasets"] == ["brown"] and "diffusion" in metadata["tags"]
    assert "| elbo_perplexity | 41.25 |" in readme and "| tokens_trained | 123456 |" in readme
    check_export(out)
    # the model passed in is untouched (no auto_map written into its config)
    assert not hasattr(model.config, "auto_map")


def test_partial_attention_ratio_is_restored(tmp_path):
    model, tokenizer = diffusion_model(ratio=0.25)
    out = save_checkpoint(model, tokenizer, tmp_path / "ckpt")
    loaded, _, diffusion = adapt.load(out)
    assert adapt.get_attention_ratio(loaded) == 0.25 and diffusion.annealing_finished is False
    ids = torch.randint(3, 120, (1, 12))
    for m in (model, loaded):  # same annealed mask draw -> same logits
        adapt.set_attention(m, 0.25, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, loaded(input_ids=ids).logits)


def test_reused_mask_id_names_the_tokenizer_mask_token(tmp_path):
    model, tokenizer = diffusion_model(strategy="reuse")
    out = save_checkpoint(model, tokenizer, tmp_path / "ckpt")
    assert tokenizer.mask_token is None  # the caller's tokenizer is not modified
    _, loaded_tokenizer, diffusion = adapt.load(out)
    assert loaded_tokenizer.mask_token == "w100" and loaded_tokenizer.mask_token_id == diffusion.mask_token_id == 100


def test_existing_output_is_kept_unless_overwrite(tmp_path):
    model, tokenizer = diffusion_model()
    target = tmp_path / "ckpt"
    target.mkdir()
    (target / "notes.txt").write_text("keep me")
    with pytest.raises(UserError, match="not empty"):
        save_checkpoint(model, tokenizer, target)
    assert (target / "notes.txt").read_text() == "keep me"
    save_checkpoint(model, tokenizer, target, overwrite=True)
    assert not (target / "notes.txt").exists()
    check_export(target)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no staging or old folders left


def test_a_failed_export_leaves_nothing_behind(tmp_path, monkeypatch):
    model, tokenizer = diffusion_model()
    save_checkpoint(model, tokenizer, tmp_path / "ckpt")
    before = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "ckpt").iterdir()}

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(type(tokenizer), "save_pretrained", broken)
    with pytest.raises(UserError, match="writing .*ckpt failed: disk full"):  # one line naming the path
        save_checkpoint(model, tokenizer, tmp_path / "ckpt", overwrite=True)
    with pytest.raises(UserError, match="disk full"):
        save_checkpoint(model, tokenizer, tmp_path / "other")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "ckpt").iterdir()} == before


def test_unmerged_lora_and_non_diffusion_models_are_refused(tmp_path):
    from peft import LoraConfig, get_peft_model

    model, tokenizer = diffusion_model()
    lora = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="merge"):
        save_checkpoint(lora, tokenizer, tmp_path / "lora")
    with pytest.raises(UserError, match="no diffusion settings"):
        save_checkpoint(tiny_model("llama"), tokenizer, tmp_path / "plain")
    plain = tmp_path / "plain-folder"
    tiny_model("llama").save_pretrained(plain)
    tokenizer.save_pretrained(plain)
    with pytest.raises(UserError, match="not a diffusion checkpoint"):
        adapt.load(plain)


def test_check_export_names_what_is_missing(tmp_path):
    model, tokenizer = diffusion_model()
    out = save_checkpoint(model, tokenizer, tmp_path / "ckpt", max_shard_size="40KB")
    (out / "sampling.py").unlink()
    next(out.glob("model-00002-*.safetensors")).unlink()
    with pytest.raises(UserError, match=r"missing: model-00002-of-\d+\.safetensors, sampling\.py"):
        check_export(out)


# The remote-code check runs in a fresh interpreter where `import adapt` fails: the repo is dropped from
# sys.path and an import hook refuses the name, so only the files inside the checkpoint can be used.
REMOTE_SCRIPT = textwrap.dedent("""
    import json, sys
    class NoAdapt:
        def find_spec(self, name, path=None, target=None):
            if name == "adapt" or name.startswith("adapt."):
                raise ImportError("adapt is not installed here")
    sys.meta_path.insert(0, NoAdapt())
    sys.path = [p for p in sys.path if p not in ("", ".", REPO)]
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    model = AutoModelForCausalLM.from_pretrained(CKPT, trust_remote_code=True)
    tokenizer = AutoTokenizer.from_pretrained(CKPT)
    ids = torch.tensor([[5, 9, 17, 33, 65, 12]])
    changed = ids.clone(); changed[0, -1] = 40
    with torch.no_grad():
        sees_future = not torch.allclose(model(input_ids=ids).logits[0, 0], model(input_ids=changed).logits[0, 0])
    print(json.dumps({
        "class": type(model).__name__,
        "ratio": model.config.attention_ratio,
        "annealing_hook": hasattr(model.base_model, "_adapt_attention_hook"),
        "sees_future": sees_future,
        "adapt_imported": any(m == "adapt" or m.startswith("adapt.") for m in sys.modules),
        "generated": model.diffusion_generate(tokenizer, "w5 w6", length=8, steps=4, seed=1, num_samples=2,
                                              strategy="margin", top_p=0.9),
        "infilled": model.diffusion_infill(tokenizer, "w5 [MASK:3] w9 [MASK]", span_length=2, seed=2),
    }))
""")


@pytest.mark.parametrize("family, ratio, block_size", [("llama", 1.0, None), ("gpt2", 1.0, None), ("llama", 0.5, None),
                                                     ("llama", 0.0, 4), ("gpt2", 0.0, 3)])
def test_remote_code_samples_like_adapt_without_adapt_installed(tmp_path, family, ratio, block_size):
    """Block models (ratio 0: their plain forward is the causal one) sample with their cache there too."""
    model, tokenizer = diffusion_model(family, ratio=ratio)
    config = DiffusionConfig.from_model_config(model.config)
    config.block_size = block_size
    config.save_to(model.config)
    out = save_checkpoint(model, tokenizer, tmp_path / "ckpt")
    repo = str(Path(adapt.__file__).resolve().parent.parent)
    script = f"REPO = {repo!r}\nCKPT = {str(out)!r}\n" + REMOTE_SCRIPT
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules"), "PYTHONPATH": ""}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env,
                            cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    remote = json.loads(result.stdout.strip().splitlines()[-1])
    base = type(model).__name__
    assert remote["class"] == f"AdaptDiffusion{base}" and not remote["adapt_imported"]
    assert remote["sees_future"] == (ratio > 0)
    assert remote["ratio"] == ratio and remote["annealing_hook"] == (0 < ratio < 1)
    if 0 < ratio < 1:
        return  # the annealed mask is a fresh random draw per forward: samples are not comparable
    assert remote["generated"] == adapt.generate(model, tokenizer, "w5 w6", length=8, steps=4, seed=1,
                                                 num_samples=2, strategy="margin", top_p=0.9)
    assert remote["infilled"] == adapt.infill(model, tokenizer, "w5 [MASK:3] w9 [MASK]", span_length=2, seed=2)


def test_cli_export_generate_infill(tmp_path, capsys):
    model, tokenizer = diffusion_model()
    src = save_checkpoint(model, tokenizer, tmp_path / "src")
    card = tmp_path / "card.json"
    card.write_text(json.dumps({"license": "mit", "evaluation": {"lambada_accuracy": 0.5}}))
    assert main(["export", str(src), str(tmp_path / "out"), "--card", str(card), "--max-shard-size", "40KB"]) == 0
    assert "lambada_accuracy" in (tmp_path / "out" / "README.md").read_text()
    capsys.readouterr()

    assert main(["generate", str(tmp_path / "out"), "--prompt", "w5", "--length", "6", "--steps", "3",
                 "--seed", "0", "--json"]) == 0
    generated = json.loads(capsys.readouterr().out)
    assert generated["forwards"] == 3 and len(generated["samples"][0]["token_ids"]) == 6
    assert generated["samples"][0]["text"] == adapt.generate(model, tokenizer, "w5", length=6, steps=3, seed=0)[0]

    assert main(["infill", str(tmp_path / "out"), "w5 [MASK:2] w9", "--seed", "0"]) == 0
    text = capsys.readouterr().out.strip()
    assert text.startswith("w5 ") and text.endswith(" w9")

    assert main(["generate", str(tmp_path / "out"), "--length", "4", "--steps", "9"]) == 2
    assert "at most 4 steps" in capsys.readouterr().err
    assert main(["export", str(src), str(tmp_path / "out")]) == 2
    assert "not empty" in capsys.readouterr().err


def test_a_model_loaded_through_the_remote_code_re_exports_as_its_family(tmp_path):
    model, tokenizer = diffusion_model()
    first = save_checkpoint(model, tokenizer, tmp_path / "first")
    remote, remote_tokenizer, _ = adapt.load(first, trust_remote_code=True)
    assert type(remote).__name__ == "AdaptDiffusionLlamaForCausalLM"
    second = save_checkpoint(remote, remote_tokenizer, tmp_path / "second")
    assert (second / "config.json").read_text() == (first / "config.json").read_text()


def test_the_remote_code_files_are_exactly_what_the_remote_module_imports():
    from transformers.dynamic_module_utils import get_relative_import_files

    package = Path(adapt.__file__).parent
    needed = get_relative_import_files(package / REMOTE_CODE_FILES[0])
    # a module imported from two others is listed twice
    assert sorted({Path(f).name for f in needed}) == sorted(REMOTE_CODE_FILES[1:])
