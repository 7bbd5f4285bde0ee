"""deploy/: the container file and the Kubernetes manifests, checked as files (no container
engine or cluster runs here), and the worker on a read-only root filesystem."""

from __future__ import annotations

import copy
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import tempfile
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from common.keys import QUEUES, queue_messages_key
from settings import Limits, load_settings
from tests.support.config import write_toml
from tests.support.env import CI
from tests.support.helpers import wait_for
from tests.support.processes import MAILWORKER, clean_env

ROOT = Path(__file__).resolve().parent.parent
CONTAINERFILE = ROOT / "deploy" / "container" / "Containerfile"
KUBE = ROOT / "deploy" / "kubernetes"
SCHEMAS = Path(__file__).resolve().parent / "schemas"
# The keys KEDA's Redis scaler reads (kedacore/keda v2.20.2, pkg/scalers/redis_scaler.go).
REDIS_SCALER_KEYS = {
    "address",
    "addresses",
    "host",
    "hosts",
    "port",
    "ports",
    "username",
    "password",
    "unsafeSsl",
    "listLength",
    "activationListLength",
    "listName",
    "databaseIndex",
    "enableTLS",
}
REDIS_AUTH_PARAMETERS = {
    "username",
    "password",
    "tls",
    "cert",
    "key",
    "keyPassword",
    "ca",
}
# Memory per pod (docs/operations.md): copies of a message in flight, and MiB figures.
COPIES_IN_FLIGHT, PROCESS_MIB, MASTER_MIB, PROBE_MIB = 4, 50, 50, 50


# ---------------------------------------------------------------- the container file


def _stages(text: str) -> list[list[str]]:
    """The instructions of each stage, continuation lines joined, comments dropped."""
    joined = re.sub(
        r"\\\n",
        " ",
        "\n".join(
            line for line in text.splitlines() if not line.lstrip().startswith("#")
        ),
    )
    stages: list[list[str]] = []
    for line in (part.strip() for part in joined.splitlines()):
        if not line:
            continue
        if line.upper().startswith("FROM "):
            stages.append([])
        if stages:
            stages[-1].append(" ".join(line.split()))
    return stages


def _instructions(stage: list[str], name: str) -> list[str]:
    return [i[len(name) + 1 :] for i in stage if i.upper().startswith(name + " ")]


def test_the_image_runs_mailworker_as_a_numeric_user_without_build_tools():
    """The final stage copies the built environment, runs `mailworker` as a numeric
    non-root user (runAsNonRoot can verify it) and installs nothing itself."""
    build, final = _stages(CONTAINERFILE.read_text())[-2:]
    user = _instructions(final, "USER")[-1].split(":")[0]
    assert user.isdigit() and int(user) != 0
    assert json.loads(_instructions(final, "ENTRYPOINT")[-1]) == ["mailworker"]
    assert json.loads(_instructions(final, "CMD")[-1]) == ["worker"]
    assert any(
        c.startswith("--from=build /opt/mailworker")
        for c in _instructions(final, "COPY")
    )
    final_text = " ".join(final).lower()
    for tool in (
        "gcc",
        "g++",
        "build-essential",
        "apt-get install",
        "pip install",
        "make ",
    ):
        assert tool not in final_text, tool
    # The virtual environment points at the build stage's interpreter: the same base image.
    assert _instructions(build, "FROM")[0].split()[0] == _instructions(final, "FROM")[0]
    assert "PYTHONDONTWRITEBYTECODE=1" in " ".join(_instructions(final, "ENV"))


def test_the_image_holds_every_package_of_the_project_from_wheels_only():
    """The build stage copies each package pyproject.toml installs (and its readme), the
    ignore file lets them into the build context, and dependencies come as wheels."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    packages = [
        p.rstrip("*")
        for p in project["tool"]["setuptools"]["packages"]["find"]["include"]
    ]
    build = _stages(CONTAINERFILE.read_text())[0]
    copied = {
        part.rstrip("/")
        for c in _instructions(build, "COPY")
        for part in c.split()[:-1]
    }
    assert {*packages, "pyproject.toml", project["project"]["readme"]} <= copied
    kept = {
        line[1:].rstrip("/")
        for line in (CONTAINERFILE.parent / "Containerfile.dockerignore")
        .read_text()
        .splitlines()
        if line.startswith("!")
    }
    assert copied <= kept
    assert "--only-binary=:all:" in " ".join(_instructions(build, "RUN"))


# ---------------------------------------------------------------- the manifests


def _documents(name: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all((KUBE / name).read_text()) if d]


def _manifests() -> Iterator[tuple[str, dict[str, Any]]]:
    for path in sorted(KUBE.glob("*.yaml")):
        if path.name != "kustomization.yaml":
            for document in _documents(path.name):
                yield path.name, document


def _one(kind: str, component: str = "worker") -> dict[str, Any]:
    (found,) = [
        d
        for _, d in _manifests()
        if d["kind"] == kind
        and d["metadata"]
        .get("labels", {})
        .get("app.kubernetes.io/component", component)
        == component
    ]
    return found


def _strict(schema: Any) -> Any:
    """A CRD's schema that refuses unknown fields, as the API server's strict field
    validation does (CRD schemas leave additionalProperties out)."""
    if isinstance(schema, list):
        return [_strict(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    out = {key: _strict(value) for key, value in schema.items()}
    if (
        "properties" in out
        and "additionalProperties" not in out
        and not out.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    return out


def _validate(document: dict[str, Any]) -> None:
    """Validate against Kubernetes' schemas, or KEDA's for its kinds; raise when invalid."""
    if document["apiVersion"].startswith("keda.sh/"):
        import jsonschema

        name = f"{document['kind'].lower()}-keda-{document['apiVersion'].split('/')[1]}.json"
        schema = _strict(json.loads((SCHEMAS / name).read_text()))
        jsonschema.Draft7Validator(schema).validate(document)
        return
    try:
        import kubernetes_validate
        from kubernetes_validate.utils import all_versions
    except ImportError:  # pragma: no cover - it is a test dependency
        if CI:
            raise
        pytest.skip("kubernetes-validate is not installed (pip install -e '.[test]')")
    # The oldest and the newest Kubernetes whose schemas the validator ships.
    for version in {all_versions()[0], all_versions()[-1]}:
        kubernetes_validate.validate(document, version, strict=True)


def test_every_manifest_is_valid_and_a_misspelt_field_would_not_be():
    """Each object in deploy/kubernetes passes a strict schema check (Kubernetes' own
    schemas, KEDA's CRD schemas), and the check refuses a field it does not know."""
    kinds = set()
    for _, document in _manifests():
        _validate(document)
        kinds.add(document["kind"])
    assert kinds == {
        "ConfigMap",
        "Secret",
        "Deployment",
        "Service",
        "PodDisruptionBudget",
        "ScaledObject",
        "TriggerAuthentication",
    }
    for kind, where in (
        (
            "Deployment",
            ["spec", "template", "spec", "containers", 0, "securityContext"],
        ),
        ("ScaledObject", ["spec"]),
    ):
        broken = copy.deepcopy(_one(kind))
        target: Any = broken
        for step in where:
            target = target[step]
        target["readOnlyRootFilesytem"] = True
        with pytest.raises(Exception, match="readOnlyRootFilesytem"):
            _validate(broken)


def _flag(args: list[str], name: str) -> str:
    return args[args.index(name) + 1]


def test_the_deployment_probes_stops_and_confines_the_worker():
    """Probes run `mailworker health` for the worker's process count, the grace period
    outlasts --shutdown-timeout, and the container runs confined on a read-only root."""
    deployment = _one("Deployment")
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    args = container["args"]
    assert args[0] == "worker"
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        command = container[probe]["exec"]["command"]
        assert command[:2] == ["mailworker", "health"]
        assert _flag(command, "--min-processes") == _flag(args, "--processes")
        assert container[probe]["timeoutSeconds"] > 3  # health's own --timeout
    # SIGTERM → jobs in flight get --shutdown-timeout, the heartbeat thread up to 5 s more.
    assert (
        pod["terminationGracePeriodSeconds"]
        >= int(_flag(args, "--shutdown-timeout")) + 5
    )
    assert pod["enableServiceLinks"] is False  # no MAILWORKER_PORT from a Service
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    confined = container["securityContext"]
    assert confined["readOnlyRootFilesystem"] is True
    assert confined["allowPrivilegeEscalation"] is False
    assert confined["capabilities"] == {"drop": ["ALL"]}
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert "emptyDir" in volumes[mounts["/tmp"]]
    env = {e["name"]: e for e in container["env"]}
    assert os.path.dirname(env["MAILWORKER_CONFIG"]["value"]) in mounts
    assert (
        env["MAILWORKER_BROKER_URL"]["valueFrom"]["secretKeyRef"]["key"] == "broker-url"
    )
    # The memory limit holds a message of limits.max_message_bytes on every thread.
    processes, threads = int(_flag(args, "--processes")), int(_flag(args, "--threads"))
    message = Limits().max_message_bytes / 2**20
    per_process = PROCESS_MIB + threads * COPIES_IN_FLIGHT * message + threads * message
    needed = MASTER_MIB + processes * per_process + 2 * PROBE_MIB
    limit = container["resources"]["limits"]["memory"]
    assert limit.endswith("Mi") and int(limit[:-2]) >= needed
    # The disruption budget covers exactly these pods.
    budget = _one("PodDisruptionBudget")
    assert budget["spec"]["selector"] == deployment["spec"]["selector"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= (
        deployment["spec"]["template"]["metadata"]["labels"].items()
    )


def test_the_api_deployment_probes_health_and_readiness_behind_its_service():
    """Liveness is /healthz, readiness /readyz, on the port the API binds and the
    Service targets; the grace period outlasts --graceful-timeout; it runs confined."""
    from worker.api.server import split_listen
    from worker.cli.api import api

    deployment = _one("Deployment", "api")
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    args = container["args"]
    assert args[0] == "api"
    api.make_context("api", args[1:])  # every option is one `mailworker api` takes
    host, port = split_listen(_flag(args, "--listen"))
    (named,) = container["ports"]
    assert named["containerPort"] == port and host == "0.0.0.0"  # noqa: S104
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    assert pod["terminationGracePeriodSeconds"] > float(
        _flag(args, "--graceful-timeout")
    )
    assert pod["enableServiceLinks"] is False
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    service = _one("Service", "api")
    assert service["spec"]["selector"] == deployment["spec"]["selector"]["matchLabels"]
    assert service["spec"]["ports"][0]["targetPort"] == named["name"]


def test_the_example_configuration_loads_with_the_files_the_secret_mounts(tmp_path):
    """The ConfigMap's mailworker.toml is a valid configuration whose every *_file is a
    file of the Secret's volume, and the broker URL comes from the Secret."""
    pod = _one("Deployment")["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    secret = _one("Secret")
    config = _one("ConfigMap")["data"]["mailworker.toml"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    (mount,) = [m for m in container["volumeMounts"] if "secret" in volumes[m["name"]]]
    items = volumes[mount["name"]]["secret"]["items"]
    assert volumes[mount["name"]]["secret"]["secretName"] == secret["metadata"]["name"]
    # Given the Secret's files where the pod would see them (under tmp_path here)
    files = tmp_path / "secrets"
    files.mkdir()
    for item in items:
        (files / item["path"]).write_text(secret["stringData"][item["key"]])
    referenced = re.findall(r'_file = "([^"]+)"', config)
    assert referenced and all(
        os.path.dirname(p) == mount["mountPath"] for p in referenced
    )
    assert {os.path.basename(p) for p in referenced} <= {i["path"] for i in items}
    path = tmp_path / "mailworker.toml"
    path.write_text(config.replace(mount["mountPath"], str(files)))
    # When it is loaded as the worker loads it
    from worker.app import secrets_of

    settings = load_settings(
        path, environ={"MAILWORKER_BROKER_URL": secret["stringData"]["broker-url"]}
    )
    # Then every service is there and every secret file is read
    assert settings.delivery_order == ["o365", "relay"]
    assert "CHANGE-ME" in secrets_of(settings)


def test_keda_counts_ready_and_in_flight_messages_of_every_queue():
    """One trigger per queue on its message hash (ready + in flight), on the broker's
    database, authenticated from the Secret; at least one replica is kept."""
    scaled, auth, secret = (
        _one("ScaledObject"),
        _one("TriggerAuthentication"),
        _one("Secret"),
    )
    namespace = re.search(
        r'^namespace = "([^"]+)"', _one("ConfigMap")["data"]["mailworker.toml"], re.M
    )
    assert namespace is not None
    broker = urlsplit(secret["stringData"]["broker-url"])
    triggers = scaled["spec"]["triggers"]
    assert sorted(t["metadata"]["listName"] for t in triggers) == sorted(
        queue_messages_key(namespace.group(1), q) for q in QUEUES.values()
    )
    for trigger in triggers:
        assert trigger["type"] == "redis"
        assert set(trigger["metadata"]) <= REDIS_SCALER_KEYS
        assert trigger["metadata"]["address"] == broker.netloc.rpartition("@")[2]
        assert trigger["metadata"]["databaseIndex"] == broker.path.strip("/")
        assert trigger["authenticationRef"]["name"] == auth["metadata"]["name"]
    for ref in auth["spec"]["secretTargetRef"]:
        assert ref["parameter"] in REDIS_AUTH_PARAMETERS
        assert (
            ref["name"] == secret["metadata"]["name"]
            and ref["key"] in secret["stringData"]
        )
    assert (
        scaled["spec"]["scaleTargetRef"]["name"]
        == _one("Deployment")["metadata"]["name"]
    )
    assert scaled["spec"]["minReplicaCount"] >= 1


def test_kustomization_applies_every_manifest_but_keda_s():
    """`kubectl apply -k deploy/kubernetes` applies every file except the KEDA objects,
    which need KEDA's CRDs installed."""
    listed = set(yaml.safe_load((KUBE / "kustomization.yaml").read_text())["resources"])
    others = {p.name for p in KUBE.glob("*.yaml")} - {"kustomization.yaml"}
    assert listed == others - {"keda-scaledobject.yaml"}


# ---------------------------------------------------------------- read-only root


def _confined(scratch: Path, *command: str) -> list[str]:
    """``command`` in a mount namespace of its own: the root filesystem read-only, a
    tmpfs on ``scratch`` the only writable place, every capability dropped."""
    script = (
        'mount -o remount,bind,ro / && mount -t tmpfs -o size=16m tmpfs "$0" && '
        "exec setpriv --no-new-privs --bounding-set=-all --inh-caps=-all "
        'env TMPDIR="$0" HOME=/nonexistent PYTHONDONTWRITEBYTECODE=1 "$@"'
    )
    return [
        "unshare",
        "--mount",
        "--propagation",
        "private",
        "sh",
        "-c",
        script,
        str(scratch),
        *command,
    ]


@pytest.fixture
def confinement() -> Iterator[Path]:
    """A directory outside pytest's tmp_path (which the namespace keeps as it is) with an
    empty ``tmp`` for the tmpfs."""
    if (
        shutil.which("unshare") is None
        or shutil.which("setpriv") is None
        or os.geteuid()
    ):
        if CI:
            raise RuntimeError(
                "CI=true: the read-only root test needs root, unshare, setpriv"
            )
        pytest.skip("needs root with unshare and setpriv")
    probe = subprocess.run(
        ["unshare", "--mount", "true"], capture_output=True, timeout=10, check=False
    )
    if probe.returncode != 0:
        if CI:
            raise RuntimeError(f"CI=true: unshare --mount fails: {probe.stderr!r}")
        pytest.skip("mount namespaces are not available here")
    directory = Path(tempfile.mkdtemp(prefix="mailworker-ro-"))
    (directory / "tmp").mkdir()
    yield directory
    shutil.rmtree(directory, ignore_errors=True)


@pytest.mark.slow
def test_the_worker_delivers_on_a_read_only_root_without_capabilities(
    smtp_server, redis_url, namespace, confinement
):
    """With the root filesystem read-only (only a tmpfs writable) and no capabilities, a
    worker delivers a job, `mailworker health` says healthy, and SIGTERM stops it with 0."""
    # Given a worker confined as the image's read-only root confines it
    server = smtp_server("plain")
    config = write_toml(
        confinement / "mailworker.toml",
        {
            "broker_url": redis_url,
            "namespace": namespace,
            "smtp": [server.smtp_section()],
        },
    )
    env = clean_env(MAILWORKER_CONFIG=str(config))
    log = (confinement / "worker.log").open("wb")  # opened out here: stderr of a pod
    worker = subprocess.Popen(
        _confined(confinement / "tmp", MAILWORKER, "worker", "-p", "1", "-t", "2"),
        env=env,
        stdout=log,
        stderr=log,
        start_new_session=True,
    )
    try:
        # Then the confinement is real: nothing outside the tmpfs can be written
        tried = subprocess.run(
            _confined(
                confinement / "tmp", "sh", "-c", f"touch {shlex.quote(str(config))}.w"
            ),
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        assert tried.returncode != 0 and "Read-only file system" in tried.stderr
        # When a job is sent
        sent = subprocess.run(
            [
                MAILWORKER,
                "send",
                "--to",
                "ann@example.org",
                "--subject",
                "ro",
                "--text",
                "hi",
            ],
            env=env,
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        )
        assert sent.returncode == 0
        # Then it is delivered, and health (confined too) exits 0
        wait_for(lambda: server.recorder.messages, timeout=60)
        health = lambda: subprocess.run(  # noqa: E731 - polled below
            _confined(confinement / "tmp", MAILWORKER, "health"),
            env=env,
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        wait_for(lambda: health().returncode == 0, timeout=30, interval=0.5)
        worker.send_signal(signal.SIGTERM)
        assert worker.wait(timeout=40) == 0
        text = (confinement / "worker.log").read_text(errors="replace")
        assert "Read-only file system" not in text and "Traceback" not in text
    finally:
        if worker.poll() is None:
            os.killpg(worker.pid, signal.SIGKILL)
            worker.wait(timeout=10)
        log.close()
