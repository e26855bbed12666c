"""The embedded SQLite backend (aiosqlite): one writer connection, one reader, WAL."""

import asyncio
import logging
import sqlite3
from collections.abc import AsyncIterator, Iterable, Iterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import aiosqlite

from app.schemas import JobStatus
from app.store import (
    INTERRUPTED_TOO_OFTEN,
    Claim,
    Clock,
    JobRecord,
    LeasePolicy,
    StoreCorruptError,
    StoreError,
    StoreUnavailableError,
    iso_utc,
)
from app.batching import Batcher

T = TypeVar("T")

logger = logging.getLogger(__name__)

# Each entry upgrades the schema by one version; PRAGMA user_version records how many ran.
MIGRATIONS: Sequence[str] = (
    """
    CREATE TABLE jobs (
        job_id      TEXT PRIMARY KEY,
        input_data  TEXT NOT NULL,
        output_data TEXT,
        status      TEXT NOT NULL CHECK (status IN ('processing', 'completed', 'failed')),
        error       TEXT,
        created_at  TEXT NOT NULL,
        updated_at  TEXT NOT NULL,
        owner       TEXT,
        attempts    INTEGER NOT NULL DEFAULT 0,
        lease_until REAL
    );
    CREATE INDEX jobs_processing_by_lease ON jobs (lease_until) WHERE status = 'processing';
    """,
)

# A lease is live while lease_until >= now; an unclaimed job's lease_until is its grace deadline.
_FAIL_EXHAUSTED = """
    UPDATE jobs SET status = 'failed', error = ?, owner = NULL, lease_until = NULL, updated_at = ?
    WHERE status = 'processing' AND lease_until < ? AND attempts >= ?
    RETURNING job_id, attempts
"""
_CLAIM_STALE = """
    UPDATE jobs SET owner = ?, attempts = attempts + 1, lease_until = ?, updated_at = ?
    WHERE job_id IN (
        SELECT job_id FROM jobs WHERE status = 'processing' AND lease_until < ?
        ORDER BY lease_until LIMIT ?
    )
    RETURNING job_id, attempts
"""
_INSERT = """
    INSERT INTO jobs (job_id, input_data, status, created_at, updated_at, lease_until)
    VALUES (?, ?, 'processing', ?, ?, ?)
"""
# Claims and finishes of one batch are each one statement; RETURNING says which landed.
_CLAIM_MANY = """
    UPDATE jobs SET owner = ?, attempts = attempts + 1, lease_until = ?, updated_at = ?
    WHERE job_id IN ({ids}) AND status = 'processing' AND attempts < ?
      AND (owner IS NULL OR lease_until < ?)
    RETURNING job_id, attempts
"""
_FINISH_MANY = """
    WITH outcome (job_id, owner, attempt, status, output_data, error) AS (VALUES {rows})
    UPDATE jobs SET status = outcome.status, output_data = outcome.output_data,
                    error = outcome.error, owner = NULL, lease_until = NULL, updated_at = ?
    FROM outcome
    WHERE jobs.job_id = outcome.job_id AND jobs.owner = outcome.owner
      AND jobs.attempts = outcome.attempt AND jobs.status = 'processing'
    RETURNING jobs.job_id
"""
_STATUS_MANY = """
    SELECT job_id, status, created_at, updated_at, error FROM jobs WHERE job_id IN ({ids})
"""
# Well below SQLite's limit of 32,766 bound parameters per statement.
_CHUNK = 500


@dataclass(frozen=True, slots=True)
class _Insert:
    job_id: str
    input_json: str


@dataclass(frozen=True, slots=True)
class _Claim:
    job_id: str
    owner: str


@dataclass(frozen=True, slots=True)
class _Finish:
    claim: Claim
    output_json: str | None
    error: str | None


_Write = _Insert | _Claim | _Finish


def _chunks(items: Sequence[T], size: int = _CHUNK) -> Iterator[Sequence[T]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _marks(count: int, width: int = 1) -> str:
    row = "?" if width == 1 else "(" + ", ".join("?" * width) + ")"
    return ", ".join([row] * count)


def sqlite_path(database_url: str) -> Path:
    """The file a ``sqlite:///relative`` or ``sqlite:////absolute`` URL names."""
    path = database_url.removeprefix("sqlite:///")
    if not path or path == database_url or "?" in path:
        raise ValueError(
            f"Unsupported DATABASE_URL {database_url!r}: expected sqlite:///path/to/jobs.db"
        )
    return Path(path)


def _translate(error: sqlite3.Error, path: Path) -> StoreError:
    message = str(error)
    if isinstance(error, sqlite3.DatabaseError) and (
        "not a database" in message or "malformed" in message
    ):
        return StoreCorruptError(f"{path} is not a usable SQLite database: {message}")
    if isinstance(error, sqlite3.OperationalError):
        return StoreUnavailableError(
            f"SQLite database {path} is unavailable: {message}", _reason(message)
        )
    return StoreError(f"SQLite error on {path}: {message}")


def _reason(message: str) -> str:
    """Say in a client's words why SQLite refused."""
    if "locked" in message or "busy" in message:
        return "the database is busy"
    if "readonly" in message or "read-only" in message:
        return "the database is read-only"
    if "full" in message:
        return "the database disk is full"
    return "the database is not answering"


class SQLiteJobStore:
    """Jobs in one SQLite file; all writes go through one connection, one at a time."""

    def __init__(
        self,
        path: Path,
        policy: LeasePolicy,
        *,
        synchronous: str = "FULL",
        busy_timeout_ms: int = 5_000,
        clock: Clock,
    ) -> None:
        self.path = path
        self._policy = policy
        self._synchronous = synchronous
        self._busy_timeout = busy_timeout_ms / 1000
        self._clock = clock
        self._exhausted_error = INTERRUPTED_TOO_OFTEN.format(attempts=policy.max_attempts)
        self._writer: aiosqlite.Connection | None = None
        self._reader: aiosqlite.Connection | None = None
        # aiosqlite serialises calls, not transactions: without this lock another coroutine's
        # statement could land inside (and be committed or rolled back with) ours.
        self._write_lock = asyncio.Lock()
        self._writes: Batcher[_Write, Any] = Batcher(self._apply_writes)
        self._status_reads: Batcher[str, JobRecord | None] = Batcher(self._read_statuses)

    async def open(self) -> None:
        """Connect, switch to WAL, create or upgrade the schema."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._writer = await self._connect()
            await self._writer.execute("PRAGMA journal_mode = WAL")
            await self._writer.execute(f"PRAGMA synchronous = {self._synchronous}")
            await self._migrate(self._writer)
            self._reader = await self._connect()
            await self._reader.execute("PRAGMA query_only = ON")
        except BaseException as error:
            await self.close()
            if isinstance(error, sqlite3.Error):
                raise _translate(error, self.path) from error
            raise

    async def _connect(self) -> aiosqlite.Connection:
        # isolation_level IMMEDIATE: the module opens every write transaction with BEGIN
        # IMMEDIATE, which takes the write lock up front and so honours the busy timeout (a
        # deferred read-to-write upgrade fails at once with "database is locked" instead).
        return await aiosqlite.connect(
            self.path, timeout=self._busy_timeout, isolation_level="IMMEDIATE"
        )

    async def _migrate(self, db: aiosqlite.Connection) -> None:
        await db.execute("BEGIN IMMEDIATE")
        try:
            rows = await db.execute_fetchall("PRAGMA user_version")
            version = next(iter(rows))[0]
            if version > len(MIGRATIONS):
                raise StoreCorruptError(
                    f"{self.path} has schema version {version}, newer than this service knows "
                    f"({len(MIGRATIONS)}); refusing to touch it"
                )
            for number, script in enumerate(MIGRATIONS[version:], start=version + 1):
                for statement in filter(str.strip, script.split(";")):
                    await db.execute(statement)
                await db.execute(f"PRAGMA user_version = {number}")
                logger.info("database %s upgraded to schema version %d", self.path, number)
            await db.commit()
        except BaseException:
            await db.rollback()
            raise

    async def close(self) -> None:
        """Apply what is queued, then close both connections; safe to call twice."""
        await self._writes.flush()
        await self._status_reads.flush()
        for db in (self._reader, self._writer):
            if db is not None:
                await db.close()
        self._reader = self._writer = None

    @asynccontextmanager
    async def _writing(self) -> AsyncIterator[aiosqlite.Connection]:
        """One write transaction at a time; commit on success, roll back on error."""
        if self._writer is None:
            raise StoreUnavailableError("the store is closed", "the service is stopping")
        async with self._write_lock:
            try:
                yield self._writer
                await self._writer.commit()
            except sqlite3.Error as error:
                await self._rollback_quietly()
                raise _translate(error, self.path) from error
            except BaseException:
                await self._rollback_quietly()
                raise

    async def _rollback_quietly(self) -> None:
        assert self._writer is not None
        try:
            await self._writer.rollback()
        except sqlite3.Error:
            logger.exception("rollback on %s failed", self.path)

    async def _read(self, sql: str, params: Sequence[Any]) -> list[sqlite3.Row]:
        if self._reader is None:
            raise StoreUnavailableError("the store is closed", "the service is stopping")
        try:
            return list(await self._reader.execute_fetchall(sql, params))
        except sqlite3.Error as error:
            raise _translate(error, self.path) from error

    async def ping(self) -> None:
        """Raise StoreError unless a query answers."""
        await self._read("SELECT 1", ())

    async def create_job(self, job_id: str, input_json: str) -> None:
        """Insert an unclaimed job; other processes may take it after the grace time."""
        await self._writes.submit(_Insert(job_id, input_json))

    async def _apply_writes(self, ops: Sequence[_Write]) -> list[Any]:
        """Apply one batch in one transaction: inserts, then claims, then finishes."""
        now = self._clock()
        results: dict[int, Any] = {}
        async with self._writing() as db:
            inserts = [(i, op) for i, op in enumerate(ops) if isinstance(op, _Insert)]
            if inserts:
                deadline = now + self._policy.claim_grace_seconds
                stamp = iso_utc(now)
                rows = [(op.job_id, op.input_json, stamp, stamp, deadline) for _, op in inserts]
                await db.executemany(_INSERT, rows)
                results.update((i, None) for i, _ in inserts)
            claims = [(i, op) for i, op in enumerate(ops) if isinstance(op, _Claim)]
            results.update(await self._apply_claims(db, claims, now))
            finishes = [(i, op) for i, op in enumerate(ops) if isinstance(op, _Finish)]
            results.update(await self._apply_finishes(db, finishes, now))
        return [results[i] for i in range(len(ops))]

    async def _apply_claims(
        self, db: aiosqlite.Connection, claims: list[tuple[int, _Claim]], now: float
    ) -> dict[int, Claim | None]:
        results: dict[int, Claim | None] = {}
        for owner in {op.owner for _, op in claims}:
            wanted = [(i, op.job_id) for i, op in claims if op.owner == owner]
            attempts: dict[str, int] = {}
            ids = list(dict.fromkeys(job_id for _, job_id in wanted))
            for chunk in _chunks(ids):
                sql = _CLAIM_MANY.format(ids=_marks(len(chunk)))
                params = (owner, now + self._policy.lease_seconds, iso_utc(now), *chunk)
                rows = await db.execute_fetchall(sql, (*params, self._policy.max_attempts, now))
                attempts.update((job_id, attempt) for job_id, attempt in rows)
            for i, job_id in wanted:
                # The same job asked for twice in one batch is claimed once, by the first.
                attempt = attempts.pop(job_id, None)
                results[i] = Claim(job_id, owner, attempt) if attempt is not None else None
        return results

    async def _apply_finishes(
        self, db: aiosqlite.Connection, finishes: list[tuple[int, _Finish]], now: float
    ) -> dict[int, bool]:
        landed: set[tuple[str, str, int]] = set()
        for chunk in _chunks(finishes):
            params: list[Any] = []
            for _, op in chunk:
                status = JobStatus.FAILED if op.error is not None else JobStatus.COMPLETED
                claim = op.claim
                params += [claim.job_id, claim.owner, claim.attempt, status.value]
                params += [op.output_json, op.error]
            sql = _FINISH_MANY.format(rows=_marks(len(chunk), width=6))
            rows = await db.execute_fetchall(sql, (*params, iso_utc(now)))
            finished = {job_id for (job_id,) in rows}
            landed.update(
                (op.claim.job_id, op.claim.owner, op.claim.attempt)
                for _, op in chunk
                if op.claim.job_id in finished
            )
        return {
            i: (op.claim.job_id, op.claim.owner, op.claim.attempt) in landed for i, op in finishes
        }

    async def get_job(self, job_id: str, *, with_output: bool = False) -> JobRecord | None:
        """Return the job, with its output only if asked (it can be megabytes)."""
        if not with_output:
            return await self._status_reads.submit(job_id)
        rows = await self._read(
            "SELECT status, created_at, updated_at, output_data, error FROM jobs WHERE job_id = ?",
            (job_id,),
        )
        if not rows:
            return None
        status, created_at, updated_at, output_data, error = rows[0]
        return JobRecord(job_id, JobStatus(status), created_at, updated_at, output_data, error)

    async def _read_statuses(self, job_ids: Sequence[str]) -> list[JobRecord | None]:
        """One query for every status asked for at the same moment."""
        found: dict[str, JobRecord] = {}
        unique = list(dict.fromkeys(job_ids))
        for chunk in _chunks(unique):
            for job_id, status, created_at, updated_at, error in await self._read(
                _STATUS_MANY.format(ids=_marks(len(chunk))), chunk
            ):
                found[job_id] = JobRecord(
                    job_id, JobStatus(status), created_at, updated_at, None, error
                )
        return [found.get(job_id) for job_id in job_ids]

    async def load_input(self, job_id: str) -> str | None:
        """Return the job's input JSON."""
        rows = await self._read("SELECT input_data FROM jobs WHERE job_id = ?", (job_id,))
        return str(rows[0][0]) if rows else None

    async def claim(self, job_id: str, owner: str) -> Claim | None:
        """Claim the job if it is processing, has attempts left and no live lease."""
        claim: Claim | None = await self._writes.submit(_Claim(job_id, owner))
        return claim

    async def claim_stale(self, owner: str, limit: int) -> list[Claim]:
        """Fail stale jobs that used up their attempts, then claim up to ``limit`` others."""
        now = self._clock()
        updated = iso_utc(now)
        async with self._writing() as db:
            for job_id, attempts in await db.execute_fetchall(
                _FAIL_EXHAUSTED,
                (self._exhausted_error, updated, now, self._policy.max_attempts),
            ):
                logger.error("job %s failed: started %d times, never finished", job_id, attempts)
            if limit <= 0:
                return []
            rows = await db.execute_fetchall(
                _CLAIM_STALE, (owner, now + self._policy.lease_seconds, updated, now, limit)
            )
        return [Claim(job_id, owner, attempt) for job_id, attempt in rows]

    async def renew(self, claims: Iterable[Claim]) -> set[str]:
        """Extend the leases of claims still current; return their job ids."""
        claims = list(claims)
        if not claims:
            return set()
        until = self._clock() + self._policy.lease_seconds
        held: set[str] = set()
        async with self._writing() as db:
            for claim in claims:
                cursor = await db.execute(
                    "UPDATE jobs SET lease_until = ? WHERE job_id = ? AND owner = ?"
                    " AND attempts = ? AND status = 'processing'",
                    (until, claim.job_id, claim.owner, claim.attempt),
                )
                if cursor.rowcount == 1:
                    held.add(claim.job_id)
        return held

    async def finish(self, claim: Claim, *, output_json: str | None, error: str | None) -> bool:
        """Record the outcome, fenced by the claim's owner and attempt."""
        landed: bool = await self._writes.submit(_Finish(claim, output_json, error))
        return landed

    async def release(self, claims: Iterable[Claim]) -> None:
        """Drop these leases now so the next sweep, here or elsewhere, takes the jobs."""
        now = self._clock()
        async with self._writing() as db:
            await db.executemany(
                "UPDATE jobs SET owner = NULL, lease_until = ? WHERE job_id = ? AND owner = ?"
                " AND attempts = ? AND status = 'processing'",
                [(now, c.job_id, c.owner, c.attempt) for c in claims],
            )
