"""Read the few protobuf fields routing needs straight from raw request bytes.

The proxy forwards bytes it never re-serializes; to route it needs one or two string fields
(a session id, an envelope's message type). This module walks protobuf wire format just far
enough to find them.

Invariants:
- `scan` walks every top-level field of the buffer it is given and raises `WireError` on any
  malformed tag, varint, length or group, so a frame that is not a well-formed protobuf message
  at the levels the router reads is never routed (nor forwarded).
- Nothing here allocates more than the values it returns.
"""

from __future__ import annotations

from collections.abc import Sequence

_VARINT = 0
_I64 = 1
_LEN = 2
_I32 = 5


class WireError(ValueError):
    """The bytes are not a well-formed protobuf message."""


def _varint(buf: bytes, pos: int, end: int) -> tuple[int, int]:
    result = 0
    shift = 0
    while True:
        if pos >= end:
            raise WireError("truncated varint")
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result, pos
        shift += 7
        if shift >= 64:
            raise WireError("varint longer than 10 bytes")


def scan(buf: bytes, wanted: Sequence[int], start: int = 0, end: int | None = None) -> list:
    """Return the last occurrence of each wanted length-delimited field as `(start, end)` offsets.

    Entries are `None` for absent fields. Protobuf semantics: for a singular field the last
    occurrence wins. A wanted field that is present with a non-length wire type is an error.
    """
    if end is None:
        end = len(buf)
    found: list = [None] * len(wanted)
    pos = start
    while pos < end:
        key, pos = _varint(buf, pos, end)
        field = key >> 3
        wire_type = key & 7
        if field == 0:
            raise WireError("field number 0")
        if wire_type == _LEN:
            length, pos = _varint(buf, pos, end)
            stop = pos + length
            if stop > end:
                raise WireError(f"field {field} runs past the end of the message")
            if field in wanted:
                found[wanted.index(field)] = (pos, stop)
            pos = stop
            continue
        if field in wanted:
            raise WireError(f"field {field} has wire type {wire_type}, expected length-delimited")
        if wire_type == _VARINT:
            _, pos = _varint(buf, pos, end)
        elif wire_type == _I64:
            pos += 8
        elif wire_type == _I32:
            pos += 4
        else:
            raise WireError(f"field {field} has unsupported wire type {wire_type}")
        if pos > end:
            raise WireError(f"field {field} runs past the end of the message")
    return found


def text(buf: bytes, span: tuple[int, int] | None) -> str:
    """Decode a string field found by `scan` ("" when absent)."""
    if span is None:
        return ""
    try:
        return buf[span[0] : span[1]].decode("utf-8")
    except UnicodeDecodeError as exc:
        raise WireError("string field is not valid UTF-8") from exc
