"""benchmarks/upstream_cpu.py: the batches it forms, the shapes it times, that MKL and oneDNN compute the same
products, and one tiny end-to-end run. Nothing here depends on how fast the host is."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
upstream = pytest.importorskip("upstream_cpu")

SCRIPT = Path(upstream.__file__).resolve()


def test_drawn_lengths_stay_in_their_ranges():
    generator = torch.Generator().manual_seed(3)
    sentences = upstream.sentence_lengths(500, generator)
    assert len(sentences) == 500 and min(sentences) >= 4 and max(sentences) <= 17
    assert 6.5 < sum(sentences) / len(sentences) < 9  # 4 + Poisson(3.7), a few cut at 17
    documents = upstream.document_lengths(60, generator, 512)
    assert documents.count(512) >= 40 and all(230 <= length <= 512 for length in documents)


def test_batches_keep_every_text_and_count_padding_as_encode_would():
    generator = torch.Generator().manual_seed(0)
    lengths = [5, 17, 9, 4, 12, 8, 6, 15, 7, 10]
    batches = upstream.batches_as_encoders_form(lengths, 4, generator)
    assert [len(batch) for batch in batches] == [4, 4, 2]
    assert Counter(length for batch in batches for length in batch) == Counter(lengths)
    # longest first, roughly: the first batch's longest text is at least the last batch's
    assert max(batches[0]) >= max(batches[-1])
    mask = upstream.padding_mask([3, 1, 2])
    assert mask.tolist() == [[1, 1, 1], [1, 0, 0], [1, 1, 0]]


def test_a_packed_batch_keeps_every_text_to_itself():
    input_ids = torch.tensor([[11, 12, 13], [21, 0, 0], [31, 32, 0]])
    ids, positions, block = upstream.packed_inputs([3, 1, 2], input_ids)
    assert ids.tolist() == [[11, 12, 13, 21, 31, 32]]
    assert positions.tolist() == [[0, 1, 2, 0, 0, 1]]
    text = [0, 0, 0, 1, 2, 2]
    assert block.shape == (1, 1, 6, 6)
    assert block[0, 0].tolist() == [[a == b for b in text] for a in text]


def test_layer_shapes_are_a_llama_layers_seven_products():
    # SmolLM2-135M: 9 heads of 64, 3 key/value heads -> k and v project to 192
    assert upstream.layer_shapes(576, 1536, 9, 3) == [
        (576, 576), (576, 192), (576, 192), (576, 576), (576, 1536), (576, 1536), (1536, 576)]


def test_both_libraries_compute_the_products_to_float32_rounding():
    generator = torch.Generator().manual_seed(1)
    shapes = upstream.layer_shapes(64, 128, 4, 2)
    summary = upstream.time_products([40, 7], shapes, layers=1, repeats=1, generator=generator)
    assert summary["mkl_s"] > 0
    if not upstream.onednn_available():
        pytest.skip("this torch has no oneDNN linear")
    assert summary["onednn_s"] > 0
    # each output element sums in_features products: equal to float64 up to summation order (tests/numeric.py's
    # bound: terms * eps * scale), the scale being the output's largest magnitude
    terms = max(in_features for in_features, _ in shapes)
    assert summary["max_relative_error_vs_float64"] <= terms * torch.finfo(torch.float32).eps


def test_the_options_are_checked(capsys):
    with pytest.raises(SystemExit):
        upstream.parse_args(["--hidden", "100", "--heads", "9"])
    assert "must divide by --heads" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        upstream.parse_args(["--repeats", "0"])
    assert "--repeats must be at least 1" in capsys.readouterr().err


def test_a_tiny_run_prints_both_kinds_with_the_host(tmp_path):
    out = tmp_path / "upstream.json"
    process = subprocess.run(
        [sys.executable, str(SCRIPT), "--hidden", "32", "--intermediate", "64", "--heads", "4", "--kv-heads", "2",
         "--layers", "1", "--sentences", "40", "--documents", "6", "--max-length", "48", "--batch-size", "8",
         "--repeats", "1", "--threads", "1", "--packed-max-tokens", "100", "--json", str(out)],
        capture_output=True, text=True, timeout=300, check=True)
    data = json.loads(out.read_text())
    assert process.stdout.startswith("host: ") and data["host_line"] in process.stdout
    for kind, texts in (("sentences", 40), ("documents", 6)):
        result = data["kinds"][kind]
        assert result["texts"] == texts and result["batches"] == -(-texts // 8)
        assert result["padded_tokens"] >= result["real_tokens"] > 0
        assert result["padding_overhead"] == pytest.approx(result["padded_tokens"] / result["real_tokens"] - 1)
        assert result["forward_s"] > 0 and result["products_padded"]["mkl_s"] > 0
        assert f"{kind}: {texts} texts" in process.stdout
    assert "1. padding in the products" in process.stdout
    # sentences (batches of 8 texts of at most 17 tokens) pack within 100 tokens; documents (40-48 tokens) do not
    sentences, documents = data["kinds"]["sentences"]["forward"], data["kinds"]["documents"]["forward"]
    assert sentences["packed_s"] > 0 and sentences["packed_batches"] == 5
    assert documents["packed_s"] is None and documents["packed_batches"] == 0
    assert "3. packed forward not timed" in process.stdout
    # packed rows with the block-diagonal mask are the padded rows up to float32 summation order
    assert sentences["packed_vs_padded"] < upstream.SAME
    kept_apart = sentences["positions_only_vs_padded"] < upstream.SAME
    assert ("transformers keeps the texts apart itself" in process.stdout) == kept_apart
    assert ("the bidirectional mask ignores position_ids" in process.stdout) == (not kept_apart)
    # 4 heads over 2 key/value heads: sdpa given the grouped heads computes what it computes on repeated ones
    assert sentences["padded_gqa_s"] > 0 and sentences["gqa_vs_repeat"] < upstream.SAME
    assert "4. grouped key/value heads given to sdpa" in process.stdout
