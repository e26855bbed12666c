"""The embedded SQLite backend (aiosqlite): one writer connection, one reader, WAL.

The job and lease logic is ``app.store.sql``'s; this module connects, migrates, checkpoints,
holds the owner's liveness lock (``app.store.owner_files``) and turns SQLite's errors into the
store's.
"""

import asyncio
import contextlib
import logging
import sqlite3
from collections.abc import AsyncIterator, Callable, Collection, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiosqlite

from app.logs import detached_task
from app.metrics import counted
from app.store import StoreCorruptError, StoreError, StoreSetupError, StoreUnavailableError
from app.store.owner_files import OwnerFileLocks, owners_directory
from app.store.sql import Dialect, Row, Transaction, upgrade_schema

# Checkpoints run at most this often: each ends with a sync of the database file.
CHECKPOINT_PAUSE_SECONDS = 0.05
# Once a checkpoint has copied the whole WAL back, the WAL file is cut back to this size.
WAL_SIZE_LIMIT = 16 * 1024 * 1024
# A WAL grown past this (readers, or writes arriving faster than checkpoints finish, kept it
# from starting over) is waited for readers and restarted. At 64 MiB, ten 1 MB jobs a second
# on a slow disk kept the WAL there, beside a 25 MB file; at 24 MiB the two stay under 64 MB.
WAL_RESTART_SIZE = 24 * 1024 * 1024
INCREMENTAL_VACUUM = 2  # PRAGMA auto_vacuum's value for INCREMENTAL

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
    # 3: the input's length beside its lease, so a sweep claims no more large jobs than it
    # has lanes for them (and the rest are left to other processes).
    """
    ALTER TABLE job_leases ADD COLUMN input_length INTEGER NOT NULL DEFAULT 0;
    UPDATE job_leases SET input_length = (
        SELECT length(input_data) FROM jobs WHERE jobs.job_id = job_leases.job_id
    )
    """,
    # 4: who a job belongs to (its API key's tenant, '' without keys), its idempotency key and
    # the hash of the request that used it, and its progress; indexes to list jobs newest
    # first and to find expired ones. The jobs table is rebuilt so its large columns stay last.
    """
    CREATE TABLE jobs_v4 (
        job_id          TEXT PRIMARY KEY,
        status          TEXT NOT NULL CHECK (status IN ('processing', 'completed', 'failed')),
        tenant          TEXT NOT NULL DEFAULT '',
        created_at      TEXT NOT NULL,
        updated_at      TEXT NOT NULL,
        error           TEXT,
        idempotency_key TEXT,
        request_hash    TEXT,
        input_data      TEXT NOT NULL,
        output_data     TEXT
    );
    INSERT INTO jobs_v4 (job_id, status, created_at, updated_at, error, input_data, output_data)
        SELECT job_id, status, created_at, updated_at, error, input_data, output_data FROM jobs;
    DROP TABLE jobs;
    ALTER TABLE jobs_v4 RENAME TO jobs;
    CREATE INDEX jobs_newest ON jobs (tenant, created_at, job_id);
    CREATE UNIQUE INDEX jobs_by_idempotency_key ON jobs (idempotency_key, tenant)
        WHERE idempotency_key IS NOT NULL;
    CREATE INDEX jobs_finished ON jobs (updated_at) WHERE status <> 'processing';
    ALTER TABLE job_leases ADD COLUMN total_items INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE job_leases ADD COLUMN done_items INTEGER NOT NULL DEFAULT 0
    """,
)


def sqlite_path(database_url: str) -> Path:
    """The file a ``sqlite:///relative`` or ``sqlite:////absolute`` URL names."""
    path = database_url.removeprefix("sqlite:///")
    if not path or path == database_url or "?" in path:
        raise ValueError(
            f"Unsupported DATABASE_URL {database_url!r}: expected sqlite:///path/to/jobs.db"
        )
    return Path(path)


def _translate(error: sqlite3.Error, path: Path) -> StoreError:
    return counted(_classify(error, path))


def _classify(error: sqlite3.Error, path: Path) -> StoreError:
    message = str(error)
    if isinstance(error, sqlite3.DatabaseError) and (
        "not a database" in message or "malformed" in message
    ):
        return StoreCorruptError(f"{path} is not a usable SQLite database: {message}")
    if isinstance(error, sqlite3.OperationalError):
        reason = _reason(message)
        return StoreUnavailableError(
            f"SQLite database {path} is unavailable: {message}",
            reason,
            # A full disk refuses a large write while a small one may still fit.
            every_write=reason != DISK_FULL,
        )
    return StoreError(f"SQLite error on {path}: {message}")


DISK_FULL = "the database disk is full"


def _reason(message: str) -> str:
    """Say in a client's words why SQLite refused."""
    if "locked" in message or "busy" in message:
        return "the database is busy"
    if "readonly" in message or "read-only" in message:
        return "the database is read-only"
    if "full" in message:
        return DISK_FULL
    if "disk I/O error" in message:
        return "the database disk failed"
    return "the database is not answering"


class _SQLiteTransaction:
    """The writer connection, inside a transaction ``_writing`` opened."""

    def __init__(self, db: aiosqlite.Connection) -> None:
        self._db = db

    async def fetch(self, sql: str, params: Sequence[Any]) -> list[Row]:
        return list(await self._db.execute_fetchall(sql, params))

    async def execute(self, sql: str, params: Sequence[Any]) -> int:
        cursor = await self._db.execute(sql, params)
        return cursor.rowcount

    async def execute_many(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        await self._db.executemany(sql, rows)


class SQLiteDatabase:
    """Jobs in one SQLite file; all writes go through one connection, one at a time."""

    # One writer at a time, so no row locks: the claim subqueries lock nothing.
    dialect = Dialect(placeholder="?", lock="")

    def __init__(
        self, path: Path, *, synchronous: str = "FULL", busy_timeout_ms: int = 5_000
    ) -> None:
        self.path = path
        self._owners: OwnerFileLocks | None = None
        self._synchronous = synchronous
        self._busy_timeout = busy_timeout_ms / 1000
        self._writer: aiosqlite.Connection | None = None
        self._reader: aiosqlite.Connection | None = None
        self._checkpointer: aiosqlite.Connection | None = None
        self._checkpoints: asyncio.Task[None] | None = None
        self._page_size = 4096
        self._wal_grew = asyncio.Event()
        # aiosqlite serialises calls, not transactions: without this lock another coroutine's
        # statement could land inside (and be committed or rolled back with) ours.
        self._write_lock = asyncio.Lock()

    @property
    def name(self) -> str:
        """The file's path."""
        return str(self.path)

    @property
    def holds_owner_lock(self) -> bool:
        """Always, once open: a file lock is held until the process lets go or dies."""
        return True

    async def open(self, owner: str) -> None:
        """Connect, switch to WAL, create or upgrade the schema, lock the owner's file."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._writer = await self._connect()
            await self._writer.execute("PRAGMA journal_mode = WAL")
            await self._writer.execute(f"PRAGMA synchronous = {self._synchronous}")
            # Checkpoints (copying the WAL into the database file) run on a connection of their
            # own, beside the writes, rather than inside whichever commit crosses 1,000 pages.
            await self._writer.execute("PRAGMA wal_autocheckpoint = 0")
            await self._writer.execute(f"PRAGMA journal_size_limit = {WAL_SIZE_LIMIT}")
            [(self._page_size,)] = await self._writer.execute_fetchall("PRAGMA page_size")
            await self._use_incremental_vacuum(self._writer)
            await self._migrate(self._writer)
            self._reader = await self._connect()
            await self._reader.execute("PRAGMA query_only = ON")
            self._checkpointer = await self._connect()
            self._checkpoints = detached_task(self._checkpoint_after_writes())
            self._hold_owner_lock(owner)
        except BaseException as error:
            await self.close()
            if isinstance(error, sqlite3.Error):
                raise _translate(error, self.path) from error
            raise

    async def _use_incremental_vacuum(self, db: aiosqlite.Connection) -> None:
        """Let pages freed by purges go back to the file system.

        A file made before this version is rewritten once (VACUUM) to allow it.
        """
        [(mode,)] = await db.execute_fetchall("PRAGMA auto_vacuum")
        if mode == INCREMENTAL_VACUUM:
            return
        await db.execute(f"PRAGMA auto_vacuum = {INCREMENTAL_VACUUM}")
        [(tables,)] = await db.execute_fetchall("SELECT count(*) FROM sqlite_master")
        if tables:  # an empty file takes the setting as it is; a used one needs rewriting
            logger.info("rewriting %s once, so freed space can be returned", self.path)
            await db.execute("VACUUM")

    def _hold_owner_lock(self, owner: str) -> None:
        directory = owners_directory(self.path)
        owners = OwnerFileLocks(directory)
        try:
            owners.hold(owner)
        except OSError as error:
            raise StoreSetupError(
                f"cannot keep this process's liveness lock in {directory}: {error}"
            ) from error
        self._owners = owners

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

            async def record(number: int) -> None:
                await db.execute(f"PRAGMA user_version = {number}")

            tx = _SQLiteTransaction(db)
            await upgrade_schema(tx, MIGRATIONS, version, record, str(self.path))
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
                [(_, wal_pages, _)] = await self._checkpointer.execute_fetchall(
                    "PRAGMA wal_checkpoint(PASSIVE)"
                )
                if wal_pages * self._page_size > WAL_RESTART_SIZE:
                    # Readers kept it from starting over for a while: wait them out once (they
                    # are short), so the next write starts the WAL afresh and cuts it back.
                    # Rare: this holds writes back for as long as it takes.
                    await self._checkpointer.execute("PRAGMA wal_checkpoint(RESTART)")
            except sqlite3.Error as error:
                logger.warning("checkpoint failed: %s", _translate(error, self.path))
            await asyncio.sleep(CHECKPOINT_PAUSE_SECONDS)

    async def close(self) -> None:
        """Let go of the owner's lock, then close the connections; safe to call twice."""
        if self._owners is not None:
            self._owners.let_go()
            self._owners = None
        if self._checkpoints is not None:
            self._checkpoints.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._checkpoints
            self._checkpoints = None
        for db in (self._checkpointer, self._reader, self._writer):
            if db is not None:
                await db.close()
        self._checkpointer = self._reader = self._writer = None

    def tend_owner_locks(self, holding_leases: Collection[str]) -> None:
        """Make this process's lock file again if it was removed; remove gone owners' files."""
        if self._owners is None:
            return
        try:
            self._owners.keep_held()
            self._owners.remove_gone(holding_leases)
        except OSError as error:
            logger.warning("cannot tend the lock files in %s: %s", self._owners.directory, error)

    async def dead_owners(self, tx: Transaction, owners: Sequence[str]) -> set[str]:
        """The owners whose lock files exist and nobody holds."""
        if self._owners is None:
            return set()
        return {owner for owner in owners if self._owners.is_dead(owner)}

    async def announce_release(self, tx: Transaction) -> None:
        """Nobody to tell: the other processes on a file (if any) sweep at their interval."""

    async def admit_one_at_a_time(self, tx: Transaction) -> None:
        """Nothing to take: a write transaction here is the only one already."""

    async def take_purge_turn(self, tx: Transaction) -> bool:
        """Always: SQLite's write transactions already take turns."""
        return True

    async def return_free_space(self, tx: Transaction) -> None:
        """Hand free pages back to the file system once they are a quarter of the file.

        Fewer are left for new jobs to reuse: moving pages about to return them would write
        as much again into the WAL, for space the next jobs take back.
        """
        [(free,)] = await tx.fetch("PRAGMA freelist_count", ())
        [(pages,)] = await tx.fetch("PRAGMA page_count", ())
        if free * 4 > pages:
            await tx.fetch(f"PRAGMA incremental_vacuum({free - pages // 8})", ())

    def on_jobs_released(self, wake: Callable[[], None]) -> None:
        """SQLite cannot tell: released jobs wait for the next sweep."""

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[Transaction]:
        """One write transaction at a time; commit on success, roll back on error."""
        if self._writer is None:
            raise StoreUnavailableError("the store is closed", "the service is stopping")
        async with self._write_lock:
            try:
                yield _SQLiteTransaction(self._writer)
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

    async def fetch(self, sql: str, params: Sequence[Any]) -> list[Row]:
        """Run one read on the reader connection."""
        if self._reader is None:
            raise StoreUnavailableError("the store is closed", "the service is stopping")
        try:
            return list(await self._reader.execute_fetchall(sql, params))
        except sqlite3.Error as error:
            raise _translate(error, self.path) from error
