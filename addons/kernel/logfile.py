"""The log file: appended to, rotated by size, old files removed by count and age.

`RotatingLog` is a `logging.handlers.WatchedFileHandler`, so a file moved away by logrotate is
reopened, that also rotates by itself, as Go's lumberjack does (the requirements' `max_size`,
`max_age`, `max_backups`): when a line would take the file past `max_size` bytes, the file is
renamed to `<name>-<UTC time>.<ext>` and a new one is started; then backups beyond
`max_backups` (newest kept) and older than `max_age` days are removed. 0 turns each off.

It runs where the handler runs: the access log hands it to a `QueueListener` thread, so the
renames and deletions never happen on the event loop.
"""

from __future__ import annotations

import datetime
import logging
import logging.handlers
import os
import re
import time
from pathlib import Path

DAY = 86400.0


class RotatingLog(logging.handlers.WatchedFileHandler):
    def __init__(self, path: str, max_size: int = 0, max_age_days: int = 0, max_backups: int = 0):
        super().__init__(path, encoding="utf-8")
        self.max_size = max_size
        self.max_age = max_age_days * DAY
        self.max_backups = max_backups
        self._last_rotation = 0.0
        base = Path(path)
        self._dir = base.parent
        self._stem, self._ext = base.stem, base.suffix
        self._backup = re.compile(
            re.escape(self._stem) + r"-\d{4}-\d\d-\d\dT\d\d-\d\d-\d\d\.\d{3}" + re.escape(self._ext)
        )

    def emit(self, record: logging.LogRecord) -> None:
        if self.max_size:
            try:
                self._rotate_if_full(len(self.format(record).encode("utf-8")) + 1)
            except OSError:
                self.handleError(record)
                return
        super().emit(record)

    def _rotate_if_full(self, incoming: int) -> None:
        self.reopenIfNeeded()
        if self.stream is None:
            self.stream = self._open()
        size = self.stream.tell()
        if size == 0 or size + incoming <= self.max_size:
            return
        self.stream.close()
        self.stream = None  # type: ignore[assignment]
        # Names sort by age even for rotations within one millisecond, here or in another
        # worker writing the same file.
        now = max(time.time(), self._last_rotation + 0.001)
        while (target := self._dir / self.backup_name(now)).exists():
            now += 0.001
        self._last_rotation = now
        os.rename(self.baseFilename, target)
        self.stream = self._open()
        self._statstream()
        self.prune(time.time())

    def backup_name(self, now: float) -> str:
        stamp = datetime.datetime.fromtimestamp(now, datetime.UTC).strftime("%Y-%m-%dT%H-%M-%S")
        return f"{self._stem}-{stamp}.{int(now * 1000) % 1000:03d}{self._ext}"

    def backups(self) -> list[Path]:
        """This log's rotated files, newest first (their names sort by time)."""
        names = [p for p in self._dir.iterdir() if self._backup.fullmatch(p.name)]
        return sorted(names, key=lambda p: p.name, reverse=True)

    def prune(self, now: float) -> None:
        """Remove the backups past `max_backups` and those older than `max_age` days."""
        for i, path in enumerate(self.backups()):
            too_many = bool(self.max_backups) and i >= self.max_backups
            try:
                too_old = bool(self.max_age) and now - path.stat().st_mtime > self.max_age
                if too_many or too_old:
                    path.unlink()
            except FileNotFoundError:
                pass  # another process of the instance removed it first
