"""End to end: a real ``uvicorn app.main:app`` process, real HTTP, a real SQLite file."""

import os
import re
import shutil
import sqlite3
import subprocess
import time
import uuid
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path

import httpx
import orjson
import pytest

from tests.support import ROOT, Server, start_server, stop_server

RESULT = [{"1 5": "2 6", "3 7": "4 8"}, {"key1": "value1"}]
IN_CI = os.environ.get("CI", "").lower() in {"1", "true", "yes"}


def wait_for_final(server: Server, job_id: str, seconds: float = 30) -> dict[str, object]:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        body: dict[str, object] = httpx.get(f"{server.base_url}/check_status/{job_id}").json()
        if body["status"] != "processing":
            return body
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} still processing after {seconds} s")


def readme_walkthrough() -> str:
    readme = (ROOT / "README.md").read_text()
    match = re.search(r"<!-- walkthrough -->\s*```bash\n(.*?)```", readme, re.S)
    assert match, "README.md has no walk-through block"
    return match.group(1)


@pytest.mark.skipif(shutil.which("curl") is None and not IN_CI, reason="curl is not installed")
def test_readme_curl_walkthrough_completes_a_job(server: Server) -> None:
    script = readme_walkthrough().replace("http://localhost:8080", server.base_url)
    run = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", script], capture_output=True, timeout=60
    )
    assert run.returncode == 0, run.stderr.decode()
    lines = run.stdout.decode().strip().splitlines()
    job_id, status_line, result_line = lines[0], lines[1], lines[-1]
    assert uuid.UUID(job_id).version == 4
    assert orjson.loads(status_line)["status"] in {"processing", "completed"}
    result = orjson.loads(result_line)
    if result["status"] == "processing":  # the README's curls ran faster than the job
        wait_for_final(server, job_id)
        result = httpx.get(f"{server.base_url}/job_result/{job_id}").json()
    assert result == {"job_id": job_id, "status": "completed", "result": RESULT, "error": None}


def test_submit_poll_and_fetch_over_http(server: Server) -> None:
    body = {"job": {"input_data": [{"1": "2", "3": "4", "5": "6", "7": "8"}, {"key1": "value1"}]}}
    submitted = httpx.post(f"{server.base_url}/expand_reduce_flow", json=body)
    assert submitted.status_code == 202
    job_id = submitted.json()["job_id"]
    assert submitted.headers["location"] == f"/check_status/{job_id}"
    assert wait_for_final(server, job_id)["status"] == "completed"
    result = httpx.get(f"{server.base_url}/job_result/{job_id}")
    assert result.status_code == 200
    assert result.json()["result"] == RESULT


def test_chunked_body_over_the_limit_is_refused_with_413(server: Server) -> None:
    def chunks() -> Iterator[bytes]:
        yield b'{"job": {"input_data": [{"k": "'
        for _ in range(20_000):
            yield b"v" * 1024  # 20 MiB, over the 16 MiB default
        yield b'"}]}}'

    response = httpx.post(
        f"{server.base_url}/expand_reduce_flow/",
        content=chunks(),
        headers={"content-type": "application/json"},
        timeout=30,
    )
    assert response.status_code == 413


def test_a_job_left_processing_by_a_crashed_process_is_run_at_startup(tmp_path: Path) -> None:
    db_path = tmp_path / "jobs.db"
    first = start_server(db_path, tmp_path / "first.log")
    stop_server(first)  # leaves a migrated, empty database behind
    job_id = str(uuid.uuid4())
    with closing(sqlite3.connect(db_path)) as db, db:
        # What a process killed while running the job leaves: the job, and its expired lease.
        stamp = "2026-01-01T00:00:00.000000Z"
        db.execute(
            "INSERT INTO jobs (job_id, status, created_at, updated_at, input_data)"
            " VALUES (?, 'processing', ?, ?, ?)",
            (job_id, stamp, stamp, '[{"a":"x","b":"y","c":"z"}]'),
        )
        db.execute(
            "INSERT INTO job_leases (job_id, owner, attempts, lease_until)"
            " VALUES (?, 'crashed:1:x', 1, ?)",
            (job_id, time.time() - 1),
        )
    second = start_server(db_path, tmp_path / "second.log")
    try:
        assert wait_for_final(second, job_id)["status"] == "completed"
        result = httpx.get(f"{second.base_url}/job_result/{job_id}").json()
        assert result["result"] == [{"a b": "x y", "c": "z"}]
    finally:
        stop_server(second)


def chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(
    chromium() is None and not IN_CI,
    reason="headless Chromium is not installed (apt-get install chromium); .ci/run installs it",
)
def test_swagger_ui_renders_the_three_operations_in_a_real_browser(
    server: Server, tmp_path: Path
) -> None:
    browser = chromium()
    assert browser is not None, "CI must have Chromium: .ci/run installs it"
    command = [
        browser,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        f"--user-data-dir={tmp_path / 'profile'}",
        "--virtual-time-budget=15000",
        "--dump-dom",
        f"{server.base_url}/docs",
    ]
    dom = subprocess.run(command, capture_output=True, timeout=120).stdout.decode()
    rendered = set(re.findall(r'class="opblock-summary-path" data-path="([^"]+)"', dom))
    assert rendered >= {"/expand_reduce_flow/", "/check_status/{job_id}", "/job_result/{job_id}"}
    assert "does not specify a valid version field" not in dom


def test_a_large_chunked_submission_in_small_chunks_is_accepted(server: Server) -> None:
    """Chunked framing is limited per chunk (against trailer floods), never over a body."""
    items = [{"k": "v" * 50, "n": str(n)} for n in range(20_000)]
    body = orjson.dumps({"job": {"input_data": items}})

    def small_chunks() -> Iterator[bytes]:
        for start in range(0, len(body), 100):  # 14,000 chunks: over 64 KiB of size lines
            yield body[start : start + 100]

    response = httpx.post(
        f"{server.base_url}/expand_reduce_flow/",
        content=small_chunks(),
        headers={"content-type": "application/json"},
        timeout=60,
    )
    assert response.status_code == 202, response.text
    assert wait_for_final(server, response.json()["job_id"])["status"] == "completed"
