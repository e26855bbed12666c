"""The runner: one way to run a job, and what happens around it — pauses, shutdown, lost
leases, timeouts, a database that refuses — on both backends, with a controllable clock.

Flows are real, or held at a gate by ``GatedWorkers`` so a test can act while a job runs;
the runner and the store never know the difference.
"""

import asyncio
import logging
from collections.abc import AsyncIterator, Iterable, Mapping
from typing import Any

import orjson
import pytest

from app.config import Settings
from app.jobs import Claim, JobStatus
from app.runner import Accepted, JobRunner
from app.store import CANCELLED_ERROR, CancelResult, JobStore, StoreUnavailableError
from app.workers import CpuWorkers, FlowControl
from tests.support import (
    FakeClock,
    FaultyDatabase,
    FreshDatabase,
    faulty,
    opened_store,
    store_settings,
    wait_until,
)

A = "aaaaaaaa-aaaa-4aaa-8aaa-aaaaaaaaaaaa"
B = "bbbbbbbb-bbbb-4bbb-8bbb-bbbbbbbbbbbb"
LEASE = 30


class GatedWorkers(CpuWorkers):
    """Real flows that wait at ``gate`` (while it is not open) before they run."""

    def __init__(self) -> None:
        super().__init__(processes=0, threshold_bytes=128 * 1024)
        self.gate = asyncio.Event()
        self.gate.set()
        self.started: list[str] = []
        self.running = asyncio.Event()
        self.stops: list[FlowControl | None] = []
        self.explode_on: str | None = None

    async def run_flow(self, input_json: str, stop: FlowControl | None = None) -> str:
        self.started.append(input_json)
        self.stops.append(stop)
        self.running.set()
        if self.explode_on is not None and self.explode_on in input_json:
            raise RuntimeError("boom happened")
        await self.gate.wait()
        return await super().run_flow(input_json, stop)

    def hold(self) -> None:
        """Make flows wait at the gate from now on."""
        self.gate.clear()
        self.running.clear()


class SpyStore:
    """A store that says when the runner asks it to renew or finish (the request is queued)."""

    def __init__(self, store: JobStore) -> None:
        self._store = store
        self.renewing = asyncio.Event()
        self.finishing = asyncio.Event()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)

    async def renew(self, progress: Mapping[Claim, int] | None = None) -> set[Claim]:
        self.renewing.set()
        return await self._store.renew(progress)

    async def finish(self, claim: Claim, *, output_json: str | None, error: str | None) -> bool:
        self.finishing.set()
        return await self._store.finish(claim, output_json=output_json, error=error)


@pytest.fixture
def settings(database: FreshDatabase) -> Settings:
    return store_settings(database)


@pytest.fixture
def flaky(settings: Settings) -> FaultyDatabase:
    return faulty(settings)


@pytest.fixture
async def store(
    settings: Settings, clock: FakeClock, flaky: FaultyDatabase
) -> AsyncIterator[JobStore]:
    async with opened_store(settings, clock, "me", database=flaky) as opened:
        yield opened


@pytest.fixture
async def other(settings: Settings, clock: FakeClock, store: JobStore) -> AsyncIterator[JobStore]:
    """Another live process on the same database."""
    async with opened_store(settings, clock, "other") as opened:
        yield opened


@pytest.fixture
def workers() -> GatedWorkers:
    return GatedWorkers()


def make_runner(store: Any, settings: Settings, workers: CpuWorkers, **changes: Any) -> JobRunner:
    return JobRunner(store, workers, settings.model_copy(update=changes))


async def submit(runner: JobRunner, job_id: str, items: list[dict[str, Any]]) -> Accepted:
    """What the submit route does: accept, then the background task."""
    accepted = await runner.accept(job_id, orjson.dumps(items).decode())
    await runner.run_expand_reduce_flow(accepted)
    return accepted


async def running_a(store: Any, settings: Settings, workers: GatedWorkers) -> JobRunner:
    """A runner with job A submitted, claimed and running, held at the gate."""
    runner = make_runner(store, settings, workers)
    workers.hold()
    await submit(runner, A, [{"a": "1"}])
    await workers.running.wait()
    return runner


async def final(store: JobStore, job_id: str) -> tuple[JobStatus, Any, str | None]:
    """The job's outcome, once it has one."""

    async def finished() -> bool:
        job = await store.get_job(job_id)
        return job is not None and job.status is not JobStatus.PROCESSING

    await wait_until(finished, what=f"job {job_id} finishing")
    job = await store.get_job(job_id, with_output=True)
    assert job is not None
    result = orjson.loads(job.output_data) if job.output_data else None
    return job.status, result, job.error


def leases(database: FreshDatabase) -> dict[str, tuple[str | None, int]]:
    return {
        job: (owner, attempts)
        for job, owner, attempts in database.query("SELECT job_id, owner, attempts FROM job_leases")
    }


def ids(claims: Iterable[Claim]) -> set[str]:
    return {claim.job_id for claim in claims}


async def test_a_submitted_job_runs_to_completion(
    store: JobStore, settings: Settings, workers: GatedWorkers
) -> None:
    runner = make_runner(store, settings, workers)
    await submit(runner, A, [{"a": "x", "b": "y", "c": "z"}])
    assert await final(store, A) == (JobStatus.COMPLETED, [{"a b": "x y", "c": "z"}], None)
    await runner.stop()


async def test_a_key_collision_fails_the_job_with_the_key_named(
    store: JobStore, settings: Settings, workers: GatedWorkers
) -> None:
    runner = make_runner(store, settings, workers)
    await submit(runner, A, [{"a": "1", "x": "2", "a x": "3"}])
    status, result, error = await final(store, A)
    assert (status, result) == (JobStatus.FAILED, None)
    assert error is not None
    assert "'a x'" in error
    await runner.stop()


async def test_an_exception_in_one_job_is_recorded_and_logged_and_others_still_run(
    store: JobStore,
    settings: Settings,
    workers: GatedWorkers,
    caplog: pytest.LogCaptureFixture,
) -> None:
    runner = make_runner(store, settings, workers)
    workers.explode_on = "boom"
    await submit(runner, B, [{"boom": "1"}])
    await submit(runner, A, [{"a": "1"}])
    assert await final(store, A) == (JobStatus.COMPLETED, [{"a": "1"}], None)
    assert await final(store, B) == (
        JobStatus.FAILED,
        None,
        "internal error: RuntimeError: boom happened",
    )
    assert B in caplog.text
    assert "Traceback" in caplog.text
    await runner.stop()


async def test_an_accepted_job_is_inserted_claimed_when_a_turn_is_free_and_reserved_when_not(
    store: JobStore, settings: Settings, workers: GatedWorkers, database: FreshDatabase
) -> None:
    runner = make_runner(store, settings, workers, flow_concurrency=1)
    workers.hold()
    await submit(runner, A, [{"a": "1", "b": "2"}])  # takes the only turn
    await submit(runner, B, [{"b": "1"}])  # none left: reserved, waits here
    assert leases(database) == {A: ("me", 1), B: ("me", 0)}
    workers.gate.set()
    assert await final(store, A) == (JobStatus.COMPLETED, [{"a b": "1 2"}], None)
    assert await final(store, B) == (JobStatus.COMPLETED, [{"b": "1"}], None)
    await runner.stop()


async def test_a_reserved_job_another_process_took_meanwhile_is_not_run_here(
    store: JobStore,
    other: JobStore,
    settings: Settings,
    workers: GatedWorkers,
    clock: FakeClock,
    database: FreshDatabase,
) -> None:
    runner = make_runner(store, settings, workers, flow_concurrency=1)
    workers.hold()
    await submit(runner, A, [{"a": "1"}])
    await submit(runner, B, [{"b": "1"}])  # waits for A's turn
    clock.advance(settings.job_claim_grace_seconds + 1)
    assert ids((await other.sweep(slots=5, lanes=5)).small) == {B}
    workers.gate.set()
    await final(store, A)
    await runner.stop()
    assert len(workers.started) == 1  # only A ran here
    assert leases(database) == {B: ("other", 1)}


async def test_the_sweep_at_start_finishes_a_job_a_dead_process_left_behind(
    store: JobStore, settings: Settings, workers: GatedWorkers, clock: FakeClock
) -> None:
    async with opened_store(settings, clock, "doomed") as doomed:
        await doomed.create_job(A, '[{"a":"1","b":"2"}]', claimed=True)
    runner = make_runner(store, settings, workers)
    await runner.start()  # no lease ran out: the dead owner's lock is free
    assert await final(store, A) == (JobStatus.COMPLETED, [{"a b": "1 2"}], None)
    await runner.stop()


async def test_a_sweep_takes_no_more_jobs_than_it_has_turns_free(
    store: JobStore, other: JobStore, settings: Settings, workers: GatedWorkers, clock: FakeClock
) -> None:
    await other.create_job(A, '[{"a":"1"}]', claimed=False)
    await other.create_job(B, '[{"b":"1"}]', claimed=False)
    clock.advance(settings.job_claim_grace_seconds + 1)
    runner = make_runner(store, settings, workers, flow_concurrency=1)
    workers.hold()
    await runner.sweep()
    await workers.running.wait()
    assert len(store.held) == 1
    workers.gate.set()
    await runner.stop()


async def test_stop_waits_for_running_jobs_within_its_grace(
    store: JobStore, settings: Settings, workers: GatedWorkers
) -> None:
    runner = await running_a(store, settings, workers)
    stopping = asyncio.create_task(runner.stop())
    workers.gate.set()
    await stopping
    assert (await final(store, A))[0] is JobStatus.COMPLETED


async def test_stop_hands_back_running_and_waiting_jobs_for_the_next_process_at_once(
    store: JobStore,
    settings: Settings,
    workers: GatedWorkers,
    clock: FakeClock,
    database: FreshDatabase,
) -> None:
    runner = make_runner(store, settings, workers, flow_concurrency=1, shutdown_timeout_seconds=0)
    workers.hold()
    await submit(runner, A, [{"a": "1"}])  # claimed, running, held at the gate
    await submit(runner, B, [{"b": "1"}])  # reserved, waiting for the turn
    await workers.running.wait()
    await runner.stop()
    [stop] = workers.stops  # B never started
    assert stop is not None
    assert stop.stopped()  # A's flow was asked to stop
    assert leases(database) == {A: (None, 1), B: (None, 0)}
    clock.advance(0.001)  # neither A's lease nor B's grace time has run out
    async with opened_store(settings, clock, "next") as successor:
        swept = await successor.sweep(slots=10, lanes=10)
    assert sorted((c.job_id, c.attempt) for c in swept.small) == [(A, 2), (B, 1)]


async def test_once_draining_no_sweep_and_no_waiting_job_takes_a_claim(
    store: JobStore,
    other: JobStore,
    settings: Settings,
    workers: GatedWorkers,
    clock: FakeClock,
    database: FreshDatabase,
) -> None:
    await other.create_job("stale", "[{}]", claimed=False)
    runner = make_runner(store, settings, workers, flow_concurrency=1)
    workers.hold()
    await submit(runner, A, [{"a": "1"}])
    await submit(runner, B, [{"b": "1"}])  # waits for A's turn
    clock.advance(settings.job_claim_grace_seconds + 1)  # "stale" is there to be taken
    runner.begin_drain()  # SIGTERM
    await runner.sweep()  # the periodic sweep, a NOTIFY from another replica: nothing
    workers.gate.set()  # A finishes and frees its turn for B, which must not claim it now
    await final(store, A)
    await runner.stop()
    assert leases(database) == {"stale": ("other", 0), B: (None, 0)}


async def test_a_claim_that_commits_while_stop_cancels_its_sweep_is_handed_back(
    store: JobStore,
    settings: Settings,
    workers: GatedWorkers,
    clock: FakeClock,
    flaky: FaultyDatabase,
    database: FreshDatabase,
) -> None:
    async with opened_store(settings, clock, "doomed") as doomed:
        await doomed.create_job(A, '[{"a":"1"}]', claimed=False)
    runner = make_runner(store, settings, workers)
    flaky.commit_gate = asyncio.Event()
    sweeping = asyncio.create_task(runner.sweep())
    await flaky.at_gate.wait()  # the sweep's claim of A is about to commit
    sweeping.cancel()  # what stop() does to the periodic sweep
    flaky.commit_gate.set()
    with pytest.raises(asyncio.CancelledError):
        await sweeping
    await store.flush()
    assert Claim(A, "me", 1) in store.held  # committed, so held, though nobody asked
    await runner.stop()
    assert workers.started == []
    assert leases(database) == {A: (None, 1)}  # handed back, not left to run out


async def test_a_pause_past_the_lease_is_not_an_interruption(
    store: JobStore,
    other: JobStore,
    settings: Settings,
    workers: GatedWorkers,
    clock: FakeClock,
    caplog: pytest.LogCaptureFixture,
) -> None:
    runner = await running_a(store, settings, workers)
    clock.advance(LEASE * 3)  # SIGSTOP; on SIGCONT the sweep happens to run first
    await runner.sweep()
    await runner.heartbeat()
    assert (await other.sweep(slots=5, lanes=5)).small == []
    workers.gate.set()
    assert await final(store, A) == (JobStatus.COMPLETED, [{"a": "1"}], None)
    assert "lost its lease" not in caplog.text
    assert len(workers.started) == 1
    await runner.stop()


async def test_a_renewal_and_a_finish_of_one_claim_in_one_batch_warn_of_no_lost_lease(
    settings: Settings,
    clock: FakeClock,
    flaky: FaultyDatabase,
    workers: GatedWorkers,
    caplog: pytest.LogCaptureFixture,
) -> None:
    async with opened_store(settings, clock, "me", database=flaky) as real:
        spy = SpyStore(real)
        runner = await running_a(spy, settings, workers)
        flaky.commit_gate = asyncio.Event()
        blocker = asyncio.create_task(real.create_job(B, "[{}]", claimed=False))
        await flaky.at_gate.wait()  # the writer is busy: what comes next shares one batch
        heartbeat = asyncio.create_task(runner.heartbeat())
        await spy.renewing.wait()
        workers.gate.set()
        await spy.finishing.wait()
        flaky.commit_gate.set()
        await asyncio.gather(blocker, heartbeat)
        assert await final(real, A) == (JobStatus.COMPLETED, [{"a": "1"}], None)
        await runner.stop()
    assert "lost its lease" not in caplog.text


async def test_a_lost_lease_stops_the_flow_and_its_outcome_is_discarded(
    store: JobStore,
    other: JobStore,
    settings: Settings,
    workers: GatedWorkers,
    clock: FakeClock,
    database: FreshDatabase,
    caplog: pytest.LogCaptureFixture,
) -> None:
    runner = await running_a(store, settings, workers)
    clock.advance(LEASE + 1)
    [taken] = (await other.sweep(slots=5, lanes=5)).small  # this process was partitioned
    await runner.heartbeat()
    [stop] = workers.stops
    assert stop is not None
    assert stop.stopped()
    workers.gate.set()
    await runner.stop()
    assert "attempt 1 lost its lease" in caplog.text
    assert leases(database) == {A: ("other", 2)}
    assert await other.finish(taken, output_json="[]", error=None)


async def test_a_run_past_the_job_timeout_fails_saying_so_and_its_flow_is_asked_to_stop(
    store: JobStore, settings: Settings, workers: GatedWorkers
) -> None:
    runner = make_runner(store, settings, workers, job_timeout_seconds=0.05)
    workers.hold()  # a flow that never ends
    await submit(runner, A, [{"a": "1"}])
    status, _, error = await final(store, A)
    assert status is JobStatus.FAILED
    assert error == "timed out: the job ran longer than JOB_TIMEOUT_SECONDS (0.05 s)"
    [stop] = workers.stops
    assert stop is not None
    assert stop.stopped()
    await runner.stop()


async def test_an_outcome_the_database_refuses_is_retried_until_it_lands(
    store: JobStore,
    settings: Settings,
    workers: GatedWorkers,
    flaky: FaultyDatabase,
) -> None:
    refusals = [StoreUnavailableError("down", "the database is unreachable")] * 2

    def refuse_finishing_twice(sql: str, params: Any) -> StoreUnavailableError | None:
        return refusals.pop() if refusals and "DELETE FROM job_leases" in sql else None

    flaky.fault = refuse_finishing_twice
    runner = make_runner(store, settings, workers)
    await submit(runner, A, [{"a": "1"}])
    assert await final(store, A) == (JobStatus.COMPLETED, [{"a": "1"}], None)
    assert refusals == []
    assert len(workers.started) == 1  # recorded by the same run, not run again
    await runner.stop()


async def test_a_claim_that_nothing_runs_is_released_with_its_turn_after_two_heartbeats(
    store: JobStore,
    other: JobStore,
    settings: Settings,
    workers: GatedWorkers,
    clock: FakeClock,
    database: FreshDatabase,
) -> None:
    runner = make_runner(store, settings, workers, flow_concurrency=1)
    late = await runner.accept(A, '[{"a":"1"}]')  # its background task does not come (yet)
    await runner.heartbeat()
    assert len(store.held) == 1  # might be about to start
    await runner.heartbeat()
    assert len(store.held) == 0
    clock.advance(0.001)
    assert ids((await other.sweep(slots=5, lanes=5)).small) == {A}
    # The only turn came back with the claim: the next job is claimed and runs at once.
    await submit(runner, B, [{"b": "1"}])
    assert await final(store, B) == (JobStatus.COMPLETED, [{"b": "1"}], None)
    await runner.run_expand_reduce_flow(late)  # too late: it runs nothing
    await runner.stop()
    assert workers.started == ['[{"b":"1"}]']
    assert leases(database) == {A: ("other", 2)}  # the orphaned claim counted as a start


async def test_a_failed_sweep_gives_its_turns_back(
    store: JobStore, settings: Settings, workers: GatedWorkers, flaky: FaultyDatabase
) -> None:
    runner = make_runner(store, settings, workers, flow_concurrency=1)
    flaky.fault = lambda sql, params: StoreUnavailableError("down", "the database is busy")
    with pytest.raises(StoreUnavailableError):
        await runner.sweep()
    flaky.fault = lambda sql, params: None
    await submit(runner, A, [{"a": "1"}])  # the only turn is free again: claimed at once
    assert await final(store, A) == (JobStatus.COMPLETED, [{"a": "1"}], None)
    await runner.stop()


async def test_recovered_jobs_are_logged_at_info(
    store: JobStore,
    settings: Settings,
    workers: GatedWorkers,
    clock: FakeClock,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="app")
    async with opened_store(settings, clock, "doomed") as doomed:
        await doomed.create_job(A, '[{"a":"1"}]', claimed=True)
    runner = make_runner(store, settings, workers)
    await runner.sweep()
    await final(store, A)
    await runner.stop()
    assert f"job {A}: started, attempt 2 (recovered)" in caplog.text


# Cancel.


async def test_a_job_cancelled_while_it_waits_for_a_turn_never_starts(
    store: JobStore, settings: Settings, workers: GatedWorkers, database: FreshDatabase
) -> None:
    runner = make_runner(store, settings, workers, flow_concurrency=1)
    workers.hold()
    await submit(runner, A, [{"a": "1"}])
    await workers.running.wait()
    await submit(runner, B, [{"b": "1"}])  # no turn free: it waits, reserved
    assert await runner.cancel(B, tenant="") is CancelResult.CANCELLED
    workers.gate.set()
    assert await final(store, A) == (JobStatus.COMPLETED, [{"a": "1"}], None)
    await runner.sweep()
    await runner.stop()
    assert workers.started == ['[{"a":"1"}]']
    assert await final(store, B) == (JobStatus.FAILED, None, CANCELLED_ERROR)
    assert leases(database) == {}


async def test_a_cancelled_run_stops_at_its_next_batch_and_records_nothing(
    store: JobStore,
    settings: Settings,
    workers: GatedWorkers,
    database: FreshDatabase,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    database.record_finishes()
    runner = make_runner(store, settings, workers)
    workers.hold()
    await submit(runner, A, [{"a": f"value-{n:08}"} for n in range(20_000)])  # large: batched
    await workers.running.wait()
    assert await runner.cancel(A, tenant="") is CancelResult.CANCELLED
    [control] = workers.stops
    assert control is not None
    assert control.stopped()
    workers.gate.set()
    await runner.stop()
    assert await final(store, A) == (JobStatus.FAILED, None, CANCELLED_ERROR)
    assert control.done_items == 0  # stopped before its first batch
    assert "stopped before finishing" in caplog.text
    assert "lost its lease" not in caplog.text
    assert database.finishes() == {A: 1}


async def test_a_run_cancelled_by_another_process_stops_at_its_heartbeat_quietly(
    store: JobStore,
    other: JobStore,
    settings: Settings,
    workers: GatedWorkers,
    database: FreshDatabase,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    database.record_finishes()
    runner = await running_a(store, settings, workers)
    assert await other.cancel_job(A, tenant="") is CancelResult.CANCELLED
    [control] = workers.stops
    assert control is not None
    assert not control.stopped()
    await runner.heartbeat()
    assert control.stopped()
    workers.gate.set()
    await runner.stop()
    assert await final(store, A) == (JobStatus.FAILED, None, CANCELLED_ERROR)
    assert "the job was cancelled" in caplog.text
    assert "lost its lease" not in caplog.text
    assert database.finishes() == {A: 1}


async def test_a_result_that_arrives_after_the_cancel_is_discarded(
    store: JobStore, other: JobStore, database: FreshDatabase
) -> None:
    database.record_finishes()
    claim = await store.create_job(A, "[{}]", claimed=True)
    assert await other.cancel_job(A, tenant="") is CancelResult.CANCELLED
    assert await store.finish(claim, output_json="[{}]", error=None) is False
    assert await final(store, A) == (JobStatus.FAILED, None, CANCELLED_ERROR)
    assert await other.cancel_job(A, tenant="") is CancelResult.FINISHED
    assert database.finishes() == {A: 1}
