"""Metrics, request ids and logs, through an in-process client on both backends.

The metrics live in prometheus-client's process-wide registry, so counters are compared
before and after what a test does rather than against zero.
"""

import logging
import uuid
from collections.abc import AsyncIterator, MutableMapping
from contextlib import asynccontextmanager
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from prometheus_client.parser import text_string_to_metric_families
from pydantic import SecretStr

from app.config import Settings
from app.main import create_app
from tests.support import FreshDatabase, asgi_client, wait_finished, wait_until

JOB = {"job": {"input_data": [{"a": "1", "b": "2"}]}}
# "a" + "x" makes "a x", which the object carries already: ExpandReduceFlow fails the job.
COLLIDING = {"job": {"input_data": [{"a": "1", "x": "2", "a x": "3"}]}}
# Every metric the README's table lists, as Prometheus sees their families.
SERVICE_METRICS = {
    "expand_reduce_jobs_submitted": "counter",
    "expand_reduce_jobs_finished": "counter",
    "expand_reduce_jobs_cancelled": "counter",
    "expand_reduce_job_run_seconds": "histogram",
    "expand_reduce_job_wait_seconds": "histogram",
    "expand_reduce_jobs_running": "gauge",
    "expand_reduce_jobs_unfinished": "gauge",
    "expand_reduce_ready": "gauge",
    "expand_reduce_lease_recoveries": "counter",
    "expand_reduce_lease_lost": "counter",
    "expand_reduce_store_commit_seconds": "histogram",
    "expand_reduce_store_batch_size": "histogram",
    "expand_reduce_store_errors": "counter",
    "expand_reduce_http_requests": "counter",
    "expand_reduce_http_request_duration_seconds": "histogram",
}


@asynccontextmanager
async def started(settings: Settings) -> AsyncIterator[tuple[FastAPI, httpx.AsyncClient]]:
    application = create_app(settings)
    async with application.router.lifespan_context(application), asgi_client(application) as c:
        yield application, c


async def scrape(client: httpx.AsyncClient) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of /metrics, by name and labels."""
    response = await client.get("/metrics")
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(response.text)
        for sample in family.samples
    }


def value(samples: dict[Any, float], name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


async def run_to_end(client: httpx.AsyncClient, body: Any) -> str:
    response = await client.post("/expand_reduce_flow/", json=body)
    assert response.status_code == 202, response.text
    job_id: str = response.json()["job_id"]
    await wait_finished(client, job_id)
    return job_id


async def queued(app: FastAPI) -> str:
    """A job stored and reserved for this process, never run (so it can be cancelled)."""
    job_id = str(uuid.uuid4())
    await app.state.services.store.create_job(job_id, '[{"a": "1"}]', claimed=False)
    return job_id


async def test_every_listed_metric_exists_after_one_job_of_each_outcome(
    app: FastAPI, client: httpx.AsyncClient
) -> None:
    await run_to_end(client, JOB)
    await run_to_end(client, COLLIDING)
    cancelled = await queued(app)
    assert (await client.post(f"/jobs/{cancelled}/cancel")).status_code == 202
    families = {
        family.name: family.type
        for family in text_string_to_metric_families((await client.get("/metrics")).text)
    }
    for name, kind in SERVICE_METRICS.items():
        assert families.get(name) == kind, f"{name}: {families.get(name)}"
    # The client library's own: the process's and the interpreter's.
    assert {"process_resident_memory_bytes", "process_cpu_seconds", "python_info"} <= set(families)
    assert "python_gc_collections" in families


async def test_each_outcome_is_counted_once_as_finished_with_its_status(
    app: FastAPI, client: httpx.AsyncClient
) -> None:
    before = await scrape(client)
    await run_to_end(client, JOB)
    await run_to_end(client, COLLIDING)
    cancelled = await queued(app)
    assert (await client.post(f"/jobs/{cancelled}/cancel")).status_code == 202
    after = await scrape(client)

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert delta("expand_reduce_jobs_submitted_total") == 2  # the third was stored directly
    assert delta("expand_reduce_jobs_finished_total", status="completed") == 1
    assert delta("expand_reduce_jobs_finished_total", status="failed") == 2
    assert delta("expand_reduce_jobs_cancelled_total") == 1
    assert delta("expand_reduce_job_run_seconds_count") == 2  # the cancelled one never ran
    assert delta("expand_reduce_job_wait_seconds_count") == 2
    assert delta("expand_reduce_store_commit_seconds_count") > 0
    assert delta("expand_reduce_store_batch_size_sum") >= 5  # 3 inserts, 2 finishes, a cancel
    assert value(after, "expand_reduce_jobs_running") == 0


async def test_route_label_is_the_template_and_unknown_paths_and_methods_fold_into_one(
    client: httpx.AsyncClient,
) -> None:
    ids = [str(uuid.uuid4()) for _ in range(3)]
    for job_id in ids:
        assert (await client.get(f"/check_status/{job_id}")).status_code == 404
        assert (await client.get(f"/no/such/{job_id}")).status_code == 404
    assert (await client.request("BREW", "/healthz")).status_code == 405
    assert (await client.get("/openapi.json")).status_code == 200
    assert (await client.get("/static/swagger-ui/swagger-ui.css")).status_code == 200
    samples = await scrape(client)
    requests = {
        labels: count
        for (name, labels), count in samples.items()
        if name == "expand_reduce_http_requests_total"
    }
    routes = {dict(labels)["route"] for labels in requests}
    assert not any(job_id in route for job_id in ids for route in routes)
    template = (("method", "GET"), ("route", "/check_status/{job_id}"), ("status", "404"))
    assert requests[template] >= 3
    assert requests[(("method", "GET"), ("route", "unmatched"), ("status", "404"))] >= 3
    assert requests[(("method", "other"), ("route", "/healthz"), ("status", "405"))] >= 1
    # Routes that are not FastAPI's own: the OpenAPI document, a mount of static files.
    assert requests[(("method", "GET"), ("route", "/openapi.json"), ("status", "200"))] >= 1
    static = (("method", "GET"), ("route", "/static/swagger-ui/{path}"), ("status", "200"))
    assert requests[static] >= 1
    unmatched_ok = (("method", "GET"), ("route", "unmatched"), ("status", "200"))
    assert unmatched_ok not in requests
    assert (
        value(
            samples,
            "expand_reduce_http_request_duration_seconds_count",
            route="/check_status/{job_id}",
            method="GET",
        )
        >= 3
    )


async def test_unfinished_counts_the_whole_database_and_ready_follows_readyz(
    app: FastAPI, client: httpx.AsyncClient
) -> None:
    before = value(await scrape(client), "expand_reduce_jobs_unfinished")
    for _ in range(3):
        await queued(app)

    async def counted() -> bool:
        return value(await scrape(client), "expand_reduce_jobs_unfinished") == before + 3

    await wait_until(counted, seconds=5, what="the unfinished gauge to count 3 more jobs")
    assert value(await scrape(client), "expand_reduce_ready") == 1
    app.state.services.runner.begin_drain()
    assert (await client.get("/readyz")).status_code == 503

    async def not_ready() -> bool:
        return value(await scrape(client), "expand_reduce_ready") == 0

    await wait_until(not_ready, seconds=5, what="expand_reduce_ready to go to 0")


async def test_a_failing_database_write_is_counted_by_reason(db_path: Any) -> None:
    settings = Settings(database_url=f"sqlite:///{db_path}", flow_processes=0)
    async with started(settings) as (app, client):
        before = await scrape(client)
        await app.state.services.store.database._writer.execute("PRAGMA query_only = ON")
        assert (await client.post("/expand_reduce_flow/", json=JOB)).status_code == 503
        after = await scrape(client)
    errors = "expand_reduce_store_errors_total"
    assert value(after, errors, reason="read_only") > value(before, errors, reason="read_only")


async def test_with_metrics_disabled_there_is_no_metrics_route(database: FreshDatabase) -> None:
    settings = Settings(database_url=database.url, flow_processes=0, metrics_enabled=False)
    async with started(settings) as (_, client):
        assert (await client.get("/metrics")).status_code == 404


async def test_with_api_keys_on_metrics_stays_open_and_out_of_the_schema(
    database: FreshDatabase,
) -> None:
    settings = Settings(database_url=database.url, flow_processes=0, api_keys=SecretStr("k1"))
    async with started(settings) as (_, client):
        assert (await client.get("/check_status/x")).status_code == 401
        assert (await client.get("/metrics")).status_code == 200
        assert "/metrics" not in (await client.get("/openapi.json")).json()["paths"]


# Request ids.


async def test_a_sane_request_id_is_echoed_back(client: httpx.AsyncClient) -> None:
    response = await client.get("/healthz", headers={"X-Request-ID": "lb-7f3a.42:retry/1"})
    assert response.headers["x-request-id"] == "lb-7f3a.42:retry/1"


@pytest.mark.parametrize("sent", [None, "", "has spaces", "x" * 129, "<script>"])
async def test_without_a_sane_request_id_the_response_carries_a_fresh_one(
    client: httpx.AsyncClient, sent: str | None
) -> None:
    headers = {} if sent is None else {"X-Request-ID": sent}
    first = (await client.get("/healthz", headers=headers)).headers["x-request-id"]
    second = (await client.get("/healthz", headers=headers)).headers["x-request-id"]
    assert first != sent
    assert len(first) == 32
    assert int(first, 16) >= 0  # hexadecimal
    assert first != second


async def test_an_internal_error_answers_with_the_request_id_its_log_line_carries(
    app: FastAPI, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    async def broken(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("secret internals")

    monkeypatch.setattr(app.state.services.store, "get_job", broken)
    async with asgi_client(app, raise_app_exceptions=False) as client:
        response = await client.get(
            f"/check_status/{uuid.uuid4()}", headers={"X-Request-ID": "req-500"}
        )
    assert response.status_code == 500
    assert response.headers["x-request-id"] == "req-500"
    [logged] = [record for record in caplog.records if record.levelno == logging.ERROR]
    assert logged.request_id == "req-500"  # type: ignore[attr-defined]


async def test_a_job_logs_accepted_started_and_finished_with_its_id_and_the_request_s(
    client: httpx.AsyncClient, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="app")
    response = await client.post("/expand_reduce_flow/", json=JOB, headers={"X-Request-ID": "r1"})
    job_id = response.json()["job_id"]

    def of_the_job() -> list[logging.LogRecord]:
        return [record for record in caplog.records if getattr(record, "job_id", None) == job_id]

    async def finished_line() -> bool:
        return len(of_the_job()) >= 3

    await wait_until(finished_line, what="the job's finished line")
    lines = of_the_job()
    messages = [record.getMessage() for record in lines]
    assert messages == [
        f"job {job_id}: accepted, 1 objects",
        f"job {job_id}: started, attempt 1, waited {lines[1].wait_seconds:.3f} s",  # type: ignore[attr-defined]
        f"job {job_id}: completed in {lines[2].seconds:.3f} s, 1 objects",  # type: ignore[attr-defined]
    ]
    assert all(record.request_id == "r1" for record in lines)  # type: ignore[attr-defined]
    assert [getattr(record, "attempt", None) for record in lines] == [None, 1, 1]
    assert lines[2].status == "completed"  # type: ignore[attr-defined]
    assert lines[2].items == 1  # type: ignore[attr-defined]


async def test_a_client_that_leaves_mid_upload_is_a_499_not_a_server_error(
    app: FastAPI, client: httpx.AsyncClient, caplog: pytest.LogCaptureFixture
) -> None:
    before = await scrape(client)
    messages: list[dict[str, Any]] = [
        {"type": "http.request", "body": b'{"job": {"input_data": [', "more_body": True},
        {"type": "http.disconnect"},
    ]
    sent: list[MutableMapping[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return messages.pop(0)

    async def send(message: MutableMapping[str, Any]) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/expand_reduce_flow/",
        "raw_path": b"/expand_reduce_flow/",
        "root_path": "",
        "query_string": b"",
        "headers": [(b"content-type", b"application/json"), (b"content-length", b"100000")],
        "client": ("127.0.0.1", 5000),
        "server": ("testserver", 80),
    }
    await app(scope, receive, send)
    after = await scrape(client)
    name = "expand_reduce_http_requests_total"
    labels = {"route": "/expand_reduce_flow/", "method": "POST"}

    def delta(status: str) -> float:
        return value(after, name, **labels, status=status) - value(
            before, name, **labels, status=status
        )

    assert delta("499") == 1
    assert delta("500") == 0
    assert not [record for record in caplog.records if record.levelno >= logging.ERROR]


async def test_a_cancelled_job_logs_its_finished_line_with_its_id(
    app: FastAPI, client: httpx.AsyncClient, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="app")
    job_id = await queued(app)
    assert (await client.post(f"/jobs/{job_id}/cancel")).status_code == 202
    [line] = [record for record in caplog.records if getattr(record, "job_id", None) == job_id]
    assert line.getMessage() == f"job {job_id}: failed: cancelled at the client's request"
    assert line.status == "failed"  # type: ignore[attr-defined]
