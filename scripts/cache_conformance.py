"""Run the public HTTP cache conformance suite (cache-tests.fyi) through Waypost's cache.

Usually started through `scripts/cache-conformance`; `tests/e2e/test_cache_conformance.py`
runs the same and fails on any result not listed in KNOWN below.

    cache-tests client (node) -> mitmdump -s addons/cache.py --mode reverse:... -> cache-tests
    origin server (node)

The suite is Mark Nottingham's http-cache-tests, on which cache-tests.fyi scores Squid, nginx,
Varnish, Apache httpd, Traffic Server and CDNs. It is fetched from the npm registry at a pinned
version and integrity into `.cache/cache-tests/` (not committed), with node-fetch, the one
package its command-line client needs. Results are classified with the suite's own
`determineTestResult`, and the package's published results for the other caches are
classified alike, so the table compares like with like. Needs Node.js and npm; everything
listens on 127.0.0.1 and is stopped by PID before exit.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
HERE = Path(__file__).resolve().parent / "conformance"
SUITE = "http-cache-tests@0.4.5"
SUITE_INTEGRITY = "sha512-DjuwN9nUZXLTW+wav1LRESCZNVxl8SshwOy4z1pxuWbWt5/ay6sM9QQ1lebBaDO6P1IMBoK6mdf+PuVP/QNL8A=="
FETCH = "node-fetch@2.7.0"
CACHE_DIR = ROOT / ".cache" / "cache-tests"
# Published results shipped in the package, as cache-tests.fyi names them.
OTHERS = {
    "nginx": "nginx.json",
    "Squid": "squid.json",
    "Traffic Server": "trafficserver.json",
    "Apache httpd": "apache.json",
    "Varnish": "varnish.json",
    "nuster": "nuster.json",
    "Fastly": "fastly.json",
}

_AGE_9111 = (
    "the 0.4.5 release predates RFC 9111 §5.1: a list-valued Age uses its first member and an "
    "invalid Age is ignored; the suite's current tests expect what Waypost does"
)
_PARTIAL = "partial (206) responses are not stored; ranges are cut from stored full responses"
_COOKIE = (
    "a response with Set-Cookie is never stored in this shared cache (as in nginx, Varnish "
    "and Fastly): one client's cookie must not reach another"
)
_STALE_CLOSE = (
    "depends on stale-close (serve stale when the origin drops the connection, without "
    "stale-if-error), which Waypost does not do by default"
)
# Every required or optimal test Waypost does not pass, and why. The e2e test fails on any
# other non-pass, and on any of these that starts passing (update the list then).
KNOWN: dict[str, str] = {
    "age-parse-dup-0": _AGE_9111,
    "age-parse-dup-0-twoline": _AGE_9111,
    "age-parse-dup-old": _AGE_9111,
    "age-parse-float": _AGE_9111,
    "age-parse-negative": _AGE_9111,
    "age-parse-nonnumeric": _AGE_9111,
    "age-parse-numeric-parameter": _AGE_9111,
    "age-parse-parameter": _AGE_9111,
    "age-parse-prefix-twoline": _AGE_9111,
    "conditional-lm-fresh-no-lm": (
        "expects 304 to an If-Modified-Since 3000 s before the stored Date; RFC 9110 §13.1.3 "
        "makes that a 200 (modified since)"
    ),
    "method-POST": "POST responses are never reused (optional in RFC 9111 §4.4's terms)",
    "other-set-cookie": _COOKIE,
    "headers-store-Set-Cookie": _COOKIE,
    "304-etag-update-response-Set-Cookie": _COOKIE,
    "partial-store-partial-complete": _PARTIAL,
    "partial-store-partial-reuse-partial": _PARTIAL,
    "partial-store-partial-reuse-partial-absent": _PARTIAL,
    "partial-store-partial-reuse-partial-byterange": _PARTIAL,
    "partial-store-partial-reuse-partial-suffix": _PARTIAL,
    "vary-normalise-lang-case": "Vary values are matched as sent, whitespace normalised only",
    "vary-normalise-lang-order": "Vary values are matched as sent, whitespace normalised only",
    "vary-normalise-lang-select": "Vary values are matched as sent, whitespace normalised only",
    "headers-store-Transfer-Encoding": (
        "the origin sends an unknown transfer coding, so the body cannot be framed: mitmproxy "
        "answers 502 (RFC 9112 §6.1), as Squid does"
    ),
    "stale-close-must-revalidate": _STALE_CLOSE,
    "stale-close-no-cache": _STALE_CLOSE,
    "stale-close-proxy-revalidate": _STALE_CLOSE,
    "stale-close-s-maxage=2": _STALE_CLOSE,
}
PASS = "✅"
NAMES = {
    "✅": "pass",
    "⛔️": "fail",
    "⚠️": "optional fail",
    "⚪️": "dependency failed",
    "🔹": "setup failed",
    "↻": "retried",
    "⁉️": "harness failed",
    "-": "not tested",
    "Y": "yes",
    "N": "no",
}


def log(msg: str) -> None:
    print(f"cache-conformance: {msg}", file=sys.stderr, flush=True)


class ConformanceError(Exception):
    """Node.js missing, the suite not fetchable, or a process that did not start."""


def install(cache_dir: Path = CACHE_DIR) -> Path:
    """The suite's directory, fetched and checked once (later calls reuse it)."""
    suite = cache_dir / "package"
    stamp = cache_dir / "installed"
    if stamp.is_file() and stamp.read_text() == f"{SUITE} {FETCH}":
        return suite
    npm = shutil.which("npm")
    if not shutil.which("node") or not npm:
        raise ConformanceError("Node.js and npm are needed (Debian: apt-get install nodejs npm)")
    if cache_dir.exists():
        shutil.rmtree(cache_dir)
    cache_dir.mkdir(parents=True)
    meta = json.loads(
        subprocess.run(
            [npm, "pack", SUITE, "--json", "--pack-destination", str(cache_dir)],
            check=True,
            capture_output=True,
            text=True,
            timeout=300,
        ).stdout
    )[0]
    if meta["integrity"] != SUITE_INTEGRITY:
        raise ConformanceError(f"{SUITE}: integrity {meta['integrity']} is not the pinned one")
    with tarfile.open(cache_dir / meta["filename"]) as tar:
        tar.extractall(cache_dir, filter="data")
    # Beside the package, not in it: its own package.json would also pull npm 6.
    subprocess.run(
        [npm, "install", "--no-save", "--no-package-lock", "--no-audit", "--no-fund", FETCH],
        cwd=cache_dir,
        check=True,
        capture_output=True,
        timeout=300,
    )
    stamp.write_text(f"{SUITE} {FETCH}")
    return suite


def _wait_http(url: str, child: benchlib.Child, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and child.alive():
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except urllib.error.HTTPError:
            return  # it answers
        except OSError:
            time.sleep(0.1)
    raise ConformanceError(f"{child.name} did not start; its output:\n{child.tail()}")


def run(
    suite: Path,
    workdir: Path,
    python: str = sys.executable,
    scripts: tuple[str, ...] = ("addons/cache.py",),
    options: tuple[str, ...] = (),
) -> dict[str, object]:
    """One run of the whole suite through mitmdump: the raw results by test id."""
    node = shutil.which("node") or "node"
    origin_port, proxy_port = benchlib.free_port(), benchlib.free_port()
    env = {
        **os.environ,
        "npm_config_port": str(origin_port),
        "npm_package_config_protocol": "http",
        "npm_package_config_pidfile": str(workdir / "server.pid"),
    }
    origin = benchlib.Child(
        "cache-tests origin",
        [node, "--import", (HERE / "loopback.mjs").as_uri(), "server/server.mjs"],
        workdir / "origin.out",
        env,
        cwd=suite,
    )
    mitmdump = str(Path(python).parent / "mitmdump")
    args = [mitmdump, "-q", "--listen-host", "127.0.0.1", "-p", str(proxy_port)]
    args += ["--mode", f"reverse:http://127.0.0.1:{origin_port}"]
    args += ["--set", f"confdir={workdir / 'confdir'}"]
    for s in scripts:
        args += ["-s", s]
    for o in options:
        args += ["--set", o]
    proxy = benchlib.Child("mitmdump", args, workdir / "mitmdump.out")
    try:
        _wait_http(f"http://127.0.0.1:{origin_port}/", origin, 30)
        _wait_http(f"http://127.0.0.1:{proxy_port}/", proxy, 30)
        client_env = {
            **os.environ,
            "npm_config_base": f"http://127.0.0.1:{proxy_port}",
            "npm_package_config_id": "",
        }
        out = subprocess.run(
            [node, "--no-warnings", "cli.mjs"],
            cwd=suite,
            env=client_env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        if out.returncode != 0 or not out.stdout.strip():
            raise ConformanceError(f"the cache-tests client failed:\n{out.stderr[-2000:]}")
        return json.loads(out.stdout)
    finally:
        proxy.stop()
        origin.stop()


def classify(suite: Path, results: dict[str, dict[str, object]]) -> dict[str, dict[str, tuple]]:
    """{name: {test id: (kind, symbol)}} for results given by name, via the suite's rules."""
    with tempfile.TemporaryDirectory(prefix="waypost-ct-") as tmp:
        files = {}
        for name, data in results.items():
            path = Path(tmp) / f"{len(files)}.json"
            path.write_text(json.dumps(data))
            files[str(path)] = name
        out = subprocess.run(
            [shutil.which("node") or "node", str(HERE / "classify.mjs"), str(suite), *files],
            check=True,
            capture_output=True,
            text=True,
            timeout=120,
        ).stdout
    return {files[f]: {k: tuple(v) for k, v in row.items()} for f, row in json.loads(out).items()}


def not_passed(row: dict[str, tuple]) -> dict[str, str]:
    """Required and optimal tests that did not pass: {test id: symbol}."""
    return {t: sym for t, (kind, sym) in row.items() if kind != "check" and sym != PASS}


def run_until_stable(
    suite: Path, workdir: Path, runs: int = 3, **kwargs: object
) -> tuple[dict[str, tuple], set[str]]:
    """Waypost's classified row, rerunning the suite while a test outside KNOWN does not
    pass (the suite's timing-based tests can miss on a loaded machine); a test passes if it
    passed in any run. Returns the row and the tests that needed a rerun to pass."""
    best: dict[str, tuple] | None = None
    flaky: set[str] = set()
    for i in range(runs):
        run_dir = workdir / f"run{i}"
        run_dir.mkdir(parents=True, exist_ok=True)
        row = classify(suite, {"Waypost": run(suite, run_dir, **kwargs)})["Waypost"]
        if best is None:
            best = row
        else:
            for t, (kind, sym) in row.items():
                if sym == PASS and best[t][1] != PASS:
                    best[t] = (kind, sym)
                    flaky.add(t)
        if not set(not_passed(best)) - set(KNOWN):
            break
    assert best is not None
    return best, flaky


def summary(row: dict[str, tuple]) -> dict[str, int]:
    s = {"required": 0, "required_pass": 0, "optimal": 0, "optimal_pass": 0}
    for kind, sym in row.values():
        if kind in ("required", "optimal"):
            s[kind] += 1
            s[f"{kind}_pass"] += sym == PASS
    return s


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--json", action="store_true", help="print Waypost's raw results as JSON")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="OPTION=VALUE",
        help="a mitmproxy option for the proxy under test (repeatable)",
    )
    a = p.parse_args(argv)
    suite = install()
    with tempfile.TemporaryDirectory(prefix="waypost-conformance-") as tmp:
        raw = run(suite, Path(tmp), options=tuple(a.set))
    if a.json:
        print(json.dumps(raw, indent=2))
        return 0
    published = {
        name: json.loads((suite / "results" / f).read_text()) for name, f in OTHERS.items()
    }
    rows = classify(suite, {"Waypost": raw, **published})
    print(f"# cache-tests ({SUITE}), reverse proxy caches; cache-tests.fyi's classification")
    print("| cache | required passed | optimal passed | failed | optimal failed | other |")
    print("|---|---|---|---|---|---|")
    for name, row in rows.items():
        s = summary(row)
        bad = not_passed(row).values()
        fails = sum(sym == "⛔️" for sym in bad)
        opt = sum(sym == "⚠️" for sym in bad)
        print(
            f"| {name} | {s['required_pass']}/{s['required']} | "
            f"{s['optimal_pass']}/{s['optimal']} | {fails} | {opt} | {len(bad) - fails - opt} |"
        )
    print("\nWaypost's tests that did not pass:")
    for test, sym in sorted(not_passed(rows["Waypost"]).items()):
        why = KNOWN.get(test, "NOT EXPECTED: a regression or a new test")
        print(f"- {test} ({NAMES.get(sym, sym)}): {why}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv[1:]))
    except ConformanceError as e:
        log(f"error: {e}")
        sys.exit(1)
    except KeyboardInterrupt:
        sys.exit(130)
