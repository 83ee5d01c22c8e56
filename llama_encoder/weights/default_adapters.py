"""The LoRA adapters shipped for the embedded default base (SmolLM2-135M-Instruct).

`llama_encoder/default_adapters/` holds an MNTP adapter and a supervised adapter trained on top of it with the
package's own `llama-encoder train` on the STS Benchmark train split, plus `manifest.json` (files, sizes, sha256,
the commands that reproduce them, their STS dev scores) and `NOTICE.md` (the training data's attribution).
`benchmarks/default_adapters.py` builds, measures and installs them. `convert` with no base and no adapters merges
them; `--untrained` keeps the bare base.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ..errors import InputChangedError, MissingInputError
from ..readers import sha256_file

DEFAULT_ADAPTERS_DIR = Path(__file__).resolve().parents[1] / "default_adapters"
MANIFEST_NAME = "manifest.json"
NOTICE_NAME = "NOTICE.md"


@dataclass(frozen=True)
class DefaultAdapters:
    """The shipped adapters: their folders in merge order and the manifest that describes them."""

    folders: tuple[Path, ...]
    manifest: dict
    notice: str

    def card_section(self) -> list[str]:
        """Model-card lines: training data, recipe, reproduction, dev scores and limits."""
        m = self.manifest
        scores = m.get("sts_dev", {})
        baselines = m.get("baselines_sts_dev_spearman", {})
        lines = [
            "## Training",
            "",
            f"The merged adapters are llama-encoder's shipped defaults for {m.get('base', 'the embedded base')}: the "
            "LLM2Vec recipe, MNTP (masked next-token prediction) and then supervised contrastive training (CoSENT "
            "on scored pairs), trained with `llama-encoder train` on the STS Benchmark train split only "
            f"(stored as {m.get('stored_form', '?')}).",
            "",
            "| stage | command | steps | wall time (s) |",
            "|---|---|---:|---:|",
            *[f"| {stage} | `{info.get('command')}` | {info.get('steps')} | {info.get('wall_seconds')} |"
              for stage, info in m.get("recipe", {}).items()],
            "",
            "Reproduce with:",
            "",
            "```bash",
            *m.get("reproduce", []),
            "```",
            "",
            f"STS Benchmark dev (cosine similarity vs gold score, x100): Spearman {scores.get('spearman')}, "
            f"Pearson {scores.get('pearson')}.",
        ]
        if baselines:
            named = "; ".join(f"{name} {score}" for name, score in baselines.items())
            lines += ["", f"For reference, dev Spearman of: {named}."]
        lines += [
            "",
            "Limits: a 135M-parameter model trained on about 5.7k STS pairs is a demonstration of the recipe, not a "
            "general-purpose embedder; expect it to trail purpose-trained embedders outside STS-like sentence "
            "similarity.",
            "",
            "### Training data notice",
            "",
            *self.notice.split("\n", 2)[-1].strip().splitlines(),
        ]
        return lines


def default_adapters(folder: Path = DEFAULT_ADAPTERS_DIR) -> DefaultAdapters:
    """Read and check the shipped adapters (every file listed in the manifest, with its sha256)."""
    manifest_file = folder / MANIFEST_NAME
    if not manifest_file.is_file():
        raise MissingInputError(
            f"The shipped default adapters are missing ({manifest_file} not found): this installation lacks the "
            "package data. Reinstall llama-encoder, or pass --untrained to convert the bare base.")
    manifest = json.loads(manifest_file.read_text())
    for name, info in manifest["files"].items():
        path = folder / name
        if not path.is_file() or sha256_file(path) != info["sha256"]:
            raise InputChangedError(
                f"The shipped default adapter file {path} is missing or differs from its manifest (sha256 "
                f"{info['sha256']}); reinstall llama-encoder, or pass --untrained to convert the bare base.")
    notice = (folder / NOTICE_NAME).read_text() if (folder / NOTICE_NAME).is_file() else ""
    return DefaultAdapters(tuple(folder / stage for stage in manifest["adapters"]), manifest, notice)


__all__ = ["DEFAULT_ADAPTERS_DIR", "DefaultAdapters", "default_adapters"]
