"""Checking a model directory against its manifest, offline: missing files, sizes, and hashes with --deep."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from qwen3_vl_service.core.errors import CheckFailed
from qwen3_vl_service.core.units import format_decimal_bytes
from qwen3_vl_service.download.manifest import MANIFEST_NAME, Manifest, ManifestFile, read_manifest

HASH_CHUNK = 8 * 1024 * 1024


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
            problems.append(
                f"{entry.name}: missing ({format_decimal_bytes(entry.size)} expected); "
                "rerun download_model.py"
            )
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
