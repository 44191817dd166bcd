"""JSON Schema and AsyncAPI 3.0 documents generated from the contract models."""

from __future__ import annotations

from typing import Any

from shared_contracts.envelope import Envelope
from shared_contracts.events import CONTRACTS, ContractEvent
from shared_contracts.names import PRODUCER_EXCHANGES


def schema_name(contract: type[ContractEvent]) -> str:
    return f"{contract.event_type}.v{contract.schema_version}"


def message_schema(contract: type[ContractEvent]) -> dict[str, Any]:
    """The JSON Schema of a whole message body: the envelope with this event's data."""
    envelope = Envelope.model_json_schema()
    data = contract.model_json_schema()
    defs = {**envelope.pop("$defs", {}), **data.pop("$defs", {})}
    envelope["properties"]["event_type"] = {"const": contract.event_type, "type": "string"}
    envelope["properties"]["schema_version"] = {
        "const": contract.schema_version,
        "type": "integer",
    }
    envelope["properties"]["producer"] = {"const": contract.producer, "type": "string"}
    envelope["properties"]["data"] = data
    envelope["title"] = schema_name(contract)
    envelope["description"] = contract.summary
    envelope["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    if defs:
        envelope["$defs"] = defs
    return envelope


def json_schemas() -> dict[str, dict[str, Any]]:
    """File name -> JSON Schema, one per published (event_type, schema_version)."""
    return {f"{schema_name(c)}.json": message_schema(c) for c in CONTRACTS.values()}


# AMQP 0-9-1 bindings for AsyncAPI 3.0 (https://github.com/asyncapi/bindings, amqp 0.3.0):
# the exchange belongs to the channel, how a message is published (persistent, with a
# timestamp) to the operation, and only the message's type and encoding to the message.
AMQP_BINDING_VERSION = "0.3.0"

# The AMQP headers every message carries (servicekit.messages.message_for).
MESSAGE_HEADERS: dict[str, Any] = {
    "type": "object",
    "properties": {
        "x-position": {
            "type": "integer",
            "description": "The event's position in its producer's store (as `position`).",
        },
        "traceparent": {
            "type": "string",
            "description": "W3C trace context of the publish, when the write was traced.",
        },
    },
    "required": ["x-position"],
}


def asyncapi_document(version: str = "1.0.0") -> dict[str, Any]:
    """An AsyncAPI 3.0 document describing every exchange and message.

    Valid under the official AsyncAPI CLI (`make asyncapi-cli`, tests/static/test_asyncapi_cli.py).
    """
    channels: dict[str, Any] = {}
    operations: dict[str, Any] = {}
    messages: dict[str, Any] = {}
    for contract in CONTRACTS.values():
        name = schema_name(contract).replace(".", "_")
        exchange = PRODUCER_EXCHANGES[contract.producer]
        messages[name] = {
            "name": contract.event_type,
            "title": schema_name(contract),
            "summary": contract.summary,
            "contentType": "application/json",
            "headers": MESSAGE_HEADERS,
            "correlationId": {
                "description": "The request id of the write that caused the event.",
                "location": "$message.payload#/correlation_id",
            },
            "payload": message_schema(contract),
            "bindings": {
                "amqp": {
                    "messageType": contract.event_type,
                    "bindingVersion": AMQP_BINDING_VERSION,
                }
            },
        }
        channels[name] = {
            "address": contract.event_type,
            "description": f"Routing key {contract.event_type} on exchange {exchange}",
            "servers": [{"$ref": "#/servers/rabbitmq"}],
            "messages": {name: {"$ref": f"#/components/messages/{name}"}},
            "bindings": {
                "amqp": {
                    "is": "routingKey",
                    "exchange": {
                        "name": exchange,
                        "type": "topic",
                        "durable": True,
                        "autoDelete": False,
                        "vhost": "/",
                    },
                    "bindingVersion": AMQP_BINDING_VERSION,
                }
            },
        }
        operations[f"publish_{name}"] = {
            "action": "send",
            "channel": {"$ref": f"#/channels/{name}"},
            "summary": contract.summary,
            "description": (
                f"{contract.producer}'s relay publishes each committed event at least once, "
                "in position order, with publisher confirms."
            ),
            "messages": [{"$ref": f"#/channels/{name}/messages/{name}"}],
            "bindings": {
                "amqp": {
                    "deliveryMode": 2,
                    "timestamp": True,
                    "bindingVersion": AMQP_BINDING_VERSION,
                }
            },
        }
    return {
        "asyncapi": "3.0.0",
        "info": {
            "title": "eskit public events",
            "version": version,
            "description": (
                "Domain events published by auth_svc and user_svc: one durable topic exchange "
                "per producer, routing key = event_type. Delivery is at least once: deduplicate "
                "by event_id (or by position per producer) and ignore unknown fields."
            ),
        },
        "servers": {
            "rabbitmq": {
                "host": "127.0.0.1:5672",
                "protocol": "amqp",
                "protocolVersion": "0.9.1",
                "description": "The local broker (AMQP_URL); production lists three nodes.",
            }
        },
        "defaultContentType": "application/json",
        "channels": channels,
        "operations": operations,
        "components": {"messages": messages},
    }


def breaking_changes(published: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """What in `current` breaks readers of `published` (same event type and version).

    Breaking: a field removed, a field newly required, or a field's type changed.
    """
    problems: list[str] = []
    old_data = published["properties"]["data"]
    new_data = current["properties"]["data"]
    for section, old, new in (
        ("envelope", published, current),
        ("data", old_data, new_data),
    ):
        old_props: dict[str, Any] = old.get("properties", {})
        new_props: dict[str, Any] = new.get("properties", {})
        for field, spec in old_props.items():
            if field not in new_props:
                problems.append(f"{section}.{field} was removed")
            elif section == "data" and _type_of(spec) != _type_of(new_props[field]):
                problems.append(f"{section}.{field} changed type")
        for field in set(new.get("required", [])) - set(old.get("required", [])):
            problems.append(f"{section}.{field} became required")
    return problems


def _type_of(spec: dict[str, Any]) -> Any:
    if "anyOf" in spec:
        return sorted(str(_type_of(s)) for s in spec["anyOf"])
    return (spec.get("type"), spec.get("format"), spec.get("items", {}).get("type"))
