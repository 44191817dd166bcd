"""The image, for real: built with Docker and every process run from it, as compose runs them.

Where a Docker engine can run (Debian's docker.io; `tests/image/engine.py` starts dockerd
with no bridge and no NAT if none is running), the test builds a stand-in for the official
Python image from Debian's packages (`tools/image/base-image.sh`, cached per machine), builds
the project's image on it (`--build-arg BASE_IMAGE=...`), then runs `esctl db init`,
`kong-config` and every process of the registry from it: `--network host`, `--read-only`,
`--cap-drop ALL`, uid 10001, the compose volumes (fresh named volumes), against this machine's
PostgreSQL and RabbitMQ (fresh databases, a fresh vhost) on free ports of 127.0.0.1. Each must
become ready, and healthy by the image's own HEALTHCHECK. Skipped, saying why, where no engine
can start. `pytest -m image` runs it alone.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import yaml

import registry
from testbed.servers import pick_port
from tests.image.engine import NoEngine, docker, engine

ROOT = Path(__file__).resolve().parents[2]
BASE_RECIPE = ROOT / "tools" / "image" / "base-image.sh"
# One tag, overwritten by each run: the layer cache stays, old builds are pruned.
IMAGE = "eskit:image-test"
LABEL = "eskit.image-test"
READY_SECONDS = 120

pytestmark = pytest.mark.image


# -- without an engine: the build context has what the Dockerfile copies ----------------------


def _context_includes(path: str, patterns: list[str]) -> bool:
    """Whether `.dockerignore` (`**`, then `!path` exceptions) lets `path` into the context."""
    included = False
    for pattern in patterns:
        negated = pattern.startswith("!")
        bare = pattern.lstrip("!").rstrip("/")
        if bare in ("**", path) or path.startswith(bare + "/"):
            included = negated
    return included


def test_the_build_context_holds_every_path_the_dockerfile_copies() -> None:
    patterns = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip()
        and not line.startswith("#")
        and "__pycache__" not in line
        and "*.pyc" not in line
    ]
    copied = [
        source
        for line in (ROOT / "Dockerfile").read_text().splitlines()
        if line.startswith("COPY ") and "--from=" not in line
        for source in line.split()[1:-1]
    ]
    assert copied
    missing = [p for p in copied if not _context_includes(p.rstrip("/"), patterns)]
    assert not missing, f".dockerignore leaves out what the Dockerfile copies: {missing}"


# -- with an engine -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Built:
    image: str
    base: str
    seconds: dict[str, float]


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Built]:
    if os.environ.get("IMAGE_TEST") != "1":
        # It may start a Docker engine and spends 1 to 5 minutes on a fresh machine (Debian
        # packages, the base image, the build): `make test` and `make test-image` set it.
        pytest.skip("the image is built and run by `make test` or `make test-image` (IMAGE_TEST=1)")
    log = tmp_path_factory.mktemp("dockerd") / "dockerd.log"
    try:
        with engine(log):
            seconds: dict[str, float] = {}
            if shutil.which("debootstrap") is None and not _base_cached():
                raise NoEngine(
                    "no debootstrap to build the base image (apt-get install debootstrap)"
                )
            started = time.monotonic()
            base = _run([str(BASE_RECIPE)], timeout=1200).stdout.strip().splitlines()[-1]
            seconds["base"] = time.monotonic() - started
            started = time.monotonic()
            docker(
                "build", "--network", "host", "--build-arg", f"BASE_IMAGE={base}",
                "--label", LABEL, "-t", IMAGE, str(ROOT),
                timeout=900,
            )  # fmt: skip
            seconds["build"] = time.monotonic() - started
            yield Built(IMAGE, base, seconds)
            # The previous builds of the tag (dangling now): the base and the tag stay.
            docker("image", "prune", "-f", "--filter", f"label={LABEL}", check=False)
    except NoEngine as why:
        pytest.skip(f"no Docker engine can run here: {why}")


def _base_cached() -> bool:
    """Whether this machine has the base image of the current recipe."""
    tag = _run([str(BASE_RECIPE), "--tag"], timeout=30).stdout.strip()
    return docker("image", "inspect", tag, check=False).returncode == 0


def _run(argv: list[str], timeout: float) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
    assert result.returncode == 0, f"{argv[0]} exited {result.returncode}:\n{result.stderr[-3000:]}"
    return result


@dataclass
class Stack:
    run: str
    env: dict[str, str]
    ports: dict[str, int]
    volumes: dict[str, str]
    containers: dict[str, str]
    kong_yml: str
    seconds: dict[str, float]

    def url(self, process: str) -> str:
        return f"http://127.0.0.1:{self.ports[process]}"


# The compose volumes, each fresh: where compose mounts them in the image.
VOLUMES = {"kong-config": "/kong", "notify-maildir": "/var/lib/eskit/maildir"}
MAILDIR = VOLUMES["notify-maildir"]
NOTIFY = "notify_svc.consumer"  # the process compose mounts the maildir volume into


def _container_args(stack_run: str, name: str, env: dict[str, str]) -> list[str]:
    """`docker run` options of every eskit container: as compose's `x-eskit`, host network."""
    return [
        "--name", f"eskit-it-{stack_run}-{name}",
        "--label", f"{LABEL}={stack_run}",
        "--network", "host",
        "--read-only", "--tmpfs", "/tmp",
        "--cap-drop", "ALL", "--security-opt", "no-new-privileges:true",
        "--user", "10001:10001",
        *[arg for key, value in sorted(env.items()) for arg in ("-e", f"{key}={value}")],
    ]  # fmt: skip


def _logs(container: str) -> str:
    result = docker("logs", "--tail", "40", container, check=False)
    return (result.stdout + result.stderr)[-4000:]


@pytest.fixture(scope="module")
def stack(
    built: Built,
    make_database: Callable[[str], str],
    make_vhost: Callable[[], str],
    run_id: str,
) -> Iterator[Stack]:
    run = f"{run_id}-{int(time.time()) % 100000}"
    processes = registry.processes()
    ports = {p.name: pick_port() for p in processes}
    env = {
        "AMQP_URL": make_vhost(),
        **{s.variable("database_url"): make_database(f"img_{s.name}") for s in registry.SERVICES},
        **{p.port_variable: str(ports[p.name]) for p in processes},
        # Small pools: the machine's PostgreSQL (max_connections 100) is shared with other runs.
        **{s.variable("db_pool_size"): "2" for s in registry.SERVICES},
        "USER_JWKS_URL": f"http://127.0.0.1:{ports['auth_svc']}/auth/.well-known/jwks.json",
        "LOG_FORMAT": "json",
        "NOTIFY_MAILDIR": MAILDIR,  # no NOTIFY_SMTP_URL: mail goes to the maildir volume
    }
    volumes = {name: f"eskit-it-{run}-{name}" for name in VOLUMES}
    containers: dict[str, str] = {}
    seconds = dict(built.seconds)
    try:
        for volume in volumes.values():
            docker("volume", "create", "--label", f"{LABEL}={run}", volume)
        started = time.monotonic()
        # compose's one-shots: db-init, then kong-config writing into its fresh volume.
        init = docker("run", "--rm", *_container_args(run, "db-init", env), built.image,
                      "db", "init", check=False, timeout=180)  # fmt: skip
        assert init.returncode == 0, f"esctl db init exited {init.returncode}:\n{init.stderr}"
        render = docker(
            "run", *_container_args(run, "kong-config", env),
            "-v", f"{volumes['kong-config']}:{VOLUMES['kong-config']}",
            built.image, "gateway", "render", "--out", f"{VOLUMES['kong-config']}/kong.yml",
            check=False, timeout=120,
        )  # fmt: skip
        containers["kong-config"] = f"eskit-it-{run}-kong-config"
        assert render.returncode == 0, f"kong-config exited {render.returncode}:\n{render.stderr}"
        # The file, read from the volume as Kong would mount it (read-only).
        kong_yml = docker(
            "run", "--rm", "--network", "none", "--read-only", "--cap-drop", "ALL",
            "-v", f"{volumes['kong-config']}:/kong:ro", "--entrypoint", "python", built.image,
            "-c", "print(open('/kong/kong.yml').read())",
        ).stdout  # fmt: skip
        seconds["one-shots"] = time.monotonic() - started
        started = time.monotonic()
        for process in processes:
            mounts = (
                ["-v", f"{volumes['notify-maildir']}:{MAILDIR}"] if process.name == NOTIFY else []
            )
            name = f"eskit-it-{run}-{process.name}"
            own = {**env, "HEALTH_PORT": str(ports[process.name])}
            docker("run", "-d", *_container_args(run, process.name, own), *mounts,
                   built.image, *process.command)  # fmt: skip
            containers[process.name] = name
        stack = Stack(run, env, ports, volumes, containers, kong_yml, seconds)
        _wait_ready(stack, [p.name for p in processes])
        seconds["ready"] = time.monotonic() - started
        yield stack
    finally:
        for name in containers.values():
            docker("rm", "-f", "-v", name, check=False)
        for volume in volumes.values():
            docker("volume", "rm", "-f", volume, check=False)
        print(
            f"\nimage test timings (s): {json.dumps({k: round(v, 1) for k, v in seconds.items()})}"
        )


def _state(container: str) -> dict[str, object]:
    state: dict[str, object] = json.loads(
        docker("inspect", "--format", "{{json .State}}", container).stdout
    )
    return state


def _wait_ready(stack: Stack, names: list[str]) -> None:
    pending = set(names)
    deadline = time.monotonic() + READY_SECONDS
    with httpx.Client(timeout=2.0) as client:
        while pending:
            for name in sorted(pending):
                container = stack.containers[name]
                if not _state(container)["Running"]:
                    pytest.fail(f"{name} exited while starting:\n{_logs(container)}")
                try:
                    if client.get(f"{stack.url(name)}/health/ready").status_code == 200:
                        pending.discard(name)
                except httpx.HTTPError:
                    pass
            if time.monotonic() > deadline:
                logs = "\n".join(f"--- {n}\n{_logs(stack.containers[n])}" for n in sorted(pending))
                pytest.fail(f"not ready after {READY_SECONDS}s: {sorted(pending)}\n{logs}")
            time.sleep(0.5)


def test_every_process_runs_from_the_image_and_becomes_ready(stack: Stack) -> None:
    assert set(stack.ports) == {p.name for p in registry.processes()}
    for name in stack.ports:
        state = _state(stack.containers[name])
        assert state["Running"], name
    # As compose runs them: uid 10001, read-only root, no capabilities, host network only.
    for name in stack.ports:
        config = json.loads(
            docker("inspect", "--format", "{{json .HostConfig}}", stack.containers[name]).stdout
        )
        assert config["ReadonlyRootfs"] and config["CapDrop"] == ["ALL"], name
        assert config["NetworkMode"] == "host", name


def test_kong_config_writes_kong_yml_into_a_fresh_volume(stack: Stack) -> None:
    state = _state(stack.containers["kong-config"])
    assert state["ExitCode"] == 0 and not state["Running"]
    kong = yaml.safe_load(stack.kong_yml)
    assert kong["_format_version"] == "3.0"
    # One jwt credential per signing key that auth_svc publishes (db init made the first).
    jwks = httpx.get(f"{stack.url('auth_svc')}/auth/.well-known/jwks.json", timeout=5).json()
    kids = sorted(key["kid"] for key in jwks["keys"])
    (owner,) = [c for c in kong["consumers"] if "jwt_secrets" in c]
    assert sorted(s["key"] for s in owner["jwt_secrets"]) == kids
    assert kids


def test_the_images_own_healthcheck_probes_each_processs_port(stack: Stack) -> None:
    """HEALTH_PORT per process: Docker's HEALTHCHECK (every 10 s) turns each one healthy."""
    pending = set(stack.ports)
    deadline = time.monotonic() + 60
    health: dict[str, object] = {}
    while pending and time.monotonic() < deadline:
        for name in sorted(pending):
            health[name] = _state(stack.containers[name]).get("Health")
            if isinstance(health[name], dict) and health[name]["Status"] == "healthy":  # type: ignore[index]
                pending.discard(name)
        time.sleep(1)
    assert not pending, {name: health[name] for name in pending}


def test_notify_writes_a_welcome_mail_into_its_maildir_volume(stack: Stack) -> None:
    """A sign-up at auth_svc reaches notify_svc (relay, broker, consumer), which writes on the
    maildir volume as uid 10001 on a read-only root."""
    email = f"image-{stack.run}@example.com"
    response = httpx.post(
        f"{stack.url('auth_svc')}/auth/register",
        json={"email": email, "password": "correct horse battery"},
        timeout=10,
    )
    assert response.status_code == 201, response.text
    count = (
        "import os; d = os.environ['NOTIFY_MAILDIR']; "
        "print(sum(len(os.listdir(os.path.join(d, s))) for s in ('new', 'cur') "
        "if os.path.isdir(os.path.join(d, s))))"
    )
    deadline = time.monotonic() + 60
    mails = 0
    while time.monotonic() < deadline:
        out = docker("exec", stack.containers[NOTIFY], "python", "-c", count).stdout
        mails = int(out.strip() or 0)
        if mails:
            break
        time.sleep(1)
    assert mails >= 1, _logs(stack.containers[NOTIFY])
    listing = docker("exec", stack.containers[NOTIFY], "ls", "-ln", f"{MAILDIR}/new").stdout
    assert re.search(r"\s10001\s+10001\s", listing), listing
