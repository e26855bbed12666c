"""Several real uvicorn replicas on one PostgreSQL database: shared jobs, failover, fencing."""

import asyncio
import signal
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support import (
    PostgresDatabase,
    Server,
    assert_all_complete_with_their_own_results,
    big_job,
    held_by,
    start_server,
    stop_server,
    submit_all,
    submit_one,
    wait_until_sync,
)


@pytest.fixture
def replicas(postgres: PostgresDatabase, tmp_path: Path) -> Iterator[list[Server]]:
    """Three replicas started at the same moment (so they also race to create the schema)."""
    with ThreadPoolExecutor(3) as pool:
        servers = list(
            pool.map(lambda n: start_server(postgres.url, tmp_path / f"replica-{n}.log"), range(3))
        )
    postgres.record_finishes()
    yield servers
    for server in servers:
        if server.process.poll() is None:
            stop_server(server)


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

        def completed(url: str = f"{server.base_url}/check_status/{job_id}") -> bool:
            return bool(httpx.get(url).json()["status"] == "completed")

        wait_until_sync(completed, seconds=10, what=f"job {job_id} completed on {server}")
        result = httpx.get(f"{server.base_url}/job_result/{job_id}").json()
        assert result["result"] == [{"a b": "1 2", "c": "3"}]


def test_sigterm_of_a_replica_hands_its_unfinished_jobs_to_the_others(
    replicas: list[Server], postgres: PostgresDatabase, tmp_path: Path
) -> None:
    """A rolling update: the replica drains, releases what it did not finish, exits cleanly."""
    no_grace = {"SHUTDOWN_TIMEOUT_SECONDS": "0"}
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
    assert postgres.finishes() == dict.fromkeys(ids, 1)


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
    assert postgres.finishes() == dict.fromkeys(ids, 1)
    for server in replicas:
        assert "Traceback" not in server.log()
