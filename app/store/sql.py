"""The lease protocol, written once: the statements and the logic both SQL backends run.

A backend (``Database``) supplies transactions, reads outside them and its owners' liveness
locks, and says how its driver writes placeholders and row locks; everything about jobs and
leases is here. Statements are written with ``?`` placeholders and a ``{lock}`` slot after the
subqueries that pick rows to claim, fail or expire: SQLite fills it with nothing (it has one
writer at a time), PostgreSQL with ``FOR UPDATE SKIP LOCKED``, so concurrent replicas skip the
rows another is taking rather than wait for them or take them twice.

Every write goes through one group commit (``app.store.group_commit``) with a stage per kind,
applied in this order within a transaction: inserts, renewals, sweeps, finishes, claims,
releases. What renews the claims held (a renewal, or the start of every sweep) comes before
what ends claims, so a claim that finishes in the same transaction is renewed first rather
than taken for lost; and a sweep renews everything its process holds before it claims, so a
process never sweeps up a job it is itself running, however long it was paused. Each result is
keyed by the claim's full identity (job, owner, attempt), never by the job alone.

Times are the application's clock (seconds since the epoch), not the database's, so a lease
means the same on every backend and tests can move the clock.
"""

import logging
from collections.abc import Awaitable, Callable, Collection, Iterable, Iterator, Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, replace
from typing import Any, Protocol, TypeVar, overload

from app import metrics
from app.batching import Batcher
from app.jobs import Claim, JobStatus, outcome_status
from app.logs import job_fields
from app.store import (
    CANCELLED_ERROR,
    INTERRUPTED_TOO_OFTEN,
    CancelResult,
    ClaimRegistry,
    Clock,
    Cursor,
    DeleteResult,
    Idempotency,
    IdempotencyKeyReusedError,
    JobRecord,
    JobSummary,
    Progress,
    QueueFullError,
    Replayed,
    StoreConflictError,
    StoreCorruptError,
    StoreError,
    StorePolicy,
    Swept,
    iso_utc,
)
from app.store.group_commit import GroupCommit

logger = logging.getLogger(__name__)

T = TypeVar("T")
Row = Sequence[Any]

# A job has a job_leases row exactly while it is processing. A lease is live while
# lease_until >= now; a reservation's lease_until is the end of its grace time.
INSERT_JOB = """
    INSERT INTO jobs (
        job_id, status, tenant, created_at, updated_at, idempotency_key, request_hash, input_data
    )
    VALUES (?, 'processing', ?, ?, ?, ?, ?, ?)
"""
INSERT_KEYED_JOB = INSERT_JOB + " ON CONFLICT DO NOTHING RETURNING job_id"
INSERT_LEASE = """
    INSERT INTO job_leases (job_id, owner, attempts, lease_until, input_length, total_items)
    VALUES (?, ?, ?, ?, ?, ?)
"""
# Every unfinished job has a lease row: this is how many there are.
COUNT_UNFINISHED = "SELECT count(*) FROM job_leases"
# Within this many places of MAX_QUEUED_JOBS, inserts of all processes take turns.
ADMISSION_SLACK = 1_000
KEYS_IN_USE = """
    SELECT tenant, idempotency_key, job_id, request_hash FROM jobs
    WHERE idempotency_key IN ({keys})
"""
# Renewals, finishes and releases are fenced by the whole claim, and say which claims landed.
RENEW = """
    UPDATE job_leases SET lease_until = ? WHERE (job_id, owner, attempts) IN (VALUES {rows})
    RETURNING job_id, owner, attempts
"""
END_LEASES = """
    DELETE FROM job_leases WHERE (job_id, owner, attempts) IN (VALUES {rows})
    RETURNING job_id, owner, attempts
"""
RECORD_OUTCOME = """
    UPDATE jobs SET status = ?, output_data = ?, error = ?, updated_at = ? WHERE job_id = ?
"""
RECORD_PROGRESS = """
    UPDATE job_leases SET done_items = ? WHERE job_id = ? AND owner = ? AND attempts = ?
"""
RELEASE = """
    UPDATE job_leases SET owner = NULL, lease_until = ?
    WHERE (job_id, owner, attempts) IN (VALUES {rows})
"""
# A claim by id takes this owner's own reservation at any time, or a free or stale lease.
CLAIM = """
    UPDATE job_leases SET owner = ?, attempts = attempts + 1, lease_until = ?
    WHERE job_id IN (
        SELECT job_id FROM job_leases
        WHERE job_id IN ({ids}) AND attempts < ?
            AND (owner IS NULL OR lease_until < ? OR (owner = ? AND attempts = 0))
        {lock}
    )
    RETURNING job_id, attempts
"""
# Other owners with live leases or reservations: their liveness locks say whether they live.
LIVE_OWNERS = """
    SELECT DISTINCT owner FROM job_leases
    WHERE owner IS NOT NULL AND owner <> ? AND lease_until >= ?
"""
EXPIRE_OWNERS = """
    UPDATE job_leases SET lease_until = ? WHERE job_id IN (
        SELECT job_id FROM job_leases WHERE owner IN ({owners}) AND lease_until >= ? {lock}
    )
"""
FAIL_EXHAUSTED = """
    DELETE FROM job_leases WHERE job_id IN (
        SELECT job_id FROM job_leases WHERE lease_until < ? AND attempts >= ? {lock}
    )
    RETURNING job_id
"""
CLAIM_STALE = """
    UPDATE job_leases SET owner = ?, attempts = attempts + 1, lease_until = ?
    WHERE job_id IN (
        SELECT job_id FROM job_leases
        WHERE lease_until < ? AND attempts < ? AND input_length >= ? AND input_length < ?
        ORDER BY lease_until LIMIT ? {lock}
    )
    RETURNING job_id, attempts
"""
STATUSES = """
    SELECT job_id, status, created_at, updated_at, error, tenant FROM jobs WHERE job_id IN ({ids})
"""
PROGRESS = "SELECT job_id, done_items, total_items FROM job_leases WHERE job_id IN ({ids})"
LEASED = "SELECT job_id FROM job_leases WHERE job_id IN ({ids})"
RESULT = """
    SELECT status, created_at, updated_at, output_data, error, tenant FROM jobs WHERE job_id = ?
"""
INPUT = "SELECT input_data FROM jobs WHERE job_id = ?"
# Newest first, after a (created_at, job_id) cursor: keyset pagination, stable while jobs are
# added (they are newer than any cursor, so they never shift a later page).
LIST_JOBS = """
    SELECT job_id, status, created_at, updated_at FROM jobs
    WHERE tenant = ? AND (created_at, job_id) < (?, ?)
    ORDER BY created_at DESC, job_id DESC LIMIT ?
"""
# By status: finished jobs through the newest-first index, skipping the others (no index by
# status, which every finish would have to update: a tenth of the submit rate); processing
# ones through their leases, of which there are at most MAX_QUEUED_JOBS.
LIST_JOBS_WITH_STATUS = """
    SELECT job_id, status, created_at, updated_at FROM jobs
    WHERE tenant = ? AND status = ? AND (created_at, job_id) < (?, ?)
    ORDER BY created_at DESC, job_id DESC LIMIT ?
"""
LIST_PROCESSING_JOBS = """
    SELECT jobs.job_id, jobs.status, jobs.created_at, jobs.updated_at
    FROM job_leases CROSS JOIN jobs
    WHERE jobs.job_id = job_leases.job_id AND jobs.tenant = ? AND jobs.status = ?
        AND (jobs.created_at, jobs.job_id) < (?, ?)
    ORDER BY jobs.created_at DESC, jobs.job_id DESC LIMIT ?
"""
# Later than any timestamp this service writes: the cursor of the first page.
NEWEST = ("9999", "")
JOB_TENANT = "SELECT tenant FROM jobs WHERE job_id = ?"
END_LEASE_OF_JOB = "DELETE FROM job_leases WHERE job_id = ? RETURNING job_id"
DELETE_FINISHED = "DELETE FROM jobs WHERE job_id = ? AND status <> 'processing'"
PURGE_FINISHED = """
    DELETE FROM jobs WHERE job_id IN (
        SELECT job_id FROM jobs WHERE status <> 'processing' AND updated_at < ?
        ORDER BY updated_at LIMIT ? {lock}
    )
"""
# The lease_until of a lease whose owner is gone: long past, so sweeps take it first.
EXPIRED = 0.0
# Beyond any input's length: the upper bound of "large".
NO_LIMIT = 2**62
# Well below both databases' limits on bound parameters per statement.
CHUNK = 300


class Transaction(Protocol):
    """One open transaction of a backend, with ``?`` placeholders already translated."""

    async def fetch(self, sql: str, params: Sequence[Any]) -> list[Row]:
        """Run a statement and return its rows."""

    async def execute(self, sql: str, params: Sequence[Any]) -> int:
        """Run a statement and return how many rows it changed."""

    async def execute_many(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        """Run a statement once per parameter row."""


@dataclass(frozen=True, slots=True)
class Dialect:
    """How one driver writes what the shared statements leave open."""

    placeholder: str  # "?" (sqlite3) or "%s" (psycopg)
    lock: str  # appended to the subqueries that pick rows to claim, fail or expire

    def render(self, template: str, **lists: str) -> str:
        """The statement for this driver, with ``{ids}``/``{rows}`` lists already expanded."""
        sql = template.replace("{lock}", self.lock)
        for name, marks in lists.items():
            sql = sql.replace("{" + name + "}", marks)
        return sql if self.placeholder == "?" else sql.replace("?", self.placeholder)


class Database(Protocol):
    """A backend: connections, transactions, and the liveness locks of owners."""

    @property
    def dialect(self) -> Dialect:
        """How this backend's driver writes placeholders and row locks."""

    @property
    def name(self) -> str:
        """The database, for messages (never with a password)."""

    @property
    def holds_owner_lock(self) -> bool:
        """Whether this process holds its liveness lock now; it claims nothing while not."""

    async def open(self, owner: str) -> None:
        """Connect, create or upgrade the schema, then take ``owner``'s liveness lock."""

    async def close(self) -> None:
        """Let go of the liveness lock and disconnect."""

    def transaction(self) -> AbstractAsyncContextManager[Transaction]:
        """A write transaction: committed on leaving, rolled back on an error (as StoreError)."""

    async def fetch(self, sql: str, params: Sequence[Any]) -> list[Row]:
        """Run one read-only statement outside any write transaction."""

    def tend_owner_locks(self, holding_leases: Collection[str]) -> None:
        """Keep this process's liveness lock where others look for it; tidy up after the gone.

        What gone owners left behind may be cleared away unless they hold a live lease
        (``holding_leases`` names the owners that do): it is the proof they are gone.
        """

    async def dead_owners(self, tx: Transaction, owners: Sequence[str]) -> set[str]:
        """Those of ``owners`` whose liveness lock is known to be free: they are gone.

        An owner whose lock cannot be checked is not among them: its leases run their course.
        """

    async def announce_release(self, tx: Transaction) -> None:
        """Tell other processes, once ``tx`` commits, that jobs were released."""

    async def take_purge_turn(self, tx: Transaction) -> bool:
        """Whether this process may purge now (for ``tx``): one process at a time does."""

    async def admit_one_at_a_time(self, tx: Transaction) -> None:
        """Make ``tx`` the only one counting unfinished jobs and inserting until it ends.

        So two processes cannot both see room for their jobs under MAX_QUEUED_JOBS.
        """

    async def return_free_space(self, tx: Transaction) -> None:
        """Give the space freed by deleted rows back, if the backend does not do it itself."""

    def on_jobs_released(self, wake: Callable[[], None]) -> None:
        """Call ``wake`` when another process announces released jobs, if the backend can."""


def marks(count: int, width: int = 1) -> str:
    """``?, ?, ?`` for an IN list, or ``(?, ?), (?, ?)`` for rows of ``width`` values."""
    row = "?" if width == 1 else "(" + ", ".join("?" * width) + ")"
    return ", ".join([row] * count)


def chunks(items: Sequence[T], size: int = CHUNK) -> Iterator[Sequence[T]]:
    """Consecutive slices of at most ``size`` items."""
    for start in range(0, len(items), size):
        yield items[start : start + size]


def fences(claims: Iterable[Claim]) -> list[Any]:
    """The values that must still match for these claims to act, flattened for ``{rows}``."""
    return [value for claim in claims for value in (claim.job_id, claim.owner, claim.attempt)]


async def upgrade_schema(
    tx: Transaction,
    migrations: Sequence[str],
    version: int,
    record: Callable[[int], Awaitable[object]],
    where: str,
) -> None:
    """Run, in ``tx``, the migrations after schema ``version``, calling ``record`` after each.

    Raises StoreCorruptError for a schema newer than this service knows: it is left untouched.
    """
    if version > len(migrations):
        raise StoreCorruptError(
            f"{where} has schema version {version}, newer than this service knows "
            f"({len(migrations)}); refusing to touch it"
        )
    for number, script in enumerate(migrations[version:], start=version + 1):
        for statement in filter(str.strip, script.split(";")):
            await tx.execute(statement, ())
        await record(number)
        logger.info("database %s upgraded to schema version %d", where, number)


@dataclass(frozen=True, slots=True)
class NewJob:
    """Insert a job, claimed by this process or reserved for it."""

    job_id: str
    input_json: str
    claimed: bool
    total_items: int
    tenant: str
    idempotency: Idempotency | None


# What an insert comes to: a claim or reservation, an earlier job replayed, or a refusal.
InsertAnswer = Claim | Replayed | StoreError


@dataclass(frozen=True, slots=True)
class Renewal:
    """Renew whatever is held when the transaction runs; record these runs' progress."""

    progress: Mapping[Claim, int]


@dataclass(frozen=True, slots=True)
class JobRequest:
    """Cancel or delete one job of one tenant."""

    job_id: str
    tenant: str


@dataclass(frozen=True, slots=True)
class Purge:
    """Remove up to ``limit`` jobs that finished before ``before`` (an ISO timestamp)."""

    before: str
    limit: int


@dataclass(frozen=True, slots=True)
class Finish:
    """Record a claim's outcome: a result, or an error."""

    claim: Claim
    output_json: str | None
    error: str | None


@dataclass(frozen=True, slots=True)
class ClaimAnswer:
    """A claim by id: the claim taken (or None), and whether the database was asked at all."""

    claim: Claim | None
    tried: bool


@dataclass(frozen=True, slots=True)
class SweepRequest:
    """Claim stale jobs for this many slots, large ones only as many as there are lanes."""

    slots: int
    lanes: int


class SQLJobStore:
    """The JobStore protocol over a ``Database``: one process's handle on the jobs."""

    def __init__(self, database: Database, policy: StorePolicy, clock: Clock, owner: str) -> None:
        self._db = database
        self._policy = policy
        self._clock = clock
        self._owner = owner
        self._held = ClaimRegistry()
        self._claiming = True
        self._sql = database.dialect.render
        self._exhausted_error = INTERRUPTED_TOO_OFTEN.format(attempts=policy.max_attempts)
        writes: GroupCommit[Transaction] = GroupCommit(database.transaction, clock)
        # In this order within a transaction: anything that renews what is held (renewals,
        # sweeps) comes before anything that ends a claim (finishes, releases), so a claim
        # ending in the same transaction is renewed, not mistaken for lost.
        self._inserts = writes.stage(self._apply_inserts, self._took)
        self._renewals = writes.stage(self._apply_renewals, self._lost)
        self._sweeps = writes.stage(self._apply_sweeps, self._swept)
        self._finishes = writes.stage(self._apply_finishes, self._ended)
        self._claims = writes.stage(self._apply_claims, self._converted)
        self._releases = writes.stage(self._apply_releases, self._released)
        self._cancels = writes.stage(self._apply_cancels, self._cancelled)
        self._deletions = writes.stage(self._apply_deletions)
        self._purges = writes.stage(self._apply_purges)
        self._writes = writes
        self._status_reads: Batcher[str, JobRecord | None] = Batcher(self._read_statuses)
        self._finished_listeners: list[Callable[[Iterable[str]], None]] = []

    @property
    def owner(self) -> str:
        """The owner id of this process."""
        return self._owner

    @property
    def held(self) -> ClaimRegistry:
        """The claims and reservations this process holds."""
        return self._held

    @property
    def database(self) -> Database:
        """The backend (for tests and diagnostics)."""
        return self._db

    async def open(self) -> None:
        """Connect, migrate, and take this owner's liveness lock."""
        await self._db.open(self._owner)

    async def close(self) -> None:
        """Apply what is queued, then let go of the liveness lock and disconnect."""
        await self.flush()
        await self._db.close()

    async def flush(self) -> None:
        """Wait until every write and read queued so far is done."""
        await self._writes.flush()
        await self._status_reads.flush()

    async def ping(self) -> None:
        """Raise StoreError unless a query answers."""
        await self._db.fetch("SELECT 1", ())

    def stop_claiming(self) -> None:
        """Take no more claims; new jobs are only reserved."""
        self._claiming = False

    def abandon(self, claim: Claim) -> None:
        """Stop holding ``claim``; its lease runs out and a sweep retries the job."""
        self._held.discard([claim])

    def on_jobs_released(self, wake: Callable[[], None]) -> None:
        """Call ``wake`` when another process releases jobs, if the backend can tell."""
        self._db.on_jobs_released(wake)

    def on_jobs_finished(self, finished: Callable[[Iterable[str]], None]) -> None:
        """Call ``finished`` with the ids of the jobs this process's writes finish."""
        self._finished_listeners.append(finished)

    def _report_finished(self, job_ids: Sequence[str]) -> None:
        if job_ids:
            for finished in self._finished_listeners:
                finished(job_ids)

    def _can_claim(self) -> bool:
        return self._claiming and self._db.holds_owner_lock

    # Inserts.

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
        """Insert a job claimed by this process (attempt 1) or reserved for it (attempt 0).

        With an idempotency key used before: that job, or an error if the request differs.
        """
        op = NewJob(job_id, input_json, claimed, total_items, tenant, idempotency)
        answer = await self._inserts.submit(op)
        if isinstance(answer, StoreError):
            raise answer
        return answer

    async def _apply_inserts(
        self, tx: Transaction, ops: Sequence[NewJob], now: float
    ) -> list[InsertAnswer]:
        """Replay repeated submissions, refuse those past the queue's bound, insert the rest."""
        answers = await self._repeated_submissions(tx, ops)
        new = [i for i, op in enumerate(ops) if i not in answers]
        [(unfinished,)] = await tx.fetch(self._sql(COUNT_UNFINISHED), ())
        if unfinished + len(new) > self._policy.max_unfinished_jobs - ADMISSION_SLACK:
            # Near the bound, processes count and insert in turn, so two of them cannot both
            # take the last places; far from it, they need not wait for each other.
            await self._db.admit_one_at_a_time(tx)
            [(unfinished,)] = await tx.fetch(self._sql(COUNT_UNFINISHED), ())
        room = max(0, self._policy.max_unfinished_jobs - unfinished)
        refused_at = set(new[room:])
        refused = {ops[i].job_id for i in refused_at}
        for i in range(len(ops)):
            # Refused, or a repeat of a refused submission in this batch: nothing is stored.
            answer = answers.get(i)
            if i in refused_at or (isinstance(answer, Replayed) and answer.job_id in refused):
                answers[i] = QueueFullError(
                    f"{self._policy.max_unfinished_jobs} jobs are unfinished; retry later"
                )
        inserted = [ops[i] for i in new[:room]]
        claims = await self._insert(tx, inserted, now) if inserted else []
        lost = {ops[i].job_id for i, claim in zip(new[:room], claims, strict=True) if not claim}
        answers.update((i, claim) for i, claim in zip(new[:room], claims, strict=True) if claim)
        for i, op in enumerate(ops):
            answer = answers.get(i)
            if op.job_id in lost or (isinstance(answer, Replayed) and answer.job_id in lost):
                # Another process committed this idempotency key meanwhile (the unique index
                # said so): answer as for a key used before, now that its job is visible.
                again = await self._repeated_submissions(tx, [op])
                answers[i] = again.get(0) or StoreConflictError(
                    "idempotency key contended", "another submission with this key is in flight"
                )
        return [answers[i] for i in range(len(ops))]

    async def _repeated_submissions(
        self, tx: Transaction, ops: Sequence[NewJob]
    ) -> dict[int, InsertAnswer]:
        """Answers for submissions whose idempotency key was used before (or earlier here).

        The first job again if the request was the same, an error if it was not.
        """
        keyed = [(i, op) for i, op in enumerate(ops) if op.idempotency is not None]
        if not keyed:
            return {}
        first: dict[tuple[str, str], tuple[str, str]] = {}  # (tenant, key) -> (job, hash)
        keys = list(dict.fromkeys(op.idempotency.key for _, op in keyed if op.idempotency))
        for chunk in chunks(keys):
            sql = self._sql(KEYS_IN_USE, keys=marks(len(chunk)))
            for tenant, key, job_id, request_hash in await tx.fetch(sql, chunk):
                first[(tenant, key)] = (job_id, request_hash)
        answers: dict[int, InsertAnswer] = {}
        for i, op in keyed:
            assert op.idempotency is not None
            seen = first.setdefault(
                (op.tenant, op.idempotency.key), (op.job_id, op.idempotency.request_hash)
            )
            if seen[0] == op.job_id:
                continue  # the first use of this key: inserted
            if seen[1] == op.idempotency.request_hash:
                answers[i] = Replayed(seen[0])
            else:
                answers[i] = IdempotencyKeyReusedError(op.idempotency.key)
        return answers

    async def _insert(
        self, tx: Transaction, ops: Sequence[NewJob], now: float
    ) -> list[Claim | None]:
        """Insert the jobs and their leases; None for each one left out.

        A job is left out when another process has committed its idempotency key since the
        key was looked up.
        """
        claiming = self._can_claim()
        stamp = iso_utc(now)
        grace = now + self._policy.claim_grace_seconds
        until = now + self._policy.lease_seconds
        rows = [
            (
                op.job_id,
                op.tenant,
                stamp,
                stamp,
                op.idempotency.key if op.idempotency else None,
                op.idempotency.request_hash if op.idempotency else None,
                op.input_json,
            )
            for op in ops
        ]
        await tx.execute_many(
            self._sql(INSERT_JOB),
            [row for op, row in zip(ops, rows, strict=True) if op.idempotency is None],
        )
        claims: list[Claim | None] = []
        for op, row in zip(ops, rows, strict=True):
            # A keyed job is inserted on its own: the unique index on its key decides a race
            # with another process (which this transaction could not see), without an error
            # that would roll back the others.
            if op.idempotency is not None and not await tx.fetch(self._sql(INSERT_KEYED_JOB), row):
                claims.append(None)
            else:
                claims.append(Claim(op.job_id, self._owner, int(op.claimed and claiming)))
        leases = [
            (
                op.job_id,
                self._owner,
                claim.attempt,
                grace if claim.is_reservation else until,
                len(op.input_json),
                op.total_items,
            )
            for op, claim in zip(ops, claims, strict=True)
            if claim is not None
        ]
        await tx.execute_many(self._sql(INSERT_LEASE), leases)
        return claims

    def _took(self, ops: Sequence[NewJob], answers: Sequence[InsertAnswer]) -> None:
        self._held.add(answer for answer in answers if isinstance(answer, Claim))

    # Renewals.

    async def renew(self, progress: Mapping[Claim, int] | None = None) -> set[Claim]:
        """Extend the lease of every claim held, record progress; return those found lost."""
        return await self._renewals.submit(Renewal(progress or {}))

    async def _apply_renewals(
        self, tx: Transaction, ops: Sequence[Renewal], now: float
    ) -> list[set[Claim]]:
        lost = await self._renew_held(tx, now)
        progress = {claim: done for op in ops for claim, done in op.progress.items()}
        rows = [(done, *fences([claim])) for claim, done in progress.items() if claim not in lost]
        if rows:
            await tx.execute_many(self._sql(RECORD_PROGRESS), rows)
        return [lost] * len(ops)

    async def _renew_held(self, tx: Transaction, now: float) -> set[Claim]:
        """Renew every claim held now; return those whose lease rows no longer name them.

        A lease that ran out while this process was paused is renewed all the same, as long as
        nobody took it meanwhile: a pause is not an interruption.
        """
        held = self._held.running()
        renewed: set[Claim] = set()
        until = now + self._policy.lease_seconds
        for chunk in chunks(held):
            sql = self._sql(RENEW, rows=marks(len(chunk), width=3))
            rows = await tx.fetch(sql, (until, *fences(chunk)))
            renewed.update(Claim(job_id, owner, attempt) for job_id, owner, attempt in rows)
        return set(held) - renewed

    def _lost(self, ops: Sequence[Renewal], lost: Sequence[set[Claim]]) -> None:
        for claims in lost:
            self._held.discard(claims)

    # Finishes.

    async def finish(self, claim: Claim, *, output_json: str | None, error: str | None) -> bool:
        """Record the outcome, fenced by the whole claim; the claim is not held afterwards."""
        return await self._finishes.submit(Finish(claim, output_json, error))

    async def _apply_finishes(
        self, tx: Transaction, ops: Sequence[Finish], now: float
    ) -> list[bool]:
        """End the leases still held by these claims, then record those claims' outcomes."""
        current: set[Claim] = set()
        for chunk in chunks(list(dict.fromkeys(op.claim for op in ops))):
            sql = self._sql(END_LEASES, rows=marks(len(chunk), width=3))
            rows = await tx.fetch(sql, fences(chunk))
            current.update(Claim(job_id, owner, attempt) for job_id, owner, attempt in rows)
        stamp = iso_utc(now)
        landed: list[bool] = []
        outcomes = []
        for op in ops:
            landed.append(op.claim in current)
            if op.claim in current:
                current.discard(op.claim)  # the same claim finished twice: the first wins
                status = outcome_status(op.error).value
                outcomes.append((status, op.output_json, op.error, stamp, op.claim.job_id))
        if outcomes:
            await tx.execute_many(self._sql(RECORD_OUTCOME), outcomes)
        return landed

    def _ended(self, ops: Sequence[Finish], landed: Sequence[bool]) -> None:
        self._held.discard(op.claim for op in ops)
        finished = [op for op, ok in zip(ops, landed, strict=True) if ok]
        failed = sum(outcome_status(op.error) is JobStatus.FAILED for op in finished)
        metrics.count_finished(JobStatus.COMPLETED, len(finished) - failed)
        metrics.count_finished(JobStatus.FAILED, failed)
        self._report_finished([op.claim.job_id for op in finished])

    # Claims by id.

    async def claim(self, job_id: str) -> Claim | None:
        """Claim the job: this owner's reservation of it, or a free or stale lease."""
        return (await self._claims.submit(job_id)).claim

    async def _apply_claims(
        self, tx: Transaction, job_ids: Sequence[str], now: float
    ) -> list[ClaimAnswer]:
        if not self._can_claim():
            return [ClaimAnswer(None, tried=False)] * len(job_ids)
        until = now + self._policy.lease_seconds
        attempts: dict[str, int] = {}
        for chunk in chunks(list(dict.fromkeys(job_ids))):
            sql = self._sql(CLAIM, ids=marks(len(chunk)))
            params = (self._owner, until, *chunk, self._policy.max_attempts, now, self._owner)
            attempts.update((job_id, attempt) for job_id, attempt in await tx.fetch(sql, params))
        answers = []
        for job_id in job_ids:
            # The same job asked for twice in one batch is claimed once, by the first.
            attempt = attempts.pop(job_id, None)
            claim = None if attempt is None else Claim(job_id, self._owner, attempt)
            answers.append(ClaimAnswer(claim, tried=True))
        return answers

    def _converted(self, job_ids: Sequence[str], answers: Sequence[ClaimAnswer]) -> None:
        for job_id, answer in zip(job_ids, answers, strict=True):
            if answer.tried:
                # Claimed or not, this owner's reservation of the job is gone: a reservation
                # can always be claimed by its owner, unless another process has taken it.
                self._held.discard([Claim(job_id, self._owner, 0)])
            if answer.claim is not None:
                self._held.add([answer.claim])

    # Releases.

    async def release(self, claims: Iterable[Claim]) -> None:
        """Drop these leases and reservations now: the next sweep of any process takes them."""
        claims = tuple(claims)
        if claims:
            await self._releases.submit(claims)

    async def _apply_releases(
        self, tx: Transaction, ops: Sequence[tuple[Claim, ...]], now: float
    ) -> list[None]:
        claims = list(dict.fromkeys(claim for op in ops for claim in op))
        for chunk in chunks(claims):
            await tx.execute(
                self._sql(RELEASE, rows=marks(len(chunk), width=3)), (now, *fences(chunk))
            )
        await self._db.announce_release(tx)
        return [None] * len(ops)

    def _released(self, ops: Sequence[tuple[Claim, ...]], results: Sequence[None]) -> None:
        for claims in ops:
            self._held.discard(claims)

    # Sweeps.

    async def sweep(self, *, slots: int, lanes: int) -> Swept:
        """Renew what is held, expire dead owners' leases, fail exhausted jobs, claim stale ones."""
        return await self._sweeps.submit(SweepRequest(slots, lanes))

    async def _apply_sweeps(
        self, tx: Transaction, ops: Sequence[SweepRequest], now: float
    ) -> list[Swept]:
        lost = await self._renew_held(tx, now)
        await self._expire_dead_owners(tx, now)
        failed = await self._fail_exhausted(tx, now)
        results = []
        for op in ops:
            swept = Swept(lost=lost, failed=failed)
            if self._can_claim():
                lanes = min(op.lanes, op.slots)
                swept.large.extend(await self._claim_stale(tx, now, lanes, large=True))
                slots = op.slots - len(swept.large)
                swept.small.extend(await self._claim_stale(tx, now, slots, large=False))
            results.append(swept)
        return results

    async def _expire_dead_owners(self, tx: Transaction, now: float) -> None:
        owners = [owner for (owner,) in await tx.fetch(self._sql(LIVE_OWNERS), (self._owner, now))]
        self._db.tend_owner_locks(owners)
        if not owners:
            return
        dead = sorted(await self._db.dead_owners(tx, owners))
        for chunk in chunks(dead):
            sql = self._sql(EXPIRE_OWNERS, owners=marks(len(chunk)))
            expired = await tx.execute(sql, (EXPIRED, *chunk, now))
            logger.info(
                "owners %s are gone (their liveness locks are free): %d jobs they held are "
                "stale now",
                ", ".join(chunk),
                expired,
            )

    async def _fail_exhausted(self, tx: Transaction, now: float) -> list[str]:
        params = (now, self._policy.max_attempts)
        exhausted = [job_id for (job_id,) in await tx.fetch(self._sql(FAIL_EXHAUSTED), params)]
        if exhausted:
            stamp = iso_utc(now)
            failed = JobStatus.FAILED.value
            rows = [(failed, None, self._exhausted_error, stamp, job_id) for job_id in exhausted]
            await tx.execute_many(self._sql(RECORD_OUTCOME), rows)
        return exhausted

    async def _claim_stale(
        self, tx: Transaction, now: float, limit: int, *, large: bool
    ) -> list[Claim]:
        if limit <= 0:
            return []
        threshold = self._policy.large_input_length
        low, high = (threshold, NO_LIMIT) if large else (0, threshold)
        until = now + self._policy.lease_seconds
        params = (self._owner, until, now, self._policy.max_attempts, low, high, limit)
        rows = await tx.fetch(self._sql(CLAIM_STALE), params)
        return [Claim(job_id, self._owner, attempt) for job_id, attempt in rows]

    def _swept(self, ops: Sequence[SweepRequest], results: Sequence[Swept]) -> None:
        for swept in results:
            claimed = [*swept.large, *swept.small]
            self._held.discard(swept.lost)
            # A reservation of this process's own, past its grace time, may be among them.
            self._held.discard(Claim(claim.job_id, self._owner, 0) for claim in claimed)
            self._held.add(claimed)
        failed = list(dict.fromkeys(j for swept in results for j in swept.failed))
        metrics.count_finished(JobStatus.FAILED, len(failed))
        for job_id in failed:  # the job's finished line: no run of it is left to write one
            logger.error(
                "job %s: failed: %s",
                job_id,
                self._exhausted_error,
                extra={**job_fields(job_id), "status": JobStatus.FAILED.value},
            )
        self._report_finished(failed)

    # Cancels, deletions, purges.

    async def cancel_job(self, job_id: str, *, tenant: str) -> CancelResult:
        """Fail a processing job as cancelled, fencing out any run of it that is still going."""
        return await self._cancels.submit(JobRequest(job_id, tenant))

    async def _apply_cancels(
        self, tx: Transaction, ops: Sequence[JobRequest], now: float
    ) -> list[CancelResult]:
        results = []
        for op in ops:
            if not await self._is_tenants(tx, op):
                results.append(CancelResult.NOT_FOUND)
            elif not await tx.fetch(self._sql(END_LEASE_OF_JOB), (op.job_id,)):
                results.append(CancelResult.FINISHED)  # no lease: it has finished
            else:
                failed = (JobStatus.FAILED.value, None, CANCELLED_ERROR, iso_utc(now), op.job_id)
                await tx.execute(self._sql(RECORD_OUTCOME), failed)
                results.append(CancelResult.CANCELLED)
        return results

    def _cancelled(self, ops: Sequence[JobRequest], results: Sequence[CancelResult]) -> None:
        done = [
            op.job_id
            for op, result in zip(ops, results, strict=True)
            if result is CancelResult.CANCELLED
        ]
        # Whatever this process held of those jobs is void now: their lease rows are gone.
        cancelled = set(done)
        self._held.discard([claim for claim in self._held if claim.job_id in cancelled])
        metrics.count_finished(JobStatus.FAILED, len(done))
        metrics.JOBS_CANCELLED.inc(len(done))
        self._report_finished(done)

    async def _is_tenants(self, tx: Transaction, op: JobRequest) -> bool:
        """Whether the job exists and belongs to the request's tenant (others see nothing)."""
        rows = await tx.fetch(self._sql(JOB_TENANT), (op.job_id,))
        return bool(rows) and rows[0][0] == op.tenant

    async def delete_job(self, job_id: str, *, tenant: str) -> DeleteResult:
        """Remove a finished job of this tenant: its row, input and result."""
        return await self._deletions.submit(JobRequest(job_id, tenant))

    async def _apply_deletions(
        self, tx: Transaction, ops: Sequence[JobRequest], now: float
    ) -> list[DeleteResult]:
        results = []
        for op in ops:
            if not await self._is_tenants(tx, op):
                results.append(DeleteResult.NOT_FOUND)
            elif await tx.execute(self._sql(DELETE_FINISHED), (op.job_id,)):
                results.append(DeleteResult.DELETED)
            else:
                results.append(DeleteResult.PROCESSING)
        return results

    async def purge_expired(self, finished_before: float, limit: int) -> int:
        """Remove up to ``limit`` jobs finished before then; 0 if another process purges."""
        return await self._purges.submit(Purge(iso_utc(finished_before), limit))

    async def _apply_purges(self, tx: Transaction, ops: Sequence[Purge], now: float) -> list[int]:
        if not await self._db.take_purge_turn(tx):
            return [0] * len(ops)
        removed = [await tx.execute(self._sql(PURGE_FINISHED), (op.before, op.limit)) for op in ops]
        if any(removed):
            await self._db.return_free_space(tx)
        return removed

    # Reads.

    async def get_job(
        self, job_id: str, *, with_output: bool = False, tenant: str | None = None
    ) -> JobRecord | None:
        """Return the job (if it is ``tenant``'s, unless None), its output only if asked."""
        if with_output:
            job = await self._read_result(job_id)
        else:
            job = await self._status_reads.submit(job_id)
        if job is None or (tenant is not None and job.tenant != tenant):
            return None
        return job

    async def _read_result(self, job_id: str) -> JobRecord | None:
        rows = await self._db.fetch(self._sql(RESULT), (job_id,))
        if not rows:
            return None
        status, created_at, updated_at, output_data, error, tenant = rows[0]
        return JobRecord(
            job_id, JobStatus(status), created_at, updated_at, output_data, error, tenant
        )

    async def _read_statuses(self, job_ids: Sequence[str]) -> list[JobRecord | None]:
        """One query for every status asked for at the same moment (two if some are running)."""
        found: dict[str, JobRecord] = {}
        for chunk in chunks(list(dict.fromkeys(job_ids))):
            rows = await self._db.fetch(self._sql(STATUSES, ids=marks(len(chunk))), chunk)
            for job_id, status, created_at, updated_at, error, tenant in rows:
                found[job_id] = JobRecord(
                    job_id, JobStatus(status), created_at, updated_at, None, error, tenant
                )
        processing = [j for j, job in found.items() if job.status is JobStatus.PROCESSING]
        for chunk in chunks(processing):
            rows = await self._db.fetch(self._sql(PROGRESS, ids=marks(len(chunk))), chunk)
            for job_id, done, total in rows:
                found[job_id] = replace(found[job_id], progress=Progress(done, total))
        return [found.get(job_id) for job_id in job_ids]

    async def list_jobs(
        self, *, tenant: str, status: JobStatus | None, limit: int, after: Cursor | None
    ) -> list[JobSummary]:
        """The tenant's jobs newest first, after the cursor (or from the newest)."""
        created_at, job_id = after or NEWEST
        keyset = (created_at, job_id, limit)
        if status is None:
            rows = await self._db.fetch(self._sql(LIST_JOBS), (tenant, *keyset))
        else:
            params = (tenant, status.value, *keyset)
            sql = LIST_PROCESSING_JOBS if status is JobStatus.PROCESSING else LIST_JOBS_WITH_STATUS
            rows = await self._db.fetch(self._sql(sql), params)
        return [
            JobSummary(job_id, JobStatus(status), created_at, updated_at)
            for job_id, status, created_at, updated_at in rows
        ]

    async def still_processing(self, job_ids: Sequence[str]) -> set[str]:
        """Those of these jobs that are processing: the ones with a lease row (an index read)."""
        found: set[str] = set()
        for chunk in chunks(list(job_ids)):
            sql = self._sql(LEASED, ids=marks(len(chunk)))
            found.update(job_id for (job_id,) in await self._db.fetch(sql, chunk))
        return found

    async def count_unfinished(self) -> int:
        """How many jobs are processing, in the whole database (one count of the lease rows)."""
        [(unfinished,)] = await self._db.fetch(self._sql(COUNT_UNFINISHED), ())
        return int(unfinished)

    async def load_input(self, job_id: str) -> str | None:
        """Return the job's input JSON."""
        rows = await self._db.fetch(self._sql(INPUT), (job_id,))
        return str(rows[0][0]) if rows else None
