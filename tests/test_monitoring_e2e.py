"""Monitoring, seen from outside with real processes: promtool lints a live /metrics, a real
Prometheus scrapes the service and loads its alert rules (whose unit tests promtool runs), a
kill -9 and restart shows up as lease recoveries, and LOG_FORMAT=json writes JSON lines.

Prometheus and promtool come from Debian's ``prometheus`` package (``.ci/run`` installs it);
without them these tests skip, and fail under CI=true.
"""

import json
import os
import shutil
import signal
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.support import (
    ROOT,
    Server,
    SQLiteDatabase,
    big_job,
    free_port,
    start_server,
    stop_server,
    submit_all,
    wait_until_sync,
)

RULES = ROOT / "deploy" / "prometheus"
COLLIDING = [{"a": "1", "x": "2", "a x": "3"}]


def tool(name: str) -> str:
    """The path of a Prometheus tool; skip without it, or fail under CI."""
    path = shutil.which(name)
    if path is None:
        message = f"{name} is not installed (apt-get install prometheus)"
        if os.environ.get("CI"):
            pytest.fail(f"{message}. CI runs these tests rather than skipping them.", False)
        pytest.skip(message)
    return path


def promtool(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    """Run promtool (in the rules' folder, where their files name each other)."""
    return subprocess.run(
        [tool("promtool"), *args],
        cwd=RULES,
        input=stdin,
        capture_output=True,
        text=True,
        check=False,
    )


def metrics_of(server: Server) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = httpx.get(f"{server.base_url}/metrics", timeout=10).text
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def finished(server: Server, status: str) -> float:
    return metrics_of(server).get(("expand_reduce_jobs_finished_total", (("status", status),)), 0.0)


def run_to_end(client: httpx.Client, items: list[dict[str, Any]]) -> dict[str, Any]:
    response = client.post("/expand_reduce_flow/", json={"job": {"input_data": items}})
    assert response.status_code == 202, response.text
    job_id = response.json()["job_id"]
    status: dict[str, Any] = client.get(f"/check_status/{job_id}", params={"wait": 30}).json()
    assert status["status"] != "processing", status
    return status


def jobs_of_every_outcome(server: Server) -> None:
    """A small job and a large one (run in a worker process), a failing one, a cancelled one."""
    with httpx.Client(base_url=server.base_url, timeout=60) as client:
        assert run_to_end(client, [{"a": "1", "b": "2"}])["status"] == "completed"
        assert run_to_end(client, big_job(0, items=3000))["status"] == "completed"
        assert run_to_end(client, COLLIDING)["status"] == "failed"
        job_id = client.post(
            "/expand_reduce_flow/", json={"job": {"input_data": big_job(1, items=60_000, keys=3)}}
        ).json()["job_id"]
        assert client.post(f"/jobs/{job_id}/cancel").status_code == 202
        assert client.get(f"/check_status/{job_id}").json()["status"] == "failed"
        assert client.get("/no/such/path").status_code == 404


# Large jobs (over 64 KiB) go to the one worker process.
WORKER_ENV = {"FLOW_PROCESSES": "1", "FLOW_PROCESS_THRESHOLD_BYTES": "65536"}


def test_promtool_check_metrics_finds_nothing_to_lint_after_jobs_of_every_outcome(
    tmp_path: Path,
) -> None:
    tool("promtool")  # before the server: skip (or fail) at once without it
    server = start_server(tmp_path / "jobs.db", tmp_path / "server.log", WORKER_ENV)
    try:
        jobs_of_every_outcome(server)
        text = httpx.get(f"{server.base_url}/metrics").text
        # The large job ran in the worker process and was counted by the server.
        assert finished(server, "completed") == 2
        assert finished(server, "failed") == 2
    finally:
        stop_server(server)
    lint = promtool("check", "metrics", stdin=text)
    assert lint.returncode == 0, lint.stdout + lint.stderr
    assert lint.stdout + lint.stderr == ""


def test_promtool_finds_the_alert_rules_valid_and_their_unit_tests_pass() -> None:
    check = promtool("check", "rules", "rules.yaml")
    assert check.returncode == 0, check.stdout + check.stderr
    assert "SUCCESS: 6 rules found" in check.stdout
    tests = promtool("test", "rules", "rules_test.yaml")
    assert tests.returncode == 0, tests.stdout + tests.stderr
    assert "SUCCESS" in tests.stdout


@contextmanager
def prometheus_scraping(server: Server, directory: Path) -> Iterator[str]:
    """A real Prometheus on 127.0.0.1, scraping ``server`` every second with the rules loaded."""
    binary = tool("prometheus")
    config = directory / "prometheus.yml"
    config.write_text(
        json.dumps(
            {
                "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
                "rule_files": [str(RULES / "rules.yaml")],
                "scrape_configs": [
                    {
                        "job_name": "expand-reduce",
                        "static_configs": [{"targets": [server.base_url.removeprefix("http://")]}],
                    }
                ],
            }
        )
    )
    address = f"127.0.0.1:{free_port()}"
    log = directory / "prometheus.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [
                binary,
                f"--config.file={config}",
                f"--storage.tsdb.path={directory / 'tsdb'}",
                f"--web.listen-address={address}",
            ],
            stdout=out,
            stderr=out,
        )
    try:
        url = f"http://{address}"
        wait_until_sync(lambda: _answers(f"{url}/-/ready"), what="Prometheus to be ready")
        yield url
    finally:
        process.terminate()
        process.wait(timeout=30)


def _answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=1).status_code == 200
    except httpx.TransportError:
        return False


def query(prometheus: str, promql: str) -> list[dict[str, Any]]:
    answer = httpx.get(f"{prometheus}/api/v1/query", params={"query": promql}, timeout=5).json()
    assert answer["status"] == "success", answer
    result: list[dict[str, Any]] = answer["data"]["result"]
    return result


def scalar(prometheus: str, promql: str) -> float | None:
    result = query(prometheus, promql)
    return float(result[0]["value"][1]) if result else None


def test_a_real_prometheus_sees_jobs_finish_and_labels_routes_by_template(
    tmp_path: Path,
) -> None:
    server = start_server(tmp_path / "jobs.db", tmp_path / "server.log")
    completed = 'sum(expand_reduce_jobs_finished_total{status="completed"})'
    try:
        with prometheus_scraping(server, tmp_path) as prometheus:
            wait_until_sync(
                lambda: scalar(prometheus, completed) is not None,
                what="a first scrape of the service",
            )
            before = scalar(prometheus, completed)
            assert before is not None
            with httpx.Client(base_url=server.base_url, timeout=60) as client:
                for n in range(5):
                    assert run_to_end(client, big_job(n, items=50))["status"] == "completed"
            wait_until_sync(
                lambda: (scalar(prometheus, completed) or 0) >= before + 5,
                what="Prometheus to see 5 more completed jobs",
            )
            routes = {
                series["metric"]["route"]
                for series in query(prometheus, 'expand_reduce_http_requests_total{method="GET"}')
            }
            [target] = query(prometheus, 'up{job="expand-reduce"}')
            rules = httpx.get(f"{prometheus}/api/v1/rules").json()["data"]["groups"]
    finally:
        stop_server(server)
    assert "/check_status/{job_id}" in routes
    assert not any(route.startswith("/check_status/") and "{" not in route for route in routes)
    assert target["value"][1] == "1"
    [group] = rules
    assert len(group["rules"]) == 6
    assert all(rule["health"] == "ok" for rule in group["rules"]), group["rules"]


def test_a_kill_9_and_restart_counts_each_job_taken_over_as_a_lease_recovery(
    tmp_path: Path,
) -> None:
    database = SQLiteDatabase(tmp_path / "jobs.db")
    jobs = [big_job(n) for n in range(24)]
    first = start_server(database.path, tmp_path / "first.log", {"FLOW_CONCURRENCY": "4"})
    ids = submit_all(first, jobs)
    wait_until_sync(
        lambda: database.query("SELECT count(*) FROM job_leases WHERE attempts >= 1")[0][0] > 0,
        what="a first job to start",
    )
    first.process.send_signal(signal.SIGKILL)
    first.process.wait()
    [(started,)] = database.query("SELECT count(*) FROM job_leases WHERE attempts >= 1")
    assert started > 0, "no job was running when it was killed"

    second = start_server(database.path, tmp_path / "second.log")
    try:
        wait_until_sync(
            lambda: database.query("SELECT count(*) FROM job_leases")[0][0] == 0,
            what="every job to finish after the restart",
        )
        samples = metrics_of(second)
    finally:
        stop_server(second)
    assert samples[("expand_reduce_lease_recoveries_total", ())] == started
    assert samples[("expand_reduce_lease_lost_total", ())] == 0
    assert database.query("SELECT count(*) FROM jobs WHERE status = 'completed'") == [(len(ids),)]


def test_json_logs_of_a_real_server_are_one_object_per_line_with_the_job_id_on_its_lines(
    tmp_path: Path,
) -> None:
    log = tmp_path / "server.log"
    server = start_server(tmp_path / "jobs.db", log, {"LOG_FORMAT": "json", **WORKER_ENV})
    try:
        with httpx.Client(base_url=server.base_url, timeout=60) as client:
            # A large job first, run in the worker process: its lines (and the worker's
            # shared memory, left behind at shutdown) must not break the format either.
            assert run_to_end(client, big_job(0, items=3000))["status"] == "completed"
            response = client.post(
                "/expand_reduce_flow/",
                json={"job": {"input_data": [{"a": "1", "b": "2"}]}},
                headers={"X-Request-ID": "trace-me-1"},
            )
            job_id = response.json()["job_id"]
            assert client.get(f"/check_status/{job_id}", params={"wait": 30}).json()["status"] == (
                "completed"
            )
        wait_until_sync(lambda: "completed in" in log.read_text(), what="the finished line")
    finally:
        stop_server(server)
    lines = log.read_text().splitlines()
    records = [json.loads(line) for line in lines]  # every line, uvicorn's too
    assert all(isinstance(record, dict) for record in records)
    for record in records:
        assert {"time", "level", "logger", "message"} <= set(record), record
    about_the_job = [
        record
        for record in records
        if record["logger"].startswith("app") and job_id in record["message"]
    ]
    assert sum("completed in" in record["message"] for record in records) == 2
    steps = [record["message"].removeprefix(f"job {job_id}: ") for record in about_the_job]
    assert len(steps) == 3, steps
    assert steps[0] == "accepted, 1 objects"
    assert steps[1].startswith("started, attempt 1, waited ")
    assert steps[2].startswith("completed in ")
    assert all(record["job_id"] == job_id for record in about_the_job)
    assert all(record["request_id"] == "trace-me-1" for record in about_the_job)
    assert about_the_job[2]["status"] == "completed"
    assert about_the_job[2]["items"] == 1
    access = [record for record in records if record["logger"] == "uvicorn.access"]
    assert all(record.get("request_id") for record in access)
    [traced] = [record for record in access if record["request_id"] == "trace-me-1"]
    assert "POST /expand_reduce_flow/" in traced["message"]
    assert any(record["message"].startswith("Started server process") for record in records)
    assert any(record["message"].startswith("Shutting down") for record in records)
