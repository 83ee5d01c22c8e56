"""One model shared by threads gives the sequential results; the same inputs give bit-identical embeddings on CPU,
run to run and in fresh processes."""

from __future__ import annotations

import concurrent.futures
import random
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from llama_encoder.encoding import Encoder
from tests.tiny import random_padded_batch, tiny_encoder

REPO_ROOT = Path(__file__).resolve().parents[1]
WORDS = "the cat sat on the mat a dog ran in the park plants make sugar from light 🐱 القط".split()


@pytest.fixture(scope="module")
def encoder(tiny_checkpoint) -> Encoder:
    return Encoder.from_pretrained(tiny_checkpoint, device="cpu", dtype="float32")


def _jobs(count: int, seed: int = 0) -> list[dict]:
    """encode() calls of every kind: plain texts, instruction pairs, saved prompts, and different max_length (the
    tokenizer's truncation setting is what threads could trip over)."""
    rng = random.Random(seed)
    jobs = []
    for number in range(count):
        texts = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 50))) for _ in range(rng.randint(1, 5))]
        kind = number % 4
        inputs = [("Find the animal", text) for text in texts] if kind == 1 else texts
        options = {"prompt_name": "query"} if kind == 2 else {}
        limits = [6, 12, 25, None] if kind in (0, 3) else [60, 90, None]  # room for the prompt's tokens
        jobs.append({"inputs": inputs, "max_length": rng.choice(limits), "batch_tokens": 64, "show_progress": False,
                     **options})
    return jobs


def test_threads_sharing_one_encoder_get_sequential_results(encoder):
    jobs = _jobs(48)
    sequential = [encoder.encode(**job) for job in jobs]
    with concurrent.futures.ThreadPoolExecutor(max_workers=8) as pool:
        for _ in range(2):
            threaded = list(pool.map(lambda job: encoder.encode(**job), jobs))
            for number, (expected, got) in enumerate(zip(sequential, threaded, strict=True)):
                np.testing.assert_array_equal(got, expected, err_msg=f"job {number}: {jobs[number]}")


def _padded(lengths: list[int], side: str, seed: int) -> dict[str, torch.Tensor]:
    ids, mask = random_padded_batch(lengths, side, seed=seed)
    pool_mask = mask.clone()
    pool_mask[0, (mask[0] == 1).nonzero()[:1, 0]] = 0  # the first row's first token is an "instruction"
    return {"input_ids": ids, "attention_mask": mask, "pool_mask": pool_mask}


@pytest.mark.parametrize(("backend", "pooling_mode"), [("eager", "latent_attention"), ("sdpa", "weighted_mean"),
                                                       ("sdpa", "last_token")])
def test_threads_sharing_one_raw_model_get_sequential_results(backend, pooling_mode):
    model = tiny_encoder(attn_implementation=backend, pooling_mode=pooling_mode)
    rng = random.Random(5)
    batches = [_padded([rng.randint(2, 12) for _ in range(rng.randint(1, 4))], rng.choice(["left", "right"]), seed)
               for seed in range(24)]
    with torch.inference_mode():
        sequential = [model(**batch) for batch in batches]

        def forward(batch):
            with torch.inference_mode():  # grad mode is per thread: each sets its own, as Encoder.encode does
                return model(**batch)

        with concurrent.futures.ThreadPoolExecutor(max_workers=6) as pool:
            threaded = list(pool.map(forward, batches))
    for expected, got in zip(sequential, threaded, strict=True):
        torch.testing.assert_close(got.pooler_output, expected.pooler_output, atol=0, rtol=0)
        torch.testing.assert_close(got.last_hidden_state, expected.last_hidden_state, atol=0, rtol=0)


DETERMINISM_TEXTS = ["The cat sat on the mat.", "A dog ran in the park today, fast and far.", "light",
                     ("Find the animal", "where is the cat?"), "Plants make sugar from light. " * 30]

CHILD = textwrap.dedent(
    """
    import sys
    import numpy as np
    from llama_encoder.encoding import Encoder
    from tests.test_concurrency import DETERMINISM_TEXTS
    encoder = Encoder.from_pretrained(sys.argv[1], device="cpu", dtype="float32")
    np.save(sys.argv[2], encoder.encode(DETERMINISM_TEXTS, batch_tokens=200, show_progress=False))
    """
)


def test_same_inputs_give_bit_identical_embeddings_run_to_run_and_across_processes(encoder, tiny_checkpoint,
                                                                                   tmp_path):
    children = [subprocess.Popen([sys.executable, "-c", CHILD, str(tiny_checkpoint), str(tmp_path / f"{n}.npy")],
                                 cwd=REPO_ROOT, stdin=subprocess.DEVNULL, stderr=subprocess.PIPE)
                for n in range(2)]
    first = encoder.encode(DETERMINISM_TEXTS, batch_tokens=200)
    for _ in range(3):
        np.testing.assert_array_equal(encoder.encode(DETERMINISM_TEXTS, batch_tokens=200), first)
    for child in children:
        _, err = child.communicate(timeout=300)
        assert child.returncode == 0, err.decode()[-3000:]
    fresh = [np.load(tmp_path / f"{n}.npy") for n in range(2)]
    assert fresh[0].tobytes() == fresh[1].tobytes()
    assert fresh[0].tobytes() == first.tobytes()
