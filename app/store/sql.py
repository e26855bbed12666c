"""The lease protocol, written once: the statements and the logic both SQL backends run.

A backend supplies a transaction (and a way to read outside one) and says how its driver
writes placeholders and row locks; everything about jobs and leases is here. Statements are
written with ``?`` placeholders and a ``{lock}`` slot after the subqueries that pick rows to
claim or fail: SQLite fills it with nothing (it has one writer at a time), PostgreSQL with
``FOR UPDATE SKIP LOCKED``, so concurrent replicas skip the rows another is taking rather
than wait for them or take them twice.

Times are the application's clock (seconds since the epoch), not the database's, so a
lease means the same on every backend and tests can move the clock.
"""

import logging
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Iterable, Iterator, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from app.batching import Batcher
from app.jobs import Claim, JobStatus
from app.store import (
    INTERRUPTED_TOO_OFTEN,
    Clock,
    JobRecord,
    LeasePolicy,
    StoreConflictError,
    StoreCorruptError,
    iso_utc,
)

logger = logging.getLogger(__name__)

T = TypeVar("T")
Row = Sequence[Any]

# A job has a job_leases row exactly while it is processing. A lease is live while
# lease_until >= now; an unclaimed job's lease_until is the end of its grace time.
INSERT_JOB = """
    INSERT INTO jobs (job_id, status, created_at, updated_at, input_data)
    VALUES (?, 'processing', ?, ?, ?)
"""
INSERT_LEASE = "INSERT INTO job_leases (job_id, owner, attempts, lease_until) VALUES (?, ?, ?, ?)"
# Claims and finishes of one batch are each one statement; RETURNING says which landed.
CLAIM = """
    UPDATE job_leases SET owner = ?, attempts = attempts + 1, lease_until = ?
    WHERE job_id IN (
        SELECT job_id FROM job_leases
        WHERE job_id IN ({ids}) AND attempts < ? AND (owner IS NULL OR lease_until < ?)
        {lock}
    )
    RETURNING job_id, attempts
"""
END_LEASES = """
    DELETE FROM job_leases WHERE (job_id, owner, attempts) IN (VALUES {rows})
    RETURNING job_id
"""
RECORD_OUTCOME = """
    UPDATE jobs SET status = ?, output_data = ?, error = ?, updated_at = ? WHERE job_id = ?
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
        SELECT job_id FROM job_leases WHERE lease_until < ? AND attempts < ?
        ORDER BY lease_until LIMIT ? {lock}
    )
    RETURNING job_id, attempts
"""
RENEW = """
    UPDATE job_leases SET lease_until = ? WHERE (job_id, owner, attempts) IN (VALUES {rows})
    RETURNING job_id
"""
RELEASE = """
    UPDATE job_leases SET owner = NULL, lease_until = ?
    WHERE job_id = ? AND owner = ? AND attempts = ?
"""
END_GRACE = "UPDATE job_leases SET lease_until = ? WHERE job_id IN ({ids}) AND owner IS NULL"
STATUSES = "SELECT job_id, status, created_at, updated_at, error FROM jobs WHERE job_id IN ({ids})"
RESULT = "SELECT status, created_at, updated_at, output_data, error FROM jobs WHERE job_id = ?"
INPUT = "SELECT input_data FROM jobs WHERE job_id = ?"
# Well below both databases' limits on bound parameters per statement.
CHUNK = 500
# Tries of a write batch that the database rolls back to break a deadlock.
CONFLICT_RETRIES = 3


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
    lock: str  # appended to the subqueries that pick rows to claim or fail

    def render(self, template: str, **lists: str) -> str:
        """The statement for this driver, with ``{ids}``/``{rows}`` lists already expanded."""
        sql = template.replace("{lock}", self.lock)
        for name, marks in lists.items():
            sql = sql.replace("{" + name + "}", marks)
        return sql if self.placeholder == "?" else sql.replace("?", self.placeholder)


def marks(count: int, width: int = 1) -> str:
    """``?, ?, ?`` for an IN list, or ``(?, ?), (?, ?)`` for rows of ``width`` values."""
    row = "?" if width == 1 else "(" + ", ".join("?" * width) + ")"
    return ", ".join([row] * count)


def chunks(items: Sequence[T], size: int = CHUNK) -> Iterator[Sequence[T]]:
    """Consecutive slices of at most ``size`` items."""
    for start in range(0, len(items), size):
        yield items[start : start + size]


def fence(claim: Claim) -> tuple[str, str, int]:
    """What must still match for a claim to act: the job, its owner and the attempt."""
    return claim.job_id, claim.owner, claim.attempt


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


def outcome_status(error: str | None) -> JobStatus:
    """The final status of a job that ended with this error (or none)."""
    return JobStatus.FAILED if error is not None else JobStatus.COMPLETED


@dataclass(frozen=True, slots=True)
class _Insert:
    job_id: str
    input_json: str
    owner: str | None


@dataclass(frozen=True, slots=True)
class _Claim:
    job_id: str
    owner: str


@dataclass(frozen=True, slots=True)
class _Finish:
    claim: Claim
    output_json: str | None
    error: str | None


@dataclass(frozen=True, slots=True)
class _Renew:
    claims: tuple[Claim, ...]


@dataclass(frozen=True, slots=True)
class _Release:
    claims: tuple[Claim, ...]
    unclaimed: tuple[str, ...]


_Write = _Insert | _Claim | _Finish | _Renew | _Release


class SQLJobStore(ABC):
    """The JobStore protocol over any backend that can open a transaction.

    Inserts, claims, finishes, renewals and releases issued while a write transaction is in
    flight all go into the next one (group commit; each caller is still answered only after
    its commit), and status lookups made at the same moment share one query. Going through
    that one queue also means a process's own writes to its leases never run in two
    transactions at once, so a heartbeat cannot deadlock with a finish on PostgreSQL's locks.
    """

    def __init__(self, policy: LeasePolicy, clock: Clock, dialect: Dialect) -> None:
        self._policy = policy
        self._clock = clock
        self._dialect = dialect
        self._exhausted_error = INTERRUPTED_TOO_OFTEN.format(attempts=policy.max_attempts)
        self._writes: Batcher[_Write, Any] = Batcher(self._apply_writes)
        self._status_reads: Batcher[str, JobRecord | None] = Batcher(self._read_statuses)

    @abstractmethod
    def _transaction(self) -> AbstractAsyncContextManager[Transaction]:
        """A write transaction: committed on leaving, rolled back on an error (as StoreError)."""

    @abstractmethod
    async def _fetch(self, sql: str, params: Sequence[Any]) -> list[Row]:
        """Run one read-only statement outside any write transaction."""

    def _sql(self, template: str, **lists: str) -> str:
        return self._dialect.render(template, **lists)

    async def _flush(self) -> None:
        """Apply what is queued; a backend calls this before it closes."""
        await self._writes.flush()
        await self._status_reads.flush()

    async def ping(self) -> None:
        """Raise StoreError unless a query answers."""
        await self._fetch("SELECT 1", ())

    async def create_job(
        self, job_id: str, input_json: str, owner: str | None = None
    ) -> Claim | None:
        """Insert a job claimed by ``owner`` (its first attempt), or unclaimed without one.

        An unclaimed job may be taken by any process's sweep once its grace time is over.
        """
        await self._writes.submit(_Insert(job_id, input_json, owner))
        return Claim(job_id, owner, 1) if owner is not None else None

    async def claim(self, job_id: str, owner: str) -> Claim | None:
        """Claim the job if it is processing, has attempts left and no live lease."""
        claim: Claim | None = await self._writes.submit(_Claim(job_id, owner))
        return claim

    async def finish(self, claim: Claim, *, output_json: str | None, error: str | None) -> bool:
        """Record the outcome, fenced by the claim's owner and attempt."""
        landed: bool = await self._writes.submit(_Finish(claim, output_json, error))
        return landed

    async def _apply_writes(self, ops: Sequence[_Write]) -> list[Any]:
        """Apply one batch; again if the database rolled it back to break a deadlock.

        Each try is one transaction, all or nothing, so running it again is safe.
        """
        for attempt in range(1, CONFLICT_RETRIES + 1):
            try:
                return await self._apply_writes_once(ops)
            except StoreConflictError as error:
                if attempt == CONFLICT_RETRIES:
                    raise
                logger.warning("write batch rolled back (%s); running it again", error)
        raise AssertionError("unreachable")

    async def _apply_writes_once(self, ops: Sequence[_Write]) -> list[Any]:
        """Apply one batch in one transaction: inserts, claims, finishes, renewals, releases."""
        now = self._clock()
        results: dict[int, Any] = {}
        async with self._transaction() as tx:
            inserts = [(i, op) for i, op in enumerate(ops) if isinstance(op, _Insert)]
            if inserts:
                grace = now + self._policy.claim_grace_seconds
                until = now + self._policy.lease_seconds
                stamp = iso_utc(now)
                jobs = [(op.job_id, stamp, stamp, op.input_json) for _, op in inserts]
                await tx.execute_many(self._sql(INSERT_JOB), jobs)
                leases = [
                    (op.job_id, None, 0, grace)
                    if op.owner is None
                    else (op.job_id, op.owner, 1, until)
                    for _, op in inserts
                ]
                await tx.execute_many(self._sql(INSERT_LEASE), leases)
                results.update((i, None) for i, _ in inserts)
            claims = [(i, op) for i, op in enumerate(ops) if isinstance(op, _Claim)]
            results.update(await self._apply_claims(tx, claims, now))
            finishes = [(i, op) for i, op in enumerate(ops) if isinstance(op, _Finish)]
            results.update(await self._apply_finishes(tx, finishes, now))
            renewals = [(i, op) for i, op in enumerate(ops) if isinstance(op, _Renew)]
            results.update(await self._apply_renewals(tx, renewals, now))
            releases = [(i, op) for i, op in enumerate(ops) if isinstance(op, _Release)]
            if releases:
                rows = [(now, *fence(c)) for _, op in releases for c in op.claims]
                if rows:
                    await tx.execute_many(self._sql(RELEASE), rows)
                for chunk in chunks([job_id for _, op in releases for job_id in op.unclaimed]):
                    await tx.execute(self._sql(END_GRACE, ids=marks(len(chunk))), (now, *chunk))
                results.update((i, None) for i, _ in releases)
        return [results[i] for i in range(len(ops))]

    async def _apply_renewals(
        self, tx: Transaction, renewals: list[tuple[int, _Renew]], now: float
    ) -> dict[int, set[str]]:
        """Extend the leases still held by these claims; say which, per request."""
        until = now + self._policy.lease_seconds
        claims = [claim for _, op in renewals for claim in op.claims]
        held: set[str] = set()
        for chunk in chunks(claims):
            fences = [value for claim in chunk for value in fence(claim)]
            sql = self._sql(RENEW, rows=marks(len(chunk), width=3))
            held.update(job_id for (job_id,) in await tx.fetch(sql, (until, *fences)))
        return {i: {c.job_id for c in op.claims if c.job_id in held} for i, op in renewals}

    async def _apply_claims(
        self, tx: Transaction, claims: list[tuple[int, _Claim]], now: float
    ) -> dict[int, Claim | None]:
        results: dict[int, Claim | None] = {}
        until = now + self._policy.lease_seconds
        for owner in {op.owner for _, op in claims}:
            wanted = [(i, op.job_id) for i, op in claims if op.owner == owner]
            attempts: dict[str, int] = {}
            ids = list(dict.fromkeys(job_id for _, job_id in wanted))
            for chunk in chunks(ids):
                sql = self._sql(CLAIM, ids=marks(len(chunk)))
                params = (owner, until, *chunk, self._policy.max_attempts, now)
                rows = await tx.fetch(sql, params)
                attempts.update((job_id, attempt) for job_id, attempt in rows)
            for i, job_id in wanted:
                # The same job asked for twice in one batch is claimed once, by the first.
                attempt = attempts.pop(job_id, None)
                results[i] = Claim(job_id, owner, attempt) if attempt is not None else None
        return results

    async def _apply_finishes(
        self, tx: Transaction, finishes: list[tuple[int, _Finish]], now: float
    ) -> dict[int, bool]:
        """End the leases still held by these claims, then record those jobs' outcomes."""
        landed: set[str] = set()
        for chunk in chunks(finishes):
            fences = [value for _, op in chunk for value in fence(op.claim)]
            sql = self._sql(END_LEASES, rows=marks(len(chunk), width=3))
            landed.update(job_id for (job_id,) in await tx.fetch(sql, fences))
        stamp = iso_utc(now)
        outcomes = [
            (outcome_status(op.error).value, op.output_json, op.error, stamp, op.claim.job_id)
            for _, op in finishes
            if op.claim.job_id in landed
        ]
        if outcomes:
            await tx.execute_many(self._sql(RECORD_OUTCOME), outcomes)
        return {i: op.claim.job_id in landed for i, op in finishes}

    async def get_job(self, job_id: str, *, with_output: bool = False) -> JobRecord | None:
        """Return the job, with its output only if asked (it can be megabytes)."""
        if not with_output:
            return await self._status_reads.submit(job_id)
        rows = await self._fetch(self._sql(RESULT), (job_id,))
        if not rows:
            return None
        status, created_at, updated_at, output_data, error = rows[0]
        return JobRecord(job_id, JobStatus(status), created_at, updated_at, output_data, error)

    async def _read_statuses(self, job_ids: Sequence[str]) -> list[JobRecord | None]:
        """One query for every status asked for at the same moment."""
        found: dict[str, JobRecord] = {}
        unique = list(dict.fromkeys(job_ids))
        for chunk in chunks(unique):
            rows = await self._fetch(self._sql(STATUSES, ids=marks(len(chunk))), chunk)
            for job_id, status, created_at, updated_at, error in rows:
                found[job_id] = JobRecord(
                    job_id, JobStatus(status), created_at, updated_at, None, error
                )
        return [found.get(job_id) for job_id in job_ids]

    async def load_input(self, job_id: str) -> str | None:
        """Return the job's input JSON."""
        rows = await self._fetch(self._sql(INPUT), (job_id,))
        return str(rows[0][0]) if rows else None

    async def claim_stale(self, owner: str, limit: int) -> list[Claim]:
        """Fail stale jobs that used up their attempts, then claim up to ``limit`` others."""
        now = self._clock()
        max_attempts = self._policy.max_attempts
        async with self._transaction() as tx:
            exhausted = await tx.fetch(self._sql(FAIL_EXHAUSTED), (now, max_attempts))
            if exhausted:
                stamp = iso_utc(now)
                failed = [
                    (JobStatus.FAILED.value, None, self._exhausted_error, stamp, job_id)
                    for (job_id,) in exhausted
                ]
                await tx.execute_many(self._sql(RECORD_OUTCOME), failed)
                for (job_id,) in exhausted:
                    logger.error("job %s failed: %s", job_id, self._exhausted_error)
            if limit <= 0:
                return []
            until = now + self._policy.lease_seconds
            params = (owner, until, now, max_attempts, limit)
            rows = await tx.fetch(self._sql(CLAIM_STALE), params)
        return [Claim(job_id, owner, attempt) for job_id, attempt in rows]

    async def renew(self, claims: Iterable[Claim]) -> set[str]:
        """Extend the leases of claims still current; return their job ids."""
        claims = tuple(claims)
        if not claims:
            return set()
        held: set[str] = await self._writes.submit(_Renew(claims))
        return held

    @abstractmethod
    def on_jobs_released(self, wake: Callable[[], None]) -> None:
        """Call ``wake`` when another process releases jobs, if the backend can tell."""

    async def release(self, claims: Iterable[Claim], unclaimed: Iterable[str] = ()) -> None:
        """Drop these leases (and unclaimed jobs' grace) now: the next sweep takes the jobs."""
        op = _Release(tuple(claims), tuple(unclaimed))
        if op.claims or op.unclaimed:
            await self._writes.submit(op)
