"""The wire format between the host and the guest agent (``agent.c``), both directions.

Framing. The only channel is the guest's serial console (a 16550 UART), which the guest
puts in raw mode (no echo, no line editing, no length limit, 8-bit clean).

- Host to guest, binary: ``b"MS1B"``, ``u32 length``, the payload, ``u32 CRC-32`` (zlib's)
  of the payload. The guest skips bytes until the magic and drops a frame whose CRC does
  not check out. Binary because this direction is the slow one: bytes into the guest
  cross the emulated UART a FIFO's worth per interrupt under TCG (measured here: 80 KB/s
  of hex, 250 KB/s of binary), so hex would double the cost of every call.
- Guest to host, one text line per frame::

      "\\n@MS1 " HEX(payload) " " CRC32-HEX(payload) "\\n"

  because the kernel prints on the same console: a reader looks for the magic ``@MS1``
  and skips anything else (boot messages, a panic, a warning), and drops a line whose
  hex or CRC-32 does not check out. This direction is several times faster (the guest
  writes whole lines; QEMU does not pace them).

Payloads. All integers little-endian.

- request: ``u32 seq, u32 ncalls``, then per call ``u8 op, u32 len, args``;
- reply: ``u32 seq, u32 ncalls``, then per call ``i64 ret, i32 errno, u32 len, output``.

One request carries a whole batch of calls, executed in order; its reply answers every
call (a guest crash mid-batch shows as a missing reply). A request whose ``ncalls`` is
:data:`RESEND` asks the agent for its last frame again: the host sends it when a frame
arrived damaged (a kernel message written into the middle of the line), so a damaged
answer costs a round trip, not a timeout. The ready frame the agent sends
once at start-up is text: ``READY release machine pagesize kvmfd kvmerrno apiversion``
followed by `` module=errno`` for each module it loaded.

The operations (op codes and argument layouts) are described in ``agent.c``; the
``encode_*`` functions here build their arguments.
"""

from __future__ import annotations

import binascii
import struct
import zlib
from dataclasses import dataclass
from typing import Final

__all__ = [
    "MAGIC",
    "OP_CLOSE",
    "OP_FSTAT",
    "OP_INFO",
    "OP_IOCTL",
    "OP_MMAP",
    "OP_MUNMAP",
    "OP_OPEN",
    "OP_PEEK",
    "OP_POKE",
    "REQ_MAGIC",
    "RESEND",
    "Call",
    "FrameReader",
    "ProtocolError",
    "Reply",
    "decode_reply",
    "decode_request_frames",
    "decode_sparse",
    "encode_call",
    "encode_frame",
    "encode_ioctl",
    "encode_request",
    "encode_request_frame",
    "encode_resend",
]

#: the start of every guest-to-host frame line
MAGIC: Final = b"@MS1 "
#: the start of every host-to-guest frame
REQ_MAGIC: Final = b"MS1B"

OP_IOCTL: Final = 1
OP_OPEN: Final = 2
OP_CLOSE: Final = 3
OP_MMAP: Final = 4
OP_MUNMAP: Final = 5
OP_PEEK: Final = 6
OP_POKE: Final = 7
OP_INFO: Final = 8
OP_FSTAT: Final = 9

#: OP_IOCTL flags: return the argument structure after the call / the buffer, sparse
IOCTL_RETURN_ARG: Final = 1
IOCTL_RETURN_BUF: Final = 2

#: ``ncalls`` of a request asking for the agent's last frame again
RESEND: Final = 0xFFFFFFFF

#: the longest payload either side accepts (the agent's limit)
MAX_PAYLOAD: Final = 64 << 20

_U32 = struct.Struct("<I")
_HEADER = struct.Struct("<II")
_CALL = struct.Struct("<BI")
_RESULT = struct.Struct("<qiI")


class ProtocolError(Exception):
    """A reply that does not fit the request (wrong sequence number or call count, a
    truncated payload)."""


@dataclass(frozen=True, slots=True)
class Call:
    """One operation of a batch: its op code and encoded arguments."""

    op: int
    args: bytes = b""


@dataclass(frozen=True, slots=True)
class Reply:
    """The agent's answer to one call: the return value, errno (0 on success) and the
    output bytes."""

    ret: int
    errno: int
    data: bytes


def encode_frame(payload: bytes) -> bytes:
    """The guest-to-host frame line carrying ``payload`` (what the agent writes)."""
    crc = zlib.crc32(payload) & 0xFFFFFFFF
    return b"\n" + MAGIC + binascii.hexlify(payload) + b" %08x\n" % crc


def encode_request_frame(payload: bytes) -> bytes:
    """The host-to-guest binary frame carrying ``payload``."""
    if len(payload) > MAX_PAYLOAD:
        raise ValueError(f"a {len(payload)}-byte request exceeds {MAX_PAYLOAD} bytes")
    return REQ_MAGIC + _U32.pack(len(payload)) + payload + _U32.pack(zlib.crc32(payload))


def decode_request_frames(data: bytes) -> list[bytes]:
    """The payloads of the valid binary frames in ``data`` (the agent's reader, in
    Python: for tests)."""
    out: list[bytes] = []
    pos = 0
    while True:
        at = data.find(REQ_MAGIC, pos)
        if at < 0 or at + 8 > len(data):
            return out
        (n,) = _U32.unpack_from(data, at + 4)
        end = at + 8 + n
        if n > MAX_PAYLOAD or end + 4 > len(data):
            pos = at + 1
            continue
        payload = data[at + 8 : end]
        if _U32.unpack_from(data, end)[0] == zlib.crc32(payload):
            out.append(payload)
            pos = end + 4
        else:
            pos = at + 1


class FrameReader:
    """Extracts frames from a byte stream that also carries other text.

    :meth:`feed` takes bytes as they arrive and returns the payloads of the complete,
    valid frames in them; everything else is kept (the last lines) for error messages:
    :meth:`tail`.
    """

    def __init__(self, keep_lines: int = 10) -> None:
        self._pending = b""
        self._keep = keep_lines
        self._lines: list[bytes] = []
        #: frames dropped for a bad checksum or bad hex
        self.bad_frames = 0

    def feed(self, data: bytes) -> list[bytes]:
        """Add ``data``; return the payloads of the frames it completed, in order.
        O(len(data)) amortised: a long frame arriving in many chunks is split into lines
        once, when its newline comes."""
        self._pending += data
        if b"\n" not in data:
            return []
        frames: list[bytes] = []
        *lines, self._pending = self._pending.split(b"\n")
        for line in lines:
            at = line.find(MAGIC)
            if at < 0:
                text = line.rstrip(b"\r")
                if text.strip():
                    self._lines.append(text)
                    del self._lines[: -self._keep]
                continue
            if line[:at].strip():
                self._lines.append(line[:at])
            payload = _parse_frame(line[at + len(MAGIC) :].rstrip(b"\r"))
            if payload is None:
                self.bad_frames += 1
            else:
                frames.append(payload)
        return frames

    def tail(self) -> list[str]:
        """The last non-frame lines seen (console output), decoded leniently."""
        lines = [*self._lines]
        if self._pending.strip() and MAGIC not in self._pending:
            lines.append(self._pending)
        return [ln.decode("utf-8", "replace") for ln in lines[-self._keep :]]


def _parse_frame(body: bytes) -> bytes | None:
    """The payload of a frame line's body (after the magic), or None if it is damaged."""
    hexpart, sep, crcpart = body.rpartition(b" ")
    if not sep or len(crcpart) != 8:
        return None
    try:
        payload = binascii.unhexlify(hexpart)
        crc = int(crcpart, 16)
    except (ValueError, binascii.Error):
        return None
    if zlib.crc32(payload) & 0xFFFFFFFF != crc:
        return None
    return payload


def encode_call(call: Call) -> bytes:
    """One call as it appears in a request payload."""
    return _CALL.pack(call.op, len(call.args)) + call.args


def encode_request(seq: int, calls: list[Call]) -> bytes:
    """The request payload for a batch."""
    return _HEADER.pack(seq, len(calls)) + b"".join(encode_call(c) for c in calls)


def encode_resend() -> bytes:
    """The request payload asking for the last frame again."""
    return _HEADER.pack(0, RESEND)


def decode_reply(payload: bytes, seq: int, ncalls: int) -> list[Reply]:
    """The replies of a reply payload, checked against the request it answers."""
    if len(payload) < _HEADER.size:
        raise ProtocolError("truncated reply")
    got_seq, n = _HEADER.unpack_from(payload)
    if got_seq != seq:
        raise ProtocolError(f"reply to request {got_seq}, expected {seq}")
    if n != ncalls:
        raise ProtocolError(f"the agent answered {n} of {ncalls} calls (a malformed call)")
    pos = _HEADER.size
    replies: list[Reply] = []
    for _ in range(n):
        if pos + _RESULT.size > len(payload):
            raise ProtocolError("truncated reply")
        ret, err, length = _RESULT.unpack_from(payload, pos)
        pos += _RESULT.size
        data = payload[pos : pos + length]
        if len(data) != length:
            raise ProtocolError("truncated reply")
        pos += length
        replies.append(Reply(ret, err, data))
    if pos != len(payload):
        raise ProtocolError("trailing bytes in reply")
    return replies


def encode_ioctl(
    fd: int,
    request: int,
    intarg: int = 0,
    arg: bytes = b"",
    *,
    return_arg: bool = False,
    buf_offset: int = 0,
    buf_len: int = 0,
    buf_in: bytes = b"",
    return_buf: bool = False,
) -> Call:
    """An ``OP_IOCTL`` call: ``ioctl(fd, request, intarg)`` when ``arg`` is empty, else
    ``ioctl(fd, request, &copy_of_arg)``; with ``buf_len``, a guest buffer of that many
    bytes (``buf_in`` then zeros, ending at a guard page) whose address is stored at
    ``buf_offset`` of the argument."""
    flags = (IOCTL_RETURN_ARG if return_arg else 0) | (IOCTL_RETURN_BUF if return_buf else 0)
    args = (
        struct.pack("<IQQII", fd, request, intarg & 0xFFFFFFFFFFFFFFFF, flags, len(arg))
        + arg
        + struct.pack("<III", buf_offset, buf_len, len(buf_in))
        + buf_in
    )
    return Call(OP_IOCTL, args)


def decode_sparse(data: bytes, nbytes: int) -> bytes:
    """The buffer of ``nbytes`` bytes that a sparse list (``u32 count``, then ``u32
    index, u64 word`` per non-zero word) describes; ``data`` may have bytes before the
    list (the returned argument), which are skipped from the end's point of view: pass
    exactly the list."""
    (count,) = struct.unpack_from("<I", data)
    out = bytearray(nbytes)
    for k in range(count):
        index, word = struct.unpack_from("<IQ", data, 4 + 12 * k)
        at = 8 * index
        if at >= nbytes:
            raise ProtocolError(f"sparse word {index} outside a {nbytes}-byte buffer")
        chunk = word.to_bytes(8, "little")[: nbytes - at]
        out[at : at + len(chunk)] = chunk
    return bytes(out)
