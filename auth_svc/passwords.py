"""Password hashing with argon2id; parameters come from settings (cheap in tests)."""

from __future__ import annotations

import math
import os
import secrets
import threading
from dataclasses import dataclass
from pathlib import Path

from argon2 import PasswordHasher, Type
from argon2.exceptions import InvalidHashError, VerificationError

from auth_svc.settings import AuthSettings

CGROUP_CPU_MAX = Path("/sys/fs/cgroup/cpu.max")


def usable_cpus(cpu_max: Path = CGROUP_CPU_MAX) -> int:
    """The CPUs this process may run on: its affinity, capped by a cgroup v2 CPU quota."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    cpus = cpus or 1
    try:
        quota, period = cpu_max.read_text().split()[:2]
        if quota != "max":
            cpus = min(cpus, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return cpus


@dataclass(frozen=True)
class PasswordCheck:
    matches: bool
    needs_rehash: bool = False


class Passwords:
    """Hashes and verifies passwords. Verifying for an unknown account costs the same as a
    wrong password (a dummy hash is verified), so timing does not reveal which e-mails exist.

    At most `argon2_concurrency` hashes run at once (default: the usable CPUs); the others
    wait their turn. Each hash works through 19 MiB: more hashes than CPUs are time-sliced,
    and each slice finds its memory evicted from the caches by the others. Measured on
    2 cores: 4 threads verify 101/s at 19.7 ms of CPU each, 4 threads taking turns 2 at a
    time 105/s at 19.0 ms (8 threads: 87/s at 22.9 ms). Under a login flood the requests
    queue instead of all slowing down together.
    """

    def __init__(self, settings: AuthSettings) -> None:
        self._turns = threading.BoundedSemaphore(settings.argon2_concurrency or usable_cpus())
        self._hasher = PasswordHasher(
            time_cost=settings.argon2_time_cost,
            memory_cost=settings.argon2_memory_kib,
            parallelism=settings.argon2_parallelism,
            type=Type.ID,
        )
        self._dummy_hash = self._hasher.hash(secrets.token_urlsafe(16))

    def hash(self, password: str) -> str:
        with self._turns:
            return self._hasher.hash(password)

    def verify(self, password_hash: str | None, password: str) -> PasswordCheck:
        """Whether `password` matches; an erased hash (None) never does, in the same time."""
        if password_hash is None:
            self.verify_nothing(password)
            return PasswordCheck(matches=False)
        try:
            with self._turns:
                self._hasher.verify(password_hash, password)
        except (VerificationError, InvalidHashError):
            return PasswordCheck(matches=False)
        return PasswordCheck(
            matches=True, needs_rehash=self._hasher.check_needs_rehash(password_hash)
        )

    def verify_nothing(self, password: str) -> None:
        """Spend the time of a verification for an e-mail that has no account."""
        self.verify(self._dummy_hash, password)
