"""Score a checkpoint on STS Benchmark dev with one `llama-encoder evaluate` call, beside the recorded baselines.

    python examples/sts_dev_score.py CHECKPOINT STS_DEV_FILE

The baselines (SmolLM2 as a causal model, the untrained bidirectional encoder, all-MiniLM-L6-v2) and the score the
shipped adapters reached are read from the package's default-adapter manifest, where benchmarks/default_adapters.py
recorded them with the host that measured them.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

from llama_encoder.weights.default_adapters import DEFAULT_ADAPTERS_DIR


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="a folder written by `llama-encoder convert`")
    parser.add_argument("sts_dev", type=Path, help="sts-dev.csv of the STS Benchmark (tab-separated)")
    args = parser.parse_args()
    command = [shutil.which("llama-encoder", path=str(Path(sys.executable).parent)) or "llama-encoder", "evaluate",
               "--sts", str(args.sts_dev), "--device", "cpu", "--dtype", "float32", args.checkpoint]
    print(f"$ {' '.join(command)}", flush=True)
    start = time.perf_counter()
    result = subprocess.run(command, stdout=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL)
    if result.returncode != 0:
        return result.returncode
    scores = json.loads(result.stdout)
    manifest = json.loads((DEFAULT_ADAPTERS_DIR / "manifest.json").read_text())
    rows = [(f"this checkpoint ({args.checkpoint})", 100 * scores["spearman"], "just now")]
    rows += [(name, value, "recorded") for name, value in manifest.get("baselines_sts_dev_spearman", {}).items()]
    print(f"\nSTS Benchmark dev, Spearman x100 of cosine similarity ({scores['n']} pairs, "
          f"{time.perf_counter() - start:.0f} s):")
    for name, value, when in sorted(rows, key=lambda row: -row[1]):
        print(f"  {value:6.2f}  {name}  [{when}]")
    print(f"(the shipped adapters scored {manifest['sts_dev']['spearman']:.2f} when they were built)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
