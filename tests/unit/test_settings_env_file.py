"""Every service reads a `.env` file in its working directory; the environment wins."""

from __future__ import annotations

from pathlib import Path

import pytest

from auth_svc.settings import AuthSettings
from reporting_svc.settings import ReportingSettings

VARIABLES = ("AMQP_HEARTBEAT_SECONDS", "AUTH_LOCKOUT_THRESHOLD", "REPORTING_CONSUMER_PREFETCH")


@pytest.fixture
def env_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    for name in VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)
    path = tmp_path / ".env"
    path.write_text(
        "# written by an operator\n"
        "AMQP_HEARTBEAT_SECONDS=7\n"
        "AUTH_LOCKOUT_THRESHOLD=9\n"
        "REPORTING_CONSUMER_PREFETCH=42\n"
        "SOMEONE_ELSES_VARIABLE=ignored\n"
    )
    return path


def test_a_value_in_the_env_file_is_read(env_file: Path) -> None:
    auth = AuthSettings()
    assert auth.lockout_threshold == 9
    assert "heartbeat=7" in auth.amqp_url
    assert ReportingSettings().consumer_prefetch == 42


def test_an_environment_variable_wins_over_the_env_file(
    env_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AUTH_LOCKOUT_THRESHOLD", "3")
    monkeypatch.setenv("AMQP_HEARTBEAT_SECONDS", "11")
    auth = AuthSettings()
    assert auth.lockout_threshold == 3
    assert "heartbeat=11" in auth.amqp_url
    assert ReportingSettings().consumer_prefetch == 42  # still from the file


def test_without_an_env_file_the_defaults_hold(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)
    assert (
        AuthSettings().lockout_threshold == AuthSettings.model_fields["lockout_threshold"].default
    )
