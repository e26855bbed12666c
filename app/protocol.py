"""uvicorn's httptools protocol with the limits it lacks: on a request's head, and on its time.

uvicorn's httptools protocol keeps every header however large (the parser joins a header's
pieces until it ends: one 100 MB header cost 200 MB of memory) and waits as long as a client
likes for a request to arrive. This subclass, served with ``--http app.protocol:HttpProtocol``
(``make run``, the image and the manifests pass it), adds:

* **431** once a request's head (request line and headers) passes ``MAX_HEAD_BYTES``, or it
  has more than ``MAX_HEADERS`` headers. The parser is fed at most the head's allowance, so
  memory stays bounded whatever the client sends.
* **408** for a head that has not arrived ``BODY_TIMEOUT_SECONDS`` after its first byte.
  A body that does not arrive in that time is the route's to answer (``408`` from the
  submission route, which reads bodies); the protocol makes sure the connection then ends,
  and stops waiting for the rest of a body that a route answered without reading.

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
        self._deadline: asyncio.TimerHandle | None = None
        self._refused = False

    @classmethod
    def configure(cls, arrival_timeout: float, on_refused: Callable[[int], None] | None) -> None:
        """Take the request deadline from the settings, and a counter of refused requests."""
        cls.arrival_timeout = arrival_timeout
        cls.on_refused = on_refused

    def data_received(self, data: bytes) -> None:
        """Feed the parser, never more of a head than its allowance; arm the deadline.

        The parser's callbacks are overridden only where they must be: each override is a
        Python call per request (or per header) on the hottest path.
        """
        if self._refused:
            return  # lingering: what the client still sends is dropped
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
        super().data_received(data)
        # A request has begun and not yet arrived whole: part of a head, or a head and part of
        # its body. Most requests arrive whole in one read and never pay for a timer.
        if (
            self._deadline is None
            and (self._head_bytes if self._reading_head else True)
            and not self._refused
        ):
            self._deadline = self.loop.call_later(self.arrival_timeout, self._too_slow)

    def on_headers_complete(self) -> None:
        """The head is in: refuse it if it has too many headers, else hand it to the app.

        Counted once the head is in, not header by header: the head's size limit already
        bounds how many there can be (a few thousand), and so what they cost until then.
        """
        self._reading_head = False
        self._head_bytes = 0
        if self._refused:
            return  # a request pipelined behind a refused one: the connection is ending
        if len(self.headers) > MAX_HEADERS:
            self._refuse(431, f"The request has more than {MAX_HEADERS} headers")
            return
        super().on_headers_complete()

    def on_body(self, body: bytes) -> None:
        """Pass body bytes on, unless the request was refused (no app is reading them)."""
        if not self._refused:
            super().on_body(body)

    def on_message_complete(self) -> None:
        """The request arrived whole: its deadline is met, and the next head may begin."""
        self._reading_head = True
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None
        if not self._refused:
            super().on_message_complete()

    def connection_lost(self, exc: Exception | None) -> None:
        """Drop the deadline with the connection."""
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None
        super().connection_lost(exc)

    def _too_slow(self) -> None:
        """The request did not arrive in time."""
        self._deadline = None
        if self.transport.is_closing():
            return
        cycle = self.cycle
        if self._reading_head or cycle is None:
            self._refuse(
                408, f"The request's headers did not arrive within {self.arrival_timeout:g} s"
            )
        elif cycle.response_complete:
            # Answered without its body being read (a route that takes none, an early 413):
            # the rest of it is not worth waiting for.
            self.transport.close()
        else:
            # The app has the request; the route reading the body answers 408. Either way
            # this connection serves no further request.
            cycle.keep_alive = False

    def _refuse(self, status: int, message: str) -> None:
        """Answer ``status`` and end the connection (after a short linger), as the app would.

        Only ever before the app has seen the request, so no response has started.
        """
        self._refused = True
        client = f"{self.client[0]}:{self.client[1]}" if self.client else "a client"
        logger.warning("refused a request from %s with %d: %s", client, status, message)
        count = type(self).on_refused  # a plain function: not bound to this connection
        if count is not None:
            count(status)
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
        if self.transport.can_write_eof():
            self.transport.write_eof()
            self.loop.call_later(LINGER_SECONDS, self.transport.close)
        else:
            self.transport.close()
