"""notify_svc's composition root: database setup, and the consumer process with its dispatcher."""

from __future__ import annotations

from notify_svc.dispatcher import MailDispatcher
from notify_svc.erasure import MaildirEraser
from notify_svc.intents import DDL
from notify_svc.mail import mail_domain
from notify_svc.projection import NotificationProjection
from notify_svc.settings import NotifySettings
from servicekit.process import ProjectionWorker
from servicekit.projection import init_projection_db
from servicekit.service import Service


def projection(settings: NotifySettings | None = None) -> NotificationProjection:
    """The projection `esctl replay notify_svc` rebuilds (recipients; it records no intents)."""
    settings = settings or NotifySettings()
    return NotificationProjection(mail_domain=mail_domain(settings.mail_from))


def init_db(settings: NotifySettings | None = None) -> None:
    """Create the database, the intents table and the live generation's tables (idempotent)."""
    settings = settings or NotifySettings()
    init_projection_db(settings.database_url, projection(settings), DDL)


class NotifyWorker(ProjectionWorker):
    """The consumer (records intents) and the dispatcher (sends them), in one process."""

    dispatcher: MailDispatcher

    def __init__(self, settings: NotifySettings, dispatcher: MailDispatcher | None = None) -> None:
        super().__init__(
            projection(settings),
            settings,
            dispatcher or MailDispatcher(settings),
            # A mail claimed before an erasure is sent, or given up, within the SMTP bound.
            erasure_hook=MaildirEraser(
                settings.maildir, in_flight_seconds=settings.smtp_timeout_seconds + 1
            ),
        )


SERVICE = Service(
    name=NotificationProjection.name,
    settings=NotifySettings,
    init_db=init_db,
    consumer=NotifyWorker,
    projection=projection,
)
