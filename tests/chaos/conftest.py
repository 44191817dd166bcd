"""Every chaos case is slow, and needs the servers' binaries for private instances."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from testbed.servers import RABBITMQ_BIN

HERE = Path(__file__).parent
MISSING = not (RABBITMQ_BIN / "rabbitmq-server").exists() or shutil.which("runuser") is None


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if HERE in Path(str(item.path)).parents:
            item.add_marker(pytest.mark.slow)
            if MISSING:
                item.add_marker(
                    pytest.mark.skip(
                        reason="needs RabbitMQ's and PostgreSQL's server binaries for private "
                        "instances"
                    )
                )
