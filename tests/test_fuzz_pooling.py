"""Property-based tests over random tiny configs, pooling modes, padding sides, batch compositions and pool masks.

- padding never moves an embedding: a padded row equals the same row run alone, unpadded;
- permuting the batch permutes the output;
- leaving an instruction out of pool_mask equals pooling the row's own (unpadded) token states over the text's
  positions, computed here with plain loops.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from llama_encoder import POOLING_MODES, LlamaEncoderConfig, LlamaEncoderModel
from tests.numeric import assert_equal_up_to_summation_order, encoder_terms

VOCAB = 64
PAD = 0
FUZZ = settings(max_examples=25, deadline=None)  # per pooling mode


@st.composite
def tiny_configs(draw, pooling_mode: str) -> LlamaEncoderConfig:
    heads = draw(st.sampled_from([2, 4]))
    head_dim = draw(st.sampled_from([4, 8, 16]))
    hidden = heads * head_dim
    return LlamaEncoderConfig(
        vocab_size=VOCAB,
        hidden_size=hidden,
        intermediate_size=draw(st.sampled_from([16, 48, 96])),
        num_hidden_layers=draw(st.integers(1, 2)),
        num_attention_heads=heads,
        num_key_value_heads=draw(st.sampled_from([h for h in (1, 2, 4) if heads % h == 0])),
        max_position_embeddings=64,
        rope_theta=draw(st.sampled_from([10_000.0, 500_000.0])),
        pad_token_id=PAD,
        pooling_mode=pooling_mode,
        normalize_embeddings=draw(st.booleans()),
        latent_attention_num_latents=draw(st.sampled_from([1, 4, 16])),
        latent_attention_num_heads=draw(st.sampled_from([h for h in (1, 2, 4) if hidden % h == 0])),
        latent_attention_mlp_dim=draw(st.sampled_from([None, 24])),
        attn_implementation=draw(st.sampled_from(["eager", "sdpa"])),
    )


def build(config: LlamaEncoderConfig, seed: int) -> LlamaEncoderModel:
    torch.manual_seed(seed)
    model = LlamaEncoderModel(config).eval()
    with torch.no_grad():  # larger than the 0.02 init, so states (and any leak through padding) are not tiny
        for param in model.parameters():
            if param.dim() > 1:
                param.normal_(0.0, 0.3)
    return model


@st.composite
def batches(draw) -> dict:
    """Rows of 1 to 10 real tokens, each with an instruction of 0 to length-1 tokens (attended, not pooled)."""
    lengths = draw(st.lists(st.integers(1, 10), min_size=1, max_size=5))
    instructions = [draw(st.integers(0, length - 1)) for length in lengths]
    seed = draw(st.integers(0, 2**16))
    generator = torch.Generator().manual_seed(seed)
    rows = [torch.randint(1, VOCAB, (length,), generator=generator) for length in lengths]
    return {"rows": rows, "instructions": instructions, "side": draw(st.sampled_from(["left", "right"])),
            "seed": seed}


def pad(rows: list[torch.Tensor], instructions: list[int], side: str) -> dict[str, torch.Tensor]:
    width = max(len(row) for row in rows)
    ids = torch.full((len(rows), width), PAD)
    attention = torch.zeros(len(rows), width, dtype=torch.long)
    pool_mask = torch.zeros(len(rows), width, dtype=torch.long)
    for number, (row, skip) in enumerate(zip(rows, instructions, strict=True)):
        start = 0 if side == "right" else width - len(row)
        ids[number, start : start + len(row)] = row
        attention[number, start : start + len(row)] = 1
        pool_mask[number, start + skip : start + len(row)] = 1
    return {"input_ids": ids, "attention_mask": attention, "pool_mask": pool_mask}


def alone(model: LlamaEncoderModel, row: torch.Tensor, skip: int):
    """The row run on its own, unpadded, with the instruction left out of pooling."""
    pool_mask = torch.ones(1, len(row), dtype=torch.long)
    pool_mask[0, :skip] = 0
    return model(input_ids=row[None], pool_mask=pool_mask)


def reference_embedding(model: LlamaEncoderModel, states: torch.Tensor, skip: int) -> torch.Tensor:
    """Pool one row's token states `(seq, hidden)` over positions skip.. with plain loops, in float64."""
    mode = model.config.pooling_mode
    if mode == "latent_attention":
        states = model.latent_attention(states[None])[0]
    vectors = [states[i].double() for i in range(skip, states.shape[0])]
    if mode in ("mean", "latent_attention"):
        pooled = sum(vectors) / len(vectors)
    elif mode == "weighted_mean":
        pooled = sum((k + 1) * v for k, v in enumerate(vectors)) / sum(range(1, len(vectors) + 1))
    elif mode in ("eos", "last_token"):
        pooled = vectors[-1]
    else:  # bos: the first pooled token
        pooled = vectors[0]
    if model.config.normalize_embeddings:
        pooled = pooled / pooled.norm()
    return pooled.float()


MAX_LENGTH = 10  # the longest row batches() draws


def close(got: torch.Tensor, expected: torch.Tensor, model: LlamaEncoderModel, *, pooled: bool = True) -> None:
    """Equal up to the summation order of the model's forward pass (and pooling): other padding, other batch."""
    assert_equal_up_to_summation_order(got, expected, terms=encoder_terms(model, MAX_LENGTH, pooled=pooled))


@pytest.mark.parametrize("pooling_mode", POOLING_MODES)
@FUZZ
@given(data=st.data(), batch=batches())
def test_padding_never_moves_an_embedding(pooling_mode, data, batch):
    model = build(data.draw(tiny_configs(pooling_mode)), batch["seed"])
    inputs = pad(batch["rows"], batch["instructions"], batch["side"])
    with torch.no_grad():
        padded = model(**inputs)
        for number, (row, skip) in enumerate(zip(batch["rows"], batch["instructions"], strict=True)):
            single = alone(model, row, skip)
            real = inputs["attention_mask"][number].bool()
            close(padded.last_hidden_state[number][real], single.last_hidden_state[0], model, pooled=False)
            close(padded.pooler_output[number], single.pooler_output[0], model)


@pytest.mark.parametrize("pooling_mode", POOLING_MODES)
@FUZZ
@given(data=st.data(), batch=batches())
def test_permuting_the_batch_permutes_the_output(pooling_mode, data, batch):
    model = build(data.draw(tiny_configs(pooling_mode)), batch["seed"])
    order = data.draw(st.permutations(range(len(batch["rows"]))))
    inputs = pad(batch["rows"], batch["instructions"], batch["side"])
    shuffled = pad([batch["rows"][i] for i in order], [batch["instructions"][i] for i in order], batch["side"])
    with torch.no_grad():
        close(model(**shuffled).pooler_output, model(**inputs).pooler_output[list(order)], model)


@pytest.mark.parametrize("pooling_mode", POOLING_MODES)
@FUZZ
@given(data=st.data(), batch=batches())
def test_instruction_left_out_of_pool_mask_equals_pooling_the_text_positions(pooling_mode, data, batch):
    model = build(data.draw(tiny_configs(pooling_mode)), batch["seed"])
    inputs = pad(batch["rows"], batch["instructions"], batch["side"])
    with torch.no_grad():
        pooled = model(**inputs).pooler_output
        for number, (row, skip) in enumerate(zip(batch["rows"], batch["instructions"], strict=True)):
            states = model(input_ids=row[None]).last_hidden_state[0]  # the instruction attended: every token
            close(pooled[number], reference_embedding(model, states, skip), model)
