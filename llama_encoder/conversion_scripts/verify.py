"""Verify a written checkpoint the way its users will load it, then record what was verified.

The checkpoint is loaded in a fresh Python process where `llama_encoder` cannot be imported (even if installed), with
`HF_HUB_OFFLINE=1`: once with `AutoModel.from_pretrained(..., trust_remote_code=True)` and the checkpoint's own
`tokenize_for_encoder`, once with `SentenceTransformer(..., trust_remote_code=True)`. Both must embed a fixed list of
sentences (with no prompt, and behind each of the checkpoint's prompts) like each other and like a reference model,
and `WrittenWeights` reads tensors back from the shards to compare them with independently computed values. The
report says, check by check, what was compared with what; `verification.json` then lists every file with its sha256
and size, and `push` refuses a folder that differs.

Typical use, so that the model card carries the figures and is still covered by the manifest:

    expected = {name: compute_reference_embeddings(model, tokenizer, DEFAULT_SENTENCES, prompt)
                for name, prompt in verified_prompts(prompts).items()}
    report = verify_checkpoint(out_dir, expected=expected, reference="...", write_manifest=False)
    write_model_card(out_dir, ..., verification=report)
    write_verification_manifest(out_dir, report)
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

from ..configuration_llama_encoder import BASE_FAMILIES
from ..errors import InputError, MissingDependencyError, MissingInputError, VerificationError
from ..modeling_llama_encoder import LlamaEncoderModel, tokenize_for_encoder
from ..readers import sha256_file
from ..weights.shards import open_safetensors, read_headers, resolve_base_files
from .checkpoint import HUB_FILES, SENTENCE_TRANSFORMERS_MODULE, STOCK_MODULES, hub_file_sources
from .layout import NATIVE_POOLING, CheckpointLayout, binding_window, engine_claims
from .manifest import MANIFEST_FORMAT, write_verification_manifest

logger = logging.getLogger(__name__)

LOADERS = ("automodel", "sentence_transformers")  # with trust_remote_code: the checkpoint's own code
NATIVE_LOADERS = ("automodel_native", "sentence_transformers_native")  # stock code, no trust_remote_code

# Short, varied texts: different lengths make every batch padded, so padding handling is checked too.
DEFAULT_SENTENCES = (
    "How do plants turn sunlight into energy?",
    "Photosynthesis converts light, water and carbon dioxide into glucose and oxygen.",
    "The capital of France is Paris.",
    "A quick brown fox jumps over the lazy dog.",
    "What is the boiling point of water at sea level?",
    "Water boils at 100 degrees Celsius under one atmosphere of pressure.",
    "Neural networks learn representations from data.",
    "ok",
)

# Runs in the fresh interpreter (python -I, cwd outside the repository). argv[1]: the JSON job file.
_CHILD_SCRIPT = r'''
import importlib.abc
import sys


class _BlockLlamaEncoder(importlib.abc.MetaPathFinder):
    """Make the llama_encoder package unimportable, installed or not: only the checkpoint's code may run."""

    def find_spec(self, name, path=None, target=None):
        if name == "llama_encoder" or name.startswith("llama_encoder."):
            raise ModuleNotFoundError(f"{name} is blocked during checkpoint verification")
        return None


sys.meta_path.insert(0, _BlockLlamaEncoder())

import gc
import json
from pathlib import Path

import numpy as np
import torch
import transformers
from sentence_transformers import SentenceTransformer
from transformers import AutoModel, AutoTokenizer
from transformers.dynamic_module_utils import get_class_from_dynamic_module

job = json.loads(Path(sys.argv[1]).read_text(encoding="utf-8"))
batch_size = job["batch_size"]


def stock_embed(model, tokenizer, texts, prompt, pooling_mode, normalize, max_length):
    """What a user of stock transformers writes: the tokenizer on prompt + text, the model's token states, masked
    mean or last-token pooling (right padding)."""
    rows = []
    for start in range(0, len(texts), batch_size):
        batch = tokenizer([prompt + text for text in texts[start : start + batch_size]], padding=True,
                          truncation=True, max_length=max_length, return_tensors="pt").to(job["device"])
        with torch.inference_mode():
            states = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        states = states.float()
        mask = batch["attention_mask"].unsqueeze(-1).to(states.dtype)
        if pooling_mode == "mean":
            pooled = (states * mask).sum(1) / mask.sum(1)
        else:
            pooled = states[torch.arange(states.shape[0]), batch["attention_mask"].sum(1) - 1]
        if normalize:
            pooled = torch.nn.functional.normalize(pooled, dim=-1)
        rows.append(pooled.cpu().numpy())
    return np.concatenate(rows)


for index, checkpoint in enumerate(job["checkpoints"]):
    result = {}
    native = job.get("native") or {}
    if native.get("sentence_transformers"):
        st_native = SentenceTransformer(checkpoint, device=job["device"], model_kwargs={"dtype": job["dtype"]})
        for name, prompt in job["prompts"].items():
            result[f"sentence_transformers_native/{name}"] = st_native.encode(
                job["sentences"], prompt=prompt, batch_size=batch_size, convert_to_numpy=True,
                show_progress_bar=False,
            )
        native_modules = [f"{type(module).__module__}.{type(module).__name__}" for module in st_native]
        del st_native
        gc.collect()
    if native.get("automodel"):
        stock = AutoModel.from_pretrained(checkpoint, dtype=job["dtype"]).to(job["device"]).eval()
        stock_tokenizer = AutoTokenizer.from_pretrained(checkpoint)
        stock_info = {
            "class": f"{type(stock).__module__}.{type(stock).__name__}",
            "is_causal": getattr(stock.config, "is_causal", None),
            # Gemma3's switch is use_bidirectional_attention (its config has no is_causal to read)
            "bidirectional": getattr(stock.config, "is_causal", None) is False or (
                stock.config.model_type == "gemma3_text" and stock.config.use_bidirectional_attention is True),
            "transformers_version": transformers.__version__,
        }
        for name in native["automodel_prompts"]:
            result[f"automodel_native/{name}"] = stock_embed(
                stock, stock_tokenizer, job["sentences"], job["prompts"][name], native["pooling_mode"],
                native["normalize"], native["max_length"],
            )
        del stock
        gc.collect()
    st_model = SentenceTransformer(
        checkpoint, trust_remote_code=True, device=job["device"], model_kwargs={"dtype": job["dtype"]}
    )
    max_length = st_model.max_seq_length
    for name, prompt in job["prompts"].items():
        result[f"sentence_transformers/{name}"] = st_model.encode(
            job["sentences"], prompt=prompt, batch_size=batch_size, convert_to_numpy=True, show_progress_bar=False
        )
    st_module = type(st_model[0])
    info = {
        "sentence_transformers_module": f"{st_module.__module__}.{st_module.__name__}",
        "sentence_transformers_modules": len(st_model),
        "max_seq_length": max_length,
    }
    del st_model
    gc.collect()

    model = AutoModel.from_pretrained(checkpoint, trust_remote_code=True, dtype=job["dtype"]).to(job["device"])
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(checkpoint, trust_remote_code=True)
    tokenize = get_class_from_dynamic_module("modeling_llama_encoder.tokenize_for_encoder", checkpoint)
    num_truncated = 0
    for name, prompt in job["prompts"].items():
        rows = []
        for start in range(0, len(job["sentences"]), batch_size):
            batch = tokenize(
                tokenizer,
                job["sentences"][start : start + batch_size],
                prompt,
                max_length=max_length,
                append_eos=model.config.pooling_mode == "eos",
            )
            num_truncated += batch.num_truncated
            batch = {key: value.to(job["device"]) for key, value in batch.items()}
            with torch.inference_mode():
                rows.append(model(**batch).pooler_output.float().cpu().numpy())
        result[f"automodel/{name}"] = np.concatenate(rows)
    info.update(
        automodel_class=f"{type(model).__module__}.{type(model).__name__}",
        num_truncated=num_truncated,
        llama_encoder_imported=sorted(name for name in sys.modules if name.split(".")[0] == "llama_encoder"),
    )
    if native.get("sentence_transformers"):
        info["sentence_transformers_native_modules"] = native_modules
    if native.get("automodel"):
        info["automodel_native"] = stock_info
    del model
    gc.collect()
    np.savez(Path(job["output_dir"]) / f"{index}.npz", **result)
    (Path(job["output_dir"]) / f"{index}.json").write_text(json.dumps(info), encoding="utf-8")
'''


def compute_reference_embeddings(
    model: LlamaEncoderModel,
    tokenizer,
    sentences: Sequence[str],
    prompt: str = "",
    *,
    max_length: int | None = None,
    batch_size: int = 8,
) -> np.ndarray:
    """Embed `sentences` behind `prompt` with an in-memory `LlamaEncoderModel` (the merged model a checkpoint is
    written from), tokenising exactly as the checkpoint does; `tokenizer` needs a pad token (which one does not
    change the result). Returns a float32 array `(len(sentences), hidden)`."""
    device = next(model.parameters()).device
    append_eos = model.config.pooling_mode == "eos"
    was_training = model.training
    model.eval()
    rows = []
    try:
        for start in range(0, len(sentences), batch_size):
            batch = tokenize_for_encoder(
                tokenizer, list(sentences[start : start + batch_size]), prompt, max_length=max_length,
                append_eos=append_eos,
            )
            with torch.inference_mode():
                output = model(**{key: value.to(device) for key, value in batch.items()})
            rows.append(output.pooler_output.float().cpu().numpy())
    finally:
        model.train(was_training)
    return np.concatenate(rows)


class WrittenWeights:
    """The tensors of a written checkpoint read back from its shards (by safetensors, not by the writer), to be
    compared one at a time with independently computed values.

    `sample` names what is worth comparing: the embeddings, the final norm, every tensor of the first and last
    layer, the latent-attention head, and the first tensor of every shard. `compare(name, expected)` checks one
    tensor: the written one must be `expected` (float32, before rounding) rounded once to the written dtype, that is
    within one rounding step of that dtype. `report()` is the check for `verify_checkpoint`; `reference` says in
    words where the expected values came from.
    """

    SAMPLE = ("the embeddings, the final norm, every tensor of the first and last layer, the latent-attention head "
              "(when there is one) and the first tensor of each weight file")

    def __init__(self, folder: str | os.PathLike, *, reference: str):
        self.reference = reference
        headers = read_headers(resolve_base_files(folder))
        self.location = {name: file for file, header in headers.items() for name in header}
        layers = sorted({int(name.split(".")[1]) for name in self.location if name.startswith("layers.")})
        edge_layers = tuple(f"layers.{number}." for number in (layers[:1] + layers[-1:]))
        self.sample = {name for name in self.location if name.startswith(edge_layers + ("latent_attention.",))
                       or name in ("embed_tokens.weight", "norm.weight")}
        self.sample.update(next(iter(header)) for header in headers.values() if header)
        self.compared: list[str] = []
        self.problems: list[str] = []
        self.max_abs_difference = 0.0

    def compare_names(self, expected: set[str]) -> None:
        """The checkpoint must hold exactly the tensors named in `expected`."""
        missing, extra = sorted(expected - set(self.location)), sorted(set(self.location) - expected)
        if missing:
            self.problems.append(f"{len(missing)} tensor(s) missing from the shards, e.g. {', '.join(missing[:3])}")
        if extra:
            self.problems.append(f"{len(extra)} unexpected tensor(s) in the shards, e.g. {', '.join(extra[:3])}")

    def compare(self, name: str, expected: torch.Tensor) -> None:
        """Compare the written tensor `name` with `expected` (any dtype; compared in float32)."""
        if name not in self.location:
            return  # compare_names reports it
        with open_safetensors(self.location[name]) as handle:
            written = handle.get_tensor(name)
        self.compared.append(name)
        if written.shape != expected.shape:
            self.problems.append(f"{name} has shape {tuple(written.shape)}, expected {tuple(expected.shape)}")
            return
        difference = (written.double() - expected.double()).abs()
        if written.dtype.is_floating_point:
            info = torch.finfo(written.dtype)
            allowed = info.eps * expected.double().abs() + info.tiny
        else:
            allowed = torch.zeros_like(difference)
        worst = float(difference.max()) if difference.numel() else 0.0
        self.max_abs_difference = max(self.max_abs_difference, worst)
        if bool((difference > allowed).any()):
            self.problems.append(f"{name} differs by up to {worst:.3g}, more than one {written.dtype} rounding step")

    def report(self) -> dict:
        """The `weights_vs_reference` check: what was compared, the largest difference, and what failed."""
        return {
            "name": "weights_vs_reference", "reference": self.reference, "sample": self.SAMPLE,
            "tensors": sorted(self.compared),
            "num_tensors_in_shards": len(self.location), "max_abs_difference": self.max_abs_difference,
            "problems": self.problems[:10], "passed": bool(self.compared) and not self.problems,
        }


def max_cosine_distance(first: np.ndarray, second: np.ndarray) -> float:
    """Largest `1 - cos` between matching rows of two `(n, dim)` arrays (NaN or zero rows count as distance 2)."""
    if first.shape != second.shape:
        raise InputError(f"Cannot compare embeddings of shapes {first.shape} and {second.shape}.")
    first = first.astype(np.float64)
    second = second.astype(np.float64)
    norms = np.linalg.norm(first, axis=1) * np.linalg.norm(second, axis=1)
    cosine = np.einsum("ij,ij->i", first, second) / np.where(norms > 0, norms, np.nan)
    distance = np.nan_to_num(1.0 - cosine, nan=2.0)
    return float(distance.max()) if distance.size else 0.0


def embed_in_fresh_process(
    checkpoints: Sequence[str | os.PathLike],
    *,
    sentences: Sequence[str],
    prompts: dict[str, str],
    device: str = "cpu",
    dtype: str = "auto",
    batch_size: int = 8,
    timeout: float = 1800,
    native: dict | None = None,
) -> list[dict]:
    """Load each checkpoint folder in one fresh interpreter (`llama_encoder` blocked, Hub offline) with
    `SentenceTransformer` and with `AutoModel` + the checkpoint's `tokenize_for_encoder` (both with
    `trust_remote_code=True`), and embed `sentences` behind each of `prompts` (name -> prompt text).

    `native` (for native checkpoints) adds the stock loaders, without remote code: `{"sentence_transformers": bool,
    "automodel": bool, "automodel_prompts": [names], "pooling_mode", "normalize", "max_length"}`; their embeddings
    come back under `"sentence_transformers_native"` and `"automodel_native"` (stock `LlamaModel` states, masked mean
    or last token of `prompt + text`).

    Returns one dict per checkpoint: `{"sentence_transformers": {name: array}, "automodel": {name: array},
    "info": {...}}`, where info names the classes that were loaded, the max_seq_length used, how many inputs were
    truncated, and which `llama_encoder` modules got imported (none, unless the block failed). Raises
    `VerificationError` when the process fails or runs past `timeout` seconds.
    """
    checkpoints = [Path(checkpoint).expanduser().absolute() for checkpoint in checkpoints]
    for checkpoint in checkpoints:
        if not (checkpoint / "config.json").is_file():
            raise MissingInputError(f"{checkpoint} has no config.json; pass a folder written by write_checkpoint.")
    with tempfile.TemporaryDirectory(prefix="llama-encoder-verify-") as work:
        work = Path(work)
        job = {
            "checkpoints": [str(checkpoint) for checkpoint in checkpoints],
            "sentences": list(sentences),
            "prompts": dict(prompts),
            "device": device,
            "dtype": dtype,
            "batch_size": batch_size,
            "output_dir": str(work),
            "native": native or {},
        }
        (work / "job.json").write_text(json.dumps(job), encoding="utf-8")
        env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
        # A private modules cache: the checkpoint's .py files are copied fresh, never taken from an earlier run.
        env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_MODULES_CACHE=str(work / "modules"),
                   TOKENIZERS_PARALLELISM="false")
        logger.info("Loading %d checkpoint(s) in a fresh Python process", len(checkpoints))
        try:
            completed = subprocess.run(
                [sys.executable, "-I", "-c", _CHILD_SCRIPT, str(work / "job.json")],
                cwd=work, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout,
                check=False,
            )
        except subprocess.TimeoutExpired as exc:
            raise VerificationError(
                f"Loading {len(checkpoints)} checkpoint(s) in a fresh Python process took over {timeout:.0f} s; "
                "pass a larger timeout= (large models on CPU are slow) or verify on a GPU with device='cuda'."
            ) from exc
        if completed.returncode != 0:
            raise VerificationError(
                f"The checkpoint could not be loaded and run without llama-encoder installed (exit code "
                f"{completed.returncode}); the fresh process said:\n{completed.stderr[-4000:]}"
            )
        results = []
        for index in range(len(checkpoints)):
            with np.load(work / f"{index}.npz") as arrays:
                embeddings = {key: arrays[key] for key in arrays.files}
            result = {loader: {} for loader in LOADERS + NATIVE_LOADERS}
            for key, value in embeddings.items():
                loader, name = key.split("/", 1)
                result[loader][name] = value
            result["info"] = json.loads((work / f"{index}.json").read_text(encoding="utf-8"))
            results.append(result)
    return results


def _check_hub_files(out_dir: Path) -> dict:
    """The checkpoint must ship this package's Hub files byte for byte: anything else is not what was tested."""
    mismatched = []
    for name, source in hub_file_sources().items():
        shipped = out_dir / name
        if not shipped.is_file() or sha256_file(shipped) != sha256_file(source):
            mismatched.append(name)
    if mismatched:
        raise VerificationError(
            f"{', '.join(mismatched)} in {out_dir} differ from llama-encoder's own copies (missing or modified); "
            "write the checkpoint again with write_checkpoint rather than editing its code."
        )
    return {"name": "hub_files_match_package", "files": list(HUB_FILES), "passed": True}


def verified_prompts(prompts: Mapping[str, str]) -> dict[str, str]:
    """The inputs verification embeds, by name: `plain` (no prompt), `query` (the query prompt, also when empty) and
    every other non-empty prompt of `prompts` (a checkpoint's: a document prompt, the task prompts its adapters were
    trained with) under its own name."""
    checked = {"plain": "", "query": prompts.get("query", "")}
    checked.update({name: prompt for name, prompt in prompts.items() if prompt and name not in checked})
    return checked


def _saved_prompts(out_dir: Path) -> dict[str, str]:
    path = out_dir / "config_sentence_transformers.json"
    if not path.is_file():
        raise MissingInputError(f"{path} is missing; write the checkpoint with write_checkpoint first.")
    return json.loads(path.read_text(encoding="utf-8")).get("prompts", {})


def layout_of(out_dir: Path) -> CheckpointLayout:
    """The layout a written checkpoint has, read from its files (config.json's model_type, modules.json)."""
    config = json.loads((out_dir / "config.json").read_text(encoding="utf-8"))
    modules_path = out_dir / "modules.json"
    modules = json.loads(modules_path.read_text(encoding="utf-8")) if modules_path.is_file() else []
    stock = any(module.get("type") == STOCK_MODULES["pooling"] for module in modules)
    pooling_mode = config.get("pooling_mode", "mean")
    model_type = config.get("model_type")
    native = model_type in BASE_FAMILIES
    family = model_type if native else config.get("base_model_type", "llama")
    max_seq_length = _saved_max_seq_length(out_dir)
    window = binding_window(SimpleNamespace(**config), max_seq_length)
    if not native:
        return CheckpointLayout(format="remote-code", pooling_mode=pooling_mode, sentence_transformers="custom",
                                family=family, window=window)
    return CheckpointLayout(
        format="native", pooling_mode=pooling_mode, sentence_transformers="native" if stock else "custom",
        custom_reason=None if stock else "the checkpoint's modules.json names its own module",
        native_pooling=NATIVE_POOLING.get(pooling_mode), family=family, window=window,
    )



def _vllm_check(out_dir: Path, layout: CheckpointLayout, sentences: list[str], query_prompt: str,
                expected: dict[str, np.ndarray], tolerance: float, python: str) -> dict:
    """Embed with vLLM (its own interpreter) and compare with the reference: documents always, queries for
    last-token pooling (vLLM pools the instruction, which mean pooling then includes)."""
    from ..engines.vllm import embed_with_vllm

    texts = list(sentences)
    with_queries = layout.pooling_mode == "last_token" and "query" in expected
    if with_queries:
        texts += [query_prompt + sentence for sentence in sentences]
    result = embed_with_vllm(out_dir, texts, python=python, dtype="float32")
    check = {"name": "vllm_vs_reference", "vllm": result.info, "prompt": "plain" + (", query" if with_queries else "")}
    distances = []
    if "plain" in expected:
        distances.append(max_cosine_distance(result.embeddings[: len(sentences)], np.asarray(expected["plain"])))
    if with_queries:
        distances.append(max_cosine_distance(result.embeddings[len(sentences):], np.asarray(expected["query"])))
    check["max_cosine_distance"] = max(distances) if distances else 0.0
    problems = []
    if result.info.get("is_causal") not in (False, None):
        problems.append(f"vLLM ran causal attention (is_causal {result.info.get('is_causal')})")
    pooler = (result.info.get("pooling_type") or "").upper()
    if layout.native_pooling is not None and pooler and pooler != layout.native_pooling.vllm_pooler:
        problems.append(f"vLLM pooled with {pooler}, not {layout.native_pooling.vllm_pooler}")
    if not distances:
        problems.append("no reference embeddings to compare vLLM's with")
    check["problems"] = problems
    check["passed"] = not problems and check["max_cosine_distance"] <= tolerance
    return check


def verify_checkpoint(
    out_dir: str | os.PathLike,
    *,
    expected: dict[str, np.ndarray] | None = None,
    reference: str | None = None,
    weights: WrittenWeights | None = None,
    sentences: Sequence[str] | None = None,
    query_prompt: str | None = None,
    tolerance: float = 1e-4,
    timeout: float = 1800,
    device: str = "cpu",
    dtype: str = "auto",
    write_manifest: bool = True,
    layout: CheckpointLayout | None = None,
    vllm: bool | None = None,
    vllm_python: str | None = None,
) -> dict:
    """Check that the checkpoint in `out_dir` loads without llama-encoder and embeds like a reference model, with
    every loader its layout claims.

    Takes the folder; `expected`, a reference model's embeddings of `sentences` under the keys of
    `verified_prompts` (`"plain"`: no prompt; `"query"`: behind `query_prompt`; the checkpoint's other prompts
    under their names), any of them, from `compute_reference_embeddings` (None: the loaders are only compared with
    each other); `reference`, what that model is, in words for the report and the model card
    (default: "the in-memory model the checkpoint was written from"); `weights`, a `WrittenWeights` whose
    comparisons are done (its report becomes a check); `sentences` (default `DEFAULT_SENTENCES`); `query_prompt`
    (default: the checkpoint's saved `"query"` prompt); the largest cosine distance allowed; the subprocess timeout
    in seconds; the device and dtype (`"auto"`: the dtype in config.json) to load with; `layout` (default: read from
    the files). With `write_manifest`, writes `verification.json` (see `write_verification_manifest`).

    Loaders: `AutoModel` and `SentenceTransformer` with `trust_remote_code=True` always; for a native checkpoint also
    stock `AutoModel` (documents; queries too for last-token pooling), stock `SentenceTransformer` (when the layout
    uses the stock modules), TEI's file rules (`tei.check_tei_folder`), and vLLM (`vllm=True`: required; None: when
    `engines.vllm.find_vllm_python(vllm_python)` finds one; False: not run).

    Returns the report: `{"format", "passed", "max_cosine_distance", "tolerance", "num_sentences", "reference",
    "checks", "layout", "engines"}` (plus `"files"` when the manifest was written); each check names what it
    compared, and `engines` gives each loader's status (verified / by format / not checked / unsupported) for the
    model card. Raises `VerificationError` naming the failed check, or `InputError` when `expected` does not fit
    `sentences`.
    """
    out_dir = Path(out_dir).expanduser().absolute()
    sentences = list(DEFAULT_SENTENCES if sentences is None else sentences)
    if not sentences:
        raise InputError("sentences is empty; pass at least one sentence (or None for the default list).")
    saved = _saved_prompts(out_dir)
    prompts = verified_prompts(saved if query_prompt is None else {**saved, "query": query_prompt})
    query_prompt = prompts["query"]
    expected = dict(expected or {})
    unknown = set(expected) - set(prompts)
    if unknown:
        raise InputError(f"expected has unknown keys {sorted(unknown)}; use {', '.join(map(repr, prompts))} (no "
                         "prompt, then the checkpoint's prompts).")
    for name, array in expected.items():
        if np.asarray(array).ndim != 2 or len(array) != len(sentences):
            raise InputError(
                f"expected[{name!r}] has shape {np.asarray(array).shape}, but there are {len(sentences)} sentences; "
                "compute it with compute_reference_embeddings on the same sentences."
            )
    if layout is None:
        layout = layout_of(out_dir)
    vllm_interpreter = None
    if layout.native and vllm is not False:
        from ..engines.vllm import find_vllm_python

        vllm_interpreter = find_vllm_python(vllm_python)
        if vllm and vllm_interpreter is None:
            raise MissingDependencyError(
                "vLLM verification was asked for, but no interpreter with vLLM was found; build one with "
                "`bash scripts/setup_vllm_env.sh` and pass --vllm-python .venv-vllm/bin/python (or set "
                "LLAMA_ENCODER_VLLM_PYTHON)."
            )

    if expected and reference is None:
        reference = "the in-memory model the checkpoint was written from"
    checks = [_check_hub_files(out_dir)]
    if weights is not None:
        checks.append(weights.report())
    config = json.loads((out_dir / "config.json").read_text(encoding="utf-8"))
    native_job = None
    if layout.native:
        native_job = {
            "sentence_transformers": layout.sentence_transformers == "native",
            "automodel": True,
            # Stock code has no pool mask: behind a prompt only last-token pooling means the same thing.
            "automodel_prompts": list(prompts) if layout.pooling_mode == "last_token" else ["plain"],
            "pooling_mode": layout.pooling_mode,
            "normalize": bool(config.get("normalize_embeddings", True)),
            "max_length": _saved_max_seq_length(out_dir),
        }
    (result,) = embed_in_fresh_process(
        [out_dir], sentences=sentences, prompts=prompts, device=device, dtype=dtype,
        timeout=timeout, native=native_job,
    )
    info = result["info"]
    custom_st = layout.sentence_transformers == "custom"
    st_ok = (
        info["sentence_transformers_module"].startswith("transformers_modules.")
        and info["sentence_transformers_module"].endswith(f".{SENTENCE_TRANSFORMERS_MODULE}")
        and info["sentence_transformers_modules"] == 1
    ) if custom_st else (
        info["sentence_transformers_module"].startswith("sentence_transformers.")
        and info["sentence_transformers_modules"] in (2, 3)
    )
    own_code = (
        not info["llama_encoder_imported"]
        and info["automodel_class"].startswith("transformers_modules.")
        and st_ok
    )
    if not own_code:
        raise VerificationError(
            f"The fresh process did not run the checkpoint's own code (AutoModel class {info['automodel_class']}, "
            f"SentenceTransformer modules: {info['sentence_transformers_modules']}, first "
            f"{info['sentence_transformers_module']}, llama_encoder modules imported: "
            f"{info['llama_encoder_imported']}); write config.json and modules.json again with write_checkpoint."
        )
    if layout.native:
        stock = info.get("automodel_native", {})
        if not stock.get("class", "").startswith("transformers.") or stock.get("bidirectional") is not True:
            raise VerificationError(
                f"Stock transformers did not load the native checkpoint as a bidirectional model (class "
                f"{stock.get('class')}, is_causal {stock.get('is_causal')}); native checkpoints need transformers "
                ">= 5.2, and config.json must keep the base family's model_type with is_causal false "
                "(Gemma3: use_bidirectional_attention true)."
            )
    if info["num_truncated"]:
        raise VerificationError(
            f"{info['num_truncated']} verification input(s) are longer than max_seq_length={info['max_seq_length']} "
            "and were truncated, so they cannot be compared; pass shorter sentences."
        )
    checks.append({"name": "runs_without_llama_encoder", **info, "passed": True})

    loaders = list(LOADERS) + [loader for loader in NATIVE_LOADERS if result[loader]]
    for name in prompts:
        pairs = [("automodel", loader, result["automodel"][name], result[loader][name])
                 for loader in loaders[1:] if name in result[loader]]
        if name in expected:
            reference_rows = np.asarray(expected[name])
            pairs += [(loader, "reference", result[loader][name], reference_rows)
                      for loader in loaders if name in result[loader]]
        for first, second, first_rows, second_rows in pairs:
            if first_rows.shape != second_rows.shape:
                raise VerificationError(
                    f"{first} gave embeddings of shape {first_rows.shape} for the {name} inputs, {second} "
                    f"{second_rows.shape}; the checkpoint's config does not match the model it was written from."
                )
            distance = max_cosine_distance(first_rows, second_rows)
            checks.append({
                "name": f"{first}_vs_{second}", "prompt": name, "max_cosine_distance": distance,
                "passed": distance <= tolerance,
            })

    engines = engine_claims(layout)
    if layout.native:
        if engines["tei"]["status"] == "by format":  # a family (and window) TEI's rules are written for
            from ..engines.tei import check_tei_folder

            tei = check_tei_folder(out_dir, pooling_mode=layout.pooling_mode, prompts=prompts)
            checks.append({"name": "tei_file_format", "passed": tei.loadable, "tei": tei.to_dict(),
                           "problems": [f"rule {finding.rule}: {finding.message}" for finding in tei.errors]})
        if vllm_interpreter is not None and engines["vllm"]["status"] == "claimed":
            checks.append(_vllm_check(out_dir, layout, sentences, query_prompt, expected, tolerance,
                                      vllm_interpreter))
    failed = [check for check in checks if not check["passed"]]
    if failed:
        described = "; ".join(
            f"{check['name']}: {'; '.join(check['problems'])}" if check.get("problems") else
            f"{check['name']} ({check['prompt']} inputs): max cosine distance {check['max_cosine_distance']:.3g} "
            f"(tolerance {tolerance:g})"
            for check in failed
        )
        raise VerificationError(
            f"{out_dir} does not hold or embed like the model it was written from: {described}. The weights, "
            "config or tokenizer files do not match the reference; write the checkpoint again."
        )

    def worst(*prefixes: str) -> float | None:
        values = [check["max_cosine_distance"] for check in checks if "max_cosine_distance" in check
                  and check["name"].startswith(prefixes)]
        return max(values) if values else None

    import transformers

    vllm_info = next((check["vllm"] for check in checks if check["name"] == "vllm_vs_reference"), {})
    for key, prefixes in (("transformers_remote", ("automodel_vs",)), ("sentence_transformers_remote",
                          ("sentence_transformers_vs",)), ("transformers", ("automodel_native_vs",)),
                          ("sentence_transformers", ("sentence_transformers_native_vs",)), ("vllm", ("vllm_vs",))):
        distance = worst(*prefixes)
        if engines.get(key, {}).get("status") == "claimed":
            if distance is not None:
                where = (f"vLLM {vllm_info.get('vllm_version')}" if key == "vllm"
                         else f"transformers {transformers.__version__}")
                engines[key] = {**engines[key], "status": "verified",
                                "note": f"{engines[key]['note']}; {where}, max cosine distance {distance:.2g}",
                                "max_cosine_distance": distance}
            else:
                why = "; vLLM was not run at conversion (none found, or --no-vllm)" if key == "vllm" else ""
                engines[key] = {**engines[key], "status": "not checked", "note": engines[key]["note"] + why}
    distances = [check["max_cosine_distance"] for check in checks if "max_cosine_distance" in check]
    report = {
        "format": MANIFEST_FORMAT,
        "passed": True,
        "max_cosine_distance": max(distances),
        "tolerance": tolerance,
        "num_sentences": len(sentences),
        "prompts": [name for name in prompts if name != "plain"],
        "reference": reference if expected else None,
        "checks": checks,
        "layout": {"format": layout.format, "sentence_transformers": layout.sentence_transformers,
                   "pooling_mode": layout.pooling_mode, "custom_reason": layout.custom_reason},
        "engines": engines,
    }
    logger.info("Verified %s: max cosine distance %.3g", out_dir, report["max_cosine_distance"])
    if write_manifest:
        report = write_verification_manifest(out_dir, report)
    return report


def _saved_max_seq_length(out_dir: Path) -> int | None:
    path = out_dir / "sentence_bert_config.json"
    if not path.is_file():
        return None
    return json.loads(path.read_text(encoding="utf-8")).get("max_seq_length")


__all__ = [
    "DEFAULT_SENTENCES",
    "LOADERS",
    "NATIVE_LOADERS",
    "WrittenWeights",
    "compute_reference_embeddings",
    "embed_in_fresh_process",
    "layout_of",
    "max_cosine_distance",
    "verified_prompts",
    "verify_checkpoint",
]
