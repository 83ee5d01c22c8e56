"""Encoding speed against llm2vec 0.2.3 on the same SmolLM2 weights, the same texts, the same threads: short
sentences and long documents, every way a user can run a checkpoint.

Every path runs in a process of its own (llm2vec and stock transformers 4.44.2 in the llm2vec venv, vLLM in its own
venv, everything else in this one), loads its model once, warms up, then waits; the timed rounds alternate between
the processes (the order rotates every round), so each path sees the same machine state and load drift shows in every
row. Each process serves both kinds of text (--texts): a round times every path on the sentences, then every path on
the documents; each kind gets a table of its own.

Paths (--paths; `:bf16` after a name runs it in bfloat16):
  llm2vec      LLM2Vec.from_pretrained(copy, pooling_mode="mean", sdpa, max_length=doc_max_length=--max-length)
               .encode(batch_size=B)                                                               [.venv-llm2vec]
  st-remote    SentenceTransformer(checkpoint, trust_remote_code=True).encode(batch_size=B): our Hub files
  st-native    SentenceTransformer(native checkpoint).encode(batch_size=B): stock Transformer/Pooling/Normalize
               modules on transformers' own LlamaModel, no remote code, as the README recommends (needs
               --native-checkpoint; skipped without it)
  encoder      llama_encoder.Encoder.from_pretrained(checkpoint).encode(texts): its own length-sorted batching
  stock-tf5    a stock causal transformers LlamaModel forward (this venv's transformers), over the batches
               llm2vec forms (sorted by characters, B rows, left padded); forward only, no tokenisation or pooling
  stock-tf444  the same on transformers 4.44.2                                                  [.venv-llm2vec]
  vllm         vLLM's offline LLM(model=native checkpoint, runner="pooling").embed(texts), started the way
               `llama-encoder embed --engine vllm` starts it (llama_encoder.engines.vllm.VllmEmbedder: KV-cache size,
               OpenMP threads bound to --threads CPUs, eager mode); vLLM batches by itself. Needs
               --native-checkpoint and a vLLM interpreter (--vllm-python)                           [.venv-vllm]
  st-remote@REV  st-remote with the Hub files of git revision REV (e.g. st-remote@HEAD): before and after a change
               to them, in one run

Texts (--texts): `sentences` are the first --sentences sentences of the STS Benchmark file (sentence1 and sentence2
of each pair, in file order; a built-in list cycled to --sentences when the file is missing). `documents` are the
first --documents distinct texts of at least --min-document-chars characters of --documents-file, in file order (a
.txt: one text per line; a .jsonl of the training format {"query", "positive", "negatives"}: its `positive`; a BEIR
corpus.jsonl: its `text`). The default file is MedQuAD (../shared/data/train/medquad.jsonl: consumer health
questions answered by NIH pages), the closest public analogue to scientific abstracts: with the defaults (64 texts
of >= 1000 characters; SmolLM2's tokenizer) 41 reach the 512-token cut, the rest spread from 228 to 509 tokens
(mean 461), and the batches of 32 that llm2vec and ST form hold 11% padding. Without the file, synthetic long
texts built from the built-in sentences are used (the output says so). Every path cuts every text at --max-length
tokens (default 512): ST's max_seq_length, Encoder's max_seq_length, llm2vec's max_length and doc_max_length
(llm2vec otherwise shortens any text over doc_max_length=400 tokens by whole words before tokenising), the stock
paths' tokenizer, and vLLM's max_model_len (a copy of the native checkpoint whose sentence_bert_config.json says
max_seq_length = --max-length). The cosine of each path's embeddings to llm2vec's (or, without llm2vec, to the
first path that returns embeddings) checks they saw the same tokens.

Each row: median and best seconds over the rounds; from the best round, texts/s, real tokens/s, achieved GFLOP/s of
the bidirectional encoder's useful work on the real tokens (2 x non-embedding parameters per token + attention) and
its share of a matmul peak measured here (a 2048^3 product, and a product of the model's own MLP shape at the
batch's token count); the seconds spent tokenising alone; the ratio to llm2vec (best over best, median over median,
and the range of the per-round ratios); the lowest cosine of each path's embeddings to the reference. On a shared
host, other processes' bursts slow a 2-thread run many times over for minutes: the best round is the figure least
disturbed by them, the per-round range shows how much they moved it. The MLP-shaped peak is F.linear's (MKL, what
stock transformers runs); our fast path's oneDNN-prepacked products can exceed it.

With --profile, per kind and path (not vLLM, whose work runs in its engine process):
  by kind of op  one more encode under torch.profiler, its CPU time split by kind of work (matmul, attention kernel,
                 copies/GQA repeat, elementwise: rotary/norm/SiLU, mask construction, dtype casts, embedding lookup,
                 outside torch ops: Python and tokenisation); which attention kernel ran (the aten op names seen,
                 e.g. _scaled_dot_product_flash_attention_for_cpu or _scaled_dot_product_attention_math) and what
                 each scaled_dot_product_attention call was given (the mask's dtype and shape, a broadcast view or
                 not, is_causal, K/V heads repeated or enable_gqa), captured by wrapping the function.
  by module      for the stock paths and llm2vec (st-native, stock-tf5, stock-tf444, llm2vec), one more encode with
                 forward pre/post hooks timing each module kind exclusive of its children: embedding, rotary cos/sin,
                 q/k/v/o projections, the rest of attention (rotary, K/V repeat, kernel), MLP projections, the rest
                 of the MLP (SiLU, product), norms, decoder-layer residuals, the model body's own code (mask
                 construction, positions), ST's Transformer module, pooling, and outside any module (tokenisation,
                 batching, Python). Our paths (st-remote, encoder) are not hooked: hooks switch their fast path off.

    bash scripts/setup_llm2vec_env.sh                          # once: .venv-llm2vec (about 2 minutes)
    bash scripts/setup_vllm_env.sh                             # once, for the vllm path: .venv-vllm
    .venv/bin/python benchmarks/llm2vec_speed.py --checkpoint CKPT --sentences 128 --documents 16 --rounds 1
    .venv/bin/python benchmarks/llm2vec_speed.py --checkpoint CKPT --native-checkpoint NATIVE \\
        --sts-file ../shared/data/stsbenchmark/sts-dev.csv --rounds 3 --profile --json speed.json   # the tables

The llm2vec side gets a copy of the checkpoint's weights (symlinked) with a plain Llama config.json (`rope_theta`
at the top level, as transformers 4.44 reads it) and a tokenizer config without a BOS token; our remote-code path
runs the Hub files of this package (copied over the checkpoint's, so the code under test is what is measured;
--hub-files checkpoint keeps the checkpoint's own).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

TAG = "@@llm2vec_speed@@ "
REPO = Path(__file__).resolve().parents[1]
HUB_FILES = ("modeling_llama_encoder.py", "configuration_llama_encoder.py", "sentence_transformers_llama_encoder.py")
LLM2VEC_VENV_PATHS = ("llm2vec", "stock-tf444")
NATIVE_PATHS = ("st-native", "vllm")
ALL_PATHS = ("llm2vec", "st-remote", "st-native", "encoder", "stock-tf5", "stock-tf444", "vllm")
MODULE_PROFILE_PATHS = ("llm2vec", "st-native", "stock-tf5", "stock-tf444")  # stock layers: hooks change nothing
TEXT_KINDS = ("sentences", "documents")
DEFAULT_DOCUMENTS_FILE = REPO.parent / "shared/data/train/medquad.jsonl"
DEFAULT_MIN_DOCUMENT_CHARS = 1000

# Used when no STS file is at hand: short sentences of the STS kind (captions, headlines, forum lines).
BUILTIN_SENTENCES = [
    "A man is playing a guitar.", "A woman is slicing an onion.", "Two dogs are running through a field.",
    "A child is riding a horse on the beach.", "The cat sat on the windowsill watching the rain.",
    "Stocks fell sharply on Monday after the central bank raised interest rates.",
    "A group of people are dancing at a wedding.", "The man is cutting a tomato with a knife.",
    "A plane is taking off from the runway.", "Three men are playing chess in a park.",
    "Police arrested two suspects after the robbery downtown.", "A woman is peeling a potato.",
    "The boy is jumping into the swimming pool.", "A red car is parked in front of the house.",
    "Heavy rain caused flooding in several parts of the city on Tuesday.", "Someone is playing the piano.",
    "A person is riding a bicycle down a mountain trail.", "The president met with foreign leaders at the summit.",
    "A small bird is sitting on a branch.", "Two women are sitting on a bench and talking.",
    "How do I remove a stripped screw from wood?", "The dog is chasing a ball across the yard.",
    "A chef is preparing a meal in a busy kitchen.", "Scientists discovered a new species of frog in the rainforest.",
    "A man is playing the flute.", "A baby is laughing at a puppy.", "The train arrived late because of snow.",
    "A man and a woman are walking hand in hand along the river.", "Oil prices rose for a third straight week.",
    "A girl is brushing her hair.", "The team won the championship after a dramatic final match.",
    "What is the best way to learn a new language as an adult?",
]


# ----------------------------------------------------------------------------------------------------- worker side

def _reply(payload: dict) -> None:
    sys.stdout.write(TAG + json.dumps(payload) + "\n")
    sys.stdout.flush()


def _dtype_kwargs(torch, dtype) -> dict:
    import transformers

    major = int(transformers.__version__.split(".")[0])
    return {"dtype": dtype} if major >= 5 else {"torch_dtype": dtype}


def _llm2vec_batches(texts: list[str], batch_size: int) -> list[list[str]]:
    """The batches llm2vec and SentenceTransformer form: longest texts (in characters) first, batch_size rows."""
    return [[texts[i] for i in batch] for batch in _llm2vec_batch_indices(texts, batch_size)]


def _llm2vec_batch_indices(texts: list[str], batch_size: int) -> list[list[int]]:
    order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
    return [order[start : start + batch_size] for start in range(0, len(texts), batch_size)]


class _Path:
    """What a worker runs for one path: `encode(kind)` (embeddings or None), `tokenize(kind)`, the module to hook for
    the by-module profile (None: not hooked), a callable to time as pooling (llm2vec pools outside any module)."""

    def __init__(self, encode, tokenize, root=None, pooling_owner=None, info: dict | None = None):
        self.encode, self.tokenize, self.root, self.pooling_owner = encode, tokenize, root, pooling_owner
        self.info = info or {}


def _load_path(name: str, dtype_name: str, dirs: dict, texts: dict[str, list[str]], batch_size: int,
               max_length: int) -> _Path:
    """Load one path; every path cuts texts at max_length tokens."""
    import torch

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    if name == "llm2vec":
        from llm2vec import LLM2Vec

        # doc_max_length as max_length: else llm2vec cuts any text over 400 tokens by whole words (_convert_to_str)
        model = LLM2Vec.from_pretrained(dirs["llm2vec"], pooling_mode="mean", attn_implementation="sdpa",
                                        max_length=max_length, doc_max_length=max_length,
                                        **_dtype_kwargs(torch, dtype))

        def encode(kind):
            return model.encode(texts[kind], batch_size=batch_size, show_progress_bar=False, convert_to_tensor=True)

        def tokenize(kind):
            joined = [model._convert_to_str("", text) for text in texts[kind]]  # llm2vec tokenises each text here
            for batch in _llm2vec_batches(joined, batch_size):
                model.tokenize([model.prepare_for_tokenization(text) for text in batch])

        return _Path(encode, tokenize, root=model.model, pooling_owner=model)
    if name in ("st-remote", "st-native"):
        from sentence_transformers import SentenceTransformer

        folder = dirs[dirs.get("use", "remote")] if name == "st-remote" else dirs["native"]
        model = SentenceTransformer(folder, trust_remote_code=name == "st-remote", device="cpu",
                                    model_kwargs={"dtype": dtype})
        model.max_seq_length = max_length

        def encode(kind):
            return model.encode(texts[kind], batch_size=batch_size, show_progress_bar=False, convert_to_tensor=True)

        def tokenize(kind):
            for batch in _llm2vec_batches(texts[kind], batch_size):
                model.preprocess(batch)

        return _Path(encode, tokenize, root=model if name == "st-native" else None,
                     info={"modules": [type(module).__name__ for module in model],
                           "max_seq_length": model.max_seq_length})
    if name == "encoder":
        from llama_encoder.encoding.encode import Encoder
        from llama_encoder.modeling_llama_encoder import tokenize_for_encoder

        encoder = Encoder.from_pretrained(dirs["checkpoint"], device="cpu", dtype=str(dtype).removeprefix("torch."),
                                          allow_slow_dtype=True)
        encoder.max_seq_length = max_length

        def encode(kind):
            return encoder.encode(texts[kind], show_progress=False, convert_to="torch")

        def tokenize(kind):
            tokenize_for_encoder(encoder.tokenizer, texts[kind], padding=False, return_tensors=None,
                                 max_length=max_length)

        return _Path(encode, tokenize)
    if name in ("stock-tf5", "stock-tf444"):
        from transformers import AutoTokenizer, LlamaModel

        tokenizer = AutoTokenizer.from_pretrained(dirs["llm2vec"])
        tokenizer.pad_token, tokenizer.padding_side = tokenizer.eos_token, "left"
        model = LlamaModel.from_pretrained(dirs["llm2vec"], attn_implementation="sdpa",
                                           **_dtype_kwargs(torch, dtype)).eval()

        def tokenized(batch):
            return tokenizer(batch, padding=True, truncation=True, max_length=max_length, return_tensors="pt")

        batches = {kind: [tokenized(batch) for batch in _llm2vec_batches(kind_texts, batch_size)]
                   for kind, kind_texts in texts.items()}

        def encode(kind):
            with torch.inference_mode():
                for batch in batches[kind]:
                    model(**batch, use_cache=False)

        def tokenize(kind):
            for batch in _llm2vec_batches(texts[kind], batch_size):
                tokenized(batch)

        return _Path(encode, tokenize, root=model)
    raise ValueError(f"unknown path {name!r}")


_CATEGORIES = (  # (kind of work, aten op names whose self CPU time counts for it)
    ("matmul", ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "aten::linear", "aten::baddbmm",
                "mkldnn::_linear_pointwise", "aten::mkldnn_linear")),
    ("attention kernel", ("aten::_scaled_dot_product_flash_attention_for_cpu", "aten::_softmax", "aten::softmax",
                          "aten::_scaled_dot_product_attention_math", "aten::scaled_dot_product_attention",
                          "aten::_safe_softmax", "aten::_scaled_dot_product_efficient_attention",
                          "aten::_scaled_dot_product_flash_attention")),
    ("copies (GQA repeat, transpose, contiguous)", ("aten::copy_", "aten::clone", "aten::contiguous",
                                                    "aten::reshape", "aten::_unsafe_view", "aten::view",
                                                    "aten::expand", "aten::transpose", "aten::t", "aten::stack",
                                                    "aten::index", "aten::select", "aten::slice", "aten::unsqueeze",
                                                    "aten::as_strided", "aten::permute", "aten::empty_like",
                                                    "aten::empty", "aten::empty_strided", "aten::resolve_conj",
                                                    "aten::resolve_neg", "aten::split", "aten::chunk",
                                                    "aten::narrow", "aten::detach", "aten::alias")),
    ("elementwise (rotary, RMSNorm, SiLU, residual)", ("aten::mul", "aten::add", "aten::silu", "aten::neg",
                                                       "aten::cat", "aten::pow", "aten::mean", "aten::rsqrt",
                                                       "aten::cos", "aten::sin", "aten::add_", "aten::mul_",
                                                       "aten::sum", "aten::div", "aten::sqrt", "aten::norm",
                                                       "aten::linalg_vector_norm", "aten::clamp", "aten::clamp_min",
                                                       "aten::einsum", "aten::sub", "aten::float")),
    ("mask construction", ("aten::masked_fill", "aten::masked_fill_", "aten::where", "aten::eq", "aten::ne",
                           "aten::cumsum", "aten::all", "aten::any", "aten::ones", "aten::zeros", "aten::zeros_like",
                           "aten::full", "aten::arange", "aten::triu", "aten::logical_not", "aten::bitwise_not",
                           "aten::gt", "aten::lt", "aten::ge", "aten::le", "aten::bitwise_and", "aten::__and__",
                           "aten::fill_", "aten::item", "aten::_local_scalar_dense", "aten::is_nonzero",
                           "aten::__or__", "aten::bitwise_or", "aten::min", "aten::max", "aten::amax",
                           "aten::scalar_tensor")),
    ("dtype casts", ("aten::to", "aten::_to_copy", "aten::type_as")),
    ("embedding lookup", ("aten::embedding", "aten::index_select")),
)
_ATTENTION_KERNELS = ("aten::_scaled_dot_product_flash_attention_for_cpu", "aten::_scaled_dot_product_attention_math",
                      "aten::_scaled_dot_product_efficient_attention", "aten::_scaled_dot_product_flash_attention",
                      "aten::_scaled_dot_product_cudnn_attention", "aten::_efficient_attention_forward")


def describe_sdpa_call(query, key, attn_mask, is_causal: bool, enable_gqa: bool) -> str:
    """One scaled_dot_product_attention call in words: the mask it was given (dtype, shape with B = batch and L = the
    query/key length, whether it is a broadcast view, i.e. some stride 0), causal or not, and how K/V heads met the
    query heads (repeated before the call, or enable_gqa)."""
    if attn_mask is None:
        mask = "no mask"
    else:
        batch, length = query.shape[0], query.shape[-2]
        dims = ["B" if (i == 0 and size == batch and batch > 1) else "L" if size == length else str(size)
                for i, size in enumerate(attn_mask.shape)]
        view = ", broadcast view" if 0 in attn_mask.stride() else ""
        mask = f"{str(attn_mask.dtype).removeprefix('torch.')} mask ({', '.join(dims)}){view}"
    heads, kv_heads = query.shape[-3], key.shape[-3]
    if enable_gqa and kv_heads != heads:
        gqa = f"enable_gqa ({kv_heads} K/V heads for {heads})"
    else:
        gqa = f"{kv_heads} K/V heads for {heads} query heads"
    return f"{mask}; {'causal' if is_causal else 'not causal'}; {gqa}; {str(query.dtype).removeprefix('torch.')}"


@contextlib.contextmanager
def _sdpa_recorder(calls: dict):
    """Count the calls of torch.nn.functional.scaled_dot_product_attention by `describe_sdpa_call` while inside."""
    import torch.nn.functional as functional

    original = functional.scaled_dot_product_attention

    def recorded(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, *args, **kwargs):
        what = describe_sdpa_call(query, key, attn_mask, bool(is_causal), bool(kwargs.get("enable_gqa", False)))
        calls[what] = calls.get(what, 0) + 1
        return original(query, key, value, attn_mask, dropout_p, is_causal, *args, **kwargs)

    functional.scaled_dot_product_attention = recorded
    try:
        yield calls
    finally:
        functional.scaled_dot_product_attention = original


def _profile(encode, out_file: Path) -> dict:
    import torch
    from torch.profiler import ProfilerActivity, profile

    sdpa_calls: dict[str, int] = {}
    start = time.perf_counter()
    with _sdpa_recorder(sdpa_calls), profile(activities=[ProfilerActivity.CPU]) as prof:
        encode()
    wall = time.perf_counter() - start
    averages = prof.key_averages()
    out_file.write_text(averages.table(sort_by="self_cpu_time_total", row_limit=40))
    by_op = {event.key: event.self_cpu_time_total / 1e6 for event in averages}
    counts = {event.key: event.count for event in averages}
    kinds, seen = {}, set()
    for kind, ops in _CATEGORIES:
        kinds[kind] = sum(by_op.get(op, 0.0) for op in ops)
        seen.update(ops)
    kinds["other torch ops"] = sum(seconds for op, seconds in by_op.items() if op not in seen)
    in_ops = sum(by_op.values())
    kinds["outside torch ops (Python, tokenisation)"] = max(0.0, wall - in_ops)
    top = sorted(by_op.items(), key=lambda item: -item[1])[:12]
    kernels = {op: {"calls": counts[op], "self_s": by_op[op]} for op in _ATTENTION_KERNELS if op in counts}
    if "aten::scaled_dot_product_attention" not in counts and "aten::_softmax" in counts:
        kernels["eager (matmul + aten::_softmax)"] = {"calls": counts["aten::_softmax"],
                                                      "self_s": by_op["aten::_softmax"]}
    return {"wall_s": wall, "kinds": kinds, "top_ops": top, "table": str(out_file), "torch": torch.__version__,
            "attention_kernels": kernels, "sdpa_calls": sdpa_calls}


def module_kind(module, parent_kind: str | None) -> str | None:
    """The by-module profile's kind of a module (by its class; a Linear by its parent's kind), None: not timed on
    its own (its time counts for the nearest timed ancestor)."""
    import torch

    cls = type(module).__name__
    if isinstance(module, torch.nn.Linear):
        return {"attention": "attention: q/k/v/o projections",
                "MLP": "MLP: gate/up/down projections"}.get(parent_kind, "other projections")
    if cls.endswith("RotaryEmbedding"):
        return "rotary cos/sin"
    if "Attention" in cls:
        return "attention"
    if cls.endswith("MLP"):
        return "MLP"
    if cls.endswith("RMSNorm") or cls.endswith("LayerNorm"):
        return "norms"
    if isinstance(module, torch.nn.Embedding):
        return "embedding lookup"
    if cls in ("Pooling", "Normalize"):
        return "pooling and normalisation"
    if cls.endswith("DecoderLayer"):
        return "decoder layers: residual adds"
    if cls == "Transformer":
        return "ST Transformer module: features in and out"
    if cls.endswith("Model"):
        return "model body: mask construction, positions, layer loop"
    return None


_MODULE_KIND_NAMES = {"attention": "attention: rotary, K/V repeat, kernel, reshapes",
                      "MLP": "MLP: SiLU and product"}
OUTSIDE_MODULES = "outside modules: tokenisation, batching, Python"


def _profile_modules(path: _Path, encode) -> dict:
    """Seconds per module kind, exclusive of timed children, over one encode with forward pre/post hooks."""
    totals: dict[str, float] = {}
    calls: dict[str, int] = {}
    stack: list[list] = []  # [kind, start, seconds in timed children]
    top_level = [0.0]

    def enter(kind):
        def pre(module, args):
            stack.append([kind, time.perf_counter(), 0.0])
        return pre

    def leave(module, args, output):
        kind, start, children = stack.pop()
        elapsed = time.perf_counter() - start
        name = _MODULE_KIND_NAMES.get(kind, kind)
        totals[name] = totals.get(name, 0.0) + elapsed - children
        calls[name] = calls.get(name, 0) + 1
        if stack:
            stack[-1][2] += elapsed
        else:
            top_level[0] += elapsed

    handles = []

    def walk(module, parent_kind):
        kind = module_kind(module, parent_kind)
        if kind is not None:
            handles.append(module.register_forward_pre_hook(enter(kind)))
            handles.append(module.register_forward_hook(leave))
        for child in module.children():
            walk(child, kind or parent_kind)

    walk(path.root, None)
    owner = path.pooling_owner
    if owner is not None:  # llm2vec pools in LLM2Vec.forward, which encode calls directly, not through a hook
        original = owner.get_pooling

        def get_pooling(*args, **kwargs):
            enter("pooling and normalisation")(None, None)
            try:
                return original(*args, **kwargs)
            finally:
                leave(None, None, None)

        owner.get_pooling = get_pooling
    start = time.perf_counter()
    try:
        encode()
    finally:
        wall = time.perf_counter() - start
        for handle in handles:
            handle.remove()
        if owner is not None:
            del owner.get_pooling
    totals[OUTSIDE_MODULES] = max(0.0, wall - top_level[0])
    return {"wall_s": wall, "modules": totals, "calls": calls}


def _worker(args) -> None:
    import torch

    torch.set_num_threads(args.threads)
    texts = json.loads(Path(args.texts_file).read_text())
    dirs = json.loads(args.worker_dirs)
    start = time.perf_counter()
    path = _load_path(args.worker, args.worker_dtype, dirs, texts, args.batch_size, args.max_length)
    load_s = time.perf_counter() - start
    import transformers

    _reply({"ready": True, "load_s": load_s, "torch": torch.__version__, "transformers": transformers.__version__,
            "threads": torch.get_num_threads(), **path.info})
    for line in sys.stdin:
        command = json.loads(line)
        op, kind = command["op"], command.get("kind")
        if op == "run":
            start = time.perf_counter()
            embeddings = path.encode(kind)
            seconds = time.perf_counter() - start
            if command.get("save") and embeddings is not None:
                import numpy as np

                np.save(command["save"], embeddings.float().cpu().numpy().astype(np.float32))
            _reply({"seconds": seconds})
        elif op == "warmup":
            start = time.perf_counter()
            path.encode(kind)
            _reply({"seconds": time.perf_counter() - start})
        elif op == "tokenize":
            start = time.perf_counter()
            path.tokenize(kind)
            _reply({"seconds": time.perf_counter() - start})
        elif op == "profile":
            result = _profile(lambda: path.encode(kind), Path(command["out"]))  # noqa: B023
            if path.root is not None:
                result["by_module"] = _profile_modules(path, lambda: path.encode(kind))  # noqa: B023
            _reply(result)
        elif op == "quit":
            break


# ----------------------------------------------------------------------------------------------- orchestrator side

def read_sentences(sts_file: str | None, n: int) -> tuple[list[str], str]:
    """The first n sentences of an STS Benchmark file (sentence1 and sentence2 of each pair, in file order), else
    the built-in list cycled to n."""
    if sts_file and Path(sts_file).is_file():
        sentences = []
        with open(sts_file, encoding="utf-8") as handle:
            for line in handle:
                fields = line.rstrip("\n").split("\t")
                if len(fields) >= 7:
                    sentences += [fields[5], fields[6]]
                if len(sentences) >= n:
                    break
        return sentences[:n], f"{sts_file} (first {min(n, len(sentences))} sentences)"
    cycled = [BUILTIN_SENTENCES[i % len(BUILTIN_SENTENCES)] for i in range(n)]
    why = "no --sts-file" if not sts_file else f"{sts_file} not found"
    return cycled, f"built-in list of {len(BUILTIN_SENTENCES)} sentences cycled to {n} ({why})"


def iter_documents(path: str | os.PathLike):
    """The texts of a documents file, in file order: a .txt holds one text per line (blank lines skipped); a .jsonl
    holds records of the training format {"query", "positive", "negatives"} (the positive is taken) or of a BEIR
    corpus {"_id", "title", "text"} (the text is taken)."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".txt", ".jsonl"):
        raise ValueError(f"{path}: a documents file is a .txt (one text per line) or a .jsonl (training format "
                         "records, whose `positive` is taken, or a BEIR corpus.jsonl, whose `text` is taken)")
    from llama_encoder.readers import jsonl_records  # here: the workers in llm2vec's venv never read documents

    if suffix == ".txt":
        with open(path, encoding="utf-8") as handle:
            yield from (line.rstrip("\n") for line in handle if line.strip())
        return
    for number, record in jsonl_records(path, required=()):  # the package's jsonl reader: same checks, same errors
        text = record["positive"] if "positive" in record else record.get("text")
        if not isinstance(text, str):
            raise ValueError(f"{path}:{number}: a record with neither a `positive` nor a `text` string")
        yield text


def select_documents(texts, n: int, min_chars: int) -> list[str]:
    """The first n distinct texts (compared after stripping surrounding whitespace) of at least min_chars
    characters, in the order given: the same file gives the same documents on every run."""
    chosen, seen = [], set()
    for text in texts:
        text = text.strip()
        if len(text) < min_chars or text in seen:
            continue
        seen.add(text)
        chosen.append(text)
        if len(chosen) >= n:
            break
    return chosen


def synthetic_documents(n: int) -> list[str]:
    """n distinct long texts built from the built-in sentences (12 to 51 sentences each, about 150 to 650 tokens),
    for a host without the documents file."""
    count = len(BUILTIN_SENTENCES)
    return [" ".join(BUILTIN_SENTENCES[(7 * i + 3 * j) % count] for j in range(12 + (13 * i) % 40))
            + f" (Document {i + 1}.)" for i in range(n)]


def read_documents(documents_file: str | os.PathLike | None, n: int, min_chars: int) -> tuple[list[str], str]:
    """`select_documents` of the file, or `synthetic_documents` when there is no such file; and where they came from
    in words."""
    if documents_file and Path(documents_file).is_file():
        texts = select_documents(iter_documents(documents_file), n, min_chars)
        if not texts:
            raise ValueError(f"{documents_file} has no text of at least {min_chars} characters "
                             "(--min-document-chars)")
        short = f"; only {len(texts)} qualify" if len(texts) < n else ""
        return texts, (f"{documents_file} (first {len(texts)} distinct texts of >= {min_chars} characters, in file "
                       f"order{short})")
    why = "no --documents-file" if not documents_file else f"{documents_file} not found"
    return synthetic_documents(n), (f"SYNTHETIC: {n} long texts built from the built-in sentences ({why}; not a "
                                    "real document set)")


def token_stats(lengths: list[int], full_lengths: list[int], texts: list[str], batch_size: int,
                max_length: int) -> dict:
    """Real tokens (after the cut at max_length) and the padded tokens of the batches llm2vec and ST form."""
    padded = sum(len(batch) * max(lengths[i] for i in batch) for batch in _llm2vec_batch_indices(texts, batch_size))
    return {"texts": len(texts), "tokens": sum(lengths), "mean_tokens": sum(lengths) / len(lengths),
            "max_tokens": max(lengths), "min_tokens": min(lengths), "padded_tokens": padded,
            "batches": -(-len(texts) // batch_size), "cut_at_max_length": sum(x > max_length for x in full_lengths),
            "tokens_before_cut": sum(full_lengths)}


def parse_path_specs(specs: list[str]) -> list[tuple[str, str, str, str]]:
    """(label, name, revision, dtype) for each --paths entry: NAME, NAME:bf16, st-remote@REV[:bf16]; ValueError for
    anything else."""
    runs = []
    for spec in specs:
        name, _, dtype = spec.partition(":")
        name, _, revision = name.partition("@")
        if name not in ALL_PATHS or (revision and name != "st-remote") or dtype not in ("", "fp32", "bf16"):
            raise ValueError(f"unknown path {spec!r}; choose from {', '.join(ALL_PATHS)} (st-remote@REV; NAME:bf16)")
        label = name + (f"@{revision}" if revision else "") + (":bf16" if dtype == "bf16" else "")
        runs.append((label, name, revision, dtype or "fp32"))
    labels = [label for label, *_ in runs]
    if len(set(labels)) < len(labels):
        raise ValueError(f"a path is named twice in --paths: {' '.join(specs)}")
    return runs


def check_args(args) -> list[str]:
    """What is wrong with the options, in words (empty: nothing)."""
    problems = []
    for option in ("sentences", "documents", "batch_size", "threads", "rounds", "max_length"):
        if getattr(args, option) < 1:
            problems.append(f"--{option.replace('_', '-')} must be at least 1 (got {getattr(args, option)})")
    for option in ("warmup", "min_document_chars"):
        if getattr(args, option) < 0:
            problems.append(f"--{option.replace('_', '-')} must be at least 0 (got {getattr(args, option)})")
    if not args.texts:
        problems.append("--texts needs at least one of: " + " ".join(TEXT_KINDS))
    elif len(set(args.texts)) < len(args.texts):
        problems.append(f"--texts names a kind twice: {' '.join(args.texts)}")
    try:
        parse_path_specs(args.paths)
    except ValueError as exc:
        problems.append(str(exc))
    for name in args.bf16 or []:
        if name not in ALL_PATHS:
            problems.append(f"--bf16 {name}: not a path ({', '.join(ALL_PATHS)})")
    if args.documents_file and "documents" in args.texts:
        suffix = Path(args.documents_file).suffix.lower()
        if suffix not in (".txt", ".jsonl"):
            problems.append(f"--documents-file {args.documents_file}: a .txt (one text per line) or a .jsonl")
    return problems


def default_vllm_python() -> str | None:
    """find_vllm_python() ($LLAMA_ENCODER_VLLM_PYTHON, or this interpreter if it imports vllm), else
    .venv-vllm/bin/python of this repository when it exists."""
    from llama_encoder.engines.vllm import find_vllm_python

    found = find_vllm_python()
    if found:
        return found
    venv = REPO / ".venv-vllm/bin/python"
    return str(venv) if venv.is_file() else None


def _file_name(label: str) -> str:
    return label.replace(":", "-").replace("@", "-at-")


def _link(source: Path, target: Path) -> None:
    if target.is_symlink() or target.exists():
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        else:
            target.unlink()
    target.symlink_to(source.resolve())


def prepare_dirs(checkpoint: Path, workdir: Path, hub_files: str) -> dict[str, str]:
    """The folders the workers load: the checkpoint (Encoder), a remote-code copy with this package's Hub files
    (st-remote) and a plain Llama copy for llm2vec and the stock paths; weights are symlinked, never copied."""
    remote, plain = workdir / "remote", workdir / "llm2vec"
    for folder in (remote, plain):
        folder.mkdir(parents=True, exist_ok=True)
    for item in checkpoint.iterdir():  # files and module folders (1_Pooling, 2_Normalize)
        if hub_files == "checkpoint" or item.name not in HUB_FILES:
            _link(item, remote / item.name)
    if hub_files == "package":
        for name in HUB_FILES:
            if (remote / name).is_symlink() or (remote / name).exists():
                (remote / name).unlink()
            shutil.copy2(REPO / "llama_encoder" / name, remote / name)

    config = json.loads((checkpoint / "config.json").read_text())
    rope = config.pop("rope_parameters", None) or {}
    llama = {key: value for key, value in config.items()
             if key not in ("auto_map", "pooling_mode", "normalize_embeddings", "instruction_template", "is_causal")
             and not key.startswith("latent_attention")}
    llama.update(model_type="llama", architectures=["LlamaModel"], rope_theta=rope.get("rope_theta", 10000.0),
                 rope_scaling=None, torch_dtype=config.get("dtype", "float32"), use_cache=False)
    (plain / "config.json").write_text(json.dumps(llama, indent=2) + "\n")
    tokenizer_config = json.loads((checkpoint / "tokenizer_config.json").read_text())
    tokenizer_config["bos_token"] = None  # llm2vec's tokenizer must not add (or know) a BOS token
    tokenizer_config.pop("add_bos_token", None)
    tokenizer_config["model_input_names"] = ["input_ids", "attention_mask"]  # no token_type_ids for LlamaModel
    (plain / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2) + "\n")
    # tokenizers >= 0.20 writes BPE merges as [left, right] pairs; the tokenizers < 0.20 that transformers 4.44 needs
    # reads only "left right" strings (byte-level BPE tokens hold no space, so the two spell the same merges).
    tokenizer = json.loads((checkpoint / "tokenizer.json").read_text(encoding="utf-8"))
    merges = tokenizer.get("model", {}).get("merges")
    if merges and isinstance(merges[0], list):
        tokenizer["model"]["merges"] = [" ".join(pair) for pair in merges]
    (plain / "tokenizer.json").write_text(json.dumps(tokenizer, ensure_ascii=False), encoding="utf-8")
    if (checkpoint / "special_tokens_map.json").is_file():
        _link(checkpoint / "special_tokens_map.json", plain / "special_tokens_map.json")
    for weights in checkpoint.glob("*.safetensors*"):
        _link(weights, plain / weights.name)
    if (checkpoint / "model.safetensors.index.json").is_file():
        _link(checkpoint / "model.safetensors.index.json", plain / "model.safetensors.index.json")
    return {"checkpoint": str(checkpoint), "remote": str(remote), "llm2vec": str(plain)}


def prepare_native(native: Path, workdir: Path, max_length: int) -> str:
    """A copy of the native checkpoint (everything symlinked) whose sentence_bert_config.json says max_seq_length =
    max_length: stock ST reads it, and vLLM takes its max_model_len (where it cuts inputs) from it."""
    folder = workdir / "native"
    folder.mkdir(parents=True, exist_ok=True)
    for item in native.iterdir():
        if item.name != "sentence_bert_config.json":
            _link(item, folder / item.name)
    bert_file = native / "sentence_bert_config.json"
    bert = json.loads(bert_file.read_text()) if bert_file.is_file() else {}
    bert["max_seq_length"] = max_length
    target = folder / "sentence_bert_config.json"
    if target.is_symlink():
        target.unlink()
    target.write_text(json.dumps(bert, indent=2) + "\n")
    return str(folder)


class Worker:
    """One path in its own process, driven over stdin/stdout."""

    def __init__(self, label: str, python: str, name: str, dtype: str, dirs: dict, args, log_dir: Path):
        self.label, self.name, self.dtype = label, name, dtype
        revision = label.split(":")[0].partition("@")[2]
        dirs = {**dirs, "use": f"remote@{revision}" if revision else "remote"}
        if os.sep in python:  # the worker runs in log_dir: a relative interpreter path must not move with it,
            python = os.path.abspath(python)  # and a venv's python must stay the link (no resolve)
        command = [python, str(Path(__file__).resolve()), "--worker", name, "--worker-dtype", dtype,
                   "--worker-dirs", json.dumps(dirs), "--texts-file", str(args.texts_file),
                   "--threads", str(args.threads), "--batch-size", str(args.batch_size),
                   "--max-length", str(args.max_length)]
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "TOKENIZERS_PARALLELISM": "false",
               "TRANSFORMERS_VERBOSITY": "error", "PYTHONPATH": str(REPO)}
        self.log = open(log_dir / f"{_file_name(label)}.log", "w")
        self.process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log,
                                        text=True, env=env, cwd=str(log_dir))
        self.info: dict = {}

    def read(self) -> dict:
        for line in self.process.stdout:
            if line.startswith(TAG):
                return json.loads(line[len(TAG):])
        raise RuntimeError(f"{self.label} exited (rc {self.process.wait()}); see {self.log.name}")

    def ask(self, **command) -> dict:
        self.process.stdin.write(json.dumps(command) + "\n")
        self.process.stdin.flush()
        return self.read()

    def close(self) -> None:
        if self.process.poll() is None:
            try:
                self.process.stdin.write(json.dumps({"op": "quit"}) + "\n")
                self.process.stdin.flush()
                self.process.wait(timeout=30)
            except (BrokenPipeError, subprocess.TimeoutExpired):
                self.process.kill()
        self.log.close()


class VllmWorker:
    """The vllm path, with Worker's interface: llama_encoder.engines.vllm.VllmEmbedder (vLLM in a child process of its
    own interpreter, started with the engine's settings) on the native copy; seconds are measured here, around
    `embed`, so they include sending the texts and reading back the embeddings (a .npy file)."""

    name = "vllm"

    def __init__(self, label: str, dtype: str, folder: str, python: str, threads: int, texts: dict[str, list[str]]):
        from llama_encoder.engines.vllm import VllmEmbedder

        self.label, self.dtype, self.texts = label, dtype, texts
        self.embedder = VllmEmbedder(folder, python=python, dtype={"fp32": "float32", "bf16": "bfloat16"}[dtype],
                                     threads=threads)
        self.info: dict = {}

    def read(self) -> dict:
        info = self.embedder.start()
        return {"ready": True, "load_s": info["startup_seconds"], "transformers": f"vllm {info['vllm_version']}",
                "threads": self.embedder.threads, "vllm": info, "dtype_run": info["dtype"]}

    def ask(self, op: str, kind: str | None = None, save: str | None = None, **_) -> dict | None:
        import numpy as np

        if op in ("run", "warmup"):
            start = time.perf_counter()
            embeddings = self.embedder.embed(self.texts[kind])
            seconds = time.perf_counter() - start
            if save:
                np.save(save, embeddings.astype(np.float32))
            return {"seconds": seconds}
        if op == "tokenize":
            return {"seconds": None}
        return None  # profile: vLLM's work runs in its engine process

    def close(self) -> None:
        self.embedder.close()


def matmul_peaks(python: str, dtype: str, threads: int, shapes: list[tuple[int, int, int, int]]) -> list[float]:
    """GFLOP/s of an (m x k) @ (k x n) product in dtype, best of `repeats`, for each (m, k, n, repeats), in a fresh
    process (F.linear, as stock transformers runs it)."""
    code = (
        "import sys, json, time, torch\n"
        f"torch.set_num_threads({threads}); d = getattr(torch, '{dtype}'); out = []\n"
        "for m, k, n, repeats in json.loads(sys.argv[1]):\n"
        "    a = torch.randn(m, k).to(d); b = torch.randn(n, k).to(d); torch.nn.functional.linear(a, b); best = 1e9\n"
        "    for _ in range(repeats):\n"
        "        s = time.perf_counter(); torch.nn.functional.linear(a, b); best = min(best, time.perf_counter() - s)\n"
        "    out.append(2 * m * k * n / best / 1e9)\n"
        "print(json.dumps(out))\n"
    )
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    return json.loads(subprocess.run([python, "-c", code, json.dumps(shapes)], capture_output=True, text=True,
                                     check=True, env=env).stdout.strip())


def matmul_peak(python: str, dtype: str, threads: int, m: int, k: int, n: int, repeats: int) -> float:
    """GFLOP/s of one (m x k) @ (k x n) product in dtype, best of repeats, in a fresh process."""
    return matmul_peaks(python, dtype, threads, [(m, k, n, repeats)])[0]


def encoder_flops(config: dict, lengths: list[int]) -> float:
    """The bidirectional encoder's useful FLOPs on rows of these real lengths: 2 x non-embedding weights per
    token, plus QK^T and AV over each row's own length."""
    hidden, layers = config["hidden_size"], config["num_hidden_layers"]
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    head_dim = config.get("head_dim") or hidden // heads
    per_layer = hidden * head_dim * (2 * heads + 2 * kv_heads) + 3 * hidden * config["intermediate_size"]
    return 2 * layers * per_layer * sum(lengths) + 4 * layers * heads * head_dim * sum(x * x for x in lengths)


def _cosines(a, b) -> tuple[float, float]:
    import numpy as np

    a, b = a.astype(np.float64), b.astype(np.float64)
    cos = (a * b).sum(axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    return float(cos.min()), float(cos.mean())


def _ratio(value: float | None) -> str:
    return f"{value:.2f}x" if value is not None else "-"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, default=None,
                        help="our remote-code checkpoint (`llama-encoder convert --untrained --out DIR`); default: "
                        "convert the embedded SmolLM2 (untrained) into the llama-encoder cache once")
    parser.add_argument("--native-checkpoint", type=Path, default=None,
                        help="the same weights in the engine-native layout (`llama-encoder convert --format native`: "
                        "model_type llama + stock ST modules), for the st-native and vllm rows; without it both are "
                        "skipped")
    parser.add_argument("--llm2vec-python", default=str(REPO / ".venv-llm2vec/bin/python"),
                        help="the python of the llm2vec venv (scripts/setup_llm2vec_env.sh), which runs llm2vec and "
                        "stock-tf444; missing: both are skipped. Default: %(default)s")
    parser.add_argument("--vllm-python", default=None,
                        help="the python of the vLLM venv (scripts/setup_vllm_env.sh), which runs the vllm path; "
                        "default: $LLAMA_ENCODER_VLLM_PYTHON, else this interpreter if it imports vllm, else "
                        ".venv-vllm/bin/python of this repository (llama_encoder.engines.vllm.find_vllm_python); "
                        "none found: vllm is skipped")
    parser.add_argument("--texts", nargs="+", choices=TEXT_KINDS, default=list(TEXT_KINDS),
                        help="which kinds of text to time, each in a table of its own, with the same worker "
                        "processes (default: sentences documents)")
    parser.add_argument("--sts-file", default=str(REPO.parent / "shared/data/stsbenchmark/sts-dev.csv"),
                        help="STS Benchmark file to take the sentences from (tab-separated); missing: a built-in "
                        "list. Default: %(default)s")
    parser.add_argument("--sentences", type=int, default=768, help="how many sentences to embed (default 768)")
    parser.add_argument("--documents-file", default=str(DEFAULT_DOCUMENTS_FILE),
                        help="where the documents come from: a .txt (one text per line), a .jsonl of the training "
                        "format {query, positive, negatives} (the positive is taken) or a BEIR corpus.jsonl (the "
                        "text is taken); missing: synthetic long texts built from the built-in sentences, said so in "
                        "the output. Default: %(default)s (MedQuAD answers)")
    parser.add_argument("--documents", type=int, default=64,
                        help="how many documents to embed: the first N distinct texts of the file (in file order) "
                        "with at least --min-document-chars characters (default 64)")
    parser.add_argument("--min-document-chars", type=int, default=DEFAULT_MIN_DOCUMENT_CHARS,
                        help="the shortest text taken as a document, in characters (default %(default)s, about 200 "
                        "tokens of English)")
    parser.add_argument("--max-length", type=int, default=512,
                        help="every path cuts every text at this many tokens (ST max_seq_length, Encoder "
                        "max_seq_length, llm2vec max_length and doc_max_length, the stock paths' tokenizer, vLLM "
                        "max_model_len); default 512")
    parser.add_argument("--batch-size", type=int, default=32,
                        help="rows per batch for llm2vec, SentenceTransformer and the stock paths (default 32); "
                        "Encoder uses its own token-budget batching and vLLM its own scheduler")
    parser.add_argument("--threads", type=int, default=2,
                        help="torch threads in every worker; vLLM's OpenMP threads bound to this many CPUs "
                        "(default 2)")
    parser.add_argument("--rounds", type=int, default=3,
                        help="timed rounds; each round times every path on each kind of text, alternating between "
                        "paths (default 3)")
    parser.add_argument("--warmup", type=int, default=1,
                        help="untimed encodes per worker and kind of text after loading (default 1)")
    parser.add_argument("--paths", nargs="+", default=list(ALL_PATHS),
                        help="paths to run (see above; NAME:bf16 for bfloat16), default: all in float32 (a path "
                        "whose venv or checkpoint is missing is skipped with the reason)")
    parser.add_argument("--bf16", nargs="*", default=["st-remote", "encoder"], metavar="PATH",
                        help="also run these paths in bfloat16 where the CPU has native bf16 "
                        "(llama_encoder.dtypes.resolve_compute_dtype('auto', 'cpu')); default: st-remote encoder; "
                        "give none to skip")
    parser.add_argument("--allow-slow-dtype", action="store_true",
                        help="run the bf16 rows even where bf16 is only emulated (about 30x slower)")
    parser.add_argument("--hub-files", choices=("package", "checkpoint"), default="package",
                        help="st-remote runs this package's Hub files (default) or the checkpoint's own")
    parser.add_argument("--profile", action="store_true",
                        help="after the rounds, per kind of text and path: one encode under torch.profiler (CPU time "
                        "by kind of op, the attention kernel that ran, what sdpa was given), and for the stock paths "
                        "and llm2vec one more with module hooks (time by module kind)")
    parser.add_argument("--workdir", type=Path, default=None,
                        help="where the prepared folders, logs, embeddings and profiles go "
                        "(default: a folder beside the checkpoint, kept)")
    parser.add_argument("--reference", type=Path, default=None,
                        help="a folder of embeddings saved by an earlier run (its workdir's embeddings/): print the "
                        "largest cosine distance of each path to its namesake there (did a change move embeddings?)")
    parser.add_argument("--json", type=Path, metavar="FILE",
                        help="also write every figure of both kinds, the profiles and the host here")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--worker-dtype", help=argparse.SUPPRESS)
    parser.add_argument("--worker-dirs", help=argparse.SUPPRESS)
    parser.add_argument("--texts-file", help=argparse.SUPPRESS)
    return parser


def _print_profiles(kind: str, profiles: dict) -> None:
    for label, result in profiles.items():
        print(f"\nprofile {kind} / {label} (one encode, {result['wall_s']:.2f} s wall under the profiler; full table "
              f"{result['table']}):")
        for what, seconds in sorted(result["kinds"].items(), key=lambda item: -item[1]):
            if seconds >= 0.005:
                print(f"  {what:<48}{seconds:>7.2f} s {100 * seconds / result['wall_s']:>5.1f}%")
        print("  top ops (self CPU s): " + ", ".join(f"{op} {seconds:.2f}" for op, seconds in result["top_ops"][:8]))
        kernels = result.get("attention_kernels") or {}
        print("  attention kernel: " + (", ".join(f"{op} x{k['calls']} ({k['self_s']:.2f} s)"
                                                  for op, k in kernels.items()) or "none seen"))
        for what, count in (result.get("sdpa_calls") or {}).items():
            print(f"  sdpa given: {what} (x{count})")
        by_module = result.get("by_module")
        if by_module:
            print(f"  by module (one more encode with forward hooks, {by_module['wall_s']:.2f} s wall; exclusive of "
                  "timed children):")
            for what, seconds in sorted(by_module["modules"].items(), key=lambda item: -item[1]):
                if seconds >= 0.005:
                    print(f"    {what:<54}{seconds:>7.2f} s {100 * seconds / by_module['wall_s']:>5.1f}%")
        elif label.split(":")[0].split("@")[0] not in MODULE_PROFILE_PATHS:
            print("  by module: not timed (forward hooks would switch this path's fast path off)")


def _print_profile_summary(kind: str, profiles: dict) -> None:
    """One line per path: the main kinds of op, the kernel and the mask sdpa saw; and the module split."""
    if not profiles:
        return
    print(f"\nprofile summary, {kind} (seconds of one encode; by kind of op, then by module for the hooked paths):")
    columns = [("matmul", "matmul"), ("attention kernel", "attn"), ("mask construction", "mask"),
               ("copies (GQA repeat, transpose, contiguous)", "copies"), ("dtype casts", "casts"),
               ("elementwise (rotary, RMSNorm, SiLU, residual)", "elemwise"),
               ("outside torch ops (Python, tokenisation)", "outside")]
    print(f"  {'path':<16}{'wall':>7}" + "".join(f"{short:>9}" for _, short in columns) + "  kernel; sdpa given")
    for label, result in profiles.items():
        kernels = result.get("attention_kernels") or {}
        kernel = "/".join(op.removeprefix("aten::_scaled_dot_product_") for op in kernels) or "none seen"
        given = " | ".join(result.get("sdpa_calls") or {}) or "-"
        print(f"  {label:<16}{result['wall_s']:>7.2f}"
              + "".join(f"{result['kinds'].get(name, 0.0):>9.2f}" for name, _ in columns) + f"  {kernel}; {given}")
    hooked = {label: result["by_module"] for label, result in profiles.items() if result.get("by_module")}
    if hooked:
        names = sorted({name for result in hooked.values() for name in result["modules"]},
                       key=lambda name: -max(result["modules"].get(name, 0.0) for result in hooked.values()))
        print(f"  {'by module':<54}" + "".join(f"{label[:14]:>15}" for label in hooked))
        for name in names:
            print(f"  {name:<54}" + "".join(f"{result['modules'].get(name, 0.0):>15.2f}" for result in hooked.values()))
        print(f"  {'wall under hooks':<54}" + "".join(f"{result['wall_s']:>15.2f}" for result in hooked.values()))


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.worker:
        _worker(args)
        return 0
    problems = check_args(args)
    if problems:
        parser.error("; ".join(problems))

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import numpy as np
    import torch
    from host import host_info, host_line
    from transformers import AutoTokenizer

    from llama_encoder.dtypes import resolve_compute_dtype

    torch.set_num_threads(args.threads)
    if args.checkpoint is None:
        from llama_encoder.conversion_scripts.convert import convert
        from llama_encoder.weights.base_model import default_cache_dir

        args.checkpoint = default_cache_dir() / "bench-smollm2-encoder-untrained"
        if not args.checkpoint.exists():
            print(f"converting the embedded SmolLM2 into {args.checkpoint} (once, 1-2 minutes)", flush=True)
            convert(out=args.checkpoint, untrained=True)
    checkpoint = args.checkpoint.resolve()
    config = json.loads((checkpoint / "config.json").read_text())
    if args.max_length > config.get("max_position_embeddings", args.max_length):
        parser.error(f"--max-length {args.max_length} exceeds the model's {config['max_position_embeddings']} "
                     "positions")
    workdir = (args.workdir or checkpoint.parent / f".llm2vec-speed-{checkpoint.name}").resolve()
    for sub in ("logs", "profiles", *(f"embeddings/{kind}" for kind in args.texts)):
        (workdir / sub).mkdir(parents=True, exist_ok=True)
    dirs = prepare_dirs(checkpoint, workdir, args.hub_files)
    if args.native_checkpoint:
        dirs["native"] = prepare_native(args.native_checkpoint.resolve(), workdir, args.max_length)

    texts: dict[str, list[str]] = {}
    sources: dict[str, str] = {}
    for kind in args.texts:
        if kind == "sentences":
            texts[kind], sources[kind] = read_sentences(args.sts_file, args.sentences)
        else:
            texts[kind], sources[kind] = read_documents(args.documents_file, args.documents, args.min_document_chars)
    args.texts_file = workdir / "texts.json"
    args.texts_file.write_text(json.dumps(texts))
    tokenizer = AutoTokenizer.from_pretrained(dirs["llm2vec"])
    stats, lengths = {}, {}
    for kind, kind_texts in texts.items():
        full = [len(ids) for ids in tokenizer(kind_texts, verbose=False)["input_ids"]]
        lengths[kind] = [min(x, args.max_length) for x in full]
        stats[kind] = token_stats(lengths[kind], full, kind_texts, args.batch_size, args.max_length)
    flops = {kind: encoder_flops(config, lengths[kind]) for kind in texts}

    host = host_info()
    bf16_native = resolve_compute_dtype("auto", "cpu") == torch.bfloat16
    runs = []  # (label, name, dtype)
    for label, name, revision, dtype in parse_path_specs(args.paths):
        if revision:
            folder = workdir / f"remote@{revision}"
            folder.mkdir(exist_ok=True)
            for item in Path(dirs["remote"]).iterdir():
                if item.name not in HUB_FILES:
                    _link(item, folder / item.name)
            for hub_file in HUB_FILES:
                text = subprocess.run(["git", "-C", str(REPO), "show", f"{revision}:llama_encoder/{hub_file}"],
                                      capture_output=True, text=True, check=True).stdout
                (folder / hub_file).write_text(text)
            dirs[f"remote@{revision}"] = str(folder)
        runs.append((label, name, dtype))
    if bf16_native or args.allow_slow_dtype:
        runs += [(f"{name}:bf16", name, "bf16") for name in args.bf16 or []
                 if name in [n for _, n, _ in runs] and f"{name}:bf16" not in [label for label, _, _ in runs]]
    vllm_python = args.vllm_python or default_vllm_python()
    skipped: dict[str, str] = {}
    for label, name, _ in runs:
        if name in NATIVE_PATHS and "native" not in dirs:
            skipped[label] = "no --native-checkpoint"
        elif name in LLM2VEC_VENV_PATHS and not Path(args.llm2vec_python).is_file():
            skipped[label] = f"no {args.llm2vec_python} (bash scripts/setup_llm2vec_env.sh)"
        elif name == "vllm" and not (vllm_python and shutil.which(vllm_python)):
            skipped[label] = (f"no vLLM interpreter ({vllm_python or 'none found'}; bash scripts/setup_vllm_env.sh, "
                              "or --vllm-python)")
    runs = [run for run in runs if run[0] not in skipped]

    print(host_line(host))
    print(f"checkpoint {checkpoint}; native {dirs.get('native', '-')}; {args.threads} threads; batch "
          f"{args.batch_size}; texts cut at {args.max_length} tokens; {args.rounds} rounds; loadavg "
          f"{os.getloadavg()}")
    for kind in texts:
        s = stats[kind]
        print(f"{kind}: {sources[kind]}; {s['texts']} texts, {s['tokens']} tokens (mean {s['mean_tokens']:.1f}, "
              f"min {s['min_tokens']}, max {s['max_tokens']}; {s['cut_at_max_length']} cut at {args.max_length}, "
              f"{s['tokens_before_cut']} before the cut; {s['padded_tokens']} padded in {s['batches']} batches of "
              f"{args.batch_size}: +{100 * (s['padded_tokens'] / s['tokens'] - 1):.0f}%)")
    for label, why in skipped.items():
        print(f"skipped: {label} ({why})")
    if not bf16_native and not args.allow_slow_dtype:
        print(f"no bf16 rows: this CPU has no native bf16 ({host['native_bf16_detail']})")

    peaks: dict[str, dict[str, dict[str, float]]] = {kind: {} for kind in texts}
    for dtype in sorted({dtype for _, _, dtype in runs}):
        torch_name = {"fp32": "float32", "bf16": "bfloat16"}[dtype]
        shapes = [(2048, 2048, 2048, 5)]
        for kind in texts:
            rows = max(1, int(stats[kind]["padded_tokens"] / stats[kind]["batches"]))
            work = 2 * rows * config["hidden_size"] * config["intermediate_size"]
            shapes.append((rows, config["hidden_size"], config["intermediate_size"], 20 if work < 5e9 else 5))
        measured = matmul_peaks(sys.executable, torch_name, args.threads, shapes)
        for kind, (rows, hidden, inner, _), mlp in zip(texts, shapes[1:], measured[1:], strict=True):
            peaks[kind][dtype] = {"square": measured[0], "mlp_shape": mlp}
            print(f"matmul peak {dtype}, {args.threads} threads: {measured[0]:.1f} GFLOP/s (2048^3); {mlp:.1f} GFLOP/s "
                  f"({rows}x{hidden} @ {hidden}x{inner}, the MLP at a {kind} batch's tokens)", flush=True)

    workers: dict = {}
    times = {kind: {} for kind in texts}
    tokenize_s = {kind: {} for kind in texts}
    profiles: dict[str, dict] = {kind: {} for kind in texts}
    load_start = os.getloadavg()
    try:
        for label, name, dtype in runs:  # start all, then wait: loading overlaps, timing never does
            if name == "vllm":
                continue
            python = args.llm2vec_python if name in LLM2VEC_VENV_PATHS else sys.executable
            workers[label] = Worker(label, python, name, dtype, dirs, args, workdir / "logs")
        for label, name, dtype in runs:  # vLLM's start-up (tens of seconds) overlaps the others' loading
            if name == "vllm":
                try:
                    workers[label] = VllmWorker(label, dtype, dirs["native"], vllm_python, args.threads, texts)
                except Exception as exc:  # a bad interpreter, too many threads: say so, run the rest
                    skipped[label] = f"vLLM did not start: {type(exc).__name__}: {exc}"
                    print(f"skipped: {label} ({skipped[label]})", flush=True)
        for label, worker in list(workers.items()):
            try:
                worker.info = worker.read()
            except Exception as exc:
                if worker.name != "vllm":
                    raise
                skipped[label] = f"vLLM did not start: {type(exc).__name__}: {str(exc)[:2000]}"
                print(f"skipped: {label} ({skipped[label]})", flush=True)
                worker.close()
                del workers[label]
        for label, worker in workers.items():  # one at a time, so no warm-up competes with another
            warm = {kind: [worker.ask(op="warmup", kind=kind)["seconds"] for _ in range(args.warmup)] for kind in texts}
            extra = ""
            if worker.name == "vllm":
                info = worker.info["vllm"]
                extra = (f", vLLM {info['vllm_version']} {info['architecture']}, dtype {info['dtype']}, "
                         f"max_model_len {info['max_model_len']}, pooling {info['pooling_type']}")
                if info["max_model_len"] != args.max_length:
                    print(f"  WARNING: vLLM cuts at {info['max_model_len']} tokens, not {args.max_length}")
            print(f"  ready: {label:<16} loaded in {worker.info['load_s']:.1f} s, warm-up "
                  + "; ".join(f"{kind} {' '.join(f'{s:.1f}' for s in warm[kind]) or 'none'}" for kind in texts)
                  + f" s ({worker.info['transformers']}, {worker.info['threads']} threads{extra})", flush=True)
        labels = list(workers)
        for kind in texts:
            times[kind] = {label: [] for label in labels}
        for round_index in range(args.rounds):
            order = labels[round_index % len(labels):] + labels[: round_index % len(labels)]
            for kind in texts:
                for label in order:
                    save = workdir / "embeddings" / kind / f"{_file_name(label)}.npy" if round_index == 0 else None
                    result = workers[label].ask(op="run", kind=kind, save=str(save) if save else None)
                    times[kind][label].append(result["seconds"])
                print(f"  round {round_index + 1} {kind}: "
                      + ", ".join(f"{label} {times[kind][label][-1]:.2f}s" for label in labels)
                      + f"; loadavg {os.getloadavg()[0]:.2f}", flush=True)
        for kind in texts:
            tokenize_s[kind] = {label: worker.ask(op="tokenize", kind=kind)["seconds"]
                                for label, worker in workers.items()}
        if args.profile:
            for kind in texts:
                for label, worker in workers.items():
                    result = worker.ask(op="profile", kind=kind,
                                        out=str(workdir / "profiles" / f"{kind}-{_file_name(label)}.txt"))
                    if result is not None:
                        profiles[kind][label] = result
    finally:
        for worker in workers.values():
            worker.close()

    load_end = os.getloadavg()
    # the embeddings the others are checked against: llm2vec's, else the first path that returns embeddings
    reference = "llm2vec" if "llm2vec" in workers else next(
        (label for label in workers if not label.startswith("stock-")), None)
    results = {}
    for kind in texts:
        results[kind] = _table(kind, args, workers, times[kind], tokenize_s[kind], stats[kind], flops[kind],
                               peaks[kind], workdir, reference, np)
        _print_profiles(kind, profiles[kind])
    print(f"\nloadavg at the start {load_start}, at the end {load_end}; texts/s, tok/s, GFLOP/s (useful encoder "
          "FLOPs on the real tokens) from the best round; %peak against the 2048^3 product, %mlp against the "
          "MLP-shaped one; tok s = seconds tokenising alone; vs llm2vec = llm2vec's best seconds / this path's best, "
          "(median) the same with medians, per-round = range of the ratio within each round; cos min = lowest "
          f"cosine to {reference or 'a reference'}'s embedding")
    for kind in texts:
        _print_profile_summary(kind, profiles[kind])
    if args.json:
        args.json.write_text(json.dumps({
            "benchmark": "llm2vec_speed", "checkpoint": str(checkpoint), "native_checkpoint": dirs.get("native"),
            "max_length": args.max_length, "batch_size": args.batch_size, "threads": args.threads,
            "rounds": args.rounds, "cosine_reference": reference,
            "kinds": {kind: {"source": sources[kind], **stats[kind], "matmul_peaks_gflops": peaks[kind],
                             "rows": results[kind], "profiles": profiles[kind]} for kind in texts},
            "skipped": skipped, "loadavg_start": load_start, "loadavg_end": load_end, "host": host,
            "host_line": host_line(host)}, indent=2) + "\n")
        print(f"wrote {args.json}")
    print()
    for kind in texts:
        print(f"{kind} ({stats[kind]['texts']} texts, mean {stats[kind]['mean_tokens']:.1f} tokens, max "
              f"{stats[kind]['max_tokens']}), speed vs llm2vec, best (median):")
        for row in results[kind]:
            print(f"  {row['path']:<18}{_ratio(row['vs_llm2vec_best']):>8} ({_ratio(row['vs_llm2vec_median'])})")
    for label, why in skipped.items():
        print(f"  skipped {label}: {why}")
    print(host_line(host))
    return 0


def _table(kind, args, workers, times, tokenize_s, stats, flops, peaks, workdir, reference, np) -> list[dict]:
    """Print one kind's table; returns its rows."""
    base = times.get("llm2vec")
    embeddings = workdir / "embeddings" / kind
    reference_file = embeddings / f"{_file_name(reference)}.npy" if reference else None
    count, tokens = stats["texts"], stats["tokens"]
    print(f"\n{kind}: {count} texts, {tokens} tokens (mean {stats['mean_tokens']:.1f}, max {stats['max_tokens']}; "
          f"{stats['padded_tokens']} padded in batches of {args.batch_size})")
    print(f"{'path':<16}{'engine':>13}{'median s':>9}{'best s':>8}{'text/s':>8}{'tok/s':>7}{'GFLOP/s':>8}"
          f"{'%peak':>7}{'%mlp':>6}{'tok s':>6}{'vs llm2vec':>11}{'(median)':>9}{'per-round':>12}{'cos min':>10}")
    rows = []
    best_base = min(base) if base else None
    for label, worker in workers.items():
        seconds, best = statistics.median(times[label]), min(times[label])
        dtype = worker.dtype
        gflops = flops / best / 1e9
        ratio = best_base / best if base else None
        ratio_median = statistics.median(base) / seconds if base else None
        per_round = [b / t for b, t in zip(base, times[label], strict=True)] if base else []
        emb_file = embeddings / f"{_file_name(label)}.npy"
        cos_min = cos_mean = None
        if emb_file.is_file() and reference_file is not None and reference_file.is_file():
            cos_min, cos_mean = _cosines(np.load(emb_file), np.load(reference_file))
        row = {"path": label, "kind": kind, "dtype": dtype, "engine": worker.info["transformers"],
               "transformers": worker.info["transformers"], "seconds": times[label],
               "median_seconds": seconds, "best_seconds": best, "texts_per_second": count / best,
               "sentences_per_second": count / best, "tokens_per_second": tokens / best, "gflops": gflops,
               "percent_of_peak": 100 * gflops / peaks[dtype]["square"],
               "percent_of_mlp_shape_peak": 100 * gflops / peaks[dtype]["mlp_shape"],
               "tokenize_seconds": tokenize_s[label], "vs_llm2vec_best": ratio, "vs_llm2vec_median": ratio_median,
               "per_round_vs_llm2vec": per_round, "cosine_reference": reference, "cosine_min": cos_min,
               "cosine_mean": cos_mean,
               "cosine_to_llm2vec_min": cos_min if reference == "llm2vec" else None,
               "cosine_to_llm2vec_mean": cos_mean if reference == "llm2vec" else None}
        if worker.name == "vllm":
            row["vllm"] = worker.info["vllm"]
        if args.reference:
            earlier = args.reference / kind / emb_file.name
            if not earlier.is_file() and kind == "sentences":
                earlier = args.reference / emb_file.name  # a run before the kinds: sentences only, at the top
            if emb_file.is_file() and earlier.is_file():
                row["max_cosine_distance_to_reference"] = 1 - _cosines(np.load(emb_file), np.load(earlier))[0]
        rows.append(row)
        span = f"{min(per_round):.2f}-{max(per_round):.2f}x" if per_round else "-"
        tok_s = f"{tokenize_s[label]:.2f}" if tokenize_s[label] is not None else "-"
        print(f"{label:<16}{worker.info['transformers']:>13}{seconds:>9.2f}{best:>8.2f}{count / best:>8.1f}"
              f"{tokens / best:>7.0f}{gflops:>8.1f}{row['percent_of_peak']:>6.1f}%"
              f"{row['percent_of_mlp_shape_peak']:>5.0f}%{tok_s:>6}"
              f"{_ratio(ratio):>11}{_ratio(ratio_median):>9}{span:>12}"
              f"{(f'{cos_min:.6f}' if cos_min is not None else '-'):>10}")
    by_label = {row["path"]: row for row in rows}
    for label in by_label:
        if label.endswith(":bf16") and label.removesuffix(":bf16") in by_label:
            fp32 = by_label[label.removesuffix(":bf16")]
            print(f"{label} / {label.removesuffix(':bf16')} (fp32) speed: "
                  f"{fp32['best_seconds'] / by_label[label]['best_seconds']:.2f}x best, "
                  f"{fp32['median_seconds'] / by_label[label]['median_seconds']:.2f}x median")
    for label in by_label:  # st-remote@REV beside st-remote: did the change move any embedding?
        name, _, rest = label.partition("@")
        if rest:
            revision, _, dtype = rest.partition(":")
            current = name + (f":{dtype}" if dtype else "")
            files = [embeddings / f"{_file_name(x)}.npy" for x in (label, current)]
            if current in by_label and all(f.is_file() for f in files):
                distance = 1 - _cosines(np.load(files[0]), np.load(files[1]))[0]
                by_label[current][f"max_cosine_distance_to_{revision}"] = distance
                print(f"{current} vs {label}: largest cosine distance {distance:.2e} over the {count} {kind}; "
                      f"speed {by_label[label]['best_seconds'] / by_label[current]['best_seconds']:.2f}x best, "
                      f"{by_label[label]['median_seconds'] / by_label[current]['median_seconds']:.2f}x median")
    for row in rows:
        if "max_cosine_distance_to_reference" in row:
            print(f"{row['path']}: max cosine distance to {args.reference}: "
                  f"{row['max_cosine_distance_to_reference']:.2e}")
    return rows


if __name__ == "__main__":
    sys.exit(main())
