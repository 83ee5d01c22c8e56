"""`push_folder` end to end against the local fake Hub, and `check_verified_folder`'s refusals."""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import numpy as np
import pytest
from huggingface_hub import constants
from safetensors.numpy import save_file

from llama_encoder.conversion_scripts.push import check_verified_folder, push_folder
from llama_encoder.errors import PushError, UnverifiedFolderError
from tests.fake_hub import (  # noqa: F401 (fake_hub_fixture registers the `fake_hub` fixture)
    FakeHub,
    NetworkGuard,
    closed_port_url,
    fake_hub_fixture,
    isolate_hub_client,
)

TOKEN = "hf_fake_write_token"
REPO = "someone/tiny-encoder"


def write_manifest(folder: Path, *, passed: bool = True) -> None:
    """Write verification.json listing every other file of `folder`, hashed here independently of the code."""
    files = {}
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder).as_posix()
        if path.is_file() and rel != "verification.json":
            data = path.read_bytes()
            files[rel] = {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
    manifest = {"format": 1, "passed": passed, "max_cosine_distance": 1.5e-4, "checks": ["cosine"], "files": files}
    (folder / "verification.json").write_text(json.dumps(manifest, indent=2))


@pytest.fixture
def checkpoint(tmp_path: Path) -> Path:
    """A verified checkpoint folder: an 11 MiB safetensors file (goes through LFS) and small text files."""
    folder = tmp_path / "checkpoint"
    (folder / "1_Pooling").mkdir(parents=True)
    weights = np.random.default_rng(0).standard_normal(11 * 2**18, dtype=np.float32)  # 11 MiB
    save_file({"embed_tokens.weight": weights.reshape(-1, 64)}, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps({"model_type": "llama_encoder", "hidden_size": 64}))
    (folder / "modeling_llama_encoder.py").write_text("class LlamaEncoderModel:\n    pass\n")
    (folder / "README.md").write_text("---\nlibrary_name: sentence-transformers\n---\n# Tiny encoder\n")
    (folder / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_lasttoken": True}))
    write_manifest(folder)
    return folder


def expected_files(folder: Path) -> list[tuple[str, int]]:
    return sorted((p.relative_to(folder).as_posix(), p.stat().st_size) for p in folder.rglob("*") if p.is_file())


@pytest.fixture
def offline_guard(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> NetworkGuard:
    """No Hub settings from this machine, and every socket connection refused and recorded."""
    isolate_hub_client(monkeypatch, tmp_path)
    return NetworkGuard(set()).install(monkeypatch)


def test_push_uploads_every_file_byte_identical(fake_hub: FakeHub, checkpoint: Path) -> None:
    result = push_folder(checkpoint, repo_id=REPO, token=TOKEN, endpoint=fake_hub.url, commit_message="first push")

    stored = fake_hub.files(REPO, "main")
    on_disk = {p.relative_to(checkpoint).as_posix(): p.read_bytes() for p in checkpoint.rglob("*") if p.is_file()}
    assert sorted(stored) == sorted(on_disk)
    for path, content in on_disk.items():
        assert stored[path].content == content, path
    assert stored["model.safetensors"].lfs and len(stored["model.safetensors"].content) > 10 * 2**20
    assert not any(f.lfs for p, f in stored.items() if p != "model.safetensors")
    assert hashlib.sha256(stored["model.safetensors"].content).hexdigest() in fake_hub.lfs_objects

    assert fake_hub.repos[REPO].private is False
    assert [(c.revision, c.summary) for c in fake_hub.commits] == [("main", "first push")]
    assert result.repo_id == REPO and result.revision == "main"
    assert result.commit_url == f"{fake_hub.url}/{REPO}/commit/{fake_hub.commits[0].oid}"
    assert result.files == expected_files(checkpoint)
    assert all(seen.authorized for seen in fake_hub.requests if seen.path.startswith("/api/"))
    assert fake_hub.unhandled == []


def test_private_flag_and_branch_reach_the_server(fake_hub: FakeHub, checkpoint: Path) -> None:
    result = push_folder(checkpoint, repo_id=REPO, private=True, revision="v1-test", token=TOKEN,
                         endpoint=fake_hub.url)

    assert fake_hub.repos[REPO].private is True
    assert fake_hub.files(REPO, "main") == {}
    branch = fake_hub.files(REPO, "v1-test")
    assert {p: f.content for p, f in branch.items()} == {
        p.relative_to(checkpoint).as_posix(): p.read_bytes() for p in checkpoint.rglob("*") if p.is_file()
    }
    assert [c.revision for c in fake_hub.commits] == ["v1-test"]
    assert "verified: max cosine distance 0.00015" in fake_hub.commits[0].summary
    assert result.revision == "v1-test"
    assert [seen.route for seen in fake_hub.requests][:2] == ["create_repo", "create_branch"]


def test_push_twice_to_an_existing_repo_and_branch(fake_hub: FakeHub, checkpoint: Path) -> None:
    push_folder(checkpoint, repo_id=REPO, revision="dev", token=TOKEN, endpoint=fake_hub.url)
    push_folder(checkpoint, repo_id=REPO, revision="dev", token=TOKEN, endpoint=fake_hub.url)

    assert [c.revision for c in fake_hub.commits] == ["dev", "dev"]
    assert sorted(fake_hub.files(REPO, "dev")) == [p for p, _ in expected_files(checkpoint)]


def test_token_from_hf_token_env(fake_hub: FakeHub, checkpoint: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    push_folder(checkpoint, repo_id=REPO, endpoint=fake_hub.url)
    assert sorted(fake_hub.files(REPO)) == [p for p, _ in expected_files(checkpoint)]


def test_token_stored_by_hf_auth_login(fake_hub: FakeHub, checkpoint: Path) -> None:
    Path(constants.HF_TOKEN_PATH).write_text(TOKEN)  # where `hf auth login` stores it (a tmp path in these tests)
    push_folder(checkpoint, repo_id=REPO, endpoint=fake_hub.url)
    assert sorted(fake_hub.files(REPO)) == [p for p, _ in expected_files(checkpoint)]


def test_wrong_token_is_refused_by_the_server(fake_hub: FakeHub, checkpoint: Path) -> None:
    with pytest.raises(PushError, match=f"cannot write to {REPO}"):
        push_folder(checkpoint, repo_id=REPO, token="hf_not_the_right_one", endpoint=fake_hub.url)
    assert fake_hub.repos == {}


def test_dry_run_lists_files_and_makes_no_request(checkpoint: Path, offline_guard: NetworkGuard) -> None:
    with FakeHub(token=TOKEN) as hub:
        result = push_folder(checkpoint, repo_id=REPO, dry_run=True, endpoint=hub.url)
        assert hub.requests == []
    assert offline_guard.attempts == []
    assert result.commit_url is None and result.revision == "main"
    assert result.files == expected_files(checkpoint)
    assert ("model.safetensors", (checkpoint / "model.safetensors").stat().st_size) in result.files


def _change_same_size(folder: Path) -> str:
    text = (folder / "config.json").read_text()
    (folder / "config.json").write_text(text.replace("64", "65"))
    return "changed: config.json"


def _change_size(folder: Path) -> str:
    (folder / "1_Pooling" / "config.json").write_text("{}")
    return "changed: 1_Pooling/config.json"


def _add_file(folder: Path) -> str:
    (folder / "notes.txt").write_text("added later")
    return "added: notes.txt"


def _remove_file(folder: Path) -> str:
    (folder / "README.md").unlink()
    return "removed: README.md"


@pytest.mark.parametrize("alter", [_change_same_size, _change_size, _add_file, _remove_file])
def test_folder_changed_after_verification_is_refused(checkpoint: Path, offline_guard: NetworkGuard, alter) -> None:
    expected = alter(checkpoint)
    with pytest.raises(UnverifiedFolderError, match="re-run verification") as info:
        push_folder(checkpoint, repo_id=REPO, token=TOKEN)
    assert expected in str(info.value)
    assert offline_guard.attempts == []


def test_every_change_is_named(checkpoint: Path) -> None:
    _change_same_size(checkpoint)
    _add_file(checkpoint)
    _remove_file(checkpoint)
    with pytest.raises(UnverifiedFolderError) as info:
        check_verified_folder(checkpoint)
    assert "added: notes.txt; removed: README.md; changed: config.json" in str(info.value)


def test_missing_verification_is_refused(checkpoint: Path, offline_guard: NetworkGuard) -> None:
    (checkpoint / "verification.json").unlink()
    with pytest.raises(FileNotFoundError, match="no verification.json.*llama-encoder convert"):
        push_folder(checkpoint, repo_id=REPO, token=TOKEN)
    assert offline_guard.attempts == []


def test_failed_verification_is_refused(checkpoint: Path) -> None:
    write_manifest(checkpoint, passed=False)
    with pytest.raises(UnverifiedFolderError, match="did not pass"):
        check_verified_folder(checkpoint)


def test_missing_folder_is_refused(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist.*llama-encoder convert"):
        check_verified_folder(tmp_path / "nowhere")


@pytest.mark.parametrize("name", ["pytorch_model.bin", "training_args.pt", "extra/state.PKL", "optimizer.pth"])
def test_pickles_are_refused_even_when_verified(checkpoint: Path, name: str) -> None:
    (checkpoint / name).parent.mkdir(exist_ok=True)
    (checkpoint / name).write_bytes(b"\x80\x04K\x01.")
    write_manifest(checkpoint)
    with pytest.raises(UnverifiedFolderError, match="pickle") as info:
        check_verified_folder(checkpoint)
    assert name in str(info.value)


@pytest.mark.parametrize("name", [".git/HEAD", "sub/.cache/huggingface/download.lock"])
def test_git_and_cache_folders_are_refused(checkpoint: Path, name: str) -> None:
    (checkpoint / name).parent.mkdir(parents=True)
    (checkpoint / name).write_text("ref: refs/heads/main\n")
    write_manifest(checkpoint)
    with pytest.raises(UnverifiedFolderError, match=r"under \.git/ or \.cache/") as info:
        check_verified_folder(checkpoint)
    assert name in str(info.value)


def _bad_hash(manifest: dict) -> str:
    manifest["files"]["config.json"]["sha256"] = "not-a-hash"
    return "config.json"


def _escaping_path(manifest: dict) -> str:
    manifest["files"]["../outside.txt"] = {"sha256": "0" * 64, "size": 1}
    return "outside.txt"


def _future_format(manifest: dict) -> str:
    manifest["format"] = 2
    return "format 2"


def _size_as_text(manifest: dict) -> str:
    manifest["files"]["README.md"]["size"] = "60"
    return "README.md"


@pytest.mark.parametrize("corrupt", [_bad_hash, _escaping_path, _future_format, _size_as_text])
def test_malformed_manifest_is_refused(checkpoint: Path, corrupt) -> None:
    manifest = json.loads((checkpoint / "verification.json").read_text())
    named = corrupt(manifest)
    (checkpoint / "verification.json").write_text(json.dumps(manifest))
    with pytest.raises(UnverifiedFolderError, match="malformed.*re-run verification") as info:
        check_verified_folder(checkpoint)
    assert named in str(info.value)


def test_manifest_that_is_not_json_is_refused(checkpoint: Path) -> None:
    (checkpoint / "verification.json").write_text("{not json")
    with pytest.raises(UnverifiedFolderError, match="not valid JSON"):
        check_verified_folder(checkpoint)


def test_check_returns_the_manifest(checkpoint: Path) -> None:
    manifest = check_verified_folder(checkpoint)
    assert manifest == json.loads((checkpoint / "verification.json").read_text())


@pytest.mark.parametrize("repo_id", ["tiny-encoder", "a/b/c", "/name", "owner/", "owner/na me", "owner/x--y", ""])
def test_bad_repo_id_is_refused(checkpoint: Path, offline_guard: NetworkGuard, repo_id: str) -> None:
    with pytest.raises(ValueError, match="OWNER/NAME"):
        push_folder(checkpoint, repo_id=repo_id, token=TOKEN)
    assert offline_guard.attempts == []


def test_no_token_is_refused_before_any_request(checkpoint: Path, offline_guard: NetworkGuard) -> None:
    with FakeHub(token=TOKEN) as hub:
        with pytest.raises(PushError, match="hf auth login.*HF_TOKEN"):
            push_folder(checkpoint, repo_id=REPO, endpoint=hub.url)
        assert hub.requests == []
    assert offline_guard.attempts == []


def test_offline_mode_is_explained(checkpoint: Path, offline_guard: NetworkGuard,
                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(PushError, match="HF_HUB_OFFLINE.* is set"):
        push_folder(checkpoint, repo_id=REPO, token=TOKEN, endpoint="http://127.0.0.1:9")
    assert offline_guard.attempts == []


@pytest.mark.parametrize("status", [401, 403])
def test_forbidden_answer_gives_a_clear_error(fake_hub: FakeHub, checkpoint: Path, status: int) -> None:
    fake_hub.deny_status = status
    with pytest.raises(PushError) as info:
        push_folder(checkpoint, repo_id=REPO, token=TOKEN, endpoint=fake_hub.url)
    message = str(info.value)
    assert f"The token cannot write to {REPO} on {fake_hub.url} (HTTP {status}" in message
    assert "hf auth login" in message
    assert fake_hub.repos == {} and fake_hub.lfs_objects == {}


def test_other_http_error_names_the_status(fake_hub: FakeHub, checkpoint: Path) -> None:
    fake_hub.fail_routes["commit"] = 422
    with pytest.raises(PushError, match=f"answered HTTP 422 while uploading to {REPO}.*Fake failure"):
        push_folder(checkpoint, repo_id=REPO, token=TOKEN, endpoint=fake_hub.url)
    assert fake_hub.commits == []


def test_server_down_gives_a_clear_error(checkpoint: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    isolate_hub_client(monkeypatch, tmp_path)
    endpoint = closed_port_url()
    host, port = endpoint.removeprefix("http://").split(":")
    guard = NetworkGuard({(host, int(port))}).install(monkeypatch)
    with pytest.raises(PushError) as info:
        push_folder(checkpoint, repo_id=REPO, token=TOKEN, endpoint=endpoint)
    message = str(info.value)
    assert f"The Hub endpoint {endpoint} could not be reached" in message
    assert "nothing was uploaded" in message
    assert guard.attempts and guard.blocked == []


def test_token_never_logged_printed_or_written(fake_hub: FakeHub, checkpoint: Path, tmp_path: Path,
                                               caplog: pytest.LogCaptureFixture,
                                               capfd: pytest.CaptureFixture[str]) -> None:
    caplog.set_level(logging.DEBUG)
    result = push_folder(checkpoint, repo_id=REPO, token=TOKEN, endpoint=fake_hub.url)
    fake_hub.fail_routes["commit"] = 500
    with pytest.raises(PushError, match="HTTP 500") as failed:
        push_folder(checkpoint, repo_id=REPO, token=TOKEN, endpoint=fake_hub.url)
    fake_hub.deny_status = 403
    with pytest.raises(PushError) as denied:
        push_folder(checkpoint, repo_id="someone/other", token=TOKEN, endpoint=fake_hub.url)

    assert f"Pushed 6 files to {REPO}, revision main: {result.commit_url}" in caplog.text
    assert "model.safetensors" in caplog.text
    out, err = capfd.readouterr()
    for text in (caplog.text, out, err, str(failed.value), str(denied.value), repr(denied.value.__cause__)):
        assert TOKEN not in text
    written = [p for p in tmp_path.rglob("*") if p.is_file() and TOKEN.encode() in p.read_bytes()]
    assert written == []


def test_token_echoed_by_the_server_is_redacted_from_the_error(fake_hub: FakeHub, checkpoint: Path) -> None:
    fake_hub.fail_routes["commit"] = 500
    fake_hub.fail_message = f"proxy echo: Authorization: Bearer {TOKEN}"
    with pytest.raises(PushError, match="HTTP 500") as info:
        push_folder(checkpoint, repo_id=REPO, token=TOKEN, endpoint=fake_hub.url)
    assert "proxy echo: Authorization: Bearer <token>" in str(info.value)
    assert TOKEN not in str(info.value)
