"""
The Usage and Keys views' data: usage per key and model by hour and day
over a range, as JSON and CSV, each key's quota use and last use.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from twisted.internet.task import Clock

from ollamaproxy.console.views import usage_csv, without_credentials
from ollamaproxy.postgres.database import Database
from ollamaproxy.postgres.usage import PostgresUsage
from ollamaproxy.record.usage import UsageDatabase, UsageStore
from ollamaproxy.record.usage_db import SqliteUsage, write_rows
from tests.fakes.chain import Chain
from tests.fakes.console import add_inference_key
from tests.fakes.worker import ManualWorker

# 2026-11-27T00:00:00Z, the start of a UTC day.
DAY = 1795737600.0
HOUR = 3600.0


ROWS = [
    (DAY + 10, "alice", "llama3.2:latest", 1, 10, 20, 0),
    (DAY + 70, "alice", "llama3.2:latest", 1, 1, 2, 0),
    (DAY + HOUR + 5, "alice", "qwen3:latest", 1, 3, 4, 0),
    (DAY + HOUR + 6, "bob", "llama3.2:latest", 1, 5, 6, 0),
    (DAY + 86400 + 7, "bob", "llama3.2:latest", 1, 100, 200, 0),
]


@pytest.fixture
def usage_file(tmp_path: Path) -> str:
    path = str(tmp_path / "usage.sqlite3")
    write_rows(path, ROWS)
    return path


# The PostgreSQL half starts a real engine: marked, it is left out of the
# quick loop (see tests/conftest.py).
@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.engines)])
def database(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[UsageDatabase]:
    """
    The usage database the console reads, of each engine, holding L{ROWS}.
    """
    usage: UsageDatabase
    if request.param == "sqlite":
        usage = SqliteUsage(str(tmp_path / "usage.sqlite3"))
    else:
        usage = PostgresUsage(Database(request.getfixturevalue("postgres_url")))
    usage.write(ROWS)
    yield usage
    usage.close()


def test_series_by_hour_sums_per_key_model_and_hour(database: UsageDatabase) -> None:
    """
    By hour: one row per hour, key and model, minutes summed, in time order;
    the same from either engine.
    """
    assert database.series(DAY, DAY + 86400, "hour") == [
        (DAY, "alice", "llama3.2:latest", 2, 11, 22),
        (DAY + HOUR, "alice", "qwen3:latest", 1, 3, 4),
        (DAY + HOUR, "bob", "llama3.2:latest", 1, 5, 6),
    ]


def test_series_by_day_over_a_range(database: UsageDatabase) -> None:
    """
    By UTC day, over two days: the second day's row is its own; a range
    that ends before it leaves it out.
    """
    assert database.series(DAY, DAY + 2 * 86400, "day") == [
        (DAY, "alice", "llama3.2:latest", 2, 11, 22),
        (DAY, "alice", "qwen3:latest", 1, 3, 4),
        (DAY, "bob", "llama3.2:latest", 1, 5, 6),
        (DAY + 86400, "bob", "llama3.2:latest", 1, 100, 200),
    ]
    assert len(database.series(DAY, DAY + 86400, "day")) == 3


def test_last_used_is_each_keys_latest_minute(database: UsageDatabase) -> None:
    """
    A key's last use is the latest minute the usage database holds for it.
    """
    assert database.last_used() == {"alice": DAY + HOUR, "bob": DAY + 86400}


def test_no_usage_file_yet_has_no_usage(tmp_path: Path) -> None:
    """
    Before the first write there is no file: no usage, no error.
    """
    missing = SqliteUsage(str(tmp_path / "none.sqlite3"))
    assert missing.last_used() == {}
    assert missing.series(DAY, DAY + 86400, "day") == []


def chain_with(usage_file: str) -> Chain:
    store = UsageStore(usage_file, Clock(), worker=ManualWorker())
    chain = Chain(usage=store)
    chain.clock.advance(DAY + 86400 + 600)
    return chain


def test_usage_endpoint_answers_the_range_and_bucket_asked(usage_file: str) -> None:
    """
    C{/-/console/api/usage?from=...&to=...&bucket=hour} answers the rows of
    those days, by hour, as arrays under their column names.
    """
    chain = chain_with(usage_file)
    response = chain.respond(
        "GET", "/-/console/api/usage?from=2026-11-27&to=2026-11-27&bucket=hour")
    view = json.loads(chain.body(response))
    assert (view["bucket"], view["from"], view["until"]) == ("hour", DAY, DAY + 86400)
    assert view["columns"][:3] == ["time", "key", "model"]
    assert [row[:3] for row in view["rows"]] == [
        [DAY, "alice", "llama3.2:latest"], [DAY + HOUR, "alice", "qwen3:latest"],
        [DAY + HOUR, "bob", "llama3.2:latest"],
    ]


def test_usage_endpoint_shows_each_quota_and_its_use(usage_file: str) -> None:
    """
    Keys with a token quota are listed with what they used this UTC day and
    month, read from the usage store.
    """
    chain = chain_with(usage_file)
    add_inference_key(chain, tokens_per_day=1000, tokens_per_month=2000)
    view = json.loads(chain.body(chain.respond("GET", "/-/console/api/usage")))
    assert view["quotas"] == [{
        "name": "bob", "tokens_per_day": 1000, "used_today": 300,
        "tokens_per_month": 2000, "used_this_month": 311,
    }]
    keys = json.loads(chain.body(chain.respond("GET", "/-/console/api/keys")))["keys"]
    bob = next(k for k in keys if k["name"] == "bob")
    assert (bob["used_today"], bob["used_this_month"]) == (300, 311)
    assert bob["last_used"] == DAY + 86400


@pytest.mark.parametrize("query", [
    "bucket=week", "from=yesterday", "from=2026-11-27&to=2026-11-01",
    "from=2026-01-01&to=2026-03-01&bucket=hour",
])
def test_usage_endpoint_refuses_a_bad_range(usage_file: str, query: str) -> None:
    """
    A bucket that is not C{hour} or C{day}, a day that is not C{YYYY-MM-DD},
    a range that ends before it starts or is too long for its bucket: 400
    in C{{"error": ...}} shape.
    """
    chain = chain_with(usage_file)
    response = chain.respond("GET", "/-/console/api/usage?" + query)
    assert response.code == 400
    assert set(json.loads(chain.body(response))) == {"error"}


def test_usage_csv_export(usage_file: str) -> None:
    """
    The CSV export is C{text/csv}, an attachment, with a header row and one
    row per bucket, key and model, times in UTC.
    """
    chain = chain_with(usage_file)
    response = chain.respond("GET", "/-/console/api/usage.csv?from=2026-11-27&to=2026-11-28")
    assert response.headers.getRawHeaders(b"content-type") == [b"text/csv; charset=utf-8"]
    assert response.headers.getRawHeaders(b"content-disposition")[0].startswith(b"attachment;")
    rows = list(csv.reader(io.StringIO(chain.body(response).decode())))
    assert rows[0] == ["time", "key", "model", "requests", "prompt_tokens", "completion_tokens"]
    assert rows[1] == ["2026-11-27T00:00:00Z", "alice", "llama3.2:latest", "2", "11", "22"]
    assert rows[-1] == ["2026-11-28T00:00:00Z", "bob", "llama3.2:latest", "1", "100", "200"]


def test_csv_cells_a_spreadsheet_would_run_are_quoted() -> None:
    """
    A key or model name that starts like a formula (C{=}, C{+}, C{-}, C{@})
    is exported with a leading C{'}, so a spreadsheet shows it as text.
    """
    text = usage_csv([(DAY, "=HYPERLINK(1)", "@x", 1, 2, 3)]).decode()
    assert "'=HYPERLINK(1)" in text and "'@x" in text


@pytest.mark.parametrize(("url", "shown"), [
    ("http://user:pass@gpu:11434", "http://gpu:11434"),
    ("https://token@gpu/ollama?key=1#x", "https://gpu/ollama"),
    ("http://127.0.0.1:11434", "http://127.0.0.1:11434"),
])
def test_backend_urls_lose_their_credentials(url: str, shown: str) -> None:
    """
    A backend's URL is shown without user, password, query or fragment.
    """
    assert without_credentials(url) == shown
