"""The HTTP routes: thin — check the request, call the store or the runner, shape the answer."""

import logging
import re
import uuid
from dataclasses import dataclass
from functools import partial
from typing import Any, NoReturn

import orjson
from fastapi import APIRouter, BackgroundTasks, HTTPException, Request, Response
from fastapi.responses import JSONResponse, RedirectResponse

from app.config import Settings
from app.jobs import JobStatus
from app.runner import JobRunner
from app.schemas import (
    EXAMPLE_JOB_ID,
    ErrorResponse,
    InvalidJobRequestError,
    InvalidJSONError,
    ResultResponse,
    StatusResponse,
    SubmitResponse,
    ValidationErrorResponse,
    parse_job_request,
)
from app.store import JobRecord, JobStore
from app.workers import CpuWorkers

logger = logging.getLogger(__name__)

SUBMIT_PATH = "/expand_reduce_flow/"
UUID_PATTERN = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}", re.I)
# Bodies below this are parsed on the event loop: that takes less time than handing them over.
INLINE_PARSE_MAX_BYTES = 64 * 1024


@dataclass(frozen=True, slots=True)
class Services:
    """What the routes use, built once when the app starts."""

    settings: Settings
    store: JobStore
    runner: JobRunner
    workers: CpuWorkers


def services_of(request: Request) -> Services:
    """The app's services.

    Taken from the request rather than declared as a FastAPI dependency: resolving
    dependencies (and BackgroundTasks, one of them) was a tenth of a small submission's cost.
    """
    services: Services = request.app.state.services
    return services


def _error_doc(description: str, detail: Any) -> dict[str, Any]:
    return {
        "description": description,
        "model": ErrorResponse,
        "content": {"application/json": {"example": {"detail": detail}}},
    }


NOT_FOUND_DOC = _error_doc("No job has this id", f"Job {EXAMPLE_JOB_ID} not found")
UNAVAILABLE_DOC = _error_doc(
    "The database cannot take the request now, or the service is shutting down; "
    "retry after Retry-After seconds",
    "The job store is unavailable (the database is busy); retry shortly",
)
UNAVAILABLE_DOC["headers"] = {"Retry-After": {"description": "Seconds to wait before retrying"}}
SUBMIT_ERROR_DOCS: dict[int | str, dict[str, Any]] = {
    400: _error_doc(
        "The body is not JSON",
        "Request body is not valid JSON: unexpected end of data: line 1 column 9 (char 8)",
    ),
    413: _error_doc(
        "The body is larger than MAX_BODY_BYTES", "Request body exceeds 16777216 bytes"
    ),
    415: _error_doc("The body is not sent as JSON", "Content-Type must be application/json"),
    422: {
        "description": "The body is JSON but not a valid job; each error names its place",
        "model": ValidationErrorResponse,
        "content": {
            "application/json": {
                "example": {
                    "detail": [
                        {
                            "type": "scalar_type",
                            "loc": ["body", "job", "input_data", 0, "key1"],
                            "msg": "Value should be a string, number, boolean or null, "
                            "not an object",
                        }
                    ]
                }
            }
        },
    },
    503: UNAVAILABLE_DOC,
}

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
    responses={
        202: {
            "description": "Accepted and stored; Location points at its status",
            "headers": {"Location": {"description": "/check_status/{job_id}"}},
        },
        **SUBMIT_ERROR_DOCS,
    },
)
async def submit_job(request: Request) -> Response:
    """Store a job and start ExpandReduceFlow on it; answer only once the job is committed."""
    services = services_of(request)
    settings, runner = services.settings, services.runner
    _require_accepting(runner)
    _require_json_content_type(request)
    body = await _read_body(request, settings.max_body_bytes)
    try:
        if len(body) < INLINE_PARSE_MAX_BYTES:
            input_json = parse_job_request(body, settings.limits)
        else:
            parse = partial(parse_job_request, limits=settings.limits)
            input_json = await services.workers.run(parse, body)
    except InvalidJSONError as error:
        raise HTTPException(400, str(error)) from None
    except InvalidJobRequestError as error:
        return JSONResponse({"detail": error.errors}, status_code=422)
    del body  # megabytes for a large job; not needed while the job is stored and run
    _require_accepting(runner)  # shutdown may have begun while the body was read
    job_id = str(uuid.uuid4())
    accepted = await runner.accept(job_id, input_json)
    # As the seed describes: once answered, a background task runs run_expand_reduce_flow.
    # Built here rather than declared as a dependency, which would cost a tenth of a request.
    background = BackgroundTasks()
    background.add_task(runner.run_expand_reduce_flow, accepted)
    return Response(
        orjson.dumps({"job_id": job_id}),
        status_code=202,
        headers={"Location": f"/check_status/{job_id}"},
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
    responses={404: NOT_FOUND_DOC, 503: UNAVAILABLE_DOC},
)
async def check_status(job_id: str, request: Request) -> Response:
    """Say whether the job is processing, completed or failed."""
    job = await _find_job(services_of(request).store, job_id)
    # The hottest route: serialised straight from the stored fields, which already have the
    # StatusResponse shape, rather than validated into a model and serialised from it.
    status = {
        "job_id": job.job_id,
        "status": job.status.value,
        "created_at": job.created_at,
        "updated_at": job.updated_at,
    }
    return Response(orjson.dumps(status), media_type="application/json")


@router.get(
    "/job_result/{job_id}",
    response_model=ResultResponse,
    summary="Retrieve a job's result",
    responses={
        200: {
            "description": "The job has finished: its result, or its error if it failed",
            "content": {
                "application/json": {
                    "examples": {
                        "completed": {
                            "value": ResultResponse.model_config["json_schema_extra"]["example"]  # type: ignore[index]
                        },
                        "failed": {
                            "value": {
                                "job_id": EXAMPLE_JOB_ID,
                                "status": "failed",
                                "result": None,
                                "error": "ExpandReduceFlow failed: input_data[0]: output key "
                                "'a x' would be written twice; merging would silently "
                                "overwrite a value",
                            }
                        },
                    }
                }
            },
        },
        202: {
            "description": "Still processing; retry after Retry-After seconds",
            "model": ResultResponse,
            "headers": {"Retry-After": {"description": "Seconds to wait before asking again"}},
            "content": {
                "application/json": {
                    "example": {
                        "job_id": EXAMPLE_JOB_ID,
                        "status": "processing",
                        "result": None,
                        "error": None,
                    }
                }
            },
        },
        404: NOT_FOUND_DOC,
        503: UNAVAILABLE_DOC,
    },
)
async def job_result(job_id: str, request: Request) -> Response:
    """Return the result of a completed job, the error of a failed one, or 202 meanwhile."""
    services = services_of(request)
    job = await _find_job(services.store, job_id, with_output=True)
    if job.status is JobStatus.COMPLETED and job.output_data is not None:
        # The stored result is already JSON: splice it in rather than parse and re-serialise it.
        head = f'{{"job_id":"{job.job_id}","status":"completed","result":'
        body = b"".join((head.encode(), job.output_data.encode(), b',"error":null}'))
        return Response(body, media_type="application/json")
    content = ResultResponse(job_id=job.job_id, status=job.status, result=None, error=job.error)
    if job.status is JobStatus.PROCESSING:
        retry_after = str(services.settings.result_retry_after_seconds)
        return JSONResponse(
            content.model_dump(), status_code=202, headers={"Retry-After": retry_after}
        )
    return JSONResponse(content.model_dump())


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


async def _read_body(request: Request, limit: int) -> bytes:
    """Read the body, refusing with 413 as soon as it is known to exceed ``limit`` bytes."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        _too_large(limit)
    body = bytearray()  # grown in place: no list of chunks alive beside their join
    async for chunk in request.stream():
        if len(body) + len(chunk) > limit:
            _too_large(limit)
        body += chunk
    return bytes(body)


def _too_large(limit: int) -> NoReturn:
    raise HTTPException(413, f"Request body exceeds {limit} bytes")


async def _find_job(store: JobStore, job_id: str, *, with_output: bool = False) -> JobRecord:
    if len(job_id) != 36 or not UUID_PATTERN.fullmatch(job_id):
        raise HTTPException(404, "Job not found: a job_id is a UUID like " + EXAMPLE_JOB_ID)
    job = await store.get_job(job_id.lower(), with_output=with_output)
    if job is None:
        raise HTTPException(404, f"Job {job_id} not found")
    return job
