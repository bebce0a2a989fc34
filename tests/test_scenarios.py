"""
Tests for bench/scenarios.py's pure parts: the figures (percentiles,
Jain's index, windows), the goals judged from them, the report and its
plots.  The runner itself, with its processes, is run end to end in
C{tests/integration/test_scenarios.py}.
"""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from typing import Any

import pytest

from tests.fakes.bench import load_bench

scenarios = load_bench("scenarios")


def test_percentiles_interpolate_between_ranks() -> None:
    """
    The 50th percentile of an even count is the mean of the middle two,
    the 99th lies between the two largest, one value is every percentile,
    and no value has none.
    """
    assert scenarios.percentile([4.0, 1.0, 3.0, 2.0], 50) == 2.5
    assert scenarios.percentile([float(i) for i in range(101)], 99) == 99.0
    assert scenarios.percentile([0.0, 10.0], 99) == pytest.approx(9.9)
    assert scenarios.percentile([7.0], 99) == 7.0
    assert scenarios.percentile([], 50) is None


def test_jains_index() -> None:
    """
    Equal shares give 1, one taking everything of n gives 1/n, 3:1 gives
    0.8; all zero (nobody served) gives none.
    """
    assert scenarios.jain([5.0, 5.0]) == 1.0
    assert scenarios.jain([9.0, 0.0, 0.0]) == pytest.approx(1 / 3)
    assert scenarios.jain([3.0, 1.0]) == pytest.approx(0.8)
    assert scenarios.jain([0.0, 0.0]) is None
    assert scenarios.jain([]) is None


def test_windows_count_whole_windows_only() -> None:
    """
    Times are counted in the window they fall in, from the start; times
    before the start are left out, and so is a last window cut short by
    the end.
    """
    times = [-1.0, 0.0, 59.9, 60.0, 119.0, 130.0, 179.0]
    assert scenarios.windows(times, 0.0, 150.0, 60.0) == [2, 2]
    assert scenarios.windows(times, 0.0, 180.0, 60.0) == [2, 2, 2]
    assert scenarios.windows([], 0.0, 30.0, 60.0) == []


def test_fairness_divides_by_weight() -> None:
    """
    Each window's Jain's index is taken of the tokens divided by each
    key's weight: 3:1 tokens for weights 3:1 is perfectly fair; the
    lowest window is kept and the rate is every token over the time.
    """
    tokens = {"heavy": [1.0, 2.0, 3.0, 61.0, 62.0, 63.0], "light": [5.0, 70.0, 71.0, 72.0]}
    out = scenarios._fairness(tokens, 120.0, 60.0, {"heavy": 3.0, "light": 1.0})
    assert out["windows"] == {"heavy": [3, 3], "light": [1, 3]}
    assert out["jain"] == [1.0, pytest.approx(0.8)]
    assert out["jain_min"] == pytest.approx(0.8)
    assert out["tokens_per_s"] == 10 / 120


def test_per_100_and_the_service_time() -> None:
    """
    Counts per 100 requests (none without requests), and a request's
    service time from the cost model's own formula.
    """
    assert scenarios.per_100(3, 60) == 5.0
    assert scenarios.per_100(3, 0) is None
    cost = load_bench("gpu_sim").CostModel()
    assert scenarios.service_time(100, 10, 4) == pytest.approx(
        100 / cost.prefill_tps + 10 * (1 + 3 * cost.slot_slowdown) / cost.decode_tps)


def test_the_simulators_figures_are_differences() -> None:
    """
    Loads and prompt tokens are what the load added over every backend;
    cache reuse is the share not evaluated; the hung backend's last
    request is timed from the hang's start.
    """
    def stats(loads: int, prompt: int, evaluated: int, **more: Any) -> dict[str, Any]:
        return {"loads": loads, "prompt_tokens": prompt, "evaluated_tokens": evaluated,
                "most_in_flight": {}, "most_busy": {}, "hang_since": None, "hung": [],
                "generations": 2, **more}

    before = [stats(1, 10, 10), stats(1, 10, 10)]
    after = [stats(2, 110, 30, most_in_flight={"m": 3}, generations=12),
             stats(1, 110, 30, hang_since=5.0,
                   hung=[[5.0, 40, 7.0], [6.5, 40, None], [30.0, 1, None]],
                   most_in_flight={"m": 5}, most_busy={"m": 1}, generations=5)]
    out = scenarios.sim_figures(before, after, hung_backend=True)
    assert (out["loads"], out["prompt_tokens"], out["evaluated_tokens"]) == (1, 200, 40)
    assert out["cache_reuse"] == pytest.approx(0.8)
    assert (out["most_in_flight"], out["hung_requests"], out["out_after"], out["checks"]) == \
        (5, 2, 1.5, 1)
    assert (out["found"], out["sent_after_found"]) == (2.0, 0)
    assert (out["generations"], out["last_busy"]) == ([10, 3], 1)


def test_the_hung_backend_is_judged_from_when_its_first_request_timed_out() -> None:
    """
    The hang is found when the first request the load sent the hung
    backend has its client leave (the proxy's header timeout); each request
    sent after that counts against the proxy, however few, and the proxy's
    one-token checks do not.  The goal is met with none sent after, found
    within --header-timeout and one check, and not with one sent after.
    """
    since = 10.0
    hung = [[10.0, 40, 19.0], [12.0, 40, 21.0], [20.0, 1, None], [19.5, 40, None]]
    figures = scenarios.hung_figures(since, hung)
    assert (figures["found"], figures["sent_after_found"], figures["checks"]) == (9.0, 1, 1)
    assert scenarios.hung_figures(since, hung[:3])["sent_after_found"] == 0
    assert scenarios.hung_figures(since, [[10.0, 40, None]])["found"] is None
    late = scenarios.HEADER_TIMEOUT + scenarios.CHECK + 0.5
    judged = scenarios.goal_hang(results(
        round2={"sim": {"found": 9.0, "sent_after_found": 1}},
        proxy={"sim": {"found": 9.0, "sent_after_found": 0}},
        two={"sim": {"found": late, "sent_after_found": 0}}))
    assert ["**met**" in line for line in judged] == [False, True, False]


def test_time_options_are_given_to_the_proxy_in_real_seconds() -> None:
    """
    The proxy's options in seconds are written in simulated seconds and
    divided by the simulators' speed; the others are left as they are.
    """
    words = ("--switch-hold", "3", "--fair-share", "requests", "--header-timeout", "10",
             "--switch-hold", "0")
    assert scenarios.in_real_seconds(words, 5.0) == [
        "--switch-hold", "0.6", "--fair-share", "requests", "--header-timeout", "2",
        "--switch-hold", "0"]


def results(**targets: dict[str, Any]) -> dict[str, Any]:
    return dict(targets)


def test_goals_are_judged_against_their_references() -> None:
    """
    Each proxy's figure is judged against its scenario's reference: the
    switches against a fifth of Ollama alone's, the TTFT p50 and cache
    reuse against pinned users', the p99 against round-robin's; a missing
    figure is "not measured", never met.
    """
    switches = scenarios.goal_models(results(ollama={"switches_per_100": 50.0},
                                             proxy={"switches_per_100": 10.0},
                                             round2={"switches_per_100": 11.0}))
    assert ["**met**" in line for line in switches] == [True, False]
    turns = scenarios.goal_multiturn(results(
        ollama={"ttft": {"p50": 1.0}, "sim": {"cache_reuse": 0.9}},
        nginx={"ttft": {"p99": 5.0}},
        proxy={"ttft": {"p50": 1.05, "p99": 6.0}, "sim": {"cache_reuse": 0.85}}))
    assert turns[0].count("**met**") == 2 and turns[0].count("**not met**") == 1
    missing = scenarios.goal_flood(results(round2={"ttft": {}}))
    assert len(missing) == 1 and "not measured" in missing[0]


def test_users_and_two_proxies_are_judged() -> None:
    """
    The users behind one key are judged as a flood is (the nine users'
    TTFT p99 against twice idle TTFT plus a long request's service), with
    the flooder's tokens against the nine others'; two proxies are judged
    on the most in flight at a backend against --parallel, then on the
    flood's and long_short's figures, the one proxy's beside them.
    """
    [met, missed] = scenarios.goal_users(results(
        round2={"ttft": {"p99": 30.0}, "goal_p99": 20.0,
                "tokens": {"flooder": 9000, "user1": 40, "user2": 80}},
        proxy={"ttft": {"p99": 10.0}, "goal_p99": 20.0,
               "tokens": {"flooder": 3000, "user1": 400, "user2": 400}}))[::-1]
    assert "**met**" in met and "flooder got 3000 tokens, the nine others 800" in met
    assert "**not met**" in missed
    one = {"sim": {"most_in_flight": 4}, "flood": {"ttft": {"p99": 7.0}, "goal_p99": 16.0},
           "long_short": {"jain_min": 0.97}}
    two = {"sim": {"most_in_flight": 8}, "flood": {"ttft": {"p99": 9.0}, "goal_p99": 16.0},
           "long_short": {"jain_min": 0.995}}
    [line_one, line_two] = scenarios.goal_two_proxies(results(proxy=one, two=two))
    assert line_one.split("; ")[0].endswith("(most: 4): **met**")
    assert line_two.split("; ")[0].endswith("(most: 8): **not met**")
    assert "(one proxy: 7 s)" in line_two and "(lowest 0.995, one proxy 0.97): **met**" in line_two


def test_round_2_keys_name_no_user() -> None:
    """
    Round 2's proxy had no user header, so its keys are added without
    C{--user-header} and its value (a shared key is one user); the other
    targets' keep every option.
    """
    targets = {t.name: t for t in scenarios.TARGETS}
    options = ("--weight", "3", "--user-header", "X-OpenWebUI-User-Id", "--note", "n")
    assert scenarios.key_options(options, targets["round2"]) == ["--weight", "3", "--note", "n"]
    assert scenarios.key_options(options, targets["proxy"]) == list(options)
    assert targets["two"].proxies == 2 and targets["proxy"].proxies == 1


def test_each_users_tokens_are_summed() -> None:
    """
    Each user's tokens are the sum over their requests, cut ones included.
    """
    outcomes = [scenarios.Outcome("a", 0.0, tokens=[1.0, 2.0]),
                scenarios.Outcome("b", 0.0, tokens=[1.0], error="cut"),
                scenarios.Outcome("a", 3.0, tokens=[4.0])]
    assert scenarios.per_user(outcomes) == {"a": 3, "b": 1}


def test_derived_figures() -> None:
    """
    Reloads per 100 requests leave out the first load; switches count
    every load after the warm-up; the worst wait is the worst key's.
    """
    by_name = {s.name: s for s in scenarios.SCENARIOS}
    contexts = scenarios.derive(by_name["contexts"], {"requests": 30, "sim": {"loads": 4}})
    assert contexts["reloads_per_100"] == 10.0
    models = scenarios.derive(by_name["models"], {
        "requests": 36, "sim": {"loads": 9}, "worst_wait": {"key1": 2.0, "key2": None,
                                                            "key3": 7.0}})
    assert (models["switches_per_100"], models["worst_wait_max"]) == (25.0, 7.0)


def test_every_scenario_names_known_targets() -> None:
    """
    The table of scenarios only names targets that exist, and the later
    flags of round 2's proxy are kept out until the proxy knows them.
    """
    names = {t.name for t in scenarios.TARGETS}
    for scenario in scenarios.SCENARIOS:
        assert set(scenario.targets) <= names
    round2 = next(t for t in scenarios.TARGETS if t.name == "round2")
    assert ("--switch-hold", "0") in round2.later


def test_the_report_shows_each_table_goal_and_plot(tmp_path: Any) -> None:
    """
    The Markdown has a table per scenario with a row per target run, the
    goals, and the plot; the SVG draws a bar per target, and a scenario no
    target ran gets none; the JSON keeps every figure.
    """
    report = {"meta": {"date": "2026-12-05", "speed": 10.0, "scale": 1.0, "targets": [
        {"name": "ollama", "describe": "alone", "flags": []},
        {"name": "proxy", "describe": "today", "flags": ["--x", "1"]}]},
        "scenarios": {
            "models": {"targets": {"ollama": {"switches_per_100": 80.0, "requests": 36},
                                   "proxy": {"switches_per_100": 8.0, "requests": 36}}},
            "users": {"targets": {}}}}
    md = scenarios.write(report, tmp_path, "stamp").read_text()
    assert "| ollama | 80 |" in md and "| proxy | 8 |" in md
    assert "**met**" in md
    assert "![models](scenarios-stamp-models.svg)" in md
    svg = ET.fromstring((tmp_path / "scenarios-stamp-models.svg").read_text().encode())
    bars = [e.get("data-target") for e in svg.iter("{http://www.w3.org/2000/svg}rect")
            if e.get("class") == "bar"]
    assert bars[:2] == ["ollama", "proxy"]
    assert not (tmp_path / "scenarios-stamp-users.svg").exists()
    saved = json.loads((tmp_path / "scenarios-stamp.json").read_text())
    assert saved["scenarios"]["models"]["targets"]["proxy"]["switches_per_100"] == 8.0


def test_the_command_line_refuses_unknown_names() -> None:
    """
    Scenarios and targets are checked against the tables.
    """
    args = scenarios.parse(["--only", "flood,hang", "--targets", "ollama", "--scale", "0.1"])
    assert (args.only, args.targets, args.scale, args.speed) == \
        ("flood,hang", "ollama", 0.1, scenarios.SPEED)
    with pytest.raises(SystemExit):
        scenarios.parse(["--only", "nope"])
    with pytest.raises(SystemExit):
        scenarios.parse(["--targets", "haproxy"])


def test_a_stream_is_read_line_by_line_whatever_its_pieces() -> None:
    """
    An NDJSON chat cut anywhere gives each content token's time, the text
    and the final object, also when the last line has no newline; an
    error line is the outcome's error, and a stream cut before its final
    object is marked cut.
    """
    clock = iter([1.0, 2.0, 3.0, 4.0])
    outcome = scenarios.Outcome("k", 0.5)
    lines = scenarios._Lines(outcome, lambda: next(clock))
    data = (b'{"message":{"content":"t0"},"done":false}\n{"message":{"content":" t1"},'
            b'"done":false}\n{"message":{"content":""},"done":true,"eval_count":2}')
    for piece in (data[:10], data[10:50], data[50:]):
        lines.dataReceived(piece)
    lines.connectionLost()
    assert (outcome.tokens, outcome.text, outcome.ttft) == ([1.0, 2.0], "t0 t1", 0.5)
    assert (outcome.final["eval_count"], outcome.error, outcome.end) == (2, None, 3.0)
    assert lines.finished.called
    failed = scenarios.Outcome("k", 0.0)
    cut = scenarios._Lines(failed, lambda: 1.0)
    cut.dataReceived(b'{"error":"boom"}\n')
    cut.connectionLost()
    assert failed.error == "boom"
    lost = scenarios.Outcome("k", 0.0)
    half = scenarios._Lines(lost, lambda: 1.0)
    half.dataReceived(b'{"message":{"content":"t0"},"done":false}\n')
    half.connectionLost()
    assert lost.error == "cut"
