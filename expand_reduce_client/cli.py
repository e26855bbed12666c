"""``expand-reduce``: submit, wait for, fetch, list, cancel and delete jobs from a shell.

A thin layer over ``Client``. Human output by default, ``--json`` for scripts; progress goes to
stderr, and only when stderr is a terminal. Exit codes: 0 done (the job completed), 1 the job
failed (or could not be cancelled or deleted in its state), 2 usage or input error, 3 the
service is unreachable or kept answering 5xx, 4 no such job, 5 the job is still processing
(``result`` without ``--wait``).
"""

import json
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime
from functools import wraps
from pathlib import Path
from typing import Any, NoReturn, TextIO

import click
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table

from expand_reduce_client._models import (
    ApiError,
    Conflict,
    ExpandReduceError,
    Job,
    JobFailed,
    NotFound,
    NotSupported,
    Result,
    Unavailable,
    UsageError,
)
from expand_reduce_client.client import DEFAULT_URL, Client, encode_job

EXIT_FAILED, EXIT_USAGE, EXIT_UNAVAILABLE, EXIT_NOT_FOUND, EXIT_PROCESSING = 1, 2, 3, 4, 5
STATUSES = ("processing", "completed", "failed")


def _fail(message: str, code: int) -> NoReturn:
    click.echo(f"expand-reduce: {message}", err=True)
    sys.exit(code)


# Each error the commands may meet, and its exit code (the first that matches).
EXIT_CODES: tuple[tuple[type[Exception], int], ...] = (
    (JobFailed, EXIT_FAILED),
    (Conflict, EXIT_FAILED),
    (NotFound, EXIT_NOT_FOUND),
    (Unavailable, EXIT_UNAVAILABLE),
    (NotSupported, EXIT_USAGE),
    (UsageError, EXIT_USAGE),
    (ApiError, EXIT_USAGE),  # refused as sent (400, 401, 413, 422...): sending it again won't do
    (OSError, EXIT_USAGE),  # writing -o FILE
    (ExpandReduceError, EXIT_FAILED),
)


def _message(error: Exception) -> str:
    if isinstance(error, Conflict | NotFound):
        return str(error.detail)
    if isinstance(error, NotSupported):
        return f"{error} (it is older than this client)"
    if isinstance(error, ApiError):
        return f"the service refused the request: {error}"
    if isinstance(error, OSError):
        return f"{error.filename or 'output'}: {error.strerror or error}"
    return str(error)


@contextmanager
def _errors_as_exit_codes() -> Iterator[None]:
    """One line on stderr and the documented exit code, never a traceback."""
    try:
        yield
    except KeyboardInterrupt:
        _fail("interrupted", 130)
    except Exception as error:
        for kind, code in EXIT_CODES:
            if isinstance(error, kind):
                _fail(_message(error), code)
        raise


def _client_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """The options every command takes, and a ``Client`` made from them."""

    @click.option(
        "--url",
        envvar="EXPAND_REDUCE_URL",
        default=DEFAULT_URL,
        show_default=True,
        help="The service's address (or EXPAND_REDUCE_URL).",
    )
    @click.option(
        "--api-key",
        envvar="EXPAND_REDUCE_API_KEY",
        default=None,
        help="Where the service has API keys on (or EXPAND_REDUCE_API_KEY).",
    )
    @click.option(
        "--retry-deadline",
        envvar="EXPAND_REDUCE_RETRY_DEADLINE",
        type=click.FloatRange(min=0),
        default=30.0,
        show_default=True,
        help="Seconds to keep retrying while the service is unreachable or answers 429/5xx.",
    )
    @click.option("--json", "as_json", is_flag=True, help="Print JSON, for scripts.")
    @wraps(command)
    def wrapper(url: str, api_key: str | None, retry_deadline: float, **kwargs: Any) -> None:
        with (
            _errors_as_exit_codes(),
            Client(url, api_key=api_key, retry_deadline=retry_deadline) as client,
        ):
            command(client, **kwargs)

    return wrapper


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="expand-reduce-service")
def main() -> None:
    """Submit jobs to expand-reduce-service, wait for them, and fetch their results."""


# Reading input.


def read_items(source: str) -> list[dict[str, Any]]:
    """The objects of a file (or ``-``, stdin): a JSON array, JSON Lines, or a whole body."""
    name = "stdin" if source == "-" else source
    try:
        raw = sys.stdin.buffer.read() if source == "-" else Path(source).read_bytes()
        text = raw.decode("utf-8-sig")  # UTF-8, with or without a byte order mark
    except (OSError, UnicodeDecodeError) as error:
        _fail(f"cannot read {name}: {error}", EXIT_USAGE)
    try:
        try:
            whole = json.loads(text)
        except json.JSONDecodeError:
            items = _json_lines(text, name)
        except ValueError as error:  # valid JSON this Python will not read (huge numbers)
            _fail(f"{name}: {error}", EXIT_USAGE)
        else:
            items = _items_of(whole, name)
    except RecursionError:
        _fail(f"{name}: nested too deeply to be a job", EXIT_USAGE)
    if not items:
        _fail(f"{name} holds no objects", EXIT_USAGE)
    return items


def _items_of(document: Any, name: str) -> list[dict[str, Any]]:
    if isinstance(document, dict) and set(document) == {"job"}:
        job = document["job"]
        if not isinstance(job, dict) or not isinstance(job.get("input_data"), list):
            _fail(f'{name}: a body must be {{"job": {{"input_data": [...]}}}}', EXIT_USAGE)
        document = job["input_data"]
    if isinstance(document, dict):
        document = [document]  # JSON Lines of one line
    if not isinstance(document, list):
        _fail(f"{name}: expected a JSON array of objects, JSON Lines, or a job body", EXIT_USAGE)
    for number, item in enumerate(document):
        if not isinstance(item, dict):
            _fail(f"{name}: item {number} is not a JSON object", EXIT_USAGE)
    return document


def _json_lines(text: str, name: str) -> list[dict[str, Any]]:
    items = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as error:
            _fail(f"{name}, line {number}: not JSON ({error.msg})", EXIT_USAGE)
        except ValueError as error:
            _fail(f"{name}, line {number}: {error}", EXIT_USAGE)
        if not isinstance(item, dict):
            _fail(f"{name}, line {number}: not a JSON object", EXIT_USAGE)
        items.append(item)
    return items


def _encoded_within_limits(client: Client, items: list[dict[str, Any]], name: str) -> bytes:
    """The job's body, once; or say so before sending a job the service would refuse."""
    limits = client.limits()
    if limits.max_items is not None and len(items) > limits.max_items:
        _fail(
            f"{name} has {len(items):,} objects; the service takes at most {limits.max_items:,} "
            "in one job (MAX_ITEMS): split it",
            EXIT_USAGE,
        )
    body = encode_job(items)
    if limits.max_body_bytes is not None and len(body) > limits.max_body_bytes:
        _fail(
            f"{name} makes a request of {len(body):,} bytes; the service takes at most "
            f"{limits.max_body_bytes:,} (MAX_BODY_BYTES): split it",
            EXIT_USAGE,
        )
    return body


# Writing output.


def _check_writable(output: Path | None) -> None:
    """Fail now, not after the wait, if ``output`` cannot be written (it is created empty)."""
    if output is None:
        return
    try:
        with output.open("a", encoding="utf-8"):
            pass
    except OSError as error:
        _fail(f"cannot write {output}: {error.strerror or error}", EXIT_USAGE)


def _time(moment: datetime) -> str:
    return moment.isoformat().replace("+00:00", "Z")


def _job_json(job: Job) -> dict[str, Any]:
    body: dict[str, Any] = {
        "job_id": job.job_id,
        "status": job.status,
        "created_at": _time(job.created_at),
        "updated_at": _time(job.updated_at),
    }
    if job.progress is not None:
        body["progress"] = {
            "done_items": job.progress.done_items,
            "total_items": job.progress.total_items,
        }
    return body


def _result_json(result: Result) -> dict[str, Any]:
    return {
        "job_id": result.job_id,
        "status": result.status,
        "result": result.result,
        "error": result.error,
    }


def _print_json(value: Any, stream: TextIO | None = None) -> None:
    click.echo(json.dumps(value, ensure_ascii=False), file=stream)


def _objects(count: int) -> str:
    return f"{count:,} object{'' if count == 1 else 's'}"


def _describe(job: Job) -> str:
    line = f"{job.job_id}  {job.status}"
    if job.progress is not None and job.status == "processing":
        line += f"  {job.progress.done_items:,}/{job.progress.total_items:,} objects"
    return f"{line}  (created {_time(job.created_at)}, updated {_time(job.updated_at)})"


def _deliver(client: Client, job: Job, output: Path | None, as_json: bool) -> None:
    """Write a finished job's result to ``output`` or stdout; exit 1 with its error if it failed."""
    result = client.result(job.job_id)
    if result.status == "failed":
        if as_json:
            _print_json(_result_json(result))
        raise JobFailed(result.job_id, result.error)
    if output is not None:
        output.write_text(json.dumps(result.result, ensure_ascii=False) + "\n", encoding="utf-8")
        if as_json:
            _print_json(_result_json(result) | {"result": None, "written_to": str(output)})
        else:
            click.echo(
                f"{job.job_id} completed: {_objects(len(result.result or []))} written to {output}",
                err=True,
            )
    elif as_json:
        _print_json(_result_json(result))
    else:
        _print_json(result.result)


class _ProgressDisplay:
    """A spinner while the job waits, a bar of objects done once the service reports them."""

    def __init__(self, job_id: str, console: Console | None = None) -> None:
        self._progress = Progress(
            SpinnerColumn(),
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("objects"),
            TimeElapsedColumn(),
            console=console or Console(stderr=True),
            transient=True,
        )
        self._task: TaskID = self._progress.add_task(f"{job_id[:8]} queued", total=None)
        self._short = job_id[:8]

    def __enter__(self) -> "_ProgressDisplay":
        self._progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._progress.stop()

    def update(self, job: Job) -> None:
        """Show what this status says."""
        if job.progress is not None:
            self._progress.update(
                self._task,
                description=f"{self._short} {job.status}",
                total=job.progress.total_items,
                completed=job.progress.done_items,
            )
        else:
            self._progress.update(self._task, description=f"{self._short} {job.status}")


def _wait(client: Client, job_id: str) -> Job:
    """Wait for the job, with a progress display on stderr if it is a terminal."""
    if not sys.stderr.isatty():
        return client.wait(job_id)
    started = time.monotonic()
    with _ProgressDisplay(job_id) as display:
        job = client.wait(job_id, on_progress=display.update)
    click.echo(f"{job_id} {job.status} after {time.monotonic() - started:.1f} s", err=True)
    return job


# The commands.


def _output_option(help_text: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """``-o FILE``: where a result is written (checked writable before anything is sent)."""
    return click.option(
        "-o",
        "--output",
        type=click.Path(dir_okay=False, writable=True, path_type=Path),
        help=help_text,
    )


@main.command()
@click.argument("source", metavar="FILE|-")
@click.option("--wait", is_flag=True, help="Wait for the job, then write its result.")
@_output_option("With --wait: write the result here rather than to stdout.")
@click.option("--idempotency-key", help="Your own key (a retry with it answers the same job).")
@_client_options
def submit(
    client: Client,
    source: str,
    wait: bool,
    output: Path | None,
    idempotency_key: str | None,
    as_json: bool,
) -> None:
    """Submit the objects in FILE (or stdin, -): a JSON array, JSON Lines, or a job body.

    Prints the job id; with --wait, waits for the job (showing progress on a terminal) and
    writes its result.
    """
    if output is not None and not wait:
        _fail("-o/--output needs --wait", EXIT_USAGE)
    _check_writable(output)  # before the job is sent: its result must have somewhere to go
    items = read_items(source)
    body = _encoded_within_limits(client, items, "stdin" if source == "-" else source)
    submission = client.submit_encoded(body, idempotency_key=idempotency_key)
    if not wait:
        if as_json:
            _print_json({"job_id": submission.job_id, "replayed": submission.replayed})
        else:
            click.echo(submission.job_id)
        return
    if not as_json:
        click.echo(f"submitted {submission.job_id}", err=True)
    _deliver(client, _wait(client, submission.job_id), output, as_json)


@main.command()
@click.argument("job_id")
@click.option("--wait", is_flag=True, help="Wait until the job has finished.")
@_client_options
def status(client: Client, job_id: str, wait: bool, as_json: bool) -> None:
    """Show a job's status; exit 1 if it failed."""
    job = _wait(client, job_id) if wait else client.status(job_id)
    if as_json:
        _print_json(_job_json(job))
    else:
        click.echo(_describe(job))
    if job.status == "failed":
        sys.exit(EXIT_FAILED)


@main.command()
@click.argument("job_id")
@click.option("--wait", is_flag=True, help="Wait for the job if it is still processing.")
@_output_option("Write the result here rather than to stdout.")
@_client_options
def result(client: Client, job_id: str, wait: bool, output: Path | None, as_json: bool) -> None:
    """Write a finished job's result; exit 1 with its error if it failed, 5 if still processing."""
    _check_writable(output)
    job = _wait(client, job_id) if wait else client.status(job_id)
    if not job.finished:
        if as_json:
            _print_json(_job_json(job))
        _fail(f"job {job_id} is still processing: try again, or pass --wait", EXIT_PROCESSING)
    _deliver(client, job, output, as_json)


@main.command(name="list")
@click.option("--status", "status_", type=click.Choice(STATUSES), help="Only jobs in this status.")
@click.option("--limit", type=click.IntRange(1, 1000), default=20, show_default=True)
@click.option("--page-token", help="The next_page_token a previous page gave.")
@_client_options
def list_jobs(
    client: Client, status_: Any, limit: int, page_token: str | None, as_json: bool
) -> None:
    """List jobs, newest first."""
    page = client.list(status=status_, limit=limit, page_token=page_token)
    if as_json:
        _print_json(
            {"jobs": [_job_json(job) for job in page.jobs], "next_page_token": page.next_page_token}
        )
        return
    table = Table("job_id", "status", "created", "updated", box=None)
    for job in page.jobs:
        table.add_row(job.job_id, job.status, _time(job.created_at), _time(job.updated_at))
    # Piped, rich would crop the table to 80 columns; ids must come out whole.
    Console(width=None if sys.stdout.isatty() else 200).print(table)
    if page.next_page_token:
        click.echo(f"more: --page-token {page.next_page_token}", err=True)


@main.command()
@click.argument("job_id")
@_client_options
def cancel(client: Client, job_id: str, as_json: bool) -> None:
    """Cancel a processing job."""
    job = client.cancel(job_id)
    if as_json:
        _print_json(_job_json(job))
    else:
        click.echo(f"cancelled {job.job_id}")


@main.command()
@click.argument("job_id")
@_client_options
def delete(client: Client, job_id: str, as_json: bool) -> None:
    """Delete a finished job (its input and result too)."""
    client.delete(job_id)
    if as_json:
        _print_json({"job_id": job_id, "deleted": True})
    else:
        click.echo(f"deleted {job_id}")
