"""Run an encoder checkpoint under MTEB 2.x (`pip install "mteb>=2,<3"`), with per-task prompts.

    import mteb
    from llama_encoder.encoding.mteb_adapter import MTEBEncoder, local_retrieval_task, local_sts_task

    model = MTEBEncoder("smollm2-encoder")                  # a folder or Hub id, or an Encoder
    tasks = [*mteb.get_tasks(tasks=["STSBenchmark"]), local_retrieval_task("squad-dev-ir/")]
    results = mteb.evaluate(model, tasks, cache=None)

`MTEBEncoder` implements MTEB's encoder protocol (`encode` over its DataLoader, `similarity`,
`similarity_pairwise`, `mteb_model_meta`). Which prompt a text gets is looked up with MTEB's own keys and order:
`"{task name}-{prompt type}"`, `"{task name}"`, `"{task type}-{prompt type}"`, `"{task type}"`, `"{prompt type}"`
(task types: Retrieval, STS, Classification, Clustering, PairClassification, Reranking, ...; prompt types: query,
document). The first key found in `prompt_names` (values: the checkpoint's saved prompts, by name) or in
`instructions` (values: instructions, written with the checkpoint's instruction template) decides; the prompt name
`plain` means no prompt. The default is `llama-encoder evaluate`'s: STS texts behind the checkpoint's `sts` prompt,
queries behind its `query` prompt, documents behind its `document` prompt (each only where the checkpoint has it),
every other text (classification, clustering, ...) as it is. So
MTEB's figures on a task equal `evaluate`'s on the same files (tested on local tasks built by
`local_retrieval_task` and `local_sts_task`). Documents never get an instruction: instruction-tuned embedders
(LLM2Vec, NV-Embed) are evaluated with instructions on queries only.

Nothing here imports mteb until a task is built or MTEB asks for the model's metadata.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import InputError, MissingDependencyError
from ..prompts import NO_PROMPT
from .encode import Encoder
from .scorecard import DEFAULT_PROMPT_NAMES as SCORECARD_PROMPT_NAMES

DEFAULT_PROMPT_NAMES = {"STS": SCORECARD_PROMPT_NAMES["sts"], "query": SCORECARD_PROMPT_NAMES["retrieval"],
                        "document": "document"}
"""MTEB key -> the checkpoint prompt used when the caller names none for that key (dropped where the checkpoint has
no prompt of that name): `evaluate`'s defaults, read from the scorecard's, so both score a set alike."""
PROMPT_TYPES = ("query", "document")


def _require_mteb():
    try:
        import mteb
    except ImportError:
        raise MissingDependencyError(
            'This needs the mteb package (2.x): pip install "llama-encoder[mteb]" (or "mteb>=2,<3")'
        ) from None
    if not mteb.__version__.startswith("2."):
        raise MissingDependencyError(f"This needs mteb 2.x; found mteb {mteb.__version__}. pip install \"mteb>=2,<3\"")
    return mteb


class MTEBEncoder:
    """An encoder checkpoint as an MTEB 2.x model, with per-task prompts (see the module docstring).

    `encoder`: an `Encoder`, or a checkpoint folder or Hub id loaded with `Encoder.from_pretrained(device=,
    dtype=)`. `prompt_names`: MTEB key -> the name of one of the checkpoint's saved prompts; it is merged over
    `DEFAULT_PROMPT_NAMES`. `instructions`: MTEB key -> an instruction for queries and symmetric tasks' texts. A
    key given in both, or a prompt name the checkpoint lacks, is refused here. `batch_tokens` is the encode token
    budget; MTEB's `batch_size` caps the rows of one forward call. `name` is what MTEB files results under (default:
    `llama-encoder/<folder name>`).
    """

    def __init__(
        self,
        encoder: Encoder | str | os.PathLike,
        *,
        prompt_names: Mapping[str, str] | None = None,
        instructions: Mapping[str, str] | None = None,
        batch_tokens: int = 16384,
        name: str | None = None,
        device: str | None = None,
        dtype: str = "auto",
    ):
        if not isinstance(encoder, Encoder):
            encoder = Encoder.from_pretrained(encoder, device=device, dtype=dtype)
        self.encoder = encoder
        prompt_names, instructions = dict(prompt_names or {}), dict(instructions or {})
        unknown = {key: value for key, value in prompt_names.items()
                   if value not in encoder.prompts and value != NO_PROMPT}
        if unknown:
            raise InputError(f"{encoder.name_or_path} has no prompt named {', '.join(map(repr, unknown.values()))} "
                             f"(asked for {', '.join(unknown)}); its prompts: {', '.join(encoder.prompts) or 'none'}.")
        both = sorted(prompt_names.keys() & instructions.keys())
        if both:
            raise InputError(f"{', '.join(both)}: given both a prompt name and an instruction; give one.")
        defaults = {key: value for key, value in DEFAULT_PROMPT_NAMES.items()
                    if value in encoder.prompts and key not in instructions}
        self.prompt_names = {**defaults, **prompt_names}
        self.instructions = instructions
        self.batch_tokens = batch_tokens
        self.name = name or f"llama-encoder/{Path(str(encoder.name_or_path).rstrip('/')).name or 'model'}"

    def prompt_for(self, task_name: str | None, task_type: str | None, prompt_type: str | None) -> dict[str, str]:
        """The encode option a text of this task and prompt type gets: `{"prompt_name": ...}`,
        `{"instruction": ...}` or `{}` (no prompt), by the first MTEB key found (see the module docstring)."""
        if prompt_type not in (None, *PROMPT_TYPES):
            raise InputError(f"prompt_type must be query, document or None; got {prompt_type!r}.")
        keys = []
        for scope in (task_name, task_type):
            if scope:
                keys += [f"{scope}-{prompt_type}", scope] if prompt_type else [scope]
        keys += [prompt_type] if prompt_type else []
        for key in keys:
            if key in self.instructions and prompt_type != "document":
                return {"instruction": self.instructions[key]}
            if key in self.prompt_names:
                return {} if self.prompt_names[key] == NO_PROMPT else {"prompt_name": self.prompt_names[key]}
        return {}

    def encode(
        self,
        inputs: Iterable[Mapping[str, Sequence[str]]] | Iterable[str],
        *,
        task_metadata: Any = None,
        hf_split: str | None = None,
        hf_subset: str | None = None,
        prompt_type: Any = None,
        **kwargs: Any,
    ) -> np.ndarray:
        """Embed MTEB's inputs (its DataLoader of batches with a "text" field, or plain texts) for the task
        `task_metadata` (its `name` and `type` pick the prompt) and `prompt_type` (MTEB's PromptType or its value).
        `batch_size` caps the rows of a forward call and `show_progress_bar` is honoured; MTEB's other keywords are
        accepted and unused. Returns float32 `(n, hidden)`, in input order."""
        texts = []
        for item in inputs:
            if isinstance(item, Mapping):
                if "text" not in item:
                    raise InputError(
                        f"An MTEB batch has no 'text' field (it has {sorted(item)}); only text tasks can be encoded."
                    )
                texts.extend(item["text"])
            else:
                texts.append(item)
        prompt = self.prompt_for(getattr(task_metadata, "name", None), getattr(task_metadata, "type", None),
                                 getattr(prompt_type, "value", prompt_type))
        return self.encoder.encode(
            texts, **prompt, batch_tokens=self.batch_tokens, max_batch_size=kwargs.get("batch_size") or 512,
            show_progress=bool(kwargs.get("show_progress_bar", False)),
        )

    def similarity(self, embeddings1, embeddings2):
        """Cosine similarity of every row of `embeddings1` with every row of `embeddings2` (MTEB's `cos_sim`)."""
        from mteb.similarity_functions import cos_sim

        return cos_sim(embeddings1, embeddings2)

    def similarity_pairwise(self, embeddings1, embeddings2):
        """Cosine similarity of each row of `embeddings1` with the same row of `embeddings2`."""
        from mteb.similarity_functions import pairwise_cos_sim

        return pairwise_cos_sim(embeddings1, embeddings2)

    @property
    def mteb_model_meta(self):
        """MTEB's ModelMeta for this checkpoint: its name, size, embedding width, context, cosine similarity."""
        _require_mteb()
        from mteb.models.model_meta import ModelMeta, ScoringFunction

        model = self.encoder.model
        return ModelMeta.create_empty({
            "name": self.name,
            "n_parameters": sum(p.numel() for p in model.parameters()),
            "max_tokens": self.encoder.max_seq_length,
            "embed_dim": self.encoder.dimension,
            "open_weights": True,
            "framework": ["PyTorch"],
            "similarity_fn_name": ScoringFunction.COSINE,
            "use_instructions": bool(self.instructions or self.prompt_names),
        })


def _task_metadata(name: str, kind: str, main_score: str, source: Path, description: str):
    from mteb.abstasks.task_metadata import TaskMetadata

    return TaskMetadata(
        name=name, description=description, type=kind, main_score=main_score, category="t2t", modalities=["text"],
        eval_splits=["test"], eval_langs=["eng-Latn"], dataset={"path": str(source), "revision": "local"},
    )


def local_retrieval_task(path: str | os.PathLike | Sequence[str | os.PathLike], *, name: str | None = None):
    """An MTEB retrieval task (main score nDCG@10) over local BEIR files: a folder (as `evaluate --retrieval` takes
    it) or `(corpus, queries, qrels)`, read with `evaluate.read_retrieval`. Like `evaluate`, it ranks every query
    that has a relevant document against the whole corpus, documents as title + " " + text. `name` defaults to
    the folder's name."""
    from .evaluate import positive_queries, read_retrieval, retrieval_files

    _require_mteb()
    from datasets import Dataset
    from mteb.abstasks.retrieval import AbsTaskRetrieval
    from mteb.abstasks.retrieval_dataset_loaders import RetrievalSplitData

    files = retrieval_files(path)
    corpus, queries, qrels = read_retrieval(*files)
    evaluated = positive_queries(queries, qrels)
    name = name or files[0].parent.name

    class LocalRetrieval(AbsTaskRetrieval):
        metadata = _task_metadata(name, "Retrieval", "ndcg_at_10", files[0].parent,
                                  f"Local BEIR-style retrieval files ({', '.join(map(str, files))}).")

        def load_data(self, num_proc: int | None = None, **kwargs: Any) -> None:
            split = RetrievalSplitData(
                corpus=Dataset.from_dict({"id": list(corpus), "text": list(corpus.values())}),
                queries=Dataset.from_dict({"id": evaluated, "text": [queries[query] for query in evaluated]}),
                # only positive grades: what evaluate's nDCG and recall count (a grade <= 0 gains nothing)
                relevant_docs={q: {d: g for d, g in qrels[q].items() if g > 0} for q in evaluated},
                top_ranked=None,
            )
            self.dataset = {"default": {"test": split}}
            self.data_loaded = True

    return LocalRetrieval()


def local_sts_task(path: str | os.PathLike, *, name: str | None = None):
    """An MTEB STS task (main score cosine Spearman) over a local STS file as `evaluate --sts` reads it
    (`readers.read_sts`). `name` defaults to the file's name without its suffix."""
    from ..readers import read_sts

    _require_mteb()
    from datasets import Dataset, DatasetDict
    from mteb.abstasks.sts import AbsTaskSTS

    path = Path(path)
    pairs = read_sts(path)
    scores = [score for _, _, score in pairs]

    class LocalSTS(AbsTaskSTS):
        metadata = _task_metadata(name or path.stem, "STS", "cosine_spearman", path, f"Local STS pairs ({path}).")
        min_score, max_score = min(scores), max(scores)  # MTEB rescales gold scores linearly: correlations keep

        def load_data(self, num_proc: int | None = None, **kwargs: Any) -> None:
            columns = {"sentence1": [a for a, _, _ in pairs], "sentence2": [b for _, b, _ in pairs], "score": scores}
            self.dataset = DatasetDict({"test": Dataset.from_dict(columns)})
            self.data_loaded = True

    return LocalSTS()


__all__ = ["DEFAULT_PROMPT_NAMES", "MTEBEncoder", "local_retrieval_task", "local_sts_task"]
