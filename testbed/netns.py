"""A network namespace joined to the host by a veth pair, to make SILENT partitions.

A userspace proxy cannot drop a connection silently: its kernel keeps ACKing keepalives,
so each end still believes the other is there. A process inside a namespace talks to the
host through its own veth pair instead; `blackhole()` takes the host's end of the pair
down, and every packet, both ways, is then dropped without a word (no RST, no ICMP): TCP
keepalives, user timeouts and AMQP heartbeats are all that can notice. `heal()` brings it
back up.

While the link is down the kernel also removes the host's connected route to the
namespace's /30, and the host would send what it still has for the namespace to its
default gateway. A blackhole route for the /30 (with a high metric, so it only matters
while the connected route is gone) keeps those packets on this machine: they are dropped
here, as a dead route would.

Needs root and `ip netns` (iproute2); `netns_unavailable()` says why not, for a skip.
Every name (namespace, veth ends) is unique per run and carries the creating process's pid,
so `sweep_stale()` can remove what a killed run left behind without touching a concurrent
run's namespaces.
"""

from __future__ import annotations

import contextlib
import functools
import ipaddress
import os
import random
import re
import shutil
import subprocess
import time
import uuid
from collections.abc import Mapping, Sequence
from typing import IO, Any

PREFIX = "eskit"
BLACKHOLE_METRIC = 4242
_NAME = re.compile(rf"^{PREFIX}-(\d+)-([0-9a-f]{{6}})$")


def ip(*args: str, check: bool = True, timeout: float = 15) -> subprocess.CompletedProcess[str]:
    """`ip ARGS` (iproute2); RuntimeError with its message if it fails and `check`."""
    result = subprocess.run(
        ["ip", *args], capture_output=True, text=True, timeout=timeout, check=False
    )
    if check and result.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {result.stderr.strip() or result.stdout}")
    return result


@functools.cache
def netns_unavailable() -> str | None:
    """None if network namespaces can be made here; otherwise why not (a skip reason)."""
    if shutil.which("ip") is None:
        return "needs iproute2 (`ip`) for network namespaces"
    if os.geteuid() != 0:
        return "needs root to create network namespaces and veth pairs"
    probe = f"{PREFIX}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    try:
        added = ip("netns", "add", probe, check=False)
        if added.returncode != 0:
            return f"`ip netns add` failed: {added.stderr.strip()}"
        host, peer = _veth_names(probe)
        veth = ip("link", "add", host, "type", "veth", "peer", "name", peer, check=False)
        if veth.returncode != 0:
            return f"cannot create a veth pair: {veth.stderr.strip()}"
        ip("link", "del", host, check=False)
    except (OSError, subprocess.SubprocessError) as exc:
        return f"network namespaces unavailable: {exc}"
    finally:
        ip("netns", "del", probe, check=False)
    return None


def _veth_names(name: str) -> tuple[str, str]:
    """Host and namespace ends of the pair (interface names: 15 characters at most)."""
    match = _NAME.match(name)
    tag = match.group(2) if match else name[-6:]
    pid = (match.group(1) if match else "0")[-6:]
    return f"ekh{pid}{tag}"[:15], f"ekn{pid}{tag}"[:15]


def _networks_in_use() -> list[ipaddress.IPv4Network]:
    """Every IPv4 network the host has an address or a route in."""
    found = []
    for line in ip("-4", "-o", "addr", "show").stdout.splitlines():
        if m := re.search(r"inet (\S+)", line):
            found.append(ipaddress.IPv4Interface(m.group(1)).network)
    for line in ip("-4", "route", "show", "table", "all").stdout.splitlines():
        words = line.split()
        for word in words[:2]:
            with contextlib.suppress(ValueError):
                if word not in ("default", "local", "broadcast", "unreachable", "blackhole"):
                    found.append(ipaddress.IPv4Network(word, strict=False))
                    break
    return found


def _free_subnet() -> ipaddress.IPv4Network:
    """A /30 in 10.200.0.0-10.250.255.255 that nothing on the host uses."""
    used = _networks_in_use()
    for _ in range(500):
        base = ipaddress.IPv4Address(
            f"10.{random.randint(200, 250)}.{random.randint(0, 255)}.{4 * random.randint(0, 63)}"
        )
        candidate = ipaddress.IPv4Network(f"{base}/30")
        if not any(candidate.overlaps(n) for n in used):
            return candidate
    raise RuntimeError("no free /30 in 10.200-250.x.x")


class NetworkNamespace:
    """A namespace with one veth pair to the host. Use as a context manager:

    with NetworkNamespace() as ns:
        proc = ns.popen([...], env)   # runs inside, reaches the host at ns.host_ip
        ns.blackhole(); ...; ns.heal()

    Teardown kills what `popen` started, deletes the namespace (which destroys the veth
    pair) and the blackhole route, whatever happened.
    """

    def __init__(self) -> None:
        self.name = f"{PREFIX}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.host_if, self.ns_if = _veth_names(self.name)
        self.subnet: ipaddress.IPv4Network | None = None
        self.blackholed = False
        self._procs: list[subprocess.Popen[bytes]] = []

    @property
    def host_ip(self) -> str:
        assert self.subnet is not None, "the namespace is not created yet"
        return str(self.subnet.network_address + 1)

    @property
    def ns_ip(self) -> str:
        assert self.subnet is not None, "the namespace is not created yet"
        return str(self.subnet.network_address + 2)

    def __enter__(self) -> NetworkNamespace:
        self.create()
        return self

    def __exit__(self, *exc: object) -> None:
        self.destroy()

    def create(self) -> None:
        sweep_stale()
        self.subnet = _free_subnet()
        prefix = f"/{self.subnet.prefixlen}"
        try:
            ip("netns", "add", self.name)
            ip("link", "add", self.host_if, "type", "veth", "peer", "name", self.ns_if)
            ip("link", "set", self.ns_if, "netns", self.name)
            ip("addr", "add", self.host_ip + prefix, "dev", self.host_if)
            ip("link", "set", self.host_if, "up")
            self.exec_ip("addr", "add", self.ns_ip + prefix, "dev", self.ns_if)
            self.exec_ip("link", "set", self.ns_if, "up")
            self.exec_ip("link", "set", "lo", "up")
            self._wait_link(up=True)
        except BaseException:
            self.destroy()
            raise

    def exec_ip(self, *args: str) -> str:
        """`ip ARGS` run inside the namespace."""
        return ip("netns", "exec", self.name, "ip", *args).stdout

    def popen(
        self,
        argv: Sequence[str],
        env: Mapping[str, str] | None = None,
        *,
        stdout: IO[Any] | int | None = None,
        stderr: IO[Any] | int | None = None,
        **kwargs: Any,
    ) -> subprocess.Popen[bytes]:
        """Start `argv` inside the namespace (`ip netns exec` execs it: the pid is its own).

        It reaches the host's servers at `host_ip` only: the namespace has no other route.
        The process is killed at teardown if still running.
        """
        proc = subprocess.Popen(
            ["ip", "netns", "exec", self.name, *argv],
            env=dict(env) if env is not None else None,
            stdout=stdout,
            stderr=stderr,
            **kwargs,
        )
        self._procs.append(proc)
        return proc

    def blackhole(self) -> None:
        """Drop every packet between the host and the namespace, silently, both ways."""
        assert self.subnet is not None
        # First the route that keeps the host's packets for the namespace on this machine
        # (unused while the connected route exists), then the link.
        ip("route", "replace", "blackhole", str(self.subnet), "metric", str(BLACKHOLE_METRIC))
        self.blackholed = True
        ip("link", "set", self.host_if, "down")
        self._wait_link(up=False)

    def heal(self) -> None:
        """The link back up; connections that outlived the blackhole carry on."""
        assert self.subnet is not None
        ip("link", "set", self.host_if, "up")
        self._wait_link(up=True)
        self._drop_blackhole_route()
        self.blackholed = False

    def _drop_blackhole_route(self) -> None:
        if self.subnet is not None:
            ip(
                "route",
                "del",
                "blackhole",
                str(self.subnet),
                "metric",
                str(BLACKHOLE_METRIC),
                check=False,
            )

    def _wait_link(self, *, up: bool, timeout: float = 10) -> None:
        """Until the host has (or no longer has) its connected route to the namespace."""
        deadline = time.monotonic() + timeout
        while True:
            routes = ip("-4", "route", "show", "dev", self.host_if, check=False).stdout
            has_route = str(self.subnet) in routes and "linkdown" not in routes
            if has_route == up:
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.host_if} still {'down' if up else 'up'}")
            time.sleep(0.05)

    def destroy(self) -> None:
        for proc in self._procs:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=10)
        self._procs.clear()
        self._drop_blackhole_route()
        ip("link", "del", self.host_if, check=False)
        ip("netns", "del", self.name, check=False)
        self.blackholed = False


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def sweep_stale() -> list[str]:
    """Remove the namespaces (with their veth pairs and blackhole routes) of runs whose
    process is gone: a killed test run cannot tear down. Returns their names."""
    removed = []
    listing = ip("netns", "list", check=False).stdout
    for line in listing.splitlines():
        name = line.split()[0] if line.split() else ""
        match = _NAME.match(name)
        if not match or _alive(int(match.group(1))):
            continue
        inside = ip("netns", "exec", name, "ip", "-4", "-o", "addr", "show", check=False)
        for m in re.finditer(r"inet (\S+)", inside.stdout):
            network = ipaddress.IPv4Interface(m.group(1)).network
            if network.prefixlen == 30:
                ip(
                    "route",
                    "del",
                    "blackhole",
                    str(network),
                    "metric",
                    str(BLACKHOLE_METRIC),
                    check=False,
                )
        host_if, _ = _veth_names(name)
        ip("link", "del", host_if, check=False)
        ip("netns", "del", name, check=False)
        removed.append(name)
    return removed
