"""The LoRA adapters shipped for the embedded default base (SmolLM2-135M-Instruct).

`llama_encoder/default_adapters/` holds an MNTP adapter and a supervised adapter trained on top of it with the
package's own `llama-encoder train` on public data, plus `manifest.json` (files, sizes, sha256, the training mix,
the commands that reproduce them, their development-set scorecard beside recorded baselines, the host) and
`NOTICE.md` (the training data's attribution).
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
        """Model-card lines: what was trained on what, how to reproduce it, the scorecard and the data notice."""
        m = self.manifest
        lines = ["## Training", "", m.get("description") or (
            f"The merged adapters are llama-encoder's shipped defaults for {m.get('base', 'the embedded base')}, "
            f"trained with `llama-encoder train` ({m.get('training_data', 'see the notice below')})."),
            "", f"Stored as {m.get('stored_form', '?')}.", "",
            "| stage | objective | steps | tokens | wall time (min) | compute dtype |",
            "|---|---|---:|---:|---:|---|"]
        stopped = False  # any stage stopped at its time cap (--stop-at-step) on the full schedule
        for stage, info in m.get("recipe", {}).items():
            seconds = info.get("wall_seconds")
            steps, scheduled = info.get("steps"), info.get("scheduled_steps")
            if scheduled and steps != scheduled:
                steps, stopped = f"{steps} of {scheduled}", True
            lines.append(f"| {stage} | {info.get('objective')} | {steps} | {_figure(info.get('tokens'))} | "
                         f"{_figure(seconds and seconds / 60, 1)} | {info.get('compute_dtype') or '-'} |")
        if stopped:
            lines += ["", "Steps \"N of M\": the stage stopped at step N, its time cap (`--stop-at-step`), of a "
                      "schedule planned for M steps, whose learning rate it kept."]
        if m.get("mix"):
            lines += ["", "Supervised mix (each set trained behind its instruction; the prompt name is the "
                      "checkpoint's `prompt_name` for it):", "",
                      "| dataset | prompt name | instruction | loss | examples in the set |", "|---|---|---|---|---:|",
                      *[f"| {d['name']} | `{d.get('prompt_name')}` | {d.get('instruction') or '-'} | {d.get('loss')} | "
                        f"{_figure(d.get('examples'))} |" for d in m["mix"]]]
        lines += ["", "Reproduce with:", "", "```bash", *m.get("reproduce", []), "```"]
        lines += self._scorecard_lines()
        if m.get("limits"):
            lines += ["", f"Limits: {m['limits']}"]
        lines += ["", "### Training data notice", "", *self.notice.split("\n", 2)[-1].strip().splitlines()]
        return lines

    def _scorecard_lines(self) -> list[str]:
        """The installed adapters' development-set figures beside the recorded baselines, with the host."""
        m = self.manifest
        scorecard, baselines = m.get("scorecard") or {}, m.get("baselines") or {}
        if not scorecard:
            sts = m.get("sts_dev", {})
            return ["", f"STS Benchmark dev (cosine similarity vs gold score, x100): Spearman {sts.get('spearman')}, "
                    f"Pearson {sts.get('pearson')}."]
        columns = [("sts-dev", "spearman", "STS Benchmark dev Spearman"), ("squad-dev-ir", "ndcg@10",
                   "SQuAD dev nDCG@10"), ("squad-dev-ir", "recall@100", "SQuAD dev Recall@100")]
        wanted = {metric for _, metric, _ in columns}
        rows = [("this checkpoint", scorecard)]  # x100 already
        for label in baselines.get("models", {}):  # raw, as `evaluate --json` writes them
            rows.append((label, {name: {k: 100 * v for k, v in by_model[label].items() if k in wanted}
                                 for name, by_model in baselines.get("scores", {}).items() if label in by_model}))
        lines = ["", "Development-set scorecard (`llama-encoder evaluate`, CPU, float32; STS sentences behind the "
                 "checkpoint's `sts` prompt where it has one, retrieval queries behind its `query` prompt, exact "
                 "cosine search; x100):", "",
                 "| model | " + " | ".join(c[2] for c in columns) + " |", "|---|" + "---:|" * len(columns)]
        for label, scores in rows:
            lines.append(f"| {label} | " + " | ".join(_figure(scores.get(name, {}).get(metric), 2)
                                                      for name, metric, _ in columns) + " |")
        host = m.get("host") or {}
        lines += ["", f"Measured on {host.get('cpu', 'an unrecorded host')} ({host.get('logical_cpus', '?')} "
                  "logical CPUs). These are development sets: STS Benchmark dev and SQuAD v1.1 dev as retrieval "
                  "(2,067 paragraphs, 10,570 questions); no pair or question of either was trained on."]
        return lines


def _figure(value, digits: int = 0) -> str:
    """A table cell: a number with thousands separators, or '-' when unknown."""
    if value is None:
        return "-"
    return f"{value:,.{digits}f}"


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
