"""The stores: the lease protocol with a controllable clock, on both backends; SQLite's files.

Each store is one process as far as the database can tell (an owner id and its liveness lock),
so a test with several stores on one database has several processes. The tests taking
``store`` run on SQLite and on PostgreSQL; those about SQLite's own schema, migrations and
files take a path.
"""

import asyncio
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
    StoreConflictError,
    StoreCorruptError,
    StoreSetupError,
    StoreUnavailableError,
    make_store,
)
from app.store.sqlite import MIGRATIONS
from tests.support import (
    FakeClock,
    FreshDatabase,
    faulty,
    opened_store,
    store_settings,
)

JOB = "11111111-1111-4111-8111-111111111111"
OTHER = "22222222-2222-4222-8222-222222222222"
LEASE, GRACE, MAX_ATTEMPTS = 30, 5, 3
BIG = '[{"k":"' + "v" * 200_000 + '"}]'


@pytest.fixture
def settings(database: FreshDatabase) -> Settings:
    return store_settings(database)


@pytest.fixture
async def store(settings: Settings, clock: FakeClock) -> AsyncIterator[JobStore]:
    async with opened_store(settings, clock, "me") as opened:
        yield opened


@pytest.fixture
async def other(settings: Settings, clock: FakeClock, store: JobStore) -> AsyncIterator[JobStore]:
    """A second live process on the same database."""
    async with opened_store(settings, clock, "other") as opened:
        yield opened


async def claimed(store: JobStore, job_id: str = JOB, input_json: str = "[{}]") -> Claim:
    """A new job, claimed by ``store``'s process."""
    claim = await store.create_job(job_id, input_json, claimed=True)
    assert claim == Claim(job_id, store.owner, 1)
    return claim


def columns(db_path: Path) -> dict[str, str]:
    with closing(sqlite3.connect(db_path)) as db:
        return {row[1]: row[2] for row in db.execute("PRAGMA table_info(jobs)")}


async def test_sqlite_schema_has_the_seed_columns_and_records_its_version(
    db_path: Path, clock: FakeClock
) -> None:
    async with opened_store(Settings(database_url=f"sqlite:///{db_path}"), clock, "me"):
        found = columns(db_path)
    for name in ("job_id", "input_data", "output_data", "status"):
        assert found[name] == "TEXT"
    with closing(sqlite3.connect(db_path)) as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == len(MIGRATIONS)
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


async def test_reopening_an_existing_database_keeps_its_jobs(
    store: JobStore, settings: Settings, clock: FakeClock
) -> None:
    await store.create_job(JOB, "[{}]", claimed=False)
    await store.close()
    async with opened_store(settings, clock, "next") as reopened:
        job = await reopened.get_job(JOB)
    assert job is not None
    assert job.status is JobStatus.PROCESSING


async def test_input_and_output_are_stored_as_real_json(
    store: JobStore, database: FreshDatabase
) -> None:
    claim = await claimed(store, input_json='[{"a":1,"b":"x"}]')
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


async def test_a_claim_is_held_from_its_commit_until_its_finish(store: JobStore) -> None:
    claim = await claimed(store)
    assert list(store.held) == [claim]
    assert await store.finish(claim, output_json="[{}]", error=None)
    assert list(store.held) == []


async def test_a_live_lease_cannot_be_claimed_by_another_process(
    store: JobStore, other: JobStore, clock: FakeClock
) -> None:
    await claimed(store)
    assert await other.claim(JOB) is None
    clock.advance(LEASE - 1)
    assert (await other.sweep(slots=10, lanes=10)).small == []


async def test_a_stalled_claimants_late_finish_is_rejected(
    store: JobStore, other: JobStore, clock: FakeClock
) -> None:
    stalled = await claimed(store)
    clock.advance(LEASE + 1)
    [taken] = (await other.sweep(slots=10, lanes=10)).small
    assert taken == Claim(JOB, "other", 2)
    assert await store.finish(stalled, output_json='["late"]', error=None) is False
    assert stalled not in store.held
    assert await other.finish(taken, output_json='["right"]', error=None) is True
    assert await other.finish(taken, output_json='["again"]', error=None) is False
    job = await store.get_job(JOB, with_output=True)
    assert job is not None
    assert job.output_data == '["right"]'


async def test_a_heartbeat_keeps_a_lease_alive_past_its_first_expiry(
    store: JobStore, other: JobStore, clock: FakeClock
) -> None:
    claim = await claimed(store)
    clock.advance(LEASE - 1)
    assert await store.renew() == set()
    clock.advance(LEASE - 1)
    assert (await other.sweep(slots=10, lanes=10)).small == []
    clock.advance(2)
    assert (await other.sweep(slots=10, lanes=10)).small == [Claim(JOB, "other", 2)]
    assert await store.renew() == {claim}  # lost, and no longer held
    assert claim not in store.held


async def test_a_paused_process_renews_its_expired_lease_if_nobody_took_it(
    store: JobStore, other: JobStore, clock: FakeClock
) -> None:
    claim = await claimed(store)
    clock.advance(LEASE * 3)  # paused (SIGSTOP, a long GC, a slow disk) well past its lease
    assert await store.renew() == set()
    assert (await other.sweep(slots=10, lanes=10)).small == []
    assert await store.finish(claim, output_json="[{}]", error=None)


async def test_a_sweep_never_takes_a_job_its_own_process_holds(
    store: JobStore, database: FreshDatabase, clock: FakeClock
) -> None:
    claim = await claimed(store)
    clock.advance(LEASE * 3)  # the sweep wakes from the pause before the heartbeat does
    swept = await store.sweep(slots=10, lanes=10)
    assert (swept.small, swept.lost) == ([], set())
    assert database.query("SELECT attempts FROM job_leases") == [(1,)]
    assert list(store.held) == [claim]


async def test_a_reservation_is_its_owners_to_claim_until_its_grace_time_ends(
    store: JobStore, other: JobStore, clock: FakeClock
) -> None:
    reservation = await store.create_job(JOB, "[{}]", claimed=False)
    assert reservation == Claim(JOB, "me", 0)
    await store.create_job(OTHER, "[{}]", claimed=False)
    clock.advance(GRACE - 1)
    assert (await other.sweep(slots=10, lanes=10)).small == []
    assert await store.claim(JOB) == Claim(JOB, "me", 1)
    assert reservation not in store.held
    clock.advance(2)
    assert (await other.sweep(slots=10, lanes=10)).small == [Claim(OTHER, "other", 1)]
    assert await store.claim(OTHER) is None  # taken meanwhile: the reservation is gone
    assert Claim(OTHER, "me", 0) not in store.held


async def test_the_jobs_of_a_process_that_died_are_taken_at_once(
    settings: Settings, clock: FakeClock, store: JobStore
) -> None:
    async with opened_store(settings, clock, "doomed") as doomed:
        await doomed.create_job(JOB, "[{}]", claimed=True)
        await doomed.create_job(OTHER, "[{}]", claimed=False)
        assert (await store.sweep(slots=10, lanes=10)).small == []  # alive: nothing to take
    # Its store closed without releasing anything: the process is gone, its lock free.
    swept = await store.sweep(slots=10, lanes=10)
    assert sorted(swept.small, key=lambda c: c.job_id) == [
        Claim(JOB, "me", 2),
        Claim(OTHER, "me", 1),
    ]


async def test_a_sweep_claims_large_jobs_for_its_lanes_and_small_ones_for_the_slots_left(
    store: JobStore, other: JobStore, clock: FakeClock
) -> None:
    for n in range(3):
        await store.create_job(f"small-{n}", "[{}]", claimed=False)
        await store.create_job(f"large-{n}", BIG, claimed=False)
    clock.advance(GRACE + 1)
    first = await other.sweep(slots=3, lanes=1)
    assert [len(first.large), len(first.small)] == [1, 2]
    assert all(c.job_id.startswith("large") for c in first.large)
    assert all(c.job_id.startswith("small") for c in first.small)
    second = await other.sweep(slots=2, lanes=5)  # a lane is no use without a slot
    assert [len(second.large), len(second.small)] == [2, 0]
    third = await other.sweep(slots=5, lanes=5)
    assert [len(third.large), len(third.small)] == [0, 1]


async def test_a_job_started_max_attempts_times_is_failed_not_left_processing(
    settings: Settings, store: JobStore, clock: FakeClock
) -> None:
    await store.create_job(JOB, "[{}]", claimed=False)
    clock.advance(GRACE + 1)
    for attempt in range(1, MAX_ATTEMPTS + 1):
        async with opened_store(settings, clock, f"owner-{attempt}") as runner:
            [claim] = (await runner.sweep(slots=10, lanes=10)).small
            assert claim.attempt == attempt
        # ...and that process died running it.
    swept = await store.sweep(slots=10, lanes=10)
    assert (swept.small, swept.failed) == ([], [JOB])
    job = await store.get_job(JOB)
    assert job is not None
    assert job.status is JobStatus.FAILED
    assert job.error is not None
    assert "interrupted too often" in job.error
    assert "started 3 times" in job.error


async def test_a_released_job_can_be_claimed_at_once(
    store: JobStore, other: JobStore, clock: FakeClock
) -> None:
    claim = await claimed(store)
    reservation = await store.create_job(OTHER, "[{}]", claimed=False)
    await store.release([claim, reservation])
    assert list(store.held) == []
    clock.advance(0.001)
    swept = await other.sweep(slots=10, lanes=10)
    assert sorted(swept.small, key=lambda c: c.job_id) == [
        Claim(JOB, "other", 2),
        Claim(OTHER, "other", 1),
    ]


async def test_a_failed_outcome_keeps_the_error_and_no_output(store: JobStore) -> None:
    claim = await claimed(store)
    assert await store.finish(claim, output_json=None, error="it broke")
    job = await store.get_job(JOB, with_output=True)
    assert job is not None
    assert (job.status, job.output_data, job.error) == (JobStatus.FAILED, None, "it broke")


async def test_an_unknown_job_is_none(store: JobStore) -> None:
    assert await store.get_job(OTHER) is None
    assert await store.load_input(OTHER) is None
    assert await store.claim(OTHER) is None


async def test_a_store_that_stopped_claiming_only_reserves_and_sweeps_up_nothing(
    store: JobStore, clock: FakeClock
) -> None:
    await store.create_job(OTHER, "[{}]", claimed=False)
    clock.advance(GRACE + 1)
    store.stop_claiming()
    assert await store.create_job(JOB, "[{}]", claimed=True) == Claim(JOB, "me", 0)
    assert await store.claim(JOB) is None
    assert (await store.sweep(slots=10, lanes=10)).small == []


# The fence inside one group-commit batch.


async def test_a_stale_and_the_current_attempt_finishing_in_one_batch_only_the_current_lands(
    store: JobStore, other: JobStore, clock: FakeClock, database: FreshDatabase
) -> None:
    stale = await claimed(store)
    clock.advance(LEASE + 1)
    [current] = (await other.sweep(slots=10, lanes=10)).small
    database.record_finishes()
    # Both finishes go through one store's queue, so they share one transaction.
    landed = await asyncio.gather(
        other.finish(stale, output_json='["stale"]', error=None),
        other.finish(current, output_json='["current"]', error=None),
    )
    assert list(landed) == [False, True]
    job = await other.get_job(JOB, with_output=True)
    assert job is not None
    assert job.output_data == '["current"]'
    assert database.finishes() == {JOB: 1}


async def test_a_stale_attempt_finishing_leaves_the_live_attempt_of_the_same_job_held(
    settings: Settings, store: JobStore, clock: FakeClock
) -> None:
    stale = await claimed(store)
    clock.advance(LEASE + 1)
    async with opened_store(settings, clock, "rescuer") as rescuer:
        await rescuer.sweep(slots=10, lanes=10)  # attempt 2, then the rescuer stalls in turn
        clock.advance(LEASE + 1)
    swept = await store.sweep(slots=10, lanes=10)  # attempt 3, back to this process
    [live] = swept.small
    assert (live, swept.lost) == (Claim(JOB, "me", 3), {stale})
    # The run of attempt 1 is still going, and now finishes: only it is let go of.
    assert await store.finish(stale, output_json='["stale"]', error=None) is False
    assert list(store.held) == [live]
    clock.advance(LEASE - 1)
    assert await store.renew() == set()
    assert await store.finish(live, output_json='["live"]', error=None)


async def test_one_write_that_fails_on_its_own_fails_only_itself(
    settings: Settings, clock: FakeClock, database: FreshDatabase
) -> None:
    """A large insert meeting a full disk must not take a small insert or a finish with it."""

    def disk_full_for_large_inputs(sql: str, params: Any) -> StoreUnavailableError | None:
        if "INSERT INTO jobs" in sql and len(params[-1]) > 100_000:  # its input_data
            return StoreUnavailableError(
                "disk full", "the database disk is full", every_write=False
            )
        return None

    flaky = faulty(settings)
    async with opened_store(settings, clock, "me", database=flaky) as store:
        running = await claimed(store, OTHER)
        flaky.fault = disk_full_for_large_inputs
        big, small, finished = await asyncio.gather(
            store.create_job("big", BIG, claimed=False),
            store.create_job("small", "[{}]", claimed=False),
            store.finish(running, output_json="[{}]", error=None),
            return_exceptions=True,
        )
    assert isinstance(big, StoreUnavailableError)
    assert small == Claim("small", "me", 0)
    assert finished is True
    assert sorted(database.query("SELECT job_id, status FROM jobs")) == [
        (OTHER, "completed"),
        ("small", "processing"),
    ]


async def test_a_database_refusing_every_write_fails_the_batch_at_once(
    settings: Settings, clock: FakeClock
) -> None:
    flaky = faulty(settings)
    async with opened_store(settings, clock, "me", database=flaky) as store:
        flaky.fault = lambda sql, params: StoreUnavailableError("read-only", "read-only")
        before = flaky.transactions
        outcomes = await asyncio.gather(
            *(store.create_job(f"job-{n}", "[{}]", claimed=False) for n in range(5)),
            return_exceptions=True,
        )
        assert all(isinstance(outcome, StoreUnavailableError) for outcome in outcomes)
        assert flaky.transactions - before <= 2  # the batch, and at most one write alone
        flaky.fault = lambda sql, params: None


async def test_a_write_batch_the_database_rolled_back_is_run_again(
    settings: Settings, clock: FakeClock
) -> None:
    flaky = faulty(settings)
    conflicts = [StoreConflictError("deadlock detected", "the database is busy")]

    def conflict_once(sql: str, params: Any) -> StoreConflictError | None:
        return conflicts.pop() if conflicts and "INSERT INTO jobs" in sql else None

    flaky.fault = conflict_once
    async with opened_store(settings, clock, "me", database=flaky) as store:
        before = flaky.transactions
        assert await store.create_job(JOB, "[{}]", claimed=True) == Claim(JOB, "me", 1)
        assert flaky.transactions - before == 2
        assert await store.get_job(JOB) is not None


async def test_a_claim_that_commits_after_its_caller_gave_up_is_still_held(
    settings: Settings, clock: FakeClock
) -> None:
    gated = faulty(settings)
    async with opened_store(settings, clock, "me", database=gated) as store:
        await store.create_job(JOB, "[{}]", claimed=False)
        gated.commit_gate = asyncio.Event()
        gated.at_gate.clear()
        request = asyncio.create_task(store.claim(JOB))
        await gated.at_gate.wait()  # the claim is in its transaction, about to commit
        request.cancel()
        gated.commit_gate.set()
        await store.flush()
        assert request.cancelled()
        assert list(store.held) == [Claim(JOB, "me", 1)]


# SQLite's files and schema.


async def test_a_file_that_is_not_a_database_is_refused_by_name(
    tmp_path: Path, clock: FakeClock
) -> None:
    path = tmp_path / "notes.db"
    path.write_bytes(b"these are my notes, not a database" * 200)
    store = make_store(Settings(database_url=f"sqlite:///{path}"), clock, owner="me")
    with pytest.raises(StoreCorruptError, match=r"notes\.db"):
        await store.open()


async def test_a_database_from_a_newer_version_is_left_alone(
    db_path: Path, clock: FakeClock
) -> None:
    with closing(sqlite3.connect(db_path)) as db:
        db.execute(f"PRAGMA user_version = {len(MIGRATIONS) + 1}")
    store = make_store(Settings(database_url=f"sqlite:///{db_path}"), clock, owner="me")
    with pytest.raises(StoreCorruptError, match="newer"):
        await store.open()


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
            "INSERT INTO jobs VALUES (?, ?, NULL, 'processing', NULL, 't0', 't0', 'dead', 1, ?)",
            (JOB, BIG, clock.now - 1),
        )
    settings = Settings(database_url=f"sqlite:///{db_path}")
    async with opened_store(settings, clock, "rescuer") as store:
        done = await store.get_job(OTHER, with_output=True)
        assert done is not None
        assert (done.status, done.output_data) == (JobStatus.COMPLETED, "[{}]")
        # The dead owner's lease expired; the job is large, as its input's length says.
        swept = await store.sweep(slots=10, lanes=0)
        assert swept.small == []
        [claim] = (await store.sweep(slots=10, lanes=1)).large
        assert claim == Claim(JOB, "rescuer", 2)
        assert await store.load_input(JOB) == BIG
    with closing(sqlite3.connect(db_path)) as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == len(MIGRATIONS)


async def test_sqlite_claims_and_heartbeats_do_not_rewrite_the_jobs_row(
    db_path: Path, clock: FakeClock
) -> None:
    # SQLite rewrites a whole row when any column changes; a megabyte input must not be
    # rewritten by every claim and heartbeat. The jobs row's change counter stays put.
    settings = Settings(database_url=f"sqlite:///{db_path}")
    async with opened_store(settings, clock, "me") as store:
        await store.create_job(JOB, '["' + "x" * 1_000_000 + '"]', claimed=False)
        with closing(sqlite3.connect(db_path)) as db:
            before = db.execute("SELECT rowid, updated_at FROM jobs").fetchone()
        assert await store.claim(JOB) is not None
        for _ in range(3):
            clock.advance(1)
            assert await store.renew() == set()
        with closing(sqlite3.connect(db_path)) as db:
            assert db.execute("SELECT rowid, updated_at FROM jobs").fetchone() == before
            [(leases,)] = db.execute("SELECT count(*) FROM job_leases").fetchall()
    assert leases == 1


async def test_sqlite_lock_files_of_dead_processes_are_cleared_and_the_live_one_kept(
    db_path: Path, clock: FakeClock
) -> None:
    settings = Settings(database_url=f"sqlite:///{db_path}")
    owners = db_path.with_name(db_path.name + "-owners")
    async with opened_store(settings, clock, "first") as first:
        await first.create_job(JOB, "[{}]", claimed=True)
    # Its file stays, unlocked: "first" is gone, and it holds a lease. So is a process killed
    # long ago, holding nothing.
    (owners / "crashed%3A1.lock").write_text("")
    async with opened_store(settings, clock, "second") as second:
        names = sorted(path.name for path in owners.iterdir())
        assert names == ["crashed%3A1.lock", "first.lock", "second.lock"]
        await second.sweep(slots=0, lanes=0)  # "first"'s lease is expired; nothing is proved
        assert sorted(path.name for path in owners.iterdir()) == ["first.lock", "second.lock"]
        await second.sweep(slots=0, lanes=0)
        assert [path.name for path in owners.iterdir()] == ["second.lock"]


async def test_a_claim_refused_while_draining_keeps_the_reservation_to_hand_back(
    store: JobStore, other: JobStore, clock: FakeClock
) -> None:
    reservation = await store.create_job(JOB, "[{}]", claimed=False)
    store.stop_claiming()
    assert await store.claim(JOB) is None
    assert list(store.held) == [reservation]
    await store.release(store.held)
    clock.advance(0.001)  # well within the grace time: the hand-back lets another take it now
    assert (await other.sweep(slots=1, lanes=0)).small == [Claim(JOB, "other", 1)]


async def test_a_write_that_trips_a_bug_fails_alone(settings: Settings, clock: FakeClock) -> None:
    flaky = faulty(settings)

    def bug_in_one_insert(sql: str, params: Any) -> Exception | None:
        return ZeroDivisionError("oops") if "INSERT INTO jobs" in sql and "bug" in params else None

    async with opened_store(settings, clock, "me", database=flaky) as store:
        flaky.fault = bug_in_one_insert
        buggy, fine = await asyncio.gather(
            store.create_job("bug", "[{}]", claimed=False),
            store.create_job("fine", "[{}]", claimed=False),
            return_exceptions=True,
        )
    assert isinstance(buggy, ZeroDivisionError)
    assert fine == Claim("fine", "me", 0)


# SQLite's liveness lock files.


def sqlite_settings(db_path: Path) -> Settings:
    return Settings(database_url=f"sqlite:///{db_path}", job_lease_seconds=LEASE)


async def test_a_missing_lock_file_proves_nothing_and_its_owner_makes_it_again(
    db_path: Path, clock: FakeClock
) -> None:
    settings = sqlite_settings(db_path)
    owners = db_path.with_name(db_path.name + "-owners")
    async with opened_store(settings, clock, "a") as a, opened_store(settings, clock, "b") as b:
        await a.create_job(JOB, "[{}]", claimed=True)
        for path in owners.iterdir():  # an operator "cleans up"
            path.unlink()
        assert (await b.sweep(slots=5, lanes=0)).small == []  # "a" is not taken for dead
        await a.sweep(slots=0, lanes=0)  # each process's next sweep makes its file again
        assert sorted(path.name for path in owners.iterdir()) == ["a.lock", "b.lock"]
    async with opened_store(settings, clock, "c") as c:  # "a" and "b" are gone now
        assert [claim.job_id for claim in (await c.sweep(slots=5, lanes=0)).small] == [JOB]


async def test_processes_reaching_one_file_through_a_link_share_its_lock_files(
    db_path: Path, tmp_path: Path, clock: FakeClock
) -> None:
    link = tmp_path / "elsewhere" / "jobs.db"
    link.parent.mkdir()
    async with opened_store(sqlite_settings(db_path), clock, "direct") as direct:
        await direct.create_job(JOB, "[{}]", claimed=True)
        async with opened_store(sqlite_settings(db_path), clock, "linked") as linked:
            link.symlink_to(db_path)
            async with opened_store(sqlite_settings(link), clock, "via-link") as via_link:
                assert (await via_link.sweep(slots=5, lanes=0)).small == []
                assert linked.owner != via_link.owner


async def test_a_lock_file_that_cannot_be_checked_spares_its_owner_and_the_sweep(
    db_path: Path, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    settings = sqlite_settings(db_path)
    owners = db_path.with_name(db_path.name + "-owners")
    async with opened_store(settings, clock, "me") as store:
        async with opened_store(settings, clock, "odd") as odd:
            await odd.create_job(JOB, "[{}]", claimed=True)
        (owners / "odd.lock").unlink()
        (owners / "odd.lock").mkdir()  # cannot be opened as a file, even by root
        swept, inserted = await asyncio.gather(
            store.sweep(slots=5, lanes=0), store.create_job(OTHER, "[{}]", claimed=False)
        )
        assert swept.small == []  # not known dead: its lease decides
        assert inserted == Claim(OTHER, "me", 0)
        assert "cannot check whether odd is alive" in caplog.text
        clock.advance(LEASE + 1)
        assert JOB in [claim.job_id for claim in (await store.sweep(slots=5, lanes=0)).small]


async def test_an_owners_folder_that_is_a_file_stops_the_store_from_opening(
    db_path: Path, clock: FakeClock
) -> None:
    db_path.with_name(db_path.name + "-owners").write_text("not a folder")
    store = make_store(sqlite_settings(db_path), clock, owner="me")
    with pytest.raises(StoreSetupError, match="cannot keep this process's liveness lock in"):
        await store.open()
