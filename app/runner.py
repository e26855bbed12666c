"""Running jobs, one way: a turn → a claim → the flow off the event loop → the outcome recorded.

A job reaches ``_execute`` in one of three ways, and only the way it gets its claim differs:

* just submitted, with a turn free: the store inserted it already claimed for this process,
  and the submission's background task (``run_expand_reduce_flow``) starts it;
* just submitted, no turn free: it was inserted reserved for this process and waits here for
  a turn, then claims it (unless its grace time ran out and another process took it);
* found by the sweep: left behind by a process that died, stopped or lost its lease.

The claims this process holds live in the store's registry (``JobStore.held``), which changes
only when a write commits: the heartbeat renews exactly those, ``stop()`` releases exactly
those. A claim is only ever taken with a turn in hand, so it starts at once, and none is taken
once the process drains.
"""

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, overload

from app import metrics
from app.capacity import Capacity, Turn
from app.config import Settings
from app.flow import FlowStopped, KeyCollisionError
from app.jobs import Claim, JobStatus, outcome_status
from app.logs import job_fields, running_job
from app.store import (
    CANCELLED_ERROR,
    CancelResult,
    Idempotency,
    JobRecord,
    JobStore,
    Replayed,
    StoreError,
)
from app.workers import CpuWorkers, FlowControl, WorkerCrashedError

logger = logging.getLogger(__name__)

# Backoff between tries to record an outcome the database refused.
RECORD_RETRY_FIRST_SECONDS = 0.2
RECORD_RETRY_MAX_SECONDS = 5.0


@dataclass(frozen=True, slots=True)
class Accepted:
    """A job the store has committed: claimed for this process (its turn kept), or reserved."""

    claim: Claim
    input_json: str | None  # a small input rides along; a large one is read back when run
    large: bool
    items: int = 0
    at: float = field(default_factory=time.monotonic)  # when it was committed


@dataclass(frozen=True, slots=True)
class Outcome:
    """What one run produced: a result, or an error."""

    output_json: str | None
    error: str | None


class JobRunner:
    """Runs jobs for one process: at most ``FLOW_CONCURRENCY`` at a time, large ones by lanes."""

    def __init__(self, store: JobStore, workers: CpuWorkers, settings: Settings) -> None:
        self.owner = store.owner
        self._store = store
        self._workers = workers
        self._settings = settings
        self._capacity = Capacity(settings.flow_concurrency, max(1, settings.flow_processes))
        # The flows running now, by claim, so they can be asked to stop.
        self._runs: dict[Claim, FlowControl] = {}
        # Turns of jobs accepted claimed, kept until their background task starts them.
        self._unstarted: dict[Claim, Turn] = {}
        # Claims held with no run, seen by the last heartbeat: a second sighting is an orphan.
        self._unrun: set[Claim] = set()
        self._jobs: set[asyncio.Task[None]] = set()
        self._sweeper: asyncio.Task[None] | None = None
        self._heartbeat: asyncio.Task[None] | None = None
        self._draining = False
        self._drain_deadline: float | None = None
        # Set to sweep at once: another process released jobs, or a turn came free while the
        # last sweep found more stale jobs than it could take.
        self._sweep_now = asyncio.Event()
        self._backlog = False

    async def start(self) -> None:
        """Start the sweep (at once, recovering what a previous process left) and the heartbeat."""
        self._store.on_jobs_released(self._sweep_now.set)
        self._sweeper = asyncio.create_task(
            self._every(self._settings.sweep_interval, self.sweep, self._sweep_now)
        )
        self._heartbeat = asyncio.create_task(
            self._every(self._settings.heartbeat_interval, self.heartbeat)
        )

    @property
    def accepting(self) -> bool:
        """False once shutdown has begun: new jobs should go to another process."""
        return not self._draining

    def begin_drain(self) -> None:
        """Take no more claims; running jobs get until the shutdown deadline to finish.

        Safe to call from a signal handler: it only sets attributes.
        """
        if self._drain_deadline is None:
            self._draining = True
            self._store.stop_claiming()
            self._drain_deadline = time.monotonic() + self._settings.shutdown_timeout_seconds

    @overload
    async def accept(
        self,
        job_id: str,
        input_json: str,
        *,
        total_items: int = 0,
        tenant: str = "",
        idempotency: None = None,
    ) -> Accepted: ...

    @overload
    async def accept(
        self,
        job_id: str,
        input_json: str,
        *,
        total_items: int = 0,
        tenant: str = "",
        idempotency: Idempotency | None = None,
    ) -> Accepted | Replayed: ...

    async def accept(
        self,
        job_id: str,
        input_json: str,
        *,
        total_items: int = 0,
        tenant: str = "",
        idempotency: Idempotency | None = None,
    ) -> Accepted | Replayed:
        """Store a new job, claimed for this process if a turn is free; return once committed.

        A submission repeating an earlier one (same idempotency key and request) stores
        nothing and comes back as that job (``Replayed``).
        """
        large = len(input_json) >= self._settings.flow_process_threshold_bytes
        turn = None if self._draining else self._capacity.try_take(large=large)
        try:
            stored = await self._store.create_job(
                job_id,
                input_json,
                claimed=turn is not None,
                total_items=total_items,
                tenant=tenant,
                idempotency=idempotency,
            )
        except BaseException:
            if turn is not None:
                turn.release()
            raise
        if isinstance(stored, Replayed):
            if turn is not None:  # not needed: nothing new to run
                turn.release()
            return stored
        metrics.JOBS_SUBMITTED.inc()
        logger.info(
            "job %s: accepted, %d objects",
            job_id,
            total_items,
            extra={**job_fields(job_id), "items": total_items},
        )
        if stored.is_reservation:
            if turn is not None:  # not needed: the store took no claim (draining)
                turn.release()
            return Accepted(stored, None, large, total_items)
        if turn is not None:
            self._unstarted[stored] = turn
        return Accepted(stored, None if large else input_json, large, total_items)

    async def cancel(self, job_id: str, *, tenant: str) -> CancelResult:
        """Cancel a job; a run of it here is asked to stop at once.

        A run of it in another process stops at that process's next heartbeat, which finds
        the job's lease gone.
        """
        result = await self._store.cancel_job(job_id, tenant=tenant)
        if result is CancelResult.CANCELLED:
            # The job's finished line: a run of it, here or elsewhere, stops without one.
            logger.info(
                "job %s: failed: %s",
                job_id,
                CANCELLED_ERROR,
                extra={**job_fields(job_id), "status": JobStatus.FAILED.value},
            )
            for claim, control in self._runs.items():
                if claim.job_id == job_id:
                    control.stop()
        return result

    async def run_expand_reduce_flow(self, accepted: Accepted) -> None:
        """Run a just-submitted job: what the submission's background task calls.

        The run goes on in a task of the runner's own, so the request (and its connection)
        is not kept while the job waits for a turn or runs.
        """
        self._spawn(self._run_accepted(accepted))

    async def _run_accepted(self, accepted: Accepted) -> None:
        if not accepted.claim.is_reservation:
            kept = self._unstarted.pop(accepted.claim, None)
            if kept is not None:  # else it came too late: the claim was let go as an orphan
                await self._execute(accepted.claim, kept, accepted.input_json, accepted)
            return
        turn = await self._capacity.take(large=accepted.large)
        try:
            claim = await self._claim_reserved(accepted.claim)
        except BaseException:
            turn.release()
            raise
        if claim is None:
            turn.release()
            return
        await self._execute(claim, turn, accepted.input_json, accepted)

    async def _claim_reserved(self, reservation: Claim) -> Claim | None:
        if self._draining:
            return None  # the reservation stays held: stop() hands it back
        try:
            return await self._store.claim(reservation.job_id)
        except StoreError as error:
            logger.warning(
                "job %s: not claimed (%s); a sweep will take it",
                reservation.job_id,
                error,
                extra=job_fields(reservation.job_id),
            )
            return None

    async def sweep(self) -> None:
        """Renew what is held, fail stale jobs out of attempts, claim stale jobs for free turns."""
        if self._draining:
            return
        reserved = self._capacity.reserve_free()
        offered = (reserved.slots, reserved.lanes)
        try:
            swept = await self._store.sweep(slots=reserved.slots, lanes=reserved.lanes)
            claimed = [(claim, reserved.turn(large=True)) for claim in swept.large]
            claimed += [(claim, reserved.turn(large=False)) for claim in swept.small]
        finally:
            reserved.give_back()
        # Every slot (or every lane) used: more stale jobs may be waiting, so sweep again as
        # soon as a turn comes free rather than a whole interval later.
        slots, lanes = offered
        self._backlog = (slots > 0 and len(claimed) == slots) or (
            lanes > 0 and len(swept.large) == lanes
        )
        for claim, turn in claimed:
            self._spawn(self._execute(claim, turn, None))
        await self._stop_lost(swept.lost)

    async def heartbeat(self) -> None:
        """Renew every claim's lease, record the runs' progress, stop runs whose lease is lost."""
        progress = {claim: run.done_items for claim, run in self._runs.items() if run.done_items}
        await self._stop_lost(await self._store.renew(progress))
        await self._release_orphans()

    async def _stop_lost(self, lost: Iterable[Claim]) -> None:
        """Stop the runs of claims whose lease is gone, then say why."""
        lost = list(lost)
        for claim in lost:
            if (control := self._runs.get(claim)) is not None:
                control.stop()
        for claim in lost:
            await self._say_lost(claim, "another process may run it")

    async def _say_lost(self, claim: Claim, consequence: str) -> None:
        """Log a lost lease: a warning, unless the job was cancelled (that is expected)."""
        with contextlib.suppress(StoreError):
            job = await self._store.get_job(claim.job_id)
            if job is None or job.error == CANCELLED_ERROR:
                logger.info(
                    "job %s: attempt %d stopped: the job was cancelled or deleted",
                    claim.job_id,
                    claim.attempt,
                    extra=job_fields(claim.job_id, claim.attempt),
                )
                return
        metrics.LEASE_LOST.inc()
        logger.warning(
            "job %s: attempt %d lost its lease; %s",
            claim.job_id,
            claim.attempt,
            consequence,
            extra=job_fields(claim.job_id, claim.attempt),
        )

    async def _release_orphans(self) -> None:
        """Release claims held twice in a row with nothing running them.

        Every claim is run by the task that took it; one that is not was left by a task that
        never ran (a submission's background task that was never called). Releasing it lets a
        sweep run the job rather than a heartbeat keep it forever.
        """
        unrun = {claim for claim in self._store.held.running() if claim not in self._runs}
        orphans, self._unrun = unrun & self._unrun, unrun - self._unrun
        if orphans:
            logger.warning("releasing %d claims that nothing was running", len(orphans))
            for claim in orphans:
                if (turn := self._unstarted.pop(claim, None)) is not None:
                    turn.release()
            await self._store.release(orphans)

    async def _execute(
        self, claim: Claim, turn: Turn, input_json: str | None, accepted: Accepted | None = None
    ) -> None:
        """Run one claimed attempt and record its outcome, then give the turn back.

        ``accepted`` is the job as this process accepted it, if it did.
        """
        control = FlowControl()
        self._runs[claim] = control
        started = time.monotonic()
        deadline = started + self._settings.job_timeout_seconds
        metrics.JOBS_RUNNING.inc()
        try:
            with running_job(claim):
                items = await self._say_started(claim, started, accepted)
                outcome = await self._run(claim, input_json, control)
                if outcome is not None:
                    recorded = await self._record(claim, outcome, deadline)
                    if recorded is not None:
                        _say_finished(claim, recorded, time.monotonic() - started, items)
        except asyncio.CancelledError:
            control.stop()  # the flow gives up at its next batch; stop() releases the claim
            raise
        finally:
            metrics.JOBS_RUNNING.dec()
            del self._runs[claim]
            turn.release()
            if self._backlog:
                self._sweep_now.set()

    async def _say_started(self, claim: Claim, started: float, accepted: Accepted | None) -> int:
        """Log the start, count a first start's wait or a later one's recovery; the job's size.

        A job this process did not accept is looked up for its submission time and size.
        """
        job = None
        if accepted is None:
            with contextlib.suppress(StoreError):
                job = await self._store.get_job(claim.job_id)
        items = accepted.items if accepted is not None else _total_items(job)
        if claim.attempt > 1:
            metrics.LEASE_RECOVERIES.inc()
            logger.info(
                "job %s: started, attempt %d (recovered)",
                claim.job_id,
                claim.attempt,
                extra={"recovered": True},
            )
            return items
        if accepted is not None:
            waited = started - accepted.at
        elif job is not None:
            waited = time.time() - datetime.fromisoformat(job.created_at).timestamp()
        else:
            waited = 0.0
        waited = max(0.0, waited)  # the clocks of two processes may disagree a little
        metrics.JOB_WAIT_SECONDS.observe(waited)
        logger.info(
            "job %s: started, attempt 1, waited %.3f s",
            claim.job_id,
            waited,
            extra={"wait_seconds": round(waited, 6)},
        )
        return items

    async def _run(
        self, claim: Claim, input_json: str | None, control: FlowControl
    ) -> Outcome | None:
        """The attempt's outcome, or None if it should not be recorded (its claim was lost)."""
        timeout = self._settings.job_timeout_seconds
        try:
            async with asyncio.timeout(timeout):
                return await self._compute(claim, input_json, control)
        except TimeoutError:
            control.stop()
            logger.error(
                "job %s: attempt %d timed out after %g s", claim.job_id, claim.attempt, timeout
            )
            return Outcome(
                None, f"timed out: the job ran longer than JOB_TIMEOUT_SECONDS ({timeout:g} s)"
            )
        except FlowStopped:
            logger.info(
                "job %s: attempt %d stopped before finishing; its outcome is not recorded",
                claim.job_id,
                claim.attempt,
            )
            return None
        except StoreError as error:
            logger.error(
                "job %s: input not read (%s); letting it go for a retry", claim.job_id, error
            )
            await self._give_up(claim)
            return None

    async def _compute(self, claim: Claim, input_json: str | None, control: FlowControl) -> Outcome:
        if input_json is None:
            input_json = await self._store.load_input(claim.job_id)
            if input_json is None:
                return Outcome(None, "the job's input is missing")
        try:
            return Outcome(await self._workers.run_flow(input_json, control), None)
        except KeyCollisionError as error:
            return Outcome(None, f"ExpandReduceFlow failed: {error}")
        except WorkerCrashedError as error:
            logger.error("job %s: %s", claim.job_id, error)
            return Outcome(None, f"internal error: {error}")
        except (FlowStopped, StoreError):
            raise
        except Exception as error:
            logger.exception("job %s: flow raised", claim.job_id)
            return Outcome(None, f"internal error: {type(error).__name__}: {error}")

    async def _record(self, claim: Claim, outcome: Outcome, deadline: float) -> Outcome | None:
        """Record the outcome, retrying while the database refuses, until the job's deadline.

        The claim stays held (and heartbeated) meanwhile. Past the deadline the job is failed
        with what went wrong, or, if even that cannot be written, let go for a retry. Returns
        the outcome recorded, if one was.
        """
        delay = RECORD_RETRY_FIRST_SECONDS
        while True:
            try:
                landed = await self._store.finish(
                    claim, output_json=outcome.output_json, error=outcome.error
                )
            except StoreError as error:
                if claim not in self._store.held:
                    return None  # its lease was lost meanwhile (and said so)
                if time.monotonic() + delay > deadline:
                    return await self._fail_unrecorded(claim, outcome, error)
                logger.warning(
                    "job %s: outcome not recorded (%s); retrying in %.1f s",
                    claim.job_id,
                    error,
                    delay,
                )
                await asyncio.sleep(delay)
                delay = min(delay * 2, RECORD_RETRY_MAX_SECONDS)
                continue
            if not landed:
                await self._say_lost(claim, "its outcome was discarded")
                return None
            return outcome

    async def _fail_unrecorded(
        self, claim: Claim, outcome: Outcome, error: StoreError
    ) -> Outcome | None:
        logger.error("job %s: outcome not recorded before its deadline: %s", claim.job_id, error)
        if outcome.error is None:
            reason = getattr(error, "reason", "the database refused it")
            failure = Outcome(None, f"internal error: the result could not be stored ({reason})")
            with contextlib.suppress(StoreError):
                if await self._store.finish(claim, output_json=None, error=failure.error):
                    return failure
                return None
        await self._give_up(claim)
        return None

    async def _give_up(self, claim: Claim) -> None:
        """Let the claim go so a sweep retries the job: released, or if even that fails, dropped."""
        try:
            await self._store.release([claim])
        except StoreError:
            self._store.abandon(claim)

    async def stop(self) -> None:
        """Drain: wait for running jobs until the shutdown deadline, then release the rest."""
        self.begin_drain()
        assert self._drain_deadline is not None
        await _cancel(self._sweeper)
        grace_seconds = max(0.0, self._drain_deadline - time.monotonic())
        if self._runs:
            logger.info("waiting up to %.1f s for %d running jobs", grace_seconds, len(self._runs))
        if self._jobs:
            await asyncio.wait(list(self._jobs), timeout=grace_seconds)
        for task in list(self._jobs):
            task.cancel()
        await asyncio.gather(*self._jobs, return_exceptions=True)
        await _cancel(self._heartbeat)
        await self._release_held()

    async def _release_held(self) -> None:
        """Hand back everything still held, once every write in flight has committed."""
        with contextlib.suppress(StoreError):
            await self._store.flush()
        held = list(self._store.held)
        if not held:
            return
        reserved = sum(claim.is_reservation for claim in held)
        logger.info(
            "releasing %d unfinished jobs for the next process and handing back %d that had "
            "not started",
            len(held) - reserved,
            reserved,
        )
        try:
            await self._store.release(held)
        except StoreError as error:
            logger.warning(
                "could not release %d jobs (%s); their leases will run out", len(held), error
            )

    def _spawn(self, coroutine: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(coroutine)
        self._jobs.add(task)
        task.add_done_callback(self._jobs.discard)

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


def _total_items(job: JobRecord | None) -> int:
    return job.progress.total_items if job is not None and job.progress is not None else 0


def _say_finished(claim: Claim, outcome: Outcome, seconds: float, items: int) -> None:
    """Log the outcome one run recorded, and count the run's duration."""
    metrics.JOB_RUN_SECONDS.observe(seconds)
    status = outcome_status(outcome.error).value
    because = "" if outcome.error is None else f": {outcome.error}"
    logger.info(
        "job %s: %s in %.3f s, %d objects%s",
        claim.job_id,
        status,
        seconds,
        items,
        because,
        extra={"status": status, "seconds": round(seconds, 6), "items": items},
    )


async def _cancel(task: asyncio.Task[None] | None) -> None:
    if task is not None:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
