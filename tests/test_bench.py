"""The bench: a smoke run has every figure, the memory probe sees what a step allocates, runs interleave, the
dtype follows what the device computes natively."""

import json
import math

import pytest
import torch

from adapt import bench
from adapt.cli import main as cli_main


@pytest.fixture(autouse=True)
def _restore_threads():
    threads = torch.get_num_threads()  # --threads sets it for the whole process
    yield
    torch.set_num_threads(threads)


def test_quick_run_reports_every_figure(tmp_path):
    out = tmp_path / "bench.json"
    code = cli_main(["bench", "--quick", "--model", "tiny-llama", "--threads", "1", "--batch", "2", "--seq-len", "64",
                     "--sample-length", "16", "--sample-steps", "4", "8", "--sample-block-size", "8", "--json", str(out)])
    assert code == 0
    results = json.loads(out.read_text())

    train = results["train"]
    assert set(train) == {"causal", "diffusion_r1", "diffusion_r0.5", "block_b32", "hybrid_d32"}
    for name, row in train.items():
        assert len(row["times_s"]) == results["repeats"] == 2
        assert row["median_s"] > 0 and row["peak_bytes"] > row["step_peak_bytes"] > 0
        assert row["time_ratio"] == pytest.approx(row["median_s"] / train["causal"]["median_s"])
        assert row["cpu_time_ratio"] == pytest.approx(row["cpu_median_s"] / train["causal"]["cpu_median_s"])
        assert row["memory_ratio"] == pytest.approx(row["peak_bytes"] / train["causal"]["peak_bytes"])
    assert train["causal"]["head_positions"] == 2 * 64  # the HF loss path runs the head everywhere
    assert 0 < train["diffusion_r1"]["head_positions"] < 2 * 64  # diffusion only on masked positions
    # Every ratio draws the same noise levels and masks, so only the attention differs between them.
    assert train["diffusion_r1"]["head_positions"] == train["diffusion_r0.5"]["head_positions"]
    assert train["block_b32"]["head_positions"] == train["diffusion_r1"]["head_positions"]  # the same masks
    # a hybrid's head also runs on every clean position but the first of each row, for the AR loss
    assert train["hybrid_d32"]["head_positions"] == train["diffusion_r1"]["head_positions"] + 2 * 63

    rows = {(row["name"], row["batch"]): row for row in results["sampling"]}
    methods = {"ar", "diffusion_s4", "diffusion_s8"} | {
        f"{kind}{threshold}_{cache}" for threshold in ("0.9", "0.7")
        for kind, cache in [("threshold", "none"), ("threshold", "prefix"), ("threshold", "dual"),
                            ("block8_threshold", "exact"), ("block8_threshold", "none")]} | {
        "hybrid8_verify_one", "hybrid8_verify_every"}
    assert set(rows) == {(name, batch) for name in methods for batch in (1, 8)}
    for (name, batch), row in rows.items():
        assert row["tokens_per_s"] > 0 and row["ar_tokens_per_s"] > 0 and row["length"] == 16
        assert row["speedup"] == pytest.approx(row["tokens_per_s"] / row["ar_tokens_per_s"])
        assert 1 <= row["tokens_per_forward"] <= 16 and 0 <= row["entropy"] <= math.log(16)
        assert row["gen_perplexity"] is None or row["gen_perplexity"] > 1  # None: every text empty (EOS first)
    for batch in (1, 8):
        assert rows["ar", batch]["tokens_per_forward"] == 1 and rows["ar", batch]["speedup"] == 1
        # Fixed steps over one block commit length / steps tokens a forward, exactly.
        assert rows["diffusion_s4", batch]["tokens_per_forward"] == 4 and rows["diffusion_s8", batch]["tokens_per_forward"] == 2
    # That the exact cache samples what the uncached block model samples is the sampler's property, proved in
    # tests/test_block.py on fixed cases. Not asserted on these rows: the two run other shapes, so their logits
    # differ by float rounding (~1e-7), and over a thousand temperature-1 draws from this random model's flat
    # distributions one can land on the other side of a boundary (it did, after the uncached layout changed).

    elbo = results["elbo"]
    assert elbo["tokens_per_s"] > 0 and elbo["ratio"] == pytest.approx(elbo["tokens_per_s"] / elbo["ar_tokens_per_s"])


def test_json_to_stdout_keeps_the_table_off_it(capsys):
    assert cli_main(["bench", "--quick", "--model", "tiny-gpt2", "--threads", "1", "--batch", "1", "--seq-len", "16",
                     "--parts", "elbo", "--json"]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["elbo"]["n_samples"] == 4
    assert "ELBO" in captured.err


@pytest.mark.parametrize("native", [False, True])
def test_dtype_default_is_what_the_cpu_computes_natively(native, monkeypatch, capsys):
    from adapt.train import backends

    monkeypatch.setattr(backends, "cpu_has_native_bf16", lambda: native)
    expected = "bf16" if native else "fp32"
    assert bench.native_dtype(torch.device("cpu"))[0] == expected
    results = bench.run(bench.BenchSettings(model="tiny-gpt2", quick=True, parts=["elbo"], batch=1, seq_len=16, threads=1))
    assert results["dtype"] == expected and "auto" in results["dtype_reason"]
    assert f"dtype {expected} (auto: " in capsys.readouterr().err  # which, and why
    explicit = bench.run(bench.BenchSettings(model="tiny-gpt2", dtype="fp32", quick=True, parts=["elbo"], batch=1,
                                             seq_len=16, threads=1))
    assert explicit["dtype"] == "fp32" and explicit["dtype_reason"] == "--dtype"


def test_cpu_memory_probe_sees_a_step_allocation():
    size = 8 * 2**20

    def step():
        held = torch.ones(size, dtype=torch.uint8)
        transient = torch.empty(size, dtype=torch.uint8)
        del transient
        return held

    # Two 8 MiB tensors alive at once is the peak; what was allocated before the step does not count.
    before = torch.zeros(4 * size, dtype=torch.uint8)
    peak = bench.peak_step_memory(torch.device("cpu"), step)
    assert 2 * size <= peak < 2 * size + 2**20
    del before


def test_interleave_alternates_and_drops_warmup():
    calls = []

    def run(name, seconds):
        def once():
            calls.append(name)
            return seconds, seconds / 2
        return once

    times = bench.interleave({"a": run("a", 1.0), "b": run("b", 2.0)}, repeats=3, warmup=1)
    assert calls == ["a", "b"] * 4
    assert times == {"a": [(1.0, 0.5)] * 3, "b": [(2.0, 1.0)] * 3}


@pytest.mark.parametrize("argv, problem", [
    (["--model", "tiny-nosuchfamily"], "unknown preset"),
    (["--model", "/nonexistent/model"], "model not found"),
    (["--model", "tiny-llama", "--device", "cuda:7"] if not torch.cuda.is_available() else
     ["--model", "tiny-llama", "--repeats", "0"],
     "cuda" if not torch.cuda.is_available() else "repeats = 0 is out of range; it must be >= 1"),
    (["--model", "tiny-llama", "--batch", "0"], "batch = 0 is out of range; it must be in [1, 1024]"),
])
def test_bad_input_is_one_line_and_exit_code_2(argv, problem, capsys):
    assert cli_main(["bench", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and problem in err and "Traceback" not in err
