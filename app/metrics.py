"""Prometheus metrics: what the service counts, and the middleware that times HTTP requests.

The metrics live in prometheus-client's default registry, beside its process and Python
collectors, and are counted where things happen: the runner counts runs, the store counts
what its writes commit. Everything is counted in the server process: worker processes
(``FLOW_PROCESSES``) only compute flows, and the runner that sent them the work records how
it went, so one scrape of the server sees all of it.
"""

import time
from collections.abc import Awaitable, Callable, Sequence

from prometheus_client import Counter, Gauge, Histogram, disable_created_metrics
from starlette.routing import BaseRoute, Mount, Route
from starlette.types import Scope

from app.jobs import JobStatus
from app.store import StoreConflictError, StoreError, StoreUnavailableError

# No ``*_created`` series beside every counter and histogram: they double what a scrape
# carries, and Prometheus reads a counter's resets from the counter itself.
disable_created_metrics()  # type: ignore[no-untyped-call]

# Seconds, from a few milliseconds (a small job) to the default JOB_TIMEOUT_SECONDS.
JOB_SECONDS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
COMMIT_SECONDS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)
BATCH_SIZES = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
# The one route label of every path no route matches, so scanners cannot grow the label set.
UNMATCHED_ROUTE = "unmatched"
# Methods counted by name; any other a client invents is counted as "other".
HTTP_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})

JOBS_SUBMITTED = Counter(
    "expand_reduce_jobs_submitted",
    "Jobs accepted (answered 202) by this process; replays of an idempotent submit not counted.",
)
JOBS_FINISHED = Counter(
    "expand_reduce_jobs_finished",
    "Jobs whose final status this process wrote (each job is counted once, by one process).",
    ["status"],
)
JOBS_CANCELLED = Counter(
    "expand_reduce_jobs_cancelled",
    "Jobs cancelled through this process; each is also counted as finished with status=failed.",
)
JOB_RUN_SECONDS = Histogram(
    "expand_reduce_job_run_seconds",
    "One run of a job, from its claim to its outcome being recorded.",
    buckets=JOB_SECONDS,
)
JOB_WAIT_SECONDS = Histogram(
    "expand_reduce_job_wait_seconds",
    "From a job's submission to its first start.",
    buckets=JOB_SECONDS,
)
JOBS_RUNNING = Gauge("expand_reduce_jobs_running", "Jobs running in this process now.")
JOBS_UNFINISHED = Gauge(
    "expand_reduce_jobs_unfinished",
    "Jobs still processing (queued or running) in the whole database, read at scrape time.",
)
READY = Gauge(
    "expand_reduce_ready",
    "1 while this process would answer /readyz with 200 (read at scrape time), else 0.",
)
LEASE_RECOVERIES = Counter(
    "expand_reduce_lease_recoveries",
    "Jobs this process took over after an earlier attempt (another owner's, or its own lost "
    "one) did not finish.",
)
LEASE_LOST = Counter(
    "expand_reduce_lease_lost",
    "Runs of this process that lost their lease before finishing (cancellations not counted).",
)
STORE_COMMIT_SECONDS = Histogram(
    "expand_reduce_store_commit_seconds",
    "One group-commit transaction, from its start to its commit.",
    buckets=COMMIT_SECONDS,
)
STORE_BATCH_SIZE = Histogram(
    "expand_reduce_store_batch_size",
    "Operations written by one group-commit transaction.",
    buckets=BATCH_SIZES,
)
STORE_ERRORS = Counter(
    "expand_reduce_store_errors",
    "Database operations that failed, by reason.",
    ["reason"],
)
HTTP_REQUESTS = Counter(
    "expand_reduce_http_requests",
    "HTTP requests answered, by route template, method and status code.",
    ["route", "method", "status"],
)
HTTP_REQUEST_SECONDS = Histogram(
    "expand_reduce_http_request_duration_seconds",
    "From a request's arrival to the end of its response, by route template and method.",
    ["route", "method"],
)

# A store error's reason, in a few fixed words (the errors' own messages are for people).
_STORE_REASONS = {
    "the database is busy": "busy",
    "the database is read-only": "read_only",
    "the database disk is full": "disk_full",
    "the database disk failed": "io_error",
    "the database is not answering": "unreachable",
    "the database is unreachable": "unreachable",
    "the service is stopping": "closed",
}


def store_error_reason(error: StoreError) -> str:
    """The ``reason`` label of a store error."""
    if isinstance(error, StoreConflictError):
        return "conflict"
    if isinstance(error, StoreUnavailableError):
        return _STORE_REASONS.get(error.reason, "unavailable")
    return "error"


def counted(error: StoreError) -> StoreError:
    """Count a store error as it is raised; returns it."""
    _STORE_ERRORS[store_error_reason(error)].inc()
    return error


# Every series of the two labelled job and store counters, made once: they exist at 0 before
# anything happens, so rates start there, and ``labels()`` (a lock and a key) is not paid per
# count.
_FINISHED = {
    status: JOBS_FINISHED.labels(status.value) for status in (JobStatus.COMPLETED, JobStatus.FAILED)
}
_STORE_ERRORS = {
    reason: STORE_ERRORS.labels(reason)
    for reason in sorted({*_STORE_REASONS.values(), "conflict", "unavailable", "error"})
}


def count_finished(status: JobStatus, count: int = 1) -> None:
    """Count jobs whose final status a committed write of this process recorded."""
    if count:
        _FINISHED[status].inc(count)


def count_refused(status: int) -> None:
    """Count a request the HTTP protocol refused (431, 408) before any route saw it."""
    HTTP_REQUESTS.labels(UNMATCHED_ROUTE, "other", str(status)).inc()


class HttpMetrics:
    """Counts and times requests by route template, method and status.

    The route is the template the router matched (``/check_status/{job_id}``), read from the
    scope after the app has answered: FastAPI's own routes leave themselves there; the others
    (the OpenAPI document, the docs' static files) leave their endpoint, which ``routes``
    maps back to its template. Paths no route matches share ``UNMATCHED_ROUTE``.
    """

    def __init__(self, routes: Sequence[BaseRoute] = ()) -> None:
        self._routes = routes  # the app's, read when an unknown endpoint first shows up
        self._templates: dict[int, str] = {}
        # Labelled children by label values: ``labels()`` takes a lock and builds a key.
        self._counters: dict[tuple[str, str, int], Callable[[], None]] = {}
        self._timers: dict[tuple[str, str], Callable[[float], None]] = {}

    def observe(self, scope: Scope, status: int, seconds: float, method: str) -> None:
        """Count one answered request (``method`` as the client sent it)."""
        route = scope.get("route")
        template = route.path if route is not None else self._template_of(scope.get("endpoint"))
        method = method if method in HTTP_METHODS else "other"
        count = self._counters.get((template, method, status))
        if count is None:
            count = HTTP_REQUESTS.labels(template, method, str(status)).inc
            self._counters[(template, method, status)] = count
        count()
        observe = self._timers.get((template, method))
        if observe is None:
            observe = HTTP_REQUEST_SECONDS.labels(template, method).observe
            self._timers[(template, method)] = observe
        observe(seconds)

    def _template_of(self, endpoint: object) -> str:
        if endpoint is None:
            return UNMATCHED_ROUTE
        if (template := self._templates.get(id(endpoint))) is None:
            template = UNMATCHED_ROUTE
            for route in self._routes:
                if isinstance(route, Mount) and route.app is endpoint:
                    template = f"{route.path}/{{path}}"
                elif isinstance(route, Route) and route.endpoint is endpoint:
                    template = route.path
            self._templates[id(endpoint)] = template
        return template


class ScrapeTimeGauges:
    """Sets the gauges read from the database at scrape time, at most once a second.

    ``expand_reduce_jobs_unfinished`` is one count of the lease rows; ``expand_reduce_ready``
    is what ``/readyz`` would answer: 1 while the database answers (that count) and the
    process is not shutting down.
    """

    def __init__(
        self,
        count_unfinished: Callable[[], Awaitable[int]],
        accepting: Callable[[], bool],
        max_age: float = 1.0,
    ) -> None:
        self._count_unfinished = count_unfinished
        self._accepting = accepting
        self._max_age = max_age
        self._read_at = float("-inf")

    async def refresh(self) -> None:
        """Read the database again unless the last read is recent."""
        now = time.monotonic()
        if now - self._read_at < self._max_age:
            return
        self._read_at = now
        try:
            JOBS_UNFINISHED.set(await self._count_unfinished())
        except StoreError:  # counted as a store error; the count keeps its last value
            READY.set(0)
            return
        READY.set(1 if self._accepting() else 0)
