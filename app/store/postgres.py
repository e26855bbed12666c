"""The PostgreSQL backend (psycopg 3, async, pooled): several replicas on one database.

The job and lease logic is ``app.store.sql``'s, with ``FOR UPDATE SKIP LOCKED`` on the
subqueries that pick jobs to claim or fail, so replicas never wait for each other's rows or
take the same job twice. This module connects, migrates under an advisory lock (replicas
starting together upgrade the schema once) and turns driver errors into the store's.
"""

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from contextlib import asynccontextmanager
from typing import Any

import psycopg
from psycopg import errors as pg_errors
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from app.config import redact
from app.jobs import Claim
from app.store import (
    Clock,
    LeasePolicy,
    StoreConflictError,
    StoreError,
    StoreUnavailableError,
)
from app.store.sql import Dialect, Row, SQLJobStore, upgrade_schema

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
)
# pg_advisory_xact_lock key held while migrating: any constant the other users of the
# database do not use ("expand-reduce" in ASCII).
MIGRATION_LOCK = 0x657870616E64
RETRY_PAUSE_SECONDS = 1.0
# NOTIFY'd when a replica releases jobs (it is stopping), so the others sweep at once.
RELEASED_CHANNEL = "expand_reduce_jobs_released"
LISTEN_RETRY_SECONDS = 5.0


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


class PostgresJobStore(SQLJobStore):
    """Jobs in a PostgreSQL database shared by any number of replicas."""

    def __init__(
        self,
        url: str,
        policy: LeasePolicy,
        *,
        pool_size: int = 10,
        timeout_seconds: float = 5.0,
        startup_timeout_seconds: float = 60.0,
        clock: Clock,
    ) -> None:
        super().__init__(policy, clock, Dialect(placeholder="%s", lock="FOR UPDATE SKIP LOCKED"))
        self.url = redact(url)
        self._url = url
        self._listener: asyncio.Task[None] | None = None
        self._startup_timeout = startup_timeout_seconds
        # For the pool's connections and the LISTEN one. Reads run alone; writes open a
        # transaction of their own (``_transaction``).
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

    async def open(self) -> None:
        """Connect (retrying while the database comes up), then create or upgrade the schema."""
        await self._pool.open(wait=False)
        deadline = time.monotonic() + self._startup_timeout
        while True:
            try:
                await self._migrate()
                return
            except StoreUnavailableError as error:
                if time.monotonic() >= deadline:
                    await self._pool.close()
                    raise
                logger.warning("%s; retrying", error)
                await asyncio.sleep(RETRY_PAUSE_SECONDS)
            except BaseException:
                await self._pool.close()
                raise

    async def _migrate(self) -> None:
        async with self._transaction() as tx:
            await tx.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK,))
            await tx.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER)", ())
            rows = await tx.fetch("SELECT version FROM schema_version", ())

            async def record(number: int) -> None:
                await tx.execute("DELETE FROM schema_version", ())
                await tx.execute("INSERT INTO schema_version VALUES (%s)", (number,))

            version = rows[0][0] if rows else 0
            await upgrade_schema(tx, MIGRATIONS, version, record, self.url)

    async def close(self) -> None:
        """Apply what is queued, then close the pool; safe to call twice."""
        if self._listener is not None:
            self._listener.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._listener
            self._listener = None
        await self._flush()
        await self._pool.close()

    async def release(self, claims: Iterable[Claim], unclaimed: Iterable[str] = ()) -> None:
        """Give these jobs up, and tell the other replicas so they sweep now."""
        claims, unclaimed = list(claims), list(unclaimed)
        await super().release(claims, unclaimed)
        if claims or unclaimed:
            with contextlib.suppress(StoreError):  # a hint only; their sweeps come anyway
                await self._fetch("SELECT pg_notify(%s, '')", (RELEASED_CHANNEL,))

    def on_jobs_released(self, wake: Callable[[], None]) -> None:
        """LISTEN on a connection of its own (outside the pool) and call ``wake`` per NOTIFY.

        Notifications are lost while that connection is down and do not pass through
        transaction-mode poolers; the periodic sweep covers both.
        """
        if self._listener is None:
            self._listener = asyncio.create_task(self._listen(wake))

    async def _listen(self, wake: Callable[[], None]) -> None:
        while True:
            try:
                connection = await psycopg.AsyncConnection.connect(
                    self._url, **self._connection_options
                )
                async with connection:
                    await connection.execute(f"LISTEN {RELEASED_CHANNEL}")
                    async for _ in connection.notifies():
                        wake()
            except psycopg.Error as error:
                logger.warning(
                    "not listening for released jobs (%s); retrying in %.0f s",
                    error,
                    LISTEN_RETRY_SECONDS,
                )
            await asyncio.sleep(LISTEN_RETRY_SECONDS)

    @asynccontextmanager
    async def _transaction(self) -> AsyncIterator[_PostgresTransaction]:
        """A transaction on a pooled connection: committed on leaving, rolled back on error."""
        try:
            async with self._pool.connection() as connection, connection.transaction():
                yield _PostgresTransaction(connection)
        except (psycopg.Error, PoolTimeout) as error:
            raise self._translate(error) from error

    async def _fetch(self, sql: str, params: Sequence[Any]) -> list[Row]:
        try:
            async with self._pool.connection() as connection:
                return await _PostgresTransaction(connection).fetch(sql, params)
        except (psycopg.Error, PoolTimeout) as error:
            raise self._translate(error) from error

    def _translate(self, error: Exception) -> StoreError:
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
            return StoreUnavailableError(message, "the database disk is full")
        if isinstance(error, psycopg.OperationalError):
            return StoreUnavailableError(message, "the database is unreachable")
        return StoreError(f"PostgreSQL error on {self.url}: {error}")
