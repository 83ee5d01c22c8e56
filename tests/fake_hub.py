"""A local stand-in for the Hugging Face Hub, enough for `create_repo`, `create_branch` and `upload_folder`.

It speaks the endpoints huggingface_hub uses on the plain-LFS upload path (no Xet; checked with 2.4 and 0.36):
  POST /api/repos/create                                    create a model repo (409 when it exists)
  POST /api/models/{repo}/branch/{branch}                   create a branch from main (409 when it exists)
  POST /api/validate-yaml                                   README.md metadata check (always fine)
  POST /api/models/{repo}/preupload/{revision}              tell the client which files go through LFS
  POST /{repo}.git/info/lfs/objects/batch                   LFS batch API, "basic" transfer
  PUT  /_fake_lfs/objects/{oid}                             the upload URL handed out by the batch API
  POST /_fake_lfs/verify                                    the LFS verify action
  POST /api/models/{repo}/commit/{revision}                 NDJSON commit of regular and LFS files
Every URL it hands out points back at itself, and it opens no connection of its own. It stores what arrives so tests
can compare files byte for byte, records every request (without credentials), and can be told to answer one status
for every request (`deny_status`, e.g. 401/403) or for one route (`fail_routes`, with `fail_message`).

`fake_hub` (fixture) starts it on a free port of 127.0.0.1, points huggingface_hub's plain-LFS path at nothing but
it (Xet off, offline mode off) and stops it afterwards. `NetworkGuard` blocks and records socket connections to any
address a test did not allow.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

import pytest
from huggingface_hub import constants

# Files this size or larger, or with these suffixes, go through LFS (the Hub's rule: 10 MiB, or .gitattributes).
LFS_THRESHOLD = 10 * 2**20
LFS_SUFFIXES = (".safetensors", ".gguf", ".bin", ".pt", ".pth", ".pkl", ".onnx", ".h5", ".msgpack", ".npy", ".zip")

_REPO = r"(?P<repo>[^/]+/[^/]+)"
_ROUTES = [
    ("POST", "create_repo", re.compile(r"^/api/repos/create$")),
    ("POST", "validate_yaml", re.compile(r"^/api/validate-yaml$")),
    ("POST", "create_branch", re.compile(rf"^/api/models/{_REPO}/branch/(?P<branch>[^/]+)$")),
    ("POST", "preupload", re.compile(rf"^/api/models/{_REPO}/preupload/(?P<revision>[^/]+)$")),
    ("POST", "commit", re.compile(rf"^/api/models/{_REPO}/commit/(?P<revision>[^/]+)$")),
    ("POST", "lfs_batch", re.compile(rf"^/{_REPO}\.git/info/lfs/objects/batch$")),
    ("PUT", "lfs_upload", re.compile(r"^/_fake_lfs/objects/(?P<oid>[0-9a-f]{64})$")),
    ("POST", "lfs_verify", re.compile(r"^/_fake_lfs/verify$")),
]


@dataclass
class StoredFile:
    """A file as committed: its bytes and whether it came through LFS."""

    content: bytes
    lfs: bool


@dataclass
class FakeRepo:
    """A model repo: its visibility, and per branch the committed files by path."""

    repo_id: str
    private: bool
    branches: dict[str, dict[str, StoredFile]] = field(default_factory=lambda: {"main": {}})


@dataclass
class Commit:
    """A commit the server accepted."""

    repo_id: str
    revision: str
    summary: str
    description: str
    paths: list[str]
    oid: str


@dataclass
class Seen:
    """One request as the server saw it; `authorized` says whether it carried the expected token."""

    method: str
    route: str | None
    path: str
    authorized: bool


class FakeHub:
    """The server's state and its lifecycle; use as a context manager or through the `fake_hub` fixture."""

    def __init__(self, *, token: str | None = None) -> None:
        self.token = token  # when set, API calls without `Authorization: Bearer <token>` get a 401
        self.deny_status: int | None = None
        self.fail_routes: dict[str, int] = {}  # route name -> status answered instead of handling it
        self.fail_message = "Fake failure configured for {route}"
        self.repos: dict[str, FakeRepo] = {}
        self.lfs_objects: dict[str, bytes] = {}
        self.commits: list[Commit] = []
        self.requests: list[Seen] = []
        self.unhandled: list[Seen] = []
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host, port = self.address
        return f"http://{host}:{port}"

    @property
    def address(self) -> tuple[str, int]:
        if self._server is None:
            raise RuntimeError("The fake Hub is not running; start it first.")
        host, port = self._server.server_address[:2]
        return host, port

    def start(self) -> FakeHub:
        server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        server.daemon_threads = True
        server.hub = self  # type: ignore[attr-defined]
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                                        name="fake-hub", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def __enter__(self) -> FakeHub:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def files(self, repo_id: str, revision: str = "main") -> dict[str, StoredFile]:
        """The files committed to `revision` of `repo_id`."""
        return self.repos[repo_id].branches[revision]


def closed_port_url() -> str:
    """A URL on 127.0.0.1 where nothing listens (the port was bound, then released)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return f"http://127.0.0.1:{port}"


class NetworkGuard:
    """Refuses socket connections to addresses not in `allowed`, recording every attempt."""

    def __init__(self, allowed: set[tuple[str, int]]) -> None:
        self.allowed = allowed
        self.attempts: list[object] = []
        self.blocked: list[object] = []

    def install(self, monkeypatch: pytest.MonkeyPatch) -> NetworkGuard:
        original = socket.socket.connect
        guard = self

        def connect(sock: socket.socket, address: object) -> None:
            guard.attempts.append(address)
            if not (isinstance(address, tuple) and tuple(address[:2]) in guard.allowed):
                guard.blocked.append(address)
                raise ConnectionRefusedError(f"NetworkGuard: connection to {address!r} is not allowed in this test")
            original(sock, address)

        monkeypatch.setattr(socket.socket, "connect", connect)
        return self


def isolate_hub_client(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Make huggingface_hub take the plain-LFS path and ignore the machine's Hub settings and stored token."""
    # hf_xet is installed, and with it upload_folder takes the Xet pipeline, which this fake does not speak.
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-stored-token"))
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE", "HF_ENDPOINT"):
        monkeypatch.delenv(name, raising=False)
    # huggingface_hub 2.x fetches an "agent harness" registry from the endpoint the first time it builds headers;
    # an empty in-process registry keeps that request (and its cache file in HF_HOME) from happening.
    try:
        from huggingface_hub.utils import _detect_agent
    except ImportError:  # huggingface_hub 0.x has no agent detection
        return
    monkeypatch.setattr(_detect_agent, "_registry", {"standardEnvVars": [], "harnesses": {}})


@pytest.fixture(name="fake_hub")
def fake_hub_fixture(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[FakeHub]:
    """A running `FakeHub` expecting the token "hf_fake_write_token", set as the endpoint; only it can be reached."""
    isolate_hub_client(monkeypatch, tmp_path)
    with FakeHub(token="hf_fake_write_token") as hub:
        # What HF_ENDPOINT sets; huggingface_hub 0.x parses commit URLs against it even when given `endpoint=`.
        monkeypatch.setattr(constants, "ENDPOINT", hub.url)
        guard = NetworkGuard({hub.address}).install(monkeypatch)
        yield hub
    if guard.blocked:
        pytest.fail(f"The test tried to connect to addresses other than the fake Hub: {guard.blocked}")


class _Handler(BaseHTTPRequestHandler):
    """Routes one request to the FakeHub; the body is always read in full before answering."""

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        self._dispatch()

    def do_POST(self) -> None:  # noqa: N802
        self._dispatch()

    def do_PUT(self) -> None:  # noqa: N802
        self._dispatch()

    def do_DELETE(self) -> None:  # noqa: N802
        self._dispatch()

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 (http.server's signature)
        """Keep the test output quiet: requests are recorded in `FakeHub.requests` instead."""

    @property
    def hub(self) -> FakeHub:
        return self.server.hub  # type: ignore[attr-defined]

    def _dispatch(self) -> None:
        body = self._read_body()
        split = urlsplit(self.path)
        route, params = None, {}
        for method, name, pattern in _ROUTES:
            match = pattern.match(split.path)
            if method == self.command and match:
                route, params = name, {k: unquote(v) for k, v in match.groupdict().items()}
                break
        is_api = split.path.startswith("/api/") or ".git/" in split.path
        authorized = self.hub.token is None or self.headers.get("Authorization") == f"Bearer {self.hub.token}"
        seen = Seen(self.command, route, split.path, authorized)
        with self.hub._lock:
            self.hub.requests.append(seen)
            if route is None:
                self.hub.unhandled.append(seen)
        try:
            if body is None:
                return self._error(411, "The fake Hub needs a Content-Length header")
            if self.hub.deny_status is not None:
                return self._error(self.hub.deny_status, "You don't have the rights to write to this repo")
            if route in self.hub.fail_routes:
                return self._error(self.hub.fail_routes[route], self.hub.fail_message.format(route=route))
            if is_api and not authorized:
                return self._error(401, "Invalid credentials in Authorization header")
            if route is None:
                return self._error(404, f"Fake Hub has no route for {self.command} {split.path}")
            with self.hub._lock:
                getattr(self, f"_{route}")(body=body, query=parse_qs(split.query), **params)
        except Exception as exc:  # a bug in the fake must show up as an answer, never as a hung client
            self._error(500, f"Fake Hub error: {type(exc).__name__}: {exc}")

    def _read_body(self) -> bytes | None:
        """The request body, or None when it has no Content-Length (huggingface_hub always sends one)."""
        length = self.headers.get("Content-Length")
        return None if length is None and self.command in ("POST", "PUT") else self.rfile.read(int(length or 0))

    def _send(self, status: int, payload: object = None, *, content_type: str = "application/json",
              headers: dict[str, str] | None = None) -> None:
        data = b"" if payload is None else json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(data)

    def _error(self, status: int, message: str, *, code: str | None = None) -> None:
        headers = {"X-Error-Message": message}
        if code:
            headers["X-Error-Code"] = code
        self._send(status, {"error": message}, headers=headers)

    def _repo(self, repo_id: str) -> FakeRepo | None:
        repo = self.hub.repos.get(repo_id)
        if repo is None:
            self._error(404, "Repository not found", code="RepoNotFound")
        return repo

    def _branch(self, repo: FakeRepo, revision: str) -> dict[str, StoredFile] | None:
        files = repo.branches.get(revision)
        if files is None:
            self._error(404, f"Invalid rev id: {revision}", code="RevisionNotFound")
        return files

    # Routes: each answers the request itself; they run under the hub lock.

    def _create_repo(self, *, body: bytes, query: dict) -> None:
        payload = json.loads(body)
        if payload.get("type", "model") != "model":
            return self._error(400, "The fake Hub only hosts model repos")
        repo_id = f"{payload['organization']}/{payload['name']}" if payload.get("organization") else payload["name"]
        url = f"{self.hub.url}/{repo_id}"
        if repo_id in self.hub.repos:
            return self._send(409, {"error": "You already created this model repo", "url": url},
                              headers={"X-Error-Message": "You already created this model repo"})
        # huggingface_hub 2.x sends "visibility", 0.x sends "private"
        private = payload.get("visibility") == "private" or payload.get("private") is True
        self.hub.repos[repo_id] = FakeRepo(repo_id=repo_id, private=private)
        self._send(200, {"url": url, "name": repo_id, "id": repo_id})

    def _validate_yaml(self, *, body: bytes, query: dict) -> None:
        self._send(200, {"errors": [], "warnings": []})

    def _create_branch(self, *, body: bytes, query: dict, repo: str, branch: str) -> None:
        target = self._repo(repo)
        if target is None:
            return
        start = json.loads(body or b"{}").get("startingPoint") or "main"
        if branch in target.branches:
            return self._error(409, f"Reference already exists: refs/heads/{branch}")
        source = self._branch(target, start)
        if source is not None:
            target.branches[branch] = dict(source)
            self._send(200, {})

    def _preupload(self, *, body: bytes, query: dict, repo: str, revision: str) -> None:
        target = self._repo(repo)
        if target is None or self._branch(target, revision) is None:
            return
        files = json.loads(body)["files"]
        answer = [
            {
                "path": f["path"],
                "uploadMode": "lfs" if f["size"] >= LFS_THRESHOLD or f["path"].endswith(LFS_SUFFIXES) else "regular",
                "shouldIgnore": False,
                "oid": None,
            }
            for f in files
        ]
        self._send(200, {"files": answer, "commitOid": "0" * 40})

    def _lfs_batch(self, *, body: bytes, query: dict, repo: str) -> None:
        if self._repo(repo) is None:
            return
        request = json.loads(body)
        if request.get("operation") != "upload" or "basic" not in request.get("transfers", ["basic"]):
            return self._error(400, "The fake Hub only accepts basic LFS uploads")
        objects = []
        for obj in request["objects"]:
            answer = {"oid": obj["oid"], "size": obj["size"]}
            if self.hub.lfs_objects.get(obj["oid"]) is None:  # no "actions": the object is already stored
                answer["actions"] = {
                    "upload": {"href": f"{self.hub.url}/_fake_lfs/objects/{obj['oid']}", "header": {}},
                    "verify": {"href": f"{self.hub.url}/_fake_lfs/verify", "header": {}},
                }
            objects.append(answer)
        self._send(200, {"transfer": "basic", "objects": objects}, content_type="application/vnd.git-lfs+json")

    def _lfs_upload(self, *, body: bytes, query: dict, oid: str) -> None:
        if hashlib.sha256(body).hexdigest() != oid:
            return self._error(400, "Uploaded content does not match its sha256 oid")
        self.hub.lfs_objects[oid] = body
        self._send(200)

    def _lfs_verify(self, *, body: bytes, query: dict) -> None:
        request = json.loads(body)
        stored = self.hub.lfs_objects.get(request["oid"])
        if stored is None or len(stored) != request["size"]:
            return self._error(404, "LFS object not found")
        self._send(200, {})

    def _commit(self, *, body: bytes, query: dict, repo: str, revision: str) -> None:
        target = self._repo(repo)
        if target is None or self._branch(target, revision) is None:
            return
        if query:
            return self._error(400, f"The fake Hub does not support commit options {sorted(query)}")
        lines = [json.loads(line) for line in body.splitlines() if line.strip()]
        if not lines or lines[0].get("key") != "header":
            return self._error(400, "A commit starts with a header line")
        header, staged = lines[0]["value"], {}
        for line in lines[1:]:
            value = line["value"]
            if line["key"] == "file" and value.get("encoding") == "base64":
                staged[value["path"]] = StoredFile(base64.b64decode(value["content"]), lfs=False)
            elif line["key"] == "lfsFile":
                content = self.hub.lfs_objects.get(value["oid"])
                if content is None or ("size" in value and len(content) != value["size"]):
                    return self._error(422, f"LFS object {value['oid']} for {value['path']} was never uploaded")
                staged[value["path"]] = StoredFile(content, lfs=True)
            else:
                return self._error(400, f"The fake Hub does not support commit lines of kind {line['key']!r}")
        target.branches[revision].update(staged)
        oid = hashlib.sha1(f"{repo}@{revision}#{len(self.hub.commits)}".encode()).hexdigest()
        self.hub.commits.append(Commit(repo, revision, header.get("summary", ""), header.get("description", ""),
                                       sorted(staged), oid))
        self._send(200, {"commitUrl": f"{self.hub.url}/{repo}/commit/{oid}", "commitOid": oid, "success": True,
                         "pullRequestUrl": None})
