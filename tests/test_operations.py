"""Running it for months, through the HTTP API over ASGI on both backends: list, cancel,
delete, idempotent submits, backpressure, long-poll, progress, API keys and retention.

The same capabilities are attacked with real processes in ``test_operations_e2e.py``.
"""

import asyncio
import base64
import json
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from hypothesis import HealthCheck, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st
from pydantic import SecretStr

from app import waiters
from app.config import Settings
from app.jobs import JobStatus
from app.main import create_app
from app.retention import Retention
from app.store import CANCELLED_ERROR
from tests.support import FakeClock, FreshDatabase, asgi_client, opened_store

JOB = {"job": {"input_data": [{"a": "1", "b": "2"}]}}
OTHER_JOB = {"job": {"input_data": [{"a": "1", "b": "3"}]}}
ALPHA, BETA = "alpha-key-0123456789", "beta-key-0123456789"


def services(app: FastAPI) -> Any:
    return app.state.services


async def submit(client: httpx.AsyncClient, body: Any = JOB, **headers: str) -> httpx.Response:
    return await client.post("/expand_reduce_flow/", json=body, headers=headers)


async def queued(app: FastAPI, tenant: str = "") -> str:
    """A job that stays processing: stored and reserved for this process, never run."""
    job_id = str(uuid.uuid4())
    store = services(app).store
    await store.create_job(job_id, '[{"a": "1"}]', claimed=False, total_items=1, tenant=tenant)
    return job_id


async def finished(client: httpx.AsyncClient, body: Any = JOB, **headers: str) -> str:
    response = await submit(client, body, **headers)
    assert response.status_code == 202, response.text
    job_id: str = response.json()["job_id"]
    auth = {k: v for k, v in headers.items() if k == "Authorization"}
    status = await client.get(f"/check_status/{job_id}", params={"wait": 10}, headers=auth)
    assert status.json()["status"] != "processing"
    return job_id


@asynccontextmanager
async def started(settings: Settings) -> AsyncIterator[tuple[FastAPI, httpx.AsyncClient]]:
    application = create_app(settings)
    async with application.router.lifespan_context(application), asgi_client(application) as c:
        yield application, c


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


# List.


async def test_list_shows_jobs_newest_first_without_payloads(client: httpx.AsyncClient) -> None:
    ids = [await finished(client) for _ in range(3)]
    response = await client.get("/jobs")
    assert response.status_code == 200
    body = response.json()
    assert [job["job_id"] for job in body["jobs"]] == ids[::-1]
    assert body["next_page_token"] is None
    for job in body["jobs"]:
        assert set(job) == {"job_id", "status", "created_at", "updated_at"}
        assert job["status"] == "completed"


async def test_list_filters_by_status(app: FastAPI, client: httpx.AsyncClient) -> None:
    done = await finished(client)
    failing = await finished(client, {"job": {"input_data": [{"a": "1", "x": "2", "a x": "3"}]}})
    waiting = await queued(app)
    by_status = {}
    for status in ("processing", "completed", "failed"):
        page = (await client.get("/jobs", params={"status": status})).json()
        by_status[status] = [job["job_id"] for job in page["jobs"]]
    assert by_status == {"processing": [waiting], "completed": [done], "failed": [failing]}


async def test_list_pages_by_token_cover_every_job_once(client: httpx.AsyncClient) -> None:
    ids = [await finished(client) for _ in range(7)]
    seen: list[str] = []
    token = None
    pages = 0
    while True:
        params: dict[str, Any] = {"limit": 3} | ({"page_token": token} if token else {})
        body = (await client.get("/jobs", params=params)).json()
        assert len(body["jobs"]) <= 3
        seen += [job["job_id"] for job in body["jobs"]]
        pages += 1
        token = body["next_page_token"]
        if token is None:
            break
    assert seen == ids[::-1]
    assert pages == 3


@pytest.mark.parametrize("limit", ["0", "1001", "-1", "many"])
async def test_list_limit_outside_1_to_1000_is_422(client: httpx.AsyncClient, limit: str) -> None:
    response = await client.get("/jobs", params={"limit": limit})
    assert response.status_code == 422
    assert response.json()["detail"][0]["loc"] == ["query", "limit"]


@pytest.mark.parametrize("token", ["garbage!", "W10", "WyJhIl0", "bm90IGpzb24"])
async def test_list_with_a_malformed_page_token_is_400(
    client: httpx.AsyncClient, token: str
) -> None:
    response = await client.get("/jobs", params={"page_token": token})
    assert response.status_code == 400
    assert "page_token" in response.json()["detail"]


async def test_list_with_an_unknown_status_is_422(client: httpx.AsyncClient) -> None:
    response = await client.get("/jobs", params={"status": "running"})
    assert response.status_code == 422
    assert response.json()["detail"][0]["loc"] == ["query", "status"]


# Cancel.


async def test_cancelling_a_queued_job_fails_it_and_it_never_runs(
    app: FastAPI, client: httpx.AsyncClient
) -> None:
    job_id = await queued(app)
    response = await client.post(f"/jobs/{job_id}/cancel")
    assert response.status_code == 202
    assert response.json()["status"] == "failed"
    result = (await client.get(f"/job_result/{job_id}")).json()
    assert result["status"] == "failed"
    assert result["error"].startswith("cancelled")
    assert result["error"] == CANCELLED_ERROR
    # Nothing of it is held any more, so no sweep or heartbeat can start it.
    store = services(app).store
    assert not [claim for claim in store.held if claim.job_id == job_id]
    await services(app).runner.sweep()
    assert (await client.get(f"/job_result/{job_id}")).json()["error"] == CANCELLED_ERROR


async def test_cancelling_a_finished_job_is_409(client: httpx.AsyncClient) -> None:
    job_id = await finished(client)
    response = await client.post(f"/jobs/{job_id}/cancel")
    assert response.status_code == 409
    assert "already finished" in response.json()["detail"]
    assert (await client.get(f"/check_status/{job_id}")).json()["status"] == "completed"


@pytest.mark.parametrize("job_id", [str(uuid.uuid4()), "not-a-uuid"])
async def test_cancelling_an_unknown_job_is_404(client: httpx.AsyncClient, job_id: str) -> None:
    assert (await client.post(f"/jobs/{job_id}/cancel")).status_code == 404


# Delete.


async def test_deleting_a_finished_job_removes_it_everywhere(
    client: httpx.AsyncClient, database: FreshDatabase
) -> None:
    job_id = await finished(client)
    response = await client.delete(f"/jobs/{job_id}")
    assert response.status_code == 204
    assert response.content == b""
    for route in ("check_status", "job_result"):
        gone = await client.get(f"/{route}/{job_id}")
        assert gone.status_code == 404
        assert "not found or expired" in gone.json()["detail"]
    assert database.count_jobs() == 0
    assert (await client.get("/jobs")).json()["jobs"] == []
    assert (await client.delete(f"/jobs/{job_id}")).status_code == 404


async def test_deleting_a_processing_job_is_409_and_keeps_it(
    app: FastAPI, client: httpx.AsyncClient, database: FreshDatabase
) -> None:
    job_id = await queued(app)
    response = await client.delete(f"/jobs/{job_id}")
    assert response.status_code == 409
    assert "cancel it first" in response.json()["detail"]
    assert database.count_jobs() == 1
    assert (await client.post(f"/jobs/{job_id}/cancel")).status_code == 202
    assert (await client.delete(f"/jobs/{job_id}")).status_code == 204
    assert database.count_jobs() == 0


# Idempotent submits.


async def test_the_same_key_and_body_answer_the_first_job(
    client: httpx.AsyncClient, database: FreshDatabase
) -> None:
    first = await submit(client, JOB, **{"Idempotency-Key": "order-17"})
    again = await submit(client, JOB, **{"Idempotency-Key": "order-17"})
    assert first.status_code == again.status_code == 202
    assert again.json() == first.json()
    assert again.headers["idempotent-replayed"] == "true"
    assert "idempotent-replayed" not in first.headers
    assert again.headers["location"] == f"/check_status/{first.json()['job_id']}"
    assert database.count_jobs() == 1


async def test_the_same_key_with_another_body_is_422_naming_the_key(
    client: httpx.AsyncClient, database: FreshDatabase
) -> None:
    await submit(client, JOB, **{"Idempotency-Key": "order-18"})
    response = await submit(client, OTHER_JOB, **{"Idempotency-Key": "order-18"})
    assert response.status_code == 422
    [problem] = response.json()["detail"]
    assert problem["loc"] == ["header", "Idempotency-Key"]
    assert "order-18" in problem["msg"]
    assert database.count_jobs() == 1


async def test_twenty_concurrent_submissions_with_one_key_make_one_job(
    client: httpx.AsyncClient, database: FreshDatabase
) -> None:
    responses = await asyncio.gather(
        *(submit(client, JOB, **{"Idempotency-Key": "burst"}) for _ in range(20))
    )
    assert {response.status_code for response in responses} == {202}
    assert len({response.json()["job_id"] for response in responses}) == 1
    replays = [r for r in responses if r.headers.get("idempotent-replayed") == "true"]
    assert len(replays) == 19
    assert database.count_jobs() == 1


async def test_a_key_is_the_same_request_whatever_the_spacing_of_the_body(
    client: httpx.AsyncClient,
) -> None:
    headers = {"Idempotency-Key": "spacing", "Content-Type": "application/json"}
    compact = b'{"job":{"input_data":[{"a":"1","b":"2"}]}}'
    spaced = b'{ "job" : { "input_data" : [ { "a" : "1" , "b" : "2" } ] } }'
    first = await client.post("/expand_reduce_flow/", content=compact, headers=headers)
    again = await client.post("/expand_reduce_flow/", content=spaced, headers=headers)
    assert again.json()["job_id"] == first.json()["job_id"]


@pytest.mark.parametrize("key", ["", "x" * 256, "naïve", "tab\there"])
async def test_a_malformed_idempotency_key_is_400_and_stores_nothing(
    client: httpx.AsyncClient, database: FreshDatabase, key: str
) -> None:
    response = await client.post(
        "/expand_reduce_flow/",
        content=b'{"job":{"input_data":[{"a":"1"}]}}',
        headers=[(b"Content-Type", b"application/json"), (b"Idempotency-Key", key.encode())],
    )
    assert response.status_code == 400
    assert "Idempotency-Key" in response.json()["detail"]
    assert database.count_jobs() == 0


async def test_a_key_past_its_job_s_retention_makes_a_new_job(
    app: FastAPI, client: httpx.AsyncClient, database: FreshDatabase
) -> None:
    first = await finished(client, JOB, **{"Idempotency-Key": "renewable"})
    await client.delete(f"/jobs/{first}")  # as a purge would
    again = await submit(client, JOB, **{"Idempotency-Key": "renewable"})
    assert again.status_code == 202
    assert again.json()["job_id"] != first
    assert "idempotent-replayed" not in again.headers


# Backpressure.


async def test_past_max_queued_jobs_submissions_are_429_and_store_nothing(
    database: FreshDatabase,
) -> None:
    settings = Settings(database_url=database.url, flow_processes=0, max_queued_jobs=2)
    async with started(settings) as (app, client):
        earlier = await finished(client, JOB, **{"Idempotency-Key": "earlier"})
        waiting = [await queued(app), await queued(app)]
        response = await submit(client, OTHER_JOB)
        assert response.status_code == 429
        assert response.headers["retry-after"].isdigit()
        assert "unfinished" in response.json()["detail"]
        assert database.count_jobs() == 3
        # A replay stores nothing, so it is answered even while the queue is full.
        replay = await submit(client, JOB, **{"Idempotency-Key": "earlier"})
        assert (replay.status_code, replay.json()["job_id"]) == (202, earlier)
        # Room again once a job finishes.
        assert (await client.post(f"/jobs/{waiting[0]}/cancel")).status_code == 202
        assert (await submit(client, OTHER_JOB)).status_code == 202


async def test_repeats_of_a_submission_refused_as_the_queue_is_full_are_refused_too(
    database: FreshDatabase,
) -> None:
    """Found in review: repeats in one batch were answered as replays of a job never stored."""
    settings = Settings(database_url=database.url, flow_processes=0, max_queued_jobs=1)
    async with started(settings) as (app, client):
        await queued(app)
        responses = await asyncio.gather(
            *(submit(client, JOB, **{"Idempotency-Key": "full"}) for _ in range(20))
        )
        assert {response.status_code for response in responses} == {429}
        assert database.count_jobs() == 1


@pytest.mark.parametrize(
    "cursor",
    [
        ["\u0000", "x"],
        ["2026-01-01T00:00:00.000000Z", "\u0000"],
        ["2026-01-01", "00000000-0000-4000-8000-000000000000"],
        ["2026-01-01T00:00:00.000000Z", "not-a-job-id"],
    ],
)
@pytest.mark.parametrize("status", [None, "processing", "failed"])
async def test_a_page_token_the_service_did_not_issue_is_400_whatever_it_holds(
    client: httpx.AsyncClient, cursor: list[str], status: str | None
) -> None:
    """Found in review: a NUL inside a token was a 500 on PostgreSQL."""
    token = base64.urlsafe_b64encode(json.dumps(cursor).encode()).decode()
    params = {"page_token": token} | ({"status": status} if status else {})
    response = await client.get("/jobs", params=params)
    assert response.status_code == 400
    assert "page_token" in response.json()["detail"]


async def test_spaces_around_an_idempotency_key_are_not_part_of_it(
    client: httpx.AsyncClient, database: FreshDatabase
) -> None:
    first = await submit(client, JOB, **{"Idempotency-Key": "padded"})
    # httpx, like h11, strips them itself: send the raw header bytes.
    again = await client.post(
        "/expand_reduce_flow/",
        content=b'{"job": {"input_data": [{"a": "1", "b": "2"}]}}',
        headers=[(b"Content-Type", b"application/json"), (b"Idempotency-Key", b"padded \t")],
    )
    assert again.json()["job_id"] == first.json()["job_id"]
    assert database.count_jobs() == 1


# Long-poll.


async def test_a_job_this_process_finishes_wakes_its_waiter_without_the_shared_poll(
    app: FastAPI, client: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    # With the shared poll an hour apart, only the finish itself can answer the waiter.
    monkeypatch.setattr(waiters, "POLL_SECONDS", 3600)
    job_id = await queued(app)
    [claim] = [claim for claim in services(app).store.held if claim.job_id == job_id]
    waiting = asyncio.create_task(client.get(f"/check_status/{job_id}", params={"wait": 20}))
    await asyncio.sleep(0.2)
    assert not waiting.done()
    assert await services(app).store.finish(claim, output_json="[]", error=None)
    response = await asyncio.wait_for(waiting, 10)
    assert response.json()["status"] == "completed"


async def test_wait_finds_a_job_finished_by_another_process(
    app: FastAPI, client: httpx.AsyncClient, settings: Settings, clock: FakeClock
) -> None:
    job_id = str(uuid.uuid4())
    async with opened_store(settings, clock, "another") as other:
        claim = await other.create_job(job_id, "[{}]", claimed=True)
        waiting = asyncio.create_task(client.get(f"/check_status/{job_id}", params={"wait": 20}))
        await asyncio.sleep(0.2)
        assert not waiting.done()
        assert await other.finish(claim, output_json="[]", error=None)
        response = await asyncio.wait_for(waiting, 5)
    assert response.json()["status"] == "completed"


async def test_wait_gives_up_after_n_seconds_with_processing(
    app: FastAPI, client: httpx.AsyncClient
) -> None:
    job_id = await queued(app)
    began = time.monotonic()
    response = await client.get(f"/check_status/{job_id}", params={"wait": 0.3})
    assert response.json()["status"] == "processing"
    assert time.monotonic() - began >= 0.3


async def test_past_the_waiter_cap_wait_answers_at_once(database: FreshDatabase) -> None:
    settings = Settings(database_url=database.url, flow_processes=0, long_poll_max_waiters=1)
    async with started(settings) as (app, client):
        job_id = await queued(app)
        first = asyncio.create_task(client.get(f"/check_status/{job_id}", params={"wait": 30}))
        await asyncio.sleep(0.2)
        began = time.monotonic()
        second = await client.get(f"/check_status/{job_id}", params={"wait": 30})
        assert time.monotonic() - began < 5
        assert second.json()["status"] == "processing"
        assert not first.done()
        assert (await client.post(f"/jobs/{job_id}/cancel")).status_code == 202
        assert (await asyncio.wait_for(first, 5)).json()["status"] == "failed"


@pytest.mark.parametrize("wait", ["-1", "31", "soon", "nan", "inf"])
async def test_wait_outside_0_to_30_seconds_is_422(client: httpx.AsyncClient, wait: str) -> None:
    response = await client.get(f"/check_status/{uuid.uuid4()}", params={"wait": wait})
    assert response.status_code == 422
    assert response.json()["detail"][0]["loc"] == ["query", "wait"]


# Progress.


async def test_a_processing_job_reports_progress_and_a_finished_one_does_not(
    app: FastAPI, client: httpx.AsyncClient
) -> None:
    job_id = str(uuid.uuid4())
    store = services(app).store
    claim = await store.create_job(job_id, "[{}, {}, {}]", claimed=False, total_items=3)
    body = (await client.get(f"/check_status/{job_id}")).json()
    assert body["progress"] == {"done_items": 0, "total_items": 3}
    await store.renew({claim: 2})
    body = (await client.get(f"/check_status/{job_id}")).json()
    assert body["progress"] == {"done_items": 2, "total_items": 3}
    done = await finished(client)
    assert "progress" not in (await client.get(f"/check_status/{done}")).json()


# API keys.


@pytest.fixture
async def keyed(database: FreshDatabase) -> AsyncIterator[tuple[FastAPI, httpx.AsyncClient]]:
    settings = Settings(
        database_url=database.url, flow_processes=0, api_keys=SecretStr(f"{ALPHA}, {BETA}")
    )
    async with started(settings) as opened:
        yield opened


@pytest.mark.parametrize("headers", [{}, bearer("wrong"), {"Authorization": ALPHA}, bearer("")])
async def test_with_keys_on_a_request_without_a_valid_key_is_401(
    keyed: tuple[FastAPI, httpx.AsyncClient], database: FreshDatabase, headers: dict[str, str]
) -> None:
    _, client = keyed
    some_id = uuid.uuid4()
    requests = [
        client.post("/expand_reduce_flow/", json=JOB, headers=headers),
        client.get(f"/check_status/{some_id}", headers=headers),
        client.get(f"/job_result/{some_id}", headers=headers),
        client.get("/jobs", headers=headers),
        client.post(f"/jobs/{some_id}/cancel", headers=headers),
        client.delete(f"/jobs/{some_id}", headers=headers),
    ]
    for response in await asyncio.gather(*requests):
        assert response.status_code == 401, response.request.url
        assert response.headers["www-authenticate"] == "Bearer"
        assert ALPHA not in response.text
    assert database.count_jobs() == 0


async def test_with_keys_on_another_key_s_job_is_404_everywhere(
    keyed: tuple[FastAPI, httpx.AsyncClient],
) -> None:
    _, client = keyed
    mine = await finished(client, JOB, **bearer(ALPHA))
    theirs = bearer(BETA)
    for response in [
        await client.get(f"/check_status/{mine}", headers=theirs),
        await client.get(f"/job_result/{mine}", headers=theirs),
        await client.post(f"/jobs/{mine}/cancel", headers=theirs),
        await client.delete(f"/jobs/{mine}", headers=theirs),
    ]:
        assert response.status_code == 404
    assert (await client.get(f"/job_result/{mine}", headers=bearer(ALPHA))).status_code == 200


async def test_with_keys_on_each_key_lists_only_its_own_jobs(
    keyed: tuple[FastAPI, httpx.AsyncClient],
) -> None:
    _, client = keyed
    alphas = {await finished(client, JOB, **bearer(ALPHA)) for _ in range(2)}
    betas = {await finished(client, JOB, **bearer(BETA))}
    listed = {}
    for key in (ALPHA, BETA):
        page = (await client.get("/jobs", headers=bearer(key))).json()
        listed[key] = {job["job_id"] for job in page["jobs"]}
    assert listed == {ALPHA: alphas, BETA: betas}


async def test_with_keys_on_one_idempotency_key_of_two_tenants_is_two_jobs(
    keyed: tuple[FastAPI, httpx.AsyncClient], database: FreshDatabase
) -> None:
    _, client = keyed
    first = await submit(client, JOB, **{"Idempotency-Key": "k"}, **bearer(ALPHA))
    second = await submit(client, OTHER_JOB, **{"Idempotency-Key": "k"}, **bearer(BETA))
    assert first.status_code == second.status_code == 202
    assert first.json()["job_id"] != second.json()["job_id"]
    assert database.count_jobs() == 2


async def test_with_keys_on_health_docs_and_schema_stay_open(
    keyed: tuple[FastAPI, httpx.AsyncClient],
) -> None:
    _, client = keyed
    for path in ("/healthz", "/readyz", "/docs", "/openapi.json"):
        assert (await client.get(path)).status_code == 200, path
    schema = (await client.get("/openapi.json")).json()
    assert schema["components"]["securitySchemes"]["bearerAuth"]["scheme"] == "bearer"
    submit_op = schema["paths"]["/expand_reduce_flow/"]["post"]
    assert submit_op["security"] == [{"bearerAuth": []}]
    assert "401" in submit_op["responses"]
    assert "security" not in schema["paths"]["/healthz"]["get"]


async def test_with_keys_off_the_schema_asks_for_none(client: httpx.AsyncClient) -> None:
    schema = (await client.get("/openapi.json")).json()
    assert "securitySchemes" not in schema.get("components", {})
    assert "401" not in schema["paths"]["/jobs"]["get"]["responses"]


# Retention.


async def test_a_purge_removes_only_jobs_finished_more_than_the_retention_ago(
    settings: Settings, clock: FakeClock, database: FreshDatabase
) -> None:
    async with opened_store(settings, clock, "me") as store:
        old = await store.create_job("old", "[{}]", claimed=True)
        assert await store.finish(old, output_json="[]", error=None)
        clock.advance(100)
        recent = await store.create_job("recent", "[{}]", claimed=True)
        assert await store.finish(recent, output_json="[]", error=None)
        running = await store.create_job("running", "[{}]", claimed=True)
        clock.advance(100)
        retention = Retention(
            store, settings.model_copy(update={"job_retention_seconds": 150}), clock=clock
        )
        assert await retention.purge() == 1
        assert await store.get_job("old") is None
        assert await store.get_job("recent") is not None
        clock.advance(10_000)
        assert await retention.purge() == 1
        assert {job for (job,) in database.query("SELECT job_id FROM jobs")} == {"running"}
        assert await store.finish(running, output_json="[]", error=None)
        job = await store.get_job("running")
        assert job is not None
        assert job.status is JobStatus.COMPLETED


async def test_a_purge_of_many_jobs_goes_in_small_batches(
    settings: Settings, clock: FakeClock, database: FreshDatabase
) -> None:
    async with opened_store(settings, clock, "me") as store:
        claims = [await store.create_job(f"job-{n}", "[{}]", claimed=True) for n in range(45)]
        for claim in claims:
            assert await store.finish(claim, output_json="[]", error=None)
        calls: list[int] = []
        purge = store.purge_expired

        async def counted(finished_before: float, limit: int) -> int:
            removed = await purge(finished_before, limit)
            calls.append(removed)
            return removed

        store.purge_expired = counted  # type: ignore[method-assign]
        clock.advance(61)
        retention = Retention(
            store, settings.model_copy(update={"job_retention_seconds": 60}), clock=clock
        )
        assert await retention.purge() == 45
    assert calls == [20, 20, 5]
    assert database.count_jobs() == 0


# Pagination while jobs are being added.


@hypothesis_settings(max_examples=15, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    limits=st.lists(st.integers(1, 7), min_size=1, max_size=30),
    inserts=st.lists(st.integers(0, 4), min_size=1, max_size=30),
    status=st.sampled_from([None, "processing"]),
)
async def test_walking_the_pages_while_jobs_are_added_repeats_and_skips_nothing(
    app: FastAPI,
    client: httpx.AsyncClient,
    database: FreshDatabase,
    limits: list[int],
    inserts: list[int],
    status: str | None,
) -> None:
    store = services(app).store
    for _ in range(5):
        await queued(app)
    await store.flush()
    existing = {job_id for (job_id,) in database.query("SELECT job_id FROM jobs")}

    async def add(count: int) -> None:
        await asyncio.gather(*(queued(app) for _ in range(count)))

    seen: list[str] = []
    token = None
    for step in range(10_000):
        params: dict[str, Any] = {"limit": limits[step % len(limits)]}
        params |= {"page_token": token} if token else {}
        params |= {"status": status} if status else {}
        adding = asyncio.create_task(add(inserts[step % len(inserts)]))  # while the page is read
        page = (await client.get("/jobs", params=params)).json()
        await adding
        seen += [job["job_id"] for job in page["jobs"]]
        token = page["next_page_token"]
        if token is None:
            break
    assert len(seen) == len(set(seen)), "a job was listed twice"
    if status is not None:  # a job may leave processing meanwhile (and never come back)
        existing &= {
            job_id
            for (job_id,) in database.query(f"SELECT job_id FROM jobs WHERE status = '{status}'")
        }
    assert existing <= set(seen), "a job that existed when the walk began was skipped"
