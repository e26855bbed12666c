#!/usr/bin/env python3
# ruff: noqa: S108, S603, S607
# (it runs podman, debootstrap, tar and bash by name, with fixed arguments and no shell; its
# /tmp is the container's)
"""`make image-test`: build the Docker image with podman and check it the way the README uses it.

Needs root, podman, runc, curl and bash, and debootstrap while the base image is absent; on
Debian: `apt-get install podman runc debootstrap iptables curl`. No Docker engine is used. A
missing tool is a failure (exit 1, saying what to install), never a skip.

1. The base image. If podman's store has no `python:3.11-slim`, a stand-in is made under that
   exact name: `debootstrap --variant=minbase bookworm` from the mirror apt uses here, with
   Debian's python3.11, python3-venv, python3-pip and ca-certificates, `/usr/local/bin/python`
   and `python3` linked to python3.11, without apt's caches and what Debian's slim images leave
   out (docs, man pages, translations), then `podman import`ed (about 50 s).
2. The image, as the README builds it (`docker build -t uniflow-hanliao:0.1.0 .`), here
   `podman build --format docker` (Docker's format keeps the HEALTHCHECK). The host's CA bundle
   and a pip.conf made from the host's pip settings reach the build's RUN steps through
   read-only mounts only; a check makes sure nothing of them is left in the image.
3. The checks, on 127.0.0.1 and free ports, with the README's `docker run` line (as
   `podman run -d --stop-timeout 30 -p 127.0.0.1:<port>:8080 -v <volume>:/data ...`) on
   volumes of the test's own (a user's `expand-reduce-data` is never touched): the README's
   curl walk-through and its output; /healthz, /readyz and the HEALTHCHECK; a graceful
   `podman stop`; a restart that keeps the jobs; `kill -9` while large jobs run, none lost;
   the locked-down run of the Kubernetes manifest (read-only root, uid 10001, no
   capabilities); and how long a start takes there.

Host quirks, handled through a containers.conf of the run's own (CONTAINERS_CONF): runc, since
crun rejects this host's mixed cgroup v1/v2 set-up; ulimits no higher than the host's hard
limits, since root here cannot raise them. Without systemd, podman logs an error about
health-check timers at each `podman run`; the HEALTHCHECK is run with `podman healthcheck run`.

At the end, and on a failure or an interruption: the test's containers, volumes, temporary
folders and containers.conf are removed. The base image (stand-in or real) and the image
uniflow-hanliao:0.1.0, with podman's layer cache, stay in podman's store, so the next run is
quicker (measured: 90 s from nothing, 35 s with the base image, 17 s with the layers cached).
`podman rmi uniflow-hanliao:0.1.0 python:3.11-slim` removes them. Prints PASS or FAIL per
check and the wall time of each phase and in all; exits 1 if any check failed.
"""

from __future__ import annotations

import glob
import json
import os
import re
import resource
import secrets
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import urllib.parse
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from http.client import HTTPConnection
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
IMAGE = "uniflow-hanliao:0.1.0"
BASE_IMAGE = "docker.io/library/python:3.11-slim"  # the Dockerfile's FROM python:3.11-slim
SUITE = "bookworm"
STOP_TIMEOUT = 30  # the README's `docker run --stop-timeout 30`
GRACEFUL_TIMEOUT = 20  # uvicorn's --timeout-graceful-shutdown in the image: a clean stop is faster
LARGE_JOBS, LARGE_JOB_ITEMS = 5, 50_000
UUID_RE = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$")
TIME_RE = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z$")
# The Kubernetes manifest's securityContext as podman flags, with a tmpfs on /tmp only (its
# emptyDir): podman would otherwise add tmpfs mounts of its own on /run and /var/tmp.
LOCKED_DOWN = (
    "--read-only", "--read-only-tmpfs=false", "--tmpfs", "/tmp", "--user", "10001",
    "--cap-drop", "ALL", "--security-opt", "no-new-privileges",
)  # fmt: skip
# How many of the venv's modules (pip's own aside) have bytecode, as "<compiled> of <all>".
BYTECODE_PROBE = """
import glob, importlib.util, os
own = ('pip', 'setuptools', 'pkg_resources', '_distutils_hack')
mods = [p for p in glob.glob('/venv/lib/python3*/site-packages/**/*.py', recursive=True)
        if p.split('site-packages/')[1].split('/')[0] not in own]
print(sum(os.path.exists(importlib.util.cache_from_source(p)) for p in mods), 'of', len(mods))
"""
IMPORT_PROBE = (
    "import time; t = time.perf_counter(); import app.main; "
    "print(round(time.perf_counter() - t, 3))"
)
CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


class CheckFailed(Exception):
    """A check did not hold, or the set-up failed; the message says what was seen."""


class Run:
    """What this run made (removed at the end), found and timed."""

    def __init__(self) -> None:
        """Make the run's temporary folder; nothing else exists yet."""
        self.started = time.monotonic()
        self.tmp = Path(tempfile.mkdtemp(prefix="image-test-"))
        self.tag = f"image-test-{os.getpid()}-{secrets.token_hex(3)}"
        self.env = dict(os.environ, CONTAINERS_CONF=str(self.tmp / "containers.conf"))
        self.containers: list[str] = []
        self.volumes: list[str] = []
        self.dirs: list[Path] = [self.tmp]
        self.phases: list[tuple[str, float]] = []
        self.results: list[tuple[str, bool, str]] = []
        # Filled in by the checks, for those after them.
        self.data = ""  # the volume of checks a to e
        self.url = ""  # the container that is up now
        self.container = ""
        self.walk_id = ""  # the walk-through's job and its job_result line
        self.walk_result = ""
        self.ready_seconds = 0.0  # locked-down run: from `podman run` to /readyz


R: Run


def say(message: str) -> None:
    """Print at once (the output is often a pipe)."""
    print(message, flush=True)


@contextmanager
def phase(name: str) -> Iterator[None]:
    """Time a phase of the set-up."""
    say(f"--- {name}")
    start = time.monotonic()
    try:
        yield
    finally:
        seconds = time.monotonic() - start
        R.phases.append((name, seconds))
        say(f"    ({name}: {seconds:.1f} s)")


def check(name: str, body: Callable[[], str]) -> bool:
    """Run one check; record and print PASS or FAIL, its time and what it saw."""
    start = time.monotonic()
    try:
        detail, ok = body(), True
    except CheckFailed as error:
        detail, ok = str(error), False
    seconds = time.monotonic() - start
    R.phases.append((f"check {name}", seconds))
    R.results.append((name, ok, detail))
    say(f"{'PASS' if ok else 'FAIL'} {name} ({seconds:.1f} s): {detail}")
    return ok


def sh(
    *args: str, timeout: float = 120, check: bool = True, log: Path | None = None, **kw: Any
) -> subprocess.CompletedProcess[str]:
    """Run a command with the run's CONTAINERS_CONF; output captured (or to `log`).

    The command runs in a process group of its own: on a timeout or an interruption, it and
    everything it started are stopped (debootstrap's children would go on writing otherwise).
    """
    sink = log.open("w") if log is not None else None
    try:
        child = subprocess.Popen(
            args, stdout=sink or subprocess.PIPE,
            stderr=subprocess.STDOUT if sink else subprocess.PIPE,
            text=True, env=R.env, start_new_session=True, **kw,
        )  # fmt: skip
        try:
            stdout, stderr = child.communicate(timeout=timeout)
        except BaseException as error:
            stop_group(child)
            if isinstance(error, subprocess.TimeoutExpired):
                raise CheckFailed(
                    f"`{shlex.join(args)}` took longer than {timeout:.0f} s"
                ) from None
            raise
    finally:
        if sink is not None:
            sink.close()
    if log is not None:
        stdout, stderr = log.read_text(errors="replace"), ""
    if check and child.returncode != 0:
        tail = "\n".join((stdout + stderr).splitlines()[-40:])
        raise CheckFailed(f"`{shlex.join(args)}` exited {child.returncode}:\n{tail}")
    return subprocess.CompletedProcess(args, child.returncode, stdout, stderr)


def stop_group(child: subprocess.Popen[str]) -> None:
    """SIGTERM to the child's process group, SIGKILL to what is left after 10 s."""
    for sig, grace in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 10.0)):
        try:
            os.killpg(child.pid, sig)
        except ProcessLookupError:
            break
        end = time.monotonic() + grace
        while time.monotonic() < end:
            child.poll()
            try:
                os.killpg(child.pid, 0)  # anyone left in the group?
            except ProcessLookupError:
                return
            time.sleep(0.1)


def podman(*args: str, **kw: Any) -> subprocess.CompletedProcess[str]:
    """Run podman with the run's containers.conf."""
    return sh("podman", *args, **kw)


def poll(what: str, deadline_s: float, probe: Callable[[], Any], interval: float = 0.1) -> Any:
    """Call `probe` until it returns something truthy; fail after `deadline_s` seconds."""
    end = time.monotonic() + deadline_s
    while not (result := probe()):
        if time.monotonic() >= end:
            raise CheckFailed(f"{what}: not within {deadline_s:.0f} s")
        time.sleep(interval)
    return result


def http(
    url: str, method: str = "GET", body: bytes | None = None, timeout: float = 30
) -> tuple[int, bytes]:
    """One request; the status and the body, whatever the status."""
    parts = urllib.parse.urlsplit(url)
    conn = HTTPConnection(parts.hostname or "127.0.0.1", parts.port, timeout=timeout)
    try:
        headers = {"Content-Type": "application/json"} if body is not None else {}
        conn.request(method, parts.path + (f"?{parts.query}" if parts.query else ""), body, headers)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def http_json(url: str, method: str = "GET", body: bytes | None = None) -> tuple[int, Any]:
    """One request; the status and the body parsed as JSON (as text if it is not JSON)."""
    status, data = http(url, method, body)
    try:
        return status, json.loads(data)
    except ValueError:
        return status, data.decode(errors="replace")


def answers(url: str) -> bool:
    """Whether `url` answers 200 now."""
    try:
        return http(url, timeout=2)[0] == 200
    except OSError:
        return False


# ---------------------------------------------------------------------------------------------
# Set-up: tools, containers.conf, base image, pip settings, build


def preflight() -> None:
    """Fail, saying what to install, if a tool is missing; CI or not, never skip."""
    if os.geteuid() != 0:
        raise CheckFailed("run as root (rootful podman; debootstrap needs root too)")
    missing = [tool for tool in ("podman", "runc", "curl", "bash") if not shutil.which(tool)]
    if not missing and not base_present() and not shutil.which("debootstrap"):
        missing.append("debootstrap")
    if missing:
        raise CheckFailed(
            f"missing {', '.join(missing)}; install with "
            "`apt-get install podman runc debootstrap iptables curl`"
            + (" (CI=true: a missing tool fails the run)" if CI else "")
        )


def write_containers_conf() -> None:
    """The quirks of this host, for every podman command of the run."""
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    nofile = 1048576 if hard == resource.RLIM_INFINITY else hard
    (R.tmp / "containers.conf").write_text(
        "# make image-test's own; removed at the end.\n"
        "[containers]\n"
        "# root here cannot raise limits above the host's hard limits\n"
        f'default_ulimits = ["nofile={nofile}:{nofile}", "nproc=32768:32768"]\n'
        "[engine]\n"
        "# crun rejects this host's mixed cgroup v1/v2 set-up\n"
        'runtime = "runc"\n'
    )


def base_present() -> bool:
    """Whether podman's store has the base image (the stand-in or the real one)."""
    return subprocess.run(["podman", "image", "exists", BASE_IMAGE], env=R.env).returncode == 0


def debian_mirror() -> str:
    """The URI apt uses here for Debian's main suite (sources.list, *.list, *.sources)."""
    found: list[tuple[str, list[str]]] = []
    one_line = glob.glob("/etc/apt/sources.list") + sorted(
        glob.glob("/etc/apt/sources.list.d/*.list")
    )
    for path in one_line:
        for line in Path(path).read_text(errors="replace").splitlines():
            words = re.sub(r"\[[^]]*\]", "", line.split("#", 1)[0]).split()
            if len(words) >= 3 and words[0] == "deb":
                found.append((words[1], [words[2]]))
    for path in sorted(glob.glob("/etc/apt/sources.list.d/*.sources")):
        for stanza in re.split(r"\n\s*\n", Path(path).read_text(errors="replace")):
            fields = {}
            for line in stanza.splitlines():
                key, sep, value = line.partition(":")
                if sep and not line.startswith(("#", " ", "\t")):
                    fields[key.strip().lower()] = value.strip()
            if fields.get("enabled", "yes") != "no" and "deb" in fields.get("types", "").split():
                found += [(uri, fields.get("suites", "").split()) for uri in fields["uris"].split()]
    return next((uri for uri, suites in found if SUITE in suites), "http://deb.debian.org/debian")


def unmount_under(path: Path) -> None:
    """Unmount what a failed debootstrap may have left mounted inside `path`, deepest first."""
    mounts = [line.split()[1] for line in Path("/proc/mounts").read_text().splitlines()]
    for mount in sorted((m for m in mounts if m.startswith(f"{path}/")), reverse=True):
        subprocess.run(["umount", "-l", mount], check=False)


def slim_down(root: Path) -> None:
    """Remove apt's caches and what Debian's slim images leave out.

    That is docs (but for their copyright), man pages and translations.
    """
    patterns = (
        "usr/share/doc/*/*", "usr/share/man/*", "usr/share/locale/*", "usr/share/info/*",
        "usr/share/lintian/*", "var/cache/apt/*.bin", "var/cache/apt/archives/*.deb",
        "var/lib/apt/lists/*", "var/log/apt/*", "var/log/*.log",
    )  # fmt: skip
    for pattern in patterns:
        for leftover in map(Path, glob.glob(f"{root}/{pattern}")):
            if leftover.name in ("copyright", "lock") or not os.path.lexists(leftover):
                continue  # kept, or gone already through a doc folder that links to another
            if leftover.is_dir() and not leftover.is_symlink():
                shutil.rmtree(leftover)
            else:
                leftover.unlink()


def make_base_image() -> str:
    """The stand-in for python:3.11-slim, unless podman's store has that image."""
    if base_present():
        return f"{BASE_IMAGE} is in podman's store; not made again"
    root = Path(tempfile.mkdtemp(prefix="image-test-rootfs-", dir="/var/tmp"))
    R.dirs.append(root)
    mirror = debian_mirror()
    say(f"    debootstrap {SUITE} from {mirror} into {root}")
    sh(
        "debootstrap", "--variant=minbase",
        "--include=python3.11,python3-venv,python3-pip,ca-certificates",
        SUITE, str(root), mirror, timeout=900, log=R.tmp / "debootstrap.log",
    )  # fmt: skip
    for name in ("python", "python3"):
        (root / "usr/local/bin" / name).symlink_to("/usr/bin/python3.11")
    slim_down(root)
    tar = subprocess.Popen(
        ["tar", "--numeric-owner", "--exclude=./dev/*", "--exclude=./proc/*",
         "--exclude=./sys/*", "-C", str(root), "-cf", "-", "."],
        stdout=subprocess.PIPE,
    )  # fmt: skip
    try:
        podman(
            "import",
            "--change", "ENV PATH=/usr/local/bin:/usr/local/sbin:/usr/sbin:/usr/bin:/sbin:/bin",
            "--change", "ENV LANG=C.UTF-8",
            "--change", 'CMD ["python3"]',
            "--change", "LABEL org.opencontainers.image.description='stand-in for "
            "python:3.11-slim made by make image-test: Debian bookworm python3.11'",
            "-", BASE_IMAGE, stdin=tar.stdout, timeout=600,
        )  # fmt: skip
    finally:
        if tar.stdout:
            tar.stdout.close()
        tar.wait()
    unmount_under(root)
    shutil.rmtree(root)
    podman("run", "--rm", BASE_IMAGE, "python", "-c", "import tomllib, venv, ensurepip")
    size = int(podman("image", "inspect", "-f", "{{.Size}}", BASE_IMAGE).stdout)
    return f"stand-in {BASE_IMAGE} made, {size / 1e6:.0f} MB; `import tomllib, venv` runs"


def host_pip_settings() -> tuple[list[str], list[str]]:
    """The host's pip settings as pip.conf lines, and the -v mounts the build needs for them.

    podman build leaves an empty file or folder in the image for each mount point it had to
    create, so everything goes under /root, which base images have: a folder of the run's own
    is mounted there, holding .config/pip/pip.conf (pip's user config; HOME is /root in RUN),
    a copy of the CA bundle pip uses here, and the mount points of local indexes and wheel
    folders (file:// URLs and absolute paths; for an index's .../simple its parent folder,
    where its links lead). `constraint` is left out: the Dockerfile passes its own.
    """
    listed = subprocess.run(
        [sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True
    ).stdout.splitlines()
    settings: dict[str, str] = {}
    for line in sorted(listed, key=lambda ln: ln.startswith(":env:")):  # PIP_* win, as in pip
        key, sep, value = line.partition("=")
        if sep and key.split(".", 1)[0] in ("global", "install", ":env:"):
            settings[key.split(".", 1)[1]] = value.strip().strip("'\"")
    home = R.tmp / "build-home"
    config = home / ".config/pip"
    config.mkdir(parents=True)
    mounts = ["-v", f"{home}:/root:ro"]
    lines = ["[global]"]
    bundle = (
        settings.pop("cert", None) or os.environ.get("SSL_CERT_FILE")
        or os.environ.get("REQUESTS_CA_BUNDLE") or "/etc/ssl/certs/ca-certificates.crt"
    )  # fmt: skip
    if Path(bundle).is_file():
        shutil.copyfile(bundle, config / "host-ca.crt")
        lines.append("cert = /root/.config/pip/host-ca.crt")
    inside: dict[str, str] = {}  # host folder: where the build sees it
    for key in ("index-url", "extra-index-url", "find-links", "trusted-host", "proxy",
                "timeout", "default-timeout", "retries", "no-index"):  # fmt: skip
        kept = []
        for value in settings.get(key, "").split():
            scheme = "file://" if value.startswith("file://") else ""
            local = value.removeprefix(scheme)
            if local.startswith("/"):
                if not Path(local).exists():
                    continue
                folder = str(Path(local).parent) if Path(local).name == "simple" else local
                if folder not in inside:
                    inside[folder] = f"/root/.config/pip/local/{len(inside)}"
                    (home / inside[folder].removeprefix("/root/")).mkdir(parents=True)
                    mounts += ["-v", f"{folder}:{inside[folder]}:ro"]
                value = scheme + inside[folder] + local.removeprefix(folder)
            kept.append(value)
        if kept:
            lines.append(f"{key} = {' '.join(kept)}")
    (config / "pip.conf").write_text("\n".join(lines) + "\n")
    return lines, mounts


def build_image() -> str:
    """`docker build -t uniflow-hanliao:0.1.0 .`, with podman."""
    lines, mounts = host_pip_settings()
    say("    pip.conf for the build (as /root/.config/pip/pip.conf): " + "; ".join(lines[1:]))
    podman(
        "build", "--format", "docker", "-t", IMAGE, *mounts, ".",
        cwd=ROOT, timeout=1800, log=R.tmp / "build.log",
    )  # fmt: skip
    size = int(podman("image", "inspect", "-f", "{{.Size}}", IMAGE).stdout)
    return f"{IMAGE}, {size / 1e6:.0f} MB"


# ---------------------------------------------------------------------------------------------
# Containers


def free_port() -> int:
    """A port free on 127.0.0.1 now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def new_volume(suffix: str) -> str:
    """A volume of the run's own."""
    name = f"expand-reduce-{R.tag}-{suffix}"
    podman("volume", "create", name)
    R.volumes.append(name)
    return name


def state(name: str) -> str:
    """running, exited, ... ('' for no such container)."""
    return podman("inspect", "-f", "{{.State.Status}}", name, check=False).stdout.strip()


def logs(name: str) -> str:
    """The container's output, stdout and stderr."""
    proc = podman("logs", name, check=False)
    return proc.stdout + proc.stderr


def start(name: str, volume: str, *extra: str, ready: str = "/healthz") -> float:
    """The README's `docker run`, detached, on 127.0.0.1; sets R.url and R.container.

    Returns the seconds from `podman run` to `ready` answering 200.
    """
    port = free_port()
    R.container, R.url = f"{R.tag}-{name}", f"http://127.0.0.1:{port}"
    t0 = time.monotonic()
    podman(
        "run", "-d", "--name", R.container, "--stop-timeout", str(STOP_TIMEOUT),
        "-p", f"127.0.0.1:{port}:8080", "-v", f"{volume}:/data", *extra, IMAGE,
    )  # fmt: skip
    R.containers.append(R.container)

    def up() -> bool:
        if answers(R.url + ready):
            return True
        if (now := state(R.container)) not in ("running", "created", "configured"):
            tail = logs(R.container)[-3000:]
            raise CheckFailed(f"{R.container} stopped while starting ({now}):\n{tail}")
        return False

    poll(f"{R.container}: {ready} answering", 60, up, interval=0.05)
    return time.monotonic() - t0


def stop_all() -> None:
    """Stop every container of the run that still runs, at once."""
    for name in R.containers:
        if state(name) == "running":
            podman("stop", "-t", "0", name, check=False)


# ---------------------------------------------------------------------------------------------
# The checks


def check_build_leaves_nothing() -> str:
    """No build mount point, pip.conf or CA bundle in the image; the HEALTHCHECK is there."""
    probe = (
        "import os; print(sorted(os.listdir('/root')), "
        "[p for p in ('/etc/pip.conf', '/build') if os.path.exists(p)])"
    )
    seen = {
        image: podman("run", "--rm", "--user", "0", image, "python", "-c", probe).stdout.strip()
        for image in (BASE_IMAGE, IMAGE)
    }
    if seen[IMAGE] != seen[BASE_IMAGE]:
        raise CheckFailed(
            f"/root and /etc/pip.conf, /build in the image: {seen[IMAGE]}, "
            f"in the base image: {seen[BASE_IMAGE]}"
        )
    config = json.loads(podman("image", "inspect", IMAGE).stdout)[0]
    if not (config.get("Healthcheck") or config.get("HealthCheck")):
        raise CheckFailed("the image has no HEALTHCHECK (was it built with --format docker?)")
    return "no pip.conf, CA bundle, mount point or build folder in the image; HEALTHCHECK kept"


def readme_walkthrough() -> tuple[str, list[str]]:
    """The bash block after <!-- walkthrough --> and the output the README shows for it."""
    readme = (ROOT / "README.md").read_text()
    pattern = r"<!-- walkthrough -->\s*```bash\n(.*?)```(.*?)```text\n(.*?)```"
    if not (match := re.search(pattern, readme, re.S)):
        raise CheckFailed("README.md: no ```bash block after <!-- walkthrough -->, ```text after")
    script, shown = match.group(1), match.group(3).strip().splitlines()
    if "http://localhost:8080" not in script or len(shown) != 3:
        raise CheckFailed("README.md's walk-through: no http://localhost:8080, or not 3 lines")
    return script, shown


def run_walkthrough() -> list[str]:
    """Run the README's block against the container until its job is done; its 3 lines."""
    script, _ = readme_walkthrough()
    script = script.replace("http://localhost:8080", R.url)
    deadline = time.monotonic() + 60
    while True:
        proc = sh("bash", "-c", script, timeout=60, check=False)
        out = proc.stdout.splitlines()
        if proc.returncode != 0 or len(out) != 3:
            raise CheckFailed(f"the block exited {proc.returncode} printing {out} {proc.stderr}")
        if not UUID_RE.match(job_id := out[0]):
            raise CheckFailed(f"line 1 is not a UUID: {job_id!r}")
        if '"status":"processing"' not in out[1] + out[2]:
            return out
        say(f"    job {job_id} still processing: waiting for it, then running the block again")
        poll(
            f"job {job_id} finishing",
            max(1.0, deadline - time.monotonic()),
            lambda: http_json(f"{R.url}/check_status/{job_id}?wait=5")[1]["status"] != "processing",
        )
        if time.monotonic() > deadline:
            raise CheckFailed("the walk-through's jobs still said processing after 60 s")


def check_walkthrough() -> str:
    """Check a: The README's curl block prints what the README shows below it."""
    _, shown = readme_walkthrough()
    out = run_walkthrough()
    job_id, status = out[0], json.loads(out[1])
    expected = json.loads(shown[1])
    if list(status) != list(expected) or status["job_id"] != job_id:
        raise CheckFailed(f"check_status line {out[1]} is not shaped like the README's {shown[1]}")
    if status["status"] != "completed":
        raise CheckFailed(f"check_status line {out[1]} is not shaped like the README's {shown[1]}")
    if not (TIME_RE.match(status["created_at"]) and TIME_RE.match(status["updated_at"])):
        raise CheckFailed(f"check_status times are not ISO 8601 UTC: {out[1]}")
    if out[2] != shown[2].replace(shown[0], job_id):
        raise CheckFailed(f"job_result line {out[2]} is not the README's {shown[2]}")
    R.walk_id, R.walk_result = job_id, out[2]
    return f"the README's 3 lines: {job_id}, completed, job_result as shown"


def check_health() -> str:
    """Check b: /healthz, /readyz and the image's HEALTHCHECK."""
    for path, body in (("/healthz", {"status": "ok"}), ("/readyz", {"status": "ready"})):
        status, got = http_json(R.url + path)
        if (status, got) != (200, body):
            raise CheckFailed(f"{path} answered {status} {got!r}, not 200 {body}")
    proc = podman("healthcheck", "run", R.container, check=False)
    if proc.returncode != 0:
        raise CheckFailed(f"podman healthcheck run exited {proc.returncode}: {proc.stderr}")
    # The client inside the container, as the README tells operators to use it.
    cli = ("exec", R.container, "python", "-m", "expand_reduce_client")
    listed = json.loads(podman(*cli, "list", "--json", "--url", "http://127.0.0.1:8080").stdout)
    if R.walk_id not in [job["job_id"] for job in listed["jobs"]]:
        raise CheckFailed(f"python -m expand_reduce_client list did not list {R.walk_id}: {listed}")
    return (
        '/healthz {"status":"ok"}, /readyz {"status":"ready"}, healthcheck run exits 0, '
        "python -m expand_reduce_client list inside lists the walk-through's job"
    )


def log_messages(name: str) -> dict[str, str]:
    """The container's log lines (JSON, LOG_FORMAT=json), each with its message."""
    messages = {}
    for line in logs(name).splitlines():
        try:
            messages[line] = str(json.loads(line).get("message", ""))
        except (ValueError, AttributeError):
            messages[line] = line
    return messages


def check_stop() -> str:
    """Check c: `podman stop` (the container's own 30 s timeout): graceful, quick, exit 0."""
    name = R.container
    configured = podman("inspect", "-f", "{{.Config.StopTimeout}}", name).stdout.strip()
    if configured != str(STOP_TIMEOUT):
        raise CheckFailed(f"the container's stop timeout is {configured}, not {STOP_TIMEOUT}")
    t0 = time.monotonic()
    podman("stop", name, timeout=STOP_TIMEOUT + 30)
    seconds = time.monotonic() - t0
    code = podman("inspect", "-f", "{{.State.ExitCode}}", name).stdout.strip()
    messages = log_messages(name)
    done = ("Application shutdown complete", "Finished server process")
    say("    shutdown lines in podman logs:")
    for line, message in messages.items():
        if message.startswith(
            ("received SIGTERM", "Shutting down", "Waiting for application shutdown", *done)
        ):
            say(f"      {line}")
    problems = []
    if seconds >= GRACEFUL_TIMEOUT:
        problems.append(f"took {seconds:.1f} s, past uvicorn's {GRACEFUL_TIMEOUT} s graceful limit")
    if not any(m.startswith("Shutting down") for m in messages.values()):
        problems.append('no "Shutting down" in the log')
    if not any(m.startswith(done) for m in messages.values()):
        problems.append('no "Application shutdown complete"/"Finished server process" logged')
    if code != "0":
        problems.append(f"exit code {code}, not 0")
    if problems:
        raise CheckFailed(f"podman stop, {seconds:.1f} s: " + "; ".join(problems))
    return f"stopped in {seconds:.1f} s (stop timeout {STOP_TIMEOUT} s), exit code 0, lines logged"


def check_restart() -> str:
    """Check d: a new container on the same volume still has the walk-through's job."""
    seconds = start("restart", R.data)
    if not R.walk_id:
        raise CheckFailed("no walk-through job to look for (check a failed)")
    status, got = http(f"{R.url}/job_result/{R.walk_id}")
    if (status, got.decode()) != (200, R.walk_result):
        raise CheckFailed(f"after the restart job_result answered {status} {got[:300]!r}")
    return f"new container, same volume, up in {seconds:.1f} s: job_result as before"


def large_job(seed: int) -> tuple[bytes, list[dict[str, str]]]:
    """A job of LARGE_JOB_ITEMS objects of 8 keys, and the result the README's rules give."""
    items, expected = [], []
    for i in range(LARGE_JOB_ITEMS):
        obj = {f"k{j}": f"v{seed}-{i}-{j}" for j in range(8)}
        items.append(obj)
        first, second = list(obj)[:4], list(obj)[4:]
        expected.append(
            {f"{a} {b}": f"{obj[a]} {obj[b]}" for a, b in zip(first, second, strict=True)}
        )
    return json.dumps({"job": {"input_data": items}}).encode(), expected


def check_kill() -> str:
    """Check e: `kill -9` while large jobs run: a new container on the volume finishes them all."""
    if not R.walk_id or state(R.container) != "running":
        raise CheckFailed("no restarted container (check d failed)")
    made = [large_job(seed) for seed in range(LARGE_JOBS)]
    killed, url = R.container, R.url
    # All at once: large jobs take turns on one lane, so most still wait when the kill comes.
    with ThreadPoolExecutor(LARGE_JOBS) as pool:
        answered = list(
            pool.map(lambda job: http_json(f"{url}/expand_reduce_flow/", "POST", job[0]), made)
        )
    jobs = []
    for (status, got), (_, expected) in zip(answered, made, strict=True):
        if status != 202:
            raise CheckFailed(f"a submission answered {status} {str(got)[:300]}")
        jobs.append((got["job_id"], expected))
    unfinished = [
        j for j, _ in jobs if http_json(f"{url}/check_status/{j}")[1]["status"] != "completed"
    ]
    podman("kill", "-s", "KILL", killed)
    if not unfinished:
        raise CheckFailed(f"all {LARGE_JOBS} jobs were done before the kill: nothing interrupted")
    poll(f"{killed} gone after kill -9", 30, lambda: state(killed) in ("exited", "stopped"))
    up = start("after-kill", R.data)
    t0 = time.monotonic()

    def all_done() -> bool:
        statuses = {j: http_json(f"{R.url}/check_status/{j}")[1]["status"] for j, _ in jobs}
        if "failed" in statuses.values():
            raise CheckFailed(f"a job failed after the kill: {statuses}")
        return all(s == "completed" for s in statuses.values())

    poll("every job completed after the kill", 60, all_done, interval=0.2)
    waited = time.monotonic() - t0
    for job_id, expected in jobs:
        status, got = http_json(f"{R.url}/job_result/{job_id}")
        if status != 200 or got["result"] != expected:
            count = len(got.get("result") or []) if isinstance(got, dict) else None
            raise CheckFailed(f"job {job_id}: {status}, {count} objects, not the expected ones")
    return (
        f"{LARGE_JOBS} jobs x {LARGE_JOB_ITEMS:,} objects answered 202, {len(unfinished)} "
        f"unfinished at kill -9; the next container (up in {up:.1f} s) completed all "
        f"{waited:.1f} s later, every result object right"
    )


def check_locked_down() -> str:
    """Check f: The Kubernetes manifest's locked-down run: ready, and a job completes."""
    R.ready_seconds = start("locked-down", new_volume("locked"), *LOCKED_DOWN, ready="/readyz")
    body = b'{"job": {"input_data": [{"a": "x", "b": "y", "c": "z"}]}}'
    status, got = http_json(f"{R.url}/expand_reduce_flow/", "POST", body)
    if status != 202:
        raise CheckFailed(f"a submission answered {status} {got}")
    job_id = got["job_id"]
    poll(
        "the job completing",
        30,
        lambda: http_json(f"{R.url}/check_status/{job_id}?wait=5")[1]["status"] != "processing",
    )
    status, got = http_json(f"{R.url}/job_result/{job_id}")
    if (status, got.get("result")) != (200, [{"a b": "x y", "c": "z"}]):
        raise CheckFailed(f"job_result answered {status} {got}")
    podman("stop", R.container, timeout=STOP_TIMEOUT + 30)
    return f"{' '.join(LOCKED_DOWN)}: /readyz ready {R.ready_seconds:.1f} s after podman run"


def check_startup_times() -> str:
    """Check g: How long a start takes with the root read-only (nothing compiled can be kept)."""
    imports, whole = [], []
    for _ in range(3):
        t0 = time.monotonic()
        proc = podman(
            "run", "--rm", *LOCKED_DOWN, "-v", f"{R.volumes[-1]}:/data", IMAGE,
            "python", "-c", IMPORT_PROBE,
        )  # fmt: skip
        whole.append(round(time.monotonic() - t0, 2))
        imports.append(float(proc.stdout.split()[-1]))
    compiled = podman("run", "--rm", IMAGE, "python", "-c", BYTECODE_PROBE).stdout.strip()
    size = int(podman("image", "inspect", "-f", "{{.Size}}", IMAGE).stdout)
    return (
        f"`import app.main` {statistics.median(imports):.2f} s (runs {imports}), "
        f"`podman run --rm ... python -c` {statistics.median(whole):.2f} s (runs {whole}), "
        f"`podman run` to /readyz {R.ready_seconds:.1f} s; bytecode for {compiled} dependency "
        f"modules; image {size / 1e6:.0f} MB"
    )


# ---------------------------------------------------------------------------------------------


def run_all() -> None:
    """Set up, then every check in turn; a check that needs an earlier one says so."""
    write_containers_conf()
    preflight()
    with phase("base image"):
        say("    " + make_base_image())
    with phase("build"):
        say("    " + build_image())
    check("build leaves nothing behind", check_build_leaves_nothing)
    R.data = new_volume("data")
    with phase("start"):
        seconds = start("first", R.data)
        say(f"    {R.container} on {R.url}: /healthz answered {seconds:.1f} s after podman run")
    check("a. README walk-through", check_walkthrough)
    check("b. /healthz, /readyz, HEALTHCHECK", check_health)
    check("c. graceful podman stop", check_stop)
    stop_all()
    if check("d. restart keeps the jobs", check_restart):
        check("e. kill -9 with jobs running loses none", check_kill)
    stop_all()
    if check("f. locked-down run (read-only, uid 10001, no capabilities)", check_locked_down):
        check("g. startup times, read-only root", check_startup_times)


def cleanup() -> None:
    """Remove the run's containers, volumes and folders (containers.conf among them)."""
    t0 = time.monotonic()
    for name in reversed(R.containers):
        subprocess.run(["podman", "rm", "-f", "-t", "0", name], env=R.env, capture_output=True)
    for volume in R.volumes:
        subprocess.run(["podman", "volume", "rm", "-f", volume], env=R.env, capture_output=True)
    for folder in R.dirs:
        if folder.exists():
            unmount_under(folder)
            shutil.rmtree(folder, ignore_errors=True)
    R.phases.append(("clean-up", time.monotonic() - t0))


def summary() -> None:
    """The time of each phase and check, the total, and the verdict."""
    say("=== image-test: wall time")
    for name, seconds in R.phases:
        say(f"    {seconds:6.1f} s  {name}")
    say(f"    {time.monotonic() - R.started:6.1f} s  total")
    failed = [name for name, ok, _ in R.results if not ok]
    if failed or not R.results:
        say(f"=== image-test: FAIL ({', '.join(failed) or 'no check ran'})")
    else:
        say(f"=== image-test: PASS ({len(R.results)} checks)")


def main() -> int:
    """Run everything from the repository's root; clean up whatever happens."""
    global R
    R = Run()
    os.chdir(ROOT)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    signal.signal(signal.SIGHUP, lambda *_: sys.exit(129))
    try:
        run_all()
    except CheckFailed as error:
        say(f"FAIL set-up: {error}")
        R.results.append(("set-up", False, str(error)))
    except (KeyboardInterrupt, SystemExit):  # Ctrl+C, SIGTERM, SIGHUP: clean up, then go
        R.results.append(("interrupted", False, "interrupted"))
        raise
    except Exception as error:  # a bug here, or podman misbehaving: still clean up, say FAIL
        traceback.print_exc()
        R.results.append(("unexpected error", False, repr(error)))
    finally:
        cleanup()
        summary()
    return 0 if R.results and all(ok for _, ok, _ in R.results) else 1


if __name__ == "__main__":
    sys.exit(main())
