"""Masked next-token prediction (LLM2Vec's MNTP) on transformers' `Trainer`: our collator and loss, the library's
loop (AdamW, warmup/decay, accumulation, checkpoints and resume, autocast, torchrun, logging).

A share of each text's tokens is masked BERT-style (`mask_tokens`: 80% the mask token, 10% a random token, 10% kept,
drawn per real token) and each masked token `i` is predicted from the encoder's hidden state at `i - 1` through the
base's frozen LM head (`mntp_token_losses`), which keeps the head's next-token alignment. The loss is the mean over
the masked tokens of the whole global batch: `MNTPModel` returns the sum over its micro-batch divided by
`num_items_in_batch`, the trainer's count of masked tokens over every micro-batch and process of the step.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import InputError

IGNORE_INDEX = -100


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
    `seeds[r]`, one draw per real (non-padding) token, so a row is masked the same way whatever its padding.
    Returns `(masked input_ids, labels)`, labels holding the original id at picked positions and -100 elsewhere."""
    masked, labels = input_ids.clone(), torch.full_like(input_ids, IGNORE_INDEX)
    for row, seed in enumerate(seeds):
        generator = torch.Generator().manual_seed(int(seed))
        real = torch.nonzero(attention_mask[row].bool(), as_tuple=True)[0]
        n = len(real)
        pick_draw, choice = torch.rand(n, generator=generator), torch.rand(n, generator=generator)
        random_ids = torch.randint(vocab_size, (n,), generator=generator)
        picked = (pick_draw < probability) & maskable[row].bool()[real]
        positions = real[picked]
        choice, random_ids = choice[picked], random_ids[picked]
        labels[row, positions] = input_ids[row, positions]
        masked[row, positions] = torch.where(choice < 0.8, mask_token_id,
                                             torch.where(choice < 0.9, random_ids, input_ids[row, positions]))
    return masked, labels


def mntp_token_losses(hidden_states: torch.Tensor, labels: torch.Tensor, lm_head: nn.Module) -> torch.Tensor:
    """Cross-entropy of each masked token, predicted from the hidden state one position *before* it. Logits are
    computed only at those positions. Returns a float32 vector with one loss per label that is not -100."""
    if bool((labels[:, 0] != IGNORE_INDEX).any()):
        raise InputError("A label at position 0 has no previous position to be predicted from; never mask it.")
    rows, positions = torch.nonzero(labels[:, 1:] != IGNORE_INDEX, as_tuple=True)
    logits = lm_head(hidden_states[rows, positions]).float()
    return F.cross_entropy(logits, labels[rows, positions + 1], reduction="none")


def derive_seed(*parts: int) -> int:
    """A 63-bit seed drawn from a tuple of integers (seed, epoch, example), independent of any running RNG."""
    return int(np.random.SeedSequence(list(parts)).generate_state(1, dtype=np.uint64)[0] % (2**63))


@dataclass
class MNTPCollator:
    """Pads pre-tokenised rows (`input_ids`, `example_id`) and masks them. Each row's masking draws from its own
    generator seeded from (seed, epoch, example), so an example is masked the same way whatever the batch, the
    padding or the process it lands in, and a resumed run masks as the uninterrupted one. The trainer sets `epoch`
    (`EpochSetter`)."""

    tokenizer: object
    mask_token_id: int
    probability: float = 0.2
    seed: int = 0
    epoch: int = 0

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        padded = self.tokenizer.pad([{"input_ids": f["input_ids"]} for f in features], return_tensors="pt")
        input_ids, attention = padded["input_ids"], padded["attention_mask"]
        special = torch.isin(input_ids, torch.tensor(sorted(set(self.tokenizer.all_special_ids))))
        first_real = (attention.cumsum(dim=1) == 1) & attention.bool()  # nothing before it to predict it from
        maskable = attention.bool() & ~special & ~first_real
        seeds = [derive_seed(self.seed, self.epoch, int(f["example_id"])) for f in features]
        masked, labels = mask_tokens(input_ids, attention, maskable, mask_token_id=self.mask_token_id,
                                     vocab_size=len(self.tokenizer), probability=self.probability, seeds=seeds)
        return {"input_ids": masked, "attention_mask": attention, "labels": labels}


def epoch_setter(collator: MNTPCollator):
    """A trainer callback that tells the collator which epoch it masks for."""
    from transformers import TrainerCallback

    class EpochSetter(TrainerCallback):
        def on_epoch_begin(self, args, state, control, **kwargs):
            collator.epoch = int(state.epoch or 0)

    return EpochSetter()


class MNTPModel(nn.Module):
    """The LoRA-injected encoder and the frozen LM head, returning the MNTP loss for `Trainer`.

    `accepts_loss_kwargs`: the trainer passes `num_items_in_batch` (masked tokens of the whole step, over every
    process) and does not rescale the loss, so the step's gradient is that of the token mean of the global batch."""

    accepts_loss_kwargs = True

    def __init__(self, training_model) -> None:
        super().__init__()
        self.encoder = training_model.encoder
        self.lm_head = training_model.lm_head

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor,
                num_items_in_batch: torch.Tensor | int | None = None, **kwargs) -> dict[str, torch.Tensor]:
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        losses = mntp_token_losses(hidden, labels, self.lm_head)
        if len(losses) == 0:
            return {"loss": hidden.sum() * 0.0}  # no token of this micro-batch is masked
        count = num_items_in_batch if num_items_in_batch is not None else len(losses)
        return {"loss": losses.sum() / count}


__all__ = ["IGNORE_INDEX", "MNTPCollator", "MNTPModel", "derive_seed", "epoch_setter", "mask_tokens",
           "mntp_token_losses"]
