"""
Tests for L{ollamaproxy.backends.relay}: how a response body travels from Ollama to
the client, in memory, moment by moment.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import pytest
from twisted.internet.defer import CancelledError
from twisted.internet.error import ConnectionLost
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import LogEvent, capturedLogs
from twisted.python.failure import Failure
from twisted.web._newclient import ResponseFailed
from twisted.web.client import ResponseDone
from twisted.web.http_headers import Headers

from ollamaproxy.after_send import AfterSend
from ollamaproxy.backends import relay as relay_module
from ollamaproxy.backends.relay import _BodyAnswer
from ollamaproxy.backends.upstream import Upstream
from ollamaproxy.exchange import Meter, StreamSummary
from ollamaproxy.record.summary import TAIL_BYTES
from tests.fakes.chain import HEADER_TIMEOUT, IDLE_TIMEOUT, Chain, Collector
from tests.fakes.ollama import HeldStream
from tests.fakes.turns import Turns

MESSAGES = [{"role": "user", "content": "hi"}]


def chat(model: str, path: str = "/api/chat", **fields: Any) -> bytes:
    return json.dumps({"model": model, "messages": MESSAGES, **fields}).encode()


def held_stream(chain: Chain, path: str = "/api/chat", first: bytes = b"") -> tuple[
    HeldStream, Collector
]:
    """
    Start a streamed answer that the test writes by hand (the response head
    is sent at once); C{first} is written at once too.
    """
    stream = path.startswith("/v1")
    d = chain.request("POST", path, data=chat("hold", stream=True) if stream else chat("hold"))
    held = chain.fake.held[-1]
    if first:
        held.write_raw(first)
    chain.flush()
    return held, chain.stream(chain.result(d))


def test_ndjson_lines_go_out_whole() -> None:
    """
    A complete line goes out as soon as its newline arrives; a line split
    across reads waits for its end and goes out in one piece.
    """
    chain = Chain()
    held, client = held_stream(chain, first=b'{"a":1}\n{"b"')
    assert client.chunks == [b'{"a":1}\n']
    held.write_raw(b":")
    chain.flush()
    assert client.chunks == [b'{"a":1}\n']
    held.write_raw(b'2}\n')
    chain.flush()
    assert client.chunks == [b'{"a":1}\n', b'{"b":2}\n']


def test_ndjson_lines_arriving_together_leave_together() -> None:
    """
    Several lines read at once are written to the client in one write.
    """
    chain = Chain()
    held, client = held_stream(chain)
    held.write_raw(b'{"a":1}\n{"b":2}\n{"c":3}\n')
    chain.flush()
    assert client.chunks == [b'{"a":1}\n{"b":2}\n{"c":3}\n']
    held.finish()
    chain.flush()
    chain.result(client.done)


def test_unfinished_last_line_is_delivered_at_a_clean_end() -> None:
    """
    Bytes after the last newline are not lost when the body ends normally.
    """
    chain = Chain()
    held, client = held_stream(chain, first=b'{"a":1}\n{"tail":true}')
    held.finish()
    chain.flush()
    chain.result(client.done)
    assert client.body == b'{"a":1}\n{"tail":true}'


def test_endless_line_is_not_held(monkeypatch: pytest.MonkeyPatch) -> None:
    """
    A line that never ends is passed on once it is longer than the limit,
    so it cannot hold memory.
    """
    monkeypatch.setattr(relay_module, "MAX_PENDING_LINE", 10)
    chain = Chain()
    held, client = held_stream(chain, first=b"0123456")
    assert client.chunks == []
    held.write_raw(b"789abc")
    chain.flush()
    assert client.body == b"0123456789abc"


def test_sse_passes_as_it_arrives() -> None:
    """
    An SSE body is relayed chunk by chunk, even in the middle of an event.
    """
    chain = Chain()
    held, client = held_stream(chain, "/v1/chat/completions", first=b"data: {")
    assert client.chunks == [b"data: {"]
    held.write_raw(b'"x":1}\n\n')
    chain.flush()
    assert client.body == b'data: {"x":1}\n\n'


def test_ndjson_cut_mid_stream_ends_with_error_line_and_no_clean_end(
    access_events: list[LogEvent],
) -> None:
    """
    When Ollama's connection breaks mid-stream, the client gets the lines so
    far, then an Ollama-style error line, then a connection that ends
    without the final chunk: never what a finished stream looks like.
    """
    chain = Chain()
    held, client = held_stream(chain, first=b'{"a":1}\n{"half')
    held.abort()
    chain.flush()
    failure = chain.failure(client.done)
    assert failure.check(ResponseFailed)
    lines = client.body.split(b"\n")
    assert lines[0] == b'{"a":1}'
    assert "broke off" in json.loads(lines[1])["error"]
    assert lines[2:] == [b""]
    assert [e["outcome"] for e in access_events] == ["upstream_error"]


def test_sse_cut_mid_stream_ends_with_openai_error_event() -> None:
    """
    On /v1, the cut is announced as an SSE event carrying OpenAI's error
    shape, after the events so far, and the stream does not end cleanly.
    """
    chain = Chain()
    held, client = held_stream(chain, "/v1/chat/completions", first=b'data: {"x":1}\n\n')
    held.abort()
    chain.flush()
    assert chain.failure(client.done).check(ResponseFailed)
    first, error, rest = client.body.split(b"\n\n")
    assert first == b'data: {"x":1}'
    assert error.startswith(b"data: ")
    assert json.loads(error[len(b"data: "):])["error"]["type"] == "api_error"
    assert rest == b""


def test_sse_cut_mid_event_starts_a_new_event_for_the_error() -> None:
    """
    An error after half an event is separated from it, so it stands as an
    event of its own.
    """
    chain = Chain()
    held, client = held_stream(chain, "/v1/chat/completions", first=b'data: {"x"')
    held.abort()
    chain.flush()
    chain.failure(client.done)
    assert client.body.startswith(b'data: {"x"\n\ndata: {"error": ')


def test_json_cut_mid_body_ends_without_clean_end() -> None:
    """
    A non-streamed body that breaks off is not completed or decorated: the
    client sees a failed body.
    """
    chain = Chain()
    d = chain.request("POST", "/api/chat", data=chat("slowhead"))
    held = chain.fake.held[-1]
    held.send_head(content_type=b"application/json; charset=utf-8")
    held.write_raw(b'{"model":')
    chain.flush()
    client = chain.stream(chain.result(d))
    held.abort()
    chain.flush()
    assert chain.failure(client.done).check(ResponseFailed)
    assert client.body == b'{"model":'


@pytest.mark.parametrize(
    ("code", "body"),
    [
        (400, b'{"error":"invalid options"}'),
        (404, b'{"error":"model \'x\' not found"}'),
        (500, b'{"error":"llama runner process has terminated"}'),
        (503, b'{"error":"server busy, please try again.  maximum pending requests exceeded"}'),
    ],
)
def test_ollama_errors_pass_through(code: int, body: bytes) -> None:
    """
    Ollama's own error answers reach the client with their status, type
    and body unchanged, and count as completed requests.
    """
    chain = Chain()
    d = chain.request("POST", "/api/chat", data=chat("slowhead"))
    held = chain.fake.held[-1]
    held.send_head(code, b"application/json; charset=utf-8")
    held.write_raw(body)
    held.finish()
    chain.flush()
    response = chain.result(d)
    assert response.code == code
    assert response.headers.getRawHeaders(b"content-type") == [b"application/json; charset=utf-8"]
    assert chain.body(response) == body


def test_ollama_error_line_passes_through() -> None:
    """
    Ollama's own mid-stream error line reaches the client as Ollama sent it.
    """
    chain = Chain()
    response = chain.respond("POST", "/api/chat", data=chat("broken"))
    lines = chain.body(response).splitlines()
    assert json.loads(lines[-1]) == {"error": "an error was encountered while running the model"}
    assert all(b'"done":true' not in line for line in lines)


def test_idle_upstream_is_cut_with_an_error_line(access_events: list[LogEvent]) -> None:
    """
    Ollama silent for longer than the idle timeout, in the middle of a
    body: the client is told and the upstream connection is closed.
    """
    chain = Chain()
    held, client = held_stream(chain, first=b'{"a":1}\n')
    chain.clock.advance(IDLE_TIMEOUT - 1)
    held.write_raw(b'{"b":2}\n')
    chain.flush()
    chain.clock.advance(IDLE_TIMEOUT - 1)
    chain.flush()
    assert not client.done.called
    chain.clock.advance(1)
    chain.flush()
    assert chain.failure(client.done).check(ResponseFailed)
    error = json.loads(client.body.splitlines()[-1])["error"]
    assert error == f"Ollama sent nothing for {IDLE_TIMEOUT:g} seconds"
    assert chain.fake.connections_lost == 1
    assert chain.clock.getDelayedCalls() == []
    assert [e["outcome"] for e in access_events] == ["upstream_error"]


def test_no_response_head_in_time_is_504(access_events: list[LogEvent]) -> None:
    """
    Ollama that sends no response head within the header timeout: 504 in
    Ollama's error shape, and the upstream request is dropped.
    """
    chain = Chain()
    d = chain.request("POST", "/api/chat", data=chat("slowhead"))
    chain.clock.advance(HEADER_TIMEOUT - 1)
    chain.flush()
    assert chain.pending(d)
    chain.clock.advance(1)
    chain.flush()
    response = chain.result(d)
    assert response.code == 504
    assert json.loads(chain.body(response)) == {
        "error": f"Ollama sent no response within {HEADER_TIMEOUT:g} seconds"
    }
    assert chain.fake.connections_lost == 1
    assert chain.clock.getDelayedCalls() == []
    assert [e["outcome"] for e in access_events] == ["timeout"]


def test_client_gone_mid_stream_closes_upstream(access_events: list[LogEvent]) -> None:
    """
    A client that hangs up mid-stream makes the proxy close Ollama's
    connection (so generation stops), leaving no timer behind.
    """
    chain = Chain()
    held, client = held_stream(chain, first=b'{"a":1}\n')
    client.disconnect()
    chain.flush()
    chain.failure(client.done)
    assert held.disconnected.called
    assert chain.fake.connections_lost == 1
    assert chain.clock.getDelayedCalls() == []
    assert [e["outcome"] for e in access_events] == ["client_disconnected"]


def test_client_gone_before_response_head_closes_upstream() -> None:
    """
    A client that hangs up while Ollama has not answered yet (a model is
    loading) also closes the upstream connection; the backend, which did
    nothing wrong, stays healthy.
    """
    chain = Chain()
    d = chain.request("POST", "/api/chat", data=chat("slowhead"))
    d.cancel()
    chain.flush()
    chain.failure(d)
    assert chain.fake.held[-1].disconnected.called
    assert chain.clock.getDelayedCalls() == []
    assert chain.backends[0].healthy


def test_large_request_body_is_sent_in_pieces() -> None:
    """
    A body larger than one piece (a model upload) reaches Ollama whole,
    through the spooled-body producer.
    """
    blob = bytes(range(256)) * 1200
    digest = hashlib.sha256(blob).hexdigest()
    chain = Chain()
    response = chain.respond("POST", f"/api/blobs/sha256:{digest}", data=blob)
    assert response.code == 201
    received = chain.fake.received[-1]
    assert (received.body_length, received.body_sha256) == (len(blob), digest)


class _Request:
    """
    The parts of a request the body relay uses.
    """

    def __init__(self) -> None:
        self.channel = object()
        self.written: list[bytes] = []
        self.producer: object = None
        self.finished = False

    def write(self, data: bytes) -> None:
        self.written.append(data)

    def finish(self) -> None:
        self.finished = True

    def registerProducer(self, producer: object, streaming: bool) -> None:
        assert streaming
        self.producer = producer

    def unregisterProducer(self) -> None:
        self.producer = None


class _Response:
    headers = Headers({b"content-type": [b"application/x-ndjson"]})


def test_client_backpressure_reaches_ollama_socket() -> None:
    """
    The relay is registered as a push producer on the client's request;
    pausing it pauses Ollama's socket and the idle timer (a slow reader is
    not an idle Ollama), resuming resumes both, stopping closes the socket.
    """
    clock = Clock()
    request = _Request()
    body = _BodyAnswer(request, _Response(), _upstream(clock), openai=False)  # type: ignore[arg-type]
    socket = StringTransport()
    body.makeConnection(socket)
    assert request.producer is body
    body.pauseProducing()
    assert socket.producerState == "paused"
    assert clock.getDelayedCalls() == []
    body.resumeProducing()
    assert socket.producerState == "producing"
    assert len(clock.getDelayedCalls()) == 1
    body.stopProducing()
    assert socket.producerState == "stopped"
    assert clock.getDelayedCalls() == []


def test_stream_summary_is_logged(access_events: list[LogEvent]) -> None:
    """
    A finished stream is summarised from its final object, in an event of
    its own, and the tokens are on the request's record.
    """
    chain = Chain()
    with capturedLogs() as events:
        response = chain.respond(
            "POST", "/api/chat", data=chat("llama3.2", options={"num_predict": 3})
        )
        chain.body(response)
    streams = [e for e in events if e.get("log_namespace") == "ollamaproxy.stream"]
    assert [(e["model"], e["completion_tokens"], e["done_reason"]) for e in streams] == [
        ("llama3.2", 3, "length")
    ]


def test_body_samples_are_logged_truncated_and_redacted() -> None:
    """
    With body logging on, the start of the request and of the response is
    logged after the exchange, credentials blanked.
    """
    chain = Chain(body_sample_bytes=40)
    body = b'{"api_key": "hunter2", "model": "llama3.2", "messages": []}'
    with capturedLogs() as events:
        chain.body(chain.respond("POST", "/api/chat", data=body))
    [logged] = [e for e in events if e.get("log_namespace") == "ollamaproxy.bodies"]
    assert logged["request_body"] == '{"api_key": "[redacted]", "model": "llama3.'
    assert logged["response_body"].startswith('{"model":"llama3.2"')
    assert len(logged["response_body"]) == 40


class _Typed:
    def __init__(self, content_type: bytes) -> None:
        self.headers = Headers({b"content-type": [content_type]})


def _upstream(clock: Clock) -> Upstream:
    """
    The Ollama a relay reads from, on C{clock}.
    """
    return Upstream(agent=None, base=b"", clock=clock,  # type: ignore[arg-type]
                    header_timeout=1, idle_timeout=5)


def _relay(content_type: bytes, meter: Meter, openai: bool = False) -> _BodyAnswer:
    """
    A relay of a body of C{content_type} to a client that takes all, its
    tokens counted into C{meter}.
    """
    body = _BodyAnswer(_Request(), _Typed(content_type), _upstream(Clock()),  # type: ignore[arg-type]
                       openai=openai, meter=meter)
    body.makeConnection(StringTransport())
    return body


def _whole_answer(clock: Clock) -> tuple[_Request, _BodyAnswer]:
    """
    A relay of a JSON answer that has ended whole, its end waiting on
    C{clock} to be sent; and its client's request.
    """
    request = _Request()
    body = _BodyAnswer(request, _Typed(b"application/json"),  # type: ignore[arg-type]
                       _upstream(clock), openai=False, after_send=AfterSend(clock))
    body.makeConnection(StringTransport())
    body.dataReceived(b'{"done":true}')
    body.connectionLost(Failure(ResponseDone()))
    return request, body


def test_a_whole_answer_ends_the_response_before_the_trip_goes_on() -> None:
    """
    Given the calls that wait for a send, a body that ends whole ends the
    client's response in the turn that relays its last bytes, and the relay
    is done only two turns later, after the poll that sends them: what the
    request does next (its slot freed, its tokens settled, its record)
    never delays its answer.  A body cut short is done at once.  Without,
    the response is left open for more (several backends' bodies in one
    answer) and the relay is done at once.
    """
    clock = Turns()
    request, body = _whole_answer(clock)
    assert (request.written, request.finished, body.done.called) == (
        [b'{"done":true}'], True, False)
    clock.turn()
    assert not body.done.called
    clock.turn()
    assert body.done.called

    cut = _BodyAnswer(_Request(), _Typed(b"application/x-ndjson"),
                      _upstream(clock), openai=False, after_send=AfterSend(clock))
    cut.makeConnection(StringTransport())
    cut.connectionLost(Failure(ResponseFailed([Failure(ConnectionLost())])))
    assert cut.done.called
    cut.done.addErrback(lambda f: f.trap(relay_module.BodyCut))

    open_request = _Request()
    more = _BodyAnswer(open_request, _Typed(b"application/x-ndjson"),
                       _upstream(clock), openai=False)
    more.makeConnection(StringTransport())
    more.connectionLost(Failure(ResponseDone()))
    assert (open_request.finished, more.done.called) == (False, True)


def test_a_whole_answer_cancelled_before_it_is_sent_stays_cancelled() -> None:
    """
    A relay whose body ended whole, cancelled while its end waits to be
    sent (the proxy stopped waiting), fails with the cancellation, and the
    call made once the end has been sent changes nothing: no second result,
    no error logged.
    """
    clock = Turns()
    request, body = _whole_answer(clock)
    failures: list[Failure] = []
    body.done.addErrback(failures.append)
    body.done.cancel()
    clock.turn()
    clock.turn()
    assert request.finished and clock.calls == []
    [failure] = failures
    assert failure.check(CancelledError)


def test_pieces_are_metered_as_they_stream_and_stay_when_cancelled() -> None:
    """
    The relay counts each NDJSON line (lines arriving together each count)
    or SSE event into the meter as it relays it; a relay stopped mid-stream
    (the client left) leaves its count in the meter, with no final figures.
    """
    meter = Meter()
    body = _relay(b"application/x-ndjson", meter)
    body.dataReceived(b'{"response":"a"}\n{"response":"b"}\n{"response":"c"}\n')
    body.dataReceived(b'{"response":"d"}\n{"resp')
    assert meter.output == 4
    body.done.cancel()
    body.done.addErrback(lambda _: None)
    assert (meter.output, meter.final) == (4, None)
    events = Meter()
    sse = _relay(b"text/event-stream", events, openai=True)
    sse.dataReceived(b'data: {"a":1}\n\ndata: {"b":2}\n\ndata: {"c"')
    sse.dataReceived(b":3}\n\n")
    assert events.output == 3


def test_long_answer_is_summarised_from_many_pieces_in_bounded_memory() -> None:
    """
    A non-streamed answer of about 400 kB in a hundred pieces is summarised
    from its final object's counts; what the relay keeps of it stays within
    twice the bounded tail.
    """
    body = _relay(b"application/json; charset=utf-8", Meter())
    body.dataReceived(b'{"model":"llama3.2","created_at":"x","response":"')
    for _ in range(100):
        body.dataReceived(b"tok " * 1000)
        assert len(body._tail) <= 2 * TAIL_BYTES
    body.dataReceived(b'","done":true,"done_reason":"stop","prompt_eval_count":26,'
                      b'"eval_count":1000,"eval_duration":1000000000}')
    assert body.summary() == StreamSummary(
        "llama3.2", "stop", prompt_tokens=26, completion_tokens=1000, tokens_per_second=1000.0,
        eval_seconds=1.0)


def test_a_streamed_final_line_in_many_pieces_is_summarised() -> None:
    """
    A stream whose final line spans more than two pieces (C{/api/generate}'s
    C{context} after a long prompt) is summarised from that whole line:
    Ollama's own counts, not an estimate.
    """
    body = _relay(b"application/x-ndjson", Meter())
    body.dataReceived(b'{"model":"llama3.2","response":"hi","done":false}\n')
    body.dataReceived(b'{"model":"llama3.2","response":"","done":true,"done_reason":"stop",'
                      b'"context":[')
    for _ in range(20):
        body.dataReceived(b"1234," * 1000)
    body.dataReceived(b'1],"prompt_eval_count":26,"eval_count":2,"eval_duration":1000000000}\n')
    assert body.summary() == StreamSummary(
        "llama3.2", "stop", prompt_tokens=26, completion_tokens=2, tokens_per_second=2.0,
        eval_seconds=1.0)
