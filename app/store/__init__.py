"""The job store: the one interface every backend implements, and the choice of backend by URL.

A store is one process's handle on the jobs database. It has an ``owner`` id, unique to the
process, and holds that owner's *liveness lock* for as long as it is open (an OS file lock
beside a SQLite file, a PostgreSQL advisory lock on a connection of its own), so other
processes can tell at once when it has died.

The lease protocol (``app.store.sql``), the same on every backend: a job row is inserted with
a lease row that either *claims* it for the accepting process (attempt 1, with a lease) or
*reserves* it (attempt 0: the accepting process may claim it first, until the grace time
ends). A claim bumps ``attempts`` and sets ``lease_until``; heartbeats renew it; ``finish``
lands only while the lease row still names that owner and attempt (the fencing token). A lease
that ran out, a reservation past its grace time, or anything held by an owner whose liveness
lock is free is *stale*: any process's sweep may claim it. Every claim is taken only when the
process can start running it at once, so ``attempts`` counts runs that really started.

The store also keeps the **registry** of the claims and reservations this process holds
(``ClaimRegistry``), changed only when the write that took or ended a claim commits, so a
claim whose requester was cancelled meanwhile is still known and released at shutdown. Driver
errors never leave this package: they become a ``StoreError``.
"""

import os
import socket
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import Enum
from typing import TYPE_CHECKING, Protocol, overload

from app.jobs import Claim, JobStatus

if TYPE_CHECKING:
    from app.config import Settings
    from app.store.sql import Database

Clock = Callable[[], float]


class StoreError(Exception):
    """The store could not do what was asked."""


class StoreUnavailableError(StoreError):
    """The store cannot take this request now (locked, read-only, full); retrying may help.

    ``every_write`` says whether any other write would fail the same way now (an unreachable,
    busy or read-only database) or whether this write may have failed for its own sake (a full
    disk refuses a large insert while a small one still fits).
    """

    def __init__(
        self,
        message: str,
        reason: str = "the database is not answering",
        *,
        every_write: bool = True,
    ) -> None:
        super().__init__(message)
        self.reason = reason
        self.every_write = every_write


class StoreConflictError(StoreUnavailableError):
    """The database rolled a transaction back to break a deadlock; running it again helps."""


class QueueFullError(StoreError):
    """As many jobs as MAX_QUEUED_JOBS are unfinished: no new one is taken until some finish."""


class IdempotencyKeyReusedError(StoreError):
    """An idempotency key already used with a different request."""

    def __init__(self, key: str) -> None:
        super().__init__(f"Idempotency-Key {key!r} was already used with a different request")
        self.key = key


class StoreSetupError(StoreError):
    """The database cannot be used as configured; the service must not start on it."""


class StoreCorruptError(StoreSetupError):
    """The database file is not a usable database (or has a schema newer than this service)."""


@dataclass(frozen=True, slots=True)
class Progress:
    """How far a processing job's current run has got."""

    done_items: int
    total_items: int


@dataclass(frozen=True, slots=True)
class JobRecord:
    """A job as the API shows it; ``output_data`` only when asked for."""

    job_id: str
    status: JobStatus
    created_at: str
    updated_at: str
    output_data: str | None
    error: str | None
    tenant: str = ""
    progress: Progress | None = None  # while processing


@dataclass(frozen=True, slots=True)
class JobSummary:
    """A job as a list shows it: no payloads."""

    job_id: str
    status: JobStatus
    created_at: str
    updated_at: str


# Where a list of jobs newest first resumes: after this (created_at, job_id).
Cursor = tuple[str, str]


@dataclass(frozen=True, slots=True)
class Idempotency:
    """A submission's idempotency key, and the hash of the request that came with it."""

    key: str
    request_hash: str


@dataclass(frozen=True, slots=True)
class Replayed:
    """A submission repeating an earlier one (same key, same request): that job's id."""

    job_id: str


class CancelResult(Enum):
    """What asking to cancel a job did."""

    CANCELLED = "cancelled"  # it was processing; now it has failed, "cancelled"
    FINISHED = "finished"  # it had finished already: nothing changed
    NOT_FOUND = "not found"  # no such job (for this tenant)


class DeleteResult(Enum):
    """What asking to delete a job did."""

    DELETED = "deleted"
    PROCESSING = "processing"  # not finished: nothing changed (cancel it first)
    NOT_FOUND = "not found"


CANCELLED_ERROR = "cancelled at the client's request"


@dataclass(frozen=True, slots=True)
class StorePolicy:
    """How claims last, how often jobs may start, which are large, how many may wait."""

    lease_seconds: float
    claim_grace_seconds: float
    max_attempts: int
    # Inputs of at least this many characters are large: a sweep claims no more of them than
    # the process has large-job lanes free.
    large_input_length: int = 128 * 1024
    max_unfinished_jobs: int = 10_000


@dataclass(frozen=True, slots=True)
class Swept:
    """What one sweep did: the claims it took, the leases it found lost, the jobs it failed."""

    small: list[Claim] = field(default_factory=list)
    large: list[Claim] = field(default_factory=list)
    lost: set[Claim] = field(default_factory=set)
    failed: list[str] = field(default_factory=list)


class ClaimRegistry:
    """The claims and reservations one process holds, by identity (job, owner, attempt).

    The store changes it when the write that took or ended a claim commits, never before or
    on a caller's behalf; the runner reads it.
    """

    def __init__(self) -> None:
        self._claims: set[Claim] = set()

    def __contains__(self, claim: object) -> bool:
        return claim in self._claims

    def __iter__(self) -> Iterator[Claim]:
        return iter(tuple(self._claims))

    def __len__(self) -> int:
        return len(self._claims)

    def add(self, claims: Iterable[Claim]) -> None:
        """Hold these claims (or reservations)."""
        self._claims.update(claims)

    def discard(self, claims: Iterable[Claim]) -> None:
        """Stop holding exactly these claims; another attempt of the same job is untouched."""
        self._claims.difference_update(claims)

    def running(self) -> list[Claim]:
        """The claims (not reservations): the leases a heartbeat renews."""
        return [claim for claim in self._claims if not claim.is_reservation]


INTERRUPTED_TOO_OFTEN = (
    "interrupted too often: the job was started {attempts} times and no run recorded an "
    "outcome (each time, the process running it stopped, lost its lease, or could not write "
    "to the database)"
)


class JobStore(Protocol):
    """What the API and the runner need from storage."""

    @property
    def owner(self) -> str:
        """The owner id of this process: unique, named in the lease rows of the jobs it holds."""

    @property
    def held(self) -> ClaimRegistry:
        """The claims and reservations this process holds (read it, do not change it)."""

    async def open(self) -> None:
        """Connect, check the database, create or upgrade the schema, take the liveness lock.

        Raises StoreSetupError if the database cannot be used as configured, and
        StoreUnavailableError if it cannot be reached.
        """

    async def close(self) -> None:
        """Finish pending writes, let go of the liveness lock and disconnect."""

    async def flush(self) -> None:
        """Wait until every write queued so far has committed (or failed)."""

    async def ping(self) -> None:
        """Raise StoreError unless the database answers."""

    @overload
    async def create_job(
        self,
        job_id: str,
        input_json: str,
        *,
        claimed: bool,
        total_items: int = 0,
        tenant: str = "",
        idempotency: None = None,
    ) -> Claim: ...

    @overload
    async def create_job(
        self,
        job_id: str,
        input_json: str,
        *,
        claimed: bool,
        total_items: int = 0,
        tenant: str = "",
        idempotency: Idempotency | None = None,
    ) -> Claim | Replayed: ...

    async def create_job(
        self,
        job_id: str,
        input_json: str,
        *,
        claimed: bool,
        total_items: int = 0,
        tenant: str = "",
        idempotency: Idempotency | None = None,
    ) -> Claim | Replayed:
        """Insert a new job; return only once it is committed.

        ``claimed``: the caller is about to run it, so it is inserted claimed (attempt 1);
        otherwise, or once the store takes no claims, it is reserved (attempt 0). The claim or
        reservation is held (``held``) from the commit on. With an ``idempotency`` key the
        tenant already used for the same request, nothing is inserted: that job's id comes
        back (``Replayed``). Raises IdempotencyKeyReusedError for a key used with another
        request, QueueFullError when the policy's maximum of unfinished jobs is reached.
        """

    async def get_job(
        self, job_id: str, *, with_output: bool = False, tenant: str | None = None
    ) -> JobRecord | None:
        """Return the job (of ``tenant``, unless None), or None if there is no such job."""

    async def list_jobs(
        self, *, tenant: str, status: JobStatus | None, limit: int, after: Cursor | None
    ) -> list[JobSummary]:
        """The tenant's jobs newest first, after ``after`` (or from the newest)."""

    async def cancel_job(self, job_id: str, *, tenant: str) -> CancelResult:
        """Fail a processing job as cancelled; a run of it still going is fenced out."""

    async def delete_job(self, job_id: str, *, tenant: str) -> DeleteResult:
        """Remove a finished job, row and payloads."""

    async def purge_expired(self, finished_before: float, limit: int) -> int:
        """Remove up to ``limit`` jobs finished before that time; return how many went.

        Returns 0 without looking when another process is purging (PostgreSQL).
        """

    async def load_input(self, job_id: str) -> str | None:
        """Return the job's input JSON, or None if there is no such job."""

    async def still_processing(self, job_ids: Sequence[str]) -> set[str]:
        """Those of these jobs that are processing (the others finished, or are gone)."""

    async def count_unfinished(self) -> int:
        """How many jobs are processing, in the whole database."""

    async def claim(self, job_id: str) -> Claim | None:
        """Claim this job: this process's own reservation of it, or a free or stale lease."""

    async def sweep(self, *, slots: int, lanes: int) -> Swept:
        """Renew what this process holds, fail stale jobs out of attempts, claim stale jobs.

        Claims up to ``min(slots, lanes)`` large jobs, then small ones for the slots left
        (none once the store takes no claims). Leases of owners whose liveness lock is free
        count as expired.
        """

    async def renew(self, progress: Mapping[Claim, int] | None = None) -> set[Claim]:
        """Extend the leases of every claim held; return those that were lost (no longer held).

        ``progress`` records how many objects each of these claims' runs has done.
        """

    async def finish(self, claim: Claim, *, output_json: str | None, error: str | None) -> bool:
        """Record the outcome if ``claim`` is still the job's current claim; say whether it was.

        Either way the claim is no longer held afterwards.
        """

    async def release(self, claims: Iterable[Claim]) -> None:
        """Give these claims and reservations up, so any process can take the jobs at once."""

    def abandon(self, claim: Claim) -> None:
        """Stop holding ``claim`` without telling the database; its lease runs out.

        For when not even a release can be written: a sweep retries the job later.
        """

    def stop_claiming(self) -> None:
        """Take no more claims (the process is draining): new jobs are only reserved.

        Safe to call from a signal handler: it only sets an attribute.
        """

    def on_jobs_released(self, wake: Callable[[], None]) -> None:
        """Call ``wake`` when another process releases jobs, if the backend can tell.

        A hint only, for sweeping at once rather than at the next interval: it may come late
        or never, and the periodic sweep stays the safety net.
        """

    def on_jobs_finished(self, finished: Callable[[Iterable[str]], None]) -> None:
        """Call ``finished`` with the ids of jobs this process finishes, as each write commits.

        Jobs finished by other processes are not reported: ask ``get_job``.
        """


def iso_utc(epoch_seconds: float) -> str:
    """Format a Unix time as ISO 8601 UTC with microseconds, e.g. 2026-11-28T11:37:39.123456Z."""
    return datetime.fromtimestamp(epoch_seconds, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def new_owner_id() -> str:
    """An owner id for this process: its host and pid (for people), and a random part."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def store_policy(settings: "Settings") -> StorePolicy:
    """The store policy the settings ask for."""
    return StorePolicy(
        lease_seconds=settings.job_lease_seconds,
        claim_grace_seconds=settings.job_claim_grace_seconds,
        max_attempts=settings.job_max_attempts,
        large_input_length=settings.flow_process_threshold_bytes,
        max_unfinished_jobs=settings.max_queued_jobs,
    )


def make_database(settings: "Settings") -> "Database":
    """The backend DATABASE_URL names (by its scheme), not yet connected."""
    url = settings.database_url
    if url.startswith("sqlite://"):
        from app.store.sqlite import SQLiteDatabase, sqlite_path

        return SQLiteDatabase(
            sqlite_path(url),
            synchronous=settings.sqlite_synchronous,
            busy_timeout_ms=settings.sqlite_busy_timeout_ms,
        )
    if url.startswith(("postgresql://", "postgres://")):
        from app.store.postgres import PostgresDatabase

        return PostgresDatabase(
            url,
            pool_size=settings.database_pool_size,
            timeout_seconds=settings.database_timeout_seconds,
            startup_timeout_seconds=settings.database_startup_timeout_seconds,
        )
    raise ValueError(f"Unsupported DATABASE_URL: expected sqlite:/// or postgresql://, not {url!r}")


def make_store(
    settings: "Settings",
    clock: Clock = time.time,
    owner: str | None = None,
    database: "Database | None" = None,
) -> JobStore:
    """The store for DATABASE_URL (or over ``database``), as ``owner``; the caller opens it."""
    from app.store.sql import SQLJobStore

    return SQLJobStore(
        database or make_database(settings), store_policy(settings), clock, owner or new_owner_id()
    )
