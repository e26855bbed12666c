"""The database misbehaving: busy, full, read-only or not a database at all."""

import sqlite3
import subprocess
import sys
from contextlib import closing
from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI

from app.config import Settings, redact
from app.main import EXIT_CONFIG
from tests.support import ROOT, count_jobs, wait_finished

JOB = {"job": {"input_data": [{"a": "1", "b": "2"}]}}


@pytest.fixture
def settings(db_path: Path) -> Settings:
    return Settings(
        database_url=f"sqlite:///{db_path}", flow_processes=0, sqlite_busy_timeout_ms=200
    )


@pytest.fixture
async def existing_job(client: httpx.AsyncClient) -> str:
    response = await client.post("/expand_reduce_flow/", json=JOB)
    assert response.status_code == 202
    job_id: str = response.json()["job_id"]
    assert await wait_finished(client, job_id) == "completed"
    return job_id


async def assert_reads_still_served(client: httpx.AsyncClient, job_id: str) -> None:
    status = await client.get(f"/check_status/{job_id}")
    assert status.status_code == 200
    assert status.json()["status"] == "completed"
    assert (await client.get(f"/job_result/{job_id}")).status_code == 200


async def test_locked_database_is_503_with_retry_after_then_recovers(
    client: httpx.AsyncClient, db_path: Path, existing_job: str
) -> None:
    with closing(sqlite3.connect(db_path, isolation_level=None)) as other_process:
        other_process.execute("BEGIN IMMEDIATE")  # holds the write lock
        response = await client.post("/expand_reduce_flow/", json=JOB)
        assert response.status_code == 503
        assert response.headers["retry-after"] == "1"
        assert "busy" in response.json()["detail"]
        await assert_reads_still_served(client, existing_job)
        other_process.execute("ROLLBACK")
    assert count_jobs(db_path) == 1
    assert (await client.post("/expand_reduce_flow/", json=JOB)).status_code == 202


async def test_full_disk_on_submit_is_503_and_reads_go_on(
    app: FastAPI, client: httpx.AsyncClient, db_path: Path, existing_job: str
) -> None:
    writer = app.state.services.store.database._writer
    [(pages,)] = await writer.execute_fetchall("PRAGMA page_count")
    await writer.execute(f"PRAGMA max_page_count = {pages}")  # SQLite's own "disk full"
    big = {"job": {"input_data": [{"k": "v" * 100_000}]}}
    response = await client.post("/expand_reduce_flow/", json=big)
    assert response.status_code == 503
    assert "full" in response.json()["detail"]
    assert response.headers["retry-after"] == "1"
    await assert_reads_still_served(client, existing_job)
    assert count_jobs(db_path) == 1


async def test_read_only_database_on_submit_is_503_and_reads_go_on(
    app: FastAPI, client: httpx.AsyncClient, db_path: Path, existing_job: str
) -> None:
    await app.state.services.store.database._writer.execute("PRAGMA query_only = ON")
    response = await client.post("/expand_reduce_flow/", json=JOB)
    assert response.status_code == 503
    assert "read-only" in response.json()["detail"]
    await assert_reads_still_served(client, existing_job)
    assert count_jobs(db_path) == 1


async def test_readiness_fails_while_the_database_does_not_answer(
    app: FastAPI, client: httpx.AsyncClient
) -> None:
    assert (await client.get("/readyz")).status_code == 200
    await app.state.services.store.close()
    response = await client.get("/readyz")
    assert response.status_code == 503
    assert (await client.get("/healthz")).status_code == 200


async def test_readiness_fails_and_submissions_are_refused_once_draining(
    app: FastAPI, client: httpx.AsyncClient, db_path: Path
) -> None:
    app.state.services.runner.begin_drain()
    assert (await client.get("/readyz")).status_code == 503
    response = await client.post("/expand_reduce_flow/", json=JOB)
    assert response.status_code == 503
    assert response.headers["retry-after"] == "1"
    assert "shutting down" in response.json()["detail"]
    assert count_jobs(db_path) == 0


@pytest.mark.parametrize(
    "content",
    [b"this is not a database" * 1000, b"SQLite format 3\x00" + b"\xff" * 4096],
    ids=["text-file", "damaged-header"],
)
def test_server_refuses_to_start_on_a_file_that_is_not_a_database(
    tmp_path: Path, content: bytes
) -> None:
    path = tmp_path / "jobs.db"
    path.write_bytes(content)
    run = subprocess.run(
        [sys.executable, "-m", "uvicorn", "app.main:app", "--port", "0"],
        cwd=ROOT,
        env={"DATABASE_URL": f"sqlite:///{path}", "PATH": "/usr/bin:/bin"},
        capture_output=True,
        timeout=60,
    )
    log = run.stderr.decode()
    assert run.returncode == EXIT_CONFIG
    assert "Traceback" not in log
    [line] = [line for line in log.splitlines() if "refusing to start" in line]
    assert str(path) in line
    assert path.read_bytes() == content  # left untouched for the operator


@pytest.mark.parametrize("url", ["mysql://somewhere/db", "sqlite://", "jobs.db"])
def test_unsupported_database_url_is_refused_when_settings_are_read(url: str) -> None:
    with pytest.raises(ValueError, match="DATABASE_URL"):
        Settings(database_url=url)


def test_passwords_in_database_urls_are_not_repeated() -> None:
    assert redact("postgresql://jobs:s3cret@db:5432/jobs") == "postgresql://jobs:***@db:5432/jobs"
    assert redact("postgresql://jobs@db/jobs") == "postgresql://jobs@db/jobs"
    assert redact("sqlite:///./data/jobs.db") == "sqlite:///./data/jobs.db"
    with pytest.raises(ValueError, match="DATABASE_URL") as refused:
        Settings(database_url="mysql://jobs:s3cret@db/jobs")
    assert "s3cret" not in str(refused.value)
