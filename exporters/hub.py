"""Upload a prepared folder to the Hugging Face Hub in ONE commit (huggingface_hub's ``HfApi``).

What goes up is decided before this module is reached: the pipeline (or ``compress push``)
writes the upload folder (model or adapter files, the model card as ``README.md``, the resolved
recipe) and this module uploads exactly that folder:

1. ``HfApi.create_repo(repo_id, private=..., exist_ok=True)``; the Hub ignores the private flag
   for a repository that already exists, so ``HfApi.model_info`` then checks that a push asked to
   be private does not land in an existing public repository (refused, exit 2);
2. ``HfApi.create_branch(..., exist_ok=True)`` when a revision other than ``main`` is asked for;
3. ``HfApi.create_commit`` with one ``CommitOperationAdd`` per file: huggingface_hub asks the
   Hub's ``preupload`` endpoint which files are LFS (``*.safetensors``, ``*.onnx``, files over
   10 MB), uploads those first (Xet when ``hf_xet`` is installed, else the Git LFS batch API), and
   then sends ONE commit whose message names the recipe and its hash.

The token comes from ``HF_TOKEN`` or the user's login (``hf auth login``), via
``huggingface_hub.get_token``. It is never logged, printed or returned, and every error message
built here is scrubbed of it. Failures map to one line each: a missing or refused token, a
repository the token cannot write, or a bad revision → :class:`HubAuthError` (exit 2); the Hub
unreachable → :class:`HubNetworkError` (exit 3); any other Hub error → :class:`HubError`
(exit 3). Nothing local is deleted on failure.

Reference: https://huggingface.co/docs/huggingface_hub/guides/upload (create_commit, preupload).
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

from compressor.errors import CompressError, UserInputError

log = logging.getLogger(__name__)

#: ``user/name`` (what the Hub accepts for a model repository id).
REPO_ID_RE = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


class HubAuthError(UserInputError):
    """No token, a refused token, or a repository / revision the token cannot write (exit 2)."""


class HubNetworkError(CompressError):
    """The Hub could not be reached (connection refused, DNS, timeout) (exit 3)."""


class HubError(CompressError):
    """The Hub answered with an error that is neither authentication nor a bad request (exit 3)."""


def check_repo_id(repo_id: str) -> str:
    """Return ``repo_id`` if it is a valid ``user/name`` model repository id.

    Raises:
        UserInputError: anything else (no namespace, spaces, ``..``, too long).
    """
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if not REPO_ID_RE.fullmatch(repo_id or ""):
        raise UserInputError(f"repo id '{repo_id}': expected `user/name` (letters, digits, '-', '_', '.')")
    try:
        validate_repo_id(repo_id)
    except HFValidationError as exc:
        raise UserInputError(f"repo id '{repo_id}': {str(exc).splitlines()[0]}") from None
    return repo_id


def upload_file_list(folder: Path) -> list[str]:
    """Relative POSIX paths of the files under ``folder`` that an upload sends, sorted.

    Hidden temporary entries (``.tmp*``) are left out; everything else goes up, so a dry run's
    listing and the commit that a real push makes are the same list.
    """
    folder = Path(folder)
    out = []
    for p in sorted(folder.rglob("*")):
        rel = p.relative_to(folder)
        if p.is_file() and not any(part.startswith(".tmp") for part in rel.parts):
            out.append(rel.as_posix())
    return out


def default_commit_message(recipe_name: str, recipe_hash: str) -> str:
    """``vlm-compress: <recipe> (recipe <hash[:12]>)``: the commit names what produced it."""
    return f"vlm-compress: {recipe_name} (recipe {recipe_hash[:12]})"


def resolve_token() -> str:
    """The token huggingface_hub would use (``HF_TOKEN``, then the saved login).

    Raises:
        HubAuthError: no token is configured, or ``HF_HUB_OFFLINE`` forbids network access.
    """
    from huggingface_hub import constants, get_token

    if constants.HF_HUB_OFFLINE:
        raise HubAuthError("HF_HUB_OFFLINE is set: unset it to push to the Hub (a push dry run works offline)")
    token = get_token()
    if not token:
        raise HubAuthError("no Hugging Face token: set HF_TOKEN or run `hf auth login` (a push dry run needs none)")
    return token


def push_folder(
    folder: Path,
    push_spec: Any,
    *,
    recipe_name: str,
    recipe_hash: str,
    commit_description: str | None = None,
) -> dict:
    """Upload every file of ``folder`` to ``push_spec.repo_id`` in one commit.

    Args:
        folder: the upload folder (what a dry run writes), e.g. ``runs/<name>/push``.
        push_spec: the recipe's ``push:`` (``repo_id``, ``private``, ``revision``,
            ``commit_message``; ``what`` is already reflected in the folder's contents).
        recipe_name: the recipe's ``name`` (in the default commit message).
        recipe_hash: the recipe's hash (first 12 hex digits in the default commit message, all
            of it in the commit description).
        commit_description: the commit's longer description (default: the full recipe hash).

    Returns:
        A JSON-able summary (no token): ``repo_id``, ``revision``, ``url``, ``commit_oid``,
        ``commit_url``, ``commit_message``, ``files``, ``folder``, ``summary``.

    Raises:
        HubAuthError: no token, token refused (401), no write access (403), repository or
            revision not found (404), a request the Hub rejects as bad (400), a private push into
            an existing public repository (exit 2).
        HubNetworkError: the Hub is unreachable (exit 3).
        HubError: any other Hub error (exit 3).
    """
    from huggingface_hub import CommitOperationAdd, HfApi

    folder = Path(folder)
    repo_id = check_repo_id(push_spec.repo_id)
    revision = push_spec.revision or "main"
    files = upload_file_list(folder)
    if not files:
        raise UserInputError(f"{folder}: nothing to upload")
    token = resolve_token()
    api = HfApi(token=token)
    message = push_spec.commit_message or default_commit_message(recipe_name, recipe_hash)
    description = commit_description or f"Produced by vlm-compress from recipe `{recipe_name}` (hash {recipe_hash})."
    log.info("pushing %d files from %s to %s@%s (%s)", len(files), folder, repo_id, revision,
             "private" if push_spec.private else "public")
    try:
        url = api.create_repo(repo_id, private=bool(push_spec.private), exist_ok=True, repo_type="model")
        is_private = api.model_info(repo_id).private
        if not push_spec.private and is_private:
            log.warning("%s already exists and is private: it stays private", repo_id)
        if push_spec.private and is_private is False:
            raise HubAuthError(
                f"{repo_id} already exists and is public, but the push asks for a private repository: make it "
                "private on the Hub or push with --public (push.private: false); nothing was uploaded"
            )
        if revision != "main":
            api.create_branch(repo_id, branch=revision, exist_ok=True, repo_type="model")
        ops = [CommitOperationAdd(path_in_repo=rel, path_or_fileobj=str(folder / rel)) for rel in files]
        info = api.create_commit(
            repo_id,
            operations=ops,
            commit_message=message,
            commit_description=description,
            revision=revision,
            repo_type="model",
        )
    except CompressError:
        raise
    except Exception as exc:  # noqa: BLE001 - every library failure becomes one clear line
        raise _classify(exc, repo_id, revision, api.endpoint, folder, token) from None
    summary = {
        "dry_run": False,
        "repo_id": repo_id,
        "revision": revision,
        "private": bool(push_spec.private) if is_private is None else bool(is_private),
        "url": str(url),
        "commit_oid": info.oid,
        "commit_url": info.commit_url,
        "commit_message": message,
        "folder": str(folder),
        "files": files,
        "summary": f"pushed {len(files)} files to `{repo_id}` ({revision}) in commit {str(info.oid)[:12]}",
    }
    log.info("%s", summary["summary"])
    return summary


def _scrub(text: str, token: str | None) -> str:
    text = str(text)
    if token:
        text = text.replace(token, "***")
    return re.sub(r"hf_[A-Za-z0-9]{8,}", "hf_***", text)


def _first_line(exc: BaseException) -> str:
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    return lines[0] if lines else type(exc).__name__


def _classify(exc: BaseException, repo_id: str, revision: str, endpoint: str, folder: Path, token: str) -> CompressError:
    """One typed, token-free, single-line error for a failure inside huggingface_hub."""
    from huggingface_hub.errors import (
        HfHubHTTPError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    kept = f"nothing was uploaded; {folder} is kept"
    if isinstance(exc, OfflineModeIsEnabled):
        return HubAuthError("HF_HUB_OFFLINE is set: unset it to push to the Hub (a push dry run works offline)")
    if isinstance(exc, HfHubHTTPError):
        status = exc.response.status_code if getattr(exc, "response", None) is not None else None
        server = getattr(exc, "server_message", None) or ""
        server = _scrub(server.strip().splitlines()[0], token) if server.strip() else ""
        detail = f" ({server})" if server else ""
        if isinstance(exc, RevisionNotFoundError):
            return HubAuthError(f"revision '{revision}' not found in {repo_id}{detail}; {kept}")
        if status == 401:
            return HubAuthError(
                f"the Hub refused the token (HTTP 401){detail}: check HF_TOKEN or run `hf auth login`; {kept}"
            )
        if status == 403:
            return HubAuthError(
                f"the token may not write to {repo_id} (HTTP 403){detail}: use a token with write access to "
                f"'{repo_id.split('/')[0]}'; {kept}"
            )
        if isinstance(exc, RepositoryNotFoundError) or status == 404:
            return HubAuthError(f"repository {repo_id} not found or not writable with this token (HTTP 404); {kept}")
        if status in (400, 409, 422):
            return HubAuthError(f"the Hub rejected the push to {repo_id} (HTTP {status}){detail}; {kept}")
        return HubError(f"the Hub answered HTTP {status} for {repo_id}{detail}; {kept}; retry later")
    if isinstance(exc, ValueError) and "README.md" in str(exc):
        return HubAuthError(f"the Hub rejected the model card metadata: {_scrub(_first_line(exc), token)}; {kept}")
    module = type(exc).__module__ or ""
    if isinstance(exc, (OSError, ConnectionError, TimeoutError)) or module.startswith(("httpx", "httpcore")):
        return HubNetworkError(
            f"cannot reach the Hub at {endpoint} ({type(exc).__name__}: {_scrub(_first_line(exc), token)}); "
            f"check the network or HF_ENDPOINT; {kept}"
        )
    return HubError(f"push to {repo_id} failed ({type(exc).__name__}: {_scrub(_first_line(exc), token)}); {kept}")

