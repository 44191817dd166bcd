"""Dockerfile, docker-compose and Kubernetes: validated offline, and in step with the code and
with compose/kong.yml (nothing here can run Docker or a cluster)."""

from __future__ import annotations

import importlib
import subprocess
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import yaml
from fastapi import FastAPI
from fastapi.testclient import TestClient
from pydantic_settings import BaseSettings

from esctl.gateway import GatewaySettings, k8s_credentials, load_kong
from servicekit.telemetry import TelemetrySettings

ROOT = Path(__file__).parents[2]
BIN = ROOT / ".venv" / "bin"
COMPOSE = ROOT / "compose" / "docker-compose.yml"
SHARED_ENV = {"AMQP_URL", "LOG_LEVEL", "LOG_FORMAT"} | {
    # read by servicekit.telemetry.TelemetrySettings in every process
    name
    for name in TelemetrySettings.model_json_schema(by_alias=True)["properties"]
}
# Settings class of each service, by environment prefix (some are written concurrently).
SETTINGS = {
    "AUTH_": "auth_svc.settings:AuthSettings",
    "USER_": "user_svc.settings:UserSettings",
    "REPORTING_": "reporting_svc.settings:ReportingSettings",
    "NOTIFY_": "notify_svc.settings:NotifySettings",
    "INTEGRATION_": "integration_svc.settings:IntegrationSettings",
    "GATEWAY_": "esctl.gateway:GatewaySettings",
}
CONSUMER_SERVICES = ("user_svc", "reporting_svc", "notify_svc", "integration_svc")


def settings_class(prefix: str) -> type[BaseSettings] | None:
    module, name = SETTINGS[prefix].split(":")
    try:
        cls: type[BaseSettings] = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):
        return None
    return cls


def env_names(cls: type[BaseSettings]) -> set[str]:
    prefix = str(cls.model_config.get("env_prefix", ""))
    names = set()
    for field_name, info in cls.model_fields.items():
        alias = info.validation_alias
        choices = getattr(alias, "choices", None)
        names.add(str(choices[0]) if choices else f"{prefix}{field_name}".upper())
    return names


def check_env_names(where: str, names: Iterator[str] | set[str]) -> list[str]:
    """Names no settings class reads; skips (once all else passed) for missing classes."""
    unknown, missing = [], set()
    for name in names:
        if name in SHARED_ENV:
            continue
        prefix = next((p for p in SETTINGS if name.startswith(p)), None)
        if prefix is None:
            unknown.append(f"{where}: {name}")
            continue
        cls = settings_class(prefix)
        if cls is None:
            missing.add(SETTINGS[prefix])
        elif name not in env_names(cls):
            unknown.append(f"{where}: {name}")
    assert unknown == []
    return sorted(missing)


# --- Dockerfile -------------------------------------------------------------------------------


def test_hadolint_passes_on_the_dockerfile() -> None:
    result = subprocess.run(
        [str(BIN / "hadolint"), str(ROOT / "Dockerfile")],
        check=False,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_image_is_multi_stage_non_root_with_a_healthcheck_and_deps_before_code() -> None:
    lines = [line.strip() for line in (ROOT / "Dockerfile").read_text().splitlines()]
    assert sum(line.startswith("FROM python:") and "slim" in line for line in lines) == 2
    user = next(line for line in lines if line.startswith("USER "))
    assert user.split()[1].split(":")[0] not in ("root", "0")
    assert any(line.startswith("HEALTHCHECK") for line in lines)
    sync_deps = next(i for i, line in enumerate(lines) if "--no-install-project" in line)
    first_code = next(i for i, line in enumerate(lines) if line.startswith("COPY servicekit"))
    assert sync_deps < first_code


# --- docker-compose ---------------------------------------------------------------------------


@cache
def compose() -> dict[str, Any]:
    document: dict[str, Any] = yaml.safe_load(COMPOSE.read_text())
    return document


def test_the_compose_file_follows_the_compose_spec() -> None:
    result = subprocess.run(
        [str(BIN / "check-jsonschema"), "--builtin-schema", "vendor.compose-spec", str(COMPOSE)],
        check=False,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_compose_runs_every_process_healthy_and_in_order() -> None:
    services = compose()["services"]
    commands = {name: tuple(s.get("command", ())) for name, s in services.items()}
    expected = {
        ("db", "init"),
        ("gateway", "render", "--out", "/kong/kong.yml"),
        ("serve", "auth_svc"),
        ("serve", "user_svc"),
        ("relay", "auth_svc"),
        ("relay", "user_svc"),
        *(("consume", s) for s in CONSUMER_SERVICES),
    }
    assert expected <= set(commands.values())
    assert services["kong"]["image"] == "kong:3.9.3"
    assert services["kong"]["environment"]["KONG_DATABASE"] == "off"
    assert {"postgres", "rabbitmq"} <= set(services)
    assert services["rabbitmq"]["image"].endswith("-management")
    one_shots = {n for n, c in commands.items() if c[:1] in (("db",), ("gateway",))}
    for name, service in services.items():
        for dependency, condition in (service.get("depends_on") or {}).items():
            assert dependency in services
            wanted = "service_completed_successfully" if dependency in one_shots else None
            assert condition["condition"] in (wanted or "service_healthy", "service_started")
            if dependency not in ("mailpit",):
                assert condition["condition"] != "service_started", (name, dependency)
        if name not in one_shots and name != "mailpit":
            assert service["healthcheck"]["test"], name


def test_compose_health_checks_probe_the_port_each_process_is_told_to_listen_on() -> None:
    for name, service in compose()["services"].items():
        env = service.get("environment") or {}
        ports = [v for k, v in env.items() if k.endswith("_PORT") and not k.startswith("KONG")]
        test = " ".join(service.get("healthcheck", {}).get("test") or [])
        if ports and "health/ready" in test:
            assert f"127.0.0.1:{ports[0]}/health/ready" in test, name
            assert len(ports) == 1, name


def test_compose_sets_only_variables_the_code_reads() -> None:
    missing: set[str] = set()
    for name, service in compose()["services"].items():
        if not str(service.get("image", "")).startswith("${ESKIT_IMAGE"):
            continue
        missing |= set(check_env_names(name, set(service.get("environment") or {})))
    if missing:
        pytest.skip(f"settings not importable yet, their names are unchecked: {sorted(missing)}")


# --- Kubernetes -------------------------------------------------------------------------------


@cache
def rendered(overlay: str) -> list[dict[str, Any]]:
    result = subprocess.run(
        ["kubectl", "kustomize", str(ROOT / "k8s" / "overlays" / overlay)],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    return [d for d in yaml.safe_load_all(result.stdout) if d]


@pytest.mark.parametrize("overlay", ["dev", "prod"])
def test_both_overlays_render_and_pass_strict_validation(overlay: str, tmp_path: Path) -> None:
    manifest = tmp_path / f"{overlay}.yaml"
    manifest.write_text(yaml.safe_dump_all(rendered(overlay)))
    result = subprocess.run(
        [str(BIN / "kubernetes-validate"), "--strict", "--quiet", str(manifest)],
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_credentials_render_of_esctl_validates_for_kubernetes(tmp_path: Path) -> None:
    manifest = tmp_path / "credentials.yaml"
    manifest.write_text(yaml.safe_dump_all(k8s_credentials({"kid-1": "-----BEGIN..."})))
    result = subprocess.run(
        [str(BIN / "kubernetes-validate"), "--strict", "--quiet", str(manifest)],
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def _app_for(args: list[str]) -> FastAPI:
    if args[0] == "serve":
        module = importlib.import_module(f"{args[1]}.main")
        app: FastAPI = module.create_app()
        return app
    from servicekit.web import create_app

    return create_app(title=" ".join(args))  # relays and consumers: the shared worker shell


@pytest.mark.parametrize("overlay", ["dev", "prod"])
def test_every_deployment_has_probes_resources_and_a_restricted_security_context(
    overlay: str,
) -> None:
    deployments = [d for d in rendered(overlay) if d["kind"] == "Deployment"]
    commands = set()
    for deployment in deployments:
        pod = deployment["spec"]["template"]["spec"]
        for container in pod["containers"]:
            name = f"{deployment['metadata']['name']}/{container['name']}"
            commands.add(tuple(container["args"]))
            for kind in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(container["resources"][kind]), name
            sc = container["securityContext"]
            assert sc["runAsNonRoot"] is True, name
            assert sc["readOnlyRootFilesystem"] is True, name
            assert sc["allowPrivilegeEscalation"] is False, name
            assert sc["capabilities"]["drop"] == ["ALL"], name
            client = TestClient(_app_for(container["args"]))  # no lifespan: routes only
            for probe, path in (
                ("readinessProbe", "/health/ready"),
                ("livenessProbe", "/health/live"),
            ):
                get = container[probe]["httpGet"]
                assert get["path"] == path, name
                assert client.get(get["path"]).status_code != 404, name
                port = next(p for p in container["ports"] if p["name"] == get["port"])
                env = {e["name"]: e.get("value") for e in container["env"]}
                assert str(port["containerPort"]) in env.values(), name
            missing = check_env_names(name, {e["name"] for e in container["env"]})
            assert set(missing) <= {SETTINGS[p] for p in ("REPORTING_", "NOTIFY_", "INTEGRATION_")}
    assert {("consume", s) for s in CONSUMER_SERVICES} <= commands
    assert {("serve", "auth_svc"), ("serve", "user_svc")} <= commands


@pytest.mark.parametrize("overlay", ["dev", "prod"])
def test_rest_services_scale_and_every_deployment_has_a_disruption_budget(overlay: str) -> None:
    docs = rendered(overlay)
    deployments = {d["metadata"]["name"] for d in docs if d["kind"] == "Deployment"}
    hpas = [d for d in docs if d["kind"] == "HorizontalPodAutoscaler"]
    assert all(h["apiVersion"] == "autoscaling/v2" for h in hpas)
    assert {h["spec"]["scaleTargetRef"]["name"] for h in hpas} == {"auth-svc", "user-svc"}
    budgets = {
        d["spec"]["selector"]["matchLabels"]["app.kubernetes.io/name"]
        for d in docs
        if d["kind"] == "PodDisruptionBudget"
    }
    assert budgets == deployments
    (job,) = [d for d in docs if d["kind"] == "Job"]
    assert job["spec"]["template"]["spec"]["containers"][0]["args"] == ["db", "init"]
    assert not [d for d in docs if d["kind"] == "Secret"]  # referenced, never committed


def test_the_ingress_and_kong_resources_mirror_kong_yml() -> None:
    docs = rendered("prod")
    kong = load_kong(GatewaySettings().config)
    k8s_service = {"auth_svc": "auth-svc", "user_svc": "user-svc"}
    plugins = {d["metadata"]["name"]: d for d in docs if d["kind"] == "KongPlugin"}

    def canonical(entries: list[dict[str, Any]]) -> list[tuple[str, str]]:
        return sorted((p["name"], yaml.safe_dump(p.get("config"), sort_keys=True)) for p in entries)

    expected = {
        (path, k8s_service[s["name"]], tuple(canonical(r.get("plugins", []))))
        for s in kong["services"]
        for r in s["routes"]
        for path in r["paths"]
    }
    actual = set()
    for ingress in (d for d in docs if d["kind"] == "Ingress"):
        assert ingress["spec"]["ingressClassName"] == "kong"
        annotations = ingress["metadata"].get("annotations", {})
        assert annotations["konghq.com/strip-path"] == "false"
        names = [n for n in annotations.get("konghq.com/plugins", "").split(",") if n]
        attached = [{"name": plugins[n]["plugin"], "config": plugins[n]["config"]} for n in names]
        for rule in ingress["spec"]["rules"]:
            for path in rule["http"]["paths"]:
                service = path["backend"]["service"]["name"]
                actual.add((path["path"], service, tuple(canonical(attached))))
    assert actual == expected
    globals_ = [d for d in docs if d["kind"] == "KongClusterPlugin"]
    assert all(d["metadata"]["labels"]["global"] == "true" for d in globals_)
    assert canonical([{"name": d["plugin"], "config": d["config"]} for d in globals_]) == (
        canonical(kong["plugins"])
    )
    (consumer,) = [d for d in docs if d["kind"] == "KongConsumer"]
    assert consumer["username"] == kong["consumers"][0]["username"]
