"""The download manifest: what a complete model directory holds (names, sizes, the Hub's hashes).

``qwen3_vl_manifest.json`` is written by download_model.py after a download
and read offline (model.py, verify.py): no network and no Hub library here.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path, PurePosixPath
from typing import Any

from qwen3_vl_service.core.errors import CheckFailed
from qwen3_vl_service.core.fileio import write_atomic

MANIFEST_NAME = "qwen3_vl_manifest.json"
MANIFEST_FORMAT = 1


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


def safe_name(name: object) -> str:
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
        files.append(ManifestFile(safe_name(entry.get("name")), size, sha256, git_sha1))
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
    """Write the manifest atomically (fileio.write_atomic)."""
    return write_atomic(manifest_path(model_dir), json.dumps(manifest.to_json(), indent=1) + "\n")
