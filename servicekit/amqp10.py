"""Just enough AMQP 1.0 decoding to read a message RabbitMQ keeps in a stream.

A stream stores each message in AMQP 1.0 form: sections (message annotations, properties,
application properties, data, ...), each a described value. A replay needs three things of
it: the body, the application properties (our AMQP 0.9.1 headers: the position, the
traceparent, a refill's bounds) and the producer (`app_id`). rstream's `amqp_decoder`
decodes every section into objects, in pure Python: about 80 µs a message here, more than
the rest of a replay's work on it. This decodes the maps it needs, skips the rest by their
sizes (the properties list is never decoded), and takes about 6 µs.

RabbitMQ 3.x writes `app_id` and `type` of an AMQP 0.9.1 message as `x-basic-app-id` and
`x-basic-type` in the application properties; later versions put them in the message
annotations. Both are read; neither is a header.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

_U16 = struct.Struct(">H").unpack_from
_U32 = struct.Struct(">I").unpack_from
_I32 = struct.Struct(">i").unpack_from
_U64 = struct.Struct(">Q").unpack_from
_I64 = struct.Struct(">q").unpack_from
_F32 = struct.Struct(">f").unpack_from
_F64 = struct.Struct(">d").unpack_from

# Section descriptors (smallulong codes of amqp:*:list/map/binary).
HEADER = 0x70
DELIVERY_ANNOTATIONS = 0x71
MESSAGE_ANNOTATIONS = 0x72
PROPERTIES = 0x73
APPLICATION_PROPERTIES = 0x74
DATA = 0x75
SEQUENCE = 0x76
VALUE = 0x77
FOOTER = 0x78

APP_ID = "x-basic-app-id"
BASIC_PREFIX = "x-basic-"


class DecodeError(ValueError):
    """Not an AMQP 1.0 message this module can read."""


@dataclass(frozen=True, slots=True)
class Decoded:
    body: bytes
    properties: dict[str, Any]  # application properties, x-basic-* removed
    app_id: str | None


def _fixed(width: int, read: Callable[[bytes, int], tuple[Any, ...]] | None = None) -> Any:
    def decode(buf: bytes, pos: int) -> tuple[Any, int]:
        if read is None:
            return buf[pos : pos + width], pos + width
        return read(buf, pos)[0], pos + width

    return decode


def _str(size_width: int) -> Any:
    def decode(buf: bytes, pos: int) -> tuple[Any, int]:
        if size_width == 1:
            n, pos = buf[pos], pos + 1
        else:
            n, pos = _U32(buf, pos)[0], pos + 4
        return buf[pos : pos + n].decode(), pos + n

    return decode


def _bin(size_width: int) -> Any:
    def decode(buf: bytes, pos: int) -> tuple[Any, int]:
        if size_width == 1:
            n, pos = buf[pos], pos + 1
        else:
            n, pos = _U32(buf, pos)[0], pos + 4
        return bytes(buf[pos : pos + n]), pos + n

    return decode


def _compound(size_width: int, is_map: bool) -> Any:
    def decode(buf: bytes, pos: int) -> tuple[Any, int]:
        if size_width == 1:
            count, pos = buf[pos + 1], pos + 2
        else:
            count, pos = _U32(buf, pos + 4)[0], pos + 8
        items = []
        for _ in range(count):
            item, pos = value(buf, pos)
            items.append(item)
        if is_map:
            return {_key(k): v for k, v in zip(items[::2], items[1::2], strict=True)}, pos
        return items, pos

    return decode


def _array(size_width: int) -> Any:
    def decode(buf: bytes, pos: int) -> tuple[Any, int]:
        if size_width == 1:
            count, pos = buf[pos + 1], pos + 2
        else:
            count, pos = _U32(buf, pos + 4)[0], pos + 8
        code = buf[pos]
        pos += 1
        if code == 0x00:
            raise DecodeError("described array elements are not supported")
        decode_one = _DECODERS.get(code)
        if decode_one is None:
            raise DecodeError(f"unknown AMQP 1.0 type 0x{code:02x}")
        items = []
        for _ in range(count):
            item, pos = decode_one(buf, pos)
            items.append(item)
        return items, pos

    return decode


def _described(buf: bytes, pos: int) -> tuple[Any, int]:
    _, pos = value(buf, pos)  # the descriptor: the value stands for itself here
    return value(buf, pos)


def _key(key: Any) -> Any:
    return key.decode() if isinstance(key, bytes) else key


def _const(constant: Any) -> Any:
    return lambda buf, pos: (constant, pos)


_DECODERS: dict[int, Any] = {
    0x00: _described,
    0x40: _const(None),
    0x41: _const(True),
    0x42: _const(False),
    0x43: _const(0),
    0x44: _const(0),
    0x45: _const([]),
    0x50: lambda buf, pos: (buf[pos], pos + 1),
    0x51: lambda buf, pos: (buf[pos] - 256 if buf[pos] > 127 else buf[pos], pos + 1),
    0x52: lambda buf, pos: (buf[pos], pos + 1),
    0x53: lambda buf, pos: (buf[pos], pos + 1),
    0x54: lambda buf, pos: (buf[pos] - 256 if buf[pos] > 127 else buf[pos], pos + 1),
    0x55: lambda buf, pos: (buf[pos] - 256 if buf[pos] > 127 else buf[pos], pos + 1),
    0x56: lambda buf, pos: (buf[pos] != 0, pos + 1),
    0x60: _fixed(2, _U16),
    0x61: _fixed(2, struct.Struct(">h").unpack_from),
    0x70: _fixed(4, _U32),
    0x71: _fixed(4, _I32),
    0x72: _fixed(4, _F32),
    0x73: lambda buf, pos: (chr(_U32(buf, pos)[0]), pos + 4),
    0x74: _fixed(4),
    0x80: _fixed(8, _U64),
    0x81: _fixed(8, _I64),
    0x82: _fixed(8, _F64),
    0x83: _fixed(8, _I64),  # timestamp: milliseconds since the epoch
    0x84: _fixed(8),
    0x94: _fixed(16),
    0x98: _fixed(16),
    0xA0: _bin(1),
    0xA1: _str(1),
    0xA3: _str(1),
    0xB0: _bin(4),
    0xB1: _str(4),
    0xB3: _str(4),
    0xC0: _compound(1, is_map=False),
    0xC1: _compound(1, is_map=True),
    0xD0: _compound(4, is_map=False),
    0xD1: _compound(4, is_map=True),
    0xE0: _array(1),
    0xF0: _array(4),
}


def value(buf: bytes, pos: int) -> tuple[Any, int]:
    """The AMQP 1.0 value at `pos`, and the position after it."""
    try:
        decode = _DECODERS[buf[pos]]
    except KeyError:
        raise DecodeError(f"unknown AMQP 1.0 type 0x{buf[pos]:02x}") from None
    except IndexError:
        raise DecodeError("truncated AMQP 1.0 message") from None
    result: tuple[Any, int] = decode(buf, pos + 1)
    return result


def _skip(buf: bytes, pos: int) -> int:
    """The position after the value at `pos`: compound values are skipped by their size."""
    code = buf[pos]
    if code in (0xC0, 0xC1, 0xE0):
        return pos + 2 + buf[pos + 1]
    if code in (0xD0, 0xD1, 0xF0):
        return pos + 5 + int(_U32(buf, pos + 1)[0])
    after: int = value(buf, pos)[1]
    return after


def _map(buf: bytes, pos: int) -> tuple[dict[str, Any], int]:
    """A map at `pos`, with the shapes headers take read inline (string keys, string and
    small integer values): a call per entry less, the cost that matters here."""
    code = buf[pos]
    if code == 0xC1:
        count, pos = buf[pos + 2], pos + 3
    elif code == 0xD1:
        count, pos = _U32(buf, pos + 5)[0], pos + 9
    elif code == 0x40:
        return {}, pos + 1
    else:
        raise DecodeError(f"expected a map, found type 0x{code:02x}")
    out: dict[str, Any] = {}
    for _ in range(count // 2):
        code = buf[pos]
        if code in (0xA1, 0xA3):  # str8, sym8
            n = buf[pos + 1]
            key = buf[pos + 2 : pos + 2 + n].decode()
            pos += 2 + n
        else:
            raw, pos = value(buf, pos)
            key = _key(raw)
        code = buf[pos]
        if code == 0xA1:
            n = buf[pos + 1]
            out[key] = buf[pos + 2 : pos + 2 + n].decode()
            pos += 2 + n
        elif code in (0x51, 0x54, 0x55):  # byte, smallint, smalllong
            b = buf[pos + 1]
            out[key] = b - 256 if b > 127 else b
            pos += 2
        elif code == 0x81:  # long
            out[key] = _I64(buf, pos + 1)[0]
            pos += 9
        else:
            out[key], pos = value(buf, pos)
    return out, pos


_APP_ID = APP_ID.encode()


def decode(message: bytes) -> Decoded:
    """The body, application properties and app id of a stream message."""
    buf = message
    pos, end = 0, len(buf)
    body = b""
    properties: dict[str, Any] = {}
    app_id: Any = None
    try:
        while pos < end:
            if buf[pos] != 0x00:
                raise DecodeError(f"expected a section at byte {pos}")
            if buf[pos + 1] == 0x53:
                code, pos = buf[pos + 2], pos + 3
            elif buf[pos + 1] == 0x80:
                code, pos = _U64(buf, pos + 2)[0], pos + 10
            else:
                raise DecodeError("a section descriptor that is not a code")
            if code == APPLICATION_PROPERTIES:
                properties, pos = _map(buf, pos)
            elif code == DATA:
                if buf[pos] == 0xB0:
                    n = _U32(buf, pos + 1)[0]
                    chunk, pos = buf[pos + 5 : pos + 5 + n], pos + 5 + n
                else:
                    chunk, pos = value(buf, pos)
                body = chunk if not body else body + chunk
            elif code == MESSAGE_ANNOTATIONS:
                after = _skip(buf, pos)
                if _APP_ID in buf[pos:after]:  # RabbitMQ 3.13 and later put it here
                    app_id = _map(buf, pos)[0].get(APP_ID)
                pos = after
            elif code == VALUE:
                content, pos = value(buf, pos)
                body = content.encode() if isinstance(content, str) else bytes(content or b"")
            else:
                pos = _skip(buf, pos)
    except (IndexError, struct.error, UnicodeDecodeError, TypeError) as exc:
        raise DecodeError(f"not a readable AMQP 1.0 message: {exc}") from None
    if APP_ID in properties:
        app_id = properties[APP_ID]
    if any(k.startswith(BASIC_PREFIX) for k in properties):
        properties = {k: v for k, v in properties.items() if not k.startswith(BASIC_PREFIX)}
    return Decoded(bytes(body), properties, None if app_id is None else str(app_id))
