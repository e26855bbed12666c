"""``Client`` and ``AsyncClient``: the service's API as methods, with retries that never duplicate.

Both share everything but the I/O: how each request is built and its answer read
(``_Api``), when and how long to retry (``_retry_policy``), and how to wait for a job
(``_Waiter``). Only the service's HTTP API is used, never its code: this package could be
published on its own.

Retries: a connection error, or an answer of 429, 502, 503 or 504, is retried with exponential
backoff and full jitter, or after the ``Retry-After`` the service sent, until
``retry_deadline`` seconds have passed; then ``Unavailable`` is raised. Every submission carries
an ``Idempotency-Key`` made once per call of ``submit``, so a retry after a lost answer returns
the job the first attempt made instead of making a second. (A service without idempotency keys,
older than this client, ignores the header; there a retry after a lost answer may create a
second job.)
"""

import asyncio
import json
import math
import re
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from email.utils import parsedate_to_datetime
from typing import Any, Literal, TypeVar, overload

import httpx
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    Retrying,
    retry_if_exception_type,
    wait_random_exponential,
)

from expand_reduce_client._models import (
    ApiError,
    BadResponse,
    Conflict,
    InvalidRequest,
    Job,
    JobFailed,
    JobPage,
    NotFound,
    NotSupported,
    Result,
    Status,
    Submission,
    Unavailable,
    UsageError,
    WaitTimeout,
    describe,
)

T = TypeVar("T")
DEFAULT_URL = "http://localhost:8080"
RETRYABLE_STATUSES = frozenset({429, 502, 503, 504})
# The service's long-poll (?wait=) answers within this many seconds, or as soon as the job
# finishes; while progress is shown, every half second (the service records it every few).
LONG_POLL_SECONDS = 30.0
PROGRESS_POLL_SECONDS = 0.5
# Without long-poll (an older service), polls start this far apart and back off to the most.
POLL_FIRST, POLL_MOST = 0.1, 2.0
BACKOFF = wait_random_exponential(multiplier=0.2, max=5.0)  # full jitter, 0.2 s doubling to 5 s
SUBMIT_PATH = "/expand_reduce_flow/"
JOB_ID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}", re.I)
API_KEY = re.compile(r"[\x21-\x7e]+")  # printable ASCII without spaces, as the service says
IDEMPOTENCY_KEY = re.compile(r"[\x20-\x7e]{1,255}")  # as the service takes it
# The most a request waits for its whole answer, long-polls apart: a server that accepts and
# never answers (or trickles) is given up on like one that cannot be reached.
REQUEST_TIMEOUT = 30.0
# A job's input or result: JSON objects. (Named: the clients' ``list`` method hides the type.)
Objects = list[dict[str, Any]]
# Called with each status seen while waiting.
ProgressCallback = Callable[[Job], None]


class _Retryable(Exception):
    """An attempt that may succeed if made again (after ``retry_after`` seconds, if given)."""

    def __init__(self, reason: str, retry_after: float | None = None) -> None:
        super().__init__(reason)
        self.retry_after = retry_after


@dataclass(frozen=True, slots=True)
class _Call:
    """One request, as each attempt of it sends it."""

    method: str
    path: str
    params: dict[str, str] | None = None
    content: bytes | None = None
    headers: dict[str, str] = field(default_factory=dict)
    timeout: float | None = None  # None: the client's own


@dataclass(frozen=True, slots=True)
class Limits:
    """What the service accepts, as its OpenAPI document says (None where it does not say)."""

    max_body_bytes: int | None
    max_items: int | None


def _retry_policy(deadline: float) -> dict[str, Any]:
    """Retry what may succeed until ``deadline`` seconds have passed (tenacity's terms).

    The pause is the ``Retry-After`` the service sent, else exponential backoff with full
    jitter, cut short so that the last attempt is made at the deadline. A ``Retry-After`` that
    reaches past the deadline ends the retrying at once.
    """

    def retry_after(state: RetryCallState) -> float | None:
        error = state.outcome.exception() if state.outcome else None
        return error.retry_after if isinstance(error, _Retryable) else None

    def pause(state: RetryCallState) -> float:
        told = retry_after(state)
        if told is not None:
            return told
        elapsed = state.seconds_since_start or 0.0
        return max(0.0, min(float(BACKOFF(state)), deadline - elapsed))

    def give_up(state: RetryCallState) -> bool:
        elapsed = state.seconds_since_start or 0.0
        told = retry_after(state)
        return elapsed >= deadline or (told is not None and elapsed + told > deadline)

    return {
        "retry": retry_if_exception_type(_Retryable),
        "wait": pause,
        "stop": give_up,
        "reraise": True,
    }


def _retry_after(response: httpx.Response) -> float | None:
    """The ``Retry-After`` header in seconds (it may be a number or an HTTP date)."""
    value = response.headers.get("retry-after")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError):
        return None


def _detail(response: httpx.Response) -> Any:
    try:
        return response.json()["detail"]
    except (ValueError, KeyError, TypeError):
        return response.text or response.reason_phrase


def _raise_for(response: httpx.Response) -> None:
    """Turn an error answer into the client's error; retryable ones into ``_Retryable``."""
    code = response.status_code
    if code < 400:
        return
    detail = _detail(response)
    if code in RETRYABLE_STATUSES:
        raise _Retryable(f"the service answered {code}: {describe(detail)}", _retry_after(response))
    if code >= 500:
        raise Unavailable(f"the service failed: {code}: {describe(detail)}")
    if code == 405 or (code == 404 and detail == "Not Found"):  # Starlette's: no such route
        raise NotSupported(
            f"this service has no {response.request.method} {response.request.url.path}"
        )
    if code == 404:
        raise NotFound(code, detail)
    if code == 409:
        raise Conflict(code, detail)
    if code in (401, 403):
        raise ApiError(code, detail)
    raise InvalidRequest(code, detail)


def encode_job(items: Iterable[Mapping[str, Any]]) -> bytes:
    """The submission body for these objects, as the clients send it."""
    body = {"job": {"input_data": [dict(item) for item in items]}}
    try:
        return json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode()
    except UnicodeEncodeError as error:
        raise UsageError(
            f"the input holds text that is not valid Unicode ({error.reason}: "
            f"{error.object[error.start : error.end]!r}), which JSON cannot carry"
        ) from None


def _job_path(job_id: str, template: str) -> str:
    """The route for this job; a job_id that is not a UUID is no job (without asking)."""
    if not JOB_ID.fullmatch(job_id):
        raise NotFound(404, f"Job {job_id!r} not found: a job_id is a UUID")
    return template.format(job_id=job_id.lower())


def _read(parse: Callable[[httpx.Response], T], response: httpx.Response) -> T:
    """Read the answer with ``parse``; an answer not shaped as this service's is BadResponse."""
    try:
        return parse(response)
    except (ValueError, KeyError, TypeError, AttributeError) as error:
        request = response.request
        raise BadResponse(
            f"the answer to {request.method} {request.url.path} is not this service's "
            f"({type(error).__name__}: {error}): is {request.url.host} expand-reduce-service?"
        ) from None


def _deleted(response: httpx.Response) -> None:
    if response.status_code != 204:
        raise ValueError(f"{response.status_code} where a deletion answers 204 No Content")


def _job(response: httpx.Response) -> Job:
    return Job.from_json(response.json())


def _result(response: httpx.Response) -> Result:
    return Result.from_json(response.json())


def _whole(response: httpx.Response, content: bytes) -> httpx.Response:
    """The response with its body as read (and decoded)."""
    skip = {"content-encoding", "content-length", "transfer-encoding"}
    headers = [(k, v) for k, v in response.headers.multi_items() if k.lower() not in skip]
    return httpx.Response(
        response.status_code, headers=headers, content=content, request=response.request
    )


def _limits_from(openapi: dict[str, Any]) -> Limits:
    try:
        body = openapi["paths"][SUBMIT_PATH]["post"]["requestBody"]
    except (KeyError, TypeError):
        return Limits(None, None)
    schema = body.get("content", {}).get("application/json", {}).get("schema", {})
    items = schema.get("properties", {}).get("job", {}).get("properties", {}).get("input_data", {})
    size, count = body.get("x-max-body-bytes"), items.get("maxItems")
    return Limits(
        size if isinstance(size, int) and size > 0 else None,
        count if isinstance(count, int) and count > 0 else None,
    )


class _Api:
    """How each operation is asked and its answer read; the same for both clients."""

    def __init__(
        self, url: str | None, api_key: str | None, retry_deadline: float, timeout: float
    ) -> None:
        self.url = (url or DEFAULT_URL).rstrip("/")
        if not self.url.startswith(("http://", "https://")):
            raise UsageError(f"the URL {self.url!r} must start with http:// or https://")
        try:
            if not httpx.URL(self.url).host:
                raise httpx.InvalidURL("no host")
        except httpx.InvalidURL as error:
            raise UsageError(f"the URL {self.url!r} is not valid: {error}") from None
        for name, seconds in (("retry_deadline", retry_deadline), ("timeout", timeout)):
            if not math.isfinite(seconds) or seconds < 0:
                raise UsageError(f"{name} must be a number of seconds, not {seconds}")
        if api_key is not None and not API_KEY.fullmatch(api_key):
            raise UsageError("an API key is printable ASCII without spaces")
        self.retry_deadline = retry_deadline
        self.timeout = timeout
        self._headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._limits: Limits | None = None

    def _seconds_for(self, call: _Call, started: float) -> float:
        """How long one attempt may take in all.

        A long-poll: its wait and more. Any other: the request timeout, cut to what is left
        of the retry deadline.
        """
        if call.timeout is not None:
            return call.timeout
        left = self.retry_deadline - (time.monotonic() - started)
        return max(min(self.timeout, left), 0.5)

    def _gave_up(self, error: _Retryable, started: float) -> Unavailable:
        if error.retry_after is not None and error.retry_after > self.retry_deadline:
            return Unavailable(
                f"{error}; it asked to be asked again in {error.retry_after:g} s, past the "
                f"{self.retry_deadline:g} s retry deadline"
            )
        # Usually the deadline; more when a long-poll (its wait and 10 s) went past it.
        return Unavailable(f"{error} (gave up after {time.monotonic() - started:.0f} s)")

    @staticmethod
    def _key(idempotency_key: str | None) -> str:
        if idempotency_key is None:
            return str(uuid.uuid4())
        if not IDEMPOTENCY_KEY.fullmatch(idempotency_key):
            raise UsageError("an Idempotency-Key is 1 to 255 printable ASCII characters")
        return idempotency_key

    @staticmethod
    def _submit(body: bytes, idempotency_key: str) -> _Call:
        headers = {"Content-Type": "application/json", "Idempotency-Key": idempotency_key}
        return _Call("POST", SUBMIT_PATH, content=body, headers=headers)

    @staticmethod
    def _submitted(response: httpx.Response) -> Submission:
        replayed = response.headers.get("idempotent-replayed") == "true"
        return Submission(response.json()["job_id"], replayed)

    @staticmethod
    def _status(job_id: str, wait: float = 0) -> _Call:
        params = {"wait": f"{wait:g}"} if wait else None
        path = _job_path(job_id, "/check_status/{job_id}")
        # The long-poll holds the answer up to ``wait`` seconds: read for longer than that.
        return _Call("GET", path, params=params, timeout=wait + 10 if wait else None)

    @staticmethod
    def _list(status: Status | None, limit: int | None, page_token: str | None) -> _Call:
        params = {
            "status": status,
            "limit": str(limit) if limit else None,
            "page_token": page_token,
        }
        return _Call("GET", "/jobs", params={k: v for k, v in params.items() if v})

    @staticmethod
    def _page(response: httpx.Response) -> JobPage:
        body = response.json()
        return JobPage([Job.from_json(job) for job in body["jobs"]], body["next_page_token"])

    def _raise_if_failed(self, result: Result) -> Objects:
        if result.status == "failed":
            raise JobFailed(result.job_id, result.error)
        return result.result or []


class _Waiter:
    """When to ask again while waiting for a job; uses the long-poll where the service has it.

    A long-poll answers early only when the job finishes; an answer of ``processing`` well
    before the poll's time is up means the service ignored ``wait`` (an older one), and from
    then on it is polled, backing off from ``POLL_FIRST`` to ``POLL_MOST`` seconds.
    """

    def __init__(self, timeout: float | None, poll: float | None) -> None:
        self.deadline = None if timeout is None else time.monotonic() + timeout
        self.long_poll = LONG_POLL_SECONDS if poll is None else poll
        self.polling = False
        self.pause = POLL_FIRST
        self.asked_at = 0.0
        self.first = poll is not None  # showing progress: the first answer at once

    def wait_param(self) -> float:
        """The ``wait`` to send now: up to the long-poll, never past the deadline."""
        self.asked_at = time.monotonic()
        if self.polling or self.first:
            self.first = False
            return 0
        if self.deadline is None:
            return self.long_poll
        return max(0.0, min(self.long_poll, self.deadline - self.asked_at))

    def next_pause(self, job: Job, asked_for: float) -> float:
        """Seconds to sleep before asking again (0: ask at once); raise once out of time."""
        now = time.monotonic()
        if self.deadline is not None and now >= self.deadline:
            raise WaitTimeout(f"job {job.job_id} still processing after the wait's timeout")
        if not self.polling and asked_for > 0 and now - self.asked_at < asked_for / 2:
            self.polling = True  # answered "processing" at once: no long-poll here
        if not self.polling:
            return 0.0
        pause, self.pause = self.pause, min(self.pause * 2, POLL_MOST)
        if self.deadline is not None:
            pause = min(pause, max(0.0, self.deadline - now))
        return pause


class Client(_Api):
    """The service's API, synchronously. ``with Client(url) as client: client.run(items)``.

    ``url`` defaults to ``http://localhost:8080``; ``api_key`` is sent as a bearer token;
    ``retry_deadline`` bounds how long one call keeps retrying; ``timeout`` is each request's.
    """

    def __init__(
        self,
        url: str | None = None,
        *,
        api_key: str | None = None,
        retry_deadline: float = 30.0,
        timeout: float = REQUEST_TIMEOUT,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        super().__init__(url, api_key, retry_deadline, timeout)
        self._http = httpx.Client(
            base_url=self.url, headers=self._headers, timeout=timeout, transport=transport
        )

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the connections."""
        self._http.close()

    def _send(self, call: _Call) -> httpx.Response:
        started = time.monotonic()

        def attempt() -> httpx.Response:
            seconds = self._seconds_for(call, started)
            give_up_at = time.monotonic() + seconds
            try:
                with self._http.stream(
                    call.method,
                    call.path,
                    params=call.params,
                    content=call.content,
                    headers=call.headers,
                    timeout=seconds,
                ) as streamed:
                    content = bytearray()
                    for chunk in streamed.iter_bytes():
                        content += chunk
                        if time.monotonic() > give_up_at:  # a server trickling its answer
                            raise httpx.ReadTimeout("", request=streamed.request)
                    response = _whole(streamed, bytes(content))
            except httpx.TimeoutException as error:
                raise _Retryable(f"{self.url} did not answer within {seconds:g} s") from error
            except httpx.TransportError as error:
                raise _Retryable(
                    f"cannot reach {self.url}: {error or type(error).__name__}"
                ) from error
            _raise_for(response)
            return response

        try:
            return Retrying(**_retry_policy(self.retry_deadline))(attempt)
        except _Retryable as error:
            raise self._gave_up(error, started) from error

    @overload
    def submit(
        self,
        items: Iterable[Mapping[str, Any]],
        *,
        wait: Literal[False] = ...,
        idempotency_key: str | None = ...,
        timeout: float | None = ...,
    ) -> Submission: ...

    @overload
    def submit(
        self,
        items: Iterable[Mapping[str, Any]],
        *,
        wait: Literal[True],
        idempotency_key: str | None = ...,
        timeout: float | None = ...,
    ) -> Job: ...

    def submit(
        self,
        items: Iterable[Mapping[str, Any]],
        *,
        wait: bool = False,
        idempotency_key: str | None = None,
        timeout: float | None = None,
    ) -> Submission | Job:
        """Submit a job of these objects; with ``wait=True``, wait and return its final status."""
        submission = self.submit_encoded(encode_job(items), idempotency_key=idempotency_key)
        return self.wait(submission.job_id, timeout=timeout) if wait else submission

    def submit_encoded(self, body: bytes, *, idempotency_key: str | None = None) -> Submission:
        """Submit a body already made by ``encode_job`` (the CLI measures it first)."""
        submitted = self._send(self._submit(body, self._key(idempotency_key)))
        return _read(self._submitted, submitted)

    def status(self, job_id: str, *, wait: float = 0) -> Job:
        """The job's status; with ``wait``, up to that many seconds for it to finish first."""
        return _read(_job, self._send(self._status(job_id, wait)))

    def result(self, job_id: str) -> Result:
        """The job's result (or error); ``status`` says whether it has finished."""
        path = _job_path(job_id, "/job_result/{job_id}")
        return _read(_result, self._send(_Call("GET", path)))

    def wait(
        self,
        job_id: str,
        timeout: float | None = None,
        *,
        on_progress: ProgressCallback | None = None,
    ) -> Job:
        """Wait until the job finishes and return its status; ``WaitTimeout`` after ``timeout``.

        ``on_progress`` is called with each status seen: at once, then every half second.
        """
        waiter = _Waiter(timeout, PROGRESS_POLL_SECONDS if on_progress else None)
        while True:
            asked_for = waiter.wait_param()
            job = self.status(job_id, wait=asked_for)
            if on_progress:
                on_progress(job)
            if job.finished:
                return job
            time.sleep(waiter.next_pause(job, asked_for))

    def list(
        self,
        *,
        status: Status | None = None,
        limit: int | None = None,
        page_token: str | None = None,
    ) -> JobPage:
        """A page of jobs, newest first."""
        return _read(self._page, self._send(self._list(status, limit, page_token)))

    def cancel(self, job_id: str) -> Job:
        """Cancel a processing job; its status (now failed, "cancelled ...")."""
        path = _job_path(job_id, "/jobs/{job_id}/cancel")
        return _read(_job, self._send(_Call("POST", path)))

    def delete(self, job_id: str) -> None:
        """Delete a finished job: its row, input and result."""
        _read(_deleted, self._send(_Call("DELETE", _job_path(job_id, "/jobs/{job_id}"))))

    def run(self, items: Iterable[Mapping[str, Any]], timeout: float | None = None) -> Objects:
        """Submit, wait, return the result; ``JobFailed`` with the service's error if it failed."""
        job = self.submit(items, wait=True, timeout=timeout)
        return self._raise_if_failed(self.result(job.job_id))

    def limits(self) -> Limits:
        """The body size and item count the service accepts (from its OpenAPI document)."""
        if self._limits is None:
            try:
                openapi = self._send(_Call("GET", "/openapi.json"))
                self._limits = _read(lambda answer: _limits_from(answer.json()), openapi)
            except (ApiError, NotSupported, ValueError):
                self._limits = Limits(None, None)
        return self._limits


class AsyncClient(_Api):
    """The service's API for asyncio. ``async with AsyncClient(url) as client: ...``.

    The same methods as ``Client``, each a coroutine.
    """

    def __init__(
        self,
        url: str | None = None,
        *,
        api_key: str | None = None,
        retry_deadline: float = 30.0,
        timeout: float = REQUEST_TIMEOUT,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        super().__init__(url, api_key, retry_deadline, timeout)
        self._http = httpx.AsyncClient(
            base_url=self.url, headers=self._headers, timeout=timeout, transport=transport
        )

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the connections."""
        await self._http.aclose()

    async def _send(self, call: _Call) -> httpx.Response:
        started = time.monotonic()

        async def attempt() -> httpx.Response:
            seconds = self._seconds_for(call, started)
            try:
                async with asyncio.timeout(seconds):  # the whole answer, trickled or not
                    response = await self._http.request(
                        call.method,
                        call.path,
                        params=call.params,
                        content=call.content,
                        headers=call.headers,
                        timeout=seconds,
                    )
            except (TimeoutError, httpx.TimeoutException) as error:
                raise _Retryable(f"{self.url} did not answer within {seconds:g} s") from error
            except httpx.TransportError as error:
                raise _Retryable(
                    f"cannot reach {self.url}: {error or type(error).__name__}"
                ) from error
            _raise_for(response)
            return response

        try:
            return await AsyncRetrying(**_retry_policy(self.retry_deadline))(attempt)
        except _Retryable as error:
            raise self._gave_up(error, started) from error

    @overload
    async def submit(
        self,
        items: Iterable[Mapping[str, Any]],
        *,
        wait: Literal[False] = ...,
        idempotency_key: str | None = ...,
        timeout: float | None = ...,
    ) -> Submission: ...

    @overload
    async def submit(
        self,
        items: Iterable[Mapping[str, Any]],
        *,
        wait: Literal[True],
        idempotency_key: str | None = ...,
        timeout: float | None = ...,
    ) -> Job: ...

    async def submit(
        self,
        items: Iterable[Mapping[str, Any]],
        *,
        wait: bool = False,
        idempotency_key: str | None = None,
        timeout: float | None = None,
    ) -> Submission | Job:
        """Submit a job of these objects; with ``wait=True``, wait and return its final status."""
        body = encode_job(items)
        submission = await self.submit_encoded(body, idempotency_key=idempotency_key)
        return await self.wait(submission.job_id, timeout=timeout) if wait else submission

    async def submit_encoded(
        self, body: bytes, *, idempotency_key: str | None = None
    ) -> Submission:
        """Submit a body already made by ``encode_job``."""
        submitted = await self._send(self._submit(body, self._key(idempotency_key)))
        return _read(self._submitted, submitted)

    async def status(self, job_id: str, *, wait: float = 0) -> Job:
        """The job's status; with ``wait``, up to that many seconds for it to finish first."""
        return _read(_job, await self._send(self._status(job_id, wait)))

    async def result(self, job_id: str) -> Result:
        """The job's result (or error); ``status`` says whether it has finished."""
        path = _job_path(job_id, "/job_result/{job_id}")
        return _read(_result, await self._send(_Call("GET", path)))

    async def wait(
        self,
        job_id: str,
        timeout: float | None = None,
        *,
        on_progress: ProgressCallback | None = None,
    ) -> Job:
        """Wait until the job finishes and return its status; ``WaitTimeout`` after ``timeout``."""
        waiter = _Waiter(timeout, PROGRESS_POLL_SECONDS if on_progress else None)
        while True:
            asked_for = waiter.wait_param()
            job = await self.status(job_id, wait=asked_for)
            if on_progress:
                on_progress(job)
            if job.finished:
                return job
            await asyncio.sleep(waiter.next_pause(job, asked_for))

    async def list(
        self,
        *,
        status: Status | None = None,
        limit: int | None = None,
        page_token: str | None = None,
    ) -> JobPage:
        """A page of jobs, newest first."""
        return _read(self._page, await self._send(self._list(status, limit, page_token)))

    async def cancel(self, job_id: str) -> Job:
        """Cancel a processing job; its status (now failed, "cancelled ...")."""
        path = _job_path(job_id, "/jobs/{job_id}/cancel")
        return _read(_job, await self._send(_Call("POST", path)))

    async def delete(self, job_id: str) -> None:
        """Delete a finished job: its row, input and result."""
        _read(_deleted, await self._send(_Call("DELETE", _job_path(job_id, "/jobs/{job_id}"))))

    async def run(
        self, items: Iterable[Mapping[str, Any]], timeout: float | None = None
    ) -> Objects:
        """Submit, wait, return the result; ``JobFailed`` with the service's error if it failed."""
        job = await self.submit(items, wait=True, timeout=timeout)
        return self._raise_if_failed(await self.result(job.job_id))
