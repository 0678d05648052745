"""Errors from the Hub library and the file system, as one line with the fix."""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from qwen3_vl_service.core.errors import ConfigError, ServiceError
from qwen3_vl_service.core.units import format_decimal_bytes
from qwen3_vl_service.settings.config import SETTINGS_BY_KEY

_TOKEN_HELP = "https://huggingface.co/settings/tokens"


class DownloadFailed(ServiceError):
    """The download could not be done or finished (exit 1)."""


def nearest_existing_dir(path: Path) -> Path:
    """PATH or its closest existing ancestor: where the file system can be measured."""
    for candidate in (path, *path.parents):
        if candidate.is_dir():
            return candidate
    return Path(path.anchor or "/")


def token_source() -> str | None:
    """Where huggingface_hub will take a token from (never the token itself)."""
    if os.environ.get("HF_TOKEN") or os.environ.get("HUGGING_FACE_HUB_TOKEN"):
        return "HF_TOKEN"
    try:
        from huggingface_hub import get_token  # lazily: --verify never needs the Hub

        if get_token():
            return "the Hub login (hf auth login)"
    except Exception:  # noqa: BLE001 - a broken token store reads as "no token"
        pass
    return None


# ---------------------------------------------------------------------------
# Errors from the Hub library and the file system -> one line with the fix


def _network_error_types() -> tuple[type[BaseException], ...]:
    """Transport errors of whichever HTTP stack this huggingface_hub uses."""
    types: list[type[BaseException]] = [ConnectionError, TimeoutError]
    for module, name in (("httpx2", "TransportError"), ("httpx", "TransportError")):
        with contextlib.suppress(ImportError, AttributeError):
            types.append(getattr(__import__(module), name))
    with contextlib.suppress(ImportError):
        import requests  # optional here: only if this huggingface_hub's HTTP stack is requests

        types += [requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError]
    return tuple(types)


@dataclasses.dataclass
class HubContext:
    repo: str
    revision: str
    endpoint: str
    local_dir: Path
    remaining: int = 0  # bytes still to fetch when the download started
    disk_usage: Callable[[Path], Any] = shutil.disk_usage


def rerun_hint() -> str:
    return "rerun download_model.py: a rerun resumes where this one stopped (finished files are kept)"


def _disk_full(ctx: HubContext) -> DownloadFailed:
    where = nearest_existing_dir(ctx.local_dir)
    try:
        free = format_decimal_bytes(ctx.disk_usage(where).free)
    except OSError:
        free = "unknown"
    return DownloadFailed(
        f"disk full while downloading into {ctx.local_dir}: {free} left on its file system, "
        f"{format_decimal_bytes(ctx.remaining)} were still to fetch at the start",
        fix="free space there (or set MODEL_PATH to a larger file system) and " + rerun_hint(),
    )


def not_writable(path: Path, exc: OSError) -> DownloadFailed:
    reason = exc.strerror or type(exc).__name__
    return DownloadFailed(
        f"cannot write the model to {path}: {reason}",
        fix="choose a directory you can write (MODEL_PATH in config.env or --local-dir)",
    )


@contextlib.contextmanager
def one_line_errors(ctx: HubContext) -> Iterator[None]:
    """Errors in the block that translate() knows leave it as one-line ServiceErrors; others as they are."""
    try:
        yield
    except ServiceError:
        raise
    except Exception as exc:
        translated = translate(exc, ctx)
        if translated is None:
            raise
        raise translated from exc


def translate(exc: BaseException, ctx: HubContext) -> ServiceError | None:
    """A one-line ServiceError for EXC, or None when it is not one we know."""
    from huggingface_hub import errors as hf_errors  # lazily: --verify never needs the Hub

    found = _hub_error(exc, ctx, hf_errors)
    if found is not None:
        return found
    endpoint = ctx.endpoint
    if isinstance(exc, _network_error_types()):
        detail = f"{type(exc).__name__}: {exc}".splitlines()[0][:200]
        return DownloadFailed(f"network failure talking to {endpoint} ({detail})", fix=_network_fix())
    if isinstance(exc, OSError):
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return _disk_full(ctx)
        if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            return not_writable(Path(exc.filename) if exc.filename else ctx.local_dir, exc)
        if "Consistency check failed" in str(exc):  # a body shorter than announced
            return DownloadFailed(f"a file from {endpoint} arrived truncated", fix=_network_fix())
    return None


def _hub_error(exc: BaseException, ctx: HubContext, hf_errors: Any) -> ServiceError | None:
    """The huggingface_hub errors: gated, missing, disabled, offline, HTTP status."""
    repo, endpoint = ctx.repo, ctx.endpoint
    token = token_source()
    if isinstance(exc, hf_errors.GatedRepoError):
        status = _status(exc)
        if token is None:
            why = "no Hugging Face token was found"
        elif status == 403:
            why = f"the token from {token} has not been granted access"
        else:
            why = f"the token from {token} was not accepted"
        return DownloadFailed(
            f"{repo} is a gated repo and {why} (HTTP {status or '401/403'})",
            fix=f"accept its conditions at {endpoint}/{repo} while logged in, then export HF_TOKEN "
            f"(a read token from {_TOKEN_HELP}) or run 'hf auth login', and rerun",
        )
    if isinstance(exc, hf_errors.RevisionNotFoundError):
        return ConfigError(
            f"revision {ctx.revision!r} not found in {repo}",
            fix="set MODEL_REVISION (or --revision) to a branch, tag or commit of the repo, e.g. main",
        )
    if isinstance(exc, hf_errors.RepositoryNotFoundError):
        hint = (
            "set HF_TOKEN if it is private"
            if token is None
            else f"check that the token from {token} can read it"
        )
        return ConfigError(
            f"repo {repo} not found on {endpoint} (or it is private)",
            fix=f"check MODEL_REPO (or --repo), e.g. {SETTINGS_BY_KEY['MODEL_REPO'].default}; {hint}",
        )
    if isinstance(exc, getattr(hf_errors, "DisabledRepoError", ())):
        return DownloadFailed(f"{repo} is disabled on {endpoint}", fix="choose another MODEL_REPO")
    if isinstance(exc, hf_errors.OfflineModeIsEnabled):
        return DownloadFailed(
            "HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) is set, so the Hub cannot be reached",
            fix="unset it for the download (keep it for the service on compute nodes)",
        )
    if isinstance(exc, hf_errors.HfHubHTTPError):
        status = _status(exc)
        if status == 401:
            who = f"the token from {token}" if token else "the request"
            return DownloadFailed(
                f"the Hub rejected {who} (HTTP 401: expired, revoked or mistyped)",
                fix=f"create a read token at {_TOKEN_HELP}, export HF_TOKEN "
                "or run 'hf auth login', and rerun",
            )
        if status == 403:
            return DownloadFailed(
                f"the Hub refused access to {repo} (HTTP 403)",
                fix=f"give the token read access to {repo} at {_TOKEN_HELP} (fine-grained tokens need it)",
            )
        if status == 429:
            return DownloadFailed(
                f"the Hub is rate-limiting this client (HTTP 429) while fetching {repo}",
                fix="wait a few minutes (a token raises the limit), then " + rerun_hint(),
            )
        return DownloadFailed(
            f"the Hub answered HTTP {status or '?'} while fetching {repo} from {endpoint}",
            fix="wait and " + rerun_hint(),
        )
    if isinstance(exc, hf_errors.LocalEntryNotFoundError):
        # snapshot_download's word for "the Hub could not be reached".
        return DownloadFailed(f"the Hub at {endpoint} could not be reached", fix=_network_fix())
    return None


def _network_fix() -> str:
    return "check the connection and proxy settings (HTTPS_PROXY, NO_PROXY), then " + rerun_hint()


def _status(exc: BaseException) -> int | None:
    response = getattr(exc, "response", None)
    return getattr(response, "status_code", None)
