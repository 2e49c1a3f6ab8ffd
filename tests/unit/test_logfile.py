"""kernel/logfile.py: size rotation, backups pruned by count and by age, the batching writer."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import pytest

from addons.kernel.logfile import DAY, LineWriter, RotatingLog


def record(message: str) -> logging.LogRecord:
    return logging.LogRecord("t", logging.INFO, __file__, 0, message, None, None)


def test_no_max_size_never_rotates(tmp_path: Path) -> None:
    h = RotatingLog(str(tmp_path / "a.log"))
    for _ in range(100):
        h.emit(record("x" * 100))
    h.close()
    assert [p.name for p in tmp_path.iterdir()] == ["a.log"]


def test_a_line_that_would_pass_max_size_starts_a_new_file(tmp_path: Path) -> None:
    h = RotatingLog(str(tmp_path / "a.log"), max_size=250)
    for i in range(5):
        h.emit(record(f"{i}" * 99))  # 100 bytes with the newline: two lines per file
    h.close()
    backups = h.backups()
    assert len(backups) == 2 and all(p.stat().st_size == 200 for p in backups)
    assert (tmp_path / "a.log").read_text() == "4" * 99 + "\n"
    assert backups[0].read_text().startswith("2") and backups[1].read_text().startswith("0")


def test_a_line_longer_than_max_size_is_written_whole(tmp_path: Path) -> None:
    h = RotatingLog(str(tmp_path / "a.log"), max_size=10)
    h.emit(record("y" * 50))
    h.close()
    assert (tmp_path / "a.log").read_text() == "y" * 50 + "\n"


def test_backups_beyond_the_count_go_newest_kept(tmp_path: Path) -> None:
    h = RotatingLog(str(tmp_path / "a.log"), max_size=100, max_backups=2)
    for i in range(6):
        h.emit(record(f"{i}" * 99))
    h.close()
    assert [p.read_text()[0] for p in h.backups()] == ["4", "3"]


def test_backups_older_than_max_age_go(tmp_path: Path) -> None:
    h = RotatingLog(str(tmp_path / "a.log"), max_size=100, max_age_days=7)
    old = tmp_path / h.backup_name(time.time() - 10 * DAY)
    old.write_text("old\n")
    os.utime(old, (time.time() - 10 * DAY,) * 2)
    recent = tmp_path / h.backup_name(time.time() - DAY)
    recent.write_text("recent\n")
    os.utime(recent, (time.time() - DAY,) * 2)
    h.emit(record("a" * 99))
    h.emit(record("b" * 99))  # rotates, then prunes
    h.close()
    names = {p.name for p in h.backups()}
    assert old.name not in names and recent.name in names and len(names) == 2


def test_a_file_moved_away_by_logrotate_is_reopened(tmp_path: Path) -> None:
    h = RotatingLog(str(tmp_path / "a.log"), max_size=10_000)
    h.emit(record("first"))
    (tmp_path / "a.log").rename(tmp_path / "a.log.1")
    h.emit(record("second"))
    h.close()
    assert (tmp_path / "a.log").read_text() == "second\n"
    assert (tmp_path / "a.log.1").read_text() == "first\n"


class CountingLog(RotatingLog):
    def __init__(self, path: str) -> None:
        super().__init__(path)
        self.batches: list[int] = []

    def emit_batch(self, records: list[logging.LogRecord]) -> None:
        self.batches.append(len(records))
        super().emit_batch(records)


def test_the_writer_writes_a_burst_in_one_batch_and_everything_by_stop(tmp_path: Path) -> None:
    target = CountingLog(str(tmp_path / "a.log"))
    writer = LineWriter(target, pause=1.0)
    for i in range(100):
        writer.queue.put(record(f"line {i}"))
    time.sleep(0.1)  # the thread took the first line and sleeps
    for i in range(100, 150):
        writer.queue.put(record(f"line {i}"))
    started = time.monotonic()
    writer.stop()
    assert time.monotonic() - started < 0.1  # the pause is cut short
    lines = (tmp_path / "a.log").read_text().splitlines()
    assert lines == [f"line {i}" for i in range(150)]
    assert target.batches == [150] and target.stream is None  # one write pass; closed


def test_the_writer_writes_each_batch_when_it_comes(tmp_path: Path) -> None:
    path = tmp_path / "a.log"
    writer = LineWriter(RotatingLog(str(path)), pause=0.01)
    writer.queue.put(record("first"))
    deadline = time.monotonic() + 5
    while not path.read_text() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert path.read_text() == "first\n"  # flushed without waiting for stop
    writer.stop()


class RecordingLog(RotatingLog):
    """Keeps the bytes of every write(2) the file gets."""

    def __init__(self, path: str, max_size: int = 0) -> None:
        self.writes: list[bytes] = []
        super().__init__(path, max_size=max_size)

    def _open(self):  # type: ignore[no-untyped-def]
        stream = super()._open()
        raw = stream.buffer.raw
        write = raw.write

        def recorded(data):  # type: ignore[no-untyped-def]
            self.writes.append(bytes(data))
            return write(data)

        raw.write = recorded
        return stream


@pytest.mark.parametrize("max_size", [0, 50_000])
def test_a_batch_goes_out_in_writes_of_whole_lines(tmp_path: Path, max_size: int) -> None:
    """The workers append to one file: a write must never end inside a line."""
    h = RecordingLog(str(tmp_path / "a.log"), max_size=max_size)
    lines = [f"{i:04d} " + "x" * 300 for i in range(200)]  # 60 KB, many buffers' worth
    h.emit_batch([record(line) for line in lines])
    h.close()
    assert h.writes and all(w.endswith(b"\n") for w in h.writes)
    written = b"".join(p.read_bytes() for p in sorted(tmp_path.iterdir()))
    assert sorted(written.decode().splitlines()) == lines
