#!/usr/bin/env bash
# The main job on the embedded default model: convert SmolLM2-135M-Instruct into a bidirectional encoder
# checkpoint with the shipped MNTP + supervised adapters merged (verified on write), then load it back with AutoModel and SentenceTransformer and compare sentences.
# Usage: bash scripts/quickstart.sh [OUTPUT_DIR]   (default: smollm2-encoder; replaced if it exists)
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-smollm2-encoder}"
bash scripts/setup_env.sh .venv
.venv/bin/llama-encoder convert --out "$out" --overwrite
.venv/bin/python examples/compare_sentences.py "$out"
# What the training bought: the scorecard on STS Benchmark dev and SQuAD dev as retrieval, beside the recorded
# all-MiniLM-L6-v2 and causal SmolLM2 rows (needs the data; the rest of the quickstart does not).
sts_dev="${LLAMA_ENCODER_STS_DEV:-../shared/data/stsbenchmark/sts-dev.csv}"
squad_dev="${LLAMA_ENCODER_SQUAD_DEV_IR:-../shared/data/squad-dev-ir}"
sets=()
if [ -f "$sts_dev" ]; then
    sets+=(--sts "sts-dev=$sts_dev")
else
    echo "STS Benchmark dev not found at $sts_dev (set LLAMA_ENCODER_STS_DEV to score the checkpoint on it)"
fi
if [ -d "$squad_dev" ]; then
    sets+=(--retrieval "squad-dev-ir=$squad_dev")
else
    echo "SQuAD dev retrieval not found at $squad_dev (set LLAMA_ENCODER_SQUAD_DEV_IR to score the checkpoint on it)"
fi
if [ ${#sets[@]} -gt 0 ]; then
    .venv/bin/python examples/scorecard.py "$out" "${sets[@]}"
fi
