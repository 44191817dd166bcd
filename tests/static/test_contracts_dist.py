"""The subscriber kit (contracts-dist/): `shared_contracts` as a distribution of its own that
installs and works where none of the backend is installed."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import textwrap
import tomllib
import zipfile
from pathlib import Path

import pytest

from shared_contracts.events import CONTRACTS

ROOT = Path(__file__).resolve().parents[2]
DIST = ROOT / "contracts-dist"
UV = ROOT / ".tools" / "bin" / "uv"
PROJECT = tomllib.loads((DIST / "pyproject.toml").read_text())["project"]

# Run inside the fresh virtualenv: nothing of the backend is there, the kit reads real messages.
USE_THE_KIT = textwrap.dedent(
    """
    import importlib.util, json, sys, uuid
    from datetime import UTC, datetime

    backend = [m for m in ("fastapi", "eventsourcing", "psycopg", "aio_pika", "servicekit")
               if importlib.util.find_spec(m) is not None]
    assert not backend, f"the backend leaked into the kit's environment: {backend}"

    import pydantic
    from shared_contracts import AUTH_EVENTS, Envelope, event_id_for
    from shared_contracts.events import AccountRegistered, ProfileUpdated
    from shared_contracts.schema import json_schemas
    from shared_contracts.subscriber import Received, Skipped, event_as, read

    user_id = uuid.uuid4()
    def body(event_type, version, data):
        return json.dumps({
            "event_id": str(event_id_for("auth_svc", user_id, 1)), "event_type": event_type,
            "schema_version": version, "occurred_at": datetime.now(UTC).isoformat(),
            "producer": "auth_svc", "aggregate_id": str(user_id), "aggregate_version": 1,
            "position": 7, "data": data, "a_field_from_the_future": True,
        })

    received = read(body("auth.account.registered", 1,
                         {"user_id": str(user_id), "email": "ada@example.com", "later": 1}))
    assert isinstance(received, Received), received
    assert isinstance(received.event, AccountRegistered)
    assert received.event.user_id == user_id and received.event.email == "ada@example.com"
    assert received.envelope.event_id == event_id_for("auth_svc", user_id, 1)
    assert event_as(received.envelope, AccountRegistered) == received.event
    try:
        event_as(received.envelope, ProfileUpdated)
    except ValueError:
        pass
    else:
        raise AssertionError("event_as accepted another contract")

    newer = read(body("auth.account.registered", 99, {}))
    assert isinstance(newer, Skipped) and newer.reason == "newer_schema_version", newer
    unknown = read(body("auth.account.teleported", 1, {}))
    assert isinstance(unknown, Skipped) and unknown.reason == "unknown_event_type", unknown
    for bad in (b"not json", body("auth.account.registered", 1, {"email": "no user id"})):
        try:
            read(bad)
        except pydantic.ValidationError:
            pass
        else:
            raise AssertionError(f"accepted {bad!r}")

    print(json.dumps({"exchange": AUTH_EVENTS, "schemas": sorted(json_schemas())}))
    """
)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if not UV.exists():
        pytest.fail(f"{UV} is missing: run `make` once to bootstrap the pinned uv")
    out = tmp_path_factory.mktemp("contracts-dist")
    result = subprocess.run(
        [str(UV), "build", str(DIST), "--out-dir", str(out)],
        check=False,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    (built,) = out.glob("eskit_contracts-*.whl")
    return built


def test_the_kit_is_shared_contracts_alone_depending_on_pydantic_only(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        metadata = archive.read(f"eskit_contracts-{PROJECT['version']}.dist-info/METADATA")
    packages = {name.split("/", 1)[0] for name in names if not name.startswith("eskit_")}
    assert packages == {"shared_contracts"}
    assert "shared_contracts/py.typed" in names
    assert "shared_contracts/subscriber.py" in names
    assert not [n for n in names if "__pycache__" in n]
    # every module of the repository's package is in the wheel
    modules = {f"shared_contracts/{p.name}" for p in (ROOT / "shared_contracts").glob("*.py")}
    assert modules <= set(names)
    requires = re.findall(r"^Requires-Dist: (\S+)", metadata.decode(), flags=re.MULTILINE)
    assert [re.split(r"[<>=!~ ]", r)[0] for r in requires] == ["pydantic"]


def test_the_wheel_installs_and_reads_messages_without_the_backend(
    wheel: Path, tmp_path: Path
) -> None:
    venv = tmp_path / "subscriber-venv"
    python = venv / "bin" / "python"
    for command in (
        [str(UV), "venv", "--python", sys.executable, str(venv)],
        [str(UV), "pip", "install", "--python", str(python), str(wheel)],
    ):
        result = subprocess.run(command, check=False, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr
    result = subprocess.run(
        [str(python), "-I", "-c", USE_THE_KIT],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,  # not the repository: the installed kit, not the source tree
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["exchange"] == "auth.events"
    assert len(report["schemas"]) == len(CONTRACTS)


def test_the_changelog_describes_this_version_and_every_contract_it_carries() -> None:
    text = (DIST / "CHANGELOG.md").read_text()
    newest = re.search(r"^## (\S+)", text, re.MULTILINE)
    assert newest is not None
    assert newest.group(1) == PROJECT["version"], "the newest changelog entry is the version"
    changelog = " ".join(text.split())
    for event_type, version in CONTRACTS:
        assert f"`{event_type}` v{version}" in changelog, f"{event_type} v{version} missing"
