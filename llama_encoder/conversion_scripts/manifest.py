"""`verification.json`: what a checkpoint's verification found, and the sha256 and size of every other file as they
were then. `verify` writes it; `push` reads it back and refuses a folder that no longer matches it.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Callable
from pathlib import Path, PurePosixPath

from ..atomic import atomic_file
from ..errors import UnverifiedFolderError, VerificationError
from ..readers import sha256_file

VERIFICATION_FILE = "verification.json"
MANIFEST_FORMAT = 1

_CONVERT_AGAIN = "run `llama-encoder convert` again"


def folder_files(folder: str | os.PathLike) -> dict[str, int]:
    """Every file under `folder` except the top-level `verification.json`, listed the way `upload_folder` lists
    them: relative posix path -> size in bytes, sorted by path."""
    root = Path(folder).expanduser().resolve()
    return {
        path.relative_to(root).as_posix(): path.stat().st_size
        for path in sorted(root.glob("**/*"))
        if path.is_file() and path.relative_to(root).as_posix() != VERIFICATION_FILE
    }


def file_manifest(folder: str | os.PathLike) -> dict[str, dict]:
    """`folder_files` with each file's sha256: relative posix path -> `{"sha256": hex digest, "size": bytes}`."""
    root = Path(folder).expanduser().resolve()
    return {path: {"sha256": sha256_file(root / path), "size": size} for path, size in folder_files(root).items()}


def write_verification_manifest(folder: str | os.PathLike, report: dict) -> dict:
    """Write `verification.json` into `folder`: the passed `report` of `verify_checkpoint` plus `"files"`, the
    sha256 and size of every other file as it is now. Call it again after changing any file (e.g. the model card
    with the verification figures). Returns the manifest written."""
    if not report.get("passed"):
        raise VerificationError("Only a passed verification is recorded; run verify_checkpoint until it passes.")
    manifest = {**report, "files": file_manifest(folder)}
    with atomic_file(Path(folder) / VERIFICATION_FILE, overwrite=True) as tmp:
        tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return manifest


def read_manifest(path: Path) -> dict:
    """The `verification.json` at `path`, checked for the fields `push` relies on. Raises `UnverifiedFolderError`
    naming what is malformed."""
    broken = f"{path} is malformed ({{}}); re-run verification ({_CONVERT_AGAIN}) to rewrite it."
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UnverifiedFolderError(broken.format(f"not valid JSON: {exc}")) from exc
    if not isinstance(manifest, dict):
        raise UnverifiedFolderError(broken.format("not a JSON object"))
    if manifest.get("format") != MANIFEST_FORMAT:
        raise UnverifiedFolderError(broken.format(f"format {manifest.get('format')!r}, expected {MANIFEST_FORMAT}"))
    if not isinstance(manifest.get("passed"), bool):
        raise UnverifiedFolderError(broken.format("'passed' is not true or false"))
    distance = manifest.get("max_cosine_distance")
    if isinstance(distance, bool) or not isinstance(distance, (int, float)) or not math.isfinite(distance):
        raise UnverifiedFolderError(broken.format("'max_cosine_distance' is not a finite number"))
    files = manifest.get("files")
    if not isinstance(files, dict):
        raise UnverifiedFolderError(broken.format("'files' is not an object"))
    for name, entry in files.items():
        pure = PurePosixPath(name)
        if pure.is_absolute() or ".." in pure.parts or str(pure) != name or name == VERIFICATION_FILE:
            raise UnverifiedFolderError(broken.format(f"bad file path {name!r}"))
        if (
            not isinstance(entry, dict)
            or not isinstance(entry.get("sha256"), str)
            or not re.fullmatch(r"[0-9a-fA-F]{64}", entry["sha256"])
            or isinstance(entry.get("size"), bool)
            or not isinstance(entry.get("size"), int)
            or entry["size"] < 0
        ):
            raise UnverifiedFolderError(broken.format(f"entry for {name!r} needs a sha256 and a size"))
    return manifest


def changed_files(folder: Path, listed: dict[str, dict], sizes: dict[str, int],
                  on_chunk: Callable[[int], object] | None = None) -> list[str]:
    """Names of the `listed` files (path -> manifest entry) whose size (from `sizes`) or sha256 differs from the
    manifest; sizes are compared first, so a file of another size is not hashed. `on_chunk(bytes)` follows the
    hashing."""
    changed = [path for path, entry in listed.items() if sizes[path] != entry["size"]]
    for path in listed:
        if path not in changed and sha256_file(folder / path, on_chunk=on_chunk) != listed[path]["sha256"].lower():
            changed.append(path)
    return sorted(changed)


__all__ = [
    "MANIFEST_FORMAT",
    "VERIFICATION_FILE",
    "changed_files",
    "file_manifest",
    "folder_files",
    "read_manifest",
    "write_verification_manifest",
]
