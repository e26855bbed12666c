"""Logging: text or JSON lines, carrying the job and the request they are about.

``LOG_FORMAT=text`` (``make run``) writes one readable line per record; ``LOG_FORMAT=json``
(the image and the manifests) writes one JSON object per line with ``time``, ``level``,
``logger`` and ``message``, and ``job_id``, ``attempt`` and ``request_id`` where known.
uvicorn's own loggers, its access log included, go through the same handler.

The request id is set by the ``X-Request-ID`` middleware (``app.edge``); the job is set by
the runner for the task that runs it (``running_job``). A task that works for many jobs or
requests at once (a group commit, a shared poll) is started with ``detached_task`` so it does
not carry the ids of whichever caller happened to start it.
"""

import asyncio
import contextvars
import itertools
import logging
import os
import re
import sys
import time
from collections.abc import Coroutine, Iterator
from contextlib import contextmanager
from typing import Any, Literal, TypeVar

from pythonjsonlogger.core import RESERVED_ATTRS
from pythonjsonlogger.orjson import OrjsonFormatter

from app.jobs import Claim

T = TypeVar("T")
LogFormat = Literal["text", "json"]

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# The loggers whose records go to the service's one handler.
UVICORN_LOGGERS = ("uvicorn", "uvicorn.error", "uvicorn.access")
# An X-Request-ID a client sends is kept if it looks like an id: 1-128 of these characters.
SANE_REQUEST_ID = re.compile(r"[A-Za-z0-9._:/+=@-]{1,128}")

REQUEST_ID_HEADER = "X-Request-ID"
REQUEST_ID_NAME = REQUEST_ID_HEADER.lower().encode()

# Ids made here: 48 random bits for the process, then a count, so they are unique across
# replicas and restarts without a system call per request.
_ID_PREFIX = os.urandom(6).hex()
_request_numbers = itertools.count(1)

_job: contextvars.ContextVar[Claim | None] = contextvars.ContextVar("job", default=None)
_request_id: contextvars.ContextVar[str | None] = contextvars.ContextVar("request_id", default=None)


def current_request_id() -> str | None:
    """The id of the request being handled, if any."""
    return _request_id.get()


def request_id_for(headers: list[tuple[bytes, bytes]]) -> str:
    """The id of a request with these (raw ASGI) headers, set for its task.

    A sane ``X-Request-ID`` the client sent is kept (a proxy's or the client's own, to follow
    a request across services); otherwise one is made: 32 hex digits, unique across processes.
    Not reset after the request: each request runs in a task of its own, and the server's
    error handler, outside the middleware, still logs under the id.
    """
    request_id = _sent_id(headers) or f"{_ID_PREFIX}{next(_request_numbers):020x}"
    _request_id.set(request_id)
    return request_id


def _sent_id(headers: list[tuple[bytes, bytes]]) -> str | None:
    for name, value in headers:
        if name == REQUEST_ID_NAME:
            text = value.decode("latin-1")
            return text if SANE_REQUEST_ID.fullmatch(text) else None
    return None


@contextmanager
def running_job(claim: Claim) -> Iterator[None]:
    """Within this block (and tasks it starts), records carry the claim's job id and attempt."""
    token = _job.set(claim)
    try:
        yield
    finally:
        _job.reset(token)


def job_fields(job_id: str, attempt: int | None = None) -> dict[str, object]:
    """``extra=`` for a record about a job logged outside ``running_job``."""
    return {"job_id": job_id} if attempt is None else {"job_id": job_id, "attempt": attempt}


def detached_task(coroutine: Coroutine[Any, Any, T]) -> "asyncio.Task[T]":
    """A task that starts from an empty context: its records name no caller's job or request."""
    return asyncio.create_task(coroutine, context=contextvars.Context())


class ContextFields(logging.Filter):
    """Adds ``request_id``, ``job_id`` and ``attempt`` to a record where they are known."""

    def filter(self, record: logging.LogRecord) -> bool:
        """Add the fields (those given with ``extra=`` win); never drops a record."""
        if (request_id := _request_id.get()) is not None and not hasattr(record, "request_id"):
            record.request_id = request_id
        if (claim := _job.get()) is not None and not hasattr(record, "job_id"):
            record.job_id = claim.job_id
            record.attempt = claim.attempt
        return True


class _StderrHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes to whatever ``sys.stderr`` is at the time (a test runner swaps it per test)."""

    @property
    def stream(self) -> Any:
        """``sys.stderr`` now."""
        return sys.stderr

    @stream.setter
    def stream(self, _: Any) -> None:
        pass


def formatter(log_format: LogFormat) -> logging.Formatter:
    """The formatter of ``LOG_FORMAT``."""
    if log_format == "json":
        return OrjsonFormatter(
            "%(levelname)s %(name)s %(message)s",
            rename_fields={"levelname": "level", "name": "logger"},
            timestamp="time",  # ISO 8601 in UTC, to the microsecond
            # uvicorn's records carry a coloured copy of the message for its own formatter.
            reserved_attrs=[*RESERVED_ATTRS, "color_message", "taskName"],
        )
    return _TextFormatter(TEXT_FORMAT)


class _TextFormatter(logging.Formatter):
    """The standard text format, with the time's seconds formatted once per second."""

    _second = -1
    _stamp = ""

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        """``2026-11-28 23:55:57,403``, as logging's own."""
        second = int(record.created)
        if second != self._second:
            self._stamp = time.strftime("%Y-%m-%d %H:%M:%S", self.converter(second))
            self._second = second
        return f"{self._stamp},{int(record.msecs):03d}"


def configure_logging(level: str, log_format: LogFormat) -> None:
    """One handler on the root logger, in ``log_format``; the service's loggers at ``level``.

    Safe to call again (each app does): the handler it added before is replaced.
    """
    root = logging.getLogger()
    for old in [handler for handler in root.handlers if isinstance(handler, _StderrHandler)]:
        root.removeHandler(old)
    handler = _StderrHandler()
    handler.setFormatter(formatter(log_format))
    handler.addFilter(ContextFields())
    root.addHandler(handler)
    logging.getLogger("app").setLevel(level.upper())
    # Python's warnings (a library's deprecation, say) as records, not raw lines on stderr.
    logging.captureWarnings(True)
    for name in UVICORN_LOGGERS:
        uvicorn_logger = logging.getLogger(name)
        uvicorn_logger.handlers.clear()
        uvicorn_logger.propagate = True
    # No record needs the thread, process or task names: looking them up costs every line a
    # few microseconds (Python's logging HOWTO, "Optimization").
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    logging.logAsyncioTasks = False  # type: ignore[attr-defined]  # Python 3.12
    # Nor where in the source a record was made (no format shows it): finding the caller
    # walks the stack for every record. The HOWTO's documented way to skip it.
    logging._srcfile = None
