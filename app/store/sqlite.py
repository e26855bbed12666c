"""The embedded SQLite backend (aiosqlite): one writer connection, one reader, WAL."""

import asyncio
import logging
import sqlite3
from collections.abc import AsyncIterator, Iterable, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

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
_CLAIM = """
    UPDATE jobs SET owner = ?, attempts = attempts + 1, lease_until = ?, updated_at = ?
    WHERE job_id = ? AND status = 'processing' AND attempts < ?
      AND (owner IS NULL OR lease_until < ?)
    RETURNING attempts
"""
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
_FINISH = """
    UPDATE jobs SET status = ?, output_data = ?, error = ?, owner = NULL, lease_until = NULL,
                    updated_at = ?
    WHERE job_id = ? AND owner = ? AND attempts = ? AND status = 'processing'
"""


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
        """Close both connections; safe to call twice."""
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
        now = self._clock()
        created = iso_utc(now)
        async with self._writing() as db:
            await db.execute(
                "INSERT INTO jobs (job_id, input_data, status, created_at, updated_at, lease_until)"
                " VALUES (?, ?, 'processing', ?, ?, ?)",
                (job_id, input_json, created, created, now + self._policy.claim_grace_seconds),
            )

    async def get_job(self, job_id: str, *, with_output: bool = False) -> JobRecord | None:
        """Return the job, with its output only if asked (it can be megabytes)."""
        output = "output_data" if with_output else "NULL"
        rows = await self._read(
            f"SELECT status, created_at, updated_at, {output}, error FROM jobs WHERE job_id = ?",
            (job_id,),
        )
        if not rows:
            return None
        status, created_at, updated_at, output_data, error = rows[0]
        return JobRecord(job_id, JobStatus(status), created_at, updated_at, output_data, error)

    async def load_input(self, job_id: str) -> str | None:
        """Return the job's input JSON."""
        rows = await self._read("SELECT input_data FROM jobs WHERE job_id = ?", (job_id,))
        return str(rows[0][0]) if rows else None

    async def claim(self, job_id: str, owner: str) -> Claim | None:
        """Claim the job if it is processing, has attempts left and no live lease."""
        now = self._clock()
        async with self._writing() as db:
            rows = await db.execute_fetchall(
                _CLAIM,
                (
                    owner,
                    now + self._policy.lease_seconds,
                    iso_utc(now),
                    job_id,
                    self._policy.max_attempts,
                    now,
                ),
            )
        for (attempt,) in rows:
            return Claim(job_id, owner, attempt)
        return None

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
        status = JobStatus.FAILED if error is not None else JobStatus.COMPLETED
        async with self._writing() as db:
            cursor = await db.execute(
                _FINISH,
                (
                    status.value,
                    output_json,
                    error,
                    iso_utc(self._clock()),
                    claim.job_id,
                    claim.owner,
                    claim.attempt,
                ),
            )
            return cursor.rowcount == 1

    async def release(self, claims: Iterable[Claim]) -> None:
        """Drop these leases now so the next sweep, here or elsewhere, takes the jobs."""
        now = self._clock()
        async with self._writing() as db:
            await db.executemany(
                "UPDATE jobs SET owner = NULL, lease_until = ? WHERE job_id = ? AND owner = ?"
                " AND attempts = ? AND status = 'processing'",
                [(now, c.job_id, c.owner, c.attempt) for c in claims],
            )
