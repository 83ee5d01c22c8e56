"""Score a checkpoint with one `llama-encoder evaluate` call and print its rows beside the recorded baselines.

    python examples/scorecard.py CHECKPOINT --sts sts-dev=sts-dev.csv --retrieval squad-dev-ir=squad-dev-ir/

The checkpoint's rows are measured now (CPU, float32). The baseline rows (all-MiniLM-L6-v2, and SmolLM2 as a causal
model with mean pooling) are *recorded*: benchmarks/default_adapters.py measured them on the same sets and stored
them, with the host that measured them, in the package's default-adapter manifest under `baselines`:

    "baselines": {
      "measured_at": "...", "host": {...}, "dtype": "float32", "device": "cpu",
      "models": {"all-MiniLM-L6-v2": "what was measured", ...},
      "sets": {"sts-dev": {"kind": "sts", "files": [{"name": "sts-dev.csv", "sha256": "..."}]}, ...},
      "scores": {"sts-dev": {"all-MiniLM-L6-v2": {"spearman": 0.8672, ..., "n": 1500, "seconds": 12.3}}, ...}
    }

Scores are raw (as `evaluate --json` writes them). A manifest without `baselines` may still hold
`baselines_sts_dev_spearman` ({model: STS Benchmark dev Spearman x100}); those rows are shown for a set named
sts-dev. Rows are matched by set name, so name the sets as the manifest does (sts-dev, squad-dev-ir).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from llama_encoder.encoding.scorecard import format_table, scorecard_rows
from llama_encoder.weights.default_adapters import DEFAULT_ADAPTERS_DIR

COLUMNS = ("set", "model", "Spearman", "nDCG@10", "Recall@100", "n", "seconds", "source")
METRICS = {"Spearman": "spearman", "nDCG@10": "ndcg@10", "Recall@100": "recall@100"}


def recorded_rows(manifest: dict, card: dict) -> tuple[list[dict], list[str]]:
    """The manifest's baseline rows for the card's sets, and notes on where (and on which files) they were
    measured."""
    baselines = manifest.get("baselines") or {}
    rows, notes = [], []
    if baselines.get("scores"):
        host = baselines.get("host") or {}
        notes.append(f"recorded: measured {baselines.get('measured_at', '?')[:10]} on "
                     f"{host.get('cpu', 'an unrecorded host')} ({host.get('logical_cpus', '?')} CPUs), "
                     f"{baselines.get('dtype', '?')} on {baselines.get('device', '?')}, by "
                     "benchmarks/default_adapters.py")
        for name in card["sets"]:
            recorded_files = [f.get("sha256") for f in baselines.get("sets", {}).get(name, {}).get("files", [])]
            ours = [f["sha256"] for f in card["sets"][name]["files"]]
            source = "recorded" if not recorded_files or recorded_files == ours else "recorded, other files"
            for model, scores in baselines["scores"].get(name, {}).items():
                rows.append({"set": name, "model": model, **{c: scores.get(k) for c, k in METRICS.items()},
                             "n": scores.get("n"), "seconds": scores.get("seconds"), "source": source})
    elif "sts-dev" in card["sets"]:  # an older manifest: STS Benchmark dev Spearman x100 only
        for model, value in manifest.get("baselines_sts_dev_spearman", {}).items():
            rows.append({"set": "sts-dev", "model": model, "Spearman": value / 100, "source": "recorded"})
        if rows:
            notes.append("recorded: STS Benchmark dev Spearman from the manifest's baselines_sts_dev_spearman "
                         "(benchmarks/sts_quality.py's figures); no recorded retrieval baselines yet")
    if not rows:
        notes.append("no recorded baselines for these sets in the manifest (benchmarks/default_adapters.py "
                     "baselines records them)")
    return rows, notes


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="a folder written by `llama-encoder convert`")
    parser.add_argument("--sts", action="append", default=[], metavar="[NAME=]FILE", help="an STS set")
    parser.add_argument("--retrieval", action="append", default=[], metavar="[NAME=]FOLDER",
                        help="a BEIR-style retrieval folder")
    args = parser.parse_args()
    if not args.sts and not args.retrieval:
        parser.error("give at least one --sts or --retrieval set")
    cli = shutil.which("llama-encoder", path=str(Path(sys.executable).parent)) or "llama-encoder"
    with tempfile.TemporaryDirectory() as tmp:
        card_file = Path(tmp) / "scorecard.json"
        command = [cli, "evaluate", args.checkpoint, *(a for s in args.sts for a in ("--sts", s)),
                   *(a for r in args.retrieval for a in ("--retrieval", r)), "--device", "cpu", "--dtype", "float32",
                   "--json", str(card_file)]
        print(f"$ {' '.join(command)}", flush=True)
        if subprocess.run(command, stdin=subprocess.DEVNULL).returncode != 0:
            return 1
        card = json.loads(card_file.read_text())
    manifest = json.loads((DEFAULT_ADAPTERS_DIR / "manifest.json").read_text())
    measured = [{**row, "model": f"this checkpoint ({Path(args.checkpoint).name})", "source": "measured now"}
                for row in scorecard_rows(card)]
    recorded, notes = recorded_rows(manifest, card)
    order = list(card["sets"])
    rows = sorted(measured + recorded, key=lambda row: order.index(row["set"]))
    print("\nBeside the baselines (Spearman, nDCG@10, Recall@100 x100):\n")
    print(format_table(rows, COLUMNS))
    for note in notes:
        print(f"({note})")
    built = manifest.get("scorecard") or {"sts-dev": {"spearman": manifest.get("sts_dev", {}).get("spearman")}}
    for name in card["sets"]:
        figures = ", ".join(f"{metric} {value}" if isinstance(value, int) else f"{metric} {value:.2f}"
                            for metric, value in built.get(name, {}).items() if value is not None)
        if figures:
            print(f"(the shipped adapters scored {figures} on {name} when they were built)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
