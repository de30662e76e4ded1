"""A picture of the denoising: which step committed each token, as a page that replays it or as a still.

Built from what the sampler returns (`Generation`, `Infilling`): each position's token id and the step
that committed it. Only the first sample is drawn. `write_trace` writes, by the file's extension:

* `.html`: one self-contained page (inline CSS and JS, nothing fetched) that replays the decoding step
  by step, with play, pause and a step slider; a token is coloured by the step that committed it, a
  masked position shows as a placeholder. The data sits in the page as JSON (`<script id="trace">`):
  the final tokens and, for every step, the positions it committed. `#step=N` in the address opens the
  page at step N.
* `.png`: the same as a still (matplotlib, the `plot` extra): positions across, steps down, each cell
  the colour of its token's step once committed, grey while masked.

A position that is neither given nor committed was never generated (a block decoder stopped early at
EOS); it is left blank.
"""

from __future__ import annotations

import colorsys
import html
import importlib.util
import io
import json
from dataclasses import dataclass
from pathlib import Path
from string import Template

from .atomic import write_bytes_atomically, write_text_atomically
from .errors import UserError
from .outputs import check_output

MASK = "░"  # a position still masked
KINDS = (".html", ".png")
DPI = 100
MAX_LABELS = 160  # tokens named along the still's bottom, at 7 points each
MASKED_GREY, NEVER_WHITE = "#d9d9d9", "#ffffff"


@dataclass
class Trace:
    title: str
    tokens: list[str]  # each position's final text
    given: list[bool]  # the prompt, or the text around infill spans: there from the start
    commit_step: list[int]  # the step that committed each position; -1: given, or never generated

    @property
    def steps(self) -> int:
        return max(self.commit_step, default=-1) + 1

    def committed_at(self, step: int) -> list[int]:
        """The positions that `step` committed."""
        return [position for position, committed in enumerate(self.commit_step) if committed == step]


def generation_trace(tokenizer, generation, source: str) -> Trace:
    """The trace of the first sample of a `Generation`: its prompt, given, then its tokens; `source` says
    what made it (a command, a model), for the title."""
    prompt = generation.prompt_ids
    return Trace(title=_title(source, generation), tokens=_token_texts(tokenizer, prompt + generation.token_ids[0]),
                 given=[True] * len(prompt) + [False] * len(generation.token_ids[0]),
                 commit_step=[-1] * len(prompt) + generation.commit_step[0])


def infilling_trace(tokenizer, infilling, source: str) -> Trace:
    """The trace of the first sample of an `Infilling`: every position not committed by a step is given."""
    steps = infilling.commit_step[0]
    return Trace(title=_title(source, infilling), tokens=_token_texts(tokenizer, infilling.token_ids[0]),
                 given=[step < 0 for step in steps], commit_step=steps)


def _title(source: str, out) -> str:
    return f"{source}: {out.forwards} forwards, the first sample"


def _token_texts(tokenizer, ids: list[int]) -> list[str]:
    """Each token's text as it reads after the token before it (a SentencePiece token decoded alone loses
    its leading space); special tokens shown, since an EOS is part of what the model did."""
    texts = []
    for position, token_id in enumerate(ids):
        alone = tokenizer.decode([token_id])
        if position == 0:
            texts.append(alone)
            continue
        before, both = tokenizer.decode(ids[position - 1:position]), tokenizer.decode(ids[position - 1:position + 1])
        texts.append(both[len(before):] if both.startswith(before) else alone)
    return texts


def step_colors(steps: int) -> list[str]:
    """One light colour per step, from violet (first) to orange (last), dark text readable on each."""
    hues = [0.75 - 0.67 * step / max(steps - 1, 1) for step in range(steps)]
    return ["#%02x%02x%02x" % tuple(round(255 * c) for c in colorsys.hsv_to_rgb(hue, 0.45, 0.97)) for hue in hues]


def check_trace_path(path: str, reads: tuple = ()) -> None:
    """Refuse a trace file name that is not .html or .png, or cannot be written (or overlaps what the
    command `reads`), before any work."""
    kind = Path(path).suffix.lower()
    if kind not in KINDS:
        named = kind or "a file without an extension"
        raise UserError(f"--trace writes a page (.html) or a picture (.png), not {named}; name it like trace.html "
                        "or trace.png")
    if kind == ".png" and importlib.util.find_spec("matplotlib") is None:
        raise UserError("a .png trace is drawn with matplotlib, which is not installed; pip install 'adapt[plot]' "
                        "(or matplotlib), or write a trace.html")
    check_output(path, folder=False, reads=reads)


def write_trace(path: str, trace: Trace) -> None:
    """Write `trace` as the page or picture its extension names (`check_trace_path` first)."""
    check_trace_path(path)
    if Path(path).suffix.lower() == ".html":
        write_text_atomically(path, trace_page(trace))
    else:
        write_bytes_atomically(path, trace_png(trace))


def trace_data(trace: Trace) -> dict:
    """What the page replays: the final tokens, what is given, and the positions each step committed."""
    return {"title": trace.title, "tokens": trace.tokens, "given": trace.given, "mask": MASK,
            "steps": [trace.committed_at(step) for step in range(trace.steps)], "colors": step_colors(trace.steps)}


def trace_page(trace: Trace) -> str:
    """The self-contained HTML page that replays `trace`."""
    # "</" inside the JSON would end the script element early (a token can be any text)
    data = json.dumps(trace_data(trace), ensure_ascii=False).replace("</", "<\\/")
    return _PAGE.substitute(title=html.escape(trace.title), data=data)


# (a string.Template: a "$" in the page must be written "$$")
_PAGE = Template("""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>$title</title>
<style>
body { font: 15px/1.5 system-ui, sans-serif; margin: 2em auto; max-width: 60em; padding: 0 1em; color: #222; }
h1 { font-size: 1.1em; }
.controls { display: flex; gap: 1em; align-items: center; margin: 1em 0; }
#slider { flex: 1; }
#text { font: 15px/2 ui-monospace, monospace; white-space: pre-wrap; word-break: break-word; }
#text span { border-radius: 3px; }
.given { color: #555; }
.masked { color: #888; }
#ramp { display: inline-block; width: 8em; height: 0.8em; vertical-align: middle; }
.latest { outline: 2px solid #222; }
.legend { color: #666; font-size: 0.9em; }
</style>
</head>
<body>
<h1 id="title"></h1>
<div class="controls">
<button id="play">play</button>
<input id="slider" type="range" min="0" step="1">
<span id="label"></span>
</div>
<p class="legend">A token's colour is the step that committed it, from violet (first) <span id="ramp"></span> to
orange (last);
<span class="masked">░</span> is a position still masked, the outlined tokens are the latest step's,
grey text was given.</p>
<div id="text"></div>
<script id="trace" type="application/json">$data</script>
<script>
"use strict";
const trace = JSON.parse(document.getElementById("trace").textContent);
const last = trace.steps.length;
const slider = document.getElementById("slider"), label = document.getElementById("label");
const play = document.getElementById("play"), text = document.getElementById("text");
document.getElementById("title").textContent = trace.title;
slider.max = last;
document.getElementById("ramp").style.background = "linear-gradient(to right, " + trace.colors.join(", ") + ")";
const stepOf = trace.tokens.map(() => -1);
trace.steps.forEach((positions, step) => positions.forEach(position => { stepOf[position] = step; }));
const spans = trace.tokens.map(() => text.appendChild(document.createElement("span")));

// The state after `step` steps: given tokens, the tokens committed so far, a mask for the rest.
function show(step) {
  spans.forEach((span, i) => {
    const committed = stepOf[i] >= 0 && stepOf[i] < step;
    span.className = trace.given[i] ? "given" : committed ? (stepOf[i] === step - 1 ? "latest" : "")
      : stepOf[i] >= 0 ? "masked" : "never";
    span.textContent = trace.given[i] || committed ? trace.tokens[i] : stepOf[i] >= 0 ? trace.mask : "";
    span.style.background = committed ? trace.colors[stepOf[i]] : "";
  });
  slider.value = step;
  label.textContent = "step " + step + " of " + last;
}

let timer = null;
function pause() { clearInterval(timer); timer = null; play.textContent = "play"; }
play.onclick = () => {
  if (timer) { pause(); return; }
  if (Number(slider.value) >= last) show(0);
  play.textContent = "pause";
  timer = setInterval(() => {
    show(Number(slider.value) + 1);
    if (Number(slider.value) >= last) pause();
  }, Math.min(400, Math.max(30, 4000 / Math.max(last, 1))));
};
slider.oninput = () => { pause(); show(Number(slider.value)); };
const asked = /step=(\\d+)/.exec(location.hash);
show(asked ? Math.min(Number(asked[1]), last) : last);
</script>
</body>
</html>
""")


def trace_grid(trace: Trace):
    """Steps x generated positions (the given ones left out): after each step, each position's commit
    step once committed, -1 while masked, -2 if never generated."""
    import numpy as np

    steps = np.array([step for step, given in zip(trace.commit_step, trace.given) if not given])
    after = np.arange(trace.steps)[:, None]
    grid = np.where((steps >= 0) & (steps <= after), steps, -1)
    return np.where(steps < 0, -2, grid)


def figure_size(positions: int, steps: int) -> tuple[float, float]:
    """Inches of the still: a column per position and a row per step, within what a page can show."""
    return min(3 + 0.16 * positions, 40.0), min(2.5 + 0.1 * steps, 30.0)


def trace_png(trace: Trace) -> bytes:
    """The still: `trace_grid` in colour, the final tokens along the bottom; PNG bytes."""
    from matplotlib.colors import ListedColormap
    from matplotlib.figure import Figure

    grid = trace_grid(trace)
    labels = [token for token, given in zip(trace.tokens, trace.given) if not given]
    figure = Figure(figsize=figure_size(grid.shape[1], grid.shape[0]), dpi=DPI, layout="constrained")
    axes = figure.add_subplot()
    # colour index: never generated, masked, then one per step
    colours = ListedColormap([NEVER_WHITE, MASKED_GREY, *step_colors(trace.steps)])
    # row r is the state after r + 1 steps, as the page's "step r + 1 of N"
    axes.imshow(grid + 2, cmap=colours, vmin=0, vmax=trace.steps + 1, aspect="auto", interpolation="nearest",
                extent=(-0.5, grid.shape[1] - 0.5, grid.shape[0] + 0.5, 0.5))
    every = -(-len(labels) // MAX_LABELS)  # beyond MAX_LABELS positions, every few are named
    axes.set_xticks(range(0, len(labels), every), [repr(label)[1:-1] for label in labels[::every]], rotation=90,
                    fontsize=7)
    axes.set_ylabel("steps done")
    axes.set_title(trace.title, fontsize=9)
    out = io.BytesIO()
    figure.savefig(out, format="png")
    return out.getvalue()
