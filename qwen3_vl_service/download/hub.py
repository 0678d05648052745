"""Downloading the model from the Hugging Face Hub: plan (list, access, space), download, manifest.

``download_model.py`` fetches MODEL_REPO at MODEL_REVISION into MODEL_PATH with
huggingface_hub's ``snapshot_download`` (Xet or plain HTTP, several files in
parallel, a progress bar). Before a byte is written it lists the repo on the
Hub, checks that the token can read it and that the files fit on the target
file system; afterwards it writes the manifest (manifest.py: name, size and
the hash the Hub reports for every file) into the model directory.

Resuming: a rerun keeps every file an earlier run finished (huggingface_hub
records them under ``MODEL_PATH/.cache/huggingface/``) and fetches the rest.
huggingface_hub >= 1.x writes each file to a process-unique temporary file and
deletes it when that download fails (huggingface_hub PR #4228, for Lustre and
NFS where file locks are not honoured), so a file cut off midway restarts from
its first byte on the next run; within one run a dropped connection resumes
with an HTTP Range request from the last 10 MiB piece written.

huggingface_hub is imported only when a download runs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as _dt
import os
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

from qwen3_vl_service import __version__
from qwen3_vl_service.core.errors import CheckFailed
from qwen3_vl_service.core.units import format_decimal_bytes, format_duration
from qwen3_vl_service.download.hub_errors import (
    DownloadFailed,
    HubContext,
    nearest_existing_dir,
    not_writable,
    one_line_errors,
    rerun_hint,
    translate,
)
from qwen3_vl_service.download.manifest import (
    MANIFEST_NAME,
    Manifest,
    ManifestFile,
    manifest_path,
    read_manifest,
    safe_name,
    write_manifest,
)
from qwen3_vl_service.download.verify import verify

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

T = TypeVar("T")


# ---------------------------------------------------------------------------
# Small helpers


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def _margin(needed: int) -> int:
    return 0 if needed <= 0 else max(MARGIN_MIN_BYTES, int(needed * MARGIN_FRACTION))


def iter_partials(local_dir: Path) -> Iterator[Path]:
    """huggingface_hub's temporary files (``*.incomplete``) under MODEL_PATH/.cache/huggingface."""
    root = local_dir / _HF_META_DIR / "download"
    if root.is_dir():
        yield from (p for p in root.rglob("*.incomplete") if p.is_file())


def _stale_partials(local_dir: Path, now: float) -> list[tuple[Path, int]]:
    out = []
    for p in iter_partials(local_dir):
        with contextlib.suppress(OSError):
            st = p.stat()
            if now - st.st_mtime >= STALE_PARTIAL_AGE_S:
                out.append((p, st.st_size))
    return out


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
            f"{format_decimal_bytes(self.total)}; {format_decimal_bytes(have)} already in {self.local_dir}; "
            f"{format_decimal_bytes(self.needed)} to fetch, "
            f"{format_decimal_bytes(self.free + self.reclaimable)} free on {self.measured_at}"
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
        rate = format_decimal_bytes(self.fetched_bytes / self.seconds) + "/s" if self.seconds > 0 else "-"
        kept = len(self.plan.files) - self.fetched_files
        return (
            f"done: {_count(len(self.plan.files), 'file')}, {format_decimal_bytes(self.plan.total)} "
            f"in {self.plan.local_dir}; "
            f"fetched {_count(self.fetched_files, 'file')}, {format_decimal_bytes(self.fetched_bytes)} "
            f"in {format_duration(self.seconds)} ({rate}); {kept} already complete"
        )


def _list_remote(api: Any, repo: str, revision: str) -> tuple[str, tuple[ManifestFile, ...]]:
    """(commit, files) of REPO at REVISION, sizes and hashes as the Hub reports them."""
    from huggingface_hub.hf_api import RepoFile  # lazily, as everywhere here: --verify never needs the Hub

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
            files.append(ManifestFile(safe_name(entry.path), int(entry.lfs.size), sha256=entry.lfs.sha256))
        else:
            git_sha1 = entry.blob_id if entry.blob_id and len(entry.blob_id) == 40 else None
            files.append(ManifestFile(safe_name(entry.path), int(entry.size), git_sha1=git_sha1))
    if not files:
        raise DownloadFailed(f"{repo} at {revision} has no files", fix="check MODEL_REPO and MODEL_REVISION")
    return commit, tuple(sorted(files, key=lambda f: f.name))


def _check_access(
    repo: str, commit: str, files: Sequence[ManifestFile], endpoint: str | None, token: Any
) -> None:
    """HEAD one small file: a gated repo or a bad token fails here, before any byte is written."""
    from huggingface_hub import get_hf_file_metadata, hf_hub_url  # lazily: --verify never needs the Hub

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
        raise not_writable(Path(exc.filename) if exc.filename else local_dir, exc) from None


@contextlib.contextmanager
def _exclusive(local_dir: Path) -> Iterator[None]:
    """One download_model.py per model directory (best effort where flock is not supported)."""
    import fcntl  # POSIX only: imported where the lock is taken

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
    from huggingface_hub import HfApi  # lazily, as everywhere here: --verify never needs the Hub

    local_dir = Path(local_dir).expanduser().absolute()
    if local_dir.exists() and not local_dir.is_dir():
        raise DownloadFailed(
            f"{local_dir} exists and is not a directory", fix="set MODEL_PATH (or --local-dir) to a directory"
        )
    ctx = HubContext(repo, revision, _endpoint(endpoint), local_dir, disk_usage=disk_usage)
    with one_line_errors(ctx):
        api = HfApi(endpoint=endpoint, token=token)
        commit, files = _list_remote(api, repo, revision)
        _check_access(repo, commit, files, endpoint, token)
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
    from huggingface_hub import constants  # lazily, as everywhere here: --verify never needs the Hub

    return constants.ENDPOINT


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
    local_dir = Path(local_dir).expanduser().absolute()
    plan = plan or plan_download(
        repo, revision, local_dir, endpoint=endpoint, token=token, disk_usage=disk_usage
    )
    ctx = HubContext(repo, revision, _endpoint(endpoint), local_dir, plan.needed, disk_usage)
    say(plan.describe())
    _check_fits(plan)
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
        _fetch(plan, ctx, endpoint, token, workers, runner)
        seconds = time.monotonic() - started
        written = _check_and_record(plan, ctx)
    fetched = [f for f in plan.files if f.name not in plan.present]
    return Result(
        plan=plan,
        manifest_path=written,
        fetched_files=len(fetched),
        fetched_bytes=sum(f.size for f in fetched),
        seconds=seconds,
        extra_files=tuple(_extra_files(local_dir, plan.files)),
    )


def _check_fits(plan: Plan) -> None:
    """DownloadFailed, naming every size, unless the files still to fetch fit with the margin."""
    if plan.fits:
        return
    size = format_decimal_bytes
    free = plan.free + plan.reclaimable
    raise DownloadFailed(
        f"not enough space for {plan.repo} in {plan.local_dir}: {size(plan.needed)} still to fetch "
        f"(+{size(plan.margin)} margin), but only {size(free)} free on {plan.measured_at} "
        f"({size(plan.total - plan.needed)} of {size(plan.total)} already there)",
        fix=f"free {size(plan.needed + plan.margin - free)} there, "
        "or set MODEL_PATH (or --local-dir) to a larger file system",
    )


def _fetch(
    plan: Plan,
    ctx: HubContext,
    endpoint: str | None,
    token: str | bool | None,
    workers: int,
    runner: Callable[[Callable[[], Any]], Any],
) -> None:
    """snapshot_download of the planned commit through RUNNER; its errors as one line with the fix."""
    from huggingface_hub import snapshot_download  # lazily: --verify never needs the Hub

    with one_line_errors(ctx):
        runner(
            lambda: snapshot_download(
                plan.repo,
                revision=plan.commit,
                local_dir=str(ctx.local_dir),
                endpoint=endpoint,
                token=token,
                max_workers=workers,
            )
        )


def _check_and_record(plan: Plan, ctx: HubContext) -> Path:
    """Check the downloaded files against the plan (sizes), then write the manifest; its path."""
    problems = verify(ctx.local_dir, manifest=_manifest_for(plan))
    if problems:
        raise DownloadFailed(
            f"the download ended with {len(problems)} file(s) missing or incomplete "
            f"(first: {problems[0].split(';')[0]}); the Hub may have become unreachable",
            fix=rerun_hint(),
        )
    try:
        return write_manifest(ctx.local_dir, _manifest_for(plan))
    except OSError as exc:
        translated = translate(exc, ctx)
        raise (translated or DownloadFailed(f"cannot write the manifest: {exc}")) from exc


def _manifest_for(plan: Plan) -> Manifest:
    import huggingface_hub  # lazily, as everywhere here: heavy, and --verify never needs the Hub

    hub = f", huggingface_hub {huggingface_hub.__version__}"
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
