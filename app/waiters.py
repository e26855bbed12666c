"""Long-poll: requests waiting for a job to leave ``processing``, woken as soon as it does.

Jobs this process finishes (or cancels) wake their waiters as the write commits. Jobs
finished elsewhere (another replica) are found by one poll for all waiters together: every
``POLL_SECONDS``, one index read of which awaited jobs still have a lease, not a query per
waiter. The number of waiters is capped: past the cap a
request is answered at once, as if it had not asked to wait.
"""

import asyncio
import contextlib
from collections.abc import Iterable

from app.logs import detached_task
from app.store import JobStore, StoreError

POLL_SECONDS = 0.25


class StatusWaiters:
    """The requests of one process waiting for jobs to finish."""

    def __init__(self, store: JobStore, most: int) -> None:
        self._store = store
        self._most = most
        self._waiting: dict[str, set[asyncio.Future[None]]] = {}
        self._count = 0
        self._poller: asyncio.Task[None] | None = None
        store.on_jobs_finished(self.finished)

    def finished(self, job_ids: Iterable[str]) -> None:
        """Wake whoever waits for these jobs."""
        for job_id in job_ids:
            for waiter in self._waiting.pop(job_id, ()):
                if not waiter.done():
                    waiter.set_result(None)

    async def wait(self, job_id: str, seconds: float) -> bool:
        """Wait until the job finishes or ``seconds`` pass; False if too many wait already."""
        if self._count >= self._most:
            return False
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiting.setdefault(job_id, set()).add(waiter)
        self._count += 1
        if self._poller is None or self._poller.done():
            self._poller = detached_task(self._poll())
        try:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(waiter, seconds)
        finally:
            self._count -= 1
            if (others := self._waiting.get(job_id)) is not None:
                others.discard(waiter)
                if not others:
                    del self._waiting[job_id]
        return True

    async def _poll(self) -> None:
        """While anyone waits: every POLL_SECONDS, look up all awaited jobs in one query."""
        while self._waiting:
            await asyncio.sleep(POLL_SECONDS)
            job_ids = list(self._waiting)
            try:
                processing = await self._store.still_processing(job_ids)
            except StoreError:
                continue  # the database is away: look again at the next poll
            self.finished(job_id for job_id in job_ids if job_id not in processing)

    async def close(self) -> None:
        """Stop polling; waiters still waiting time out as usual."""
        if self._poller is not None:
            self._poller.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._poller
