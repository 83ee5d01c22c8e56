"""Shared pytest setup."""

import os

import pytest
import torch

CPU_CAP_VARIABLE = "LLAMA_ENCODER_TEST_CPU_CAP"
"""Set by scripts/test.sh for the run with the CPU kernels capped (AVX2): the run stops unless the cap holds."""
REQUIRE_VLLM_VARIABLE = "LLAMA_ENCODER_REQUIRE_VLLM"
"""Set to 1 by scripts/test.sh for its vLLM step: a test that needs vLLM then fails, instead of being skipped, when
no vLLM interpreter is found."""


def pytest_configure(config):
    """Under the capped run, check that torch really runs AVX2 kernels without native bfloat16: an environment
    variable torch stopped honouring would otherwise make the run a silent copy of the uncapped one."""
    if os.environ.get(CPU_CAP_VARIABLE) is None:
        return
    from llama_encoder.dtypes import half_support

    wanted = os.environ[CPU_CAP_VARIABLE].upper()
    capability = torch.backends.cpu.get_cpu_capability()
    bfloat16 = half_support(torch.bfloat16, "cpu")
    problems = []
    if capability != wanted:
        problems.append(f"torch's CPU capability is {capability}, not {wanted} (ATEN_CPU_CAPABILITY="
                        f"{os.environ.get('ATEN_CPU_CAPABILITY')!r}; a CPU without {wanted} cannot run this check)")
    if bfloat16.native:
        problems.append(f"bfloat16 is still native ({bfloat16.detail}; ONEDNN_MAX_CPU_ISA="
                        f"{os.environ.get('ONEDNN_MAX_CPU_ISA')!r})")
    if os.environ.get("MKL_ENABLE_INSTRUCTIONS", "").upper() != wanted:
        problems.append(f"MKL_ENABLE_INSTRUCTIONS is {os.environ.get('MKL_ENABLE_INSTRUCTIONS')!r}, not {wanted}")
    if problems:
        raise pytest.UsageError(f"{CPU_CAP_VARIABLE}={wanted} but the kernels are not capped: " + "; ".join(problems)
                                + ". Run it through scripts/test.sh, which sets the caps.")


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(1234)
    yield


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """A tiny base converted into a verified mean-pooling encoder checkpoint (about 10 s, once per session)."""
    from llama_encoder.conversion_scripts.convert import convert
    from tests.tiny import save_tiny_base

    base = save_tiny_base(tmp_path_factory.mktemp("tiny-base"))
    return convert(out=tmp_path_factory.mktemp("tiny-checkpoint") / "encoder", base=str(base)).out_dir


@pytest.fixture(scope="session")
def vllm_python() -> str:
    """The interpreter that runs vLLM (`llama_encoder.engines.vllm.find_vllm_python`: $LLAMA_ENCODER_VLLM_PYTHON, else
    this one if it imports vllm). None found: the test is skipped, or fails when LLAMA_ENCODER_REQUIRE_VLLM=1."""
    from llama_encoder.engines.vllm import PYTHON_VARIABLE, find_vllm_python

    python = find_vllm_python()
    if python is None:
        message = (f"no vLLM interpreter: set {PYTHON_VARIABLE}=.venv-vllm/bin/python (built by "
                   "`bash scripts/setup_vllm_env.sh`)")
        if os.environ.get(REQUIRE_VLLM_VARIABLE) == "1":
            pytest.fail(f"{message}; {REQUIRE_VLLM_VARIABLE}=1 requires it", pytrace=False)
        pytest.skip(message)
    return python
