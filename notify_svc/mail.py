"""Mails: rendering the templates, and the two ways out (SMTP, or a local maildir)."""

from __future__ import annotations

import asyncio
import mailbox
from datetime import datetime
from email.headerregistry import Address
from email.message import EmailMessage
from email.utils import format_datetime, parseaddr
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import unquote, urlsplit
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import aiosmtplib
from jinja2 import Environment, PackageLoader, StrictUndefined, TemplateNotFound, select_autoescape

from notify_svc.intents import Intent
from servicekit.sealing import Opener, SealingError

LANGUAGES = ("en", "fr")
DATE_FORMATS = {"en": "%d %B %Y at %H:%M %Z", "fr": "%d/%m/%Y à %H:%M %Z"}

templates = Environment(
    loader=PackageLoader("notify_svc", "templates"),
    autoescape=select_autoescape(enabled_extensions=("html.j2",), default=False),
    undefined=StrictUndefined,
    keep_trailing_newline=True,
)


class PermanentMailError(Exception):
    """The mail can never be sent as it is (refused recipient, no address): do not retry."""


class MailTransport(Protocol):
    async def send(self, message: EmailMessage) -> None: ...

    def describe(self) -> str: ...


def language(locale: str | None) -> str:
    """`fr-CA` -> `fr`; anything without templates -> `en`."""
    lang = (locale or "").replace("_", "-").split("-")[0].lower()
    return lang if lang in LANGUAGES else "en"


def local_time(value: str | None, tz: str | None, lang: str) -> str:
    if not value:
        return ""
    moment = datetime.fromisoformat(value)
    try:
        zone = ZoneInfo(tz) if tz else None
    except (ZoneInfoNotFoundError, ValueError):
        zone = None
    if zone is not None:
        moment = moment.astimezone(zone)
    return moment.strftime(DATE_FORMATS[lang])


def opened_link(intent: Intent, opener: Opener | None) -> str | None:
    """The intent's sealed link, opened; None when it has none (an older welcome event).

    A link that does not open (no key for it any more) fails a link mail for good; a welcome
    mail goes out without it (the user can ask for a new one).
    """
    sealed = intent.context.get("link_sealed")
    if not sealed:
        return None
    try:
        if opener is None:
            raise SealingError("NOTIFY_LINK_OPENING_KEYS is not set")
        return opener.open(sealed)
    except SealingError as exc:
        if intent.effect == "welcome":
            return None
        raise PermanentMailError(f"the link cannot be opened: {exc}") from None


def render(intent: Intent, *, sender: str, opener: Opener | None = None) -> EmailMessage:
    """The mail for `intent`, in the user's language when known, text and HTML."""
    if not intent.email:
        raise PermanentMailError(f"no e-mail address is known for user {intent.user_id}")
    lang = language(intent.locale)
    context: dict[str, Any] = {
        "lang": lang,
        "name": intent.name,
        "email": intent.email,
        "failed_attempts": intent.context.get("failed_attempts"),
        "occurred_at": local_time(intent.context.get("occurred_at"), intent.timezone, lang),
        "locked_until": local_time(intent.context.get("locked_until"), intent.timezone, lang),
        "expires_at": local_time(intent.context.get("expires_at"), intent.timezone, lang),
        "link": opened_link(intent, opener),
    }
    try:
        text = templates.get_template(f"{lang}/{intent.effect}.txt.j2")
        html = templates.get_template(f"{lang}/{intent.effect}.html.j2")
    except TemplateNotFound as exc:
        raise PermanentMailError(f"no template for {intent.effect!r}") from exc
    subject = "".join(text.blocks["subject"](text.new_context(context))).strip()
    body = "".join(text.blocks["body"](text.new_context(context))).strip() + "\n"
    message = EmailMessage()
    message["From"] = sender
    message["To"] = str(Address(display_name=intent.name or "", addr_spec=intent.email))
    message["Subject"] = subject
    message["Message-ID"] = intent.message_id
    message["Date"] = format_datetime(datetime.now().astimezone())
    message["Auto-Submitted"] = "auto-generated"
    message["Content-Language"] = lang
    message.set_content(body)
    message.add_alternative(html.render(subject=subject, **context), subtype="html")
    return message


def mail_domain(sender: str) -> str:
    return parseaddr(sender)[1].rpartition("@")[2] or "localhost"


class SmtpTransport:
    """An SMTP server from `smtp://` (STARTTLS when offered) or `smtps://` (implicit TLS)."""

    def __init__(self, url: str, *, timeout: float) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("smtp", "smtps"):
            raise ValueError("NOTIFY_SMTP_URL must start with smtp:// or smtps://")
        self.implicit_tls = parts.scheme == "smtps"
        self.host = parts.hostname or "127.0.0.1"
        self.port = parts.port or (465 if self.implicit_tls else 25)
        self.username = unquote(parts.username) if parts.username else None
        self._password = unquote(parts.password) if parts.password else None
        self.timeout = timeout

    def describe(self) -> str:  # never the credentials
        return f"{'smtps' if self.implicit_tls else 'smtp'}://{self.host}:{self.port}"

    async def send(self, message: EmailMessage) -> None:
        try:
            async with asyncio.timeout(self.timeout):
                await aiosmtplib.send(
                    message,
                    hostname=self.host,
                    port=self.port,
                    username=self.username,
                    password=self._password,
                    use_tls=self.implicit_tls,
                    timeout=self.timeout,
                )
        except aiosmtplib.SMTPRecipientsRefused as exc:
            if all(500 <= r.code < 600 for r in exc.recipients):
                raise PermanentMailError(f"recipient refused: {exc.recipients[0]}") from exc
            raise
        except aiosmtplib.SMTPResponseException as exc:
            if 500 <= exc.code < 600 and not isinstance(exc, aiosmtplib.SMTPServerDisconnected):
                raise PermanentMailError(f"SMTP {exc.code}: {exc.message}") from exc
            raise


class MaildirTransport:
    """The embedded default: each mail becomes a file in a local maildir (`make up` works)."""

    def __init__(self, path: str) -> None:
        self.path = Path(path)

    def describe(self) -> str:
        return f"maildir {self.path}"

    async def send(self, message: EmailMessage) -> None:
        await asyncio.to_thread(self._write, message)

    def _write(self, message: EmailMessage) -> None:
        # mailbox.Maildir makes tmp/, new/ and cur/ only when it makes the maildir itself: an
        # empty folder mounted there (a fresh volume, a Kubernetes emptyDir) needs them made.
        for sub in ("tmp", "new", "cur"):
            (self.path / sub).mkdir(parents=True, exist_ok=True)
        box = mailbox.Maildir(self.path, create=True)
        box.add(message)


def transport(smtp_url: str | None, *, maildir: str, timeout: float) -> MailTransport:
    return SmtpTransport(smtp_url, timeout=timeout) if smtp_url else MaildirTransport(maildir)
