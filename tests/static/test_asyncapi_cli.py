"""The AsyncAPI document passes the official AsyncAPI CLI (`asyncapi validate`), both as
exported from the contract models now and as published in shared_contracts/published/.

The CLI is pinned in tools/asyncapi/ (package.json + package-lock.json) and installed by
`make asyncapi-cli`, which `make test` runs first."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest

from shared_contracts.schema import asyncapi_document

ROOT = Path(__file__).parents[2]
CLI = ROOT / "tools" / "asyncapi" / "node_modules" / ".bin" / "asyncapi"
PUBLISHED = ROOT / "shared_contracts" / "published" / "asyncapi.json"
SEVERITIES = ("error", "warning", "information", "hint")  # the CLI's codes 0..3


def validate(document: Path, workdir: Path) -> tuple[int, list[dict[str, Any]], str]:
    """Run `asyncapi validate`: its exit code, its diagnostics and its console output."""
    if not CLI.exists():
        pytest.fail(f"the AsyncAPI CLI is not installed at {CLI}: run `make asyncapi-cli`")
    # Analytics off without touching ~/.asyncapi-analytics: the CLI otherwise phones home.
    analytics = workdir / "asyncapi-analytics.json"
    analytics.write_text(
        json.dumps({"analyticsEnabled": "false", "infoMessageShown": "true", "userID": "eskit"})
    )
    diagnostics = workdir / f"{document.stem}.diagnostics.json"
    env = {
        **os.environ,
        "ASYNCAPI_METRICS_CONFIG_PATH": str(analytics),
        "SUPPRESS_NO_CONFIG_WARNING": "1",
    }
    command = [str(CLI), "validate", str(document), "--diagnostics-format", "json"]
    command += ["--save-output", str(diagnostics), "--fail-severity", "error"]
    result = subprocess.run(
        command,
        cwd=workdir,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    found = json.loads(diagnostics.read_text()) if diagnostics.exists() else []
    return result.returncode, found, result.stdout + result.stderr


def listing(diagnostics: list[dict[str, Any]]) -> str:
    return "\n".join(
        f"{SEVERITIES[d['severity']]}: {'.'.join(map(str, d['path']))}: {d['message']}"
        for d in diagnostics
    )


def exported(tmp_path: Path) -> Path:
    path = tmp_path / "exported.json"
    path.write_text(json.dumps(asyncapi_document(), indent=2, sort_keys=True))
    return path


@pytest.mark.parametrize("which", ["exported", "published"])
def test_the_asyncapi_document_is_valid_under_the_official_cli(which: str, tmp_path: Path) -> None:
    document = exported(tmp_path) if which == "exported" else PUBLISHED
    code, diagnostics, output = validate(document, tmp_path)
    errors = [d for d in diagnostics if d["severity"] == 0]
    others = [d for d in diagnostics if d["severity"] != 0]
    if others:  # warnings and hints are listed, not failed on
        print(f"{which}: the AsyncAPI CLI noted\n{listing(others)}")
    assert errors == [], f"{which}: the AsyncAPI CLI found errors:\n{listing(errors)}"
    assert code == 0, f"{which}: asyncapi validate exited {code}:\n{output}"
    assert "is valid" in output


def test_the_cli_rejects_delivery_mode_in_the_message_bindings(tmp_path: Path) -> None:
    """The mistake the CLI found in the first document: AMQP's `deliveryMode` belongs to the
    operation's bindings. This shows the check above can fail."""
    document = asyncapi_document()
    for message in document["components"]["messages"].values():
        message["bindings"]["amqp"]["deliveryMode"] = 2
    broken = tmp_path / "broken.json"
    broken.write_text(json.dumps(document, indent=2))
    code, diagnostics, _ = validate(broken, tmp_path)
    assert code != 0
    rejected = {d["path"][2] for d in diagnostics if d["severity"] == 0}
    assert rejected == set(document["components"]["messages"])
