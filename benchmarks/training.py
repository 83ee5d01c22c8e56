"""Training speed and memory: the old hand-written loop against the new Trainer-based path, and GradCache's memory.

Every measurement is one `python -m llama_encoder.cli train ...` subprocess, run from a scratch folder (so the
current directory never shadows the code under test): the OLD loop with PYTHONPATH=--old-tree (a git worktree of
commit 5e21de0), the NEW path with PYTHONPATH=this repo. Before timing, each tree is checked to be the one Python
imports. Tokens/s is read from the run's training_summary.json (tokens / wall_seconds: the training steps, not the
model loading); peak RSS is the child's own maximum resident set, taken from os.wait4 on that one child (its
ru_maxrss; no other process counts), in GiB of 2^30 bytes. "process s" is the child's whole run (start-up, model
loading, training, saving): the old loop's wall_seconds sums its steps only, the new path's spans trainer.train(),
so on a run of a few steps the two tokens/s figures differ by fixed costs as well.

Table 1, per objective (mntp, simcse, supervised-infonce on jsonl triples, supervised-cosent on STS pairs): the best
tokens/s and the highest peak RSS of each path over --rounds, and new/old ratios. The rounds alternate the paths in
ABBA order (old, new, new, old, old, new, ...), so drift in the machine's load reaches both. Both paths get the same
files and the same options; options only the new path knows (--mini-batch-size) are not passed.

Table 2, supervised InfoNCE on (query, positive) pairs, NEW path only: one optimizer step (--max-steps 1) per batch
size in --memory-sizes, without and with GradCache (--mini-batch-size); peak RSS, seconds (training steps and the
whole process), tokens/s and the mean tokens per text the trainer counted (tokens / texts, instruction prompt
included) so the real lengths are known. A no-GradCache size is skipped when the previous size already went over
--memory-limit-gib, or when scaling the previous size's peak by the batch ratio exceeds the host's memory.

Data: from --data-dir, no text twice (the new path's duplicate-free batch sampler would otherwise drop examples, and
the two paths would train on different batches): the first --records STS train lines whose two sentences are new
(stsbenchmark/sts-train.csv: scored pairs for CoSENT, pairs for --memory-texts sts) and the first question of each
SQuAD paragraph (train/squad-train.jsonl: the paragraphs are mntp/simcse's texts; question, paragraph and one hard
negative paragraph taken from later, unused ones). Table 2 gets twice its largest batch of pairs. Without that
folder a synthetic text set built here is used instead (the output says so).

    git worktree add --detach /work/old-loop 5e21de0               # once: the old loop, outside the repo
    .venv/bin/python benchmarks/training.py --out-json training.json   # both tables (long on a 2-core CPU)
    .venv/bin/python benchmarks/training.py --only table1 --objectives mntp supervised-cosent --max-steps 2 \\
        --batch-size 4 --rounds 1                                      # a quick look
    .venv/bin/python benchmarks/training.py --only table2 --memory-sizes 32 64 128 --memory-texts sts
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
OLD_COMMIT = "5e21de0"
DEFAULT_OLD_TREE = Path("/work/old-loop")
OBJECTIVES = ("mntp", "simcse", "supervised-infonce", "supervised-cosent")
GIB = 2**30
logger = logging.getLogger("training")


class ChildFailed(RuntimeError):
    """A training subprocess exited non-zero; carries its result (return code, stderr tail)."""

    def __init__(self, label: str, result: dict):
        self.label, self.result = label, result
        super().__init__(f"{label} failed ({_exit_text(result['returncode'])})")


def _exit_text(code: int) -> str:
    return f"killed by signal {-code}" if code < 0 else f"exit {code}"


# ------------------------------------------------------------------------------------------------------------ data

_SUBJECTS = ["A man", "A woman", "The child", "Two dogs", "A chef", "The old farmer", "A group of students",
             "The pilot", "A small bird", "The team", "A musician", "The doctor", "Three friends", "A cyclist"]
_VERBS = ["is playing", "is cooking", "is watching", "is painting", "is carrying", "is cleaning", "is reading",
          "is building", "is chasing", "is repairing", "is selling", "is photographing"]
_OBJECTS = ["a guitar", "a large pot of soup", "the sunset over the harbour", "an old wooden fence", "a red ball",
            "a heavy box of books", "the kitchen floor", "a newspaper on the train", "a small boat", "a broken bicycle",
            "fresh vegetables at the market", "the mountains in the distance", "a birthday cake"]
_PLACES = ["in the park", "at home", "near the river", "on a busy street", "in the morning", "after the storm",
           "during the festival", "behind the school", "in a quiet village", "under a bright sky"]


def _synthetic_sentence(i: int) -> str:
    return (f"{_SUBJECTS[i % len(_SUBJECTS)]} {_VERBS[(i // 3) % len(_VERBS)]} "
            f"{_OBJECTS[(i // 7) % len(_OBJECTS)]} {_PLACES[(i // 11) % len(_PLACES)]} (scene {i}).")


def _synthetic_sources(count: int) -> tuple[list[str], list[dict]]:
    """STS-like tab-separated lines and SQuAD-like (question, paragraph) records, deterministic, texts distinct."""
    lines = []
    for i in range(count):
        first = _synthetic_sentence(i)
        second, score = ((first.replace("(scene", "(picture"), 4.6) if i % 3 == 0 else
                         (_synthetic_sentence(100_000 + i), 0.4 if i % 3 == 1 else 2.2))
        lines.append(f"synthetic\tsynthetic\t2024\t{i:04d}\t{score:.3f}\t{first}\t{second}")
    records = []
    for i in range(count):
        paragraph = " ".join(_synthetic_sentence(200_000 + i * 10 + k) for k in range(6 + i % 5))
        subject = _SUBJECTS[i % len(_SUBJECTS)].lower()
        records.append({"query": f"What is {subject} doing in story {i}?", "positive": paragraph})
    return lines, records


def _read_sources(data_dir: Path, pairs_needed: int, paragraphs_needed: int) -> tuple[list[str], list[dict], str]:
    """(STS lines, SQuAD records, description): the first STS train lines whose two sentences were not seen before,
    and the first question of each distinct SQuAD paragraph, so no text repeats (a duplicate-free batch sampler
    would otherwise skip examples); synthetic ones without --data-dir."""
    sts, squad = data_dir / "stsbenchmark" / "sts-train.csv", data_dir / "train" / "squad-train.jsonl"
    if not (sts.is_file() and squad.is_file()):
        lines, records = _synthetic_sources(max(pairs_needed, paragraphs_needed))
        return lines[:pairs_needed], records[:paragraphs_needed], (
            f"SYNTHETIC texts built by this script ({sts} or {squad} not found; give --data-dir for real data)")
    lines, seen = [], set()
    with sts.open(encoding="utf-8-sig") as handle:
        for line in handle:
            fields = line.rstrip("\r\n").split("\t")
            if len(lines) == pairs_needed:
                break
            if len(fields) < 7 or fields[5] in seen or fields[6] in seen or fields[5] == fields[6]:
                continue
            seen.update(fields[5:7])
            lines.append("\t".join(fields[:7]))
    records, seen = [], set()
    with squad.open(encoding="utf-8") as handle:
        for line in handle:
            if len(records) == paragraphs_needed:
                break
            record = json.loads(line) if line.strip() else None
            if record and record["query"] not in seen and record["positive"] not in seen:
                seen.update((record["query"], record["positive"]))
                records.append({"query": record["query"], "positive": record["positive"]})
    return lines, records, f"{data_dir} (stsbenchmark/sts-train.csv, train/squad-train.jsonl)"


def _write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records), encoding="utf-8")
    return path


def _prepare_data(args, folder: Path, tables: list[str]) -> tuple[dict[str, Path], str, int]:
    """The files every run reads; returns them, the data's description and how many Table 2 pairs there are."""
    memory_count = 2 * max(args.memory_sizes) if "table2" in tables else 0  # more than one batch, for any sampler
    pairs_needed = max(args.records, memory_count if args.memory_texts == "sts" else 0)
    paragraphs_needed = max(2 * args.records, memory_count if args.memory_texts == "squad" else 0)
    lines, records, source = _read_sources(args.data_dir, pairs_needed, paragraphs_needed)
    pairs = [line.split("\t")[5:7] for line in lines]
    folder.mkdir(parents=True, exist_ok=True)
    # mntp and simcse: distinct Wikipedia paragraphs (SQuAD's), cut at --max-length like any long text
    paragraphs = [record["positive"] for record in records][: args.records]
    (folder / "texts.txt").write_text("".join(p + "\n" for p in paragraphs), encoding="utf-8")
    # triples: the first records as (query, positive), hard negatives from the paragraphs after them (all distinct)
    half = len(records) // 2 if args.negatives else len(records)
    count = min(args.records, half)
    triples = [{**record, "negatives": [records[half + i]["positive"]] if args.negatives else []}
               for i, record in enumerate(records[:count])]
    memory = ([{"query": a, "positive": b} for a, b in pairs] if args.memory_texts == "sts" else records)[
        : memory_count]
    (folder / "sts-pairs.csv").write_text("".join(line + "\n" for line in lines[: args.records]), encoding="utf-8")
    files = {"texts": folder / "texts.txt", "triples": _write_jsonl(folder / "triples.jsonl", triples),
             "sts": folder / "sts-pairs.csv", "memory": _write_jsonl(folder / "memory-pairs.jsonl", memory)}
    return files, source, len(memory)


# ------------------------------------------------------------------------------------------------------- children

def _tree_env(tree: Path, threads: int) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(tree), "OMP_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false"}


def _check_tree(tree: Path, env: dict, cwd: Path) -> dict:
    """The package the child will import comes from `tree`; also its commit and whether it has local changes."""
    result = subprocess.run([sys.executable, "-c", "import llama_encoder; print(llama_encoder.__file__)"], env=env,
                            cwd=cwd, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    imported = Path(result.stdout.strip() or "?").resolve()
    if result.returncode != 0 or tree.resolve() not in imported.parents:
        raise SystemExit(f"training.py: error: with PYTHONPATH={tree} Python imports llama_encoder from {imported}, "
                         f"not from {tree} ({result.stderr.strip()[-300:]})")
    git = subprocess.run(["git", "-C", str(tree), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    dirty = subprocess.run(["git", "-C", str(tree), "status", "--porcelain", "--untracked-files=no"],
                           capture_output=True, text=True)
    return {"tree": str(tree), "imports": str(imported), "commit": git.stdout.strip() or None,
            "local_changes": bool(dirty.stdout.strip())}


def _shell_line(command: list[str], env: dict, cwd: Path) -> str:
    keys = ("PYTHONPATH", "OMP_NUM_THREADS", "TOKENIZERS_PARALLELISM")
    return f"cd {shlex.quote(str(cwd))} && " + shlex.join([f"{k}={env[k]}" for k in keys] + command)


def _run_child(label: str, command: list[str], env: dict, cwd: Path, log_dir: Path) -> dict:
    """Run one training process; its own peak RSS comes from os.wait4 (the rusage of that child alone)."""
    log_dir.mkdir(parents=True, exist_ok=True)
    stem = label.replace(" ", "_").replace("/", "-")
    out_path, err_path = log_dir / f"{stem}.out", log_dir / f"{stem}.err"
    start = time.perf_counter()
    with out_path.open("w") as out, err_path.open("w") as err:
        process = subprocess.Popen(command, env=env, cwd=cwd, stdout=out, stderr=err, stdin=subprocess.DEVNULL)
        try:
            _, status, usage = os.wait4(process.pid, 0)
        except BaseException:
            process.kill()
            process.wait()
            raise
    process.returncode = os.waitstatus_to_exitcode(status)
    seconds = time.perf_counter() - start
    stderr = err_path.read_text(errors="replace").strip().splitlines()
    return {"returncode": process.returncode, "process_seconds": seconds,
            "peak_rss_gib": usage.ru_maxrss * 1024 / GIB,  # ru_maxrss is in KiB on Linux
            "stderr_tail": "\n".join(stderr[-20:])}


def _train_command(args, objective: str, data: Path, out: Path, *, batch_size: int, max_steps: int,
                   max_length: int, extra: list[str] = ()) -> list[str]:
    cli_objective, options = {
        "mntp": ("mntp", []), "simcse": ("simcse", []),
        "supervised-infonce": ("supervised", ["--loss", "infonce"]),
        "supervised-cosent": ("supervised", ["--loss", "cosent"]),
    }[objective]
    command = [sys.executable, "-m", "llama_encoder.cli", "train", cli_objective, "--data", str(data), "--out",
               str(out), "--max-steps", str(max_steps), "--batch-size", str(batch_size), "--max-length",
               str(max_length), "--dtype", args.dtype, "--threads", str(args.threads), "--lora-dropout", "0",
               "--seed", str(args.seed), "--no-progress", *options]
    if args.base:
        command += ["--base", args.base]
    if args.gguf:
        command += ["--gguf", args.gguf]
    if args.cache_dir:
        command += ["--cache-dir", args.cache_dir]
    return command + shlex.split(args.extra_args) + list(extra)


def _measure(args, label: str, command: list[str], env: dict, cwd: Path, out: Path, commands: list) -> dict:
    commands.append(_shell_line(command, env, cwd))
    result = _run_child(label, command, env, cwd, cwd / "logs")
    if result["returncode"] != 0:
        raise ChildFailed(label, result)
    summary = json.loads((out / "training_summary.json").read_text())
    seconds = summary["wall_seconds"]
    result.update({"tokens": summary["tokens"], "train_seconds": seconds, "steps": summary.get("steps"),
                   "tokens_per_second": summary["tokens"] / seconds if seconds else None,
                   "dtype": summary.get("dtype"), "threads": summary.get("threads")})
    shutil.rmtree(out, ignore_errors=True)  # adapters are not needed; keeps the scratch folder small
    shutil.rmtree(Path(f"{out}-checkpoints"), ignore_errors=True)
    logger.info("%s: %.0f tokens/s, peak RSS %.2f GiB, %.1f s in all", label, result["tokens_per_second"] or 0,
                result["peak_rss_gib"], result["process_seconds"])
    return result


# --------------------------------------------------------------------------------------------------------- tables

def _fmt(value, spec: str, missing: str = "-") -> str:
    return missing if value is None else format(value, spec)


def _table1(args, files: dict, trees: dict, work: Path, commands: list) -> list[dict]:
    data = {"mntp": files["texts"], "simcse": files["texts"], "supervised-infonce": files["triples"],
            "supervised-cosent": files["sts"]}
    paths = ["new"] if args.new_only else ["old", "new"]
    rows = []
    for objective in args.objectives:
        runs: dict[str, list[dict]] = {path: [] for path in paths}
        for round_index in range(args.rounds):
            order = paths if round_index % 2 == 0 else paths[::-1]  # ABBA: old new new old old new ...
            for path in order:
                label = f"table1 {objective} {path} round {round_index + 1}"
                out = work / "runs" / label.replace(" ", "-")
                command = _train_command(args, objective, data[objective], out, batch_size=args.batch_size,
                                         max_steps=args.max_steps, max_length=args.max_length)
                runs[path].append(_measure(args, label, command, trees[path]["env"], work, out, commands))
        row = {"objective": objective, "rounds": runs}
        for path in paths:
            row[f"{path}_tokens_per_second"] = max(r["tokens_per_second"] or 0 for r in runs[path])
            row[f"{path}_peak_rss_gib"] = max(r["peak_rss_gib"] for r in runs[path])
            row[f"{path}_process_seconds"] = min(r["process_seconds"] for r in runs[path])
            row[f"{path}_tokens_per_step"] = runs[path][0]["tokens"] / max(1, runs[path][0]["steps"] or 1)
        if not args.new_only:
            row["speed_ratio"] = row["new_tokens_per_second"] / row["old_tokens_per_second"]
            row["rss_ratio"] = row["new_peak_rss_gib"] / row["old_peak_rss_gib"]
        rows.append(row)
    return rows


def _print_table1(args, rows: list[dict], host_text: str, source: str) -> None:
    print()
    print(host_text)
    print(f"Table 1: training tokens/s (best of {args.rounds}) and peak RSS (highest), --max-steps {args.max_steps} "
          f"--batch-size {args.batch_size} --max-length {args.max_length} --dtype {args.dtype} --threads "
          f"{args.threads} --lora-dropout 0{' ' + args.extra_args if args.extra_args else ''}; data: the first "
          f"{args.records} records of {source}")
    print()
    print("| objective | old tok/s | new tok/s | new/old speed | old peak RSS GiB | new peak RSS GiB | new/old RSS "
          "| old process s | new process s | tokens/step |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for row in rows:
        speed = f"{row['speed_ratio']:.2f}x" if "speed_ratio" in row else "-"
        rss = f"{row['rss_ratio']:.2f}x" if "rss_ratio" in row else "-"
        print(f"| {row['objective']} | {_fmt(row.get('old_tokens_per_second'), '.0f')} | "
              f"{row['new_tokens_per_second']:.0f} | {speed} | {_fmt(row.get('old_peak_rss_gib'), '.2f')} | "
              f"{row['new_peak_rss_gib']:.2f} | {rss} | {_fmt(row.get('old_process_seconds'), '.1f')} | "
              f"{row['new_process_seconds']:.1f} | {row['new_tokens_per_step']:.0f} |")


def _memory_total_gib() -> float | None:
    try:
        for line in open("/proc/meminfo", encoding="ascii"):
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024 / GIB
    except OSError:
        pass
    return None


def _table2(args, files: dict, tree: dict, work: Path, commands: list,
            memory_pairs: int) -> tuple[list[dict], list[str]]:
    rows, notes = [], []
    gradcache_ok = True
    previous: tuple[int, float] | None = None  # (batch size, peak GiB) of the last no-GradCache row that ran
    over_limit = False
    total = _memory_total_gib()
    for size in args.memory_sizes:
        for gradcache in (False, True):
            row = {"batch_size": size, "mini_batch_size": args.mini_batch_size if gradcache else None}
            if size > memory_pairs:
                rows.append({**row, "skipped": f"only {memory_pairs} distinct pairs in the data"})
                continue
            if gradcache and not gradcache_ok:
                rows.append({**row, "skipped": "the new path has no --mini-batch-size"})
                continue
            if not gradcache:
                projected = previous[1] * size / previous[0] if previous else None
                if over_limit:
                    rows.append({**row, "skipped": "over --memory-limit-gib"})
                    continue
                if projected and total and projected > total:
                    rows.append({**row, "skipped": f"projected {projected:.1f} GiB, over the host's {total:.1f}"})
                    continue
            label = f"table2 batch {size} {'gradcache' if gradcache else 'plain'}"
            out = work / "runs" / label.replace(" ", "-")
            extra = ["--mini-batch-size", str(args.mini_batch_size)] if gradcache else []
            command = _train_command(args, "supervised-infonce", files["memory"], out, batch_size=size, max_steps=1,
                                     max_length=args.memory_max_length, extra=extra)
            try:
                result = _measure(args, label, command, tree["env"], work, out, commands)
            except ChildFailed as failure:
                tail = failure.result["stderr_tail"]
                if gradcache and "--mini-batch-size" in tail and "unrecognized arguments" in tail:
                    gradcache_ok = False
                    note = ("GradCache rows skipped: the new path's CLI does not know --mini-batch-size yet "
                            f"({tree['tree']} at {tree['commit']})")
                    notes.append(note)
                    logger.warning(note)
                    rows.append({**row, "skipped": "the new path has no --mini-batch-size"})
                    continue
                if failure.result["returncode"] == -9 and not gradcache:  # the kernel's OOM killer, most likely
                    over_limit = True
                    rows.append({**row, "skipped": "killed by SIGKILL (out of memory?)", **failure.result})
                    continue
                raise
            result["tokens_per_text"] = result["tokens"] / (2 * size)  # query + positive per example, one step
            rows.append({**row, **result})
            if not gradcache:
                previous = (size, result["peak_rss_gib"])
                over_limit = result["peak_rss_gib"] > args.memory_limit_gib
    return rows, notes


def _print_table2(args, rows: list[dict], notes: list[str], host_text: str, source: str) -> None:
    print()
    print(host_text)
    used = [row["tokens_per_text"] for row in rows if row.get("tokens_per_text")]
    mean = f"{sum(used) / len(used):.1f}" if used else "-"
    print(f"Table 2: supervised InfoNCE on (query, positive) pairs ({args.memory_texts}), one optimizer step, "
          f"--max-length {args.memory_max_length} --dtype {args.dtype} --threads {args.threads}, new path; GradCache "
          f"= --mini-batch-size {args.mini_batch_size}; limit {args.memory_limit_gib:.1f} GiB; mean tokens per text "
          f"used: {mean}; data: the first records of {source}")
    print()
    print("| batch | GradCache | peak RSS GiB | train s | process s | tokens/s | tokens/text |")
    print("|---:|---|---:|---:|---:|---:|---:|")
    for row in rows:
        gradcache = f"mini {row['mini_batch_size']}" if row["mini_batch_size"] else "no"
        if "skipped" in row:
            print(f"| {row['batch_size']} | {gradcache} | skipped: {row['skipped']} | | | | |")
            continue
        print(f"| {row['batch_size']} | {gradcache} | {row['peak_rss_gib']:.2f} | {row['train_seconds']:.1f} | "
              f"{row['process_seconds']:.1f} | {_fmt(row['tokens_per_second'], '.0f')} | "
              f"{row['tokens_per_text']:.1f} |")
    for note in notes:
        print(note)


# ----------------------------------------------------------------------------------------------------------- main

def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", choices=["table1", "table2"], help="run one table only (default: both)")
    parser.add_argument("--objectives", nargs="+", choices=OBJECTIVES, default=list(OBJECTIVES),
                        help="Table 1's objectives (default: all four)")
    parser.add_argument("--old-tree", type=Path, default=DEFAULT_OLD_TREE,
                        help=f"a git worktree of the old loop, commit {OLD_COMMIT} (default: {DEFAULT_OLD_TREE})")
    parser.add_argument("--new-only", action="store_true", help="Table 1 without the old loop (no --old-tree needed)")
    parser.add_argument("--rounds", type=int, default=2, help="Table 1 measurements per path, alternated (default: 2)")
    parser.add_argument("--max-steps", type=int, default=8, help="Table 1 optimizer steps per run (default: 8)")
    parser.add_argument("--batch-size", type=int, default=16, help="Table 1 global batch (default: 16)")
    parser.add_argument("--max-length", type=int, default=128, help="Table 1 tokens per text (default: 128)")
    parser.add_argument("--dtype", choices=["auto", "float32", "bfloat16"], default="auto",
                        help="compute dtype of every run (default: auto)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads and OMP_NUM_THREADS of every run "
                        "(default: 2)")
    parser.add_argument("--seed", type=int, default=42, help="--seed of every run (default: 42)")
    parser.add_argument("--records", type=int, default=512,
                        help="Table 1 data: N texts, triples and STS pairs (default: 512)")
    parser.add_argument("--negatives", type=int, choices=[0, 1], default=1,
                        help="hard negatives per SQuAD triple in Table 1's supervised-infonce (default: 1)")
    parser.add_argument("--data-dir", type=Path, default=REPO.parent / "shared" / "data",
                        help="folder with stsbenchmark/sts-train.csv and train/squad-train.jsonl (default: "
                        "../shared/data from the repo); synthetic texts when absent")
    parser.add_argument("--memory-sizes", type=int, nargs="+", default=[32, 64, 128, 256, 512],
                        help="Table 2 batch sizes (default: 32 64 128 256 512)")
    parser.add_argument("--memory-max-length", type=int, default=128, help="Table 2 tokens per text (default: 128)")
    parser.add_argument("--memory-texts", choices=["sts", "squad"], default="squad",
                        help="Table 2 pairs: short STS sentence pairs or SQuAD question/paragraph pairs (default: "
                        "squad)")
    parser.add_argument("--mini-batch-size", type=int, default=32,
                        help="Table 2 GradCache mini-batch (new path's --mini-batch-size) (default: 32)")
    total = _memory_total_gib()
    parser.add_argument("--memory-limit-gib", type=float, default=round(total / 2, 1) if total else 8.0,
                        help="Table 2: skip a no-GradCache size once the previous one peaked above this (default: half "
                        "of this host's memory)")
    parser.add_argument("--base", help="--base of every run (default: the embedded SmolLM2-135M)")
    parser.add_argument("--gguf", help="--gguf of every run")
    parser.add_argument("--cache-dir", help="--cache-dir of every run (where the embedded default model is cached)")
    parser.add_argument("--extra-args", default="", metavar="ARGS",
                        help="more train options for every run, one shell-quoted string; use the = form: "
                        "--extra-args='--group-by-length'")
    parser.add_argument("--work-dir", type=Path,
                        help="scratch folder for data, runs and logs, kept afterwards (default: a temporary one, "
                        "removed)")
    parser.add_argument("--out-json", type=Path, metavar="FILE", help="write every figure, the host and the commands")
    return parser


def main() -> int:
    args = _parser().parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if args.base and args.gguf:
        raise SystemExit("training.py: error: give --base or --gguf, not both")
    tables = [args.only] if args.only else ["table1", "table2"]
    if not args.objectives and "table1" in tables:
        raise SystemExit("training.py: error: --objectives needs at least one objective")
    use_old = "table1" in tables and not args.new_only
    if use_old and not (args.old_tree / "llama_encoder" / "cli.py").is_file():
        raise SystemExit(f"training.py: error: no old loop at {args.old_tree}; make it with `git -C {REPO} worktree "
                         f"add --detach {args.old_tree} {OLD_COMMIT}`, or pass --new-only")

    import torch

    torch.set_num_threads(args.threads)  # so the host line shows the children's thread count
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from host import host_info, host_line

    host = host_info()
    host_text = host_line(host)
    if not (args.base or args.gguf):  # fetch/extract the default model once, outside every measured run
        from llama_encoder.weights.base_model import embedded_default_gguf

        embedded_default_gguf(Path(args.cache_dir) if args.cache_dir else None)

    work = args.work_dir or Path(tempfile.mkdtemp(prefix="training-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    commands: list[str] = []
    results: dict = {"benchmark": "training", "host": host, "options": {k: str(v) if isinstance(v, Path) else v
                                                                          for k, v in vars(args).items()}}
    try:
        files, source, memory_pairs = _prepare_data(args, work / "data", tables)
        print(f"data: {source}")
        trees = {"new": {"tree": REPO}}
        if use_old:
            trees["old"] = {"tree": args.old_tree}
        for name, tree in trees.items():
            tree["env"] = _tree_env(tree["tree"], args.threads)
            tree.update(_check_tree(tree["tree"], tree["env"], work))
            print(f"{name} path: llama_encoder from {tree['imports']} (commit {tree['commit']}"
                  f"{', with local changes' if tree['local_changes'] else ''})")
        results["trees"] = {name: {k: v for k, v in tree.items() if k != "env"} for name, tree in trees.items()}
        results["data"] = source
        try:
            if "table1" in tables:
                rows = _table1(args, files, trees, work, commands)
                results["table1"] = rows
                _print_table1(args, rows, host_text, source)
            if "table2" in tables:
                rows, notes = _table2(args, files, trees["new"], work, commands, memory_pairs)
                results["table2"] = {"rows": rows, "notes": notes}
                _print_table2(args, rows, notes, host_text, source)
        except ChildFailed as failure:
            print(failure.result["stderr_tail"], file=sys.stderr)
            print(f"training.py: error: {failure}; its command: {commands[-1]}", file=sys.stderr)
            return 1
        finally:
            results["commands"] = commands
            if args.out_json:
                args.out_json.write_text(json.dumps(results, indent=2) + "\n")
                print(f"wrote {args.out_json}")
        print()
        print("commands run:")
        for command in commands:
            print(f"  {command}")
    finally:
        if args.work_dir is None:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
