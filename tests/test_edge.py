"""The HTTP edge in-process: encodings both ways, slow bodies, trailing slashes, 405s, the docs.

What only a real server shows (header limits, HEAD without a body, slow heads, closed
connections) is in ``test_edge_e2e.py``.
"""

import asyncio
import gzip
import zlib
from collections.abc import AsyncIterator
from typing import Any

import httpx
import orjson
import pytest
from fastapi import HTTPException, Request

from app.api import GZIP_MIN_BYTES, _accepts_gzip, _read_body
from app.config import Settings
from app.protocol import ARRIVAL_DEADLINE
from tests.support import FreshDatabase, big_job, result_once_finished, serving, wait_finished

JOB = {"job": {"input_data": [{"1": "2", "3": "4", "5": "6", "7": "8"}, {"key1": "value1"}]}}
RESULT = [{"1 5": "2 6", "3 7": "4 8"}, {"key1": "value1"}]
JSON = {"content-type": "application/json"}


async def submit(client: httpx.AsyncClient, body: bytes, **headers: str) -> httpx.Response:
    return await client.post("/expand_reduce_flow/", content=body, headers=JSON | headers)


# Compressed submissions.


async def test_a_gzipped_submission_is_run_like_the_same_body_sent_plain(
    client: httpx.AsyncClient,
) -> None:
    response = await submit(
        client, gzip.compress(orjson.dumps(JOB)), **{"content-encoding": "gzip"}
    )
    assert response.status_code == 202
    assert await result_once_finished(client, response.json()["job_id"]) == RESULT


async def test_an_idempotency_key_replays_across_plain_and_gzipped_bodies(
    client: httpx.AsyncClient, database: FreshDatabase
) -> None:
    plain = await submit(client, orjson.dumps(JOB), **{"idempotency-key": "k1"})
    gzipped = gzip.compress(orjson.dumps(JOB))
    again = await submit(client, gzipped, **{"idempotency-key": "k1", "content-encoding": "x-gzip"})
    assert plain.status_code == again.status_code == 202
    assert again.json()["job_id"] == plain.json()["job_id"]
    assert again.headers["idempotent-replayed"] == "true"
    assert database.count_jobs() == 1


async def test_a_gzip_bomb_is_refused_with_413_after_max_body_bytes_and_nothing_is_stored(
    database: FreshDatabase,
) -> None:
    limit = 1024 * 1024
    # 1 GiB of zeros, about 1 MB gzipped: under the limit on the wire, a thousand times over
    # it inflated.
    inflate_to = 1024 * limit
    packer = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    zeros = bytes(limit)
    bomb = b"".join(packer.compress(zeros) for _ in range(inflate_to // limit)) + packer.flush()
    assert len(bomb) < limit
    settings = Settings(database_url=database.url, flow_processes=0, max_body_bytes=limit)
    async with serving(settings) as client:
        response = await submit(client, bomb, **{"content-encoding": "gzip"})
    assert response.status_code == 413
    assert response.json()["detail"] == f"Request body exceeds {limit} bytes once decompressed"
    assert database.count_jobs() == 0


@pytest.mark.parametrize(
    ("body", "problem"),
    [
        (orjson.dumps(JOB), "incorrect header check"),  # sent plain, said to be gzipped
        (gzip.compress(orjson.dumps(JOB))[:-12], "it ends part-way through"),  # cut short
        (gzip.compress(orjson.dumps(JOB)) + b"trailing", "incorrect header check"),
        (b"", "it ends part-way through"),
    ],
    ids=["not-gzip", "truncated", "trailing-bytes", "empty"],
)
async def test_a_body_that_is_not_valid_gzip_is_400_saying_so(
    client: httpx.AsyncClient, database: FreshDatabase, body: bytes, problem: str
) -> None:
    response = await submit(client, body, **{"content-encoding": "gzip"})
    assert response.status_code == 400
    detail = response.json()["detail"]
    assert detail.startswith("The body is not valid gzip data")
    assert problem in detail
    assert database.count_jobs() == 0


async def test_a_gzip_body_of_several_members_is_read_whole(client: httpx.AsyncClient) -> None:
    # As pigz, bgzip or `cat a.gz b.gz` make them: members one after another (RFC 1952).
    body = orjson.dumps(JOB)
    members = b"".join(gzip.compress(part) for part in (body[:10], body[10:40], body[40:]))
    response = await submit(client, members, **{"content-encoding": "gzip"})
    assert response.status_code == 202, response.text
    assert await result_once_finished(client, response.json()["job_id"]) == RESULT


async def test_a_gzip_body_of_too_many_members_is_400(
    client: httpx.AsyncClient, database: FreshDatabase
) -> None:
    empty = gzip.compress(b"")
    response = await submit(client, empty * 1_001, **{"content-encoding": "gzip"})
    assert response.status_code == 400
    assert "more than 1000 gzip members" in response.json()["detail"]
    assert database.count_jobs() == 0


async def test_a_body_gets_only_what_is_left_of_the_requests_time() -> None:
    """The deadline the HTTP protocol puts in the scope wins over a fresh BODY_TIMEOUT."""
    loop = asyncio.get_running_loop()
    scope = {
        "type": "http",
        "method": "POST",
        "headers": [],
        "extensions": {ARRIVAL_DEADLINE: {"at": loop.time() + 0.05}},
    }

    async def never() -> dict[str, Any]:
        await asyncio.Event().wait()
        raise AssertionError("unreachable")

    with pytest.raises(HTTPException) as refused:
        await asyncio.wait_for(_read_body(Request(scope, never), 1000, 30, gzipped=False), 5)
    assert refused.value.status_code == 408


@pytest.mark.parametrize("encoding", ["br", "deflate", "zstd", "gzip, gzip"])
async def test_another_content_encoding_is_415_naming_the_one_accepted(
    client: httpx.AsyncClient, database: FreshDatabase, encoding: str
) -> None:
    response = await submit(client, orjson.dumps(JOB), **{"content-encoding": encoding})
    assert response.status_code == 415
    assert response.headers["accept-encoding"] == "gzip"
    assert response.json()["detail"] == (
        f"Content-Encoding {encoding} is not supported: send the body as it is, or gzip it "
        "(Content-Encoding: gzip)"
    )
    assert database.count_jobs() == 0


async def test_identity_content_encoding_is_the_body_as_it_is(client: httpx.AsyncClient) -> None:
    response = await submit(client, orjson.dumps(JOB), **{"content-encoding": "identity"})
    assert response.status_code == 202


# Compressed results.


async def large_result_job(client: httpx.AsyncClient) -> str:
    """A completed job whose result is well over GZIP_MIN_BYTES."""
    body = {"job": {"input_data": big_job(1, items=2000)}}
    response = await client.post("/expand_reduce_flow/", json=body)
    assert response.status_code == 202
    job_id: str = response.json()["job_id"]
    assert await wait_finished(client, job_id) == "completed"
    return job_id


async def test_a_large_result_is_gzipped_for_a_client_that_accepts_it(
    client: httpx.AsyncClient,
) -> None:
    job_id = await large_result_job(client)
    plain = await client.get(f"/job_result/{job_id}", headers={"accept-encoding": "identity"})
    assert "content-encoding" not in plain.headers
    assert len(plain.content) > GZIP_MIN_BYTES
    zipped = await client.get(f"/job_result/{job_id}", headers={"accept-encoding": "gzip, br"})
    assert zipped.headers["content-encoding"] == "gzip"
    assert zipped.headers["vary"] == plain.headers["vary"] == "Accept-Encoding"
    # httpx inflates it; what came over the wire was much smaller.
    assert zipped.content == plain.content
    assert int(zipped.headers["content-length"]) < len(plain.content) / 4
    assert orjson.loads(zipped.content)["status"] == "completed"


@pytest.mark.parametrize("accept", ["identity", "gzip;q=0", "br", "*;q=0", ""])
async def test_a_large_result_comes_plain_when_gzip_is_not_accepted(
    client: httpx.AsyncClient, accept: str
) -> None:
    job_id = await large_result_job(client)
    response = await client.get(f"/job_result/{job_id}", headers={"accept-encoding": accept})
    assert "content-encoding" not in response.headers
    assert orjson.loads(response.content)["status"] == "completed"


async def test_a_small_result_is_never_compressed(client: httpx.AsyncClient) -> None:
    job_id = (await submit(client, orjson.dumps(JOB))).json()["job_id"]
    await wait_finished(client, job_id)
    response = await client.get(f"/job_result/{job_id}", headers={"accept-encoding": "gzip"})
    assert "content-encoding" not in response.headers
    assert response.json()["result"] == RESULT


@pytest.mark.parametrize(
    ("header", "accepted"),
    [
        ("gzip", True),
        ("GZIP", True),
        ("deflate, gzip;q=0.5", True),
        ("x-gzip", True),
        ("*", True),
        ("br, *;q=0.1", True),
        ("gzip;q=0, *", False),  # named beats the wildcard
        ("gzip;q=0", False),
        ("gzip;q=0.0", False),
        ("gzip;q=nonsense", False),
        ("identity", False),
        ("*;q=0", False),
        ("", False),
    ],
)
def test_accept_encoding_is_read_with_its_quality_values(header: str, accepted: bool) -> None:
    assert _accepts_gzip(header) is accepted


# Slow bodies.


async def test_a_body_that_does_not_arrive_in_time_is_408_and_nothing_is_stored(
    database: FreshDatabase,
) -> None:
    never = asyncio.Event()

    async def stalls() -> AsyncIterator[bytes]:
        yield b'{"job": {"input_data": [{"a": '
        await never.wait()

    settings = Settings(database_url=database.url, flow_processes=0, body_timeout_seconds=0.2)
    async with serving(settings) as client:
        response = await client.post("/expand_reduce_flow/", content=stalls(), headers=JSON)
    assert response.status_code == 408
    assert response.json()["detail"] == "The request body did not arrive within 0.2 s"
    assert database.count_jobs() == 0


# Paths with a trailing slash, and methods.


async def test_a_trailing_slash_is_answered_directly_not_redirected(
    client: httpx.AsyncClient,
) -> None:
    job_id = (await submit(client, orjson.dumps(JOB))).json()["job_id"]
    await wait_finished(client, job_id)
    for path in (f"/check_status/{job_id}", f"/job_result/{job_id}", "/jobs", "/healthz"):
        plain, slashed = await client.get(path), await client.get(f"{path}/")
        assert slashed.status_code == plain.status_code == 200, path
        assert slashed.json() == plain.json()
    deleted = await client.delete(f"/jobs/{job_id}/")
    assert deleted.status_code == 204
    assert (await client.get(f"/check_status/{job_id}/")).status_code == 404
    assert (await client.get("/nowhere/")).status_code == 404


async def test_a_trailing_slash_is_counted_under_the_routes_own_template(
    client: httpx.AsyncClient,
) -> None:
    job_id = (await submit(client, orjson.dumps(JOB))).json()["job_id"]
    for _ in range(3):
        await client.get(f"/check_status/{job_id}/")
    metrics = (await client.get("/metrics")).text
    line = 'route="/check_status/{job_id}",status="200"'
    counted = [row for row in metrics.splitlines() if line in row and "_total" in row]
    assert counted, metrics
    assert float(counted[0].rsplit(" ", 1)[1]) >= 3


async def test_a_405_allows_head_wherever_it_allows_get(client: httpx.AsyncClient) -> None:
    response = await client.post("/healthz")
    assert response.status_code == 405
    assert response.headers["allow"] == "GET, HEAD"
    submit_route = await client.get("/expand_reduce_flow/")
    assert submit_route.status_code == 405
    assert submit_route.headers["allow"] == "POST"


# The OpenAPI document.


async def test_the_docs_say_what_the_routes_answer(client: httpx.AsyncClient) -> None:
    schema = (await client.get("/openapi.json")).json()
    job_routes = [
        operation
        for operations in schema["paths"].values()
        for operation in operations.values()
        if any(p["name"] == "job_id" for p in operation.get("parameters", ()))
    ]
    assert len(job_routes) == 4
    for operation in job_routes:
        [job_id] = [p for p in operation["parameters"] if p["name"] == "job_id"]
        assert job_id["schema"] == {"type": "string", "format": "uuid"}
        assert job_id["example"]
    status = schema["paths"]["/check_status/{job_id}"]["get"]["responses"]["200"]
    assert status["description"] != "Successful Response"
    submit_docs = schema["paths"]["/expand_reduce_flow/"]["post"]["responses"]
    real = await client.post(
        "/expand_reduce_flow/", content=b"{}", headers={"content-type": "text/plain"}
    )
    example: dict[str, Any] = submit_docs["415"]["content"]["application/json"]["example"]
    assert example == real.json()
    slow = submit_docs["408"]["content"]["application/json"]["example"]["detail"]
    assert slow == "The request body did not arrive within 30 s"
