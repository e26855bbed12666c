"""A 202 is a promise: real uvicorn processes paused, killed and restarted, on default leases.

A trigger in the database records every final-status write (``record_finishes``), so a job
written twice fails these tests as surely as a job never finished.
"""

import asyncio
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx

from tests.support import (
    PostgresDatabase,
    Server,
    SQLiteDatabase,
    assert_all_complete_with_their_own_results,
    big_job,
    children_of,
    held_by,
    is_running,
    start_server,
    statuses,
    stop_server,
    submit_all,
    submit_one,
    wait_until_sync,
)


def start_fresh(database: SQLiteDatabase, log: Path, env: dict[str, str] | None = None) -> Server:
    """A server on a new SQLite file, with the finish oracle installed before any job."""
    server = start_server(database.path, log, env)
    database.record_finishes()
    return server


def finished(database: SQLiteDatabase) -> int:
    """How many jobs have a final status."""
    return sum(status != "processing" for status in statuses(database).values())


def test_sigstop_past_the_lease_then_sigcont_completes_every_job_once(tmp_path: Path) -> None:
    """A pause longer than the lease is not an interruption (2 s lease, 4 s pause)."""
    database = SQLiteDatabase(tmp_path / "jobs.db")
    jobs = [big_job(n, items=12_000, keys=9) for n in range(24)]
    server = start_fresh(database, tmp_path / "server.log", {"JOB_LEASE_SECONDS": "2"})
    try:
        with ThreadPoolExecutor(1) as pool:
            submitting = pool.submit(submit_all, server, jobs)
            time.sleep(0.3)  # the fault itself: the pause comes while jobs arrive and run
            server.signal_group(signal.SIGSTOP)
            time.sleep(4)
            server.signal_group(signal.SIGCONT)
            ids = submitting.result()
        assert_all_complete_with_their_own_results(server, ids, jobs, within=60)
        assert database.finishes() == dict.fromkeys(ids, 1)
        assert "lost its lease" not in server.log()
    finally:
        stop_server(server)


def test_kill_9_while_jobs_run_loses_nothing_and_a_restart_finishes_them_within_5_s(
    tmp_path: Path,
) -> None:
    """Default 30 s lease; the first server has a worker process, which must not outlive it."""
    database = SQLiteDatabase(tmp_path / "jobs.db")
    jobs = [big_job(n) for n in range(24)]
    first = start_fresh(database, tmp_path / "first.log", {"FLOW_PROCESSES": "1"})
    ids = submit_all(first, jobs)
    wait_until_sync(lambda: "completed" in statuses(database).values(), what="a first job")
    workers = children_of(first.process.pid)
    assert workers, "no worker process was started"
    first.process.send_signal(signal.SIGKILL)
    first.process.wait()

    at_kill = statuses(database)
    assert set(at_kill) == set(ids)  # every 202 was committed
    assert "processing" in at_kill.values(), "the kill came too late to prove anything"
    wait_until_sync(
        lambda: not any(is_running(pid) for pid in workers),
        seconds=15,
        what="the worker processes exiting with their server",
    )

    second = start_server(database.path, tmp_path / "second.log")
    restarted = time.monotonic()
    try:
        assert_all_complete_with_their_own_results(second, ids, jobs, within=5)
        assert time.monotonic() - restarted < 5
        assert database.finishes() == dict.fromkeys(ids, 1)
    finally:
        stop_server(second)


def test_sigterm_drains_within_its_grace_and_a_restart_finishes_everything(
    tmp_path: Path,
) -> None:
    database = SQLiteDatabase(tmp_path / "jobs.db")
    jobs = [big_job(n) for n in range(24)]
    first = start_fresh(database, tmp_path / "first.log")
    ids = submit_all(first, jobs)
    wait_until_sync(lambda: "completed" in statuses(database).values(), what="a first job")
    started = time.monotonic()
    first.process.send_signal(signal.SIGTERM)
    first.process.wait(timeout=30)
    took = time.monotonic() - started
    # uvicorn re-raises the signal once it has shut down cleanly, so the exit status is
    # "terminated by SIGTERM"; the log says whether the shutdown was orderly.
    assert first.process.returncode in (0, -signal.SIGTERM), first.log()
    assert "Application shutdown complete." in first.log()
    assert took < 15, f"shutdown took {took:.1f} s"  # uvicorn's graceful timeout here is 10 s
    assert "processing" in statuses(database).values(), "nothing was left to recover"
    assert "handing back" in first.log()

    second = start_server(database.path, tmp_path / "second.log")
    try:
        assert_all_complete_with_their_own_results(second, ids, jobs, within=30)
        assert database.finishes() == dict.fromkeys(ids, 1)
    finally:
        stop_server(second)


def test_four_sigterm_restarts_during_a_backlog_fail_no_job(tmp_path: Path) -> None:
    """A rolling restart, four times over 40 queued jobs: none fails, none runs out of tries."""
    database = SQLiteDatabase(tmp_path / "jobs.db")
    jobs = [big_job(n, items=10_000) for n in range(40)]
    server = start_fresh(database, tmp_path / "server-0.log")
    ids = submit_all(server, jobs)
    for restart in range(1, 5):

        def progressed(before: int = finished(database)) -> bool:
            return finished(database) > before

        wait_until_sync(progressed, what=f"progress before restart {restart}")
        stop_server(server)
        assert "Application shutdown complete." in server.log()
        server = start_server(database.path, tmp_path / f"server-{restart}.log")
    try:
        assert "processing" in statuses(database).values(), "the backlog ran out too early"
        assert_all_complete_with_their_own_results(server, ids, jobs, within=20)
        assert database.finishes() == dict.fromkeys(ids, 1)
    finally:
        stop_server(server)


def test_kill_9_of_one_of_two_postgres_replicas_the_survivor_finishes_its_jobs_within_5_s(
    postgres: PostgresDatabase, tmp_path: Path
) -> None:
    """Default 30 s lease: the survivor sees the victim's liveness lock go, not its leases."""
    with ThreadPoolExecutor(2) as pool:
        victim, survivor = pool.map(
            lambda n: start_server(postgres.url, tmp_path / f"replica-{n}.log"), range(2)
        )
    postgres.record_finishes()
    try:
        jobs = [big_job(n) for n in range(24)]
        ids = submit_all(victim, jobs)
        wait_until_sync(lambda: "completed" in statuses(postgres).values(), what="a first job")
        held = held_by(postgres, victim)
        victim.process.send_signal(signal.SIGKILL)
        victim.process.wait()
        killed = time.monotonic()
        assert held > 0, "the kill came too late to prove anything: the victim held no job"
        assert_all_complete_with_their_own_results(survivor, ids, jobs, within=5)
        assert time.monotonic() - killed < 5
        assert postgres.finishes() == dict.fromkeys(ids, 1)
    finally:
        stop_server(survivor)


def test_burst_of_concurrent_submissions_from_many_clients(server: Server) -> None:
    async def burst() -> list[tuple[str, list[Any]]]:
        clients = [httpx.AsyncClient(base_url=server.base_url, timeout=60) for _ in range(20)]
        try:
            return await asyncio.gather(
                *(submit_one(clients[n % len(clients)], n) for n in range(400))
            )
        finally:
            await asyncio.gather(*(client.aclose() for client in clients))

    submitted = asyncio.run(burst())
    assert len({job_id for job_id, _ in submitted}) == 400
    ids = [job_id for job_id, _ in submitted]
    assert_all_complete_with_their_own_results(server, ids, [items for _, items in submitted])
    assert "500 Internal Server Error" not in server.log()
