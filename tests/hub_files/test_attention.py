"""Bidirectional attention on every backend, padding on either side, batch size 1 included."""

from __future__ import annotations

import concurrent.futures

import pytest
import torch
from transformers import LlamaConfig, LlamaModel

from tests.numeric import assert_equal_up_to_summation_order, encoder_terms
from tests.tiny import TINY_LLAMA, tiny_encoder

BACKENDS = ["eager", "sdpa", "flex_attention"]
SEQ_LEN = 9


@pytest.fixture(autouse=True)
def _fresh_compile_cache():
    """transformers compiles flex attention; after several shapes dynamo recompiles with dynamic shapes, and
    torch 2.13's CPU inductor emits C++ that does not compile for those. Static shapes per test avoid it."""
    torch._dynamo.reset()
    yield


def _right_padded(lengths: list[int], seq_len: int = SEQ_LEN, seed: int = 7) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, TINY_LLAMA["vocab_size"], (len(lengths), seq_len), generator=generator)
    mask = torch.zeros(len(lengths), seq_len, dtype=torch.long)
    for row, length in enumerate(lengths):
        mask[row, :length] = 1
        ids[row, length:] = TINY_LLAMA["pad_token_id"]
    return ids, mask


def _to_left_padding(ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Move each row's real tokens to the end of the row."""
    left_ids, left_mask = torch.full_like(ids, TINY_LLAMA["pad_token_id"]), torch.zeros_like(mask)
    for row in range(ids.shape[0]):
        length = int(mask[row].sum())
        left_ids[row, ids.shape[1] - length :] = ids[row, :length]
        left_mask[row, ids.shape[1] - length :] = 1
    return left_ids, left_mask


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("lengths", [[SEQ_LEN], [SEQ_LEN, SEQ_LEN], [6, SEQ_LEN], [6]], ids=str)
@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_last_token_changes_first_token_state(backend, lengths, padding_side):
    model = tiny_encoder(attn_implementation=backend)
    ids, mask = _right_padded(lengths)
    if padding_side == "left":
        ids, mask = _to_left_padding(ids, mask)
    changed = ids.clone()
    for row in range(ids.shape[0]):
        real = mask[row].nonzero().flatten()
        changed[row, real[-1]] = (ids[row, real[-1]] + 1 - 3) % (TINY_LLAMA["vocab_size"] - 3) + 3
    with torch.no_grad():  # flex attention has no CPU backward
        before = model(input_ids=ids, attention_mask=mask).last_hidden_state
        after = model(input_ids=changed, attention_mask=mask).last_hidden_state
    for row in range(ids.shape[0]):
        first = mask[row].nonzero()[0, 0]
        assert (before[row, first] - after[row, first]).abs().max() > 1e-3


@pytest.mark.parametrize("backend", ["eager", "sdpa"])
def test_stock_causal_llama_does_not_see_the_future(backend):
    encoder = tiny_encoder(attn_implementation=backend)
    stock = LlamaModel(LlamaConfig(**TINY_LLAMA, attn_implementation=backend)).eval()
    missing, unexpected = stock.load_state_dict(encoder.state_dict(), strict=False)
    assert not missing and not unexpected
    ids, mask = _right_padded([SEQ_LEN])
    changed = ids.clone()
    changed[0, -1] = (ids[0, -1] + 1 - 3) % (TINY_LLAMA["vocab_size"] - 3) + 3
    with torch.no_grad():
        causal_delta = (stock(input_ids=ids).last_hidden_state - stock(input_ids=changed).last_hidden_state)[0, 0]
        encoder_delta = (encoder(input_ids=ids).last_hidden_state - encoder(input_ids=changed).last_hidden_state)[0, 0]
    assert causal_delta.abs().max() == 0
    assert encoder_delta.abs().max() > 1e-3


def test_eager_and_sdpa_agree_on_a_padded_batch():
    ids, mask = _right_padded([SEQ_LEN, 5, 2])
    eager = tiny_encoder(attn_implementation="eager")
    sdpa = tiny_encoder(attn_implementation="sdpa")
    with torch.no_grad():
        out_eager = eager(input_ids=ids, attention_mask=mask)
        out_sdpa = sdpa(input_ids=ids, attention_mask=mask)
    real = mask.bool()
    # the same arithmetic in another order (eager's matmul + softmax vs sdpa's fused kernel)
    assert_equal_up_to_summation_order(out_sdpa.last_hidden_state[real], out_eager.last_hidden_state[real],
                                       terms=encoder_terms(eager, SEQ_LEN, pooled=False), what="states")
    assert_equal_up_to_summation_order(out_sdpa.pooler_output, out_eager.pooler_output,
                                       terms=encoder_terms(eager, SEQ_LEN), what="pooler_output")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("pooling_mode", ["mean", "weighted_mean", "eos", "bos", "latent_attention"])
def test_left_and_right_padding_agree(backend, pooling_mode):
    model = tiny_encoder(attn_implementation=backend, pooling_mode=pooling_mode)
    right_ids, right_mask = _right_padded([SEQ_LEN, 6, 3])
    left_ids, left_mask = _to_left_padding(right_ids, right_mask)
    with torch.no_grad():
        right = model(input_ids=right_ids, attention_mask=right_mask)
        left = model(input_ids=left_ids, attention_mask=left_mask)
    assert_equal_up_to_summation_order(left.last_hidden_state[left_mask.bool()],
                                       right.last_hidden_state[right_mask.bool()],
                                       terms=encoder_terms(model, SEQ_LEN, pooled=False), what="states")
    assert_equal_up_to_summation_order(left.pooler_output, right.pooler_output,
                                       terms=encoder_terms(model, SEQ_LEN), what="pooler_output")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_padded_batch_equals_each_sequence_alone(backend, padding_side):
    model = tiny_encoder(attn_implementation=backend, pooling_mode="weighted_mean")
    ids, mask = _right_padded([SEQ_LEN, 5, 1])
    if padding_side == "left":
        ids, mask = _to_left_padding(ids, mask)
    with torch.no_grad():
        batch = model(input_ids=ids, attention_mask=mask)
        for row in range(ids.shape[0]):
            real = mask[row].bool()
            alone = model(input_ids=ids[row][real][None])
            assert_equal_up_to_summation_order(batch.last_hidden_state[row][real], alone.last_hidden_state[0],
                                               terms=encoder_terms(model, SEQ_LEN, pooled=False),
                                               what=f"row {row} states")
            assert_equal_up_to_summation_order(batch.pooler_output[row], alone.pooler_output[0],
                                               terms=encoder_terms(model, SEQ_LEN), what=f"row {row} pooled")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("padding_side", ["right", "left"])
@pytest.mark.parametrize("pooling_mode", ["mean", "eos", "bos", "latent_attention"])
def test_a_row_of_padding_only_embeds_as_zero_and_changes_no_other_row(backend, padding_side, pooling_mode):
    """A blank text tokenised to nothing (no BOS) is a row of padding only: every backend, the stock layers (autograd
    on) and the fast path alike, gives it the zero vector and finite states, and the other rows what they are
    without it. A batch of such rows only, of no column at all, gives zeros too."""
    model = tiny_encoder(attn_implementation=backend, pooling_mode=pooling_mode)
    ids, mask = _right_padded([SEQ_LEN, 0, 4, 0])
    if padding_side == "left":
        ids, mask = _to_left_padding(ids, mask)
    real = [0, 2]
    for grad in (False, True) if backend != "flex_attention" else (False,):  # flex has no CPU backward
        with torch.set_grad_enabled(grad):
            out = model(input_ids=ids, attention_mask=mask)
            torch._dynamo.reset()  # flex: a second shape would recompile with dynamic shapes (see the fixture)
            without = model(input_ids=ids[real], attention_mask=mask[real])
        assert torch.isfinite(out.last_hidden_state).all() and torch.isfinite(out.pooler_output).all()
        assert torch.equal(out.pooler_output[[1, 3]], torch.zeros(2, model.config.hidden_size))
        assert_equal_up_to_summation_order(out.pooler_output[real], without.pooler_output,
                                           terms=encoder_terms(model, SEQ_LEN), what=f"pooled, autograd {grad}")
        empty = model(input_ids=ids[:, :0], attention_mask=mask[:, :0])
        assert torch.equal(empty.pooler_output, torch.zeros(4, model.config.hidden_size))
        assert empty.last_hidden_state.shape == (4, 0, model.config.hidden_size)


def test_caller_cannot_make_it_causal():
    model = tiny_encoder(attn_implementation="sdpa")
    ids, _ = _right_padded([SEQ_LEN])
    with torch.no_grad():
        plain = model(input_ids=ids).last_hidden_state
        asked_causal = model(input_ids=ids, is_causal=True).last_hidden_state
    torch.testing.assert_close(plain, asked_causal, atol=0, rtol=0)


def test_threads_sharing_one_model_get_sequential_results():
    model = tiny_encoder(attn_implementation="sdpa")
    batches = [_right_padded([SEQ_LEN, 1 + seed % SEQ_LEN], seed=seed) for seed in range(12)]
    with torch.no_grad():
        sequential = [model(input_ids=ids, attention_mask=mask).pooler_output for ids, mask in batches]

        def encode(batch):
            with torch.no_grad():  # grad mode is per thread: each thread sets its own, as Encoder.encode does
                return model(input_ids=batch[0], attention_mask=batch[1]).pooler_output

        with concurrent.futures.ThreadPoolExecutor(max_workers=4) as pool:
            threaded = list(pool.map(encode, batches))
    for expected, got in zip(sequential, threaded, strict=True):
        torch.testing.assert_close(expected, got, atol=0, rtol=0)
