"""uvicorn's httptools protocol with the limits it lacks: on a request's head, and on its time.

uvicorn's httptools protocol keeps every header however large (the parser joins a header's
pieces until it ends: one 100 MB header cost 200 MB of memory) and waits as long as a client
likes for a request to arrive. This subclass, served with ``--http app.protocol:HttpProtocol``
(``make run``, the image and the manifests pass it), adds:

* **431** once a request's head (request line and headers) passes ``MAX_HEAD_BYTES``, or it
  has more than ``MAX_HEADERS`` headers. The parser is fed at most the head's allowance, so
  memory stays bounded whatever the client sends. A chunk of a chunked body whose size line,
  or the trailers (headers after the body), pass ``MAX_HEAD_BYTES`` end the connection.
* **408** for a head that has not arrived ``BODY_TIMEOUT_SECONDS`` after its first byte.
  What is left of that time is the route's to read the body in (``ARRIVAL_DEADLINE`` in the
  scope's extensions; the submission route answers ``408`` past it); the protocol makes sure
  the connection then ends, and stops waiting for the rest of a body that a route answered
  without reading.
* A new connection that sends nothing is closed after uvicorn's keep-alive timeout, as an
  idle one between requests already is.

A refusal is never sent in the middle of another answer: with requests pipelined, it waits
until the ones before it have been answered. (A head's bytes are counted from the read it
starts in; one that starts in the same read as the end of the request before it can pass the
limit by what that read held after it: at most one read, 256 KiB.)

Subclassed rather than switched to uvicorn's h11 protocol, which has a size limit on heads
(though not on their number, and answers 400 rather than 431): h11 parses in Python, and side
by side on one core it served 37% fewer status requests and 21% fewer submissions than this
class. This class costs about 2% of the status rate against plain httptools (py-spy puts its
own code under 1% of the samples), nothing measurable on submissions.
"""

import asyncio
import logging
from collections.abc import Callable
from typing import Any, ClassVar

import orjson
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

MAX_HEAD_BYTES = 64 * 1024
MAX_HEADERS = 100
# After refusing a request, how long to read and drop what the client is still sending before
# closing: closing a socket with unread data resets the connection, and the client may lose
# the answer it was sent.
LINGER_SECONDS = 2.0
# In a request scope's extensions: {"at": the event loop time by which its body must be in}.
ARRIVAL_DEADLINE = "expand_reduce.arrival_deadline"

logger = logging.getLogger("app.protocol")


class HttpProtocol(HttpToolsProtocol):
    """One HTTP/1.1 connection, with bounded request heads and a deadline on each request."""

    # Set once from the settings by ``create_app``: uvicorn makes the protocol, not the app.
    arrival_timeout: ClassVar[float] = 30.0
    on_refused: ClassVar[Callable[[int], None] | None] = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._reading_head = True  # waiting for, or reading, a request's head
        self._head_bytes = 0  # received while reading the current head; 0 once it is in
        self._framing = 0  # received in this chunk that was not body: its size line, trailers
        self._open = False  # a request has begun and not yet arrived whole
        self._deadline: asyncio.TimerHandle | None = None
        self._refused = False
        self._owed: tuple[int, str] | None = None  # a refusal waiting for earlier answers
        self._close_after_answer = False  # out of time while the app had the request

    @classmethod
    def configure(cls, arrival_timeout: float, on_refused: Callable[[int], None] | None) -> None:
        """Take the request deadline from the settings, and a counter of refused requests."""
        cls.arrival_timeout = arrival_timeout
        cls.on_refused = on_refused

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        """Give a new connection as long to send its first byte as an idle one gets."""
        super().connection_made(transport)
        self._start_idle_timer()

    def data_received(self, data: bytes) -> None:
        """Feed the parser, never more of a head than its allowance; arm the deadline.

        The parser's callbacks are overridden only where they must be: each override is a
        Python call per request (or per header) on the hottest path.
        """
        if self._refused:
            return  # what the client still sends is dropped
        if self._reading_head:
            room = MAX_HEAD_BYTES - self._head_bytes
            if len(data) > room:
                super().data_received(data[:room])
                if self._reading_head and not self._refused:
                    self._refuse(431, f"The request's headers exceed {MAX_HEAD_BYTES} bytes")
                if self._refused or self.transport.is_closing():
                    return
                data = data[room:]
            else:
                self._head_bytes += len(data)
        else:
            self._framing += len(data)  # on_body takes back what was body
        super().data_received(data)
        if self._refused:
            return
        if not self._reading_head and self._framing > MAX_HEAD_BYTES:
            self._drop(f"the request's chunk sizes and trailers exceed {MAX_HEAD_BYTES} bytes")
            return
        self._arm_timers()

    def _arm_timers(self) -> None:
        """A request begun has a deadline; a connection with none is idle, and timed as such."""
        # Part of a head, or a head and part of its body. Most requests arrive whole in one
        # read and never pay for a timer.
        if self._open:
            if self._deadline is None:
                self._deadline = self.loop.call_later(self.arrival_timeout, self._too_slow)
        elif self.timeout_keep_alive_task is None and not self.pipeline and self._answered_all():
            # Bytes that began no request (blank lines between requests): uvicorn stopped the
            # idle timer on them all the same. Idle the connection still is.
            self._start_idle_timer()

    def _start_idle_timer(self) -> None:
        """Start the keep-alive timer, as uvicorn does after an answer."""
        self.timeout_keep_alive_task = self.loop.call_later(
            self.timeout_keep_alive, self.timeout_keep_alive_handler
        )

    def on_message_begin(self) -> None:
        """A request begins."""
        self._open = True
        super().on_message_begin()

    def on_headers_complete(self) -> None:
        """The head is in: refuse it if it has too many headers, else hand it to the app.

        Counted once the head is in, not header by header: the head's size limit already
        bounds how many there can be (a few thousand), and so what they cost until then.
        """
        self._reading_head = False
        self._head_bytes = 0
        self._framing = 0
        if self._refused:
            return  # a request pipelined behind a refused one: the connection is ending
        if len(self.headers) > MAX_HEADERS:
            self._refuse(431, f"The request has more than {MAX_HEADERS} headers")
            return
        # The body's share of the request's time: what is left of it. (A head that came in one
        # read started no timer; its body gets the whole time, from the route, as good as now.)
        if self._deadline is not None:
            self.scope["extensions"] = {ARRIVAL_DEADLINE: {"at": self._deadline.when()}}
        super().on_headers_complete()
        cycle = self.cycle
        if cycle is not None and not cycle.keep_alive:
            # The client asked to close after the answer (or speaks HTTP/1.0): uvicorn will
            # close at once, resetting a client still sending its body. Close gently instead.
            cycle.transport = _GentleClose(self)  # type: ignore[assignment]

    def on_body(self, body: bytes) -> None:
        """Pass body bytes on, unless the request was refused (no app is reading them)."""
        self._framing -= len(body)
        if not self._refused:
            super().on_body(body)

    def on_chunk_complete(self) -> None:
        """A chunk is in (the last one with its trailers): the next one's framing counts anew.

        So the limit is on one chunk's size line and the trailers, never on a body's total of
        them: a large body in small chunks has a lot of framing, all of it legitimate.
        """
        self._framing = 0

    def on_message_complete(self) -> None:
        """The request arrived whole: its deadline is met, and the next head may begin."""
        self._reading_head = True
        self._open = False
        self._cancel_deadline()
        if not self._refused:
            super().on_message_complete()

    def on_response_complete(self) -> None:
        """An answer went out: send a refusal kept waiting for it, or end the connection.

        The refusal, if this was the last answer owed before it; the end, if this request ran
        out of time while the app had it.
        """
        super().on_response_complete()
        if self._owed is not None and not self.pipeline and self._answered_all():
            status, message = self._owed
            self._owed = None
            self._send_refusal(status, message)
        elif self._close_after_answer and not self.transport.is_closing():
            self._linger_then_close()

    def connection_lost(self, exc: Exception | None) -> None:
        """Drop the deadline with the connection."""
        self._cancel_deadline()
        super().connection_lost(exc)

    def _cancel_deadline(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _peer(self) -> str:
        return f"{self.client[0]}:{self.client[1]}" if self.client else "a client"

    def _answered_all(self) -> bool:
        """Whether every request before this point has had its answer sent."""
        return self.cycle is None or self.cycle.response_complete

    def _too_slow(self) -> None:
        """The request did not arrive in time."""
        self._deadline = None
        if self.transport.is_closing() or self._refused:
            return
        cycle = self.cycle
        if self._reading_head:
            self._refuse(
                408, f"The request's headers did not arrive within {self.arrival_timeout:g} s"
            )
        elif cycle is not None and cycle.response_complete:
            # Answered (a route that takes no body, an early 413, the route's own 408) while
            # the body is still coming: the rest of it is not worth waiting for.
            self._linger_then_close()
        elif cycle is not None:
            # The app has the request; the route reading the body answers 408. Either way
            # this connection serves no further request.
            self._close_after_answer = True

    def _drop(self, reason: str) -> None:
        """End the connection without an answer: its request was answered, or is being.

        Trailers come after the body, when the app may already have answered the request; a
        second answer would be one nobody asked for. The app, if still at it, sees the
        client disconnect.
        """
        self._refused = True
        logger.warning("closed the connection from %s: %s", self._peer(), reason)
        self.transport.close()

    def _refuse(self, status: int, message: str) -> None:
        """Refuse the request being read: no app sees it, and the connection ends.

        The answer goes out at once, or, if requests before it are still being answered,
        after the last of them.
        """
        self._refused = True
        logger.warning("refused a request from %s with %d: %s", self._peer(), status, message)
        count = type(self).on_refused  # a plain function: not bound to this connection
        if count is not None:
            count(status)
        if self.pipeline or not self._answered_all():
            self._owed = (status, message)
        else:
            self._send_refusal(status, message)

    def _send_refusal(self, status: int, message: str) -> None:
        """Write the answer, then close (after a short linger), as the app's answers look."""
        if self.transport.is_closing():
            return  # the answer before it closed the connection
        body = orjson.dumps({"detail": message})
        content = [STATUS_LINE[status]]
        for name, value in self.server_state.default_headers:
            content.extend([name, b": ", value, b"\r\n"])
        content.extend(
            [
                b"content-type: application/json\r\n",
                b"content-length: %d\r\n" % len(body),
                b"connection: close\r\n\r\n",
                body,
            ]
        )
        self.transport.write(b"".join(content))
        self._linger_then_close()

    def close_gently(self) -> None:
        """Close now, or, if the request is still arriving, after a linger."""
        if self._open and not self._refused:
            self._linger_then_close()
        elif not self._refused:
            self.transport.close()

    def _linger_then_close(self) -> None:
        """Close after what was written, reading and dropping what the client still sends.

        Closed at once, a socket with unread data resets the connection, and the client may
        never read the answer it was sent (nginx's "lingering close").
        """
        self._refused = True  # from now on, input is dropped
        if self.transport.can_write_eof():
            self.transport.write_eof()
            self.loop.call_later(LINGER_SECONDS, self.transport.close)
        else:
            self.transport.close()


class _GentleClose:
    """A connection's transport, as one request's answer sees it: closing it lingers.

    Only for requests that asked to close, so the answers of the others go straight to the
    transport.
    """

    def __init__(self, protocol: HttpProtocol) -> None:
        self._protocol = protocol
        self._transport = protocol.transport

    def close(self) -> None:
        """Close, without resetting a client still sending."""
        self._protocol.close_gently()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)
