"""
Tests for L{ollamaproxy.web.gate}: the key check that routes declared with
C{@keyed} cannot forget, through the whole in-memory chain.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from tests.fakes.chain import KEY, Chain
from tests.fakes.console import INFERENCE_KEY, add_inference_key

WRONG_KEY = "olpk_notakeynotakeynotakeynotakeynotak"


def auth_failures(chain: Chain, status: int) -> float:
    """
    The value of C{ollamaproxy_auth_failures_total} for a status.
    """
    value = chain.metrics.registry.get_sample_value(
        "ollamaproxy_auth_failures_total", {"status": str(status)}
    )
    return value or 0.0


@pytest.mark.parametrize(
    ("open_routes", "key", "code"),
    [("", None, 401), ("", "olpk_notakeynotakeynotakeynotakeynotak", 401), ("", KEY, 200),
     ("GET /metrics", None, 200)],
    ids=["no key", "wrong key", "admin key", "opened"],
)
def test_metrics_pass_the_gate(open_routes: str, key: str | None, code: int) -> None:
    """
    C{/metrics} answers only a request the gate lets through: an admin key,
    or none where the operator opened the route.
    """
    chain = Chain(open_routes=open_routes)
    response = chain.respond("GET", "/metrics", key=key)
    assert response.code == code
    body = chain.body(response)
    if code != 200:
        assert set(json.loads(body)) == {"error"}
    else:
        assert b"ollamaproxy_requests_total" in body


def test_console_data_needs_a_key_even_where_opened() -> None:
    """
    The console's data is declared not to be opened: an operator who lists
    C{GET /-/console} among the open routes still gets no data without a
    key (403, counted as an auth failure), and an admin key still gets it.
    """
    chain = Chain(open_routes="GET /-/console")
    refused = chain.respond("GET", "/-/console/api/now", key=None)
    assert refused.code == 403
    assert json.loads(chain.body(refused))["error"] == "/-/console needs a key"
    assert auth_failures(chain, 403) == 1.0
    assert chain.respond("GET", "/-/console/api/now").code == 200


def test_the_gate_counts_wrong_keys_on_metrics_as_guesses() -> None:
    """
    A wrong key on a declared route counts towards the address's guesses,
    as on Ollama's routes: the eleventh in a minute gets 429.
    """
    chain = Chain()
    wrong = "olpk_notakeynotakeynotakeynotakeynotak"
    codes = [chain.respond("GET", "/metrics", key=wrong).code for _ in range(11)]
    assert codes == [401] * 10 + [429]


@pytest.mark.parametrize(
    ("path", "key", "code"),
    [("/metrics", None, 401), ("/metrics", WRONG_KEY, 401), ("/metrics", INFERENCE_KEY, 403),
     ("/-/console/api/now", None, 401), ("/-/console/api/feed", WRONG_KEY, 401),
     ("/-/console/api/keys", INFERENCE_KEY, 403)],
    ids=["metrics no key", "metrics wrong key", "metrics inference key",
         "console no key", "console wrong key", "console inference key"],
)
def test_refusals_of_declared_routes_are_logged_and_counted(
    access_events: list[Any], path: str, key: str | None, code: int
) -> None:
    """
    A missing, wrong or insufficient key on C{/metrics} or the console's
    data leaves one access line (the refusal's status, the outcome
    C{rejected}, the client and the path) and one count in
    C{ollamaproxy_auth_failures_total}, as a refusal on Ollama's routes
    does.
    """
    chain = Chain()
    add_inference_key(chain)
    response = chain.respond("GET", path, key=key)
    assert response.code == code
    chain.body(response)
    assert [(e["status"], e["outcome"], e["path"], e["method"], e["key"])
            for e in access_events] == [(code, "rejected", path, "GET", "-")]
    assert access_events[0]["client"] == "127.0.0.1"
    assert auth_failures(chain, code) == 1.0


def test_guessing_on_the_console_is_counted_to_the_429() -> None:
    """
    Every wrong key sent to the console is counted, the throttle's 429s
    too: an operator's alert on the metric sees someone guessing there.
    """
    chain = Chain()
    for _ in range(11):
        chain.body(chain.respond("GET", "/-/console/api/now", key=WRONG_KEY))
    assert auth_failures(chain, 401) == 10.0
    assert auth_failures(chain, 429) == 1.0


def test_what_declared_routes_serve_is_not_logged(access_events: list[Any]) -> None:
    """
    What C{/metrics} and the console serve to an admin key leaves no access
    line (the console polls several times a second) and no count.
    """
    chain = Chain()
    for path in ("/metrics", "/-/console/api/now", "/-/console/api/keys"):
        assert chain.respond("GET", path, key=KEY).code == 200
    assert access_events == []
    assert auth_failures(chain, 401) == auth_failures(chain, 403) == 0.0
