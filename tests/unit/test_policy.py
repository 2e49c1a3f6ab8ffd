"""policy.decide: enforce vs shadow, the flow record, the audit event and the counter."""

from __future__ import annotations

import logging

import pytest
from mitmproxy.test import tflow

from addons import errors, metrics, policy
from addons.kernel.record import record


def count(**labels: str) -> float:
    return metrics.REGISTRY.get_sample_value("policy_decisions_total", labels) or 0.0


def test_enforce_records_the_decision(caplog: pytest.LogCaptureFixture) -> None:
    f = tflow.tflow()
    before = count(policy="filter", decision="block", rule="ads")
    with caplog.at_level(logging.WARNING, logger="waypost.audit"):
        assert policy.decide("filter", "ads", "10.0.0.1", "enforce", f, host="x.ads.test")
    meta = record(f)
    assert (meta["decision"], meta["rule"], meta["policy"]) == ("block", "ads", "filter")
    assert count(policy="filter", decision="block", rule="ads") == before + 1
    (event,) = caplog.records
    assert event.levelno == logging.WARNING
    assert event.waypost == {
        "policy": "filter",
        "decision": "block",
        "rule": "ads",
        "client_ip": "10.0.0.1",
        "request_id": errors.request_id(f),
        "host": "x.ads.test",
    }


def test_shadow_passes_and_keeps_every_hit(caplog: pytest.LogCaptureFixture) -> None:
    f = tflow.tflow()
    before = count(policy="ratelimit", decision="would_block", rule="default")
    with caplog.at_level(logging.WARNING, logger="waypost.audit"):
        assert not policy.decide("ratelimit", "default", "10.0.0.2", "shadow", f, decision="limit")
        assert not policy.decide("filter", "ads", "10.0.0.2", "shadow", f)
    meta = record(f)
    assert "decision" not in meta
    assert meta["shadow"] == ["ratelimit:default", "filter:ads"]
    assert count(policy="ratelimit", decision="would_block", rule="default") == before + 1
    assert [r.waypost["decision"] for r in caplog.records] == ["would_block", "would_block"]


def test_connection_level_decisions_count_without_a_flow() -> None:
    before = count(policy="acl", decision="deny", rule="denied_ips")
    assert policy.decide("acl", "denied_ips", "192.0.2.7", decision="deny")
    assert count(policy="acl", decision="deny", rule="denied_ips") == before + 1


def test_decisions_mark_and_comment_the_flow_for_mitmweb() -> None:
    f = tflow.tflow()
    policy.decide("ratelimit", "default", "10.0.0.1", "shadow", f)
    assert (f.marked, f.comment) == (
        ":eyes:",
        "waypost ratelimit would_block (shadow) rule=default",
    )
    policy.decide("filter", "ads", "10.0.0.1", "enforce", f)
    assert f.marked == ":no_entry:"
    assert f.comment.splitlines()[1] == "waypost filter block rule=ads"
    errors.make("DOMAIN_BLOCKED", "no", f)  # the policy's line stays the only one
    assert f.comment.count("\n") == 1 and f.marked == ":no_entry:"


def test_refusals_without_a_policy_are_marked_too() -> None:
    f = tflow.tflow()
    errors.make("RATE_LIMITED", "slow down", f)
    assert (f.marked, f.comment) == (":warning:", "waypost RATE_LIMITED 429")


def test_marks_are_names_mitmproxy_accepts() -> None:
    from mitmproxy.utils import emoji

    assert {policy.ENFORCED, policy.SHADOW, errors.REFUSED_MARK} <= emoji.emoji.keys()
