"""Checking a model directory offline: against its manifest (missing files, sizes, and hashes with --deep),
or, without one, against its safetensors index and each shard's own header (names and sizes).

A safetensors file is an 8-byte header length, a JSON header and the tensor data; the header's
largest data offset says how long the file must be. That is how the preflight (planning/model.py)
calls a folder complete, and how ``verify`` checks a folder that download_model.py did not write
(copied, or fetched with ``hf download``): the same answer from both.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from qwen3_vl_service.core.errors import CheckFailed
from qwen3_vl_service.core.units import format_decimal_bytes
from qwen3_vl_service.download.manifest import MANIFEST_NAME, Manifest, ManifestFile, read_manifest

HASH_CHUNK = 8 * 1024 * 1024
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
MAX_HEADER = 100 * 1024 * 1024  # safetensors' own limit for the JSON header
WITHOUT_MANIFEST = (
    "no {manifest}: checked against {index} and each shard's safetensors header (names and sizes; "
    "the Hub's hashes are in the manifest that download_model.py writes)"
)


def read_header(path: Path, size: int, count: tuple[str, ...] = ()) -> tuple[int | None, int, str]:
    """(bytes the file must have, bytes of tensors named with a COUNT prefix, problem) from its header."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                return None, 0, f"not a safetensors file ({size} bytes)"
            (n,) = struct.unpack("<Q", head)
            if n == 0 or n > MAX_HEADER or n > size - 8:
                return (
                    None,
                    0,
                    f"not a safetensors file (header length {n}, file {size} bytes): truncated or corrupt",
                )
            header = json.loads(fh.read(n))
    except (OSError, ValueError) as exc:
        return None, 0, f"header unreadable ({exc})"
    if not isinstance(header, dict):
        return None, 0, "header is not a JSON object"
    end = 0
    counted = 0
    for name, entry in header.items():
        if name == "__metadata__" or not isinstance(entry, dict):
            continue
        offsets = entry.get("data_offsets")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)):
            return None, 0, f"header entry {name!r} has no data_offsets"
        end = max(end, offsets[1])
        if count and name.startswith(count):
            counted += offsets[1] - offsets[0]
    return 8 + n + end, counted, ""


def verify_without_manifest(model_dir: Path) -> list[str]:
    """MODEL_DIR checked against its index and each shard's safetensors header: one line per problem."""
    fix = "rerun download_model.py (it keeps good files and refetches the rest)"
    if not (model_dir / "config.json").is_file():
        return [f"config.json: missing; {fix}"]
    try:
        index = json.loads((model_dir / INDEX_FILE).read_text(encoding="utf-8"))
        names = sorted({v for v in index["weight_map"].values() if isinstance(v, str)})
    except FileNotFoundError:
        names = [SINGLE_FILE] if (model_dir / SINGLE_FILE).is_file() else []
        if not names:
            return [f"{INDEX_FILE}: missing (and no {SINGLE_FILE}); {fix}"]
    except (OSError, ValueError, TypeError, KeyError) as exc:
        return [f"{INDEX_FILE}: unreadable or without a weight_map ({exc}); {fix}"]
    problems = []
    for name in names:
        try:
            size = (model_dir / name).stat().st_size
        except OSError:
            problems.append(f"{name}: missing (named in {INDEX_FILE}); {fix}")
            continue
        want, _, problem = read_header(model_dir / name, size)
        if problem:
            problems.append(f"{name}: {problem}; {fix}")
        elif want is not None and size != want:
            how = "truncated" if size < want else "too long"
            problems.append(f"{name}: {size} bytes, its safetensors header says {want} ({how}); {fix}")
    return problems


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

    Returns one line per problem (empty: all good): a missing file, a wrong
    size and, with DEEP, a hash that differs. Without a manifest the folder is
    checked against its index and the shards' headers instead
    (verify_without_manifest); DEEP then has no hashes to compare and says so. EXPECT_REPO
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
        found = verify_without_manifest(model_dir)
        if deep:
            found.append(
                f"no {MANIFEST_NAME} in {model_dir}, so no hashes to compare the files with; "
                "run download_model.py once (it keeps finished files and writes the manifest)"
            )
        return found
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
