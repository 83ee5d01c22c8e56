"""tokenize_for_encoder: the prompt is attended to, not pooled; EOS survives truncation; padding either side; a blank
text pools nothing."""

from __future__ import annotations

import logging

import pytest

from llama_encoder.modeling_llama_encoder import is_blank, pad_for_encoder, tokenize_for_encoder
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


BLANKS = ["", " ", "  \n\t", "\u3000\u00a0"]  # empty, space, newline and tab, ideographic and no-break spaces


@pytest.mark.parametrize("padding_side", ["right", "left"])
@pytest.mark.parametrize("append_eos", [False, True])
@pytest.mark.parametrize("prompt", ["", PROMPT])
def test_a_blank_text_pools_nothing_and_the_others_are_untouched(tokenizer, padding_side, append_eos, prompt, caplog):
    """Whatever tokens a blank text's row holds (BOS, the prompt's, whitespace, an appended EOS), none is pooled;
    the other rows are what they are without the blanks in the batch, and one warning counts the blanks."""
    tokenizer.padding_side = padding_side
    mixed = [TEXTS[0], *BLANKS, TEXTS[1]]
    with caplog.at_level(logging.WARNING):
        batch = tokenize_for_encoder(tokenizer, mixed, prompt, append_eos=append_eos, padding=False,
                                     return_tensors=None)
    assert [r.getMessage() for r in caplog.records] == [
        f"{len(BLANKS)} of {len(mixed)} inputs are empty or blank; each gets the zero vector as its embedding."]
    assert all(is_blank(text) for text in BLANKS) and not any(is_blank(text) for text in TEXTS + ["\u200b"])
    alone = tokenize_for_encoder(tokenizer, TEXTS, prompt, append_eos=append_eos, padding=False, return_tensors=None)
    for key in ("input_ids", "pool_mask"):
        assert [batch[key][0], batch[key][-1]] == alone[key], key
    for row in range(1, 1 + len(BLANKS)):
        assert batch["input_ids"][row] == tokenizer(prompt + mixed[row])["input_ids"] + [tokenizer.eos_token_id] * (
            append_eos)
        assert len(batch["input_ids"][row]) >= 1 and not any(batch["pool_mask"][row])


def test_blank_texts_with_no_token_still_make_a_batch(tokenizer):
    """With a tokenizer that adds no BOS (SmolLM2's), "" has no token at all: a batch of such rows is one padding
    column wide (decoder layers cannot reshape an empty sequence), attends to nothing real and pools nothing."""
    no_bos = tiny_bpe_tokenizer([PROMPT + text for text in TEXTS] + TEXTS, add_bos=False)
    no_bos.pad_token = "<|pad|>"
    assert no_bos("")["input_ids"] == []
    for side in ("right", "left"):
        no_bos.padding_side = side
        batch = tokenize_for_encoder(no_bos, ["", ""])
        assert batch["input_ids"].tolist() == [[no_bos.pad_token_id]] * 2
        assert batch["attention_mask"].tolist() == batch["pool_mask"].tolist() == [[0], [0]]
        mixed = tokenize_for_encoder(no_bos, ["", TEXTS[0]], return_tensors=None)
        assert sum(mixed["attention_mask"][0]) == 0 and mixed["pool_mask"][1] == mixed["attention_mask"][1]


def test_a_text_its_prompt_leaves_no_token_is_refused_before_any_work(tokenizer):
    tokenizer.padding_side = "right"
    prompt_tokens = len(tokenizer(PROMPT)["input_ids"])
    with pytest.raises(ValueError, match=rf"Input 1 \('where is the cat\?'\) has no token to pool: its prompt fills "
                                         rf"max_length \({prompt_tokens - 1} tokens\)"):
        tokenize_for_encoder(tokenizer, ["", TEXTS[0]], PROMPT, max_length=prompt_tokens - 1)
    for append_eos in (False, True):  # an appended EOS is no token of the text
        with pytest.raises(ValueError, match="Input 0 .* has no token to pool"):
            tokenize_for_encoder(tokenizer, TEXTS, PROMPT, max_length=prompt_tokens - 1 + append_eos,
                                 append_eos=append_eos)
