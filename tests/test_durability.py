"""A 202 is a promise: real processes killed for real, on a real SQLite file."""

import asyncio
import signal
import sqlite3
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing
from pathlib import Path
from typing import Any

import httpx

from app.flow import expand_reduce
from tests.conftest import Server, start_server, stop_server

# Short leases so a restart does not wait 30 s for the dead process's claims to run out.
FAST_RECOVERY = {
    "JOB_LEASE_SECONDS": "2",
    "JOB_CLAIM_GRACE_SECONDS": "0.5",
    "FLOW_CONCURRENCY": "2",
}


def big_job(number: int, items: int = 4000) -> list[dict[str, Any]]:
    return [
        {f"key{k}": f"job{number}-item{i}-value{k}" for k in range(7)} | {"n": i}
        for i in range(items)
    ]


def submit_all(server: Server, jobs: list[list[dict[str, Any]]]) -> list[str]:
    """Submit every job at once, so a backlog builds up behind the running ones."""

    def submit(items: list[dict[str, Any]]) -> str:
        with httpx.Client(base_url=server.base_url, timeout=60) as client:
            response = client.post("/expand_reduce_flow/", json={"job": {"input_data": items}})
        assert response.status_code == 202, response.text
        job_id: str = response.json()["job_id"]
        return job_id

    with ThreadPoolExecutor(len(jobs)) as pool:
        return list(pool.map(submit, jobs))


def statuses(db_path: Path) -> dict[str, str]:
    with closing(sqlite3.connect(db_path)) as db:
        return dict(db.execute("SELECT job_id, status FROM jobs").fetchall())


def wait_until_some_completed(db_path: Path) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if "completed" in statuses(db_path).values():
            return
        time.sleep(0.02)
    raise AssertionError("no job completed")


def assert_all_complete_with_their_own_results(
    server: Server, ids: list[str], jobs: list[list[dict[str, Any]]], within: float = 90
) -> None:
    deadline = time.monotonic() + within
    pending = dict(zip(ids, jobs, strict=True))
    with httpx.Client(base_url=server.base_url, timeout=30) as client:
        while pending and time.monotonic() < deadline:
            for job_id in list(pending):
                response = client.get(f"/job_result/{job_id}")
                if response.status_code == 202:
                    continue
                body = response.json()
                assert body["status"] == "completed", body
                assert body["result"] == expand_reduce(pending.pop(job_id))
            time.sleep(0.1)
    assert not pending, f"{len(pending)} jobs never completed:\n{server.log()[-3000:]}"


def children_of(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        found += [int(child) for child in (task / "children").read_text().split()]
    return found


def is_running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


def test_kill_9_while_jobs_run_loses_nothing(tmp_path: Path) -> None:
    """With a worker process (FLOW_PROCESSES=1), which must not outlive its server either."""
    db_path = tmp_path / "jobs.db"
    jobs = [big_job(n) for n in range(24)]
    first = start_server(db_path, tmp_path / "first.log", FAST_RECOVERY | {"FLOW_PROCESSES": "1"})
    ids = submit_all(first, jobs)
    wait_until_some_completed(db_path)
    workers = children_of(first.process.pid)
    assert workers, "no worker process was started"
    first.process.send_signal(signal.SIGKILL)
    first.process.wait()

    at_kill = statuses(db_path)
    assert set(at_kill) == set(ids)  # every 202 was committed
    assert "processing" in at_kill.values(), "the kill came too late to prove anything"
    deadline = time.monotonic() + 15
    while any(is_running(pid) for pid in workers) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(is_running(pid) for pid in workers), "worker processes outlived the server"

    second = start_server(db_path, tmp_path / "second.log", FAST_RECOVERY)
    try:
        assert_all_complete_with_their_own_results(second, ids, jobs)
    finally:
        stop_server(second)


def test_sigterm_drains_within_its_grace_and_a_restart_finishes_everything(
    tmp_path: Path,
) -> None:
    db_path = tmp_path / "jobs.db"
    jobs = [big_job(n) for n in range(24)]
    first = start_server(db_path, tmp_path / "first.log", FAST_RECOVERY)
    ids = submit_all(first, jobs)
    wait_until_some_completed(db_path)
    started = time.monotonic()
    first.process.send_signal(signal.SIGTERM)
    first.process.wait(timeout=30)
    took = time.monotonic() - started
    # uvicorn re-raises the signal once it has shut down cleanly, so the exit status is
    # "terminated by SIGTERM"; the log says whether the shutdown was orderly.
    assert first.process.returncode in (0, -signal.SIGTERM), first.log()
    assert "Application shutdown complete." in first.log()
    assert took < 15, f"shutdown took {took:.1f} s"  # uvicorn's graceful timeout here is 10 s
    assert "processing" in statuses(db_path).values(), "nothing was left to recover"

    second = start_server(db_path, tmp_path / "second.log", FAST_RECOVERY)
    try:
        assert_all_complete_with_their_own_results(second, ids, jobs)
    finally:
        stop_server(second)


async def submit_one(client: httpx.AsyncClient, number: int) -> tuple[str, list[Any]]:
    items = [{"client": str(number), "a": number, "b": f"x{number}", "c": number % 2 == 0}]
    response = await client.post("/expand_reduce_flow/", json={"job": {"input_data": items}})
    assert response.status_code == 202, response.text
    job_id: str = response.json()["job_id"]
    return job_id, items


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
