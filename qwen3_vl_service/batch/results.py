"""The batch output: OpenAI Batch output lines, appended and flushed one by one, and what a rerun skips.

OUT holds one line per answered request (``response.status_code`` 200), in
the order the answers came; requests that failed go to the errors file
(OpenAI keeps them apart the same way: ``output_file_id`` and
``error_file_id``), which each run starts afresh. Each line reaches the file
in one ``write`` on a descriptor opened with O_APPEND, so a run killed at any
moment leaves whole lines, except at worst a torn last one, which the next
run cuts off (it names the bytes) before it appends. A rerun skips every
``custom_id`` already in OUT and sends the rest.
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qwen3_vl_service.core.errors import CheckFailed, UsageError

OK = 200


def record(
    custom_id: str,
    status: int | None,
    body: Any,
    *,
    request_id: str = "",
    error: str | None = None,
    code: str | None = None,
) -> dict[str, Any]:
    """One output line in the OpenAI Batch output format."""
    return {
        "id": f"batch_req_{uuid.uuid4().hex}",
        "custom_id": custom_id,
        "response": None
        if status is None
        else {"status_code": status, "request_id": request_id, "body": body},
        "error": None if error is None else {"code": code or "request_failed", "message": error},
    }


@dataclass
class Resume:
    """What OUT already answers."""

    answered: set[str] = field(default_factory=set)
    torn_bytes: int = 0  # cut from the end: a line a killed run had not finished writing


def errors_path(out: Path) -> Path:
    """OUT.jsonl -> OUT.errors.jsonl beside it."""
    stem = out.name[: -len(".jsonl")] if out.name.endswith(".jsonl") else out.name
    return out.with_name(f"{stem}.errors.jsonl")


def resume(out: Path, known: Collection[str], source: Path) -> Resume:
    """The custom_ids OUT answers; cuts a torn last line. UsageError when OUT is not this input's.

    Read a line at a time: the output of a large dataset may not fit in memory whole."""
    done = Resume()
    whole = 0  # bytes of whole lines
    try:
        with open(out, "rb") as fh:
            for number, raw in enumerate(fh, start=1):
                if not raw.endswith(b"\n"):
                    done.torn_bytes = len(raw)
                    break
                whole += len(raw)
                if raw.strip():
                    done.answered.add(_answered_id(raw, out, number, known, source, done.answered))
    except FileNotFoundError:
        return done
    except OSError as exc:
        raise UsageError(f"cannot read {out}: {exc.strerror}", fix="check the output file's path") from None
    if done.torn_bytes:
        try:
            os.truncate(out, whole)
        except OSError as exc:
            raise CheckFailed(f"cannot cut the torn last line of {out}: {exc.strerror}") from None
    return done


def _answered_id(raw: bytes, out: Path, number: int, known: Collection[str], source: Path, seen) -> str:
    fix = "give a new output file, or the input this one was made from"
    try:
        rec = json.loads(raw)
        custom_id = rec["custom_id"]
        status = (rec.get("response") or {}).get("status_code")
    except (ValueError, KeyError, TypeError, AttributeError):
        raise UsageError(f"{out}:{number}: not a batch output line", fix=fix) from None
    if custom_id not in known:
        raise UsageError(
            f"{out}:{number}: custom_id {custom_id!r} is not in {source}: the output of another input",
            fix=fix,
        )
    if status != OK:
        raise UsageError(f"{out}:{number}: status {status}, not a line batch_service.py writes", fix=fix)
    if custom_id in seen:
        raise UsageError(f"{out}:{number}: custom_id {custom_id!r} answered twice", fix=fix)
    return custom_id


class Appender:
    """Lines appended to PATH, each in one write (O_APPEND): whole lines survive a kill."""

    def __init__(self, path: Path, *, truncate: bool = False) -> None:
        self.path = path
        flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND | (os.O_TRUNC if truncate else 0)
        try:
            self._fd = os.open(path, flags, 0o644)
        except OSError as exc:
            raise UsageError(f"cannot write {path}: {exc.strerror}", fix="check the folder") from None
        self.lines = 0

    def write(self, rec: dict[str, Any]) -> None:
        data = memoryview((json.dumps(rec, ensure_ascii=False) + "\n").encode())
        try:
            while data:
                data = data[os.write(self._fd, data) :]
        except OSError as exc:
            raise CheckFailed(
                f"cannot write {self.path}: {exc.strerror}",
                fix="free space there and rerun: the answered lines are kept",
            ) from None
        self.lines += 1

    def close(self) -> None:
        os.close(self._fd)


__all__ = ["OK", "Appender", "Resume", "errors_path", "record", "resume"]
