"""Size-rotated log files, the one rotation of every log we write (LOG_MAX_MB, LOG_BACKUPS).

service.log (through logtee) and media_server.log both rotate here.
"""

from __future__ import annotations

import logging
import logging.handlers
from pathlib import Path


class SizeRotatingHandler(logging.handlers.RotatingFileHandler):
    """RotatingFileHandler that keeps each file under maxBytes, formats a record once, works with no backups.

    - Python 3.11's handler formats each record twice (once to measure it)
      and stats the path per record; the media server writes one access-log
      line per request, so here a record is formatted once and measured
      against the open file's position.
    - With backupCount 0 the stock handler never rolls over, so LOG_BACKUPS=0
      would let the log grow without bound: here the file starts afresh.
    """

    def emit(self, record: logging.LogRecord) -> None:
        try:
            msg = self.format(record) + self.terminator
            if self.stream is None:
                self.stream = self._open()
            pos = self.stream.tell()
            if 0 < self.maxBytes < pos + len(msg) and pos > 0:
                self.doRollover()
            self.stream.write(msg)
            self.flush()
        except Exception:  # noqa: BLE001 - as logging reports a failed record
            self.handleError(record)

    def doRollover(self) -> None:
        if self.backupCount > 0:
            super().doRollover()
            return
        if self.stream:
            self.stream.close()
            self.stream = None
        with open(self.baseFilename, "w", encoding=self.encoding):
            pass
        if not self.delay:
            self.stream = self._open()


def rotating_handler(path: Path, max_bytes: int, backups: int) -> SizeRotatingHandler:
    """A handler appending to PATH (its folder created), rotated at MAX_BYTES (0: never), BACKUPS kept."""
    path.parent.mkdir(parents=True, exist_ok=True)
    return SizeRotatingHandler(
        path, maxBytes=max_bytes, backupCount=backups, encoding="utf-8", errors="replace"
    )
