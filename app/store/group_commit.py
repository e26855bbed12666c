"""Group commit in typed stages: a queue per kind of write, one transaction for all of them.

With one writer, a transaction per write spends its time waiting for the previous commit (and
its fsync). Here each kind of write (insert, renew, finish, claim, release, sweep) is a
``Stage`` with its own operation and result types; whatever is queued in any stage while a
transaction is in flight goes into the next one, applied stage by stage in a fixed order, and
each caller is answered only after that transaction commits. A stage's ``committed`` hook runs
right after the commit, before any caller hears of it, whoever is still waiting.

A batch that fails does not fail its neighbours: a batch the database rolled back to break a
deadlock runs again (up to ``CONFLICT_RETRIES`` times); any other failure is retried one
operation per transaction, so only the write that caused it fails — unless the database
refuses every write (unreachable, busy, read-only), when the rest fail with it at once rather
than one timeout each.
"""

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from contextlib import AbstractAsyncContextManager
from typing import Any, Generic, TypeVar

from app.logs import detached_task
from app.metrics import STORE_BATCH_SIZE, STORE_COMMIT_SECONDS
from app.store import Clock, StoreConflictError, StoreError, StoreUnavailableError

logger = logging.getLogger(__name__)

Tx = TypeVar("Tx")
Op = TypeVar("Op")
Result = TypeVar("Result")
# Tries of a batch that the database rolls back to break a deadlock.
CONFLICT_RETRIES = 3

Apply = Callable[[Tx, Sequence[Op], float], Awaitable[Sequence[Result]]]


class Stage(Generic[Tx, Op, Result]):
    """One kind of write: its queue, how a transaction applies a batch of it, its commit hook."""

    def __init__(
        self,
        commit: "GroupCommit[Tx]",
        apply: Apply[Tx, Op, Result],
        committed: Callable[[Sequence[Op], Sequence[Result]], None] | None,
    ) -> None:
        self._commit = commit
        self._apply = apply
        self._committed = committed
        self._pending: list[tuple[Op, asyncio.Future[Result]]] = []

    async def submit(self, op: Op) -> Result:
        """Queue ``op`` for the next transaction and wait for its result."""
        future: asyncio.Future[Result] = asyncio.get_running_loop().create_future()
        self._pending.append((op, future))
        self._commit.wake()
        return await future

    def take(self) -> "_Batch[Tx, Op, Result] | None":
        """Everything queued so far, as one batch (None if nothing is)."""
        if not self._pending:
            return None
        entries, self._pending = self._pending, []
        return _Batch(self, entries)


class _Batch(Generic[Tx, Op, Result]):
    """Operations of one stage, applied together; their results once the transaction commits."""

    def __init__(
        self, stage: Stage[Tx, Op, Result], entries: list[tuple[Op, asyncio.Future[Result]]]
    ) -> None:
        self._stage = stage
        self._entries = entries
        self._results: Sequence[Result] = ()

    def __len__(self) -> int:
        return len(self._entries)

    async def apply(self, tx: Tx, now: float) -> None:
        ops = [op for op, _ in self._entries]
        self._results = await self._stage._apply(tx, ops, now)
        assert len(self._results) == len(ops), "a stage must answer every operation"

    def committed(self) -> None:
        """Run the stage's hook, then answer the callers (those still waiting)."""
        if self._stage._committed is not None:
            self._stage._committed([op for op, _ in self._entries], self._results)
        for (_, future), result in zip(self._entries, self._results, strict=True):
            if not future.done():
                future.set_result(result)

    def fail(self, error: BaseException) -> None:
        for _, future in self._entries:
            if not future.done():
                future.set_exception(error)

    def singles(self) -> "list[_Batch[Tx, Op, Result]]":
        return [_Batch(self._stage, [entry]) for entry in self._entries]


class GroupCommit(Generic[Tx]):
    """Applies the queued operations of every stage in one transaction at a time."""

    def __init__(
        self, transaction: Callable[[], AbstractAsyncContextManager[Tx]], clock: Clock
    ) -> None:
        self._transaction = transaction
        self._clock = clock
        # Stages are applied in the order they were added; the container does not know their
        # operation types, each stage does.
        self._stages: list[Stage[Tx, Any, Any]] = []
        self._drainer: asyncio.Task[None] | None = None

    def stage(
        self,
        apply: Apply[Tx, Op, Result],
        committed: Callable[[Sequence[Op], Sequence[Result]], None] | None = None,
    ) -> Stage[Tx, Op, Result]:
        """Add a kind of write, applied after those added before it."""
        stage = Stage(self, apply, committed)
        self._stages.append(stage)
        return stage

    def wake(self) -> None:
        """Make sure something is draining the queues."""
        if self._drainer is None or self._drainer.done():
            self._drainer = detached_task(self._drain())

    async def flush(self) -> None:
        """Wait until everything queued so far has been applied."""
        while self._drainer is not None and not self._drainer.done():
            await asyncio.shield(self._drainer)

    async def _drain(self) -> None:
        while batches := [batch for stage in self._stages if (batch := stage.take())]:
            await self._commit_or_split(batches)

    async def _commit_or_split(self, batches: list[_Batch[Tx, Any, Any]]) -> None:
        try:
            await self._commit(batches)
        except Exception as error:
            if sum(map(len, batches)) == 1 or _refuses_every_write(error):
                _fail(batches, error)
                return
            if isinstance(error, StoreError):
                logger.warning("a write batch failed (%s); retrying its writes one by one", error)
            else:  # a bug: it should fail only the write it is about, like any other error
                logger.exception("a write batch failed; retrying its writes one by one")
            await self._commit_one_by_one([one for batch in batches for one in batch.singles()])

    async def _commit_one_by_one(self, singles: list[_Batch[Tx, Any, Any]]) -> None:
        for index, single in enumerate(singles):
            try:
                await self._commit([single])
            except Exception as error:
                single.fail(error)
                if _refuses_every_write(error):
                    _fail(singles[index + 1 :], error)
                    return

    async def _commit(self, batches: list[_Batch[Tx, Any, Any]]) -> None:
        """Apply the batches in one transaction; again if it is rolled back for a deadlock."""
        for attempt in range(1, CONFLICT_RETRIES + 1):
            try:
                now = self._clock()
                started = time.perf_counter()
                async with self._transaction() as tx:
                    for batch in batches:
                        await batch.apply(tx, now)
                STORE_COMMIT_SECONDS.observe(time.perf_counter() - started)
                STORE_BATCH_SIZE.observe(sum(map(len, batches)))
                break
            except StoreConflictError as error:
                if attempt == CONFLICT_RETRIES:
                    raise
                logger.warning("write batch rolled back (%s); running it again", error)
        for batch in batches:
            batch.committed()


def _refuses_every_write(error: Exception) -> bool:
    return isinstance(error, StoreUnavailableError) and error.every_write


def _fail(batches: Sequence[_Batch[Any, Any, Any]], error: BaseException) -> None:
    for batch in batches:
        batch.fail(error)
