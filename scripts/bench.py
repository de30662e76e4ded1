"""Benchmarks of adapt against the causal-LM baseline; the same as `adapt bench` (see docs/performance.md).

    python scripts/bench.py --model smollm2 --dtype bf16 --batch 4 --seq-len 256
    python scripts/bench.py --quick --model tiny-llama --json
"""

import sys

from adapt.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
