"""Check that vLLM embeds an engine-native llama-encoder checkpoint like the checkpoint's own model code.

    .venv-vllm/bin/python tests/engines/check_vllm.py CHECKPOINT [--threshold 0.999] [--compile] [--hf-overrides JSON]

(`bash scripts/setup_vllm_env.sh` builds `.venv-vllm`.) Not a pytest test (pytest collects `test_*.py` only): vLLM
is not installed in the main venv, and it spawns worker processes, so it runs from a file under `__main__`.

The reference is the checkpoint's Hub code, not the package: `AutoModel.from_pretrained(CHECKPOINT,
trust_remote_code=True)` (`LlamaEncoderModel`, whose own mask is bidirectional on any transformers version) and the
`tokenize_for_encoder` function of its `modeling_llama_encoder.py`. vLLM loads the same folder without remote code
(`LLM(model=CHECKPOINT, runner="pooling", dtype="float32")`), so it runs its own Llama implementation, bidirectional
through `is_causal: false`, with the pooling and normalisation it reads from the checkpoint's files.

Asserted (exit status 1 and a FAIL line otherwise):
  * vLLM resolved a Llama architecture, with encoder-only attention (`is_causal` false) and the pooling type that
    matches the checkpoint's `pooling_mode` (mean -> MEAN, last_token -> LAST);
  * documents (no prompt): cosine(vLLM, reference) >= --threshold for every text;
  * for last-token pooling, queries behind the checkpoint's query prompt too (the last token is a text token, and
    with bidirectional attention its state does not depend on which tokens are pooled).
Measured and printed, not asserted: queries behind the prompt for mean pooling. vLLM pools every token of its input,
so it pools the instruction that `pool_mask` leaves out; the line shows cosine to the reference with the prompt
excluded (what the checkpoint means) and included (what vLLM does).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

DOCUMENTS = [
    "A man is playing a guitar.",
    "The quick brown fox jumps over the lazy dog near the river bank on a sunny afternoon.",
    "Llamas are domesticated South American camelids.",
    "2026",
    "Paris is the capital and most populous city of France.",
    "Ein kurzer deutscher Satz mit Umlauten: Grüße!",
    "guitar",
    "Water boils at 100 degrees Celsius at sea level, and at lower temperatures at altitude.",
]
QUERIES = ["What is the capital of France?", "how do llamas live", "guitar"]
VLLM_POOLING = {"mean": "MEAN", "last_token": "LAST"}


def reference_embeddings(checkpoint: str, texts: list[str], prompt: str, include_prompt_in_pool: bool = False):
    """Embeddings from the checkpoint's own code (float32, normalised as the checkpoint says)."""
    import torch
    import torch.nn.functional as F
    from transformers import AutoModel, AutoTokenizer

    model = AutoModel.from_pretrained(checkpoint, trust_remote_code=True, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(checkpoint, trust_remote_code=True)
    tokenize_for_encoder = sys.modules[type(model).__module__].tokenize_for_encoder
    batch = tokenize_for_encoder(tokenizer, texts, prompt, append_eos=model.config.pooling_mode == "eos")
    if include_prompt_in_pool:
        batch["pool_mask"] = batch["attention_mask"].clone()
    with torch.no_grad():
        out = model(**batch)
    if not include_prompt_in_pool:
        return out.pooler_output.float(), model.config
    pooled = model.pool(out.last_hidden_state, batch["pool_mask"])
    return F.normalize(pooled.float(), dim=-1) if model.config.normalize_embeddings else pooled.float(), model.config


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("--threshold", type=float, default=0.999, help="lowest cosine accepted (default 0.999)")
    parser.add_argument(
        "--compile",
        action="store_true",
        help="let vLLM torch.compile the model (its default; 100-250 s more start-up on 2 CPUs); default: eager",
    )
    parser.add_argument(
        "--hf-overrides",
        type=json.loads,
        default=None,
        metavar="JSON",
        help="passed to LLM(hf_overrides=...), e.g. '{\"is_causal\": true}' as a negative control",
    )
    args = parser.parse_args()
    checkpoint = str(args.checkpoint.resolve())
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB; the default takes a large share of the RAM

    files = {
        name: json.loads((args.checkpoint / name).read_text())
        for name in ("config.json", "config_sentence_transformers.json")
    }
    mode = files["config.json"].get("pooling_mode", "mean")
    if mode not in VLLM_POOLING:
        print(f"FAIL: pooling_mode {mode!r} has no vLLM equivalent", file=sys.stderr)
        return 1
    query_prompt = files["config_sentence_transformers.json"].get("prompts", {}).get("query", "")

    import torch

    ref_docs, config = reference_embeddings(checkpoint, DOCUMENTS, "")
    ref_q, _ = reference_embeddings(checkpoint, QUERIES, query_prompt)
    ref_q_incl, _ = reference_embeddings(checkpoint, QUERIES, query_prompt, include_prompt_in_pool=True)

    from vllm import LLM

    start = time.perf_counter()
    llm = LLM(
        model=checkpoint,
        runner="pooling",
        dtype="float32",
        enforce_eager=not args.compile,
        seed=0,
        hf_overrides=args.hf_overrides,
    )
    load_s = time.perf_counter() - start
    model_config = llm.llm_engine.model_config
    pooler = model_config.pooler_config
    arch = model_config.architecture
    is_causal = getattr(model_config.hf_config, "is_causal", True)
    print(
        f"vLLM: architecture {arch}, is_causal {is_causal}, pooling {pooler.seq_pooling_type}, "
        f"normalize (use_activation) {pooler.use_activation}, max_model_len {model_config.max_model_len}, "
        f"loaded in {load_s:.1f} s"
    )

    def embed(texts):
        return torch.tensor([o.outputs.embedding for o in llm.embed(texts, use_tqdm=False)], dtype=torch.float32)

    start = time.perf_counter()
    got_docs = embed(DOCUMENTS)
    got_q = embed([query_prompt + q for q in QUERIES])
    embed_s = time.perf_counter() - start
    cos = torch.nn.functional.cosine_similarity
    c_docs = cos(got_docs, ref_docs, dim=-1)
    c_q = cos(got_q, ref_q, dim=-1)
    c_q_incl = cos(got_q, ref_q_incl, dim=-1)
    print(
        f"documents: cosine(vLLM, reference) min {c_docs.min().item():.9f} over {len(DOCUMENTS)} texts "
        f"({embed_s:.1f} s for all embeds)"
    )
    print(
        f"queries behind the query prompt: cosine vs reference (prompt not pooled) "
        f"{[round(x, 6) for x in c_q.tolist()]}; vs reference with the prompt pooled "
        f"{[round(x, 6) for x in c_q_incl.tolist()]}"
    )

    failures = []
    if arch not in ("LlamaModel", "LlamaForCausalLM", "LlamaBidirectionalModel"):
        failures.append(f"architecture {arch} (expected vLLM's Llama implementation)")
    if is_causal:
        failures.append("vLLM runs the model causally (is_causal is not false)")
    if pooler.seq_pooling_type != VLLM_POOLING[mode]:
        failures.append(f"pooling {pooler.seq_pooling_type}, expected {VLLM_POOLING[mode]} for {mode}")
    if pooler.use_activation is not None and bool(pooler.use_activation) != bool(config.normalize_embeddings):
        failures.append(f"normalisation {pooler.use_activation}, checkpoint says {config.normalize_embeddings}")
    if c_docs.min().item() < args.threshold:
        failures.append(f"documents: min cosine {c_docs.min().item():.6f} < {args.threshold}")
    if mode == "last_token" and c_q.min().item() < args.threshold:
        failures.append(f"last-token queries: min cosine {c_q.min().item():.6f} < {args.threshold}")
    for failure in failures:
        print(f"FAIL: {failure}", file=sys.stderr)
    if not failures:
        print(f"OK: vLLM embeds {checkpoint} like its model code (pooling {mode}, threshold {args.threshold})")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
