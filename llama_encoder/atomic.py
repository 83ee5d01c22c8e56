"""The one writer helper: build an output in a temporary sibling, fsync it, rename it into place.

Every output of the package (checkpoints, adapters, training checkpoints, embedding shards) goes through
`atomic_directory` or `atomic_file`, so a crash at any point leaves either the previous good state or the new
complete one, never a half-written output under the final name.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import logging
import os
import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path

from .errors import AccessDeniedError, DiskFullError, IsAFolderError, NotAFolderError, OutputExistsError

logger = logging.getLogger(__name__)

_TMP_PREFIX = ".tmp-"
_AT_FDCWD = -100
_RENAME_EXCHANGE = 2  # renameat2 flag (Linux 3.15+): swap two paths in one step
try:
    _RENAMEAT2 = ctypes.CDLL(None, use_errno=True).renameat2
except (OSError, AttributeError, TypeError):  # not Linux/glibc: the two-rename fallback is used
    _RENAMEAT2 = None


def check_destination(dest: str | os.PathLike, *, overwrite: bool = False, kind: str = "directory") -> Path:
    """Refuse a destination that cannot be written, before any work starts.

    Returns the destination as an absolute `Path`. Raises `OutputExistsError` when it exists and `overwrite` is
    false, `NotADirectoryError`/`IsADirectoryError` when it is the wrong kind of thing, and `PermissionError` when
    its parent is not writable.
    """
    dest = Path(dest).expanduser().absolute()
    if dest.exists():
        if kind == "directory" and not dest.is_dir():
            raise NotAFolderError(
                f"Output path {dest} exists and is a file, not a folder. Choose another path or remove the file."
            )
        if kind == "file" and dest.is_dir():
            raise IsAFolderError(f"Output path {dest} is a folder; give a file path instead.")
        if not overwrite:
            raise OutputExistsError(
                f"Output path {dest} already exists. Pass --overwrite (overwrite=True) to replace it, "
                "or choose another path."
            )
    parent = _existing_ancestor(dest.parent)
    if not os.access(parent, os.W_OK | os.X_OK):
        raise AccessDeniedError(f"Cannot write under {parent}: permission denied. Choose a writable output path.")
    return dest


def _existing_ancestor(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _temporary_sibling(dest: Path, suffix: str = "", *, folder: bool) -> Path:
    """Create a new, uniquely named folder or empty file beside `dest` with the permissions any new file gets here.

    The mode passed to mkdir/open is filtered through the process umask by the kernel, so the umask is never read
    or changed (changing it, even for a moment, would let another thread create a world-writable file)."""
    while True:
        path = dest.parent / f"{_TMP_PREFIX}{dest.name}-{suffix}{secrets.token_hex(6)}"
        try:
            if folder:
                os.mkdir(path, 0o777)
            else:
                os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            return path
        except FileExistsError:
            continue


def _fsync_path(path: Path) -> None:
    flags = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) if path.is_dir() else os.O_RDONLY
    try:
        fd = os.open(path, flags)
    except OSError:  # some filesystems refuse to open directories; fsync is best effort there
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            _fsync_path(Path(dirpath) / name)
        _fsync_path(Path(dirpath))


def _exchange(new: Path, dest: Path) -> bool:
    """Swap `new` and `dest` atomically, so `dest` is never missing; False where the OS or filesystem cannot."""
    if _RENAMEAT2 is None:
        return False
    if _RENAMEAT2(_AT_FDCWD, os.fsencode(new), _AT_FDCWD, os.fsencode(dest), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), str(new), None, str(dest))


def _human(size: float) -> str:
    for unit in ("bytes", "KiB", "MiB"):
        if size < 1024:
            return f"{size:.0f} {unit}" if unit == "bytes" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.2f} GiB"


def explain_disk_full(exc: OSError, dest: Path, needed_bytes: int | None) -> OSError:
    if exc.errno != errno.ENOSPC:
        return exc
    free = shutil.disk_usage(_existing_ancestor(dest.parent)).free
    need = f"about {_human(needed_bytes)}" if needed_bytes else "more space"
    return DiskFullError(
        errno.ENOSPC,
        f"No space left on the device while writing {dest}: it needs {need}, {_human(free)} are free. "
        "Nothing was left in place; free some space or choose another output path.",
    )


@contextlib.contextmanager
def _removed_on_failure(remove, dest: Path, needed_bytes: int | None) -> Iterator[None]:
    """Run `remove()` (drop the temporary output) if the body fails; a full disk is explained for `dest`."""
    try:
        yield
    except OSError as exc:
        remove()
        explained = explain_disk_full(exc, dest, needed_bytes)
        if explained is exc:
            raise
        raise explained from exc
    except BaseException:
        remove()
        raise


@contextlib.contextmanager
def atomic_directory(
    dest: str | os.PathLike, *, overwrite: bool = False, needed_bytes: int | None = None
) -> Iterator[Path]:
    """Yield an empty temporary folder beside `dest`; on clean exit, fsync it and rename it to `dest`.

    On any exception the temporary folder is removed and `dest` is left as it was. With `overwrite`, an existing
    `dest` is replaced only after the new folder is complete: the two are swapped in one atomic rename (Linux
    renameat2; elsewhere the old one is moved aside, then the new one renamed in), then the old one is deleted.
    `needed_bytes`, when known, makes a disk-full error say how much space was needed.
    """
    dest = check_destination(dest, overwrite=overwrite, kind="directory")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temporary_sibling(dest, folder=True)
    with _removed_on_failure(lambda: shutil.rmtree(tmp, ignore_errors=True), dest, needed_bytes):
        yield tmp
        _fsync_tree(tmp)
        if dest.exists():
            if not overwrite:  # appeared while we worked
                raise OutputExistsError(f"Output path {dest} appeared while writing; nothing was replaced.")
            if _exchange(tmp, dest):
                shutil.rmtree(tmp, ignore_errors=True)  # it holds the old folder now
            else:  # a crash between these renames leaves the old folder under .tmp-NAME-old-*
                old = _temporary_sibling(dest, "old-", folder=True)
                os.rename(dest, old / dest.name)
                os.rename(tmp, dest)
                shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, dest)
        _fsync_path(dest.parent)
        logger.info("Wrote %s", dest)


@contextlib.contextmanager
def atomic_file(
    dest: str | os.PathLike, *, overwrite: bool = False, needed_bytes: int | None = None
) -> Iterator[Path]:
    """Yield a temporary path beside `dest` to write one file; on clean exit, fsync it and rename it to `dest`."""
    dest = check_destination(dest, overwrite=overwrite, kind="file")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temporary_sibling(dest, folder=False)
    with _removed_on_failure(lambda: tmp.unlink(missing_ok=True), dest, needed_bytes):
        yield tmp
        _fsync_path(tmp)
        os.replace(tmp, dest)
        _fsync_path(dest.parent)
