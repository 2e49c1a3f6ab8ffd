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
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MITMDUMP = str(Path(sys.executable).with_name("mitmdump"))
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


def row(name: str, values: list[float]) -> str:
    return (
        f"| {name} | {len(values)} | {pct(values, 50):.1f} | {pct(values, 95):.1f} | "
        f"{max(values) * 1000:.1f} |"
    )


async def bench(args: argparse.Namespace, port: int, mport: int, bare: int) -> None:
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
    print(f"\n{args.concurrency} concurrent streams x {args.rounds} rounds, load average "
          f"{os.getloadavg()[0]:.2f} at the end\n")  # fmt: skip
    print("| what | n | p50 ms | p95 ms | max ms |\n|---|---|---|---|---|")
    for name, values in results.items():
        print(row(name, values))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--concurrency", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--hold", type=float, default=0.5, help="seconds each stream stays open")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [
            MITMDUMP, "--listen-host", "127.0.0.1", "-p", "0", "--set", f"confdir={tmp}",
            "-s", str(ROOT / "addons" / "bundle.py"), "--set", "metrics_port=0",
            "--set", "cli_enabled=true", "--set", f"cli_token={TOKEN}",
            "--set", "cli_allowed_commands=/bin/sh",
            "--set", f"cli_max_concurrent={args.concurrency}",
        ]  # fmt: skip
        env = {k: v for k, v in os.environ.items() if not k.startswith("WAYPOST_")}
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                env=env, cwd=ROOT)  # fmt: skip
        bare_cmd = [MITMDUMP, "--listen-host", "127.0.0.1", "-p", "0", "--set", f"confdir={tmp}",
                    "--set", "flow_detail=0"]  # fmt: skip
        bare = subprocess.Popen(bare_cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, env=env)  # fmt: skip
        try:
            assert bare.stdout is not None
            bare_port = 0
            while not bare_port:
                line = bare.stdout.readline()
                if not line:
                    print("bare mitmdump did not start", file=sys.stderr)
                    return 1
                if m := re.search(r"proxy listening at [0-9.]+:(\d+)", line):
                    bare_port = int(m.group(1))
            threading.Thread(target=bare.stdout.read, daemon=True).start()
            port = mport = 0
            deadline = time.monotonic() + 60
            assert proc.stdout is not None
            while not (port and mport):
                line = proc.stdout.readline()
                if not line or time.monotonic() > deadline:
                    print("mitmdump did not start", file=sys.stderr)
                    return 1
                if m := re.search(r"proxy listening at [0-9.]+:(\d+)", line):
                    port = int(m.group(1))
                if m := re.search(r"management listening at http://[0-9.]+:(\d+)", line):
                    mport = int(m.group(1))
            # Keep reading mitmdump's output (access lines), or it blocks on a full pipe.
            threading.Thread(target=proc.stdout.read, daemon=True).start()
            asyncio.run(bench(args, port, mport, bare_port))
        finally:
            for p in (proc, bare):
                p.terminate()
                p.wait(15)
    return 0


if __name__ == "__main__":
    sys.exit(main())
