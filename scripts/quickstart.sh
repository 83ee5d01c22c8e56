#!/usr/bin/env bash
# The main job on the embedded default model: convert SmolLM2-135M-Instruct into a bidirectional encoder
# checkpoint (verified on write), then load it back with AutoModel and SentenceTransformer and compare sentences.
# Usage: bash scripts/quickstart.sh [OUTPUT_DIR]   (default: smollm2-encoder; replaced if it exists)
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-smollm2-encoder}"
bash scripts/setup_env.sh .venv
.venv/bin/llama-encoder convert --out "$out" --overwrite
.venv/bin/python examples/compare_sentences.py "$out"
