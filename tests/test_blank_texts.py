"""Blank texts (empty or whitespace only) embed as the zero vector wherever the checkpoint's code runs, and change
nothing for the other texts.

Every loader of a checkpoint written with its own code, for every pooling mode and both padding sides, with and
without a prompt: `SentenceTransformer(folder, trust_remote_code=True)`, `AutoModel` with the checkpoint's
`tokenize_for_encoder` (the model card's snippet), the package's `Encoder` and `embed_corpus`. A corpus with an empty
and a whitespace-only text among normal ones gives the normal texts what they get without the blanks (equal up to
summation order: batching and padding differ), the blanks exactly zero, and no loader stops. A tokenizer that adds no
BOS (SmolLM2's) tokenises "" to nothing at all, so that case is covered too, and a batch of blanks only.

Stock Sentence Transformers modules (a native checkpoint) agree where they pool no token: "" from a tokenizer without
BOS, alone or behind an excluded prompt; a whitespace-only text they pool as its tokens (documented). vLLM:
tests/test_vllm.py.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from sentence_transformers import SentenceTransformer
from transformers import AutoModel, AutoTokenizer
from transformers.dynamic_module_utils import get_class_from_dynamic_module

from llama_encoder import POOLING_MODES
from llama_encoder.conversion_scripts.checkpoint import write_checkpoint
from llama_encoder.encoding import Encoder
from llama_encoder.encoding.embed import embed_corpus
from tests.numeric import assert_equal_up_to_summation_order, encoder_terms
from tests.tiny import tiny_bpe_tokenizer, tiny_encoder

TEXTS = ["The cat sat on the mat.", "A dog ran in the park today, fast and far.", "light", "Where is the cat?"]
BLANKS = ["", "  \n\t "]
CORPUS = [TEXTS[0], BLANKS[0], TEXTS[1], TEXTS[2], BLANKS[1], TEXTS[3]]
REAL = [0, 2, 3, 5]  # the rows of CORPUS that hold TEXTS
QUERY_PROMPT = "Instruct: Find the animal\nQuery:\n"  # ends in a newline: stock Sentence Transformers excludes it
MAX_LENGTH = 48
CASES = [(mode, side, True) for mode in POOLING_MODES for side in ("right", "left")] + [("mean", "right", False)]


def _tokenizer(add_bos: bool):
    return tiny_bpe_tokenizer(TEXTS + [QUERY_PROMPT + text for text in TEXTS], add_bos=add_bos)


def _checkpoint(folder: Path, pooling_mode: str, padding_side: str, add_bos: bool, format: str = "remote-code"):
    tokenizer = _tokenizer(add_bos)
    tokenizer.pad_token = tokenizer.eos_token  # as convert sets it (plan_layout tokenises with it)
    model = tiny_encoder(0, vocab_size=len(tokenizer), pooling_mode=pooling_mode)
    folder.mkdir(parents=True)
    write_checkpoint(model, out_dir=folder, tokenizer=tokenizer, model_id=str(folder), base_name="tiny",
                     license="mit", weights_written=False, format=format, padding_side=padding_side,
                     prompts={"query": QUERY_PROMPT, "document": ""}, max_seq_length=MAX_LENGTH)
    return folder, model


def _check(name: str, with_blanks: np.ndarray, without: np.ndarray, model) -> None:
    """The blank rows of `with_blanks` are exactly zero, the others equal `without` up to summation order."""
    assert np.isfinite(with_blanks).all(), name
    assert with_blanks.shape == (len(CORPUS), model.config.hidden_size), name
    blank = [row for row in range(len(CORPUS)) if row not in REAL]
    assert np.array_equal(with_blanks[blank], np.zeros((len(blank), model.config.hidden_size))), name
    assert_equal_up_to_summation_order(with_blanks[REAL], without, terms=encoder_terms(model, MAX_LENGTH), what=name)


@pytest.mark.parametrize(("pooling_mode", "padding_side", "add_bos"), CASES,
                         ids=[f"{m}-{s}{'' if b else '-no-bos'}" for m, s, b in CASES])
def test_every_loader_of_the_checkpoints_code_embeds_blanks_as_zero(tmp_path, pooling_mode, padding_side, add_bos,
                                                                   caplog):
    folder, model = _checkpoint(tmp_path / "ckpt", pooling_mode, padding_side, add_bos)
    st = SentenceTransformer(str(folder), trust_remote_code=True, device="cpu")
    auto = AutoModel.from_pretrained(folder, trust_remote_code=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
    assert tokenizer.padding_side == padding_side and (tokenizer("")["input_ids"] == []) is not add_bos
    tokenize = get_class_from_dynamic_module("modeling_llama_encoder.tokenize_for_encoder", str(folder))
    encoder = Encoder.from_pretrained(folder, device="cpu", dtype="float32")

    def card_snippet(texts, prompt):  # the model card's "Transformers with the checkpoint's code"
        batch = tokenize(tokenizer, texts, prompt, max_length=MAX_LENGTH, append_eos=pooling_mode == "eos")
        with torch.inference_mode():
            output = auto(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                          pool_mask=batch["pool_mask"])
        return torch.nn.functional.normalize(output.pooler_output, dim=-1).numpy()

    loaders = {
        "SentenceTransformer": lambda texts, prompt: st.encode(texts, prompt=prompt, batch_size=4),
        "AutoModel + tokenize_for_encoder": card_snippet,
        "Encoder": lambda texts, prompt: encoder.encode(texts, prompt=prompt, batch_tokens=64),
    }
    for prompt in ("", QUERY_PROMPT):
        reference = None
        for name, embed in loaders.items():
            case = f"{name}, prompt {prompt!r}"
            with caplog.at_level(logging.WARNING):
                caplog.clear()
                with_blanks = embed(CORPUS, prompt)
            warned = [r.getMessage() for r in caplog.records if "empty or blank" in r.getMessage()]
            # one warning per call that meets blanks (Sentence Transformers: per batch), counting them
            assert sum(int(m.split()[0]) for m in warned) == 2, case
            assert all(m.endswith("inputs are empty or blank; each gets the zero vector as its embedding.")
                       for m in warned), case
            without = embed(TEXTS, prompt)
            _check(case, with_blanks, without, model)
            assert not embed(BLANKS, prompt).any(), f"{case}: blanks only"
            if reference is None:
                reference = without
            else:  # the loaders agree with each other on the real texts
                assert_equal_up_to_summation_order(without, reference, terms=encoder_terms(model, MAX_LENGTH),
                                                   what=f"{case} vs SentenceTransformer")
    pairs = encoder.encode([("Find the animal", TEXTS[0]), ("Find the animal", " ")])
    assert pairs[0].any() and not pairs[1].any()


def test_embed_corpus_writes_zero_rows_for_blank_records(tmp_path):
    folder, model = _checkpoint(tmp_path / "ckpt", "mean", "right", add_bos=False)
    encoder = Encoder.from_pretrained(folder, device="cpu", dtype="float32")
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"id": f"d{i}", "text": text}) + "\n" for i, text in enumerate(CORPUS)))
    summary = embed_corpus(encoder, corpus, tmp_path / "out", shard_size=4, show_progress=False)
    assert summary["num_blank"] == 2 and summary["manifest"]
    rows = np.concatenate([np.load(tmp_path / "out" / f"shard-0000{i}.npy") for i in range(2)])
    _check("embed_corpus", rows, encoder.encode(TEXTS), model)


def test_stock_loaders_of_a_native_checkpoint_agree_where_no_token_is_pooled(tmp_path):
    """A native checkpoint runs stock Sentence Transformers modules, with or without trust_remote_code (which then
    only supplies the model class): they pool what the tokens say. "" (no BOS), alone or behind the excluded query
    prompt, pools nothing: zero, as the checkpoint's code gives. A whitespace-only text pools its whitespace tokens
    there (the documented difference: drop blank texts, or use Encoder, embed or VllmEncoder)."""
    folder, model = _checkpoint(tmp_path / "native", "mean", "right", add_bos=False, format="native")
    modules = [module["type"] for module in json.loads((folder / "modules.json").read_text())]
    assert modules[0] == "sentence_transformers.models.Transformer"
    encoder = Encoder.from_pretrained(folder, device="cpu", dtype="float32")
    mixed = [TEXTS[0], "", TEXTS[1]]
    for kwargs in ({}, {"trust_remote_code": True}):  # the second once raised from the model's own pooling
        st = SentenceTransformer(str(folder), device="cpu", **kwargs)
        for prompt in ("", QUERY_PROMPT):
            got = st.encode(mixed, prompt=prompt)
            assert not got[1].any(), (kwargs, prompt)
            assert_equal_up_to_summation_order(got[[0, 2]], encoder.encode([TEXTS[0], TEXTS[1]], prompt=prompt),
                                               terms=encoder_terms(model, MAX_LENGTH), what=f"{kwargs} {prompt!r}")
        for prompt in ("", QUERY_PROMPT):  # a whitespace-only text: its whitespace tokens, pooled
            assert np.linalg.norm(st.encode([TEXTS[0], BLANKS[1]], prompt=prompt)[1]) > 0.99
    assert not encoder.encode(mixed + BLANKS)[[1, 3, 4]].any()
