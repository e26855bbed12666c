"""What the service answers, as typed objects, and the errors the clients raise."""

from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal, cast

Status = Literal["processing", "completed", "failed"]


@dataclass(frozen=True, slots=True)
class Progress:
    """How far a running job has got (reported by the service every few seconds)."""

    done_items: int
    total_items: int


@dataclass(frozen=True, slots=True)
class Job:
    """A job's status: ``GET /check_status/{job_id}``."""

    job_id: str
    status: Status
    created_at: datetime
    updated_at: datetime
    progress: Progress | None = None

    @property
    def finished(self) -> bool:
        """Whether the job has left ``processing`` (for good)."""
        return self.status != "processing"

    @classmethod
    def from_json(cls, body: dict[str, Any]) -> "Job":
        """Read the service's JSON."""
        progress = body.get("progress")
        return cls(
            job_id=body["job_id"],
            status=cast(Status, body["status"]),
            created_at=datetime.fromisoformat(body["created_at"]),
            updated_at=datetime.fromisoformat(body["updated_at"]),
            progress=Progress(progress["done_items"], progress["total_items"])
            if progress
            else None,
        )


@dataclass(frozen=True, slots=True)
class Result:
    """A job's outcome (``GET /job_result/{job_id}``): ``result`` and ``error`` as sent."""

    job_id: str
    status: Status
    result: list[dict[str, Any]] | None
    error: str | None

    @classmethod
    def from_json(cls, body: dict[str, Any]) -> "Result":
        """Read the service's JSON."""
        return cls(body["job_id"], cast(Status, body["status"]), body["result"], body["error"])


@dataclass(frozen=True, slots=True)
class Submission:
    """An accepted submission: its job's id, and whether it was an earlier one replayed."""

    job_id: str
    replayed: bool = False


@dataclass(frozen=True, slots=True)
class JobPage:
    """One page of ``GET /jobs``, newest first; pass ``next_page_token`` on for the next."""

    jobs: list[Job]
    next_page_token: str | None


class ExpandReduceError(Exception):
    """Anything the client could not do."""


class ApiError(ExpandReduceError):
    """The service answered with an error; ``detail`` is what it said."""

    def __init__(self, status_code: int, detail: Any) -> None:
        self.status_code = status_code
        self.detail = detail
        super().__init__(f"{status_code}: {describe(detail)}")


class InvalidRequest(ApiError):
    """The service refused the request as it is (400, 408, 413, 415, 422): retrying won't help."""


class NotFound(ApiError):
    """No such job (or it expired and was purged)."""


class Conflict(ApiError):
    """The job's state does not allow this (409): cancel a finished job, delete a running one."""


class NotSupported(ExpandReduceError):
    """The service has no such route (an older version of it)."""


class Unavailable(ExpandReduceError):
    """The service could not be reached, or kept answering 429 or 5xx, until the retry deadline."""


class JobFailed(ExpandReduceError):
    """The job finished as ``failed``; ``error`` is the service's account of why."""

    def __init__(self, job_id: str, error: str | None) -> None:
        self.job_id = job_id
        self.error = error
        super().__init__(f"job {job_id} failed: {error}")


class BadResponse(Unavailable):
    """The service answered something this client cannot read (not this service, or broken)."""


class UsageError(ExpandReduceError, ValueError):
    """The client was asked for something it cannot send.

    A URL without http(s)://, a key that is not printable ASCII, input that is not valid
    Unicode.
    """


class WaitTimeout(ExpandReduceError, TimeoutError):
    """The job was still processing when the wait's timeout ran out."""


def describe(detail: Any) -> str:
    """The service's ``detail`` as one line: a string as is, a 422's problems joined."""
    if isinstance(detail, list):
        return "; ".join(
            f"{'.'.join(str(part) for part in problem.get('loc', ()))}: {problem.get('msg')}"
            if isinstance(problem, dict)
            else str(problem)
            for problem in detail
        )
    return str(detail)
