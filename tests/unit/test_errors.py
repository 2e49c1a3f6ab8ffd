from __future__ import annotations

import json
import uuid

import pytest
from mitmproxy.test import tflow

from addons import errors
from addons.kernel.record import record


@pytest.mark.parametrize("code, status", sorted(errors.STATUS.items()))
def test_make_builds_the_json_error(code: str, status: int) -> None:
    f = tflow.tflow()
    resp = errors.make(code, "why", f)
    assert resp.status_code == status
    assert resp.reason  # mitmproxy 11 leaves 429/431 without a phrase
    assert resp.headers["content-type"] == "application/json"
    body = json.loads(resp.content)["error"]
    assert body["code"] == code and body["message"] == "why"
    assert body["request_id"] == resp.headers["x-request-id"] == errors.request_id(f)
    assert body["timestamp"].endswith("Z")
    assert record(f)["error_code"] == code


@pytest.mark.parametrize(
    "incoming, kept",
    [
        ("abc-123", True),
        ("a" * 128, True),
        ("a" * 129, False),
        ("bad id", False),
        ("x\r\ny", False),
        ("", False),
    ],
)
def test_request_id_keeps_only_valid_incoming_ids(incoming: str, kept: bool) -> None:
    f = tflow.tflow()
    if incoming:
        f.request.headers["X-Request-ID"] = incoming
    rid = errors.request_id(f)
    assert (rid == incoming) is kept
    assert errors.request_id(f) == rid  # stable per flow


def test_new_request_ids_are_unique_version_4_uuids() -> None:
    ids = {errors.new_request_id() for _ in range(10000)}
    assert len(ids) == 10000
    for rid in list(ids)[:100]:
        u = uuid.UUID(rid)
        assert u.version == 4 and u.variant == uuid.RFC_4122 and str(u) == rid


class Policy:
    @errors.fail_closed
    def requestheaders(self, flow: object) -> None:
        raise RuntimeError("boom")

    @errors.fail_closed
    async def request(self, flow: object) -> None:
        raise RuntimeError("boom")


def test_fail_closed_refuses_on_exception() -> None:
    f = tflow.tflow()
    Policy().requestheaders(f)
    assert f.response.status_code == 500
    assert json.loads(f.response.content)["error"]["code"] == "INTERNAL_ERROR"


async def test_fail_closed_refuses_on_exception_in_async_hooks() -> None:
    f = tflow.tflow()
    await Policy().request(f)
    assert f.response.status_code == 500
