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
- With a flow, mitmweb shows why: `flow.marked` is ":no_entry:" (enforced) or ":eyes:" (shadow,
  unless already marked) and `flow.comment` gains a line "waypost acl deny rule=..."
  (`annotate`; `errors.make` uses it too for refusals no policy decided).
- Either way: an event `policy` on the flow's trace span when it is traced (`kernel.spans`),
  and one WARNING event on logger `waypost.audit` (JSON fields policy, decision, rule,
  client_ip, request_id and the caller's details) and one increment of
  `policy_decisions_total{policy,decision,rule}`. Counted here, at decision time, because
  connection-level decisions (an ACL closing a connection) have no flow to count later.
- The last `RECENT_SIZE` decisions are kept in `RECENT` (newest last, the audit event's fields
  plus `timestamp`), for the status page's GET /admin/decisions (`addons/statuspage.py`).

`explained` is the same outcome as plain data, recording nothing: each policy addon's
`explain(flow)` (POST /admin/explain) returns it.

Rule ids must come from configuration (a rule's id or pattern), never from raw client input:
they become metric labels.
"""

from __future__ import annotations

import logging
from collections import deque
from typing import Any

from mitmproxy import http

from addons import errors, metrics
from addons.kernel import spans
from addons.kernel.record import record

log = logging.getLogger("waypost.audit")

MODES = ("enforce", "shadow")
# mitmproxy's marks are names from mitmproxy.utils.emoji (what its `flow.mark` command accepts).
ENFORCED = ":no_entry:"
SHADOW = ":eyes:"
RECENT_SIZE = 100
# Process-wide like the metric objects it sits beside: `decide` is a function every policy
# addon calls, connection-level decisions included, so no addon instance owns this history.
RECENT: deque[dict[str, Any]] = deque(maxlen=RECENT_SIZE)


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
            annotate(flow, ENFORCED, f"waypost {policy} {outcome} rule={rule}", force=True)
        else:
            meta.setdefault("shadow", []).append(f"{policy}:{rule}")
            annotate(flow, SHADOW, f"waypost {policy} {outcome} (shadow) rule={rule}")
        spans.event(flow, "policy", {"waypost.policy": policy, "waypost.decision": outcome,
                                     "waypost.rule": rule})  # fmt: skip
    fields.update(detail)
    metrics.count_decision(policy, outcome, rule)
    RECENT.append({"timestamp": errors.timestamp(), **fields})
    log.warning("%s %s rule=%s", policy, outcome, rule, extra={"waypost": fields})
    return enforce


def explained(
    policy: str, rule: str | None, mode: str, decision: str = "block", **detail: Any
) -> dict[str, Any]:
    """A policy's part of POST /admin/explain (`explain(flow)` on the addon): what `decide`
    would record for `rule` (None: the request passes), without recording anything."""
    if rule is None:
        return {"addon": policy, "decision": "allow", **detail}
    shadow = mode == "shadow"
    return {
        "addon": policy,
        "decision": "would_block" if shadow else decision,
        "rule": rule,
        "shadow": shadow,
        "refuses": not shadow,
        **detail,
    }


def annotate(flow: http.HTTPFlow, mark: str, line: str, force: bool = False) -> None:
    """Add `line` to the flow's comment; mark the flow unless it is marked already (`force`:
    mark anyway, an enforced refusal outranks a shadow hit)."""
    flow.comment = f"{flow.comment}\n{line}" if flow.comment else line
    if force or not flow.marked:
        flow.marked = mark
