"""Load an encoder checkpoint the way any user would, embed sentences, and print their similarities.

Nothing from llama_encoder is imported. An engine-native checkpoint (the default of `llama-encoder convert`) loads in
sentence-transformers with stock modules and no remote code; a remote-code one through its own code
(trust_remote_code). Plain transformers uses the checkpoint's own code either way, for its prompt-aware pooling.

    python examples/compare_sentences.py PATH_OR_REPO_ID
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from sentence_transformers import SentenceTransformer
from transformers import AutoModel, AutoTokenizer

QUERIES = [
    "How do I bake bread at home?",
    "What is the capital of France?",
    "Which animal is the fastest on land?",
]
DOCUMENTS = [
    "Mix flour, water, yeast and salt, let the dough rise, then bake it in a hot oven.",
    "Paris is the capital and largest city of France.",
    "The cheetah can run faster than any other land animal.",
    "The stock market fell sharply on Monday.",
]


def table(title: str, scores: torch.Tensor) -> str:
    lines = [title, " " * 40 + "".join(f"  doc{j + 1:<4}" for j in range(len(DOCUMENTS)))]
    for i, query in enumerate(QUERIES):
        row = "".join(f"  {scores[i, j]:+.3f} " for j in range(len(DOCUMENTS)))
        lines.append(f"{query[:38]:<40}{row}")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="a folder written by `llama-encoder convert`, or a Hub repo id")
    args = parser.parse_args()

    # 1. Sentence-transformers: prompts come from the checkpoint (query prompt = its instruction). Stock modules
    #    (modules.json names sentence_transformers.models.Pooling) need no remote code.
    modules_file = Path(args.checkpoint) / "modules.json"
    stock = modules_file.is_file() and any(
        module["type"] == "sentence_transformers.models.Pooling" for module in json.loads(modules_file.read_text())
    )
    st_model = SentenceTransformer(args.checkpoint, trust_remote_code=not stock)
    st_queries = st_model.encode(QUERIES, prompt_name="query", convert_to_tensor=True)
    st_documents = st_model.encode(DOCUMENTS, convert_to_tensor=True)
    st_scores = st_model.similarity(st_queries, st_documents)

    # 2. Plain transformers: the checkpoint's own module tokenises prompt + text and marks what is pooled.
    model = AutoModel.from_pretrained(args.checkpoint, trust_remote_code=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(args.checkpoint, trust_remote_code=True)
    tokenize_for_encoder = sys.modules[type(model).__module__].tokenize_for_encoder
    query_prompt = st_model.prompts["query"]
    append_eos = model.config.pooling_mode == "eos"
    with torch.inference_mode():
        queries = model(**tokenize_for_encoder(tokenizer, QUERIES, query_prompt, append_eos=append_eos)).pooler_output
        documents = model(**tokenize_for_encoder(tokenizer, DOCUMENTS, append_eos=append_eos)).pooler_output
    scores = torch.nn.functional.normalize(queries, dim=-1) @ torch.nn.functional.normalize(documents, dim=-1).T

    print(f"Checkpoint: {args.checkpoint} (pooling: {model.config.pooling_mode}; sentence-transformers "
          f"{'stock modules, no remote code' if stock else 'with the checkpoint code (trust_remote_code)'})")
    print(f"Query prompt: {query_prompt!r}\n")
    for j, document in enumerate(DOCUMENTS):
        print(f"doc{j + 1}: {document}")
    print()
    print(table("Cosine similarity, SentenceTransformer:", st_scores.cpu()))
    print()
    print(table("Cosine similarity, AutoModel:", scores))
    difference = (scores - st_scores.cpu()).abs().max().item()
    print(f"\nLargest difference between the two loaders: {difference:.2e}")
    best = scores.argmax(dim=1).tolist()
    print("Best document per query (AutoModel):", ", ".join(f"q{i + 1}->doc{j + 1}" for i, j in enumerate(best)))
    return 0 if difference < 1e-4 else 1


if __name__ == "__main__":
    sys.exit(main())
