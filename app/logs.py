"""Logging: text or JSON lines, carrying the job and the request they are about.

``LOG_FORMAT=text`` (``make run``) writes one readable line per record; ``LOG_FORMAT=json``
(the image and the manifests) writes one JSON object per line with ``time``, ``level``,
``logger`` and ``message``, and ``job_id``, ``attempt`` and ``request_id`` where known.
uvicorn's own loggers, its access log included, go through the same handler.

The request id is asgi-correlation-id's (the ``X-Request-ID`` middleware); the job is set by
the runner for the task that runs it (``running_job``). A task that works for many jobs or
requests at once (a group commit, a shared poll) is started with ``detached_task`` so it does
not carry the ids of whichever caller happened to start it.
"""

import asyncio
import contextvars
import logging
import re
import sys
from collections.abc import Coroutine, Iterator
from contextlib import contextmanager
from typing import Any, Literal, TypeVar

from asgi_correlation_id import correlation_id
from pythonjsonlogger.core import RESERVED_ATTRS
from pythonjsonlogger.orjson import OrjsonFormatter

from app.jobs import Claim

T = TypeVar("T")

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# The loggers whose records go to the service's one handler.
UVICORN_LOGGERS = ("uvicorn", "uvicorn.error", "uvicorn.access")
# An X-Request-ID a client sends is kept if it looks like an id: 1-128 of these characters.
SANE_REQUEST_ID = re.compile(r"[A-Za-z0-9._:/+=@-]{1,128}")

_job: contextvars.ContextVar[Claim | None] = contextvars.ContextVar("job", default=None)


def is_sane_request_id(value: str) -> bool:
    """Whether a client's X-Request-ID is kept (else the service makes its own)."""
    return SANE_REQUEST_ID.fullmatch(value) is not None


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
        if (request_id := correlation_id.get()) is not None and not hasattr(record, "request_id"):
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


def formatter(log_format: Literal["text", "json"]) -> logging.Formatter:
    """The formatter of ``LOG_FORMAT``."""
    if log_format == "json":
        return OrjsonFormatter(
            "%(levelname)s %(name)s %(message)s",
            rename_fields={"levelname": "level", "name": "logger"},
            timestamp="time",  # ISO 8601 in UTC, to the microsecond
            # uvicorn's records carry a coloured copy of the message for its own formatter.
            reserved_attrs=[*RESERVED_ATTRS, "color_message", "taskName"],
        )
    return logging.Formatter(TEXT_FORMAT)


def configure_logging(level: str, log_format: Literal["text", "json"]) -> None:
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
    for name in UVICORN_LOGGERS:
        uvicorn_logger = logging.getLogger(name)
        uvicorn_logger.handlers.clear()
        uvicorn_logger.propagate = True
    # A client's malformed X-Request-ID is replaced, not worth a warning per request.
    logging.getLogger("asgi_correlation_id").setLevel(logging.ERROR)
