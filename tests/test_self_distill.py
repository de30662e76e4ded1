"""`adapt distill`: the model's own answers (exactly what the sampler gives), resumable after a stop,
trained with complementary masks and certainty forcing into an export; the refusals."""

import json
from pathlib import Path

import torch

from adapt.cli import main
from adapt.export import load
from adapt.sampling import generate

from .tiny_runs import causal_folder, diffusion_folder, other_tokenizer_folder
from .tiny_runs import tensors as weights

PROMPTS = ["w5 w6 w7", "w8 w9", "w10 w11 w12 w13"]
TRAIN = [f"--set={setting}" for setting in ("train.max_steps=2", "train.batch_size=2", "data.seq_len=16", "optim.warmup_steps=0",
                                              "checkpoint.every=1")]


def _prompts(folder: Path, prompts=PROMPTS) -> Path:
    path = folder / "prompts.txt"
    path.write_text("\n".join(prompts) + "\n")
    return path


def _distill(model: Path, prompts: Path, out: Path, *extra: str) -> int:
    return main(["distill", str(model), "--data", str(prompts), "--out", str(out), "--length", "6",
                 "--temperature", "0", *extra, *TRAIN])


def test_the_targets_are_the_models_own_answers_and_the_run_exports_a_trained_model(tmp_path):
    model_dir = diffusion_folder(tmp_path / "model")
    out = tmp_path / "out"
    assert _distill(model_dir, _prompts(tmp_path), out) == 0
    model, tokenizer, _ = load(model_dir)
    rows = [json.loads(line) for line in (out / "targets.jsonl").read_text().splitlines()]
    assert [r["prompt"] for r in rows] == PROMPTS
    assert [r["response"] for r in rows] == [generate(model, tokenizer, p, length=6, temperature=0)[0] for p in PROMPTS]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2] and all(torch.isfinite(torch.tensor(r["loss"])) for r in records)
    recipe = (out / "recipe.yaml").read_text()
    assert "certainty_weight: 2.0" in recipe and "complementary_masks: true" in recipe and "r: 16" in recipe
    before, after = weights(model_dir), weights(out / "model")
    assert before.keys() == after.keys() and any(not torch.equal(before[n], after[n]) for n in before)
    assert not (out / "targets.jsonl.partial").exists()


def test_the_training_rows_end_at_the_answers_eos_without_eos_filler(tmp_path):
    """Only the prompt, the answer and its one EOS are attended; the rest of a row is padding, not a target."""
    from adapt.data import open_dataset
    from adapt.self_distill import distill_recipe

    model_dir = diffusion_folder(tmp_path / "model")
    _, tokenizer, _ = load(model_dir)
    targets = tmp_path / "targets.jsonl"
    targets.write_text(json.dumps({"prompt": "w5 w6", "response": " w7 w8"}) + "\n")
    recipe = distill_recipe(str(model_dir), targets, tmp_path / "out", ["data.seq_len=16"])
    batch = next(open_dataset(recipe.data, tokenizer).batches(1))
    row = tokenizer("w5 w6").input_ids + tokenizer(" w7 w8", add_special_tokens=False).input_ids
    attended = len(row) + 1  # and the EOS
    assert batch["attention_mask"][0].tolist() == [1] * attended + [0] * (16 - attended)
    assert batch["input_ids"][0, :attended].tolist() == row + [tokenizer.eos_token_id]


def test_a_stopped_run_continues_after_its_last_whole_answer(tmp_path):
    model_dir = diffusion_folder(tmp_path / "model")
    prompts = _prompts(tmp_path)
    straight = tmp_path / "straight"
    assert _distill(model_dir, prompts, straight) == 0
    stopped = tmp_path / "stopped"
    stopped.mkdir()
    first = (straight / "targets.jsonl").read_text().splitlines()[0]
    (stopped / "targets.jsonl.partial").write_text(first + '\n{"prompt": "w8 w9", "resp')  # torn by a kill
    assert _distill(model_dir, prompts, stopped) == 0
    assert (stopped / "targets.jsonl").read_text() == (straight / "targets.jsonl").read_text()
    a, b = weights(straight / "model"), weights(stopped / "model")
    assert all(torch.equal(a[n], b[n]) for n in a)


def test_the_source_can_write_the_targets(tmp_path):
    from transformers import AutoModelForCausalLM

    from adapt.presets import tiny_tokenizer

    source = causal_folder(tmp_path / "source")
    model_dir = diffusion_folder(tmp_path / "model")
    assert _distill(model_dir, _prompts(tmp_path), tmp_path / "out", "--targets", "source", "--source", str(source)) == 0
    tokenizer, causal = tiny_tokenizer(), AutoModelForCausalLM.from_pretrained(source)
    ids = tokenizer(PROMPTS[0], return_tensors="pt").input_ids
    greedy = causal.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False,
                             pad_token_id=tokenizer.eos_token_id)[0, ids.shape[1]:]
    first = json.loads((tmp_path / "out" / "targets.jsonl").read_text().splitlines()[0])
    assert first["response"] == tokenizer.decode(greedy, skip_special_tokens=True)


def _refused(capsys, code: int, message: str) -> None:
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("adapt")]
    assert code == 2 and "Traceback" not in err and len(errors) == 1 and message in errors[0], err


def test_bad_input_is_one_line(tmp_path, capsys):
    model_dir = diffusion_folder(tmp_path / "model")
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    _refused(capsys, _distill(model_dir, empty, tmp_path / "a"), "has no prompts; give a file with at least one prompt")
    _refused(capsys, _distill(model_dir, _prompts(tmp_path), model_dir / "out"), "which this command reads")
    _refused(capsys, _distill(model_dir, _prompts(tmp_path), tmp_path / "b", "--set=diffusion.certainty_temperature=0"),
             "diffusion.certainty_temperature = 0.0 is out of range")
    other = tmp_path / "other"
    other.mkdir()
    (other / "targets.jsonl").write_text(json.dumps({"prompt": "w99", "response": " w5"}) + "\n")
    _refused(capsys, _distill(model_dir, _prompts(tmp_path), other), "holds answers to other prompts")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_a_source_with_another_tokenizer_is_refused(tmp_path, capsys):
    other = other_tokenizer_folder(tmp_path / "other")
    code = _distill(diffusion_folder(tmp_path / "model"), _prompts(tmp_path), tmp_path / "out", "--targets", "source",
                    "--source", str(other))
    _refused(capsys, code, f"--source {other}: its tokenizer differs from the student's")
