"""The batch input: the OpenAI Batch input format, read and checked whole before anything is sent.

One request a line: ``{"custom_id": ..., "method": "POST", "url":
"/v1/chat/completions" | "/v1/completions", "body": {...}}``. ``body.model``
may be left out (the served name is filled in). An image or video part of a
chat message may name a local path (absolute, or relative to MEDIA_ROOT) or a
``file://`` URL under MEDIA_ROOT: it
is sent as a URL on our media server (``file://`` when MEDIA_SERVER=false,
which vLLM reads through ``--allowed-local-media-path``), the rule
``ask.media_url`` owns. Every problem (malformed JSON, a missing field, a
duplicate ``custom_id``, a file outside MEDIA_ROOT) is a UsageError naming
the file and line, raised before the first request goes out.
"""

from __future__ import annotations

import json
from collections.abc import Collection, Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlsplit

from qwen3_vl_service.core.errors import ServiceError, UsageError
from qwen3_vl_service.lifecycle.ask import media_url
from qwen3_vl_service.settings.config import ServiceConfig

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
ENDPOINTS = (CHAT, COMPLETIONS)
# Content parts that carry a media URL (OpenAI's image_url; vLLM's video_url).
MEDIA_PARTS = ("image_url", "video_url")
# URLs vLLM fetches itself: passed through untouched.
REMOTE_SCHEMES = ("http", "https", "data")


@dataclass(frozen=True)
class Job:
    """One checked request: its line in the input, and the body exactly as it will be sent."""

    line: int
    custom_id: str
    url: str  # one of ENDPOINTS
    payload: bytes  # the JSON body (model filled in, local media rewritten)
    model: str


class _Where:
    """Error messages that name the input file and line."""

    def __init__(self, path: Path, line: int) -> None:
        self.path, self.line = path, line

    def error(self, what: str, fix: str) -> UsageError:
        return UsageError(f"{self.path}:{self.line}: {what}", fix=fix)


class MediaResolver:
    """Local media references to the URLs vLLM should fetch, each file checked once."""

    def __init__(self, cfg: ServiceConfig) -> None:
        self.cfg = cfg
        self._seen: dict[str, str] = {}
        self.media_server_used = False  # some local file goes through our media server

    def url(self, ref: str, where: _Where) -> str:
        """REF (an http(s)/data URL, a file:// URL or a path) as vLLM should fetch it."""
        scheme = urlsplit(ref).scheme.lower() if "://" in ref or ref.startswith("data:") else ""
        if scheme in REMOTE_SCHEMES:
            return ref
        if ref in self._seen:
            return self._seen[ref]
        path = self._local_path(ref, scheme, where)
        if not Path(path).expanduser().is_absolute():
            # Relative to MEDIA_ROOT only: a dataset's paths must not change meaning with the
            # working directory (ask.py also tries the working directory, for a typed command).
            path = str(self.cfg.media_root / path)
        try:
            url = media_url(self.cfg, path)
        except ServiceError as exc:
            raise where.error(exc.message, exc.fix or "check the path") from None
        if (
            url.startswith("http")
            and Path(path).suffix.lower().lstrip(".") not in self.cfg.media_allowed_types
        ):
            raise where.error(
                f"{ref}: the media server serves only MEDIA_ALLOWED_TYPES="
                f"{','.join(self.cfg.media_allowed_types)}",
                "convert the file, or add its extension to MEDIA_ALLOWED_TYPES and restart the service",
            )
        self._seen[ref] = url
        self.media_server_used = self.media_server_used or url.startswith("http")
        return url

    @staticmethod
    def _local_path(ref: str, scheme: str, where: _Where) -> str:
        if not scheme:
            if not ref.strip():
                raise where.error("an empty media URL", "give a path under MEDIA_ROOT or a URL")
            return ref
        if scheme != "file":
            raise where.error(
                f"{ref}: unsupported URL scheme {scheme!r}",
                "use http(s)://, data:, file:// or a path under MEDIA_ROOT",
            )
        parts = urlsplit(ref)
        if parts.netloc not in ("", "localhost"):
            raise where.error(f"{ref}: a file:// URL names host {parts.netloc!r}", "use file:///<path>")
        return unquote(parts.path)


def _str_field(rec: dict, key: str, where: _Where) -> str:
    value = rec.get(key)
    if not isinstance(value, str) or not value:
        raise where.error(
            f"{key} is {'missing' if key not in rec else f'not a non-empty string: {value!r:.60}'}",
            'each line is {"custom_id": "...", "method": "POST", "url": "/v1/...", "body": {...}}',
        )
    return value


def _check_body(body: dict, url: str, default_model: str, where: _Where) -> None:
    if body.get("stream"):
        raise where.error("body.stream is true", "leave stream out: a batch line needs the whole answer")
    if not isinstance(body.setdefault("model", default_model), str):
        raise where.error(f"body.model is {body['model']!r}", "leave model out to use the served name")
    if url == CHAT and not isinstance(body.get("messages"), list):
        raise where.error("body.messages is missing or not a list", "a chat request needs messages: [...]")
    if url == COMPLETIONS and "prompt" not in body:
        raise where.error("body.prompt is missing", "a /v1/completions request needs a prompt")


def _rewrite_media(body: dict, media: MediaResolver, where: _Where) -> None:
    """Local media of every chat message part, in place."""
    for message in body.get("messages") or []:
        content = message.get("content") if isinstance(message, dict) else None
        if not isinstance(content, list):
            continue
        for part in content:
            kind = part.get("type") if isinstance(part, dict) else None
            if kind not in MEDIA_PARTS:
                continue
            value = part.get(kind)
            if isinstance(value, str):  # vLLM also takes the bare URL string
                part[kind] = media.url(value, where)
            elif isinstance(value, dict) and isinstance(value.get("url"), str):
                value["url"] = media.url(value["url"], where)
            else:
                raise where.error(f"a {kind} part without a url", f'write {{"{kind}": {{"url": "..."}}}}')


def parse_line(text: str, where: _Where, *, media: MediaResolver, default_model: str) -> Job:
    """One input line (not blank) as a Job, or a UsageError naming the line."""
    try:
        rec = json.loads(text)
    except ValueError as exc:
        raise where.error(f"not JSON ({exc})", "each line is one JSON object") from None
    if not isinstance(rec, dict):
        raise where.error(f"a JSON {type(rec).__name__}, not an object", "each line is one JSON object")
    custom_id = _str_field(rec, "custom_id", where)
    if rec.get("method") != "POST":
        raise where.error(f"method is {rec.get('method')!r}", 'set "method": "POST"')
    url = _str_field(rec, "url", where)
    if url not in ENDPOINTS:
        raise where.error(f"url {url!r} is not a batch endpoint", f"use one of {', '.join(ENDPOINTS)}")
    body = rec.get("body")
    if not isinstance(body, dict):
        raise where.error("body is missing or not an object", "put the request's JSON body under body")
    _check_body(body, url, default_model, where)
    _rewrite_media(body, media, where)
    payload = json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode()
    return Job(line=where.line, custom_id=custom_id, url=url, payload=payload, model=body["model"])


@dataclass(frozen=True)
class Batch:
    path: Path
    jobs: list[Job]
    media_server_used: bool  # some local file goes through our media server: it must answer

    def check_models(self, served: Collection[str]) -> None:
        """Every body.model is one the service serves (its /v1/models), else a UsageError naming the line."""
        for job in self.jobs:
            if job.model not in served:
                raise _Where(self.path, job.line).error(
                    f"body.model {job.model!r} is not served here (served: {', '.join(sorted(served))})",
                    "leave model out to use the served name",
                )


def read(path: Path, cfg: ServiceConfig) -> Batch:
    """Every job of the input file PATH, checked; a UsageError names the first bad line."""
    media = MediaResolver(cfg)
    jobs: list[Job] = []
    first_line: dict[str, int] = {}
    for number, text in _lines(path):
        where = _Where(path, number)
        job = parse_line(text, where, media=media, default_model=cfg.served_model_name)
        if job.custom_id in first_line:
            raise where.error(
                f"custom_id {job.custom_id!r} repeats line {first_line[job.custom_id]}",
                "give every line its own custom_id",
            )
        first_line[job.custom_id] = number
        jobs.append(job)
    if not jobs:
        raise UsageError(f"{path} has no requests", fix="give one JSON request a line")
    return Batch(path, jobs, media.media_server_used)


def _lines(path: Path) -> Iterator[tuple[int, str]]:
    try:
        fh = open(path, encoding="utf-8")  # noqa: SIM115 - closed below; errors named by line
    except OSError as exc:
        raise UsageError(f"cannot read {path}: {exc.strerror}", fix="check the input file's path") from None
    with fh:
        number = 0
        try:
            for number, text in enumerate(fh, start=1):
                if text.strip():
                    yield number, text
        except UnicodeDecodeError:
            raise _Where(path, number + 1).error("not UTF-8 text", "save the file as UTF-8") from None


__all__ = ["CHAT", "COMPLETIONS", "ENDPOINTS", "Batch", "Job", "MediaResolver", "parse_line", "read"]
