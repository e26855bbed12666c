"""Turns to run a job: ``FLOW_CONCURRENCY`` slots, and lanes that large jobs also need.

A job is claimed only once it has a turn, so every claim starts running at once (``attempts``
then counts real starts). A large job takes a lane first (one per worker process, or one
thread), then a slot; a small job only a slot. A freed unit goes straight to the longest
waiter, so nobody (a sweep, a new submission) can take it from under a job already waiting.
"""

import asyncio
from collections import deque


class _Units:
    """A counted resource with a FIFO queue of waiters and direct hand-off."""

    def __init__(self, size: int) -> None:
        self._free = size
        self._waiters: deque[asyncio.Future[None]] = deque()

    @property
    def available(self) -> int:
        """How many can be taken now without jumping the queue."""
        return 0 if self._waiters else self._free

    def try_take(self) -> bool:
        if self.available == 0:
            return False
        self._free -= 1
        return True

    async def take(self) -> None:
        if self.try_take():
            return
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                self.give_back()  # handed over just as the waiter gave up: pass it on
            else:
                self._waiters.remove(waiter)
            raise

    def give_back(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return
        self._free += 1


class Turn:
    """One job's slot (and lane, if it is large); give it back exactly once."""

    def __init__(self, capacity: "Capacity", large: bool) -> None:
        self._capacity = capacity
        self.large = large
        self._held = True

    def release(self) -> None:
        """Give the slot (and lane) back; a second call does nothing."""
        if self._held:
            self._held = False
            self._capacity._give_back(self.large)


class Capacity:
    """The slots and lanes of one process."""

    def __init__(self, slots: int, lanes: int) -> None:
        self._slots = _Units(slots)
        self._lanes = _Units(lanes)

    def available(self, *, large: bool) -> int:
        """How many jobs of this size could start now."""
        slots = self._slots.available
        return min(slots, self._lanes.available) if large else slots

    def try_take(self, *, large: bool) -> Turn | None:
        """A turn now, or None if none is free (or others are waiting for one)."""
        if large and not self._lanes.try_take():
            return None
        if not self._slots.try_take():
            if large:
                self._lanes.give_back()
            return None
        return Turn(self, large)

    async def take(self, *, large: bool) -> Turn:
        """Wait for a turn, in order of asking."""
        if large:
            await self._lanes.take()
        try:
            await self._slots.take()
        except BaseException:
            if large:
                self._lanes.give_back()
            raise
        return Turn(self, large)

    def reserve_free(self) -> "Reserved":
        """Every slot free now, and as many free lanes, for jobs whose sizes are not known yet."""
        slots = 0
        while self._slots.try_take():
            slots += 1
        lanes = 0
        while lanes < slots and self._lanes.try_take():
            lanes += 1
        return Reserved(self, slots, lanes)

    def _give_back(self, large: bool) -> None:
        self._slots.give_back()
        if large:
            self._lanes.give_back()


class Reserved:
    """Slots and lanes taken for a sweep: made into turns for the jobs found, the rest returned."""

    def __init__(self, capacity: Capacity, slots: int, lanes: int) -> None:
        self._capacity = capacity
        self.slots = slots
        self.lanes = lanes

    def turn(self, *, large: bool) -> Turn:
        """One job's turn out of what is reserved."""
        if self.slots == 0 or (large and self.lanes == 0):
            raise ValueError("nothing reserved is left for this job")
        self.slots -= 1
        self.lanes -= large
        return Turn(self._capacity, large)

    def give_back(self) -> None:
        """Return whatever was not turned into turns."""
        for _ in range(self.lanes):
            self._capacity._lanes.give_back()
        for _ in range(self.slots):
            self._capacity._slots.give_back()
        self.slots = self.lanes = 0
