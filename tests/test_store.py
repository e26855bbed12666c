"""The stores: the lease protocol with a controllable clock, on both backends; SQLite's files.

The tests taking ``store`` run on SQLite and on PostgreSQL; those about SQLite's own schema,
migrations and files take ``sqlite_store`` or a path.
"""

import sqlite3
from collections.abc import AsyncIterator
from contextlib import closing
from pathlib import Path
from typing import Any

import orjson
import pytest

from app.config import Settings
from app.jobs import Claim, JobStatus
from app.store import (
    JobStore,
    LeasePolicy,
    StoreConflictError,
    StoreCorruptError,
    open_store,
)
from app.store.sqlite import MIGRATIONS, SQLiteJobStore
from tests.conftest import FreshDatabase

JOB = "11111111-1111-4111-8111-111111111111"
OTHER = "22222222-2222-4222-8222-222222222222"
POLICY = LeasePolicy(lease_seconds=30, claim_grace_seconds=5, max_attempts=3)


class FakeClock:
    """Time that moves only when a test says so."""

    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def store_settings(database: FreshDatabase) -> Settings:
    return Settings(
        database_url=database.url,
        job_lease_seconds=POLICY.lease_seconds,
        job_claim_grace_seconds=POLICY.claim_grace_seconds,
        job_max_attempts=POLICY.max_attempts,
    )


@pytest.fixture
async def store(database: FreshDatabase, clock: FakeClock) -> AsyncIterator[JobStore]:
    job_store = open_store(store_settings(database), clock)
    await job_store.open()
    yield job_store
    await job_store.close()


@pytest.fixture
async def sqlite_store(db_path: Path, clock: FakeClock) -> AsyncIterator[SQLiteJobStore]:
    job_store = SQLiteJobStore(db_path, POLICY, clock=clock)
    await job_store.open()
    yield job_store
    await job_store.close()


async def claimed(store: JobStore, input_json: str = "[{}]", owner: str = "me") -> Claim:
    """A new job (JOB), claimed by ``owner``."""
    await store.create_job(JOB, input_json)
    claim = await store.claim(JOB, owner)
    assert claim is not None
    return claim


def columns(db_path: Path) -> dict[str, str]:
    with closing(sqlite3.connect(db_path)) as db:
        return {row[1]: row[2] for row in db.execute("PRAGMA table_info(jobs)")}


async def test_sqlite_schema_has_the_seed_columns_and_records_its_version(
    sqlite_store: JobStore, db_path: Path
) -> None:
    found = columns(db_path)
    for name in ("job_id", "input_data", "output_data", "status"):
        assert found[name] == "TEXT"
    with closing(sqlite3.connect(db_path)) as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == len(MIGRATIONS)
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


async def test_reopening_an_existing_database_keeps_its_jobs(
    store: JobStore, database: FreshDatabase, clock: FakeClock
) -> None:
    await store.create_job(JOB, "[{}]")
    await store.close()
    reopened = open_store(store_settings(database), clock)
    await reopened.open()
    try:
        job = await reopened.get_job(JOB)
        assert job is not None
        assert job.status is JobStatus.PROCESSING
    finally:
        await reopened.close()


async def test_input_and_output_are_stored_as_real_json(
    store: JobStore, database: FreshDatabase
) -> None:
    claim = await claimed(store, '[{"a":1,"b":"x"}]')
    assert await store.finish(claim, output_json='[{"a b":"1 x"}]', error=None)
    [row] = database.query("SELECT input_data, output_data FROM jobs")
    assert orjson.loads(row[0]) == [{"a": 1, "b": "x"}]
    assert orjson.loads(row[1]) == [{"a b": "1 x"}]


async def test_timestamps_are_iso_8601_utc_and_updated_on_finish(
    store: JobStore, clock: FakeClock
) -> None:
    claim = await claimed(store)
    clock.advance(2)
    await store.finish(claim, output_json="[{}]", error=None)
    job = await store.get_job(JOB, with_output=True)
    assert job is not None
    assert job.created_at == "2027-01-15T08:00:00.000000Z"
    assert job.updated_at == "2027-01-15T08:00:02.000000Z"
    assert (job.status, job.output_data) == (JobStatus.COMPLETED, "[{}]")


async def test_a_live_lease_cannot_be_claimed_by_another_owner(store: JobStore) -> None:
    await store.create_job(JOB, "[{}]")
    assert await store.claim(JOB, "first") is not None
    assert await store.claim(JOB, "second") is None
    assert await store.claim_stale("second", 10) == []


async def test_a_stalled_claimants_late_finish_is_rejected(
    store: JobStore, clock: FakeClock
) -> None:
    stalled = await claimed(store, owner="stalled")
    clock.advance(POLICY.lease_seconds + 1)
    [taken] = await store.claim_stale("rescuer", 10)
    assert (taken.owner, taken.attempt) == ("rescuer", 2)
    assert await store.finish(stalled, output_json='["late"]', error=None) is False
    assert await store.finish(taken, output_json='["right"]', error=None) is True
    assert await store.finish(taken, output_json='["again"]', error=None) is False
    job = await store.get_job(JOB, with_output=True)
    assert job is not None
    assert job.output_data == '["right"]'


async def test_heartbeat_keeps_a_lease_alive_past_its_first_expiry(
    store: JobStore, clock: FakeClock
) -> None:
    claim = await claimed(store)
    clock.advance(POLICY.lease_seconds - 1)
    assert await store.renew([claim]) == {JOB}
    clock.advance(POLICY.lease_seconds - 1)
    assert await store.claim_stale("other", 10) == []
    clock.advance(2)
    assert [c.job_id for c in await store.claim_stale("other", 10)] == [JOB]
    assert await store.renew([claim]) == set()


async def test_unclaimed_job_waits_out_the_grace_time_before_a_sweep_takes_it(
    store: JobStore, clock: FakeClock
) -> None:
    await store.create_job(JOB, "[{}]")
    clock.advance(POLICY.claim_grace_seconds - 1)
    assert await store.claim_stale("sweeper", 10) == []
    clock.advance(2)
    [claim] = await store.claim_stale("sweeper", 10)
    assert (claim.job_id, claim.attempt) == (JOB, 1)


async def test_sweep_claims_no_more_than_its_limit(store: JobStore, clock: FakeClock) -> None:
    await store.create_job(JOB, "[{}]")
    await store.create_job(OTHER, "[{}]")
    clock.advance(POLICY.claim_grace_seconds + 1)
    assert len(await store.claim_stale("sweeper", 1)) == 1
    assert len(await store.claim_stale("sweeper", 0)) == 0
    assert len(await store.claim_stale("sweeper", 5)) == 1


async def test_job_interrupted_max_attempts_times_is_failed_not_left_processing(
    store: JobStore, clock: FakeClock
) -> None:
    await store.create_job(JOB, "[{}]")
    for attempt in range(1, POLICY.max_attempts + 1):
        clock.advance(POLICY.lease_seconds + 1)
        [claim] = await store.claim_stale(f"owner-{attempt}", 10)
        assert claim.attempt == attempt
    clock.advance(POLICY.lease_seconds + 1)
    assert await store.claim_stale("last", 10) == []
    job = await store.get_job(JOB)
    assert job is not None
    assert job.status is JobStatus.FAILED
    assert job.error is not None
    assert "interrupted too often" in job.error


async def test_released_job_can_be_claimed_at_once(store: JobStore, clock: FakeClock) -> None:
    claim = await claimed(store, owner="leaving")
    await store.release([claim])
    clock.advance(0.001)
    [taken] = await store.claim_stale("next", 10)
    assert (taken.job_id, taken.attempt) == (JOB, 2)


async def test_failed_outcome_keeps_the_error_and_no_output(store: JobStore) -> None:
    claim = await claimed(store)
    assert await store.finish(claim, output_json=None, error="it broke")
    job = await store.get_job(JOB, with_output=True)
    assert job is not None
    assert (job.status, job.output_data, job.error) == (JobStatus.FAILED, None, "it broke")


async def test_unknown_job_is_none(store: JobStore) -> None:
    assert await store.get_job(OTHER) is None
    assert await store.load_input(OTHER) is None
    assert await store.claim(OTHER, "me") is None


async def test_a_file_that_is_not_a_database_is_refused_by_name(
    tmp_path: Path, clock: FakeClock
) -> None:
    path = tmp_path / "notes.db"
    path.write_bytes(b"these are my notes, not a database" * 200)
    job_store = SQLiteJobStore(path, POLICY, clock=clock)
    with pytest.raises(StoreCorruptError, match=r"notes\.db"):
        await job_store.open()


async def test_a_database_from_a_newer_version_is_left_alone(
    db_path: Path, clock: FakeClock
) -> None:
    with closing(sqlite3.connect(db_path)) as db:
        db.execute(f"PRAGMA user_version = {len(MIGRATIONS) + 1}")
    job_store = SQLiteJobStore(db_path, POLICY, clock=clock)
    with pytest.raises(StoreCorruptError, match="newer"):
        await job_store.open()


async def test_a_version_1_database_is_upgraded_keeping_its_jobs_and_leases(
    db_path: Path, clock: FakeClock
) -> None:
    with closing(sqlite3.connect(db_path)) as db, db:
        db.executescript(MIGRATIONS[0])
        db.execute("PRAGMA user_version = 1")
        db.execute(
            "INSERT INTO jobs VALUES (?, '[{}]', '[{}]', 'completed', NULL, 't0', 't1', NULL, 1,"
            " NULL)",
            (OTHER,),
        )
        db.execute(
            "INSERT INTO jobs VALUES (?, '[{\"a\":1}]', NULL, 'processing', NULL, 't0', 't0',"
            " 'dead', 1, ?)",
            (JOB, clock.now - 1),
        )
    job_store = SQLiteJobStore(db_path, POLICY, clock=clock)
    await job_store.open()
    try:
        done = await job_store.get_job(OTHER, with_output=True)
        assert done is not None
        assert (done.status, done.output_data) == (JobStatus.COMPLETED, "[{}]")
        [claim] = await job_store.claim_stale("rescuer", 10)  # the dead owner's lease expired
        assert (claim.job_id, claim.attempt) == (JOB, 2)
        assert await job_store.load_input(JOB) == '[{"a":1}]'
    finally:
        await job_store.close()
    with closing(sqlite3.connect(db_path)) as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == len(MIGRATIONS)


async def test_sqlite_claims_and_heartbeats_do_not_rewrite_the_jobs_row(
    sqlite_store: JobStore, db_path: Path, clock: FakeClock
) -> None:
    store = sqlite_store
    # SQLite rewrites a whole row when any column changes; a megabyte input must not be
    # rewritten by every claim and heartbeat. The jobs row's change counter stays put.
    await store.create_job(JOB, '["' + "x" * 1_000_000 + '"]')
    with closing(sqlite3.connect(db_path)) as db:
        before = db.execute("SELECT rowid, updated_at FROM jobs").fetchone()
    claim = await store.claim(JOB, "me")
    assert claim is not None
    for _ in range(3):
        clock.advance(1)
        assert await store.renew([claim]) == {JOB}
    with closing(sqlite3.connect(db_path)) as db:
        assert db.execute("SELECT rowid, updated_at FROM jobs").fetchone() == before
        [(leases,)] = db.execute("SELECT count(*) FROM job_leases").fetchall()
    assert leases == 1


async def test_a_write_batch_the_database_rolled_back_is_run_again(
    store: JobStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = store._apply_writes_once  # type: ignore[attr-defined]
    calls = []

    async def conflicted_once(ops: Any) -> Any:
        calls.append(ops)
        if len(calls) == 1:
            raise StoreConflictError("deadlock detected", "the database is busy")
        return await real(ops)

    monkeypatch.setattr(store, "_apply_writes_once", conflicted_once)
    await store.create_job("job", "[{}]")
    assert len(calls) == 2
    assert await store.get_job("job") is not None


async def test_a_job_inserted_claimed_is_its_owners_until_the_lease_runs_out(
    store: JobStore, clock: FakeClock
) -> None:
    claim = await store.create_job(JOB, "[{}]", owner="accepting")
    assert claim == Claim(JOB, "accepting", 1)
    assert await store.claim(JOB, "other") is None
    clock.advance(POLICY.claim_grace_seconds + 1)  # no grace time: it is running
    assert await store.claim_stale("other", 10) == []
    assert await store.renew([claim]) == {JOB}
    assert await store.finish(claim, output_json="[{}]", error=None)
    assert await store.create_job(OTHER, "[{}]") is None  # no owner: unclaimed
    assert await store.claim(OTHER, "other") == Claim(OTHER, "other", 1)
