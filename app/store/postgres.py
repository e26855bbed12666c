"""The PostgreSQL backend (psycopg 3, async, pooled): several replicas on one database.

The job and lease logic is ``app.store.sql``'s, with ``FOR UPDATE SKIP LOCKED`` on the
subqueries that pick jobs to claim, fail or expire, so replicas never wait for each other's
rows or take the same job twice. This module connects, migrates under an advisory lock
(replicas starting together upgrade the schema once) and turns driver errors into the store's.

Each replica holds a session-level advisory lock for its owner id on a connection of its own
(the one that also LISTENs for released jobs). PostgreSQL drops that lock when the connection
ends, so when a replica dies the others see its lock free (in ``pg_locks``) and take its jobs
at once instead of waiting out its leases. A replica whose lock connection drops reconnects and
claims nothing until it holds its lock again; leases remain the safety net for a replica the
database still thinks is connected (a network partition).
"""

import asyncio
import contextlib
import hashlib
import logging
import math
import time
import zlib
from collections.abc import AsyncIterator, Callable, Collection, Sequence
from contextlib import asynccontextmanager
from typing import Any

import psycopg
from psycopg import errors as pg_errors
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from app.config import redact
from app.metrics import counted
from app.store import (
    StoreConflictError,
    StoreError,
    StoreUnavailableError,
)
from app.store.sql import Dialect, Row, Transaction, upgrade_schema

logger = logging.getLogger(__name__)

# Each entry upgrades the schema by one version; schema_version records how many ran.
# input_data and output_data are TEXT holding the JSON exactly as the service wrote it: the
# service stores and serves JSON text and never queries inside it, and JSONB would parse
# megabytes on every insert and would not keep an object's keys in the order sent (the flow
# splits objects by that order).
MIGRATIONS: Sequence[str] = (
    """
    CREATE TABLE jobs (
        job_id      TEXT PRIMARY KEY,
        status      TEXT NOT NULL CHECK (status IN ('processing', 'completed', 'failed')),
        created_at  TEXT NOT NULL,
        updated_at  TEXT NOT NULL,
        error       TEXT,
        input_data  TEXT NOT NULL,
        output_data TEXT
    );
    CREATE TABLE job_leases (
        job_id      TEXT PRIMARY KEY,
        owner       TEXT,
        attempts    INTEGER NOT NULL DEFAULT 0,
        lease_until DOUBLE PRECISION NOT NULL
    );
    CREATE INDEX job_leases_by_lease ON job_leases (lease_until)
    """,
    # 2: the input's length beside its lease, so a sweep claims no more large jobs than it
    # has lanes for them (and the rest are left to other replicas).
    """
    ALTER TABLE job_leases ADD COLUMN input_length INTEGER NOT NULL DEFAULT 0;
    UPDATE job_leases SET input_length = (
        SELECT length(input_data) FROM jobs WHERE jobs.job_id = job_leases.job_id
    )
    """,
    # 3: who a job belongs to (its API key's tenant, '' without keys), its idempotency key and
    # the hash of the request that used it, and its progress; indexes to list jobs newest
    # first and to find expired ones.
    """
    ALTER TABLE jobs ADD COLUMN tenant TEXT NOT NULL DEFAULT '';
    ALTER TABLE jobs ADD COLUMN idempotency_key TEXT;
    ALTER TABLE jobs ADD COLUMN request_hash TEXT;
    CREATE INDEX jobs_newest ON jobs (tenant, created_at, job_id);
    CREATE UNIQUE INDEX jobs_by_idempotency_key ON jobs (idempotency_key, tenant)
        WHERE idempotency_key IS NOT NULL;
    CREATE INDEX jobs_finished ON jobs (updated_at) WHERE status <> 'processing';
    ALTER TABLE job_leases ADD COLUMN total_items INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE job_leases ADD COLUMN done_items INTEGER NOT NULL DEFAULT 0
    """,
)
# pg_advisory_xact_lock key held while migrating: any constant the other users of the
# database do not use ("expand-reduce" in ASCII).
MIGRATION_LOCK = 0x657870616E64
# pg_try_advisory_xact_lock key of the purge: one replica purges at a time ("purge").
PURGE_LOCK = 0x7075726765
# pg_advisory_xact_lock key of inserts, so MAX_QUEUED_JOBS holds across replicas ("admit").
ADMISSION_LOCK = 0x61646D6974
RETRY_PAUSE_SECONDS = 1.0
# NOTIFY'd when a replica releases jobs (it is stopping), so the others sweep at once.
RELEASED_CHANNEL = "expand_reduce_jobs_released"
LOCK_RETRY_SECONDS = 2.0


# Owners' liveness locks are advisory locks (OWNER_LOCK_SPACE, crc32 of the owner id). Two ids
# with the same crc32 only make a dead owner look alive: its leases then run out as usual.
OWNER_LOCK_SPACE = 0x65787072  # "expr"
LIVE_OWNER_LOCKS = """
    SELECT objid::bigint FROM pg_locks
    WHERE locktype = 'advisory' AND classid::bigint = %s AND objsubid = 2 AND granted
        AND database = (SELECT oid FROM pg_database WHERE datname = current_database())
"""
# Keepalives on the lock connection, both ways: libpq's notice a vanished server, and the
# server's (set for this session through ``options``) notice a vanished replica, within about
# 25 s, instead of the server's default of two hours, during which the lock would stay held.
KEEPALIVES: dict[str, Any] = {
    "keepalives": 1,
    "keepalives_idle": 10,
    "keepalives_interval": 5,
    "keepalives_count": 3,
    "options": "-c tcp_keepalives_idle=10 -c tcp_keepalives_interval=5 -c tcp_keepalives_count=3",
}
# How long taking the liveness lock back waits for a stale session of ours to go.
LOCK_WAIT = "5s"


def lock_session_name(owner: str) -> str:
    """The ``application_name`` of ``owner``'s lock session, unique to it and short enough."""
    return f"expand-reduce-lock {hashlib.sha256(owner.encode()).hexdigest()[:32]}"


def owner_lock_key(owner: str) -> int:
    """The advisory lock key of ``owner``, as ``pg_locks.objid`` shows it (0 to 2**32 - 1)."""
    return zlib.crc32(owner.encode())


def _as_int4(key: int) -> int:
    return key - 2**32 if key >= 2**31 else key


def _lock_args(owner: str) -> tuple[int, int]:
    return _as_int4(OWNER_LOCK_SPACE), _as_int4(owner_lock_key(owner))


class _PostgresTransaction:
    """A pooled connection, inside a transaction (or, for a single read, not)."""

    def __init__(self, connection: psycopg.AsyncConnection[Any]) -> None:
        self._connection = connection

    async def fetch(self, sql: str, params: Sequence[Any]) -> list[Row]:
        cursor = await self._connection.execute(sql, params)
        return list(await cursor.fetchall())

    async def execute(self, sql: str, params: Sequence[Any]) -> int:
        cursor = await self._connection.execute(sql, params)
        return cursor.rowcount

    async def execute_many(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        async with self._connection.cursor() as cursor:
            await cursor.executemany(sql, rows)


class PostgresDatabase:
    """A PostgreSQL database shared by any number of replicas."""

    dialect = Dialect(placeholder="%s", lock="FOR UPDATE SKIP LOCKED")

    def __init__(
        self,
        url: str,
        *,
        pool_size: int = 10,
        timeout_seconds: float = 5.0,
        startup_timeout_seconds: float = 60.0,
    ) -> None:
        self.url = redact(url)
        self._url = url
        self._startup_timeout = startup_timeout_seconds
        self._lock_connection: psycopg.AsyncConnection[Any] | None = None
        self._lock_keeper: asyncio.Task[None] | None = None
        self._wakes: list[Callable[[], None]] = []
        # For the pool's connections and the lock one. Reads run alone; writes open a
        # transaction of their own (``transaction``).
        self._connection_options: dict[str, Any] = {
            "autocommit": True,
            "connect_timeout": max(1, math.ceil(timeout_seconds)),
            "application_name": "expand-reduce-service",
        }
        self._pool = AsyncConnectionPool(
            url,
            min_size=1,
            max_size=pool_size,
            open=False,
            timeout=timeout_seconds,
            kwargs=self._connection_options,
            name="jobs",
        )

    @property
    def name(self) -> str:
        """The URL, without its password."""
        return self.url

    @property
    def holds_owner_lock(self) -> bool:
        """Whether the lock connection is up and holds this owner's lock."""
        return self._lock_connection is not None and not self._lock_connection.closed

    async def open(self, owner: str) -> None:
        """Connect (retrying while the database comes up), migrate, take the owner's lock."""
        await self._pool.open(wait=False)
        deadline = time.monotonic() + self._startup_timeout
        while True:
            try:
                await self._migrate()
                self._lock_connection = await self._lock_owner(owner)
                break
            except StoreUnavailableError as error:
                if time.monotonic() >= deadline:
                    await self._pool.close()
                    raise
                logger.warning("%s; retrying", error)
                await asyncio.sleep(RETRY_PAUSE_SECONDS)
            except BaseException:
                await self._pool.close()
                raise
        self._lock_keeper = asyncio.create_task(self._keep_owner_lock(owner))

    async def _migrate(self) -> None:
        async with self.transaction() as tx:
            await tx.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK,))
            await tx.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER)", ())
            rows = await tx.fetch("SELECT version FROM schema_version", ())

            async def record(number: int) -> None:
                await tx.execute("DELETE FROM schema_version", ())
                await tx.execute("INSERT INTO schema_version VALUES (%s)", (number,))

            version = rows[0][0] if rows else 0
            await upgrade_schema(tx, MIGRATIONS, version, record, self.url)

    async def _lock_owner(self, owner: str) -> psycopg.AsyncConnection[Any]:
        """A new connection holding ``owner``'s liveness lock and listening for releases."""
        options = self._connection_options | KEEPALIVES
        options["application_name"] = lock_session_name(owner)
        try:
            connection = await psycopg.AsyncConnection.connect(self._url, **options)
        except psycopg.Error as error:
            raise self._translate(error) from error
        try:
            if not await self._try_lock(connection, owner):
                await self._end_stale_lock_sessions(connection, owner)
                await connection.execute(f"SET lock_timeout = '{LOCK_WAIT}'")
                await connection.execute("SELECT pg_advisory_lock(%s, %s)", _lock_args(owner))
            await connection.execute(f"LISTEN {RELEASED_CHANNEL}")
        except BaseException as error:
            await connection.close()
            if isinstance(error, psycopg.Error):
                raise self._translate(error) from error
            raise
        return connection

    @staticmethod
    async def _try_lock(connection: psycopg.AsyncConnection[Any], owner: str) -> bool:
        cursor = await connection.execute("SELECT pg_try_advisory_lock(%s, %s)", _lock_args(owner))
        row = await cursor.fetchone()
        return row is not None and bool(row[0])

    @staticmethod
    async def _end_stale_lock_sessions(
        connection: psycopg.AsyncConnection[Any], owner: str
    ) -> None:
        """End this replica's own earlier lock sessions, which the server still keeps.

        After a network break the server may hold a session this replica has given up on,
        and with it the lock. It is recognised by its application_name, which no other
        process has; the lock is then free once that session ends.
        """
        cursor = await connection.execute(
            "SELECT count(*) FILTER (WHERE pg_terminate_backend(pid)) FROM pg_stat_activity "
            "WHERE application_name = %s AND pid <> pg_backend_pid()",
            (lock_session_name(owner),),
        )
        row = await cursor.fetchone()
        if row is not None and row[0]:
            logger.warning(
                "ended %d stale lock sessions of %s left by a network break", row[0], owner
            )

    async def _keep_owner_lock(self, owner: str) -> None:
        """Pass notifications on while the lock connection lives; get a new one when it dies."""
        while True:
            connection = self._lock_connection
            if connection is not None:
                try:
                    async for _ in connection.notifies():
                        for wake in self._wakes:
                            wake()
                except psycopg.Error as error:
                    logger.warning("lost the liveness lock's connection (%s)", error)
                with contextlib.suppress(psycopg.Error):
                    await connection.close()
                self._lock_connection = None
            await asyncio.sleep(LOCK_RETRY_SECONDS)
            try:
                self._lock_connection = await self._lock_owner(owner)
                logger.info("holding the liveness lock of %s again", owner)
            except StoreError as error:
                logger.warning(
                    "claiming nothing until the liveness lock is back (%s); retrying in %.0f s",
                    error,
                    LOCK_RETRY_SECONDS,
                )

    async def close(self) -> None:
        """Let go of the owner's lock, then close the pool; safe to call twice."""
        if self._lock_keeper is not None:
            self._lock_keeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._lock_keeper
            self._lock_keeper = None
        if self._lock_connection is not None:
            with contextlib.suppress(psycopg.Error):
                await self._lock_connection.close()
            self._lock_connection = None
        await self._pool.close()

    def tend_owner_locks(self, holding_leases: Collection[str]) -> None:
        """Nothing to do: the lock keeper takes the lock back, the server drops gone ones."""

    async def dead_owners(self, tx: Transaction, owners: Sequence[str]) -> set[str]:
        """The owners whose advisory liveness lock no session holds."""
        live = {key for (key,) in await tx.fetch(LIVE_OWNER_LOCKS, (OWNER_LOCK_SPACE,))}
        return {owner for owner in owners if owner_lock_key(owner) not in live}

    async def take_purge_turn(self, tx: Transaction) -> bool:
        """Whether this replica holds the purge lock for ``tx``: one replica purges at a time."""
        [(taken,)] = await tx.fetch("SELECT pg_try_advisory_xact_lock(%s)", (PURGE_LOCK,))
        return bool(taken)

    async def admit_one_at_a_time(self, tx: Transaction) -> None:
        """Take the admission lock until ``tx`` ends: replicas count and insert in turn."""
        await tx.execute("SELECT pg_advisory_xact_lock(%s)", (ADMISSION_LOCK,))

    async def return_free_space(self, tx: Transaction) -> None:
        """Nothing to do: PostgreSQL's autovacuum makes the space reusable."""

    async def announce_release(self, tx: Transaction) -> None:
        """NOTIFY the other replicas (delivered when ``tx`` commits), so they sweep now."""
        await tx.execute("SELECT pg_notify(%s, '')", (RELEASED_CHANNEL,))

    def on_jobs_released(self, wake: Callable[[], None]) -> None:
        """Call ``wake`` on every NOTIFY of released jobs that the lock connection hears.

        Notifications are lost while that connection is down and do not pass through
        transaction-mode poolers; the periodic sweep covers both.
        """
        self._wakes.append(wake)

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[Transaction]:
        """A transaction on a pooled connection: committed on leaving, rolled back on error."""
        try:
            async with self._pool.connection() as connection, connection.transaction():
                yield _PostgresTransaction(connection)
        except (psycopg.Error, PoolTimeout) as error:
            raise self._translate(error) from error

    async def fetch(self, sql: str, params: Sequence[Any]) -> list[Row]:
        """Run one read on a pooled connection, outside any transaction."""
        try:
            async with self._pool.connection() as connection:
                return await _PostgresTransaction(connection).fetch(sql, params)
        except (psycopg.Error, PoolTimeout) as error:
            raise self._translate(error) from error

    def _translate(self, error: Exception) -> StoreError:
        return counted(self._classify(error))

    def _classify(self, error: Exception) -> StoreError:
        message = f"PostgreSQL database {self.url} is unavailable: {error}"
        if isinstance(error, PoolTimeout):
            return StoreUnavailableError(message, "the database is not answering")
        if isinstance(error, pg_errors.DeadlockDetected | pg_errors.SerializationFailure):
            return StoreConflictError(message, "the database is busy")
        if isinstance(
            error,
            pg_errors.LockNotAvailable | pg_errors.QueryCanceled | pg_errors.TooManyConnections,
        ):
            return StoreUnavailableError(message, "the database is busy")
        if isinstance(error, pg_errors.ReadOnlySqlTransaction):
            return StoreUnavailableError(message, "the database is read-only")
        if isinstance(error, pg_errors.DiskFull):
            # A large write may fail where a small one still fits.
            return StoreUnavailableError(message, "the database disk is full", every_write=False)
        if isinstance(error, psycopg.OperationalError):
            return StoreUnavailableError(message, "the database is unreachable")
        return StoreError(f"PostgreSQL error on {self.url}: {error}")
