"""The Python client: its typed answers and errors, retries and waiting, against the real app
in-process (``AsyncClient`` over ASGI) and against scripted answers (httpx's MockTransport).
"""

import io
import itertools
import re
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from rich.console import Console

from expand_reduce_client import (
    AsyncClient,
    Client,
    Conflict,
    InvalidRequest,
    Job,
    JobFailed,
    NotFound,
    NotSupported,
    Unavailable,
    UsageError,
    WaitTimeout,
)
from expand_reduce_client.cli import _ProgressDisplay
from expand_reduce_client.client import _retry_after

ITEMS = [{"1": "2", "3": "4", "5": "6", "7": "8"}, {"key1": "value1"}]
RESULT = [{"1 5": "2 6", "3 7": "4 8"}, {"key1": "value1"}]
COLLIDING = [{"a": "1", "x": "2", "a x": "3"}]
JOB_ID = "3f1c2a9e-5b7d-4e8f-9a0b-1c2d3e4f5a6b"


def in_process(app: FastAPI, **options: Any) -> AsyncClient:
    return AsyncClient("http://testserver", transport=httpx.ASGITransport(app=app), **options)


# Against the real app.


async def test_run_returns_the_result(app: FastAPI) -> None:
    async with in_process(app) as client:
        assert await client.run(ITEMS) == RESULT


async def test_run_raises_job_failed_with_the_services_error(app: FastAPI) -> None:
    async with in_process(app) as client:
        with pytest.raises(JobFailed) as failed:
            await client.run(COLLIDING)
    assert "output key 'a x' would be written twice" in str(failed.value.error)


async def test_submit_status_result_list_cancel_delete_return_typed_objects(app: FastAPI) -> None:
    async with in_process(app) as client:
        submission = await client.submit(ITEMS)
        job = await client.wait(submission.job_id, timeout=10)
        assert isinstance(job, Job)
        assert (job.job_id, job.status, job.finished) == (submission.job_id, "completed", True)
        assert job.created_at <= job.updated_at
        assert job.created_at.tzinfo is not None
        result = await client.result(job.job_id)
        assert (result.status, result.result, result.error) == ("completed", RESULT, None)
        page = await client.list(status="completed", limit=10)
        assert [listed.job_id for listed in page.jobs] == [job.job_id]
        with pytest.raises(Conflict):
            await client.cancel(job.job_id)  # already finished
        await client.delete(job.job_id)
        with pytest.raises(NotFound):
            await client.status(job.job_id)


async def test_submit_with_wait_returns_the_final_status(app: FastAPI) -> None:
    async with in_process(app) as client:
        job = await client.submit(ITEMS, wait=True, timeout=10)
    assert job.status == "completed"


async def test_one_idempotency_key_submitted_twice_is_one_job(app: FastAPI) -> None:
    async with in_process(app) as client:
        first = await client.submit(ITEMS, idempotency_key="order-17")
        again = await client.submit(ITEMS, idempotency_key="order-17")
    assert again.job_id == first.job_id
    assert (first.replayed, again.replayed) == (False, True)


async def test_an_invalid_job_is_invalid_request_with_the_services_detail(app: FastAPI) -> None:
    async with in_process(app) as client:
        with pytest.raises(InvalidRequest) as refused:
            await client.submit([{"key": {"nested": "object"}}])
    assert refused.value.status_code == 422
    assert "input_data.0.key" in str(refused.value)


async def test_limits_come_from_the_openapi_document(app: FastAPI) -> None:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as http:
        openapi = (await http.get("/openapi.json")).json()
    settings = app.state.services.settings
    served, _ = scripted(httpx.Response(200, json=openapi))
    with Client("http://x", transport=served) as client:
        limits = client.limits()
    assert (limits.max_body_bytes, limits.max_items) == (
        settings.max_body_bytes,
        settings.max_items,
    )
    missing, _ = scripted(httpx.Response(404, json={"detail": "Not Found"}))
    with Client("http://x", transport=missing) as client:
        limits = client.limits()
    assert (limits.max_body_bytes, limits.max_items) == (None, None)


# Against scripted answers.


def scripted(
    *answers: httpx.Response | Callable[[httpx.Request], httpx.Response],
) -> tuple[httpx.MockTransport, list[tuple[float, httpx.Request]]]:
    """A transport giving these answers in turn (the last one for ever), and what it was asked."""
    seen: list[tuple[float, httpx.Request]] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append((time.monotonic(), request))
        answer = answers[min(len(seen), len(answers)) - 1]
        return answer(request) if callable(answer) else answer

    return httpx.MockTransport(handler), seen


def status_body(status: str = "processing", **extra: Any) -> dict[str, Any]:
    now = "2026-11-28T11:37:39.123456Z"
    return {"job_id": JOB_ID, "status": status, "created_at": now, "updated_at": now, **extra}


def test_503_with_retry_after_is_retried_after_that_long_with_the_same_idempotency_key() -> None:
    busy = httpx.Response(503, headers={"Retry-After": "1"}, json={"detail": "busy"})
    transport, seen = scripted(busy, busy, httpx.Response(202, json={"job_id": JOB_ID}))
    with Client("http://x", transport=transport) as client:
        assert client.submit(ITEMS).job_id == JOB_ID
    assert len(seen) == 3
    gaps = [later[0] - earlier[0] for earlier, later in itertools.pairwise(seen)]
    assert all(gap >= 0.95 for gap in gaps), gaps
    keys = {request.headers["idempotency-key"] for _, request in seen}
    assert len(keys) == 1


def test_each_submit_call_has_its_own_idempotency_key() -> None:
    transport, seen = scripted(httpx.Response(202, json={"job_id": JOB_ID}))
    with Client("http://x", transport=transport) as client:
        client.submit(ITEMS)
        client.submit(ITEMS)
    assert seen[0][1].headers["idempotency-key"] != seen[1][1].headers["idempotency-key"]


def test_connection_errors_are_retried_with_growing_jittered_pauses_until_the_deadline() -> None:
    def refused(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused", request=request)

    transport, seen = scripted(refused)
    started = time.monotonic()
    with (
        Client("http://x", transport=transport, retry_deadline=2) as client,
        pytest.raises(
            Unavailable, match=r"cannot reach http://x: connection refused \(gave up after 2 s\)"
        ),
    ):
        client.status(JOB_ID)
    assert time.monotonic() - started <= 2.5
    assert len(seen) >= 3  # retried, with pauses of at most a few hundred ms at first


def test_a_retry_after_past_the_deadline_gives_up_at_once() -> None:
    busy = httpx.Response(429, headers={"Retry-After": "60"}, json={"detail": "queue full"})
    transport, seen = scripted(busy)
    started = time.monotonic()
    with (
        Client("http://x", transport=transport, retry_deadline=5) as client,
        pytest.raises(Unavailable, match="429: queue full"),
    ):
        client.submit(ITEMS)
    assert time.monotonic() - started < 1
    assert len(seen) == 1


def test_a_500_is_not_retried() -> None:
    transport, seen = scripted(httpx.Response(500, json={"detail": "Internal server error"}))
    with Client("http://x", transport=transport) as client, pytest.raises(Unavailable):
        client.status(JOB_ID)
    assert len(seen) == 1


def test_a_route_the_service_lacks_is_not_supported_and_a_missing_job_is_not_found() -> None:
    transport, _ = scripted(
        lambda request: (
            httpx.Response(404, json={"detail": "Not Found"})
            if request.url.path == "/jobs"
            else httpx.Response(404, json={"detail": f"Job {JOB_ID} not found or expired"})
        )
    )
    with Client("http://x", transport=transport) as client:
        with pytest.raises(NotSupported, match="no GET /jobs"):
            client.list()
        with pytest.raises(NotFound, match="not found or expired"):
            client.status(JOB_ID)


def test_waiting_asks_for_the_long_poll() -> None:
    transport, seen = scripted(httpx.Response(200, json=status_body("completed")))
    with Client("http://x", transport=transport) as client:
        job = client.wait(JOB_ID)
    assert job.status == "completed"
    assert seen[0][1].url.params["wait"] == "30"
    assert len(seen) == 1


def test_waiting_falls_back_to_polling_with_backoff_where_wait_is_ignored() -> None:
    answers = [httpx.Response(200, json=status_body()) for _ in range(5)]
    transport, seen = scripted(*answers, httpx.Response(200, json=status_body("completed")))
    with Client("http://x", transport=transport) as client:
        assert client.wait(JOB_ID).status == "completed"
    # The first asked for a long-poll, answered at once: the service has none. Then plain polls,
    # each pause about twice the last.
    assert seen[0][1].url.params.get("wait") == "30"
    assert all("wait" not in request.url.params for _, request in seen[1:])
    gaps = [later[0] - earlier[0] for earlier, later in itertools.pairwise(seen[1:])]
    assert gaps == sorted(gaps), gaps
    assert gaps[-1] > 2.5 * gaps[0], gaps


def test_a_wait_with_a_timeout_raises_wait_timeout() -> None:
    transport, _ = scripted(httpx.Response(200, json=status_body()))
    with Client("http://x", transport=transport) as client, pytest.raises(WaitTimeout):
        client.wait(JOB_ID, timeout=0.5)


def test_progress_is_reported_while_waiting() -> None:
    running = status_body(progress={"done_items": 3000, "total_items": 20000})
    transport, _ = scripted(
        httpx.Response(200, json=running), httpx.Response(200, json=status_body("completed"))
    )
    seen: list[Job] = []
    with Client("http://x", transport=transport) as client:
        client.wait(JOB_ID, on_progress=seen.append)
    assert seen[0].progress is not None
    assert (seen[0].progress.done_items, seen[0].progress.total_items) == (3000, 20000)
    assert seen[-1].status == "completed"


@pytest.mark.parametrize(
    ("header", "seconds"),
    [("2", 2.0), ("0", 0.0), ("-3", 0.0), ("soon", None), (None, None)],
)
def test_retry_after_is_read_as_seconds(header: str | None, seconds: float | None) -> None:
    headers = {"Retry-After": header} if header is not None else {}
    assert _retry_after(httpx.Response(503, headers=headers)) == seconds


def test_retry_after_may_be_an_http_date() -> None:
    when = format_datetime(datetime.now(UTC) + timedelta(seconds=30), usegmt=True)
    seconds = _retry_after(httpx.Response(503, headers={"Retry-After": when}))
    assert seconds is not None
    assert 28 <= seconds <= 30


def test_the_progress_display_shows_objects_done_once_the_service_reports_them() -> None:
    screen = io.StringIO()
    console = Console(file=screen, force_terminal=True, width=120)
    running = status_body(progress={"done_items": 3000, "total_items": 20000})
    with _ProgressDisplay(JOB_ID, console) as display:
        display.update(Job.from_json(status_body()))
        display.update(Job.from_json(running))
    shown = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", screen.getvalue())
    assert "3f1c2a9e processing" in shown
    assert re.search(r"3000/20000 objects \d:\d\d:\d\d", shown), shown


async def test_the_async_client_retries_as_the_sync_one_does() -> None:
    busy = httpx.Response(503, headers={"Retry-After": "0.2"}, json={"detail": "busy"})
    transport, seen = scripted(busy, httpx.Response(202, json={"job_id": JOB_ID}))
    async with AsyncClient("http://x", transport=transport) as client:
        submission = await client.submit(ITEMS)
    assert submission.job_id == JOB_ID
    assert len(seen) == 2
    assert seen[1][0] - seen[0][0] >= 0.19
    assert seen[0][1].headers["idempotency-key"] == seen[1][1].headers["idempotency-key"]


def test_a_retry_after_past_the_deadline_says_so() -> None:
    busy = httpx.Response(429, headers={"Retry-After": "3600"}, json={"detail": "queue full"})
    transport, _ = scripted(busy)
    with (
        Client("http://x", transport=transport, retry_deadline=30) as client,
        pytest.raises(Unavailable, match="asked to be asked again in 3600 s, past the 30 s"),
    ):
        client.submit(ITEMS)


@pytest.mark.parametrize(
    ("options", "problem"),
    [
        ({"url": "localhost:8080"}, "must start with http:// or https://"),
        ({"url": "http://x", "api_key": "kü"}, "printable ASCII"),
        ({"url": "http://x", "api_key": "two words"}, "printable ASCII"),
    ],
)
def test_settings_the_client_cannot_send_are_refused_at_once(
    options: dict[str, Any], problem: str
) -> None:
    with pytest.raises(UsageError, match=problem):
        Client(**options)


def test_limits_that_are_not_numbers_are_unknown() -> None:
    openapi = {
        "paths": {
            "/expand_reduce_flow/": {
                "post": {"requestBody": {"x-max-body-bytes": "big", "content": {}}}
            }
        }
    }
    served, _ = scripted(httpx.Response(200, json=openapi))
    with Client("http://x", transport=served) as client:
        limits = client.limits()
    assert (limits.max_body_bytes, limits.max_items) == (None, None)


def test_a_job_id_that_is_not_a_uuid_is_not_found_without_asking() -> None:
    transport, seen = scripted(httpx.Response(200, json=status_body()))
    with Client("http://x", transport=transport) as client, pytest.raises(NotFound):
        client.status("../healthz")
    assert seen == []
