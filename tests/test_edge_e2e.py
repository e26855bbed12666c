"""The HTTP edge against a real ``uvicorn --http app.protocol:HttpProtocol`` over raw sockets.

Oversized heads get 431 with the server's memory measured around them; slow heads and slow
bodies get 408 and lose their connection; HEAD answers wherever GET does, headers alone.
"""

import contextlib
import select
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import orjson
import pytest

from app.protocol import MAX_HEAD_BYTES, MAX_HEADERS
from tests.support import Server, count_jobs, start_server, stop_server, submit_all

BODY_TIMEOUT = 1.0
ITEMS = [{"a": "x", "b": "y", "c": "z"}]
JOB = orjson.dumps({"job": {"input_data": ITEMS}})


@pytest.fixture(scope="module")
def edge_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    directory = tmp_path_factory.mktemp("edge")
    env = {"BODY_TIMEOUT_SECONDS": str(BODY_TIMEOUT)}
    running = start_server(directory / "jobs.db", directory / "server.log", env)
    yield running
    stop_server(running)


def address(server: Server) -> tuple[str, int]:
    host, port = server.base_url.removeprefix("http://").split(":")
    return host, int(port)


def connect(server: Server) -> socket.socket:
    sock = socket.create_connection(address(server))
    sock.settimeout(15)  # a deadline on every read below: a hung server fails the test
    return sock


def send_quietly(sock: socket.socket, data: bytes) -> None:
    """Send, ignoring the server closing the connection part-way (it may refuse early)."""
    with contextlib.suppress(BrokenPipeError, ConnectionResetError):
        sock.sendall(data)


def read_until_closed(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection."""
    received = b""
    while chunk := sock.recv(65536):
        received += chunk
    return received


def status_of(response: bytes) -> int:
    return int(response.split(b" ", 2)[1])


def json_body(response: bytes) -> object:
    return orjson.loads(response.split(b"\r\n\r\n", 1)[1])


def request_head(*headers: bytes, path: bytes = b"/healthz") -> bytes:
    lines = [b"GET " + path + b" HTTP/1.1", b"Host: test", *headers]
    return b"\r\n".join(lines) + b"\r\n\r\n"


def memory_kib(pid: int, field: str) -> int:
    """A field of /proc/<pid>/status (VmRSS, VmHWM), in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1])
    raise AssertionError(f"no {field} for {pid}")


def test_three_100_mb_headers_at_once_get_431_and_the_servers_memory_stays_bounded(
    edge_server: Server,
) -> None:
    pid = edge_server.process.pid
    rss_before = memory_kib(pid, "VmRSS")
    huge = request_head(b"X-Big: " + b"a" * 100_000_000)
    answers: list[bytes] = []

    def attack() -> None:
        with connect(edge_server) as sock:
            send_quietly(sock, huge)
            answers.append(read_until_closed(sock))

    attackers = [threading.Thread(target=attack) for _ in range(3)]
    for attacker in attackers:
        attacker.start()
    for attacker in attackers:
        attacker.join(timeout=60)
    assert len(answers) == 3
    for answer in answers:
        assert status_of(answer) == 431
        assert json_body(answer) == {
            "detail": f"The request's headers exceed {MAX_HEAD_BYTES} bytes"
        }
    # The peak, not just what is left: the server never held much of the 300 MB it was sent.
    # (Without the limit, one such request took the server from 64 to 259 MB.)
    grew_mib = (memory_kib(pid, "VmHWM") - rss_before) / 1024
    assert grew_mib < 20, f"peak memory grew {grew_mib:.0f} MiB"
    assert httpx.get(f"{edge_server.base_url}/healthz").status_code == 200


@pytest.mark.parametrize(
    ("headers", "status"),
    [
        ([b"X-Fill: " + b"a" * (MAX_HEAD_BYTES - 100)], 200),
        ([b"X-Fill: " + b"a" * MAX_HEAD_BYTES], 431),
        ([b"X-Big: " + b"a" * 2_000_000], 431),
        # With Host and Connection, exactly MAX_HEADERS headers; then one more; then 20,000.
        ([b"X-%d: 1" % n for n in range(MAX_HEADERS - 2)], 200),
        ([b"X-%d: 1" % n for n in range(MAX_HEADERS - 1)], 431),
        ([b"X-%d: 1" % n for n in range(20_000)], 431),
    ],
    ids=["head-just-under", "head-just-over", "2-mb-header", "100-headers", "101", "20000"],
)
def test_heads_past_64_kib_or_100_headers_get_431_and_those_within_them_are_served(
    edge_server: Server, headers: list[bytes], status: int
) -> None:
    with connect(edge_server) as sock:
        send_quietly(sock, request_head(*headers, b"Connection: close"))
        answer = read_until_closed(sock)
    assert status_of(answer) == status
    if status == 431:
        assert b"connection: close" in answer.lower()


def test_refused_heads_are_counted_in_the_metrics(edge_server: Server) -> None:
    def refused() -> float:
        metrics = httpx.get(f"{edge_server.base_url}/metrics").text
        series = 'expand_reduce_http_requests_total{method="other",route="unmatched",status="431"}'
        rows = [row for row in metrics.splitlines() if row.startswith(series)]
        return float(rows[0].rsplit(" ", 1)[1]) if rows else 0.0

    before = refused()
    with connect(edge_server) as sock:
        send_quietly(sock, request_head(*[b"X-%d: 1" % n for n in range(MAX_HEADERS + 5)]))
        read_until_closed(sock)
    assert refused() == before + 1


def trickle(sock: socket.socket, data: bytes) -> int:
    """Send ``data`` a byte every 0.2 s until the server answers or hangs up; bytes sent."""
    for sent in range(len(data)):
        if select.select([sock], [], [], 0)[0]:
            return sent
        try:
            sock.sendall(data[sent : sent + 1])
        except (BrokenPipeError, ConnectionResetError):
            return sent
        time.sleep(0.2)  # the client's pace, not a wait for the server
    return len(data)


def test_a_body_trickling_in_past_body_timeout_gets_408_and_the_connection_is_dropped(
    edge_server: Server,
) -> None:
    database = Path(edge_server.log_path).parent / "jobs.db"
    jobs_before = count_jobs(database)
    head = (
        b"POST /expand_reduce_flow/ HTTP/1.1\r\nHost: test\r\n"
        b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(JOB)
    )
    with connect(edge_server) as sock:
        sock.sendall(head)
        sent = trickle(sock, JOB)  # the whole body would take about 10 s
        answer = read_until_closed(sock)
    assert sent < len(JOB), "the body arrived before the server gave up on it"
    assert status_of(answer) == 408
    assert json_body(answer) == {
        "detail": f"The request body did not arrive within {BODY_TIMEOUT:g} s"
    }
    assert count_jobs(database) == jobs_before


def test_a_head_trickling_in_past_body_timeout_gets_408_and_the_connection_is_dropped(
    edge_server: Server,
) -> None:
    head = request_head()
    with connect(edge_server) as sock:
        sent = trickle(sock, head)
        answer = read_until_closed(sock)
    assert sent < len(head)
    assert status_of(answer) == 408
    assert json_body(answer) == {
        "detail": f"The request's headers did not arrive within {BODY_TIMEOUT:g} s"
    }


def read_response(sock: socket.socket) -> bytes:
    """One response with a Content-Length, leaving the connection open."""
    received = b""
    while b"\r\n\r\n" not in received:
        received += sock.recv(65536)
    head, body = received.split(b"\r\n\r\n", 1)
    length = next(
        int(line.split(b":")[1])
        for line in head.lower().split(b"\r\n")
        if line.startswith(b"content-length:")
    )
    while len(body) < length:
        body += sock.recv(65536)
    return head + b"\r\n\r\n" + body


def test_a_body_the_route_does_not_read_is_not_waited_for_past_body_timeout(
    edge_server: Server,
) -> None:
    with connect(edge_server) as sock:
        sock.sendall(request_head(b"Content-Length: 1000"))
        # /healthz answers without reading the body...
        assert status_of(read_response(sock)) == 200
        # ...and the client goes on sending it, slowly: each byte would hold off uvicorn's
        # keep-alive timeout for ever. The server hangs up instead.
        sent = trickle(sock, b"x" * 1000)
        assert sock.recv(65536) == b""
    assert sent < 1000


def test_an_idle_keep_alive_connection_is_closed_by_the_server(edge_server: Server) -> None:
    with connect(edge_server) as sock:
        sock.sendall(request_head())
        # Keep-alive: the answer comes and the connection stays open until uvicorn's
        # keep-alive timeout (5 s) closes it; read_until_closed returns only then.
        answer = read_until_closed(sock)
    assert status_of(answer) == 200
    assert b"connection: close" not in answer.lower()


def test_head_answers_wherever_get_does_with_the_same_headers_and_no_body(
    edge_server: Server,
) -> None:
    [job_id] = submit_all(edge_server, [ITEMS])
    paths = [
        "/",
        "/docs",
        "/openapi.json",
        "/healthz",
        "/readyz",
        "/metrics",
        f"/check_status/{job_id}",
        f"/job_result/{job_id}",
        "/jobs",
        "/static/swagger-ui/swagger-ui.css",
        f"/check_status/{job_id}/",
    ]
    with httpx.Client(base_url=edge_server.base_url) as client:
        for path in paths:
            get = client.get(path)
            head = client.head(path)
            assert head.status_code == get.status_code, path
            assert head.content == b"", path
            assert head.headers.get("content-type") == get.headers.get("content-type"), path
            if path not in ("/metrics", "/jobs", f"/check_status/{job_id}", "/readyz"):
                # (those may change between the two requests)
                assert head.headers.get("content-length") == get.headers.get("content-length")
        assert client.head("/nowhere").status_code == 404
        refused = client.head("/expand_reduce_flow/")
        assert refused.status_code == 405
        assert refused.headers["allow"] == "POST"


def test_a_refusal_pipelined_behind_a_good_request_comes_after_its_answer(
    edge_server: Server,
) -> None:
    good = request_head()
    refused = request_head(*[b"X-%d: 1" % n for n in range(MAX_HEADERS + 5)])
    with connect(edge_server) as sock:
        sock.sendall(good + refused)  # one write: the server reads both at once
        answers = read_until_closed(sock)
    first, _, second = answers.partition(b'{"status":"ok"}')
    assert status_of(first) == 200
    assert status_of(second) == 431
    assert "Traceback" not in edge_server.log()


def test_a_refused_pipelined_submission_after_a_long_poll_waits_for_its_answer(
    edge_server: Server,
) -> None:
    [job_id] = submit_all(edge_server, [ITEMS])
    httpx.get(f"{edge_server.base_url}/check_status/{job_id}", params={"wait": 10})
    # A long-poll on a finished job answers at once; a partial second head behind it then
    # runs out of time, and its 408 comes after the first answer, never instead of it.
    with connect(edge_server) as sock:
        sock.sendall(request_head(path=f"/check_status/{job_id}?wait=1".encode()) + b"GET /he")
        answers = read_until_closed(sock)
    first, _, second = answers.partition(b"\r\n\r\n{")
    assert status_of(first) == 200
    assert b'"status":"completed"' in answers
    assert b"408 Request Timeout" in second


def test_chunked_trailers_past_64_kib_end_the_connection_and_memory_stays_bounded(
    edge_server: Server,
) -> None:
    pid = edge_server.process.pid
    rss_before = memory_kib(pid, "VmRSS")
    head = b"POST /expand_reduce_flow/ HTTP/1.1\r\nHost: test\r\nTransfer-Encoding: chunked\r\n"
    sent = 0
    with connect(edge_server) as sock:
        sock.sendall(head + b"Content-Type: application/json\r\n\r\n1\r\n[\r\n0\r\n")
        for _ in range(1000):  # 100 MB of trailers, if the server takes them
            try:
                sock.sendall(b"a:b\r\n" * 20_000)
            except (BrokenPipeError, ConnectionResetError):
                break
            sent += 1
        with contextlib.suppress(ConnectionResetError):
            read_until_closed(sock)
    assert sent < 1000
    grew_mib = (memory_kib(pid, "VmHWM") - rss_before) / 1024
    assert grew_mib < 20, f"peak memory grew {grew_mib:.0f} MiB"
    assert "chunk sizes and trailers exceed 65536 bytes" in edge_server.log()


def test_a_connection_that_never_sends_a_byte_is_closed(edge_server: Server) -> None:
    with connect(edge_server) as sock:
        # Nothing sent: closed after uvicorn's keep-alive timeout (5 s), like an idle one.
        assert sock.recv(65536) == b""


def test_blank_lines_alone_do_not_hold_a_connection_open(edge_server: Server) -> None:
    with connect(edge_server) as sock:
        sock.sendall(b"\r\n")  # begins no request, yet stopped uvicorn's idle timer
        assert sock.recv(65536) == b""  # closed after the keep-alive timeout, like silence


def test_a_client_that_asked_to_close_can_send_on_and_then_read_an_early_413(
    edge_server: Server,
) -> None:
    head = (
        b"POST /expand_reduce_flow/ HTTP/1.1\r\nHost: test\r\nConnection: close\r\n"
        b"Content-Type: application/json\r\nContent-Length: 20000000\r\n\r\n"
    )
    with connect(edge_server) as sock:
        sock.sendall(head)
        # 8 MiB more of the body, as urllib and many clients send it: all of it, and only then
        # read the answer. Reset while sending, they raise and never read it.
        sock.sendall(b"x" * 8 * 1024 * 1024)
        answer = read_until_closed(sock)
    assert status_of(answer) == 413
    assert json_body(answer) == {"detail": "Request body exceeds 16777216 bytes"}
