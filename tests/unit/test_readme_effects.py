"""The README stays true for notify_svc and integration_svc: settings, and the receiver snippet."""

from __future__ import annotations

import re
from typing import Any

from integration_svc.settings import IntegrationSettings
from integration_svc.signing import headers, new_secret, secret_key
from notify_svc.settings import NotifySettings
from tests.unit.test_readme import README, variable_names


def test_every_notify_and_integration_variable_is_documented() -> None:
    missing = [
        name
        for cls in (NotifySettings, IntegrationSettings)
        for name in variable_names(cls)
        if f"`{name}`" not in README
    ]
    assert missing == []


def test_the_receiver_snippet_in_the_readme_verifies_our_signatures() -> None:
    section = README.split("### Verifying a webhook", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S)
    assert code is not None
    namespace: dict[str, Any] = {}
    exec(code.group(1), namespace)  # noqa: S102 - our own README
    verify = namespace["verify"]
    secret, body = new_secret(), b'{"type":"auth.account.registered"}'
    import time

    signed = headers(secret_key(secret), "evt-1", int(time.time()), body)
    assert verify(secret, signed, body)
    assert not verify(new_secret(), signed, body)
    assert not verify(secret, signed, body + b" ")
    stale = headers(secret_key(secret), "evt-1", int(time.time()) - 3600, body)
    assert not verify(secret, stale, body)
