"""The ceiling: the same routes and request model as the service, storing nothing, doing nothing.

Every target in ``bench/run.py`` is a ratio against this app, run in the same way in the same
run, so the figures measure the service's own cost rather than the machine's mood.
"""

import uuid
from datetime import UTC, datetime

from fastapi import FastAPI
from pydantic import BaseModel

from app.jobs import JobStatus
from app.schemas import ResultResponse, StatusResponse, SubmitResponse

app = FastAPI(title="ceiling")
NOW = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class Job(BaseModel):
    """What a submission carries."""

    input_data: list[dict[str, str | int | float | bool | None]]


class JobRequest(BaseModel):
    """A submission."""

    job: Job


@app.post("/expand_reduce_flow/", status_code=202)
async def submit_job(request: JobRequest) -> SubmitResponse:
    """Accept anything valid, store nothing."""
    return SubmitResponse(job_id=str(uuid.uuid4()))


@app.get("/check_status/{job_id}")
async def check_status(job_id: str) -> StatusResponse:
    """Say every job is completed."""
    return StatusResponse(job_id=job_id, status=JobStatus.COMPLETED, created_at=NOW, updated_at=NOW)


@app.get("/job_result/{job_id}")
async def job_result(job_id: str) -> ResultResponse:
    """Say every job is completed, with nothing in it."""
    return ResultResponse(job_id=job_id, status=JobStatus.COMPLETED, result=[], error=None)
