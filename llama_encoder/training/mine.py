"""Hard-negative mining (`llama-encoder mine`): give each query/positive record the documents an encoder ranks
closest to its query without being its positive, through sentence-transformers' `mine_hard_negatives`.

The candidates are every document of the records (positives and existing negatives) plus an optional extra corpus.
Queries are embedded behind their task instruction (attended to, not pooled, as training embeds them); documents
behind no prompt. A candidate is kept only if it passes the margin and score rules of `MiningSettings`, so
near-duplicates of the positive (likely false negatives) are left out. The output is the jsonl that training reads.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import json
import logging
import math
import os
import random
import tempfile
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ..atomic import atomic_file, check_destination
from ..configuration_llama_encoder import DEFAULT_INSTRUCTION_TEMPLATE, fill_instruction_template
from ..errors import InputError, MissingDependencyError, MissingInputError, NotAFolderError
from ..prompts import choose_prompt
from ..readers import jsonl_records
from .data import Triple, read_supervised, read_texts

if TYPE_CHECKING:
    from sentence_transformers import SentenceTransformer

logger = logging.getLogger(__name__)

SAMPLING_STRATEGIES = ("top", "random")


@dataclass
class MiningSettings:
    """Which candidates become a query's hard negatives (sentence-transformers' `mine_hard_negatives` rules).

    For each query the `range_max` documents closest to it (cosine similarity; its positives and a document equal
    to the query text are not counted) are the candidates. Candidates scoring above `positive - |positive| *
    relative_margin` (that is `(1 - relative_margin) * positive` for a positive score), above `positive -
    absolute_margin`, above `max_score` or below `min_score` are dropped as likely false negatives or as too easy
    (with several positives, the lowest positive score is used). Of those left, the `range_min` best are skipped
    and `num_negatives` are taken: the best ones (`sampling_strategy` "top") or a random sample ("random", drawn
    with `seed`, then in score order). A query left with fewer than `num_negatives` is dropped.
    """

    num_negatives: int = 3
    range_min: int = 0
    range_max: int = 100
    relative_margin: float | None = 0.05
    absolute_margin: float | None = None
    max_score: float | None = None
    min_score: float | None = None
    sampling_strategy: str = "top"
    batch_size: int = 32
    use_faiss: bool = False
    seed: int | None = 0

    @classmethod
    def from_mapping(cls, values: Mapping, *, where: str = "mining settings") -> MiningSettings:
        """Settings from a mapping (e.g. a recipe's `mining` table), validated; an unknown key is an `InputError`
        that names `where` and the known keys."""
        known = {item.name for item in dataclasses.fields(cls)}
        unknown = sorted(str(key) for key in values if key not in known)
        if unknown:
            raise InputError(f"{where}: unknown mining setting(s) {', '.join(unknown)}; known: "
                             f"{', '.join(sorted(known))}.")
        settings = cls(**values)
        settings.validate()
        return settings

    def validate(self) -> None:
        """Raise `InputError` naming the first bad setting (and its command-line option) and what to give."""

        def bad(name: str, need: str) -> InputError:
            value = getattr(self, name)
            return InputError(f"{name} (--{name.replace('_', '-')}) must be {need}; got {value!r}.")

        def is_int(value) -> bool:
            return isinstance(value, int) and not isinstance(value, bool)

        def is_number(value) -> bool:
            return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)

        if not is_int(self.num_negatives) or self.num_negatives < 1:
            raise bad("num_negatives", "a whole number of at least 1")
        if not is_int(self.range_min) or self.range_min < 0:
            raise bad("range_min", "a whole number of at least 0 (0 skips no candidate)")
        if not is_int(self.range_max) or self.range_max < 1:
            raise bad("range_max", "a whole number of at least 1")
        if self.range_min >= self.range_max:
            raise InputError(f"range_min (--range-min, {self.range_min}) must be smaller than range_max "
                             f"(--range-max, {self.range_max}); raise --range-max or lower --range-min.")
        if self.num_negatives > self.range_max - self.range_min:
            raise InputError(f"num_negatives (--num-negatives, {self.num_negatives}) does not fit in the "
                             f"{self.range_max - self.range_min} candidates between --range-min {self.range_min} "
                             f"and --range-max {self.range_max}; raise --range-max or lower --num-negatives.")
        for name in ("relative_margin", "absolute_margin"):
            value = getattr(self, name)
            if value is not None and not (is_number(value) and 0 <= value < 1):
                raise bad(name, "a number in [0, 1), or none to turn the rule off")
        for name in ("max_score", "min_score"):
            value = getattr(self, name)
            if value is not None and not (is_number(value) and -1 <= value <= 1):
                raise bad(name, "a cosine similarity in [-1, 1], or none to turn the rule off")
        if self.max_score is not None and self.min_score is not None and self.min_score >= self.max_score:
            raise InputError(f"min_score (--min-score, {self.min_score}) must be below max_score (--max-score, "
                             f"{self.max_score}); no candidate could pass both.")
        if self.sampling_strategy not in SAMPLING_STRATEGIES:
            raise bad("sampling_strategy", f"one of {', '.join(SAMPLING_STRATEGIES)}")
        if not is_int(self.batch_size) or self.batch_size < 1:
            raise bad("batch_size", "a whole number of at least 1")
        if not isinstance(self.use_faiss, bool):
            raise bad("use_faiss", "true or false")
        if self.seed is not None and not is_int(self.seed):
            raise bad("seed", "a whole number, or none")

    def loosen_hint(self) -> str:
        """The options to change when too few candidates pass, as a sentence fragment."""
        hints = [f"raise --range-max (now {self.range_max})"]
        if self.range_min:
            hints.append(f"lower --range-min (now {self.range_min})")
        if self.relative_margin:
            hints.append(f"lower --relative-margin (now {self.relative_margin})")
        if self.absolute_margin:
            hints.append(f"lower --absolute-margin (now {self.absolute_margin})")
        if self.max_score is not None:
            hints.append(f"raise --max-score (now {self.max_score})")
        if self.min_score is not None:
            hints.append(f"lower --min-score (now {self.min_score})")
        hints.append(f"lower --num-negatives (now {self.num_negatives}), or add documents with --corpus")
        return ", ".join(hints)


def instruction_template(model: SentenceTransformer) -> str:
    """The instruction template of a sentence-transformers model built on this package's encoder (its first
    module's config, as a checkpoint or the training module holds it); the default template otherwise."""
    first = model[0] if len(model) else None
    for owner in (first, getattr(first, "auto_model", None), getattr(first, "model", None)):
        template = getattr(getattr(owner, "config", None), "instruction_template", None)
        if isinstance(template, str) and "{instruction}" in template:
            return template
    logger.warning("The model records no instruction template; using the default %r", DEFAULT_INSTRUCTION_TEMPLATE)
    return DEFAULT_INSTRUCTION_TEMPLATE


def _documents(triples: Sequence[Triple], corpus: Sequence[str] | None) -> list[str]:
    """Every distinct document, in first-seen order: the records' positives, their negatives, then the corpus."""
    documents = dict.fromkeys(t.positive for t in triples)
    documents.update(dict.fromkeys(n for t in triples for n in t.negatives))
    for index, text in enumerate(corpus or ()):
        if not isinstance(text, str) or not text.strip():
            raise InputError(f"Corpus document {index} must be a non-empty string; found {text!r}.")
        documents.setdefault(text, None)
    return list(documents)


def _require_datasets(settings: MiningSettings) -> None:
    try:
        import datasets  # noqa: F401
    except ImportError:
        raise MissingDependencyError("Mining needs the `datasets` package (sentence-transformers' "
                                     "mine_hard_negatives builds on it): pip install datasets") from None
    if settings.use_faiss:
        try:
            import faiss  # noqa: F401
        except ImportError:
            raise MissingDependencyError("--use-faiss needs faiss: pip install faiss-cpu (or faiss-gpu), or leave "
                                         "--use-faiss out.") from None


@contextlib.contextmanager
def _quiet_library(show_progress: bool):
    """`mine_hard_negatives` prints its statistics and always shows its encoding bars: its stdout goes to the log,
    and without `show_progress` its stderr (the bars) to the debug log."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.ExitStack() as stack:
        stack.enter_context(contextlib.redirect_stdout(out))
        stack.enter_context(warnings.catch_warnings())  # its statistics of fewer than two scores warn
        warnings.filterwarnings("ignore", message=r"std\(\): degrees of freedom", category=UserWarning)
        if not show_progress:
            stack.enter_context(contextlib.redirect_stderr(err))
        try:
            yield
        finally:
            stack.close()
            for line in out.getvalue().splitlines():  # its rule counts to info; its table and cache notes to debug
                if line.strip():
                    level = logging.INFO if line.startswith("Skipped") else logging.DEBUG
                    logger.log(level, "mine_hard_negatives: %s", line.rstrip())
            if err.getvalue().strip():
                logger.debug("mine_hard_negatives (stderr): %s", err.getvalue().strip())


def mine_negatives(
    model: SentenceTransformer,
    triples: Sequence[Triple],
    *,
    corpus: Sequence[str] | None = None,
    settings: MiningSettings | None = None,
    query_prompt: str | None = None,
    instruction: str | None = None,
    show_progress: bool = True,
) -> list[Triple]:
    """Mine `settings.num_negatives` hard negatives for each record with `model` (a `SentenceTransformer`).

    The candidates are the records' positives and negatives plus `corpus`; a record's existing negatives are
    replaced. Each query is embedded behind its record's `instruction` written with the model's instruction
    template, else behind `query_prompt` (verbatim) or the template filled with `instruction` (at most one of the
    two; neither: no prompt, as training does); documents behind no prompt (the model's saved prompts are not
    used). Records sharing a query text share its positives: none of them, and no copy of one, is ever mined as a
    negative. Returns the records that got enough negatives, in input order, each with its negatives in score order
    (best first); the dropped ones are counted in the log. Raises `InputError` when no record gets enough.

    Several prompts mean one `mine_hard_negatives` call per prompt; the corpus is then embedded once and cached in
    a temporary folder (4 bytes per dimension per document). The model's train/eval mode is restored afterwards.
    """
    from sentence_transformers.util import mine_hard_negatives

    settings = settings or MiningSettings()
    settings.validate()
    triples = list(triples)
    if not triples:
        raise InputError("No records to mine negatives for; give query/positive records.")
    for index, triple in enumerate(triples):
        if not isinstance(triple, Triple):
            raise InputError(f"Record {index} is a {type(triple).__name__}, not a Triple.")
    _require_datasets(settings)
    documents = _documents(triples, corpus)
    if len(documents) <= settings.num_negatives:
        raise InputError(f"Only {len(documents)} distinct documents for {settings.num_negatives} negatives per query "
                         "(a query's own positive is never one); add documents with --corpus or lower "
                         "--num-negatives.")

    template = instruction_template(model)
    default_prompt = choose_prompt({}, lambda text: fill_instruction_template(template, text), prompt=query_prompt,
                                   prompt_name=None, instruction=instruction) or ""

    def prompt_of(triple: Triple) -> str:
        return fill_instruction_template(template, triple.instruction) if triple.instruction else default_prompt

    # The positives of each query text over all records: never a negative for that query, whatever its prompt.
    positives_of: dict[str, set[str]] = {}
    for triple in triples:
        positives_of.setdefault(triple.query, set()).add(triple.positive)
    # One call per prompt; within one, mine_hard_negatives keeps the positives of its own records out. Positives of
    # the same query under another prompt are filtered afterwards, so those queries ask for as many more.
    calls: dict[tuple[str, int], dict[tuple[str, str], None]] = {}
    in_prompt: dict[tuple[str, str], set[str]] = {}
    for triple in triples:
        in_prompt.setdefault((prompt_of(triple), triple.query), set()).add(triple.positive)
    for triple in triples:
        prompt = prompt_of(triple)
        extra = len(positives_of[triple.query] - in_prompt[(prompt, triple.query)])
        calls.setdefault((prompt, extra), {})[(triple.query, triple.positive)] = None

    window = settings.range_max - settings.range_min
    found: dict[tuple[str, str, str], tuple[str, ...]] = {}
    rng = random.Random(settings.seed)
    was_training = model.training
    saved_state = random.getstate()
    if settings.seed is not None:
        random.seed(settings.seed)  # mine_hard_negatives samples with the global generator
    try:
        with contextlib.ExitStack() as stack:
            cache = None  # one pass needs no cache; several share the corpus embeddings through it
            if len(calls) > 1:
                cache = stack.enter_context(tempfile.TemporaryDirectory(prefix="llama-encoder-mine-"))
            bar = _progress(calls.items(), show_progress and len(calls) > 1)
            for (prompt, extra), pairs in bar:
                found.update(_mine_call(mine_hard_negatives, model, prompt, list(pairs), documents, settings,
                                        min(settings.num_negatives + extra, window), positives_of, rng, cache,
                                        show_progress))
    finally:
        random.setstate(saved_state)
        model.train(was_training)

    mined = []
    for triple in triples:
        negatives = found.get((prompt_of(triple), triple.query, triple.positive))
        if negatives is not None:
            mined.append(dataclasses.replace(triple, negatives=negatives))
    dropped = len(triples) - len(mined)
    if not mined:
        raise InputError(f"No query kept {settings.num_negatives} candidates that pass the mining rules; "
                         f"{settings.loosen_hint()}.")
    if dropped:
        logger.warning("Dropped %d of %d records: fewer than %d candidates passed the mining rules (%s)", dropped,
                       len(triples), settings.num_negatives, settings.loosen_hint())
    logger.info("Mined %d negatives for %d of %d records", settings.num_negatives, len(mined), len(triples))
    return mined


def _progress(items, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(list(items), desc="Mining (one pass per prompt)", unit="prompt", disable=not enabled)


def _mine_call(mine_hard_negatives, model, prompt: str, pairs: list[tuple[str, str]], documents: list[str],
               settings: MiningSettings, request: int, positives_of: dict[str, set[str]], rng: random.Random,
               cache: str | None, show_progress: bool) -> dict[tuple[str, str, str], tuple[str, ...]]:
    """One `mine_hard_negatives` pass over the (query, positive) `pairs` that share `prompt`, asking for `request`
    negatives each; returns (prompt, query, positive) -> `num_negatives` negatives for the pairs that got enough."""
    from datasets import Dataset

    dataset = Dataset.from_dict({"query": [q for q, _ in pairs], "positive": [p for _, p in pairs]})
    with _quiet_library(show_progress):
        result = mine_hard_negatives(
            dataset, model, anchor_column_name="query", positive_column_name="positive", corpus=documents,
            range_min=settings.range_min, range_max=settings.range_max, max_score=settings.max_score,
            min_score=settings.min_score, absolute_margin=settings.absolute_margin,
            relative_margin=settings.relative_margin, num_negatives=request,
            sampling_strategy=settings.sampling_strategy, query_prompt=prompt, corpus_prompt="",
            output_format="n-tuple", batch_size=settings.batch_size, use_faiss=settings.use_faiss, verbose=True,
            cache_folder=cache,
        )
    columns = [f"negative_{i}" for i in range(1, request + 1)]
    found = {}
    for row in result:
        query = row["query"]
        # mine_hard_negatives keeps this prompt's positives out; this also drops those of other prompts' records
        kept = [row[c] for c in columns if row[c] not in positives_of[query] and row[c] != query]
        if len(kept) < settings.num_negatives:
            continue
        if len(kept) > settings.num_negatives:
            if settings.sampling_strategy == "random":
                chosen = set(rng.sample(range(len(kept)), settings.num_negatives))
                kept = [text for index, text in enumerate(kept) if index in chosen]
            else:
                kept = kept[: settings.num_negatives]
        found[(prompt, query, row["positive"])] = tuple(kept)
    return found


# --- reading and writing -------------------------------------------------------------------------------------------


def read_mining_data(paths: str | os.PathLike | Sequence) -> list[Triple]:
    """Query/positive records from jsonl or csv files (`read_supervised`'s formats), in file order. Scored pairs
    (STS) are refused: mining needs to know which document is the positive."""
    paths = [Path(p) for p in (paths if isinstance(paths, (list, tuple)) else [paths])]
    triples: list[Triple] = []
    for path in paths:
        data = read_supervised(path)
        if data.pairs:
            raise InputError(f"{path} holds scored pairs (STS: score, sentence1, sentence2); mining needs query/"
                             "positive records: a jsonl with query, positive (optional negatives, instruction) or a "
                             "csv with a query,positive header.")
        triples.extend(data.triples)
    return triples


def read_corpus(paths: str | os.PathLike | Sequence) -> list[str]:
    """Extra candidate documents: a BEIR corpus (`.jsonl` records with `text` and an optional `title`, read as
    `title + " " + text`) or a text file with one document per line (blank lines skipped)."""
    paths = [Path(p) for p in (paths if isinstance(paths, (list, tuple)) else [paths])]
    texts: list[str] = []
    for path in paths:
        if not path.is_file():
            raise MissingInputError(f"No corpus at {path}; give a text file with one document per line, or a BEIR "
                                    "corpus.jsonl.")
        if path.suffix != ".jsonl":
            texts.extend(read_texts(path))
            continue
        before = len(texts)
        for line, record in jsonl_records(path, ("text",)):
            text, title = record["text"], record.get("title")
            if not isinstance(text, str) or not text.strip():
                raise InputError(f"{path}:{line}: text must be a non-empty string; found {text!r}.")
            if title is not None and not isinstance(title, str):
                raise InputError(f"{path}:{line}: title must be a string; found {title!r}.")
            texts.append(f"{title} {text}" if title and title.strip() else text)
        if len(texts) == before:
            raise InputError(f"{path} holds no documents; check that it is the right file.")
    return texts


def triple_record(triple: Triple) -> dict:
    """The jsonl record training reads for `triple`."""
    record = {"query": triple.query, "positive": triple.positive, "negatives": list(triple.negatives)}
    if triple.instruction is not None:
        record["instruction"] = triple.instruction
    return record


def write_triples(triples: Sequence[Triple], out: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Write `triples` as jsonl to `out`, through a temporary file beside it renamed into place once complete."""
    with atomic_file(out, overwrite=overwrite) as tmp, open(tmp, "w", encoding="utf-8") as handle:
        for triple in triples:
            handle.write(json.dumps(triple_record(triple), ensure_ascii=False) + "\n")
    return Path(out).expanduser().absolute()


# --- command line --------------------------------------------------------------------------------------------------

MINE_EPILOG = """examples:
  llama-encoder mine --model my-encoder --data pairs.jsonl --out mined.jsonl
      3 negatives per query from the file's own documents, NV-Retriever's rule (relative margin 0.05)
  llama-encoder mine --model my-encoder --data pairs.jsonl --corpus corpus.jsonl --num-negatives 7 \\
      --range-min 10 --range-max 50 --instruction "Given a question, retrieve passages that answer it" \\
      --out mined.jsonl
      more candidates from a BEIR corpus, the 10 closest survivors skipped, queries behind an instruction
"""


def _optional_float(text: str) -> float | None:
    if text.strip().lower() in ("none", "off"):
        return None
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or none, got {text!r}") from None


def _optional_int(text: str) -> int | None:
    if text.strip().lower() == "none":
        return None
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number or none, got {text!r}") from None


def add_mine_parser(subparsers) -> None:
    """Add `mine` to the top-level `llama-encoder` parser."""
    defaults = MiningSettings()
    parser = subparsers.add_parser(
        "mine", help="mine hard negatives for query/positive records with an encoder checkpoint",
        description="Give each query/positive record the hard negatives an encoder checkpoint ranks closest to its "
        "query (sentence-transformers' mine_hard_negatives). Candidates are the records' positives and negatives "
        "plus --corpus; a candidate too close to the positive is left out as a likely false negative, and a query's "
        "positives are never its negatives. Queries are embedded behind their instruction, documents behind no "
        "prompt. Writes the jsonl `llama-encoder train supervised --data` reads (existing negatives are replaced); "
        "records that keep too few candidates are dropped. Every input is checked before the model is loaded.",
        epilog=MINE_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    io_group = parser.add_argument_group("input and output")
    io_group.add_argument("--model", required=True, metavar="CHECKPOINT",
                          help="an encoder checkpoint folder (written by `llama-encoder convert`), loaded with "
                          "SentenceTransformer(..., trust_remote_code=True)")
    io_group.add_argument("--data", required=True, action="append", metavar="FILE",
                          help="query/positive records: a jsonl with query, positive and optional negatives and "
                          "instruction, or a csv with a query,positive header; repeat for several files (scored "
                          "STS pairs are refused)")
    io_group.add_argument("--corpus", action="append", metavar="FILE",
                          help="extra candidate documents: a text file with one document per line, or a BEIR "
                          "corpus.jsonl (text, optional title); repeat for several (default: only the records' own "
                          "positives and negatives)")
    io_group.add_argument("--out", required=True, metavar="FILE.jsonl",
                          help="the jsonl to write (query, positive, negatives, instruction when the record has one); "
                          "written beside itself and renamed into place when complete")
    io_group.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    io_group.add_argument("--instruction", metavar="TEXT",
                          help="task instruction for queries whose record has none, written with the checkpoint's "
                          "instruction template (default: no prompt, as training does; documents never get one)")
    rules = parser.add_argument_group("mining rules")
    rules.add_argument("--num-negatives", type=int, default=defaults.num_negatives, metavar="N",
                       help=f"negatives per query; a query with fewer candidates left is dropped (default: "
                       f"{defaults.num_negatives})")
    rules.add_argument("--range-min", type=int, default=defaults.range_min, metavar="N",
                       help="skip the N best candidates left after the rules below, e.g. to step over unlabelled "
                       f"positives (default: {defaults.range_min})")
    rules.add_argument("--range-max", type=int, default=defaults.range_max, metavar="N",
                       help="candidates considered per query: the N documents closest to it, not counting its "
                       f"positives (default: {defaults.range_max})")
    rules.add_argument("--relative-margin", type=_optional_float, default=defaults.relative_margin, metavar="M",
                       help="drop candidates scoring above (1 - M) x the positive's score (for a negative positive "
                       "score: positive - |positive| x M), as likely false negatives; in [0, 1), or none (default: "
                       f"{defaults.relative_margin}, NV-Retriever's TopK-PercPos)")
    rules.add_argument("--absolute-margin", type=_optional_float, default=defaults.absolute_margin, metavar="M",
                       help="drop candidates scoring above the positive's score minus M; in [0, 1), or none "
                       "(default: none)")
    rules.add_argument("--max-score", type=_optional_float, default=defaults.max_score, metavar="S",
                       help="drop candidates whose cosine similarity to the query is above S (default: none)")
    rules.add_argument("--min-score", type=_optional_float, default=defaults.min_score, metavar="S",
                       help="drop candidates whose cosine similarity to the query is below S (default: none)")
    rules.add_argument("--sampling-strategy", choices=SAMPLING_STRATEGIES, default=defaults.sampling_strategy,
                       help="top: the best candidates left; random: a random sample of them (default: "
                       f"{defaults.sampling_strategy})")
    rules.add_argument("--seed", type=_optional_int, default=defaults.seed, metavar="N",
                       help=f"seed of --sampling-strategy random, or none (default: {defaults.seed})")
    run = parser.add_argument_group("running")
    run.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda when available)")
    run.add_argument("--batch-size", type=int, default=defaults.batch_size, metavar="N",
                     help=f"texts per encoding batch (default: {defaults.batch_size})")
    run.add_argument("--use-faiss", action="store_true",
                     help="search candidates with faiss (needs faiss-cpu or faiss-gpu; faster for large corpora)")
    run.add_argument("--no-progress", action="store_true", help="show no progress bars")
    parser.set_defaults(handler=run_mine)


def settings_from_args(args: argparse.Namespace) -> MiningSettings:
    """The validated `MiningSettings` of a parsed `llama-encoder mine` command line."""
    names = {item.name for item in dataclasses.fields(MiningSettings)}
    settings = MiningSettings(**{name: getattr(args, name) for name in names})
    settings.validate()
    return settings


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve() or (a.exists() and b.exists() and os.path.samefile(a, b))
    except OSError:
        return False


def _load_model(path: str, device: str | None) -> SentenceTransformer:
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(path, trust_remote_code=True, device=device)


def run_mine(args: argparse.Namespace) -> int:
    """Check every input, load the checkpoint, mine, write --out, and print a one-line JSON summary."""
    start = time.perf_counter()
    settings = settings_from_args(args)
    out = Path(args.out)
    if out.suffix != ".jsonl":
        raise InputError(f"--out {out} must end in .jsonl: training reads the mined records by that suffix.")
    for given in [*args.data, *(args.corpus or [])]:
        if _same_file(out, Path(given)):
            raise InputError(f"--out {out} is also an input ({given}); write the mined records to another file.")
    check_destination(out, overwrite=args.overwrite, kind="file")
    model_path = Path(args.model)
    if not model_path.exists():
        raise MissingInputError(f"No checkpoint at {model_path}; give a folder written by `llama-encoder convert`.")
    if not model_path.is_dir():
        raise NotAFolderError(f"--model {model_path} is a file; give a checkpoint folder.")
    if not (model_path / "modules.json").is_file():
        raise InputError(f"{model_path} has no modules.json, so it is not a Sentence Transformers checkpoint; give "
                         "a folder written by `llama-encoder convert`.")
    triples = read_mining_data(args.data)
    corpus = read_corpus(args.corpus) if args.corpus else None
    _require_datasets(settings)
    logger.info("Read %d records from %d file(s)%s", len(triples), len(args.data),
                f" and {len(corpus)} corpus documents" if corpus else "")
    model = _load_model(str(model_path), args.device)
    mined = mine_negatives(model, triples, corpus=corpus, settings=settings, instruction=args.instruction,
                           show_progress=not args.no_progress)
    written = write_triples(mined, out, overwrite=args.overwrite)
    summary = {"queries": len(triples), "written": len(mined), "dropped": len(triples) - len(mined),
               "negatives_per_query": settings.num_negatives, "seconds": round(time.perf_counter() - start, 2),
               "out": str(written)}
    print(json.dumps(summary))
    return 0


__all__ = [
    "MiningSettings",
    "add_mine_parser",
    "instruction_template",
    "mine_negatives",
    "read_corpus",
    "read_mining_data",
    "run_mine",
    "settings_from_args",
    "triple_record",
    "write_triples",
]
