"""Free TCP ports for processes a test starts."""

from __future__ import annotations

import random
import socket

# Below the kernel's ephemeral range (32768-60999 here): a port handed out from that range can
# be taken as the source port of some outgoing connection before the process binds it (seen
# once, with the chaos cases' clients running beside the suite: the gateway's HAProxy could
# not bind). Private servers (testbed.servers.pick_port) use 20000-30000.
LOW, HIGH = 10000, 19999
_handed_out: set[int] = set()


def free_port() -> int:
    """A port nobody listens on, never handed out before by this process."""
    for _ in range(500):
        port = random.randint(LOW, HIGH)
        if port in _handed_out:
            continue
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
        _handed_out.add(port)
        return port
    msg = f"no free port in {LOW}-{HIGH}"
    raise RuntimeError(msg)
