"""The edge of every HTTP request: its id, and (with metrics on) its count and duration.

One pure ASGI middleware rather than one per concern: every layer of middleware is resumed
each time a request's task wakes (reading the body, waiting for a commit, sending), so a
status request paid about 5% per layer; and Starlette's ``BaseHTTPMiddleware`` would cost a
task and a queue on top.
"""

import time

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.logs import REQUEST_ID_NAME, request_id_for
from app.metrics import HttpMetrics


class Edge:
    """Gives each request an ``X-Request-ID`` (kept if sane, else made) and counts it.

    It also answers HEAD wherever GET is answered, as HTTP asks (uptime checkers use it):
    the app sees a GET, and uvicorn, which still sees the HEAD, sends the headers alone.
    """

    def __init__(self, app: ASGIApp, metrics: HttpMetrics | None) -> None:
        self.app = app
        self._metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Pass the request on with its id; once it is answered, count it."""
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        header = (REQUEST_ID_NAME, request_id_for(scope["headers"]).encode())
        status = 500  # unless a response starts: the app raised, and the server answers 500
        method = scope["method"]
        if method == "HEAD":
            scope = {**scope, "method": "GET"}

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = [*message.get("headers", ()), header]
                if status == 405:
                    headers = [_with_head_allowed(item) for item in headers]
                message["headers"] = headers
            await send(message)

        if self._metrics is None:
            await self.app(scope, receive, send_with_id)
            return
        try:
            await self.app(scope, receive, send_with_id)
        finally:
            self._metrics.observe(scope, status, time.perf_counter() - started, method)


def _with_head_allowed(header: tuple[bytes, bytes]) -> tuple[bytes, bytes]:
    """A 405's ``Allow`` header, with HEAD wherever GET is allowed."""
    name, value = header
    if name.lower() != b"allow":
        return header
    methods = [method.strip() for method in value.split(b",")]
    if b"GET" in methods and b"HEAD" not in methods:
        methods.append(b"HEAD")
    return name, b", ".join(methods)
