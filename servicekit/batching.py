"""Filling a batch from an inbox of deliveries: what is queued, and what arrives soon after."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

from prometheus_client import Gauge

T = TypeVar("T")
log = logging.getLogger(__name__)

# While the host's CPUs are saturated, a consumer takes a batch and a relay publishes at most
# once per this many seconds under steady traffic: what arrives meanwhile shares the
# transaction or the round of confirms. On a quiet host each goes at once.
COALESCE_SECONDS = 0.2
# The share of time some task on the host waited for a CPU (the kernel's pressure stall
# information) that makes the host busy, and the share under which it is quiet again (in
# between, it stays as it was). Measured on 2 cores: 0.76-0.84 while logins saturate both
# with argon2; 0.2-0.48 (one second at 0.63) with 100 registrations/s and cheap hashing,
# the host about 30% idle.
BUSY_STALL_SHARE = 0.65
QUIET_STALL_SHARE = 0.45
SAMPLE_SECONDS = 1.0
# CPU pressure: this container's cgroup (cgroup v2) if it has its own, else the host's.
PRESSURE = (Path("/sys/fs/cgroup/cpu.pressure"), Path("/proc/pressure/cpu"))

COALESCE_WINDOW = Gauge(
    "batch_coalesce_seconds",
    "How long a batch waits for more events under steady traffic now: 0 on a quiet host, "
    "the configured window while its CPUs are saturated",
    ["worker"],
)


def cpu_pressure_file(candidates: Sequence[Path] = PRESSURE) -> Path | None:
    return next((p for p in candidates if p.is_file()), None)


class Coalescing:
    """How long a batch may wait for company under steady traffic: nothing on a quiet host,
    up to `seconds` while it is CPU-bound.

    Each batch costs a transaction or a round of confirms, whatever it carries. On a quiet
    host that cost is spare CPU, and an event goes the moment it arrives. On a saturated one
    it is taken from the requests (a login's argon2 shares the cores with its event's relay
    and consumers): batches of what arrives within `seconds` cost a fraction of it, when
    every stage's latency is up anyway. The host is saturated when some task waited for a
    CPU over BUSY_STALL_SHARE of the last SAMPLE_SECONDS (the kernel's CPU pressure, of the
    container's cgroup where it has one). Without pressure information (not Linux, or a
    kernel without PSI), never.
    """

    def __init__(
        self,
        seconds: float,
        worker: str,
        *,
        pressure: Path | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.busy_seconds = seconds
        self.worker = worker
        self.busy = False
        self._pressure = pressure if pressure is not None else cpu_pressure_file()
        self._clock = clock
        self._sampled_at = clock()
        self._last = self._read() if seconds > 0 else None
        COALESCE_WINDOW.labels(worker).set(0)

    def seconds(self) -> float:
        """The window now (the pressure is read at most once per SAMPLE_SECONDS)."""
        now = self._clock()
        elapsed = now - self._sampled_at
        if self._last is not None and elapsed >= SAMPLE_SECONDS:
            current = self._read()
            if current is not None:
                share = (current - self._last) / 1e6 / elapsed
                busy = share >= BUSY_STALL_SHARE or (self.busy and share >= QUIET_STALL_SHARE)
                if busy != self.busy:
                    self.busy = busy
                    COALESCE_WINDOW.labels(self.worker).set(self._window())
                    log.info(
                        "host CPU-bound: batches wait for company"
                        if busy
                        else "host quiet again: each event goes at once",
                        extra={"worker": self.worker, "window_seconds": self._window()},
                    )
            self._last, self._sampled_at = current, now
        return self._window()

    def _window(self) -> float:
        return self.busy_seconds if self.busy else 0.0

    def _read(self) -> int | None:
        """Microseconds some task has waited for a CPU, in all (the `some` line's total)."""
        if self._pressure is None:
            return None
        try:
            some = self._pressure.read_text().splitlines()[0]
            return int(some.rsplit("total=", 1)[1])
        except (OSError, IndexError, ValueError):
            return None


def drain(batch: list[T], inbox: asyncio.Queue[T], limit: int) -> None:
    """Move what `inbox` holds into `batch`, until `batch` has `limit` items."""
    while len(batch) < limit and not inbox.empty():
        batch.append(inbox.get_nowait())


async def fill(batch: list[T], inbox: asyncio.Queue[T], *, limit: int, linger: float) -> None:
    """`drain`, and keep draining what arrives within `linger` seconds, up to `limit`.

    For consumers of a backlog: applying a batch is quicker than the broker delivers its
    messages one by one, so taking only what is queued made batches of about ten events (a
    transaction and its round trips for every ten). A few milliseconds fill them.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + linger
    drain(batch, inbox, limit)
    while len(batch) < limit and loop.time() < deadline:
        await asyncio.sleep(0.002)
        drain(batch, inbox, limit)


async def gather_for(
    batch: list[T], inbox: asyncio.Queue[T], *, limit: int, seconds: float
) -> None:
    """`drain`, and add what arrives within `seconds`, up to `limit`, waking once per arrival.

    For the coalescing window under steady traffic, where events come one by one: polling,
    as `fill` does for a backlog, would wake the consumer a hundred times per 0.2 s window
    (about half a millisecond of CPU per event at 50 events/s) for the ten events it waits for.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    drain(batch, inbox, limit)
    while len(batch) < limit:
        try:
            async with asyncio.timeout_at(deadline):
                item = await inbox.get()
        except TimeoutError:
            return
        batch.append(item)
        drain(batch, inbox, limit)
