"""
The C{jq} queries docs/logging-and-metrics.md shows, run as written on a
JSON log the proxy's own writer made: a renamed field or event fails them.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

from twisted.logger import capturedLogs

from ollamaproxy.exchange import Exchange, StreamSummary
from ollamaproxy.record.logs import json_file_observer, log_exchange

DOC = Path(__file__).resolve().parents[2] / "docs" / "logging-and-metrics.md"
#: Where the doc's queries read the log; the test's file stands in.
DOC_PATH = "/var/log/ollamaproxy/ollamaproxy.json"


def jq_blocks() -> list[str]:
    """
    The doc's shell blocks that run C{jq}, each as one command line.
    """
    blocks = re.findall(r"```sh\n(.*?)```", DOC.read_text(encoding="utf-8"), re.S)
    return [block.replace("\\\n", " ") for block in blocks if block.lstrip().startswith("jq ")]


def write_log(path: Path) -> None:
    """
    A JSON log of two requests, as the proxy writes it: a chat that waited
    in the queue and generated, and a listing that did not wait.
    """
    chat = Exchange(method="POST", path="/api/chat", client="10.0.0.7", started=100.0,
                    route="/api/chat", key="alice", status=200, queued=2.5,
                    summary=StreamSummary(model="llama3.2:latest", prompt_tokens=12,
                                          completion_tokens=34))
    tags = Exchange(method="GET", path="/api/tags", client="10.0.0.8", started=101.0,
                    route="/api/tags", key="bob", status=200)
    with capturedLogs() as events:
        log_exchange(chat, 811, 104.0)
        log_exchange(tags, 90, 101.2)
    with path.open("w", encoding="utf-8") as out:
        observe = json_file_observer(out)
        for event in events:
            observe(event)


def test_the_documented_queries_answer(tmp_path: Path) -> None:
    """
    Each query of the doc runs on the proxy's JSON log and finds what it
    says it finds: the stream's key, model and tokens; the request that
    waited, with its wait.
    """
    assert shutil.which("jq"), "jq is not installed: run .ci/system-packages (apt-get install jq)"
    log_file = tmp_path / "ollamaproxy.json"
    write_log(log_file)
    blocks = jq_blocks()
    assert len(blocks) == 2, blocks
    outputs = []
    for block in blocks:
        assert DOC_PATH in block, block
        done = subprocess.run(["bash", "-c", block.replace(DOC_PATH, str(log_file))],
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        outputs.append(done.stdout.splitlines())
    streams, waited = outputs
    assert streams == ["alice\tllama3.2:latest\t34"]
    [line] = waited
    assert line.split("\t")[1:] == ["alice", "/api/chat", "2.5"]
