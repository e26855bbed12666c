"""What the OpenAPI document says of the routes' answers, kept apart so the routes stay short."""

from typing import Any

from app.schemas import (
    EXAMPLE_JOB_ID,
    EXAMPLE_TIME,
    ErrorResponse,
    ResultResponse,
    StatusResponse,
    ValidationErrorResponse,
)

Docs = dict[int | str, dict[str, Any]]


def error_doc(description: str, detail: Any) -> dict[str, Any]:
    """An error answer: ``{"detail": ...}`` with an example."""
    return {
        "description": description,
        "model": ErrorResponse,
        "content": {"application/json": {"example": {"detail": detail}}},
    }


def validation_doc(description: str, example: dict[str, Any]) -> dict[str, Any]:
    """A 422: FastAPI's ``{"detail": [{"type", "loc", "msg"}]}`` with an example."""
    return {
        "description": description,
        "model": ValidationErrorResponse,
        "content": {"application/json": {"example": {"detail": [example]}}},
    }


RETRY_AFTER = {"Retry-After": {"description": "Seconds to wait before retrying"}}
NOT_FOUND_DOC = error_doc(
    "No job has this id (for this API key), or it finished longer than "
    "JOB_RETENTION_SECONDS ago and was purged",
    f"Job {EXAMPLE_JOB_ID} not found or expired",
)
UNAVAILABLE_DOC = error_doc(
    "The database cannot take the request now, or the service is shutting down; "
    "retry after Retry-After seconds",
    "The job store is unavailable (the database is busy); retry shortly",
) | {"headers": RETRY_AFTER}
# The 401 as it goes into the OpenAPI document directly (added there only when keys are on).
UNAUTHORIZED_DOC_SCHEMA = {
    "description": "API keys are on and the request has no valid Authorization: Bearer <key>",
    "headers": {"WWW-Authenticate": {"schema": {"type": "string"}, "description": "Bearer"}},
    "content": {
        "application/json": {
            "schema": {"$ref": "#/components/schemas/ErrorResponse"},
            "example": {"detail": "The API key is not valid"},
        }
    },
}

SUBMIT_DOCS: Docs = {
    202: {
        "description": "Accepted and stored (or, with a repeated Idempotency-Key and the same "
        "body, the job it first made); Location points at its status",
        "headers": {
            "Location": {"description": "/check_status/{job_id}"},
            "Idempotent-Replayed": {
                "description": "true when this answers a repeated submission with the job "
                "it first made"
            },
        },
        "links": {
            name: {
                "operationRef": operation,
                "parameters": {"job_id": "$response.body#/job_id"},
                "description": description,
            }
            for name, operation, description in (
                ("CheckStatus", "#/paths/~1check_status~1{job_id}/get", "Its status"),
                ("JobResult", "#/paths/~1job_result~1{job_id}/get", "Its result"),
                ("CancelJob", "#/paths/~1jobs~1{job_id}~1cancel/post", "Cancel it"),
                ("DeleteJob", "#/paths/~1jobs~1{job_id}/delete", "Delete it once finished"),
            )
        },
    },
    400: error_doc(
        "The body is not JSON (or, sent gzipped, not valid gzip), or the Idempotency-Key "
        "header is malformed",
        "Request body is not valid JSON: unexpected end of data: line 1 column 9 (char 8)",
    ),
    408: error_doc(
        "The body did not arrive within BODY_TIMEOUT_SECONDS; the connection is closed",
        "The request body did not arrive within 30 s",
    ),
    413: error_doc(
        "The body (a gzipped one: once decompressed) is larger than MAX_BODY_BYTES",
        "Request body exceeds 16777216 bytes",
    ),
    415: error_doc(
        "The body is not sent as JSON, or is compressed otherwise than with gzip",
        "Content-Type must be application/json, not text/plain",
    )
    | {"headers": {"Accept-Encoding": {"description": "gzip: the one encoding accepted"}}},
    422: validation_doc(
        "The body is JSON but not a valid job (each error names its place), or its "
        "Idempotency-Key was used before with a different body",
        {
            "type": "scalar_type",
            "loc": ["body", "job", "input_data", 0, "key1"],
            "msg": "Value should be a string, number, boolean or null, not an object",
        },
    ),
    429: error_doc(
        "MAX_QUEUED_JOBS jobs are unfinished: nothing was stored; retry after Retry-After seconds",
        "10000 jobs are unfinished; retry later",
    )
    | {"headers": RETRY_AFTER},
    503: UNAVAILABLE_DOC,
}

STATUS_EXAMPLE: dict[str, Any] = dict(
    StatusResponse.model_config["json_schema_extra"]["example"]  # type: ignore[index, arg-type]
)
STATUS_DOCS: Docs = {
    200: {
        "description": "Where the job is; while processing, how far its run has got",
        "content": {
            "application/json": {
                "examples": {
                    "processing": {
                        "value": STATUS_EXAMPLE
                        | {"progress": {"done_items": 3000, "total_items": 20000}}
                    },
                    "completed": {"value": STATUS_EXAMPLE | {"status": "completed"}},
                }
            }
        },
    },
    404: NOT_FOUND_DOC,
    422: validation_doc(
        "wait is not a number of seconds from 0 to 30",
        {
            "type": "less_than_equal",
            "loc": ["query", "wait"],
            "msg": "Input should be less than or equal to 30",
        },
    ),
    503: UNAVAILABLE_DOC,
}
WAIT_PARAMETER = {
    "name": "wait",
    "in": "query",
    "required": False,
    "description": "Seconds (0 to 30) to wait for the job to leave processing before "
    "answering; the answer comes as soon as it does",
    "schema": {"type": "number", "minimum": 0, "maximum": 30, "default": 0},
}

RESULT_DOCS: Docs = {
    200: {
        "description": "The job has finished: its result, or its error if it failed. A "
        "result of 64 KiB or more comes gzipped to a client whose Accept-Encoding allows it",
        "headers": {
            "Content-Encoding": {"description": "gzip, for a large result the client accepts"}
        },
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
}

LIST_DOCS: Docs = {
    400: error_doc(
        "page_token is not one this service gave out", "page_token is not a valid page token"
    ),
    422: validation_doc(
        "status is not a job status, or limit is not from 1 to 1000",
        {
            "type": "less_than_equal",
            "loc": ["query", "limit"],
            "msg": "Input should be less than or equal to 1000",
        },
    ),
    503: UNAVAILABLE_DOC,
}

CANCELLED_EXAMPLE = {
    "job_id": EXAMPLE_JOB_ID,
    "status": "failed",
    "created_at": EXAMPLE_TIME,
    "updated_at": EXAMPLE_TIME,
}
CANCEL_DOCS: Docs = {
    202: {
        "description": "The job was processing: it has failed now, with the error "
        '"cancelled at the client\'s request"; a run of it still going stops at its next '
        "thousand objects, and its result is discarded",
        "content": {"application/json": {"example": CANCELLED_EXAMPLE}},
    },
    404: NOT_FOUND_DOC,
    409: error_doc(
        "The job has finished already: nothing was changed",
        f"Job {EXAMPLE_JOB_ID} has already finished (completed); there is nothing to cancel",
    ),
    503: UNAVAILABLE_DOC,
}

DELETE_DOCS: Docs = {
    204: {"description": "The job, its input and its result are gone"},
    404: NOT_FOUND_DOC,
    409: error_doc(
        "The job is still processing: nothing was deleted (cancel it first)",
        f"Job {EXAMPLE_JOB_ID} is still processing; cancel it first",
    ),
    503: UNAVAILABLE_DOC,
}
