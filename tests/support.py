"""The test helpers, in one place: databases to look into, a fake clock, waiting with a deadline,
a fault-injecting database, a finish oracle, and real uvicorn servers with jobs to give them.

Fixtures live in ``conftest.py``; everything a test imports lives here.
"""

import asyncio
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager, closing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlsplit, urlunsplit

import httpx
import psycopg
from fastapi import FastAPI

from app.config import Settings
from app.flow import expand_reduce
from app.main import create_app
from app.store import JobStore, make_database, make_store
from app.store.sql import Database, Row, Transaction

ROOT = Path(__file__).resolve().parent.parent
# As make run, the image and the manifests serve it: with the protocol that bounds requests.
HTTP_PROTOCOL = ("--http", "app.protocol:HttpProtocol")


# Databases, seen from outside the app.


class FreshDatabase(Protocol):
    """A fresh, empty database for one test, and a way to look into it from outside the app."""

    @property
    def url(self) -> str: ...

    def count_jobs(self) -> int: ...

    def query(self, sql: str) -> list[tuple[Any, ...]]: ...

    def record_finishes(self) -> None: ...

    def finishes(self) -> dict[str, int]: ...


# Every change of a job to a final status is recorded by a trigger, so a result written twice
# shows: the oracle of "an outcome is written once".
SQLITE_RECORD_FINISHES = """
CREATE TABLE IF NOT EXISTS finishes (job_id TEXT NOT NULL, status TEXT NOT NULL);
CREATE TRIGGER IF NOT EXISTS record_finish AFTER UPDATE OF status ON jobs
    WHEN NEW.status <> 'processing'
BEGIN
    INSERT INTO finishes VALUES (NEW.job_id, NEW.status);
END;
"""
POSTGRES_RECORD_FINISHES = """
CREATE TABLE IF NOT EXISTS finishes (job_id TEXT NOT NULL, status TEXT NOT NULL);
CREATE OR REPLACE FUNCTION record_finish() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO finishes VALUES (NEW.job_id, NEW.status);
    RETURN NEW;
END $$;
CREATE OR REPLACE TRIGGER record_finish AFTER UPDATE OF status ON jobs
    FOR EACH ROW WHEN (NEW.status <> 'processing') EXECUTE FUNCTION record_finish();
"""
FINISHES = "SELECT job_id, count(*) FROM finishes GROUP BY job_id"


@dataclass
class SQLiteDatabase:
    path: Path

    @property
    def url(self) -> str:
        return f"sqlite:///{self.path}"

    def count_jobs(self) -> int:
        return count_jobs(self.path)

    def query(self, sql: str) -> list[tuple[Any, ...]]:
        with closing(sqlite3.connect(self.path)) as db, db:
            return db.execute(sql).fetchall()

    def record_finishes(self) -> None:
        """Install the finish oracle (the app must have created the schema)."""
        with closing(sqlite3.connect(self.path)) as db:
            db.executescript(SQLITE_RECORD_FINISHES)

    def finishes(self) -> dict[str, int]:
        """How many times each job was given a final status."""
        return dict(self.query(FINISHES))


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

    def record_finishes(self) -> None:
        """Install the finish oracle (the app must have created the schema)."""
        self.query(POSTGRES_RECORD_FINISHES)

    def finishes(self) -> dict[str, int]:
        """How many times each job was given a final status."""
        return {job_id: int(count) for job_id, count in self.query(FINISHES)}


def database_url(admin_url: str, name: str) -> str:
    """``admin_url`` pointing at the database ``name`` instead."""
    parts = urlsplit(admin_url)
    return urlunsplit(parts._replace(path=f"/{name}"))


def count_jobs(db_path: Path) -> int:
    """How many job rows the database file holds, read with a connection of its own."""
    with closing(sqlite3.connect(db_path)) as db:
        (count,) = db.execute("SELECT count(*) FROM jobs").fetchone()
        return int(count)


# Time.


class FakeClock:
    """Time that moves only when a test says so."""

    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


async def wait_until(
    condition: Callable[[], Awaitable[bool]], seconds: float = 10, what: str = "the condition"
) -> None:
    """Poll ``condition`` until it holds; fail after ``seconds``."""
    deadline = time.monotonic() + seconds
    while not await condition():
        assert time.monotonic() < deadline, f"{what} did not happen within {seconds} s"
        await asyncio.sleep(0.01)


def wait_until_sync(condition: Callable[[], bool], seconds: float = 30, what: str = "it") -> None:
    """Poll ``condition`` until it holds; fail after ``seconds`` (for tests with processes)."""
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, f"{what} did not happen within {seconds} s"
        time.sleep(0.02)


# Stores, and a database that misbehaves on request.


def store_settings(database: FreshDatabase, **overrides: Any) -> Settings:
    """Settings on ``database``: a 30 s lease, 5 s grace, 3 attempts unless overridden."""
    base = Settings(
        database_url=database.url,
        job_lease_seconds=30,
        job_claim_grace_seconds=5,
        job_max_attempts=3,
        flow_processes=0,
    )
    return Settings.model_validate(base.model_dump() | overrides)


@asynccontextmanager
async def opened_store(
    settings: Settings,
    clock: Callable[[], float],
    owner: str,
    database: Database | None = None,
) -> AsyncIterator[JobStore]:
    """A store of its own (a process, as far as the database can tell), open for the block."""
    store = make_store(settings, clock, owner=owner, database=database)
    await store.open()
    try:
        yield store
    finally:
        await store.close()


Fault = Callable[[str, Sequence[Any]], Exception | None]


@dataclass
class FaultyDatabase:
    """A real backend whose transactions fail or wait when a test says so.

    ``fault(sql, params)`` is asked before every statement in a transaction and may return an
    error to raise there (the real transaction then rolls back); while ``commit_gate`` is set
    and not open, every transaction waits before it commits, with ``at_gate`` set meanwhile.
    """

    real: Database
    fault: Fault = lambda sql, params: None
    commit_gate: asyncio.Event | None = None
    at_gate: asyncio.Event = field(default_factory=asyncio.Event)
    transactions: int = 0

    @property
    def dialect(self) -> Any:
        return self.real.dialect

    @property
    def name(self) -> str:
        return self.real.name

    @property
    def holds_owner_lock(self) -> bool:
        return self.real.holds_owner_lock

    async def open(self, owner: str) -> None:
        await self.real.open(owner)

    async def close(self) -> None:
        await self.real.close()

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[Transaction]:
        self.transactions += 1
        async with self.real.transaction() as tx:
            yield _FaultyTransaction(tx, self)
            if self.commit_gate is not None:
                self.at_gate.set()
                await self.commit_gate.wait()

    async def fetch(self, sql: str, params: Sequence[Any]) -> list[Row]:
        return await self.real.fetch(sql, params)

    def tend_owner_locks(self, holding_leases: Collection[str]) -> None:
        self.real.tend_owner_locks(holding_leases)

    async def take_purge_turn(self, tx: Transaction) -> bool:
        return await self.real.take_purge_turn(tx)

    async def return_free_space(self, tx: Transaction) -> None:
        await self.real.return_free_space(tx)

    async def admit_one_at_a_time(self, tx: Transaction) -> None:
        await self.real.admit_one_at_a_time(tx)

    async def dead_owners(self, tx: Transaction, owners: Sequence[str]) -> set[str]:
        return await self.real.dead_owners(tx, owners)

    async def announce_release(self, tx: Transaction) -> None:
        await self.real.announce_release(tx)

    def on_jobs_released(self, wake: Callable[[], None]) -> None:
        self.real.on_jobs_released(wake)


@dataclass
class _FaultyTransaction:
    tx: Transaction
    database: FaultyDatabase

    def _check(self, sql: str, params: Sequence[Any]) -> None:
        if (error := self.database.fault(sql, params)) is not None:
            raise error

    async def fetch(self, sql: str, params: Sequence[Any]) -> list[Row]:
        self._check(sql, params)
        return await self.tx.fetch(sql, params)

    async def execute(self, sql: str, params: Sequence[Any]) -> int:
        self._check(sql, params)
        return await self.tx.execute(sql, params)

    async def execute_many(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        for row in rows:
            self._check(sql, row)
        await self.tx.execute_many(sql, rows)


def faulty(settings: Settings) -> FaultyDatabase:
    """The backend ``settings`` name, wrapped so a test can make it misbehave."""
    return FaultyDatabase(make_database(settings))


# Apps and clients in-process.


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


# Real servers.


def free_port() -> int:
    with closing(socket.socket()) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Server:
    """A real ``uvicorn app.main:app`` process (the leader of its own process group)."""

    process: subprocess.Popen[bytes]
    base_url: str
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def signal_group(self, sig: signal.Signals) -> None:
        """Send ``sig`` to the server and every process it started."""
        os.killpg(self.process.pid, sig)


def start_server(
    database: Path | str, log_path: Path, extra_env: dict[str, str] | None = None
) -> Server:
    """Start uvicorn on a free port, on a SQLite file or a database URL; wait for /healthz."""
    port = free_port()
    url = f"sqlite:///{database}" if isinstance(database, Path) else database
    env = {**os.environ, "DATABASE_URL": url, **(extra_env or {})}
    command = [
        sys.executable,
        "-m",
        "uvicorn",
        "app.main:app",
        *HTTP_PROTOCOL,
        "--host",
        "127.0.0.1",
    ]
    command += ["--port", str(port), "--timeout-graceful-shutdown", "10"]
    with log_path.open("ab") as log:
        process = subprocess.Popen(
            command, cwd=ROOT, env=env, stdout=log, stderr=log, start_new_session=True
        )
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


# Jobs to give them.


def big_job(number: int, items: int = 4000, keys: int = 7) -> list[dict[str, Any]]:
    """A job of ``items`` objects of ``keys`` + 1 keys, its values unique to job ``number``."""
    return [
        {f"key{k}": f"job{number}-item{i}-value{k}" for k in range(keys)} | {"n": i}
        for i in range(items)
    ]


def submit_all(server: Server, jobs: list[list[dict[str, Any]]]) -> list[str]:
    """Submit every job at once, so a backlog builds up behind the running ones."""

    def submit(items: list[dict[str, Any]]) -> str:
        with httpx.Client(base_url=server.base_url, timeout=60) as client:
            response = client.post("/expand_reduce_flow/", json={"job": {"input_data": items}})
        assert response.status_code == 202, response.text
        job_id: str = response.json()["job_id"]
        return job_id

    with ThreadPoolExecutor(len(jobs)) as pool:
        return list(pool.map(submit, jobs))


async def submit_one(client: httpx.AsyncClient, number: int) -> tuple[str, list[Any]]:
    """Submit a one-object job unique to ``number``; return its id and input."""
    items = [{"client": str(number), "a": number, "b": f"x{number}", "c": number % 2 == 0}]
    response = await client.post("/expand_reduce_flow/", json={"job": {"input_data": items}})
    assert response.status_code == 202, response.text
    job_id: str = response.json()["job_id"]
    return job_id, items


def assert_all_complete_with_their_own_results(
    server: Server, ids: list[str], jobs: list[list[dict[str, Any]]], within: float = 90
) -> None:
    """Every job completes within ``within`` seconds, each with its own input's result."""
    deadline = time.monotonic() + within
    pending = dict(zip(ids, jobs, strict=True))
    with httpx.Client(base_url=server.base_url, timeout=30) as client:
        while pending and time.monotonic() < deadline:
            for job_id in list(pending):
                response = client.get(f"/job_result/{job_id}")
                if response.status_code == 202:
                    continue
                body = response.json()
                assert body["status"] == "completed", body
                assert body["result"] == expand_reduce(pending.pop(job_id))
            time.sleep(0.05)
    assert not pending, f"{len(pending)} jobs never completed:\n{server.log()[-3000:]}"


def statuses(database: FreshDatabase) -> dict[str, str]:
    """Every job's status, read from the database directly."""
    return dict(database.query("SELECT job_id, status FROM jobs"))


def held_by(database: FreshDatabase, server: Server) -> int:
    """How many jobs this server holds a lease or reservation on (its owner id has its pid)."""
    owner = f"%:{server.process.pid}:%"
    [(count,)] = database.query(f"SELECT count(*) FROM job_leases WHERE owner LIKE '{owner}'")
    return int(count)


def children_of(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        found += [int(child) for child in (task / "children").read_text().split()]
    return found


def is_running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"
