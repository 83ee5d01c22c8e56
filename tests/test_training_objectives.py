"""The training objectives as the trainers compute them (`prepare_run`: transformers' `Trainer` for MNTP,
sentence-transformers' trainer and losses for SimCSE and supervised), checked against independent computations
written here from the encoder's raw outputs, and MNTP's masking checked on its own."""

import math

import pytest
import torch
import torch.nn.functional as F

from llama_encoder.modeling_llama_encoder import tokenize_for_encoder
from llama_encoder.training.arguments import TrainingArguments
from llama_encoder.training.mntp import IGNORE_INDEX, MNTPCollator, mask_tokens, mntp_token_losses
from llama_encoder.training.run import prepare_run
from tests.numeric import assert_equal_up_to_summation_order, encoder_terms
from tests.tiny import TINY_CORPUS, save_tiny_base, tiny_bpe_tokenizer, tiny_encoder

MASK_ID = 3
TEXTS = ["The cat sat on the mat.", "A dog ran in the park.", "Plants make sugar from light.", "The cat ran.",
         "A dog sat on the mat in the park.", "Light.", "Sugar from plants is sweet.", "Where is the cat?"]
QUERIES = ["Where is the cat?", "What do plants make?", "Who ran in the park?", "What is sweet?"]
POSITIVES = ["The cat sat on the mat.", "Plants make sugar from light.", "A dog ran in the park.",
             "Sugar from plants is sweet."]
NEGATIVES = ["A park.", "Light.", "The mat is red.", "Plants grow."]
INSTRUCTION = "Given a question, retrieve the sentence that answers it"
PROMPT = f"Instruct: {INSTRUCTION}\nQuery:\n"  # the default instruction template, written out
SCORES = [0.5, 4.0, 2.5, 1.0]
BATCH = 4


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory):
    folder = tmp_path_factory.mktemp("objectives-base")
    save_tiny_base(folder)
    return folder


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    import json

    folder = tmp_path_factory.mktemp("objectives-data")
    (folder / "texts.txt").write_text("\n".join(TEXTS) + "\n")
    (folder / "triples.jsonl").write_text("".join(
        json.dumps({"query": q, "positive": p, "negatives": [n]}) + "\n"
        for q, p, n in zip(QUERIES, POSITIVES, NEGATIVES, strict=True)))
    (folder / "pairs.csv").write_text("score,sentence1,sentence2\n" + "".join(
        f"{s},{q},{p}\n" for s, q, p in zip(SCORES, QUERIES, POSITIVES[1:] + POSITIVES[:1], strict=True)))
    return folder


def _prepare(tiny_base, data, tmp_path, objective: str, file: str, **overrides):
    """A run on the tiny base in float32 without dropout, LoRA B set to nonzero values (it starts at zero, which
    would leave A without gradient), in training mode."""
    values = dict(objective=objective, out=str(tmp_path / f"{objective}-out"), data=[str(data / file)],
                  base=str(tiny_base), batch_size=BATCH, max_steps=1, lora_dropout=0.0, dtype="float32",
                  show_progress=False, max_length=64)
    if objective != "mntp":
        values["attention_dropout"] = 0.0
    values.update(overrides)
    run = prepare_run(TrainingArguments(**values))
    torch.manual_seed(5)
    with torch.no_grad():
        for name, param in run.model.trainable_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05)
    run.trainer.model.train()
    return run


def _first_batch(run) -> dict:
    return next(iter(run.trainer.get_train_dataloader()))


def _gradients(run) -> dict[str, torch.Tensor]:
    params = run.model.trainable_parameters()
    grads = {name: p.grad.detach().clone() for name, p in params}
    for _, p in params:
        p.grad = None
    return grads


def _trainer_loss_and_gradients(run, batch: dict, **kwargs) -> tuple[float, dict]:
    for _, p in run.model.trainable_parameters():
        p.grad = None
    loss = run.trainer.compute_loss(run.trainer.model, dict(batch), **kwargs)
    loss.backward()
    return float(loss.detach()), _gradients(run)


def _reference_gradients(run, loss: torch.Tensor) -> tuple[float, dict]:
    for _, p in run.model.trainable_parameters():
        p.grad = None
    loss.backward()
    return float(loss.detach()), _gradients(run)


def _embed(run, batch: dict, column: str) -> torch.Tensor:
    """The encoder's pooled output for one column of a sentence-transformers batch, run here directly."""
    return run.model.encoder(input_ids=batch[f"{column}_input_ids"], attention_mask=batch[f"{column}_attention_mask"],
                             pool_mask=batch[f"{column}_pool_mask"]).pooler_output


def _info_nce(queries: torch.Tensor, documents: torch.Tensor, temperature: float) -> torch.Tensor:
    """Mean over the queries of the cross-entropy of (cosine similarity / temperature) against every document, the
    positive of query i being document i."""
    similarity = F.normalize(queries, dim=-1) @ F.normalize(documents, dim=-1).T / temperature
    return F.cross_entropy(similarity, torch.arange(len(queries)))


def _terms(encoder, batch: dict, columns: list[str], loss_terms: int) -> int:
    """Summands the trainer's computation and the one here may add in different orders (see tests/numeric.py): the
    forward pass and the backward pass through the encoder over the widest row (the trainer may batch the columns
    together, the reference runs them one by one), every token of the batch (each LoRA gradient sums over all of
    them), and the loss's own sums (`loss_terms`)."""
    width = max(batch[f"{c}_input_ids"].shape[1] for c in columns)
    rows = sum(batch[f"{c}_input_ids"].shape[0] for c in columns)
    return 2 * encoder_terms(encoder, width) + rows * width + loss_terms


def _cosine_terms(encoder, candidates: int) -> int:
    """Two norms and a dot product per cosine (hidden + 2 each), then log-sum-exp over `candidates` (+ 4)."""
    return 3 * (encoder.config.hidden_size + 2) + candidates + 4


def _assert_same(loss, grads, expected_loss, expected_grads, *, terms: int, loss_scale: float | None = None):
    assert_equal_up_to_summation_order(loss, expected_loss, terms=terms, scale=loss_scale, dtype=torch.float32,
                                       what="loss")
    assert set(grads) == set(expected_grads)
    assert all(float(g.abs().max()) > 0 for name, g in expected_grads.items() if "lora_A" in name)
    for name, grad in grads.items():
        assert_equal_up_to_summation_order(grad, expected_grads[name], terms=terms, what=name)


# ---- the trainers' losses against independent computations ---------------------------------------------------


def test_mntp_loss_is_the_token_mean_cross_entropy_from_the_previous_state(tiny_base, data, tmp_path):
    run = _prepare(tiny_base, data, tmp_path, "mntp", "texts.txt", mask_probability=0.3)
    batch = _first_batch(run)
    assert set(batch) == {"input_ids", "attention_mask", "labels"}
    labels = batch["labels"]
    count = int((labels != IGNORE_INDEX).sum())
    assert count > 3
    loss, grads = _trainer_loss_and_gradients(run, batch)

    hidden = run.model.encoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    log_probs = F.log_softmax(run.model.lm_head(hidden[:, :-1]).float(), dim=-1)  # position i - 1 predicts token i
    targets = labels[:, 1:]
    picked = targets != IGNORE_INDEX
    token_losses = -log_probs.gather(-1, targets.clamp(min=0)[..., None])[..., 0][picked]
    expected_loss, expected_grads = _reference_gradients(run, token_losses.mean())
    config = run.model.encoder.config
    width = batch["input_ids"].shape[1]
    # forward and backward through the encoder, every token, then the LM head (hidden) and the softmax over the
    # vocabulary, and the mean over the masked tokens
    terms = (2 * encoder_terms(run.model.encoder, width, pooled=False) + labels.numel() + config.hidden_size
             + config.vocab_size + count + 4)
    _assert_same(loss, grads, expected_loss, expected_grads, terms=terms)

    # the trainer passes the step's count of masked tokens (every micro-batch and process): sum / that count
    half, _ = _trainer_loss_and_gradients(run, batch, num_items_in_batch=2 * count)
    assert_equal_up_to_summation_order(half, expected_loss / 2, terms=terms, dtype=torch.float32, what="sum / count")


def test_simcse_loss_is_info_nce_over_two_views(tiny_base, data, tmp_path):
    run = _prepare(tiny_base, data, tmp_path, "simcse", "texts.txt", pooling="latent_attention")
    batch = _first_batch(run)
    for key in ("input_ids", "attention_mask", "pool_mask"):  # two views of the same texts, no prompt
        assert torch.equal(batch[f"anchor_{key}"], batch[f"positive_{key}"])
    assert torch.equal(batch["anchor_pool_mask"], batch["anchor_attention_mask"])
    loss, grads = _trainer_loss_and_gradients(run, batch)

    temperature = run.args.temperature
    assert temperature == 0.05
    reference = _info_nce(_embed(run, batch, "anchor"), _embed(run, batch, "positive"), temperature)
    expected_loss, expected_grads = _reference_gradients(run, reference)
    assert any("latent_attention" in name for name in grads)  # the head trains beside LoRA
    terms = _terms(run.model.encoder, batch, ["anchor", "positive"], _cosine_terms(run.model.encoder, BATCH))
    # a loss is a difference of scores of size up to 1 / temperature, the scale
    _assert_same(loss, grads, expected_loss, expected_grads, terms=terms, loss_scale=1 / temperature)


def _check_prompt_rows(tokenizer, batch: dict, column: str, prompt: str, texts: list[str]) -> None:
    """Each row of `column` is BOS + prompt + one of `texts`; the tokens lying wholly inside BOS + prompt are not
    pooled, every other real token is (the first pooled token may start inside the prompt: byte-level BPE merges
    the prompt's trailing space into the text's first word)."""
    bos = tokenizer.bos_token
    for row in range(len(batch[f"{column}_input_ids"])):
        real = batch[f"{column}_attention_mask"][row].bool()
        ids = batch[f"{column}_input_ids"][row][real].tolist()
        pooled = batch[f"{column}_pool_mask"][row][real].tolist()
        assert not (batch[f"{column}_pool_mask"][row].bool() & ~real).any()
        first = pooled.index(1)
        assert pooled == [0] * first + [1] * (len(ids) - first)
        whole = tokenizer.decode(ids)
        assert whole.startswith(bos + prompt) and whole[len(bos + prompt):] in texts
        unpooled = tokenizer.decode(ids[:first])
        assert unpooled.startswith(bos) and prompt.startswith(unpooled[len(bos):])
        rest_of_prompt = prompt[len(unpooled) - len(bos):]
        first_pooled = tokenizer.decode(ids[first:first + 1])
        assert first_pooled.startswith(rest_of_prompt) and len(first_pooled) > len(rest_of_prompt)


def test_supervised_info_nce_with_hard_negatives_and_instruction_prompts(tiny_base, data, tmp_path):
    run = _prepare(tiny_base, data, tmp_path, "supervised", "triples.jsonl", instruction=INSTRUCTION)
    batch = _first_batch(run)
    tokenizer = run.model.tokenizer
    _check_prompt_rows(tokenizer, batch, "anchor", PROMPT, QUERIES)
    for column, texts in (("positive", POSITIVES), ("negative_1", NEGATIVES)):  # documents: no prompt, all pooled
        assert torch.equal(batch[f"{column}_pool_mask"], batch[f"{column}_attention_mask"])
        for row in range(BATCH):
            ids = batch[f"{column}_input_ids"][row][batch[f"{column}_attention_mask"][row].bool()]
            assert tokenizer.decode(ids, skip_special_tokens=True) in texts
    loss, grads = _trainer_loss_and_gradients(run, batch)

    temperature = run.args.temperature
    assert temperature == 0.02
    queries = _embed(run, batch, "anchor")
    documents = torch.cat([_embed(run, batch, "positive"), _embed(run, batch, "negative_1")])  # positives, negatives
    expected_loss, expected_grads = _reference_gradients(run, _info_nce(queries, documents, temperature))
    columns = ["anchor", "positive", "negative_1"]
    terms = _terms(run.model.encoder, batch, columns, _cosine_terms(run.model.encoder, 2 * BATCH))
    _assert_same(loss, grads, expected_loss, expected_grads, terms=terms, loss_scale=1 / temperature)


def test_supervised_cosent_on_scored_pairs(tiny_base, data, tmp_path):
    run = _prepare(tiny_base, data, tmp_path, "supervised", "pairs.csv")
    batch = _first_batch(run)
    scores = batch["label"]
    assert sorted(scores.tolist()) == sorted(SCORES)
    loss, grads = _trainer_loss_and_gradients(run, batch)

    scale = run.args.cosent_scale
    cosine = F.cosine_similarity(_embed(run, batch, "sentence1"), _embed(run, batch, "sentence2"), dim=-1)
    terms_list = [scale * (cosine[j] - cosine[i]) for i in range(BATCH) for j in range(BATCH)
                  if scores[i] > scores[j]]
    assert len(terms_list) == BATCH * (BATCH - 1) // 2  # distinct scores: every pair once
    reference = torch.log(1 + torch.stack(terms_list).exp().sum())
    expected_loss, expected_grads = _reference_gradients(run, reference)
    terms = _terms(run.model.encoder, batch, ["sentence1", "sentence2"],
                   _cosine_terms(run.model.encoder, BATCH * BATCH))
    # partial sums are scaled cosine differences, of size up to 2 x scale
    _assert_same(loss, grads, expected_loss, expected_grads, terms=terms, loss_scale=2 * scale)


def test_matryoshka_loss_is_the_sum_of_the_loss_on_each_truncation(tiny_base, data, tmp_path):
    dims = [16, 32, 64]
    run = _prepare(tiny_base, data, tmp_path, "supervised", "triples.jsonl", instruction=INSTRUCTION,
                   matryoshka_dims=dims)
    batch = _first_batch(run)
    loss, grads = _trainer_loss_and_gradients(run, batch)

    temperature = run.args.temperature
    queries = _embed(run, batch, "anchor")
    documents = torch.cat([_embed(run, batch, "positive"), _embed(run, batch, "negative_1")])
    reference = sum(1.0 * _info_nce(queries[:, :d], documents[:, :d], temperature) for d in dims)  # weights 1
    expected_loss, expected_grads = _reference_gradients(run, reference)
    columns = ["anchor", "positive", "negative_1"]
    terms = _terms(run.model.encoder, batch, columns, _cosine_terms(run.model.encoder, 2 * BATCH) + len(dims))
    _assert_same(loss, grads, expected_loss, expected_grads, terms=terms, loss_scale=len(dims) / temperature)


def test_gradcache_gives_the_full_batch_gradients(tiny_base, data, tmp_path):
    cached = _prepare(tiny_base, data, tmp_path / "cached", "supervised", "triples.jsonl", instruction=INSTRUCTION,
                      mini_batch_size=2)
    full = _prepare(tiny_base, data, tmp_path / "full", "supervised", "triples.jsonl", instruction=INSTRUCTION)
    assert type(cached.trainer.loss["triples"]).__name__ == "CachedMultipleNegativesRankingLoss"
    assert type(full.trainer.loss["triples"]).__name__ == "MultipleNegativesRankingLoss"
    batch = _first_batch(cached)
    for name, param in cached.model.trainable_parameters():  # the same model
        assert torch.equal(param, dict(full.model.trainable_parameters())[name])
    loss, grads = _trainer_loss_and_gradients(cached, batch)
    expected_loss, expected_grads = _trainer_loss_and_gradients(full, batch)
    columns = ["anchor", "positive", "negative_1"]
    terms = _terms(full.model.encoder, batch, columns, _cosine_terms(full.model.encoder, 2 * BATCH))
    _assert_same(loss, grads, expected_loss, expected_grads, terms=terms, loss_scale=1 / full.args.temperature)


# ---- MNTP masking ----------------------------------------------------------------------------------------------


def _within_binomial(count: int, n: int, p: float, what: str, z: float = 6.0) -> None:
    """`count` of `n` draws with probability `p` lies within z standard deviations of n p (two-sided, z = 6: a
    correct sampler fails with probability under 2e-9; with the fixed seeds used here the check is deterministic)."""
    sd = math.sqrt(n * p * (1 - p))
    assert abs(count - n * p) <= z * sd, f"{what}: {count} of {n}, expected {n * p:.1f} +- {z * sd:.1f}"


def test_masking_rates_follow_80_10_10():
    rows, width, vocab, probability = 64, 256, 1000, 0.2
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(10, vocab, (rows, width), generator=generator)
    maskable = torch.ones(rows, width, dtype=torch.bool)
    maskable[:, 0] = False
    masked, labels = mask_tokens(ids, torch.ones_like(ids), maskable, mask_token_id=MASK_ID, vocab_size=vocab,
                                 probability=probability, seeds=list(range(rows)))
    picked = labels != IGNORE_INDEX
    n = int(picked.sum())
    _within_binomial(n, int(maskable.sum()), probability, "picked")
    assert torch.equal(labels[picked], ids[picked])
    assert not picked[:, 0].any()
    # A picked token becomes the mask (0.8), a random id uniform over the vocabulary (0.1), or stays (0.1). A random
    # id is the mask id, or the original id (never the mask id: ids start at 10), with probability 1/vocab each.
    as_mask = int(((masked == MASK_ID) & picked).sum())
    unchanged = int(((masked == ids) & picked).sum())
    _within_binomial(as_mask, n, 0.8 + 0.1 / vocab, "mask token")
    _within_binomial(unchanged, n, 0.1 + 0.1 / vocab, "kept")
    _within_binomial(n - as_mask - unchanged, n, 0.1 * (1 - 2 / vocab), "random token")
    assert torch.equal(masked[~picked], ids[~picked])  # nothing else is touched


def test_masking_depends_only_on_the_row_seed():
    ids = torch.randint(10, 500, (3, 40))
    attention = torch.ones_like(ids)
    attention[1, 30:] = 0  # row 1 has 30 real tokens, padded on the right
    maskable = attention.bool()
    first = mask_tokens(ids, attention, maskable, mask_token_id=MASK_ID, vocab_size=500, probability=0.3,
                        seeds=[7, 8, 9])
    # the same row (seed 8) alone, unpadded, or padded on the left, is masked the same way
    alone = mask_tokens(ids[1:2, :30], attention[1:2, :30], maskable[1:2, :30], mask_token_id=MASK_ID,
                        vocab_size=500, probability=0.3, seeds=[8])
    assert torch.equal(first[0][1, :30], alone[0][0]) and torch.equal(first[1][1, :30], alone[1][0])
    left = torch.cat([torch.zeros(1, 5, dtype=torch.long), ids[1:2, :30]], dim=1)
    left_attention = torch.ones_like(left)
    left_attention[0, :5] = 0
    shifted = mask_tokens(left, left_attention, left_attention.bool(), mask_token_id=MASK_ID, vocab_size=500,
                          probability=0.3, seeds=[8])
    assert torch.equal(shifted[1][0, 5:], alone[1][0]) and torch.equal(shifted[0][0, 5:], alone[0][0])
    other = mask_tokens(ids, attention, maskable, mask_token_id=MASK_ID, vocab_size=500, probability=0.3,
                        seeds=[1, 2, 3])
    assert not torch.equal(first[1], other[1])


def _tokenizer(padding_side: str = "right"):
    tokenizer = tiny_bpe_tokenizer(TINY_CORPUS)
    tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = padding_side
    return tokenizer


def _collate(tokenizer, rows: list[list[int]], seed: int, probability: float = 0.5) -> dict:
    """The collator on `rows` as examples 0, 1, ... (it seeds each row from (seed, epoch, example))."""
    collator = MNTPCollator(tokenizer=tokenizer, mask_token_id=MASK_ID, probability=probability, seed=seed)
    return collator([{"input_ids": ids, "example_id": index} for index, ids in enumerate(rows)])


def _real(batch: dict, key: str, row: int) -> list[int]:
    return batch[key][row][batch["attention_mask"][row].bool()].tolist()


@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_mntp_collator_never_masks_specials_padding_or_the_first_real_token(padding_side):
    tokenizer = _tokenizer(padding_side)
    texts = ["The cat sat on the mat.", "A dog ran.", "Plants make sugar from light in the park."] * 4
    with_specials = [tokenizer(t)["input_ids"] + [tokenizer.eos_token_id] for t in texts]  # BOS ... EOS
    without = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]  # the first token is a word
    special_ids = torch.tensor(tokenizer.all_special_ids)
    for rows in (with_specials, without):
        batch = _collate(tokenizer, rows, seed=0, probability=0.9)
        picked = batch["labels"] != IGNORE_INDEX
        real = batch["attention_mask"].bool()
        originals = torch.where(picked, batch["labels"], batch["input_ids"])
        for row, ids in enumerate(rows):  # labels hold the original ids, and nothing unpicked is touched
            assert originals[row][real[row]].tolist() == ids
        special = torch.isin(originals, special_ids)
        first_real = (real.cumsum(dim=1) == 1) & real
        assert not (picked & ~real).any()
        assert not (picked & special).any()
        assert not (picked & first_real).any()
        maskable = real & ~special & ~first_real
        _within_binomial(int(picked.sum()), int(maskable.sum()), 0.9, "picked")


def test_mntp_collator_masks_a_row_the_same_way_whatever_its_padding():
    tokenizer = _tokenizer("right")
    rows = [tokenizer(t)["input_ids"] for t in ["The cat sat on the mat.", "A dog ran.", "Plants make sugar."]]
    longer = rows[:2] + [tokenizer("Plants make sugar from light in the park, where the cat sat.")["input_ids"]]
    right = _collate(tokenizer, rows, seed=3)
    wide = _collate(tokenizer, longer, seed=3)  # rows 0 and 1 get more padding
    left = _collate(_tokenizer("left"), rows, seed=3)
    assert wide["input_ids"].shape[1] > right["input_ids"].shape[1]
    assert left["attention_mask"][1, 0] == 0 and right["attention_mask"][1, -1] == 0
    for row in (0, 1):
        for key in ("input_ids", "labels"):
            assert _real(right, key, row) == _real(wide, key, row) == _real(left, key, row)
    picked = [label != IGNORE_INDEX for row in (0, 1) for label in _real(right, "labels", row)]
    assert any(picked) and not all(picked)


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


# ---- instruction prompts ---------------------------------------------------------------------------------------


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
