#!/usr/bin/env bash
# The GPU check: one command that fits a short GPU loan (about 9 minutes on one H100/H200) and
# writes one JSON file of results. What it measures and why: bench/gpucheck.py.
#
#   bash runs/gpucheck.sh --prepare      # here (needs the package registries): .gpu/tokenizer
#   bash runs/gpucheck.sh [--out F]      # on the GPU machine, with .gpu/ carried along
#   bash runs/gpucheck.sh --cpu          # anywhere, toy size: the same code paths (a test runs it)
#
# Environment: NANOCHAT_PYTHON (default: uv's Python here, else python3, the GPU image's torch).
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ -n "${NANOCHAT_PYTHON:-}" ]]; then
    PY=("$NANOCHAT_PYTHON")
elif [[ -d .venv ]] && command -v uv >/dev/null 2>&1; then
    PY=(uv run python)
else
    PY=(python3)
fi
if [[ "${1:-}" == "--prepare" ]]; then
    # the GPU machine cannot build the Rust tokenizer trainer: train the 32K tokenizer here, on
    # the offline corpus the GPU machine builds for itself
    export NANOCHAT_BASE_DIR="$PWD/.gpu"
    "${PY[@]}" -m nanochat.dataset --offline
    "${PY[@]}" -m scripts.tok_train --vocab-size 32768 --overwrite
    exit 0
fi
exec "${PY[@]}" bench/gpucheck.py "$@"
