#!/usr/bin/env python3
"""
Draw bench results as one SVG: chunk latency and proxy CPU against concurrent streams.

Reads result files written by bench/run (bench/results/*.json) and draws two panels that share
a log-scale x axis of concurrent streams (the c10, c100, c1000 and c5000 scenarios, those
present):

 1. chunk latency in ms, log scale: per target a solid line for p99 and a dashed one for p50;
 2. proxy CPU per relayed chunk in µs (proxy_cpu_s * 1e6 / chunks), linear from 0, for every
    target that reports proxy_cpu_s (so never direct).

A target keeps one colour (direct grey, nginx green, ollamaproxy blue).  A hollow red-rimmed
marker is a run with errors (error_count > 0); a run without latency figures is left out.
With several files, later ones add or replace (target, scenario) points, so a rerun of one
scenario can be laid over a full run.  The caption names the files (basenames only) and the
date and CPU pinning of the last one.  The output is a pure function of the data, so a
committed chart only changes when its data does.

    python3 bench/plot.py bench/results/A.json [bench/results/B.json ...] [-o bench/plot.svg]

Standard library only.
"""

import argparse
import json
import math
import os
import re
from collections.abc import Callable, Iterable, Sequence
from typing import Any, NamedTuple
from xml.sax.saxutils import escape, quoteattr

Result = dict[str, Any]
Scale = Callable[[float], float]

WIDTH, HEIGHT = 960, 400
TOP, BOTTOM = 44.0, 290.0
PANELS = ((78.0, 452.0), (566.0, 940.0))  # (left, right) of each plot area
KNOWN_COLOURS = {"direct": "#7f7f7f", "nginx": "#2ca02c", "ollamaproxy": "#1f77b4"}
PALETTE = ("#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf", "#bcbd22")
ERROR_RED = "#d62728"
CONCURRENCY = re.compile(r"c\d+")
MAX_CAPTION = 150


class Point(NamedTuple):
    """One target at one concurrency."""

    streams: int
    p50: float
    p99: float
    errors: int
    cpu_us: float | None


Series = dict[str, dict[int, Point]]  # target -> streams -> point


def load(path: str) -> Result:
    """Read one results file; refuse anything without a targets mapping."""
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    if not isinstance(data, dict) or not isinstance(data.get("targets"), dict):
        raise ValueError(f"{os.path.basename(path)}: not a bench result (no 'targets')")
    return data


def to_point(streams: int, entry: Result) -> Point | None:
    """The plotted figures of one scenario entry, or None when its run gave no latency."""
    lat = entry.get("latency_ms")
    if not isinstance(lat, dict) or not lat.get("n"):
        return None
    p50, p99 = lat.get("p50"), lat.get("p99")
    if not isinstance(p50, int | float) or not isinstance(p99, int | float) or min(p50, p99) <= 0:
        return None
    cpu, chunks = entry.get("proxy_cpu_s"), entry.get("chunks")
    cpu_us = float(cpu) * 1e6 / chunks if cpu is not None and chunks else None
    return Point(streams, float(p50), float(p99), int(entry.get("error_count") or 0), cpu_us)


def collect(results: Sequence[Result]) -> Series:
    """Merge the concurrency points of every file; a later file's point replaces an earlier."""
    series: Series = {}
    for result in results:
        defined = result.get("scenarios") or {}
        for target, info in result["targets"].items():
            for sid, entry in (info.get("scenarios") or {}).items():
                if not CONCURRENCY.fullmatch(sid) or not isinstance(entry, dict):
                    continue
                streams = int((defined.get(sid) or {}).get("c") or entry.get("streams") or sid[1:])
                point = to_point(streams, entry)
                if point is not None:
                    series.setdefault(target, {})[streams] = point
    return series


def ordered(targets: Iterable[str]) -> list[str]:
    """The known targets in their usual order, then any others by name."""
    known = list(KNOWN_COLOURS)
    return sorted(targets, key=lambda t: (known.index(t) if t in known else len(known), t))


def colours(targets: Sequence[str]) -> dict[str, str]:
    """A colour per target: fixed for the known ones, the palette in turn for the rest."""
    others = [t for t in targets if t not in KNOWN_COLOURS]
    out = {t: KNOWN_COLOURS[t] for t in targets if t in KNOWN_COLOURS}
    out.update({t: PALETTE[i % len(PALETTE)] for i, t in enumerate(others)})
    return out


def num(v: float) -> str:
    """A coordinate rounded to 0.1 px."""
    s = f"{v:.1f}"
    return "0.0" if s == "-0.0" else s


def log_scale(lo: float, hi: float, a: float, b: float) -> Scale:
    """Map [lo, hi] logarithmically onto [a, b]."""
    l0, l1 = math.log10(lo), math.log10(hi)
    return lambda v: a + (math.log10(v) - l0) / (l1 - l0) * (b - a)


def lin_scale(lo: float, hi: float, a: float, b: float) -> Scale:
    """Map [lo, hi] linearly onto [a, b]."""
    return lambda v: a + (v - lo) / (hi - lo) * (b - a)


def decade_ticks(values: Sequence[float]) -> list[tuple[float, str]]:
    """Every power of ten from below the smallest value to above the largest, labelled."""
    lo = math.floor(math.log10(min(values, default=1.0)))
    hi = max(math.ceil(math.log10(max(values, default=10.0))), lo + 1)
    return [(10.0**e, f"{10**e:,}" if e >= 0 else f"{10.0**e:.{-e}f}") for e in range(lo, hi + 1)]


def linear_ticks(top: float, count: int = 5) -> list[tuple[float, str]]:
    """Ticks from 0 at a step of 1, 2 or 5 times a power of ten, reaching at least top."""
    top = top if top > 0 else 1.0
    mag = 10.0 ** math.floor(math.log10(top / count))
    step = next(m * mag for m in (1, 2, 5, 10) if m * mag * count >= top)
    n = math.ceil(top / step - 1e-9)
    return [(i * step, f"{i * step:g}") for i in range(n + 1)]


def text(x: float, y: float, s: str, size: int = 12, anchor: str = "middle",
         extra: str = "") -> str:
    return (f'<text x="{num(x)}" y="{num(y)}" font-size="{size}" text-anchor="{anchor}"{extra}>'
            f"{escape(s)}</text>")


def line(x1: float, y1: float, x2: float, y2: float, stroke: str, extra: str = "") -> str:
    return (f'<line x1="{num(x1)}" y1="{num(y1)}" x2="{num(x2)}" y2="{num(y2)}" '
            f'stroke="{stroke}"{extra}/>')


def marker(x: float, y: float, colour: str, errors: int, title: str) -> str:
    """A filled dot, or a hollow red-rimmed one for a run with errors."""
    style = (f'r="4.5" fill="white" stroke="{ERROR_RED}" stroke-width="2" class="marker error"'
             if errors else f'r="3.5" fill="{colour}" class="marker"')
    return f'<circle cx="{num(x)}" cy="{num(y)}" {style}><title>{escape(title)}</title></circle>'


def series_group(target: str, stat: str, colour: str, dashed: bool,
                 points: list[tuple[float, float, Point, str]]) -> list[str]:
    """One line with its markers, grouped and labelled for readers and tests."""
    out = [f'<g class="series" data-target={quoteattr(target)} data-stat="{stat}">']
    if len(points) > 1:
        dash = ' stroke-dasharray="6 4"' if dashed else ""
        coords = " ".join(f"{num(x)},{num(y)}" for x, y, _, _ in points)
        out.append(f'<polyline points="{coords}" fill="none" stroke="{colour}" '
                   f'stroke-width="2"{dash}/>')
    out += [marker(x, y, colour, p.errors, title) for x, y, p, title in points]
    return [*out, "</g>"]


def axes(left: float, right: float, x: Scale, streams: Sequence[int], y: Scale,
         yticks: Sequence[tuple[float, str]], title: str, ytitle: str) -> list[str]:
    """Frame, grid, ticks and titles of one panel."""
    out = [f'<rect x="{num(left)}" y="{num(TOP)}" width="{num(right - left)}" '
           f'height="{num(BOTTOM - TOP)}" fill="none" stroke="#444"/>']
    for v, label in yticks:
        out.append(line(left, y(v), right, y(v), "#e4e4e4", ' class="ygrid"'))
        out.append(text(left - 6, y(v) + 4, label, anchor="end", extra=' class="ytick"'))
    for s in streams:
        out.append(line(x(s), BOTTOM, x(s), BOTTOM + 5, "#444", ' class="xtick"'))
        out.append(text(x(s), BOTTOM + 18, f"{s:,}", extra=' class="xtick-label"'))
    mid, ymid = (left + right) / 2, (TOP + BOTTOM) / 2
    out.append(text(mid, 26, title, size=14, extra=' font-weight="bold"'))
    out.append(text(mid, BOTTOM + 36, "concurrent streams (log scale)"))
    rot = f' transform="rotate(-90 {num(left - 58)} {num(ymid)})"'
    out.append(text(left - 58, ymid, ytitle, extra=rot))
    return out


def panel(series: Series, targets: Sequence[str], palette: dict[str, str], name: str,
          left: float, right: float, x: Scale, streams: Sequence[int]) -> list[str]:
    """The latency panel (name 'latency') or the CPU panel (name 'cpu')."""
    latency = name == "latency"
    stats = ("p99", "p50") if latency else ("cpu",)
    shown = [t for t in targets if latency or any(p.cpu_us is not None
                                                  for p in series[t].values())]

    def value(p: Point, stat: str) -> float | None:
        return p.p99 if stat == "p99" else p.p50 if stat == "p50" else p.cpu_us

    values = [v for t in shown for p in series[t].values() for s in stats
              if (v := value(p, s)) is not None]
    if latency:
        yticks = decade_ticks(values)
        y = log_scale(yticks[0][0], yticks[-1][0], BOTTOM, TOP)
        out = axes(left, right, x, streams, y, yticks, "Chunk latency (p99 solid, p50 dashed)",
                   "latency per chunk (ms)")
    else:
        yticks = linear_ticks(max(values, default=0.0))
        y = lin_scale(0.0, yticks[-1][0], BOTTOM, TOP)
        out = axes(left, right, x, streams, y, yticks, "Proxy CPU per relayed chunk",
                   "CPU per chunk (µs)")
    if not values:
        out.append(text((left + right) / 2, (TOP + BOTTOM) / 2, "no data", extra=' fill="#888"'))
    for t in shown:
        for stat in stats:
            points = []
            for s, p in sorted(series[t].items()):
                v = value(p, stat)
                if v is None:
                    continue
                figure = f"{stat} {v:.4g} ms" if latency else f"{v:.4g} µs CPU per chunk"
                title = f"{t}, {s:,} streams: {figure}, {p.errors} errors"
                points.append((x(s), y(v), p, title))
            out += series_group(t, stat, palette[t], stat == "p50", points)
    return [f'<g id="panel-{name}">', *out, "</g>"]


def legend(targets: Sequence[str], palette: dict[str, str], y: float) -> list[str]:
    """One row under the panels: colours, line styles, the error marker."""
    out, x = [], PANELS[0][0]
    for t in targets:
        out += [line(x, y - 4, x + 22, y - 4, palette[t], ' stroke-width="2"'),
                f'<circle cx="{num(x + 11)}" cy="{num(y - 4)}" r="3.5" fill="{palette[t]}"/>',
                text(x + 28, y, t, anchor="start", extra=' class="legend"')]
        x += 44 + 7 * len(t)
    for label, dash in (("p99", ""), ("p50", ' stroke-dasharray="6 4"')):
        out += [line(x, y - 4, x + 26, y - 4, "#444", ' stroke-width="2"' + dash),
                text(x + 32, y, label, anchor="start", extra=' class="legend"')]
        x += 70
    out.append(f'<circle cx="{num(x + 5)}" cy="{num(y - 4)}" r="4.5" fill="white" '
               f'stroke="{ERROR_RED}" stroke-width="2"/>')
    out.append(text(x + 16, y, "streams with errors",
                    anchor="start", extra=' class="legend"'))
    return out


def caption(results: Sequence[Result], sources: Sequence[str]) -> str:
    """File names (never their directories), then date and pinning of the last file."""
    names = [os.path.basename(s) for s in sources]
    listed = ", ".join(names)
    meta = (results[-1].get("meta") or {}) if results else {}
    tail = "".join(f" · {k}: {meta[k]}" for k in ("date", "pinning") if meta.get(k))
    if len(listed) + len(tail) > MAX_CAPTION and len(names) > 2:
        listed = f"{names[0]} … {names[-1]} ({len(names)} files)"
    return f"data: {listed}{tail}" if listed else tail.removeprefix(" · ")


def render(results: Sequence[Result], sources: Sequence[str] = ()) -> str:
    """The whole SVG for these results (in order, later overriding) as a string."""
    series = collect(results)
    targets = ordered(series)
    palette = colours(targets)
    streams = sorted({s for points in series.values() for s in points})
    lo, hi = (streams[0], streams[-1]) if streams else (10, 1000)
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" '
           f'viewBox="0 0 {WIDTH} {HEIGHT}" font-family="sans-serif" fill="#222">',
           f'<rect width="{WIDTH}" height="{HEIGHT}" fill="white"/>']
    for name, (left, right) in zip(("latency", "cpu"), PANELS, strict=True):
        x = log_scale(lo / 10**0.2, hi * 10**0.2, left, right)
        out += panel(series, targets, palette, name, left, right, x, streams)
    out += legend(targets, palette, BOTTOM + 68)
    out.append(text(WIDTH / 2, HEIGHT - 10, caption(results, sources), size=11,
                    extra=' fill="#555" class="caption"'))
    return '<?xml version="1.0" encoding="UTF-8"?>\n' + "\n".join([*out, "</svg>"]) + "\n"


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0].strip(),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", nargs="+", metavar="RESULT.json",
                        help="bench result files, later ones overriding earlier points")
    parser.add_argument("-o", "--output", default="bench/plot.svg", metavar="PATH",
                        help="where to write the SVG (default: bench/plot.svg)")
    args = parser.parse_args(argv)
    try:
        results = [load(path) for path in args.results]
    except (OSError, ValueError) as e:
        parser.error(str(e))
    with open(args.output, "w", encoding="utf-8", newline="\n") as f:
        f.write(render(results, args.results))


if __name__ == "__main__":
    main()
