"""
The Grafana dashboard in C{contrib/} asks only for metrics the proxy has.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tests.fakes.chain import Chain

DASHBOARD = Path(__file__).resolve().parents[1] / "contrib" / "grafana-dashboard.json"
_METRIC = re.compile(r"\bollamaproxy_[a-z_]+\b")
_SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"),
             "gauge": ("",), "summary": ("_sum", "_count", "")}


def queries(node: Any) -> Iterator[str]:
    """
    Every PromQL text in the dashboard: panel targets and variable queries.
    """
    if isinstance(node, dict):
        for name, value in node.items():
            if name in ("expr", "definition") and isinstance(value, str):
                yield value
            elif name == "query" and isinstance(value, (str, dict)):
                yield from ([value] if isinstance(value, str) else queries(value))
            else:
                yield from queries(value)
    elif isinstance(node, list):
        for item in node:
            yield from queries(item)


def rendered_series() -> set[str]:
    """
    The series names C{GET /metrics} renders, with the router's gauges
    watched as the daemon watches them.
    """
    chain = Chain()
    text = chain.body(chain.respond("GET", "/metrics")).decode()
    names: set[str] = set()
    for name, kind in re.findall(r"^# TYPE (\S+) (\S+)$", text, re.M):
        base = name.removesuffix("_total") if kind == "counter" else name
        names.update(base + suffix for suffix in _SUFFIXES.get(kind, ("",)))
    return names


def test_every_metric_the_dashboard_queries_is_rendered() -> None:
    """
    Each metric name in the dashboard's queries is one that C{/metrics}
    renders (a counter as C{_total}, a histogram as C{_bucket}), so no panel
    stays empty for a misspelt or renamed metric.
    """
    dashboard = json.loads(DASHBOARD.read_text())
    used = {name for text in queries(dashboard) for name in _METRIC.findall(text)}
    assert len(used) >= 10
    assert used <= rendered_series(), used - rendered_series()


def test_dashboard_panels_have_unique_ids_and_a_datasource_variable() -> None:
    """
    The dashboard imports into any Grafana: unique panel ids, and its
    Prometheus data source chosen by a variable, not a fixed uid.
    """
    dashboard = json.loads(DASHBOARD.read_text())
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            assert target["datasource"]["uid"] == "${datasource}"
