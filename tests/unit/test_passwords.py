"""argon2 hashes take turns: at most `argon2_concurrency` at once, by default the usable CPUs."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from auth_svc.passwords import Passwords, usable_cpus
from auth_svc.settings import AuthSettings


def cheap(**fields: object) -> AuthSettings:
    return AuthSettings(argon2_time_cost=1, argon2_memory_kib=8, **fields)  # type: ignore[arg-type]


class CountingHasher:
    """Stands in for argon2's PasswordHasher and records how many calls overlap."""

    def __init__(self) -> None:
        self.running = 0
        self.most = 0
        self._lock = threading.Lock()

    def _call(self) -> None:
        with self._lock:
            self.running += 1
            self.most = max(self.most, self.running)
        time.sleep(0.02)
        with self._lock:
            self.running -= 1

    def verify(self, password_hash: str, password: str) -> bool:
        self._call()
        return True

    def hash(self, password: str) -> str:
        self._call()
        return "$argon2id$fake"

    def check_needs_rehash(self, password_hash: str) -> bool:
        return False


@pytest.mark.parametrize("concurrency", [1, 2])
def test_no_more_hashes_run_at_once_than_the_setting_allows(concurrency: int) -> None:
    passwords = Passwords(cheap(argon2_concurrency=concurrency))
    counting = CountingHasher()
    passwords._hasher = counting  # type: ignore[assignment]
    work = [
        threading.Thread(target=passwords.verify, args=("$argon2id$x", "pw")) for _ in range(6)
    ] + [threading.Thread(target=passwords.hash, args=("pw",)) for _ in range(2)]
    for thread in work:
        thread.start()
    for thread in work:
        thread.join()
    assert counting.most == concurrency


def test_the_default_is_the_usable_cpus_capped_by_a_cgroup_quota(tmp_path: Path) -> None:
    cpu_max = tmp_path / "cpu.max"
    affinity = usable_cpus(tmp_path / "absent")
    assert affinity >= 1
    cpu_max.write_text("max 100000\n")
    assert usable_cpus(cpu_max) == affinity
    cpu_max.write_text("50000 100000\n")  # half a CPU: still one hash at a time
    assert usable_cpus(cpu_max) == 1
    cpu_max.write_text(f"{(affinity + 4) * 100000} 100000\n")  # a quota above the affinity
    assert usable_cpus(cpu_max) == affinity
    cpu_max.write_text("garbage\n")
    assert usable_cpus(cpu_max) == affinity
