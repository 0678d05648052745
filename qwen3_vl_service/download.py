"""Download the model from the Hugging Face Hub, and check a downloaded copy offline.

``download_model.py`` fetches MODEL_REPO at MODEL_REVISION into MODEL_PATH with
huggingface_hub's ``snapshot_download`` (Xet or plain HTTP, several files in
parallel, a progress bar). Before a byte is written it lists the repo on the
Hub, checks that the token can read it and that the files fit on the target
file system; afterwards it writes ``qwen3_vl_manifest.json`` (name, size and
the hash the Hub reports for every file) into the model directory.

``download_model.py --verify [--deep]`` checks the directory against that
manifest without the network, on a compute node: missing files, wrong sizes
and, with ``--deep``, SHA-256 (weights) and git blob hashes (small files).
The preflight calls :func:`read_manifest` and :func:`verify` directly.

Resuming: a rerun keeps every file an earlier run finished (huggingface_hub
records them under ``MODEL_PATH/.cache/huggingface/``) and fetches the rest.
huggingface_hub >= 1.x writes each file to a process-unique temporary file and
deletes it when that download fails (huggingface_hub PR #4228, for Lustre and
NFS where file locks are not honoured), so a file cut off midway restarts from
its first byte on the next run; within one run a dropped connection resumes
with an HTTP Range request from the last 10 MiB piece written.

This module imports neither torch nor vllm, and imports huggingface_hub only
when it downloads: ``verify`` stays fast and works where the Hub library is
missing.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as _dt
import errno
import hashlib
import json
import os
import shutil
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path, PurePosixPath
from typing import Any, TypeVar

from . import __version__, cli
from .errors import CheckFailed, ConfigError, ServiceError, UsageError

MANIFEST_NAME = "qwen3_vl_manifest.json"
MANIFEST_FORMAT = 1
HASH_CHUNK = 8 * 1024 * 1024
DEFAULT_REPO = "Qwen/Qwen3-VL-235B-A22B-Thinking-FP8"
# Space kept free on top of the download: file system metadata, the manifest,
# huggingface_hub's own bookkeeping, and whatever else writes there meanwhile.
MARGIN_MIN_BYTES = 1 << 30
MARGIN_FRACTION = 0.01
# A huggingface_hub temporary file untouched this long belongs to no live
# download (an active one is written every few MB, or retried within 10 s).
STALE_PARTIAL_AGE_S = 120.0
# Where huggingface_hub keeps its local_dir bookkeeping, and our lock.
_HF_META_DIR = Path(".cache") / "huggingface"
_LOCK_NAME = Path(".cache") / "qwen3_vl_download.lock"
_TOKEN_HELP = "https://huggingface.co/settings/tokens"

T = TypeVar("T")


class DownloadFailed(ServiceError):
    """The download could not be done or finished (exit 1)."""


# ---------------------------------------------------------------------------
# The manifest


@dataclasses.dataclass(frozen=True)
class ManifestFile:
    """One file of the repo: its path (``/``-separated), size and the Hub's hashes."""

    name: str
    size: int
    sha256: str | None = None  # LFS files (the weight shards): the SHA-256 the Hub reports
    git_sha1: str | None = None  # other files: the git blob id, sha1(b"blob <size>\0" + data)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "size": self.size}
        if self.sha256:
            out["sha256"] = self.sha256
        if self.git_sha1:
            out["git_sha1"] = self.git_sha1
        return out


@dataclasses.dataclass(frozen=True)
class Manifest:
    """What a complete model directory holds, as the Hub described it."""

    repo: str
    revision: str
    commit: str
    created: str
    files: tuple[ManifestFile, ...]
    tool: str = ""

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files)

    def to_json(self) -> dict[str, Any]:
        return {
            "format": MANIFEST_FORMAT,
            "repo": self.repo,
            "revision": self.revision,
            "commit": self.commit,
            "created": self.created,
            "tool": self.tool,
            "total_bytes": self.total_bytes,
            "files": [f.to_json() for f in self.files],
        }


def manifest_path(model_dir: str | Path) -> Path:
    return Path(model_dir) / MANIFEST_NAME


def _safe_name(name: object) -> str:
    """A manifest entry must name a file inside the model directory."""
    if not isinstance(name, str) or not name or "\\" in name or "\x00" in name:
        raise ValueError(f"bad file name {name!r}")
    parts = PurePosixPath(name).parts
    if name.startswith("/") or any(p in ("", ".", "..") for p in parts):
        raise ValueError(f"file name {name!r} leaves the model directory")
    return name


def _parse_manifest(data: Any) -> Manifest:
    if not isinstance(data, dict):
        raise ValueError("not a JSON object")
    if data.get("format") != MANIFEST_FORMAT:
        raise ValueError(f"format {data.get('format')!r}, this version reads format {MANIFEST_FORMAT}")
    files = []
    for entry in data.get("files") or []:
        if not isinstance(entry, dict):
            raise ValueError("a files entry is not an object")
        size = entry.get("size")
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise ValueError(f"bad size for {entry.get('name')!r}")
        sha256, git_sha1 = entry.get("sha256"), entry.get("git_sha1")
        for value, length in ((sha256, 64), (git_sha1, 40)):
            if value is not None and not (isinstance(value, str) and len(value) == length):
                raise ValueError(f"bad hash for {entry.get('name')!r}")
        files.append(ManifestFile(_safe_name(entry.get("name")), size, sha256, git_sha1))
    if not files:
        raise ValueError("lists no files")
    for key in ("repo", "revision", "commit"):
        if not isinstance(data.get(key), str) or not data[key]:
            raise ValueError(f"missing {key!r}")
    return Manifest(
        repo=data["repo"],
        revision=data["revision"],
        commit=data["commit"],
        created=str(data.get("created", "")),
        files=tuple(files),
        tool=str(data.get("tool", "")),
    )


def read_manifest(model_dir: str | Path) -> Manifest | None:
    """The manifest of MODEL_DIR, or None when there is none. No network.

    Raises CheckFailed (one line, with the fix) when the file exists but cannot
    be read or parsed.
    """
    path = manifest_path(model_dir)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except NotADirectoryError:
        return None
    except (OSError, UnicodeDecodeError) as exc:
        reason = getattr(exc, "strerror", None) or type(exc).__name__
        raise CheckFailed(f"cannot read {path}: {reason}", fix="check its permissions") from None
    try:
        return _parse_manifest(json.loads(text))
    except ValueError as exc:  # json.JSONDecodeError is a ValueError
        raise CheckFailed(
            f"{path} is damaged ({exc})",
            fix="rerun download_model.py: it checks the files and writes the manifest again",
        ) from None


def write_manifest(model_dir: str | Path, manifest: Manifest) -> Path:
    """Write the manifest atomically (temporary file, fsync, rename)."""
    path = manifest_path(model_dir)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as fh:
            json.dump(manifest.to_json(), fh, indent=1)
            fh.write("\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink()
    with contextlib.suppress(OSError):  # make the rename durable; not possible everywhere
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    return path


# ---------------------------------------------------------------------------
# Offline verification


def _hash_file(path: Path, entry: ManifestFile) -> tuple[str, str, str]:
    """(kind, actual, expected) for the strongest hash the manifest has for ENTRY."""
    if entry.sha256:
        h, kind, expected = hashlib.sha256(), "sha256", entry.sha256
    else:
        h, kind, expected = hashlib.sha1(usedforsecurity=False), "git sha1", entry.git_sha1 or ""
        h.update(f"blob {entry.size}\0".encode())
    with open(path, "rb") as fh:
        while chunk := fh.read(HASH_CHUNK):
            h.update(chunk)
    return kind, h.hexdigest(), expected


def verify(
    model_dir: str | Path,
    deep: bool = False,
    *,
    manifest: Manifest | None = None,
    expect_repo: str | None = None,
    expect_revision: str | None = None,
    workers: int | None = None,
    on_hashed: Callable[[ManifestFile, bool], None] | None = None,
) -> list[str]:
    """Check MODEL_DIR against its manifest without the network.

    Returns one line per problem (empty: all good): a missing manifest, a
    missing file, a wrong size and, with DEEP, a hash that differs. EXPECT_REPO
    and EXPECT_REVISION (a commit id; branch names cannot be checked offline)
    compare the manifest with the configuration. ON_HASHED(entry, ok) is called
    after each file is hashed (deep only), from worker threads.
    """
    model_dir = Path(model_dir)
    if manifest is None:
        try:
            manifest = read_manifest(model_dir)
        except CheckFailed as exc:
            return [exc.one_line()]
    if manifest is None:
        if not model_dir.is_dir():
            return [f"model directory {model_dir} does not exist; run download_model.py"]
        return [
            f"no {MANIFEST_NAME} in {model_dir}, so its files cannot be checked; "
            "run download_model.py (it keeps finished files and writes the manifest)"
        ]
    problems: list[str] = []
    if expect_repo and manifest.repo != expect_repo:
        problems.append(
            f"{model_dir} holds {manifest.repo}, but MODEL_REPO={expect_repo}; "
            "point MODEL_PATH at a copy of that repo or download it"
        )
    if (
        expect_revision
        and len(expect_revision) == 40
        and all(c in "0123456789abcdef" for c in expect_revision)
        and manifest.commit != expect_revision
    ):
        problems.append(
            f"{model_dir} holds commit {manifest.commit[:12]}, but MODEL_REVISION={expect_revision}; "
            "run download_model.py to fetch that revision"
        )
    to_hash: list[tuple[Path, ManifestFile]] = []
    for entry in manifest.files:
        path = model_dir.joinpath(*entry.name.split("/"))
        try:
            st = path.stat()
        except FileNotFoundError:
            problems.append(f"{entry.name}: missing ({_human(entry.size)} expected); rerun download_model.py")
            continue
        except OSError as exc:
            problems.append(f"{entry.name}: cannot be read ({exc.strerror}); check its permissions")
            continue
        if not path.is_file():
            problems.append(f"{entry.name}: not a regular file; remove it and rerun download_model.py")
        elif st.st_size != entry.size:
            problems.append(
                f"{entry.name}: {st.st_size} bytes, expected {entry.size} "
                f"({'truncated' if st.st_size < entry.size else 'too long'}); rerun download_model.py"
            )
        elif deep and (entry.sha256 or entry.git_sha1):
            to_hash.append((path, entry))
    if to_hash:
        problems.extend(_hash_all(to_hash, workers, on_hashed))
    return problems


def _hash_all(
    items: list[tuple[Path, ManifestFile]],
    workers: int | None,
    on_hashed: Callable[[ManifestFile, bool], None] | None,
) -> list[str]:
    # hashlib releases the GIL on large buffers: a few threads keep a parallel
    # file system (Lustre, GPFS, NVMe) busy where one stream would not.
    workers = workers or min(8, os.cpu_count() or 1)

    def one(item: tuple[Path, ManifestFile]) -> str | None:
        path, entry = item
        try:
            kind, actual, expected = _hash_file(path, entry)
        except OSError as exc:
            problem: str | None = f"{entry.name}: cannot be read ({exc.strerror}); check the file system"
        else:
            problem = None
            if actual != expected:
                problem = (
                    f"{entry.name}: {kind} {actual[:12]}… differs from the Hub's {expected[:12]}… "
                    "(corrupt); delete the file and rerun download_model.py"
                )
        if on_hashed is not None:
            on_hashed(entry, problem is None)
        return problem

    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="verify") as pool:
        return [p for p in pool.map(one, items) if p]


# ---------------------------------------------------------------------------
# Small helpers


def _human(n: float) -> str:
    """Bytes in decimal units, as the Hub shows them."""
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1000:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def _duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, sec = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m{sec:02d}s" if hours else f"{minutes}m{sec:02d}s"


def nearest_existing_dir(path: Path) -> Path:
    """PATH or its closest existing ancestor: where the file system can be measured."""
    for candidate in (path, *path.parents):
        if candidate.is_dir():
            return candidate
    return Path(path.anchor or "/")


def _margin(needed: int) -> int:
    return 0 if needed <= 0 else max(MARGIN_MIN_BYTES, int(needed * MARGIN_FRACTION))


def _token_source() -> str | None:
    """Where huggingface_hub will take a token from (never the token itself)."""
    if os.environ.get("HF_TOKEN") or os.environ.get("HUGGING_FACE_HUB_TOKEN"):
        return "HF_TOKEN"
    try:
        from huggingface_hub import get_token

        if get_token():
            return "the Hub login (hf auth login)"
    except Exception:  # noqa: BLE001 - a broken token store reads as "no token"
        pass
    return None


def _iter_partials(local_dir: Path) -> Iterator[Path]:
    """huggingface_hub's temporary files (``*.incomplete``) under MODEL_PATH/.cache/huggingface."""
    root = local_dir / _HF_META_DIR / "download"
    if root.is_dir():
        yield from (p for p in root.rglob("*.incomplete") if p.is_file())


def _stale_partials(local_dir: Path, now: float) -> list[tuple[Path, int]]:
    out = []
    for p in _iter_partials(local_dir):
        with contextlib.suppress(OSError):
            st = p.stat()
            if now - st.st_mtime >= STALE_PARTIAL_AGE_S:
                out.append((p, st.st_size))
    return out


# ---------------------------------------------------------------------------
# Errors from the Hub library and the file system -> one line with the fix


def _network_error_types() -> tuple[type[BaseException], ...]:
    """Transport errors of whichever HTTP stack this huggingface_hub uses."""
    types: list[type[BaseException]] = [ConnectionError, TimeoutError]
    for module, name in (("httpx2", "TransportError"), ("httpx", "TransportError")):
        with contextlib.suppress(ImportError, AttributeError):
            types.append(getattr(__import__(module), name))
    with contextlib.suppress(ImportError):
        import requests

        types += [requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError]
    return tuple(types)


@dataclasses.dataclass
class _Context:
    repo: str
    revision: str
    endpoint: str
    local_dir: Path
    remaining: int = 0  # bytes still to fetch when the download started
    disk_usage: Callable[[Path], Any] = shutil.disk_usage


def _rerun_hint() -> str:
    return "rerun download_model.py: a rerun resumes where this one stopped (finished files are kept)"


def _disk_full(ctx: _Context) -> DownloadFailed:
    where = nearest_existing_dir(ctx.local_dir)
    try:
        free = _human(ctx.disk_usage(where).free)
    except OSError:
        free = "unknown"
    return DownloadFailed(
        f"disk full while downloading into {ctx.local_dir}: {free} left on its file system, "
        f"{_human(ctx.remaining)} were still to fetch at the start",
        fix="free space there (or set MODEL_PATH to a larger file system) and " + _rerun_hint(),
    )


def _not_writable(path: Path, exc: OSError) -> DownloadFailed:
    reason = exc.strerror or type(exc).__name__
    return DownloadFailed(
        f"cannot write the model to {path}: {reason}",
        fix="choose a directory you can write (MODEL_PATH in config.env or --local-dir)",
    )


def _translate(exc: BaseException, ctx: _Context) -> ServiceError | None:
    """A one-line ServiceError for EXC, or None when it is not one we know."""
    try:
        from huggingface_hub import errors as hf_errors
    except ImportError:  # pragma: no cover - the download path imported it already
        hf_errors = None  # type: ignore[assignment]
    repo, endpoint = ctx.repo, ctx.endpoint
    token = _token_source()
    if hf_errors is not None:
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
                fix=f"check MODEL_REPO (or --repo), e.g. {DEFAULT_REPO}; {hint}",
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
                    fix=f"give the token read access to {repo} at {_TOKEN_HELP} "
                    "(fine-grained tokens need it)",
                )
            if status == 429:
                return DownloadFailed(
                    f"the Hub is rate-limiting this client (HTTP 429) while fetching {repo}",
                    fix="wait a few minutes (a token raises the limit), then " + _rerun_hint(),
                )
            return DownloadFailed(
                f"the Hub answered HTTP {status or '?'} while fetching {repo} from {endpoint}",
                fix="wait and " + _rerun_hint(),
            )
        if isinstance(exc, hf_errors.LocalEntryNotFoundError):
            # snapshot_download's word for "the Hub could not be reached".
            return DownloadFailed(f"the Hub at {endpoint} could not be reached", fix=_network_fix())
    if isinstance(exc, _network_error_types()):
        detail = f"{type(exc).__name__}: {exc}".splitlines()[0][:200]
        return DownloadFailed(f"network failure talking to {endpoint} ({detail})", fix=_network_fix())
    if isinstance(exc, OSError):
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return _disk_full(ctx)
        if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            return _not_writable(Path(exc.filename) if exc.filename else ctx.local_dir, exc)
        if "Consistency check failed" in str(exc):  # a body shorter than announced
            return DownloadFailed(f"a file from {endpoint} arrived truncated", fix=_network_fix())
    return None


def _network_fix() -> str:
    return "check the connection and proxy settings (HTTPS_PROXY, NO_PROXY), then " + _rerun_hint()


def _status(exc: BaseException) -> int | None:
    response = getattr(exc, "response", None)
    return getattr(response, "status_code", None)


# ---------------------------------------------------------------------------
# The download


@dataclasses.dataclass(frozen=True)
class Plan:
    """What the Hub holds and what this directory still needs."""

    repo: str
    revision: str
    commit: str
    files: tuple[ManifestFile, ...]
    present: frozenset[str]  # names already complete on disk (right size)
    local_dir: Path
    measured_at: Path  # the directory whose file system was measured
    free: int
    reclaimable: int  # stale partial files this run deletes first

    @property
    def total(self) -> int:
        return sum(f.size for f in self.files)

    @property
    def needed(self) -> int:
        return sum(f.size for f in self.files if f.name not in self.present)

    @property
    def margin(self) -> int:
        return _margin(self.needed)

    @property
    def fits(self) -> bool:
        return self.needed + self.margin <= self.free + self.reclaimable

    def describe(self) -> str:
        have = self.total - self.needed
        return (
            f"{self.repo} at {self.revision} (commit {self.commit[:12]}): {len(self.files)} files, "
            f"{_human(self.total)}; {_human(have)} already in {self.local_dir}; "
            f"{_human(self.needed)} to fetch, "
            f"{_human(self.free + self.reclaimable)} free on {self.measured_at}"
        )


@dataclasses.dataclass(frozen=True)
class Result:
    plan: Plan
    manifest_path: Path
    fetched_files: int
    fetched_bytes: int
    seconds: float
    extra_files: tuple[str, ...]

    def summary(self) -> str:
        rate = _human(self.fetched_bytes / self.seconds) + "/s" if self.seconds > 0 else "-"
        kept = len(self.plan.files) - self.fetched_files
        return (
            f"done: {_count(len(self.plan.files), 'file')}, {_human(self.plan.total)} "
            f"in {self.plan.local_dir}; "
            f"fetched {_count(self.fetched_files, 'file')}, {_human(self.fetched_bytes)} "
            f"in {_duration(self.seconds)} ({rate}); {kept} already complete"
        )


def _list_remote(api: Any, repo: str, revision: str) -> tuple[str, tuple[ManifestFile, ...]]:
    """(commit, files) of REPO at REVISION, sizes and hashes as the Hub reports them."""
    from huggingface_hub.hf_api import RepoFile

    info = api.model_info(repo, revision=revision)
    commit = info.sha
    if not commit:
        raise DownloadFailed(f"the Hub returned no commit for {repo} at {revision}", fix="rerun later")
    files = []
    # The same listing snapshot_download makes; pinned to the commit so that a
    # push to the branch during a 236 GB download cannot mix two versions.
    for entry in api.list_repo_tree(repo, revision=commit, recursive=True):
        if not isinstance(entry, RepoFile):
            continue
        if entry.lfs is not None:
            files.append(ManifestFile(_safe_name(entry.path), int(entry.lfs.size), sha256=entry.lfs.sha256))
        else:
            git_sha1 = entry.blob_id if entry.blob_id and len(entry.blob_id) == 40 else None
            files.append(ManifestFile(_safe_name(entry.path), int(entry.size), git_sha1=git_sha1))
    if not files:
        raise DownloadFailed(f"{repo} at {revision} has no files", fix="check MODEL_REPO and MODEL_REVISION")
    return commit, tuple(sorted(files, key=lambda f: f.name))


def _check_access(
    repo: str, commit: str, files: Sequence[ManifestFile], endpoint: str | None, token: Any
) -> None:
    """HEAD one small file: a gated repo or a bad token fails here, before any byte is written."""
    from huggingface_hub import get_hf_file_metadata, hf_hub_url

    names = {f.name for f in files}
    probe = "config.json" if "config.json" in names else min(files, key=lambda f: f.size).name
    get_hf_file_metadata(
        hf_hub_url(repo, probe, revision=commit, endpoint=endpoint), token=token, endpoint=endpoint
    )


def _complete_on_disk(local_dir: Path, files: Sequence[ManifestFile]) -> frozenset[str]:
    present = set()
    for f in files:
        path = local_dir.joinpath(*f.name.split("/"))
        with contextlib.suppress(OSError):
            if path.is_file() and path.stat().st_size == f.size:
                present.add(f.name)
    return frozenset(present)


def _ensure_writable(local_dir: Path) -> None:
    if local_dir.exists() and not local_dir.is_dir():
        raise DownloadFailed(
            f"{local_dir} exists and is not a directory",
            fix="set MODEL_PATH (or --local-dir) to a directory",
        )
    try:
        (local_dir / _HF_META_DIR).mkdir(parents=True, exist_ok=True)
        probe = local_dir / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise _not_writable(Path(exc.filename) if exc.filename else local_dir, exc) from None


@contextlib.contextmanager
def _exclusive(local_dir: Path) -> Iterator[None]:
    """One download_model.py per model directory (best effort where flock is not supported)."""
    import fcntl

    path = local_dir / _LOCK_NAME
    fh = open(path, "a+", encoding="utf-8")  # noqa: SIM115 - closed below
    try:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            holder = fh.read().strip() or "?"
            raise DownloadFailed(
                f"another download_model.py (pid {holder}) is downloading into {local_dir}",
                fix="wait for it to finish, or stop it first",
            ) from None
        except OSError:
            pass  # e.g. Lustre mounted without flock: go on unlocked
        fh.seek(0)
        fh.truncate()
        fh.write(f"{os.getpid()}\n")
        fh.flush()
        yield
    finally:
        fh.close()


def plan_download(
    repo: str,
    revision: str,
    local_dir: str | Path,
    *,
    endpoint: str | None = None,
    token: str | bool | None = None,
    disk_usage: Callable[[Path], Any] = shutil.disk_usage,
) -> Plan:
    """Ask the Hub what REPO@REVISION holds and measure the target. Writes nothing."""
    from huggingface_hub import HfApi

    local_dir = Path(local_dir).expanduser().absolute()
    if local_dir.exists() and not local_dir.is_dir():
        raise DownloadFailed(
            f"{local_dir} exists and is not a directory", fix="set MODEL_PATH (or --local-dir) to a directory"
        )
    ctx = _Context(repo, revision, _endpoint(endpoint), local_dir, disk_usage=disk_usage)
    try:
        api = HfApi(endpoint=endpoint, token=token)
        commit, files = _list_remote(api, repo, revision)
        _check_access(repo, commit, files, endpoint, token)
    except ServiceError:
        raise
    except Exception as exc:
        translated = _translate(exc, ctx)
        if translated is None:
            raise
        raise translated from exc
    present = _complete_on_disk(local_dir, files) if local_dir.is_dir() else frozenset()
    where = nearest_existing_dir(local_dir)
    try:
        free = int(disk_usage(where).free)
    except OSError as exc:
        raise DownloadFailed(
            f"cannot measure free space on {where}: {exc.strerror}", fix="check the path"
        ) from None
    reclaimable = sum(size for _, size in _stale_partials(local_dir, time.time()))
    return Plan(repo, revision, commit, files, present, local_dir, where, free, reclaimable)


def _endpoint(endpoint: str | None) -> str:
    if endpoint:
        return endpoint.rstrip("/")
    try:
        from huggingface_hub import constants

        return constants.ENDPOINT
    except ImportError:  # pragma: no cover
        return "https://huggingface.co"


def _run_direct(fn: Callable[[], T]) -> T:
    return fn()


def download(
    repo: str,
    revision: str,
    local_dir: str | Path,
    *,
    endpoint: str | None = None,
    token: str | bool | None = None,
    workers: int = 8,
    disk_usage: Callable[[Path], Any] = shutil.disk_usage,
    runner: Callable[[Callable[[], Any]], Any] = _run_direct,
    say: Callable[[str], None] = lambda line: None,
    plan: Plan | None = None,
) -> Result:
    """Download REPO@REVISION into LOCAL_DIR and write the manifest.

    ENDPOINT and TOKEN default to huggingface_hub's own (HF_ENDPOINT; HF_TOKEN
    or the Hub login). DISK_USAGE measures free space (tests inject a small
    disk). RUNNER runs the blocking snapshot_download call (the CLI runs it so
    that Ctrl+C and SIGTERM act at once). Raises ServiceError subclasses with
    one-line messages.
    """
    from huggingface_hub import snapshot_download

    local_dir = Path(local_dir).expanduser().absolute()
    plan = plan or plan_download(
        repo, revision, local_dir, endpoint=endpoint, token=token, disk_usage=disk_usage
    )
    ctx = _Context(repo, revision, _endpoint(endpoint), local_dir, plan.needed, disk_usage)
    say(plan.describe())
    if not plan.fits:
        raise DownloadFailed(
            f"not enough space for {repo} in {local_dir}: {_human(plan.needed)} still to fetch "
            f"(+{_human(plan.margin)} margin), but only {_human(plan.free + plan.reclaimable)} free on "
            f"{plan.measured_at} ({_human(plan.total - plan.needed)} of {_human(plan.total)} already there)",
            fix=f"free {_human(plan.needed + plan.margin - plan.free - plan.reclaimable)} there, "
            "or set MODEL_PATH (or --local-dir) to a larger file system",
        )
    _ensure_writable(local_dir)
    with _exclusive(local_dir):
        for path, _ in _stale_partials(local_dir, time.time()):
            with contextlib.suppress(OSError):
                path.unlink()
        old = _read_manifest_quietly(local_dir)
        if old is not None and old.commit != plan.commit:
            # The directory is about to change under the old manifest.
            manifest_path(local_dir).unlink(missing_ok=True)
        started = time.monotonic()
        try:
            runner(
                lambda: snapshot_download(
                    repo,
                    revision=plan.commit,
                    local_dir=str(local_dir),
                    endpoint=endpoint,
                    token=token,
                    max_workers=workers,
                )
            )
        except ServiceError:
            raise
        except Exception as exc:
            translated = _translate(exc, ctx)
            if translated is None:
                raise
            raise translated from exc
        seconds = time.monotonic() - started
        problems = verify(local_dir, manifest=_manifest_for(plan))
        if problems:
            raise DownloadFailed(
                f"the download ended with {len(problems)} file(s) missing or incomplete "
                f"(first: {problems[0].split(';')[0]}); the Hub may have become unreachable",
                fix=_rerun_hint(),
            )
        try:
            written = write_manifest(local_dir, _manifest_for(plan))
        except OSError as exc:
            translated = _translate(exc, ctx)
            raise (translated or DownloadFailed(f"cannot write the manifest: {exc}")) from exc
    fetched = [f for f in plan.files if f.name not in plan.present]
    return Result(
        plan=plan,
        manifest_path=written,
        fetched_files=len(fetched),
        fetched_bytes=sum(f.size for f in fetched),
        seconds=seconds,
        extra_files=tuple(_extra_files(local_dir, plan.files)),
    )


def _manifest_for(plan: Plan) -> Manifest:
    try:
        import huggingface_hub

        hub = f", huggingface_hub {huggingface_hub.__version__}"
    except ImportError:  # pragma: no cover
        hub = ""
    return Manifest(
        repo=plan.repo,
        revision=plan.revision,
        commit=plan.commit,
        created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        files=plan.files,
        tool=f"qwen3_vl_service {__version__}{hub}",
    )


def _read_manifest_quietly(local_dir: Path) -> Manifest | None:
    try:
        return read_manifest(local_dir)
    except CheckFailed:
        return None


def _extra_files(local_dir: Path, files: Sequence[ManifestFile]) -> list[str]:
    """Files in the directory that this commit does not have (an older revision's shards?)."""
    known = {f.name for f in files} | {MANIFEST_NAME}
    extra = []
    for path in local_dir.rglob("*"):
        rel = path.relative_to(local_dir).as_posix()
        if rel.startswith(".cache/") or rel == ".cache" or not path.is_file():
            continue
        if rel not in known:
            extra.append(rel)
    return sorted(extra)


# ---------------------------------------------------------------------------
# Ctrl+C and SIGTERM during the download


def _run_until_signal(fn: Callable[[], T], on_signal: Callable[[str], None]) -> T:
    """Run FN in a thread; on SIGINT or SIGTERM call ON_SIGNAL(signal name), which must not return.

    huggingface_hub's worker threads cannot be cancelled: without this a
    Ctrl+C (or SLURM's SIGTERM at the time limit) would wait for every file in
    flight to finish, minutes for a 5 GB shard. The handlers only record the
    signal; this loop acts on it.
    """
    box: dict[str, Any] = {}
    caught: list[int] = []

    def target() -> None:
        try:
            box["value"] = fn()
        except BaseException as exc:  # noqa: BLE001 - handed to the caller's thread
            box["error"] = exc

    def handler(signum: int, _frame: Any) -> None:
        caught.append(signum)

    in_main = threading.current_thread() is threading.main_thread()
    previous = {}
    if in_main:
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, handler)
    worker = threading.Thread(target=target, name="snapshot_download", daemon=True)
    worker.start()
    try:
        while worker.is_alive():
            worker.join(0.2)
            if caught:
                on_signal(signal.Signals(caught[0]).name)
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
    if "error" in box:
        raise box["error"]
    return box["value"]


def _abort(local_dir: Path, started_wall: float, signame: str, log: Callable[[str], None]) -> None:
    """Remove this run's partial files and leave now; finished files stay for the rerun."""
    removed = 0
    for path in _iter_partials(local_dir):
        with contextlib.suppress(OSError):
            if path.stat().st_mtime >= started_wall - 1:
                path.unlink()
                removed += 1
    message = (
        f"interrupted ({signame}): files finished so far are kept ({removed} partial file(s) removed); "
        "rerun download_model.py to resume"
    )
    log(message)
    print(message, file=sys.stderr, flush=True)
    sys.stdout.flush()
    os._exit(130)


# ---------------------------------------------------------------------------
# The command


def _parser() -> cli.ArgumentParser:
    p = cli.ArgumentParser(
        prog="download_model.py",
        description="Download the model from the Hugging Face Hub into MODEL_PATH, "
        "or check a downloaded copy.",
        epilog="Token: HF_TOKEN in the environment or 'hf auth login'; it is never printed. "
        "Exit codes: 0 ok, 1 failed (one line says why), 2 bad usage or config, 130 interrupted.",
    )
    p.add_config()
    p.add_argument("--repo", help="Hub repo id (default MODEL_REPO)")
    p.add_argument("--revision", help="branch, tag or commit (default MODEL_REVISION)")
    p.add_argument("--local-dir", metavar="DIR", help="target directory (default MODEL_PATH)")
    p.add_argument(
        "--verify", action="store_true", help="check DIR against its manifest offline, download nothing"
    )
    p.add_argument(
        "--deep",
        action="store_true",
        help="with --verify: also check every file's hash; after a download: hash-check the files",
    )
    p.add_argument("--dry-run", action="store_true", help="list the repo and check space, download nothing")
    p.add_argument(
        "--workers", type=int, default=8, metavar="N", help="files fetched in parallel (default 8)"
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bars (e.g. in batch logs)")
    return p


@dataclasses.dataclass(frozen=True)
class _Settings:
    repo: str
    revision: str
    local_dir: Path
    log_path: Path


def _settings(args: Any) -> _Settings:
    """Explicit flags win; the rest comes from config.load() (only read when needed)."""
    repo, revision, local_dir = args.repo, args.revision, args.local_dir
    log_dir = Path.cwd() / "logs"
    if args.config or repo is None or revision is None or local_dir is None:
        from . import config

        cfg = config.load(args.config)
        repo = repo or cfg.model_repo
        revision = revision or cfg.model_revision
        local_dir = local_dir or cfg.model_path
        log_dir = cfg.log_dir
    if args.workers < 1:
        raise UsageError(f"--workers {args.workers} must be at least 1", fix="pass e.g. --workers 8")
    if args.dry_run and args.verify:
        raise UsageError("--dry-run and --verify do not go together", fix="pass one of them")
    return _Settings(repo, revision, Path(local_dir).expanduser().absolute(), log_dir / "download.log")


def _log_line(log_path: Path, message: str) -> None:
    """Append one dated line to the download log (never a token: messages name its source only)."""
    with contextlib.suppress(OSError):
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(log_path, "a", encoding="utf-8") as fh:
            fh.write(f"{_dt.datetime.now().isoformat(timespec='seconds')} pid {os.getpid()} {message}\n")


def _cmd_verify(args: Any, s: _Settings) -> int:
    manifest = read_manifest(s.local_dir)
    label = "deep check (sizes and hashes)" if args.deep else "check (names and sizes)"
    if manifest is not None:
        extra = f", {_human(manifest.total_bytes)}, commit {manifest.commit[:12]}"
        print(f"{label} of {s.local_dir}: {len(manifest.files)} files{extra}", flush=True)
    lock = threading.Lock()
    done = [0]
    hashed_total = len(manifest.files) if manifest else 0

    def on_hashed(entry: ManifestFile, ok: bool) -> None:
        with lock:
            done[0] += 1
            print(
                f"  [{done[0]}/{hashed_total}] {'ok  ' if ok else 'BAD '} {entry.name}",
                file=sys.stderr,
                flush=True,
            )

    problems = verify(
        s.local_dir,
        deep=args.deep,
        manifest=manifest,
        expect_repo=s.repo,
        expect_revision=s.revision,
        on_hashed=on_hashed if args.deep and not args.no_progress else None,
    )
    for line in problems:
        print(f"problem: {line}", flush=True)
    if problems:
        _log_line(s.log_path, f"verify {s.local_dir}: {len(problems)} problem(s); first: {problems[0]}")
        raise CheckFailed(
            f"{s.local_dir} failed the {label}: {len(problems)} problem(s), listed above",
            fix="rerun download_model.py (it keeps good files and refetches the rest)",
        )
    print(f"ok: {s.local_dir} matches its manifest", flush=True)
    _log_line(s.log_path, f"verify {s.local_dir}: ok ({label})")
    return 0


def _cmd_download(args: Any, s: _Settings) -> int:
    if args.no_progress:
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()
    token_from = _token_source()
    token_text = f"from {token_from}" if token_from else "none"
    print(f"{s.repo} at {s.revision} -> {s.local_dir} (token: {token_text})", flush=True)
    try:
        return _download_and_report(args, s)
    except ServiceError as exc:
        _log_line(s.log_path, f"download failed: {exc.one_line()}")
        raise


def _download_and_report(args: Any, s: _Settings) -> int:
    plan = plan_download(s.repo, s.revision, s.local_dir)
    if args.dry_run:
        print(plan.describe(), flush=True)
        if not plan.fits:
            raise DownloadFailed(
                f"it does not fit: {_human(plan.needed + plan.margin)} needed with the margin",
                fix="free space or set MODEL_PATH to a larger file system",
            )
        print("dry run: it fits; nothing downloaded", flush=True)
        return 0
    _log_line(s.log_path, f"download start: {plan.describe()}")
    started_wall = time.time()

    def runner(fn: Callable[[], T]) -> T:
        return _run_until_signal(
            fn, lambda name: _abort(s.local_dir, started_wall, name, lambda m: _log_line(s.log_path, m))
        )

    result = download(
        s.repo,
        s.revision,
        s.local_dir,
        workers=args.workers,
        runner=runner,
        say=lambda line: print(line, flush=True),
        plan=plan,
    )
    print(result.summary(), flush=True)
    print(f"manifest: {result.manifest_path}", flush=True)
    if plan.revision != plan.commit:
        print(f"to pin this exact version, set MODEL_REVISION={plan.commit} in config.env", flush=True)
    if result.extra_files:
        shown = ", ".join(result.extra_files[:3]) + (" ..." if len(result.extra_files) > 3 else "")
        print(
            f"note: {len(result.extra_files)} file(s) in {s.local_dir} are not part of this commit "
            f"(kept; remove them to save space): {shown}",
            flush=True,
        )
    _log_line(s.log_path, result.summary())
    if args.deep:
        return _cmd_verify(args, s)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """download_model.py: download (default), --dry-run, or --verify [--deep]."""
    state: dict[str, Any] = {}

    def prepare() -> int:
        args = _parser().parse_args(argv)
        state["args"], state["settings"] = args, _settings(args)
        return 0

    rc = cli.run(prepare, Path.cwd() / "logs" / "download.log")
    if rc:
        return rc
    args, settings = state["args"], state["settings"]
    body = _cmd_verify if args.verify else _cmd_download
    return cli.run(lambda: body(args, settings), settings.log_path)


__all__ = [
    "MANIFEST_NAME",
    "DownloadFailed",
    "Manifest",
    "ManifestFile",
    "Plan",
    "Result",
    "download",
    "main",
    "plan_download",
    "read_manifest",
    "verify",
    "write_manifest",
]
