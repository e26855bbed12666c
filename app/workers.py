"""Where CPU-bound work runs: never on the event loop.

Small inputs go to a thread (cheap to hand over; they hold the GIL only briefly). Large ones
take turns on a thread of their own, so one large payload's memory is alive at a time; or, with
``FLOW_PROCESSES`` set, go to worker processes, so parsing or transforming megabytes never
competes with the event loop for the GIL (at the cost of a process's memory and copying the
payload across). Inputs cross as one string, not as many objects.

A large flow can be asked to stop (``FlowStop``): it gives up at its next batch boundary, on
its thread or in its worker process (through a flag in shared memory), so a timed-out or
abandoned job does not keep a lane busy for nothing.
"""

import asyncio
import contextlib
import ctypes
import logging
import multiprocessing
import os
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from functools import partial
from typing import Any, TypeVar

from app.batching import Batcher
from app.flow import expand_reduce_json
from app.logs import LogFormat, configure_logging

logger = logging.getLogger(__name__)

T = TypeVar("T")
_M_MMAP_THRESHOLD = -3  # from glibc's malloc.h
Payload = TypeVar("Payload", str, bytes)


class WorkerCrashedError(RuntimeError):
    """The worker process died while running a task (killed, or out of memory)."""


class FlowControl:
    """One running flow: how many objects it has done; asking it to stop.

    A flow stops at its next batch boundary once asked; it is never forced.
    """

    def __init__(self) -> None:
        self._stopped = False
        self._hooks: list[Callable[[], None]] = []
        self._done = 0
        self._read_done: Callable[[], int] | None = None

    def stop(self) -> None:
        """Ask the flow to stop (once is enough; later calls do nothing)."""
        if not self._stopped:
            self._stopped = True
            for hook in self._hooks:
                hook()

    def stopped(self) -> bool:
        """Whether the flow has been asked to stop (read by the flow's own thread)."""
        return self._stopped

    @property
    def done_items(self) -> int:
        """How many of its objects the flow has done so far (counted a batch at a time)."""
        return self._read_done() if self._read_done is not None else self._done

    def count_done(self, done_items: int) -> None:
        """Called by the flow, on its own thread, after each batch."""
        self._done = done_items

    def _forward(self, hook: Callable[[], None]) -> Callable[[], None]:
        """Call ``hook`` when asked to stop (now, if already asked); return its remover."""
        self._hooks.append(hook)
        if self._stopped:
            hook()
        return partial(self._hooks.remove, hook)


# In a worker process: per flow the parent may run there at once, a stop flag and a count of
# the objects done, in shared memory.
_stop_flags: "ctypes.Array[Any] | None" = None
_done_counts: "ctypes.Array[Any] | None" = None


class CpuWorkers:
    """Runs a function of one string or bytes argument in a thread or a worker process."""

    def __init__(
        self, processes: int, threshold_bytes: int, logs: tuple[str, LogFormat] = ("INFO", "text")
    ) -> None:
        self._processes = processes
        self._logs = logs  # the worker processes' log level and format, as the server's
        self._threshold = threshold_bytes
        self._pool: ProcessPoolExecutor | None = None
        # Large flows in worker processes are limited to one per process (the runner's lanes),
        # so that many stop flags are enough; a flow without one cannot be stopped early.
        context = multiprocessing.get_context("spawn")
        # Raw (lock-free) shared memory: each slot has one writer, and a byte or an aligned
        # 64-bit count is read whole. A lock would be a named semaphore that the resource
        # tracker reports as leaked, in plain text, at shutdown.
        self._stop_flags = context.RawArray("b", max(processes, 1)) if processes else None
        self._done_counts = context.RawArray("q", max(processes, 1)) if processes else None
        self._free_flags = list(range(processes))
        # Without worker processes, large payloads take turns on one thread of their own: one
        # large payload's memory at a time, in one malloc arena that is trimmed after each.
        self._large_thread: ThreadPoolExecutor | None = None
        # Small flows started at the same moment share one trip to a thread.
        self._small_flows: Batcher[str, str | Exception] = Batcher(self._run_small_flows)

    def start(self) -> None:
        """Start the worker processes now, so the first large job does not pay for it."""
        if self._processes > 0:
            warm_up = self._process_pool().submit(expand_reduce_json, "[]")
            warm_up.add_done_callback(_log_failed_warm_up)

    async def run(self, function: Callable[[Payload], T], payload: Payload) -> T:
        """Run ``function(payload)`` off the event loop (a large payload as configured)."""
        if not self._is_large(payload):
            return await asyncio.to_thread(function, payload)
        if self._processes == 0:
            if self._large_thread is None:
                self._large_thread = ThreadPoolExecutor(1, thread_name_prefix="large-payloads")
            loop = asyncio.get_running_loop()
            return await loop.run_in_executor(self._large_thread, _then_trim, function, payload)
        pool = self._process_pool()
        try:
            return await asyncio.wrap_future(pool.submit(_then_trim, function, payload))
        except BrokenProcessPool as error:
            self._discard(pool)
            raise WorkerCrashedError("the worker process died while running this task") from error

    async def run_flow(self, input_json: str, control: FlowControl | None = None) -> str:
        """Run ExpandReduceFlow on a job's input JSON; return its result JSON.

        A large one reports its progress to ``control`` a batch at a time, and gives up at
        its next batch boundary once asked to stop (raising FlowStopped); a small one is over
        in milliseconds and always runs to the end, its progress counted when it is done.
        """
        if self._is_large(input_json):
            if control is None:
                return await self.run(expand_reduce_json, input_json)
            if self._processes == 0:
                flow = partial(
                    expand_reduce_json,
                    should_stop=control.stopped,
                    on_progress=control.count_done,
                )
                return await self.run(flow, input_json)
            return await self._run_controlled_in_process(input_json, control)
        outcome = await self._small_flows.submit(input_json)
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    async def _run_controlled_in_process(self, input_json: str, control: FlowControl) -> str:
        flags, counts = self._stop_flags, self._done_counts
        if flags is None or counts is None or not self._free_flags:  # one flow per lane
            return await self.run(partial(_flow_in_worker, slot=-1), input_json)
        slot = self._free_flags.pop()
        flags[slot], counts[slot] = 0, 0
        forget = control._forward(partial(flags.__setitem__, slot, 1))
        control._read_done = lambda: int(counts[slot])
        try:
            return await self.run(partial(_flow_in_worker, slot=slot), input_json)
        finally:
            # The slot may go to another flow now: this control must not reach it any more.
            forget()
            control._read_done = None
            control.count_done(counts[slot])
            self._free_flags.append(slot)

    def _is_large(self, payload: str | bytes) -> bool:
        return len(payload) >= self._threshold

    @staticmethod
    async def _run_small_flows(inputs: Sequence[str]) -> list[str | Exception]:
        return await asyncio.to_thread(_run_each, inputs)

    def _process_pool(self) -> ProcessPoolExecutor:
        if self._pool is None:
            # spawn, not fork: forking a process that runs an event loop and database threads
            # can copy locks held by those threads into the child.
            self._pool = ProcessPoolExecutor(
                self._processes,
                mp_context=multiprocessing.get_context("spawn"),
                initializer=_start_worker,
                initargs=(os.getpid(), self._stop_flags, self._done_counts, self._logs),
            )
        return self._pool

    def _discard(self, pool: ProcessPoolExecutor) -> None:
        if self._pool is pool:
            self._pool = None
        pool.shutdown(wait=False, cancel_futures=True)

    def close(self) -> None:
        """Stop the worker processes; work still queued is dropped (its leases expire)."""
        if self._large_thread is not None:
            self._large_thread.shutdown(wait=False, cancel_futures=True)
            self._large_thread = None
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None


def _run_each(inputs: Sequence[str]) -> list[str | Exception]:
    """Run the flow on each input; one job's failure is that job's outcome, not the batch's."""
    outcomes: list[str | Exception] = []
    for input_json in inputs:
        try:
            outcomes.append(expand_reduce_json(input_json))
        except Exception as error:
            outcomes.append(error)
    return outcomes


def return_large_buffers_to_the_system() -> None:
    """Make glibc give every buffer of 128 KiB or more back to the system when freed.

    By default glibc raises that threshold after such a buffer is freed, so the megabyte
    buffers of one large job (its body, input and result text) stay in the heap for good:
    measured, the server's peak memory for a 7 MB job fell from 165 to 108 MB with it.
    Elsewhere than glibc this does nothing.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(_M_MMAP_THRESHOLD, 128 * 1024)
    except (OSError, AttributeError):
        pass


def _then_trim(function: Callable[[Payload], T], payload: Payload) -> T:
    """Run a large task, then hand the memory its objects freed back to the system.

    Otherwise what one large task freed stays in the heap, and the next task's peak is added
    on top of it: validating a body then running its job peaked at 141 MB instead of ~100.
    (No garbage collection is needed first: the flow leaves no reference cycles, and a full
    collection in the server costs 30 ms.)
    """
    try:
        return function(payload)
    finally:
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6").malloc_trim(0)


def _start_worker(
    parent_pid: int,
    stop_flags: "ctypes.Array[Any] | None",
    done_counts: "ctypes.Array[Any] | None",
    logs: tuple[str, LogFormat],
) -> None:
    global _stop_flags, _done_counts
    _stop_flags, _done_counts = stop_flags, done_counts
    configure_logging(*logs)  # whatever a worker logs or warns reads like the server's lines
    return_large_buffers_to_the_system()
    exit_with_parent(parent_pid)


def _flow_in_worker(input_json: str, slot: int) -> str:
    """In a worker process: the flow, with progress and stop going through shared memory."""
    flags, counts = _stop_flags, _done_counts
    if flags is None or counts is None or slot < 0:
        return expand_reduce_json(input_json)

    def should_stop() -> bool:
        return bool(flags[slot])

    return expand_reduce_json(
        input_json, should_stop=should_stop, on_progress=partial(counts.__setitem__, slot)
    )


def exit_with_parent(parent_pid: int, poll_seconds: float = 0.5) -> None:
    """In a worker: exit as soon as the server process is gone.

    A worker blocked on its task queue does not notice a parent killed with SIGKILL, and
    would otherwise live on, holding memory, after every crash of the server.
    """

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(poll_seconds)
        os._exit(1)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


def _log_failed_warm_up(future: "Future[str]") -> None:
    if not future.cancelled() and future.exception() is not None:
        logger.error("worker process failed to start: %r", future.exception())
