"""Streaming merge of LoRA adapters into a (sharded) base checkpoint, compared with peft's own merge."""

from __future__ import annotations

import gc
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import LlamaForCausalLM, LlamaModel

from llama_encoder import LlamaEncoderModel
from llama_encoder.weights import merge as merge_module
from llama_encoder.weights import shards as shards_module
from llama_encoder.weights.lora import read_adapter
from llama_encoder.weights.merge import stream_merge
from llama_encoder.weights.names import SAFE_WEIGHTS_INDEX_NAME, normalize_base_key
from llama_encoder.weights.shards import base_weight_shapes, resolve_base_files
from tests.test_lora_merge import assert_state_matches_peft, peft_merged_state, save_lora_adapter, tiny_llama_config
from tests.tiny import tiny_encoder_config

SMALL_SHARD = 60_000  # bytes: the tiny model (~0.5 MB in float32) is written as several shards


def _encoder_state(folder: Path) -> dict[str, torch.Tensor]:
    """Load a merged folder the way users do: through LlamaEncoderModel.from_pretrained."""
    tiny_encoder_config().save_pretrained(folder)
    model = LlamaEncoderModel.from_pretrained(folder)
    return {key: value.detach() for key, value in model.state_dict().items()}


def _load_all(folder: Path) -> dict[str, torch.Tensor]:
    state = {}
    for file in resolve_base_files(folder):
        state.update(load_file(file))
    return state


def _assert_merged_like_peft(written: dict, expected: dict, base, adapters) -> None:
    """assert_state_matches_peft with the base as a folder or a state dict."""
    assert_state_matches_peft(written, expected, _load_all(base) if isinstance(base, Path) else base, adapters)


def _save_base(model, folder: Path) -> Path:
    model.save_pretrained(folder, max_shard_size="200KB")
    return folder


@pytest.fixture(scope="module")
def two_adapters(tmp_path_factory):
    """A sharded LlamaForCausalLM base, adapter 1 on it, adapter 2 on the model with adapter 1 merged, and peft's
    result of merging both (merge_and_unload twice)."""
    root = tmp_path_factory.mktemp("two_adapters")
    torch.manual_seed(0)
    _save_base(LlamaForCausalLM(tiny_llama_config()), root / "base")
    first = save_lora_adapter(
        LlamaForCausalLM.from_pretrained(root / "base"),
        root / "adapter1",
        seed=1,
        r=4,
        lora_alpha=8,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    )
    first.merge_and_unload().save_pretrained(root / "merged1")
    second = save_lora_adapter(
        LlamaForCausalLM.from_pretrained(root / "merged1"),
        root / "adapter2",
        seed=2,
        r=2,
        lora_alpha=4,
        use_rslora=True,
        target_modules=["q_proj", "v_proj", "up_proj"],
    )
    return root, peft_merged_state(second)


def test_normalize_base_key():
    assert normalize_base_key("model.layers.3.mlp.up_proj.weight") == "layers.3.mlp.up_proj.weight"
    assert normalize_base_key("model.embed_tokens.weight") == "embed_tokens.weight"
    assert normalize_base_key("model.norm.weight") == "norm.weight"
    assert normalize_base_key("lm_head.weight") is None
    assert normalize_base_key("model.layers.0.self_attn.rotary_emb.inv_freq") is None
    assert normalize_base_key("layers.0.self_attn.q_proj.weight") == "layers.0.self_attn.q_proj.weight"
    assert normalize_base_key("latent_attention.latents") == "latent_attention.latents"


def test_two_adapters_on_sharded_base_match_peft(two_adapters, tmp_path):
    root, expected = two_adapters
    base_files = resolve_base_files(root / "base")
    assert len(base_files) >= 2, "the base must be sharded for this test"
    adapters = [read_adapter(root / "adapter1"), read_adapter(root / "adapter2")]

    summary = stream_merge(root / "base", adapters, tmp_path, shard_size_bytes=SMALL_SHARD)

    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(summary["files"]) >= 2 and sorted(set(index["weight_map"].values())) == summary["files"]
    assert summary["files"][0] == f"model-00001-of-{len(summary['files']):05d}.safetensors"
    assert not list(tmp_path.glob("*.tmp")), "temporary shard names must be gone"
    on_disk = {}
    for name in summary["files"]:
        shard = load_file(tmp_path / name)
        assert sum(t.numel() * t.element_size() for t in shard.values()) <= SMALL_SHARD or len(shard) == 1
        on_disk.update(shard)
    assert index["metadata"]["total_size"] == summary["total_size"]
    assert summary["total_size"] == sum(t.numel() * t.element_size() for t in on_disk.values())
    assert set(index["weight_map"]) == set(on_disk) == set(expected)
    assert summary["merged_modules"] == [len(adapters[0].modules), len(adapters[1].modules)] == [14, 6]

    loaded = _encoder_state(tmp_path)
    assert set(loaded) == set(expected)
    _assert_merged_like_peft(loaded, expected, root / "base", adapters)


def test_single_output_shard_and_dtype_cast(two_adapters, tmp_path):
    root, expected = two_adapters
    adapters = [read_adapter(root / "adapter1"), read_adapter(root / "adapter2")]
    summary = stream_merge(root / "base", adapters, tmp_path, shard_size_bytes=2**30, dtype=torch.bfloat16)
    assert summary["files"] == ["model.safetensors"]
    assert not (tmp_path / "model.safetensors.index.json").exists()
    written = load_file(tmp_path / "model.safetensors")
    assert {t.dtype for t in written.values()} == {torch.bfloat16}
    # each tensor the bfloat16 rounding of a value within float32 merging error of peft's float32 result
    _assert_merged_like_peft(written, expected, root / "base", adapters)


def test_llm2vec_adapter_on_base_model_merges_into_causal_lm_checkpoint(tmp_path):
    """An adapter trained on LlamaModel (keys without the inner `model.`) merges into a LlamaForCausalLM base."""
    torch.manual_seed(0)
    base = _save_base(LlamaForCausalLM(tiny_llama_config()), tmp_path / "base")
    peft_model = save_lora_adapter(
        LlamaModel.from_pretrained(base), tmp_path / "mntp", seed=3, r=4, lora_alpha=16, target_modules="all-linear"
    )
    adapter = read_adapter(tmp_path / "mntp")
    out = tmp_path / "out"
    out.mkdir()
    stream_merge(base, [adapter], out, shard_size_bytes=SMALL_SHARD)
    loaded = _encoder_state(out)
    _assert_merged_like_peft(loaded, peft_merged_state(peft_model), base, [adapter])


def test_embedding_lora_with_peft_copy_matches_peft(tmp_path):
    torch.manual_seed(0)
    base = _save_base(LlamaForCausalLM(tiny_llama_config()), tmp_path / "base")
    peft_model = save_lora_adapter(
        LlamaForCausalLM.from_pretrained(base),
        tmp_path / "emb",
        seed=4,
        r=2,
        lora_alpha=2,
        target_modules=["embed_tokens", "q_proj"],
    )
    adapter = read_adapter(tmp_path / "emb")
    assert "embed_tokens.weight" in adapter.base_copies
    out = tmp_path / "out"
    out.mkdir()
    stream_merge(base, [adapter], out, shard_size_bytes=2**30)
    written = load_file(out / "model.safetensors")
    expected = peft_merged_state(peft_model)
    names = ("embed_tokens.weight", "layers.0.self_attn.q_proj.weight")
    _assert_merged_like_peft(written, {name: expected[name] for name in names}, base, [adapter])

    adapter.base_copies["embed_tokens.weight"] = adapter.base_copies["embed_tokens.weight"] + 1.0
    with pytest.raises(ValueError, match="own copy of embed_tokens.weight that differs"):
        stream_merge(base, [adapter], tmp_path / "out", shard_size_bytes=2**30)
    assert sorted(path.name for path in out.iterdir()) == ["model.safetensors"], "a failed merge leaves no files"


def test_in_memory_sources_loaders_and_extra_tensors(tmp_path):
    """State dicts (e.g. from GGUF) and (label, loader) pairs; loaders run one at a time, with shards written
    before the next loader is called; the pooling head is appended."""
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config())
    state = {key: value.clone() for key, value in model.state_dict().items()}
    adapter_dir = tmp_path / "adapter"
    peft_model = save_lora_adapter(model, adapter_dir, seed=5, r=2, lora_alpha=4, target_modules=["o_proj"])
    expected = peft_merged_state(peft_model)
    head = {"latent_attention.latents": torch.randn(16, 64)}
    adapter = read_adapter(adapter_dir)

    half = len(state) // 2
    parts = [dict(list(state.items())[:half]), dict(list(state.items())[half:])]
    shards_seen_at_call = []

    def loader(part: int):
        def load():
            shards_seen_at_call.append(len(list((tmp_path / "out").glob("*.tmp"))))
            return parts[part]

        return load

    (tmp_path / "out").mkdir()
    summary = stream_merge(
        [("part 1", loader(0)), ("part 2", loader(1))],
        [adapter],
        tmp_path / "out",
        shard_size_bytes=SMALL_SHARD,
        extra_tensors=head,
    )
    assert shards_seen_at_call[0] == 0 and shards_seen_at_call[1] >= 1
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert index["weight_map"]["latent_attention.latents"] == summary["files"][-1]
    written = {}
    for name in summary["files"]:
        written.update(load_file(tmp_path / "out" / name))
    assert set(written) == set(expected) | set(head)
    _assert_merged_like_peft(written, {**expected, **head}, state, [adapter])

    (tmp_path / "dict").mkdir()
    stream_merge(state, [adapter], tmp_path / "dict", shard_size_bytes=2**30)
    from_dict = load_file(tmp_path / "dict" / "model.safetensors")
    assert set(from_dict) == set(expected)
    _assert_merged_like_peft(from_dict, expected, state, [adapter])

    (tmp_path / "dup").mkdir()
    with pytest.raises(ValueError, match="layers.0.mlp.up_proj.weight appears twice"):
        stream_merge(
            state,
            [],
            tmp_path / "dup",
            shard_size_bytes=2**30,
            extra_tensors={"layers.0.mlp.up_proj.weight": torch.zeros(1)},
        )


def test_adapter_for_another_base_is_refused(tmp_path):
    torch.manual_seed(0)
    save_lora_adapter(
        LlamaForCausalLM(tiny_llama_config()), tmp_path / "adapter", seed=6, r=2, target_modules=["q_proj"]
    )
    adapter = read_adapter(tmp_path / "adapter")
    shallow = _save_base(LlamaForCausalLM(tiny_llama_config(num_hidden_layers=1)), tmp_path / "shallow")
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(ValueError, match=r"modules missing from the base.*reaches layer 1.*layers\.1\.self_attn"):
        stream_merge(shallow, [adapter], out, shard_size_bytes=SMALL_SHARD)
    assert not list(out.iterdir()), "files with known shapes are checked before anything is written"

    # A loader's tensors are only known once read: a missing target is reported after the stream.
    shallow_state = _load_all(shallow)
    with pytest.raises(ValueError, match=r"targets 1 weights that the base checkpoint does not have.*layers\.1\."):
        stream_merge([("shallow", lambda: shallow_state)], [adapter], out, shard_size_bytes=2**30)
    assert not list(out.iterdir()), "the shards spooled before the error are removed"

    wide = _save_base(LlamaForCausalLM(tiny_llama_config(hidden_size=128, intermediate_size=256)), tmp_path / "wide")
    assert base_weight_shapes(wide)["layers.0.self_attn.q_proj.weight"] == (128, 128)
    assert "lm_head.weight" not in base_weight_shapes(wide)
    with pytest.raises(ValueError, match=r"shape mismatches \(2\).*adapter \(64, 64\) vs base \(128, 128\)"):
        stream_merge(wide, [adapter], out, shard_size_bytes=2**30)
    wide_state = _load_all(wide)
    with pytest.raises(ValueError, match=r"into layers\.0\.self_attn\.q_proj\.weight: .* of shape \(128, 128\)"):
        stream_merge([("wide", lambda: wide_state)], [adapter], out, shard_size_bytes=2**30)


def test_corrupt_and_missing_shards_are_named(two_adapters, tmp_path):
    root, _ = two_adapters
    broken = tmp_path / "broken"
    broken.mkdir()
    for file in (root / "base").iterdir():
        (broken / file.name).write_bytes(file.read_bytes())
    shards = resolve_base_files(broken)
    data = shards[1].read_bytes()
    shards[1].write_bytes(data[: len(data) // 2])
    (tmp_path / "out").mkdir()
    with pytest.raises(ValueError, match=rf"{shards[1].name} is not a readable safetensors file .*Download it again"):
        stream_merge(broken, [], tmp_path / "out", shard_size_bytes=2**30)
    assert not list((tmp_path / "out").iterdir()), "a corrupt shard must be found before anything is written"

    shards[1].unlink()
    missing = rf"is incomplete: .* names weight files that are missing \({shards[1].name}\)"
    with pytest.raises(FileNotFoundError, match=missing):
        stream_merge(broken, [], tmp_path / "out", shard_size_bytes=2**30)

    with safe_open(shards[0], "pt") as handle:
        kept = {key: handle.get_tensor(key) for key in list(handle.keys())[1:]}
        dropped = list(handle.keys())[0]
    shards[1].write_bytes(data)
    save_file(kept, shards[0], metadata={"format": "pt"})
    with pytest.raises(ValueError, match=rf"lists 1 tensors that their shards do not hold, e.g. {dropped}"):
        stream_merge(broken, [], tmp_path / "out", shard_size_bytes=2**30)

    with pytest.raises(FileNotFoundError, match="neither model.safetensors nor model.safetensors.index.json"):
        stream_merge(tmp_path / "out", [], tmp_path / "out", shard_size_bytes=2**30)


_ITEMSIZE = {"F32": 4, "F16": 2, "BF16": 2, "I64": 8}


def _raw_header(file: Path) -> tuple[int, dict]:
    """The safetensors header of `file` as written: its byte length and its JSON."""
    with file.open("rb") as handle:
        length = int.from_bytes(handle.read(8), "little")
        return length, json.loads(handle.read(length))


def _mixed_dtype_base(folder: Path) -> dict[str, torch.Tensor]:
    """A two-file base whose tensors mix float32, bfloat16 (one of 3 elements, 6 bytes) and int64; returns it."""
    torch.manual_seed(0)
    state = {key: value.detach().clone() for key, value in LlamaForCausalLM(tiny_llama_config()).state_dict().items()}
    for key in [key for key in state if key.endswith("norm.weight")]:
        state[key] = state[key].bfloat16()
    state["model.layers.0.odd_bf16"] = torch.tensor([0.5, -1.25, 3.0], dtype=torch.bfloat16)
    state["model.layers.1.steps"] = torch.tensor([5, 7, 11], dtype=torch.int64)
    keys = sorted(state)
    folder.mkdir()
    weight_map = {}
    for number, part in enumerate((keys[: len(keys) // 2], keys[len(keys) // 2 :]), start=1):
        save_file({key: state[key] for key in part}, folder / f"base-{number}.safetensors", metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, f"base-{number}.safetensors"))
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return state


@pytest.mark.parametrize("dtype", [None, torch.float16])
def test_planned_shards_read_back_exactly_in_planned_layout(tmp_path, dtype):
    state = _mixed_dtype_base(tmp_path / "base")
    # Arrival order: the base's files in index order, each file's tensors in safe_open's order, lm_head dropped.
    arrival = []
    for file in resolve_base_files(tmp_path / "base"):
        with safe_open(file, "pt") as handle:
            arrival += [(normalize_base_key(key), key) for key in handle.keys() if not key.startswith("lm_head.")]
    expected = {}
    for name, key in arrival:
        tensor = state[key]
        expected[name] = tensor.to(dtype) if dtype is not None and tensor.is_floating_point() else tensor
    nbytes = {name: tensor.numel() * tensor.element_size() for name, tensor in expected.items()}
    out = tmp_path / "out"
    out.mkdir()

    summary = stream_merge(tmp_path / "base", [], out, shard_size_bytes=SMALL_SHARD, dtype=dtype)

    files = summary["files"]
    assert len(files) >= 3 and sorted(path.name for path in out.iterdir()) == sorted([*files, SAFE_WEIGHTS_INDEX_NAME])
    shard_of, shard_bytes = {}, []
    for number, file in enumerate(files):
        length, header = _raw_header(out / file)
        assert length % 8 == 0 and header.pop("__metadata__") == {"format": "pt"}
        spans = sorted((entry["data_offsets"], name) for name, entry in header.items())
        assert spans[0][0][0] == 0 and all(a[0][1] == b[0][0] for a, b in zip(spans, spans[1:], strict=False))
        assert (out / file).stat().st_size == 8 + length + spans[-1][0][1]
        for (begin, _), name in spans:
            assert begin % _ITEMSIZE[header[name]["dtype"]] == 0, f"{name} is not aligned to its element size"
        loaded = load_file(out / file)
        assert set(loaded) == set(header)
        for name, tensor in loaded.items():
            assert tensor.dtype == expected[name].dtype and torch.equal(tensor, expected[name]), name
        shard_of.update(dict.fromkeys(loaded, number))
        shard_bytes.append(sum(nbytes[name] for name in loaded))
    assert set(shard_of) == set(expected)
    # Shards are consecutive runs of the arrival order, each filled until the next tensor would overflow it.
    order = [shard_of[name] for name, _ in arrival]
    assert order == sorted(order)
    firsts: dict[int, str] = {}
    for name, _ in arrival:
        firsts.setdefault(shard_of[name], name)
    for number, size in enumerate(shard_bytes):
        assert size <= SMALL_SHARD or sum(1 for shard in shard_of.values() if shard == number) == 1
        if number + 1 < len(files):
            assert size + nbytes[firsts[number + 1]] > SMALL_SHARD
    index = json.loads((out / SAFE_WEIGHTS_INDEX_NAME).read_text())
    assert index["weight_map"] == {name: files[shard] for name, shard in sorted(shard_of.items())}
    assert index["metadata"]["total_size"] == summary["total_size"] == sum(nbytes.values())
    assert summary["num_tensors"] == len(expected)


BIG_TENSOR_BYTES = 4096  # every projection and embedding of the tiny model; not its norms or the rank-4 LoRA pairs


def _big_storages() -> dict[int, torch.Tensor]:
    """Address of each block of tensor memory of at least BIG_TENSOR_BYTES that a live tensor object uses (views
    share their base's block: safetensors' tensors are views of a flat buffer) -> one such tensor."""
    found = {}
    for obj in gc.get_objects():
        if issubclass(type(obj), torch.Tensor) and obj.device.type == "cpu":
            try:
                storage = obj.untyped_storage()
                address = storage.data_ptr()
            except RuntimeError:  # fake tensors that torch.compile (flex attention tests) left behind hold no memory
                continue
            if storage.nbytes() >= BIG_TENSOR_BYTES:
                found[address] = obj
    return found


@pytest.mark.parametrize("dtype", [None, torch.bfloat16])
def test_one_base_tensor_alive_at_a_time(tmp_path, monkeypatch, dtype):
    """Merging holds one base tensor at a time: whenever the next tensor is merged, the memory of every earlier
    input and merged output is free (found through every live tensor object, so the check depends neither on
    timing nor on the allocator)."""
    torch.manual_seed(0)
    base = _save_base(LlamaForCausalLM(tiny_llama_config()), tmp_path / "base")
    save_lora_adapter(
        LlamaForCausalLM.from_pretrained(base),
        tmp_path / "adapter",
        seed=7,
        r=4,
        lora_alpha=8,
        target_modules=["q_proj", "up_proj", "down_proj"],
    )
    adapter = read_adapter(tmp_path / "adapter")
    out = tmp_path / "out"
    out.mkdir()
    existing = _big_storages()  # held, so no new tensor can reuse these addresses
    census: list[tuple[str, list[bool]]] = []
    merge_one = merge_module.merge_tensor

    def counting_merge_one(name, tensor, *args):
        new = [address for address in _big_storages() if address not in existing]
        census.append((name, [address == tensor.untyped_storage().data_ptr() for address in new]))
        return merge_one(name, tensor, *args)

    monkeypatch.setattr(merge_module, "merge_tensor", counting_merge_one)
    summary = stream_merge(base, [adapter], out, shard_size_bytes=SMALL_SHARD, dtype=dtype)

    assert len(census) == summary["num_tensors"] == len(base_weight_shapes(base))
    assert sum(1 for _, alive in census if alive) >= 10, "the base's projections must be counted"
    for name, alive in census:
        assert alive in ([], [True]), f"{len(alive)} blocks of tensor memory alive when {name} is merged"
    assert not [address for address in _big_storages() if address not in existing], "memory left after the merge"


def test_base_changed_while_read_is_reported_and_cleaned_up(two_adapters, tmp_path, monkeypatch):
    """The output layout is planned from the headers; a shard rewritten after that is refused, not misplaced."""
    root, _ = two_adapters
    base = tmp_path / "base"
    base.mkdir()
    for file in (root / "base").iterdir():
        (base / file.name).write_bytes(file.read_bytes())
    last = resolve_base_files(base)[-1]
    header_specs = shards_module._header_specs

    def rewrite_after_planning(file, header):
        specs = header_specs(file, header)
        if file == last:
            state = load_file(file)
            victim = sorted(key for key in state if not key.startswith("lm_head."))[0]  # a tensor that is read
            state[victim] = torch.zeros(2, 3)
            save_file(state, file, metadata={"format": "pt"})
        return specs

    monkeypatch.setattr(shards_module, "_header_specs", rewrite_after_planning)
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(RuntimeError, match=r"changed while it was read: .*shape \(2, 3\)"):
        stream_merge(base, [], out, shard_size_bytes=SMALL_SHARD)
    assert not list(out.iterdir()), "the shards written before the error are removed"
