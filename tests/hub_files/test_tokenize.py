"""tokenize_for_encoder: the prompt is attended to, not pooled; EOS survives truncation; padding either side."""

from __future__ import annotations

import logging

import pytest

from llama_encoder.modeling_llama_encoder import pad_for_encoder, tokenize_for_encoder
from tests.tiny import tiny_bpe_tokenizer

PROMPT = "Instruct: Find the animal\nQuery: "
TEXTS = ["where is the cat?", "a dog ran in the park today"]


@pytest.fixture(scope="module")
def tokenizer():
    tokenizer = tiny_bpe_tokenizer([PROMPT + text for text in TEXTS] + TEXTS)
    tokenizer.pad_token = "<|pad|>"
    return tokenizer


def _text_start(tokenizer, prompt: str, text: str) -> int:
    """Index of the first token of `text` in the joint tokenisation, found by decoding growing prefixes."""
    ids = tokenizer(prompt + text)["input_ids"]
    for index in range(len(ids)):
        if len(tokenizer.decode(ids[: index + 1], skip_special_tokens=True)) > len(prompt):
            return index
    raise AssertionError("text not found")


@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_prompt_tokens_are_attended_but_not_pooled(tokenizer, padding_side):
    tokenizer.padding_side = padding_side
    batch = tokenize_for_encoder(tokenizer, TEXTS, PROMPT, return_tensors=None)
    for row, text in enumerate(TEXTS):
        ids = tokenizer(PROMPT + text)["input_ids"]
        attention, pooled = batch["attention_mask"][row], batch["pool_mask"][row]
        real = [i for i, keep in enumerate(attention) if keep]
        assert [batch["input_ids"][row][i] for i in real] == ids  # the model sees prompt + text, joined
        start = _text_start(tokenizer, PROMPT, text)
        assert [pooled[i] for i in real] == [0] * start + [1] * (len(ids) - start)
        assert all(pooled[i] == 0 for i, keep in enumerate(attention) if not keep)
    # The lone-space pitfall: the prompt on its own has one token more than the prompt part of the joint row.
    assert len(tokenizer(PROMPT)["input_ids"]) == _text_start(tokenizer, PROMPT, TEXTS[0]) + 1


def test_without_prompt_every_real_token_is_pooled(tokenizer):
    tokenizer.padding_side = "right"
    batch = tokenize_for_encoder(tokenizer, TEXTS, return_tensors=None)
    assert batch["pool_mask"] == batch["attention_mask"]


def test_eos_is_appended_and_survives_truncation(tokenizer, caplog):
    tokenizer.padding_side = "right"
    with caplog.at_level(logging.WARNING):
        batch = tokenize_for_encoder(tokenizer, TEXTS, max_length=6, append_eos=True, return_tensors=None)
    assert batch.num_truncated == 2
    assert [r.getMessage() for r in caplog.records if "truncated" in r.getMessage()] == [
        "2 of 2 inputs were longer than 6 tokens and were truncated."
    ]
    for row in batch["input_ids"]:
        assert len(row) == 6 and row[-1] == tokenizer.eos_token_id
    full = tokenize_for_encoder(tokenizer, TEXTS[:1], append_eos=True, return_tensors=None)
    assert full.num_truncated == 0 and full["input_ids"][0][-1] == tokenizer.eos_token_id
    assert full["input_ids"][0][:-1] == tokenizer(TEXTS[0])["input_ids"]


def test_tokenise_once_then_pad_equals_padded_tokenisation(tokenizer):
    for side in ("left", "right"):
        tokenizer.padding_side = side
        padded = tokenize_for_encoder(tokenizer, TEXTS, [PROMPT, ""], return_tensors=None)
        rows = tokenize_for_encoder(tokenizer, TEXTS, [PROMPT, ""], padding=False, return_tensors=None)
        assert [len(r) for r in rows["input_ids"]] == [sum(m) for m in padded["attention_mask"]]
        again = pad_for_encoder(rows["input_ids"], rows["pool_mask"], pad_token_id=tokenizer.pad_token_id,
                                padding_side=side, return_tensors=None)
        assert dict(again) == dict(padded)


def test_bad_arguments_are_refused(tokenizer):
    with pytest.raises(ValueError, match="one prompt, or one per text"):
        tokenize_for_encoder(tokenizer, TEXTS, [PROMPT])
    with pytest.raises(ValueError, match="leaves no room"):
        tokenize_for_encoder(tokenizer, TEXTS, max_length=1, append_eos=True)
    with pytest.raises(ValueError, match="padding_side"):
        pad_for_encoder([[1]], [[1]], pad_token_id=0, padding_side="middle")
