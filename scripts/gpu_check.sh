#!/usr/bin/env bash
# Every GPU figure the project quotes, in one run of at most 8 minutes on one H100/H200, offline:
# train step diffusion/causal ratio and MFU of a 1B Llama-shaped model in bf16 (SDPA, and flash-attention 2
# where installed), sampling tokens/s against the model's own generate, and `adapt train` under ZeRO-2 and
# ZeRO-3 on the one GPU with its peak memory next to `adapt plan`'s prediction. Writes OUT/gpu_check.json
# and OUT/gpu_check.md (paste the table into docs/performance.md).
#
#   bash scripts/gpu_check.sh [--out DIR]                  # on the GPU, with deepspeed installed
#   bash scripts/gpu_check.sh --device cpu --quick         # the same path on CPU with a tiny model (CI)
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec timeout 480 python scripts/gpu_check.py "$@"
