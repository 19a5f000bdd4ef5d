import datetime
import pickle

import pytest

from consumerd.channel import FrameReader, encode
from consumerd.errors import PayloadError, Reject, WorkerProtocolError
from consumerd.message import Message
from consumerd.protocol import Job, Result


def make(data: bytes = b'{"a": 1}', **attributes: str) -> Message:
    return Message("m1", data, attributes, datetime.datetime(2026, 1, 1, tzinfo=datetime.UTC), None, "", "projects/p/subscriptions/s")


def test_message_is_immutable_and_pickles_cheaply():
    msg = make(task="x")
    with pytest.raises(AttributeError):
        msg.data = b"other"  # type: ignore[misc]
    with pytest.raises(TypeError):
        msg.attributes["task"] = "y"  # type: ignore[index]
    copy = pickle.loads(pickle.dumps(msg))
    assert copy == msg and copy.attributes["task"] == "x"
    assert len(pickle.dumps(msg)) < 400


def test_message_payload_helpers():
    assert make().json() == {"a": 1}
    assert make(b"\xff").size == 1
    with pytest.raises(PayloadError, match="not utf-8 text"):
        make(b"\xff").json()
    with pytest.raises(PayloadError, match="not JSON") as err:
        make(b"not json").json()
    assert isinstance(err.value, ValueError) and isinstance(err.value, Reject)


def test_idempotency_key_prefers_the_configured_attribute():
    assert make().idempotency_key == "m1"
    keyed = Message("m2", b"", {"order": "A-17"}, None, None, "", "s", key_attribute="order")
    assert keyed.idempotency_key == "A-17"
    assert pickle.loads(pickle.dumps(keyed)).idempotency_key == "A-17"
    missing = Message("m3", b"", {}, None, None, "", "s", key_attribute="order")
    assert missing.idempotency_key == "m3"


def test_frames_survive_arbitrary_splits():
    frames = encode(Job(1, "t", make())) + encode(Result(1, "success", 0.5))
    reader = FrameReader()
    for i in range(len(frames)):  # one byte at a time: the worst a stream can do
        reader.feed(frames[i : i + 1])
    job, result = reader.ready
    assert job.task == "t" and job.message.message_id == "m1"
    assert result == Result(1, "success", 0.5)


def test_absurd_frame_length_is_a_protocol_error():
    with pytest.raises(WorkerProtocolError, match="exceeds"):
        FrameReader().feed(b"\xff\xff\xff\xff" + b"x" * 10)


def test_undecodable_frame_is_a_protocol_error():
    with pytest.raises(WorkerProtocolError, match="undecodable"):
        FrameReader().feed(b"\x00\x00\x00\x05hello")


def test_partial_frame_waits_for_the_rest():
    reader = FrameReader()
    frame = encode(Result(7, "error", 0.1, "ValueError: x"))
    reader.feed(frame[:-1])
    assert not reader.ready and reader.pending_bytes == len(frame) - 1
    reader.feed(frame[-1:])
    assert reader.ready.popleft().error == "ValueError: x"
