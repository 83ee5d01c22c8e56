"""Encoding speed against llm2vec 0.2.3 on the same SmolLM2 weights, the same sentences, the same threads.

Every path runs in a process of its own (llm2vec and stock transformers 4.44.2 in the llm2vec venv, everything
else in this one), loads its model once, warms up, then waits; the timed rounds alternate between the processes
(the order rotates every round), so each path sees the same machine state and load drift shows in every row.

Paths (--paths; `:bf16` after a name runs it in bfloat16):
  llm2vec      LLM2Vec.from_pretrained(copy, pooling_mode="mean", sdpa).encode(batch_size=B)   [.venv-llm2vec]
  st-remote    SentenceTransformer(checkpoint, trust_remote_code=True).encode(batch_size=B): our Hub files
  st-native    SentenceTransformer(native checkpoint).encode(batch_size=B): stock Transformer/Pooling/Normalize
               modules (needs --native-checkpoint; skipped without it)
  encoder      llama_encoder.Encoder.from_pretrained(checkpoint).encode(texts): its own length-sorted batching
  stock-tf5    a stock causal transformers LlamaModel forward (this venv's transformers), over the batches
               llm2vec forms (sorted by characters, B rows, left padded); forward only, no tokenisation or pooling
  stock-tf444  the same on transformers 4.44.2                                                  [.venv-llm2vec]
  st-remote@REV  st-remote with the Hub files of git revision REV (e.g. st-remote@HEAD): before and after a change
               to them, in one run

Each row: median and best seconds over the rounds; from the best round, sentences/s, real tokens/s, achieved
GFLOP/s of the bidirectional encoder's useful work on the real tokens (2 x non-embedding parameters per token +
attention) and its share of a matmul peak measured here (a 2048^3 product, and a product of the model's own MLP
shape at the batch's token count); the seconds spent tokenising alone; the ratio to llm2vec (best over best, median
over median, and the range of the per-round ratios); the lowest cosine of each path's embeddings to llm2vec's.
On a shared host, other processes' bursts slow a 2-thread run many times over for minutes: the best round is the
figure least disturbed by them, the per-round range shows how much they moved it. The MLP-shaped peak is F.linear's
(MKL, what stock transformers runs); our fast path's oneDNN-prepacked products can exceed it. With --profile, one
more encode per path runs under torch.profiler and its CPU time is split by kind of work (matmul, attention kernel,
copies/GQA repeat, elementwise: rotary/norm/SiLU, mask construction, dtype casts, embedding lookup, outside torch
ops: Python and tokenisation).

    bash scripts/setup_llm2vec_env.sh                          # once: .venv-llm2vec (about 2 minutes)
    .venv/bin/python benchmarks/llm2vec_speed.py --checkpoint CKPT --sentences 128 --rounds 1   # a quick look
    .venv/bin/python benchmarks/llm2vec_speed.py --checkpoint CKPT --native-checkpoint NATIVE \\
        --sts-file ../shared/data/stsbenchmark/sts-dev.csv --rounds 3 --profile --json speed.json   # the table

The llm2vec side gets a copy of the checkpoint's weights (symlinked) with a plain Llama config.json (`rope_theta`
at the top level, as transformers 4.44 reads it) and a tokenizer config without a BOS token; our remote-code path
runs the Hub files of this package (copied over the checkpoint's, so the code under test is what is measured;
--hub-files checkpoint keeps the checkpoint's own). Without --sts-file (or when the file is missing) a built-in
list of sentences is used, cycled to --sentences.
"""

from __future__ import annotations

import argparse
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
ALL_PATHS = ("llm2vec", "st-remote", "st-native", "encoder", "stock-tf5", "stock-tf444")

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
    order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
    return [[texts[i] for i in order[start : start + batch_size]] for start in range(0, len(texts), batch_size)]


def _load_path(name: str, dtype_name: str, dirs: dict, texts: list[str], batch_size: int):
    """Load one path; returns (encode() -> embeddings or None, tokenize() -> None, info dict)."""
    import torch

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    if name == "llm2vec":
        from llm2vec import LLM2Vec

        model = LLM2Vec.from_pretrained(dirs["llm2vec"], pooling_mode="mean", attn_implementation="sdpa",
                                        **_dtype_kwargs(torch, dtype))

        def encode():
            return model.encode(texts, batch_size=batch_size, show_progress_bar=False, convert_to_tensor=True)

        def tokenize():
            joined = [model._convert_to_str("", text) for text in texts]  # llm2vec tokenises each text here too
            for batch in _llm2vec_batches(joined, batch_size):
                model.tokenize([model.prepare_for_tokenization(text) for text in batch])

        return encode, tokenize, {}
    if name in ("st-remote", "st-native"):
        from sentence_transformers import SentenceTransformer

        folder = dirs[dirs.get("use", "remote")] if name == "st-remote" else dirs["native"]
        model = SentenceTransformer(folder, trust_remote_code=name == "st-remote", device="cpu",
                                    model_kwargs={"dtype": dtype})

        def encode():
            return model.encode(texts, batch_size=batch_size, show_progress_bar=False, convert_to_tensor=True)

        def tokenize():
            for batch in _llm2vec_batches(texts, batch_size):
                model.preprocess(batch)

        return encode, tokenize, {"modules": [type(module).__name__ for module in model]}
    if name == "encoder":
        from llama_encoder.encoding.encode import Encoder
        from llama_encoder.modeling_llama_encoder import tokenize_for_encoder

        encoder = Encoder.from_pretrained(dirs["checkpoint"], device="cpu", dtype=str(dtype).removeprefix("torch."),
                                          allow_slow_dtype=True)

        def encode():
            return encoder.encode(texts, show_progress=False, convert_to="torch")

        def tokenize():
            tokenize_for_encoder(encoder.tokenizer, texts, padding=False, return_tensors=None)

        return encode, tokenize, {}
    if name in ("stock-tf5", "stock-tf444"):
        from transformers import AutoTokenizer, LlamaModel

        tokenizer = AutoTokenizer.from_pretrained(dirs["llm2vec"])
        tokenizer.pad_token, tokenizer.padding_side = tokenizer.eos_token, "left"
        model = LlamaModel.from_pretrained(dirs["llm2vec"], attn_implementation="sdpa",
                                           **_dtype_kwargs(torch, dtype)).eval()
        batches = [tokenizer(batch, padding=True, return_tensors="pt") for batch in _llm2vec_batches(texts, batch_size)]

        def encode():
            with torch.inference_mode():
                for batch in batches:
                    model(**batch, use_cache=False)

        def tokenize():
            for batch in _llm2vec_batches(texts, batch_size):
                tokenizer(batch, padding=True, return_tensors="pt")

        return encode, tokenize, {}
    raise ValueError(f"unknown path {name!r}")


_CATEGORIES = (  # (kind of work, aten op names whose self CPU time counts for it)
    ("matmul", ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "aten::linear", "aten::baddbmm",
                "mkldnn::_linear_pointwise", "aten::mkldnn_linear")),
    ("attention kernel", ("aten::_scaled_dot_product_flash_attention_for_cpu", "aten::_softmax", "aten::softmax",
                          "aten::_scaled_dot_product_attention_math", "aten::scaled_dot_product_attention",
                          "aten::_safe_softmax")),
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
                           "aten::__or__", "aten::bitwise_or", "aten::min", "aten::max", "aten::amax")),
    ("dtype casts", ("aten::to", "aten::_to_copy", "aten::type_as")),
    ("embedding lookup", ("aten::embedding", "aten::index_select")),
)


def _profile(encode, out_file: Path) -> dict:
    import torch
    from torch.profiler import ProfilerActivity, profile

    start = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        encode()
    wall = time.perf_counter() - start
    averages = prof.key_averages()
    out_file.write_text(averages.table(sort_by="self_cpu_time_total", row_limit=40))
    by_op = {event.key: event.self_cpu_time_total / 1e6 for event in averages}
    kinds, seen = {}, set()
    for kind, ops in _CATEGORIES:
        kinds[kind] = sum(by_op.get(op, 0.0) for op in ops)
        seen.update(ops)
    kinds["other torch ops"] = sum(seconds for op, seconds in by_op.items() if op not in seen)
    in_ops = sum(by_op.values())
    kinds["outside torch ops (Python, tokenisation)"] = max(0.0, wall - in_ops)
    top = sorted(by_op.items(), key=lambda item: -item[1])[:12]
    return {"wall_s": wall, "kinds": kinds, "top_ops": top, "table": str(out_file), "torch": torch.__version__}


def _worker(args) -> None:
    import torch

    torch.set_num_threads(args.threads)
    texts = json.loads(Path(args.texts_file).read_text())
    dirs = json.loads(args.worker_dirs)
    start = time.perf_counter()
    encode, tokenize, info = _load_path(args.worker, args.worker_dtype, dirs, texts, args.batch_size)
    load_s = time.perf_counter() - start
    import transformers

    _reply({"ready": True, "load_s": load_s, "torch": torch.__version__, "transformers": transformers.__version__,
            "threads": torch.get_num_threads(), **info})
    for line in sys.stdin:
        command = json.loads(line)
        op = command["op"]
        if op == "run":
            start = time.perf_counter()
            embeddings = encode()
            seconds = time.perf_counter() - start
            if command.get("save") and embeddings is not None:
                import numpy as np

                np.save(command["save"], embeddings.float().cpu().numpy().astype(np.float32))
            _reply({"seconds": seconds})
        elif op == "warmup":
            start = time.perf_counter()
            encode()
            _reply({"seconds": time.perf_counter() - start})
        elif op == "tokenize":
            start = time.perf_counter()
            tokenize()
            _reply({"seconds": time.perf_counter() - start})
        elif op == "profile":
            _reply(_profile(encode, Path(command["out"])))
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


def _file_name(label: str) -> str:
    return label.replace(":", "-").replace("@", "-at-")


def _link(source: Path, target: Path) -> None:
    if target.is_symlink() or target.exists():
        target.unlink()
    target.symlink_to(source.resolve())


def prepare_dirs(checkpoint: Path, workdir: Path, hub_files: str) -> dict[str, str]:
    """The folders the workers load: the checkpoint (Encoder), a remote-code copy with this package's Hub files
    (st-remote) and a plain Llama copy for llm2vec and the stock paths; weights are symlinked, never copied."""
    remote, plain = workdir / "remote", workdir / "llm2vec"
    for folder in (remote, plain):
        folder.mkdir(parents=True, exist_ok=True)
    for item in checkpoint.iterdir():
        if item.is_file() and (hub_files == "checkpoint" or item.name not in HUB_FILES):
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


class Worker:
    """One path in its own process, driven over stdin/stdout."""

    def __init__(self, label: str, python: str, name: str, dtype: str, dirs: dict, args, log_dir: Path):
        self.label, self.name, self.dtype = label, name, dtype
        revision = label.split(":")[0].partition("@")[2]
        dirs = {**dirs, "use": f"remote@{revision}" if revision else "remote"}
        command = [python, str(Path(__file__).resolve()), "--worker", name, "--worker-dtype", dtype,
                   "--worker-dirs", json.dumps(dirs), "--texts-file", str(args.texts_file),
                   "--threads", str(args.threads), "--batch-size", str(args.batch_size)]
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


def matmul_peak(python: str, dtype: str, threads: int, m: int, k: int, n: int, repeats: int) -> float:
    """GFLOP/s of an (m x k) @ (k x n) product in dtype, best of repeats, in a fresh process."""
    code = (
        f"import torch, time; torch.set_num_threads({threads}); d = getattr(torch, '{dtype}');"
        f"a = torch.randn({m}, {k}).to(d); b = torch.randn({n}, {k}).to(d);"
        f"torch.nn.functional.linear(a, b); best = 1e9\n"
        f"for _ in range({repeats}):\n s = time.perf_counter(); torch.nn.functional.linear(a, b); "
        f"best = min(best, time.perf_counter() - s)\n"
        f"print(2 * {m} * {k} * {n} / best / 1e9)"
    )
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    return float(subprocess.run([python, "-c", code], capture_output=True, text=True, check=True,
                                env=env).stdout.strip())


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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, default=None,
                        help="our remote-code checkpoint (`llama-encoder convert --untrained --out DIR`); default: "
                        "convert the embedded SmolLM2 (untrained) into the llama-encoder cache once")
    parser.add_argument("--native-checkpoint", type=Path, default=None,
                        help="the same weights in the engine-native layout (model_type llama + stock ST modules), "
                        "for the st-native row; without it st-native is skipped")
    parser.add_argument("--llm2vec-python", default=str(REPO / ".venv-llm2vec/bin/python"),
                        help="the python of the llm2vec venv (scripts/setup_llm2vec_env.sh); default: %(default)s")
    parser.add_argument("--sts-file", default=str(REPO.parent / "shared/data/stsbenchmark/sts-dev.csv"),
                        help="STS Benchmark file to take sentences from (tab-separated); missing: a built-in list. "
                        "Default: %(default)s")
    parser.add_argument("--sentences", type=int, default=768, help="how many sentences to embed (default 768)")
    parser.add_argument("--batch-size", type=int, default=32,
                        help="rows per batch for llm2vec, SentenceTransformer and the stock paths (default 32); "
                        "Encoder uses its own token-budget batching")
    parser.add_argument("--threads", type=int, default=2, help="torch threads in every worker (default 2)")
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds, alternating between paths (default 3)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed encodes per worker after loading (default 1)")
    parser.add_argument("--paths", nargs="+", default=list(ALL_PATHS),
                        help="paths to run (see above; NAME:bf16 for bfloat16), default: all in float32")
    parser.add_argument("--bf16", nargs="*", default=["st-remote", "encoder"], metavar="PATH",
                        help="also run these paths in bfloat16 where the CPU has native bf16 "
                        "(llama_encoder.dtypes.resolve_compute_dtype('auto', 'cpu')); default: st-remote encoder; "
                        "give none to skip")
    parser.add_argument("--allow-slow-dtype", action="store_true",
                        help="run the bf16 rows even where bf16 is only emulated (about 30x slower)")
    parser.add_argument("--hub-files", choices=("package", "checkpoint"), default="package",
                        help="st-remote runs this package's Hub files (default) or the checkpoint's own")
    parser.add_argument("--profile", action="store_true",
                        help="after the rounds, one encode per path under torch.profiler: CPU time by kind of work")
    parser.add_argument("--workdir", type=Path, default=None,
                        help="where the prepared folders, logs, embeddings and profiles go "
                        "(default: a folder beside the checkpoint, kept)")
    parser.add_argument("--reference", type=Path, default=None,
                        help="a folder of embeddings saved by an earlier run (its workdir's embeddings/): print the "
                        "largest cosine distance of each path to its namesake there (did a change move embeddings?)")
    parser.add_argument("--json", type=Path, metavar="FILE", help="also write every figure and the host here")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--worker-dtype", help=argparse.SUPPRESS)
    parser.add_argument("--worker-dirs", help=argparse.SUPPRESS)
    parser.add_argument("--texts-file", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        _worker(args)
        return 0

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
    workdir = (args.workdir or checkpoint.parent / f".llm2vec-speed-{checkpoint.name}").resolve()
    for sub in ("embeddings", "logs", "profiles"):
        (workdir / sub).mkdir(parents=True, exist_ok=True)
    dirs = prepare_dirs(checkpoint, workdir, args.hub_files)
    if args.native_checkpoint:
        dirs["native"] = str(args.native_checkpoint.resolve())

    texts, source = read_sentences(args.sts_file, args.sentences)
    args.texts_file = workdir / "texts.json"
    args.texts_file.write_text(json.dumps(texts))
    lengths = [len(ids) for ids in AutoTokenizer.from_pretrained(dirs["llm2vec"])(texts)["input_ids"]]
    padded = sum(len(b) * max(lengths[i] for i in b)
                 for b in [sorted(range(len(texts)), key=lambda i: -len(texts[i]))[s : s + args.batch_size]
                           for s in range(0, len(texts), args.batch_size)])
    config = json.loads((checkpoint / "config.json").read_text())
    flops = encoder_flops(config, lengths)

    host = host_info()
    bf16_native = resolve_compute_dtype("auto", "cpu") == torch.bfloat16
    runs = []  # (label, python, name, dtype)
    for spec in args.paths:
        name, _, dtype = spec.partition(":")
        name, _, revision = name.partition("@")
        if name not in ALL_PATHS or (revision and name != "st-remote"):
            parser.error(f"unknown path {spec!r}; choose from {', '.join(ALL_PATHS)} (st-remote@REV)")
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
        runs.append((spec if dtype else name + (f"@{revision}" if revision else ""), name, dtype or "fp32"))
    if bf16_native or args.allow_slow_dtype:
        runs += [(f"{name}:bf16", name, "bf16") for name in args.bf16 if name in args.paths]
    skipped = []
    if "native" not in dirs:
        skipped += [label for label, name, _ in runs if name == "st-native"]
        runs = [run for run in runs if run[1] != "st-native"]
    if not Path(args.llm2vec_python).is_file():
        skipped += [label for label, name, _ in runs if name in LLM2VEC_VENV_PATHS]
        runs = [run for run in runs if run[1] not in LLM2VEC_VENV_PATHS]

    print(host_line(host))
    print(f"checkpoint {checkpoint}; sentences: {source}; {len(texts)} sentences, {sum(lengths)} tokens "
          f"(mean {sum(lengths) / len(lengths):.1f}, max {max(lengths)}; {padded} padded in batches of "
          f"{args.batch_size}); {args.threads} threads; {args.rounds} rounds; loadavg {os.getloadavg()}")
    if skipped:
        print(f"skipped: {', '.join(skipped)} (no --native-checkpoint, or no {args.llm2vec_python})")
    if not bf16_native and not args.allow_slow_dtype:
        print(f"no bf16 rows: this CPU has no native bf16 ({host['native_bf16_detail']})")

    mean_tokens = padded / -(-len(texts) // args.batch_size)
    peaks = {}
    for dtype in sorted({dtype for _, _, dtype in runs}):
        torch_name = {"fp32": "float32", "bf16": "bfloat16"}[dtype]
        peaks[dtype] = {
            "square": matmul_peak(sys.executable, torch_name, args.threads, 2048, 2048, 2048, 5),
            "mlp_shape": matmul_peak(sys.executable, torch_name, args.threads, int(mean_tokens),
                                     config["hidden_size"], config["intermediate_size"], 20),
        }
        print(f"matmul peak {dtype}, {args.threads} threads: {peaks[dtype]['square']:.1f} GFLOP/s (2048^3); "
              f"{peaks[dtype]['mlp_shape']:.1f} GFLOP/s ({int(mean_tokens)}x{config['hidden_size']} @ "
              f"{config['hidden_size']}x{config['intermediate_size']}, the MLP at a batch's tokens)", flush=True)

    workers: dict[str, Worker] = {}
    try:
        for label, name, dtype in runs:  # start all, then wait: loading overlaps, timing never does
            python = args.llm2vec_python if name in LLM2VEC_VENV_PATHS else sys.executable
            workers[label] = Worker(label, python, name, dtype, dirs, args, workdir / "logs")
        for worker in workers.values():
            worker.info = worker.read()
        for label, worker in workers.items():  # one at a time, so no warm-up competes with another
            warm = [worker.ask(op="warmup")["seconds"] for _ in range(args.warmup)]
            print(f"  ready: {label:<16} loaded in {worker.info['load_s']:.1f} s, warm-up "
                  f"{' '.join(f'{s:.1f}' for s in warm) or 'none'} s (transformers {worker.info['transformers']}, "
                  f"{worker.info['threads']} threads)", flush=True)
        times: dict[str, list[float]] = {label: [] for label in workers}
        labels = list(workers)
        for round_index in range(args.rounds):
            order = labels[round_index % len(labels):] + labels[: round_index % len(labels)]
            for label in order:
                save = workdir / "embeddings" / f"{_file_name(label)}.npy" if round_index == 0 else None
                result = workers[label].ask(op="run", save=str(save) if save else None)
                times[label].append(result["seconds"])
            print(f"  round {round_index + 1}: " + ", ".join(f"{label} {times[label][-1]:.2f}s" for label in labels)
                  + f"; loadavg {os.getloadavg()[0]:.2f}", flush=True)
        tokenize_s = {label: worker.ask(op="tokenize")["seconds"] for label, worker in workers.items()}
        profiles = {}
        if args.profile:
            for label, worker in workers.items():
                profiles[label] = worker.ask(op="profile",
                                             out=str(workdir / "profiles" / f"{_file_name(label)}.txt"))
    finally:
        for worker in workers.values():
            worker.close()

    load_end = os.getloadavg()
    base = times.get("llm2vec")
    reference_embeddings = workdir / "embeddings" / "llm2vec.npy"
    print(f"\n{'path':<16}{'transformers':>13}{'median s':>9}{'best s':>8}{'sent/s':>8}{'tok/s':>7}{'GFLOP/s':>8}"
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
        emb_file = workdir / "embeddings" / f"{_file_name(label)}.npy"
        cos_min = cos_mean = None
        if emb_file.is_file() and reference_embeddings.is_file():
            cos_min, cos_mean = _cosines(np.load(emb_file), np.load(reference_embeddings))
        row = {"path": label, "dtype": dtype, "transformers": worker.info["transformers"], "seconds": times[label],
               "median_seconds": seconds, "best_seconds": best, "sentences_per_second": len(texts) / best,
               "tokens_per_second": sum(lengths) / best, "gflops": gflops,
               "percent_of_peak": 100 * gflops / peaks[dtype]["square"],
               "percent_of_mlp_shape_peak": 100 * gflops / peaks[dtype]["mlp_shape"],
               "tokenize_seconds": tokenize_s[label], "vs_llm2vec_best": ratio, "vs_llm2vec_median": ratio_median,
               "per_round_vs_llm2vec": per_round, "cosine_to_llm2vec_min": cos_min,
               "cosine_to_llm2vec_mean": cos_mean}
        if args.reference and emb_file.is_file() and (args.reference / emb_file.name).is_file():
            row["max_cosine_distance_to_reference"] = 1 - _cosines(np.load(emb_file),
                                                                   np.load(args.reference / emb_file.name))[0]
        rows.append(row)
        span = f"{min(per_round):.2f}-{max(per_round):.2f}x" if per_round else "-"
        print(f"{label:<16}{worker.info['transformers']:>13}{seconds:>9.2f}{best:>8.2f}{len(texts) / best:>8.1f}"
              f"{sum(lengths) / best:>7.0f}{gflops:>8.1f}{row['percent_of_peak']:>6.1f}%"
              f"{row['percent_of_mlp_shape_peak']:>5.0f}%{tokenize_s[label]:>6.2f}"
              f"{(f'{ratio:.2f}x' if ratio else '-'):>11}{(f'{ratio_median:.2f}x' if ratio else '-'):>9}{span:>12}"
              f"{(f'{cos_min:.6f}' if cos_min is not None else '-'):>10}")
    by_label = {row["path"]: row for row in rows}
    print(f"loadavg at the end {load_end}; sent/s, tok/s, GFLOP/s (useful encoder FLOPs on the real tokens) from "
          "the best round; %peak against the 2048^3 product, %mlp against the MLP-shaped one; tok s = seconds "
          "tokenising alone; vs llm2vec = llm2vec's best seconds / this path's best, (median) the same with medians, "
          "per-round = range of the ratio within each round; cos min = lowest cosine to llm2vec's embedding")
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
            files = [workdir / "embeddings" / f"{_file_name(x)}.npy" for x in (label, current)]
            if current in by_label and all(f.is_file() for f in files):
                distance = 1 - _cosines(np.load(files[0]), np.load(files[1]))[0]
                by_label[current][f"max_cosine_distance_to_{revision}"] = distance
                print(f"{current} vs {label}: largest cosine distance {distance:.2e} over the {len(texts)} sentences; "
                      f"speed {by_label[label]['best_seconds'] / by_label[current]['best_seconds']:.2f}x best, "
                      f"{by_label[label]['median_seconds'] / by_label[current]['median_seconds']:.2f}x median")
    if args.reference:
        for row in rows:
            if "max_cosine_distance_to_reference" in row:
                print(f"{row['path']}: max cosine distance to {args.reference}: "
                      f"{row['max_cosine_distance_to_reference']:.2e}")
    for label, result in profiles.items():
        print(f"\nprofile {label} (one encode, {result['wall_s']:.2f} s wall under the profiler; full table "
              f"{result['table']}):")
        for kind, seconds in sorted(result["kinds"].items(), key=lambda item: -item[1]):
            if seconds >= 0.005:
                print(f"  {kind:<48}{seconds:>7.2f} s {100 * seconds / result['wall_s']:>5.1f}%")
        print("  top ops (self CPU s): " + ", ".join(f"{op} {seconds:.2f}" for op, seconds in result["top_ops"][:8]))
    if args.json:
        args.json.write_text(json.dumps({
            "benchmark": "llm2vec_speed", "checkpoint": str(checkpoint), "sentences": len(texts), "source": source,
            "tokens": sum(lengths), "padded_tokens": padded, "batch_size": args.batch_size, "threads": args.threads,
            "rounds": args.rounds, "matmul_peaks_gflops": peaks, "rows": rows, "profiles": profiles,
            "loadavg_end": load_end, "host": host, "host_line": host_line(host)}, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
