"""What each ingredient of the default adapters' supervised stage buys, at reduced scale, on a SQuAD-dev subset.

Every variant starts from the same MNTP adapter and trains the retrieval part of the default mix (SQuAD and NQ, the
subsets `default_mix.py` wrote with one mined hard negative each) on the same examples for the same number of steps,
changing one ingredient at a time; each is converted and scored by `llama-encoder evaluate` on a fixed subset of
SQuAD dev as retrieval (runs of consecutive paragraphs, so same-article distractors remain, and a seeded sample of
their questions):

  reference        mined hard negatives, task instruction on the queries, batch 32
  no-negatives     in-batch negatives only (the same records, `max_negatives: 0`)
  no-instructions  no instruction at training (and so none at evaluation: the checkpoint saves no query prompt)
  batch-64         batch 64 through GradCache mini-batches of 32, half the steps: the same examples, twice the
                   in-batch negatives per query
  mntp-only        no supervised stage (where the ingredients start from)

    python benchmarks/mix_ablations.py --workdir runs/default          # ~1 hour on 2 cores at the defaults
    python benchmarks/mix_ablations.py --workdir runs/default --variants reference --seeds 42 7 13

`--seeds` trains a variant once per seed (LoRA init, data order, dropout) to size the noise between runs; the table
then shows each seed and the spread (max - min) of a variant's nDCG@10.

The workdir is the one `default_adapters.py train` filled (mntp/, data/). Each variant is skipped when its scores
exist (a run cut short continues where it stopped). Figures are relative: small runs on a subset say which way an
ingredient moves the score and roughly how far, not the full stage's figures. Prints the table with the host line
and writes WORKDIR/ablations/results.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from default_adapters import BenchmarkError, _cli, _run, host  # noqa: E402
from default_mix import RETRIEVAL_INSTRUCTION  # noqa: E402

from llama_encoder.training.arguments import TrainingArguments  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DEFAULT_SQUAD_DEV = REPO.parent / "shared/data/squad-dev-ir"
SEED = 22  # the dev subset's sample
TRAIN_SEED = next(f.default for f in dataclasses.fields(TrainingArguments) if f.name == "seed")
"""`train`'s default seed (read from its arguments, not restated): runs at it keep the variant's plain name."""
TRAIN_ARGS = ("--lr", "3e-4", "--max-length", "128", "--group-by-length", "--lora-dropout", "0",
              "--dtype", "auto", "--save-every", "10", "--keep-checkpoints", "1", "--log-every", "4", "--no-progress")
VARIANTS = {  # name: (mined negatives kept, instruction, batch size, GradCache mini-batch, steps as a share)
    "reference": (True, True, 32, None, 1.0),
    "no-negatives": (False, True, 32, None, 1.0),
    "no-instructions": (True, False, 32, None, 1.0),
    "batch-64": (True, True, 64, 32, 0.5),
}


def dev_subset(source: Path, out: Path, runs: int, run_length: int, queries: int) -> Path:
    """A BEIR folder: `runs` runs of `run_length` consecutive paragraphs of `source` (SQuAD dev lists an article's
    paragraphs in order) and a seeded sample of `queries` of their questions."""
    if (out / "qrels.tsv").is_file():
        return out
    corpus = [json.loads(line) for line in (source / "corpus.jsonl").read_text().splitlines() if line.strip()]
    rng = random.Random(SEED)
    starts = sorted(rng.sample(range(0, len(corpus) - run_length, run_length), runs))
    kept = [doc for start in starts for doc in corpus[start:start + run_length]]
    ids = {doc["_id"] for doc in kept}
    qrels = [line.split("\t") for line in (source / "qrels.tsv").read_text().splitlines()[1:] if line.strip()]
    relevant = sorted({q for q, doc, _ in qrels if doc in ids})
    chosen = set(rng.sample(relevant, min(queries, len(relevant))))
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    (tmp / "corpus.jsonl").write_text("".join(json.dumps(doc) + "\n" for doc in kept))
    (tmp / "queries.jsonl").write_text("".join(
        line + "\n" for line in (source / "queries.jsonl").read_text().splitlines()
        if line.strip() and json.loads(line)["_id"] in chosen))
    (tmp / "qrels.tsv").write_text("query-id\tcorpus-id\tscore\n" + "".join(
        "\t".join(row) + "\n" for row in qrels if row[0] in chosen and row[1] in ids))
    tmp.rename(out)
    return out


def recipe(workdir: Path, negatives: bool, instruction: bool) -> dict:
    entries = []
    for name, file in (("squad", "squad-2400-mined.jsonl"), ("nq", "nq-train-600-mined.jsonl")):
        path = workdir / "data" / file
        if not path.is_file():
            raise BenchmarkError(f"{path} not found; run `default_adapters.py train` (it writes the mix) first")
        entry = {"name": name, "path": str(path), "max_negatives": 1 if negatives else 0}
        if instruction:
            entry.update(prompt_name="query", instruction=RETRIEVAL_INSTRUCTION)
        entries.append(entry)
    return {"datasets": entries}


def run_name(variant: str, seed: int) -> str:
    """A variant's folder and results key: the plain name at the default seed, `name-seedN` otherwise."""
    return variant if seed == TRAIN_SEED else f"{variant}-seed{seed}"


def spreads(variants: dict) -> dict[str, float]:
    """nDCG@10 max - min over the seeds of each variant run with more than one."""
    by_variant: dict[str, list[float]] = {}
    for name, scores in variants.items():
        by_variant.setdefault(name.split("-seed")[0], []).append(scores["ndcg@10"])
    return {name: max(v) - min(v) for name, v in by_variant.items() if len(v) > 1}


def _scores(checkpoint: Path, subset: Path, out: Path) -> dict:
    if not out.is_file():
        _run([_cli(), "evaluate", str(checkpoint), "--retrieval", f"squad-dev-subset={subset}", "--json", str(out),
              "--overwrite"])
    metrics = json.loads(out.read_text())["sets"]["squad-dev-subset"]["metrics"]
    return {k: metrics[k] for k in ("ndcg@10", "recall@100")}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, required=True,
                        help="the folder `default_adapters.py train` filled (mntp/, data/)")
    parser.add_argument("--squad-dev", type=Path, default=DEFAULT_SQUAD_DEV,
                        help=f"SQuAD dev as a BEIR folder (default: {DEFAULT_SQUAD_DEV})")
    parser.add_argument("--steps", type=int, default=24,
                        help="optimizer steps at batch 32 (batch-64 takes half as many; default: 24)")
    parser.add_argument("--runs", type=int, default=10, help="runs of consecutive dev paragraphs (default: 10)")
    parser.add_argument("--run-length", type=int, default=50, help="paragraphs per run (default: 50)")
    parser.add_argument("--queries", type=int, default=1000, help="questions sampled (default: 1000)")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads for training (default: 2)")
    parser.add_argument("--variants", nargs="+", choices=[*VARIANTS, "mntp-only"],
                        default=[*VARIANTS, "mntp-only"], help="which variants (default: all)")
    parser.add_argument("--seeds", nargs="+", type=int, default=[TRAIN_SEED],
                        help=f"train each variant once per seed, to size the noise (default: {TRAIN_SEED}, "
                             "`train`'s default); mntp-only has no training and ignores them")
    args = parser.parse_args(argv)
    try:
        mntp = args.workdir / "mntp"
        if not (mntp / "adapter_model.safetensors").is_file():
            raise BenchmarkError(f"{mntp} holds no adapter; run `default_adapters.py train` first")
        if not (args.squad_dev / "corpus.jsonl").is_file():
            raise BenchmarkError(f"{args.squad_dev} is not a BEIR folder; pass --squad-dev")
        root = args.workdir / "ablations"
        subset = dev_subset(args.squad_dev, root / "squad-dev-subset", args.runs, args.run_length, args.queries)
        subset_info = {"paragraphs": sum(1 for _ in (subset / "corpus.jsonl").open()),
                       "queries": sum(1 for _ in (subset / "queries.jsonl").open())}
        previous = json.loads((root / "results.json").read_text()) if (root / "results.json").is_file() else {}
        kept = previous.get("variants", {}) if (previous.get("steps"), previous.get("subset")) == (
            args.steps, subset_info) else {}  # results of an earlier call at the same scale stay in the table
        results = {"host": host(), "steps": args.steps, "subset": subset_info, "variants": kept}
        runs = [(variant, seed) for variant in args.variants
                for seed in ([TRAIN_SEED] if variant == "mntp-only" else args.seeds)]
        for variant, seed in runs:
            name = run_name(variant, seed)
            folder = root / name
            adapters = ["--adapter", str(mntp)]
            if variant != "mntp-only":
                negatives, instruction, batch, mini, share = VARIANTS[variant]
                folder.mkdir(parents=True, exist_ok=True)
                (folder / "recipe.json").write_text(json.dumps(recipe(args.workdir, negatives, instruction), indent=2))
                if not (folder / "adapter" / "training_summary.json").is_file():
                    _run([_cli(), "train", "supervised", "--adapter", str(mntp), "--recipe",
                          str(folder / "recipe.json"), "--out", str(folder / "adapter"), "--resume",
                          "--batch-size", str(batch), *(["--mini-batch-size", str(mini)] if mini else []),
                          "--max-steps", str(max(1, round(args.steps * share))), "--threads", str(args.threads),
                          "--seed", str(seed), *TRAIN_ARGS])
                adapters += ["--adapter", str(folder / "adapter")]
            encoder = folder / "encoder"
            if not (encoder / "config.json").is_file():
                _run([_cli(), "convert", *adapters, "--out", str(encoder), "--no-vllm", "--overwrite"])
            results["variants"][name] = _scores(encoder, subset, folder / "scores.json")
            (root / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    except BenchmarkError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"\nSQuAD dev subset ({subset_info['paragraphs']} paragraphs, {subset_info['queries']} questions), "
          f"{args.steps} steps at batch 32 from the MNTP adapter; x100:")
    print(f"{'variant':<18}{'nDCG@10':>9}{'Recall@100':>12}{'vs reference':>14}")
    reference = results["variants"].get("reference", {}).get("ndcg@10")
    for name, scores in results["variants"].items():
        ndcg = 100 * scores["ndcg@10"]
        delta = f"{100 * (scores['ndcg@10'] - reference):+.2f}" if reference is not None else "-"
        print(f"{name:<18}{ndcg:>9.2f}{100 * scores['recall@100']:>12.2f}{delta:>14}")
    for name, spread in spreads(results["variants"]).items():
        print(f"{name}: nDCG@10 spread over seeds {100 * spread:.2f} (max - min)")
    h = results["host"]
    print(f"host: {h.get('cpu')} ({h.get('logical_cpus', '?')} logical CPUs), torch {h.get('torch')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
