"""Checkpoints load without the package (trust_remote_code, offline), and plain Llama weights load cleanly."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, LlamaModel

from llama_encoder import LlamaEncoderConfig, LlamaEncoderModel
from tests.numeric import assert_equal_up_to_summation_order, encoder_terms
from tests.tiny import TINY_LATENTS, TINY_LLAMA, tiny_encoder

# Runs in a fresh interpreter where importing llama_encoder fails, as on a machine that only has the checkpoint.
CHILD = textwrap.dedent(
    """
    import importlib.abc, json, sys
    class _Blocked(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "llama_encoder" or name.startswith("llama_encoder."):
                raise ImportError("llama_encoder is not installed here")
    sys.meta_path.insert(0, _Blocked())
    import numpy as np, torch
    from transformers import AutoModel
    folder, ids_file, out_file = sys.argv[1:4]
    model = AutoModel.from_pretrained(folder, trust_remote_code=True).eval()
    assert not any(m.startswith("llama_encoder") for m in sys.modules), "package leaked into the child"
    inputs = np.load(ids_file)
    with torch.no_grad():
        out = model(input_ids=torch.from_numpy(inputs["ids"]), attention_mask=torch.from_numpy(inputs["mask"]))
    np.save(out_file, out.pooler_output.numpy())
    print(json.dumps({"class": type(model).__module__ + "." + type(model).__name__}))
    """
)


def _load_in_fresh_process(
    folder: Path, ids: torch.Tensor, mask: torch.Tensor, workdir: Path
) -> tuple[np.ndarray, str]:
    np.savez(workdir / "inputs.npz", ids=ids.numpy(), mask=mask.numpy())
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", HF_HOME=str(workdir / "hf_home"))
    result = subprocess.run(
        [sys.executable, "-c", CHILD, str(folder), str(workdir / "inputs.npz"), str(workdir / "out.npy")],
        cwd=workdir,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return np.load(workdir / "out.npy"), json.loads(result.stdout.strip().splitlines()[-1])["class"]


@pytest.mark.parametrize("pooling_mode", ["weighted_mean", "latent_attention"])
def test_saved_checkpoint_loads_without_the_package(tmp_path, pooling_mode):
    model = tiny_encoder(pooling_mode=pooling_mode)
    folder = tmp_path / "checkpoint"
    model.save_pretrained(folder)

    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "llama_encoder"
    assert config["is_causal"] is False
    assert config["pooling_mode"] == pooling_mode
    assert config["normalize_embeddings"] is True
    assert config["latent_attention_num_latents"] == TINY_LATENTS["latent_attention_num_latents"]
    assert config["auto_map"] == {
        "AutoConfig": "configuration_llama_encoder.LlamaEncoderConfig",
        "AutoModel": "modeling_llama_encoder.LlamaEncoderModel",
    }
    assert (folder / "modeling_llama_encoder.py").is_file()
    assert (folder / "configuration_llama_encoder.py").is_file()

    ids = torch.randint(3, TINY_LLAMA["vocab_size"], (3, 7))
    mask = torch.tensor([[1] * 7, [1] * 4 + [0] * 3, [0] * 2 + [1] * 5])
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=mask).pooler_output.numpy()
    embeddings, loaded_class = _load_in_fresh_process(folder, ids, mask, tmp_path)
    assert loaded_class.startswith("transformers_modules.") and loaded_class.endswith(".LlamaEncoderModel")
    np.testing.assert_array_equal(embeddings, expected)


def test_hub_files_import_only_torch_transformers_and_each_other():
    package = Path(__file__).resolve().parents[2] / "llama_encoder"
    allowed = {"torch", "transformers", "dataclasses", "__future__"}
    for name in ("modeling_llama_encoder.py", "configuration_llama_encoder.py"):
        for line in (package / name).read_text().splitlines():
            stripped = line.strip()
            if stripped.startswith(("import ", "from ")) and not stripped.startswith("from ."):
                module = stripped.split()[1].split(".")[0]
                assert module in allowed, f"{name} imports {module}"


@pytest.mark.parametrize("source", ["causal_lm", "base_model"])
def test_plain_llama_weights_load_with_only_the_pooling_head_missing(tmp_path, source):
    torch.manual_seed(3)
    llama_config = LlamaConfig(**TINY_LLAMA)
    plain = LlamaForCausalLM(llama_config) if source == "causal_lm" else LlamaModel(llama_config)
    plain.save_pretrained(tmp_path / "plain")

    config = LlamaEncoderConfig(**{**llama_config.to_dict(), "pooling_mode": "latent_attention", **TINY_LATENTS})
    encoder, info = LlamaEncoderModel.from_pretrained(tmp_path / "plain", config=config, output_loading_info=True)
    assert info["unexpected_keys"] in ([], set())
    assert info["mismatched_keys"] in ([], set())
    assert set(info["missing_keys"]) and all(key.startswith("latent_attention.") for key in info["missing_keys"])
    head = encoder.latent_attention
    assert torch.isfinite(head.latents).all() and head.latents.std() > 0  # initialised, not left empty
    torch.testing.assert_close(head.query_norm.weight, torch.ones_like(head.query_norm.weight), rtol=0, atol=0)

    stock = (plain.model if source == "causal_lm" else plain).eval()
    encoder.eval()
    ids = torch.randint(3, TINY_LLAMA["vocab_size"], (2, 7))
    with torch.no_grad():
        expected = stock(input_ids=ids, is_causal=False).last_hidden_state
        got = encoder(input_ids=ids).last_hidden_state
        causal = stock(input_ids=ids).last_hidden_state
    assert_equal_up_to_summation_order(got, expected, terms=encoder_terms(encoder, 7, pooled=False))
    assert (got - causal).abs().max() > 1e-3  # the comparison above is not trivially causal-vs-causal
