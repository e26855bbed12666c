"""Retention: finished jobs older than JOB_RETENTION_SECONDS are purged, rows and payloads.

A loop of this process's own looks for them every ``Settings.purge_interval`` seconds and
removes them a few at a time, each batch its own short transaction, so no write waits long
behind a purge. On PostgreSQL one replica purges at a time (the others find the purge lock
taken and skip their turn).
"""

import asyncio
import contextlib
import logging
import time

from app.config import Settings
from app.store import Clock, JobStore, StoreError

logger = logging.getLogger(__name__)

# Jobs removed per transaction: small, since a job's input and result can be megabytes.
PURGE_BATCH = 20


class Retention:
    """Purges expired jobs in the background."""

    def __init__(self, store: JobStore, settings: Settings, clock: Clock = time.time) -> None:
        self._store = store
        self._retention = settings.job_retention_seconds
        self._interval = settings.purge_interval
        self._clock = clock
        self._loop: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Start looking for expired jobs, at once and then every purge interval."""
        self._loop = asyncio.create_task(self._every_interval())

    async def stop(self) -> None:
        """Stop purging (a batch in flight still commits)."""
        if self._loop is not None:
            self._loop.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._loop

    async def purge(self) -> int:
        """Remove every job that finished more than the retention ago; return how many."""
        removed = 0
        while True:
            cutoff = self._clock() - self._retention
            batch = await self._store.purge_expired(cutoff, PURGE_BATCH)
            removed += batch
            if batch < PURGE_BATCH:
                return removed
            await asyncio.sleep(0)  # let requests in between batches

    async def _every_interval(self) -> None:
        while True:
            try:
                if removed := await self.purge():
                    logger.info(
                        "purged %d jobs finished more than %g s ago", removed, self._retention
                    )
            except StoreError as error:
                logger.warning("purge failed: %s", error)
            except Exception:
                logger.exception("purge failed")
            await asyncio.sleep(self._interval)
