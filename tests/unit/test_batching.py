"""The coalescing window: none on a quiet host, the configured one while tasks wait for a CPU
most of the time (the kernel's CPU pressure, from a file written here)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from servicekit.batching import SAMPLE_SECONDS, Coalescing, cpu_pressure_file, gather_for


class Host:
    """A cpu.pressure file and a clock the test moves."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.now = 100.0
        self.stalled_us = 123_456
        self._write()

    def _write(self) -> None:
        self.path.write_text(
            f"some avg10=1.00 avg60=2.00 avg300=3.00 total={self.stalled_us}\n"
            "full avg10=0.00 avg60=0.00 avg300=0.00 total=0\n"
        )

    def second(self, *, stalled_ms: float) -> None:
        """One sample's time, in which some task waited `stalled_ms` for a CPU."""
        self.now += SAMPLE_SECONDS
        self.stalled_us += int(stalled_ms * 1000 * SAMPLE_SECONDS)
        self._write()

    def clock(self) -> float:
        return self.now


@pytest.fixture
def host(tmp_path: Path) -> Host:
    return Host(tmp_path / "cpu.pressure")


def coalescing(host: Host, seconds: float = 0.2) -> Coalescing:
    return Coalescing(seconds, "test", pressure=host.path, clock=host.clock)


def test_on_a_quiet_host_each_event_goes_at_once(host: Host) -> None:
    window = coalescing(host)
    assert window.seconds() == 0.0
    for _ in range(5):
        host.second(stalled_ms=200)
        assert window.seconds() == 0.0


def test_a_saturated_host_lengthens_it_and_a_calm_one_shortens_it_again(host: Host) -> None:
    window = coalescing(host)
    host.second(stalled_ms=800)  # as while logins saturate the cores
    assert window.seconds() == 0.2
    host.second(stalled_ms=550)  # between the thresholds: it stays busy
    assert window.seconds() == 0.2
    host.second(stalled_ms=300)  # quiet again
    assert window.seconds() == 0.0


def test_the_kernel_counters_are_read_at_most_once_per_sample(host: Host) -> None:
    window = coalescing(host)
    host.second(stalled_ms=900)
    host.now -= SAMPLE_SECONDS / 2
    assert window.seconds() == 0.0  # too soon to sample
    host.now += SAMPLE_SECONDS / 2
    assert window.seconds() == 0.2


def test_an_idle_host_is_not_busy(host: Host) -> None:
    window = coalescing(host)
    host.second(stalled_ms=0)
    assert window.seconds() == 0.0


def test_without_pressure_information_there_is_no_window(tmp_path: Path) -> None:
    window = Coalescing(0.2, "test", pressure=tmp_path / "missing", clock=lambda: 1e9)
    assert window.seconds() == 0.0
    assert cpu_pressure_file([tmp_path / "missing"]) is None


def test_zero_means_no_coalescing_even_on_a_saturated_host(host: Host) -> None:
    window = coalescing(host, seconds=0.0)
    host.second(stalled_ms=1000)
    assert window.seconds() == 0.0


@pytest.mark.skipif(cpu_pressure_file() is None, reason="this kernel keeps no CPU pressure")
def test_this_kernel_cpu_pressure_reads() -> None:
    window = Coalescing(0.2, "test")
    assert window._read() is not None
    assert window.seconds() in (0.0, 0.2)


async def test_gather_for_takes_what_arrives_within_the_window_and_loses_nothing() -> None:
    inbox: asyncio.Queue[int] = asyncio.Queue()
    inbox.put_nowait(0)
    loop = asyncio.get_running_loop()
    for i in range(1, 6):  # one every 20 ms: 1-4 within the 0.09 s window, 5 after it
        loop.call_later(0.02 * i - 0.01, inbox.put_nowait, i)
    batch: list[int] = []
    started = loop.time()
    await gather_for(batch, inbox, limit=100, seconds=0.09)
    assert batch == [0, 1, 2, 3, 4]
    assert 0.08 <= loop.time() - started < 0.5
    await asyncio.sleep(0.05)
    assert inbox.get_nowait() == 5  # arrived after the window: still queued, not lost


async def test_gather_for_stops_at_the_limit_at_once() -> None:
    inbox: asyncio.Queue[int] = asyncio.Queue()
    for i in range(10):
        inbox.put_nowait(i)
    batch: list[int] = []
    loop = asyncio.get_running_loop()
    started = loop.time()
    await gather_for(batch, inbox, limit=4, seconds=5)
    assert batch == [0, 1, 2, 3] and loop.time() - started < 0.5
    assert inbox.qsize() == 6


async def test_gather_for_with_no_time_left_takes_only_what_is_queued() -> None:
    inbox: asyncio.Queue[int] = asyncio.Queue()
    inbox.put_nowait(1)
    batch: list[int] = []
    await gather_for(batch, inbox, limit=10, seconds=0)
    assert batch == [1]
