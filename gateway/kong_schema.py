"""kong.yml checked the way Kong 3.9 checks a declarative file, without Kong.

decK 1.4 (Debian's, the newest any registry we reach offers) accepts an unknown plugin,
`minute: "lots"` and unknown keys, while Kong refuses the whole file at start-up. `validate`
walks the file (top-level keys, services with their routes and plugins, routes, upstreams with
their targets, consumers with their credentials and plugins, global plugins) against the
tables of `gateway.kong39` and returns one error per problem, each with its path:
`plugins[3].config.minute: expected a number, got 'lots'`. An empty list means Kong 3.9 would
load the file, as far as these tables reach.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from gateway import kong39
from gateway.schema_rules import Field, check_record, check_value

FORMAT_VERSION = "3.0"


def validate(document: Any, *, dbless: bool = True) -> list[str]:
    """The reasons Kong 3.9 would refuse this declarative document ([] if none).

    `dbless`: Kong runs without a database (compose, `KONG_DATABASE=off`), where some
    values are refused (rate-limiting's `cluster` policy)."""
    if not isinstance(document, dict):
        return ["(top level): expected a mapping of Kong entities"]
    problems: list[str] = []
    if document.get("_format_version") != FORMAT_VERSION:
        problems.append(
            f"_format_version: expected {FORMAT_VERSION!r}, got {document.get('_format_version')!r}"
        )
    for key in document:
        if key not in kong39.TOP_LEVEL:
            known = ", ".join(sorted(kong39.TOP_LEVEL))
            problems.append(f"{key}: unknown top-level key (known: {known})")
    problems += check_value(Field("boolean"), document.get("_transform"), "_transform")
    plugins = kong39.plugin_configs(dbless=dbless)
    walk = _Walker(plugins)
    for i, service in enumerate(walk.items(document, "services", problems)):
        walk.entity(kong39.SERVICE, service, f"services[{i}]", nested=("routes", "plugins"))
    for i, route in enumerate(walk.items(document, "routes", problems)):
        walk.entity(kong39.ROUTE, route, f"routes[{i}]", nested=("plugins",))
    for i, upstream in enumerate(walk.items(document, "upstreams", problems)):
        walk.entity(kong39.UPSTREAM, upstream, f"upstreams[{i}]", nested=("targets",))
    for i, target in enumerate(walk.items(document, "targets", problems)):
        walk.entity(kong39.TARGET, target, f"targets[{i}]")
    for i, consumer in enumerate(walk.items(document, "consumers", problems)):
        nested = ("plugins", *kong39.CREDENTIALS)
        walk.entity(kong39.CONSUMER, consumer, f"consumers[{i}]", nested=nested)
    for i, plugin in enumerate(walk.items(document, "plugins", problems)):
        walk.plugin(plugin, f"plugins[{i}]")
    for key in kong39.TOP_LEVEL - {"services", "routes", "upstreams", "targets", "consumers"}:
        if key.startswith("_") or key == "plugins":
            continue
        walk.items(document, key, problems)  # a list of mappings; their fields are not tabled
    return problems + walk.problems


def validate_file(path: Path, *, dbless: bool = True) -> list[str]:
    try:
        document = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        return [f"{path}: cannot read it as YAML: {exc}"]
    return validate(document, dbless=dbless)


class _Walker:
    """Checks entities and what they nest (`services[0].routes[1].plugins[0]`)."""

    # What an entity may nest in a declarative file, and the table each nested item follows.
    NESTED: Mapping[str, Field] = {
        "routes": kong39.ROUTE,
        "targets": kong39.TARGET,
        **kong39.CREDENTIALS,
    }

    def __init__(self, plugins: Mapping[str, Field]) -> None:
        self.plugins = plugins
        self.problems: list[str] = []

    def items(self, parent: Mapping[str, Any], key: str, problems: list[str]) -> list[Any]:
        value = parent.get(key)
        if value is None:
            return []
        if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
            problems.append(f"{key}: expected a list of mappings")
            return []
        return value

    def entity(
        self, spec: Field, value: Mapping[str, Any], path: str, nested: tuple[str, ...] = ()
    ) -> None:
        own = {k: v for k, v in value.items() if k not in nested}
        self.problems += check_record(spec, own, path)
        for key in nested:
            children = self.items(value, key, self.problems)
            for i, child in enumerate(children):
                where = f"{path}.{key}[{i}]"
                if key == "plugins":
                    self.plugin(child, where)
                elif key == "routes":
                    self.entity(self.NESTED[key], child, where, nested=("plugins",))
                else:
                    self.entity(self.NESTED[key], child, where)

    def plugin(self, value: Mapping[str, Any], path: str) -> None:
        name = value.get("name")
        entity = Field("record", fields={**kong39.PLUGIN_ENTITY, "config": Field("any")})
        problems = check_record(entity, value, path)
        self.problems += problems
        if not isinstance(name, str):
            return
        config = self.plugins.get(name)
        if config is None:
            if name in kong39.BUNDLED_PLUGINS:
                self.problems.append(
                    f"{path}.name: {name!r} is a Kong 3.9 plugin this project's table lacks: add "
                    f"its schema (kong/plugins/{name}/schema.lua) to gateway/kong39.py"
                )
            else:
                self.problems.append(f"{path}.name: {name!r} is not a Kong 3.9 plugin")
            return
        self.problems += check_value(config, value.get("config") or {}, f"{path}.config")
