"""
The operator console in a real headless Chromium, against a real twistd and
two fake Ollama servers on 127.0.0.1.

Needs Debian's C{chromium} and C{chromium-driver} packages (C{.ci/system-packages},
which the README's test command runs, installs them) and Selenium (the C{test} extra).
Without them the test fails, saying what to install: it never skips.

Selenium's calls block, so each runs on a thread (C{deferToThread}): the
fake Ollama servers live in this process's reactor and must keep answering
while the browser waits.  Every wait is bounded (C{WebDriverWait} with a
timeout), the browser is always quit, and the proxy and the fakes are
stopped at the end.  Screenshots of each view go to C{build/screenshots/}
(git-ignored); with C{OLLAMAPROXY_README_SCREENSHOT=1} the Now view's is
also written to C{docs/console.png}, the README's.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
from collections.abc import AsyncIterator, Callable, Iterator
from functools import partial
from typing import Any, TypeVar

import pytest
import pytest_twisted
from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThread

from ollamaproxy.admission.keys import digest
from ollamaproxy.record.usage_db import write_rows
from tests.fakes.client import agent, body, read, request, sleep, wait_for
from tests.fakes.ollama import FakeOllama
from tests.fakes.twistd import REPO, TEST_KEY, TwistdLauncher, Upstream, proxy_args, serve, stop

SCREENSHOTS = REPO / "build" / "screenshots"
README_SCREENSHOT = REPO / "docs" / "console.png"
INSTALL = "apt-get install -y chromium chromium-driver (Debian/Ubuntu), and pip install selenium"
INFERENCE_KEY = "olpk_browserinferencekeybrowserinference"
WRONG_KEY = "olpk_browserwrongkeybrowserwrongkeybrowse"
# A running stream must show within this many seconds (the figure).
SHOWS_WITHIN = 2.0
# Keys with usage recorded before the proxy starts: more than the palette's
# six colours, so that a colour by index modulo six would repeat.
TEAMS = [f"team-{n}" for n in range(8)]
# The model of that usage, apart from the chats' llama3.2.
OLD_MODEL = "mistral:latest"

T = TypeVar("T")


def _tools() -> tuple[str, str]:
    """
    Chromium and its driver, or a failure that says what to install.
    """
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if chromium is None or driver is None:
        pytest.fail(f"the console's browser test needs Chromium and chromedriver: {INSTALL}")
    return chromium, driver


@pytest.fixture
def browser() -> Iterator[Any]:
    """
    A headless Chromium driven by Selenium; always quit at the end.
    """
    chromium, driver_path = _tools()
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        pytest.fail(f"the console's browser test needs Selenium: {INSTALL}")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu",
                     "--disable-dev-shm-usage", "--window-size=1200,900",
                     "--no-first-run", "--disable-extensions"):
        options.add_argument(argument)
    service = Service(executable_path=driver_path, log_output=subprocess.DEVNULL)
    driver = webdriver.Chrome(service=service, options=options)
    driver.set_page_load_timeout(20)
    driver.set_script_timeout(20)
    try:
        yield driver
    finally:
        driver.quit()


def in_thread(work: Callable[[], T]) -> Deferred[T]:
    return deferToThread(work)


def until(driver: Any, condition: Callable[[Any], Any], timeout: float,
          what: str) -> Deferred[Any]:
    """
    Wait, on a thread, at most C{timeout} seconds for C{condition(driver)}
    to hold; fail saying C{what} was awaited.
    """
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.support.ui import WebDriverWait

    def wait() -> Any:
        try:
            return WebDriverWait(driver, timeout, poll_frequency=0.1).until(condition)
        except TimeoutException:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}") from None

    return in_thread(wait)


def text_of(driver: Any, css: str) -> str:
    """
    The visible text of the elements C{css} selects, read in one go (the
    page rebuilds its tables as updates come).
    """
    text: str = driver.execute_script(
        "return Array.from(document.querySelectorAll(arguments[0]))"
        ".map((e) => e.innerText).join(' ')", css)
    return text


def shown(driver: Any, element_id: str) -> bool:
    visible: bool = driver.execute_script(
        "const e = document.getElementById(arguments[0]);"
        "return !!e && e.offsetParent !== null", element_id)
    return visible


def bar_colours(driver: Any) -> dict[str, set[str]]:
    """
    The colours the usage chart's bars are drawn in, by the name (key or
    model) each bar is for.
    """
    pairs: list[list[str]] = driver.execute_script(
        "return Array.from(document.querySelectorAll('#chart-usage rect'))"
        ".map((r) => [r.dataset.name, getComputedStyle(r).fill])")
    colours: dict[str, set[str]] = {}
    for name, colour in pairs:
        colours.setdefault(name, set()).add(colour)
    return colours


def legend(driver: Any) -> str:
    return text_of(driver, "#usage-legend")


def hour_axis(driver: Any) -> dict[str, Any]:
    """
    The usage chart's bars' narrowest width on screen, and its time axis's
    labels: their texts, and whether any two overlap.
    """
    axis: dict[str, Any] = driver.execute_script("""
        const chart = document.querySelector('#chart-usage svg');
        const rects = Array.from(chart.querySelectorAll('rect'));
        const labels = Array.from(chart.querySelectorAll('text.tick'))
            .filter((t) => t.getAttribute('text-anchor') === 'middle');
        const boxes = labels.map((t) => t.getBoundingClientRect());
        return {
            narrowest: Math.min(...rects.map((r) => r.getBoundingClientRect().width)),
            labels: labels.map((t) => t.textContent),
            overlap: boxes.some((b, i) => i > 0 && b.left < boxes[i - 1].right),
            today: document.getElementById('usage-to').value.slice(5),
        };""")
    return axis


def choose(driver: Any, select_id: str, value: str) -> Deferred[None]:
    """
    Pick an option of a drop-down, as a user does (which fires its change).
    """
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    return in_thread(
        lambda: Select(driver.find_element(By.ID, select_id)).select_by_value(value))


def refused(why: str, driver: Any) -> bool:
    return why in text_of(driver, "#login-error")


def click(driver: Any, css: str) -> Deferred[None]:
    from selenium.webdriver.common.by import By

    return in_thread(lambda: driver.find_element(By.CSS_SELECTOR, css).click())


def log_in(driver: Any, key: str) -> Deferred[None]:
    from selenium.webdriver.common.by import By

    def work() -> None:
        field = driver.find_element(By.ID, "key")
        field.clear()
        field.send_keys(key)
        driver.find_element(By.ID, "login-button").click()

    return in_thread(work)


def screenshot(driver: Any, name: str) -> Deferred[None]:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    return in_thread(lambda: driver.save_screenshot(str(SCREENSHOTS / f"{name}.png")))


@pytest_twisted.async_yield_fixture
async def backends(reactor: Any) -> AsyncIterator[list[Upstream]]:
    """
    Two fake Ollamas: the first has the held model, both llama3.2.
    """
    upstreams = [
        serve(reactor, FakeOllama(reactor, models=("hold:latest", "llama3.2:latest"))),
        serve(reactor, FakeOllama(reactor, models=("llama3.2:latest",))),
    ]
    yield upstreams
    for upstream in upstreams:
        if upstream.connections is not None:  # not stopped by the test
            await stop(upstream)


async def chat(reactor: Any, url: str, model: str, stream: bool) -> Any:
    response = await request(
        agent(reactor), b"POST", url + "/api/chat",
        {"Authorization": f"Bearer {TEST_KEY}", "Content-Type": "application/json"},
        body(json.dumps({"model": model, "stream": stream,
                         "messages": [{"role": "user", "content": "hi"}]}).encode()),
    )
    return response


@pytest_twisted.ensureDeferred
async def test_console_in_a_real_browser(
    reactor: Any, backends: list[Upstream], twistd: TwistdLauncher, browser: Any
) -> None:
    """
    In Chromium: a wrong key and an inference key see nothing but the
    login; an admin key sees a running stream appear with its model, route,
    client address and token count within 2 s and leave when it ends, a
    backend turn unhealthy when its server stops, usage after a few chats
    (each key in a colour of its own; By and Per redraw without Show; by
    hour over 7 days on a phone, bars a few pixels wide and day labels to
    the last day), and the keys; the Now charts' middle tick is at a round
    time.  A screenshot of each view is saved.
    """
    first, second = backends
    (twistd.directory / "keys.json").write_text(json.dumps({"keys": [
        {"name": "bob", "hash": "sha256:" + digest(INFERENCE_KEY).hex(),
         "tokens_per_day": 100000}
    ]}))
    # Usage of the past week, every 6 hours, by more keys than colours.
    now = time.time()
    write_rows(str(twistd.directory / "usage.sqlite3"), [
        (now - hours * 3600, TEAMS[hours // 6 % len(TEAMS)], OLD_MODEL, 1, 10, 20, 0)
        for hours in range(0, 6 * 24, 6)
    ])
    proxy = await twistd.start(
        proxy_args(first.url, "--upstream", second.url, "--usage-file", "usage.sqlite3"))
    await wait_for(reactor, lambda: second.url in proxy.output, "the second backend's line")
    driver = browser
    await in_thread(lambda: driver.get(proxy.url + "/-/console"))
    await until(driver, lambda d: shown(d, "key"), 10, "the login form")

    # A wrong key, then an inference key: nothing but the login.
    for key, refusal in ((WRONG_KEY, "invalid API key"), (INFERENCE_KEY, "admin")):
        await log_in(driver, key)
        await until(driver, partial(refused, refusal), 10, f"the refusal of a key ({refusal})")
        assert not await in_thread(lambda: shown(driver, "app"))
        assert await in_thread(lambda: driver.execute_script(
            "return sessionStorage.length")) == 0
    await screenshot(driver, "login-refused")

    # The admin key: the console, live.
    await log_in(driver, TEST_KEY)
    await until(driver, lambda d: shown(d, "app"), 10, "the console after logging in")
    await until(driver, lambda d: text_of(d, "#live") == "live", 10, "the live feed")
    assert await in_thread(lambda: driver.get_cookies()) == []

    # Now: a running stream shows within 2 s with its model and tokens.
    response = await chat(reactor, proxy.url, "hold", stream=True)
    arrivals = await read(response)
    held = first.fake.held[-1]
    for n in range(7):
        held.write_line({"model": "hold", "message": {"role": "assistant", "content": f"t{n} "},
                         "done": False})
    await until(driver, lambda d: "hold:latest" in text_of(d, "#requests tbody")
                and " 7 " in " " + text_of(d, "#requests tbody td.num") + " ",
                SHOWS_WITHIN, "the running stream with its model and 7 tokens")
    now_row = await in_thread(lambda: text_of(driver, "#requests tbody"))
    # Who runs what: the key, the route and the client's address.
    for shown_text in ("api-key", "/api/chat", "127.0.0.1"):
        assert shown_text in now_row, now_row
    await screenshot(driver, "now")
    if os.environ.get("OLLAMAPROXY_README_SCREENSHOT") == "1":
        # A few seconds of tokens, so that the charts have something to show.
        for n in range(60):
            held.write_line({"model": "hold", "message": {"role": "assistant",
                                                          "content": f"v{n} "}, "done": False})
            await sleep(reactor, 0.05)
        await in_thread(lambda: driver.save_screenshot(str(README_SCREENSHOT)))
    held.write_line({"model": "hold", "message": {"role": "assistant", "content": ""},
                     "done": True, "done_reason": "stop", "prompt_eval_count": 3,
                     "eval_count": 7})
    held.finish()
    await arrivals.done
    await until(driver, lambda d: text_of(d, "#requests tbody") == "", SHOWS_WITHIN,
                "the ended stream to leave")

    # Backends: the second turns unhealthy when its server stops.
    await click(driver, "button[data-view=backends]")
    await until(driver, lambda d: text_of(d, ".backend").count("healthy") == 2
                and "unhealthy" not in text_of(d, ".backend"), 10, "two healthy backends")
    stopped = second.url
    await stop(second)
    await until(driver, lambda d: "unhealthy" in text_of(d, f'.backend[data-name="{stopped}"]'),
                20, "the stopped backend to turn unhealthy")
    # Its error, with the time it happened.
    await until(driver, lambda d: re.match(
        r"\d\d:\d\d:\d\d \w+", text_of(d, f'.backend[data-name="{stopped}"] .errors li')),
        10, "the stopped backend's error with its time")
    await screenshot(driver, "backends")

    # Usage: a few chats show up (the usage store writes every 5 s).
    for _ in range(3):
        reply = await chat(reactor, proxy.url, "llama3.2", stream=False)
        await (await read(reply)).done
    await click(driver, "button[data-view=usage]")

    async def usage_shows() -> None:
        for _ in range(30):
            await click(driver, "#usage-form button[type=submit]")
            try:
                await until(driver, lambda d: "llama3.2" in text_of(d, "#usage-table"),
                            1, "usage rows")
                return
            except AssertionError:
                continue
        raise AssertionError("no usage shown after 30 tries: "
                             + await in_thread(lambda: text_of(driver, "#view-usage"))
                             + proxy.output)

    await usage_shows()
    assert "api-key" in await in_thread(lambda: text_of(driver, "#usage-table"))
    # Each key its own colour, the same for all its bars.
    colours = await in_thread(lambda: bar_colours(driver))
    assert set(colours) == {"api-key", *TEAMS}, colours
    assert all(len(shades) == 1 for shades in colours.values()), colours
    assert len({shade for shades in colours.values() for shade in shades}) == len(colours)
    # Per and By redraw at once, without Show.
    await choose(driver, "usage-per", "model")
    await until(driver, lambda d: OLD_MODEL in legend(d) and "team-1" not in legend(d),
                5, "the chart per model, without pressing Show")
    await choose(driver, "usage-bucket", "hour")
    await until(driver, lambda d: "per hour" in text_of(d, "#usage-caption"), 5,
                "the chart by hour, without pressing Show")
    await until(driver, lambda d: "bob" in text_of(d, "#quotas"), 5, "bob's quota")
    await screenshot(driver, "usage")

    # Keys: names, scopes, quota; never a key.
    await click(driver, "button[data-view=keys]")
    await until(driver, lambda d: "bob" in text_of(d, "#keys") and "api-key" in
                text_of(d, "#keys"), 10, "the keys")
    page = await in_thread(lambda: driver.page_source)
    for secret in (TEST_KEY, INFERENCE_KEY, digest(INFERENCE_KEY).hex()):
        assert secret not in page
    await screenshot(driver, "keys")

    # A phone, in dark mode.
    await in_thread(lambda: driver.execute_cdp_cmd("Emulation.setEmulatedMedia", {
        "features": [{"name": "prefers-color-scheme", "value": "dark"}]}))
    await in_thread(lambda: driver.set_window_size(390, 844))
    await click(driver, "button[data-view=now]")
    await screenshot(driver, "now-phone-dark")

    # The Now charts' middle tick reads a round time once the history is
    # longer than a minute: for one drawing, the page is made to think
    # 100 s more went by (its clock is the browser's plus an offset).
    ticks: list[str] = await in_thread(lambda: driver.execute_script("""
        const real = Date.now;
        Date.now = () => real.call(Date) + 100000;
        try {
            document.querySelector('button[data-view=now]').click();
            return Array.from(document.querySelectorAll('#chart-streams svg text.tick'))
                .slice(-3).map((t) => t.textContent);
        } finally {
            Date.now = real;
        }"""))
    assert ticks[0] != "-60 s", ticks
    tick = ticks[1]
    parsed = re.fullmatch(r"-(\d+) (s|min)", tick)
    assert parsed is not None, tick
    assert int(parsed[1]) * (60 if parsed[2] == "min" else 1) % 30 == 0, ticks

    # By hour over 7 days, on a phone: bars wider than a pixel or two, and
    # labels that do not overlap and go on to the last day.
    await in_thread(lambda: driver.execute_script(
        "document.getElementById('chart-usage').replaceChildren()"))
    await click(driver, "button[data-view=usage]")
    await until(driver, lambda d: d.execute_script(
        "return document.querySelectorAll('#chart-usage rect').length > 0"), 10,
        "the chart by hour, drawn again")
    axis = await in_thread(lambda: hour_axis(driver))
    assert axis["narrowest"] >= 4, axis
    assert not axis["overlap"], axis
    assert axis["labels"][-1].startswith(axis["today"]), axis
    await screenshot(driver, "usage-phone-dark")

    # Logging out forgets the key.
    await click(driver, "#logout")
    await until(driver, lambda d: shown(d, "login"), 10, "the login after logging out")
    assert await in_thread(lambda: driver.execute_script("return sessionStorage.length")) == 0
    assert await proxy.terminate(reactor), proxy.output
    assert "Traceback" not in proxy.output
    # The page's own icon, so the browser never asks the proxy's /favicon.ico.
    assert "/favicon.ico" not in proxy.output

