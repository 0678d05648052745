"""units: the one spelling of sizes, durations, short times and index ranges."""

from __future__ import annotations

import pytest

from qwen3_vl_service.core.units import count, format_bytes, format_duration, format_ranges, format_short_time


@pytest.mark.unit
def test_format_bytes_binary_and_decimal():
    assert format_bytes(512) == "512 B"
    assert format_bytes(1536) == "1.5 KiB"
    assert format_bytes(1 << 20) == "1 MiB"
    assert format_bytes(236 * 10**9, decimal=True) == "236 GB"
    assert format_bytes(1_500_000, decimal=True) == "1.5 MB"


@pytest.mark.unit
@pytest.mark.parametrize(
    ("s", "text"), [(5, "5s"), (59.9, "59s"), (125, "2m05s"), (3725, "1h02m05s"), (-3, "0s")]
)
def test_format_duration(s, text):
    assert format_duration(s) == text


@pytest.mark.unit
def test_format_short_time_and_ranges():
    assert format_short_time(31.2e-6) == "31.2 us"
    assert format_short_time(0.0123) == "12.30 ms"
    assert format_short_time(1.5) == "1.50 s"
    assert format_ranges([5, 0, 1, 2, 7, 7]) == "0-2,5,7"
    assert format_ranges([]) == ""


@pytest.mark.unit
def test_count_puts_the_noun_in_the_right_number():
    assert count(1, "sequence") == "1 sequence"
    assert [count(n, "sequence") for n in (0, 2)] == ["0 sequences", "2 sequences"]
    assert count(12345, "process", "processes") == "12,345 processes"
