"""Which file a URL names: the whole security policy of the media server.

Everything refused is the same 404, so that a client cannot tell a missing
file from a forbidden one: paths outside the root (``..``, percent- and
double-encoded forms, backslashes, absolute paths, NUL and control bytes),
symlinks whose target leaves the root, hidden names, anything that is not a
regular readable file, directories (no listings) and extensions not in the
allowed list. HTTP itself (Range, ETag, conditional requests) is aiohttp's
``FileResponse`` (app.py); this module only decides *which* file, and the
few Range cases aiohttp gets wrong.
"""

from __future__ import annotations

import os
import re
import stat
import sys
from collections.abc import Sequence
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any
from urllib.parse import unquote

from qwen3_vl_service.core.errors import ConfigError

# What is left of a segment after one round of percent-decoding must not be
# encoded again: "%252e%252e" decodes to "%2e%2e", which a second decoder
# anywhere downstream would turn into "..".
_STILL_ENCODED = re.compile(r"%[0-9A-Fa-f]{2}")
MAX_PATH = 4096


def check_root(root: str | Path, setting: str = "--root") -> Path:
    """ROOT as a real path, or ConfigError (with the fix) if it is no readable folder."""
    path = Path(os.path.expandvars(str(root))).expanduser()
    real = Path(os.path.realpath(path))
    if not real.exists():
        raise ConfigError(
            f"media root {str(path)!r} does not exist", fix=f"create it (mkdir -p {path}) or change {setting}"
        )
    if not real.is_dir():
        raise ConfigError(f"media root {str(path)!r} is not a directory", fix=f"point {setting} at a folder")
    if not os.access(real, os.R_OK | os.X_OK):
        raise ConfigError(f"media root {str(path)!r} is not readable by this user", fix="fix its permissions")
    return real


def clean_segments(raw_path: str) -> list[str] | None:
    """The decoded path segments of a request, or None if the path must be refused.

    ``raw_path`` is the request target's path as sent (still percent-encoded).
    Decoding happens once, here, per segment, so an encoded "/" or "\\" can
    never create a new segment.
    """
    if not raw_path.startswith("/") or len(raw_path) > MAX_PATH or "\\" in raw_path:
        return None
    segments = []
    for raw in raw_path[1:].split("/"):
        try:
            seg = unquote(raw, errors="strict")
        except UnicodeDecodeError:
            return None
        if (
            not seg  # "//etc/passwd", "a//b", trailing "/": absolute-path tricks and directories
            or seg.startswith(".")  # ".", "..", hidden files and folders
            or "/" in seg
            or "\\" in seg
            or any(ord(c) < 0x20 or ord(c) == 0x7F for c in seg)  # NUL and control bytes
            or _STILL_ENCODED.search(seg)  # double encoding
        ):
            return None
        segments.append(seg)
    return segments


def resolve_file(
    root: str, segments: Sequence[str], allowed: frozenset[str]
) -> tuple[str, os.stat_result] | None:
    """The real path and stat of the file the segments name under ROOT, or None to refuse.

    ROOT is already a real path. Symlinks inside the root are followed as long
    as the target stays inside it and is not hidden. Called in the loop's
    thread, like aiohttp's own stat() and open() here (see app.InlineExecutor).
    """
    if not segments:
        return None
    ext = segments[-1].rpartition(".")[2].lower() if "." in segments[-1] else ""
    if ext not in allowed:
        return None
    try:
        real, st = _real_path_and_stat(os.path.join(root, *segments))
        prefix = root if root.endswith(os.sep) else root + os.sep
        if not real.startswith(prefix):
            return None
        if any(part.startswith(".") for part in real[len(prefix) :].split(os.sep)):
            return None
        # Only regular files: a FIFO would block the open, a device is never media.
        if not stat.S_ISREG(st.st_mode) or not os.access(real, os.R_OK):
            return None
    except (OSError, ValueError):
        return None
    # There is a window between this check and aiohttp's open(); closing it
    # needs write access to the root, which only its owner has.
    return real, st


def _real_path_and_stat(path: str) -> tuple[str, os.stat_result]:
    """Symlinks resolved, and the target's stat, in one lookup.

    O_PATH opens no file (no device driver, no blocking FIFO), and the kernel
    names the object it found in /proc/self/fd: half the cost of the
    component-by-component os.path.realpath(), which remains the fallback.
    """
    if _O_PATH:
        fd = os.open(path, _O_PATH | os.O_CLOEXEC)
        try:
            return os.readlink(f"/proc/self/fd/{fd}"), os.fstat(fd)
        except FileNotFoundError:  # no /proc: fall through
            pass
        finally:
            os.close(fd)
    real = os.path.realpath(path, strict=True)
    return real, os.stat(real)


_O_PATH = getattr(os, "O_PATH", 0) if sys.platform.startswith("linux") else 0


def range_decision(headers: Any, etag: str) -> str:
    """'keep', 'ignore' or 'unsatisfiable' for the request's Range header.

    aiohttp parses a single byte range (and answers 416 when it is malformed
    or starts past the end); this covers what it gets wrong (RFC 9110 14.2):
    a unit other than bytes must be ignored, a range set with several ranges
    may be ignored (answered with the whole file: no client we serve needs
    multipart/byteranges, and ignoring them avoids the "Apache killer"
    overlapping-ranges amplification), ``bytes=-0`` is unsatisfiable (aiohttp
    would send the whole file as 206), and an If-Range entity tag that does
    not match, or an If-Range that is neither a tag nor a date, means the whole
    file (aiohttp only understands If-Range dates and lets garbage pass).
    """
    rng = headers.get("Range")
    if rng is None:
        return "keep"
    unit, _, spec = rng.partition("=")
    if unit.strip().lower() != "bytes":
        return "ignore"
    if "," in spec:
        return "ignore"
    if_range = headers.get("If-Range")
    if if_range is not None:
        tag = if_range.strip()
        if tag.startswith(('"', "W/")):
            if tag != f'"{etag}"':
                return "ignore"
        elif not _http_date(tag):
            return "ignore"  # neither a validator nor a date: it cannot match (aiohttp let it pass)
    if spec.strip() == "-0":
        return "unsatisfiable"
    return "keep"


def _http_date(text: str) -> bool:
    """Whether TEXT is an HTTP date (the other form of an If-Range validator)."""
    try:
        parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError):
        return False
    return True


def aiohttp_etag(st: os.stat_result) -> str:
    # The strong ETag that aiohttp's FileResponse sends, for If-Range above.
    return f"{st.st_mtime_ns:x}-{st.st_size:x}"
