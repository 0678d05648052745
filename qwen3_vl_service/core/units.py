"""How quantities are written for people: sizes, durations, short times and index ranges."""

from __future__ import annotations

from collections.abc import Iterable

_BINARY = (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10))
_DECIMAL = (("TB", 10**12), ("GB", 10**9), ("MB", 10**6), ("KB", 10**3))


def count(n: int, noun: str, plural: str | None = None) -> str:
    """N and NOUN in the right number: 1 sequence, 2 sequences (PLURAL when not NOUN + "s")."""
    return f"{n:,} {noun if n == 1 else plural or noun + 's'}"


def format_bytes(nbytes: float, *, decimal: bool = False) -> str:
    """1536 -> '1.5 KiB', 1 << 30 -> '1 GiB'; DECIMAL: KB/MB/GB as the Hugging Face Hub shows sizes."""
    for unit, factor in _DECIMAL if decimal else _BINARY:
        if abs(nbytes) >= factor:
            value = nbytes / factor
            return f"{value:.0f} {unit}" if value == int(value) else f"{value:.1f} {unit}"
    return f"{nbytes:.0f} B"


def format_decimal_bytes(nbytes: float) -> str:
    """Bytes in decimal units (236 GB), as the Hugging Face Hub shows file sizes."""
    return format_bytes(nbytes, decimal=True)


def format_duration(seconds: float) -> str:
    """5 -> '5s', 125 -> '2m05s', 3725 -> '1h02m05s' (negative: '0s')."""
    s = max(0, int(seconds))
    h, rest = divmod(s, 3600)
    m, s = divmod(rest, 60)
    if h:
        return f"{h}h{m:02d}m{s:02d}s"
    if m:
        return f"{m}m{s:02d}s"
    return f"{s}s"


def format_short_time(seconds: float) -> str:
    """A latency: 2e-5 -> '20.0 us', 0.0123 -> '12.30 ms', 1.5 -> '1.50 s'."""
    if seconds < 1e-3:
        return f"{seconds * 1e6:.1f} us"
    if seconds < 1:
        return f"{seconds * 1e3:.2f} ms"
    return f"{seconds:.2f} s"


def format_ranges(indices: Iterable[int]) -> str:
    """[5, 0, 1, 2, 7] -> '0-2,5,7' (sorted, each index once)."""
    ranks = sorted(set(indices))
    parts: list[str] = []
    i = 0
    while i < len(ranks):
        j = i
        while j + 1 < len(ranks) and ranks[j + 1] == ranks[j] + 1:
            j += 1
        parts.append(str(ranks[i]) if i == j else f"{ranks[i]}-{ranks[j]}")
        i = j + 1
    return ",".join(parts)
