"""The job store: the one interface every backend implements, and the choice of backend by URL.

Backends: ``app.store.sqlite`` (embedded, the default) and ``app.store.postgres`` (several
replicas); both run the protocol in ``app.store.sql``.

Every backend keeps the same lease protocol. A job row is inserted unclaimed (or already
claimed by the process that accepted it, when it can start it at once); a process *claims*
it by a conditional update that records itself as ``owner``, bumps ``attempts`` and sets
``lease_until``; it keeps the lease alive with heartbeats while the job runs; and its ``finish``
only lands while it still holds that exact attempt (owner and attempt act as a fencing token).
A job whose lease ran out, or that nobody claimed within the grace time, is *stale*: any process's
sweep may claim it. Driver errors never leave this package: they become a ``StoreError``.
"""

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Protocol

from app.jobs import Claim, JobStatus

if TYPE_CHECKING:
    from app.config import Settings

Clock = Callable[[], float]


class StoreError(Exception):
    """The store could not do what was asked."""


class StoreUnavailableError(StoreError):
    """The store cannot take this request now (locked, read-only, full); retrying may help."""

    def __init__(self, message: str, reason: str = "the database is not answering") -> None:
        super().__init__(message)
        self.reason = reason


class StoreConflictError(StoreUnavailableError):
    """The database rolled a transaction back to break a deadlock; running it again helps."""


class StoreCorruptError(StoreError):
    """The database file is not a usable database; the service must not start on it."""


@dataclass(frozen=True, slots=True)
class JobRecord:
    """A job as the API shows it; ``output_data`` only when asked for."""

    job_id: str
    status: JobStatus
    created_at: str
    updated_at: str
    output_data: str | None
    error: str | None


@dataclass(frozen=True, slots=True)
class LeasePolicy:
    """How long claims last and how often a job may be started."""

    lease_seconds: float
    claim_grace_seconds: float
    max_attempts: int


INTERRUPTED_TOO_OFTEN = (
    "interrupted too often: the job was started {attempts} times and never finished "
    "(the process running it stopped or lost its lease each time)"
)


class JobStore(Protocol):
    """What the API and the runner need from storage."""

    async def open(self) -> None:
        """Connect, check the database and create or upgrade the schema."""

    async def close(self) -> None:
        """Finish pending writes and disconnect."""

    async def ping(self) -> None:
        """Raise StoreError unless the database answers."""

    async def create_job(
        self, job_id: str, input_json: str, owner: str | None = None
    ) -> Claim | None:
        """Insert a new job; return only once it is committed.

        With an ``owner`` the job is inserted already claimed by it (its first attempt, which
        the caller is about to run) and that claim is returned; without, it is unclaimed.
        """

    async def get_job(self, job_id: str, *, with_output: bool = False) -> JobRecord | None:
        """Return the job, or None if there is no such job."""

    async def load_input(self, job_id: str) -> str | None:
        """Return the job's input JSON, or None if there is no such job."""

    async def claim(self, job_id: str, owner: str) -> Claim | None:
        """Claim this job if it is processing and nobody holds a live lease on it."""

    async def claim_stale(self, owner: str, limit: int) -> list[Claim]:
        """Fail stale jobs out of attempts, then claim up to ``limit`` other stale jobs."""

    async def renew(self, claims: Iterable[Claim]) -> set[str]:
        """Extend these claims' leases; return the ids of the jobs still held."""

    async def finish(self, claim: Claim, *, output_json: str | None, error: str | None) -> bool:
        """Record the outcome if ``claim`` is still the job's current claim; say whether it was."""

    async def release(self, claims: Iterable[Claim], unclaimed: Iterable[str] = ()) -> None:
        """Give these claims up so another process can take the jobs at once.

        ``unclaimed`` names jobs this process accepted but never claimed: their grace time is
        cut short, for the same reason.
        """

    def on_jobs_released(self, wake: Callable[[], None]) -> None:
        """Call ``wake`` when another process releases jobs, if the backend can tell.

        A hint only, for sweeping at once rather than at the next interval: it may come late
        or never, and the periodic sweep stays the safety net.
        """


def iso_utc(epoch_seconds: float) -> str:
    """Format a Unix time as ISO 8601 UTC with microseconds, e.g. 2026-11-28T11:37:39.123456Z."""
    return datetime.fromtimestamp(epoch_seconds, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def open_store(settings: "Settings", clock: Clock = time.time) -> JobStore:
    """Choose the backend by DATABASE_URL's scheme; the caller still opens the store."""
    policy = LeasePolicy(
        lease_seconds=settings.job_lease_seconds,
        claim_grace_seconds=settings.job_claim_grace_seconds,
        max_attempts=settings.job_max_attempts,
    )
    url = settings.database_url
    if url.startswith("sqlite://"):
        from app.store.sqlite import SQLiteJobStore, sqlite_path

        return SQLiteJobStore(
            sqlite_path(url),
            policy,
            synchronous=settings.sqlite_synchronous,
            busy_timeout_ms=settings.sqlite_busy_timeout_ms,
            clock=clock,
        )
    if url.startswith(("postgresql://", "postgres://")):
        from app.store.postgres import PostgresJobStore

        return PostgresJobStore(
            url,
            policy,
            pool_size=settings.database_pool_size,
            timeout_seconds=settings.database_timeout_seconds,
            startup_timeout_seconds=settings.database_startup_timeout_seconds,
            clock=clock,
        )
    raise ValueError(f"Unsupported DATABASE_URL: expected sqlite:/// or postgresql://, not {url!r}")
