"""The native journal protocol against a real datagram socket: field caps, and the memfd path that
`sd_journal_send` uses for entries larger than one datagram (journald reads both)."""

from __future__ import annotations

import array
import os
import socket
import struct

from consumerd.adapters.journal import MAX_FIELD, JournalSender


def parse(data: bytes) -> dict[str, bytes]:
    """journald's reading of the native protocol (KEY=VALUE lines, or KEY, newline, length, value)."""
    fields, i = {}, 0
    while i < len(data):
        end = data.index(b"\n", i)
        line = data[i:end]
        if b"=" in line:
            key, value = line.split(b"=", 1)
            fields[key.decode()] = value
            i = end + 1
        else:
            (size,) = struct.unpack_from("<Q", data, end + 1)
            start = end + 9
            fields[line.decode()] = data[start : start + size]
            i = start + size + 1
    return fields


def receive(server: socket.socket) -> tuple[dict[str, bytes], bool]:
    """One entry, and whether it came in a memfd."""
    fds = array.array("i")
    data, ancdata, _, _ = server.recvmsg(1 << 20, socket.CMSG_SPACE(fds.itemsize))
    for level, kind, payload in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(payload)
    if not data and fds:  # the entry is in the memfd
        with os.fdopen(fds[0], "rb") as memfd:
            memfd.seek(0)
            return parse(memfd.read()), True
    return parse(data), False


def journal(tmp_path) -> tuple[socket.socket, JournalSender]:
    path = str(tmp_path / "journal.socket")
    server = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    server.bind(path)
    server.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
    return server, JournalSender(path)


def test_a_small_entry_is_one_datagram(tmp_path):
    server, sender = journal(tmp_path)
    assert sender.send({"MESSAGE": "hello", "CONSUMERD_ERROR": "two\nlines"})
    assert receive(server) == ({"MESSAGE": b"hello", "CONSUMERD_ERROR": b"two\nlines"}, False)


def test_a_huge_field_is_cut_and_an_entry_larger_than_a_datagram_travels_in_a_memfd(tmp_path):
    server, sender = journal(tmp_path)
    huge = "é" * 150_000  # a task's 300 KB error text
    fields = {"MESSAGE": "message.failed", **{f"CONSUMERD_F{i}": f"{i}" * 60_000 for i in range(6)}, "CONSUMERD_ERROR": huge}
    assert sender.send(fields) and sender.dropped == 0
    got, via_memfd = receive(server)
    assert via_memfd
    assert got["MESSAGE"] == b"message.failed" and len(got) == len(fields)  # all of it, none dropped
    assert len(got["CONSUMERD_ERROR"]) == MAX_FIELD and got["CONSUMERD_ERROR"].endswith(b"... [cut]")
    assert got["CONSUMERD_F5"] == b"5" * 60_000
