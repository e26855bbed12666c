"""The HTTP API through an async client over ASGI: every status code it promises."""

import uuid
from collections.abc import AsyncIterator
from typing import Any

import httpx
import orjson
import pytest
from fastapi import FastAPI

from app.config import Settings
from app.store import StoreUnavailableError
from tests.support import (
    FreshDatabase,
    asgi_client,
    result_once_finished,
    serving,
    wait_finished,
)

JOB = {"job": {"input_data": [{"1": "2", "3": "4", "5": "6", "7": "8"}, {"key1": "value1"}]}}
RESULT = [{"1 5": "2 6", "3 7": "4 8"}, {"key1": "value1"}]


async def submit(client: httpx.AsyncClient, body: Any) -> httpx.Response:
    return await client.post("/expand_reduce_flow/", json=body)


async def test_submit_answers_202_with_a_uuid4_and_location(client: httpx.AsyncClient) -> None:
    response = await submit(client, JOB)
    assert response.status_code == 202
    job_id = response.json()["job_id"]
    assert uuid.UUID(job_id).version == 4
    assert response.headers["location"] == f"/check_status/{job_id}"


async def test_submit_without_trailing_slash_is_answered_not_redirected(
    client: httpx.AsyncClient,
) -> None:
    response = await client.post("/expand_reduce_flow", json=JOB)
    assert response.status_code == 202
    assert "job_id" in response.json()


async def test_submitted_job_completes_with_one_result_per_input_in_order(
    client: httpx.AsyncClient,
) -> None:
    job_id = (await submit(client, JOB)).json()["job_id"]
    assert await wait_finished(client, job_id) == "completed"
    status = await client.get(f"/check_status/{job_id}")
    assert status.status_code == 200
    assert status.json()["status"] == "completed"
    result = await client.get(f"/job_result/{job_id}")
    assert result.status_code == 200
    assert result.json() == {
        "job_id": job_id,
        "status": "completed",
        "result": RESULT,
        "error": None,
    }


async def test_status_gives_iso_8601_utc_timestamps(client: httpx.AsyncClient) -> None:
    job_id = (await submit(client, JOB)).json()["job_id"]
    await wait_finished(client, job_id)
    body = (await client.get(f"/check_status/{job_id}")).json()
    assert set(body) == {"job_id", "status", "created_at", "updated_at"}
    for field in ("created_at", "updated_at"):
        assert body[field].endswith("Z")
    assert body["created_at"] <= body["updated_at"]


async def test_result_of_a_processing_job_is_202_with_retry_after(
    app: FastAPI, client: httpx.AsyncClient
) -> None:
    job_id = str(uuid.uuid4())
    await app.state.services.store.create_job(job_id, '[{"a":"b"}]', claimed=False)  # not run
    status = await client.get(f"/check_status/{job_id}")
    assert status.json()["status"] == "processing"
    result = await client.get(f"/job_result/{job_id}")
    assert result.status_code == 202
    assert result.headers["retry-after"] == "1"
    assert result.json() == {
        "job_id": job_id,
        "status": "processing",
        "result": None,
        "error": None,
    }


async def test_failed_job_result_is_200_with_an_error_naming_the_key(
    client: httpx.AsyncClient,
) -> None:
    body = {"job": {"input_data": [{"a": "1", "x": "2", "a x": "3"}]}}
    job_id = (await submit(client, body)).json()["job_id"]
    assert await wait_finished(client, job_id) == "failed"
    result = await client.get(f"/job_result/{job_id}")
    assert result.status_code == 200
    payload = result.json()
    assert (payload["status"], payload["result"]) == ("failed", None)
    assert "'a x'" in payload["error"]
    assert "Traceback" not in payload["error"]


@pytest.mark.parametrize("route", ["check_status", "job_result"])
async def test_unknown_job_is_404(client: httpx.AsyncClient, route: str) -> None:
    job_id = str(uuid.uuid4())
    response = await client.get(f"/{route}/{job_id}")
    assert response.status_code == 404
    assert job_id in response.json()["detail"]


@pytest.mark.parametrize(
    "job_id",
    ["nope", "1234", "x" * 5000, "..%2E%2E", "3f1c2a9e5b7d4e8f9a0b1c2d3e4f5a6b----"],
)
@pytest.mark.parametrize("route", ["check_status", "job_result"])
async def test_malformed_job_id_is_404_without_asking_the_database(
    app: FastAPI,
    client: httpx.AsyncClient,
    route: str,
    job_id: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async def must_not_be_called(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("the database was queried for a malformed id")

    monkeypatch.setattr(app.state.services.store, "get_job", must_not_be_called)
    response = await client.get(f"/{route}/{job_id}")
    assert response.status_code == 404
    assert "UUID" in response.json()["detail"]


@pytest.mark.parametrize("route", ["check_status", "job_result"])
async def test_job_id_full_of_path_characters_is_404(client: httpx.AsyncClient, route: str) -> None:
    response = await client.get(f"/{route}/..%2F..%2Fetc%2Fpasswd")
    assert response.status_code == 404
    assert response.json() == {"detail": "Not Found"}


@pytest.mark.parametrize(
    ("body", "loc", "message"),
    [
        ({}, ["body", "job"], "Field required"),
        ({"job": []}, ["body", "job"], "object"),
        ({"job": {}}, ["body", "job", "input_data"], "Field required"),
        ({"job": {"input_data": {"a": "b"}}}, ["body", "job", "input_data"], "array"),
        ({"job": {"input_data": "text"}}, ["body", "job", "input_data"], "array"),
        ({"job": {"input_data": []}}, ["body", "job", "input_data"], "at least 1"),
        ({"job": {"input_data": [{"a": "b"}, 7]}}, ["body", "job", "input_data", 1], "object"),
        ({"job": {"input_data": [["a", "b"]]}}, ["body", "job", "input_data", 0], "object"),
        (
            {"job": {"input_data": [{"k": {"x": 1}}]}},
            ["body", "job", "input_data", 0, "k"],
            "object",
        ),
        ({"job": {"input_data": [{"k": [1, 2]}]}}, ["body", "job", "input_data", 0, "k"], "array"),
        ({"job": {"input_data": [{}], "extra": 1}}, ["body", "job", "extra"], "Extra"),
        ([], ["body"], "object"),
    ],
)
async def test_invalid_job_is_422_naming_the_place_and_stores_nothing(
    client: httpx.AsyncClient, database: FreshDatabase, body: Any, loc: list[Any], message: str
) -> None:
    response = await submit(client, body)
    assert response.status_code == 422
    [error] = response.json()["detail"]
    assert error["loc"] == loc
    assert message in error["msg"]
    assert database.count_jobs() == 0


async def test_every_invalid_item_is_reported_up_to_a_bound(client: httpx.AsyncClient) -> None:
    response = await submit(client, {"job": {"input_data": [1] * 100}})
    assert response.status_code == 422
    errors = response.json()["detail"]
    assert len(errors) == 20
    assert [e["loc"][-1] for e in errors] == list(range(20))


async def test_scalar_values_of_every_json_type_are_accepted(client: httpx.AsyncClient) -> None:
    body = {"job": {"input_data": [{"s": "x", "i": 1, "f": 1.5, "t": True, "n": None}]}}
    job_id = (await submit(client, body)).json()["job_id"]
    result = await result_once_finished(client, job_id)
    assert result == [{"s f": "x 1.5", "i t": "1 true", "n": None}]


@pytest.fixture
def small_limits(database: FreshDatabase) -> Settings:
    return Settings(
        database_url=database.url,
        flow_processes=0,
        max_items=3,
        max_keys_per_item=2,
        max_body_bytes=1000,
    )


@pytest.fixture
async def limited_client(small_limits: Settings) -> AsyncIterator[httpx.AsyncClient]:
    async with serving(small_limits) as client:
        yield client


async def test_more_items_than_the_limit_is_422(
    limited_client: httpx.AsyncClient, database: FreshDatabase
) -> None:
    response = await submit(limited_client, {"job": {"input_data": [{}] * 4}})
    assert response.status_code == 422
    assert "at most 3 items" in response.json()["detail"][0]["msg"]
    assert database.count_jobs() == 0


async def test_more_keys_than_the_limit_is_422(
    limited_client: httpx.AsyncClient, database: FreshDatabase
) -> None:
    response = await submit(limited_client, {"job": {"input_data": [{"a": 1, "b": 2, "c": 3}]}})
    assert response.status_code == 422
    assert response.json()["detail"][0]["loc"] == ["body", "job", "input_data", 0]
    assert "at most 2 keys" in response.json()["detail"][0]["msg"]
    assert database.count_jobs() == 0


async def test_body_over_the_limit_is_413_and_stores_nothing(
    limited_client: httpx.AsyncClient, database: FreshDatabase
) -> None:
    body = {"job": {"input_data": [{"k": "v" * 2000}]}}
    response = await submit(limited_client, body)
    assert response.status_code == 413
    assert "1000 bytes" in response.json()["detail"]
    assert database.count_jobs() == 0


async def test_chunked_body_over_the_limit_is_413_before_it_is_read_whole(
    limited_client: httpx.AsyncClient, database: FreshDatabase
) -> None:
    sent = 0

    async def chunks() -> AsyncIterator[bytes]:
        nonlocal sent
        yield b'{"job": {"input_data": [{"k": "'
        for _ in range(1000):
            sent += 1
            yield b"v" * 100
        yield b'"}]}}'

    response = await limited_client.post(
        "/expand_reduce_flow/", content=chunks(), headers={"content-type": "application/json"}
    )
    assert response.status_code == 413
    assert sent < 1000  # the server stopped reading long before the end
    assert database.count_jobs() == 0


@pytest.mark.parametrize("payload", [b"{not json", b'{"job": {"input_data": [{"a": "b"}]', b""])
async def test_malformed_json_is_400_and_stores_nothing(
    client: httpx.AsyncClient, database: FreshDatabase, payload: bytes
) -> None:
    response = await client.post(
        "/expand_reduce_flow/", content=payload, headers={"content-type": "application/json"}
    )
    assert response.status_code == 400
    assert "not valid JSON" in response.json()["detail"]
    assert database.count_jobs() == 0


@pytest.mark.parametrize("content_type", [None, "text/plain", "application/x-www-form-urlencoded"])
async def test_body_not_sent_as_json_is_415(
    client: httpx.AsyncClient, database: FreshDatabase, content_type: str | None
) -> None:
    headers = {"content-type": content_type} if content_type else {}
    response = await client.post("/expand_reduce_flow/", content=orjson.dumps(JOB), headers=headers)
    assert response.status_code == 415
    assert "application/json" in response.json()["detail"]
    assert database.count_jobs() == 0


async def test_json_with_charset_is_accepted(client: httpx.AsyncClient) -> None:
    response = await client.post(
        "/expand_reduce_flow/",
        content=orjson.dumps(JOB),
        headers={"content-type": "application/json; charset=utf-8"},
    )
    assert response.status_code == 202


async def test_unavailable_store_on_submit_is_503_with_retry_after(
    app: FastAPI, client: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def locked(*args: Any, **kwargs: Any) -> None:
        raise StoreUnavailableError("database is locked")

    monkeypatch.setattr(app.state.services.store, "create_job", locked)
    response = await submit(client, JOB)
    assert response.status_code == 503
    assert response.headers["retry-after"] == "1"
    assert "unavailable" in response.json()["detail"]


async def test_internal_error_is_500_without_a_traceback(
    app: FastAPI, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    async def broken(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("secret internals")

    monkeypatch.setattr(app.state.services.store, "get_job", broken)
    async with asgi_client(app, raise_app_exceptions=False) as client:
        response = await client.get(f"/check_status/{uuid.uuid4()}")
    assert response.status_code == 500
    assert response.json() == {"detail": "Internal server error"}
    assert "secret internals" in caplog.text  # logged for us, not sent to them


async def test_root_redirects_to_the_docs(client: httpx.AsyncClient) -> None:
    response = await client.get("/")
    assert response.status_code == 307
    assert response.headers["location"] == "/docs"


async def test_docs_page_loads_swagger_ui_from_the_app_itself(client: httpx.AsyncClient) -> None:
    page = (await client.get("/docs")).text
    assert "cdn" not in page.lower()
    assert "/static/swagger-ui/swagger-ui-bundle.js" in page
    asset = await client.get("/static/swagger-ui/swagger-ui-bundle.js")
    assert asset.status_code == 200
    assert "SwaggerUIBundle" in asset.text
    assert (await client.get("/static/swagger-ui/swagger-ui.css")).status_code == 200


async def test_openapi_has_examples_for_every_request_and_response(
    client: httpx.AsyncClient,
) -> None:
    schema = (await client.get("/openapi.json")).json()
    operations = {
        ("/expand_reduce_flow/", "post"): {"202", "400", "408", "413", "415", "422", "429", "503"},
        ("/check_status/{job_id}", "get"): {"200", "404", "422", "503"},
        ("/job_result/{job_id}", "get"): {"200", "202", "404", "503"},
        ("/jobs", "get"): {"200", "400", "422", "503"},
        ("/jobs/{job_id}/cancel", "post"): {"202", "404", "409", "503"},
        ("/jobs/{job_id}", "delete"): {"204", "404", "409", "503"},
    }
    for (path, method), codes in operations.items():
        operation = schema["paths"][path][method]
        assert set(operation["responses"]) == codes, path
        for code, response in operation["responses"].items():
            assert code == "204" or has_example(schema, response), (path, code)
    request = schema["paths"]["/expand_reduce_flow/"]["post"]["requestBody"]
    assert request["content"]["application/json"]["schema"]["example"]["job"]["input_data"]


def has_example(schema: dict[str, Any], response: dict[str, Any]) -> bool:
    content = response.get("content", {}).get("application/json", {})
    if "example" in content or "examples" in content:
        return True
    ref = content.get("schema", {}).get("$ref", "")
    component = schema["components"]["schemas"].get(ref.rsplit("/", 1)[-1], {})
    return "example" in component


async def test_health_endpoints(client: httpx.AsyncClient) -> None:
    assert (await client.get("/healthz")).json() == {"status": "ok"}
    assert (await client.get("/readyz")).json() == {"status": "ready"}


async def test_large_bodies_and_jobs_go_through_a_worker_process(database: FreshDatabase) -> None:
    settings = Settings(database_url=database.url, flow_processes=1, flow_process_threshold_bytes=1)
    items = [{f"k{k}": f"v{i}-{k}" for k in range(5)} for i in range(3000)]
    async with serving(settings) as client:
        job_id = (await submit(client, {"job": {"input_data": items}})).json()["job_id"]
        result = await result_once_finished(client, job_id, seconds=60)
        bad = await submit(client, {"job": {"input_data": [*items, {"k": []}]}})
    assert result[1234] == {"k0 k2": "v1234-0 v1234-2", "k1 k3": "v1234-1 v1234-3", "k4": "v1234-4"}
    assert len(result) == 3000
    assert bad.status_code == 422
    assert bad.json()["detail"][0]["loc"] == ["body", "job", "input_data", 3000, "k"]
