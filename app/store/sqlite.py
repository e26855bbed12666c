"""The embedded SQLite backend (aiosqlite): one writer connection, one reader, WAL."""

import asyncio
import contextlib
import logging
import sqlite3
from collections.abc import AsyncIterator, Iterable, Iterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import aiosqlite

from app.batching import Batcher
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

T = TypeVar("T")
# Checkpoints run at most this often: each ends with a sync of the database file.
CHECKPOINT_PAUSE_SECONDS = 0.05

logger = logging.getLogger(__name__)

# Each entry upgrades the schema by one version; PRAGMA user_version records how many ran.
MIGRATIONS: Sequence[str] = (
    # 1: the seed's table, with lease columns.
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
    CREATE INDEX jobs_processing_by_lease ON jobs (lease_until) WHERE status = 'processing'
    """,
    # 2: SQLite rewrites a whole row, input and output included, whenever any column of it
    # changes, and reads through the large columns to reach the ones stored after them. So the
    # lease state, changed by every claim and heartbeat, moves to a table of its own (a row
    # per processing job), and the jobs table is rebuilt with its large columns last.
    """
    CREATE TABLE jobs_v2 (
        job_id      TEXT PRIMARY KEY,
        status      TEXT NOT NULL CHECK (status IN ('processing', 'completed', 'failed')),
        created_at  TEXT NOT NULL,
        updated_at  TEXT NOT NULL,
        error       TEXT,
        input_data  TEXT NOT NULL,
        output_data TEXT
    );
    INSERT INTO jobs_v2 (job_id, status, created_at, updated_at, error, input_data, output_data)
        SELECT job_id, status, created_at, updated_at, error, input_data, output_data FROM jobs;
    CREATE TABLE job_leases (
        job_id      TEXT PRIMARY KEY,
        owner       TEXT,
        attempts    INTEGER NOT NULL DEFAULT 0,
        lease_until REAL NOT NULL
    );
    INSERT INTO job_leases (job_id, owner, attempts, lease_until)
        SELECT job_id, owner, attempts, coalesce(lease_until, 0) FROM jobs
        WHERE status = 'processing';
    DROP TABLE jobs;
    ALTER TABLE jobs_v2 RENAME TO jobs;
    CREATE INDEX job_leases_by_lease ON job_leases (lease_until)
    """,
)

# A lease is live while lease_until >= now; an unclaimed job's lease_until is its grace
# deadline. A job has a job_leases row exactly while it is processing.
_INSERT_JOB = """
    INSERT INTO jobs (job_id, status, created_at, updated_at, input_data)
    VALUES (?, 'processing', ?, ?, ?)
"""
_INSERT_LEASE = "INSERT INTO job_leases (job_id, lease_until) VALUES (?, ?)"
# Claims and finishes of one batch are each one statement; RETURNING says which landed.
_CLAIM_MANY = """
    UPDATE job_leases SET owner = ?, attempts = attempts + 1, lease_until = ?
    WHERE job_id IN ({ids}) AND attempts < ? AND (owner IS NULL OR lease_until < ?)
    RETURNING job_id, attempts
"""
_END_LEASES = """
    DELETE FROM job_leases WHERE (job_id, owner, attempts) IN (VALUES {rows})
    RETURNING job_id
"""
_RECORD_OUTCOME = """
    UPDATE jobs SET status = ?, output_data = ?, error = ?, updated_at = ? WHERE job_id = ?
"""
_FAIL_EXHAUSTED = """
    DELETE FROM job_leases WHERE lease_until < ? AND attempts >= ? RETURNING job_id
"""
_CLAIM_STALE = """
    UPDATE job_leases SET owner = ?, attempts = attempts + 1, lease_until = ?
    WHERE job_id IN (
        SELECT job_id FROM job_leases WHERE lease_until < ? AND attempts < ?
        ORDER BY lease_until LIMIT ?
    )
    RETURNING job_id, attempts
"""
_RENEW = """
    UPDATE job_leases SET lease_until = ? WHERE job_id = ? AND owner = ? AND attempts = ?
"""
_RELEASE = """
    UPDATE job_leases SET owner = NULL, lease_until = ?
    WHERE job_id = ? AND owner = ? AND attempts = ?
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


def _fence(claim: Claim) -> tuple[str, str, int]:
    """What must still match for a claim to act: the job, its owner and the attempt."""
    return claim.job_id, claim.owner, claim.attempt


def _status(error: str | None) -> JobStatus:
    return JobStatus.FAILED if error is not None else JobStatus.COMPLETED


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
        self._checkpointer: aiosqlite.Connection | None = None
        self._checkpoints: asyncio.Task[None] | None = None
        self._wal_grew = asyncio.Event()
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
            # Checkpoints (copying the WAL into the database file) run on a connection of their
            # own, beside the writes, rather than inside whichever commit crosses 1,000 pages.
            await self._writer.execute("PRAGMA wal_autocheckpoint = 0")
            await self._migrate(self._writer)
            self._reader = await self._connect()
            await self._reader.execute("PRAGMA query_only = ON")
            self._checkpointer = await self._connect()
            self._checkpoints = asyncio.create_task(self._checkpoint_after_writes())
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

    async def _checkpoint_after_writes(self) -> None:
        """Copy committed pages from the WAL into the database file soon after each write.

        A passive checkpoint waits for nobody and nobody waits for it; committed data is
        already durable in the WAL, so a checkpoint that fails or lags loses nothing.
        """
        assert self._checkpointer is not None
        while True:
            await self._wal_grew.wait()
            self._wal_grew.clear()
            try:
                await self._checkpointer.execute("PRAGMA wal_checkpoint(PASSIVE)")
            except sqlite3.Error as error:
                logger.warning("checkpoint of %s failed: %s", self.path, error)
            await asyncio.sleep(CHECKPOINT_PAUSE_SECONDS)

    async def close(self) -> None:
        """Apply what is queued, then close the connections; safe to call twice."""
        await self._writes.flush()
        await self._status_reads.flush()
        if self._checkpoints is not None:
            self._checkpoints.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._checkpoints
            self._checkpoints = None
        for db in (self._checkpointer, self._reader, self._writer):
            if db is not None:
                await db.close()
        self._checkpointer = self._reader = self._writer = None

    @asynccontextmanager
    async def _writing(self) -> AsyncIterator[aiosqlite.Connection]:
        """One write transaction at a time; commit on success, roll back on error."""
        if self._writer is None:
            raise StoreUnavailableError("the store is closed", "the service is stopping")
        async with self._write_lock:
            try:
                yield self._writer
                await self._writer.commit()
                self._wal_grew.set()
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
                jobs = [(op.job_id, stamp, stamp, op.input_json) for _, op in inserts]
                await db.executemany(_INSERT_JOB, jobs)
                await db.executemany(_INSERT_LEASE, [(op.job_id, deadline) for _, op in inserts])
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
                params = (owner, now + self._policy.lease_seconds, *chunk)
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
        """End the leases still held by these claims, then record those jobs' outcomes."""
        landed: set[str] = set()
        for chunk in _chunks(finishes):
            fences = [value for _, op in chunk for value in _fence(op.claim)]
            sql = _END_LEASES.format(rows=_marks(len(chunk), width=3))
            landed.update(job_id for (job_id,) in await db.execute_fetchall(sql, fences))
        stamp = iso_utc(now)
        outcomes = [
            (_status(op.error).value, op.output_json, op.error, stamp, op.claim.job_id)
            for _, op in finishes
            if op.claim.job_id in landed
        ]
        if outcomes:
            await db.executemany(_RECORD_OUTCOME, outcomes)
        return {i: op.claim.job_id in landed for i, op in finishes}

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
            rows = await self._read(_STATUS_MANY.format(ids=_marks(len(chunk))), chunk)
            for job_id, status, created_at, updated_at, error in rows:
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
        async with self._writing() as db:
            exhausted = await db.execute_fetchall(_FAIL_EXHAUSTED, (now, self._policy.max_attempts))
            if exhausted:
                failed = [
                    (JobStatus.FAILED.value, None, self._exhausted_error, iso_utc(now), job_id)
                    for (job_id,) in exhausted
                ]
                await db.executemany(_RECORD_OUTCOME, failed)
                for (job_id,) in exhausted:
                    logger.error("job %s failed: %s", job_id, self._exhausted_error)
            if limit <= 0:
                return []
            rows = await db.execute_fetchall(
                _CLAIM_STALE,
                (owner, now + self._policy.lease_seconds, now, self._policy.max_attempts, limit),
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
                cursor = await db.execute(_RENEW, (until, *_fence(claim)))
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
            await db.executemany(_RELEASE, [(now, *_fence(claim)) for claim in claims])
