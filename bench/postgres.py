"""PostgreSQL mode: submit and end-to-end rates with one and two replicas, against the ceiling.

    make bench-postgres   # or: .venv/bin/python -m bench.postgres --seconds 8

Needs wrk and a PostgreSQL server where the user may create databases (by default the local
one as user postgres; --admin-url to change it); the benchmark creates a database of its own
and drops it afterwards. The ceiling is measured in the same run, as in ``bench.run``.

One replica runs like the SQLite benchmark: the server on one core, wrk on the other. Two
replicas run one on each core, each driven by its own wrk with half the connections, so the
replicas, the load generators and PostgreSQL itself all share the same two cores: the
two-replica figure shows the cost of coordination through the database, not added capacity.
"""

import argparse
import shutil
import sys
import tempfile
import threading
import time
import uuid
from contextlib import ExitStack
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import httpx
import psycopg

from bench.run import (
    LOAD_CORE,
    SERVER_CORE,
    SMALL_JOB,
    WrkResult,
    _cpu,
    measure_ceiling,
    post_script,
    serve,
    wrk,
)

ADMIN_URL = "postgresql://postgres@127.0.0.1:5432/postgres"


def job_counts(url: str) -> tuple[int, int, int, float]:
    """(processing, completed, failed, epoch seconds of the last update) in the database."""
    with psycopg.connect(url, autocommit=True) as db:
        row = db.execute(
            "SELECT count(*) FILTER (WHERE status = 'processing'),"
            " count(*) FILTER (WHERE status = 'completed'),"
            " count(*) FILTER (WHERE status = 'failed'), max(updated_at) FROM jobs"
        ).fetchone()
    assert row is not None
    processing, completed, failed, last = row
    stamp = datetime.strptime(last, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC).timestamp()
    return processing, completed, failed, stamp


def measure(url: str, replicas: int, args: argparse.Namespace, work: Path) -> dict[str, float]:
    """Submit rate and end-to-end completion rate of ``replicas`` servers on one database."""
    cores = [SERVER_CORE, LOAD_CORE]
    with ExitStack() as stack:
        servers = [
            stack.enter_context(
                serve(
                    "app.main:app",
                    {"DATABASE_URL": url},
                    work / f"replica-{replicas}-{n}.log",
                    core=cores[n % 2],
                )
            )
            for n in range(replicas)
        ]
        for server in servers:  # warm up: connections, imports
            for _ in range(3):
                httpx.post(
                    f"{server.base_url}/expand_reduce_flow/",
                    content=SMALL_JOB,
                    headers={"content-type": "application/json"},
                )
        time.sleep(2)
        warm = job_counts(url)[1]
        # One load generator per replica, on the other core than its replica where there is one.
        loads = [cores[(n + 1) % 2] for n in range(replicas)]
        results: list[WrkResult] = []
        started = time.time()
        threads = [
            threading.Thread(
                target=lambda server=server, core=core: results.append(
                    wrk(
                        f"{server.base_url}/expand_reduce_flow/",
                        connections=args.connections // replicas,
                        seconds=args.seconds,
                        script=post_script(work),
                        core=core,
                    )
                )
            )
            for server, core in zip(servers, loads, strict=True)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        while True:
            processing, completed, failed, last = job_counts(url)
            if processing == 0:
                break
            time.sleep(0.05)
    return {
        "submit": sum(result.rate for result in results),
        "non_2xx": sum(result.non_2xx for result in results),
        "end_to_end": (completed - warm) / (last - started),
        "failed": failed,
    }


def reset(url: str) -> None:
    """Drop the service's tables, so the next measurement starts on an empty database."""
    with psycopg.connect(url, autocommit=True) as db:
        db.execute("DROP TABLE IF EXISTS jobs, job_leases, schema_version")


def main() -> None:
    """Run both modes and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=8)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--admin-url", default=ADMIN_URL)
    args = parser.parse_args()
    for tool in ("wrk", "taskset"):
        if shutil.which(tool) is None:
            sys.exit(f"{tool} is needed: apt-get install wrk util-linux")

    name = f"bench_{uuid.uuid4().hex[:8]}"
    url = urlunsplit(urlsplit(args.admin_url)._replace(path=f"/{name}"))
    with psycopg.connect(args.admin_url, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"'.encode())
        try:
            with tempfile.TemporaryDirectory(prefix="bench-") as directory:
                work = Path(directory)
                ceiling = measure_ceiling(args, work)["submit"].rate
                figures = {}
                for replicas in (1, 2):
                    reset(url)
                    figures[replicas] = measure(url, replicas, args, work)
        finally:
            admin.execute(f'DROP DATABASE "{name}" WITH (FORCE)'.encode())

    version = psycopg.connect(args.admin_url).info.server_version
    print(
        f"\n{datetime.now(UTC):%Y-%m-%d %H:%M} UTC · {_cpu()} · PostgreSQL {version // 10000} · "
        f"{args.connections} connections, {args.seconds:g} s · ceiling submit {ceiling:,.0f}/s"
    )
    print("\n| replicas | submit (req/s) | ratio | end-to-end (jobs/s) | ratio | failed |")
    print("| --- | --- | --- | --- | --- | --- |")
    for replicas, figure in figures.items():
        print(
            f"| {replicas} | {figure['submit']:,.0f} | {figure['submit'] / ceiling:.2f} | "
            f"{figure['end_to_end']:,.0f} | {figure['end_to_end'] / ceiling:.2f} | "
            f"{figure['failed']:.0f} (non-2xx: {figure['non_2xx']:.0f}) |"
        )


if __name__ == "__main__":
    main()
