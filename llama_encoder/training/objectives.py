"""The three LLM2Vec objectives, each a batch builder (`collate`), a count of its loss terms (`count`) and a function
from a batch to a loss (`loss`).

A step's loss is the mean of its terms (MNTP: one per masked token; InfoNCE: one per query; CoSENT: one per
micro-batch) over every micro-batch of the step and every process. `loss(model, batch, dist, total)` returns this
process's *share* of it: the sum of its micro-batch's terms divided by `total`, the step's count of terms (by default
this micro-batch's, over all processes). Under `torchrun` every process holds a slice of the global batch, embeddings
are gathered across processes with gradients (`Distributed.gather`), and the shares add up to the loss a single
process would compute on the whole batch, so summing the gradients across processes and micro-batches (what the
loop does) gives exactly the single-process gradient.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..configuration_llama_encoder import fill_instruction_template
from ..errors import InputError
from ..modeling_llama_encoder import tokenize_for_encoder
from .data import ScoredPair, Triple
from .distributed import Distributed

IGNORE_INDEX = -100


# ---- pure loss functions ---------------------------------------------------------------------------------------


def info_nce_losses(
    queries: torch.Tensor, documents: torch.Tensor, temperature: float, positive_offset: int = 0
) -> torch.Tensor:
    """Per-query InfoNCE loss: query `i` against every document, its positive being document
    `positive_offset + i` (all the others are negatives). Cosine similarity divided by `temperature`.
    Returns a `(len(queries),)` float32 vector."""
    similarity = F.normalize(queries.float(), dim=-1) @ F.normalize(documents.float(), dim=-1).T
    targets = torch.arange(len(queries), device=queries.device) + positive_offset
    return F.cross_entropy(similarity / temperature, targets, reduction="none")


def cosent_loss(embeddings1: torch.Tensor, embeddings2: torch.Tensor, scores: torch.Tensor,
                scale: float = 20.0) -> torch.Tensor:
    """CoSENT: `log(1 + sum over pairs (i, j) with score_i > score_j of exp(scale * (cos_j - cos_i)))`, which
    asks every more similar pair to have a larger cosine than every less similar one. Returns a scalar."""
    cosine = F.cosine_similarity(embeddings1.float(), embeddings2.float(), dim=-1) * scale
    difference = cosine[None, :] - cosine[:, None]  # [i, j] = cos_j - cos_i
    ordered = scores[:, None] > scores[None, :]
    difference = difference.masked_fill(~ordered, float("-inf"))
    zero = torch.zeros(1, dtype=difference.dtype, device=difference.device)
    return torch.logsumexp(torch.cat([zero, difference.flatten()]), dim=0)


def mask_tokens(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    maskable: torch.Tensor,
    *,
    mask_token_id: int,
    vocab_size: int,
    probability: float,
    seeds: list[int],
) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT-style masking for MNTP. Each maskable position is picked with `probability`; a picked token becomes
    the mask token (80%), a random token (10%) or stays (10%). Row `r` draws from its own generator seeded with
    `seeds[r]`, one draw per real (non-padding) token, so an example is masked the same way whatever batch, padding
    or process it lands in. Returns `(masked input_ids, labels)`, labels holding the original id at picked
    positions and -100 elsewhere."""
    masked, labels = input_ids.clone(), torch.full_like(input_ids, IGNORE_INDEX)
    for row, seed in enumerate(seeds):
        generator = torch.Generator().manual_seed(seed)
        real = torch.nonzero(attention_mask[row].cpu().bool(), as_tuple=True)[0]
        n = len(real)
        pick_draw, choice, random_ids = (torch.rand(n, generator=generator), torch.rand(n, generator=generator),
                                         torch.randint(vocab_size, (n,), generator=generator))
        picked = (pick_draw < probability) & maskable[row].cpu().bool()[real]
        positions = real[picked].to(input_ids.device)
        choice, random_ids = choice[picked], random_ids[picked].to(input_ids.device)
        labels[row, positions] = input_ids[row, positions]
        values = torch.where((choice < 0.8).to(input_ids.device), mask_token_id,
                             torch.where((choice < 0.9).to(input_ids.device), random_ids, input_ids[row, positions]))
        masked[row, positions] = values
    return masked, labels


def mntp_token_losses(hidden_states: torch.Tensor, labels: torch.Tensor, lm_head: nn.Module) -> torch.Tensor:
    """Cross-entropy of each masked token, predicted from the hidden state one position *before* it (LLM2Vec's
    masked next-token prediction keeps the LM head's next-token alignment). Logits are computed only at those
    positions. Returns a float32 vector with one loss per label that is not -100."""
    rows, positions = torch.nonzero(labels[:, 1:] != IGNORE_INDEX, as_tuple=True)
    if bool((labels[:, 0] != IGNORE_INDEX).any()):
        raise InputError("A label at position 0 has no previous position to be predicted from; never mask it.")
    logits = lm_head(hidden_states[rows, positions]).float()
    return F.cross_entropy(logits, labels[rows, positions + 1], reduction="none")


# ---- objectives ------------------------------------------------------------------------------------------------


def derive_seed(*parts: int) -> int:
    """A 63-bit seed drawn from a tuple of integers (seed, epoch, example), independent of any running RNG."""
    return int(np.random.SeedSequence(list(parts)).generate_state(1, dtype=np.uint64)[0] % (2**63))


@dataclass
class MNTP:
    """Masked next-token prediction over plain texts; `lm_head` is the base model's (frozen) LM head."""

    tokenizer: object
    lm_head: nn.Module
    mask_token_id: int
    max_length: int
    probability: float = 0.2
    seed: int = 0
    name: str = "mntp"

    def collate(self, texts: list[str], example_ids: list[int], epoch: int) -> dict:
        encoded = self.tokenizer(texts, truncation=True, max_length=self.max_length, padding=True,
                                 return_tensors="pt")
        input_ids, attention = encoded["input_ids"], encoded["attention_mask"]
        special = torch.isin(input_ids, torch.tensor(sorted(set(self.tokenizer.all_special_ids))))
        first_real = attention.cumsum(dim=1) == 1  # nothing comes before it to predict it from
        maskable = attention.bool() & ~special & ~first_real
        masked, labels = mask_tokens(
            input_ids, attention, maskable, mask_token_id=self.mask_token_id, vocab_size=len(self.tokenizer),
            probability=self.probability, seeds=[derive_seed(self.seed, epoch, index) for index in example_ids],
        )
        return {"input_ids": masked, "attention_mask": attention, "labels": labels}

    def count(self, batch: dict) -> int:
        """This process's loss terms in `batch`: its masked tokens."""
        return int((batch["labels"] != IGNORE_INDEX).sum())

    def loss(self, model: nn.Module, batch: dict, dist: Distributed,
             total: int | None = None) -> tuple[torch.Tensor, int]:
        device = next(model.parameters()).device
        attention = batch["attention_mask"].to(device)
        hidden = model(input_ids=batch["input_ids"].to(device), attention_mask=attention).last_hidden_state
        losses = mntp_token_losses(hidden, batch["labels"].to(device), self.lm_head)
        total = dist.sum_int(len(losses)) if total is None else total
        tokens = int(attention.sum())
        if total == 0 or len(losses) == 0:
            return hidden.sum() * 0.0, tokens  # no token of this batch is masked
        return losses.sum() / total, tokens


def _encode_texts(model: nn.Module, tokenizer, texts: list[str], prompts: list[str] | None, max_length: int,
                  append_eos: bool) -> tuple[torch.Tensor, int]:
    """Pooled embeddings of `prompt + text` (prompts attended to, not pooled) and the number of real tokens."""
    batch = tokenize_for_encoder(tokenizer, texts, prompts, max_length=max_length, append_eos=append_eos)
    device = next(model.parameters()).device
    output = model(**{key: value.to(device) for key, value in batch.items()})
    return output.pooler_output, int(batch["attention_mask"].sum())


@dataclass
class SimCSE:
    """Unsupervised SimCSE: each text twice through dropout; the two views are positives, the rest of the global
    batch negatives. Pooling uses the pool mask, so padding never enters an embedding."""

    tokenizer: object
    max_length: int
    temperature: float = 0.05
    append_eos: bool = False
    name: str = "simcse"

    def collate(self, texts: list[str], example_ids: list[int], epoch: int) -> dict:
        return {"texts": texts}

    def count(self, batch: dict) -> int:
        """This process's loss terms in `batch`: one per text (each text's first view is a query)."""
        return len(batch["texts"])

    def loss(self, model: nn.Module, batch: dict, dist: Distributed,
             total: int | None = None) -> tuple[torch.Tensor, int]:
        texts = batch["texts"]
        # One forward over both views: every row gets its own dropout mask.
        embeddings, tokens = _encode_texts(model, self.tokenizer, texts + texts, None, self.max_length,
                                           self.append_eos)
        first, second = embeddings[: len(texts)], embeddings[len(texts):]
        documents, offset = dist.gather(second)
        losses = info_nce_losses(first, documents, self.temperature, positive_offset=offset)
        return losses.sum() / (dist.sum_int(len(texts)) if total is None else total), tokens


@dataclass
class Supervised:
    """Supervised contrastive training. Triples: InfoNCE of each query (behind `Instruct: {task}\\nQuery: `, the
    instruction attended to but not pooled) against the global batch's positives and hard negatives. Scored pairs:
    CoSENT over the global batch."""

    tokenizer: object
    max_length: int
    instruction_template: str
    default_instruction: str | None = None
    temperature: float = 0.02
    cosent_scale: float = 20.0
    append_eos: bool = False
    name: str = "supervised"

    def prompt(self, instruction: str | None) -> str:
        instruction = instruction or self.default_instruction
        return fill_instruction_template(self.instruction_template, instruction) if instruction else ""

    def collate(self, examples: list, example_ids: list[int], epoch: int) -> dict:
        return {"examples": examples}

    def count(self, batch: dict) -> int:
        """This process's loss terms in `batch`: one per query (InfoNCE); CoSENT is one term of the whole
        micro-batch, which every process computes and counts once."""
        examples = batch["examples"]
        return 1 if isinstance(examples[0], ScoredPair) else len(examples)

    def loss(self, model: nn.Module, batch: dict, dist: Distributed,
             total: int | None = None) -> tuple[torch.Tensor, int]:
        examples = batch["examples"]
        total = dist.sum_int(self.count(batch)) if total is None else total
        if isinstance(examples[0], ScoredPair):
            return self._cosent(model, examples, dist, total)
        return self._info_nce(model, examples, dist, total)

    def _info_nce(self, model: nn.Module, triples: list[Triple], dist: Distributed,
                  total: int) -> tuple[torch.Tensor, int]:
        n = len(triples)
        queries = [t.query for t in triples]
        documents = [t.positive for t in triples] + [negative for t in triples for negative in t.negatives]
        prompts = [self.prompt(t.instruction) for t in triples] + [""] * len(documents)
        embeddings, tokens = _encode_texts(model, self.tokenizer, queries + documents, prompts, self.max_length,
                                           self.append_eos)
        query_embeddings, document_embeddings = embeddings[:n], embeddings[n:]
        positives, offset = dist.gather(document_embeddings[:n])
        negatives, _ = dist.gather(document_embeddings[n:])
        losses = info_nce_losses(query_embeddings, torch.cat([positives, negatives]), self.temperature,
                                 positive_offset=offset)
        return losses.sum() / total, tokens

    def _cosent(self, model: nn.Module, pairs: list[ScoredPair], dist: Distributed,
                total: int) -> tuple[torch.Tensor, int]:
        n = len(pairs)
        prompt = self.prompt(None)
        texts = [p.text1 for p in pairs] + [p.text2 for p in pairs]
        embeddings, tokens = _encode_texts(model, self.tokenizer, texts, [prompt] * len(texts), self.max_length,
                                           self.append_eos)
        first, _ = dist.gather(embeddings[:n])
        second, _ = dist.gather(embeddings[n:])
        scores, _ = dist.gather(torch.tensor([p.score for p in pairs], device=embeddings.device))
        return cosent_loss(first, second, scores, self.cosent_scale) / total, tokens


__all__ = [
    "IGNORE_INDEX",
    "MNTP",
    "SimCSE",
    "Supervised",
    "cosent_loss",
    "derive_seed",
    "info_nce_losses",
    "mask_tokens",
    "mntp_token_losses",
]
