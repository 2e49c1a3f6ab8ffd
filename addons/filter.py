"""Domain filtering: block (or allow only) destinations by host name, from inline lists and files.

Names are normalised (lowercase, no trailing dot, IDNA A-labels) and looked up in a suffix index
(`addons/kernel/hosts.py`): one dict of exact names and one of wildcard suffixes per list,
probed once per label of the host, so a lookup costs the same with ten entries or a million.

- `blocklist` (default): a host matching `blocked` is refused, unless it also matches `allowed`.
- `allowlist`: only hosts matching `allowed` pass.
- `mixed`: only hosts matching `allowed` pass, and of those the ones matching `blocked` do not.

Entries: `example.com` (that name only) and `*.example.com` (every subdomain at any depth, not
`example.com` itself: list both to cover both). Files: plain names, hosts files
(`0.0.0.0 name ...`) and AdBlock domain rules (`||name^`, which covers the name and its
subdomains); comments and junk lines are skipped and counted.

Hooks:
- `http_connect`: the CONNECT authority; 403 DOMAIN_BLOCKED before any upstream connection.
- `requestheaders`: plain HTTP (and intercepted or reverse) requests, on `flow.request.host`, the
  name the proxy dials (never the Host header alone).
- `next_layer`: the TLS ClientHello inside a CONNECT tunnel; a blocked SNI gets the client
  connection closed before any TLS byte reaches the origin, whatever the CONNECT named.
- `running` / `done`: the task that polls list files and swaps a re-parsed list in atomically.

Options: `filter_mode`, `filter_list_mode`, `filter_blocked`, `filter_allowed`, `filter_files`,
`filter_ip_literals`, `filter_check_sni`, `filter_reload_interval`, `filter_response_body`.
The audit's `client_ip` is `kernel.net.client_ip` (through `forwarding_trusted_proxies`).
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
from collections.abc import Callable, Generator, Iterable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import pydantic
from mitmproxy import ctx, exceptions, http
from mitmproxy.net.tls import starts_like_tls_record
from mitmproxy.proxy import commands, events, layer
from mitmproxy.proxy.layers.http import HttpLayer
from mitmproxy.proxy.layers.tls import parse_client_hello

from addons import errors, policy
from addons.kernel import hosts, net
from addons.kernel.hosts import HostIndex, Pattern
from addons.kernel.options import Option, declare, duration, spawn
from addons.kernel.record import record
from addons.schema import FilterFile

log = logging.getLogger("waypost.filter")

POLICY = "filter"
LIST_MODES = ("blocklist", "allowlist", "mixed")
IP_LITERALS = ("allow", "deny", "check")

OPTIONS: tuple[Option, ...] = (
    Option(
        "filter_mode",
        str,
        "enforce",
        "enforce: refuse filtered destinations with 403 DOMAIN_BLOCKED; shadow: let them pass and only log and count would_block.",
        policy.MODES,
    ),
    Option(
        "filter_list_mode",
        str,
        "blocklist",
        "blocklist: refuse hosts in filter_blocked unless in filter_allowed; allowlist: only hosts in filter_allowed pass; mixed: only hosts in filter_allowed and not in filter_blocked pass.",
        LIST_MODES,
    ),
    Option(
        "filter_blocked",
        Sequence[str],
        [],
        "Blocked hosts: example.com (that name), *.example.com (every subdomain, not example.com itself), or an IP address; each entry is its own rule id.",
    ),
    Option(
        "filter_allowed",
        Sequence[str],
        [],
        "Allowed hosts, same syntax as filter_blocked: the allowlist, or exceptions to the blocklist in blocklist mode.",
    ),
    Option(
        "filter_files",
        str,
        "",
        'List files as JSON: ["lists/ads.txt", {"path": "lists/ok.txt", "id": "ok", "list": "allowed", "mode": "shadow"}]; plain names, hosts-file and ||name^ lines; re-read when they change.',
    ),
    Option(
        "filter_ip_literals",
        str,
        "check",
        "Targets given as IP addresses: allow (never filtered), deny (always refused), check (looked up as listed addresses and reverse-DNS names such as *.2.0.192.in-addr.arpa).",
        IP_LITERALS,
    ),
    Option(
        "filter_check_sni",
        bool,
        True,
        "Also filter the TLS SNI inside CONNECT tunnels: a blocked SNI gets the client connection closed even when the CONNECT named an allowed host.",
    ),
    Option(
        "filter_reload_interval",
        str,
        "2s",
        "How often list files are checked for changes (a changed file is re-read once it has stayed the same for one interval).",
    ),
    Option(
        "filter_response_body",
        str,
        "",
        "Message of the 403 DOMAIN_BLOCKED JSON body; empty: a default naming the host and the rule.",
    ),
)
# Options that change only how the lists are combined: the rules are rebuilt.
_REBUILD = frozenset({"filter_mode", "filter_list_mode", "filter_ip_literals"})

# --- list files -------------------------------------------------------------------------------

# Names every hosts file maps to itself; they are boilerplate, not entries.
_HOSTS_BOILERPLATE = frozenset(
    {
        "localhost",
        "localhost.localdomain",
        "local",
        "broadcasthost",
        "ip6-localhost",
        "ip6-loopback",
        "ip6-localnet",
        "ip6-mcastprefix",
        "ip6-allnodes",
        "ip6-allrouters",
        "ip6-allhosts",
        "0.0.0.0",
    }
)
_INLINE_COMMENT = re.compile(r"\s#")
# The addresses nearly every hosts-format blocklist uses: no need to parse them line after line.
_SINKHOLES = frozenset({"0.0.0.0", "127.0.0.1", "::", "::1", "0"})


class ListStats(NamedTuple):
    entries: int
    comments: int  # comments, blank lines and hosts-file boilerplate
    junk: int  # lines that are none of the supported formats
    junk_lines: tuple[int, ...]  # the first few junk line numbers, for the log


def parse_line(line: str) -> list[Pattern] | None:
    """The entries of one list line; None for a comment or blank line; ValueError for junk.

    Formats: `name` or `*.name` (plain), `IP name [name...]` (hosts file), `||name^` (AdBlock
    domain rule: the name and every subdomain).
    """
    text = line.strip()
    if not text or text[0] in "#![":  # `[Adblock Plus 2.0]` headers, `!` AdBlock comments
        return None
    # A comment after an entry needs whitespace before `#`: `example.com##.ad` is an AdBlock
    # element-hiding rule, not `example.com` with a comment.
    if "#" in text:
        text = _INLINE_COMMENT.split(text, 1)[0].strip()
    if text.startswith("||"):
        if not text.endswith("^") or "/" in text or "$" in text:
            # Paths, options ($third-party, $important) and bare prefixes change what the rule
            # means; a domain filter cannot honour them, so they are junk, not a wider block.
            raise ValueError("not a plain ||name^ AdBlock domain rule")
        name = hosts.normalise(text[2:-1])
        return [Pattern(name, False), Pattern(name, True)]
    tokens = text.split()
    if len(tokens) == 1:
        return [hosts.parse_pattern(tokens[0])]
    if tokens[0] not in _SINKHOLES and hosts.ip_literal(tokens[0]) is None:
        raise ValueError("not a name, a hosts-file line or an AdBlock rule")
    return [
        Pattern(hosts.normalise(t), False)
        for t in tokens[1:]
        if t.lower() not in _HOSTS_BOILERPLATE
    ]


def parse_list(lines: Iterable[str], sink: Callable[[Pattern], None]) -> ListStats:
    """Hand every entry of a list file to `sink`; count what was skipped. Never raises for a
    line. Entries go straight into the index, so a million-line file is never held twice."""
    entries = comments = junk = 0
    junk_lines: list[int] = []
    for number, line in enumerate(lines, 1):
        try:
            found = parse_line(line)
        except ValueError:
            junk += 1
            if len(junk_lines) < 5:
                junk_lines.append(number)
            continue
        if not found:
            comments += 1  # also a hosts line with only boilerplate names
            continue
        for entry in found:
            sink(entry)
        entries += len(found)
    return ListStats(entries, comments, junk, tuple(junk_lines))


# --- the decision -------------------------------------------------------------------------------


class Source(NamedTuple):
    rule: str | None  # None: inline, each entry is its own rule
    mode: str  # enforce | shadow
    index: HostIndex[str]


class Rules(NamedTuple):
    """Everything one decision reads; replaced whole (one assignment) on any change."""

    list_mode: str = "blocklist"
    mode: str = "enforce"
    blocked: tuple[Source, ...] = ()
    allowed: tuple[Source, ...] = ()
    ip_literals: str = "check"


class Verdict(NamedTuple):
    rule: str
    entry: str  # what matched, or "" when nothing in the allowlist did
    mode: str


def _first(
    sources: tuple[Source, ...], names: Sequence[str]
) -> tuple[hosts.Match[str], str] | None:
    for source in sources:
        for name in names:
            m = source.index.match(name)
            if m is not None:
                return m, source.mode
    return None


def decide(rules: Rules, host: str) -> Verdict | None:
    """Why `host` (a host_key) must be refused, or None when it may pass."""
    names: Sequence[str] = (host,)
    ip = hosts.ip_literal(host)
    if ip is not None:
        if rules.ip_literals == "allow":
            return None
        if rules.ip_literals == "deny":
            return Verdict("ip_literals", str(ip), rules.mode)
        # "check": the address as listed (192.0.2.7) and its reverse-DNS name, so entries such
        # as *.2.0.192.in-addr.arpa cover a /24.
        names = (str(ip), ip.reverse_pointer)
    if rules.list_mode != "blocklist" and _first(rules.allowed, names) is None:
        return Verdict("allowlist", "", rules.mode)
    if rules.blocked and rules.list_mode != "allowlist":
        hit = _first(rules.blocked, names)
        if hit is not None:
            if rules.list_mode == "blocklist" and _first(rules.allowed, names) is not None:
                return None  # allowed entries are exceptions to a blocklist
            (rule, entry), mode = hit
            return Verdict(rule, entry, mode)
    return None


# --- option parsing -----------------------------------------------------------------------------


# One schema for the profile's `security.filtering.domains.files` and this option.
FileSpec = FilterFile


def rule_id(spec: FileSpec) -> str:
    """A list file's rule id (its metric label): `id`, else the file name without suffix."""
    return spec.id or Path(spec.path).stem


_FILE_SPECS = pydantic.TypeAdapter(list[FileSpec | str])


def parse_file_specs(text: str) -> tuple[FileSpec, ...]:
    """`filter_files`: a JSON list of paths or {path, id, list, mode} objects."""
    if not text.strip():
        return ()
    try:
        raw = _FILE_SPECS.validate_json(text)
    except pydantic.ValidationError as e:
        first = e.errors()[0]
        where = ".".join(map(str, first["loc"]))
        raise ValueError(
            f"{where or 'value'}: {first['msg']} (expected a JSON list such as "
            '["lists/ads.txt", {"path": "lists/ok.txt", "list": "allowed", "mode": "shadow"}])'
        ) from None
    specs = tuple(FileSpec(path=s) if isinstance(s, str) else s for s in raw)
    seen: set[str] = set()
    for s in specs:
        if rule_id(s) in seen:
            raise ValueError(
                f"two list files have the rule id {rule_id(s)!r}; give them distinct ids"
            )
        seen.add(rule_id(s))
    return specs


def _reload_interval(value: str) -> float:
    interval = duration("filter_reload_interval", value)
    if interval <= 0:
        raise exceptions.OptionsError("filter_reload_interval: must be more than 0s")
    return interval


# --- list files: loading and watching -----------------------------------------------------------


class FileSignature(NamedTuple):
    mtime_ns: int
    size: int
    inode: int


def signature(path: str) -> FileSignature | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return FileSignature(st.st_mtime_ns, st.st_size, st.st_ino)


class LoadedList(NamedTuple):
    index: HostIndex[str]
    stats: ListStats
    signature: FileSignature | None


class BadList(Exception):
    pass


def load_list(path: str, rule: str) -> LoadedList:
    """Read and index one list file (blocking: call it off the event loop at runtime).

    BadList when the file cannot be read, or has lines but not one usable entry (a half-written
    or wrong file): the caller keeps the list it had.
    """
    sig = signature(path)
    index: HostIndex[str] = HostIndex()
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            stats = parse_list(f, lambda entry: index.add(entry, rule))
    except OSError as e:
        raise BadList(f"cannot read {path}: {e.strerror or e}") from None
    if not stats.entries and stats.junk:
        raise BadList(
            f"{path}: no usable entry in {stats.junk} junk lines (first at lines "
            f"{', '.join(map(str, stats.junk_lines))})"
        )
    return LoadedList(index, stats, sig)


class _Watched:
    """One list file: its spec, the list loaded from it, and the watcher's state."""

    def __init__(self, spec: FileSpec) -> None:
        self.spec = spec
        self.loaded: LoadedList | None = None
        self.pending: FileSignature | None = None  # a change seen, read once it settles
        self.error: str | None = None


def _log_loaded(spec: FileSpec, loaded: LoadedList, action: str) -> None:
    s = loaded.stats
    log.info(
        "filter list %s %s: %d entries, %d comments, %d junk lines",
        spec.path,
        action,
        s.entries,
        s.comments,
        s.junk,
        extra={
            "waypost": {
                "rule": rule_id(spec),
                "path": spec.path,
                "entries": s.entries,
                "comments": s.comments,
                "junk": s.junk,
                "junk_lines": list(s.junk_lines),
            }
        },
    )


def _refused(w: _Watched, sig: FileSignature, e: BadList) -> None:
    """A changed list file that did not parse: the list loaded before stays in force."""
    w.error = str(e)
    # Remember the signature so a bad file is reported once, not every interval.
    if w.loaded is not None:
        w.loaded = w.loaded._replace(signature=sig)
    else:
        w.loaded = LoadedList(HostIndex(), ListStats(0, 0, 0, ()), sig)
    log.warning("filter list %s refused, keeping the list loaded before: %s", w.spec.path, e)


# --- refusing a tunnel whose SNI is blocked -----------------------------------------------------


def _sni(data: bytes) -> str | None:
    """The SNI of the ClientHello `data` starts with; None when it is not TLS, not complete yet
    (next_layer is asked again with more data) or names no server (the CONNECT decided)."""
    if not starts_like_tls_record(data):
        return None
    try:
        hello = parse_client_hello(data)
    except ValueError:
        return None  # not TLS after all; the next layer will say so
    return hello.sni if hello is not None and hello.sni else None


class _CloseClient(layer.Layer):
    """Takes the place of the tunnel's next layer and closes the client connection at once:
    nothing the client sent (its ClientHello) is forwarded, and the origin never sees TLS."""

    closed = False

    def _handle_event(self, event: events.Event) -> Generator[commands.Command, Any, None]:
        if not self.closed:
            self.closed = True
            yield commands.CloseConnection(self.context.client)


# --- the addon ----------------------------------------------------------------------------------


class Filter:
    def __init__(self) -> None:
        self.rules = Rules()
        self.check_sni = True
        self.reload_interval = 2.0
        self.response_body = ""
        self._inline_blocked = Source(None, "enforce", HostIndex())
        self._inline_allowed = Source(None, "enforce", HostIndex())
        self._files: dict[str, _Watched] = {}  # by rule id, in configuration order
        self._tasks: set[asyncio.Task[None]] = set()  # to cancel in done(); spawn keeps them
        self._running = False

    def load(self, loader: Any) -> None:
        net.load(loader)  # the audit's client_ip honours forwarding_trusted_proxies
        declare(loader, OPTIONS)

    def configure(self, updated: set[str]) -> None:
        net.configure(updated)
        o = ctx.options
        rebuild = bool(updated & _REBUILD)
        if "filter_blocked" in updated or "filter_allowed" in updated:
            self._configure_inline(o.filter_blocked, o.filter_allowed)
            rebuild = True
        if "filter_reload_interval" in updated:
            self.reload_interval = _reload_interval(o.filter_reload_interval)
        if "filter_files" in updated:
            self._configure_files(o.filter_files)
            rebuild = True
        if "filter_check_sni" in updated:
            self.check_sni = o.filter_check_sni
        if "filter_response_body" in updated:
            self.response_body = o.filter_response_body
        if rebuild:
            self._rebuild()

    def _configure_inline(self, blocked: Sequence[str], allowed: Sequence[str]) -> None:
        try:
            blocked_index = hosts.build_index(hosts.parse_patterns(blocked))
            allowed_index = hosts.build_index(hosts.parse_patterns(allowed))
        except ValueError as e:
            raise exceptions.OptionsError(f"filter_blocked/filter_allowed: {e}") from None
        self._inline_blocked = self._inline_blocked._replace(index=blocked_index)
        self._inline_allowed = self._inline_allowed._replace(index=allowed_index)

    def _configure_files(self, text: str) -> None:
        try:
            specs = parse_file_specs(text)
        except ValueError as e:
            raise exceptions.OptionsError(f"filter_files: {e}") from None
        files: dict[str, _Watched] = {}
        for spec in specs:
            old = self._files.get(rule_id(spec))
            if old is not None and old.spec.path == spec.path:
                old.spec = spec  # list or mode may have changed; the parsed index stays
                files[rule_id(spec)] = old
                continue
            watched = _Watched(spec)
            if not self._running:
                # Startup: nothing is served yet, so the list is read here and a bad one stops
                # the proxy rather than letting it run without the list.
                try:
                    watched.loaded = load_list(spec.path, rule_id(spec))
                except BadList as e:
                    raise exceptions.OptionsError(f"filter_files: {e}") from None
                _log_loaded(spec, watched.loaded, "loaded")
            elif not os.path.isfile(spec.path):
                raise exceptions.OptionsError(f"filter_files: {spec.path} is not a file")
            # At runtime the new file is read off the event loop by the watcher, and its
            # entries apply from the moment it is parsed.
            files[rule_id(spec)] = watched
        self._files = files

    def _rebuild(self) -> None:
        o = ctx.options
        mode = o.filter_mode
        blocked = [self._inline_blocked._replace(mode=mode)]
        allowed = [self._inline_allowed._replace(mode=mode)]
        for w in self._files.values():
            if w.loaded is None:
                continue
            source = Source(rule_id(w.spec), w.spec.mode or mode, w.loaded.index)
            (blocked if w.spec.list == "blocked" else allowed).append(source)
        self.rules = Rules(
            list_mode=o.filter_list_mode,
            mode=mode,
            blocked=tuple(s for s in blocked if len(s.index)),
            allowed=tuple(s for s in allowed if len(s.index)),
            ip_literals=o.filter_ip_literals,
        )

    # --- lifecycle ---

    def running(self) -> None:
        self._running = True
        self._tasks.add(spawn(self._watch()))

    def done(self) -> None:
        for task in list(self._tasks):
            task.cancel()

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self.reload_interval)
            try:
                await self.poll()
            except Exception:  # the watcher must survive anything one file does
                log.exception("filter list watcher failed; retrying")

    async def poll(self) -> None:
        """Check every list file once; re-read the ones that changed and have settled."""
        for rule, w in list(self._files.items()):
            sig = await asyncio.to_thread(signature, w.spec.path)
            current = w.loaded.signature if w.loaded else None
            if sig == current or sig is None:
                if sig is None and w.error is None:
                    w.error = f"{w.spec.path} is missing; keeping the list loaded before"
                    log.warning("filter list %s", w.error)
                w.pending = None
                continue
            if sig != w.pending:
                # Changed since the last look: wait one interval for a writer to finish.
                w.pending = sig
                continue
            w.pending = None
            try:
                loaded = await asyncio.to_thread(load_list, w.spec.path, rule)
            except BadList as e:
                _refused(w, sig, e)
                continue
            if self._files.get(rule) is not w:
                continue  # reconfigured meanwhile
            w.loaded, w.error = loaded, None
            self._rebuild()  # one assignment: requests see the old or the new list, never half
            _log_loaded(w.spec, loaded, "reloaded")

    # --- management ---

    def readiness_check(self) -> tuple[str, dict[str, Any], bool]:
        lists = {
            rule: {
                "path": w.spec.path,
                "entries": w.loaded.stats.entries if w.loaded else 0,
                "junk": w.loaded.stats.junk if w.loaded else 0,
                "error": w.error,
            }
            for rule, w in self._files.items()
        }
        ok = all(w.loaded is not None for w in self._files.values())
        return "filter", {"ok": ok, "lists": lists}, ok

    # --- flow hooks ---

    @errors.fail_closed
    def http_connect(self, flow: http.HTTPFlow) -> None:
        if flow.response or flow.error or not flow.live:
            return
        self._check(flow)

    @errors.fail_closed
    def requestheaders(self, flow: http.HTTPFlow) -> None:
        if flow.response or flow.error or not flow.live or flow.websocket:
            return
        if flow.request.method == "CONNECT" or record(flow).get("local"):
            return
        self._check(flow)

    def _check(self, flow: http.HTTPFlow) -> None:
        rules = self.rules
        if not (rules.blocked or rules.list_mode != "blocklist" or rules.ip_literals == "deny"):
            return
        host = hosts.host_key(flow.request.host)
        verdict = decide(rules, host)
        if verdict is None:
            return
        client = net.client_ip(flow) or None
        if policy.decide(
            POLICY,
            verdict.rule,
            client,
            verdict.mode,
            flow,
            decision="block",
            host=host,
            entry=verdict.entry,
        ):
            record(flow)["blocked_by"] = POLICY
            flow.response = errors.make(
                "DOMAIN_BLOCKED",
                self.response_body or _message(host, verdict),
                flow,
                details={"rule": verdict.rule, "host": host},
            )

    def next_layer(self, nextlayer: layer.NextLayer) -> None:
        if nextlayer.layer is not None or not self.check_sni:
            return
        context = nextlayer.context
        # Only tunnels: a CONNECT's NextLayer has the HTTP layer beneath it and a target. A
        # reverse listener's TLS carries the proxy's own name, which the lists do not judge.
        if context.server.address is None or context.client.transport_protocol != "tcp":
            return
        if not any(isinstance(lay, HttpLayer) for lay in context.layers):
            return
        sni = _sni(nextlayer.data_client())
        if sni is None:
            return
        host = hosts.host_key(sni)
        verdict = decide(self.rules, host)
        if verdict is None:
            return
        client = net.peer_ip(context.client) or None
        target = context.server.address
        if policy.decide(
            POLICY,
            verdict.rule,
            client,
            verdict.mode,
            None,
            decision="block",
            host=host,
            entry=verdict.entry,
            sni=True,
            connect=f"{target[0]}:{target[1]}",
        ):
            nextlayer.layer = _CloseClient(context)

    def explain(self, flow: http.HTTPFlow) -> dict[str, Any]:
        """POST /admin/explain: the lists' verdict on the request's host (a CONNECT's
        authority; the SNI of its tunnel is judged the same way), read-only."""
        host = hosts.host_key(flow.request.host)
        verdict = decide(self.rules, host)
        if verdict is None:
            return policy.explained(POLICY, None, "enforce", host=host)
        return policy.explained(
            POLICY, verdict.rule, verdict.mode, "block", host=host, entry=verdict.entry
        )


def _message(host: str, verdict: Verdict) -> str:
    if verdict.rule == "allowlist":
        return f"Access to {host} is not allowed: it is not on the allowlist."
    if verdict.rule == "ip_literals":
        return "Access to IP addresses is not allowed by the proxy's domain filter."
    if verdict.entry and verdict.entry != verdict.rule:
        return f"Access to {host} is blocked by rule {verdict.rule!r} (entry {verdict.entry})."
    return f"Access to {host} is blocked by rule {verdict.rule!r}."


addons = [Filter()]
