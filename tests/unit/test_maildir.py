"""notify_svc's maildir fallback writes into an empty folder mounted where the maildir goes."""

from __future__ import annotations

import mailbox
from email.message import EmailMessage
from pathlib import Path

from notify_svc.mail import MaildirTransport


def message() -> EmailMessage:
    mail = EmailMessage()
    mail["To"] = "ada@example.com"
    mail["Subject"] = "Welcome"
    mail.set_content("Hello")
    return mail


async def test_an_empty_mounted_folder_becomes_a_maildir(tmp_path: Path) -> None:
    mounted = tmp_path / "maildir"
    mounted.mkdir()  # a fresh volume or an emptyDir: the folder exists, empty
    await MaildirTransport(str(mounted)).send(message())
    box = mailbox.Maildir(mounted, create=False)
    assert [m["Subject"] for m in box] == ["Welcome"]


async def test_a_missing_maildir_is_created(tmp_path: Path) -> None:
    path = tmp_path / "var" / "maildir"
    await MaildirTransport(str(path)).send(message())
    assert len(list((path / "new").iterdir())) == 1
