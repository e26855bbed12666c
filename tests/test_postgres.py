"""What is PostgreSQL's own: its schema and migrations, row locks between replicas, lost
connections. (The API, runner and lease suites run on it too, through ``database``.)"""

import asyncio
import subprocess
import sys
import time
from collections.abc import Sequence
from typing import Any

import psycopg
import pytest

from app.config import Settings
from app.jobs import Claim, JobStatus
from app.main import EXIT_DATABASE_UNAVAILABLE
from app.runner import JobRunner
from app.store import (
    Idempotency,
    IdempotencyKeyReusedError,
    JobStore,
    QueueFullError,
    Replayed,
    StoreCorruptError,
    Swept,
    make_store,
)
from app.store.postgres import MIGRATIONS, OWNER_LOCK_SPACE, lock_session_name, owner_lock_key
from app.workers import CpuWorkers
from tests.support import (
    ROOT,
    FakeClock,
    PostgresDatabase,
    faulty,
    free_port,
    opened_store,
    serving,
    store_settings,
    wait_until,
    wait_until_sync,
)

JOB = {"job": {"input_data": [{"a": "1", "b": "2"}]}}
GRACE = 5


@pytest.fixture
def settings(postgres: PostgresDatabase) -> Settings:
    return store_settings(postgres)


async def test_schema_has_the_seed_columns_as_text_and_records_its_version(
    postgres: PostgresDatabase, settings: Settings, clock: FakeClock
) -> None:
    async with opened_store(settings, clock, "me"):
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
        "tenant",
        "idempotency_key",
        "request_hash",
    }
    assert columns["input_data"] == columns["output_data"] == "text"
    assert postgres.query("SELECT version FROM schema_version") == [(len(MIGRATIONS),)]


async def test_replicas_starting_together_create_the_schema_once(
    postgres: PostgresDatabase, settings: Settings, clock: FakeClock
) -> None:
    stores = [make_store(settings, clock, owner=f"replica-{n}") for n in range(4)]
    try:
        await asyncio.gather(*(store.open() for store in stores))
        await stores[0].create_job("a", "[{}]", claimed=False)
        assert await stores[3].get_job("a") is not None
    finally:
        await asyncio.gather(*(store.close() for store in stores))
    assert postgres.query("SELECT version FROM schema_version") == [(len(MIGRATIONS),)]


async def test_a_database_from_a_newer_version_is_left_alone(
    postgres: PostgresDatabase, settings: Settings, clock: FakeClock
) -> None:
    postgres.query("CREATE TABLE schema_version (version INTEGER)")
    postgres.query(f"INSERT INTO schema_version VALUES ({len(MIGRATIONS) + 1})")
    store = make_store(settings, clock, owner="me")
    with pytest.raises(StoreCorruptError, match="newer"):
        await store.open()


async def test_a_version_1_database_is_upgraded_with_the_lengths_of_its_inputs(
    postgres: PostgresDatabase, settings: Settings, clock: FakeClock
) -> None:
    postgres.query(MIGRATIONS[0])
    postgres.query("CREATE TABLE schema_version (version INTEGER)")
    postgres.query("INSERT INTO schema_version VALUES (1)")
    postgres.query(
        "INSERT INTO jobs VALUES ('old', 'processing', 't0', 't0', NULL, '[{\"a\":\"1\"}]', NULL)"
    )
    postgres.query("INSERT INTO job_leases VALUES ('old', NULL, 0, 0)")
    async with opened_store(settings, clock, "me"):
        pass
    assert postgres.query("SELECT input_length FROM job_leases") == [(11,)]


async def test_concurrent_sweeps_split_the_stale_jobs_between_them(
    settings: Settings, clock: FakeClock
) -> None:
    async with (
        opened_store(settings, clock, "first") as first,
        opened_store(settings, clock, "second") as second,
    ):
        ids = [f"job-{n}" for n in range(200)]
        for job_id in ids:
            await first.create_job(job_id, "[{}]", claimed=False)
        clock.advance(GRACE + 1)
        rounds: list[Swept] = await asyncio.gather(
            *(store.sweep(slots=7, lanes=0) for _ in range(20) for store in (first, second))
        )
    claims = [claim for swept in rounds for claim in swept.small]
    assert sorted(claim.job_id for claim in claims) == sorted(ids)  # each exactly once
    assert {claim.owner for claim in claims} == {"first", "second"}


async def test_a_sweep_skips_rows_another_transaction_holds_instead_of_waiting(
    postgres: PostgresDatabase, settings: Settings, clock: FakeClock
) -> None:
    async with opened_store(settings, clock, "me") as store:
        await store.create_job("held", "[{}]", claimed=False)
        await store.create_job("free", "[{}]", claimed=False)
        clock.advance(GRACE + 1)
        async with await psycopg.AsyncConnection.connect(postgres.url) as other:
            await other.execute("SELECT * FROM job_leases WHERE job_id = 'held' FOR UPDATE")
            swept = await asyncio.wait_for(store.sweep(slots=10, lanes=0), timeout=5)
            assert [claim.job_id for claim in swept.small] == ["free"]
            assert await asyncio.wait_for(store.claim("held"), timeout=5) is None
        [claim] = (await store.sweep(slots=10, lanes=0)).small
        assert claim == Claim("held", "me", 1)


def owner_backend(postgres: PostgresDatabase, owner: str) -> int:
    """The server process of the session holding ``owner``'s liveness lock."""
    [(pid,)] = postgres.query(
        "SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND objsubid = 2 AND granted "
        f"AND classid::bigint = {OWNER_LOCK_SPACE} AND objid::bigint = {owner_lock_key(owner)}"
    )
    return int(pid)


async def test_each_store_holds_its_owners_lock_on_a_session_of_its_own(
    postgres: PostgresDatabase, settings: Settings, clock: FakeClock
) -> None:
    async with opened_store(settings, clock, "one"), opened_store(settings, clock, "two"):
        assert owner_backend(postgres, "one") != owner_backend(postgres, "two")

    def released() -> bool:
        # A closed session's backend exits a moment after the client has gone; its locks with it.
        return postgres.query(
            f"SELECT count(*) FROM pg_locks WHERE classid::bigint = {OWNER_LOCK_SPACE} "
            "AND database = (SELECT oid FROM pg_database WHERE datname = current_database())"
        ) == [(0,)]

    wait_until_sync(released, seconds=5, what="both owner locks being released")


async def test_a_replica_whose_lock_session_ends_is_taken_over_at_once_and_claims_nothing_meanwhile(
    postgres: PostgresDatabase, settings: Settings, clock: FakeClock
) -> None:
    async with (
        opened_store(settings, clock, "cut-off") as cut_off,
        opened_store(settings, clock, "survivor") as survivor,
    ):
        running = await cut_off.create_job("running", "[{}]", claimed=True)
        await cut_off.create_job("waiting", "[{}]", claimed=False)
        assert (await survivor.sweep(slots=10, lanes=0)).small == []
        postgres.query(f"SELECT pg_terminate_backend({owner_backend(postgres, 'cut-off')})")
        # No lease ran out, but the lock is gone: the replica counts as dead.
        taken: list[Claim] = []

        async def all_taken() -> bool:
            taken.extend((await survivor.sweep(slots=10, lanes=0)).small)
            return len(taken) == 2

        await wait_until(all_taken, seconds=5, what="the survivor taking both jobs")
        assert sorted(c.job_id for c in taken) == ["running", "waiting"]
        assert await cut_off.finish(running, output_json="[]", error=None) is False

        def lock_held() -> bool:
            return bool(cut_off.database.holds_owner_lock)  # type: ignore[attr-defined]

        async def lock_lost() -> bool:
            return not lock_held()

        async def lock_back() -> bool:
            return lock_held()

        await wait_until(lock_lost, what="the replica noticing its lock is gone")
        # Meanwhile a new job is only reserved, and claimed once the lock is back.
        reserved = await cut_off.create_job("later", "[{}]", claimed=True)
        assert reserved == Claim("later", "cut-off", 0)
        assert await cut_off.claim("later") is None
        await wait_until(lock_back, what="the liveness lock coming back")
        assert await cut_off.claim("later") == Claim("later", "cut-off", 1)


async def test_a_replica_ends_its_own_stale_lock_session_to_take_its_lock_back(
    postgres: PostgresDatabase, settings: Settings, clock: FakeClock
) -> None:
    """After a network break the server may keep the replica's old session, and its lock."""
    async with opened_store(settings, clock, "cut-off") as store:
        key = (OWNER_LOCK_SPACE, owner_lock_key("cut-off"))
        key_args = tuple(k - 2**32 if k >= 2**31 else k for k in key)
        async with await psycopg.AsyncConnection.connect(
            postgres.url, autocommit=True, application_name=lock_session_name("cut-off")
        ) as stale:
            postgres.query(f"SELECT pg_terminate_backend({owner_backend(postgres, 'cut-off')})")
            # The session the server still keeps for the replica's side of the break.
            await stale.execute("SELECT pg_advisory_lock(%s, %s)", key_args)

            async def relocked() -> bool:
                holder = postgres.query(
                    "SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND objsubid = 2 "
                    f"AND granted AND classid::bigint = {key[0]} AND objid::bigint = {key[1]}"
                )
                return bool(holder) and holder != [(stale.info.backend_pid,)]

            await wait_until(relocked, seconds=15, what="the replica taking its lock back")
            with pytest.raises(psycopg.OperationalError):
                await stale.execute("SELECT 1")
        assert await store.create_job("after", "[{}]", claimed=True) == Claim("after", "cut-off", 1)


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


class CountingStore:
    """A store that says when each of its sweeps is done."""

    def __init__(self, store: JobStore) -> None:
        self._store = store
        self.swept = asyncio.Event()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)

    async def sweep(self, *, slots: int, lanes: int) -> Swept:
        try:
            return await self._store.sweep(slots=slots, lanes=lanes)
        finally:
            self.swept.set()


async def test_jobs_released_by_a_stopping_replica_are_swept_at_once_by_the_others(
    postgres: PostgresDatabase,
) -> None:
    settings = Settings(
        database_url=postgres.url,
        flow_processes=0,
        job_lease_seconds=120,
        sweep_interval_seconds=60,
    )
    async with (
        opened_store(settings, time.time, "leaving") as leaving,
        opened_store(settings, time.time, "staying") as staying,
    ):
        counting = CountingStore(staying)
        runner = JobRunner(counting, CpuWorkers(0, 1 << 20), settings)
        try:
            await runner.start()
            await counting.swept.wait()  # the first sweep is over; the next is a minute away
            claim = await leaving.create_job("job", '[{"a": "1", "b": "2"}]', claimed=True)
            await leaving.release([claim])

            async def finished() -> bool:
                job = await staying.get_job("job")
                return job is not None and job.status is not JobStatus.PROCESSING

            await wait_until(finished, seconds=5, what="the released job being run")
            job = await staying.get_job("job", with_output=True)
            assert job is not None
            assert (job.status, job.output_data) == (JobStatus.COMPLETED, '[{"a b":"1 2"}]')
        finally:
            await runner.stop()


async def test_heartbeats_and_finishes_of_the_same_jobs_at_once_do_not_deadlock(
    postgres: PostgresDatabase, settings: Settings, clock: FakeClock
) -> None:
    async with opened_store(settings, clock, "me") as store:
        for round_ in range(5):
            ids = [f"job-{round_}-{n:03}" for n in range(150)]
            held = [await store.create_job(job_id, "[{}]", claimed=True) for job_id in ids]
            # A heartbeat renews in one order while finishes arrive in the other.
            outcomes = await asyncio.gather(
                store.renew(),
                *(store.finish(c, output_json="[{}]", error=None) for c in reversed(held)),
            )
            assert all(outcomes[1:])
    assert postgres.query("SELECT count(*) FROM jobs WHERE status = 'completed'") == [(750,)]


@pytest.mark.parametrize("same_request", [True, False])
async def test_an_idempotency_key_committed_by_another_replica_mid_insert_is_answered_as_used(
    postgres: PostgresDatabase, settings: Settings, clock: FakeClock, same_request: bool
) -> None:
    """The race a read-then-write would lose: the key is committed elsewhere between this
    replica's look-up and its insert. The unique index decides; nothing fails or doubles."""
    database = faulty(settings)
    raced: list[str] = []

    def other_replica_commits_first(sql: str, params: Sequence[Any]) -> None:
        if "ON CONFLICT" in sql and not raced:
            raced.append(sql)
            postgres.query(
                "INSERT INTO jobs (job_id, status, tenant, created_at, updated_at, "
                "idempotency_key, request_hash, input_data) VALUES ('theirs', 'processing', '', "
                "'2026-01-01T00:00:00.000000Z', '2026-01-01T00:00:00.000000Z', 'k', 'h', '[]')"
            )
        return None

    database.fault = other_replica_commits_first
    request = Idempotency("k", "h" if same_request else "other")
    async with opened_store(settings, clock, "me", database=database) as store:
        if same_request:
            assert await store.create_job(
                "mine", "[{}]", claimed=True, idempotency=request
            ) == Replayed("theirs")
        else:
            with pytest.raises(IdempotencyKeyReusedError, match="'k'"):
                await store.create_job("mine", "[{}]", claimed=True, idempotency=request)
        assert list(store.held) == []
    assert raced
    assert [job for (job,) in postgres.query("SELECT job_id FROM jobs")] == ["theirs"]
    assert postgres.query("SELECT job_id FROM job_leases") == []


async def test_two_replicas_inserting_at_once_never_pass_max_queued_jobs_together(
    postgres: PostgresDatabase, settings: Settings, clock: FakeClock
) -> None:
    """Found in review: each replica's count saw room, and together they overshot."""
    bounded = settings.model_copy(update={"max_queued_jobs": 5})
    async with (
        opened_store(bounded, clock, "a") as first,
        opened_store(bounded, clock, "b") as second,
    ):
        results = await asyncio.gather(
            *(
                store.create_job(f"job-{n}", "[{}]", claimed=False)
                for n in range(40)
                for store in [(first, second)[n % 2]]
            ),
            return_exceptions=True,
        )
    assert sum(isinstance(r, Claim) for r in results) == 5
    assert all(isinstance(r, (Claim, QueueFullError)) for r in results), results
    assert postgres.count_jobs() == 5
