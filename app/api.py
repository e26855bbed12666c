"""The HTTP routes: thin — check the request, call the store or the runner, shape the answer."""

import asyncio
import base64
import binascii
import gzip
import hashlib
import logging
import re
import uuid
import zlib
from dataclasses import dataclass
from functools import partial
from typing import Annotated, Any, NoReturn

import orjson
from fastapi import APIRouter, BackgroundTasks, HTTPException, Query, Request, Response
from fastapi.responses import JSONResponse, RedirectResponse
from starlette.requests import ClientDisconnect

from app.api_docs import (
    CANCEL_DOCS,
    DELETE_DOCS,
    LIST_DOCS,
    RESULT_DOCS,
    STATUS_DOCS,
    SUBMIT_DOCS,
    UNAVAILABLE_DOC,
    WAIT_PARAMETER,
)
from app.auth import ApiKeys
from app.config import Settings
from app.jobs import JobStatus
from app.protocol import ARRIVAL_DEADLINE
from app.runner import JobRunner
from app.schemas import (
    EXAMPLE_JOB_ID,
    InvalidJobRequestError,
    InvalidJSONError,
    JobListResponse,
    ParsedJob,
    ResultResponse,
    StatusResponse,
    SubmitResponse,
    parse_job_request,
)
from app.store import (
    CancelResult,
    Cursor,
    DeleteResult,
    Idempotency,
    IdempotencyKeyReusedError,
    JobRecord,
    JobStore,
    JobSummary,
    QueueFullError,
    Replayed,
)
from app.waiters import StatusWaiters
from app.workers import CpuWorkers

logger = logging.getLogger(__name__)

SUBMIT_PATH = "/expand_reduce_flow/"
UUID_PATTERN = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}", re.I)
# Bodies below this are parsed on the event loop: that takes less time than handing them over.
INLINE_PARSE_MAX_BYTES = 64 * 1024
IDEMPOTENCY_KEY = re.compile(r"[\x20-\x7e]{1,255}")
# A page token holds the created_at and job_id of the last job on its page, as stored.
TIMESTAMP_PATTERN = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z", re.ASCII)
MAX_WAIT_SECONDS = 30.0
QUEUE_FULL_RETRY_AFTER = "2"
CLIENT_CLOSED_REQUEST = 499  # nginx's status for a client that left before the answer
# Submissions may come compressed with these (x-gzip is gzip's old name, RFC 9110).
GZIP_ENCODINGS = frozenset({"gzip", "x-gzip"})
# Results at least this large are gzipped for a client that accepts it: below it, compressing
# saves little on the wire and costs a thread hand-off. Level 1 (nginx's default) halves JSON
# for about 15 ms a megabyte; higher levels took two to three times as long for a tenth less.
GZIP_MIN_BYTES = 64 * 1024
GZIP_MAX_MEMBERS = 1_000  # in one submission (pigz and bgzip make one per 64 KiB-128 KiB)
GZIP_LEVEL = 1


@dataclass(frozen=True, slots=True)
class Services:
    """What the routes use, built once when the app starts."""

    settings: Settings
    store: JobStore
    runner: JobRunner
    workers: CpuWorkers
    keys: ApiKeys
    waiters: StatusWaiters


def services_of(request: Request) -> Services:
    """The app's services.

    Taken from the request rather than declared as a FastAPI dependency: resolving
    dependencies (and BackgroundTasks, one of them) was a tenth of a small submission's cost.
    """
    services: Services = request.app.state.services
    return services


router = APIRouter()


@router.get("/", include_in_schema=False)
async def root() -> RedirectResponse:
    """Send browsers to the interactive API documentation."""
    return RedirectResponse("/docs")


@router.post(
    SUBMIT_PATH,
    status_code=202,
    response_model=SubmitResponse,
    summary="Submit a job",
    responses=SUBMIT_DOCS,
    openapi_extra={
        "parameters": [
            {
                "name": "Idempotency-Key",
                "in": "header",
                "required": False,
                "description": "Up to 255 printable characters. Sent again with the same "
                "body (within JOB_RETENTION_SECONDS), the answer is the job it first made.",
                "schema": {
                    "type": "string",
                    "minLength": 1,
                    "maxLength": 255,
                    "pattern": "^[\\x20-\\x7e]+$",
                },
            }
        ]
    },
)
async def submit_job(request: Request) -> Response:
    """Store a job and start ExpandReduceFlow on it; answer only once the job is committed."""
    services = services_of(request)
    settings, runner = services.settings, services.runner
    tenant = services.keys.tenant_of(request)
    _require_accepting(runner)
    _require_json_content_type(request)
    gzipped = _gzipped(request)
    key = _idempotency_key(request)
    body = await _read_body(
        request, settings.max_body_bytes, settings.body_timeout_seconds, gzipped=gzipped
    )
    try:
        if len(body) < INLINE_PARSE_MAX_BYTES:
            parsed = parse_job_request(body, settings.limits)
        else:
            parse = partial(parse_job_request, limits=settings.limits)
            parsed = await services.workers.run(parse, body)
    except InvalidJSONError as error:
        raise HTTPException(400, str(error)) from None
    except InvalidJobRequestError as error:
        return JSONResponse({"detail": error.errors}, status_code=422)
    del body  # megabytes for a large job; not needed while the job is stored and run
    _require_accepting(runner)  # shutdown may have begun while the body was read
    idempotency = None if key is None else Idempotency(key, await _hash(services, parsed))
    try:
        accepted = await runner.accept(
            str(uuid.uuid4()),
            parsed.input_json,
            total_items=parsed.items,
            tenant=tenant,
            idempotency=idempotency,
        )
    except QueueFullError as error:
        raise HTTPException(
            429, str(error), headers={"Retry-After": QUEUE_FULL_RETRY_AFTER}
        ) from None
    except IdempotencyKeyReusedError as error:
        problem = {"type": "idempotency_key_reused", "loc": ["header", "Idempotency-Key"]}
        return JSONResponse({"detail": [problem | {"msg": str(error)}]}, status_code=422)
    if isinstance(accepted, Replayed):
        return _accepted(accepted.job_id, {"Idempotent-Replayed": "true"})
    # As the seed describes: once answered, a background task runs run_expand_reduce_flow.
    # Built here rather than declared as a dependency, which would cost a tenth of a request.
    background = BackgroundTasks()
    background.add_task(runner.run_expand_reduce_flow, accepted)
    return _accepted(accepted.claim.job_id, background=background)


def _accepted(
    job_id: str, headers: dict[str, str] | None = None, background: BackgroundTasks | None = None
) -> Response:
    return Response(
        orjson.dumps({"job_id": job_id}),
        status_code=202,
        headers={"Location": f"/check_status/{job_id}", **(headers or {})},
        media_type="application/json",
        background=background,
    )


# The same operation without the trailing slash, answered directly: curl does not follow the
# redirect Starlette would otherwise send.
router.add_api_route(
    SUBMIT_PATH.rstrip("/"), submit_job, methods=["POST"], status_code=202, include_in_schema=False
)


@router.get(
    "/check_status/{job_id}",
    response_model=StatusResponse,
    summary="Check a job's status",
    responses=STATUS_DOCS,
    openapi_extra={"parameters": [WAIT_PARAMETER]},
)
async def check_status(job_id: str, request: Request) -> Response:
    """Say whether the job is processing, completed or failed; ?wait=N waits up to N s."""
    services = services_of(request)
    tenant = services.keys.tenant_of(request)
    wait = _wait_seconds(request)
    job = await _find_job(services.store, job_id, tenant)
    if (
        wait
        and job.status is JobStatus.PROCESSING
        and await services.waiters.wait(job.job_id, wait)
    ):
        job = await _find_job(services.store, job_id, tenant)
    return Response(orjson.dumps(_status_of(job)), media_type="application/json")


def _status_of(job: JobRecord) -> dict[str, Any]:
    # The hottest route: serialised straight from the stored fields, which already have the
    # StatusResponse shape, rather than validated into a model and serialised from it.
    status = _summary_of(job)
    if job.progress is not None and job.status is JobStatus.PROCESSING:
        status["progress"] = {
            "done_items": job.progress.done_items,
            "total_items": job.progress.total_items,
        }
    return status


def _summary_of(job: JobRecord | JobSummary) -> dict[str, Any]:
    """The fields every job answer has, as stored."""
    return {
        "job_id": job.job_id,
        "status": job.status.value,
        "created_at": job.created_at,
        "updated_at": job.updated_at,
    }


@router.get(
    "/job_result/{job_id}",
    response_model=ResultResponse,
    summary="Retrieve a job's result",
    responses=RESULT_DOCS,
)
async def job_result(job_id: str, request: Request) -> Response:
    """Return the result of a completed job, the error of a failed one, or 202 meanwhile."""
    services = services_of(request)
    tenant = services.keys.tenant_of(request)
    job = await _find_job(services.store, job_id, tenant, with_output=True)
    if job.status is JobStatus.COMPLETED and job.output_data is not None:
        # The stored result is already JSON: splice it in rather than parse and re-serialise it.
        head = f'{{"job_id":"{job.job_id}","status":"completed","result":'
        body = b"".join((head.encode(), job.output_data.encode(), b',"error":null}'))
        if len(body) < GZIP_MIN_BYTES:
            return Response(body, media_type="application/json")
        headers = {"Vary": "Accept-Encoding"}
        if _accepts_gzip(request.headers.get("accept-encoding", "")):
            # zlib lets go of the GIL: a thread keeps the event loop answering meanwhile.
            body = await asyncio.to_thread(gzip.compress, body, GZIP_LEVEL, mtime=0)
            headers["Content-Encoding"] = "gzip"
        return Response(body, media_type="application/json", headers=headers)
    content = ResultResponse(job_id=job.job_id, status=job.status, result=None, error=job.error)
    if job.status is JobStatus.PROCESSING:
        retry_after = str(services.settings.result_retry_after_seconds)
        return JSONResponse(
            content.model_dump(), status_code=202, headers={"Retry-After": retry_after}
        )
    return JSONResponse(content.model_dump())


@router.get(
    "/jobs",
    response_model=JobListResponse,
    summary="List jobs, newest first",
    responses=LIST_DOCS,
)
async def list_jobs(
    request: Request,
    status: Annotated[JobStatus | None, Query(description="Only jobs with this status.")] = None,
    limit: Annotated[int, Query(ge=1, le=1000, description="Most jobs on the page.")] = 100,
    page_token: Annotated[
        str | None,
        Query(description="The next_page_token of the page before; none for the first page."),
    ] = None,
) -> Response:
    """The jobs (of this API key), newest first, a page at a time; never their payloads.

    Pages follow each other by keyset, so walking them while jobs are added neither repeats
    nor skips a job that existed when the walk began.
    """
    services = services_of(request)
    tenant = services.keys.tenant_of(request)
    after = None if page_token is None else _decode_page_token(page_token)
    found = await services.store.list_jobs(
        tenant=tenant, status=status, limit=limit + 1, after=after
    )
    page, more = found[:limit], len(found) > limit
    next_token = _encode_page_token((page[-1].created_at, page[-1].job_id)) if more else None
    jobs = [_summary_of(job) for job in page]
    return Response(
        orjson.dumps({"jobs": jobs, "next_page_token": next_token}),
        media_type="application/json",
    )


@router.post(
    "/jobs/{job_id}/cancel",
    status_code=202,
    response_model=StatusResponse,
    summary="Cancel a job",
    responses=CANCEL_DOCS,
)
async def cancel_job(job_id: str, request: Request) -> Response:
    """Stop a processing job: it fails at once with "cancelled at the client's request".

    A run of it still going stops at its next thousand objects; its result is discarded.
    """
    services = services_of(request)
    tenant = services.keys.tenant_of(request)
    job_id = _checked_job_id(job_id)
    result = await services.runner.cancel(job_id, tenant=tenant)
    job = await _find_job(services.store, job_id, tenant)
    if result is CancelResult.FINISHED:
        raise HTTPException(
            409,
            f"Job {job_id} has already finished ({job.status.value}); there is nothing to cancel",
        )
    return Response(orjson.dumps(_status_of(job)), status_code=202, media_type="application/json")


@router.delete(
    "/jobs/{job_id}",
    status_code=204,
    summary="Delete a finished job",
    responses=DELETE_DOCS,
)
async def delete_job(job_id: str, request: Request) -> Response:
    """Remove a finished job: its row, input and result. A processing one is kept (409)."""
    services = services_of(request)
    tenant = services.keys.tenant_of(request)
    job_id = _checked_job_id(job_id)
    result = await services.store.delete_job(job_id, tenant=tenant)
    if result is DeleteResult.NOT_FOUND:
        _not_found(job_id)
    if result is DeleteResult.PROCESSING:
        raise HTTPException(409, f"Job {job_id} is still processing; cancel it first")
    return Response(status_code=204)


@router.get("/healthz", summary="Liveness", responses={200: {"description": "The process answers"}})
async def healthz() -> dict[str, str]:
    """Answer as long as the process serves HTTP; never touches the database."""
    return {"status": "ok"}


@router.get(
    "/readyz",
    summary="Readiness",
    responses={200: {"description": "Ready for traffic"}, 503: UNAVAILABLE_DOC},
)
async def readyz(request: Request) -> dict[str, str]:
    """Answer 200 only while the database answers and the process is not shutting down."""
    services = services_of(request)
    _require_accepting(services.runner)
    await services.store.ping()
    return {"status": "ready"}


def _require_accepting(runner: JobRunner) -> None:
    if not runner.accepting:
        raise HTTPException(
            503, "The service is shutting down; retry shortly", headers={"Retry-After": "1"}
        )


def _require_json_content_type(request: Request) -> None:
    media_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media_type != "application/json" and not (
        media_type.startswith("application/") and media_type.endswith("+json")
    ):
        raise HTTPException(
            415, f"Content-Type must be application/json, not {media_type or 'missing'}"
        )


def _gzipped(request: Request) -> bool:
    """Whether the body is gzipped; 415 for any other encoding, naming those accepted."""
    encoding = request.headers.get("content-encoding", "").strip().lower()
    if encoding in ("", "identity"):
        return False
    if encoding in GZIP_ENCODINGS:
        return True
    raise HTTPException(
        415,
        f"Content-Encoding {encoding} is not supported: send the body as it is, or gzip it "
        "(Content-Encoding: gzip)",
        headers={"Accept-Encoding": "gzip"},
    )


async def _read_body(request: Request, limit: int, within: float, *, gzipped: bool) -> bytes:
    """Read the body, refusing with 413 as soon as it is known to exceed ``limit`` bytes.

    A gzipped body is inflated as it arrives, the inflated size counted against the limit,
    so a small body that inflates to gigabytes is refused after ``limit`` bytes of them. A
    body that has not arrived ``within`` seconds of the request's first byte (as the HTTP
    protocol tells; else of now) is answered 408.
    """
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        _too_large(limit)
    arrive_by = request.scope.get("extensions", {}).get(ARRIVAL_DEADLINE, {}).get("at")
    deadline = asyncio.get_running_loop().time() + within if arrive_by is None else arrive_by
    inflated = _Inflated() if gzipped else None
    body = bytearray()  # grown in place: no list of chunks alive beside their join
    received = 0
    try:
        async with asyncio.timeout_at(deadline):
            async for chunk in request.stream():
                received += len(chunk)
                if received > limit:
                    _too_large(limit)
                body += chunk if inflated is None else inflated.of(chunk, limit - len(body))
                if len(body) > limit:
                    _too_large(limit, decompressed=inflated is not None)
    except TimeoutError:
        # Not Connection: close, which would have uvicorn close at once, resetting a client
        # still sending; the HTTP protocol ends the connection once the answer is out.
        raise HTTPException(408, f"The request body did not arrive within {within:g} s") from None
    except ClientDisconnect:
        # Nobody is left to answer; 499 (nginx's "client closed request") is for the access
        # log and the metrics, so a client's timeout does not count as our error.
        raise HTTPException(CLIENT_CLOSED_REQUEST, "The client closed the request") from None
    except zlib.error as error:
        raise HTTPException(400, f"The body is not valid gzip data: {error}") from None
    if inflated is not None and not inflated.complete:
        raise HTTPException(400, "The body is not valid gzip data: it ends part-way through")
    return bytes(body)


class _Inflated:
    """Inflates a gzip body as it arrives: one member or several in a row (RFC 1952).

    At most ``GZIP_MAX_MEMBERS``: each costs a few microseconds on the event loop, and a body
    of nothing but empty members would otherwise keep it busy for seconds.
    """

    def __init__(self) -> None:
        self._member = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)
        self._members = 1
        self.complete = False  # the data so far ends where a member ends

    def of(self, chunk: bytes, room: int) -> bytes:
        """The inflated bytes of ``chunk``: at most one byte past ``room``, however many more."""
        out = bytearray()
        while chunk:
            out += self._member.decompress(chunk, max(room - len(out), 0) + 1)
            if len(out) > room:
                break  # over the limit (input may be left over): the caller refuses the body
            chunk = b""
            if self._member.eof:
                chunk = self._member.unused_data
                self._member = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)
                self.complete = not chunk
                self._members += bool(chunk)
                if self._members > GZIP_MAX_MEMBERS:
                    raise zlib.error(f"more than {GZIP_MAX_MEMBERS} gzip members")
            else:
                self.complete = False
        return bytes(out)


def _accepts_gzip(accept_encoding: str) -> bool:
    """Whether an ``Accept-Encoding`` value admits gzip (by name or ``*``, q above 0)."""
    named = star = None
    for part in accept_encoding.split(","):
        coding, *parameters = (item.strip() for item in part.split(";"))
        quality = 1.0
        for parameter in parameters:
            name, _, value = parameter.partition("=")
            if name.strip().lower() == "q":
                try:
                    quality = float(value)
                except ValueError:
                    quality = 0.0
        coding = coding.lower()
        if coding in GZIP_ENCODINGS:
            named = quality > 0 if named is None else named or quality > 0
        elif coding == "*":
            star = quality > 0
    return named if named is not None else bool(star)


def _too_large(limit: int, *, decompressed: bool = False) -> NoReturn:
    after = " once decompressed" if decompressed else ""
    raise HTTPException(413, f"Request body exceeds {limit} bytes{after}")


def _checked_job_id(job_id: str) -> str:
    """The id in its stored form (lower case); 404 for anything that is not a UUID."""
    if len(job_id) != 36 or not UUID_PATTERN.fullmatch(job_id):
        raise HTTPException(404, "Job not found: a job_id is a UUID like " + EXAMPLE_JOB_ID)
    return job_id.lower()


async def _find_job(
    store: JobStore, job_id: str, tenant: str, *, with_output: bool = False
) -> JobRecord:
    job_id = _checked_job_id(job_id)
    job = await store.get_job(job_id, with_output=with_output, tenant=tenant)
    if job is None:
        _not_found(job_id)
    return job


def _not_found(job_id: str) -> NoReturn:
    raise HTTPException(404, f"Job {job_id} not found or expired")


def _idempotency_key(request: Request) -> str | None:
    key = request.headers.get("idempotency-key")
    if key is not None:
        key = key.strip(" \t")  # not part of a header's value (httptools keeps it)
    if key is not None and not IDEMPOTENCY_KEY.fullmatch(key):
        raise HTTPException(400, "Idempotency-Key must be 1 to 255 printable ASCII characters")
    return key


async def _hash(services: Services, parsed: ParsedJob) -> str:
    """The request's hash, for its idempotency key: of the validated input.

    So the same job sent again with other spacing, say, is the same request.
    """
    if len(parsed.input_json) < INLINE_PARSE_MAX_BYTES:
        return _sha256(parsed.input_json)
    return await services.workers.run(_sha256, parsed.input_json)


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _wait_seconds(request: Request) -> float:
    """The ``wait`` query parameter: 0 to 30 seconds, 0 when absent.

    Read by hand rather than declared: FastAPI's parameter handling would cost the hottest
    route a tenth of its time. Errors have FastAPI's 422 shape all the same.
    """
    raw = request.query_params.get("wait")
    if raw is None:
        return 0.0
    try:
        seconds = float(raw)
    except ValueError:
        seconds = float("nan")
    if not 0 <= seconds <= MAX_WAIT_SECONDS:
        problem = {
            "type": "wait_range",
            "loc": ["query", "wait"],
            "msg": f"Input should be a number of seconds from 0 to {MAX_WAIT_SECONDS:g}",
        }
        raise HTTPException(422, [problem])
    return seconds


def _encode_page_token(cursor: Cursor) -> str:
    return base64.urlsafe_b64encode(orjson.dumps(list(cursor))).rstrip(b"=").decode()


def _decode_page_token(token: str) -> Cursor:
    try:
        decoded = orjson.loads(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
    except (binascii.Error, ValueError):
        decoded = None
    if (
        not isinstance(decoded, list)
        or len(decoded) != 2
        or not all(isinstance(part, str) for part in decoded)
        or not TIMESTAMP_PATTERN.fullmatch(decoded[0])
        or not UUID_PATTERN.fullmatch(decoded[1])
    ):
        raise HTTPException(400, "page_token is not a valid page token")
    return decoded[0], decoded[1]
