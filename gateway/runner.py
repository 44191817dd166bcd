"""The local gateway as a process: HAProxy running the configuration rendered from kong.yml,
re-rendered and reloaded whenever auth_svc's published keys change.

Started by `esctl up` (as `esctl gateway run`), or on its own as `python -m gateway`.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from shutil import which

from auth_svc.settings import AuthSettings
from gateway.haproxy import render_haproxy
from gateway.kong import (
    GatewayConfigError,
    dump_kong,
    load_kong,
    published_keys_reader,
    with_credentials,
)
from gateway.model import gateway_model
from gateway.settings import GatewaySettings
from servicekit.process import StopOnSignals, stop_process
from user_svc.settings import UserSettings


def local_targets() -> dict[str, list[str]]:
    """Where the upstreams of kong.yml are on this machine (from the services' settings)."""
    auth, users = AuthSettings(), UserSettings()
    return {
        "auth_svc.upstream": [f"{auth.host}:{auth.port}"],
        "user_svc.upstream": [f"{users.host}:{users.port}"],
    }


def write_local_config(
    settings: GatewaySettings, public_keys: Mapping[str, str], targets: Mapping[str, list[str]]
) -> Path:
    """Render kong.yml (with credentials) to an HAProxy file in the work dir; returns its path."""
    kong = with_credentials(load_kong(settings.config), public_keys)
    work = settings.work_dir
    work.mkdir(parents=True, exist_ok=True)
    text = render_haproxy(gateway_model(kong, targets), settings, work / "keys")
    path = work / "haproxy.cfg"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    tmp.replace(path)
    (work / "kong.yml").write_text(dump_kong(kong))
    return path


def _check_config(settings: GatewaySettings, path: Path) -> None:
    # Not -q: with it, HAProxy says nothing of why it refuses a file.
    result = subprocess.run(
        [settings.haproxy, "-c", "-f", str(path)], check=False, capture_output=True, text=True
    )
    if result.returncode != 0:
        raise GatewayConfigError(f"haproxy rejected {path}:\n{result.stderr or result.stdout}")


def run() -> int:
    """Run the local gateway until SIGINT or SIGTERM, reloading HAProxy when keys change.

    Returns the exit status: 0 once stopped, HAProxy's own (or 1) if HAProxy exits first."""
    settings = GatewaySettings()
    store = published_keys_reader()
    poll = max(min(AuthSettings().keys_refresh_seconds / 2, 2.0), 0.2)
    targets = local_targets()
    keys = store.public_keys()
    path = write_local_config(settings, keys, targets)
    _check_config(settings, path)
    # Master-worker mode: SIGUSR2 makes the master re-read the file and replace its workers.
    proxy = subprocess.Popen([settings.haproxy, "-W", "-db", "-f", str(path)])
    stop = StopOnSignals()
    print(
        f"gateway on http://{settings.host}:{settings.port} ({len(keys)} key(s))", file=sys.stderr
    )
    try:
        while not stop:
            if proxy.poll() is not None:
                return proxy.returncode or 1
            time.sleep(poll)
            try:
                store.reload()  # every poll, not the cached view: the key must beat its use
                current = store.public_keys()
            except Exception as exc:  # noqa: BLE001 - the database may be restarting: keep serving
                print(f"gateway: could not read keys: {exc}", file=sys.stderr)
                continue
            if current != keys:
                path = write_local_config(settings, current, targets)
                _check_config(settings, path)
                proxy.send_signal(signal.SIGUSR2)
                keys = current
                print(f"gateway: reloaded with keys {', '.join(sorted(keys))}", file=sys.stderr)
    finally:
        stop_process(proxy)
        store.close()
    return 0


def haproxy_missing() -> str | None:
    """A one-line problem when HAProxy is not installed, else None."""
    binary = GatewaySettings().haproxy
    if which(binary) is None:
        return f"{binary} is not installed: `apt-get install -y haproxy` (make up does it)"
    return None


def main() -> None:
    """`python -m gateway`."""
    sys.exit(run())
