"""The contrastive stages (SimCSE, supervised InfoNCE and CoSENT) as sentence-transformers training data and losses.

Each dataset of a run becomes one `datasets.Dataset` in the column layout sentence-transformers' losses read:
InfoNCE `anchor, positive, negative_1..k` (SimCSE: the same text as anchor and positive, two dropout views), CoSENT
`sentence1, sentence2, score`. Records that carry their own instruction are split into one dataset per instruction,
since a prompt is set per dataset and column (`prompts`): the query column gets the instruction written with the run's
template, `Instruct: {task}\\nQuery:\\n` by default (attended to, not pooled: `TrainingEncoder`), documents none.
`named_prompts` names each instruction for the checkpoint (the dataset's `prompt_name`). The losses are the library's:
`MultipleNegativesRankingLoss` (InfoNCE with scale = 1/temperature, in-batch and hard negatives, negatives gathered
across processes under torchrun), its cached form (GradCache) with `--mini-batch-size`, `CoSENTLoss`, and
`MatryoshkaLoss` around them with `--matryoshka-dims`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
from sentence_transformers.base.losses.merged_forward import embed_columns
from sentence_transformers.sentence_transformer import losses
from sentence_transformers.util.distributed import all_gather, all_gather_with_grad

from ..configuration_llama_encoder import fill_instruction_template
from ..errors import InputError
from ..prompts import named_instructions, prompt_name_problem
from .data import ScoredPair, Triple, read_supervised, read_texts
from .recipe import DatasetSpec

logger = logging.getLogger(__name__)


@dataclass
class TrainingSet:
    """One dataset as the trainer sees it: its loss kind, columns and per-column prompts."""

    name: str
    kind: str  # "infonce" or "cosent"
    columns: dict[str, list] = field(default_factory=dict)
    prompts: dict[str, str] = field(default_factory=dict)
    spec: DatasetSpec | None = None
    instruction: str | None = None  # the task instruction behind the query prompt
    prompt_name: str | None = None  # that prompt's name in a converted checkpoint (None: no instruction)

    def __len__(self) -> int:
        return len(next(iter(self.columns.values())))


def _sample(records: list, limit: int | None, seed: int) -> list:
    """`limit` records drawn without replacement from (seed), kept in file order; all of them without a limit."""
    if limit is None or limit >= len(records):
        return records
    keep = np.sort(np.random.default_rng(seed).choice(len(records), size=limit, replace=False))
    return [records[i] for i in keep]


def query_prompt(template: str, instruction: str | None) -> str | None:
    return fill_instruction_template(template, instruction) if instruction else None


def triples_set(name: str, triples: list[Triple], prompt: str | None, spec: DatasetSpec | None = None,
                instruction: str | None = None, prompt_name: str | None = None) -> TrainingSet:
    """InfoNCE columns: anchor, positive, negative_1..k (every record of a set has the same k)."""
    counts = {len(t.negatives) for t in triples}
    if len(counts) > 1:
        raise InputError(f"Dataset {name}: records have different numbers of hard negatives ({sorted(counts)}); "
                         "give every query of a file the same number (or none), keep the first N with max_negatives, "
                         "or mine them with `llama-encoder mine` / mine_negatives.")
    k = counts.pop() if counts else 0
    columns = {"anchor": [t.query for t in triples], "positive": [t.positive for t in triples]}
    for j in range(k):
        columns[f"negative_{j + 1}"] = [t.negatives[j] for t in triples]
    return TrainingSet(name=name, kind="infonce", columns=columns, prompts={"anchor": prompt} if prompt else {},
                       spec=spec, instruction=instruction, prompt_name=prompt_name if instruction else None)


def _supervised_sets(spec: DatasetSpec, template: str, seed: int) -> list[TrainingSet]:
    data = read_supervised([spec.path], data_format=spec.format, positive_threshold=spec.positive_threshold,
                           max_negatives=spec.max_negatives)
    if data.pairs:
        if spec.loss == "infonce":
            raise InputError(f"Dataset {spec.name} ({spec.path}) holds scored pairs, but its loss is infonce. Give "
                             "it a positive_threshold (--positive-threshold, e.g. 4.0) to keep the pairs scored at or "
                             "above it as positives, or use the cosent loss.")
        pairs: list[ScoredPair] = _sample(data.pairs, spec.max_examples, seed)
        prompt = query_prompt(template, spec.instruction)
        columns = {"sentence1": [p.text1 for p in pairs], "sentence2": [p.text2 for p in pairs],
                   "score": [float(p.score) for p in pairs]}
        prompts = {"sentence1": prompt, "sentence2": prompt} if prompt else {}
        return [TrainingSet(name=spec.name, kind="cosent", columns=columns, prompts=prompts, spec=spec,
                            instruction=spec.instruction, prompt_name=spec.prompt_key if prompt else None)]
    if spec.loss == "cosent":
        raise InputError(f"Dataset {spec.name} ({spec.path}) holds query/positive triples, but its loss is cosent, "
                         "which needs scored pairs; use the infonce loss.")
    triples = _sample(data.triples, spec.max_examples, seed)
    groups: dict[str | None, list[Triple]] = {}
    for triple in triples:
        groups.setdefault(triple.instruction or spec.instruction, []).append(triple)
    sets = []
    for index, (instruction, members) in enumerate(groups.items()):
        name = spec.name if len(groups) == 1 else f"{spec.name}-{index}"
        # the dataset's own instruction keeps its prompt name; one its records carry is named like its set
        prompt_name = spec.prompt_key if len(groups) == 1 or instruction == spec.instruction else name
        sets.append(triples_set(name, members, query_prompt(template, instruction), spec, instruction, prompt_name))
    return sets


def read_training_sets(objective: str, specs: list[DatasetSpec], *, instruction_template: str,
                       seed: int) -> list[TrainingSet]:
    """Every dataset of a SimCSE or supervised run, read and checked (refusals name `file:line`)."""
    sets: list[TrainingSet] = []
    for spec in specs:
        if objective == "simcse":
            texts = _sample(read_texts([spec.path]), spec.max_examples, seed)
            sets.append(TrainingSet(name=spec.name, kind="infonce", columns={"anchor": texts, "positive": texts},
                                    spec=spec))
        else:
            sets.extend(_supervised_sets(spec, instruction_template, seed))
    for training_set in sets:
        logger.info("Dataset %s: %d %s examples%s", training_set.name, len(training_set), training_set.kind,
                    f", prompt {next(iter(training_set.prompts.values()))!r} on {', '.join(training_set.prompts)}"
                    if training_set.prompts else "")
    return sets


def named_prompts(sets: list[TrainingSet]) -> dict[str, str]:
    """The task prompts a run trains, by name: `{prompt_name: instruction}` over the sets with an instruction (what
    `training_args.json` records and `convert` saves in the checkpoint, written with the run's template). Raises
    `InputError` for a name given to two instructions, or one a checkpoint cannot hold."""
    entries = []
    for training_set in sets:
        name, instruction = training_set.prompt_name, training_set.instruction
        if name is None or instruction is None:
            continue
        where = f"Dataset {training_set.name} ({training_set.spec.path})" if training_set.spec else \
            f"Dataset {training_set.name}"
        if problem := prompt_name_problem(name):
            raise InputError(f"{where}: {problem}; give the dataset a prompt_name in the recipe.")
        entries.append((where, f"dataset {training_set.name}", name, instruction))
    return named_instructions(entries)


class PairCoSENTLoss(losses.CoSENTLoss):
    """CoSENT with both sentences of every pair in one forward pass (the library embeds its two columns apart; two
    sentences of a pair are alike in length, and one pass of 2B rows is faster than two of B). With `gather`
    (several processes) the pairs and scores of every process are gathered, embeddings with gradients: with the
    trainers' gradient averaging this is one process's loss and gradients on the whole global batch."""

    def __init__(self, model, scale: float = 20.0, gather: bool = False) -> None:
        super().__init__(model, scale=scale)
        self.gather = gather

    def forward(self, sentence_features, labels):
        return self.compute_loss_from_embeddings(embed_columns(self.model, sentence_features, separate_first=False),
                                                 labels)

    def compute_loss_from_embeddings(self, embeddings, labels):
        if self.gather:
            embeddings, labels = [all_gather_with_grad(e) for e in embeddings], all_gather(labels)
        return super().compute_loss_from_embeddings(embeddings, labels)


def build_loss(model, kind: str, *, temperature: float, cosent_scale: float, mini_batch_size: int | None,
               matryoshka_dims: list[int] | None, gather: bool = False):
    """The sentence-transformers loss of one kind of dataset; `gather` (several processes): InfoNCE negatives and
    CoSENT pairs from every process, so N processes compute one process's loss on the global batch."""
    if kind == "infonce":
        if mini_batch_size:
            loss = losses.CachedMultipleNegativesRankingLoss(model, scale=1.0 / temperature,
                                                             mini_batch_size=mini_batch_size,
                                                             gather_across_devices=gather)
        else:
            loss = losses.MultipleNegativesRankingLoss(model, scale=1.0 / temperature, gather_across_devices=gather)
    else:
        loss = PairCoSENTLoss(model, scale=cosent_scale, gather=gather)
    if matryoshka_dims:
        loss = losses.MatryoshkaLoss(model, loss, matryoshka_dims=list(matryoshka_dims))
    return loss


def training_datasets(sets: list[TrainingSet]):
    """A `DatasetDict` of the sets, always named, so prompts and losses are chosen per dataset."""
    from datasets import Dataset, DatasetDict

    return DatasetDict({s.name: Dataset.from_dict(s.columns) for s in sets})


__all__ = ["PairCoSENTLoss", "TrainingSet", "build_loss", "named_prompts", "query_prompt", "read_training_sets",
           "training_datasets", "triples_set"]
