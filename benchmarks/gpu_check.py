"""GPU checks for the Hub files: bidirectionality and padding invariance on CUDA for every attention backend in
fp32 and bf16, then encoder vs stock LlamaModel throughput (SmolLM2-135M shape, random weights), both measured in
this run. Exits non-zero if a correctness check fails.

    PYTHONPATH=. python benchmarks/gpu_check.py              # on a CUDA machine
    PYTHONPATH=. python benchmarks/gpu_check.py --device cpu --quick   # dry run of the script itself
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
import time

import torch
from encoder_forward import SMOLLM2_SHAPE  # benchmarks/ is on sys.path when this script runs
from host import host_info, host_line
from transformers import LlamaConfig, LlamaModel

from llama_encoder import LlamaEncoderConfig, LlamaEncoderModel
from llama_encoder.dtypes import resolve_compute_dtype

TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, pad_token_id=0)
FAILURES: list[str] = []


def check(name: str, ok: bool, detail: str = "") -> None:
    print(f"  [{'ok' if ok else 'FAIL'}] {name} {detail}")
    if not ok:
        FAILURES.append(name)


def backends() -> list[str]:
    names = ["eager", "sdpa", "flex_attention"]
    if importlib.util.find_spec("flash_attn") is not None:
        names.append("flash_attention_2")
    return names


def correctness(device: str, dtype: torch.dtype, attn: str) -> None:
    torch.manual_seed(0)
    config = LlamaEncoderConfig(**TINY, pooling_mode="latent_attention", latent_attention_num_latents=32,
                                attn_implementation=attn)
    model = LlamaEncoderModel(config).to(device=device, dtype=dtype).eval()
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    ids = torch.randint(3, 128, (3, 12), device=device)
    right = torch.ones(3, 12, dtype=torch.long, device=device)
    right[1, 8:], right[2, 3:] = 0, 0
    left = torch.zeros_like(right)
    left_ids = torch.zeros_like(ids)
    for row in range(3):
        n = int(right[row].sum())
        left[row, 12 - n :] = 1
        left_ids[row, 12 - n :] = ids[row, :n]
    changed = ids.clone()
    for row in range(3):
        last = int(right[row].sum()) - 1
        changed[row, last] = (ids[row, last] + 1 - 3) % 125 + 3
    with torch.inference_mode():
        out_r = model(input_ids=ids, attention_mask=right)
        out_c = model(input_ids=changed, attention_mask=right)
        out_l = model(input_ids=left_ids, attention_mask=left)
        first_delta = min((out_r.last_hidden_state[r, 0] - out_c.last_hidden_state[r, 0]).abs().max().item()
                          for r in range(3))
        check(f"{attn}/{dtype}: last token moves first token", first_delta > 1e-3, f"(min delta {first_delta:.3g})")
        diff = (out_r.pooler_output - out_l.pooler_output).abs().max().item()
        check(f"{attn}/{dtype}: left == right padding", diff < tol, f"(max diff {diff:.2e})")
        alone = max((model(input_ids=ids[r : r + 1, : int(right[r].sum())]).pooler_output[0]
                     - out_r.pooler_output[r]).abs().max().item() for r in range(3))
        check(f"{attn}/{dtype}: padded batch == alone", alone < tol, f"(max diff {alone:.2e})")
        unpadded = model(input_ids=ids)
        check(f"{attn}/{dtype}: finite, batch size 3 unpadded", bool(torch.isfinite(unpadded.pooler_output).all()))


def throughput(device: str, dtype: torch.dtype, attn: str, batch: int, seq_len: int, repeats: int) -> None:
    torch._dynamo.reset()  # the correctness runs compiled flex attention for many shapes; start from static shapes
    torch.manual_seed(0)
    llama = LlamaConfig(**SMOLLM2_SHAPE, attn_implementation=attn)
    stock = LlamaModel(llama).to(device=device, dtype=dtype).eval()
    encoder_config = LlamaEncoderConfig(**{**llama.to_dict(), "pooling_mode": "mean"})
    encoder_config._attn_implementation = attn
    encoder = LlamaEncoderModel(encoder_config).to(device=device, dtype=dtype).eval()
    encoder.load_state_dict(stock.state_dict())
    ids = torch.randint(3, llama.vocab_size, (batch, seq_len), device=device)
    for padded in (False, True):
        mask = torch.ones(batch, seq_len, dtype=torch.long, device=device)
        if padded:
            for row in range(batch):
                mask[row, seq_len // 2 + (row * seq_len) // (2 * batch) :] = 0
        tokens = int(mask.sum())

        def run(model, mask=mask):
            if device == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            with torch.inference_mode():
                model(input_ids=ids, attention_mask=mask)
            if device == "cuda":
                torch.cuda.synchronize()
            return time.perf_counter() - start

        run(stock), run(encoder), run(stock), run(encoder)
        stock_t, enc_t = [], []
        for _ in range(repeats):
            stock_t.append(run(stock))
            enc_t.append(run(encoder))
        s, e = statistics.median(stock_t), statistics.median(enc_t)
        print(f"  {attn:<15} {str(dtype):<15} {'padded' if padded else 'unpadded':<9} stock {tokens / s:>11.0f} tok/s  "
              f"encoder {tokens / e:>11.0f} tok/s  encoder/stock time {e / s:.3f}x")


def encode_api(device: str, quick: bool) -> None:
    """The encode API on the device: fp32 and bf16 throughput against a stock LlamaModel over the same tokens
    grouped by exact length (no padding), and device fp32 embeddings against CPU fp32 ones."""
    import random

    from llama_encoder.encoding import Encoder
    from llama_encoder.modeling_llama_encoder import tokenize_for_encoder
    from tests.tiny import tiny_bpe_tokenizer

    words = "the cat sat on a mat while dogs ran through parks and plants made sugar from light".split()
    rng = random.Random(0)
    count, longest = (48, 40) if quick else (4096, 300)
    texts = [" ".join(rng.choice(words) for _ in range(rng.randint(4, longest))) for _ in range(count)]
    tokenizer = tiny_bpe_tokenizer(texts[:200])
    tokenizer.pad_token = "<|pad|>"
    torch.manual_seed(0)
    config = LlamaEncoderConfig(**{**SMOLLM2_SHAPE, "pad_token_id": 0}, attn_implementation="sdpa")
    cpu_model = LlamaEncoderModel(config).eval()
    rows = tokenize_for_encoder(tokenizer, texts, padding=False, return_tensors=None)["input_ids"]
    tokens = sum(len(r) for r in rows)
    reference = Encoder(cpu_model, tokenizer).encode(texts[:16], show_progress=False)
    results = {}
    for dtype in (torch.float32, torch.bfloat16):
        model = LlamaEncoderModel(config).to(device=device, dtype=dtype).eval()
        model.load_state_dict(cpu_model.state_dict())
        encoder = Encoder(model, tokenizer)
        if dtype == torch.float32:
            diff = float(abs(encoder.encode(texts[:16], show_progress=False) - reference).max())
            check(f"encode on {device} fp32 == cpu fp32", diff < 1e-4, f"(max diff {diff:.2e})")
        stock = LlamaModel(LlamaConfig(**SMOLLM2_SHAPE, attn_implementation="sdpa")).to(device=device, dtype=dtype)
        stock.load_state_dict(cpu_model.state_dict())
        stock.eval()
        by_length: dict[int, list[list[int]]] = {}
        for row in rows:
            by_length.setdefault(len(row), []).append(row)

        def floor(stock=stock, by_length=by_length):
            with torch.inference_mode():
                for length, group in by_length.items():
                    step = max(1, 16384 // length)
                    for i in range(0, len(group), step):
                        stock(input_ids=torch.tensor(group[i : i + step], device=device))

        def ours(encoder=encoder):
            encoder.encode(texts, batch_tokens=16384, show_progress=False)

        for name, run in (("floor", floor), ("encode", ours)):
            run()
            if device == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            run()
            if device == "cuda":
                torch.cuda.synchronize()
            results[(name, dtype)] = tokens / (time.perf_counter() - start)
        f, e = results[("floor", dtype)], results[("encode", dtype)]
        print(f"  {str(dtype):<15} floor {f:>10.0f} tok/s  encode {e:>10.0f} tok/s  encode/floor {e / f:.3f}x")
    print(f"  bf16 / fp32 encode: {results[('encode', torch.bfloat16)] / results[('encode', torch.float32)]:.2f}x "
          f"({len(texts)} texts, {tokens} tokens)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu")
    parser.add_argument("--quick", action="store_true", help="small throughput batch, for a dry run")
    parser.add_argument("--encode-only", action="store_true", help="run only the encode API section")
    args = parser.parse_args()
    import transformers

    name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    print(f"device {name}; torch {torch.__version__}; transformers {transformers.__version__}; backends {backends()}")
    print(host_line(host_info(args.device)))
    dtypes = [torch.float32, torch.bfloat16]
    print("correctness:")
    for attn in [] if args.encode_only else backends():
        for dtype in dtypes:
            if attn == "flash_attention_2" and dtype == torch.float32:
                continue
            try:
                correctness(args.device, dtype, attn)
            except Exception as exc:  # report every backend, not only the first failure
                check(f"{attn}/{dtype}: ran", False, f"({type(exc).__name__}: {str(exc)[:200]})")
    print("throughput (SmolLM2-135M shape, random weights):")
    batch, seq_len, repeats = (4, 64, 2) if args.quick else (64, 512, 10)
    attns = ["sdpa", "flex_attention"] + (["flash_attention_2"] if "flash_attention_2" in backends() else [])
    for attn in [] if args.encode_only else attns:
        for dtype in [resolve_compute_dtype("auto", args.device)]:  # bf16 on CUDA with bf16, float32 elsewhere
            try:
                throughput(args.device, dtype, attn, batch, seq_len, repeats)
            except Exception as exc:
                print(f"  {attn}: throughput run failed: {type(exc).__name__}: {str(exc)[:200]}")
    print("encode API (random SmolLM2-shape weights, texts of 4 to 300 words):")
    try:
        encode_api(args.device, args.quick)
    except Exception as exc:
        check("encode API ran", False, f"({type(exc).__name__}: {str(exc)[:300]})")
    print(f"{len(FAILURES)} failed checks" + (f": {FAILURES}" if FAILURES else ""))
    return 1 if FAILURES else 0


if __name__ == "__main__":
    sys.exit(main())
