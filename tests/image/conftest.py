"""The `image` marker: the tests that build and run the Docker image (`pytest -m image`)."""

from __future__ import annotations

import pytest


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "image: builds the Docker image and runs it (tests/image)")
