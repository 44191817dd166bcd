"""The AMQP connection's corked writer: the frames of one event-loop turn leave in one send."""

from __future__ import annotations

import asyncio
from typing import Any, cast

from servicekit.amqp import _CorkedWriter


class FakeWriter:
    """What aiormq uses of a StreamWriter, recording each write that reaches the socket."""

    def __init__(self) -> None:
        self.sent: list[bytes] = []
        self.closing = False
        self.drained = 0
        self.transport = "the transport"

    def write(self, data: bytes) -> None:
        self.sent.append(data)

    async def drain(self) -> None:
        self.drained += 1

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        self.closing = True

    def write_eof(self) -> None:
        self.sent.append(b"<eof>")


def corked() -> tuple[_CorkedWriter, FakeWriter]:
    inner = FakeWriter()
    return _CorkedWriter(cast(Any, inner)), inner


async def test_writes_within_one_turn_leave_together_in_order() -> None:
    writer, inner = corked()
    for frame in (b"publish-1", b"publish-2", b"publish-3"):
        writer.write(frame)
    assert inner.sent == []  # nothing sent until the turn ends
    await asyncio.sleep(0)
    assert inner.sent == [b"publish-1publish-2publish-3"]
    writer.write(b"heartbeat")
    await asyncio.sleep(0)
    assert inner.sent[-1] == b"heartbeat"


async def test_drain_waits_for_the_transport_only_and_the_turn_still_sends_once() -> None:
    """aiormq drains after every publish: a drain that flushed would send each on its own."""
    writer, inner = corked()
    for frame in (b"publish-1", b"publish-2"):
        writer.write(frame)
        await writer.drain()
    assert (inner.sent, inner.drained) == ([], 2)
    await asyncio.sleep(0)
    assert inner.sent == [b"publish-1publish-2"]


async def test_close_and_eof_send_what_is_pending_first() -> None:
    writer, inner = corked()
    writer.write(b"a")
    await asyncio.sleep(0)
    writer.writelines([b"b", b"c"])
    writer.write_eof()
    assert inner.sent == [b"a", b"bc", b"<eof>"]
    writer.write(b"close-ok")
    writer.close()
    assert inner.sent[-1] == b"close-ok"
    await asyncio.sleep(0)  # the flush scheduled by the write finds nothing left
    assert inner.sent[-1] == b"close-ok"


async def test_nothing_is_written_to_a_closing_writer_and_the_rest_is_the_inner_one() -> None:
    writer, inner = corked()
    inner.closing = True
    writer.write(b"late")
    await asyncio.sleep(0)
    assert inner.sent == []
    assert writer.is_closing()
    assert writer.transport == "the transport"
