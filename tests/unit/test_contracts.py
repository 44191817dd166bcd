"""Published contracts never break: a change to a published (event_type, version) must be
additive. `shared_contracts/published/` holds the schemas as released; regenerate it with
`esctl contracts export --out shared_contracts/published` after an additive change."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import pytest

from shared_contracts.schema import asyncapi_document, breaking_changes, json_schemas

PUBLISHED = Path(__file__).parents[2] / "shared_contracts" / "published"
CURRENT = json_schemas()


@pytest.mark.parametrize("name", sorted(p.name for p in PUBLISHED.glob("*.v*.json")))
def test_a_published_event_version_is_still_produced_without_breaking_changes(name: str) -> None:
    published = json.loads((PUBLISHED / name).read_text())
    assert name in CURRENT, f"{name} was published and must still be produced"
    assert breaking_changes(published, CURRENT[name]) == []


def test_removing_or_retyping_a_field_is_detected_as_breaking() -> None:
    current = CURRENT["auth.account.registered.v1.json"]
    broken = json.loads(json.dumps(current))
    del broken["properties"]["data"]["properties"]["email"]
    broken["properties"]["data"]["properties"]["user_id"] = {"type": "integer"}
    broken["properties"]["data"].setdefault("required", []).append("display_name")
    problems = breaking_changes(current, broken)
    assert "data.email was removed" in problems
    assert "data.user_id changed type" in problems
    assert "data.display_name became required" in problems


def test_the_asyncapi_document_names_every_exchange_and_event() -> None:
    doc = asyncapi_document()
    assert doc["asyncapi"] == "3.0.0"
    addresses = {c["address"] for c in doc["channels"].values()}
    assert addresses == {
        json.loads((PUBLISHED / n).read_text())["title"].rsplit(".v", 1)[0] for n in CURRENT
    }


def test_event_ids_are_stable_and_differ_across_producers_sharing_an_aggregate_id() -> None:
    from shared_contracts.envelope import event_id_for

    user = uuid.uuid4()
    assert event_id_for("auth_svc", user, 1) == event_id_for("auth_svc", user, 1)
    assert event_id_for("auth_svc", user, 1) != event_id_for("user_svc", user, 1)
    assert event_id_for("auth_svc", user, 1) != event_id_for("auth_svc", user, 2)


def test_the_asyncapi_document_states_persistent_delivery_on_each_publish_operation() -> None:
    """AMQP bindings: delivery mode is the operation's, never the message's (the CLI rejects
    it there); the exchange is the channel's."""
    doc = asyncapi_document()
    for operation in doc["operations"].values():
        assert operation["bindings"]["amqp"]["deliveryMode"] == 2
    for message in doc["components"]["messages"].values():
        assert "deliveryMode" not in message["bindings"]["amqp"]
    exchanges = {c["bindings"]["amqp"]["exchange"]["name"] for c in doc["channels"].values()}
    assert exchanges == {"auth.events", "user.events"}
