"""Length-prefixed pickle frames over a stream socket: the supervisor <-> worker channel.

A frame is a 4-byte big-endian length then a pickle. The reader is incremental and never blocks, so
a worker that writes half a frame, or garbage, cannot stall the supervisor's loop: garbage raises
WorkerProtocolError and the worker is treated as crashed.
"""

from __future__ import annotations

import collections
import pickle
import socket
import struct
from typing import Any

from .errors import WorkerProtocolError

_HEADER = struct.Struct(">I")
MAX_FRAME = 256 * 1024 * 1024  # far above Pub/Sub's 10 MB message limit; a larger length is garbage


def encode(obj: Any) -> bytes:
    payload = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    return _HEADER.pack(len(payload)) + payload


class FrameReader:
    def __init__(self) -> None:
        self._buffer = bytearray()
        self.ready: collections.deque[Any] = collections.deque()

    def feed(self, data: bytes) -> None:
        """Add received bytes; every complete frame is decoded onto ``ready``."""
        self._buffer += data
        while len(self._buffer) >= _HEADER.size:
            (length,) = _HEADER.unpack_from(self._buffer)
            if length > MAX_FRAME:
                raise WorkerProtocolError(f"frame length {length} exceeds {MAX_FRAME}")
            end = _HEADER.size + length
            if len(self._buffer) < end:
                break
            payload = bytes(self._buffer[_HEADER.size : end])
            del self._buffer[:end]
            self.ready.append(_decode(payload))

    @property
    def pending_bytes(self) -> int:
        return len(self._buffer)


def _decode(payload: bytes) -> Any:
    try:
        return pickle.loads(payload)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure means the peer is broken
        raise WorkerProtocolError(f"undecodable frame: {type(exc).__name__}: {exc}") from None


def recv_frame(sock: socket.socket, reader: FrameReader) -> Any | None:
    """Blocking read of one frame (the worker's side); None at end of stream."""
    while not reader.ready:
        chunk = sock.recv(1 << 20)
        if not chunk:
            return None
        reader.feed(chunk)
    return reader.ready.popleft()
