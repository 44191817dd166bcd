"""A Docker engine for the image test: the one running, or Debian's dockerd started here.

Started as `dockerd --bridge=none --iptables=false`: no bridge, no NAT, no firewall rules;
the containers use the host's network only. Stopped again (by its pid) when the test is done.
`unavailable()` says why no engine can run, for the test's skip message.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

DATA_ROOT = Path("/var/lib/docker")
# One image test at a time on this machine: it may start and stop the engine.
LOCK = Path("/var/tmp/eskit-image-test.lock")
START_SECONDS = 60


class NoEngine(Exception):
    """No Docker engine can run here; the message says why."""


def docker(
    *args: str, timeout: float = 120, check: bool = True
) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        ["docker", *args], capture_output=True, text=True, timeout=timeout, check=False
    )
    if check and result.returncode != 0:
        raise AssertionError(
            f"docker {' '.join(args)} exited {result.returncode}:\n{result.stderr}"
        )
    return result


def _answers() -> bool:
    try:
        return (
            docker("version", "--format", "{{.Server.Version}}", timeout=20, check=False).returncode
            == 0
        )
    except subprocess.TimeoutExpired:
        return False


@contextlib.contextmanager
def engine(log: Path) -> Iterator[None]:
    """A running engine for the block; raises NoEngine (why) if none can run."""
    if shutil.which("docker") is None:
        raise NoEngine("no docker client (Debian's docker.io provides it)")
    LOCK.parent.mkdir(parents=True, exist_ok=True)
    with LOCK.open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if _answers():
            yield
            return
        if os.environ.get("DOCKER_HOST"):
            raise NoEngine(f"DOCKER_HOST={os.environ['DOCKER_HOST']} does not answer")
        dockerd = shutil.which("dockerd") or shutil.which("dockerd", path="/usr/sbin:/usr/bin")
        if dockerd is None:
            raise NoEngine("no dockerd binary (apt-get install docker.io)")
        if os.geteuid() != 0:
            raise NoEngine("dockerd needs root here, and the tests do not run as root")
        DATA_ROOT.mkdir(parents=True, exist_ok=True)
        with log.open("ab") as out:
            daemon = subprocess.Popen(
                [
                    dockerd,
                    "--bridge=none",
                    "--iptables=false",
                    "--ip6tables=false",
                    f"--data-root={DATA_ROOT}",
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        try:
            deadline = time.monotonic() + START_SECONDS
            while not _answers():
                if daemon.poll() is not None or time.monotonic() > deadline:
                    tail = "\n".join(log.read_text(errors="replace").splitlines()[-8:])
                    state = (
                        f"exited {daemon.returncode}"
                        if daemon.poll() is not None
                        else f"not answering after {START_SECONDS}s"
                    )
                    raise NoEngine(f"dockerd could not start ({state}):\n{tail}")
                time.sleep(0.5)
            yield
        finally:
            if daemon.poll() is None:
                daemon.send_signal(signal.SIGTERM)
                try:
                    daemon.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    daemon.kill()
                    daemon.wait()
