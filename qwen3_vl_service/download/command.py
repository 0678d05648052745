"""download_model.py: download the model (with Ctrl+C handled), or --verify a copy offline."""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as _dt
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from qwen3_vl_service.core import cli
from qwen3_vl_service.core.errors import CheckFailed, ServiceError, UsageError
from qwen3_vl_service.core.units import format_decimal_bytes
from qwen3_vl_service.download.hub import DownloadFailed, download, iter_partials, plan_download
from qwen3_vl_service.download.hub_errors import token_source
from qwen3_vl_service.download.manifest import MANIFEST_NAME, ManifestFile, read_manifest
from qwen3_vl_service.download.verify import INDEX_FILE, WITHOUT_MANIFEST, verify
from qwen3_vl_service.settings import config

T = TypeVar("T")

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
    for path in iter_partials(local_dir):
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
    # A flag gets its setting's own check (and message): --repo like MODEL_REPO.
    if repo is not None:
        repo = config.parse_value("MODEL_REPO", repo, name="--repo")
    if revision is not None:
        revision = config.parse_value("MODEL_REVISION", revision, name="--revision")
    log_dir = Path.cwd() / "logs"
    if args.config or repo is None or revision is None or local_dir is None:
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
        extra = f", {format_decimal_bytes(manifest.total_bytes)}, commit {manifest.commit[:12]}"
        print(f"{label} of {s.local_dir}: {len(manifest.files)} files{extra}", flush=True)
    elif s.local_dir.is_dir():
        # The preflight's own completeness check, so the two never disagree about one folder.
        print(WITHOUT_MANIFEST.format(manifest=MANIFEST_NAME, index=INDEX_FILE), flush=True)
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
    against = "its manifest" if manifest is not None else "its index and safetensors headers"
    print(f"ok: {s.local_dir} matches {against}", flush=True)
    _log_line(s.log_path, f"verify {s.local_dir}: ok ({label} against {against})")
    return 0


def _cmd_download(args: Any, s: _Settings) -> int:
    if args.no_progress:
        from huggingface_hub.utils import disable_progress_bars  # lazily: --verify never needs the Hub

        disable_progress_bars()
    token_from = token_source()
    token_text = f"from {token_from}" if token_from else "none"
    print(f"{s.repo} at {s.revision} -> {s.local_dir} (token: {token_text})", flush=True)
    try:
        return _download_and_report(args, s)
    except ServiceError as exc:
        # A dry run downloads nothing, so nothing "failed to download" (its log line says what it was).
        what = "dry run (nothing downloaded)" if args.dry_run else "download failed"
        _log_line(s.log_path, f"{what}: {exc.one_line()}")
        raise


def _download_and_report(args: Any, s: _Settings) -> int:
    plan = plan_download(s.repo, s.revision, s.local_dir)
    if args.dry_run:
        print(plan.describe(), flush=True)
        if not plan.fits:
            raise DownloadFailed(
                f"it does not fit: {format_decimal_bytes(plan.needed + plan.margin)} needed with the margin",
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
