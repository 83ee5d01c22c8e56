"""Verify a written checkpoint the way its users will load it, then record what was verified.

The checkpoint is loaded in a fresh Python process where `llama_encoder` cannot be imported (even if installed), with
`HF_HUB_OFFLINE=1`: once with `AutoModel.from_pretrained(..., trust_remote_code=True)` and the checkpoint's own
`tokenize_for_encoder`, once with `SentenceTransformer(..., trust_remote_code=True)`. Both must embed a fixed list of
sentences (with and without the query prompt) like each other and like the in-memory model the checkpoint was written
from. `verification.json` then lists every file with its sha256 and size; `push` refuses a folder that differs.

Typical use, so that the model card carries the figures and is still covered by the manifest:

    expected = {"plain": compute_reference_embeddings(model, tokenizer, DEFAULT_SENTENCES),
                "query": compute_reference_embeddings(model, tokenizer, DEFAULT_SENTENCES, query_prompt)}
    report = verify_checkpoint(out_dir, expected=expected, write_manifest=False)
    write_model_card(out_dir, ..., verification=report)
    write_verification_manifest(out_dir, report)
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from ..atomic import atomic_file
from ..modeling_llama_encoder import LlamaEncoderModel, tokenize_for_encoder
from .checkpoint import HUB_FILES, SENTENCE_TRANSFORMERS_MODULE, hub_file_sources

logger = logging.getLogger(__name__)

VERIFICATION_FILE = "verification.json"
MANIFEST_FORMAT = 1
PROMPT_NAMES = ("plain", "query")
LOADERS = ("automodel", "sentence_transformers")

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

_HASH_CHUNK = 8 * 2**20

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
from sentence_transformers import SentenceTransformer
from transformers import AutoModel, AutoTokenizer
from transformers.dynamic_module_utils import get_class_from_dynamic_module

job = json.loads(Path(sys.argv[1]).read_text(encoding="utf-8"))
batch_size = job["batch_size"]
for index, checkpoint in enumerate(job["checkpoints"]):
    result = {}
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
    del model
    gc.collect()
    np.savez(Path(job["output_dir"]) / f"{index}.npz", **result)
    (Path(job["output_dir"]) / f"{index}.json").write_text(json.dumps(info), encoding="utf-8")
'''


class VerificationError(RuntimeError):
    """The checkpoint does not load, or does not embed like the model it was written from."""


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


def max_cosine_distance(first: np.ndarray, second: np.ndarray) -> float:
    """Largest `1 - cos` between matching rows of two `(n, dim)` arrays (NaN or zero rows count as distance 2)."""
    if first.shape != second.shape:
        raise ValueError(f"Cannot compare embeddings of shapes {first.shape} and {second.shape}.")
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
) -> list[dict]:
    """Load each checkpoint folder in one fresh interpreter (`llama_encoder` blocked, Hub offline) with
    `SentenceTransformer` and with `AutoModel` + the checkpoint's `tokenize_for_encoder`, and embed `sentences` behind
    each of `prompts` (name -> prompt text).

    Returns one dict per checkpoint: `{"sentence_transformers": {name: array}, "automodel": {name: array},
    "info": {...}}`, where info names the classes that were loaded, the max_seq_length used, how many inputs were
    truncated, and which `llama_encoder` modules got imported (none, unless the block failed). Raises
    `VerificationError` when the process fails or runs past `timeout` seconds.
    """
    checkpoints = [Path(checkpoint).expanduser().absolute() for checkpoint in checkpoints]
    for checkpoint in checkpoints:
        if not (checkpoint / "config.json").is_file():
            raise FileNotFoundError(f"{checkpoint} has no config.json; pass a folder written by write_checkpoint.")
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
            result = {loader: {} for loader in LOADERS}
            for key, value in embeddings.items():
                loader, name = key.split("/", 1)
                result[loader][name] = value
            result["info"] = json.loads((work / f"{index}.json").read_text(encoding="utf-8"))
            results.append(result)
    return results


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(_HASH_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def file_manifest(out_dir: str | os.PathLike) -> dict[str, dict]:
    """Every file under `out_dir` except the top-level `verification.json`, listed the way `push` lists them:
    relative posix path -> `{"sha256": hex digest, "size": bytes}`."""
    root = Path(out_dir).expanduser().resolve()
    return {
        path.relative_to(root).as_posix(): {"sha256": _file_sha256(path), "size": path.stat().st_size}
        for path in sorted(root.glob("**/*"))
        if path.is_file() and path.relative_to(root).as_posix() != VERIFICATION_FILE
    }


def _check_hub_files(out_dir: Path) -> dict:
    """The checkpoint must ship this package's Hub files byte for byte: anything else is not what was tested."""
    mismatched = []
    for name, source in hub_file_sources().items():
        shipped = out_dir / name
        if not shipped.is_file() or _file_sha256(shipped) != _file_sha256(source):
            mismatched.append(name)
    if mismatched:
        raise VerificationError(
            f"{', '.join(mismatched)} in {out_dir} differ from llama-encoder's own copies (missing or modified); "
            "write the checkpoint again with write_checkpoint rather than editing its code."
        )
    return {"name": "hub_files_match_package", "files": list(HUB_FILES), "passed": True}


def _saved_query_prompt(out_dir: Path) -> str:
    path = out_dir / "config_sentence_transformers.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; write the checkpoint with write_checkpoint first.")
    return json.loads(path.read_text(encoding="utf-8")).get("prompts", {}).get("query", "")


def verify_checkpoint(
    out_dir: str | os.PathLike,
    *,
    expected: dict[str, np.ndarray] | None = None,
    sentences: Sequence[str] | None = None,
    query_prompt: str | None = None,
    tolerance: float = 1e-4,
    timeout: float = 1800,
    device: str = "cpu",
    dtype: str = "auto",
    write_manifest: bool = True,
) -> dict:
    """Check that the checkpoint in `out_dir` loads without llama-encoder and embeds like the in-memory model.

    Takes the folder; `expected`, the in-memory model's embeddings of `sentences` under the keys `"plain"` (no
    prompt) and/or `"query"` (behind `query_prompt`), from `compute_reference_embeddings` (None: only AutoModel and
    SentenceTransformer are compared with each other); `sentences` (default `DEFAULT_SENTENCES`); `query_prompt`
    (default: the checkpoint's saved `"query"` prompt); the largest cosine distance allowed; the subprocess timeout
    in seconds; the device and dtype (`"auto"`: the dtype in config.json) to load with. With `write_manifest`, writes
    `verification.json` (see `write_verification_manifest`).

    Returns the report: `{"format", "passed", "max_cosine_distance", "tolerance", "num_sentences", "checks"}` (plus
    `"files"` when the manifest was written). Raises `VerificationError` naming the failed check, or `ValueError`
    when `expected` does not fit `sentences`.
    """
    out_dir = Path(out_dir).expanduser().absolute()
    sentences = list(DEFAULT_SENTENCES if sentences is None else sentences)
    if not sentences:
        raise ValueError("sentences is empty; pass at least one sentence (or None for the default list).")
    if query_prompt is None:
        query_prompt = _saved_query_prompt(out_dir)
    expected = dict(expected or {})
    unknown = set(expected) - set(PROMPT_NAMES)
    if unknown:
        raise ValueError(f"expected has unknown keys {sorted(unknown)}; use 'plain' and/or 'query'.")
    for name, array in expected.items():
        if np.asarray(array).ndim != 2 or len(array) != len(sentences):
            raise ValueError(
                f"expected[{name!r}] has shape {np.asarray(array).shape}, but there are {len(sentences)} sentences; "
                "compute it with compute_reference_embeddings on the same sentences."
            )

    checks = [_check_hub_files(out_dir)]
    (result,) = embed_in_fresh_process(
        [out_dir], sentences=sentences, prompts={"plain": "", "query": query_prompt}, device=device, dtype=dtype,
        timeout=timeout,
    )
    info = result["info"]
    own_code = (
        not info["llama_encoder_imported"]
        and info["automodel_class"].startswith("transformers_modules.")
        and info["sentence_transformers_module"].startswith("transformers_modules.")
        and info["sentence_transformers_module"].endswith(f".{SENTENCE_TRANSFORMERS_MODULE}")
        and info["sentence_transformers_modules"] == 1
    )
    if not own_code:
        raise VerificationError(
            f"The fresh process did not run the checkpoint's own code (AutoModel class {info['automodel_class']}, "
            f"SentenceTransformer modules: {info['sentence_transformers_modules']}, first "
            f"{info['sentence_transformers_module']}, llama_encoder modules imported: "
            f"{info['llama_encoder_imported']}); write config.json and modules.json again with write_checkpoint."
        )
    if info["num_truncated"]:
        raise VerificationError(
            f"{info['num_truncated']} verification input(s) are longer than max_seq_length={info['max_seq_length']} "
            "and were truncated, so they cannot be compared; pass shorter sentences."
        )
    checks.append({"name": "runs_without_llama_encoder", **info, "passed": True})

    for name in PROMPT_NAMES:
        automodel, st = result["automodel"][name], result["sentence_transformers"][name]
        pairs = [("automodel", "sentence_transformers", automodel, st)]
        if name in expected:
            reference = np.asarray(expected[name])
            pairs += [(loader, "reference", result[loader][name], reference) for loader in LOADERS]
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

    failed = [check for check in checks if not check["passed"]]
    distances = [check["max_cosine_distance"] for check in checks if "max_cosine_distance" in check]
    report = {
        "format": MANIFEST_FORMAT,
        "passed": not failed,
        "max_cosine_distance": max(distances),
        "tolerance": tolerance,
        "num_sentences": len(sentences),
        "checks": checks,
    }
    if failed:
        described = "; ".join(
            f"{check['name']} ({check['prompt']} inputs): max cosine distance {check['max_cosine_distance']:.3g}"
            for check in failed
        )
        raise VerificationError(
            f"{out_dir} does not embed like the model it was written from: {described}, above the tolerance "
            f"{tolerance:g}. The weights, config or tokenizer files do not match the in-memory model; write the "
            "checkpoint again."
        )
    logger.info("Verified %s: max cosine distance %.3g", out_dir, report["max_cosine_distance"])
    if write_manifest:
        report = write_verification_manifest(out_dir, report)
    return report


def write_verification_manifest(out_dir: str | os.PathLike, report: dict) -> dict:
    """Write `verification.json` into `out_dir`: the passed `report` of `verify_checkpoint` plus `"files"`, the
    sha256 and size of every other file as it is now. Call it again after changing any file (e.g. the model card
    with the verification figures). Returns the manifest written."""
    if not report.get("passed"):
        raise VerificationError("Only a passed verification is recorded; run verify_checkpoint until it passes.")
    manifest = {**report, "files": file_manifest(out_dir)}
    with atomic_file(Path(out_dir) / VERIFICATION_FILE, overwrite=True) as tmp:
        tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return manifest


__all__ = [
    "DEFAULT_SENTENCES",
    "VerificationError",
    "compute_reference_embeddings",
    "embed_in_fresh_process",
    "file_manifest",
    "max_cosine_distance",
    "verify_checkpoint",
    "write_verification_manifest",
]
