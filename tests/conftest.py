"""Shared fixtures: a fresh database of each backend, settings on it, an app, a client, a server.

Tests that take ``database`` (or ``settings``, ``app``, ``client``) run once on SQLite and once
on PostgreSQL. PostgreSQL is the server at TEST_POSTGRES_ADMIN_URL (by default the local one,
user postgres); each test run creates a database of its own there and drops it at the end.
Without a reachable server those tests skip, saying so, except under CI=true, where they fail.
"""

import asyncio
import os
import socket
import sqlite3
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, closing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlsplit, urlunsplit

import httpx
import psycopg
import pytest
from fastapi import FastAPI
from hypothesis import HealthCheck
from hypothesis import settings as hypothesis_settings

from app.config import Settings
from app.main import create_app

# CI machines are shared and small: judge properties, not how fast examples are drawn.
hypothesis_settings.register_profile(
    "default", deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
hypothesis_settings.load_profile("default")

ROOT = Path(__file__).resolve().parent.parent
POSTGRES_ADMIN_URL = os.environ.get(
    "TEST_POSTGRES_ADMIN_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
)
BACKENDS = ["sqlite", "postgresql"]


class FreshDatabase(Protocol):
    """A fresh, empty database for one test, and a way to look into it from outside the app."""

    @property
    def url(self) -> str: ...

    def count_jobs(self) -> int: ...

    def query(self, sql: str) -> list[tuple[Any, ...]]: ...


@dataclass
class SQLiteDatabase:
    path: Path

    @property
    def url(self) -> str:
        return f"sqlite:///{self.path}"

    def count_jobs(self) -> int:
        return count_jobs(self.path)

    def query(self, sql: str) -> list[tuple[Any, ...]]:
        with closing(sqlite3.connect(self.path)) as db:
            return db.execute(sql).fetchall()


@dataclass
class PostgresDatabase:
    url: str

    def count_jobs(self) -> int:
        (count,) = self.query("SELECT count(*) FROM jobs")[0]
        return int(count)

    def query(self, sql: str) -> list[tuple[Any, ...]]:
        with psycopg.connect(self.url, autocommit=True) as db:
            cursor = db.execute(sql.encode())
            return cursor.fetchall() if cursor.description else []

    def reset(self) -> None:
        """Drop every table, so the app creates the schema afresh."""
        self.query("DROP TABLE IF EXISTS jobs, job_leases, schema_version, finishes CASCADE")


def database_url(admin_url: str, name: str) -> str:
    """``admin_url`` pointing at the database ``name`` instead."""
    parts = urlsplit(admin_url)
    return urlunsplit(parts._replace(path=f"/{name}"))


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """A database of this test run's own on the PostgreSQL server, dropped at the end."""
    try:
        admin = psycopg.connect(POSTGRES_ADMIN_URL, autocommit=True, connect_timeout=5)
    except psycopg.OperationalError as error:
        message = (
            f"PostgreSQL is not reachable at {POSTGRES_ADMIN_URL} ({error}); start it, or set "
            "TEST_POSTGRES_ADMIN_URL to a server where this user may create databases"
        )
        if os.environ.get("CI"):
            pytest.fail(f"{message}. CI runs these tests rather than skipping them.", False)
        pytest.skip(message)
    name = f"ers_test_{os.getpid()}_{uuid.uuid4().hex[:8]}"
    with admin:
        admin.execute(f'CREATE DATABASE "{name}"'.encode())
        try:
            yield database_url(POSTGRES_ADMIN_URL, name)
        finally:
            admin.execute(f'DROP DATABASE "{name}" WITH (FORCE)'.encode())


@pytest.fixture
def postgres(postgres_url: str) -> PostgresDatabase:
    """This run's PostgreSQL database, emptied for the test."""
    database = PostgresDatabase(postgres_url)
    database.reset()
    return database


@pytest.fixture(params=BACKENDS)
def database(request: pytest.FixtureRequest, tmp_path: Path) -> FreshDatabase:
    """An empty database of each backend in turn."""
    if request.param == "sqlite":
        return SQLiteDatabase(tmp_path / "jobs.db")
    postgres: PostgresDatabase = request.getfixturevalue("postgres")
    return postgres


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    """A SQLite file, for the tests about SQLite itself."""
    return tmp_path / "jobs.db"


@pytest.fixture
def settings(database: FreshDatabase) -> Settings:
    # Worker processes are off here (a spawn per test would dominate the suite); the tests that
    # are about them turn them on.
    return Settings(database_url=database.url, flow_processes=0)


@pytest.fixture
async def app(settings: Settings) -> AsyncIterator[FastAPI]:
    application = create_app(settings)
    async with application.router.lifespan_context(application):
        yield application


def asgi_client(app: FastAPI, *, raise_app_exceptions: bool = True) -> httpx.AsyncClient:
    """An async client talking to ``app`` in-process, over ASGI."""
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=raise_app_exceptions)
    return httpx.AsyncClient(transport=transport, base_url="http://testserver")


@asynccontextmanager
async def serving(settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    """A started app with these settings, and a client for it."""
    application = create_app(settings)
    async with application.router.lifespan_context(application), asgi_client(application) as c:
        yield c


@pytest.fixture
async def client(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    async with asgi_client(app) as asgi:
        yield asgi


async def result_once_finished(client: httpx.AsyncClient, job_id: str, seconds: float = 10) -> Any:
    """Wait for the job to finish and return its ``result``."""
    await wait_finished(client, job_id, seconds)
    return (await client.get(f"/job_result/{job_id}")).json()["result"]


async def wait_finished(client: httpx.AsyncClient, job_id: str, seconds: float = 10) -> str:
    """Poll the job's status until it is no longer processing; return that status."""
    deadline = time.monotonic() + seconds
    while True:
        status: str = (await client.get(f"/check_status/{job_id}")).json()["status"]
        if status != "processing":
            return status
        assert time.monotonic() < deadline, f"job {job_id} still processing after {seconds} s"
        await asyncio.sleep(0.01)


def count_jobs(db_path: Path) -> int:
    """How many job rows the database file holds, read with a connection of its own."""
    with closing(sqlite3.connect(db_path)) as db:
        (count,) = db.execute("SELECT count(*) FROM jobs").fetchone()
        return int(count)


def free_port() -> int:
    with closing(socket.socket()) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Server:
    """A real ``uvicorn app.main:app`` process."""

    process: subprocess.Popen[bytes]
    base_url: str
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def start_server(
    database: Path | str, log_path: Path, extra_env: dict[str, str] | None = None
) -> Server:
    """Start uvicorn on a free port, on a SQLite file or a database URL; wait for /healthz."""
    port = free_port()
    url = f"sqlite:///{database}" if isinstance(database, Path) else database
    env = {**os.environ, "DATABASE_URL": url, **(extra_env or {})}
    command = [sys.executable, "-m", "uvicorn", "app.main:app", "--host", "127.0.0.1"]
    command += ["--port", str(port), "--timeout-graceful-shutdown", "10"]
    with log_path.open("wb") as log:
        process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=log)
    server = Server(process, f"http://127.0.0.1:{port}", log_path)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode}:\n{server.log()}")
        try:
            if httpx.get(f"{server.base_url}/healthz", timeout=1).status_code == 200:
                return server
        except httpx.TransportError:
            time.sleep(0.1)
    process.kill()
    raise RuntimeError(f"server did not start:\n{server.log()}")


def stop_server(server: Server) -> None:
    server.process.terminate()
    try:
        server.process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        server.process.kill()
        server.process.wait()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    directory = tmp_path_factory.mktemp("server")
    running = start_server(directory / "jobs.db", directory / "server.log")
    yield running
    stop_server(running)
