"""The local gateway's settings, read from `GATEWAY_*` environment variables."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_KONG_CONFIG = REPO_ROOT / "compose" / "kong.yml"


class GatewaySettings(BaseSettings):
    """The local gateway of `esctl up`, read from `GATEWAY_*` environment variables."""

    model_config = SettingsConfigDict(env_prefix="GATEWAY_", extra="ignore")

    host: str = Field(default="127.0.0.1", description="Interface the local gateway binds to.")
    port: int = Field(default=8000, description="Port of the local gateway (Kong's proxy port).")
    status_port: int = Field(
        default=8100,
        description="Port of the gateway's status listener: /health/ready, /metrics.",
    )
    config: Path = Field(
        default=DEFAULT_KONG_CONFIG, description="Kong declarative file the gateway follows."
    )
    work_dir: Path = Field(
        default=REPO_ROOT / "var" / "gateway",
        description="Where the rendered HAProxy configuration and public keys are written.",
    )
    haproxy: str = Field(default="haproxy", description="The HAProxy executable.")
