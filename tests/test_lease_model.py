"""The lease protocol against a model: hypothesis drives real stores, several processes at once.

Each simulated process is a real store (an owner id, its liveness lock, its registry) on one
real database, SQLite or PostgreSQL, with one fake clock for all. Hypothesis interleaves
submissions, claims, heartbeats, sweeps, finishes, pauses (the clock moving while a process
does nothing), crashes (a store closed without releasing anything) and drains, then checks
against what the model saw, with a trigger counting every final write as the oracle:

* an outcome is written at most once per job, and only by the current attempt's holder;
* every claim is a start, and ``attempts`` in the database counts exactly those;
* after every process is stopped and one healthy process runs until idle, every job has
  exactly one outcome: completed, or failed "interrupted too often" only after
  ``JOB_MAX_ATTEMPTS`` starts.
"""

import asyncio
import itertools
import tempfile
from collections import Counter
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, TypeVar

from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from app.jobs import Claim
from app.store import JobStore, Swept, make_store
from tests.support import FakeClock, FreshDatabase, PostgresDatabase, SQLiteDatabase, store_settings

T = TypeVar("T")
LEASE, GRACE, MAX_ATTEMPTS = 30, 5, 3
MOST_PROCESSES = 3
# Few jobs, so processes contend for the same ones (the interleavings where fences matter).
MOST_JOBS = 3


class LeaseProtocol(RuleBasedStateMachine):
    """The model; ``fresh_database`` gives each example an empty database."""

    fresh_database: Callable[[], FreshDatabase]

    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.clock = FakeClock()
        self.database = self.fresh_database()
        self.settings = store_settings(
            self.database,
            job_lease_seconds=LEASE,
            job_claim_grace_seconds=GRACE,
            job_max_attempts=MAX_ATTEMPTS,
        )
        self.owners = (f"process-{n}" for n in itertools.count())
        self.processes: dict[str, JobStore] = {}
        # What each process is running: claims it took and has not finished, lost or not (a
        # run goes on after its lease is lost; only its finish finds out).
        self.runs: dict[str, set[Claim]] = {}
        self.jobs: list[str] = []
        self.starts: Counter[str] = Counter()
        self.current: dict[str, Claim] = {}
        self.finished: set[str] = set()
        self.landed: set[Claim] = set()
        self.start_process()
        self.database.record_finishes()
        # Two processes and a running job from the start: contention from the first step on.
        self.start_process()
        first = self.processes["process-0"]
        self.jobs.append("job-0")
        self.took(self.run(first.create_job("job-0", "[{}]", claimed=True)))

    def run(self, coroutine: Coroutine[Any, Any, T]) -> T:
        return self.loop.run_until_complete(coroutine)

    def took(self, claim: Claim | None) -> None:
        """A claim was handed out: it is a start, and now the job's current claim."""
        if claim is None or claim.is_reservation:
            return
        assert claim.attempt == self.starts[claim.job_id] + 1
        self.starts[claim.job_id] += 1
        self.current[claim.job_id] = claim
        self.runs[claim.owner].add(claim)

    def pick(self, data: st.DataObject) -> JobStore:
        return self.processes[data.draw(st.sampled_from(sorted(self.processes)))]

    @precondition(lambda self: len(self.processes) < MOST_PROCESSES)
    @rule()
    def start_process(self) -> None:
        owner = next(self.owners)
        store = make_store(self.settings, self.clock, owner=owner)
        self.run(store.open())
        self.processes[owner] = store
        self.runs[owner] = set()

    @precondition(lambda self: self.processes and len(self.jobs) < MOST_JOBS)
    @rule(data=st.data(), claimed=st.booleans())
    def submit(self, data: st.DataObject, claimed: bool) -> None:
        job_id = f"job-{len(self.jobs)}"
        claim = self.run(self.pick(data).create_job(job_id, "[{}]", claimed=claimed))
        self.jobs.append(job_id)
        self.took(claim)

    @precondition(lambda self: self.reservations())
    @rule(data=st.data())
    def claim_reserved(self, data: st.DataObject) -> None:
        """A job waiting here gets its turn: the process claims its own reservation."""
        reservation = data.draw(st.sampled_from(self.reservations()))
        self.took(self.run(self.processes[reservation.owner].claim(reservation.job_id)))

    def reservations(self) -> list[Claim]:
        held = (claim for store in self.processes.values() for claim in store.held)
        return sorted((claim for claim in held if claim.is_reservation), key=str)

    @precondition(lambda self: self.processes)
    @rule(data=st.data(), slots=st.integers(0, 4))
    def sweep(self, data: st.DataObject, slots: int) -> None:
        store = self.pick(data)
        self.swept(self.run(store.sweep(slots=slots, lanes=0)))
        self.assert_holds_only_current_claims(store)

    def swept(self, swept: Swept) -> None:
        for claim in swept.small:
            self.took(claim)
        for job_id in swept.failed:
            assert self.starts[job_id] >= MAX_ATTEMPTS, f"{job_id} failed after fewer starts"
            self.finished.add(job_id)
            del self.current[job_id]  # no claim of it is current any more
        self.assert_really_lost(swept.lost)

    @precondition(lambda self: self.processes)
    @rule(data=st.data())
    def heartbeat(self, data: st.DataObject) -> None:
        store = self.pick(data)
        self.assert_really_lost(self.run(store.renew()))
        self.assert_holds_only_current_claims(store)

    def assert_really_lost(self, lost: set[Claim]) -> None:
        """A claim said to be lost is not the current one, nor one whose outcome landed."""
        for claim in lost:
            assert claim not in self.landed, f"{claim} finished, but was reported lost"
            assert self.current.get(claim.job_id) != claim, f"{claim} is current, not lost"

    def assert_holds_only_current_claims(self, store: JobStore) -> None:
        """Right after a renewal, what a process still holds is the current claim."""
        for claim in store.held.running():
            assert self.current.get(claim.job_id) == claim, f"{store.owner} holds stale {claim}"

    @rule(seconds=st.sampled_from([1, 4, 6, 29, 31, 100]))
    def time_passes(self, seconds: float) -> None:
        """Every process not acting meanwhile was paused (or slow) for this long."""
        self.clock.advance(seconds)

    @precondition(lambda self: len(self.processes) >= 2)
    @rule(data=st.data())
    def pause(self, data: st.DataObject) -> None:
        """One process stops past its leases (SIGSTOP, a long GC) while another sweeps."""
        paused = data.draw(st.sampled_from(sorted(self.processes)))
        rescuer = data.draw(st.sampled_from(sorted(set(self.processes) - {paused})))
        self.clock.advance(LEASE + 1)
        self.swept(self.run(self.processes[rescuer].sweep(slots=4, lanes=0)))

    @precondition(lambda self: any(self.runs.values()))
    @rule(
        data=st.data(),
        fails=st.booleans(),
        with_heartbeat=st.booleans(),
        with_sweep=st.booleans(),
    )
    def finish(
        self, data: st.DataObject, fails: bool, with_heartbeat: bool, with_sweep: bool
    ) -> None:
        """A process's runs end together (after a pause they all come back at once): their
        finishes share one batch, maybe with a heartbeat or a sweep. Lost or not, each run
        tries to record its outcome."""
        owner = data.draw(st.sampled_from(sorted(o for o, runs in self.runs.items() if runs)))
        store = self.processes[owner]
        claims = sorted(self.runs[owner], key=str)
        output, error = (None, "it broke") if fails else ("[]", None)
        finishes = [store.finish(c, output_json=output, error=error) for c in claims]
        others: list[Coroutine[Any, Any, Any]] = []
        if with_heartbeat:
            others.append(store.renew())
        if with_sweep:
            others.append(store.sweep(slots=2, lanes=0))
        outcomes = self.run(_together(*finishes, *others))
        for claim, landed in zip(claims, outcomes, strict=False):
            self.runs[owner].discard(claim)
            assert claim not in store.held
            if landed:
                assert self.current[claim.job_id] == claim, f"{claim} landed but is not current"
                assert claim.job_id not in self.finished, f"{claim.job_id} finished twice"
                self.finished.add(claim.job_id)
                self.landed.add(claim)
        if with_heartbeat:
            self.assert_really_lost(outcomes[len(claims)])
        if with_sweep:
            self.swept(outcomes[-1])

    @precondition(lambda self: self.processes)
    @rule(data=st.data())
    def crash(self, data: st.DataObject) -> None:
        """kill -9: the process goes, holding what it held; its liveness lock goes with it."""
        store = self.pick(data)
        del self.processes[store.owner], self.runs[store.owner]
        self.run(store.close())

    @precondition(lambda self: self.processes)
    @rule(data=st.data())
    def drain(self, data: st.DataObject) -> None:
        """SIGTERM: no more claims, everything held handed back, then gone."""
        store = self.pick(data)
        store.stop_claiming()
        self.run(store.release(list(store.held)))
        assert list(store.held) == []
        del self.processes[store.owner], self.runs[store.owner]
        self.run(store.close())

    @invariant()
    def an_outcome_is_written_at_most_once(self) -> None:
        assert all(count == 1 for count in self.database.finishes().values())

    @invariant()
    def attempts_count_the_starts(self) -> None:
        for job_id, attempts in self.database.query("SELECT job_id, attempts FROM job_leases"):
            assert attempts == self.starts[job_id], job_id

    def teardown(self) -> None:
        try:
            for store in self.processes.values():
                self.run(store.close())  # every process stops, as if killed
            self.processes.clear()
            self.run_one_healthy_process_until_idle()
            self.assert_every_job_finished_once()
        finally:
            for store in self.processes.values():  # left open by a failed step
                self.run(store.close())
            self.loop.close()

    def run_one_healthy_process_until_idle(self) -> None:
        healthy = make_store(self.settings, self.clock, owner="healthy")
        self.run(healthy.open())
        self.processes[healthy.owner] = healthy
        self.runs[healthy.owner] = set()
        for _ in range(10 * (MAX_ATTEMPTS + 2)):
            swept = self.run(healthy.sweep(slots=100, lanes=0))
            self.finished.update(swept.failed)
            for claim in swept.small:
                self.took(claim)
                assert self.run(healthy.finish(claim, output_json="[]", error=None))
                self.finished.add(claim.job_id)
            if set(self.jobs) <= self.finished:
                return
            if not swept.small:
                self.clock.advance(LEASE + 1)

    def assert_every_job_finished_once(self) -> None:
        assert self.database.finishes() == dict.fromkeys(self.jobs, 1)
        for job_id, status, error in self.database.query("SELECT job_id, status, error FROM jobs"):
            if status == "failed" and error != "it broke":
                assert "interrupted too often" in error
                assert self.starts[job_id] >= MAX_ATTEMPTS, f"{job_id}: {error}"
            else:
                assert status in ("completed", "failed"), (job_id, status)


async def _together(*operations: Coroutine[Any, Any, Any]) -> list[Any]:
    """Start the operations at once, so they share a group-commit batch."""
    return list(await asyncio.gather(*operations))


def run_model(fresh_database: Callable[[], FreshDatabase], examples: int) -> None:
    machine = type(
        "LeaseProtocolOn", (LeaseProtocol,), {"fresh_database": staticmethod(fresh_database)}
    )
    run_state_machine_as_test(
        machine, settings=hypothesis_settings(max_examples=examples, stateful_step_count=30)
    )


def test_the_lease_protocol_holds_on_sqlite(tmp_path: Path) -> None:
    def fresh() -> FreshDatabase:
        return SQLiteDatabase(Path(tempfile.mkdtemp(dir=tmp_path)) / "jobs.db")

    run_model(fresh, examples=100)


def test_the_lease_protocol_holds_on_postgresql(postgres: PostgresDatabase) -> None:
    def fresh() -> FreshDatabase:
        postgres.reset()
        return postgres

    run_model(fresh, examples=40)
