"""How every security policy reports a decision: enforce or shadow, one audit event, one count.

The policy addons (domain filter, content-type filter, IP ACL, rate limiting) decide with pure
functions and then call `decide`, which is the single place that knows about shadow mode and
auditing:

    if policy.decide("filter", "ads", client_ip, mode, flow, decision="block", host=host):
        flow.response = errors.make("DOMAIN_BLOCKED", ..., flow)

- `mode` "enforce": returns True (the caller refuses); the flow's record
  (`record(flow)`) gets `decision`, `rule` and `policy`, which the access line shows.
- `mode` "shadow": returns False (the request passes); the outcome is `would_block` and is
  appended to the flow's `shadow` list, so one request can carry several shadow hits.
- Either way: one WARNING event on logger `waypost.audit` (JSON fields policy, decision, rule,
  client_ip, request_id and the caller's details) and one increment of
  `policy_decisions_total{policy,decision,rule}`. Counted here, at decision time, because
  connection-level decisions (an ACL closing a connection) have no flow to count later.

Rule ids must come from configuration (a rule's id or pattern), never from raw client input:
they become metric labels.
"""

from __future__ import annotations

import logging
from typing import Any

from mitmproxy import http

from addons import errors, metrics
from addons.kernel.record import record

log = logging.getLogger("waypost.audit")

MODES = ("enforce", "shadow")


def decide(
    policy: str,
    rule: str,
    client_ip: str | None,
    mode: str = "enforce",
    flow: http.HTTPFlow | None = None,
    decision: str = "block",
    **detail: Any,
) -> bool:
    """Record one policy decision; True when the caller must enforce it."""
    enforce = mode != "shadow"
    outcome = decision if enforce else "would_block"
    fields: dict[str, Any] = {
        "policy": policy,
        "decision": outcome,
        "rule": rule,
        "client_ip": client_ip,
    }
    if flow is not None:
        fields["request_id"] = errors.request_id(flow)
        meta = record(flow)
        if enforce:
            meta["decision"] = outcome
            meta["rule"] = rule
            meta["policy"] = policy
        else:
            meta.setdefault("shadow", []).append(f"{policy}:{rule}")
    fields.update(detail)
    metrics.count_decision(policy, outcome, rule)
    log.warning("%s %s rule=%s", policy, outcome, rule, extra={"waypost": fields})
    return enforce
