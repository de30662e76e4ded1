"""`adapt convert` and `adapt train` from the command line: budgets, defaults, the result and its recipe."""

import pytest

import adapt
from adapt.cli import main
from adapt.convert import convert_recipe
from adapt.errors import UserError
from adapt.recipe import load_recipe

from .tiny_runs import causal_folder, corpus


def test_budget_defaults_and_seq_len_limit(tmp_path):
    model = str(causal_folder(tmp_path / "causal"))
    recipe = convert_recipe(model, "d.jsonl", "out", tokens=10_000, batch_size=2, seq_len=32)
    assert recipe.train.max_steps == 157  # ceil(10,000 / (2 x 32))
    assert recipe.train.anneal_steps == 78 and recipe.optim.warmup_steps == 7 and recipe.resume == "auto"
    default = convert_recipe(model, "d.jsonl", "out")
    assert default.data.seq_len == 256  # 512 capped at the tiny model's 256 positions
    assert default.train.max_steps == 1000 and default.model.mask_token == "add"
    reuse = convert_recipe(model, "d.jsonl", "out", mask_token="reuse", mask_token_id=7, overrides=["optim.lr=0.01"])
    assert reuse.model.mask_token_id == 7 and reuse.optim.lr == 0.01
    with pytest.raises(UserError, match="--tokens or --steps, not both"):
        convert_recipe(model, "d.jsonl", "out", tokens=5, steps=5)


def test_convert_command_trains_exports_and_says_how_to_sample(tmp_path, capsys):
    model, data, out = causal_folder(tmp_path / "causal"), corpus(tmp_path / "train.jsonl"), tmp_path / "converted"
    code = main(["convert", str(model), "--data", str(data), "--out", str(out), "--steps", "4", "--seq-len", "32",
                 "--batch-size", "2", "--set", "data.validation_fraction=0.2", "--set", "logging.tensorboard=false"])
    assert code == 0
    printed = capsys.readouterr().out
    assert f"written to {out / 'model'}" in printed and f"adapt generate {out / 'model'}" in printed

    diffusion_model, tokenizer, config = adapt.load(out / "model")
    assert config.mask_token_id == tokenizer.mask_token_id and config.mask_token_strategy == "add"
    assert config.tokens_trained == 4 * 2 * 32 and load_recipe(out / "recipe.yaml").train.anneal_steps == 2
    assert adapt.get_attention_ratio(diffusion_model) == 1.0  # annealing finished within the run

    # The saved recipe reproduces the run: training it again finds the finished checkpoint.
    recipe = load_recipe(out / "recipe.yaml")
    assert recipe.train.max_steps == 4 and recipe.data.seq_len == 32
    assert main(["train", str(out / "recipe.yaml")]) == 0


def test_train_command_reports_bad_recipes_in_one_line(tmp_path, capsys):
    recipe, model, data = tmp_path / "r.yaml", causal_folder(tmp_path / "causal"), corpus(tmp_path / "train.jsonl")
    recipe.write_text(f"model: {{path: {model}}}\ndata: {{path: {data}}}\noutput_dir: {tmp_path / 'out'}\n")
    capsys.readouterr()
    assert main(["train", str(recipe), "optim.lr=fast"]) == 2
    assert capsys.readouterr().err.strip() == "adapt train: error: optim.lr must be a number, got 'fast' (str)"
    assert main(["train", str(recipe), "data.seq_len=1024"]) == 2
    assert "exceeds the model's maximum positions (256)" in capsys.readouterr().err
    assert not (tmp_path / "out" / "model").exists()


def test_a_small_corpus_holds_out_enough_for_validation_by_itself(tmp_path):
    """The data.validation_fraction default (1%) would hold out less than a block of a small corpus."""
    from adapt.data import DataConfig, open_dataset
    from adapt.presets import tiny_tokenizer
    from adapt.settings import default_of

    model, data = str(causal_folder(tmp_path / "causal")), corpus(tmp_path / "small.jsonl", docs=300)
    recipe = convert_recipe(model, str(data), str(tmp_path / "out"), seq_len=64)
    assert recipe.data.validation_fraction > default_of(DataConfig, "validation_fraction")
    blocks = open_dataset(recipe.data, tiny_tokenizer(), split="validation")
    assert blocks.num_blocks >= 2
    assert convert_recipe(model, str(data), str(tmp_path / "out"), seq_len=64,
                          overrides=["data.validation_fraction=0.05"]).data.validation_fraction == 0.05
