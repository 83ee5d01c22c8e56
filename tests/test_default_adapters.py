"""The shipped default adapters: manifest integrity, size, refusals, and that `convert` with no base and no adapter
merges exactly `--adapter <shipped mntp> --adapter <shipped supervised>`."""

from __future__ import annotations

import hashlib
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from llama_encoder.configuration_llama_encoder import DEFAULT_INSTRUCTION_TEMPLATE
from llama_encoder.conversion_scripts.convert import convert
from llama_encoder.errors import InputChangedError, InputError, MissingInputError
from llama_encoder.weights.default_adapters import DEFAULT_ADAPTERS_DIR, default_adapters
from llama_encoder.weights.lora import read_adapter

SIZE_LIMIT = 25 * 1024 * 1024


def test_manifest_lists_every_shipped_file_with_its_sha256_and_stays_under_25_mb():
    manifest = json.loads((DEFAULT_ADAPTERS_DIR / "manifest.json").read_text())
    shipped = {p.relative_to(DEFAULT_ADAPTERS_DIR).as_posix() for p in DEFAULT_ADAPTERS_DIR.rglob("*") if p.is_file()}
    assert shipped - {"manifest.json", "NOTICE.md"} == set(manifest["files"])
    for name, info in manifest["files"].items():
        data = (DEFAULT_ADAPTERS_DIR / name).read_bytes()
        assert hashlib.sha256(data).hexdigest() == info["sha256"] and len(data) == info["bytes"]
    assert sum(p.stat().st_size for p in DEFAULT_ADAPTERS_DIR.rglob("*") if p.is_file()) <= SIZE_LIMIT
    assert not [p for p in DEFAULT_ADAPTERS_DIR.rglob("*") if p.suffix in (".bin", ".pt", ".pkl")]
    loaded = default_adapters()
    assert [f.name for f in loaded.folders] == ["mntp", "supervised"]
    for folder in loaded.folders:  # each one a valid adapter the converter reads as is
        adapter = read_adapter(folder)
        assert adapter.modules and adapter.config["r"] in (8, 16)
    section = "\n".join(loaded.card_section())
    assert "**STS Benchmark** train split" in section and "CC BY-SA" in section and "SQuAD" in section
    for entry in manifest["mix"]:  # every trained set with its prompt name and instruction
        assert f"| {entry['name']} | `{entry['prompt_name']}` | {entry['instruction']} |" in section
    sts, squad = manifest["scorecard"]["sts-dev"], manifest["scorecard"]["squad-dev-ir"]
    assert f"| this checkpoint | {sts['spearman']:.2f} | {squad['ndcg@10']:.2f} | {squad['recall@100']:.2f} |" \
        in section


def test_the_card_section_shows_the_scorecard_beside_raw_baselines_and_dashes_for_what_was_not_measured():
    from llama_encoder.weights.default_adapters import DefaultAdapters

    manifest = {
        "description": "Trained on a mix.", "stored_form": "bfloat16-r16",
        "recipe": {"mntp": {"objective": "mntp", "steps": 80, "scheduled_steps": 260, "tokens": 247139,
                            "wall_seconds": 630.0, "compute_dtype": "bfloat16"},
                   "supervised": {"objective": "supervised", "steps": 175, "scheduled_steps": 175, "tokens": 1000,
                                  "wall_seconds": None}},
        "mix": [{"name": "sts", "prompt_name": "sts", "instruction": "Find the same meaning", "loss": "cosent",
                 "examples": 5749}],
        "scorecard": {"sts-dev": {"spearman": 87.1234}, "squad-dev-ir": {"ndcg@10": 70.0, "recall@100": 98.5}},
        "baselines": {"models": {"MiniLM": "x", "causal": "y"},
                      "scores": {"sts-dev": {"MiniLM": {"spearman": 0.86721, "n": 1500},
                                             "causal": {"spearman": 0.5415}},
                                 "squad-dev-ir": {"MiniLM": {"ndcg@10": 0.77339, "recall@100": 0.99043}}}},
        "host": {"cpu": "Some CPU", "logical_cpus": 2},
        "limits": "small.",
    }
    lines = DefaultAdapters((), manifest, "# Notice\n\nCC BY-SA text.\n").card_section()
    assert lines[2] == "Trained on a mix."
    assert "| mntp | mntp | 80 of 260 | 247,139 | 10.5 | bfloat16 |" in lines  # stopped at its time cap
    assert "| supervised | supervised | 175 | 1,000 | - | - |" in lines  # ran its whole schedule; time unrecorded
    assert any(line.startswith('Steps "N of M": the stage stopped at step N') for line in lines)
    assert "| sts | `sts` | Find the same meaning | cosent | 5,749 |" in lines
    assert "| this checkpoint | 87.12 | 70.00 | 98.50 |" in lines
    assert "| MiniLM | 86.72 | 77.34 | 99.04 |" in lines  # raw scores x100
    assert "| causal | 54.15 | - | - |" in lines  # a set the baseline was not scored on
    assert any(line.startswith("Measured on Some CPU (2 logical CPUs)") for line in lines)
    assert lines[-1] == "CC BY-SA text." and "Limits: small." in lines


def test_a_modified_or_missing_shipped_file_is_refused(tmp_path):
    copy = tmp_path / "default_adapters"
    shutil.copytree(DEFAULT_ADAPTERS_DIR, copy)
    (copy / "mntp" / "adapter_config.json").write_text("{}")
    with pytest.raises(InputChangedError, match="differs from its manifest.*--untrained"):
        default_adapters(copy)
    with pytest.raises(MissingInputError, match="--untrained"):
        default_adapters(tmp_path / "absent")


def test_the_shipped_supervised_adapter_records_the_newline_template_and_each_trained_prompt():
    """What `convert` writes as the checkpoint's prompts: the supervised stage's template and instructions, one per
    prompt name of the manifest's mix; MNTP trained none."""
    manifest = json.loads((DEFAULT_ADAPTERS_DIR / "manifest.json").read_text())
    mntp, supervised = (read_adapter(DEFAULT_ADAPTERS_DIR / stage) for stage in ("mntp", "supervised"))
    assert (mntp.instruction_template, mntp.prompt_instructions) == (None, {})
    assert supervised.instruction_template == DEFAULT_INSTRUCTION_TEMPLATE
    assert supervised.prompt_instructions == {d["prompt_name"]: d["instruction"] for d in manifest["mix"]}
    assert "query" in supervised.prompt_instructions


def test_untrained_with_an_adapter_is_refused_before_anything_is_written(tmp_path):
    with pytest.raises(InputError, match="--untrained.*--adapter"):
        convert(out=tmp_path / "out", untrained=True, adapters=[DEFAULT_ADAPTERS_DIR / "mntp"])
    assert not (tmp_path / "out").exists()


@pytest.mark.integration
def test_the_default_merge_equals_the_shipped_adapters_given_explicitly(tmp_path):
    default = convert(out=tmp_path / "default")
    explicit = convert(out=tmp_path / "explicit",
                       adapters=[DEFAULT_ADAPTERS_DIR / "mntp", DEFAULT_ADAPTERS_DIR / "supervised"])
    untrained = convert(out=tmp_path / "untrained", untrained=True)
    assert len(default.merged_adapters) == 2 and not untrained.merged_adapters
    a, b, c = (load_file(r.out_dir / "model.safetensors") for r in (default, explicit, untrained))
    assert a.keys() == b.keys() == c.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    changed = [k for k in a if not torch.equal(a[k], c[k])]
    assert any("q_proj" in k for k in changed) and any("down_proj" in k for k in changed)
    card = (default.out_dir / "README.md").read_text()
    assert "## Training" in card and "**STS Benchmark** train split" in card
    assert "## Training" not in (untrained.out_dir / "README.md").read_text()
    # no instruction-trained adapter: the package's newline template, so the bare base is native too
    bare_prompts = json.loads((untrained.out_dir / "config_sentence_transformers.json").read_text())["prompts"]
    assert bare_prompts["query"].endswith("\nQuery:\n") and set(bare_prompts) == {"query", "document"}
    assert json.loads((untrained.out_dir / "modules.json").read_text())[1]["type"] == \
        "sentence_transformers.models.Pooling"
    # native all the way, given or by default: the supervised adapter was trained with the newline template, which
    # stock Sentence Transformers pools exactly, and every prompt it trained is a named prompt of the checkpoint
    trained = read_adapter(DEFAULT_ADAPTERS_DIR / "supervised").prompt_instructions
    for result in (default, explicit):
        modules = json.loads((result.out_dir / "modules.json").read_text())
        assert modules[1]["type"] == "sentence_transformers.models.Pooling"
        assert result.verification["engines"]["sentence_transformers"]["status"] == "verified"
        prompts = json.loads((result.out_dir / "config_sentence_transformers.json").read_text())["prompts"]
        assert set(prompts) == {"document", *trained} and prompts["document"] == ""
        assert all(prompts[name] == DEFAULT_INSTRUCTION_TEMPLATE.format(instruction=instruction)
                   for name, instruction in trained.items())
