"""
Tests for L{ollamaproxy.web.gate}: the key check that routes declared with
C{@keyed} cannot forget, through the whole in-memory chain.
"""

from __future__ import annotations

import json

import pytest

from tests.fakes.chain import KEY, Chain


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
    key (403), and an admin key still gets it.
    """
    chain = Chain(open_routes="GET /-/console")
    refused = chain.respond("GET", "/-/console/api/now", key=None)
    assert refused.code == 403
    assert json.loads(chain.body(refused))["error"] == "/-/console needs a key"
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
