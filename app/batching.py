"""Coalescing: operations issued while a batch is in flight are applied together next.

This is group commit. With one writer, a transaction per submission spends its time waiting
for the previous one's commit (and its fsync); here every submission that arrives meanwhile
joins the next transaction, and each is still answered only after that transaction commits.
Under light load a batch holds one operation and nothing waits; under heavy load the cost of a
commit is shared by everything in it. Reads coalesce the same way, one query per batch.
"""

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, TypeVar

from app.logs import detached_task

Op = TypeVar("Op")
Result = TypeVar("Result")


class Batcher(Generic[Op, Result]):
    """Applies operations in batches with ``apply``, which returns one result per operation."""

    def __init__(self, apply: Callable[[Sequence[Op]], Awaitable[Sequence[Result]]]) -> None:
        self._apply = apply
        self._pending: list[tuple[Op, asyncio.Future[Result]]] = []
        self._drainer: asyncio.Task[None] | None = None

    async def submit(self, op: Op) -> Result:
        """Queue ``op`` and wait for the result of the batch it lands in."""
        future: asyncio.Future[Result] = asyncio.get_running_loop().create_future()
        self._pending.append((op, future))
        if self._drainer is None or self._drainer.done():
            self._drainer = detached_task(self._drain())
        return await future

    async def _drain(self) -> None:
        while self._pending:
            batch, self._pending = self._pending, []
            try:
                results = await self._apply([op for op, _ in batch])
            except Exception as error:
                for _, future in batch:
                    if not future.done():
                        future.set_exception(error)
                continue
            for (_, future), result in zip(batch, results, strict=True):
                if not future.done():  # the caller may have given up (cancelled)
                    future.set_result(result)

    async def flush(self) -> None:
        """Wait until everything queued so far has been applied."""
        while self._drainer is not None and not self._drainer.done():
            await asyncio.shield(self._drainer)
