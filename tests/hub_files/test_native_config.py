"""A native checkpoint's config (`model_type: llama`, `is_causal: false`) on every transformers version CI runs:
`trust_remote_code=True` gives `LlamaEncoderModel`, equal to the model it was written from; stock `AutoModel` is
bidirectional from transformers 5.2 and causal before (the model card's claim, tested rather than assumed)."""

from __future__ import annotations

import json
import logging

import pytest
import torch
import transformers
from packaging.version import Version
from transformers import AutoConfig, AutoModel, LlamaModel

from llama_encoder.conversion_scripts.layout import native_config_dict
from tests.hub_files.test_hub_loading import _load_in_fresh_process
from tests.numeric import assert_equal_up_to_summation_order, encoder_terms
from tests.tiny import TINY_LLAMA, tiny_encoder

HONOURS_IS_CAUSAL = Version(transformers.__version__) >= Version("5.2")


def _native_folder(tmp_path, pooling_mode: str):
    model = tiny_encoder(pooling_mode=pooling_mode).eval()
    folder = tmp_path / "native"
    model.save_pretrained(folder)
    config = native_config_dict(model.config)
    config["dtype"] = "float32"
    (folder / "config.json").write_text(json.dumps(config), encoding="utf-8")
    return model, folder


@pytest.mark.parametrize("pooling_mode", ["mean", "last_token"])
def test_native_config_loads_the_checkpoint_code_with_trust_remote_code(tmp_path, pooling_mode):
    model, folder = _native_folder(tmp_path, pooling_mode)
    ids = torch.randint(3, TINY_LLAMA["vocab_size"], (3, 7))
    mask = torch.tensor([[1] * 7, [1] * 4 + [0] * 3, [1] * 6 + [0]])
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=mask).pooler_output
    embeddings, loaded_class = _load_in_fresh_process(folder, ids, mask, tmp_path)
    assert loaded_class.startswith("transformers_modules.") and loaded_class.endswith(".LlamaEncoderModel")
    assert torch.equal(torch.from_numpy(embeddings), expected)


def test_the_config_class_reads_a_native_config_without_a_model_type_warning(tmp_path, caplog):
    _, folder = _native_folder(tmp_path, "mean")
    with caplog.at_level(logging.WARNING):
        config = AutoConfig.from_pretrained(folder, trust_remote_code=True)
    assert type(config).__name__ == "LlamaEncoderConfig" and config.pooling_mode == "mean"
    assert not [record for record in caplog.records if "to instantiate a model of type" in record.getMessage()]


def test_stock_automodel_is_bidirectional_exactly_where_transformers_honours_is_causal(tmp_path):
    model, folder = _native_folder(tmp_path, "mean")
    stock = AutoModel.from_pretrained(folder).eval()
    assert type(stock) is LlamaModel
    ids = torch.randint(3, TINY_LLAMA["vocab_size"], (1, 7))
    changed = ids.clone()
    changed[0, -1] = (ids[0, -1] + 1 - 3) % (TINY_LLAMA["vocab_size"] - 3) + 3
    with torch.no_grad():
        states = stock(input_ids=ids).last_hidden_state
        first_after_change = stock(input_ids=changed).last_hidden_state[0, 0]
        ours = model(input_ids=ids).last_hidden_state
    # Causal attention: the first token cannot see the last, so changing the last leaves it bit for bit unchanged.
    sees_the_future = not torch.equal(states[0, 0], first_after_change)
    if HONOURS_IS_CAUSAL:
        assert sees_the_future
        assert_equal_up_to_summation_order(states, ours, terms=encoder_terms(model, 7, pooled=False))
    else:  # transformers < 5.2 ignores is_causal: false: what the card's "unsupported" row says
        assert not sees_the_future
        assert (states - ours).abs().max() > 1e-3
