"""A client for expand-reduce-service: ``Client``, ``AsyncClient``, and the ``expand-reduce`` CLI.

from expand_reduce_client import Client

with Client("http://localhost:8080") as client:
    print(client.run([{"a": "x", "b": "y", "c": "z"}]))  # [{'a b': 'x y', 'c': 'z'}]
"""

from expand_reduce_client._models import (
    ApiError,
    BadResponse,
    Conflict,
    ExpandReduceError,
    InvalidRequest,
    Job,
    JobFailed,
    JobPage,
    NotFound,
    NotSupported,
    Progress,
    Result,
    Status,
    Submission,
    Unavailable,
    UsageError,
    WaitTimeout,
)
from expand_reduce_client.client import DEFAULT_URL, AsyncClient, Client, Limits

__all__ = [
    "DEFAULT_URL",
    "ApiError",
    "AsyncClient",
    "BadResponse",
    "Client",
    "Conflict",
    "ExpandReduceError",
    "InvalidRequest",
    "Job",
    "JobFailed",
    "JobPage",
    "Limits",
    "NotFound",
    "NotSupported",
    "Progress",
    "Result",
    "Status",
    "Submission",
    "Unavailable",
    "UsageError",
    "WaitTimeout",
]
