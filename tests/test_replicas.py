"""Several real uvicorn replicas on one PostgreSQL database: shared jobs, failover, fencing."""

import asyncio
import signal
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import PostgresDatabase, Server, start_server, stop_server
from tests.test_durability import (
    FAST_RECOVERY,
    assert_all_complete_with_their_own_results,
    big_job,
    submit_all,
    submit_one,
)

# Every change of a job to a final status is recorded, so a result written twice shows.
RECORD_FINISHES = """
CREATE TABLE finishes (job_id TEXT NOT NULL, status TEXT NOT NULL);
CREATE OR REPLACE FUNCTION record_finish() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO finishes VALUES (NEW.job_id, NEW.status);
    RETURN NEW;
END $$;
CREATE TRIGGER record_finish AFTER UPDATE OF status ON jobs
    FOR EACH ROW WHEN (NEW.status <> 'processing') EXECUTE FUNCTION record_finish();
"""


@pytest.fixture
def replicas(postgres: PostgresDatabase, tmp_path: Path) -> Iterator[list[Server]]:
    """Three replicas started at the same moment (so they also race to create the schema)."""
    with ThreadPoolExecutor(3) as pool:
        servers = list(
            pool.map(
                lambda n: start_server(postgres.url, tmp_path / f"replica-{n}.log", FAST_RECOVERY),
                range(3),
            )
        )
    postgres.query(RECORD_FINISHES)
    yield servers
    for server in servers:
        if server.process.poll() is None:
            stop_server(server)


def finishes(postgres: PostgresDatabase) -> dict[str, int]:
    """How many times each job was given a final status."""
    return dict(postgres.query("SELECT job_id, count(*) FROM finishes GROUP BY job_id"))


def held_by(postgres: PostgresDatabase, server: Server) -> int:
    """How many jobs this replica holds a lease on (its owner id carries its pid)."""
    owner = f"%:{server.process.pid}:%"
    [(count,)] = postgres.query(f"SELECT count(*) FROM job_leases WHERE owner LIKE '{owner}'")
    return int(count)


def wait_until_completed(postgres: PostgresDatabase) -> None:
    """Until some job is completed: the replica holding jobs is now mid-run."""
    deadline = time.monotonic() + 60
    while not postgres.query("SELECT 1 FROM jobs WHERE status = 'completed' LIMIT 1"):
        assert time.monotonic() < deadline, "no job completed"
        time.sleep(0.02)


def test_a_job_submitted_to_one_replica_is_seen_and_fetched_from_the_others(
    replicas: list[Server],
) -> None:
    first, *others = replicas
    items = [{"a": "1", "b": "2", "c": "3"}]
    response = httpx.post(
        f"{first.base_url}/expand_reduce_flow/", json={"job": {"input_data": items}}
    )
    assert response.status_code == 202
    job_id = response.json()["job_id"]
    for server in others:
        deadline = time.monotonic() + 10
        while (status := httpx.get(f"{server.base_url}/check_status/{job_id}").json())[
            "status"
        ] == "processing":
            assert time.monotonic() < deadline
            time.sleep(0.02)
        assert status["status"] == "completed"
        result = httpx.get(f"{server.base_url}/job_result/{job_id}").json()
        assert result["result"] == [{"a b": "1 2", "c": "3"}]


def test_kill_9_of_the_replica_running_jobs_another_finishes_each_once(
    replicas: list[Server], postgres: PostgresDatabase
) -> None:
    victim, survivor, _ = replicas
    jobs = [big_job(n) for n in range(24)]
    ids = submit_all(victim, jobs)
    wait_until_completed(postgres)
    held = held_by(postgres, victim)
    victim.process.send_signal(signal.SIGKILL)
    victim.process.wait()
    assert held > 0, "the kill came too late to prove anything: the victim held no job"

    started = time.monotonic()
    assert_all_complete_with_their_own_results(survivor, ids, jobs, within=30)
    # The victim's leases last 2 s; every replica sweeps each second.
    assert time.monotonic() - started < 15
    assert finishes(postgres) == dict.fromkeys(ids, 1)


def test_sigterm_of_a_replica_hands_its_unfinished_jobs_to_the_others(
    replicas: list[Server], postgres: PostgresDatabase, tmp_path: Path
) -> None:
    """A rolling update: the replica drains, releases what it did not finish, exits cleanly."""
    no_grace = FAST_RECOVERY | {"SHUTDOWN_TIMEOUT_SECONDS": "0"}
    leaving = start_server(postgres.url, tmp_path / "leaving.log", no_grace)
    jobs = [big_job(n, items=60_000) for n in range(4)]
    ids = submit_all(leaving, jobs)
    # The last job was accepted while a slot was free, so the replica holds it; it is large,
    # so it cannot be finished in the moment before the signal lands.
    assert held_by(postgres, leaving) > 0
    leaving.process.send_signal(signal.SIGTERM)
    leaving.process.wait(timeout=30)
    assert leaving.process.returncode in (0, -signal.SIGTERM), leaving.log()
    assert "Application shutdown complete." in leaving.log()
    assert "unfinished jobs for the next process" in leaving.log(), "nothing was released"
    assert_all_complete_with_their_own_results(replicas[0], ids, jobs, within=30)
    assert finishes(postgres) == dict.fromkeys(ids, 1)


def test_concurrent_submissions_over_all_replicas_run_each_job_once(
    replicas: list[Server], postgres: PostgresDatabase
) -> None:
    async def burst() -> list[tuple[str, list[Any]]]:
        clients = [
            httpx.AsyncClient(base_url=replicas[n % len(replicas)].base_url, timeout=60)
            for n in range(15)
        ]
        try:
            return await asyncio.gather(
                *(submit_one(clients[n % len(clients)], n) for n in range(300))
            )
        finally:
            await asyncio.gather(*(client.aclose() for client in clients))

    submitted = asyncio.run(burst())
    ids = [job_id for job_id, _ in submitted]
    assert len(set(ids)) == 300
    assert postgres.count_jobs() == 300
    assert_all_complete_with_their_own_results(replicas[2], ids, [items for _, items in submitted])
    assert finishes(postgres) == dict.fromkeys(ids, 1)
    for server in replicas:
        assert "Traceback" not in server.log()
