#!/usr/bin/env bash
# Everything issue 16 measures on one GPU, in one call of the device machine (about 8 minutes):
# the bf16 matmul rate, model=medium training speed and MFU, experiment=shakespeare_char_small to
# val loss 1.47, model=medium generation speed, and pytest -m gpu. Writes $OUT/device.json and
# $OUT/device.log and prints a table. docs/benchmarks.md ("On a GPU") says how to call it.
#
#   bash bench/device_wheels.sh          # first, here: the wheels, tokenizer cache and data in .whl/
#   bash bench/device.sh                 # there, with .whl carried
#   OUT=/tmp/out bash bench/device.sh --dry-run    # on a CPU, tiny shapes, the local environment
set -euo pipefail
cd "$(dirname "$0")/.."

dry_run=""
if [[ "${1:-}" == "--dry-run" ]]; then
    dry_run="--dry-run"
elif [[ $# -gt 0 ]]; then
    echo "usage: bash bench/device.sh [--dry-run]" >&2
    exit 2
fi
OUT="${OUT:-bench/results/device}"
mkdir -p "$OUT"

if [[ -z "$dry_run" ]]; then
    # The device image lacks hydra-core, omegaconf and antlr4 and reaches no registry: bench/device_wheels.sh
    # put them in .whl/, with r50k_base's tiktoken cache and Tiny Shakespeare (the device sees only the repo).
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl
    export PYTHONPATH="/tmp/site:$PWD"
    export TIKTOKEN_CACHE_DIR="$PWD/.whl/tiktoken-cache" GPT_DATA_DIR="$PWD/.whl/data"
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv || true
else
    export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
export WANDB_MODE=offline PYTHONUNBUFFERED=1

python3 bench/device.py $dry_run --out "$OUT"
