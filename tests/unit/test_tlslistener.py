"""TLS listener: certificate/key checks (addons/kernel/tls.py), ALPN choice, the profile
section, the addon's hooks."""

from __future__ import annotations

import datetime
from pathlib import Path
from types import SimpleNamespace

import pytest
import trustme
from cryptography.hazmat.primitives import serialization
from mitmproxy import exceptions
from mitmproxy.proxy import mode_specs
from mitmproxy.test import taddons
from OpenSSL import SSL

from addons import schema
from addons.kernel.tls import KeypairError, load_keypair, validity_problem
from addons.tlslistener import TlsListener, make_context, select_alpn


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    d = tmp_path_factory.mktemp("tls")
    root = trustme.CA()
    intermediate = root.create_child_ca()
    leaf = intermediate.issue_cert("localhost")
    other = root.issue_cert("other", key_type=trustme.KeyType.RSA)
    old = root.issue_cert("old", not_after=datetime.datetime(2020, 1, 1, tzinfo=datetime.UTC))
    out = {
        "cert": d / "cert.pem",
        "key": d / "key.pem",
        "chain": d / "chain.pem",
        "fullchain": d / "fullchain.pem",
        "other_key": d / "other-key.pem",
        "old_cert": d / "old-cert.pem",
        "old_key": d / "old-key.pem",
        "encrypted_key": d / "enc-key.pem",
        "garbage": d / "garbage.pem",
    }
    leaf.cert_chain_pems[0].write_to_path(str(out["cert"]))
    leaf.private_key_pem.write_to_path(str(out["key"]))
    out["chain"].write_bytes(intermediate.cert_pem.bytes())
    out["fullchain"].write_bytes(b"".join(p.bytes() for p in leaf.cert_chain_pems))
    other.private_key_pem.write_to_path(str(out["other_key"]))
    old.cert_chain_pems[0].write_to_path(str(out["old_cert"]))
    old.private_key_pem.write_to_path(str(out["old_key"]))
    key = serialization.load_pem_private_key(leaf.private_key_pem.bytes(), None)
    out["encrypted_key"].write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"secret"),
        )
    )
    out["garbage"].write_text("not a certificate\n")
    return {k: str(v) for k, v in out.items()}


def test_keypair_with_separate_chain(files: dict[str, str]) -> None:
    pair = load_keypair(files["cert"], files["key"], files["chain"])
    assert len(pair.chain) == 1
    assert pair.files == (files["cert"], files["key"], files["chain"])
    make_context(pair)  # OpenSSL accepts it too


def test_fullchain_file_gives_leaf_and_chain(files: dict[str, str]) -> None:
    """certbot's fullchain.pem: the leaf first, then its intermediates."""
    pair = load_keypair(files["fullchain"], files["key"])
    assert pair.cert == load_keypair(files["cert"], files["key"]).cert
    assert len(pair.chain) == 1


@pytest.mark.parametrize(
    "cert, key, chain, which, message",
    [
        ("cert", "other_key", "", "key", "does not belong to the certificate"),
        ("missing", "key", "", "cert", "cannot read the certificate file"),
        ("cert", "missing", "", "key", "cannot read the private key file"),
        ("garbage", "key", "", "cert", "holds no PEM certificate"),
        ("cert", "garbage", "", "key", "holds no PEM private key"),
        ("cert", "encrypted_key", "", "key", "encrypted private key"),
        ("cert", "key", "garbage", "chain", "holds no PEM certificate"),
    ],
)
def test_bad_files_name_their_role(
    files: dict[str, str], cert: str, key: str, chain: str, which: str, message: str
) -> None:
    path = {**files, "missing": "/nonexistent/file.pem", "": ""}
    with pytest.raises(KeypairError, match=message) as e:
        load_keypair(path[cert], path[key], path[chain])
    assert e.value.which == which


def test_validity_problem(files: dict[str, str]) -> None:
    now = datetime.datetime(2026, 1, 1, tzinfo=datetime.UTC)
    assert validity_problem(load_keypair(files["cert"], files["key"]), now) is None
    old = load_keypair(files["old_cert"], files["old_key"])
    assert "expired on 2020-01-01" in (validity_problem(old, now) or "")


@pytest.mark.parametrize(
    "offers, http2, chosen",
    [
        ([b"h2", b"http/1.1"], True, b"h2"),
        ([b"http/1.1", b"h2"], True, b"h2"),  # server preference (httpx lists http/1.1 first)
        ([b"h2", b"http/1.1"], False, b"http/1.1"),
        ([b"h2"], False, None),
        ([b"http/1.0"], True, b"http/1.0"),
        ([b"acme-tls/1"], True, None),
        ([], True, None),
    ],
)
def test_select_alpn(offers: list[bytes], http2: bool, chosen: bytes | None) -> None:
    assert select_alpn(offers, http2) == chosen


def _handshake(server_ctx: SSL.Context, offers: list[bytes]) -> bytes:
    """A TLS handshake in memory; the ALPN protocol the server chose."""
    server = SSL.Connection(server_ctx)
    server.set_app_data(True)
    server.set_accept_state()
    client_ctx = SSL.Context(SSL.TLS_CLIENT_METHOD)
    client_ctx.set_alpn_protos(offers)
    client = SSL.Connection(client_ctx)
    client.set_connect_state()
    for _ in range(10):
        for a, b in ((client, server), (server, client)):
            try:
                a.do_handshake()
            except SSL.WantReadError:
                pass
            try:
                b.bio_write(a.bio_read(65536))
            except SSL.WantReadError:
                pass
    return server.get_alpn_proto_negotiated()


def test_context_negotiates_h2_in_a_real_handshake(files: dict[str, str]) -> None:
    ctx = make_context(load_keypair(files["cert"], files["key"], files["chain"]))
    assert _handshake(ctx, [b"http/1.1", b"h2"]) == b"h2"
    assert _handshake(ctx, [b"http/1.1"]) == b"http/1.1"


def _tls_start(mode: str) -> SimpleNamespace:
    client = SimpleNamespace(proxy_mode=mode_specs.ProxyMode.parse(mode))
    return SimpleNamespace(ssl_conn=None, is_dtls=False, context=SimpleNamespace(client=client))


def test_addon_serves_reverse_listeners_only(files: dict[str, str]) -> None:
    addon = TlsListener()
    with taddons.context(addon) as tctx:
        tctx.configure(addon, tls_listener_cert=files["cert"], tls_listener_key=files["key"])
        reverse = _tls_start("reverse:https://127.0.0.1:8443")
        addon.tls_start_client(reverse)  # type: ignore[arg-type]
        assert isinstance(reverse.ssl_conn, SSL.Connection)
        assert reverse.ssl_conn.get_app_data() is True  # http2 on
        forward = _tls_start("regular")  # interception keeps mitmproxy's CA
        addon.tls_start_client(forward)  # type: ignore[arg-type]
        assert forward.ssl_conn is None
        tctx.configure(addon, http2=False)
        again = _tls_start("reverse:http://127.0.0.1:80")
        addon.tls_start_client(again)  # type: ignore[arg-type]
        assert again.ssl_conn.get_app_data() is False
        tctx.configure(addon, tls_listener_cert="", tls_listener_key="")
        off = _tls_start("reverse:https://127.0.0.1:8443")
        addon.tls_start_client(off)  # type: ignore[arg-type]
        assert off.ssl_conn is None  # mitmproxy's own certificate again


@pytest.mark.parametrize(
    "options, message",
    [
        ({"tls_listener_cert": "cert"}, "tls_listener_key: a TLS listener needs both"),
        ({"tls_listener_key": "key"}, "tls_listener_cert: a TLS listener needs both"),
        (
            {"tls_listener_cert": "cert", "tls_listener_key": "other_key"},
            "tls_listener_key: the key .* does not belong",
        ),
        (
            {
                "tls_listener_cert": "cert",
                "tls_listener_key": "key",
                "tls_listener_chain": "garbage",
            },
            "tls_listener_chain: .* holds no PEM certificate",
        ),
    ],
)
def test_addon_refuses_bad_options(
    files: dict[str, str], options: dict[str, str], message: str
) -> None:
    addon = TlsListener()
    with taddons.context(addon) as tctx:
        with pytest.raises(exceptions.OptionsError, match=message):
            tctx.configure(addon, **{k: files[v] for k, v in options.items()})


def test_profile_section_maps_to_options(files: dict[str, str], tmp_path: Path) -> None:
    p = tmp_path / "p.yaml"
    p.write_text(f"server:\n  tls:\n    cert: {files['cert']}\n    key: {files['key']}\n")
    opts = schema.to_options(schema.load(p, {}).profile)
    assert opts["tls_listener_cert"] == files["cert"]
    assert opts["tls_listener_key"] == files["key"]
    assert opts["tls_listener_chain"] == ""
    assert schema.to_options(schema.load(None, {}).profile)["tls_listener_cert"] == ""


@pytest.mark.parametrize(
    "section, problem",
    [
        ("    cert: {cert}\n    key: {other_key}\n", ":4: server.tls.key: the key"),
        ("    cert: /nonexistent.pem\n    key: {key}\n", ":3: server.tls.cert: cannot read"),
        ("    cert: {cert}\n", ":2: server.tls: a TLS listener needs both cert and key"),
        (
            "    cert: {cert}\n    key: {key}\n    chain: {garbage}\n",
            ":5: server.tls.chain: '",
        ),
    ],
)
def test_profile_errors_point_at_the_line(
    files: dict[str, str], tmp_path: Path, section: str, problem: str
) -> None:
    p = tmp_path / "bad.yaml"
    p.write_text("server:\n  tls:\n" + section.format(**files))
    with pytest.raises(schema.ProfileError) as e:
        schema.load(p, {})
    assert any(problem in x for x in e.value.problems), e.value.problems


async def test_renewed_certificate_is_picked_up(
    files: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import asyncio
    import os
    import shutil

    from addons import tlslistener

    monkeypatch.setattr(tlslistener, "RELOAD_INTERVAL", 0.02)
    monkeypatch.setattr(tlslistener, "SETTLE", 0.0)
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    shutil.copy(files["cert"], cert)
    shutil.copy(files["key"], key)
    addon = TlsListener()
    with taddons.context(addon) as tctx:
        tctx.configure(addon, tls_listener_cert=str(cert), tls_listener_key=str(key))
        first = addon.pair
        assert first is not None
        task = asyncio.get_running_loop().create_task(addon._watch())
        try:
            # A half-done renewal (new certificate, old key) is refused; the old one stays.
            shutil.copy(files["old_cert"], cert)
            os.utime(cert, (1e9, 2e9))
            await asyncio.sleep(0.3)
            assert addon.pair is first
            shutil.copy(files["old_key"], key)
            os.utime(key, (1e9, 2e9))
            for _ in range(100):
                if addon.pair is not first:
                    break
                await asyncio.sleep(0.02)
            assert addon.pair is not None and addon.pair.subject != first.subject
            assert addon.context is not None
        finally:
            task.cancel()
