"""The Dockerfile and Kubernetes manifests: linted, schema-validated, consistent, and runnable.

No Docker engine or cluster exists where the tests run, so everything here is offline: the
files are checked by hadolint and kubernetes-validate, read for consistency with each other and
with the app, and the image's CMD is run in the environment ``make install`` builds.
"""

import json
import os
import re
import shlex
import socket
import subprocess
import sys
import time
from contextlib import closing
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
import yaml

from app.config import Settings
from tests.support import HTTP_PROTOCOL, ROOT, free_port, serving

BIN = Path(sys.executable).parent
KUBERNETES_VERSION = "1.37.0"


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of the final stage, continuation lines joined."""
    text = (ROOT / "Dockerfile").read_text()
    logical = re.sub(r"\\\n\s*", " ", text)
    lines = [line.strip() for line in logical.splitlines()]
    instructions = [
        (op.upper(), rest)
        for op, _, rest in (line.partition(" ") for line in lines)
        if op and not op.startswith("#")
    ]
    stages = [i for i, (op, _) in enumerate(instructions) if op == "FROM"]
    return instructions[stages[-1] :]


def dockerfile(op: str) -> list[str]:
    return [rest for instruction, rest in dockerfile_instructions() if instruction == op]


def dockerfile_env() -> dict[str, str]:
    env: dict[str, str] = {}
    for rest in dockerfile("ENV"):
        for pair in shlex.split(rest):
            key, _, value = pair.partition("=")
            env[key] = value
    return env


def dockerfile_cmd() -> list[str]:
    [cmd] = dockerfile("CMD")
    command: list[str] = json.loads(cmd)
    return command


def option(command: list[str], name: str) -> str:
    return command[command.index(name) + 1]


POSTGRES_MANIFESTS = sorted((ROOT / "deploy" / "postgres").glob("*.yaml"))


def manifests(*paths: Path) -> dict[str, dict[str, Any]]:
    """The documents of these files (by default the SQLite deployment's) by kind."""
    found = {}
    for path in paths or (ROOT / "deployment.yaml", ROOT / "service.yaml"):
        for document in yaml.safe_load_all(path.read_text()):
            kind = document["kind"]
            if kind == "Service" and document["spec"].get("clusterIP") == "None":
                kind = "HeadlessService"
            found[kind] = document
    return found


def pod_spec() -> dict[str, Any]:
    spec: dict[str, Any] = manifests()["Deployment"]["spec"]["template"]["spec"]
    return spec


def container() -> dict[str, Any]:
    [only] = pod_spec()["containers"]
    found: dict[str, Any] = only
    return found


def validate_manifests(*paths: Path) -> list[str]:
    """Problems kubernetes-validate reports; its warnings (unknown kinds) count as problems."""
    run = subprocess.run(
        [str(BIN / "kubernetes-validate"), "--strict", "-k", KUBERNETES_VERSION, *map(str, paths)],
        capture_output=True,
        text=True,
    )
    lines = (run.stdout + run.stderr).splitlines()
    problems = [line for line in lines if not line.startswith("INFO")]
    if run.returncode != 0 and not problems:
        problems.append(f"kubernetes-validate exited {run.returncode}")
    return problems


def test_dockerfile_passes_hadolint() -> None:
    run = subprocess.run(
        [str(BIN / "hadolint"), str(ROOT / "Dockerfile")], capture_output=True, text=True
    )
    assert run.returncode == 0, run.stdout + run.stderr
    assert run.stdout.strip() == ""


def test_manifests_pass_strict_schema_validation() -> None:
    assert validate_manifests(ROOT / "deployment.yaml", ROOT / "service.yaml") == []
    assert len(POSTGRES_MANIFESTS) == 3
    assert validate_manifests(*POSTGRES_MANIFESTS) == []


@pytest.mark.parametrize(
    "manifest",
    [
        "apiVersion: v1\nkind: Servise\nmetadata: {name: x}\n",
        "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: x}\nspec: {replica: 1}\n",
    ],
    ids=["unknown-kind-only-warns", "unknown-field"],
)
def test_schema_check_fails_on_what_kubernetes_would_reject(tmp_path: Path, manifest: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(manifest)
    assert validate_manifests(path) != []


def test_ports_agree_from_dockerfile_to_service() -> None:
    port = int(option(dockerfile_cmd(), "--port"))
    assert dockerfile("EXPOSE") == [str(port)]
    [container_port] = container()["ports"]
    assert container_port["containerPort"] == port
    named = container_port["name"]
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert container()[probe]["httpGet"]["port"] in (named, port), probe
    [service_port] = manifests()["Service"]["spec"]["ports"]
    assert service_port["targetPort"] in (named, port)
    assert service_port["port"] == 8080
    assert manifests()["Service"]["spec"]["type"] == "NodePort"
    assert manifests()["Service"]["metadata"]["name"] == "expand-reduce-service"


def test_selectors_match_the_pod_labels() -> None:
    deployment = manifests()["Deployment"]
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    for selector in (
        deployment["spec"]["selector"]["matchLabels"],
        manifests()["Service"]["spec"]["selector"],
    ):
        assert selector
        assert selector.items() <= labels.items()


async def test_probe_paths_exist_and_answer_200(tmp_path: Path) -> None:
    paths = {
        container()[probe]["httpGet"]["path"]
        for probe in ("startupProbe", "livenessProbe", "readinessProbe")
    }
    assert paths == {"/healthz", "/readyz"}
    settings = Settings(database_url=f"sqlite:///{tmp_path}/jobs.db", flow_processes=0)
    async with serving(settings) as client:
        for path in paths:
            assert (await client.get(path)).status_code == 200, path


def test_image_name_matches_the_readme_build_commands() -> None:
    image = container()["image"]
    name, _, tag = image.partition(":")
    assert (name, bool(tag), tag != "latest") == ("uniflow-hanliao", True, True)
    assert container()["imagePullPolicy"] == "IfNotPresent"
    readme = (ROOT / "README.md").read_text()
    assert f"minikube image build -t {image} ." in readme
    assert f"docker build -t {image} ." in readme


def test_the_database_lives_on_the_mounted_volume() -> None:
    mounts = {mount["name"]: mount["mountPath"] for mount in container()["volumeMounts"]}
    volumes = {volume["name"]: volume for volume in pod_spec()["volumes"]}
    claim = manifests()["PersistentVolumeClaim"]["metadata"]["name"]
    [data] = [
        n
        for n, v in volumes.items()
        if v.get("persistentVolumeClaim", {}).get("claimName") == claim
    ]
    config = manifests()["ConfigMap"]
    assert container()["envFrom"] == [{"configMapRef": {"name": config["metadata"]["name"]}}]
    for url in (config["data"]["DATABASE_URL"], dockerfile_env()["DATABASE_URL"]):
        database_file = Path(Settings(database_url=url).database_url.removeprefix("sqlite:///"))
        assert database_file.parent == Path(mounts[data]), url
    assert dockerfile("VOLUME") == [f'["{mounts[data]}"]']
    assert "/tmp" in mounts.values()  # the only other writable place


def test_every_way_to_serve_it_uses_the_protocol_that_bounds_requests() -> None:
    protocol = "app.protocol:HttpProtocol"
    assert option(dockerfile_cmd(), "--http") == protocol
    makefile = (ROOT / "Makefile").read_text()
    run = makefile[makefile.index("\nrun:") :].split("\n\n")[0]
    assert f"--http {protocol}" in run
    assert ("--http", protocol) == HTTP_PROTOCOL  # the tests' real servers


def test_the_readmes_docker_run_gives_the_drain_time_to_finish_and_image_test_uses_it() -> None:
    readme = (ROOT / "README.md").read_text()
    [line] = [row for row in readme.splitlines() if row.startswith("docker run ")]
    stop_timeout = int(line.split("--stop-timeout ")[1].split()[0])
    graceful = int(option(dockerfile_cmd(), "--timeout-graceful-shutdown"))
    drain = Settings.model_fields["shutdown_timeout_seconds"].default
    assert drain < graceful < stop_timeout
    image_test = (ROOT / "deploy" / "image-test.py").read_text()
    assert f"STOP_TIMEOUT = {stop_timeout} " in image_test
    assert f"GRACEFUL_TIMEOUT = {graceful} " in image_test


def test_sqlite_deployment_is_one_replica_recreated() -> None:
    spec = manifests()["Deployment"]["spec"]
    assert spec["replicas"] == 1
    assert spec["strategy"] == {"type": "Recreate"}
    assert manifests()["PersistentVolumeClaim"]["spec"]["accessModes"] == ["ReadWriteOnce"]


def test_shutdown_fits_inside_the_termination_grace_period() -> None:
    graceful = int(option(dockerfile_cmd(), "--timeout-graceful-shutdown"))
    pre_stop = int(container()["lifecycle"]["preStop"]["exec"]["command"][-1])
    drain = float(manifests()["ConfigMap"]["data"]["SHUTDOWN_TIMEOUT_SECONDS"])
    assert drain <= graceful < 30  # below Kubernetes' default grace, as the issue asks
    assert pod_spec()["terminationGracePeriodSeconds"] > pre_stop + graceful


def test_pod_runs_locked_down_as_the_images_user() -> None:
    pod = pod_spec()["securityContext"]
    [user] = dockerfile("USER")
    uid, _, gid = user.partition(":")
    assert (pod["runAsNonRoot"], pod["runAsUser"], pod["runAsGroup"]) == (True, int(uid), int(gid))
    assert pod["seccompProfile"] == {"type": "RuntimeDefault"}
    assert container()["securityContext"] == {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "runAsNonRoot": True,
        "capabilities": {"drop": ["ALL"]},
    }
    assert set(container()["resources"]) == {"requests", "limits"}


def port_is_free(port: int) -> bool:
    with closing(socket.socket()) as sock:
        try:
            sock.bind(("0.0.0.0", port))
        except OSError:
            return False
        return True


def test_the_images_cmd_serves_a_job(tmp_path: Path) -> None:
    """Run the Dockerfile's CMD, as written, with its ENV, in the environment make install builds.

    Two substitutions, both outside the image's contract: /data is a temporary folder (the
    tests must not write to the host's /data), and if port 8080 is taken on this machine the
    server gets a free one.
    """
    command = dockerfile_cmd()
    image_env = dockerfile_env()
    # The image's virtualenv is /venv; here it is the one make install built.
    path = image_env.pop("PATH").replace("$PATH", os.environ["PATH"]).replace("/venv/bin", str(BIN))
    env = {**os.environ, **image_env, "PATH": path}
    env["DATABASE_URL"] = env["DATABASE_URL"].replace("/data/", f"{tmp_path}/")
    port = int(option(command, "--port"))
    if not port_is_free(port):
        port = free_port()
        command[command.index("--port") + 1] = str(port)
    log = (tmp_path / "server.log").open("wb")
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=log)
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(f"{base}/readyz").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, (tmp_path / "server.log").read_text()
            time.sleep(0.1)
        body = {"job": {"input_data": [{"a": "x", "b": "y", "c": "z"}]}}
        job_id = httpx.post(f"{base}/expand_reduce_flow/", json=body).json()["job_id"]
        for _ in range(100):
            result = httpx.get(f"{base}/job_result/{job_id}")
            if result.status_code == 200:
                break
            time.sleep(0.05)
        assert result.json()["result"] == [{"a b": "x y", "c": "z"}]
        assert (tmp_path / "jobs.db").exists()
    finally:
        process.terminate()
        process.wait(timeout=30)
        log.close()


def postgres_mode() -> dict[str, dict[str, Any]]:
    return manifests(*POSTGRES_MANIFESTS)


def test_postgres_mode_runs_three_replicas_rolling_with_the_default_pod_settings() -> None:
    default, scaled = manifests()["Deployment"], postgres_mode()["Deployment"]
    assert scaled["spec"]["replicas"] == 3
    assert scaled["spec"]["strategy"] == {
        "type": "RollingUpdate",
        "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0},
    }
    [mine] = scaled["spec"]["template"]["spec"]["containers"]
    same = ("image", "imagePullPolicy", "ports", "startupProbe", "livenessProbe")
    for key in (*same, "readinessProbe", "lifecycle", "securityContext", "resources"):
        assert mine[key] == container()[key], key
    pod = scaled["spec"]["template"]["spec"]
    for key in ("securityContext", "terminationGracePeriodSeconds"):
        assert pod[key] == pod_spec()[key], key
    assert scaled["metadata"]["name"] == default["metadata"]["name"]
    assert postgres_mode()["Service"]["spec"] == manifests()["Service"]["spec"]
    database_timeout = float(postgres_mode()["ConfigMap"]["data"]["DATABASE_TIMEOUT_SECONDS"])
    assert database_timeout < mine["readinessProbe"]["timeoutSeconds"]
    # No volume of its own: the state is in PostgreSQL; /tmp is the only writable place.
    assert [m["mountPath"] for m in mine["volumeMounts"]] == ["/tmp"]


def test_postgres_mode_keeps_two_replicas_up_on_different_nodes() -> None:
    documents = postgres_mode()
    deployment = documents["Deployment"]
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    budget = documents["PodDisruptionBudget"]["spec"]
    assert budget["minAvailable"] == deployment["spec"]["replicas"] - 1 == 2
    assert budget["selector"]["matchLabels"] == deployment["spec"]["selector"]["matchLabels"]
    spread = deployment["spec"]["template"]["spec"]["topologySpreadConstraints"]
    by_key = {constraint["topologyKey"]: constraint for constraint in spread}
    assert by_key["kubernetes.io/hostname"]["whenUnsatisfiable"] == "DoNotSchedule"
    # Nodes without zone labels (minikube's) must not keep pods from being scheduled.
    assert by_key["topology.kubernetes.io/zone"]["whenUnsatisfiable"] == "ScheduleAnyway"
    for constraint in spread:
        assert constraint["maxSkew"] == 1
        assert constraint["labelSelector"]["matchLabels"].items() <= labels.items()


def test_postgres_mode_lets_only_the_services_pods_reach_the_database() -> None:
    documents = postgres_mode()
    policy = documents["NetworkPolicy"]["spec"]
    postgres_pods = documents["StatefulSet"]["spec"]["template"]["metadata"]["labels"]
    app_pods = documents["Deployment"]["spec"]["template"]["metadata"]["labels"]
    assert policy["podSelector"]["matchLabels"].items() <= postgres_pods.items()
    assert policy["policyTypes"] == ["Ingress"]
    [rule] = policy["ingress"]
    [source] = rule["from"]
    assert list(source) == ["podSelector"]  # no namespace or address range besides
    assert source["podSelector"]["matchLabels"].items() <= app_pods.items()
    [port] = rule["ports"]
    [postgres] = documents["StatefulSet"]["spec"]["template"]["spec"]["containers"]
    assert port["port"] in {p["name"] for p in postgres["ports"]}


def test_postgres_mode_takes_its_database_url_from_the_secret() -> None:
    documents = postgres_mode()
    [mine] = documents["Deployment"]["spec"]["template"]["spec"]["containers"]
    [env] = [e for e in mine["env"] if e["name"] == "DATABASE_URL"]
    reference = env["valueFrom"]["secretKeyRef"]
    secret = documents["Secret"]
    assert reference["name"] == secret["metadata"]["name"]
    assert "DATABASE_URL" not in documents["ConfigMap"]["data"]
    url = urlsplit(Settings(database_url=secret["stringData"][reference["key"]]).database_url)
    data = secret["stringData"]
    assert (url.username, url.password) == (data["POSTGRES_USER"], data["POSTGRES_PASSWORD"])
    assert url.path == f"/{data['POSTGRES_DB']}"
    database = documents["HeadlessService"]
    assert url.hostname == database["metadata"]["name"]
    [port] = database["spec"]["ports"]
    assert url.port == port["port"]
    statefulset = documents["StatefulSet"]
    [postgres] = statefulset["spec"]["template"]["spec"]["containers"]
    assert postgres["envFrom"] == [{"secretRef": {"name": secret["metadata"]["name"]}}]
    assert {p["name"]: p["containerPort"] for p in postgres["ports"]} == {
        port["targetPort"]: port["port"]
    }


def test_postgres_statefulset_keeps_its_data_on_a_claim_and_matches_its_service() -> None:
    documents = postgres_mode()
    statefulset, service = documents["StatefulSet"], documents["HeadlessService"]
    spec = statefulset["spec"]
    assert spec["serviceName"] == service["metadata"]["name"]
    labels = spec["template"]["metadata"]["labels"]
    assert spec["selector"]["matchLabels"].items() <= labels.items()
    assert service["spec"]["selector"].items() <= labels.items()
    [claim] = spec["volumeClaimTemplates"]
    [postgres] = spec["template"]["spec"]["containers"]
    mounts = {m["name"]: m["mountPath"] for m in postgres["volumeMounts"]}
    pgdata = {e["name"]: e["value"] for e in postgres["env"]}["PGDATA"]
    assert Path(pgdata).parent == Path(mounts[claim["metadata"]["name"]])
    assert postgres["securityContext"]["readOnlyRootFilesystem"] is True
    assert spec["template"]["spec"]["securityContext"]["runAsNonRoot"] is True
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert "pg_isready" in " ".join(postgres[probe]["exec"]["command"]), probe
