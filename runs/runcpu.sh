#!/usr/bin/env bash
# The tiny end-to-end run on CPU, with no network: the main job a newcomer runs first.
#
# Today it builds the embedded offline corpus (this Python's own standard library),
# trains a 4096-token tokenizer on it and evaluates it against GPT-2 / GPT-4. Later
# stages (pretraining, midtraining, SFT, RL, evaluation, report, chat) join as they land.
#
# Artifacts go to $NANOCHAT_BASE_DIR, by default ~/.cache/nanochat-cpu so that this demo
# never overwrites the artifacts of a real GPU run in ~/.cache/nanochat.
set -euo pipefail
cd "$(dirname "$0")/.."

export NANOCHAT_BASE_DIR="${NANOCHAT_BASE_DIR:-$HOME/.cache/nanochat-cpu}"
export UV_PYTHON_DOWNLOADS=never
if command -v uv >/dev/null 2>&1; then
    UV=(uv)
elif python3 -m uv --version >/dev/null 2>&1; then
    UV=(python3 -m uv)
else
    echo "runcpu.sh needs uv: pip install uv" >&2
    exit 1
fi
run() { echo "+ $*"; "${UV[@]}" run "$@"; }

echo "artifacts: $NANOCHAT_BASE_DIR"
"${UV[@]}" sync  # builds the Rust tokenizer trainer on the first run

# -- data: the offline corpus (about 31 MB of text, deterministic on a given machine)
run python -m nanochat.dataset --offline

# -- tokenizer
run python -m scripts.tok_train --vocab-size 4096 --max-chars 100000000
run python -m scripts.tok_eval
