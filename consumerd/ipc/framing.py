"""Length-prefixed frames over a stream socket: the supervisor <-> worker channel.

A frame is a 4-byte big-endian length then a payload. Jobs (supervisor -> worker) are pickles: the
supervisor is trusted. Results (worker -> supervisor) are JSON decoded by `Result.decode`, with a
64 KiB limit: a worker runs task code, so what it sends is data to validate, never code to run.
The reader is incremental and never blocks, so a worker that writes half a frame, or garbage,
cannot stall the supervisor's loop: garbage raises WorkerProtocolError and the worker is treated as
crashed.
"""

from __future__ import annotations

import array
import collections
import dataclasses
import os
import pickle
import socket
import struct
from collections.abc import Callable
from typing import Any, Generic, Protocol, TypeVar

from consumerd.errors import WorkerProtocolError
from consumerd.ipc.outputs import MARK, Output, OutputsTooLarge, PublishRules
from consumerd.ipc.outputs import MAX_FRAME as MAX_OUTPUT_FRAME
from consumerd.ipc.records import MAX_PACKET, MAX_RESULT_FRAME, ControlPacket, Outcome, Result, Unit, decode_control, encode_control

T = TypeVar("T")
_HEADER = struct.Struct(">I")
MAX_JOB_FRAME = 256 * 1024 * 1024  # far above Pub/Sub's 10 MB message limit; a larger length is garbage

SEND_TIMEOUT = 30.0  # seconds to hand frames to an idle worker (a 10 MB message takes milliseconds)


def frame(payload: bytes) -> bytes:
    return _HEADER.pack(len(payload)) + payload


def encode_units(units: list[Unit]) -> bytes:
    """One frame carrying every job for one worker from one dispatch pass (fewer crossings)."""
    return frame(pickle.dumps(tuple(units), protocol=pickle.HIGHEST_PROTOCOL))


def encode_result(result: Result) -> bytes:
    """A result, after a frame for each output of a success (the supervisor pairs them by seq)."""
    outputs = b"".join(frame(output.encode()) for output in result.outputs) if result.outcome is Outcome.SUCCESS else b""
    return outputs + frame(result.encode())


class FrameReader(Generic[T]):
    def __init__(self, decode: Callable[[bytes], T], max_frame: int) -> None:
        self._decode = decode
        self._max_frame = max_frame
        self._buffer = bytearray()
        self.ready: collections.deque[T] = collections.deque()

    def feed(self, data: bytes) -> None:
        """Add received bytes; every complete frame is decoded onto ``ready``."""
        self._buffer += data
        while len(self._buffer) >= _HEADER.size:
            (length,) = _HEADER.unpack_from(self._buffer)
            if length > self._max_frame:
                raise WorkerProtocolError(f"frame length {length} exceeds {self._max_frame}")
            end = _HEADER.size + length
            if len(self._buffer) < end:
                break
            payload = bytes(self._buffer[_HEADER.size : end])
            del self._buffer[:end]
            self.ready.append(self._decode(payload))

    def take(self) -> list[T]:
        frames = list(self.ready)
        self.ready.clear()
        return frames


class ResultReader:
    """The supervisor's side: JSON results of 64 KiB at most, each after the outputs its task
    published (frames of up to ~10 MB, `ipc.outputs`), held here until their result arrives and
    bounded by ``rules``: a worker that sends more is broken (WorkerProtocolError)."""

    def __init__(self, rules: PublishRules = PublishRules()) -> None:
        self._rules = rules
        self._buffer = bytearray()
        self._outputs: dict[int, list[Output]] = {}
        self._bytes: dict[int, int] = {}  # their sizes, per seq
        self.ready: collections.deque[Result] = collections.deque()

    def feed(self, data: bytes) -> None:
        self._buffer += data
        while len(self._buffer) > _HEADER.size or self._buffer[: _HEADER.size] == bytes(_HEADER.size):
            (length,) = _HEADER.unpack_from(self._buffer)
            if not length:
                raise WorkerProtocolError("empty frame")
            is_output = self._buffer[_HEADER.size : _HEADER.size + 1] == MARK
            limit = MAX_OUTPUT_FRAME if is_output else MAX_RESULT_FRAME
            if length > limit:
                raise WorkerProtocolError(f"frame length {length} exceeds {limit}")
            end = _HEADER.size + length
            if len(self._buffer) < end:
                break
            payload = bytes(self._buffer[_HEADER.size : end])
            del self._buffer[:end]
            if is_output:
                self._hold(Output.decode(payload))
            else:
                self._done(Result.decode(payload))

    def _hold(self, output: Output) -> None:
        held = self._outputs.setdefault(output.seq, [])
        held.append(output)
        self._bytes[output.seq] = self._bytes.get(output.seq, 0) + output.size
        if len(held) > self._rules.max_outputs or self._bytes[output.seq] > self._rules.max_bytes:
            raise OutputsTooLarge(f"outputs of job {output.seq} exceed {self._rules.max_outputs} or {self._rules.max_bytes} bytes")

    def _done(self, result: Result) -> None:
        outputs = self._outputs.pop(result.seq, [])
        self._bytes.pop(result.seq, None)
        if outputs and result.outcome is Outcome.SUCCESS:
            result = dataclasses.replace(result, outputs=tuple(outputs))
        self.ready.append(result)

    def take(self) -> list[Result]:
        results = list(self.ready)
        self.ready.clear()
        return results


def result_reader(rules: PublishRules = PublishRules()) -> ResultReader:
    return ResultReader(rules)


def job_reader() -> FrameReader[Any]:
    """The worker's side: pickled jobs from the (trusted) supervisor."""
    return FrameReader(_unpickle, MAX_JOB_FRAME)


def _unpickle(payload: bytes) -> Any:
    try:
        return pickle.loads(payload)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure means the peer is broken
        raise WorkerProtocolError(f"undecodable frame: {type(exc).__name__}: {exc}") from None


class Reader(Protocol[T]):
    ready: collections.deque[T]

    def feed(self, data: bytes) -> None: ...


def recv_frame(sock: socket.socket, reader: Reader[T]) -> T | None:
    """Blocking read of one frame (the worker's side); None at end of stream."""
    while not reader.ready:
        chunk = sock.recv(1 << 20)
        if not chunk:
            return None
        reader.feed(chunk)
    return reader.ready.popleft()


def send_packet(sock: socket.socket, packet: ControlPacket, fds: list[int] | None = None) -> None:
    """One packet to the other end of the fork server's control socket, with descriptors to pass."""
    data = encode_control(packet)
    if fds:
        socket.send_fds(sock, [data], fds)
    else:
        sock.send(data)


def recv_packet(sock: socket.socket) -> tuple[object, int | None]:
    """One packet from the fork server's control socket and the descriptor that came with it, if any.

    Raises WorkerProtocolError when the fork server is gone, broke the protocol, or a descriptor was
    lost in transit; a descriptor that came with a bad packet is closed, never leaked.
    """
    fds = array.array("i")
    data, ancdata, flags, _ = sock.recvmsg(MAX_PACKET, socket.CMSG_SPACE(fds.itemsize))
    for level, kind, payload in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(payload[: len(payload) - len(payload) % fds.itemsize])
    if flags & socket.MSG_CTRUNC or len(fds) > 1:
        for fd in fds:
            os.close(fd)
        raise WorkerProtocolError("a worker's channel was lost in transit (MSG_CTRUNC: out of file descriptors?)")
    if not data:
        raise WorkerProtocolError("fork server exited")
    try:
        packet = decode_control(data)
    except WorkerProtocolError as exc:
        for fd in fds:
            os.close(fd)
        raise WorkerProtocolError(f"fork server broke the protocol: {exc}") from None
    return packet, (fds[0] if fds else None)


def send_frames(sock: socket.socket, data: bytes, timeout: float = SEND_TIMEOUT) -> None:
    """Send without blocking when the socket buffer takes it all (always, for small jobs); a large
    message that does not fit waits up to ``timeout`` seconds for the idle worker to read it."""
    try:
        sent = sock.send(data)
    except BlockingIOError:
        sent = 0
    if sent < len(data):
        sock.settimeout(timeout)
        try:
            sock.sendall(memoryview(data)[sent:])
        finally:
            sock.setblocking(False)
