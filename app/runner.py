"""Running jobs: claim, run the flow off the event loop, record the outcome; sweep; heartbeat.

Every execution holds a claim (see ``app.store``). A job's first run is started by the submit
request's background task; anything that falls through — a crash, a restart, a lost lease, a
busy database — is picked up by the periodic sweep of this or any other process.
"""

import asyncio
import contextlib
import logging
import os
import socket
import time
import uuid
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

from app.config import Settings
from app.flow import KeyCollisionError
from app.jobs import Claim
from app.store import JobStore, StoreError
from app.workers import CpuWorkers, WorkerCrashedError

logger = logging.getLogger(__name__)


class JobRunner:
    """Runs jobs for one process, at most ``flow_concurrency`` at a time."""

    def __init__(
        self, store: JobStore, workers: CpuWorkers, settings: Settings, owner: str | None = None
    ) -> None:
        self.owner = owner or f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self._store = store
        self._workers = workers
        self._settings = settings
        self._slots = asyncio.Semaphore(settings.flow_concurrency)
        # A job whose input is read from the database (a large one, or one recovered from
        # another process) also takes one of these, so no more large inputs sit in memory than
        # there are worker processes to work on them.
        self._large = asyncio.Semaphore(max(1, settings.flow_processes))
        self._held: dict[str, Claim] = {}
        # Jobs accepted here unclaimed and not yet tried: on shutdown they are handed back, so
        # another process need not wait out their grace time.
        self._queued: set[str] = set()
        self._executions: set[asyncio.Task[None]] = set()
        self._background: set[asyncio.Task[None]] = set()
        self._stopping = False
        self._drain_deadline: float | None = None
        # Set when a slot frees up after a sweep that filled every free slot: there are
        # probably more stale jobs, and they should not wait a whole sweep interval.
        self._sweep_again = asyncio.Event()
        self._backlog = False

    async def start(self) -> None:
        """Start the sweep (which runs at once, recovering what a previous process left behind)."""
        # Jobs another process gives up when it stops are swept at once where the store can
        # tell, rather than at the next interval.
        self._store.on_jobs_released(self._sweep_again.set)
        self._spawn(self._every(self._settings.sweep_interval, self.sweep, self._sweep_again))
        self._spawn(self._every(self._settings.heartbeat_interval, self.heartbeat))

    @property
    def accepting(self) -> bool:
        """False once shutdown has begun: new jobs should go to another process."""
        return not self._stopping

    def begin_drain(self) -> None:
        """Stop starting jobs; running ones get until the shutdown deadline to finish.

        Safe to call from a signal handler: it only sets attributes.
        """
        if self._drain_deadline is None:
            self._stopping = True
            self._drain_deadline = time.monotonic() + self._settings.shutdown_timeout_seconds

    async def accept(self, job_id: str, input_json: str, *, keep_input: bool) -> None:
        """Store a new job and start it; return once it is committed.

        With a slot free, the job is inserted already claimed by this process and runs at
        once, saving the claim's write; otherwise it is inserted unclaimed and waits for a
        slot here, or for another process's sweep after the grace time. ``keep_input`` says
        whether to hold the input in memory until the job runs (a small one) rather than
        read it back then (a large one).
        """
        reserved = await self._reserve_slot()
        try:
            claim = await self._store.create_job(
                job_id, input_json, self.owner if reserved else None
            )
        except BaseException:
            if reserved:
                self._slots.release()
            raise
        kept = input_json if keep_input else None
        if claim is None:
            self.start_job(job_id, kept)
            return
        self._held[job_id] = claim
        self._spawn(self._run_in_reserved_slot(claim, kept))

    async def _reserve_slot(self) -> bool:
        if self._stopping or self._slots.locked():
            return False
        await self._slots.acquire()  # a slot is free, so this returns without waiting
        return True

    async def _run_in_reserved_slot(self, claim: Claim, input_json: str | None) -> None:
        try:
            if not self._stopping:  # else the claim stays held, for stop() to release
                await self._execute(claim, input_json)
        finally:
            self._slots.release()

    def start_job(self, job_id: str, input_json: str | None = None) -> None:
        """Hand a just-submitted (and committed) job to a task of the runner's own.

        A job waiting for a free slot then holds only its id (and small input), not the
        request it came with.
        """
        self._queued.add(job_id)
        self._spawn(self.run_expand_reduce_flow(job_id, input_json))

    async def run_expand_reduce_flow(self, job_id: str, input_json: str | None = None) -> None:
        """Run a just-submitted job, unless another process or the sweep already took it.

        ``input_json`` is the job's input if the caller has it at hand; otherwise it is read.
        """
        if self._stopping:
            return  # unclaimed: stop() hands it back for another process's sweep
        async with self._slots:
            if self._stopping:
                return
            self._queued.discard(job_id)
            try:
                claim = await self._store.claim(job_id, self.owner)
            except StoreError as error:
                logger.warning("job %s: not claimed (%s); the sweep will retry", job_id, error)
                return
            if claim is not None:
                self._held[job_id] = claim
                await self._execute(claim, input_json)

    async def sweep(self) -> list[Claim]:
        """Fail stale jobs out of attempts and claim as many others as there are free slots."""
        free = self._settings.flow_concurrency - len(self._held)
        claims = await self._store.claim_stale(self.owner, free)
        self._backlog = free > 0 and len(claims) == free
        for claim in claims:
            logger.info("job %s: recovered, attempt %d", claim.job_id, claim.attempt)
            self._held[claim.job_id] = claim
            self._spawn(self._run_claimed(claim))
        return claims

    async def heartbeat(self) -> None:
        """Renew the leases of the jobs this process holds."""
        claims = list(self._held.values())
        still_held = await self._store.renew(claims)
        for claim in claims:
            # A job that finished while the renewal waited for the database is not lost.
            if claim.job_id not in still_held and self._held.get(claim.job_id) == claim:
                logger.warning("job %s: lease lost; another process may run it", claim.job_id)

    async def _run_claimed(self, claim: Claim) -> None:
        async with self._slots:
            if not self._stopping:
                await self._execute(claim)

    async def _execute(self, claim: Claim, input_json: str | None = None) -> None:
        """Run one claimed attempt and record its outcome; the caller holds a slot."""
        task = asyncio.current_task()
        assert task is not None
        self._executions.add(task)
        try:
            output_json, error = await self._compute(claim, input_json)
            if not await self._store.finish(claim, output_json=output_json, error=error):
                logger.warning(
                    "job %s: attempt %d lost its lease; its outcome was discarded",
                    claim.job_id,
                    claim.attempt,
                )
            self._held.pop(claim.job_id, None)
        except Exception as error:
            # Let go of the claim: its lease runs out and a sweep retries the job (up to
            # JOB_MAX_ATTEMPTS), instead of a heartbeat keeping it alive forever.
            if isinstance(error, StoreError):
                logger.error("job %s: outcome not recorded: %s", claim.job_id, error)
            else:
                logger.exception("job %s: outcome not recorded", claim.job_id)
            self._held.pop(claim.job_id, None)
        finally:
            # On cancellation (shutdown) the claim stays in _held, for stop() to release.
            self._executions.discard(task)
            if self._backlog:
                self._sweep_again.set()

    async def _compute(self, claim: Claim, input_json: str | None) -> tuple[str | None, str | None]:
        """Return (output JSON, None) or (None, error message) for one attempt."""
        if input_json is not None:
            return await self._run_flow(claim, input_json)
        async with self._large:
            input_json = await self._store.load_input(claim.job_id)
            if input_json is None:
                return None, "the job's input is missing"
            return await self._run_flow(claim, input_json)

    async def _run_flow(self, claim: Claim, input_json: str) -> tuple[str | None, str | None]:
        try:
            return await self._workers.run_flow(input_json), None
        except KeyCollisionError as error:
            return None, f"ExpandReduceFlow failed: {error}"
        except WorkerCrashedError as error:
            logger.error("job %s: %s", claim.job_id, error)
            return None, f"internal error: {error}"
        except Exception as error:
            logger.exception("job %s: flow raised", claim.job_id)
            return None, f"internal error: {type(error).__name__}: {error}"

    async def stop(self) -> None:
        """Drain: wait for running jobs until the shutdown deadline, then release the rest."""
        self.begin_drain()
        assert self._drain_deadline is not None
        grace_seconds = max(0.0, self._drain_deadline - time.monotonic())
        if self._executions:
            logger.info(
                "waiting up to %.1f s for %d running jobs", grace_seconds, len(self._executions)
            )
            await asyncio.wait(list(self._executions), timeout=grace_seconds)
        for task in [*self._executions, *self._background]:
            task.cancel()
        await asyncio.gather(*self._executions, *self._background, return_exceptions=True)
        if self._held:
            logger.info("releasing %d unfinished jobs for the next process", len(self._held))
        if self._queued:
            logger.info("handing back %d jobs that had not started", len(self._queued))
        if self._held or self._queued:
            with contextlib.suppress(StoreError):
                await self._store.release(self._held.values(), unclaimed=self._queued)
            self._held.clear()
            self._queued.clear()

    def _spawn(self, coroutine: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(coroutine)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _every(
        self,
        interval: float,
        action: Callable[[], Awaitable[object]],
        early: asyncio.Event | None = None,
    ) -> None:
        """Run ``action`` every ``interval`` seconds, or as soon as ``early`` is set."""
        early = early or asyncio.Event()
        while True:
            early.clear()
            try:
                await action()
            except StoreError as error:
                logger.warning("%s failed: %s", action.__name__, error)
            except Exception:
                logger.exception("%s failed", action.__name__)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(early.wait(), interval)
