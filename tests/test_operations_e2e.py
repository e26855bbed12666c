"""Running it for months, attacked with real uvicorn processes: retention keeps the database
bounded, cancel stops real runs (across replicas too), idempotent submits hold under
concurrency, backpressure refuses without storing, and long-poll answers at once.
"""

import os
import signal
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx

from tests.support import (
    PostgresDatabase,
    Server,
    SQLiteDatabase,
    big_job,
    children_of,
    start_server,
    stop_server,
    wait_until_sync,
)

MiB = 1024 * 1024
PACE_SECONDS = 0.1


def client_of(server: Server) -> httpx.Client:
    return httpx.Client(base_url=server.base_url, timeout=60)


def submit(client: httpx.Client, items: list[dict[str, Any]], **headers: str) -> httpx.Response:
    return client.post("/expand_reduce_flow/", json={"job": {"input_data": items}}, headers=headers)


def flow_worker(server: Server) -> int:
    """The pid of the server's one flow worker process (not multiprocessing's tracker)."""
    workers = [
        pid
        for pid in children_of(server.process.pid)
        if b"resource_tracker" not in Path(f"/proc/{pid}/cmdline").read_bytes()
    ]
    assert len(workers) == 1, workers
    return workers[0]


def running(client: httpx.Client, job_id: str) -> dict[str, Any]:
    """Wait until the job's run has done some of its objects, not all; its status."""
    deadline = time.monotonic() + 30
    while True:
        status: dict[str, Any] = client.get(f"/check_status/{job_id}").json()
        progress = status.get("progress") or {"done_items": 0, "total_items": 1}
        if 0 < progress["done_items"] < progress["total_items"]:
            return status
        assert status["status"] == "processing", status
        assert time.monotonic() < deadline, f"no progress reported: {status}"
        time.sleep(0.005)


@contextmanager
def paused(pid: int) -> Iterator[None]:
    """The process stopped (SIGSTOP) for the block, so a run cannot finish meanwhile."""
    os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(pid, signal.SIGCONT)


# A flow in a worker process, its progress recorded every 0.05 s: a running job can be seen
# (100,000 objects take about half a second).
RUNNING_ENV = {
    "FLOW_PROCESSES": "1",
    "JOB_LEASE_SECONDS": "2",
    "HEARTBEAT_INTERVAL_SECONDS": "0.05",
    "SWEEP_INTERVAL_SECONDS": "1",
}


def test_retention_keeps_the_database_under_64_mb_while_1_mb_jobs_run_for_60_s(
    tmp_path: Path,
) -> None:
    """Ten jobs a second, each about 1 MB in and as much out, two seconds' retention.

    What stays is about rate x (retention + purge interval) x job size, here about 30 MB, plus
    the WAL (restarted once past 24 MiB): bounded, where without retention the file would pass
    1 GB in the minute. (Unpaced, this machine runs 20 such jobs a second.)
    """
    database = SQLiteDatabase(tmp_path / "jobs.db")
    server = start_server(database.path, tmp_path / "server.log", {"JOB_RETENTION_SECONDS": "2"})
    items = big_job(0, items=2_500, keys=6)  # about 1 MB in, as much out
    largest, largest_parts = 0, [0, 0]
    files = [database.path, Path(f"{database.path}-wal")]
    done: list[tuple[str, float]] = []
    try:
        with client_of(server) as client:
            began = time.monotonic()
            while (now := time.monotonic()) - began < 60:
                time.sleep(max(0.0, began + len(done) * PACE_SECONDS - now))
                response = submit(client, items)
                assert response.status_code == 202, response.text
                job_id = response.json()["job_id"]
                status = client.get(f"/check_status/{job_id}", params={"wait": 30}).json()
                assert status["status"] == "completed", status
                done.append((job_id, time.monotonic()))
                sizes = [f.stat().st_size if f.exists() else 0 for f in files]
                if sum(sizes) > largest:
                    largest, largest_parts = sum(sizes), sizes
            # Every job finished more than the retention (and a purge interval) ago is gone.
            expired = [job_id for job_id, at in done if time.monotonic() - at > 2 + 0.5 + 1]
            for job_id in expired[:: max(1, len(expired) // 50)]:
                for route in ("check_status", "job_result"):
                    gone = client.get(f"/{route}/{job_id}")
                    assert gone.status_code == 404, (job_id, gone.text)
                    assert "not found or expired" in gone.json()["detail"]
    finally:
        stop_server(server)
    assert len(done) > 400, f"only {len(done)} jobs in 60 s"
    file_mib, wal_mib = (size / MiB for size in largest_parts)
    assert largest < 64 * MiB, f"database and WAL reached {file_mib:.1f} + {wal_mib:.1f} MiB"
    assert database.count_jobs() < len(done) / 2
    assert "purged" in server.log()


def test_a_cancelled_100000_object_job_stops_at_its_next_batch_and_is_written_once(
    tmp_path: Path,
) -> None:
    database = SQLiteDatabase(tmp_path / "jobs.db")
    server = start_server(database.path, tmp_path / "server.log", RUNNING_ENV)
    database.record_finishes()
    try:
        with client_of(server) as client:
            job_id = submit(client, big_job(0, items=100_000, keys=4)).json()["job_id"]
            running(client, job_id)
            with paused(flow_worker(server)):  # mid-run: it cannot finish before the cancel
                cancelled = client.post(f"/jobs/{job_id}/cancel")
            assert cancelled.status_code == 202
            wait_until_sync(
                lambda: "stopped before finishing" in server.log(), what="the run stopping"
            )
            result = client.get(f"/job_result/{job_id}").json()
            assert (result["status"], result["result"]) == ("failed", None)
            assert result["error"].startswith("cancelled")
            assert client.post(f"/jobs/{job_id}/cancel").status_code == 409
            # The worker is free again: the next job runs to the end.
            after = submit(client, big_job(1, items=20_000, keys=3)).json()["job_id"]
            status = client.get(f"/check_status/{after}", params={"wait": 30}).json()
            assert status["status"] == "completed"
    finally:
        stop_server(server)
    assert database.finishes() == {job_id: 1, after: 1}
    assert "lost its lease" not in server.log()


def test_a_cancel_sent_to_one_replica_stops_the_job_running_on_another(
    tmp_path: Path, postgres: PostgresDatabase
) -> None:
    runner = start_server(postgres.url, tmp_path / "runner.log", RUNNING_ENV)
    postgres.record_finishes()
    other = start_server(postgres.url, tmp_path / "other.log", RUNNING_ENV)
    try:
        with client_of(runner) as on_runner, client_of(other) as on_other:
            job_id = submit(on_runner, big_job(0, items=100_000, keys=4)).json()["job_id"]
            running(on_runner, job_id)
            with paused(flow_worker(runner)):
                cancelled = on_other.post(f"/jobs/{job_id}/cancel")
                assert cancelled.status_code == 202
                # The runner's next heartbeat finds the lease gone and asks the run to stop.
                wait_until_sync(
                    lambda: "the job was cancelled" in runner.log(), what="the runner noticing"
                )
            wait_until_sync(
                lambda: "stopped before finishing" in runner.log(), what="the run stopping"
            )
            result = on_runner.get(f"/job_result/{job_id}").json()
            assert result["status"] == "failed"
            assert result["error"].startswith("cancelled")
    finally:
        stop_server(other)
        stop_server(runner)
    assert postgres.finishes() == {job_id: 1}
    assert "lost its lease" not in runner.log() + other.log()


def test_twenty_concurrent_submissions_with_one_key_to_two_replicas_make_one_job(
    tmp_path: Path, postgres: PostgresDatabase
) -> None:
    servers = [start_server(postgres.url, tmp_path / f"{n}.log") for n in range(2)]
    items = [{"a": "1", "b": "2"}]
    try:

        def send(n: int) -> httpx.Response:
            with client_of(servers[n % 2]) as client:
                return submit(client, items, **{"Idempotency-Key": "one-order"})

        with ThreadPoolExecutor(20) as pool:
            responses = list(pool.map(send, range(20)))
        with client_of(servers[0]) as client:
            different = submit(client, [{"a": "2"}], **{"Idempotency-Key": "one-order"})
    finally:
        for server in servers:
            stop_server(server)
    assert [r.status_code for r in responses] == [202] * 20
    assert len({r.json()["job_id"] for r in responses}) == 1
    assert sum(r.headers.get("idempotent-replayed") == "true" for r in responses) == 19
    assert different.status_code == 422
    assert "one-order" in different.text
    assert postgres.count_jobs() == 1


def test_past_max_queued_jobs_large_submissions_get_429_and_nothing_is_stored(
    tmp_path: Path,
) -> None:
    database = SQLiteDatabase(tmp_path / "jobs.db")
    env = {"MAX_QUEUED_JOBS": "5", "FLOW_CONCURRENCY": "1"}
    server = start_server(database.path, tmp_path / "server.log", env)
    jobs = [big_job(n, items=30_000, keys=5) for n in range(12)]
    try:
        with client_of(server) as client:
            with ThreadPoolExecutor(len(jobs)) as pool:  # all at once: a queue builds up
                responses = list(pool.map(lambda items: submit(client, items), jobs))
            accepted = [r.json()["job_id"] for r in responses if r.status_code == 202]
            refused = [r for r in responses if r.status_code != 202]
            stored_while_full = database.count_jobs()
            for job_id in accepted:
                status = client.get(f"/check_status/{job_id}", params={"wait": 30}).json()
                assert status["status"] == "completed"
            again = submit(client, jobs[-1])
    finally:
        stop_server(server)
    assert refused, "no submission was refused"
    for response in refused:
        assert response.status_code == 429, response.text
        assert int(response.headers["retry-after"]) > 0
    assert 5 <= len(accepted) < len(jobs)
    assert stored_while_full == len(accepted)
    assert again.status_code == 202  # room again once they finished
