"""
Readiness for load balancers: C{GET /-/ready}, without a key.
"""

from __future__ import annotations

import json
from typing import TypeVar

from treq.testing import StubTreq
from twisted.internet.defer import Deferred

from ollamaproxy.readiness import Readiness
from ollamaproxy.record.metrics import Metrics, MetricsResource
from tests.fakes.chain import Chain

T = TypeVar("T")


def test_ready_needs_no_key_and_names_its_checks() -> None:
    """
    A proxy with a healthy backend answers 200 without a key, naming its
    checks and nothing else (no address, no model).
    """
    chain = Chain()
    response = chain.respond("GET", "/-/ready", key=None)
    assert response.code == 200
    assert response.headers.getRawHeaders(b"cache-control") == [b"no-store"]
    assert json.loads(chain.body(response)) == {
        "ready": True, "checks": {"backends": True, "accepting": True},
    }


def test_not_ready_when_every_backend_is_unhealthy() -> None:
    """
    With no healthy backend, readiness is 503 in Ollama's error shape,
    saying which check fails.
    """
    chain = Chain()
    chain.pool.failed(chain.backends[0], "connection refused")
    response = chain.respond("GET", "/-/ready", key=None)
    assert response.code == 503
    document = json.loads(chain.body(response))
    assert document["error"] == "not ready: backends"
    assert document["ready"] is False


def test_draining_turns_not_ready_first() -> None:
    """
    Once shutting down starts, readiness is 503 at once, before the grace
    period's requests have finished.
    """
    chain = Chain()
    assert chain.respond("GET", "/-/ready", key=None).code == 200
    chain.in_flight.drain(30)
    response = chain.respond("GET", "/-/ready", key=None)
    assert response.code == 503
    assert json.loads(chain.body(response))["error"] == "not ready: accepting"


def test_readiness_on_the_metrics_endpoint() -> None:
    """
    The separate metrics endpoint answers readiness too, at the same path;
    every other path there is still the metrics.
    """
    readiness = Readiness()
    healthy = [True]
    readiness.add("redis", lambda: healthy[0])
    client = StubTreq(MetricsResource(Metrics(), readiness))

    def get(path: str) -> tuple[int, bytes]:
        response = successResultOf(client.get("http://metrics.example" + path))  # type: ignore[attr-defined]
        return response.code, successResultOf(client.content(response))  # type: ignore[attr-defined]

    assert get("/-/ready") == (200, b'{"ready": true, "checks": {"redis": true}}\n')
    healthy[0] = False
    code, body = get("/-/ready")
    assert code == 503 and json.loads(body)["error"] == "not ready: redis"
    assert b"ollamaproxy_" in get("/metrics")[1]


def successResultOf(d: Deferred[T]) -> T:
    results: list[T] = []
    d.addCallback(results.append)
    assert results, "no result yet"
    return results[0]


def test_a_part_the_proxy_serves_without_is_reported_not_required() -> None:
    """
    A check added as not required (PostgreSQL; Redis under the local
    policy) is named under C{degraded} when it fails, and the proxy stays
    ready: every proxy shares it, so all turning unready would be an
    outage of their own making.
    """
    readiness = Readiness()
    database = [False]
    readiness.add("backends", lambda: True)
    readiness.add("database", lambda: database[0], required=False)
    code, body = readiness.answer()
    assert code == 200
    assert json.loads(body) == {"ready": True, "checks": {"backends": True, "database": False},
                                "degraded": ["database"]}
    database[0] = True
    code, body = readiness.answer()
    assert (code, "degraded" in json.loads(body)) == (200, False)
