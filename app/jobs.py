"""What a job is, for every layer: its statuses and the claim that lets one process run it."""

from dataclasses import dataclass
from enum import StrEnum


class JobStatus(StrEnum):
    """Where a job is in its life."""

    # Accepted and stored; waiting for a worker or running now.
    PROCESSING = "processing"
    # Finished; the result is stored and final.
    COMPLETED = "completed"
    # Finished without a result; `error` says why. Final.
    FAILED = "failed"


def outcome_status(error: str | None) -> JobStatus:
    """The final status of a job that ended with this error (or none)."""
    return JobStatus.FAILED if error is not None else JobStatus.COMPLETED


@dataclass(frozen=True, slots=True)
class Claim:
    """The right to run one attempt of one job, held by ``owner`` while its lease lasts.

    ``(job_id, owner, attempt)`` is the fencing token: a write on the job's behalf lands only
    while the job's lease row still names this owner and this attempt. Attempt 0 is a
    *reservation*: the process that accepted the job may claim it first, until the grace time
    ends; it runs nothing and is never renewed.
    """

    job_id: str
    owner: str
    attempt: int

    @property
    def is_reservation(self) -> bool:
        """True for attempt 0: accepted here, not started."""
        return self.attempt == 0
