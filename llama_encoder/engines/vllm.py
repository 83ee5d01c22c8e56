"""Embed with vLLM: an engine-native checkpoint (`llama-encoder convert --format native`) run by vLLM's own Llama.

Design: vLLM always runs in a child process, never in this one, even when this interpreter has vLLM.

* The child is a standalone script (`_CHILD_SCRIPT`, written to a temporary file; it imports only the standard
  library, numpy and vllm, not llama_encoder) run with the vLLM interpreter (`find_vllm_python`: usually
  `.venv-vllm/bin/python`, since vLLM pins a transformers version the main venv does not have). It loads the folder
  once with `LLM(model=folder, runner="pooling", dtype=..., enforce_eager=..., seed=0)`, reports what vLLM resolved
  (architecture, `is_causal`, pooling type, normalisation, max_model_len: read from `llm.llm_engine.model_config`,
  not from its logs), then serves requests: one JSON line per request on its stdin (`{"id", "texts", "out"}`), each
  answered by `LLM.embed(texts)` written to the `.npy` file `out` (atomically) and one JSON line of reply. So one
  vLLM start-up (25-45 s on 2 CPUs) serves a whole `llama-encoder embed` run, one request per shard.
* Replies travel on a copy of the child's original stdout; the child then points its stdout at its stderr, so
  vLLM's logs (and those of the engine processes it starts) cannot corrupt the replies. Its stderr goes to a log
  file whose tail is quoted when anything fails.
* vLLM starts engine processes (`VLLM::EngineCore`) that outlive a killed driver. The child runs in a session of
  its own (`start_new_session=True`), and `close()` — also on errors, timeouts, Ctrl-C and interpreter exit — sends
  SIGTERM, then SIGKILL, to its whole process group. If this process dies without cleaning up, the child sees EOF on
  its stdin and exits, taking vLLM's engine down with it.
* The child's environment: `HF_HUB_OFFLINE=1` (the folder is local: a Hub id is downloaded by this process first),
  `VLLM_CPU_OMP_THREADS_BIND` = the first `threads` CPUs this process may use (default: all of them) with
  `VLLM_CPU_NUM_OF_RESERVED_CPU=0` (vLLM's `auto` would keep one CPU of two idle), `VLLM_NO_USAGE_STATS=1`,
  `VLLM_CPU_KVCACHE_SPACE=4` (GiB) unless set: without it vLLM reserves 92% of the RAM and refuses to start when other
  processes use more than 8%. Other `VLLM_*` variables pass through.

What vLLM computes: the tokens of `prompt + text` as the folder's tokenizer makes them, truncated to max_model_len
(from `sentence_bert_config.json` `max_seq_length`, as ours), every token pooled. vLLM has no pool mask, so with mean
pooling a prompt's tokens are pooled too (our model leaves them out): mean-pooled documents without a prompt and
last-token inputs with or without one equal ours; mean-pooled queries behind an instruction do not (cosine 0.75-0.91
to ours, measured; see docs/ENGINES.md). `VllmEncoder` warns about that once. vLLM refuses an input of no tokens
("The decoder prompt cannot be empty") and would pool a blank text's prompt or whitespace tokens: `VllmEncoder` gives
a blank text the zero vector, as the checkpoint's own code does, without sending it to vLLM.
"""

from __future__ import annotations

import atexit
import importlib.util
import json
import logging
import os
import queue
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..configuration_llama_encoder import BASE_FAMILIES
from ..errors import InputError, MissingDependencyError, MissingInputError, VerificationError
from ..modeling_llama_encoder import is_blank
from ..prompts import choose_prompt

logger = logging.getLogger(__name__)

PYTHON_VARIABLE = "LLAMA_ENCODER_VLLM_PYTHON"
INSTALL_HINT = (
    "bash scripts/setup_vllm_env.sh, then set LLAMA_ENCODER_VLLM_PYTHON=.venv-vllm/bin/python (or pass "
    "--vllm-python / python=)"
)
# our pooling_mode -> vLLM's sequence pooling type; the other modes have no vLLM equivalent (docs/ENGINES.md)
VLLM_POOLING = {"mean": "MEAN", "last_token": "LAST"}
DEFAULT_TIMEOUT = 1800.0
DEFAULT_KV_CACHE_GIB = 4  # VLLM_CPU_KVCACHE_SPACE unless the environment sets it (see _child_environment)
_SHUTDOWN_GRACE = 30.0  # seconds the child gets to shut vLLM down cleanly before its process group is killed
_LOG_TAIL_LINES = 25

_CHILD_SCRIPT = r'''
"""vLLM embedding server for llama_encoder.engines.vllm (standard library, numpy and vllm only).

argv[1]: JSON {"model", "dtype", "enforce_eager", "pooler"}; "pooler" ({"pooling": "MEAN"|"LAST", "normalize"}
or null) is passed to vLLM as its PoolerConfig. Replies (JSON lines) go to the original stdout; stdout is then
pointed at stderr so that vLLM's output cannot mix with them. Requests: JSON lines on stdin, {"id", "texts", "out"}
or {"op": "close"}; EOF ends the loop too.
"""
import json
import os
import sys
import time
import traceback


def main():
    replies = os.fdopen(os.dup(1), "w", encoding="utf-8")
    os.dup2(2, 1)

    def send(**message):
        replies.write(json.dumps(message) + "\n")
        replies.flush()

    config = json.loads(sys.argv[1])
    try:
        import numpy as np
        import vllm
        from vllm import LLM
    except ImportError as exc:
        traceback.print_exc()
        send(event="error", kind="import", message=f"{type(exc).__name__}: {exc}")
        return 3
    start = time.perf_counter()
    try:
        options = {}
        if config.get("pooler"):
            from vllm.config import PoolerConfig

            options["pooler_config"] = PoolerConfig(seq_pooling_type=config["pooler"]["pooling"],
                                                    use_activation=config["pooler"]["normalize"])
        llm = LLM(model=config["model"], runner="pooling", dtype=config["dtype"],
                  enforce_eager=config["enforce_eager"], seed=0, **options)
        model_config = llm.llm_engine.model_config
        pooler = model_config.pooler_config
        info = {
            "vllm_version": getattr(vllm, "__version__", None),
            "architecture": model_config.architecture,
            "is_causal": bool(getattr(model_config.hf_config, "is_causal", True)),
            "pooling_type": None if pooler is None else pooler.seq_pooling_type,
            "normalize": None if pooler is None else pooler.use_activation,
            "max_model_len": model_config.max_model_len,
            "dimension": model_config.get_hidden_size(),
            "dtype": str(model_config.dtype).replace("torch.", ""),
            "startup_seconds": round(time.perf_counter() - start, 3),
        }
    except Exception as exc:
        traceback.print_exc()
        send(event="error", kind="load", message=f"{type(exc).__name__}: {exc}")
        return 1
    send(event="ready", info=info)
    truncation = {"truncate_prompt_tokens": model_config.max_model_len, "truncation_side": "right"}
    for line in sys.stdin:
        if not line.strip():
            continue
        request = json.loads(line)
        if request.get("op") == "close":
            break
        try:
            start = time.perf_counter()
            outputs = llm.embed(request["texts"], use_tqdm=False, tokenization_kwargs=truncation)
            array = np.asarray([output.outputs.embedding for output in outputs], dtype=np.float32)
            part = request["out"] + ".part"
            with open(part, "wb") as handle:
                np.save(handle, array, allow_pickle=False)
            os.replace(part, request["out"])
        except Exception as exc:
            traceback.print_exc()
            send(event="error", kind="embed", id=request.get("id"), message=f"{type(exc).__name__}: {exc}")
            return 1
        send(event="done", id=request["id"], rows=int(array.shape[0]),
             seconds=round(time.perf_counter() - start, 3))
    return 0


if __name__ == "__main__":
    sys.exit(main())
'''


def find_vllm_python(explicit: str | os.PathLike | None = None) -> str | None:
    """The interpreter that runs vLLM: `explicit`, else `$LLAMA_ENCODER_VLLM_PYTHON`, else this interpreter when it
    can import vllm, else None (not checked further: `VllmEmbedder` says what is wrong with it)."""
    if explicit:
        return str(explicit)
    if os.environ.get(PYTHON_VARIABLE):
        return os.environ[PYTHON_VARIABLE]
    try:
        found = importlib.util.find_spec("vllm") is not None
    except (ImportError, ValueError):
        found = False
    return sys.executable if found else None


def _resolve_python(python: str | os.PathLike | None) -> str:
    chosen = find_vllm_python(python)
    if chosen is None:
        raise MissingDependencyError(
            f"vLLM is not installed in this interpreter and {PYTHON_VARIABLE} is not set: {INSTALL_HINT}."
        )
    found = shutil.which(chosen)
    if found is None:
        raise MissingDependencyError(f"The vLLM interpreter {chosen!r} does not exist or is not executable: "
                                     f"{INSTALL_HINT}.")
    return os.path.abspath(found)  # not resolved: a venv's python is a symlink that must stay one


def _cpu_ids() -> list[int]:
    if hasattr(os, "sched_getaffinity"):
        return sorted(os.sched_getaffinity(0))
    return list(range(os.cpu_count() or 1))


def _child_environment(threads: int | None) -> dict[str, str]:
    env = dict(os.environ)
    env["HF_HUB_OFFLINE"] = "1"
    env.setdefault("VLLM_NO_USAGE_STATS", "1")
    # Without a fixed KV-cache size, vLLM's CPU backend reserves 92% of the machine's RAM and refuses to start when
    # anything else uses more than 8% of it ("Available memory ... is less than desired CPU memory utilization").
    # Embedding needs a cache of one batch only; DEFAULT_KV_CACHE_GIB holds 8192 tokens of an 8B Llama in float32.
    if not env.get("VLLM_CPU_KVCACHE_SPACE"):
        env["VLLM_CPU_KVCACHE_SPACE"] = str(DEFAULT_KV_CACHE_GIB)
    cpus = _cpu_ids()
    if threads is not None:
        if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
            raise InputError(f"threads must be a positive integer; got {threads!r}.")
        if threads > len(cpus):
            raise InputError(f"threads={threads} but this process may use {len(cpus)} CPU(s) ({cpus}); give at "
                             f"most {len(cpus)}.")
    if threads is not None or "VLLM_CPU_OMP_THREADS_BIND" not in os.environ:
        env["VLLM_CPU_OMP_THREADS_BIND"] = ",".join(str(cpu) for cpu in cpus[: threads or len(cpus)])
        env["VLLM_CPU_NUM_OF_RESERVED_CPU"] = "0"
    return env


def _log_tail(path: Path | None) -> str:
    if path is None or not path.is_file():
        return "(no log)"
    lines = [line for line in path.read_text(errors="replace").splitlines() if line.strip()]
    return "\n".join(lines[-_LOG_TAIL_LINES:]) or "(empty log)"


_LIVE: set[VllmEmbedder] = set()


@atexit.register
def _close_all() -> None:
    for embedder in list(_LIVE):
        embedder.close()


def pooler_settings(config: dict) -> dict | None:
    """The pooling vLLM must be told for the native checkpoint whose `config.json` is `config`: None for
    `LlamaBidirectionalModel` (vLLM reads the config's `pooling` key), else `{"pooling": "MEAN"|"LAST", "normalize":
    bool}` for vLLM's `PoolerConfig` (its other pooling architectures take the pooling from the Sentence Transformers
    files when there are stock ones, and silently pool the last token otherwise)."""
    architectures = config.get("architectures") or []
    mode = config.get("pooling_mode")  # absent: not a checkpoint of ours, vLLM decides
    if "LlamaBidirectionalModel" in architectures or mode not in VLLM_POOLING:
        return None
    return {"pooling": VLLM_POOLING[mode], "normalize": bool(config.get("normalize_embeddings", True))}


class VllmEmbedder:
    """One vLLM process serving embeddings of a local checkpoint folder, until `close()` (or the `with` block ends).

    `start()` loads the model (also done by the first `embed`) and returns `info`: `vllm_version`, `architecture`
    (vLLM's resolved class), `is_causal` (as vLLM's config has it), `pooling_type` (vLLM's sequence pooling: MEAN,
    LAST, CLS), `normalize` (vLLM's `use_activation`), `max_model_len`, `dimension`, `dtype`, `startup_seconds`,
    `threads` (the CPUs bound; None where the environment chose). `embed(texts)` returns float32 `(len(texts), dim)`.
    `timeout` (seconds) bounds the start-up and each `embed` call; past it the process group is killed and
    `VerificationError` raised. A missing or broken vLLM raises `MissingDependencyError`; a folder vLLM cannot load,
    or a failed embed, `VerificationError` with the tail of vLLM's log.
    """

    def __init__(
        self,
        folder: str | os.PathLike,
        *,
        python: str | os.PathLike | None = None,
        dtype: str = "float32",
        threads: int | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        enforce_eager: bool = True,
    ):
        self.folder = str(Path(folder).absolute())
        if not Path(self.folder, "config.json").is_file():
            raise MissingInputError(f"{self.folder} has no config.json; give a checkpoint folder.")
        self.python = _resolve_python(python)
        self.dtype = dtype
        self.enforce_eager = bool(enforce_eager)
        self.timeout = float(timeout)
        self._env = _child_environment(threads)
        self.threads = threads
        self.info: dict | None = None
        self._process: subprocess.Popen | None = None
        self._dir: Path | None = None
        self._log: Path | None = None
        self._replies: queue.Queue = queue.Queue()
        self._next_id = 0

    def __enter__(self) -> VllmEmbedder:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def start(self) -> dict:
        """Start vLLM and load the folder (if not done yet); returns `info`."""
        if self.info is not None:
            return self.info
        if self._process is not None:
            raise VerificationError("This vLLM process failed earlier; create a new VllmEmbedder.")
        self._dir = Path(tempfile.mkdtemp(prefix="llama-encoder-vllm-"))
        script = self._dir / "vllm_embed_server.py"
        script.write_text(_CHILD_SCRIPT, encoding="utf-8")
        self._log = self._dir / "vllm.log"
        saved = json.loads(Path(self.folder, "config.json").read_text(encoding="utf-8"))
        config = {"model": self.folder, "dtype": self.dtype, "enforce_eager": self.enforce_eager,
                  "pooler": pooler_settings(saved)}
        logger.info("Starting vLLM (%s) on %s, dtype %s, %s", self.python, self.folder, self.dtype,
                    "eager" if self.enforce_eager else "compiled")
        with self._log.open("wb") as log:
            self._process = subprocess.Popen(
                [self.python, str(script), json.dumps(config)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                stderr=log, env=self._env, cwd=self._dir, start_new_session=True,
            )
        _LIVE.add(self)
        self._replies = queue.Queue()
        threading.Thread(target=self._read_replies, args=(self._process.stdout, self._replies), daemon=True,
                         name="vllm-replies").start()
        try:
            reply = self._receive(time.monotonic() + self.timeout, "start up")
        except BaseException:  # Ctrl-C included: nothing to wait for
            self.close(grace=0)
            raise
        if reply.get("event") != "ready":
            self._fail(reply, "start up")
        self.info = {**reply["info"], "threads": self.threads}
        bind = self._env.get("VLLM_CPU_OMP_THREADS_BIND")
        info = self.info
        logger.info("vLLM %s ready in %.1f s: %s, is_causal %s, pooling %s, normalize %s, max_model_len %s, CPUs %s",
                    info["vllm_version"], info["startup_seconds"], info["architecture"], info["is_causal"],
                    info["pooling_type"], info["normalize"], info["max_model_len"], bind)
        return self.info

    def embed(self, texts: Sequence[str], *, timeout: float | None = None) -> np.ndarray:
        """Embeddings of `texts` (each embedded as given: put any prompt in front yourself), float32 (n, dim). An
        empty string is refused before anything is sent (vLLM would fail on it); `VllmEncoder` handles blank texts."""
        texts = list(texts)
        if not all(isinstance(text, str) for text in texts):
            raise InputError("embed takes a list of strings.")
        if "" in texts:
            raise InputError(f"Text {texts.index('')} is empty, which vLLM refuses; remove it (VllmEncoder.encode "
                             "gives blank texts the zero vector).")
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        self.start()
        if not texts:
            return np.zeros((0, self.info["dimension"]), dtype=np.float32)
        self._next_id += 1
        out = self._dir / f"request-{self._next_id}.npy"
        request = json.dumps({"id": self._next_id, "texts": texts, "out": str(out)}) + "\n"
        try:
            self._process.stdin.write(request.encode("utf-8"))
            self._process.stdin.flush()
            reply = self._receive(deadline, f"embed {len(texts)} texts")
            if reply.get("event") != "done" or reply.get("id") != self._next_id:
                self._fail(reply, f"embed {len(texts)} texts")
            array = np.load(out, allow_pickle=False)
            out.unlink()
            logger.debug("vLLM embedded %d texts in %.2f s", len(texts), reply.get("seconds", float("nan")))
        except BrokenPipeError:
            self._fail({}, f"embed {len(texts)} texts")
        except BaseException:
            self.close(grace=0)
            raise
        if array.dtype != np.float32 or array.shape[0] != len(texts):
            self.close()
            raise VerificationError(f"vLLM returned {array.dtype} {array.shape} for {len(texts)} texts.")
        return array

    def close(self, grace: float = _SHUTDOWN_GRACE) -> None:
        """Stop vLLM: ask the child to exit (waiting up to `grace` seconds), then kill its whole process group;
        remove the temporary files."""
        process, self._process = self._process, None
        _LIVE.discard(self)
        if process is not None:
            start = time.monotonic()
            try:
                try:
                    process.stdin.write(b'{"op": "close"}\n')
                    process.stdin.close()
                except OSError:
                    pass
                try:
                    process.wait(timeout=grace)
                except subprocess.TimeoutExpired:
                    if grace:
                        logger.warning("vLLM did not exit within %.0f s of being asked to; killing it", grace)
            finally:
                _kill_group(process)
                logger.debug("vLLM stopped in %.1f s", time.monotonic() - start)
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None
        self.info = None

    @staticmethod
    def _read_replies(stream, replies: queue.Queue) -> None:
        for line in stream:
            replies.put(line.decode("utf-8", errors="replace"))
        replies.put(None)  # EOF

    def _receive(self, deadline: float, doing: str) -> dict:
        """The child's next reply; raises if it exits first or the deadline passes (the group is killed then)."""
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                tail = _log_tail(self._log)
                self.close(grace=0)
                raise VerificationError(f"vLLM did not {doing} within its timeout ({self.timeout:.0f} s) on "
                                        f"{self.folder}; its processes were killed. vLLM's log ends:\n{tail}")
            try:
                line = self._replies.get(timeout=min(remaining, 1.0))
            except queue.Empty:
                if self._process is None or self._process.poll() is None:
                    continue
                try:  # it exited: a last reply may still be on its way through the pipe
                    line = self._replies.get(timeout=1.0)
                except queue.Empty:
                    line = None
            if line is None:
                return {}
            try:
                message = json.loads(line)
            except json.JSONDecodeError:
                logger.debug("vLLM child: %s", line.rstrip())
                continue
            if isinstance(message, dict):
                return message

    def _fail(self, reply: dict, doing: str):
        tail = _log_tail(self._log)
        process = self._process
        self.close()
        code = None if process is None else process.returncode
        if reply.get("kind") == "import":
            raise MissingDependencyError(f"vLLM cannot be imported by {self.python} ({reply.get('message')}): "
                                         f"{INSTALL_HINT}. Its output ends:\n{tail}")
        what = reply.get("message") or f"the vLLM process exited (code {code}) without a reply"
        raise VerificationError(f"vLLM could not {doing} with {self.folder}: {what}. vLLM's log ends:\n{tail}")


def _kill_group(process: subprocess.Popen) -> None:
    """SIGTERM, then SIGKILL, to the process group of `process` (it leads its own session)."""
    pgid = process.pid
    for sig, wait in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            break
        except PermissionError:  # the group id was reused by someone else's processes: leave them
            break
        end = time.monotonic() + wait
        while time.monotonic() < end:
            if process.poll() is None:
                time.sleep(0.1)
                continue
            try:
                os.killpg(pgid, 0)
            except (ProcessLookupError, PermissionError):
                return
            time.sleep(0.1)
    try:
        process.wait(timeout=5)
    except subprocess.TimeoutExpired:
        logger.warning("vLLM process %d did not die after SIGKILL", process.pid)


@dataclass
class VllmResult:
    """What `embed_with_vllm` returns: float32 `embeddings` (n, dim) and `info` (see `VllmEmbedder`, plus
    `embed_seconds`)."""

    embeddings: np.ndarray
    info: dict = field(default_factory=dict)


def embed_with_vllm(
    folder: str | os.PathLike,
    texts: Sequence[str],
    *,
    python: str | os.PathLike | None = None,
    dtype: str = "float32",
    threads: int | None = None,
    timeout: float = DEFAULT_TIMEOUT,
    enforce_eager: bool = True,
) -> VllmResult:
    """Embed `texts` (as given: any prompt already in front) with vLLM from the local checkpoint `folder`, in a
    child process that is gone when this returns. `python`: the vLLM interpreter (default `find_vllm_python()`);
    `threads`: CPUs for vLLM's OpenMP threads (default all this process may use); `timeout`: seconds for the whole
    call, start-up included. See `VllmEmbedder` for `info` and the errors."""
    deadline = time.monotonic() + timeout
    with VllmEmbedder(folder, python=python, dtype=dtype, threads=threads, timeout=timeout,
                      enforce_eager=enforce_eager) as embedder:
        info = dict(embedder.start())
        start = time.perf_counter()
        embeddings = embedder.embed(texts, timeout=max(deadline - time.monotonic(), 0.001))
        info["embed_seconds"] = round(time.perf_counter() - start, 3)
    return VllmResult(embeddings, info)


def _local_folder(checkpoint: str) -> Path:
    """A local folder as is; a Hub repo id downloaded (the child runs offline)."""
    path = Path(checkpoint)
    if path.is_dir():
        return path.absolute()
    if path.exists():
        raise InputError(f"{checkpoint} is a file; give a checkpoint folder or a Hub repo id.")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(checkpoint))
    except Exception as exc:  # not a repo id, not found, no network: all mean the same to the user
        raise MissingInputError(f"{checkpoint} is neither a local folder nor a Hub repo that could be downloaded "
                                f"({type(exc).__name__}: {exc}).") from None


class VllmEncoder:
    """What `embed_corpus` needs of an encoder (`encode`, `prompts`, `instruction_prompt`, `name_or_path`), backed by
    a `VllmEmbedder` started on the first `encode` and kept until `close()`.

    Only native checkpoints (config.json `model_type` of a decoder family such as "llama", written by `llama-encoder
    convert --format native`) with mean or last_token pooling; checked before vLLM starts. Once vLLM has started, its
    resolved attention, pooling and normalisation are checked against the checkpoint's (`VerificationError` if they
    differ).
    """

    engine = "vllm"

    def __init__(
        self,
        checkpoint: str | os.PathLike,
        *,
        python: str | os.PathLike | None = None,
        dtype: str = "float32",
        threads: int | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        enforce_eager: bool = True,
    ):
        from ..configuration_llama_encoder import DEFAULT_INSTRUCTION_TEMPLATE

        self.name_or_path = str(checkpoint)
        folder = _local_folder(self.name_or_path)
        config_file = folder / "config.json"
        if not config_file.is_file():
            raise MissingInputError(f"{checkpoint} has no config.json; give a folder written by "
                                    "`llama-encoder convert --format native`.")
        config = json.loads(config_file.read_text())
        if config.get("model_type") not in BASE_FAMILIES:
            raise InputError(
                f"{checkpoint} holds a {config.get('model_type')!r} model (the remote-code layout), which vLLM runs "
                "only through our remote code; --engine vllm needs an engine-native checkpoint: convert it with "
                "`llama-encoder convert --format native`."
            )
        mode = config.get("pooling_mode")
        if mode not in VLLM_POOLING:
            raise InputError(
                f"{checkpoint} has pooling_mode {mode!r}; vLLM runs only {' and '.join(VLLM_POOLING)} pooling like "
                "the checkpoint's model: use --engine transformers."
            )
        self.pooling_mode = mode
        self.normalize = bool(config.get("normalize_embeddings", True))
        self.instruction_template = config.get("instruction_template") or DEFAULT_INSTRUCTION_TEMPLATE
        self.dimension = config.get("hidden_size")
        st_file = folder / "config_sentence_transformers.json"
        self.prompts = dict(json.loads(st_file.read_text()).get("prompts", {})) if st_file.is_file() else {}
        self.model_dtype = dtype
        self._embedder = VllmEmbedder(folder, python=python, dtype=dtype, threads=threads, timeout=timeout,
                                      enforce_eager=enforce_eager)
        self._warned_prompt = False

    def __enter__(self) -> VllmEncoder:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    @property
    def info(self) -> dict | None:
        """What vLLM resolved (see `VllmEmbedder`), once started."""
        return self._embedder.info

    def instruction_prompt(self, instruction: str) -> str:
        """The prompt an instruction becomes under the checkpoint's `instruction_template`."""
        from ..configuration_llama_encoder import fill_instruction_template

        return fill_instruction_template(self.instruction_template, instruction)

    def start(self) -> dict:
        """Start vLLM (if not yet) and check that it runs the checkpoint as the checkpoint says."""
        if self._embedder.info is not None:
            return self._embedder.info
        info = self._embedder.start()
        problems = []
        if info["is_causal"]:
            problems.append("causal attention (is_causal is not false)")
        if info["pooling_type"] != VLLM_POOLING[self.pooling_mode]:
            problems.append(f"pooling {info['pooling_type']} (the checkpoint's {self.pooling_mode} is "
                            f"{VLLM_POOLING[self.pooling_mode]})")
        if info["normalize"] is not None and bool(info["normalize"]) != self.normalize:
            problems.append(f"normalisation {info['normalize']} (the checkpoint's is {self.normalize})")
        if problems:
            self.close()
            raise VerificationError(f"vLLM runs {self.name_or_path} with {'; '.join(problems)}: its embeddings "
                                    "would not be the checkpoint's. Re-convert it with `llama-encoder convert "
                                    "--format native`, or use --engine transformers.")
        return info

    def encode(self, texts: Sequence[str], *, prompt: str | None = None, prompt_name: str | None = None,
               instruction: str | None = None, batch_tokens: int | None = None,
               show_progress: bool | None = None) -> np.ndarray:
        """Embeddings of `prompt + text` for each text (at most one of `prompt`, `prompt_name`, `instruction`),
        float32 (n, dim). vLLM batches by itself: `batch_tokens` and `show_progress` are ignored. A blank text (empty
        or whitespace only) gets the zero vector without going to vLLM, as `Encoder.encode` gives it; one warning
        counts them."""
        prompt = choose_prompt(self.prompts, self.instruction_prompt, prompt=prompt, prompt_name=prompt_name,
                               instruction=instruction) or ""
        texts = list(texts)
        if not all(isinstance(text, str) for text in texts):
            raise InputError("encode takes a list of strings.")
        if prompt and self.pooling_mode == "mean" and not self._warned_prompt:
            self._warned_prompt = True
            logger.warning(
                "vLLM pools every input token, the prompt's too (%r); this mean-pooling checkpoint leaves the prompt "
                "out, so these embeddings differ from --engine transformers (cosine 0.75-0.91 measured for "
                "queries). Documents without a prompt, and last_token checkpoints, are unaffected.", prompt[:60])
        self.start()
        kept = [index for index, text in enumerate(texts) if not is_blank(text)]
        if len(kept) < len(texts):
            logger.warning("%d of %d inputs are empty or blank; each gets the zero vector as its embedding.",
                           len(texts) - len(kept), len(texts))
        embeddings = self._embedder.embed([prompt + texts[index] for index in kept])
        # vLLM's use_activation is None when modules.json names no stock Normalize module: check the output itself
        unit = np.abs(np.linalg.norm(embeddings.astype(np.float64), axis=1) - 1) < 1e-4
        if len(embeddings) and (not unit.all() if self.normalize else unit.all()):
            self.close()
            raise VerificationError(
                f"vLLM's embeddings of {self.name_or_path} are {'not ' if self.normalize else ''}unit vectors, but "
                f"the checkpoint says normalize_embeddings={self.normalize}; its modules.json should "
                f"{'list' if self.normalize else 'not list'} a sentence_transformers.models.Normalize module."
            )
        output = np.zeros((len(texts), embeddings.shape[1]), dtype=np.float32)
        output[kept] = embeddings
        return output

    def close(self) -> None:
        """Stop vLLM (a later `encode` would start it again)."""
        self._embedder.close()
