"""CLI streaming latency: time to first byte with concurrent streams (`scripts/bench-cli`).

One mitmdump with the bundle and the CLI on (127.0.0.1, ephemeral ports). Each round starts
`--concurrency` requests at once, each running `/bin/sh -c 'echo ready; sleep HOLD'`, so all
streams are open together; every request is timed from its first byte sent to:
    head   the response head (status line and headers)
    start  the first NDJSON line ({"type": "start"}: the process exists)
    first  the first stdout line (the command has run and its output crossed the proxy)
The same command spawned directly with asyncio.create_subprocess_exec in this process, with
the same concurrency, is the floor any process-spawning endpoint pays ("direct spawn"); a GET
through a bare mitmdump (no addons) to a local origin that answers at once, with the same
concurrency and fresh connections, is the floor of the proxy hop ("bare mitmdump").
Percentiles over all requests of all rounds. Numbers from a shared machine are noisy: compare
the rows of one run, not runs.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import tempfile
import time
from pathlib import Path

import benchlib

TOKEN = "bench-cli-token"


async def one(port: int, hold: float) -> tuple[float, float, float]:
    body = json.dumps({"command": "sh", "args": ["-c", f"echo ready; sleep {hold}"]}).encode()
    t0 = time.perf_counter()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(
        f"POST /cli/execute HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
        f"Authorization: Bearer {TOKEN}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
        + body
    )
    await writer.drain()
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 30)
    t_head = time.perf_counter() - t0
    if not head.startswith(b"HTTP/1.1 200"):
        raise RuntimeError(head.decode(errors="replace"))
    t_start = t_first = None
    buf = b""
    while t_first is None:
        chunk = await asyncio.wait_for(reader.read(65536), 30)
        if not chunk:
            raise RuntimeError("stream ended early")
        buf += chunk
        now = time.perf_counter() - t0
        if t_start is None and b'"type": "start"' in buf:
            t_start = now
        if b'"type": "stdout"' in buf:
            t_first = now
    writer.close()
    return t_head, t_start or t_first, t_first


async def bare_get(port: int, origin: int) -> float:
    t0 = time.perf_counter()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(
        f"GET http://127.0.0.1:{origin}/ HTTP/1.1\r\nHost: 127.0.0.1:{origin}\r\n"
        "Connection: close\r\n\r\n".encode()
    )
    await writer.drain()
    await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 30)
    t = time.perf_counter() - t0
    writer.close()
    return t


async def origin_server() -> tuple[asyncio.Server, int]:
    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await reader.readuntil(b"\r\n\r\n")
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")
            await writer.drain()
        finally:
            writer.close()

    server = await asyncio.start_server(answer, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


async def direct(hold: float) -> float:
    t0 = time.perf_counter()
    proc = await asyncio.create_subprocess_exec(
        "/bin/sh", "-c", f"echo ready; sleep {hold}", stdout=subprocess.PIPE
    )
    assert proc.stdout is not None
    await proc.stdout.readline()
    t = time.perf_counter() - t0
    proc.kill()
    await proc.wait()
    return t


def pct(values: list[float], p: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(round(p / 100 * (len(s) - 1))))] * 1000


async def bench(args: argparse.Namespace, port: int, mport: int, bare: int, load: float) -> None:
    results: dict[str, list[float]] = {}
    server, origin = await origin_server()
    for _ in range(args.rounds):
        got_b = await asyncio.gather(*(bare_get(bare, origin) for _ in range(args.concurrency)))
        results.setdefault("bare mitmdump: GET head", []).extend(got_b)
        for where, p in (("proxy port", port), ("management port", mport)):
            got = await asyncio.gather(*(one(p, args.hold) for _ in range(args.concurrency)))
            for i, label in enumerate(("head", "start", "first stdout line")):
                results.setdefault(f"{where}: {label}", []).extend(g[i] for g in got)
            await asyncio.sleep(args.hold + 0.2)  # the previous round's processes are gone
        got_d = await asyncio.gather(*(direct(args.hold) for _ in range(args.concurrency)))
        results.setdefault("direct spawn: first stdout line", []).extend(got_d)
    print(
        f"\n{args.concurrency} concurrent streams x {args.rounds} rounds, {benchlib.load_label(load)}\n"
    )
    head = ["what", "n", "p50 ms", "p95 ms", "max ms"]
    body = [
        [name, len(vs), f"{pct(vs, 50):.1f}", f"{pct(vs, 95):.1f}", f"{max(vs) * 1000:.1f}"]
        for name, vs in results.items()
    ]
    print(benchlib.table(head, body))


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--concurrency", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--hold", type=float, default=0.5, help="seconds each stream stays open")
    args = ap.parse_args(argv)
    load = benchlib.load_at_start()
    env = {k: v for k, v in os.environ.items() if not k.startswith("WAYPOST_")}
    env["PYTHONUNBUFFERED"] = "1"  # the listening lines are read from the log file
    with tempfile.TemporaryDirectory() as tmpdir:
        tmp = Path(tmpdir)
        cmd = benchlib.mitmdump_args(
            tmp / "confdir-waypost", "-p", "0",
            "-s", str(benchlib.ROOT / "addons" / "bundle.py"), "--set", "metrics_port=0",
            "--set", "cli_enabled=true", "--set", f"cli_token={TOKEN}",
            "--set", "cli_allowed_commands=/bin/sh",
            "--set", f"cli_max_concurrent={args.concurrency}",
        )  # fmt: skip
        bare_cmd = benchlib.mitmdump_args(tmp / "confdir-bare", "-p", "0", "--set", "flow_detail=0")
        proc = benchlib.Child("mitmdump", cmd, tmp / "waypost.out", env)
        bare = benchlib.Child("bare mitmdump", bare_cmd, tmp / "bare.out", env)
        try:
            (m,) = bare.wait_for(benchlib.LISTENING)
            bare_port = int(m.group(1))
            m, mm = proc.wait_for(benchlib.LISTENING, benchlib.MANAGEMENT)
            asyncio.run(bench(args, int(m.group(1)), int(mm.group(1)), bare_port, load))
        finally:
            benchlib.stop_all([proc, bare])
    return 0


if __name__ == "__main__":
    benchlib.run(main)
