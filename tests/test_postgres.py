"""What is PostgreSQL's own: its schema and migrations, row locks between replicas, lost
connections. (The API, runner and lease suites run on it too, through ``database``.)"""

import asyncio
import contextlib
import subprocess
import sys
from collections.abc import AsyncIterator

import psycopg
import pytest

from app.config import Settings
from app.jobs import Claim, JobStatus
from app.main import EXIT_DATABASE_UNAVAILABLE
from app.store import JobStore, StoreCorruptError, open_store
from app.store.postgres import MIGRATIONS, PostgresJobStore
from tests.conftest import ROOT, PostgresDatabase, free_port, serving
from tests.test_runner import make_runner
from tests.test_store import POLICY, FakeClock, store_settings

JOB = {"job": {"input_data": [{"a": "1", "b": "2"}]}}


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@contextlib.asynccontextmanager
async def opened(postgres: PostgresDatabase, clock: FakeClock) -> AsyncIterator[JobStore]:
    store = open_store(store_settings(postgres), clock)
    await store.open()
    try:
        yield store
    finally:
        await store.close()


async def test_schema_has_the_seed_columns_as_text_and_records_its_version(
    postgres: PostgresDatabase, clock: FakeClock
) -> None:
    async with opened(postgres, clock):
        pass
    columns = dict(
        postgres.query(
            "SELECT column_name, data_type FROM information_schema.columns "
            "WHERE table_name = 'jobs'"
        )
    )
    assert set(columns) == {
        "job_id",
        "status",
        "created_at",
        "updated_at",
        "error",
        "input_data",
        "output_data",
    }
    assert columns["input_data"] == columns["output_data"] == "text"
    assert postgres.query("SELECT version FROM schema_version") == [(len(MIGRATIONS),)]


async def test_replicas_starting_together_create_the_schema_once(
    postgres: PostgresDatabase, clock: FakeClock
) -> None:
    stores = [open_store(store_settings(postgres), clock) for _ in range(4)]
    try:
        await asyncio.gather(*(store.open() for store in stores))
        await stores[0].create_job("a", "[{}]")
        assert await stores[3].get_job("a") is not None
    finally:
        await asyncio.gather(*(store.close() for store in stores))
    assert postgres.query("SELECT version FROM schema_version") == [(len(MIGRATIONS),)]


async def test_a_database_from_a_newer_version_is_left_alone(
    postgres: PostgresDatabase, clock: FakeClock
) -> None:
    postgres.query("CREATE TABLE schema_version (version INTEGER)")
    postgres.query(f"INSERT INTO schema_version VALUES ({len(MIGRATIONS) + 1})")
    store = PostgresJobStore(postgres.url, POLICY, clock=clock)
    with pytest.raises(StoreCorruptError, match="newer"):
        await store.open()


async def test_concurrent_sweeps_split_the_stale_jobs_between_them(
    postgres: PostgresDatabase, clock: FakeClock
) -> None:
    async with opened(postgres, clock) as first, opened(postgres, clock) as second:
        ids = [f"job-{n}" for n in range(200)]
        for job_id in ids:
            await first.create_job(job_id, "[{}]")
        clock.advance(POLICY.claim_grace_seconds + 1)
        rounds = await asyncio.gather(
            *(
                store.claim_stale(owner, 7)
                for _ in range(20)
                for store, owner in ((first, "first"), (second, "second"))
            )
        )
    claims = [claim for found in rounds for claim in found]
    assert sorted(claim.job_id for claim in claims) == sorted(ids)  # each exactly once
    assert {claim.owner for claim in claims} == {"first", "second"}


async def test_a_sweep_skips_rows_another_transaction_holds_instead_of_waiting(
    postgres: PostgresDatabase, clock: FakeClock
) -> None:
    async with opened(postgres, clock) as store:
        await store.create_job("held", "[{}]")
        await store.create_job("free", "[{}]")
        clock.advance(POLICY.claim_grace_seconds + 1)
        async with await psycopg.AsyncConnection.connect(postgres.url) as other:
            await other.execute("SELECT * FROM job_leases WHERE job_id = 'held' FOR UPDATE")
            claims = await asyncio.wait_for(store.claim_stale("me", 10), timeout=5)
            assert [claim.job_id for claim in claims] == ["free"]
            assert await asyncio.wait_for(store.claim("held", "me"), timeout=5) is None
        [claim] = await store.claim_stale("me", 10)
        assert claim == Claim("held", "me", 1)


class Proxy:
    """A TCP proxy in front of PostgreSQL that a test can take down and bring back."""

    def __init__(self, port: int) -> None:
        self.port = port
        self._server: asyncio.Server | None = None
        self._pipes: set[asyncio.Task[None]] = set()

    async def up(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", self.port)

    async def down(self) -> None:
        """Refuse new connections and cut the open ones, as a database host that went away."""
        assert self._server is not None
        self._server.close()
        for pipe in list(self._pipes):
            pipe.cancel()
        await asyncio.gather(*self._pipes, return_exceptions=True)
        await self._server.wait_closed()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        upstream_reader, upstream_writer = await asyncio.open_connection("127.0.0.1", 5432)
        for source, target in ((reader, upstream_writer), (upstream_reader, writer)):
            pipe = asyncio.create_task(self._pipe(source, target))
            self._pipes.add(pipe)
            pipe.add_done_callback(self._pipes.discard)

    @staticmethod
    async def _pipe(source: asyncio.StreamReader, target: asyncio.StreamWriter) -> None:
        try:
            while data := await source.read(65536):
                target.write(data)
                await target.drain()
        finally:
            target.close()


async def test_while_the_database_is_unreachable_submits_get_503_and_it_recovers(
    postgres: PostgresDatabase,
) -> None:
    proxy = Proxy(free_port())
    await proxy.up()
    url = postgres.url.replace("127.0.0.1:5432", f"127.0.0.1:{proxy.port}")
    assert url != postgres.url
    settings = Settings(database_url=url, flow_processes=0, database_timeout_seconds=1)
    async with serving(settings) as client:
        assert (await client.post("/expand_reduce_flow/", json=JOB)).status_code == 202
        await proxy.down()
        try:
            for _ in range(3):
                response = await client.post("/expand_reduce_flow/", json=JOB)
                assert response.status_code == 503, response.text
                assert response.headers["retry-after"] == "1"
                assert "database" in response.json()["detail"]
            assert (await client.get("/readyz")).status_code == 503
        finally:
            await proxy.up()
        for _ in range(100):  # the pool reconnects on its own
            if (await client.get("/readyz")).status_code == 200:
                break
            await asyncio.sleep(0.2)
        assert (await client.get("/readyz")).status_code == 200
        assert (await client.post("/expand_reduce_flow/", json=JOB)).status_code == 202
    await proxy.down()
    assert postgres.count_jobs() == 2


def test_a_server_that_cannot_reach_its_database_gives_up_with_one_line() -> None:
    env = {
        "DATABASE_URL": f"postgresql://postgres@127.0.0.1:{free_port()}/nowhere",
        "DATABASE_STARTUP_TIMEOUT_SECONDS": "2",
        "DATABASE_TIMEOUT_SECONDS": "1",
        "PATH": "/usr/bin:/bin",
    }
    command = [sys.executable, "-m", "uvicorn", "app.main:app", "--port", str(free_port())]
    run = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, timeout=60)
    log = run.stderr.decode()
    assert run.returncode == EXIT_DATABASE_UNAVAILABLE, log
    assert "Traceback" not in log
    [line] = [line for line in log.splitlines() if "cannot start" in line]
    assert "nowhere" in line


async def test_jobs_released_by_a_stopping_replica_are_swept_at_once_by_the_others(
    postgres: PostgresDatabase,
) -> None:
    settings = Settings(database_url=postgres.url, flow_processes=0, sweep_interval_seconds=60)
    leaving, staying = open_store(settings), open_store(settings)
    await leaving.open()
    await staying.open()
    runner = make_runner(staying, settings, owner="staying")
    try:
        await runner.start()  # sweeps once now, then not for a minute
        await leaving.create_job("job", '[{"a": "1", "b": "2"}]')
        claim = await leaving.claim("job", "leaving")
        assert claim is not None
        await asyncio.sleep(0.5)  # the first sweep is over; the listener is listening
        await leaving.release([claim])
        for _ in range(100):
            job = await staying.get_job("job", with_output=True)
            if job is not None and job.status is not JobStatus.PROCESSING:
                break
            await asyncio.sleep(0.05)
        assert job is not None
        assert (job.status, job.output_data) == (JobStatus.COMPLETED, '[{"a b":"1 2"}]')
    finally:
        await runner.stop()
        await leaving.close()
        await staying.close()


async def test_heartbeats_and_finishes_of_the_same_jobs_at_once_do_not_deadlock(
    postgres: PostgresDatabase, clock: FakeClock
) -> None:
    async with opened(postgres, clock) as store:
        for round_ in range(5):
            ids = [f"job-{round_}-{n:03}" for n in range(150)]
            for job_id in ids:
                await store.create_job(job_id, "[{}]")
            claims = [await store.claim(job_id, "me") for job_id in ids]
            held = [claim for claim in claims if claim is not None]
            assert len(held) == len(ids)
            # A heartbeat renews in one order while finishes arrive in the other.
            outcomes = await asyncio.gather(
                store.renew(held),
                *(store.finish(c, output_json="[{}]", error=None) for c in reversed(held)),
            )
            assert all(outcomes[1:])
    assert postgres.query("SELECT count(*) FROM jobs WHERE status = 'completed'") == [(750,)]
