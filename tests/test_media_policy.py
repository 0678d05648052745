"""media/policy.py: which file a URL names (pure decisions, no server)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from qwen3_vl_service.core.errors import ConfigError
from qwen3_vl_service.core.mediatypes import MIME_TYPES, content_type_for
from qwen3_vl_service.media import policy
from qwen3_vl_service.settings import config

EXPECTED_TYPES = {
    "jpg": "image/jpeg",
    "jpeg": "image/jpeg",
    "png": "image/png",
    "webp": "image/webp",
    "gif": "image/gif",
    "mp4": "video/mp4",
    "webm": "video/webm",
    "mov": "video/quicktime",
}


# ---------------------------------------------------------------------------
# Unit: the pure decisions


@pytest.mark.unit
@pytest.mark.parametrize(
    "raw",
    [
        "/../etc/passwd",
        "/sub/../sample.jpg",
        "/./sample.jpg",
        "/%2e%2e/etc/passwd",
        "/%2E%2E/etc/passwd",
        "/.%2e/etc/passwd",
        "/%252e%252e/etc/passwd",
        "/%25252e%25252e/etc/passwd",
        "/..%2fetc%2fpasswd",
        "/..%2Fetc/passwd",
        "/%2fetc%2fpasswd",
        "/..%5cetc%5cpasswd",
        "/..\\etc\\passwd",
        "/sub\\..\\sample.jpg",
        "//etc/passwd",
        "/sub//nested.png",
        "/sample.jpg%00.png",
        "/sample.jpg\x00",
        "/a%0d%0aSet-Cookie:x.jpg",
        "/.hidden.jpg",
        "/.git/x.png",
        "/sub/",
        "/",
        "",
        "etc/passwd",
        "/%ff%fe.jpg",
        "/" + "a" * 5000 + ".jpg",
    ],
)
def test_clean_segments_refuses(raw: str) -> None:
    assert policy.clean_segments(raw) is None


@pytest.mark.unit
def test_clean_segments_decodes_once() -> None:
    assert policy.clean_segments("/sub/nested.png") == ["sub", "nested.png"]
    assert policy.clean_segments("/my%20clip.mp4") == ["my clip.mp4"]
    assert policy.clean_segments("/vid%C3%A9o.mp4") == ["vidéo.mp4"]
    assert policy.clean_segments("/100%.jpg") == ["100%.jpg"]
    assert policy.clean_segments("/sample%2Ejpg") == ["sample.jpg"]


@pytest.mark.unit
def test_content_types_do_not_depend_on_the_host() -> None:
    for ext, ctype in EXPECTED_TYPES.items():
        assert content_type_for(ext) == ctype
    assert content_type_for("mkv") == "video/x-matroska"
    assert content_type_for("txt") is None
    default = config.SETTINGS_BY_KEY["MEDIA_ALLOWED_TYPES"].default.split(",")
    assert set(default) <= set(MIME_TYPES)  # the shipped types never depend on the host


@pytest.mark.unit
@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ({}, "keep"),
        ({"Range": "bytes=0-10"}, "keep"),
        ({"Range": "bytes=-10"}, "keep"),
        ({"Range": "bytes=abc"}, "keep"),  # aiohttp answers 416
        ({"Range": "bytes=-0"}, "unsatisfiable"),
        ({"Range": "bytes=0-1,5-6"}, "ignore"),
        ({"Range": "items=0-5"}, "ignore"),
        ({"Range": "garbage"}, "ignore"),
        ({"Range": "bytes=0-1", "If-Range": '"abc"'}, "keep"),
        ({"Range": "bytes=0-1", "If-Range": '"other"'}, "ignore"),
        ({"Range": "bytes=0-1", "If-Range": 'W/"abc"'}, "ignore"),
        ({"Range": "bytes=0-1", "If-Range": "Sun, 06 Nov 1994 08:49:37 GMT"}, "keep"),
        ({"Range": "bytes=0-1", "If-Range": "garbage"}, "ignore"),
    ],
)
def test_range_decision(headers: dict[str, str], expected: str) -> None:
    assert policy.range_decision(headers, "abc") == expected


@pytest.mark.unit
def test_check_root(tmp_path: Path) -> None:
    assert policy.check_root(tmp_path) == Path(os.path.realpath(tmp_path))
    with pytest.raises(ConfigError, match=r"does not exist.*mkdir -p"):
        policy.check_root(tmp_path / "nope")
    (tmp_path / "f").write_text("x")
    with pytest.raises(ConfigError, match="not a directory"):
        policy.check_root(tmp_path / "f")
