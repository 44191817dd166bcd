"""esctl as an operator runs it: its command line, and one command with its output captured."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Mapping

ESCTL = [sys.executable, "-m", "esctl.main"]


def esctl(
    *args: str, env: Mapping[str, str], timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    """`esctl ARGS`, `env` its whole environment; its output as text, whatever its exit code."""
    return subprocess.run(
        [*ESCTL, *args],
        env=dict(env),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
