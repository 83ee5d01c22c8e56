"""Training on the embedded SmolLM2 (integration): MNTP masks with '_' (SmolLM2 has no mask token), a short
supervised run on top of it, and `convert` turns both adapters into a checkpoint whose embeddings differ from the
untrained encoder's."""

import numpy as np
import pytest

from llama_encoder.training import TrainingArguments, train
from llama_encoder.training.model import resolve_mask_token

pytestmark = pytest.mark.integration

SENTENCES = ["A man is playing a guitar.", "A woman is slicing an onion.", "Two dogs run on the beach.",
             "A child is reading a book.", "The stock market fell sharply today.", "A cat sleeps on the sofa.",
             "Someone is cooking pasta.", "A plane is taking off."]


def test_mntp_then_supervised_then_convert(tmp_path):
    from llama_encoder.conversion_scripts.convert import convert
    from llama_encoder.encoding.encode import Encoder
    from llama_encoder.weights.base_model import resolve_base

    tokenizer = resolve_base().tokenizer
    assert tokenizer.mask_token_id is None
    assert tokenizer.convert_ids_to_tokens(resolve_mask_token(tokenizer, None)) == "_"

    texts = tmp_path / "texts.txt"
    texts.write_text("\n".join(SENTENCES) + "\n")
    pairs = tmp_path / "pairs.csv"
    pairs.write_text("score,sentence1,sentence2\n" + "\n".join(
        f"{i % 6},{a},{b}" for i, (a, b) in enumerate(zip(SENTENCES, SENTENCES[1:] + SENTENCES[:1], strict=True))))
    # auto: bfloat16 where the CPU has it natively; float32 where bfloat16 would be emulated (and refused)
    common = dict(max_steps=2, batch_size=4, dtype="auto", show_progress=False, lora_dropout=0.0)
    mntp = train(TrainingArguments(objective="mntp", out=str(tmp_path / "mntp"), data=[str(texts)], **common))
    assert mntp["tokens"] > 0 and np.isfinite(mntp["final_loss"])
    supervised = train(TrainingArguments(objective="supervised", out=str(tmp_path / "sup"), data=[str(pairs)],
                                         adapters=[str(tmp_path / "mntp")], lr=1e-3, **common))
    assert np.isfinite(supervised["final_loss"])

    result = convert(out=tmp_path / "encoder", adapters=[tmp_path / "mntp", tmp_path / "sup"])
    assert result.verification["max_cosine_distance"] < 1e-4
    trained = Encoder.from_pretrained(result.out_dir, device="cpu", dtype="float32").encode(SENTENCES[:3])
    plain = convert(out=tmp_path / "plain", untrained=True).out_dir
    untrained = Encoder.from_pretrained(plain, device="cpu", dtype="float32").encode(SENTENCES[:3])
    assert float(np.abs(trained - untrained).max()) > 1e-3
