"""The training objectives checked against independent computations on hand-built batches."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from llama_encoder.modeling_llama_encoder import tokenize_for_encoder
from llama_encoder.training.data import ScoredPair, Triple
from llama_encoder.training.distributed import Distributed
from llama_encoder.training.objectives import (
    IGNORE_INDEX,
    MNTP,
    SimCSE,
    Supervised,
    cosent_loss,
    info_nce_losses,
    mask_tokens,
    mntp_token_losses,
)
from tests.numeric import assert_equal_up_to_summation_order, encoder_terms
from tests.tiny import TINY_CORPUS, tiny_bpe_tokenizer, tiny_encoder

MASK_ID = 3


def _tokenizer():
    tokenizer = tiny_bpe_tokenizer(TINY_CORPUS)
    tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def test_masking_rates_follow_80_10_10():
    rows, width, vocab = 64, 256, 1000
    ids = torch.randint(10, vocab, (rows, width))
    maskable = torch.ones(rows, width, dtype=torch.bool)
    maskable[:, 0] = False
    masked, labels = mask_tokens(ids, torch.ones_like(ids), maskable, mask_token_id=MASK_ID, vocab_size=vocab,
                                 probability=0.2, seeds=list(range(rows)))
    picked = labels != IGNORE_INDEX
    n = int(picked.sum())
    assert abs(n / int(maskable.sum()) - 0.2) < 0.01
    assert torch.equal(labels[picked], ids[picked])
    assert not picked[:, 0].any()
    as_mask = (masked == MASK_ID) & picked
    unchanged = (masked == ids) & picked
    changed_randomly = picked & ~as_mask & ~unchanged
    assert abs(int(as_mask.sum()) / n - 0.8) < 0.02
    assert abs(int(unchanged.sum()) / n - 0.1) < 0.02
    assert abs(int(changed_randomly.sum()) / n - 0.1) < 0.02
    assert torch.equal(masked[~picked], ids[~picked])  # nothing else is touched


def test_masking_depends_only_on_the_example_seed():
    ids = torch.randint(10, 500, (3, 40))
    attention = torch.ones_like(ids)
    attention[1, 30:] = 0  # row 1 has 30 real tokens, padded on the right
    maskable = attention.bool()
    first = mask_tokens(ids, attention, maskable, mask_token_id=MASK_ID, vocab_size=500, probability=0.3,
                        seeds=[7, 8, 9])
    # the same example (seed 8) alone, unpadded, or padded on the left, is masked the same way
    alone = mask_tokens(ids[1:2, :30], attention[1:2, :30], maskable[1:2, :30], mask_token_id=MASK_ID,
                        vocab_size=500, probability=0.3, seeds=[8])
    assert torch.equal(first[0][1, :30], alone[0][0]) and torch.equal(first[1][1, :30], alone[1][0])
    left = torch.cat([torch.zeros(1, 5, dtype=torch.long), ids[1:2, :30]], dim=1)
    left_attention = (left != 0).long()
    left_attention[0, 5:] = 1
    shifted = mask_tokens(left, left_attention, left_attention.bool(), mask_token_id=MASK_ID, vocab_size=500,
                          probability=0.3, seeds=[8])
    assert torch.equal(shifted[1][0, 5:], alone[1][0])
    other = mask_tokens(ids, attention, maskable, mask_token_id=MASK_ID, vocab_size=500, probability=0.3,
                        seeds=[1, 2, 3])
    assert not torch.equal(first[1], other[1])


def test_mntp_collate_never_masks_specials_padding_or_the_first_token():
    tokenizer = _tokenizer()
    objective = MNTP(tokenizer=tokenizer, lm_head=None, mask_token_id=MASK_ID, max_length=64, probability=0.9)
    texts = ["The cat sat on the mat.", "A dog ran.", "Plants make sugar from light in the park."] * 4
    batch = objective.collate(texts, list(range(len(texts))), epoch=0)
    picked = batch["labels"] != IGNORE_INDEX
    special = torch.isin(tokenizer(texts, padding=True, return_tensors="pt")["input_ids"],
                         torch.tensor(tokenizer.all_special_ids))
    assert picked.any()
    assert not (picked & special).any()
    assert not (picked & (batch["attention_mask"] == 0)).any()
    first_real = batch["attention_mask"].argmax(dim=1)
    assert not picked[torch.arange(len(texts)), first_real].any()
    # every label position whose input became the mask token no longer shows the label there
    shows_mask = picked & (batch["input_ids"] == MASK_ID)
    assert (batch["labels"][shows_mask] != MASK_ID).all()


def test_mntp_predicts_token_i_from_the_state_at_i_minus_1():
    vocab = 12
    lm_head = torch.nn.Linear(vocab, vocab, bias=False).requires_grad_(False)
    with torch.no_grad():
        lm_head.weight.copy_(torch.eye(vocab))
    labels = torch.full((2, 6), IGNORE_INDEX)
    labels[0, 2], labels[0, 5], labels[1, 1] = 4, 7, 9
    hidden = torch.randn(2, 6, vocab)
    losses = mntp_token_losses(hidden, labels, lm_head)
    expected = []
    for b, i in [(0, 2), (0, 5), (1, 1)]:  # row-major order, as nonzero returns them
        logits = hidden[b, i - 1].double()
        expected.append(float(torch.logsumexp(logits, 0) - logits[labels[b, i]]))
    # float32: the LM head's sums (vocab terms), then log-sum-exp over the vocabulary (vocab terms, max, log, minus)
    assert_equal_up_to_summation_order(losses, expected, terms=2 * vocab + 4)
    # states that point at the label one position earlier give a near-zero loss (exactly 11 exp(-30), 1e-12; float32
    # log-sum-exp of values of size 30 rounds within the same count of eps x 30); at the label's own position, not
    aligned = torch.zeros(2, 6, vocab)
    for b, i in [(0, 2), (0, 5), (1, 1)]:
        aligned[b, i - 1, labels[b, i]] = 30.0
    assert_equal_up_to_summation_order(mntp_token_losses(aligned, labels, lm_head), torch.zeros(3),
                                       terms=2 * vocab + 4, scale=30.0, what="aligned loss")
    misaligned = torch.roll(aligned, shifts=1, dims=1)
    assert float(mntp_token_losses(misaligned, labels, lm_head).min()) > 1.0


def test_mntp_refuses_a_label_at_position_zero():
    labels = torch.full((1, 4), IGNORE_INDEX)
    labels[0, 0] = 1
    with pytest.raises(ValueError, match="position 0"):
        mntp_token_losses(torch.randn(1, 4, 8), labels, torch.nn.Linear(8, 8))


def _info_nce_by_hand(queries, documents, temperature, offset):
    q = queries.detach().double().numpy()
    d = documents.detach().double().numpy()
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    d /= np.linalg.norm(d, axis=1, keepdims=True)
    out = []
    for i in range(len(q)):
        scores = [float(q[i] @ d[j]) / temperature for j in range(len(d))]
        top = max(scores)
        log_sum = top + math.log(sum(math.exp(s - top) for s in scores))
        out.append(log_sum - scores[offset + i])
    return out


@pytest.mark.parametrize("offset", [0, 3])
def test_info_nce_matches_a_hand_computation(offset):
    queries, documents = torch.randn(3, 16), torch.randn(9, 16)
    losses = info_nce_losses(queries, documents, 0.05, positive_offset=offset)
    # float32: two norms and a dot product of 16 terms per score, scaled by 1/0.05, then log-sum-exp over 9 scores;
    # the partial sums are scores, of size up to 1/temperature, which is the scale (a loss is a difference of two)
    assert_equal_up_to_summation_order(losses, _info_nce_by_hand(queries, documents, 0.05, offset),
                                       terms=3 * (16 + 2) + 9 + 4, scale=1 / 0.05)


def test_cosent_matches_a_hand_computation():
    a, b = torch.randn(6, 8), torch.randn(6, 8)
    scores = torch.tensor([0.5, 4.0, 2.5, 2.5, 1.0, 5.0])
    cos = [float(F.cosine_similarity(a[i:i + 1].double(), b[i:i + 1].double())) for i in range(6)]
    terms = [20 * (cos[j] - cos[i]) for i in range(6) for j in range(6) if scores[i] > scores[j]]
    expected = math.log(1 + sum(math.exp(t) for t in terms))
    # float32 cosines (3 x (8 + 2) summands), scaled by 20, then log-sum-exp over the 36 pairs: partial sums of size
    # up to 20 x 2, the scale
    assert_equal_up_to_summation_order(float(cosent_loss(a, b, scores)), expected, terms=3 * (8 + 2) + 36 + 4,
                                       scale=2 * 20, dtype=torch.float32)
    # ordering the cosines like the scores drives the loss towards 0
    ordered = torch.stack([torch.tensor([math.cos(1.4 - 0.25 * s), math.sin(1.4 - 0.25 * s)]) for s in scores])
    reference = torch.tensor([[1.0, 0.0]]).expand(6, 2)
    assert float(cosent_loss(ordered, reference, scores, scale=200)) < 1e-3


def _loss_terms(model, max_length: int, candidates: int) -> int:
    """Summands a contrastive loss may reorder against a reference computed from separately batched embeddings:
    each side's forward pass and cosine (two norms and a dot product), then log-sum-exp over `candidates`."""
    return 2 * (encoder_terms(model, max_length) + 3 * (model.config.hidden_size + 2)) + candidates + 4


def test_simcse_loss_equals_info_nce_of_two_dropout_free_views():
    tokenizer = _tokenizer()
    model = tiny_encoder(vocab_size=len(tokenizer))
    texts = ["The cat sat on the mat.", "A dog ran in the park.", "Plants make sugar."]
    loss, tokens = SimCSE(tokenizer=tokenizer, max_length=32).loss(model, {"texts": texts}, Distributed())
    batch = tokenize_for_encoder(tokenizer, texts)
    with torch.no_grad():
        embeddings = model(**batch).pooler_output
    # without dropout both views are equal: the positive is the query itself
    expected = np.mean(_info_nce_by_hand(embeddings, embeddings, 0.05, 0))
    # the loss's forward pass batches both views (6 rows) where this one ran 3: the embeddings agree up to summation
    # order, and a score (their cosine, / 0.05) moves by twice that, times 1/temperature, the scale
    assert_equal_up_to_summation_order(float(loss), expected, terms=_loss_terms(model, 32, 6),
                                       scale=1 / 0.05, dtype=torch.float32)
    assert tokens == 2 * int(batch["attention_mask"].sum())


def test_supervised_info_nce_uses_in_batch_and_hard_negatives():
    tokenizer = _tokenizer()
    model = tiny_encoder(vocab_size=len(tokenizer))
    triples = [Triple("where is the cat?", "The cat sat on the mat.", ("A dog ran.",), "Find the answer"),
               Triple("what do plants make?", "Plants make sugar.", ("The park.",), None)]
    objective = Supervised(tokenizer=tokenizer, max_length=48, instruction_template="Instruct: {instruction}\nQuery: ",
                           default_instruction="Retrieve passages")
    loss, _ = objective.loss(model, {"examples": triples}, Distributed())
    prompts = ["Instruct: Find the answer\nQuery: ", "Instruct: Retrieve passages\nQuery: "]
    with torch.no_grad():
        queries = model(**tokenize_for_encoder(tokenizer, [t.query for t in triples], prompts)).pooler_output
        docs = model(**tokenize_for_encoder(tokenizer, ["The cat sat on the mat.", "Plants make sugar.",
                                                        "A dog ran.", "The park."])).pooler_output
    expected = np.mean(_info_nce_by_hand(queries, docs, 0.02, 0))
    # as for SimCSE: embeddings from other batches, then cosines / 0.02 (the scale) and log-sum-exp over 4 documents
    assert_equal_up_to_summation_order(float(loss), expected, terms=_loss_terms(model, 48, 4),
                                       scale=1 / 0.02, dtype=torch.float32)


def test_supervised_cosent_on_scored_pairs():
    tokenizer = _tokenizer()
    model = tiny_encoder(vocab_size=len(tokenizer))
    pairs = [ScoredPair("The cat sat.", "A cat sat.", 4.5), ScoredPair("A dog ran.", "Plants grow.", 0.5),
             ScoredPair("The park.", "A park.", 3.0)]
    objective = Supervised(tokenizer=tokenizer, max_length=32, instruction_template="{instruction}")
    loss, _ = objective.loss(model, {"examples": pairs}, Distributed())
    with torch.no_grad():
        a = model(**tokenize_for_encoder(tokenizer, [p.text1 for p in pairs])).pooler_output
        b = model(**tokenize_for_encoder(tokenizer, [p.text2 for p in pairs])).pooler_output
    # embeddings from other batches, cosines x 20 (partial sums up to 2 x 20, the scale), log-sum-exp over 3 pairs
    assert_equal_up_to_summation_order(float(loss), float(cosent_loss(a, b, torch.tensor([4.5, 0.5, 3.0]))),
                                       terms=_loss_terms(model, 32, 9), scale=2 * 20,
                                       dtype=torch.float32)


def test_instruction_tokens_are_attended_but_carry_no_pooling_weight():
    tokenizer = _tokenizer()
    model = tiny_encoder(vocab_size=len(tokenizer))
    prompt = "Instruct: Given a query, retrieve relevant passages\nQuery: "
    batch = tokenize_for_encoder(tokenizer, ["where is the cat?"], [prompt])
    output = model(**batch)
    hidden = output.last_hidden_state
    instruction = batch["pool_mask"][0] == 0
    assert instruction.sum() > 3 and (~instruction).sum() > 2
    # the pooled vector's gradient with respect to the token states is zero at every instruction token
    grad = torch.autograd.grad(output.pooler_output.sum(), hidden)[0][0]
    assert float(grad[instruction].abs().max()) == 0.0
    assert float(grad[~instruction].abs().min(dim=-1).values.max()) > 0
    # and it is the (normalised) mean of the text tokens' states
    expected = F.normalize(hidden[0][~instruction].double().mean(dim=0), dim=-1)
    # float32 mean over the text tokens, then the L2 norm (hidden squares), against float64
    text_tokens, width = int((~instruction).sum()), hidden.shape[-1]
    assert_equal_up_to_summation_order(output.pooler_output[0], expected, terms=text_tokens + 2 + width + 2)
    # the instruction is attended to: the text tokens' states change with it
    plain = model(**tokenize_for_encoder(tokenizer, ["where is the cat?"])).last_hidden_state
    assert not torch.allclose(plain[0, -3:], hidden[0, -3:], atol=1e-3)
