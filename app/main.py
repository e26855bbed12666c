"""The ASGI application: ``create_app(settings)``, and ``app`` for ``uvicorn app.main:app``."""

import contextvars
import gc
import logging
import os
import signal
import sys
import threading
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from types import FrameType
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import HTTPException
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.openapi.utils import get_openapi
from fastapi.responses import HTMLResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from prometheus_client import CONTENT_TYPE_PLAIN_0_0_4, generate_latest
from pydantic import ValidationError
from starlette.routing import Router
from starlette.types import Receive, Scope, Send
from swagger_ui_bundle import swagger_ui_path

from app import api, api_docs
from app.auth import ApiKeys
from app.config import Settings, redact
from app.edge import Edge
from app.logs import REQUEST_ID_HEADER, configure_logging, current_request_id
from app.metrics import HttpMetrics, ScrapeTimeGauges, count_refused
from app.protocol import HttpProtocol
from app.retention import Retention
from app.runner import JobRunner
from app.schemas import EXAMPLE_JOB_ID, job_request_schema
from app.store import StoreSetupError, StoreUnavailableError, make_store
from app.waiters import StatusWaiters
from app.workers import CpuWorkers, return_large_buffers_to_the_system

logger = logging.getLogger("app")

TITLE = "expand-reduce-service"
VERSION = "0.1.0"
DESCRIPTION = (
    "Submit a list of objects, get a job id, poll its status, fetch its result. Each object is "
    "split in two halves by uniflow's ExpandOp and merged back pairwise by its ReduceOp."
)
SWAGGER_ASSETS = "/static/swagger-ui"
# Paths open without an API key even when keys are on.
OPEN_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})
EXIT_CONFIG = 78  # EX_CONFIG: the configuration is wrong (the settings, or the database file)
EXIT_DATABASE_UNAVAILABLE = 69  # EX_UNAVAILABLE: the database could not be reached in time


def load_settings() -> Settings:
    """Read the settings; refuse to start, saying what is wrong, if they do not fit together."""
    try:
        return Settings()
    except ValidationError as error:
        # In the format asked for, if that much can be read: a log collector expecting JSON
        # should get this too.
        as_json = os.environ.get("LOG_FORMAT", "").strip().lower() == "json"
        if as_json:
            configure_logging("INFO", "json")
        for problem in error.errors():
            name = "_".join(str(part) for part in problem["loc"]).upper()
            message = problem["msg"].removeprefix("Value error, ")
            where = f"{name}: " if name and name not in message else ""
            if as_json:
                logger.critical("invalid settings: %s%s", where, message)
            else:
                sys.stderr.write(f"invalid settings: {where}{message}\n")
        raise SystemExit(EXIT_CONFIG) from None


def freeze_what_startup_made() -> None:
    """Keep the objects made by imports and startup out of every later garbage collection.

    They live as long as the process, and there are a lot of them (uniflow, pydantic,
    FastAPI): a full collection walked them all, 60-130 ms here, every few seconds under
    load, and those pauses were the status p99. Frozen, a full collection walks only what was
    made since (``gc.freeze``, as the gc module's documentation suggests for servers). Once
    per process: a second app in the same process (tests) leaves it be.
    """
    global _startup_frozen
    if not _startup_frozen:
        gc.collect()
        gc.freeze()
        _startup_frozen = True


_startup_frozen = False


def drain_on_signals(runner: JobRunner) -> Callable[[], None]:
    """Make SIGTERM/SIGINT start draining at once, then reach the server's own handler.

    uvicorn stops accepting connections on SIGTERM but lets open ones send requests while it
    waits for running tasks; those requests must learn that this process takes no new jobs.
    Returns a function that puts the previous handlers back.
    """
    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}

    def handler(sig: int, frame: FrameType | None) -> None:
        # Whatever task the signal interrupted, its request or job is not what this is about.
        contextvars.Context().run(
            logger.info, "received %s: taking no new jobs", signal.Signals(sig).name
        )
        runner.begin_drain()
        chained = previous[signal.Signals(sig)]
        if callable(chained):
            chained(sig, frame)

    for sig, chained in previous.items():
        if callable(chained):  # only where a server handles the signal; never replace SIG_DFL
            signal.signal(sig, handler)

    def restore() -> None:
        for sig, chained in previous.items():
            if callable(chained):
                signal.signal(sig, chained)

    return restore


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the app; the store opens and the runner starts only when the app starts."""
    settings = settings or load_settings()
    # Now, not at startup: uvicorn logs its first lines between importing the app and
    # starting it, and they should look like the rest.
    configure_logging(settings.log_level, settings.log_format)
    HttpProtocol.configure(
        settings.body_timeout_seconds, count_refused if settings.metrics_enabled else None
    )
    keys = ApiKeys(settings.read_api_keys())

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        return_large_buffers_to_the_system()
        store = make_store(settings)
        try:
            await store.open()
        except StoreSetupError as error:
            # Starlette would turn this into a traceback in uvicorn's log; an operator needs
            # one line naming the file, and a process that does not come up.
            logger.critical("refusing to start: %s", error)
            os._exit(EXIT_CONFIG)
        except StoreUnavailableError as error:
            logger.critical("cannot start: %s", error)
            os._exit(EXIT_DATABASE_UNAVAILABLE)
        workers = CpuWorkers(
            settings.flow_processes,
            settings.flow_process_threshold_bytes,
            (settings.log_level, settings.log_format),
        )
        workers.start()
        runner = JobRunner(store, workers, settings)
        waiters = StatusWaiters(store, settings.long_poll_max_waiters)
        app.state.services = api.Services(settings, store, runner, workers, keys, waiters)
        app.state.scrape_time = ScrapeTimeGauges(store.count_unfinished, lambda: runner.accepting)
        await runner.start()
        retention = Retention(store, settings)
        retention.start()
        restore_signals = drain_on_signals(runner)
        freeze_what_startup_made()
        logger.info("serving jobs from %s as %s", redact(settings.database_url), runner.owner)
        try:
            yield
        finally:
            restore_signals()
            await runner.stop()
            await retention.stop()
            await waiters.close()
            workers.close()
            await store.close()
            logger.info("stopped")

    app = FastAPI(
        title=TITLE,
        version=VERSION,
        description=DESCRIPTION,
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
        # The routes are the app's own rather than an included router: FastAPI resolves an
        # included router's routes again on every request, a tenth of a small request's cost.
        routes=list(api.router.routes),
    )
    answer_either_slash(app.router)
    app.mount(SWAGGER_ASSETS, StaticFiles(directory=str(swagger_ui_path)), name="swagger-ui")

    @app.get("/docs", include_in_schema=False)
    async def swagger_ui() -> HTMLResponse:
        # Served from the app itself: the default CDN assets leave a blank page offline.
        return get_swagger_ui_html(
            openapi_url="/openapi.json",
            title=f"{TITLE} — API",
            swagger_js_url=f"{SWAGGER_ASSETS}/swagger-ui-bundle.js",
            swagger_css_url=f"{SWAGGER_ASSETS}/swagger-ui.css",
            swagger_favicon_url=f"{SWAGGER_ASSETS}/favicon-32x32.png",
        )

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = build_openapi(app, settings, keys.required)
        return app.openapi_schema

    if settings.metrics_enabled:

        @app.get("/metrics", include_in_schema=False)
        async def prometheus_metrics(request: Request) -> Response:
            # Open like /healthz even with API keys on: a scraper has no tenant.
            await request.app.state.scrape_time.refresh()
            return Response(generate_latest(), media_type=CONTENT_TYPE_PLAIN_0_0_4)

    app.add_middleware(Edge, metrics=HttpMetrics(app.routes) if settings.metrics_enabled else None)
    app.openapi = openapi  # type: ignore[method-assign]
    app.add_exception_handler(StoreUnavailableError, store_unavailable)
    app.add_exception_handler(Exception, internal_error)
    return app


def answer_either_slash(router: Router) -> None:
    """Answer a path with a trailing slash too many (or one too few) as the path itself.

    Starlette would answer 307 with an empty body, and curl without ``-L`` prints nothing.
    Only paths no route matches pay for this: the router tries the other form once.
    """
    not_found = router.default
    router.redirect_slashes = False

    async def other_form(scope: Scope, receive: Receive, send: Send) -> None:
        path = scope["path"]
        if scope["type"] != "http" or path == "/" or "slash_retried" in scope:
            await not_found(scope, receive, send)
            return
        retried = {**scope, "path": path[:-1] if path.endswith("/") else f"{path}/"}
        retried["slash_retried"] = True
        try:
            await router.app(retried, receive, send)
        finally:
            # For the metrics: the route that answered, as if the path had matched it.
            for key in ("route", "endpoint"):
                if key in retried:
                    scope[key] = retried[key]

    router.default = other_form


def build_openapi(app: FastAPI, settings: Settings, keys_required: bool) -> dict[str, Any]:
    """FastAPI's schema, with the submission body (read by hand, so FastAPI cannot see it).

    With API keys on, the bearer scheme is on every job route (Swagger's Authorize button).
    """
    schema = get_openapi(
        title=app.title, version=app.version, description=app.description, routes=app.routes
    )
    submit = schema["paths"][api.SUBMIT_PATH]["post"]
    submit["requestBody"] = {
        "required": True,
        "content": {"application/json": {"schema": job_request_schema(settings.limits)}},
        # What JSON Schema cannot say: a client (expand-reduce's CLI) checks it before sending.
        "x-max-body-bytes": settings.max_body_bytes,
    }
    components = schema.setdefault("components", {})
    for path, operations in schema["paths"].items():
        for operation in operations.values():
            for parameter in operation.get("parameters", ()):
                if parameter["name"] == "job_id":
                    # Declared a plain str, so a malformed id is a 404 (not FastAPI's 422).
                    parameter["description"] = "The job_id the submission answered"
                    parameter["schema"] = {"type": "string", "format": "uuid"}
                    parameter["example"] = EXAMPLE_JOB_ID
            # The job_id routes answer a malformed id with 404: FastAPI's own 422 is never sent.
            default_422 = operation["responses"].get("422", {})
            if "HTTPValidationError" in str(default_422):
                del operation["responses"]["422"]
            if keys_required and path not in OPEN_PATHS:
                operation["security"] = [{"bearerAuth": []}]
                operation["responses"]["401"] = api_docs.UNAUTHORIZED_DOC_SCHEMA
    components.get("schemas", {}).pop("HTTPValidationError", None)
    components.get("schemas", {}).pop("ValidationError", None)
    if keys_required:
        components["securitySchemes"] = {
            "bearerAuth": {
                "type": "http",
                "scheme": "bearer",
                "description": "One of the service's API keys (API_KEYS, API_KEYS_FILE)",
            }
        }
    return schema


async def store_unavailable(request: Request, error: Exception) -> JSONResponse:
    """Busy, locked, read-only or full database: 503, so clients retry instead of giving up."""
    logger.warning("%s %s: %s", request.method, request.url.path, error)
    reason = getattr(error, "reason", "the database is not answering")
    return JSONResponse(
        {"detail": f"The job store is unavailable ({reason}); retry shortly"},
        status_code=503,
        headers={"Retry-After": "1"},
    )


async def internal_error(request: Request, error: Exception) -> JSONResponse:
    """Log the traceback; tell the client only that it was our fault."""
    if isinstance(error, HTTPException):  # pragma: no cover  # FastAPI handles these itself
        raise error
    logger.error("%s %s failed", request.method, request.url.path, exc_info=error)
    # Answered outside the request-id middleware, which cannot add its header here.
    request_id = current_request_id()
    headers = {REQUEST_ID_HEADER: request_id} if request_id else None
    return JSONResponse({"detail": "Internal server error"}, status_code=500, headers=headers)


app = create_app()
