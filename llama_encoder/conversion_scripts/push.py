"""Push a verified checkpoint folder to the Hugging Face Hub.

Only folders written and verified by `llama-encoder convert` are pushed: the folder's `verification.json` must say the
verification passed and must list every other file of the folder with its sha256 and size, unchanged since. Pickle
files are refused outright. Hub failures are turned into one sentence that says what went wrong and what to do.
"""

from __future__ import annotations

import logging
import os
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from huggingface_hub import HfApi, get_token
from huggingface_hub import constants as hub_constants
from huggingface_hub.errors import HfHubHTTPError
from tqdm.auto import tqdm

from ..errors import InputError, MissingInputError, NotAFolderError, PushError, UnverifiedFolderError
from .manifest import VERIFICATION_FILE, changed_files, folder_files, read_manifest

logger = logging.getLogger(__name__)

PICKLE_SUFFIXES = (".bin", ".pt", ".pkl", ".pth", ".pickle")
DEFAULT_REVISION = "main"

# The Hub refuses commits under these folders, and upload_folder silently skips .git/ and .cache/huggingface/.
_HUB_FORBIDDEN_FOLDERS = (".git", ".cache")
_NAME_PART = r"[A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9_])?"
_REPO_ID_RE = re.compile(rf"^{_NAME_PART}/{_NAME_PART}$")
_MAX_REPO_ID_LENGTH = 96
# Transport errors of the HTTP clients huggingface_hub used across the supported versions (requests, httpx, httpx2);
# looked up in sys.modules because an exception can only come from a client that was imported.
_TRANSPORT_ERRORS = (("httpx2", "TransportError"), ("httpx", "TransportError"), ("requests", "ConnectionError"),
                     ("requests", "Timeout"))

_CONVERT_AGAIN = "run `llama-encoder convert` again"


@dataclass(frozen=True)
class PushResult:
    """What was (or, for a dry run, would be) pushed.

    `commit_url` is None for dry runs. `files` lists (path in the repo, size in bytes), sorted by path.
    """

    repo_id: str
    revision: str
    commit_url: str | None
    files: list[tuple[str, int]] = field(default_factory=list)


def check_verified_folder(folder: str | os.PathLike) -> dict:
    """Check that `folder` is a verified checkpoint that has not changed since its verification.

    Takes the checkpoint folder. Returns the parsed `verification.json` manifest. Raises `MissingInputError` when the
    folder or its `verification.json` is missing, `NotADirectoryError` when it is a file, and `UnverifiedFolderError`
    when the verification did not pass, the manifest is malformed, the folder holds pickle files or files under
    `.git`/`.cache`, or files were added, removed or changed since the verification (all offending files are named).
    """
    folder = Path(folder).expanduser()
    if not folder.exists():
        raise MissingInputError(
            f"Checkpoint folder {folder} does not exist. Pass the folder written by `llama-encoder convert`, "
            f"or {_CONVERT_AGAIN} to create it."
        )
    if not folder.is_dir():
        raise NotAFolderError(f"{folder} is a file, not a checkpoint folder. Pass the folder written by "
                              "`llama-encoder convert`.")
    manifest_path = folder / VERIFICATION_FILE
    if not manifest_path.is_file():
        raise MissingInputError(
            f"{folder} has no {VERIFICATION_FILE}, so it was never verified and will not be pushed; "
            f"{_CONVERT_AGAIN} to write a verified checkpoint."
        )
    manifest = read_manifest(manifest_path)
    if manifest["passed"] is not True:
        raise UnverifiedFolderError(
            f"The verification of {folder} did not pass (max cosine distance {manifest['max_cosine_distance']}), "
            f"so it will not be pushed; see the checks in {manifest_path}, fix the conversion and {_CONVERT_AGAIN}."
        )

    listed: dict[str, dict] = manifest["files"]
    on_disk = folder_files(folder)
    every_path = sorted(set(listed) | set(on_disk))
    forbidden = [p for p in every_path if any(part in _HUB_FORBIDDEN_FOLDERS for part in p.split("/"))]
    if forbidden:
        raise UnverifiedFolderError(
            f"{folder} holds files under .git/ or .cache/ ({', '.join(forbidden)}), which the Hub refuses; "
            "remove those folders from the checkpoint and re-run verification."
        )
    pickles = [p for p in every_path if p.lower().endswith(PICKLE_SUFFIXES)]
    if pickles:
        raise UnverifiedFolderError(
            f"{folder} holds pickle files ({', '.join(pickles)}), which can run code when loaded and are never "
            f"pushed; remove them (weights belong in .safetensors files) and {_CONVERT_AGAIN}."
        )

    added = sorted(set(on_disk) - set(listed))
    removed = sorted(set(listed) - set(on_disk))
    kept = {p: listed[p] for p in sorted(set(listed) & set(on_disk))}
    with tqdm(total=sum(on_disk[p] for p in kept), unit="B", unit_scale=True, desc="Checking files",
              disable=None) as progress:
        changed = changed_files(folder, kept, on_disk, on_chunk=progress.update)
    if added or removed or changed:
        problems = [f"{what}: {', '.join(paths)}" for what, paths in
                    (("added", added), ("removed", removed), ("changed", changed)) if paths]
        raise UnverifiedFolderError(
            f"{folder} changed after it was verified ({'; '.join(problems)}), so it will not be pushed; restore "
            f"the files or re-run verification ({_CONVERT_AGAIN}) so {VERIFICATION_FILE} matches them."
        )
    return manifest


def push_folder(
    folder: str | os.PathLike,
    *,
    repo_id: str,
    private: bool = False,
    revision: str | None = None,
    commit_message: str | None = None,
    token: str | None = None,
    dry_run: bool = False,
    endpoint: str | None = None,
) -> PushResult:
    """Upload a verified checkpoint folder to the model repo `repo_id` on the Hub, as one commit.

    Takes the folder, the repo as OWNER/NAME, whether a newly created repo is private, the branch to commit to
    (created from main when missing; default main), the commit message, the token (default: HF_TOKEN, then the token
    stored by `hf auth login`), and the Hub endpoint (default: HF_ENDPOINT or huggingface.co). With `dry_run`, only
    checks the folder and reports the files that would be uploaded, without any network call or token. Returns a
    `PushResult`. Raises `ValueError` for a malformed repo id, the errors of `check_verified_folder`, and `PushError`
    when no token is found or the Hub refuses the push or cannot be reached.
    """
    _check_repo_id(repo_id)
    folder = Path(folder).expanduser()
    manifest = check_verified_folder(folder)
    branch = revision or DEFAULT_REVISION
    files = sorted([(path, entry["size"]) for path, entry in manifest["files"].items()]
                   + [(VERIFICATION_FILE, (folder / VERIFICATION_FILE).stat().st_size)])
    total = sum(size for _, size in files)

    if dry_run:
        logger.info("Dry run: would push %d files (%s) from %s to %s, revision %s:", len(files), _human(total),
                    folder, repo_id, branch)
        _log_files(files)
        return PushResult(repo_id=repo_id, revision=branch, commit_url=None, files=files)

    if hub_constants.HF_HUB_OFFLINE:
        raise PushError("HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) is set, so the Hub was not contacted and nothing "
                        "was uploaded; unset it to push.")
    token = token or get_token()
    if not token:
        raise PushError(
            "No Hugging Face token found, so nothing was pushed: log in with `hf auth login` or set the HF_TOKEN "
            "environment variable to a token with write access, then push again."
        )
    api = HfApi(endpoint=endpoint, token=token)
    message = commit_message or (
        f"Upload llama-encoder checkpoint ({len(files)} files, verified: max cosine distance "
        f"{manifest['max_cosine_distance']:.3g})"
    )

    stage = "create"
    try:
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        if branch != DEFAULT_REVISION:
            stage = "branch"
            api.create_branch(repo_id, branch=branch, exist_ok=True, repo_type="model")
        stage = "upload"
        logger.info("Pushing %d files (%s) from %s to %s, revision %s", len(files), _human(total), folder, repo_id,
                    branch)
        commit = api.upload_folder(folder_path=folder, repo_id=repo_id, repo_type="model", revision=branch,
                                   commit_message=message)
    except Exception as exc:
        explained = _explain_failure(exc, repo_id=repo_id, branch=branch, endpoint=api.endpoint, stage=stage,
                                     token=token)
        if explained is None:
            raise
        # A Hub error can quote a proxy's echo of the request headers: it is chained (for -v tracebacks) only when it
        # does not hold the token.
        raise explained from (None if any(token in str(cause) for cause in _causes(exc)) else exc)

    logger.info("Pushed %d files to %s, revision %s: %s", len(files), repo_id, branch, commit.commit_url)
    _log_files(files)
    return PushResult(repo_id=repo_id, revision=branch, commit_url=commit.commit_url, files=files)


def _check_repo_id(repo_id: str) -> None:
    if (
        not isinstance(repo_id, str)
        or not _REPO_ID_RE.match(repo_id)
        or "--" in repo_id
        or ".." in repo_id
        or repo_id.endswith(".git")
        or len(repo_id) > _MAX_REPO_ID_LENGTH
    ):
        raise InputError(
            f"Repo id {repo_id!r} is not of the form OWNER/NAME (e.g. my-user/my-encoder): use your user or "
            f"organization name, a slash, and a name of letters, digits, '-', '_' or '.' "
            f"(no '--' or '..', at most {_MAX_REPO_ID_LENGTH} characters)."
        )


def _causes(exc: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def _is_transport_error(exc: BaseException) -> bool:
    if isinstance(exc, (ConnectionError, TimeoutError)):
        return True
    for module_name, attribute in _TRANSPORT_ERRORS:
        error_type = getattr(sys.modules.get(module_name), attribute, None)
        if isinstance(error_type, type) and isinstance(exc, error_type):
            return True
    return False


def _explain_failure(
    exc: BaseException, *, repo_id: str, branch: str, endpoint: str, stage: str, token: str
) -> PushError | None:
    """One clear sentence for a Hub failure found anywhere in the exception chain, or None when it is not one."""
    doing = {
        "create": f"creating the repo {repo_id}",
        "branch": f"creating the branch {branch!r} of {repo_id}",
        "upload": f"uploading to {repo_id}, revision {branch}",
    }[stage]
    for cause in _causes(exc):
        if isinstance(cause, HfHubHTTPError):
            status = cause.response.status_code if cause.response is not None else None
            if status in (401, 403):
                return PushError(
                    f"The token cannot write to {repo_id} on {endpoint} (HTTP {status} while {doing}): log in with a "
                    "token that has write access to that repo (`hf auth login` or HF_TOKEN), or push to a repo under "
                    "your own namespace."
                )
            detail = cause.server_message or (str(cause).strip().splitlines() or [type(cause).__name__])[0]
            return PushError(_redact(f"The Hub at {endpoint} answered HTTP {status} while {doing}: {detail}", token))
        if _is_transport_error(cause):
            outcome = (
                "nothing was uploaded"
                if stage != "upload"
                else "the upload was interrupted and may not have been committed; push again to finish it "
                "(files already on the Hub are not sent twice)"
            )
            return PushError(
                _redact(f"The Hub endpoint {endpoint} could not be reached while {doing} "
                        f"({type(cause).__name__}); {outcome}. Check your network connection and the endpoint "
                        "(HF_ENDPOINT).", token)
            )
    return None


def _redact(text: str, token: str) -> str:
    return text.replace(token, "<token>")


def _human(size: int) -> str:
    return f"{size / 2**20:.1f} MiB" if size >= 2**20 else f"{size} bytes"


def _log_files(files: list[tuple[str, int]]) -> None:
    for path, size in files:
        logger.info("  %s (%d bytes)", path, size)
