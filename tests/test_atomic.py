"""The writer helper leaves the process umask alone: another thread creating a file at the same moment gets the
permissions it would get anyway, and outputs get the usual ones."""

import os
import stat
import threading

import pytest

from llama_encoder import atomic


@pytest.fixture()
def umask_027():
    previous = os.umask(0o027)
    yield 0o027
    os.umask(previous)


def test_writers_never_change_the_process_umask(tmp_path, monkeypatch, umask_027):
    calls = []
    real = os.umask

    def spy(mask):
        calls.append(mask)
        return real(mask)

    monkeypatch.setattr(os, "umask", spy)
    with atomic.atomic_directory(tmp_path / "folder") as tmp:
        (tmp / "inside").write_text("x")
    with atomic.atomic_directory(tmp_path / "folder", overwrite=True) as tmp:  # the swap path
        (tmp / "inside").write_text("y")
    with atomic.atomic_file(tmp_path / "file") as tmp:
        tmp.write_text("x")
    assert [mask for mask in calls if mask != umask_027] == [], "the umask was changed, if only for a moment"


def test_outputs_get_the_permissions_the_umask_gives(tmp_path, umask_027):
    with atomic.atomic_directory(tmp_path / "folder") as tmp:
        (tmp / "inside").write_text("x")
    with atomic.atomic_file(tmp_path / "file") as tmp:
        tmp.write_text("x")
    assert stat.S_IMODE((tmp_path / "folder").stat().st_mode) == 0o777 & ~umask_027  # 0o750
    assert stat.S_IMODE((tmp_path / "file").stat().st_mode) == 0o666 & ~umask_027  # 0o640


def test_files_created_by_another_thread_meanwhile_are_never_world_writable(tmp_path, umask_027):
    stop = threading.Event()

    def write_outputs():
        number = 0
        while not stop.is_set():
            with atomic.atomic_file(tmp_path / "busy" / f"out-{number % 4}", overwrite=True) as tmp:
                tmp.write_text("x")
            number += 1

    writer = threading.Thread(target=write_outputs)
    writer.start()
    try:
        (tmp_path / "mine").mkdir()
        modes = []
        for number in range(300):
            path = tmp_path / "mine" / f"{number}"
            path.write_text("x")
            modes.append(stat.S_IMODE(path.stat().st_mode))
    finally:
        stop.set()
        writer.join()
    assert set(modes) == {0o640}
