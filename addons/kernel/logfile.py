"""The log file: appended to, rotated by size, old files removed by count and age.

`RotatingLog` is a `logging.handlers.WatchedFileHandler`, so a file moved away by logrotate is
reopened, that also rotates by itself, as Go's lumberjack does (the requirements' `max_size`,
`max_age`, `max_backups`): when a line would take the file past `max_size` bytes, the file is
renamed to `<name>-<UTC time>.<ext>` and a new one is started; then backups beyond
`max_backups` (newest kept) and older than `max_age` days are removed. 0 turns each off.

`LineWriter` runs it in a thread of its own, so the writes, renames and deletions never happen on
the event loop, and in batches: a thread woken for every line takes the GIL from the loop a few
times per request (wake-up, write, flush), which at 500 requests a second cost the loop more than
formatting the lines did. It sleeps `BATCH_PAUSE` after each batch and writes what came meanwhile
with one flush, as nginx's `access_log ... buffer= flush=` does; a line reaches the file at most
that late, and `stop` writes what is left.
"""

from __future__ import annotations

import datetime
import logging
import logging.handlers
import os
import queue
import re
import threading
import time
from pathlib import Path

DAY = 86400.0
# Seconds the writer thread sleeps after each batch: lines reach the file at most this late.
BATCH_PAUSE = 0.05


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
        self.emit_batch([record])

    def emit_batch(self, records: list[logging.LogRecord]) -> None:
        """Write the records, rotating between lines as needed, and flush once."""
        self.acquire()
        try:
            self.reopenIfNeeded()
            for record in records:
                try:
                    line = self.format(record) + self.terminator
                    if self.max_size:
                        self._rotate_if_full(len(line.encode("utf-8")))
                    if self.stream is None:
                        self.stream = self._open()
                    self.stream.write(line)
                except Exception:
                    self.handleError(record)
            if self.stream is not None:
                self.stream.flush()
        except OSError:
            self.handleError(records[-1])
        finally:
            self.release()

    def _rotate_if_full(self, incoming: int) -> None:
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


class LineWriter:
    """The thread that writes records handed over through `queue` (by a `QueueHandler`, which
    formats them on the caller's thread) to `target` in batches; see the module docstring."""

    def __init__(self, target: RotatingLog, pause: float = BATCH_PAUSE) -> None:
        self.target = target
        self.pause = pause
        self.queue: queue.SimpleQueue[logging.LogRecord | None] = queue.SimpleQueue()
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="waypost-log-writer", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Write what is queued, end the thread and close the file (no pause: the loop waits)."""
        self._stopping.set()
        self.queue.put(None)
        self._thread.join()
        self.target.close()

    def _run(self) -> None:
        q = self.queue
        while True:
            batch = [q.get()]
            self._stopping.wait(self.pause)
            while not q.empty():
                batch.append(q.get())
            records = [r for r in batch if r is not None]
            if records:
                self.target.emit_batch(records)
            if len(records) < len(batch):
                return
