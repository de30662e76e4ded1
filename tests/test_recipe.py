"""Recipes: every shipped recipe loads; each kind of bad value is one UserError naming the key."""

import re
from pathlib import Path

import pytest

from adapt.errors import UserError
from adapt.recipe import Recipe, fields_doc, load_recipe

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted((ROOT / "recipes").glob("*.yaml"))
REQUIRED = ["model.path=m", "data.path=d.jsonl", "output_dir=out"]


def test_shipped_recipes_load_and_state_budget_and_hardware(monkeypatch):
    monkeypatch.chdir(ROOT)  # deepspeed_config paths are relative to the repository
    assert {p.name for p in RECIPES} >= {
        "smollm2-135m-cpu.yaml", "smollm2-135m-sft-cpu.yaml", "gpt2-small.yaml", "gpt2-medium.yaml",
        "llama2-7b.yaml", "tinyllama-1.1b.yaml", "qwen2.5-0.5b.yaml",
    }
    for path in RECIPES:
        recipe = load_recipe(path)
        header = path.read_text().lower()
        assert "token budget" in header and "hardware" in header, path.name
        assert recipe.output_dir and recipe.model.path, path.name


def test_paper_settings_in_gpt2_and_llama2_recipes(monkeypatch):
    monkeypatch.chdir(ROOT)
    small, medium = load_recipe("recipes/gpt2-small.yaml"), load_recipe("recipes/gpt2-medium.yaml")
    for recipe in (small, medium):
        assert recipe.data.seq_len == 1024 and recipe.optim.lr == 3e-4
        assert recipe.optim.schedule == "cosine" and recipe.optim.warmup_steps == 2000
        assert recipe.distributed.deepspeed_config.endswith("zero2.json")
    assert (small.model.mask_token, small.model.mask_token_id) == ("reuse", 10541)
    assert medium.model.mask_token == "add"  # GPT-2's vocabulary is 50257 ids, so the added token is 50257
    llama = load_recipe("recipes/llama2-7b.yaml")
    assert llama.data.seq_len == 2048 and llama.optim.lr == 2e-5 and llama.optim.schedule == "constant"
    assert "offload" in llama.distributed.deepspeed_config
    sft = load_recipe("recipes/smollm2-135m-sft-cpu.yaml")
    assert sft.data.format == "sft" and sft.train.anneal_steps == 1


def test_overrides_parse_values_and_reach_nested_sections():
    recipe = load_recipe(None, REQUIRED + ["optim.lr=1e-4", "data.seq_len=512", "train.mixed_precision=bf16",
                                           "lora.target_modules=[q_proj, v_proj]", "data.path=null",
                                           "data.sources=[{path: a, weight: 2}]", "train.max_steps=1e3"])
    assert recipe.optim.lr == 1e-4 and isinstance(recipe.optim.lr, float)
    assert recipe.data.seq_len == 512 and recipe.train.max_steps == 1000
    assert recipe.lora.target_modules == ["q_proj", "v_proj"]
    assert recipe.data.sources[0].path == "a" and recipe.data.sources[0].weight == 2.0


def test_no_is_a_word_and_only_true_false_are_booleans(tmp_path):
    # YAML 1.1 reads no/yes/on/off as booleans; `mixed_precision: no` must stay the choice "no".
    path = tmp_path / "r.yaml"
    path.write_text("model: {path: m}\ndata: {path: d}\noutput_dir: o\n"
                    "train: {mixed_precision: no, gradient_checkpointing: true}\n")
    recipe = load_recipe(path)
    assert recipe.train.mixed_precision == "no" and recipe.train.gradient_checkpointing is True
    assert load_recipe(path, ["train.mixed_precision=bf16", "train.mixed_precision=no"]).train.mixed_precision == "no"
    assert load_recipe(path, ["train.gradient_checkpointing=False"]).train.gradient_checkpointing is False
    with pytest.raises(UserError, match="gradient_checkpointing must be true or false"):
        load_recipe(path, ["train.gradient_checkpointing=yes"])


def test_overrides_win_over_the_file(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("model: {path: m}\ndata: {path: d, seq_len: 128}\noutput_dir: o\noptim: {lr: 3e-4}\n")
    assert load_recipe(path).optim.lr == 3e-4  # "3e-4" is a string to YAML; the float field reads it
    assert load_recipe(path, ["optim.lr=0.01"]).optim.lr == 0.01


@pytest.mark.parametrize("override, message", [
    ("optim.lrr=1", r"unknown key optim\.lrr; valid keys in optim: lr, schedule"),
    ("trainn.batch_size=1", r"unknown key trainn; valid keys in the recipe: model, data"),
    ("data.sources=[{path: a, wieght: 2}]", r"unknown key data\.sources\[0\]\.wieght; valid keys .*path, weight"),
    ("distributed.backend=mpi", r"distributed\.backend = 'mpi' .*choose one of: auto, ddp, deepspeed, fsdp"),
    ("optim.schedule=linear", r"optim\.schedule .*choose one of: cosine, constant"),
    ("train.batch_size=0", r"train\.batch_size = 0 is out of range; it must be in \[1, 1024\]"),
    ("train.batch_size=two", r"train\.batch_size must be a whole number, got 'two'"),
    ("train.batch_size=1.5", r"train\.batch_size must be a whole number"),
    ("optim.lr=fast", r"optim\.lr must be a number, got 'fast'"),
    ("optim.lr=-1", r"optim\.lr = -1.0 is out of range"),
    ("lora.dropout=2", r"lora\.dropout = 2.0 is out of range; it must be in \[0, 1\]"),
    ("train.gradient_checkpointing=maybe", r"train\.gradient_checkpointing must be true or false"),
    ("model=3", r"model must be a mapping of keys"),
    ("data.format=chat", r"data\.format = 'chat' .*choose one of: pretrain, sft"),
    ("data.seq_len=1", r"data\.seq_len = 1 is out of range"),
    ("data.validation_fraction=1.5", r"data\.validation_fraction = 1.5 is out of range"),
    ("model.mask_token=reuse", r"model\.mask_token is 'reuse' but model\.mask_token_id is not set"),
    ("model.mask_token_id=5", r"model\.mask_token_id is only used with model\.mask_token: reuse"),
    ("distributed.backend=deepspeed", r"distributed\.deepspeed_config is not set"),
    ("distributed.deepspeed_config=nope.json", r"distributed\.deepspeed_config: file not found: nope\.json"),
    ("optim.warmup_steps=5000", r"optim\.warmup_steps \(5000\) exceeds train\.max_steps"),
    ("noequals", r"override 'noequals' is not key=value"),
])
def test_bad_values_name_the_key_and_the_choices(override, message):
    with pytest.raises(UserError, match=message):
        load_recipe(None, REQUIRED + [override])


@pytest.mark.parametrize("missing", ["model.path", "data.path", "output_dir"])
def test_required_keys(missing):
    values = [item for item in REQUIRED if not item.startswith(missing)]
    with pytest.raises(UserError, match=re.escape(missing) + " is required"):
        load_recipe(None, values)


def test_missing_or_malformed_recipe_file(tmp_path):
    with pytest.raises(UserError, match="recipe not found"):
        load_recipe(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(UserError, match="not valid YAML"):
        load_recipe(bad)


def test_seq_len_beyond_the_model_is_a_user_error(tmp_path):
    from adapt.train.backends import SingleBackend
    from adapt.train.build import load_model
    from .tiny_runs import causal_folder

    recipe = load_recipe(None, [f"model.path={causal_folder(tmp_path / 'causal')}", "data.path=d", "output_dir=o",
                                "data.seq_len=4096"])
    with pytest.raises(UserError, match=r"data\.seq_len = 4096 exceeds the model's maximum positions \(256\)"):
        load_model(recipe, SingleBackend)


def test_docs_list_every_key_with_its_default():
    doc = (ROOT / "docs" / "recipes.md").read_text()
    for key, _type, default in fields_doc():
        assert f"`{key}`" in doc, f"docs/recipes.md does not document {key}"
    assert Recipe().train.anneal_steps == 10_000  # the DiffuLLaMA default, as documented
