"""Hostile and odd submissions: each gets a clear 4xx and stores nothing (or, if valid, works)."""

from collections.abc import AsyncIterator

import httpx
import pytest

from app.config import Settings
from tests.support import FreshDatabase, result_once_finished, serving

JSON = {"content-type": "application/json"}


async def post_raw(client: httpx.AsyncClient, payload: bytes) -> httpx.Response:
    return await client.post("/expand_reduce_flow/", content=payload, headers=JSON)


async def test_json_nested_deeper_than_the_parser_allows_is_400(
    client: httpx.AsyncClient, database: FreshDatabase
) -> None:
    payload = b'{"job": {"input_data": [{"k": ' + b"[" * 5000 + b"]" * 5000 + b"}]}}"
    response = await post_raw(client, payload)
    assert response.status_code == 400
    assert "depth" in response.json()["detail"]
    assert database.count_jobs() == 0


async def test_moderately_nested_value_is_422_at_its_place(
    client: httpx.AsyncClient, database: FreshDatabase
) -> None:
    payload = b'{"job": {"input_data": [{"k": ' + b"[" * 50 + b"]" * 50 + b"}]}}"
    response = await post_raw(client, payload)
    assert response.status_code == 422
    assert response.json()["detail"][0]["loc"] == ["body", "job", "input_data", 0, "k"]
    assert database.count_jobs() == 0


async def test_lone_surrogate_is_400(client: httpx.AsyncClient, database: FreshDatabase) -> None:
    response = await post_raw(client, b'{"job": {"input_data": [{"k": "\\ud800"}]}}')
    assert response.status_code == 400
    assert "surrogate" in response.json()["detail"]
    assert database.count_jobs() == 0


async def test_invalid_utf8_is_400(client: httpx.AsyncClient, database: FreshDatabase) -> None:
    response = await post_raw(client, b'{"job": {"input_data": [{"k": "\xff\xfe"}]}}')
    assert response.status_code == 400
    assert database.count_jobs() == 0


@pytest.mark.parametrize(
    "payload",
    [
        b'{"job": {"input_data": [{"k": "a\\u0000b"}]}}',
        b'{"job": {"input_data": [{"a\\u0000": 1}]}}',
    ],
)
async def test_nul_character_in_key_or_value_is_422(
    client: httpx.AsyncClient, database: FreshDatabase, payload: bytes
) -> None:
    response = await post_raw(client, payload)
    assert response.status_code == 422
    [error] = response.json()["detail"]
    assert "NUL" in error["msg"]
    assert error["loc"][:4] == ["body", "job", "input_data", 0]
    assert database.count_jobs() == 0


async def test_escaped_backslash_before_u0000_is_not_mistaken_for_nul(
    client: httpx.AsyncClient,
) -> None:
    response = await post_raw(client, b'{"job": {"input_data": [{"k": "\\\\u0000"}]}}')
    assert response.status_code == 202
    result = await result_once_finished(client, response.json()["job_id"])
    assert result == [{"k": "\\u0000"}]


async def test_duplicate_keys_in_one_object_keep_the_last_value(
    client: httpx.AsyncClient,
) -> None:
    response = await post_raw(client, b'{"job": {"input_data": [{"a": "1", "b": "2", "a": "3"}]}}')
    assert response.status_code == 202
    result = await result_once_finished(client, response.json()["job_id"])
    assert result == [{"a b": "3 2"}]


async def test_unicode_keys_and_values_round_trip(client: httpx.AsyncClient) -> None:
    body = {"job": {"input_data": [{"ключ": "значение", "🔑": "✓", "k": "\u2028"}]}}
    response = await client.post("/expand_reduce_flow/", json=body)
    result = await result_once_finished(client, response.json()["job_id"])
    assert result == [{"ключ 🔑": "значение ✓", "k": "\u2028"}]


@pytest.fixture
async def short_strings(database: FreshDatabase) -> AsyncIterator[httpx.AsyncClient]:
    settings = Settings(
        database_url=database.url,
        flow_processes=0,
        max_key_length=8,
        max_value_length=16,
    )
    async with serving(settings) as client:
        yield client


async def test_very_long_key_is_422(
    short_strings: httpx.AsyncClient, database: FreshDatabase
) -> None:
    body = {"job": {"input_data": [{"k" * 9: "v"}]}}
    response = await short_strings.post("/expand_reduce_flow/", json=body)
    assert response.status_code == 422
    [error] = response.json()["detail"]
    assert error["type"] == "key_too_long"
    assert "at most 8 characters" in error["msg"]
    assert database.count_jobs() == 0


async def test_very_long_value_is_422(
    short_strings: httpx.AsyncClient, database: FreshDatabase
) -> None:
    body = {"job": {"input_data": [{"k": "v" * 17}]}}
    response = await short_strings.post("/expand_reduce_flow/", json=body)
    assert response.status_code == 422
    [error] = response.json()["detail"]
    assert error["loc"] == ["body", "job", "input_data", 0, "k"]
    assert "at most 16 characters" in error["msg"]
    assert database.count_jobs() == 0


async def test_strings_at_the_limits_are_accepted(short_strings: httpx.AsyncClient) -> None:
    body = {"job": {"input_data": [{"k" * 8: "v" * 16}]}}
    response = await short_strings.post("/expand_reduce_flow/", json=body)
    assert response.status_code == 202


async def test_huge_job_id_is_404(client: httpx.AsyncClient) -> None:
    response = await client.get("/check_status/" + "9" * 60_000)
    assert response.status_code == 404
