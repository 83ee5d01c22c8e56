"""`--group-by-length` for the contrastive stages: batches of texts of similar length, still without duplicate
texts, as a sentence-transformers batch sampler (the trainer calls `set_epoch`; the order is drawn from
(seed, epoch), so a resumed run sees the same batches).

Each run of 32 batches' worth of the shuffled rows is sorted by length and cut greedily into batches that repeat no
text (a row whose text is already in the batch waits for the next one); the batches are then shuffled. A batch pads
to its longest text, so on CPU this saves most of the padding of random batches of short sentences.
"""

from __future__ import annotations

import numpy as np
from sentence_transformers.base.sampler import DefaultBatchSampler

POOL_BATCHES = 32


class LengthGroupedBatchSampler(DefaultBatchSampler):
    """Batches of similar length (text length in characters: the longest text of a row), free of duplicate texts
    unless `deduplicate` is off (CoSENT pairs need no such rule)."""

    def __init__(self, dataset, batch_size: int, drop_last: bool, valid_label_columns=None, generator=None,
                 seed: int = 0, deduplicate: bool = True) -> None:
        super().__init__(dataset, batch_size=batch_size, drop_last=drop_last, valid_label_columns=valid_label_columns,
                         generator=generator, seed=seed)
        skip = set(valid_label_columns or []) | {"dataset_name"}
        columns = [dataset[name] for name in dataset.column_names if name not in skip]
        self.texts = [tuple(values) for values in zip(*columns, strict=True)]
        self.deduplicate = deduplicate
        self.lengths = [max(len(text) for text in row) for row in self.texts]

    def _batches(self) -> list[list[int]]:
        rng = np.random.default_rng([self.seed, self.epoch])
        order = rng.permutation(len(self.texts)).tolist()
        pool = self.batch_size * POOL_BATCHES
        batches: list[list[int]] = []
        for start in range(0, len(order), pool):
            waiting = sorted(order[start:start + pool], key=lambda i: self.lengths[i])
            while len(waiting) >= self.batch_size:
                batch, seen, later = [], set(), []
                for index in waiting:
                    row = set(self.texts[index]) if self.deduplicate else set()
                    if len(batch) < self.batch_size and not row & seen:
                        batch.append(index)
                        seen |= row
                    else:
                        later.append(index)
                if len(batch) < self.batch_size:
                    break  # the rest cannot fill a batch without a duplicate
                batches.append(batch)
                waiting = later
        return [batches[i] for i in rng.permutation(len(batches))]

    def __iter__(self):
        yield from self._batches()

    def __len__(self) -> int:
        return len(self.texts) // self.batch_size


__all__ = ["LengthGroupedBatchSampler"]
