"""The proxy's lean WSGI response: what goes out, and that its callbacks run exactly once."""

from __future__ import annotations

import pytest
from werkzeug.test import create_environ, run_wsgi_app

from gateway.proxy.relay import Relay, status_line


class Body:
    """A streamed body that records when it is closed."""

    def __init__(self, chunks: list[bytes], events: list[str]) -> None:
        self.chunks, self.events = chunks, events

    def __iter__(self):
        yield from self.chunks

    def close(self) -> None:
        self.events.append("body closed")


def test_status_lines_read_as_werkzeug_writes_them():
    assert status_line(200) == "200 OK"
    assert status_line(404) == "404 NOT FOUND"
    assert status_line(599) == "599 UNKNOWN"


def test_a_whole_body_goes_out_and_runs_its_callbacks_once():
    events: list[str] = []
    relay = Relay(201, [("Content-Type", "application/json"), ("Content-Length", "8")], b'{"a": 1}', "B1")
    relay.call_on_close(lambda: events.append("first"))
    relay.call_on_close(lambda: events.append("second"))
    app_iter, status, headers = run_wsgi_app(relay, create_environ("/api/x"))
    assert status == "201 CREATED"
    assert headers["Content-Length"] == "8"
    assert b"".join(app_iter) == b'{"a": 1}'
    app_iter.close()
    relay.close()  # a second close does nothing
    assert events == ["first", "second"]


def test_a_streamed_body_is_closed_before_the_callbacks():
    events: list[str] = []
    relay = Relay(200, [("Content-Type", "text/event-stream")], Body([b"a", b"b"], events), "B2")
    relay.call_on_close(lambda: events.append("callback"))
    app_iter, _, headers = run_wsgi_app(relay, create_environ("/api/x"))
    assert "Content-Length" not in headers
    assert b"".join(app_iter) == b"ab"
    app_iter.close()
    assert events == ["body closed", "callback"]


def test_a_failing_callback_does_not_stop_the_ones_after_it():
    events: list[str] = []

    def broken() -> None:
        raise RuntimeError("metrics went wrong")

    relay = Relay(200, [], Body([b"x"], events), "B1")
    relay.call_on_close(broken)
    relay.call_on_close(lambda: events.append("lease released"))
    with pytest.raises(RuntimeError, match="metrics went wrong"):
        relay.close()
    assert events == ["body closed", "lease released"]


@pytest.mark.parametrize("streamed", [False, True])
def test_as_a_flask_response_it_keeps_status_headers_body_and_callbacks(streamed):
    events: list[str] = []
    body = Body([b"he", b"llo"], events) if streamed else b"hello"
    relay = Relay(202, [("X-Backend-Server", "B3"), ("Set-Cookie", "a=1"), ("Set-Cookie", "b=2")], body, "B3")
    relay.call_on_close(lambda: events.append("callback"))
    response = relay.to_response()
    assert response.status_code == 202
    assert response.headers.getlist("Set-Cookie") == ["a=1", "b=2"]
    assert response.is_streamed is streamed
    app_iter, _, _ = run_wsgi_app(response, create_environ("/api/x"))
    assert b"".join(app_iter) == b"hello"
    app_iter.close()
    assert events == (["body closed", "callback"] if streamed else ["callback"])


def test_when_the_server_refuses_a_header_the_callbacks_still_run():
    events: list[str] = []
    relay = Relay(200, [("X-Split", "one\rtwo")], Body([b"x"], events), "B1")
    relay.call_on_close(lambda: events.append("lease released"))

    def refusing_start_response(status, headers, exc_info=None):
        raise ValueError("invalid header value")

    with pytest.raises(ValueError, match="invalid header value"):
        relay(create_environ("/api/x"), refusing_start_response)
    assert events == ["body closed", "lease released"]


def test_a_flask_response_werkzeug_refuses_still_runs_the_callbacks():
    events: list[str] = []
    relay = Relay(200, [("X-Split", "one\ntwo")], b"x", "B1")
    relay.call_on_close(lambda: events.append("lease released"))
    with pytest.raises(ValueError):
        relay.to_response()
    assert events == ["lease released"]
