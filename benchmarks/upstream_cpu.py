"""The CPU costs of the stock forward that no checkpoint file can switch off, reproduced with torch and transformers.

Stock Sentence Transformers on a native checkpoint runs the stock transformers forward, op for op like llm2vec
(docs/SPEED.md). What our own Hub code does faster, and what else the stock path pays, are upstream matters:

1. **Padded rows reach every product.** transformers' decoder layers run the q/k/v/o projections, the MLP, the norms
   and rotary on `(batch, longest, hidden)`; the padding rows are computed and thrown away. Sentence Transformers can
   drop them only through flash-attention varlen (`unpad_inputs`), which has no CPU build. Measured here: the
   layer's products on the padded rows against the same products on the real rows alone.
2. **float32 `F.linear` on CPU goes to MKL's sgemm.** The same products through oneDNN with the weight reordered
   once (`torch.ops.mkldnn._reorder_linear_weight` + `_linear_pointwise`, what `torch.jit.freeze` and inductor's
   freezing use) run faster at a small encoder's shapes on the hosts we measured. Measured here: both libraries on
   the same rows and weights, with their largest difference.

3. **Packing instead of padding** (what Sentence Transformers does with flash-attention varlen) works with sdpa on
   CPU through a block-diagonal mask: measured here against the padded forward. transformers builds that mask itself
   from restarting position_ids for causal models only: with `is_causal: false`, `create_causal_mask` hands over to
   `create_bidirectional_mask` without the position_ids, so packed texts attend to each other. Checked here.

4. **Repeated key/value heads.** With a mask, transformers' sdpa path copies the key/value heads up to the query
   heads in every layer (`use_gqa_in_sdpa` applies CUDA's rule, no mask, on CPU too), although CPU's sdpa takes
   grouped heads with a mask (`enable_gqa`) with the same arithmetic. Measured here with `TRANSFORMERS_SDPA_FORCE_GQA=1`
   against the default.

The script needs torch and transformers only (random weights of the chosen size, no download), so it can be attached
to an upstream issue as it is. Batch lengths are drawn, not read: sentences (4 + Poisson(3.7) tokens, cut at 17,
about STS Benchmark's 7.7 mean) and documents (two thirds at the 512 cut, the rest 228-511), ordered the way Sentence
Transformers and llm2vec order them (by characters, which follow tokens only roughly: a noisy sort), then batched.

    python benchmarks/upstream_cpu.py                      # SmolLM2-135M's sizes, 2 threads
    python benchmarks/upstream_cpu.py --hidden 2048 --intermediate 8192 --heads 32 --kv-heads 8 --layers 2

Prints the host, per text kind: the stock forward's time (transformers `LlamaModel`, sdpa, bidirectional, padded),
one pass of every layer's products on padded rows / real rows through MKL / oneDNN, what each saving is as a share
of the forward, the packed forward's time, and the two packed-vs-padded checks. Figures depend on the CPU; compare
ratios measured in the same run only.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

logger = logging.getLogger("upstream_cpu")

# Packed and padded rows agree to float32 summation order (~1e-6 of the scale at these sizes); texts that attend to
# each other move their rows by tenths of the scale. Anything under this counts as "kept apart".
SAME = 1e-3
FORCE_GQA = "TRANSFORMERS_SDPA_FORCE_GQA"


def host_line() -> str:
    """The package's host line where benchmarks/host.py is importable, else what torch says."""
    try:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from host import host_line as package_host_line

        return package_host_line()
    except ImportError:
        return (f"{platform.processor() or platform.machine()}, torch {torch.__version__} "
                f"({torch.backends.cpu.get_cpu_capability()}), {torch.get_num_threads()} threads")


def sentence_lengths(count: int, generator: torch.Generator) -> list[int]:
    """Short texts: 4 + Poisson(3.7) tokens, at most 17."""
    draws = torch.poisson(torch.full((count,), 3.7), generator=generator)
    return [min(17, 4 + int(value)) for value in draws]


def document_lengths(count: int, generator: torch.Generator, max_length: int) -> list[int]:
    """Long texts: two thirds cut at max_length, the rest between 45% of it and just under it."""
    low = int(0.45 * max_length)
    lengths = []
    for index in range(count):
        if index % 3 != 2:
            lengths.append(max_length)
        else:
            lengths.append(int(torch.randint(low, max_length, (1,), generator=generator)))
    return lengths


def batches_as_encoders_form(lengths: list[int], batch_size: int, generator: torch.Generator) -> list[list[int]]:
    """Sort longest first by a noisy stand-in for character length (characters per token vary), then cut into
    batches of batch_size: how Sentence Transformers' and llm2vec's `encode` group texts."""
    noise = torch.empty(len(lengths)).uniform_(0.7, 1.3, generator=generator).tolist()
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i] * noise[i])
    ordered = [lengths[i] for i in order]
    return [ordered[start:start + batch_size] for start in range(0, len(ordered), batch_size)]


def padding_mask(batch: list[int]) -> torch.Tensor:
    """(B, longest) 1 for real tokens, right padding."""
    longest = max(batch)
    return (torch.arange(longest)[None, :] < torch.tensor(batch)[:, None]).long()


def layer_shapes(hidden: int, intermediate: int, heads: int, kv_heads: int) -> list[tuple[int, int]]:
    """(in, out) of a Llama layer's seven products: q, k, v, o, gate, up, down."""
    head_dim = hidden // heads
    kv = kv_heads * head_dim
    return [(hidden, hidden), (hidden, kv), (hidden, kv), (hidden, hidden),
            (hidden, intermediate), (hidden, intermediate), (intermediate, hidden)]


def onednn_available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def time_products(rows_per_batch: list[int], shapes, layers: int, repeats: int, generator: torch.Generator) -> dict:
    """Seconds for every layer's products over the batches' rows (one pass), median of `repeats`, through F.linear
    (MKL for float32) and through oneDNN with prepacked weights; and the largest difference between the two."""
    weights = [torch.randn(out_features, in_features, generator=generator) / in_features ** 0.5
               for in_features, out_features in shapes]
    packed = ([torch.ops.mkldnn._reorder_linear_weight(weight, None) for weight in weights]
              if onednn_available() else None)
    inputs = {rows: [torch.randn(rows, in_features, generator=generator) for in_features, _ in shapes]
              for rows in set(rows_per_batch)}

    def one_pass(packed_weights) -> float:
        start = time.perf_counter()
        for rows in rows_per_batch:
            for _ in range(layers):
                for index, states in enumerate(inputs[rows]):
                    if packed_weights is None:
                        F.linear(states, weights[index])
                    else:
                        torch.ops.mkldnn._linear_pointwise(states, packed_weights[index], None, "none", [], "")
        return time.perf_counter() - start

    result = {"mkl": [], "onednn": [] if packed is not None else None}
    one_pass(None)
    if packed is not None:
        one_pass(packed)
    for _ in range(repeats):  # alternate, so both see the same load
        result["mkl"].append(one_pass(None))
        if packed is not None:
            result["onednn"].append(one_pass(packed))
    summary = {"mkl_s": statistics.median(result["mkl"])}
    if packed is not None:
        summary["onednn_s"] = statistics.median(result["onednn"])
        rows = max(inputs)
        difference = 0.0
        for index, states in enumerate(inputs[rows]):
            reference = F.linear(states.double(), weights[index].double())
            for output in (F.linear(states, weights[index]),
                           torch.ops.mkldnn._linear_pointwise(states, packed[index], None, "none", [], "")):
                difference = max(difference, float((output.double() - reference).abs().max() / reference.abs().max()))
        summary["max_relative_error_vs_float64"] = difference
    return summary


def packed_inputs(batch: list[int], input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One padded batch as one row without padding: the real tokens in a row, positions restarting at 0 for every
    text (what `DataCollatorWithFlattening` gives), and the block-diagonal bool mask (1, 1, T, T) that keeps every
    text to itself."""
    ids = torch.cat([input_ids[row, :length] for row, length in enumerate(batch)])[None]
    positions = torch.cat([torch.arange(length) for length in batch])[None]
    text = torch.cat([torch.full((length,), row) for row, length in enumerate(batch)])
    return ids, positions, (text[:, None] == text[None, :])[None, None]


def _relative_difference(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual.double() - expected.double()).abs().max() / expected.double().abs().max())


@contextlib.contextmanager
def gqa_forced(on: bool):
    """Set (or clear) TRANSFORMERS_SDPA_FORCE_GQA for the block, restoring what was there; transformers reads it at
    every sdpa call (`use_gqa_in_sdpa`)."""
    previous = os.environ.pop(FORCE_GQA, None)
    if on:
        os.environ[FORCE_GQA] = "1"
    try:
        yield
    finally:
        os.environ.pop(FORCE_GQA, None)
        if previous is not None:
            os.environ[FORCE_GQA] = previous


def time_stock_forward(batches: list[list[int]], args, generator: torch.Generator) -> dict:
    """transformers' own LlamaModel (random weights, sdpa, `is_causal` false) over the batches, under
    inference_mode: the padded batches as encode forms them (median seconds), and, where a batch packs into at most
    --packed-max-tokens, the same texts packed one row per batch with a block-diagonal mask (no padding reaches any
    product; attention then spans the whole row). Checks on the first batch: the packed rows against the padded
    ones, and whether transformers builds the block-diagonal mask itself from restarting position_ids with no cache
    (it does for causal models; `create_causal_mask` hands `is_causal=False` to `create_bidirectional_mask` without
    them)."""
    from transformers import LlamaConfig, LlamaModel

    config = LlamaConfig(hidden_size=args.hidden, intermediate_size=args.intermediate, num_hidden_layers=args.layers,
                         num_attention_heads=args.heads, num_key_value_heads=args.kv_heads, vocab_size=1024,
                         max_position_embeddings=max(max(batch) for batch in batches), attn_implementation="sdpa")
    config.is_causal = False
    torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=generator)))
    model = LlamaModel(config).eval()
    padded, packed = [], []
    for batch in batches:
        mask = padding_mask(batch)
        input_ids = torch.randint(0, 1024, mask.shape, generator=generator)
        padded.append({"input_ids": input_ids, "attention_mask": mask})
        if sum(batch) <= args.packed_max_tokens:
            ids, positions, block = packed_inputs(batch, input_ids)
            packed.append({"input_ids": ids, "position_ids": positions, "attention_mask": block})

    def one_pass(inputs, force_gqa: bool = False) -> float:
        with gqa_forced(force_gqa), torch.inference_mode():
            start = time.perf_counter()
            for kwargs in inputs:
                model(**kwargs)
            return time.perf_counter() - start

    grouped = args.heads != args.kv_heads
    result = {"padded_s": None, "packed_s": None, "padded_gqa_s": None, "packed_batches": len(packed)}
    timings = {"padded": [], "packed": [], "padded_gqa": []}
    one_pass(padded)
    if len(packed) == len(batches):
        one_pass(packed)
    for _ in range(args.repeats):  # alternate, so each sees the same load
        timings["padded"].append(one_pass(padded))
        if grouped:
            timings["padded_gqa"].append(one_pass(padded, force_gqa=True))
        if len(packed) == len(batches):
            timings["packed"].append(one_pass(packed))
    for name, values in timings.items():
        if values:
            result[f"{name}_s"] = statistics.median(values)
    first = batches[0]
    with gqa_forced(False), torch.inference_mode():
        reference = model(**padded[0]).last_hidden_state  # K/V heads repeated: transformers' default with a mask
        if grouped:
            with gqa_forced(True):
                result["gqa_vs_repeat"] = _relative_difference(model(**padded[0]).last_hidden_state, reference)
        if sum(first) <= args.packed_max_tokens:  # then packed[0] holds the first batch
            rows = torch.cat([reference[row, :length] for row, length in enumerate(first)])
            result["packed_vs_padded"] = _relative_difference(model(**packed[0]).last_hidden_state[0], rows)
            unmasked = {key: value for key, value in packed[0].items() if key != "attention_mask"}
            result["positions_only_vs_padded"] = _relative_difference(
                model(**unmasked, use_cache=False).last_hidden_state[0], rows)
    return result


def measure(kind: str, lengths: list[int], args, generator: torch.Generator) -> dict:
    batches = batches_as_encoders_form(lengths, args.batch_size, generator)
    real = [sum(batch) for batch in batches]
    padded = [len(batch) * max(batch) for batch in batches]
    shapes = layer_shapes(args.hidden, args.intermediate, args.heads, args.kv_heads)
    logger.info("%s: %d texts, %d batches, %d real tokens, %d padded", kind, len(lengths), len(batches),
                sum(real), sum(padded))
    result = {"texts": len(lengths), "batches": len(batches), "real_tokens": sum(real),
              "padded_tokens": sum(padded), "padding_overhead": sum(padded) / sum(real) - 1}
    result["forward"] = time_stock_forward(batches, args, generator)
    result["forward_s"] = result["forward"]["padded_s"]
    result["products_padded"] = time_products(padded, shapes, args.layers, args.repeats, generator)
    result["products_real"] = time_products(real, shapes, args.layers, args.repeats, generator)
    return result


def report(kind: str, result: dict) -> list[str]:
    forward = result["forward_s"]
    padded, real = result["products_padded"], result["products_real"]
    lines = [f"{kind}: {result['texts']} texts in {result['batches']} batches; {result['real_tokens']} real tokens, "
             f"{result['padded_tokens']} padded (+{100 * result['padding_overhead']:.0f}%)",
             f"  stock LlamaModel forward (sdpa, padded, bidirectional): {forward:.3f} s",
             f"  every layer's products, MKL (F.linear):    padded rows {padded['mkl_s']:.3f} s "
             f"({100 * padded['mkl_s'] / forward:.0f}% of the forward), real rows {real['mkl_s']:.3f} s"]
    saved_padding = padded["mkl_s"] - real["mkl_s"]
    lines.append(f"  1. padding in the products: {saved_padding:.3f} s = {100 * saved_padding / forward:.1f}% of the "
                 f"forward (x{padded['mkl_s'] / real['mkl_s']:.2f} on the products)")
    if "onednn_s" in padded:
        error = max(padded["max_relative_error_vs_float64"], real["max_relative_error_vs_float64"])
        lines.append(f"  every layer's products, oneDNN prepacked:  padded rows {padded['onednn_s']:.3f} s, "
                     f"real rows {real['onednn_s']:.3f} s; MKL / oneDNN x{padded['mkl_s'] / padded['onednn_s']:.2f} "
                     f"padded, x{real['mkl_s'] / real['onednn_s']:.2f} real; largest relative error vs float64: "
                     f"{error:.1e} (both)")
        saved_library = padded["mkl_s"] - padded["onednn_s"]
        lines.append(f"  2. MKL instead of oneDNN: {saved_library:.3f} s = {100 * saved_library / forward:.1f}% of the "
                     f"forward; both together: the products x{padded['mkl_s'] / real['onednn_s']:.2f} (padded rows "
                     f"through MKL / real rows through oneDNN)")
    else:
        lines.append("  2. oneDNN's prepacked linear is not in this torch build: not measured")
    stock = result["forward"]
    if stock["packed_s"] is not None:
        lines.append(f"  3. the same texts packed, one row per batch, block-diagonal mask (stock LlamaModel): "
                     f"{stock['packed_s']:.3f} s, {forward / stock['packed_s']:.2f}x as fast as the padded forward")
    else:
        lines.append("  3. packed forward not timed: a batch holds more than --packed-max-tokens real tokens "
                     "(attention over the packed row would cost more than the padding)")
    if "packed_vs_padded" in stock:
        lines.append(f"     packed vs padded, first batch: largest difference {stock['packed_vs_padded']:.1e} of the "
                     f"scale with the block-diagonal mask; {stock['positions_only_vs_padded']:.1e} with restarting "
                     f"position_ids and no mask ("
                     + ("transformers keeps the texts apart itself)" if stock["positions_only_vs_padded"] < SAME
                        else "transformers lets the texts attend to each other: the bidirectional mask ignores "
                             "position_ids)"))
    if stock["padded_gqa_s"] is not None:
        lines.append(f"  4. grouped key/value heads given to sdpa with the mask ({FORCE_GQA}=1) instead of repeated: "
                     f"{stock['padded_gqa_s']:.3f} s, {forward / stock['padded_gqa_s']:.2f}x as fast as the padded "
                     f"forward; largest difference {stock['gqa_vs_repeat']:.1e} of the scale")
    return lines


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Reproduce, with torch and transformers alone, the CPU costs of the stock forward that hold "
                    "stock Sentence Transformers back: padded rows in every product, MKL sgemm instead of prepacked "
                    "oneDNN for float32 products, padding instead of packing, and repeated key/value heads.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--kinds", nargs="+", choices=("sentences", "documents"), default=["sentences", "documents"],
                        help="which drawn text kinds to measure")
    parser.add_argument("--sentences", type=int, default=384, help="how many short texts")
    parser.add_argument("--documents", type=int, default=32, help="how many long texts (one batch of 32 by default)")
    parser.add_argument("--max-length", type=int, default=512, help="the cut for documents, in tokens")
    parser.add_argument("--batch-size", type=int, default=32, help="texts per batch, as encode forms them")
    parser.add_argument("--hidden", type=int, default=576, help="hidden size (SmolLM2-135M: 576)")
    parser.add_argument("--intermediate", type=int, default=1536, help="MLP size (SmolLM2-135M: 1536)")
    parser.add_argument("--heads", type=int, default=9, help="attention heads (SmolLM2-135M: 9)")
    parser.add_argument("--kv-heads", type=int, default=3, help="key/value heads (SmolLM2-135M: 3)")
    parser.add_argument("--layers", type=int, default=30, help="decoder layers (SmolLM2-135M: 30)")
    parser.add_argument("--packed-max-tokens", type=int, default=2048,
                        help="time the packed forward (one row per batch, block-diagonal mask) only where every "
                        "batch's real tokens fit in this many; its attention spans the whole row, so long documents "
                        "would pay far more in attention than padding costs them")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("--repeats", type=int, default=3, help="timed passes per measurement (median reported)")
    parser.add_argument("--seed", type=int, default=0, help="seed for lengths, weights and inputs")
    parser.add_argument("--json", type=Path, metavar="FILE", help="also write the figures and host here")
    args = parser.parse_args(argv)
    if args.hidden % args.heads or args.heads % args.kv_heads:
        parser.error(f"--hidden ({args.hidden}) must divide by --heads ({args.heads}) and --heads by --kv-heads "
                     f"({args.kv_heads}); pick sizes of a real model")
    for name in ("sentences", "documents", "max_length", "batch_size", "layers", "threads", "repeats"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    return args


def main(argv=None) -> dict:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    generator = torch.Generator().manual_seed(args.seed)
    host = host_line()
    print(f"host: {host}")
    print(f"model: hidden {args.hidden}, MLP {args.intermediate}, {args.heads} heads / {args.kv_heads} KV heads, "
          f"{args.layers} layers, float32, {args.threads} threads, batch {args.batch_size}, median of {args.repeats}")
    results = {"host_line": host, "args": {key: str(value) for key, value in vars(args).items()}, "kinds": {}}
    for kind in args.kinds:
        lengths = (sentence_lengths(args.sentences, generator) if kind == "sentences"
                   else document_lengths(args.documents, generator, args.max_length))
        results["kinds"][kind] = measure(kind, lengths, args, generator)
        print("\n".join(report(kind, results["kinds"][kind])), flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return results


if __name__ == "__main__":
    main()
