"""`convert` end to end on tiny random Llama folders with peft adapters, and once on the real SmolLM2."""

from __future__ import annotations

import argparse
import gc
import hashlib
import json
import shutil
import subprocess
import sys
import weakref
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import save_file
from transformers import LlamaConfig, LlamaForCausalLM, LlamaModel

from llama_encoder import LlamaEncoderModel
from llama_encoder.cli import build_parser
from llama_encoder.cli import main as cli_main
from llama_encoder.configuration_llama_encoder import LEGACY_INSTRUCTION_TEMPLATE, fill_instruction_template
from llama_encoder.conversion_scripts import convert as convert_module
from llama_encoder.conversion_scripts.checkpoint import DEFAULT_RETRIEVAL_INSTRUCTION
from llama_encoder.conversion_scripts.convert import convert, parse_size
from llama_encoder.errors import OutputExistsError, VerificationError
from llama_encoder.weights import merge as merge_module
from llama_encoder.weights import streaming
from llama_encoder.weights.lora import read_adapter
from tests.numeric import assert_equal_up_to_summation_order, encoder_terms
from tests.test_lora_merge import assert_state_matches_peft, peft_merged_state, save_lora_adapter
from tests.tiny import TINY_CORPUS, TINY_LATENTS, TINY_LLAMA, save_tiny_base, tiny_bpe_tokenizer

REPO_ROOT = Path(__file__).resolve().parents[1]
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory) -> Path:
    return save_tiny_base(tmp_path_factory.mktemp("base"))


@pytest.fixture(scope="module")
def two_adapters(tiny_base, tmp_path_factory) -> tuple[Path, Path, dict[str, torch.Tensor]]:
    """An MNTP-like adapter on the base and a second one on the merged result, plus peft's own merged weights."""
    root = tmp_path_factory.mktemp("adapters")
    first = save_lora_adapter(LlamaForCausalLM.from_pretrained(tiny_base), root / "mntp", seed=1, r=4,
                              lora_alpha=8, target_modules=TARGETS)
    merged_once = first.merge_and_unload()
    second = save_lora_adapter(merged_once, root / "supervised", seed=2, r=2, lora_alpha=4,
                               target_modules=["q_proj", "v_proj"])
    return root / "mntp", root / "supervised", peft_merged_state(second)


def _sha256_tree(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_stacked_adapters_convert_to_peft_merge_and_verify(tiny_base, two_adapters, tmp_path):
    mntp, supervised, expected_state = two_adapters
    result = convert(out=tmp_path / "encoder", base=str(tiny_base), adapters=[mntp, supervised],
                     pooling="weighted_mean", shard_size="150KB", query_instruction="Find the animal",
                     format="remote-code")
    out = result.out_dir
    assert out == (tmp_path / "encoder").absolute()
    assert (out / "model.safetensors.index.json").is_file()  # small shard size: sharded output
    model = LlamaEncoderModel.from_pretrained(out).eval()
    base_state = LlamaForCausalLM.from_pretrained(tiny_base).state_dict()
    assert_state_matches_peft(model.state_dict(), expected_state, base_state, [read_adapter(mntp),
                                                                               read_adapter(supervised)])

    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "llama_encoder" and config["is_causal"] is False
    assert config["pooling_mode"] == "weighted_mean" and "auto_map" in config
    st_config = json.loads((out / "config_sentence_transformers.json").read_text())
    assert st_config["prompts"]["query"] == "Instruct: Find the animal\nQuery:\n"  # no adapter trained instructions
    tokenizer_config = json.loads((out / "tokenizer_config.json").read_text())
    assert tokenizer_config["pad_token"] and tokenizer_config["padding_side"] == "right"
    manifest = json.loads((out / "verification.json").read_text())
    assert manifest["passed"] and manifest["max_cosine_distance"] <= 1e-4
    assert set(manifest["files"]) == {p.name for p in out.iterdir()} - {"verification.json"}
    card = (out / "README.md").read_text()
    metadata = yaml.safe_load(card.split("---\n")[1])
    assert metadata["license"] == "mit" and "base_model" not in metadata  # a local path is no Hub link
    assert "mntp" in card and "supervised" in card
    assert not list(tmp_path.glob(".tmp-*")), "temporary folders left behind"

    # The merged encoder equals a stock LlamaModel with peft's merged weights, run without causality.
    stock = LlamaModel(LlamaConfig(**{**TINY_LLAMA, "vocab_size": model.config.vocab_size})).eval()
    stock.load_state_dict(expected_state)
    ids = torch.randint(3, model.config.vocab_size, (2, 7))
    with torch.no_grad():  # our float32 merge vs peft's moves the weights by rounding errors only
        assert_equal_up_to_summation_order(model(input_ids=ids).last_hidden_state,
                                           stock(input_ids=ids, is_causal=False).last_hidden_state,
                                           terms=encoder_terms(model, 7, pooled=False))


@pytest.mark.parametrize("pooling", ["mean", "eos", "bos"])
def test_every_pooling_mode_converts_and_verifies(tiny_base, tmp_path, pooling):
    result = convert(out=tmp_path / pooling, base=str(tiny_base), pooling=pooling, padding_side="left",
                     format="remote-code")
    assert result.pooling_mode == pooling
    assert result.verification["passed"]
    assert json.loads((result.out_dir / "tokenizer_config.json").read_text())["padding_side"] == "left"


def test_latent_attention_head_from_training_is_carried_over(tiny_base, two_adapters, tmp_path):
    mntp = two_adapters[0]
    adapter = tmp_path / "with-head"
    adapter.mkdir()
    for item in mntp.iterdir():
        (adapter / item.name).write_bytes(item.read_bytes())
    sizes = {**TINY_LATENTS, "latent_attention_head_dim": 16}
    head_model = LlamaEncoderModel(LlamaEncoderModel.config_class(**TINY_LLAMA, pooling_mode="latent_attention",
                                                                  **sizes))
    head = {f"latent_attention.{k}": torch.randn_like(v) for k, v in head_model.latent_attention.state_dict().items()}
    save_file(head, adapter / "pooling_head.safetensors")
    (adapter / "pooling_config.json").write_text(json.dumps({"pooling_mode": "latent_attention", **sizes}))

    result = convert(out=tmp_path / "encoder", base=str(tiny_base), adapters=[adapter], format="remote-code")
    assert result.pooling_mode == "latent_attention"
    model = LlamaEncoderModel.from_pretrained(result.out_dir)
    assert model.config.latent_attention_head_dim == 16
    for name, tensor in head.items():  # carried over from the file: bit for bit
        torch.testing.assert_close(model.state_dict()[name], tensor, rtol=0, atol=0)

    with pytest.raises(ValueError, match="trained with pooling 'latent_attention' but --pooling 'mean'"):
        convert(out=tmp_path / "other", base=str(tiny_base), adapters=[adapter], pooling="mean")


def _with_training_record(adapter: Path, folder: Path, record: dict) -> Path:
    """A copy of `adapter` with `record` as its training_args.json (what `llama-encoder train` writes beside it)."""
    shutil.copytree(adapter, folder)
    (folder / "training_args.json").write_text(json.dumps(record))
    return folder


def test_an_adapter_trained_before_templates_were_recorded_keeps_the_space_template(tiny_base, two_adapters,
                                                                                    tmp_path):
    """An adapter of an earlier version, trained with an instruction but recording no template, was trained with
    `...\\nQuery: `: the checkpoint keeps that template (and so its own Sentence Transformers module, the trailing
    space being inexact for stock pooling); adapters trained without instructions leave the package's template."""
    legacy = _with_training_record(two_adapters[1], tmp_path / "legacy", {
        "objective": "supervised", "data": ["triples.jsonl"], "instruction": "Find the animal"})
    sts_only = _with_training_record(two_adapters[0], tmp_path / "sts", {
        "objective": "supervised", "data": ["sts.csv"], "data_format": "sts", "instruction": None})
    assert (read_adapter(legacy).instruction_template, read_adapter(sts_only).instruction_template) == (
        LEGACY_INSTRUCTION_TEMPLATE, None)
    result = convert(out=tmp_path / "encoder", base=str(tiny_base), adapters=[legacy, sts_only])
    out = result.out_dir
    assert json.loads((out / "config.json").read_text())["instruction_template"] == LEGACY_INSTRUCTION_TEMPLATE
    prompts = json.loads((out / "config_sentence_transformers.json").read_text())["prompts"]
    assert prompts == {"query": fill_instruction_template(LEGACY_INSTRUCTION_TEMPLATE, DEFAULT_RETRIEVAL_INSTRUCTION),
                       "document": ""}
    modules = json.loads((out / "modules.json").read_text())
    assert [m["type"] for m in modules] == ["sentence_transformers_llama_encoder.LlamaEncoderTransformer"]
    assert "query prompt" in result.verification["layout"]["custom_reason"]


def test_a_damaged_training_record_is_refused_before_anything_is_written(two_adapters, tiny_base, tmp_path):
    adapter = _with_training_record(two_adapters[1], tmp_path / "bad", {
        "objective": "supervised", "instruction_template": "Query: ", "prompt_instructions": {"sts": "Find"}})
    with pytest.raises(ValueError, match=r"training_args.json: instruction_template must .*'\{instruction\}'"):
        convert(out=tmp_path / "out", base=str(tiny_base), adapters=[adapter])
    (adapter / "training_args.json").write_text(json.dumps({
        "objective": "supervised", "instruction_template": "{instruction}\n", "prompt_instructions": {"plain": "x"}}))
    with pytest.raises(ValueError, match="prompt_name 'plain' is reserved"):
        convert(out=tmp_path / "out", base=str(tiny_base), adapters=[adapter])
    assert not (tmp_path / "out").exists()


def test_existing_output_is_refused_before_any_work(tiny_base, tmp_path, monkeypatch):
    out = tmp_path / "encoder"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    monkeypatch.setattr(convert_module, "resolve_base", lambda **_: pytest.fail("work started"))
    with pytest.raises(OutputExistsError, match="--overwrite"):
        convert(out=out, base=str(tiny_base))
    assert (out / "keep.txt").read_text() == "mine"


@pytest.mark.parametrize("failing_step", ["write_checkpoint", "verify_checkpoint"])
def test_interrupted_conversion_leaves_nothing_and_keeps_the_old_checkpoint(tiny_base, tmp_path, monkeypatch,
                                                                           failing_step):
    out = tmp_path / "encoder"
    convert(out=out, base=str(tiny_base))
    before = _sha256_tree(out)

    def explode(*args, **kwargs):
        raise RuntimeError("injected failure mid-write")

    monkeypatch.setattr(convert_module, failing_step, explode)
    with pytest.raises(RuntimeError, match="injected failure"):
        convert(out=out, base=str(tiny_base), pooling="bos", overwrite=True, format="remote-code")
    assert _sha256_tree(out) == before
    with pytest.raises(RuntimeError, match="injected failure"):
        convert(out=tmp_path / "fresh", base=str(tiny_base))
    assert not (tmp_path / "fresh").exists()
    assert not list(tmp_path.glob(".tmp-*"))


def test_verification_mismatch_fails_and_leaves_nothing(tiny_base, tmp_path, monkeypatch):
    real = convert_module.compute_reference_embeddings

    def perturbed(*args, **kwargs):
        embeddings = real(*args, **kwargs)
        embeddings[0] = -embeddings[0]
        return embeddings

    monkeypatch.setattr(convert_module, "compute_reference_embeddings", perturbed)
    with pytest.raises(VerificationError):
        convert(out=tmp_path / "encoder", base=str(tiny_base))
    assert not (tmp_path / "encoder").exists() and not list(tmp_path.glob(".tmp-*"))


@pytest.mark.parametrize("fault", ["rows-reversed", "adapter-skipped"])
def test_a_bad_shard_write_or_merge_fails_verification(fault, tiny_base, two_adapters, tmp_path, monkeypatch):
    """The reference is merged again from the sources, without the shard writer: what the writer gets wrong in the
    shards (a matrix stored with its rows reversed, an adapter left out of the merge) no longer verifies."""
    mntp, supervised, _ = two_adapters
    real_write, real_write_shards = streaming._write_tensor, merge_module.write_shards
    faults = []

    def reversed_rows(handle, tensor):
        if tensor.dim() == 2 and not faults:
            faults.append(tuple(tensor.shape))
            tensor = tensor.flip(0)
        real_write(handle, tensor)

    def without_the_last_adapter(source, out_dir, *, transform=None, **kwargs):
        faults.append("merge")
        transform.adapters = transform.adapters[:-1]
        transform.applied = transform.applied[:-1]
        return real_write_shards(source, out_dir, transform=transform, **kwargs)

    if fault == "rows-reversed":
        monkeypatch.setattr(streaming, "_write_tensor", reversed_rows)
    else:
        monkeypatch.setattr(merge_module, "write_shards", without_the_last_adapter)
    with pytest.raises(VerificationError, match="weights_vs_reference: .*differs by up to"):
        convert(out=tmp_path / "encoder", base=str(tiny_base), adapters=[mntp, supervised])
    assert faults and not (tmp_path / "encoder").exists() and not list(tmp_path.glob(".tmp-*"))


def test_the_card_and_manifest_say_what_was_compared(tiny_base, two_adapters, tmp_path):
    mntp, supervised, _ = two_adapters
    result = convert(out=tmp_path / "encoder", base=str(tiny_base), adapters=[mntp, supervised], dtype="bfloat16",
                     shard_size="150KB")
    manifest = json.loads((result.out_dir / "verification.json").read_text())
    reference = manifest["reference"]
    assert "merged a second time from their files" in reference and "rounded once to bfloat16" in reference
    assert "without the shard writer" in reference
    checks = {check["name"]: check for check in manifest["checks"]}
    weights = checks["weights_vs_reference"]
    assert weights["passed"] and weights["problems"] == []
    # the sample: the embeddings, the final norm, every tensor of the first and last layer, ...
    assert {"embed_tokens.weight", "norm.weight", "layers.0.self_attn.q_proj.weight",
            "layers.1.mlp.down_proj.weight"} <= set(weights["tensors"])
    assert len(result.weights["files"]) > 1 and weights["num_tensors_in_shards"] == result.weights["num_tensors"]
    assert 0 < weights["max_abs_difference"] < 2**-8
    for loader in ("automodel", "sentence_transformers"):
        assert checks[f"{loader}_vs_reference"]["passed"]
    card = (result.out_dir / "README.md").read_text()
    assert f"compared with each other and with {reference}." in card
    assert f"{len(weights['tensors'])} of the {weights['num_tensors_in_shards']} tensors in the weight files" in card
    assert "compared with the merged in-memory model" not in card


def test_an_in_memory_base_is_freed_before_verification(tmp_path, monkeypatch):
    """A base held as a state dict (GGUF, or pickled as here) is consumed by the reference merge: none of its
    tensors is alive while the checkpoint is verified in a second process."""
    base = tmp_path / "pickled"
    tokenizer = tiny_bpe_tokenizer(TINY_CORPUS)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**{**TINY_LLAMA, "vocab_size": len(tokenizer)}))
    model.config.save_pretrained(base)
    tokenizer.save_pretrained(base)
    torch.save(model.state_dict(), base / "pytorch_model.bin")
    del model
    tensors = []
    real_resolve, real_verify = convert_module.resolve_base, convert_module.verify_checkpoint

    def resolve(**kwargs):
        source = real_resolve(**kwargs)
        tensors.extend(weakref.ref(tensor) for tensor in source.state_dict.values())
        return source

    alive = []

    def verify(*args, **kwargs):
        gc.collect()
        alive.append(sum(ref() is not None for ref in tensors))
        return real_verify(*args, **kwargs)

    monkeypatch.setattr(convert_module, "resolve_base", resolve)
    monkeypatch.setattr(convert_module, "verify_checkpoint", verify)
    result = convert(out=tmp_path / "encoder", base=str(base), allow_pickle=True)
    assert result.verification["passed"]
    assert len(tensors) > 10 and alive == [0]


def test_adapter_for_another_base_is_refused_before_writing(tiny_base, tmp_path):
    other = LlamaForCausalLM(LlamaConfig(**{**TINY_LLAMA, "hidden_size": 32, "intermediate_size": 64}))
    save_lora_adapter(other, tmp_path / "other", seed=3, r=2, lora_alpha=4, target_modules=["q_proj"])
    with pytest.raises(ValueError, match="hidden_size"):
        convert(out=tmp_path / "encoder", base=str(tiny_base), adapters=[tmp_path / "other"])
    assert not (tmp_path / "encoder").exists()


def test_parse_size():
    assert parse_size("2GB") == 2_000_000_000
    assert parse_size("1.5GiB") == int(1.5 * 2**30)
    assert parse_size("500MB") == 500_000_000
    assert parse_size(1234) == 1234
    with pytest.raises(ValueError, match="2GB"):
        parse_size("lots")


def test_cli_convert_and_push_dry_run(tiny_base, tmp_path, capsys):
    assert cli_main(["convert", "--base", str(tiny_base), "--pooling", "mean", "--out", str(tmp_path / "e")]) == 0
    assert "Verified" in capsys.readouterr().out
    assert cli_main(["push", str(tmp_path / "e"), "--repo-id", "me/tiny", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "Would upload" in out and "model.safetensors" in out and "verification.json" in out
    assert cli_main(["convert", "--base", str(tiny_base), "--out", str(tmp_path / "e")]) == 1
    assert "already exists" in capsys.readouterr().err


def test_cli_help_explains_every_option():
    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    assert set(commands) == {"convert", "push", "embed", "evaluate", "train", "mine"}
    objectives = next(a for a in commands["train"]._actions if isinstance(a, argparse._SubParsersAction)).choices
    assert set(objectives) == {"mntp", "simcse", "supervised"}
    every = [((name,), command) for name, command in commands.items() if name != "train"]
    every += [(("train", name), command) for name, command in objectives.items()]
    for names, command in every:
        for action in command._actions:
            assert action.help and len(action.help) > 15, f"{names} {action.option_strings or action.dest} has no help"
        result = subprocess.run([sys.executable, "-m", "llama_encoder.cli", *names, "--help"], capture_output=True,
                                text=True, cwd=REPO_ROOT)
        assert result.returncode == 0 and all(o in result.stdout for a in command._actions for o in a.option_strings)


@pytest.mark.integration
def test_main_job_on_the_embedded_smollm2(tmp_path):
    """The README's first command: convert SmolLM2, load it with AutoModel and SentenceTransformer, compare."""
    out = tmp_path / "smollm2-encoder"
    result = convert(out=out)
    assert result.verification["max_cosine_distance"] <= 1e-4
    config = json.loads((out / "config.json").read_text())
    assert config["num_hidden_layers"] == 30 and config["hidden_size"] == 576
    # native all the way: stock AutoModel (documents) and stock SentenceTransformer (queries too) were run in the
    # fresh process and embed like the independently merged model
    assert config["model_type"] == "llama" and config["is_causal"] is False
    engines = result.verification["engines"]
    assert {key: engines[key]["status"] for key in ("transformers", "sentence_transformers", "tei")} == {
        "transformers": "verified", "sentence_transformers": "verified", "tei": "by format"}
    native_checks = [c for c in result.verification["checks"] if c["name"].startswith(("automodel_native",
                                                                                         "sentence_transformers_native"))]
    saved = json.loads((out / "config_sentence_transformers.json").read_text())["prompts"]
    assert {"query", "sts"} <= set(saved)  # the default's trained task prompts; each one was compared
    assert {c["prompt"] for c in native_checks} == {"plain"} | {name for name, text in saved.items() if text}
    assert all(c["max_cosine_distance"] <= 1e-4 for c in native_checks)
    run = subprocess.run([sys.executable, str(REPO_ROOT / "examples" / "compare_sentences.py"), str(out)],
                         capture_output=True, text=True, cwd=tmp_path, timeout=600, stdin=subprocess.DEVNULL)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "Largest difference between the two loaders" in run.stdout
    assert "stock modules, no remote code" in run.stdout
