"""Shared pytest setup."""

import pytest
import torch


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
