"""A real HTTP/1.1 webhook receiver on a TCP port, with per-path behaviour.

Each path answers 200 unless told otherwise: `fail(path, n)` answers 503 to its first `n`
requests, `hang(path)` never answers. Every request is recorded. Run as a module to serve
fast 200s on several ports for the benchmark: `python -m testbed.receiver 9001 9002`.
"""

from __future__ import annotations

import asyncio
import sys
import time
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Request:
    at: float
    path: str
    headers: dict[str, str]
    body: bytes
    status: int | None  # None: never answered


@dataclass
class Receiver:
    record: bool = True
    requests: list[Request] = field(default_factory=list)
    failing: dict[str, int] = field(default_factory=dict)
    hanging: set[str] = field(default_factory=set)
    server: asyncio.Server | None = None
    count: int = 0
    writers: set[asyncio.StreamWriter] = field(default_factory=set)

    def fail(self, path: str, times: int) -> None:
        self.failing[path] = times

    def hang(self, path: str) -> None:
        self.hanging.add(path)

    def to(self, path: str) -> list[Request]:
        return [r for r in self.requests if r.path == path]

    async def start(self, port: int = 0) -> int:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", port, backlog=1024)
        return int(self.server.sockets[0].getsockname()[1])

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            for writer in list(self.writers):
                writer.close()
            await self.server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.writers.add(writer)
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.decode("latin-1").split("\r\n")
                path = lines[0].split(" ")[1]
                headers = {}
                for line in lines[1:]:
                    if ":" in line:
                        name, value = line.split(":", 1)
                        headers[name.strip().lower()] = value.strip()
                body = await reader.readexactly(int(headers.get("content-length", "0")))
                self.count += 1
                if path in self.hanging:
                    if self.record:
                        self.requests.append(Request(time.monotonic(), path, headers, body, None))
                    await reader.read()  # until the client gives up
                    return
                status = 200
                if self.failing.get(path, 0) > 0:
                    self.failing[path] -= 1
                    status = 503
                if self.record:
                    self.requests.append(Request(time.monotonic(), path, headers, body, status))
                reason = b"OK" if status == 200 else b"Service Unavailable"
                writer.write(b"HTTP/1.1 %d %s\r\ncontent-length: 0\r\n\r\n" % (status, reason))
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            self.writers.discard(writer)
            writer.close()


async def _serve_forever(ports: list[int]) -> None:
    receivers = [Receiver(record=False) for _ in ports]
    for receiver, port in zip(receivers, ports, strict=True):
        await receiver.start(port)
    print("ready", flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    asyncio.run(_serve_forever([int(p) for p in sys.argv[1:]]))
