"""A raw-socket client for /cli/execute that timestamps every NDJSON line as it arrives."""

from __future__ import annotations

import json
import os
import socket
import time
from dataclasses import dataclass, field
from typing import Any

TOKEN = "cli-test-token"


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes = b""
    # (seconds since the request was sent, event) for every NDJSON line
    events: list[tuple[float, dict[str, Any]]] = field(default_factory=list)

    def json(self) -> Any:
        return json.loads(self.body)

    def of(self, kind: str) -> list[dict[str, Any]]:
        return [e for _, e in self.events if e["type"] == kind]

    def text(self, kind: str) -> str:
        return "".join(e["data"] for e in self.of(kind))

    @property
    def exit(self) -> dict[str, Any]:
        (record,) = self.of("exit")
        return record


class Stream:
    """One request on its own connection; the body may be sent later, chunk by chunk."""

    def __init__(
        self,
        port: int,
        body: bytes | None = None,
        *,
        token: str | None = TOKEN,
        method: str = "POST",
        content_type: str | None = "application/json",
        path: str = "/cli/execute",
        host: str | None = None,
        extra: dict[str, str] | None = None,
        timeout: float = 15.0,
    ) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.chunked = body is None
        head = [f"{method} {path} HTTP/1.1", f"Host: {host or f'127.0.0.1:{port}'}"]
        if token is not None:
            head.append(f"Authorization: Bearer {token}")
        if content_type is not None:
            head.append(f"Content-Type: {content_type}")
        for k, v in (extra or {}).items():
            head.append(f"{k}: {v}")
        if self.chunked:
            head.append("Transfer-Encoding: chunked")
        else:
            head.append(f"Content-Length: {len(body or b'')}")
        self.t0 = time.monotonic()
        self.sock.sendall(("\r\n".join(head) + "\r\n\r\n").encode() + (body or b""))
        self.buf = b""
        self.status = 0
        self.headers: dict[str, str] = {}
        self._chunk_left: int | None = None  # bytes left in the current chunk
        self._body = b""  # decoded body not yet split into lines
        self.body = b""  # everything decoded so far
        self.done = False
        self._eom = False  # the whole body was decoded

    def send(self, data: bytes) -> None:
        self.sock.sendall(b"%x\r\n%s\r\n" % (len(data), data))

    def end(self) -> None:
        self.sock.sendall(b"0\r\n\r\n")

    def close(self) -> None:
        self.sock.close()

    def _recv(self) -> None:
        data = self.sock.recv(65536)
        if not data:
            self.done = True
        self.buf += data

    def read_head(self) -> tuple[int, dict[str, str]]:
        while b"\r\n\r\n" not in self.buf:
            self._recv()
            if self.done:
                raise ConnectionError(f"closed before the response head: {self.buf!r}")
        head, _, self.buf = self.buf.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        self.status = int(lines[0].split()[1])
        self.headers = {k.lower(): v.strip() for k, _, v in (h.partition(":") for h in lines[1:])}
        if "chunked" not in self.headers.get("transfer-encoding", ""):
            self._chunk_left = int(self.headers.get("content-length", "0"))
        return self.status, self.headers

    def _decode(self) -> None:
        """Move what arrived into the decoded body (chunked or Content-Length)."""
        if self._eom:
            return
        if "chunked" not in self.headers.get("transfer-encoding", ""):
            take = self.buf[: self._chunk_left]
            self.buf = self.buf[len(take) :]
            self._chunk_left = (self._chunk_left or 0) - len(take)
            self._body += take
            self.body += take
            if self._chunk_left == 0:
                self.done = self._eom = True
            return
        while True:
            if self._chunk_left is None:
                line, sep, rest = self.buf.partition(b"\r\n")
                if not sep:
                    return
                size = int(line.split(b";")[0], 16)
                self.buf = rest
                if size == 0:
                    self.done = self._eom = True
                    return
                self._chunk_left = size
            take = self.buf[: self._chunk_left]
            self.buf = self.buf[len(take) :]
            self._body += take
            self.body += take
            self._chunk_left -= len(take)
            if self._chunk_left:
                return
            if len(self.buf) < 2:
                self._chunk_left = 0  # CRLF still to come
                return
            self.buf = self.buf[2:]
            self._chunk_left = None

    def _crlf(self) -> None:
        chunked = "chunked" in self.headers.get("transfer-encoding", "")
        if not self._eom and self._chunk_left == 0 and chunked:
            if len(self.buf) >= 2:
                self.buf = self.buf[2:]
                self._chunk_left = None

    def next_event(self) -> tuple[float, dict[str, Any]] | None:
        """The next NDJSON line and when it arrived; None at the end of the body."""
        if not self.status:
            self.read_head()
        while True:
            self._crlf()
            self._decode()
            line, sep, rest = self._body.partition(b"\n")
            if sep:
                self._body = rest
                if line.strip():
                    return time.monotonic() - self.t0, json.loads(line)
                continue
            if self.done:
                return None
            self._recv()
            if self.done and not self.buf:
                return None

    def reply(self) -> Reply:
        """Read to the end: all events (NDJSON) or the whole body (JSON)."""
        self.read_head()
        r = Reply(self.status, self.headers)
        if "ndjson" in self.headers.get("content-type", ""):
            while (ev := self.next_event()) is not None:
                r.events.append(ev)
        else:
            while not self.done:
                self._crlf()
                self._decode()
                if not self.done:
                    self._recv()
                    if self.done:
                        break
            self._crlf()
            self._decode()
        r.body = self.body
        self.close()
        return r


def execute(port: int, payload: dict[str, Any] | bytes, **kw: Any) -> Reply:
    body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    return Stream(port, body, **kw).reply()


def group_members(pgid: int) -> list[int]:
    """Live (non-zombie) processes in process group `pgid`, from /proc."""
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat.rpartition(b")")[2].split()
        state, pgrp = fields[0], int(fields[2])
        if pgrp == pgid and state != b"Z":
            out.append(int(entry))
    return out


def wait_gone(pgid: int, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not group_members(pgid):
            return True
        time.sleep(0.02)
    return False
