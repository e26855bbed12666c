"""Shared fixtures: a fresh database of each backend, settings on it, an app, a client, a server.

Tests that take ``database`` (or ``settings``, ``app``, ``client``) run once on SQLite and once
on PostgreSQL. PostgreSQL is the server at TEST_POSTGRES_ADMIN_URL (by default the local one,
user postgres); each test run creates a database of its own there and drops it at the end.
Without a reachable server those tests skip, saying so, except under CI=true, where they fail.
Helpers that tests import are in ``tests/support.py``.
"""

import os
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import psycopg
import pytest
from fastapi import FastAPI
from hypothesis import HealthCheck
from hypothesis import settings as hypothesis_settings

from app.config import Settings
from app.main import create_app
from tests.support import (
    FakeClock,
    FreshDatabase,
    PostgresDatabase,
    Server,
    SQLiteDatabase,
    asgi_client,
    database_url,
    start_server,
    stop_server,
)

# CI machines are shared and small: judge properties, not how fast examples are drawn.
hypothesis_settings.register_profile(
    "default", deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
hypothesis_settings.load_profile("default")

POSTGRES_ADMIN_URL = os.environ.get(
    "TEST_POSTGRES_ADMIN_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
)
BACKENDS = ["sqlite", "postgresql"]


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
def clock() -> FakeClock:
    return FakeClock()


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


@pytest.fixture
async def client(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    async with asgi_client(app) as asgi:
        yield asgi


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    directory = tmp_path_factory.mktemp("server")
    running = start_server(directory / "jobs.db", directory / "server.log")
    yield running
    stop_server(running)
