"""The runner: runs claimed jobs off the loop, records outcomes, recovers, shuts down cleanly."""

import asyncio
import threading
from collections.abc import AsyncIterator
from typing import Any

import orjson
import pytest

from app.config import Settings
from app.jobs import JobStatus
from app.runner import JobRunner
from app.store import JobStore, open_store
from app.workers import CpuWorkers
from tests.conftest import FreshDatabase
from tests.test_store import FakeClock

A = "aaaaaaaa-aaaa-4aaa-8aaa-aaaaaaaaaaaa"
B = "bbbbbbbb-bbbb-4bbb-8bbb-bbbbbbbbbbbb"


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
async def store(settings: Settings, clock: FakeClock) -> AsyncIterator[JobStore]:
    job_store = open_store(settings, clock=clock)
    await job_store.open()
    yield job_store
    await job_store.close()


def make_runner(store: JobStore, settings: Settings, owner: str = "me") -> JobRunner:
    return JobRunner(store, CpuWorkers(processes=0, threshold_bytes=0), settings, owner=owner)


async def outcome(store: JobStore, job_id: str) -> tuple[JobStatus, Any, str | None]:
    job = await store.get_job(job_id, with_output=True)
    assert job is not None
    result = orjson.loads(job.output_data) if job.output_data else None
    return job.status, result, job.error


async def test_runs_a_submitted_job_to_completion(store: JobStore, settings: Settings) -> None:
    await store.create_job(A, '[{"a":"x","b":"y","c":"z"}]')
    await make_runner(store, settings).run_expand_reduce_flow(A)
    assert await outcome(store, A) == (JobStatus.COMPLETED, [{"a b": "x y", "c": "z"}], None)


async def test_a_key_collision_fails_the_job_with_the_key_named(
    store: JobStore, settings: Settings
) -> None:
    await store.create_job(A, '[{"a":"1","x":"2","a x":"3"}]')
    await make_runner(store, settings).run_expand_reduce_flow(A)
    status, result, error = await outcome(store, A)
    assert (status, result) == (JobStatus.FAILED, None)
    assert error is not None
    assert "'a x'" in error


async def test_an_exception_in_one_job_is_recorded_and_logged_and_others_still_run(
    store: JobStore,
    settings: Settings,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    runner = make_runner(store, settings)
    real_run = runner._workers.run_flow

    async def explode_on_b(payload: str) -> str:
        if "boom" in payload:
            raise RuntimeError("boom happened")
        return await real_run(payload)

    monkeypatch.setattr(runner._workers, "run_flow", explode_on_b)
    await store.create_job(A, '[{"a":"1"}]')
    await store.create_job(B, '[{"boom":"1"}]')
    await asyncio.gather(runner.run_expand_reduce_flow(B), runner.run_expand_reduce_flow(A))
    assert await outcome(store, A) == (JobStatus.COMPLETED, [{"a": "1"}], None)
    status, _, error = await outcome(store, B)
    assert status is JobStatus.FAILED
    assert error == "internal error: RuntimeError: boom happened"
    assert B in caplog.text
    assert "Traceback" in caplog.text


async def test_a_job_already_taken_elsewhere_is_not_run_twice(
    store: JobStore, settings: Settings
) -> None:
    await store.create_job(A, '[{"a":"1"}]')
    assert await store.claim(A, "someone-else") is not None
    await make_runner(store, settings).run_expand_reduce_flow(A)
    assert (await outcome(store, A))[0] is JobStatus.PROCESSING


async def test_sweep_at_start_finishes_a_job_left_behind_by_a_dead_process(
    store: JobStore, settings: Settings, clock: FakeClock
) -> None:
    await store.create_job(A, '[{"a":"1","b":"2"}]')
    assert await store.claim(A, "dead-process") is not None
    clock.advance(settings.job_lease_seconds + 1)
    runner = make_runner(store, settings)
    await runner.start()
    try:
        for _ in range(200):
            if (await outcome(store, A))[0] is JobStatus.COMPLETED:
                break
            await asyncio.sleep(0.01)
        assert await outcome(store, A) == (JobStatus.COMPLETED, [{"a b": "1 2"}], None)
    finally:
        await runner.stop()


async def test_sweep_takes_no_more_jobs_than_free_slots(
    store: JobStore, settings: Settings, clock: FakeClock
) -> None:
    settings = settings.model_copy(update={"flow_concurrency": 1})
    await store.create_job(A, '[{"a":"1"}]')
    await store.create_job(B, '[{"b":"1"}]')
    clock.advance(settings.job_claim_grace_seconds + 1)
    runner = make_runner(store, settings)
    assert len(await runner.sweep()) == 1
    await runner.stop()


async def test_stop_waits_for_running_jobs_within_its_grace(
    store: JobStore, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    runner = make_runner(store, settings)
    real_run = runner._workers.run_flow

    async def slow(payload: str) -> str:
        await asyncio.sleep(0.2)
        return await real_run(payload)

    monkeypatch.setattr(runner._workers, "run_flow", slow)
    await store.create_job(A, '[{"a":"1"}]')
    job = asyncio.create_task(runner.run_expand_reduce_flow(A))
    await asyncio.sleep(0.05)
    await runner.stop()
    await job
    assert (await outcome(store, A))[0] is JobStatus.COMPLETED


async def test_stop_releases_what_did_not_finish_for_the_next_process(
    store: JobStore, settings: Settings, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    release_flow = threading.Event()

    def stuck_flow(payload: str) -> str:
        release_flow.wait(10)
        return "[]"

    settings = settings.model_copy(update={"shutdown_timeout_seconds": 0.1})
    runner = make_runner(store, settings)

    async def run_stuck(payload: str) -> str:
        return await asyncio.to_thread(stuck_flow, payload)

    monkeypatch.setattr(runner._workers, "run_flow", run_stuck)
    await store.create_job(A, '[{"a":"1"}]')
    job = asyncio.create_task(runner.run_expand_reduce_flow(A))
    await asyncio.sleep(0.05)
    await runner.stop()
    release_flow.set()
    with pytest.raises(asyncio.CancelledError):
        await job
    assert (await outcome(store, A))[0] is JobStatus.PROCESSING
    clock.advance(0.001)
    [claim] = await store.claim_stale("next-process", 10)
    assert claim.job_id == A


async def test_a_claim_whose_outcome_cannot_be_recorded_is_let_go_for_a_retry(
    store: JobStore, settings: Settings, monkeypatch: pytest.MonkeyPatch, clock: FakeClock
) -> None:
    runner = make_runner(store, settings)

    async def broken_finish(*args: Any, **kwargs: Any) -> bool:
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(store, "finish", broken_finish)
    await store.create_job(A, '[{"a":"1"}]')
    await runner.run_expand_reduce_flow(A)
    monkeypatch.undo()
    await runner.heartbeat()  # must not keep the abandoned lease alive
    clock.advance(settings.job_lease_seconds + 1)
    [retry] = await store.claim_stale("other", 10)
    assert (retry.job_id, retry.attempt) == (A, 2)


async def test_an_accepted_job_is_inserted_claimed_when_a_slot_is_free_and_waits_when_not(
    store: JobStore, settings: Settings, database: FreshDatabase, monkeypatch: pytest.MonkeyPatch
) -> None:
    runner = make_runner(store, settings.model_copy(update={"flow_concurrency": 1}))
    release = asyncio.Event()
    real_run = runner._workers.run_flow

    async def held_until_released(payload: str) -> str:
        await release.wait()
        return await real_run(payload)

    monkeypatch.setattr(runner._workers, "run_flow", held_until_released)
    await runner.accept(A, '[{"a":"1","b":"2"}]', keep_input=True)  # takes the only slot
    await runner.accept(B, '[{"b":"1"}]', keep_input=True)  # none left
    owners = dict(database.query("SELECT job_id, owner FROM job_leases"))
    assert owners == {A: "me", B: None}
    release.set()
    for _ in range(200):
        if (await outcome(store, B))[0] is JobStatus.COMPLETED:
            break
        await asyncio.sleep(0.01)
    assert await outcome(store, A) == (JobStatus.COMPLETED, [{"a b": "1 2"}], None)
    assert await outcome(store, B) == (JobStatus.COMPLETED, [{"b": "1"}], None)
    await runner.stop()


async def test_on_shutdown_held_and_waiting_jobs_are_handed_back_at_once(
    store: JobStore, settings: Settings, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    one_slot = settings.model_copy(update={"flow_concurrency": 1, "shutdown_timeout_seconds": 0})
    runner = make_runner(store, one_slot)
    never = asyncio.Event()

    async def stuck(payload: str) -> str:
        await never.wait()
        return payload

    monkeypatch.setattr(runner._workers, "run_flow", stuck)
    await runner.accept(A, '[{"a":"1"}]', keep_input=True)  # claimed, running, stuck
    await runner.accept(B, '[{"b":"1"}]', keep_input=True)  # unclaimed, waiting for the slot
    await asyncio.sleep(0.05)
    await runner.stop()
    clock.advance(0.001)  # neither A's lease nor B's grace time has run out
    claims = await store.claim_stale("next", 10)
    assert sorted((claim.job_id, claim.attempt) for claim in claims) == [(A, 2), (B, 1)]
