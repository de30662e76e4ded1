"""--trace: the HTML page holds every step of the denoising and fetches nothing, the PNG is the grid of
positions by steps, bad file names are refused before any work, and a real browser replays the page."""

import html
import importlib.util
import json
import re
import shutil
import struct
import subprocess

import pytest

from adapt.cli import main
from adapt.sampling import generate_with_details
from adapt.trace import DPI, MASK, figure_size, generation_trace, trace_grid, trace_page, trace_png

from .tiny_runs import diffusion_folder, diffusion_model

LENGTH = 12


def _generation(**options):
    model, tokenizer = diffusion_model()
    out = generate_with_details(model, tokenizer, "w5 w6", length=LENGTH, seed=0, **options)
    return out, generation_trace(tokenizer, out, "test")


def _embedded(page: str) -> dict:
    return json.loads(re.search(r'<script id="trace" type="application/json">(.*?)</script>', page, re.S).group(1))


def test_the_page_holds_every_steps_commits_and_fetches_nothing():
    out, trace = _generation(block_size=4)
    page = trace_page(trace)
    data = _embedded(page)
    prompt, commit_step = len(out.prompt_ids), out.commit_step[0]
    assert len(data["steps"]) == max(commit_step) + 1 == LENGTH
    for step, positions in enumerate(data["steps"]):  # each step's commits are the Generation's
        assert positions == [prompt + i for i, committed in enumerate(commit_step) if committed == step]
    assert data["given"] == [True] * prompt + [False] * LENGTH
    assert "".join(data["tokens"]) == "w5 w6 " + " ".join(f"w{token}" for token in out.token_ids[0])
    # self-contained: no address, no external script, style, image or font
    assert not re.search(r"https?:|//[a-z]|\bsrc=|\bhref=|@import|url\(", page, re.I)


def test_a_token_cannot_close_the_pages_script_early():
    _, trace = _generation()
    trace.tokens[-1] = "</script><script>alert(1)</script>"
    page = trace_page(trace)
    assert page.count("</script>") == 2 and _embedded(page)["tokens"][-1] == trace.tokens[-1]


def test_positions_never_generated_are_in_no_step_and_not_given():
    out, trace = _generation(block_size=4)
    trace.commit_step[-4:] = [-1] * 4  # as an early stop at EOS leaves the last block
    data = _embedded(trace_page(trace))
    never = set(range(len(trace.tokens) - 4, len(trace.tokens)))
    assert not never & {position for positions in data["steps"] for position in positions}
    assert not any(data["given"][position] for position in never)
    assert trace_grid(trace)[:, -4:].tolist() == [[-2] * 4] * (trace.steps)


def test_the_still_is_the_grid_of_generated_positions_by_steps():
    out, trace = _generation(block_size=4)
    grid = trace_grid(trace)
    commit_step = out.commit_step[0]
    assert grid.shape == (LENGTH, LENGTH)  # a row per step, a column per generated position (prompt left out)
    for step in range(LENGTH):
        assert grid[step].tolist() == [committed if committed <= step else -1 for committed in commit_step]
    png = trace_png(trace)
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", png[16:24])  # the IHDR chunk
    inches = figure_size(LENGTH, LENGTH)
    assert (width, height) == (round(inches[0] * DPI), round(inches[1] * DPI))


def test_generate_and_infill_write_their_traces_and_refuse_other_names_before_loading(tmp_path, capsys):
    folder = diffusion_folder(tmp_path / "model")
    assert main(["generate", str(folder), "--length", "6", "--seed", "0", "--trace", str(tmp_path / "g.html")]) == 0
    assert main(["infill", str(folder), "w5 [MASK:3] w9", "--seed", "0", "--trace", str(tmp_path / "i.png")]) == 0
    assert _embedded((tmp_path / "g.html").read_text())["steps"]
    assert (tmp_path / "i.png").read_bytes()[:4] == b"\x89PNG"
    assert sorted(path.name for path in tmp_path.iterdir()) == ["g.html", "i.png", "model"]  # no partial files
    capsys.readouterr()
    # a missing model proves the name is refused first
    assert main(["generate", str(tmp_path / "absent"), "--length", "6", "--trace", "t.svg"]) == 2
    assert capsys.readouterr().err == ("adapt generate: error: --trace writes a page (.html) or a picture (.png), "
                                       "not .svg; name it like trace.html or trace.png\n")


def test_a_png_without_matplotlib_names_the_install(tmp_path, capsys, monkeypatch):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *rest: None if name == "matplotlib"
                        else find_spec(name, *rest))
    assert main(["generate", str(tmp_path / "absent"), "--length", "6", "--trace", str(tmp_path / "t.png")]) == 2
    assert "pip install 'adapt[plot]'" in capsys.readouterr().err


def _chromium_spans(browser, page, tmp_path, step=None) -> list[tuple[str, str]]:
    """(class, text) of each token of the page after its script ran in headless chromium."""
    address = page.as_uri() + (f"#step={step}" if step is not None else "")
    dom = subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", f"--user-data-dir={tmp_path / 'p'}",
                          "--dump-dom", address], capture_output=True, text=True, timeout=120).stdout
    text = re.search(r'<div id="text">(.*?)</div>', dom, re.S).group(1)
    return [(cls, html.unescape(body)) for cls, body in re.findall(r'<span class="([^"]*)"[^>]*>(.*?)</span>', text)]


@pytest.mark.skipif(shutil.which("chromium") is None, reason="needs Debian's chromium (apt-get install chromium)")
def test_a_browser_shows_the_final_text_and_any_step_of_the_replay(tmp_path):
    out, trace = _generation(block_size=4)
    page = tmp_path / "trace.html"
    page.write_text(trace_page(trace))
    browser = shutil.which("chromium")
    final = _chromium_spans(browser, page, tmp_path)
    assert "".join(text for _, text in final) == "".join(trace.tokens)
    step = 5
    shown = _chromium_spans(browser, page, tmp_path, step)
    prompt = len(out.prompt_ids)
    expected = [("given", token) for token in trace.tokens[:prompt]] + [
        ("latest" if committed == step - 1 else "", token) if committed < step else ("masked", MASK)
        for token, committed in zip(trace.tokens[prompt:], out.commit_step[0])]
    assert shown == expected
