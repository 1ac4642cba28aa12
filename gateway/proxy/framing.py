"""How an upstream answer is read: llhttp's callbacks fill in an Answer, and the rules of RFC 9112 6.3.

llhttp (Node.js's parser, through httptools) decides where an answer's head and body end and
refuses what is ambiguous (two Content-Lengths, a non-digit length, a bad chunk size). The
rules it leaves to its caller are here: a status outside 100-599 and any 101 are refused, an
answer to HEAD, a 204 and a 304 have no body, a coding that is not chunked runs to the close,
and a byte after the end of an answer marks its connection, which is then never pooled.
"""

from __future__ import annotations

from collections import deque

import httptools

MAX_HEADERS = 200
MAX_INTERIM = 20  # 1xx answers (100 Continue, 103 Early Hints) skipped before the real one
NO_BODY_STATUSES = frozenset({204, 304})
SWITCHING = "a 101 (Switching Protocols) answer is never relayed"


class IncompleteBody(OSError):
    """The answer is malformed, or its body ended before its framing said it would."""


class ResponseHeaders:
    """A response's headers in arrival order, repeats kept apart, looked up without regard to case."""

    __slots__ = ("_first", "_items")

    def __init__(self, items: list[tuple[str, str]]) -> None:
        self._items = items
        self._first: dict[str, str] = {}
        for name, value in items:
            self._first.setdefault(name.lower(), value)

    def get(self, name: str, default: str = "") -> str:
        """The first value of a header, or `default`."""
        return self._first.get(name.lower(), default)

    def iteritems(self) -> list[tuple[str, str]]:
        """Every (name, value), in order."""
        return self._items

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name.lower() in self._first


class AnswerReader:
    """The parser's protocol for one connection: `feed` gives it bytes, its callbacks fill in `answer`."""

    __slots__ = ()
    answer: Answer
    parser: httptools.HttpResponseParser | None

    def feed(self, data: bytes) -> None:
        """Give bytes read from the socket to the parser; one it refuses makes a malformed answer."""
        answer = self.answer
        try:
            self.parser.feed_data(data)  # type: ignore[union-attr]  # set by exchange
        except httptools.HttpParserUpgrade:
            raise IncompleteBody(None, SWITCHING) from None
        except httptools.HttpParserError as exc:
            if answer.complete:
                answer.extra = True  # the answer was whole; what follows it is not ours to parse
            elif answer.head_done:
                answer.bad_body = f"malformed body: {exc}"  # raised once the good part is read
            else:
                raise IncompleteBody(None, f"malformed answer: {exc}") from None
        if answer.bad_head:
            raise IncompleteBody(None, answer.bad_head)

    # -- llhttp's callbacks, for the current answer ------------------------------------------

    def on_message_begin(self) -> None:
        answer = self.answer
        if not answer.waiting:
            answer.extra = True  # a second answer in one: bytes nobody asked for
        answer.waiting = False

    def on_header(self, name: bytes, value: bytes) -> None:
        headers = self.answer.headers
        if len(headers) >= MAX_HEADERS:
            self.answer.bad_head = "the answer has too many headers"
        headers.append((name.decode("latin-1"), value.decode("latin-1")))

    def on_headers_complete(self) -> None:
        answer, parser = self.answer, self.parser
        status = parser.get_status_code()  # type: ignore[union-attr]  # the parser calls us
        if answer.head_done:
            return  # a second answer's head: already marked extra
        if not 100 <= status <= 599:
            answer.bad_head = f"the answer's status {status:03d} is not an HTTP status"
        elif status == 101:
            answer.bad_head = SWITCHING
        elif status < 200:
            answer.interim += 1  # 100 Continue, 103 Early Hints: the real answer follows
            if answer.interim > MAX_INTERIM:
                answer.bad_head = f"more than {MAX_INTERIM} interim (1xx) answers"
            answer.headers = []
            answer.waiting = True
            return
        answer.status, answer.head_done = status, True
        answer.keep_alive = parser.should_keep_alive()  # type: ignore[union-attr]
        if answer.to_head or status in NO_BODY_STATUSES:
            answer.no_body = answer.complete = True
            if answer.to_head or status == 304:
                # The head describes a body that is not sent. A careless server sends it anyway,
                # and perhaps after the head, too late for the check before reuse to see it: the
                # next request on the connection would read it as its own answer. Never pooled.
                answer.keep_alive = False
        else:
            answer.frame()

    def on_body(self, data: bytes) -> None:
        answer = self.answer
        if answer.complete or answer.no_body or not answer.head_done:
            answer.extra = True  # a body where none may be: never pool this connection
            return
        answer.body.append(data)

    def on_message_complete(self) -> None:
        answer = self.answer
        if answer.head_done and not answer.no_body:
            answer.complete = True


class Answer:
    """What the parser has read of one answer so far."""

    __slots__ = (
        "bad_body",
        "bad_head",
        "body",
        "chunked",
        "complete",
        "delivered",
        "extra",
        "head_done",
        "headers",
        "interim",
        "keep_alive",
        "length",
        "no_body",
        "status",
        "to_head",
        "waiting",
    )

    def __init__(self, to_head: bool) -> None:
        self.to_head = to_head  # an answer to HEAD has no body, whatever its headers say
        self.headers: list[tuple[str, str]] = []
        self.body: deque[bytes] = deque()
        self.status = 0
        self.head_done = self.complete = self.extra = self.keep_alive = self.no_body = self.chunked = False
        self.waiting = True  # for an answer to begin: at the start, and after each 1xx
        self.interim = 0
        self.bad_head = self.bad_body = ""  # why llhttp or our rules refused the head or the body
        self.length: int | None = None  # the Content-Length, when that frames the body
        self.delivered = 0  # body bytes handed on by read1

    def frame(self) -> None:
        """Note how the body ends, by RFC 9112 6.3; llhttp has already refused every ambiguous head."""
        coding = length = ""
        for name, value in self.headers:
            lowered = name.lower()
            if lowered == "transfer-encoding":
                coding = value
            elif lowered == "content-length":
                length = value
        if coding:
            self.chunked = coding.rsplit(",", 1)[-1].strip().lower() == "chunked"
            if length and not self.chunked:
                self.bad_head = "a Content-Length beside a Transfer-Encoding that is not chunked"
        elif length:
            self.length = int(length)
        self.keep_alive = self.keep_alive and (self.chunked or self.length is not None)  # else it runs to the close
