"""The encode API: input order, token-budget batching, instructions, agreement with SentenceTransformer."""

from __future__ import annotations

import logging
import random

import numpy as np
import pytest
import torch
from sentence_transformers import SentenceTransformer

from llama_encoder.encoding import Encoder, length_sorted_batches
from llama_encoder.modeling_llama_encoder import tokenize_for_encoder
from tests.numeric import assert_equal_up_to_summation_order, encoder_terms

TEXTS = [
    "The cat sat on the mat.",
    "A dog ran in the park today, fast and far, with the cat behind it.",
    "Plants make sugar from light.",
    "cat",
    "Where is the dog? The dog ran in the park and sat on the mat.",
    "light",
    "The cat and the dog sat on the mat in the park.",
]
INSTRUCTION = "Find the animal"


@pytest.fixture(scope="module")
def encoder(tiny_checkpoint) -> Encoder:
    return Encoder.from_pretrained(tiny_checkpoint, device="cpu", dtype="float32")


def _same(got, expected, encoder: Encoder, what: str = "") -> None:
    """Equal up to the summation order of the forward pass and pooling over the longest input here (with the
    instruction prompt): batching, padding and length-sorting reorder the sums and change nothing else."""
    longest = max(len(encoder.tokenizer(f"Instruct: {INSTRUCTION}\nQuery:\n{text}")["input_ids"]) for text in TEXTS)
    assert_equal_up_to_summation_order(got, expected, terms=encoder_terms(encoder.model, longest), what=what)


def _one_at_a_time(encoder: Encoder, texts, prompt: str = "") -> np.ndarray:
    """Each text alone through tokenize_for_encoder + forward: nothing batched, nothing padded."""
    rows = []
    for text in texts:
        batch = tokenize_for_encoder(encoder.tokenizer, [text], prompt)
        with torch.no_grad():
            rows.append(encoder.model(**batch).pooler_output[0].numpy())
    return np.stack(rows)


@pytest.mark.parametrize("batch_tokens", [1, 20, 64, 100_000])
def test_token_budget_batching_equals_one_at_a_time(encoder, batch_tokens):
    got = encoder.encode(TEXTS, batch_tokens=batch_tokens, show_progress=False)
    assert got.dtype == np.float32 and got.shape == (len(TEXTS), encoder.dimension)
    _same(got, _one_at_a_time(encoder, TEXTS), encoder)


def test_order_is_preserved_whatever_the_input_order(encoder):
    reference = dict(zip(TEXTS, encoder.encode(TEXTS, batch_tokens=1), strict=True))
    shuffled = TEXTS[:]
    random.Random(3).shuffle(shuffled)
    for text, embedding in zip(shuffled, encoder.encode(shuffled, batch_tokens=40), strict=True):
        _same(embedding, reference[text], encoder, text)


@pytest.mark.parametrize(("budget", "rows", "padding"), [(14, 3, 0.9), (40, 8, 0.25), (1000, 100, 0.5), (1, 1, 0.0)])
def test_length_sorted_batches_respect_budget_rows_and_padding(budget, rows, padding):
    lengths = [5, 1, 9, 3, 3, 7, 2, 12, 8, 8, 11, 4]
    batches = length_sorted_batches(lengths, batch_tokens=budget, max_batch_size=rows, max_padding=padding)
    assert sorted(i for batch in batches for i in batch) == list(range(len(lengths)))
    for batch in batches:
        longest = max(lengths[i] for i in batch)
        assert len(batch) <= rows and (len(batch) * longest <= budget or len(batch) == 1)
        assert all(lengths[i] >= (1 - padding) * longest for i in batch)
    flat = [lengths[i] for batch in batches for i in batch]
    assert flat == sorted(lengths, reverse=True)
    assert length_sorted_batches([1024, 512, 16], batch_tokens=10**6, max_batch_size=10) == [[0], [1], [2]]


def test_instruction_pairs_equal_the_template_prompt_and_are_not_pooled(encoder):
    prompt = f"Instruct: {INSTRUCTION}\nQuery:\n"  # the checkpoint's template (the package's)
    pairs = encoder.encode([(INSTRUCTION, t) for t in TEXTS[:3]])
    _same(pairs, encoder.encode(TEXTS[:3], prompt=prompt), encoder, "prompt")
    _same(pairs, encoder.encode(TEXTS[:3], instruction=INSTRUCTION), encoder, "instruction")
    _same(pairs, _one_at_a_time(encoder, TEXTS[:3], prompt), encoder, "one at a time")
    plain = encoder.encode(TEXTS[:3])
    assert np.abs(pairs - plain).max() > 1e-3  # attended: the instruction changes the text's states


def test_a_batch_mixing_pairs_and_texts_equals_each_group_alone(encoder):
    mixed = [TEXTS[0], (INSTRUCTION, TEXTS[1]), TEXTS[2], (INSTRUCTION, TEXTS[3])]
    got = encoder.encode(mixed)
    _same(got[[0, 2]], encoder.encode([TEXTS[0], TEXTS[2]]), encoder, "texts")
    _same(got[[1, 3]], encoder.encode([TEXTS[1], TEXTS[3]], instruction=INSTRUCTION), encoder, "pairs")


def test_sentence_transformers_and_encode_agree(encoder, tiny_checkpoint):
    st = SentenceTransformer(str(tiny_checkpoint), trust_remote_code=True, device="cpu")
    _same(st.encode(TEXTS), encoder.encode(TEXTS), encoder, "documents")
    _same(st.encode(TEXTS, prompt_name="query"), encoder.encode_queries(TEXTS), encoder, "queries")
    np.testing.assert_allclose(encoder.encode(TEXTS, prompt_name="query"), encoder.encode_queries(TEXTS), atol=0)


def test_bfloat16_is_close_to_float32(tiny_checkpoint, encoder):
    # allow_slow_dtype: on a CPU without native bfloat16 this tiny model is still quick in emulated bfloat16
    bf16 = Encoder.from_pretrained(tiny_checkpoint, device="cpu", dtype="bfloat16", allow_slow_dtype=True)
    assert bf16.model.dtype == torch.bfloat16
    a, b = encoder.encode(TEXTS), bf16.encode(TEXTS)
    assert b.dtype == np.float32
    # Not a reordering but a rounding to bfloat16 (eps 2**-7) at every step the activations take: per layer two
    # RMSNorms, q/k/v, attention, o_proj, gate, up, their product, down and two residual sums (12), then the final
    # norm, the pooling and the normalisation; each moves the result by at most eps of the tensor's scale.
    roundings = 12 * encoder.model.config.num_hidden_layers + 3
    assert_equal_up_to_summation_order(b, a, terms=roundings, dtype=torch.bfloat16, what="bfloat16 vs float32")


def test_truncation_warns_once_with_the_count(encoder, caplog):
    with caplog.at_level(logging.WARNING):
        encoder.encode(TEXTS, max_length=6, batch_tokens=1)
    messages = [r.getMessage() for r in caplog.records if "truncated" in r.getMessage()]
    long_ones = sum(len(encoder.tokenizer(t)["input_ids"]) > 6 for t in TEXTS)
    assert messages == [f"{long_ones} of {len(TEXTS)} inputs were longer than 6 tokens and were truncated."]


def test_outputs_and_empty_input(encoder):
    as_torch = encoder.encode(TEXTS[:2], convert_to="torch")
    assert isinstance(as_torch, torch.Tensor) and as_torch.dtype == torch.float32
    np.testing.assert_allclose(as_torch.numpy(), encoder.encode(TEXTS[:2]), atol=0)
    assert_equal_up_to_summation_order(np.linalg.norm(as_torch.numpy(), axis=1), np.ones(2),
                                       terms=2 * (encoder.dimension + 2), dtype=torch.float32, what="unit norm")
    assert encoder.encode([]).shape == (0, encoder.dimension)


def test_bad_inputs_get_clear_errors(encoder):
    with pytest.raises(ValueError, match="Input 1 is a NoneType"):
        encoder.encode(["ok", None])
    with pytest.raises(ValueError, match="Input 0 is a int"):
        encoder.encode([3])
    with pytest.raises(ValueError, match="list of texts"):
        encoder.encode("one text")
    with pytest.raises(ValueError, match="No prompt named 'nope'"):
        encoder.encode(TEXTS, prompt_name="nope")
    with pytest.raises(ValueError, match="at most one of"):
        encoder.encode(TEXTS, prompt="a", instruction="b")
    with pytest.raises(ValueError, match="convert_to"):
        encoder.encode(TEXTS, convert_to="list")
    with pytest.raises(ValueError, match="unnormalised ones are not available"):
        encoder.encode(TEXTS, normalize=False)
    with pytest.raises(ValueError, match="no token to pool"):
        encoder.encode(["fine"], prompt="Instruct: x\nQuery: ", max_length=2)  # the prompt fills max_length


def test_from_pretrained_refuses_a_plain_llama(tmp_path):
    from tests.tiny import save_tiny_base

    with pytest.raises(ValueError, match="not a llama_encoder checkpoint"):
        Encoder.from_pretrained(save_tiny_base(tmp_path))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        Encoder.from_pretrained(tmp_path / "empty")
