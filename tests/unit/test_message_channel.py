import datetime
import pickle

import pytest

from consumerd.errors import PayloadError, Reject, WorkerProtocolError
from consumerd.ipc.framing import encode_result, encode_units, frame, job_reader, result_reader
from consumerd.ipc.records import Job, Outcome, Result
from consumerd.message import Message


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


@pytest.mark.parametrize(
    "when",
    [
        datetime.datetime(2026, 1, 1, 12, 0, 0, 123456, tzinfo=datetime.UTC),
        datetime.datetime(2026, 1, 1, 12, 0, 0, 123456, tzinfo=datetime.timezone(datetime.timedelta(hours=2))),
        datetime.datetime(2026, 1, 1, 12, 0, 0, 123456),
        None,
    ],
)
def test_a_job_reaches_the_worker_with_every_field_and_the_publish_times_zone(when):
    """A UTC publish time travels without its tzinfo (cheaper to pickle) and comes back UTC."""
    msg = Message("m1", b"x", {"k": "v"}, when, 3, "key", "projects/p/subscriptions/s", "k")
    reader = job_reader()
    reader.feed(encode_units([Job(7, "t", msg, 2.5)]))
    (job,) = reader.take()[0]
    assert job == Job(7, "t", msg, 2.5)
    assert job.message.publish_time == when and (when is None or job.message.publish_time.tzinfo == when.tzinfo)
    assert job.message.idempotency_key == "v" and dict(job.message.attributes) == {"k": "v"}


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
    jobs = job_reader()
    results = result_reader()
    job_bytes, result_bytes = encode_units([Job(1, "t", make())]), encode_result(Result(1, Outcome.SUCCESS, 0.5))
    for i in range(max(len(job_bytes), len(result_bytes))):  # one byte at a time: the worst a stream can do
        jobs.feed(job_bytes[i : i + 1])
        results.feed(result_bytes[i : i + 1])
    [(job,)], [result] = jobs.take(), results.take()
    assert job.task == "t" and job.message.message_id == "m1"
    assert result == Result(1, Outcome.SUCCESS, 0.5)


def test_absurd_frame_length_is_a_protocol_error():
    with pytest.raises(WorkerProtocolError, match="exceeds"):
        job_reader().feed(b"\xff\xff\xff\xff" + b"x" * 10)


def test_a_result_frame_over_64_kib_is_a_protocol_error_before_it_is_buffered():
    with pytest.raises(WorkerProtocolError, match="exceeds 65536"):
        result_reader().feed(frame(b"x" * (64 * 1024 + 1))[:100])


def test_undecodable_frame_is_a_protocol_error():
    with pytest.raises(WorkerProtocolError, match="undecodable"):
        job_reader().feed(b"\x00\x00\x00\x05hello")
    with pytest.raises(WorkerProtocolError, match="undecodable"):
        result_reader().feed(b"\x00\x00\x00\x05hello")


def test_partial_frame_waits_for_the_rest():
    reader = result_reader()
    data = encode_result(Result(7, Outcome.ERROR, 0.1, "ValueError: x"))
    reader.feed(data[:-1])
    assert not reader.ready
    reader.feed(data[-1:])
    assert reader.ready.popleft().error == "ValueError: x"
