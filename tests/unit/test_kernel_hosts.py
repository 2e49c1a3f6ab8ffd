"""kernel.hosts: names, the one pattern grammar (exact, *.domain, *, IDNA) and the suffix index,
as tables."""

from __future__ import annotations

import pytest

from addons.kernel import hosts
from addons.kernel.hosts import HostIndex, Pattern

# --- names ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, key",
    [
        ("Example.COM", "example.com"),
        ("example.com.", "example.com"),
        (" example.com ", "example.com"),
        ("bücher.example", "xn--bcher-kva.example"),
        ("BÜCHER.example", "xn--bcher-kva.example"),
        ("xn--bcher-kva.example", "xn--bcher-kva.example"),
        ("_dmarc.example.com", "_dmarc.example.com"),
        ("a-b.example", "a-b.example"),
    ],
)
def test_normalise(name: str, key: str) -> None:
    assert hosts.normalise(name) == key


@pytest.mark.parametrize(
    "name",
    ["", ".", "a..b", "-a.example", "a-.example", "a b.example", "a/b", "a" * 64 + ".x", "a@b"],
)
def test_normalise_refuses_non_names(name: str) -> None:
    with pytest.raises(ValueError):
        hosts.normalise(name)


@pytest.mark.parametrize(
    "host, key",
    [("WWW.Example.com.", "www.example.com"), ("bücher.example", "xn--bcher-kva.example")],
)
def test_host_key(host: str, key: str) -> None:
    assert hosts.host_key(host) == key


@pytest.mark.parametrize(
    "host, ip",
    [
        ("192.0.2.7", "192.0.2.7"),
        ("127.1", "127.0.0.1"),  # legacy forms getaddrinfo accepts
        ("0x7f.0.0.1", "127.0.0.1"),
        ("2001:db8::1", "2001:db8::1"),
        ("[2001:db8::1]", "2001:db8::1"),
        ("example.com", None),
        ("1.example", None),
        ("999.1.1.1", None),
    ],
)
def test_ip_literal(host: str, ip: str | None) -> None:
    got = hosts.ip_literal(host)
    assert (str(got) if got else None) == ip


# --- patterns --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, entry",
    [
        ("example.com", Pattern("example.com", False)),
        ("*.Ads.Example.com.", Pattern("ads.example.com", True)),
        ("192.0.2.7", Pattern("192.0.2.7", False)),
        ("2001:DB8::1", Pattern("2001:db8::1", False)),
    ],
)
def test_parse_pattern(text: str, entry: Pattern) -> None:
    assert hosts.parse_pattern(text) == entry


@pytest.mark.parametrize("text", ["*", "a*.example", "*.*.example", "ex*mple.com", "*.", "a b"])
def test_parse_pattern_refuses(text: str) -> None:
    with pytest.raises(ValueError):
        hosts.parse_pattern(text)


@pytest.mark.parametrize(
    "text, pattern",
    [
        ("*.bücher.example", Pattern("xn--bcher-kva.example", True)),  # IDNA in a wildcard
        ("BÜCHER.example.", Pattern("xn--bcher-kva.example", False)),
        ("ＡＢＣ．example", Pattern("abc.example", False)),  # UTS #46: full-width forms
        ("*.xn--bcher-kva.example", Pattern("xn--bcher-kva.example", True)),
        (" *.Corp.Example ", Pattern("corp.example", True)),
        ("10.0.0.1", Pattern("10.0.0.1", False)),
    ],
)
def test_parse_pattern_normalises(text: str, pattern: Pattern) -> None:
    assert hosts.parse_pattern(text) == pattern


def test_star_only_where_the_caller_allows_it() -> None:
    assert hosts.parse_pattern("*", star=True) == hosts.EVERY_HOST
    assert str(hosts.EVERY_HOST) == "*"
    with pytest.raises(ValueError, match="is not a host pattern"):
        hosts.parse_pattern("*")


@pytest.mark.parametrize(
    "pattern", ["", "*.", "a*.example", "*.*.example", "foo.*", "host:443", "a b", "http://x/"]
)
def test_parse_patterns_rejects(pattern: str) -> None:
    with pytest.raises(ValueError, match="is not a host pattern"):
        hosts.parse_patterns([pattern], star=True)


def test_error_names_the_pattern_first() -> None:
    with pytest.raises(ValueError, match=r"^'a\*b' is not a host pattern"):
        hosts.parse_pattern("a*b")


@pytest.mark.parametrize(
    "host, key", [("bücher.example.", "xn--bcher-kva.example"), ("ＡＢＣ．example", "abc.example")]
)
def test_host_key_idna(host: str, key: str) -> None:
    assert hosts.host_key(host) == key


# --- the index --------------------------------------------------------------------------------


def index(*patterns: str, rule: str | None = None) -> HostIndex[str]:
    return hosts.build_index(hosts.parse_patterns(patterns), rule)


@pytest.mark.parametrize(
    "host, match",
    [
        ("ads.example.com", None),  # *.x does not cover x itself
        ("x.ads.example.com", ("*.ads.example.com", "*.ads.example.com")),
        ("a.b.c.ads.example.com", ("*.ads.example.com", "*.ads.example.com")),
        ("xads.example.com", None),  # a suffix match is on label boundaries
        ("tracker.example", ("tracker.example", "tracker.example")),
        ("www.tracker.example", None),  # an exact entry does not cover subdomains
        ("example.com", None),
        ("com", None),
    ],
)
def test_index_wildcard_semantics(host: str, match: tuple[str, str] | None) -> None:
    idx = index("*.ads.example.com", "tracker.example")
    got = idx.match(host)
    assert (tuple(got) if got else None) == match


def test_index_most_specific_wins_and_file_rule_ids() -> None:
    idx = index("*.example.com", "*.b.example.com", rule="ads")
    assert idx.match("a.b.example.com") == hosts.Match("ads", "*.b.example.com")
    assert idx.match("x.example.com") == hosts.Match("ads", "*.example.com")
    assert len(idx) == 2


def test_index_first_source_keeps_a_duplicate() -> None:
    idx = hosts.HostIndex()
    idx.add(Pattern("a.example", False), "inline")
    idx.add(Pattern("a.example", False), "file")
    assert idx.match("a.example") == hosts.Match("inline", "a.example")


def test_lookup_cost_does_not_grow_with_the_list() -> None:
    # The number of dict probes is what a lookup costs: one per label of the host.
    small = index("*.ads.example.com")
    big = hosts.build_index((Pattern(f"h{i}.example", i % 2 == 0) for i in range(100_000)), "big")
    probes: list[str] = []

    class Counting(dict):
        def get(self, key, default=None):  # type: ignore[override]
            probes.append(key)
            return super().get(key, default)

    for idx in (small, big):
        idx.exact, idx.suffixes = Counting(idx.exact), Counting(idx.suffixes)
        probes.clear()
        idx.match("a.b.c.miss.example")
        assert len(probes) == 1 + 4


# --- one pattern and the index agree ----------------------------------------------------------

PATTERNS = ["api.example.com", "*.corp.example", "Mixed.Case.Example."]


@pytest.mark.parametrize(
    "host, intercepted",
    [
        ("api.example.com", True),
        ("www.example.com", False),
        ("example.com", False),
        ("x.api.example.com", False),  # exact names do not cover subdomains
        ("a.corp.example", True),
        ("a.b.c.corp.example", True),  # any depth
        ("corp.example", False),  # *.x does not cover x itself
        ("evilcorp.example", False),  # label boundary
        ("corp.example.evil.test", False),
        ("mixed.case.example", True),
        ("", False),
        ("127.0.0.1", False),
    ],
)
def test_matches(host: str, intercepted: bool) -> None:
    patterns = hosts.parse_patterns(PATTERNS, star=True)
    assert (hosts.build_index(patterns).match(host) is not None) is intercepted
    assert any(p.matches(host) for p in patterns) is intercepted


def test_star_matches_everything_and_empty_nothing() -> None:
    assert hosts.build_index(hosts.parse_patterns(["*"], star=True)).match("anything.example")
    assert hosts.parse_pattern("*", star=True).matches("anything.example")
    assert not hosts.build_index([]).match("anything.example")


def test_star_is_the_last_resort_of_an_index() -> None:
    idx = hosts.build_index(hosts.parse_patterns(["*", "*.example.com", "a.example.com"], True))
    assert idx.match("a.example.com") == hosts.Match("a.example.com", "a.example.com")
    assert idx.match("b.example.com") == hosts.Match("*.example.com", "*.example.com")
    assert idx.match("other.test") == hosts.Match("*", "*")
    assert len(idx) == 3


def test_parse_patterns_normalises() -> None:
    p = hosts.build_index(
        hosts.parse_patterns(["API.Example.com.", " *.Corp.Example ", "10.0.0.1"], star=True)
    )
    assert set(p.exact) == {"api.example.com", "10.0.0.1"}
    assert set(p.suffixes) == {"corp.example"}
    assert p.everything is None


@pytest.mark.parametrize(
    "pattern, host, expected",
    [
        ("api.example.com", "api.example.com", True),
        ("api.example.com", "www.example.com", False),
        ("*.example.com", "a.example.com", True),
        ("*.example.com", "a.b.example.com", True),
        ("*.example.com", "example.com", False),
        ("*.example.com", "badexample.com", False),
        ("*", "anything", True),
        ("*.bücher.example", "shop.xn--bcher-kva.example", True),
    ],
)
def test_one_pattern_matches_as_the_index_does(pattern: str, host: str, expected: bool) -> None:
    p = hosts.parse_pattern(pattern, star=True)
    assert p.matches(host) is expected
    assert (hosts.build_index([p]).match(host) is not None) is expected
