"""The wire side of one execution: the request body in (the request object, stdin), output out.

- `read_plan`: the request object, and whatever of the body follows it (streamed stdin lines).
- `relay`: `stream: true`, one NDJSON event per line (start, stdout, stderr, heartbeat, exit).
- `collect`: `stream: false`, one JSON object at the end, whitespace as the heartbeat.
- `feed`: the request's stdin, then each streamed input line, then stdin closed.
- `Utf8Chunks`: binary-safe decoding of output chunks.
"""

from __future__ import annotations

import asyncio
import base64
import codecs
import json
import time
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from addons.clirun.plan import Plan, Refusal, Settings, bad_request, parse_input_line, parse_request
from addons.clirun.runner import Execution

# The request object (with its `stdin`) and every streamed input line are bounded by this.
MAX_REQUEST_BYTES = 1024 * 1024
# How often a waiting stream checks whether its client is gone (the management port's aiohttp
# runner does not cancel handlers on disconnect; the proxy-port listener does).
DISCONNECT_POLL = 0.25


class Utf8Chunks:
    """Binary-safe output decoding.

    Each chunk becomes {"data": text} when it is valid UTF-8 (a multi-byte character split
    across reads is held back and joined to the next chunk), else {"data_base64": ...} with
    the exact bytes. Nothing is replaced or lost; concatenating a stream's decoded pieces
    gives its bytes back.
    """

    def __init__(self) -> None:
        self._dec = codecs.getincrementaldecoder("utf-8")("strict")

    def feed(self, chunk: bytes, final: bool = False) -> dict[str, str] | None:
        pending = self._dec.getstate()[0]
        try:
            text = self._dec.decode(chunk, final)
        except UnicodeDecodeError:
            self._dec.reset()
            raw = pending + chunk
            return {"data_base64": base64.b64encode(raw).decode()} if raw else None
        return {"data": text} if text else None


def _disconnected(request: web.Request) -> bool:
    transport = request.transport
    return transport is None or transport.is_closing()


async def _read_line(content: Any, buf: bytearray, limit: int) -> bytes | None:
    """The next line (without its newline) of a streamed body; None at EOF; ValueError when
    a line exceeds `limit`."""
    while True:
        i = buf.find(b"\n")
        if i >= 0:
            line = bytes(buf[:i])
            del buf[: i + 1]
            return line
        if len(buf) > limit:
            raise ValueError(f"a line is longer than {limit} bytes")
        chunk = await content.readany()
        if not chunk:
            if buf:
                line = bytes(buf)
                buf.clear()
                return line
            return None
        buf += chunk


async def read_plan(request: web.Request, s: Settings) -> tuple[Plan, bytearray]:
    """The request object, and what of the body follows it (streamed stdin lines).

    The body is one JSON object (any layout), or, for stdin streaming, NDJSON whose first
    line is the request object with "stdin_stream": true.
    """
    rest = bytearray()
    too_large = Refusal(
        "PAYLOAD_TOO_LARGE", f"The request object is over {MAX_REQUEST_BYTES} bytes."
    )
    try:
        first = await _read_line(request.content, rest, MAX_REQUEST_BYTES)
    except ValueError:
        raise too_large from None
    try:
        obj: Any = json.loads(first) if first is not None else None
    except ValueError:
        obj = None
    if isinstance(obj, dict) and obj.get("stdin_stream") is True:
        return parse_request(obj, s), rest
    body = bytearray(first or b"")
    if rest:
        body += b"\n" + rest
    while chunk := await request.content.readany():
        body += chunk
        if len(body) > MAX_REQUEST_BYTES:
            raise too_large
    try:
        obj = json.loads(body)
    except ValueError as e:
        raise bad_request(f"The body is not valid JSON: {e}") from None
    return parse_request(obj, s), bytearray()


async def _next(
    request: web.Request, ex: Execution, idle: Callable[[], Awaitable[None]]
) -> tuple[str, bytes] | None:
    """The next output piece; None when the command has ended. Runs `idle` when silent
    for a heartbeat interval; raises ConnectionError when the client is gone."""
    last = time.monotonic()
    while not ex.pending:
        ex.wake.clear()
        try:
            await asyncio.wait_for(ex.wake.wait(), DISCONNECT_POLL)
        except TimeoutError:
            if _disconnected(request):
                raise ConnectionResetError("client gone") from None
            if time.monotonic() - last >= ex.settings.heartbeat:
                await idle()
                last = time.monotonic()
    return ex.pending.popleft()


async def relay(request: web.Request, ex: Execution, resp: web.StreamResponse) -> None:
    """stream: true: one NDJSON event per line, numbered by `seq`."""
    seq = 0

    async def emit(event: dict[str, Any]) -> None:
        nonlocal seq
        event["seq"] = seq
        seq += 1
        await resp.write(json.dumps(event, ensure_ascii=False).encode() + b"\n")

    if ex.pid is not None:
        await emit({"type": "start", "pid": ex.pid, "command": ex.plan.path,
                    "timeout": ex.plan.timeout})  # fmt: skip
    decoders = {"stdout": Utf8Chunks(), "stderr": Utf8Chunks()}
    while (item := await _next(request, ex, lambda: emit({"type": "heartbeat"}))) is not None:
        kind, chunk = item
        piece = decoders[kind].feed(chunk)
        if piece:
            await emit({"type": kind, **piece})
    for kind, dec in decoders.items():
        piece = dec.feed(b"", final=True)
        if piece:
            await emit({"type": kind, **piece})
    await emit(ex.exit_record())


async def collect(request: web.Request, ex: Execution, resp: web.StreamResponse) -> None:
    """stream: false: one JSON object at the end. Whitespace is written meanwhile as the
    heartbeat (leading whitespace is valid JSON), so idle timeouts do not fire."""
    out = {"stdout": bytearray(), "stderr": bytearray()}

    async def idle() -> None:
        await resp.write(b" ")

    while (item := await _next(request, ex, idle)) is not None:
        out[item[0]] += item[1]
    result: dict[str, Any] = {"pid": ex.pid}
    for kind, data in out.items():
        try:
            result[kind] = data.decode("utf-8")
        except UnicodeDecodeError:
            result[f"{kind}_base64"] = base64.b64encode(data).decode()
    result["exit"] = ex.exit_record()
    await resp.write(json.dumps(result, ensure_ascii=False).encode() + b"\n")


async def feed(ex: Execution, request: web.Request, rest: bytearray) -> None:
    """Write the request's stdin, then (stdin_stream) each input line, then close stdin."""
    assert ex.proc is not None and ex.proc.stdin is not None
    stdin = ex.proc.stdin
    try:
        if ex.plan.stdin:
            stdin.write(ex.plan.stdin)
            ex.stdin_bytes += len(ex.plan.stdin)
            await stdin.drain()
        if ex.plan.stdin_stream:
            while (line := await _read_line(request.content, rest, MAX_REQUEST_BYTES)) is not None:
                if not line.strip():
                    continue
                data = parse_input_line(line)
                if data:
                    stdin.write(data)
                    ex.stdin_bytes += len(data)
                    await stdin.drain()
    except ValueError as e:
        ex.stdin_error = f"{e}; stdin was closed"
    except (BrokenPipeError, ConnectionResetError):
        pass  # the process closed its stdin or ended
    except Exception as e:  # the request body broke off (client gone, bad chunking)
        ex.stdin_error = f"the request body ended early ({type(e).__name__}); stdin was closed"
    finally:
        try:
            stdin.close()
        except Exception:
            pass
