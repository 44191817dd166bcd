"""The README stays true: every setting a service reads is documented there."""

from __future__ import annotations

from pathlib import Path

from pydantic_settings import BaseSettings

from auth_svc.settings import AuthSettings
from reporting_svc.settings import ReportingSettings
from user_svc.settings import UserSettings

README = (Path(__file__).parents[2] / "README.md").read_text()


def variable_names(cls: type[BaseSettings]) -> list[str]:
    prefix = str(cls.model_config.get("env_prefix", ""))
    names = []
    for name, field in cls.model_fields.items():
        alias = field.validation_alias
        names.append(str(alias.choices[0]) if alias is not None else f"{prefix}{name}".upper())  # type: ignore[union-attr]
    return names


def test_every_environment_variable_is_documented_in_the_readme() -> None:
    missing = [
        name
        for cls in (AuthSettings, UserSettings, ReportingSettings)
        for name in variable_names(cls)
        if f"`{name}`" not in README
    ]
    assert missing == []


def test_the_readme_shows_the_two_commands() -> None:
    assert "make up" in README
    assert "make test" in README
