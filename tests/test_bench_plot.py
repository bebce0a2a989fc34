"""
Tests for bench/plot.py: the SVG chart of bench results, drawn from synthetic
results (the script run as a command is in
C{tests/integration/test_bench_plot.py}).
"""

from __future__ import annotations

import copy
import xml.etree.ElementTree as ET
from pathlib import Path

from tests.fakes.bench import entry, full, load_plot, parse, result

NS = "{http://www.w3.org/2000/svg}"

plot = load_plot()


def panel(root: ET.Element, name: str) -> ET.Element:
    """The group holding one panel: 'latency' or 'cpu'."""
    found = root.find(f"./{NS}g[@id='panel-{name}']")
    assert found is not None
    return found


def series(root: ET.Element, name: str) -> dict[tuple[str | None, str | None], ET.Element]:
    """The line groups of one panel, by (target, statistic)."""
    return {
        (g.get("data-target"), g.get("data-stat")): g
        for g in panel(root, name).iter(f"{NS}g") if g.get("class") == "series"
    }


def counts(group: ET.Element) -> tuple[int, int]:
    """(polylines, markers) in one group."""
    return len(group.findall(f"{NS}polyline")), len(group.findall(f"{NS}circle"))


def test_lines_and_markers_per_target() -> None:
    """
    Every target gets a solid p99 and a dashed p50 line in the latency panel, each with a
    marker per point, in one colour per target.
    """
    root = parse(plot.render([full()]))
    assert root.tag == f"{NS}svg"
    latency = series(root, "latency")
    assert sorted(latency) == sorted(
        (t, s) for t in ("direct", "nginx", "ollamaproxy") for s in ("p50", "p99")
    )
    for (target, stat), group in latency.items():
        assert counts(group) == (1, 3), (target, stat)
        (line,) = group.findall(f"{NS}polyline")
        assert (line.get("stroke-dasharray") is not None) == (stat == "p50")
        assert line.get("stroke") == plot.KNOWN_COLOURS[target]
    assert len(list(root.iter(f"{NS}polyline"))) == 6 + 2


def test_cpu_panel_omits_targets_without_proxy_cpu() -> None:
    """
    direct reports no proxy_cpu_s: it has no line in the CPU panel, the others have one,
    at proxy_cpu_s * 1e6 / chunks.
    """
    svg = plot.render([full()])
    cpu = series(parse(svg), "cpu")
    assert sorted(cpu) == [("nginx", "cpu"), ("ollamaproxy", "cpu")]
    assert all(counts(g) == (1, 3) for g in cpu.values())
    # ollamaproxy at 100 streams: 1 s over 10,000 chunks.
    assert "ollamaproxy, 100 streams: 100 µs CPU per chunk" in svg
    points = plot.collect([full()])
    assert points["direct"][100].cpu_us is None
    assert points["nginx"][1000].cpu_us == 10.0


def test_log_axis_decades_equally_spaced() -> None:
    """
    10, 100 and 1,000 streams are equally far apart on the x axis of both panels, and the
    latency decades are equally far apart and labelled plainly.
    """
    root = parse(plot.render([full()]))
    for name in ("latency", "cpu"):
        ticks = [(t.text, float(t.get("x", "nan"))) for t in panel(root, name).iter(f"{NS}text")
                 if t.get("class") == "xtick-label"]
        assert [label for label, _ in ticks] == ["10", "100", "1,000"]
        xs = [x for _, x in ticks]
        assert abs((xs[1] - xs[0]) - (xs[2] - xs[1])) <= 0.1
        assert xs[1] - xs[0] > 50
    labels = {t.text: float(t.get("y", "nan")) for t in panel(root, "latency").iter(f"{NS}text")
              if t.get("class") == "ytick"}
    assert {"1", "10", "100", "1,000", "10,000"} <= set(labels)
    steps = [labels["1"] - labels["10"], labels["10"] - labels["100"],
             labels["100"] - labels["1,000"]]
    assert max(steps) - min(steps) <= 0.1 and min(steps) > 0


def test_error_point_marked() -> None:
    """
    A point whose run had errors gets a hollow red-rimmed marker, and the legend says what
    it means.
    """
    data = full()
    data["targets"]["ollamaproxy"]["scenarios"]["c1000"]["error_count"] = 7
    root = parse(plot.render([data]))
    errors = [c for c in root.iter(f"{NS}circle") if c.get("class") == "marker error"]
    # Its p99, its p50 and its CPU point.
    assert len(errors) == 3
    assert all(c.get("fill") == "white" and c.get("stroke") == plot.ERROR_RED for c in errors)
    assert all("1,000 streams" in (c.findtext(f"{NS}title") or "") for c in errors)
    legend = " ".join(t.text or "" for t in root.iter(f"{NS}text") if t.get("class") == "legend")
    assert "errors" in legend


def test_missing_and_failed_points_skipped() -> None:
    """
    A scenario absent for a target, without latency, or with no latency samples, is not
    drawn; a target left with one point has a marker but no line.
    """
    data = full()
    nginx = data["targets"]["nginx"]["scenarios"]
    del nginx["c10"]
    del nginx["c100"]["latency_ms"]
    data["targets"]["direct"]["scenarios"]["c1000"]["latency_ms"]["n"] = 0
    latency = series(parse(plot.render([data])), "latency")
    assert counts(latency[("nginx", "p99")]) == (0, 1)
    assert counts(latency[("direct", "p99")]) == (1, 2)
    assert counts(latency[("ollamaproxy", "p99")]) == (1, 3)


def test_later_file_overrides_and_adds() -> None:
    """
    With two files, the second replaces the (target, scenario) points it has and adds new
    ones; the caption names both files and the date of the last.
    """
    later = result({"nginx": {
        "c100": entry(100, 3.0, 123.0, cpu_s=0.5),
        "c5000": entry(5000, 9.0, 900.0, errors=2, cpu_s=20.0),
    }}, date="2026-02-02 02:02:02")
    points = plot.collect([full(), later])
    assert points["nginx"][100].p99 == 123.0
    assert points["nginx"][10].p99 == 20.0
    assert sorted(points["nginx"]) == [10, 100, 1000, 5000]
    svg = plot.render([full(), later], ["first.json", "second.json"])
    assert "nginx, 100 streams: p99 123 ms" in svg
    assert "nginx, 100 streams: p99 200 ms" not in svg
    root = parse(svg)
    assert counts(series(root, "latency")[("nginx", "p99")]) == (1, 4)
    assert counts(series(root, "latency")[("direct", "p99")]) == (1, 3)
    caption = next(t.text or "" for t in root.iter(f"{NS}text") if t.get("class") == "caption")
    assert "first.json, second.json" in caption
    assert "2026-02-02 02:02:02" in caption and "2026-01-01" not in caption


def test_deterministic() -> None:
    """
    Rendering the same data twice, or an equal copy of it, gives the same bytes.
    """
    first = plot.render([full()], ["a.json"])
    assert plot.render([copy.deepcopy(full())], ["a.json"]) == first
    assert plot.render([full()], ["a.json"]) == first


def test_no_absolute_paths(tmp_path: Path) -> None:
    """
    Sources are named by their basename only, and meta fields other than date and pinning
    (such as the log directory) are not shown.
    """
    source = tmp_path / "run.json"
    svg = plot.render([full()], [str(source)])
    assert str(tmp_path) not in svg
    assert "/abs/logs" not in svg
    assert "data: run.json" in svg


def test_other_target_colour() -> None:
    """
    A target with no fixed colour gets one from the palette, after the known targets.
    """
    data = full()
    data["targets"]["haproxy"] = {"scenarios": {"c10": entry(10, 1.0, 2.0, cpu_s=0.01)}}
    root = parse(plot.render([data]))
    marker = series(root, "cpu")[("haproxy", "cpu")].find(f"{NS}circle")
    assert marker is not None and marker.get("fill") == plot.PALETTE[0]
    assert list(plot.collect([data])) and plot.ordered(plot.collect([data]))[-1] == "haproxy"


