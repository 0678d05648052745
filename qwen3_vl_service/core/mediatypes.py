"""Which file extensions are media, and the Content-Type each is served with: one table for the
settings (MEDIA_ALLOWED_TYPES) and the media server."""

from __future__ import annotations

import mimetypes

# Our own table rather than the host's /etc/mime.types, so that the
# Content-Type of the common formats does not depend on the node's packages.
# Other extensions fall back to Python's mimetypes (image/, video/, audio/ only).
MIME_TYPES = {
    "jpg": "image/jpeg",
    "jpeg": "image/jpeg",
    "png": "image/png",
    "webp": "image/webp",
    "gif": "image/gif",
    "bmp": "image/bmp",
    "tif": "image/tiff",
    "tiff": "image/tiff",
    "avif": "image/avif",
    "heic": "image/heic",
    "mp4": "video/mp4",
    "m4v": "video/mp4",
    "webm": "video/webm",
    "mov": "video/quicktime",
    "mkv": "video/x-matroska",
    "avi": "video/x-msvideo",
}
_MEDIA_MAJOR = ("image/", "video/", "audio/")


def content_type_for(ext: str) -> str | None:
    """The Content-Type served for a lower-case extension, or None if it is not media."""
    if ext in MIME_TYPES:
        return MIME_TYPES[ext]
    guessed = mimetypes.guess_type(f"x.{ext}", strict=False)[0]
    return guessed if guessed and guessed.startswith(_MEDIA_MAJOR) else None


__all__ = ["MIME_TYPES", "content_type_for"]
