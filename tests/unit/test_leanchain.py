from __future__ import annotations

from types import SimpleNamespace

import pytest

from addons.leanchain import INERT, inert

DEFAULTS = dict(
    mode=["regular"],
    block_list=[],
    anticache=False,
    anticomp=False,
    client_replay=[],
    server_replay=[],
    onboarding=False,
    proxyauth=None,
    map_remote=[],
    map_local=[],
    modify_body=[],
    modify_headers=[],
    stickyauth=None,
    stickycookie=None,
    save_stream_file=None,
    hardump="",
    upstream_auth=None,
    flow_detail=0,
    rfile=None,
)


def opts(**changes: object) -> SimpleNamespace:
    return SimpleNamespace(**(DEFAULTS | changes))


def test_everything_listed_is_inert_under_the_bundle_defaults() -> None:
    assert inert(list(INERT), opts()) == list(INERT)


@pytest.mark.parametrize(
    "changes, needed",
    [
        ({"modify_headers": ["/~q/X-A/1"]}, "modifyheaders"),
        ({"map_remote": ["|a|b"]}, "mapremote"),
        ({"block_list": ["/~u x/404"]}, "blocklist"),
        ({"flow_detail": 1}, "dumper"),
        ({"onboarding": True}, "onboarding"),
        ({"proxyauth": "any"}, "proxyauth"),
        ({"save_stream_file": "/tmp/x"}, "save"),
        ({"hardump": "/tmp/x.har"}, "savehar"),
        ({"mode": ["regular", "reverse:http://a@81"]}, "updatealtsvc"),
        ({"mode": ["dns"]}, "stripdnshttpsrecords"),
        ({"rfile": "-"}, "readfilestdin"),
        ({"upstream_auth": "u:p"}, "upstreamauth"),
    ],
)
def test_an_option_in_use_keeps_its_addon(changes: dict[str, object], needed: str) -> None:
    assert needed not in inert(list(INERT), opts(**changes))


def test_core_addons_are_never_removed() -> None:
    core = [
        "core",
        "termlog",
        "proxyserver",
        "nextlayer",
        "tlsconfig",
        "scriptloader",
        "block",
        "disableh2c",
        "errorcheck",
        "keepserving",
        "dnsresolver",
    ]
    assert inert(core, opts()) == []
