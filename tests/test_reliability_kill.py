"""Nothing lost: a run killed with SIGKILL at any point, or stopped by a full disk, leaves the previous good state or
the new complete one under the output's name, never a partial output.

A child process runs `convert` or `embed_corpus` with one function wrapped to pause at a chosen point (and say so
in a marker file); the test kills it there with SIGKILL and inspects the output. Disk-full is simulated by making a
write raise `OSError(ENOSPC)`.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from safetensors import safe_open

from llama_encoder import atomic
from llama_encoder.conversion_scripts.convert import convert
from llama_encoder.conversion_scripts.push import check_verified_folder
from llama_encoder.encoding import Encoder
from llama_encoder.encoding.embed import embed_corpus
from llama_encoder.weights import streaming
from tests.tiny import save_tiny_base

REPO_ROOT = Path(__file__).resolve().parents[1]

# Shared by both children: `pause_at(point)` says where it stopped and waits for the kill.
HOOKS = textwrap.dedent(
    """
    import contextlib, sys, time
    from pathlib import Path
    POINT, MARKER = sys.argv[1], Path(sys.argv[2])

    def pause_at(point):
        if point == POINT:
            MARKER.write_text(point)
            time.sleep(300)  # the parent kills us here

    def pause_before(module, name, point):
        real = getattr(module, name)
        def wrapper(*args, **kwargs):
            pause_at(point)
            return real(*args, **kwargs)
        setattr(module, name, wrapper)

    def pause_after(module, name, point):
        real = getattr(module, name)
        def wrapper(*args, **kwargs):
            result = real(*args, **kwargs)
            pause_at(point)
            return result
        setattr(module, name, wrapper)
    """
)

CONVERT_CHILD = HOOKS + textwrap.dedent(
    """
    from llama_encoder import atomic
    from llama_encoder.conversion_scripts import convert as convert_module
    from llama_encoder.weights import streaming
    out, base = sys.argv[3], sys.argv[4]

    written = []
    real_write_tensor = streaming._write_tensor
    def write_tensor(handle, tensor):  # a few tensors into the first shard, the rest not yet
        real_write_tensor(handle, tensor)
        handle.flush()
        written.append(tensor)
        if len(written) == 3:
            pause_at("merging")
    streaming._write_tensor = write_tensor
    pause_before(convert_module, "verify_checkpoint", "verifying")
    pause_before(atomic, "_exchange", "swapping")
    pause_after(atomic, "_exchange", "swapped")
    convert_module.convert(out=out, base=base, pooling="bos", overwrite=True, format="remote-code")
    MARKER.write_text("finished")
    """
)


def _tree(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _run_until(child_script: str, point: str, tmp_path: Path, *args: str) -> None:
    """Start the child, wait until it pauses at `point`, and SIGKILL it there."""
    marker = tmp_path / "marker"
    child = subprocess.Popen([sys.executable, "-c", child_script, point, str(marker), *args], cwd=REPO_ROOT,
                             stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 180
        while not marker.exists():
            assert child.poll() is None, f"the child ended before {point}: {child.stderr.read().decode()[-3000:]}"
            assert time.monotonic() < deadline, f"the child never reached {point}"
            time.sleep(0.05)
        assert marker.read_text() == point
        os.kill(child.pid, signal.SIGKILL)
    finally:
        if child.poll() is None:
            child.kill()
        child.wait()
        child.stderr.close()
    assert child.returncode == -signal.SIGKILL


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory) -> Path:
    return save_tiny_base(tmp_path_factory.mktemp("base"))


@pytest.fixture(scope="module")
def old_checkpoint(tiny_base, tmp_path_factory) -> Path:
    """The previous good state: a verified mean-pooling checkpoint (the child writes a bos-pooling one)."""
    return convert(out=tmp_path_factory.mktemp("old") / "encoder", base=str(tiny_base)).out_dir


def _assert_new_and_complete(out: Path) -> None:
    check_verified_folder(out)  # every file present, byte for byte as verified
    assert json.loads((out / "config.json").read_text())["pooling_mode"] == "bos"


@pytest.mark.parametrize(("point", "survives"), [
    ("merging", "old"),  # the first output shard half-written in the temporary folder
    ("verifying", "old"),  # the new folder written, not yet verified
    ("swapping", "old"),  # the new folder complete and verified, about to replace the old one
    ("swapped", "new"),  # the new folder in place, the old one not yet deleted
])
def test_convert_killed_keeps_the_old_checkpoint_or_the_complete_new_one(point, survives, tiny_base, old_checkpoint,
                                                                         tmp_path):
    out = shutil.copytree(old_checkpoint, tmp_path / "work" / "encoder")
    before = _tree(out)
    _run_until(CONVERT_CHILD, point, tmp_path, str(out), str(tiny_base))
    if survives == "old":
        assert _tree(out) == before
    else:
        _assert_new_and_complete(out)
    # Only temporary siblings (the new folder, or the old one it replaced) are left beside it.
    leftovers = {p.name for p in out.parent.iterdir()} - {"encoder"}
    assert all(name.startswith(".tmp-encoder-") for name in leftovers), leftovers


def test_convert_killed_before_the_first_output_leaves_nothing_and_can_rerun(tiny_base, tmp_path):
    out = tmp_path / "work" / "encoder"
    out.parent.mkdir()
    _run_until(CONVERT_CHILD, "merging", tmp_path, str(out), str(tiny_base))
    assert not out.exists()
    # the leftover temporary folder is in nobody's way
    convert(out=out, base=str(tiny_base), pooling="bos", format="remote-code")
    _assert_new_and_complete(out)


EMBED_CHILD = HOOKS + textwrap.dedent(
    """
    import numpy as np
    from llama_encoder.encoding import Encoder
    from llama_encoder.encoding import embed as embed_module
    checkpoint, corpus, out = sys.argv[3:6]

    real_save = np.save
    def save(handle, array, **kwargs):  # shard 1's .npy half-written to its temporary file
        if len(SHARDS) == 2 and POINT == "npy-half-written":
            data = array.tobytes()
            handle.write(data[: len(data) // 2])
            handle.flush()
            pause_at("npy-half-written")
        return real_save(handle, array, **kwargs)
    np.save = save

    real_atomic_file = embed_module.atomic_file
    @contextlib.contextmanager
    def atomic_file(dest, **kwargs):  # complete in the temporary file, not yet renamed
        with real_atomic_file(dest, **kwargs) as tmp:
            yield tmp
            pause_at({"shard-00001.ids.json": "ids-written", "manifest.json": "manifest-written"}.get(Path(dest).name))
    embed_module.atomic_file = atomic_file

    SHARDS = []
    encoder = Encoder.from_pretrained(checkpoint, device="cpu", dtype="float32")
    encode = encoder.encode
    def keep(texts, **kwargs):
        SHARDS.append(encode(texts, **kwargs))
        return SHARDS[-1]
    encoder.encode = keep
    embed_module.embed_corpus(encoder, corpus, out, shard_size=4, show_progress=False)
    MARKER.write_text("finished")
    """
)


@pytest.fixture(scope="module")
def encoder(tiny_checkpoint) -> Encoder:
    return Encoder.from_pretrained(tiny_checkpoint, device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def corpus_and_reference(encoder, tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("corpus")
    corpus = root / "corpus.txt"
    corpus.write_text("\n".join(f"text number {i} about the cat and the dog" for i in range(14)) + "\n")
    embed_corpus(encoder, corpus, root / "reference", shard_size=4, show_progress=False)
    return corpus, root / "reference"


@pytest.mark.parametrize(("point", "done"), [
    ("ids-written", ["shard-00000"]),  # shard 1's ids complete in a temporary file, not renamed
    ("npy-half-written", ["shard-00000"]),  # shard 1's ids in place, its .npy half-written to a temporary file
    ("manifest-written", ["shard-00000", "shard-00001", "shard-00002", "shard-00003"]),
])
def test_embed_killed_keeps_only_complete_shards_and_resumes_identically(point, done, tiny_checkpoint, encoder,
                                                                        corpus_and_reference, tmp_path):
    corpus, reference = corpus_and_reference
    out = tmp_path / "embeddings"
    _run_until(EMBED_CHILD, point, tmp_path, str(tiny_checkpoint), str(corpus), str(out))
    finished = sorted(p.name.removesuffix(".npy") for p in out.glob("shard-*.npy"))
    assert finished == done
    for path in out.glob("shard-*"):  # whatever has its final name is complete and right
        assert path.read_bytes() == (reference / path.name).read_bytes(), path.name
    assert not (out / "manifest.json").exists()

    summary = embed_corpus(encoder, corpus, out, shard_size=4, show_progress=False)
    assert summary["skipped"] == done and summary["manifest"]
    # A resumed run removes its shards' temporaries; a half-written manifest's may belong to another process of
    # the job, so it stays (harmless: manifest.json is only ever renamed into place complete).
    leftovers = {p.name for p in out.iterdir()} - {p.name for p in reference.iterdir()}
    assert all(name.startswith(".tmp-manifest.json-") for name in leftovers), leftovers
    for path in reference.iterdir():
        assert (out / path.name).read_bytes() == path.read_bytes(), path.name


@pytest.mark.parametrize("swap", ["renameat2", "two renames"])
def test_overwrite_replaces_a_folder_whole_with_either_way_of_swapping(swap, tmp_path, monkeypatch):
    if swap == "two renames":
        monkeypatch.setattr(atomic, "_RENAMEAT2", None)  # as on a system without renameat2
    elif atomic._RENAMEAT2 is None:
        pytest.skip("no renameat2 on this system")
    dest = tmp_path / "out"
    dest.mkdir()
    (dest / "old.txt").write_text("old")
    with atomic.atomic_directory(dest, overwrite=True) as tmp:
        (tmp / "new.txt").write_text("new")
        assert sorted(p.name for p in dest.iterdir()) == ["old.txt"]  # untouched until the new one is complete
    assert sorted(p.name for p in dest.iterdir()) == ["new.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # the old folder is gone, no temporaries


# --- disk full ----------------------------------------------------------------------------------------------------


def _disk_full(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_disk_full_during_convert_keeps_the_old_checkpoint_and_says_how_much_was_needed(tiny_base, old_checkpoint,
                                                                                        tmp_path, monkeypatch):
    out = shutil.copytree(old_checkpoint, tmp_path / "work" / "encoder")
    before = _tree(out)
    # The merged weights in float32, counted from the base's own shards (the LM head is not part of an encoder).
    needed = 0
    for shard in tiny_base.glob("model-*.safetensors"):
        with safe_open(shard, framework="np") as handle:
            needed += sum(4 * np.prod(handle.get_slice(key).get_shape()) for key in handle.keys()
                          if not key.startswith("lm_head."))
    real_write_tensor = streaming._write_tensor
    calls = []

    def write_tensor(handle, tensor):
        calls.append(1)
        if len(calls) == 5:
            _disk_full()
        real_write_tensor(handle, tensor)

    monkeypatch.setattr(streaming, "_write_tensor", write_tensor)
    with pytest.raises(OSError) as info:
        convert(out=out, base=str(tiny_base), pooling="bos", overwrite=True, format="remote-code")
    assert info.value.errno == errno.ENOSPC
    message = str(info.value)
    assert f"No space left on the device while writing {out}: it needs about {needed / 1024:.1f} KiB, " in message
    assert message.endswith(" are free. Nothing was left in place; free some space or choose another output path.")
    assert _tree(out) == before
    assert sorted(p.name for p in out.parent.iterdir()) == ["encoder"]


def test_disk_full_during_embed_leaves_no_partial_shard(encoder, corpus_and_reference, tmp_path, monkeypatch):
    corpus, reference = corpus_and_reference
    out = tmp_path / "embeddings"
    real_save = np.save

    def save_half_then_fail(handle, array, **kwargs):
        handle.write(array.tobytes()[:100])
        _disk_full()

    monkeypatch.setattr(np, "save", save_half_then_fail)
    with pytest.raises(OSError) as info:
        embed_corpus(encoder, corpus, out, shard_size=4, show_progress=False)
    needed = 4 * encoder.dimension * 4 + 128  # a shard's float32 rows and the .npy header
    assert info.value.errno == errno.ENOSPC
    assert (f"No space left on the device while writing {out / 'shard-00000.npy'}: it needs about "
            f"{needed / 1024:.1f} KiB, ") in str(info.value)
    assert not list(out.glob("*.npy")) and not list(out.glob(".tmp-*"))

    monkeypatch.setattr(np, "save", real_save)  # space freed: the same command finishes the job
    embed_corpus(encoder, corpus, out, shard_size=4, show_progress=False)
    for path in reference.iterdir():
        assert (out / path.name).read_bytes() == path.read_bytes(), path.name
