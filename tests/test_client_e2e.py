"""The ``expand-reduce`` command and the client against real servers: a live uvicorn, one that
is stopped, a proxy that loses an answer, a server that is busy, and a terminal (a pty).
"""

import contextlib
import fcntl
import itertools
import json
import os
import pty
import re
import select
import shlex
import socket
import struct
import subprocess
import sys
import termios
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, ClassVar

import httpx
import pytest

from expand_reduce_client import Client
from tests.support import Server, count_jobs, free_port, start_server, stop_server

CLI = str(Path(sys.executable).parent / "expand-reduce")  # installed by make install
ITEMS = [{"1": "2", "3": "4", "5": "6", "7": "8"}, {"key1": "value1"}]
RESULT = [{"1 5": "2 6", "3 7": "4 8"}, {"key1": "value1"}]


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    directory = tmp_path_factory.mktemp("client")
    # Progress is recorded at each heartbeat: often, so a terminal shows the bar move.
    env = {"JOB_LEASE_SECONDS": "3", "HEARTBEAT_INTERVAL_SECONDS": "0.2"}
    running = start_server(directory / "jobs.db", directory / "server.log", env)
    yield running
    stop_server(running)


def cli(
    *args: str, url: str, stdin: bytes | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "EXPAND_REDUCE_URL": url}
    run = subprocess.run(
        [CLI, *args], input=stdin, capture_output=True, env=env, timeout=timeout, check=False
    )
    return subprocess.CompletedProcess(
        run.args, run.returncode, run.stdout.decode(), run.stderr.decode()
    )


def service_result(server: Server, job_id: str) -> Any:
    with Client(server.base_url) as client:
        client.wait(job_id, timeout=30)
        return client.result(job_id).result


# Submitting: a file of each kind, and stdin.


def test_submit_a_json_array_file_prints_the_job_id(live: Server, tmp_path: Path) -> None:
    source = tmp_path / "input.json"
    source.write_text(json.dumps(ITEMS))
    run = cli("submit", str(source), url=live.base_url)
    assert run.returncode == 0, run.stderr
    job_id = run.stdout.strip()
    assert uuid.UUID(job_id).version == 4
    assert service_result(live, job_id) == RESULT


def test_submit_a_json_lines_file_with_wait_o_writes_exactly_the_services_result(
    live: Server, tmp_path: Path
) -> None:
    source, output = tmp_path / "input.jsonl", tmp_path / "out.json"
    source.write_text("\n".join(json.dumps(item) for item in ITEMS) + "\n")
    run = cli("submit", str(source), "--wait", "-o", str(output), url=live.base_url)
    assert run.returncode == 0, run.stderr
    job_id = re.search(r"submitted (\S+)", run.stderr)
    assert job_id, run.stderr
    assert json.loads(output.read_text()) == service_result(live, job_id.group(1)) == RESULT
    assert run.stdout == ""


def test_submit_a_job_body_on_stdin_with_wait_prints_the_result(live: Server) -> None:
    body = json.dumps({"job": {"input_data": ITEMS}}).encode()
    run = cli("submit", "-", "--wait", url=live.base_url, stdin=body)
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout) == RESULT


def test_submit_with_json_prints_the_submission_as_json(live: Server) -> None:
    run = cli("submit", "-", "--json", url=live.base_url, stdin=json.dumps(ITEMS).encode())
    assert run.returncode == 0, run.stderr
    answer = json.loads(run.stdout)
    assert answer["replayed"] is False
    assert service_result(live, answer["job_id"]) == RESULT


def test_a_job_that_fails_exits_1_with_the_services_error(live: Server) -> None:
    colliding = json.dumps([{"a": "1", "x": "2", "a x": "3"}]).encode()
    run = cli("submit", "-", "--wait", url=live.base_url, stdin=colliding)
    assert run.returncode == 1
    assert "output key 'a x' would be written twice" in run.stderr
    assert "Traceback" not in run.stderr
    job_id = re.search(r"job (\S+) failed", run.stderr)
    assert job_id
    status = cli("status", job_id.group(1), url=live.base_url)
    assert status.returncode == 1
    assert " failed " in status.stdout


@pytest.mark.parametrize("command", ["status", "result", "cancel", "delete"])
def test_an_unknown_job_id_exits_4(live: Server, command: str) -> None:
    run = cli(command, str(uuid.uuid4()), url=live.base_url)
    assert run.returncode == 4
    assert "not found or expired" in run.stderr
    assert "Traceback" not in run.stderr


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        (b"not json\n", "line 1: not JSON"),
        (b'[{"a": "b"}, 3]', "item 1 is not a JSON object"),
        (b'{"job": {"input_data": 5}}', "a body must be"),
        (b"", "holds no objects"),
    ],
)
def test_bad_input_exits_2_saying_what_is_wrong(live: Server, content: bytes, problem: str) -> None:
    run = cli("submit", "-", url=live.base_url, stdin=content)
    assert run.returncode == 2
    assert problem in run.stderr
    assert "Traceback" not in run.stderr


def test_a_finished_job_can_be_listed_and_deleted_but_not_cancelled(live: Server) -> None:
    with Client(live.base_url) as client:
        job = client.submit(ITEMS, wait=True, timeout=30)
    listed = cli("list", "--status", "completed", "--limit", "5", "--json", url=live.base_url)
    assert listed.returncode == 0, listed.stderr
    assert job.job_id in [row["job_id"] for row in json.loads(listed.stdout)["jobs"]]
    table = cli("list", "--limit", "5", url=live.base_url)
    assert job.job_id in table.stdout  # whole, not cropped
    cancel = cli("cancel", job.job_id, url=live.base_url)
    assert cancel.returncode == 1
    assert "already finished" in cancel.stderr
    delete = cli("delete", job.job_id, url=live.base_url)
    assert (delete.returncode, delete.stdout.strip()) == (0, f"deleted {job.job_id}")
    assert cli("status", job.job_id, url=live.base_url).returncode == 4


def test_a_file_over_the_services_limits_is_refused_before_it_is_sent(tmp_path: Path) -> None:
    env = {"MAX_BODY_BYTES": "2000", "MAX_ITEMS": "5"}
    server = start_server(tmp_path / "jobs.db", tmp_path / "server.log", env)
    try:
        too_many = cli("submit", "-", url=server.base_url, stdin=json.dumps(ITEMS * 3).encode())
        assert too_many.returncode == 2
        assert "6 objects; the service takes at most 5 in one job (MAX_ITEMS)" in too_many.stderr
        large = json.dumps([{"k": "v" * 3000}]).encode()
        too_large = cli("submit", "-", url=server.base_url, stdin=large)
        assert too_large.returncode == 2
        assert "the service takes at most 2,000 (MAX_BODY_BYTES)" in too_large.stderr
    finally:
        stop_server(server)
    assert count_jobs(tmp_path / "jobs.db") == 0
    assert "POST /expand_reduce_flow/" not in server.log()


def test_a_stopped_server_exits_3_after_the_retry_deadline_without_a_traceback(
    tmp_path: Path,
) -> None:
    server = start_server(tmp_path / "jobs.db", tmp_path / "server.log")
    stop_server(server)
    started = time.monotonic()
    run = cli("status", str(uuid.uuid4()), "--retry-deadline", "2", url=server.base_url)
    took = time.monotonic() - started
    assert run.returncode == 3
    assert f"cannot reach {server.base_url}" in run.stderr
    assert "gave up after 2 s" in run.stderr
    assert "Traceback" not in run.stderr
    assert took >= 1.5  # it did keep trying until about the deadline


# Retries against servers that misbehave.


class _LosesFirstSubmitAnswer(BaseHTTPRequestHandler):
    """A proxy to the live server that forwards everything, but never delivers the answer to
    the first submission (which the server has committed by then)."""

    upstream = ""
    submits: ClassVar[list[dict[str, str]]] = []

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        headers = {k: v for k, v in self.headers.items() if k.lower() not in {"host", "connection"}}
        answer = httpx.post(self.upstream + self.path, content=body, headers=headers)
        self.submits.append(dict(answer.headers) | {"status": str(answer.status_code)})
        if len(self.submits) == 1:
            self.close_connection = True  # the answer is lost on the way back
            return
        self._relay(answer)

    def do_GET(self) -> None:
        self._relay(httpx.get(self.upstream + self.path))

    def _relay(self, answer: httpx.Response) -> None:
        self.send_response(answer.status_code)
        for name in ("content-type", "location", "idempotent-replayed", "retry-after"):
            if name in answer.headers:
                self.send_header(name, answer.headers[name])
        self.send_header("Content-Length", str(len(answer.content)))
        self.end_headers()
        self.wfile.write(answer.content)

    def log_message(self, *args: Any) -> None:
        pass


@contextmanager
def serve(handler: type[BaseHTTPRequestHandler]) -> Iterator[str]:
    """A real HTTP server with this handler, on a free port, for the duration."""
    server = ThreadingHTTPServer(("127.0.0.1", free_port()), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_a_submission_whose_answer_is_lost_is_retried_into_the_same_one_job(
    live: Server,
) -> None:
    database = Path(live.log_path).parent / "jobs.db"
    before = count_jobs(database)
    _LosesFirstSubmitAnswer.upstream = live.base_url
    _LosesFirstSubmitAnswer.submits = []
    with serve(_LosesFirstSubmitAnswer) as url, Client(url, retry_deadline=10) as client:
        submission = client.submit(ITEMS)
    first, retry = _LosesFirstSubmitAnswer.submits
    assert first["status"] == retry["status"] == "202"
    assert retry["idempotent-replayed"] == "true"
    assert (
        submission.job_id
        == json.loads(httpx.get(f"{live.base_url}/jobs").text)["jobs"][0]["job_id"]
    )
    assert submission.replayed is True
    assert count_jobs(database) == before + 1


class _BusyTwice(BaseHTTPRequestHandler):
    """Answers a submission 503 with Retry-After: 1 twice, then accepts it."""

    seen: ClassVar[list[tuple[float, str]]] = []

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers["Content-Length"]))
        self.seen.append((time.monotonic(), self.headers["Idempotency-Key"]))
        if len(self.seen) <= 2:
            body = b'{"detail": "The job store is unavailable (the database is busy)"}'
            self.send_response(503)
            self.send_header("Retry-After", "1")
        else:
            body = b'{"job_id": "3f1c2a9e-5b7d-4e8f-9a0b-1c2d3e4f5a6b"}'
            self.send_response(202)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:  # no OpenAPI document: no limits known
        self.send_response(404)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


def test_503_with_retry_after_1_twice_then_202_waits_as_told_and_succeeds() -> None:
    _BusyTwice.seen = []
    with serve(_BusyTwice) as url:
        run = cli("submit", "-", url=url, stdin=json.dumps(ITEMS).encode())
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "3f1c2a9e-5b7d-4e8f-9a0b-1c2d3e4f5a6b"
    times, keys = zip(*_BusyTwice.seen, strict=True)
    assert len(times) == 3
    assert all(later - earlier >= 0.95 for earlier, later in itertools.pairwise(times))
    assert len(set(keys)) == 1  # one logical submission, one key


# Progress on a terminal, and none without one.


def big_input(path: Path, items: int = 100_000) -> Path:
    """Objects of 8 keys: 100,000 of them run long enough (over a second here) to show progress."""
    path.write_text(json.dumps([{f"k{k}": f"v{i}-{k}" for k in range(8)} for i in range(items)]))
    return path


def test_on_a_terminal_submit_wait_shows_progress_and_the_output_is_the_result(
    live: Server, tmp_path: Path
) -> None:
    source, output = big_input(tmp_path / "big.json"), tmp_path / "out.json"
    controller, terminal = pty.openpty()
    fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
    env = {**os.environ, "EXPAND_REDUCE_URL": live.base_url, "TERM": "xterm-256color"}
    env.pop("NO_COLOR", None)
    with output.open("wb") as stdout:
        process = subprocess.Popen(
            [CLI, "submit", str(source), "--wait"], stdout=stdout, stderr=terminal, env=env
        )
    os.close(terminal)
    shown = b""
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        if select.select([controller], [], [], 0.5)[0]:
            try:
                chunk = os.read(controller, 65536)
            except OSError:  # the terminal's other end closed: the command is done
                break
            if not chunk:
                break
            shown += chunk
        elif process.poll() is not None:
            break
    os.close(controller)
    assert process.wait(timeout=10) == 0, shown.decode(errors="replace")
    screen = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", shown.decode(errors="replace"))
    # rich's live line: a spinner, "<id> queued" (or processing), a bar, objects done (once
    # the service has reported any: this job may finish first), the time elapsed.
    assert re.search(r"[0-9a-f]{8} (queued|processing) .* objects \d:\d\d:\d\d", screen), screen
    assert "completed after" in screen
    job_id = re.search(r"submitted (\S+)", screen)
    assert job_id
    assert json.loads(output.read_text()) == service_result(live, job_id.group(1))


def test_without_a_terminal_no_progress_is_written(live: Server, tmp_path: Path) -> None:
    source = big_input(tmp_path / "big.json", items=20_000)
    run = cli("submit", str(source), "--wait", url=live.base_url)
    assert run.returncode == 0, run.stderr
    assert len(json.loads(run.stdout)) == 20_000
    assert run.stderr.splitlines() == [
        line for line in run.stderr.splitlines() if "submitted" in line
    ]
    assert "\x1b" not in run.stderr
    assert "\r" not in run.stderr


# The README's session, run as it is.

UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
TIME = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z")


def _normalised(lines: list[str], ids: dict[str, str]) -> list[str]:
    """Ids numbered in order of appearance (the unknown one kept), times blanked."""

    def number(match: re.Match[str]) -> str:
        if match.group(0) == "3f1c2a9e-5b7d-4e8f-9a0b-1c2d3e4f5a6b":
            return match.group(0)
        return ids.setdefault(match.group(0), f"<id{len(ids)}>")

    return [TIME.sub("<time>", UUID.sub(number, line)).rstrip() for line in lines]


def test_the_readme_cli_session_prints_what_the_readme_shows(tmp_path: Path) -> None:
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    block = re.search(r"<!-- cli-session -->\s*```console\n(.*?)```", readme, re.S)
    assert block, "README.md has no CLI session"
    commands, shown = [], []
    for line in block.group(1).splitlines():
        if line.startswith("$ "):
            commands.append(line[2:])
        shown.append(line)
    script = "\n".join(
        f"echo {shlex.quote('$ ' + command)}\n{{ {command}; }} 2>&1" for command in commands
    )
    server = start_server(tmp_path / "jobs.db", tmp_path / "server.log")
    try:
        env = {
            **os.environ,
            "EXPAND_REDUCE_URL": server.base_url,
            "PATH": f"{Path(CLI).parent}:{os.environ['PATH']}",
        }
        run = subprocess.run(
            ["bash", "-c", script],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
    finally:
        stop_server(server)
    assert run.returncode == 0, run.stderr
    # The README's ids and the run's are numbered alike when they appear in the same places.
    assert _normalised(run.stdout.splitlines(), {}) == _normalised(shown, {})


# Servers that are not the service, and input the client cannot send.


@contextmanager
def raw_server(answer: Callable[[socket.socket], None]) -> Iterator[str]:
    """A TCP server on a free port that reads a request and then does ``answer`` with it."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.2)
    done = threading.Event()
    held: list[socket.socket] = []

    def serve_forever() -> None:
        while not done.is_set():
            try:
                connection, _ = listener.accept()
            except TimeoutError:
                continue
            held.append(connection)
            threading.Thread(target=answer, args=(connection,), daemon=True).start()

    thread = threading.Thread(target=serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    finally:
        done.set()
        thread.join()
        for connection in held:
            connection.close()
        listener.close()


def never_answers(connection: socket.socket) -> None:
    connection.recv(65536)


def trickles(connection: socket.socket) -> None:
    connection.recv(65536)
    with contextlib.suppress(OSError):
        connection.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n")
        for _ in range(1000):
            connection.sendall(b" ")
            time.sleep(0.2)  # the server's pace: one byte at a time


def garbage(connection: socket.socket) -> None:
    connection.recv(65536)
    body = b"<html>not the service</html>"
    connection.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
    connection.close()


@pytest.mark.parametrize("server", [never_answers, trickles], ids=["hangs", "trickles"])
def test_a_server_that_hangs_or_trickles_is_given_up_on_at_the_retry_deadline(
    server: Callable[[socket.socket], None],
) -> None:
    with raw_server(server) as url:
        run = cli("status", str(uuid.uuid4()), "--retry-deadline", "2", url=url, timeout=30)
    assert run.returncode == 3
    assert "did not answer within" in run.stderr
    assert "gave up after 2 s" in run.stderr
    assert "Traceback" not in run.stderr


@pytest.mark.parametrize("command", ["status", "delete"])
def test_an_answer_that_is_not_the_services_exits_3_saying_so(command: str) -> None:
    with raw_server(garbage) as url:
        run = cli(command, str(uuid.uuid4()), url=url)
    assert run.returncode == 3
    assert "is not this service's" in run.stderr
    assert "Traceback" not in run.stderr


def test_an_unwritable_output_is_refused_before_the_job_is_sent(live: Server) -> None:
    database = Path(live.log_path).parent / "jobs.db"
    before = count_jobs(database)
    run = cli(
        "submit", "-", "--wait", "-o", "/nonexistent/dir/out.json",
        url=live.base_url, stdin=json.dumps(ITEMS).encode(),
    )  # fmt: skip
    assert run.returncode == 2
    assert "cannot write /nonexistent/dir/out.json" in run.stderr
    assert count_jobs(database) == before


@pytest.mark.parametrize(
    ("args", "stdin", "problem"),
    [
        (["status", "../healthz"], b"", "a job_id is a UUID"),
        (["submit", "-"], b'[{"a": "\\ud800"}]', "not valid Unicode"),
        (["submit", "-"], b'[{"a": "\xff"}]', "cannot read stdin"),
        (["submit", "-"], b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
        (["submit", "-", "--api-key", "kü"], b"[{}]", "API key is printable ASCII"),
        (["submit", "-", "--idempotency-key", "ключ"], b"[{}]", "Idempotency-Key is 1 to 255"),
        (["status", str(uuid.UUID(int=1)), "--url", "localhost:8080"], b"", "must start with"),
        (["status", str(uuid.UUID(int=1)), "--url", "http://[::1"], b"", "is not valid"),
        (["status", str(uuid.UUID(int=1)), "--retry-deadline", "nan"], b"", "must be a number"),
        (["submit", "-"], b'[{"a": ' + b"1" * 5000 + b"}]", "Exceeds the limit"),
    ],
    ids=[
        "id-not-uuid",
        "lone-surrogate",
        "not-utf8",
        "deep",
        "api-key",
        "key",
        "no-scheme",
        "bad-url",
        "nan-deadline",
        "huge-number",
    ],
)
def test_what_the_client_cannot_send_exits_at_once_saying_why(
    live: Server, args: list[str], stdin: bytes, problem: str
) -> None:
    run = cli(*args, url=live.base_url, stdin=stdin, timeout=20)
    assert run.returncode in (2, 4), run.stderr
    assert problem in run.stderr
    assert "Traceback" not in run.stderr


def test_a_file_with_a_byte_order_mark_is_read(live: Server, tmp_path: Path) -> None:
    source = tmp_path / "bom.json"
    source.write_bytes(b"\xef\xbb\xbf" + json.dumps(ITEMS).encode())
    run = cli("submit", str(source), "--wait", url=live.base_url)
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout) == RESULT
