#!/usr/bin/env bash
# Create (or reuse) a separate virtualenv with llm2vec 0.2.3 for the speed comparison in benchmarks/llm2vec_speed.py.
# Usage: bash scripts/setup_llm2vec_env.sh [VENV_DIR]     (default: .venv-llm2vec)
#   then: .venv/bin/python benchmarks/llm2vec_speed.py --llm2vec-python .venv-llm2vec/bin/python
#
# Why a venv of its own: llm2vec 0.2.3's bidirectional models subclass transformers 4.44's Llama classes (their
# mask and attention signatures changed in 4.45+ and again in 5.x), so it runs on transformers==4.44.2 with
# peft==0.12.0 and tokenizers<0.20, against the main venv's transformers 5.24.
#
# Pins: torch==2.13.0 on every pip command (the CPU wheel the main venv uses; without the pin pip may resolve a
# multi-GB CUDA build or another torch), llm2vec installed with --no-deps (its setup.py asks for a transformers
# range and extras such as datasets/evaluate that embedding does not use), then exactly what `import llm2vec`
# needs. A venv that already imports llm2vec with these versions is reused (seconds).
#
# Environment:
#   TORCH_INDEX_URL   extra index for the torch wheel when no local wheel provides it,
#                     e.g. https://download.pytorch.org/whl/cpu
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${1:-.venv-llm2vec}"
torch_pin="torch==2.13.0"
specs=("$torch_pin" "transformers==4.44.2" "peft==0.12.0" "tokenizers<0.20" "numpy" "tqdm" "safetensors")
index_args=()
[ -n "${TORCH_INDEX_URL:-}" ] && index_args+=(--extra-index-url "$TORCH_INDEX_URL")

[ -x "$venv/bin/python" ] || "${PYTHON:-python3}" -m venv "$venv"
py="$venv/bin/python"
pip=("$py" -m pip --disable-pip-version-check -q)
start=$(date +%s)

check='import importlib.metadata as md, llm2vec, torch
assert md.version("llm2vec") == "0.2.3" and md.version("transformers") == "4.44.2", "wrong versions"
assert torch.__version__.startswith("2.13.0"), torch.__version__'
if "$py" -c "$check" >/dev/null 2>&1; then
    echo "reusing $venv: it already imports llm2vec 0.2.3 on transformers 4.44.2"
else
    # torch first, alone, so nothing later can swap it for a CUDA build; then the rest with torch pinned again.
    "${pip[@]}" install "${index_args[@]}" "$torch_pin"
    "${pip[@]}" install "${index_args[@]}" "${specs[@]}"
    "${pip[@]}" install "${index_args[@]}" --no-deps "llm2vec==0.2.3" "$torch_pin"
fi

"$py" - <<'EOF'
import importlib.metadata as md
for name in ("llm2vec", "torch", "transformers", "peft", "tokenizers", "numpy"):
    try:
        print(f"{name:14s} {md.version(name)}")
    except md.PackageNotFoundError:
        print(f"{name:14s} (not installed)")
import torch
assert torch.__version__.startswith("2.13.0"), f"torch {torch.__version__}: expected the 2.13.0 CPU wheel"
from llm2vec import LLM2Vec  # noqa: F401  (fails loudly here rather than in the benchmark)
print("import llm2vec: ok")
EOF
echo "setup_llm2vec_env.sh: $venv ready in $(( $(date +%s) - start )) s"
