"""Benchmark the service against a do-nothing ceiling app, in one run, on this machine.

    make bench            # or: .venv/bin/python -m bench.run --seconds 8

The server runs the way users run it (uvicorn, default settings, a fresh SQLite file) pinned to
one core, the load generator (wrk) to the other, so neither steals the other's CPU. The ceiling
app (bench/ceiling.py) has the same routes and request model but stores nothing; every target
is a ratio against it or against the bare computation, measured in the same run, because
absolute numbers drift on shared machines.
"""

import argparse
import contextlib
import os
import platform
import re
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import closing, contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import httpx
import orjson

from app.flow import expand, reduce

ROOT = Path(__file__).resolve().parent.parent
SERVER_CORE, LOAD_CORE = "0", "1"
SMALL_JOB = (
    b'{"job": {"input_data": [{"1": "2", "3": "4", "5": "6", "7": "8"}, {"key1": "value1"}]}}'
)
UVICORN = [
    "--http",
    "app.protocol:HttpProtocol",
    "--host",
    "127.0.0.1",
    "--timeout-graceful-shutdown",
    "20",
]


@dataclass
class WrkResult:
    """What wrk reported for one run."""

    requests: int
    rate: float
    non_2xx: int
    timeouts: int
    errors: int
    p50_ms: float
    p99_ms: float
    max_ms: float


def wrk(
    url: str,
    *,
    connections: int,
    seconds: float,
    script: Path | None = None,
    core: str = LOAD_CORE,
) -> WrkResult:
    """Run wrk on the load core (or ``core``) and parse its report."""
    command = ["taskset", "-c", core, "wrk", "-t1", f"-c{connections}", f"-d{seconds:g}s"]
    command += ["--timeout", "2s", "--latency"]
    if script:
        command += ["-s", str(script)]
    out = subprocess.run([*command, url], capture_output=True, text=True, check=True).stdout

    def number(pattern: str, default: float = 0.0) -> float:
        match = re.search(pattern, out)
        return float(match.group(1)) if match else default

    def millis(pattern: str) -> float:
        match = re.search(pattern + r"\s+([\d.]+)(us|ms|s)\b", out)
        if not match:
            return 0.0
        scale = {"us": 0.001, "ms": 1.0, "s": 1000.0}[match.group(2)]
        return float(match.group(1)) * scale

    socket_errors = re.search(
        r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out
    )
    errors = sum(map(int, socket_errors.groups()[:3])) if socket_errors else 0
    return WrkResult(
        requests=int(number(r"(\d+) requests in")),
        rate=number(r"Requests/sec:\s+([\d.]+)"),
        non_2xx=int(number(r"Non-2xx or 3xx responses: (\d+)")),
        timeouts=int(socket_errors.group(4)) if socket_errors else 0,
        errors=errors,
        p50_ms=millis(r"\n\s+50%"),
        p99_ms=millis(r"\n\s+99%"),
        max_ms=_max_latency(out),
    )


def _max_latency(out: str) -> float:
    match = re.search(r"Latency\s+\S+\s+\S+\s+([\d.]+)(us|ms|s)", out)
    if not match:
        return 0.0
    return float(match.group(1)) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[match.group(2)]


@dataclass
class Server:
    """A uvicorn process pinned to the server core, and the peak memory of it and its children."""

    process: subprocess.Popen[bytes]
    base_url: str
    peak_kib: dict[int, int] = field(default_factory=dict)
    names: dict[int, str] = field(default_factory=dict)
    _stop: threading.Event = field(default_factory=threading.Event)

    def watch_memory(self) -> None:
        """Sample the peak RSS of the server and each of its descendants until stopped."""
        while not self._stop.wait(0.05):
            for pid in _process_tree(self.process.pid):
                hwm = _vm_hwm_kib(pid)
                if hwm:
                    self.peak_kib[pid] = max(self.peak_kib.get(pid, 0), hwm)
                    self.names.setdefault(pid, _short_cmdline(pid))

    @property
    def peak_mib(self) -> float:
        """Sum over the processes of each one's peak resident memory."""
        return sum(self.peak_kib.values()) / 1024


def _process_tree(pid: int) -> list[int]:
    pids, queue = [], [pid]
    while queue:
        current = queue.pop()
        pids.append(current)
        try:
            for task in Path(f"/proc/{current}/task").iterdir():
                queue += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            continue
    return pids


def _short_cmdline(pid: int) -> str:
    try:
        words = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return "?"
    text = " ".join(w.decode(errors="replace") for w in words if w)
    for marker in ("uvicorn", "resource_tracker", "spawn_main"):
        if marker in text:
            return marker
    return text[:40]


def _vm_hwm_kib(pid: int) -> int:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0
    match = re.search(r"VmHWM:\s+(\d+) kB", status)
    return int(match.group(1)) if match else 0


@contextmanager
def serve(app: str, env: dict[str, str], log: Path, core: str = SERVER_CORE) -> Iterator[Server]:
    """Start ``uvicorn app`` on the server core (or ``core``) and wait until it answers."""
    port = _free_port()
    command = ["taskset", "-c", core, sys.executable, "-m", "uvicorn", app, *UVICORN]
    command += ["--port", str(port)]
    with log.open("wb") as out:
        process = subprocess.Popen(
            command, cwd=ROOT, env={**os.environ, **env}, stdout=out, stderr=out
        )
    server = Server(process, f"http://127.0.0.1:{port}")
    watcher = threading.Thread(target=server.watch_memory, daemon=True)
    watcher.start()
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                httpx.get(f"{server.base_url}/check_status/x", timeout=1)
                break
            except httpx.TransportError:
                if time.monotonic() > deadline or process.poll() is not None:
                    raise RuntimeError(log.read_text()) from None
                time.sleep(0.1)
        yield server
    finally:
        process.terminate()
        process.wait(timeout=60)
        server._stop.set()
        watcher.join()


def _free_port() -> int:
    import socket

    with closing(socket.socket()) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def post_script(directory: Path) -> Path:
    """A wrk script that POSTs the small job."""
    script = directory / "post.lua"
    body = SMALL_JOB.decode().replace("\\", "\\\\").replace('"', '\\"')
    script.write_text(
        'wrk.method = "POST"\n'
        f'wrk.body = "{body}"\n'
        'wrk.headers["Content-Type"] = "application/json"\n'
    )
    return script


def big_job_body(items: int = 20_000, keys: int = 20) -> bytes:
    """The big job: 20,000 objects of 20 keys, about 7 MB of JSON."""
    data = [{f"k{k:02}": f"{i:05}-{k:02}" for k in range(keys)} for i in range(items)]
    return orjson.dumps({"job": {"input_data": data}})


def bare_computation(body: bytes) -> float:
    """Parse the body, split/merge every item in a plain loop, serialise the result: seconds."""
    timings = []
    for _ in range(3):
        started = time.perf_counter()
        items = orjson.loads(body)["job"]["input_data"]
        result = [reduce(*expand(item)) for item in items]
        orjson.dumps(result)
        timings.append(time.perf_counter() - started)
    return min(timings)


def db_jobs(db_path: Path) -> tuple[dict[str, int], float]:
    """Job counts by status, and the time (epoch seconds) of the last update."""
    with closing(sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)) as db:
        counts = dict(db.execute("SELECT status, count(*) FROM jobs GROUP BY status").fetchall())
        (last,) = db.execute("SELECT max(updated_at) FROM jobs").fetchone()
    last_time = datetime.strptime(last, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC).timestamp()
    return counts, last_time


def run_big_job(server: Server, body: bytes) -> float:
    """Send the big job and poll until it is completed: seconds from sending to completed."""
    started = time.perf_counter()
    with httpx.Client(base_url=server.base_url, timeout=120) as client:
        response = client.post(
            "/expand_reduce_flow/", content=body, headers={"content-type": "application/json"}
        )
        response.raise_for_status()
        job_id = response.json()["job_id"]
        while True:
            status = client.get(f"/check_status/{job_id}").json()["status"]
            if status != "processing":
                break
            time.sleep(0.005)
    assert status == "completed", status
    return time.perf_counter() - started


def measure_ceiling(args: argparse.Namespace, work: Path) -> dict[str, WrkResult]:
    """Submit and status rates of the do-nothing app."""
    with serve("bench.ceiling:app", {}, work / "ceiling.log") as ceiling:
        submit = wrk(
            f"{ceiling.base_url}/expand_reduce_flow/",
            connections=args.connections,
            seconds=args.seconds,
            script=post_script(work),
        )
        status = wrk(
            f"{ceiling.base_url}/check_status/3f1c2a9e-5b7d-4e8f-9a0b-1c2d3e4f5a6b",
            connections=args.connections,
            seconds=args.seconds,
        )
    return {"submit": submit, "status": status}


def measure_service(args: argparse.Namespace, work: Path, big_body: bytes) -> dict[str, object]:
    """Every figure of the real service, on a fresh database."""
    db_path = work / "jobs.db"
    env = {"DATABASE_URL": f"sqlite:///{db_path}", **dict(e.split("=", 1) for e in args.env)}
    with serve("app.main:app", env, work / "service.log") as server:
        for _ in range(3):  # warm up: imports, the worker process, SQLite's caches
            httpx.post(
                f"{server.base_url}/expand_reduce_flow/",
                content=SMALL_JOB,
                headers={"content-type": "application/json"},
            )
        time.sleep(3)
        warm_count = sum(db_jobs(db_path)[0].values())

        started = time.time()
        submit = wrk(
            f"{server.base_url}/expand_reduce_flow/",
            connections=args.connections,
            seconds=args.seconds,
            script=post_script(work),
        )
        while True:
            counts, last_update = db_jobs(db_path)
            if not counts.get("processing"):
                break
            time.sleep(0.05)
        stored = sum(counts.values()) - warm_count
        accepted = submit.requests - submit.non_2xx
        end_to_end = (counts.get("completed", 0) - warm_count) / (last_update - started)

        with closing(sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)) as db:
            (job_id,) = db.execute("SELECT job_id FROM jobs LIMIT 1").fetchone()
        status = wrk(
            f"{server.base_url}/check_status/{job_id}",
            connections=args.connections,
            seconds=args.seconds,
        )

        # Alone, for the time figure: the best of three, as for the bare computation.
        big_runs = [run_big_job(server, big_body) for _ in range(3)]
        big_seconds = min(big_runs)
        stall: dict[str, WrkResult] = {}
        poller = threading.Thread(
            target=lambda: stall.setdefault(
                "result",
                wrk(
                    f"{server.base_url}/check_status/{job_id}",
                    connections=8,
                    seconds=args.stall_seconds,
                ),
            )
        )
        poller.start()
        time.sleep(1)
        run_big_job(server, big_body)  # again, under status load, for the stall figure
        poller.join()
    return {
        "submit": submit,
        "status": status,
        "end_to_end": end_to_end,
        "failed": counts.get("failed", 0),
        "stored": stored,
        "accepted": accepted,
        "big_seconds": big_seconds,
        "big_runs": big_runs,
        "stall": stall["result"],
        "peak_mib": server.peak_mib,
        "peaks": {server.names.get(pid, "?"): kib // 1024 for pid, kib in server.peak_kib.items()},
    }


def measure_metrics_cost(args: argparse.Namespace, work: Path) -> dict[str, object]:
    """The submit rate with metrics on and off, side by side: two servers at the same time.

    Both are pinned to the server core and driven at once by two wrk processes on the load
    core, so they share the core's time and whatever slows the machine slows both alike; the
    ratio of their rates is the ratio of their costs per request. Twice, the second time with
    the two started in the other order; the figure is the mean of the two ratios.
    """
    ratios: list[float] = []
    rates: dict[str, list[float]] = {"true": [], "false": []}
    for run, order in enumerate((("true", "false"), ("false", "true"))):
        with contextlib.ExitStack() as stack:
            servers = {
                enabled: stack.enter_context(
                    serve(
                        "app.main:app",
                        {
                            "DATABASE_URL": f"sqlite:///{work / f'metrics-{enabled}-{run}.db'}",
                            "METRICS_ENABLED": enabled,
                        },
                        work / f"metrics-{enabled}.log",
                    )
                )
                for enabled in order
            }
            urls = {name: f"{servers[name].base_url}/expand_reduce_flow/" for name in order}
            _at_once(urls, args.connections // 2, 1.0, work)  # warm-up
            results = _at_once(urls, args.connections // 2, args.seconds, work)
            for enabled in order:
                assert results[enabled].non_2xx == 0, results[enabled]
                rates[enabled].append(results[enabled].rate)
            ratios.append(results["true"].rate / results["false"].rate)
    return {
        "on": statistics.mean(rates["true"]),
        "off": statistics.mean(rates["false"]),
        "ratio": statistics.mean(ratios),
        "ratios": ratios,
    }


def _at_once(
    urls: dict[str, str], connections: int, seconds: float, work: Path
) -> dict[str, WrkResult]:
    """Submit to every url at the same time, a wrk process each."""
    results: dict[str, WrkResult] = {}
    script = post_script(work)

    def load(name: str) -> None:
        results[name] = wrk(urls[name], connections=connections, seconds=seconds, script=script)

    threads = [threading.Thread(target=load, args=(name,)) for name in urls]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return results


def measure_housekeeping(args: argparse.Namespace, work: Path) -> dict[str, object]:
    """Status p99 of other clients while 500 long-poll waiters wait, and during a purge.

    The purge is of 10,000 expired jobs: the service is restarted on a file holding them, so
    it runs at once.
    """
    db_path = work / "housekeeping.db"
    env = {"DATABASE_URL": f"sqlite:///{db_path}"}
    with serve("app.main:app", env, work / "housekeeping.log") as server:
        job_id = _completed_job(server)
        lags = _long_poll_lags(server, jobs=10)
        waited = _insert_jobs_running_elsewhere(db_path, 500)
        with _waiting(server, waited) as waiting:
            during_waits = wrk(
                f"{server.base_url}/check_status/{job_id}",
                connections=8,
                seconds=args.stall_seconds,
            )
        still_waiting = waiting["answered_early"] == 0
    _insert_expired_jobs(db_path, 10_000)
    purge: dict[str, float] = {}
    with serve("app.main:app", env, work / "housekeeping.log") as server:
        watcher = threading.Thread(target=_watch_purge, args=(db_path, purge), daemon=True)
        watcher.start()
        during_purge = wrk(
            f"{server.base_url}/check_status/{job_id}",
            connections=8,
            seconds=args.stall_seconds,
        )
        watcher.join(timeout=60)
    return {
        "long_poll_lags": lags,
        "waits": during_waits,
        "waiters_held": still_waiting,
        "purge": during_purge,
        "purge_seconds": purge.get("done", float("nan")),
        "purge_seen_running": purge.get("first_left", 0.0),
    }


def _completed_job(server: Server) -> str:
    with httpx.Client(base_url=server.base_url, timeout=30) as client:
        response = client.post(
            "/expand_reduce_flow/", content=SMALL_JOB, headers={"content-type": "application/json"}
        )
        job_id: str = response.json()["job_id"]
        status = client.get(f"/check_status/{job_id}", params={"wait": 10}).json()
    assert status["status"] == "completed", status
    return job_id


def _long_poll_lags(server: Server, jobs: int) -> list[float]:
    """Seconds from each job's finish (its ``updated_at``) to its long-poll's answer."""
    body = big_job_body(items=20_000, keys=5)
    lags = []
    with httpx.Client(base_url=server.base_url, timeout=60) as client:
        for _ in range(jobs):
            response = client.post(
                "/expand_reduce_flow/", content=body, headers={"content-type": "application/json"}
            )
            job_id = response.json()["job_id"]
            status = client.get(f"/check_status/{job_id}", params={"wait": 30}).json()
            answered = time.time()
            assert status["status"] == "completed", status
            lags.append(answered - datetime.fromisoformat(status["updated_at"]).timestamp())
    return lags


def _insert_jobs_running_elsewhere(db_path: Path, count: int) -> list[str]:
    """Jobs another (unknown) process is running, on leases an hour long: they stay processing."""
    now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    ids = [f"00000000-0000-4000-8000-{n:012}" for n in range(count)]
    with closing(sqlite3.connect(db_path, timeout=30)) as db, db:
        db.executemany(
            "INSERT INTO jobs (job_id, status, created_at, updated_at, input_data) "
            "VALUES (?, 'processing', ?, ?, '[{}]')",
            [(job_id, now, now) for job_id in ids],
        )
        db.executemany(
            "INSERT INTO job_leases (job_id, owner, attempts, lease_until, total_items) "
            "VALUES (?, 'elsewhere', 1, ?, 1)",
            [(job_id, time.time() + 3600) for job_id in ids],
        )
    return ids


# The ids of the jobs made expired: no UUID a submission gets starts like this.
EXPIRED_PREFIX = "expired"


def _insert_expired_jobs(db_path: Path, count: int) -> None:
    """Jobs that finished in 2000, each with 2 KB of input and as much result."""
    payload = orjson.dumps([{"k": "v" * 2000}]).decode()
    stamp = "2000-01-01T00:00:00.000000Z"
    with closing(sqlite3.connect(db_path, timeout=30)) as db, db:
        db.executemany(
            "INSERT INTO jobs (job_id, status, created_at, updated_at, input_data, output_data) "
            "VALUES (?, 'completed', ?, ?, ?, ?)",
            [(f"{EXPIRED_PREFIX}{n:030}", stamp, stamp, payload, payload) for n in range(count)],
        )


def _watch_purge(db_path: Path, seen: dict[str, float]) -> None:
    """Record how many expired jobs were left when first looked at, and when none were."""
    started = time.monotonic()
    while time.monotonic() - started < 60:
        with closing(sqlite3.connect(f"file:{db_path}?mode=ro", uri=True, timeout=30)) as db:
            (left,) = db.execute(
                "SELECT count(*) FROM jobs WHERE job_id LIKE ?", (f"{EXPIRED_PREFIX}%",)
            ).fetchone()
        seen.setdefault("first_left", left)
        if not left:
            seen["done"] = time.monotonic() - started
            return
        time.sleep(0.05)


@contextmanager
def _waiting(server: Server, job_ids: list[str]) -> Iterator[dict[str, int]]:
    """One long-poll request (?wait=30) per job, all waiting while the block runs."""
    import asyncio

    state = {"answered_early": 0}
    ready = threading.Event()
    stop: asyncio.Event | None = None
    loop = asyncio.new_event_loop()

    async def wait_all() -> None:
        nonlocal stop
        stop = asyncio.Event()
        limits = httpx.Limits(max_connections=len(job_ids) + 10)
        async with httpx.AsyncClient(base_url=server.base_url, timeout=60, limits=limits) as c:

            async def one(job_id: str) -> None:
                await c.get(f"/check_status/{job_id}", params={"wait": 30})
                if not stop.is_set():
                    state["answered_early"] += 1

            tasks = [asyncio.create_task(one(job_id)) for job_id in job_ids]
            await asyncio.sleep(1)  # every request sent and waiting
            ready.set()
            await stop.wait()
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    thread = threading.Thread(target=loop.run_until_complete, args=(wait_all(),), daemon=True)
    thread.start()
    ready.wait(timeout=30)
    try:
        yield state
    finally:
        assert stop is not None
        loop.call_soon_threadsafe(stop.set)
        thread.join(timeout=30)


def main() -> None:
    """Run everything and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=8)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--stall-seconds", type=float, default=6)
    parser.add_argument("--env", action="append", default=[], help="NAME=value for the service")
    args = parser.parse_args()
    for tool in ("wrk", "taskset"):
        if shutil.which(tool) is None:
            sys.exit(f"{tool} is needed: apt-get install wrk util-linux")

    big_body = big_job_body()
    with tempfile.TemporaryDirectory(prefix="bench-") as directory:
        work = Path(directory)
        ceiling = measure_ceiling(args, work)
        service = measure_service(args, work, big_body)
        housekeeping = measure_housekeeping(args, work)
        metrics_cost = measure_metrics_cost(args, work)
    bare = _pinned(big_body)
    waits, purge = housekeeping["waits"], housekeeping["purge"]
    assert isinstance(waits, WrkResult)
    assert isinstance(purge, WrkResult)
    purge_seconds = float(housekeeping["purge_seconds"])  # type: ignore[arg-type]
    lags = housekeeping["long_poll_lags"]
    assert isinstance(lags, list)

    submit, status, stall = service["submit"], service["status"], service["stall"]
    assert isinstance(submit, WrkResult)
    assert isinstance(status, WrkResult)
    assert isinstance(stall, WrkResult)
    c_submit, c_status = ceiling["submit"].rate, ceiling["status"].rate
    e2e = float(service["end_to_end"])  # type: ignore[arg-type]
    big = float(service["big_seconds"])  # type: ignore[arg-type]
    peak = float(service["peak_mib"])  # type: ignore[arg-type]
    rows = [
        (
            "submit rate (req/s)",
            f"{submit.rate:,.0f}",
            f"{c_submit:,.0f}",
            submit.rate / c_submit,
            "≥ 0.55",
            submit.rate / c_submit >= 0.55 and submit.non_2xx == 0,
        ),
        (
            "status rate (req/s)",
            f"{status.rate:,.0f}",
            f"{c_status:,.0f}",
            status.rate / c_status,
            "≥ 0.90",
            status.rate / c_status >= 0.9 and status.non_2xx == 0,
        ),
        (
            "end-to-end (jobs/s)",
            f"{e2e:,.0f}",
            f"{c_submit:,.0f}",
            e2e / c_submit,
            "≥ 0.40, none failed",
            e2e / c_submit >= 0.4 and service["failed"] == 0,
        ),
        (
            "big job 20,000x20 (s)",
            f"{big:.2f}",
            f"{bare:.2f} bare",
            big / bare,
            "≤ 3.0",
            big / bare <= 3.0,
        ),
        (
            "status during big job p99 (ms)",
            f"{stall.p99_ms:.1f}",
            "",
            None,
            "< 50, none > 2 s",
            stall.p99_ms < 50 and stall.timeouts == 0 and stall.max_ms < 2000,
        ),
        ("peak RSS, server + workers (MB)", f"{peak:.0f}", "", None, "< 200", peak < 200),
        (
            "submit rate, metrics on vs off, side by side (req/s)",
            f"{metrics_cost['on']:,.0f}",
            f"{metrics_cost['off']:,.0f} off",
            float(metrics_cost["ratio"]),  # type: ignore[arg-type]
            "≥ 0.95",
            float(metrics_cost["ratio"]) >= 0.95,  # type: ignore[arg-type]
        ),
        (
            "long-poll answer after the job finished, worst of 10 (ms)",
            f"{max(lags) * 1000:.0f}",
            "",
            None,
            "< 100",
            max(lags) < 0.1,
        ),
        (
            "status with 500 long-poll waiters p99 (ms)",
            f"{waits.p99_ms:.1f}",
            "",
            None,
            "< 50",
            waits.p99_ms < 50 and waits.non_2xx == 0 and bool(housekeeping["waiters_held"]),
        ),
        (
            "status while 10,000 jobs are purged p99 (ms)",
            f"{purge.p99_ms:.1f}",
            "",
            None,
            "< 50",
            purge.p99_ms < 50 and purge.non_2xx == 0 and purge_seconds < args.stall_seconds,
        ),
    ]
    print(
        f"\n{datetime.now(UTC):%Y-%m-%d %H:%M} UTC · {_cpu()} · {os.cpu_count()} cores · "
        f"Python {platform.python_version()} · server on core {SERVER_CORE}, wrk on {LOAD_CORE}"
    )
    print("\n| figure | service | ceiling / baseline | ratio | target | met |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name, mine, theirs, ratio, target, met in rows:
        shown = f"{ratio:.2f}" if ratio is not None else ""
        print(f"| {name} | {mine} | {theirs} | {shown} | {target} | {'yes' if met else 'NO'} |")
    print(
        f"\nsubmit: {submit.requests} requests, {submit.non_2xx} non-2xx, {service['accepted']} "
        f"accepted, {service['stored']} rows stored; status during the big job: "
        f"{stall.requests} requests, p50 {stall.p50_ms:.1f} ms, max {stall.max_ms:.0f} ms, "
        f"{stall.timeouts} over 2 s (timed out), {stall.errors} socket errors; "
        f"{service['failed']} jobs failed; peak RSS by process (MB): {service['peaks']}; "
        f"big job runs (s): {', '.join(f'{run:.2f}' for run in service['big_runs'])}"  # type: ignore[attr-defined]
    )
    print(
        f"long-poll: 500 waiters held throughout: {housekeeping['waiters_held']}, status "
        f"{waits.requests} requests, p50 {waits.p50_ms:.1f} ms, max {waits.max_ms:.0f} ms; purge: "
        f"{housekeeping['purge_seen_running']:.0f} expired jobs left when first looked at, all "
        f"gone {purge_seconds:.1f} s after the restart, status {purge.requests} requests "
        f"meanwhile, p50 {purge.p50_ms:.1f} ms, max {purge.max_ms:.0f} ms"
    )
    ratios = ", ".join(f"{ratio:.2f}" for ratio in metrics_cost["ratios"])  # type: ignore[attr-defined]
    print(
        f"metrics on/off: submit rates {metrics_cost['on']:,.0f} and {metrics_cost['off']:,.0f} "
        f"req/s (means, each server having half the core), on/off ratios {ratios}; long-poll "
        f"answers after the finish (ms): {', '.join(f'{lag * 1000:.0f}' for lag in lags)}"
    )


def _pinned(body: bytes) -> float:
    """The bare computation, run on the server's core like the server was."""
    os.sched_setaffinity(0, {int(SERVER_CORE)})
    try:
        return bare_computation(body)
    finally:
        os.sched_setaffinity(0, set(range(os.cpu_count() or 1)))


def _cpu() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


if __name__ == "__main__":
    main()
