"""Request validation and the request/response models of the public API.

A submission can carry 100,000 objects, so it is not validated by building a pydantic model per
item: ``parse_job_request`` parses the body once and checks it in one pass, reporting
errors in FastAPI's ``{"detail": [{"loc", "msg", "type"}]}`` shape. ``job_request_schema`` is the
JSON Schema of exactly what that function accepts, for the OpenAPI document.
"""

import contextlib
import json
import math
from dataclasses import dataclass
from typing import Any, NoReturn

import orjson
from pydantic import BaseModel, ConfigDict, Field

from app.flow import items_json
from app.jobs import JobStatus

JSON_SCALAR_TYPES = (str, int, float, bool, type(None))
# The JSON parsers build exactly these types, so a set lookup per value can stand in for isinstance.
_SCALAR_TYPE_SET = frozenset(JSON_SCALAR_TYPES)
_is_str = str.__instancecheck__
NO_NUL = "^[^\\u0000]*$"
MAX_REPORTED_ERRORS = 20
# Bodies from this size on are parsed by the standard library's parser, for its lower peak.
STDLIB_PARSE_MIN_BYTES = 64 * 1024


@dataclass(frozen=True)
class RequestLimits:
    """The bounds a submission must stay within."""

    max_items: int
    max_keys_per_item: int
    max_key_length: int
    max_value_length: int


class InvalidJSONError(ValueError):
    """The request body is not JSON at all."""


class InvalidJobRequestError(ValueError):
    """The body is JSON but not a valid job; ``errors`` are FastAPI-shaped entries."""

    def __init__(self, errors: list[dict[str, Any]]) -> None:
        super().__init__(errors)
        self.errors = errors


@dataclass(frozen=True, slots=True)
class ParsedJob:
    """A valid submission: its ``input_data`` as JSON text, one object a line, and their count."""

    input_json: str
    items: int


def parse_job_request(body: bytes, limits: RequestLimits) -> ParsedJob:
    """Validate a submission body; return its ``input_data`` as JSON text, one object a line.

    Raises InvalidJSONError for a body that does not parse and InvalidJobRequestError, naming
    every offending place (up to a bound), for one that parses but is not a valid job.
    """
    document = parse_json(body)
    # NUL can only reach a parsed string through the escape \u0000, so most bodies skip the
    # per-string search. (NUL is refused because it breaks C strings and PostgreSQL text.)
    input_data = _checked_input_data(document, limits, check_nul=b"\\u0000" in body)
    return ParsedJob(items_json(input_data), len(input_data))


def parse_json(body: bytes) -> Any:
    """Parse a request body as orjson does; raise InvalidJSONError if orjson refuses it.

    orjson's parser peaks at about sixteen times the body's size (112 MB for a 7 MB body,
    measured), the standard library's at about five (37 MB), for 30% more time. So a large
    body is first given to the standard parser, with hooks that make it refuse or convert
    whatever orjson would refuse or build differently; whatever it refuses goes to orjson,
    whose verdict and message stand. The tests compare the two on the odd cases.
    """
    if len(body) >= STDLIB_PARSE_MIN_BYTES and not _may_hold_a_lone_surrogate(body):
        with contextlib.suppress(ValueError, RecursionError):  # UnicodeError is a ValueError
            return json.loads(
                body.decode("utf-8"),
                parse_int=_int_as_orjson_parses_it,
                parse_float=_finite_float,
                parse_constant=_refuse_constant,
            )
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as error:
        raise InvalidJSONError(f"Request body is not valid JSON: {error}") from None


def _may_hold_a_lone_surrogate(body: bytes) -> bool:
    # The standard parser accepts an unpaired \uD800-\uDFFF escape, orjson refuses it. Such
    # an escape is rare enough that a body with anything like one goes to orjson.
    return b"\\ud" in body or b"\\uD" in body


def _int_as_orjson_parses_it(text: str) -> int | float:
    number = int(text)
    return number if -(2**63) <= number < 2**64 else float(text)


def _finite_float(text: str) -> float:
    number = float(text)
    if math.isinf(number):
        raise ValueError(f"number {text[:40]} is out of range")
    return number


def _refuse_constant(text: str) -> NoReturn:
    raise ValueError(f"{text} is not JSON")


def _error(loc: tuple[str | int, ...], msg: str, kind: str) -> dict[str, Any]:
    return {"type": kind, "loc": ["body", *loc], "msg": msg}


def _checked_input_data(
    document: Any, limits: RequestLimits, check_nul: bool
) -> list[dict[str, Any]]:
    job = _checked_object(document, (), "job")
    input_data = _checked_object(job, ("job",), "input_data")
    loc = ("job", "input_data")
    if not isinstance(input_data, list):
        msg = f"Input should be a non-empty array of objects, not {_json_type(input_data)}"
        raise InvalidJobRequestError([_error(loc, msg, "list_type")])
    if not input_data:
        raise InvalidJobRequestError(
            [_error(loc, "Array should have at least 1 item", "too_short")]
        )
    if len(input_data) > limits.max_items:
        msg = f"Array should have at most {limits.max_items} items, not {len(input_data)}"
        raise InvalidJobRequestError([_error(loc, msg, "too_long")])
    errors = _item_errors(input_data, limits, check_nul)
    if errors:
        raise InvalidJobRequestError(errors)
    return input_data


def _checked_object(parent: Any, loc: tuple[str, ...], field: str) -> Any:
    """Check that ``parent`` is an object holding exactly ``field``; return that field's value."""
    if not isinstance(parent, dict):
        msg = f"Input should be an object with a '{field}' field, not {_json_type(parent)}"
        raise InvalidJobRequestError([_error(loc, msg, "dict_type")])
    errors = [
        _error((*loc, key), "Extra inputs are not permitted", "extra_forbidden")
        for key in parent
        if key != field
    ]
    if field not in parent:
        errors.insert(0, _error((*loc, field), "Field required", "missing"))
    if errors:
        raise InvalidJobRequestError(errors[:MAX_REPORTED_ERRORS])
    return parent[field]


def _item_errors(items: list[Any], limits: RequestLimits, check_nul: bool) -> list[dict[str, Any]]:
    errors: list[dict[str, Any]] = []
    for index, item in enumerate(items):
        loc: tuple[str | int, ...] = ("job", "input_data", index)
        if not isinstance(item, dict):
            msg = f"Input should be an object, not {_json_type(item)}"
            errors.append(_error(loc, msg, "dict_type"))
        elif len(item) > limits.max_keys_per_item:
            msg = f"Object should have at most {limits.max_keys_per_item} keys, not {len(item)}"
            errors.append(_error(loc, msg, "too_long"))
        elif not _is_valid_object(item, limits, check_nul):
            errors.extend(_object_errors(item, loc, limits, check_nul))
        if len(errors) >= MAX_REPORTED_ERRORS:
            return errors[:MAX_REPORTED_ERRORS]
    return errors


def _is_valid_object(item: dict[str, Any], limits: RequestLimits, check_nul: bool) -> bool:
    """The fast path, run on every object: no error messages, no Python-level loop per value."""
    values = item.values()
    if not item:
        return True
    if not _SCALAR_TYPE_SET.issuperset(map(type, values)):
        return False
    if max(map(len, item)) > limits.max_key_length:
        return False
    if max(map(len, filter(_is_str, values)), default=0) > limits.max_value_length:
        return False
    return not (check_nul and any("\x00" in text for text in (*item, *filter(_is_str, values))))


def _object_errors(
    item: dict[str, Any], loc: tuple[str | int, ...], limits: RequestLimits, check_nul: bool
) -> list[dict[str, Any]]:
    """The slow path, for an object known to be invalid: say what is wrong with each key."""
    errors = []
    for key, value in item.items():
        key_loc = (*loc, key[:100])
        if len(key) > limits.max_key_length:
            msg = f"Key should have at most {limits.max_key_length} characters, not {len(key)}"
            errors.append(_error(key_loc, msg, "key_too_long"))
        if not isinstance(value, JSON_SCALAR_TYPES):
            msg = f"Value should be a string, number, boolean or null, not {_json_type(value)}"
            errors.append(_error(key_loc, msg, "scalar_type"))
        elif isinstance(value, str) and len(value) > limits.max_value_length:
            msg = (
                f"String should have at most {limits.max_value_length} characters, not {len(value)}"
            )
            errors.append(_error(key_loc, msg, "string_too_long"))
        if check_nul and ("\x00" in key or (isinstance(value, str) and "\x00" in value)):
            msg = "Keys and values must not contain NUL characters (\\u0000)"
            errors.append(_error(key_loc, msg, "nul_character"))
    return errors


def _json_type(value: Any) -> str:
    if isinstance(value, dict):
        return "an object"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    return "null"


EXAMPLE_INPUT: list[Any] = [{"1": "2", "3": "4", "5": "6", "7": "8"}, {"key1": "value1"}]
EXAMPLE_RESULT: list[Any] = [{"1 5": "2 6", "3 7": "4 8"}, {"key1": "value1"}]
EXAMPLE_JOB_ID = "3f1c2a9e-5b7d-4e8f-9a0b-1c2d3e4f5a6b"
EXAMPLE_TIME = "2026-11-28T11:37:39.123456Z"
DATE_TIME: dict[str, Any] = {"format": "date-time"}
JOB_ID: dict[str, Any] = {"format": "uuid", "example": EXAMPLE_JOB_ID}


def job_request_schema(limits: RequestLimits) -> dict[str, Any]:
    """The JSON Schema of a submission, as ``parse_job_request`` enforces it."""
    item = {
        "type": "object",
        "maxProperties": limits.max_keys_per_item,
        "propertyNames": {"maxLength": limits.max_key_length, "pattern": NO_NUL},
        "additionalProperties": {
            "anyOf": [
                {"type": "string", "maxLength": limits.max_value_length, "pattern": NO_NUL},
                {"type": ["number", "boolean", "null"]},
            ]
        },
        "description": "Any object whose values are strings, numbers, booleans or null; "
        "keys and values must not contain NUL (\\u0000).",
    }
    job = {
        "type": "object",
        "required": ["input_data"],
        "additionalProperties": False,
        "properties": {
            "input_data": {
                "type": "array",
                "minItems": 1,
                "maxItems": limits.max_items,
                "items": item,
                "description": "The objects to transform; the result has one per object, in order.",
            }
        },
    }
    return {
        "title": "JobRequest",
        "type": "object",
        "required": ["job"],
        "additionalProperties": False,
        "properties": {"job": job},
        "example": {"job": {"input_data": EXAMPLE_INPUT}},
    }


class SubmitResponse(BaseModel):
    """The answer to an accepted submission."""

    model_config = ConfigDict(json_schema_extra={"example": {"job_id": EXAMPLE_JOB_ID}})

    job_id: str = Field(description="The job's id (a UUID 4); poll /check_status/{job_id}.")


class ProgressResponse(BaseModel):
    """How far a processing job's current run has got (counted a thousand objects at a time)."""

    done_items: int = Field(ge=0)
    total_items: int = Field(ge=0)


class StatusResponse(BaseModel):
    """Where a job is."""

    model_config = ConfigDict(
        json_schema_extra={
            "example": {
                "job_id": EXAMPLE_JOB_ID,
                "status": "processing",
                "created_at": EXAMPLE_TIME,
                "updated_at": EXAMPLE_TIME,
            }
        }
    )

    job_id: str
    status: JobStatus
    created_at: str = Field(
        description="When the job was accepted (ISO 8601, UTC).", json_schema_extra=DATE_TIME
    )
    updated_at: str = Field(
        description="When the job last changed (ISO 8601, UTC).", json_schema_extra=DATE_TIME
    )
    progress: ProgressResponse | None = Field(
        None,
        description="Only while processing: objects done so far (a small job may go from 0 "
        "to done at once).",
    )


class JobSummaryResponse(BaseModel):
    """A job in a list: where it is, never its payloads."""

    job_id: str = Field(json_schema_extra=JOB_ID)
    status: JobStatus
    created_at: str = Field(json_schema_extra=DATE_TIME)
    updated_at: str = Field(json_schema_extra=DATE_TIME)


class JobListResponse(BaseModel):
    """One page of jobs, newest first."""

    model_config = ConfigDict(
        json_schema_extra={
            "example": {
                "jobs": [
                    {
                        "job_id": EXAMPLE_JOB_ID,
                        "status": "completed",
                        "created_at": EXAMPLE_TIME,
                        "updated_at": EXAMPLE_TIME,
                    }
                ],
                "next_page_token": "WyIyMDI2LTExLTI4VDExOjM3OjM5LjEyMzQ1NloiLCIzZjFjIl0",
            }
        }
    )

    jobs: list[JobSummaryResponse]
    next_page_token: str | None = Field(
        description="Pass as page_token for the next page; null on the last page."
    )


class ResultResponse(BaseModel):
    """A job's outcome: its result once completed, its error once failed."""

    model_config = ConfigDict(
        json_schema_extra={
            "example": {
                "job_id": EXAMPLE_JOB_ID,
                "status": "completed",
                "result": EXAMPLE_RESULT,
                "error": None,
            }
        }
    )

    job_id: str
    status: JobStatus
    result: list[dict[str, str | int | float | bool | None]] | None = Field(
        description="One object per input object, in input order; null unless completed."
    )
    error: str | None = Field(description="What went wrong; null unless failed.")


class ErrorResponse(BaseModel):
    """The error shape for every 4xx and 5xx except validation."""

    detail: str


class ValidationErrorItem(BaseModel):
    """One problem with a submission, and where it is."""

    type: str
    loc: list[str | int] = Field(description='Path to the problem, e.g. ["body", "job"].')
    msg: str


class ValidationErrorResponse(BaseModel):
    """A 422: everything wrong with a submission (up to 20 places)."""

    detail: list[ValidationErrorItem]
