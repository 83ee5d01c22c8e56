"""Encoding throughput on SmolLM2: the model's own arithmetic vs our encode vs SentenceTransformer.

For each dtype (fp32, bf16) and thread count (1, 2), three ways to embed the same texts, each in its own process
(so peak RSS and thread settings are its own), timed after the model is loaded:
  (a) floor: a stock transformers LlamaModel forward over the same tokens with no padding at all (rows grouped by
      exact length), i.e. the model's arithmetic and nothing else;
  (b) encode: llama_encoder's Encoder.encode (tokenise once, length-sorted token-budget batches, pooling);
  (c) st: SentenceTransformer(checkpoint, trust_remote_code=True).encode;
  (d) st-native: SentenceTransformer(checkpoint).encode, no remote code (stock modules on a stock bidirectional
      LlamaModel; native checkpoints whose prompts allow it, e.g. the default one);
  (e) vllm: vLLM's LLM.embed in its own interpreter (llama_encoder.engines.vllm; --vllm-python or
      $LLAMA_ENCODER_VLLM_PYTHON, built by scripts/setup_vllm_env.sh), eager, bound to the same number of CPUs; the
      row is skipped when no vLLM interpreter is found. Its start-up is not timed, like the others' model loading.
Inputs: STS Benchmark dev sentences, and a long-document set (16 to 1024 tokens) made by joining them. Also: STS
dev Spearman of fp32 vs bf16, achieved GFLOP/s (2 x non-embedding parameters x tokens + attention) against a
matmul peak measured in the same run. Targets: (b) >= 0.95x (a) in fp32; bf16 >= 1.5x fp32 with STS dev Spearman
within 0.3 points.

    python benchmarks/throughput.py --sts-dir ../shared/data/stsbenchmark          # ~15 minutes on 2 cores
    python benchmarks/throughput.py --sts-dir ... --sentences 300 --threads 2     # a quicker look

The host line (CPU, ISA flags, torch's kernels, native bf16, ISA caps, versions) is printed before the table and
stored with --json. On a CPU without native bf16 the bf16 rows are skipped (torch would emulate bf16, about 30x
slower) unless --allow-slow-dtype asks to measure exactly that.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

DOC_LENGTHS = (16, 32, 64, 128, 256, 512, 1024)


def _texts(args) -> dict[str, list[str]]:
    from transformers import AutoTokenizer

    from llama_encoder.readers import read_sts

    pairs = read_sts(Path(args.sts_dir) / "sts-dev.csv")
    sentences = list(dict.fromkeys(s for a, b, _ in pairs for s in (a, b)))
    tokenizer = AutoTokenizer.from_pretrained(args.checkpoint, trust_remote_code=True)
    docs, pool = [], iter(sentences * 50)
    for length in DOC_LENGTHS:  # join sentences until each document reaches its token length
        for _ in range(args.docs_per_length):
            text = ""
            while len(tokenizer(text)["input_ids"]) < length:
                text = f"{text} {next(pool)}".strip()
            ids = tokenizer(text)["input_ids"][:length]
            docs.append(tokenizer.decode(ids, skip_special_tokens=True))
    return {"sentences": sentences[: args.sentences], "documents": docs}


def _worker(args) -> None:
    """One measurement in this process: prints a JSON line."""
    import torch

    torch.set_num_threads(args.worker_threads)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.worker_dtype]
    texts = json.loads(Path(args.texts_file).read_text())[args.worker_set]
    from llama_encoder.encoding.encode import Encoder

    encoder = Encoder.from_pretrained(args.checkpoint, device="cpu", dtype=str(dtype).removeprefix("torch."),
                                      allow_slow_dtype=args.allow_slow_dtype)
    from llama_encoder.modeling_llama_encoder import tokenize_for_encoder

    rows = tokenize_for_encoder(encoder.tokenizer, texts, padding=False, return_tensors=None)["input_ids"]
    tokens = sum(len(r) for r in rows)
    method = args.worker_method
    if method == "floor":
        from transformers import LlamaConfig, LlamaModel

        llama = LlamaConfig(**{k: v for k, v in encoder.model.config.to_dict().items()
                               if k not in ("model_type", "auto_map", "architectures", "is_causal")})
        llama._attn_implementation = "sdpa"
        stock = LlamaModel(llama).to(dtype).eval()
        stock.load_state_dict(encoder.model.state_dict(), strict=False)
        del encoder
        by_length: dict[int, list[list[int]]] = {}
        for row in rows:
            by_length.setdefault(len(row), []).append(row)
        batches = []
        for length, group in sorted(by_length.items(), reverse=True):
            per_batch = max(1, args.batch_tokens // length)
            batches += [torch.tensor(group[i : i + per_batch]) for i in range(0, len(group), per_batch)]

        def run():
            with torch.inference_mode():
                for ids in batches:
                    stock(input_ids=ids)
    elif method == "encode":
        def run():
            encoder.encode(texts, batch_tokens=args.batch_tokens, show_progress=False)
    elif method == "vllm":
        from llama_encoder.engines.vllm import VllmEmbedder

        del encoder
        embedder = VllmEmbedder(args.checkpoint, python=args.vllm_python,
                                dtype={"fp32": "float32", "bf16": "bfloat16"}[args.worker_dtype],
                                threads=args.worker_threads)
        embedder.start()

        def run():
            embedder.embed(texts)
    else:
        from sentence_transformers import SentenceTransformer

        del encoder
        st = SentenceTransformer(args.checkpoint, trust_remote_code=method == "st", device="cpu",
                                 model_kwargs={"dtype": dtype})

        def run():
            st.encode(texts, batch_size=args.st_batch_size, show_progress_bar=False)

    run() if args.warmup else None
    start = time.perf_counter()
    run()
    seconds = time.perf_counter() - start
    if method == "vllm":
        embedder.close()
    print(json.dumps({"tokens": tokens, "texts": len(texts), "seconds": seconds, "row_lengths": [len(r) for r in rows],
                      "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def _measure(args, texts_file: Path, method: str, dtype: str, threads: int, text_set: str) -> dict:
    command = [sys.executable, __file__, "--checkpoint", args.checkpoint, "--batch-tokens", str(args.batch_tokens),
               "--worker-method", method, "--worker-dtype", dtype, "--worker-threads", str(threads),
               "--worker-set", text_set, "--texts-file", str(texts_file), "--st-batch-size", str(args.st_batch_size)]
    if args.warmup:
        command.append("--warmup")
    if args.allow_slow_dtype:
        command.append("--allow-slow-dtype")
    if args.vllm_python:
        command += ["--vllm-python", args.vllm_python]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false"}
    result = subprocess.run(command, capture_output=True, text=True, env=env, stdin=subprocess.DEVNULL)
    if result.returncode != 0:
        raise RuntimeError(f"{method}/{dtype}/{threads}t failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def _matmul_peak(dtype_name: str, threads: int, size: int = 2048, repeats: int = 5) -> float:
    code = (
        f"import torch, time; torch.set_num_threads({threads}); d = getattr(torch, '{dtype_name}');"
        f"a = torch.randn({size}, {size}).to(d); b = torch.randn({size}, {size}).to(d); torch.mm(a, b);"
        f"s = time.perf_counter()\nfor _ in range({repeats}): torch.mm(a, b)\n"
        f"print(2 * {size}**3 * {repeats} / (time.perf_counter() - s) / 1e9)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(out.stdout.strip())


def _model_flops(config: dict, row_lengths: list[int]) -> float:
    hidden, layers = config["hidden_size"], config["num_hidden_layers"]
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    head_dim = config.get("head_dim") or hidden // heads
    per_layer = hidden * head_dim * (2 * heads + 2 * kv_heads) + 3 * hidden * config["intermediate_size"]
    dense = 2 * layers * per_layer * sum(row_lengths)
    attention = 4 * layers * heads * head_dim * sum(length * length for length in row_lengths)
    return dense + attention


def _spearman(args, dtype: str) -> float:
    code = (
        "import json, torch; torch.set_num_threads({t})\n"
        "from llama_encoder.encoding.encode import Encoder\n"
        "from llama_encoder.encoding.evaluate import evaluate_sts\n"
        "from llama_encoder.readers import read_sts\n"
        "e = Encoder.from_pretrained({c!r}, device='cpu', dtype={d!r}, allow_slow_dtype={a!r})\n"
        "print(json.dumps(evaluate_sts(e, read_sts({p!r}))))"
    ).format(t=max(args.threads), c=args.checkpoint, d={"fp32": "float32", "bf16": "bfloat16"}[dtype],
             a=args.allow_slow_dtype, p=str(Path(args.sts_dir) / "sts-dev.csv"))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, stdin=subprocess.DEVNULL)
    if out.returncode != 0:
        raise RuntimeError(out.stderr[-3000:])
    return json.loads(out.stdout.strip().splitlines()[-1])["spearman"] * 100


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default=None,
                        help="a converted encoder checkpoint (default: convert the embedded SmolLM2 into the cache)")
    parser.add_argument("--sts-dir", default=str(Path(__file__).resolve().parents[2] / "shared/data/stsbenchmark"),
                        help="folder holding sts-dev.csv (STS Benchmark)")
    parser.add_argument("--sentences", type=int, default=1000, help="how many STS dev sentences to time")
    parser.add_argument("--docs-per-length", type=int, default=4,
                        help=f"long documents per length in {DOC_LENGTHS} tokens")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="torch thread counts to measure")
    parser.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"],
                        help="weight dtypes to measure")
    methods = ["floor", "encode", "st", "st-native", "vllm"]
    parser.add_argument("--methods", nargs="+", default=methods, choices=methods,
                        help="what to time (see above; st-native needs a native checkpoint with stock modules, vllm "
                        "an interpreter with vLLM)")
    parser.add_argument("--vllm-python", metavar="PATH",
                        help="interpreter with vLLM for the vllm rows (default: $LLAMA_ENCODER_VLLM_PYTHON)")
    parser.add_argument("--batch-tokens", type=int, default=8192, help="token budget per batch for floor and encode")
    parser.add_argument("--st-batch-size", type=int, default=32, help="SentenceTransformer.encode batch_size")
    parser.add_argument("--warmup", action=argparse.BooleanOptionalAction, default=True,
                        help="run each measurement once untimed first (default: yes)")
    parser.add_argument("--no-spearman", action="store_true", help="skip the fp32 vs bf16 STS dev Spearman check")
    parser.add_argument("--allow-slow-dtype", action="store_true",
                        help="measure bf16 even on a CPU without native bf16 (emulated, about 30x slower)")
    parser.add_argument("--json", type=Path, metavar="FILE", help="also write every figure and the host here")
    for hidden in ("--worker-method", "--worker-dtype", "--worker-set", "--texts-file"):
        parser.add_argument(hidden, help=argparse.SUPPRESS)
    parser.add_argument("--worker-threads", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker_method:
        _worker(args)
        return 0

    if args.checkpoint is None:
        from llama_encoder.conversion_scripts.convert import convert
        from llama_encoder.weights.base_model import default_cache_dir

        path = default_cache_dir() / "bench-smollm2-encoder"
        if not path.exists():
            convert(out=path)
        args.checkpoint = str(path)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from host import host_info, host_line

    host = host_info()
    print(host_line(host))
    if "bf16" in args.dtypes and not host["native_bf16"] and not args.allow_slow_dtype:
        print(f"skipping bf16: no native bf16 on this CPU ({host['native_bf16_detail']}); pass --allow-slow-dtype to "
              "measure the emulated bf16 anyway")
        args.dtypes = [dtype for dtype in args.dtypes if dtype != "bf16"]
    config = json.loads((Path(args.checkpoint) / "config.json").read_text())
    modules = json.loads((Path(args.checkpoint) / "modules.json").read_text())
    if "st-native" in args.methods and not any(m["type"] == "sentence_transformers.models.Pooling" for m in modules):
        print("skipping st-native: the checkpoint keeps its own Sentence Transformers module (see its model card)")
        args.methods.remove("st-native")
    if "vllm" in args.methods:
        from llama_encoder.engines.vllm import find_vllm_python

        args.vllm_python = find_vllm_python(args.vllm_python)
        if args.vllm_python is None or config.get("model_type") != "llama":
            print("skipping vllm: " + ("no interpreter with vLLM (bash scripts/setup_vllm_env.sh; --vllm-python)"
                                       if args.vllm_python is None else "not a native checkpoint"))
            args.methods.remove("vllm")
    texts_file = Path(args.checkpoint).parent / f".throughput-texts-{os.getpid()}.json"
    texts_file.write_text(json.dumps(_texts(args)))
    try:
        print(f"checkpoint {args.checkpoint}; {os.cpu_count()} CPUs; batch tokens {args.batch_tokens}")
        print(f"{'set':<10}{'dtype':<6}{'thr':>4} {'method':<10}{'tokens/s':>10}{'texts/s':>9}{'vs floor':>9}"
              f"{'GFLOP/s':>9}{'% peak':>8}{'RSS MiB':>9}")
        summary, records, spearman = {}, [], {}
        for threads in args.threads:
            for dtype in args.dtypes:
                peak = _matmul_peak({"fp32": "float32", "bf16": "bfloat16"}[dtype], threads)
                for text_set in ("sentences", "documents"):
                    floor = None
                    for method in args.methods:
                        m = _measure(args, texts_file, method, dtype, threads, text_set)
                        gflops = _model_flops(config, m["row_lengths"]) / m["seconds"] / 1e9
                        tps = m["tokens"] / m["seconds"]
                        floor = tps if method == "floor" else floor
                        ratio = f"{tps / floor:.3f}x" if floor else "-"
                        summary[(text_set, dtype, threads, method)] = tps
                        records.append({"set": text_set, "dtype": dtype, "threads": threads, "method": method,
                                        "tokens_per_second": tps, "vs_floor": tps / floor if floor else None,
                                        "gflops": gflops, "matmul_peak_gflops": peak,
                                        **{key: value for key, value in m.items() if key != "row_lengths"}})
                        print(f"{text_set:<10}{dtype:<6}{threads:>4} {method:<10}{tps:>10.0f}"
                              f"{m['texts'] / m['seconds']:>9.1f}{ratio:>9}{gflops:>9.1f}{100 * gflops / peak:>7.1f}%"
                              f"{m['peak_rss_mib']:>9.0f}", flush=True)
                print(f"  matmul peak {dtype} {threads} thread(s): {peak:.1f} GFLOP/s")
        for text_set in ("sentences", "documents"):
            for threads in args.threads:
                fp32 = summary.get((text_set, "fp32", threads, "encode"))
                bf16 = summary.get((text_set, "bf16", threads, "encode"))
                if fp32 and bf16:
                    print(f"bf16 / fp32 encode speed, {text_set}, {threads} thread(s): {bf16 / fp32:.2f}x")
                for dtype in args.dtypes:
                    remote = summary.get((text_set, dtype, threads, "st"))
                    for method in ("st-native", "vllm"):
                        other = summary.get((text_set, dtype, threads, method))
                        if remote and other:
                            print(f"{method} / st (remote code) speed, {text_set}, {dtype}, {threads} thread(s): "
                                  f"{other / remote:.2f}x")
        if not args.no_spearman and set(args.dtypes) == {"fp32", "bf16"}:
            fp32, bf16 = _spearman(args, "fp32"), _spearman(args, "bf16")
            spearman = {"fp32": fp32, "bf16": bf16}
            print(f"STS dev Spearman x100: fp32 {fp32:.2f}, bf16 {bf16:.2f}, difference {bf16 - fp32:+.2f}")
        if args.json:
            args.json.write_text(json.dumps({"benchmark": "throughput", "checkpoint": args.checkpoint,
                                             "batch_tokens": args.batch_tokens, "rows": records,
                                             "sts_dev_spearman": spearman, "host": host}, indent=2) + "\n")
            print(f"wrote {args.json}")
    finally:
        texts_file.unlink(missing_ok=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
