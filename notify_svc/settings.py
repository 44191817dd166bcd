"""notify_svc's configuration: one typed object read from `NOTIFY_*` variables."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from servicekit.settings import DispatchSettings, consumer_health_port, no_http_port


class NotifySettings(DispatchSettings):
    """Every field is read from `NOTIFY_<FIELD>` (e.g. `NOTIFY_SMTP_URL`)."""

    model_config = SettingsConfigDict(env_prefix="NOTIFY_", extra="ignore", populate_by_name=True)

    port: int = no_http_port(8103, "notify_svc", health="NOTIFY_CONSUMER_PORT")
    database_url: str = Field(
        default="postgresql://postgres@127.0.0.1:5432/notify",
        description="PostgreSQL URL of notify_svc's own database (recipients and mail intents).",
    )
    db_pool_size: int = Field(default=4, ge=1, description="Connections of the mail dispatcher.")
    consumer_port: int = consumer_health_port(8131)
    smtp_url: str | None = Field(
        default=None,
        description="smtp://[user:password@]host[:port] (STARTTLS when offered) or smtps:// "
        "(implicit TLS). Unset: mail is written to NOTIFY_MAILDIR.",
    )
    maildir: str = Field(
        default="var/maildir", description="Maildir that receives mail when no SMTP_URL is set."
    )
    mail_from: str = Field(
        default="eskit <no-reply@eskit.local>",
        description="From: address; its domain also ends every Message-ID.",
    )
    smtp_timeout_seconds: float = Field(
        default=15.0, gt=0, description="Bound on one SMTP conversation (connect to QUIT)."
    )
    send_concurrency: int = Field(default=4, ge=1, description="Mails sent at the same time.")
    retry_initial_seconds: float = DispatchSettings.first_retry_delay(10.0)
    retry_window_seconds: float = DispatchSettings.retry_window(
        "After this long a mail still unsent is marked failed."
    )
    breaker_failures: int = DispatchSettings.breaker_threshold(
        "Consecutive SMTP failures that pause sending."
    )
    breaker_cooldown_seconds: float = DispatchSettings.breaker_cooldown(
        "Pause before one mail probes a failing SMTP server again."
    )
    dispatch_poll_seconds: float = DispatchSettings.dispatch_poll(
        "Longest wait for new intents when no NOTIFY arrives."
    )
    link_opening_keys: str = Field(
        default="",
        description="notify_svc's X25519 private keys (base64url, comma-separated, newest "
        "first; `python -m servicekit.sealing` makes a pair) that open the verification and "
        "reset links auth_svc seals. Keep a retired key until its last link expired.",
    )
    lease_seconds: float = DispatchSettings.claim_lease(
        "How long a claimed mail is reserved; after a crash it is sent again then."
    )
