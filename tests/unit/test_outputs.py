"""Task outputs (`consumerd.publish`): the wire record, the worker's buffer and limits, the
supervisor's relay (ack only after the outputs were accepted), and the publisher's requests."""

from __future__ import annotations

import dataclasses
import json

import pydantic
import pytest

from consumerd import PublishError, publish
from consumerd.adapters.pubsub.publisher import OutputBatch, OutputPublisher, OutputsPublished, requests
from consumerd.errors import WorkerProtocolError
from consumerd.ipc.framing import encode_result, frame, result_reader
from consumerd.ipc.inbox import Inbox
from consumerd.ipc.outputs import MAX_DATA, SOURCE_ATTRIBUTE, Output, OutputsTooLarge, PublishRules, problem_of
from consumerd.ipc.records import Outcome, Result
from consumerd.testing import run_task
from consumerd.worker.outputs import Outputs, collecting, encoded
from tests.unit.fakes import Harness, write_config

TOPIC = "projects/p/topics/out"


# -- the record that crosses from the worker ------------------------------------------------------
def test_an_output_crosses_as_raw_bytes_with_its_header_and_decodes_to_itself():
    output = Output(7, TOPIC, bytes(range(256)) * 3, {"stage": "enriched", "ü": "ß"}, "key-1")
    assert Output.decode(output.encode()) == output
    assert output.size == 768 + len("stage") + len("enriched") + 2 + 2 + len("key-1")


@pytest.mark.parametrize(
    ("header", "error"),
    [
        ({"seq": 0, "topic": TOPIC, "attributes": {}, "ordering_key": ""}, "seq must be a positive integer"),
        ({"seq": 1, "topic": "", "attributes": {}, "ordering_key": ""}, "a topic is 1 to"),
        ({"seq": 1, "topic": TOPIC, "attributes": {"a": 1}, "ordering_key": ""}, "must be text"),
        ({"seq": 1, "topic": TOPIC, "attributes": {SOURCE_ATTRIBUTE: "x"}, "ordering_key": ""}, "is set by consumerd"),
        ({"seq": 1, "topic": TOPIC, "attributes": {"googx": "v"}, "ordering_key": ""}, "not starting with 'goog'"),
        ({"seq": 1, "topic": TOPIC, "attributes": {}, "ordering_key": "k" * 1025}, "ordering key is at most"),
        ({"seq": 1, "topic": TOPIC, "attributes": {}}, "expected a header"),
    ],
)
def test_a_bad_output_header_is_a_protocol_error(header, error):
    head = json.dumps(header).encode()
    with pytest.raises(WorkerProtocolError, match=error):
        Output.decode(b"O" + len(head).to_bytes(4, "big") + head + b"data")


def test_a_header_length_past_the_frame_is_a_protocol_error():
    with pytest.raises(WorkerProtocolError, match="header length"):
        Output.decode(b"O" + (10**6).to_bytes(4, "big") + b"{}")


def test_outputs_reach_the_supervisor_with_a_success_only():
    reader = result_reader(PublishRules(frozenset({TOPIC})))
    outputs = (Output(1, TOPIC, b"a"), Output(1, TOPIC, b"b"))
    reader.feed(encode_result(Result(1, Outcome.SUCCESS, 0.1, outputs=outputs)))
    # A worker that sent outputs and then a failure: the outputs go with the failure, unpublished.
    reader.feed(frame(Output(2, TOPIC, b"c").encode()) + encode_result(Result(2, Outcome.ERROR, 0.1, "ValueError: x")))
    first, second = reader.take()
    assert first.outputs == outputs and second.outputs == ()


def test_more_outputs_than_the_rules_allow_are_a_protocol_error_in_the_supervisor():
    reader = result_reader(PublishRules(max_bytes=100, max_outputs=2))
    reader.feed(frame(Output(1, TOPIC, b"x" * 60).encode()))
    with pytest.raises(OutputsTooLarge):
        reader.feed(frame(Output(1, TOPIC, b"x" * 60).encode()))
    reader = result_reader(PublishRules(max_bytes=10**6, max_outputs=2))
    reader.feed(b"".join(frame(Output(1, TOPIC, b"x").encode()) for _ in range(2)))
    with pytest.raises(OutputsTooLarge):
        reader.feed(frame(Output(1, TOPIC, b"x").encode()))


def test_an_output_frame_over_10_mb_is_refused_from_its_length_alone():
    with pytest.raises(WorkerProtocolError, match="exceeds"):
        result_reader().feed((MAX_DATA + 300_000).to_bytes(4, "big") + b"O")


def test_a_result_frame_over_64_kib_is_still_refused():
    with pytest.raises(WorkerProtocolError, match="exceeds 65536"):
        result_reader().feed((64 * 1024 + 1).to_bytes(4, "big") + b"[")


# -- the worker's buffer ------------------------------------------------------------------------
class Order(pydantic.BaseModel):
    id: int


@dataclasses.dataclass
class Point:
    x: int


def test_data_is_encoded_as_bytes_text_or_json():
    assert encoded(b"\x00raw") == b"\x00raw" and encoded("é") == "é".encode()
    assert encoded(Order(id=3)) == b'{"id":3}' and encoded({"a": [1]}) == b'{"a":[1]}' and encoded(Point(1)) == b'{"x":1}'
    with pytest.raises(PublishError, match="neither bytes, text nor JSON-serialisable"):
        encoded(object())


def test_the_worker_refuses_what_the_rules_do_not_allow():
    rules = PublishRules(frozenset({TOPIC}), max_bytes=100, max_outputs=2, project="p")
    with collecting(1, rules=rules) as outputs:
        publish("out", b"x" * 40, stage="1")  # a short name resolves against the project
        with pytest.raises(PublishError, match="'projects/p/topics/other' is not in \\[publish\\] topics"):
            publish("other", b"x")
        with pytest.raises(PublishError, match="exceed 100 bytes"):
            publish("out", b"x" * 70)
        publish("out", b"y")
        with pytest.raises(PublishError, match="at most 2 outputs"):
            publish("out", b"z")
        with pytest.raises(PublishError, match="is set by consumerd"):
            Outputs(2, rules).add("out", b"", "", {SOURCE_ATTRIBUTE: "forged"})
    assert [o.data for o in outputs.items] == [b"x" * 40, b"y"] and outputs.items[0].topic == TOPIC
    with collecting(3, rules=PublishRules()):
        with pytest.raises(PublishError, match="publishing is off"):
            publish("out", b"")
    with collecting(4, batch=True, rules=rules):
        with pytest.raises(PublishError, match="batch task"):
            publish("out", b"")


def test_publish_outside_a_task_is_an_error():
    with pytest.raises(RuntimeError, match="inside a running task only"):
        publish("out", b"x")


def fails_after_publishing(msg):
    publish("out", b"never")
    raise ValueError("after publishing")


def publishes_twice(msg):
    publish("out", {"n": 1}, ordering_key="k", kind="a")
    publish("out", Order(id=2))


def test_run_task_reports_the_outputs_of_a_success_only_and_applies_an_allow_list():
    done = run_task(publishes_twice, b"")
    assert done.acked and [p.data for p in done.published] == [b'{"n":1}', b'{"id":2}']
    assert done.published[0].attributes == {"kind": "a", SOURCE_ATTRIBUTE: done.message_id} and done.published[0].ordering_key == "k"
    failed = run_task(fails_after_publishing, b"")
    assert failed.failed == "ValueError: after publishing" and failed.published == []
    refused = run_task(publishes_twice, b"", publish_topics=["elsewhere"])
    assert refused.failed and "is not in [publish] topics" in refused.failed and refused.published == []
    isolated = run_task(publishes_twice, b"", isolated=True)
    assert isolated.published == [  # the same outputs from a forked worker, with its message's id
        dataclasses.replace(p, attributes={**p.attributes, SOURCE_ATTRIBUTE: isolated.message_id}) for p in done.published
    ]


def test_problem_of_counts_the_attribute_consumerd_adds():
    assert problem_of(TOPIC, b"", {f"a{i}": "v" for i in range(99)}, "") == ""
    assert "at most 99 attributes" in problem_of(TOPIC, b"", {f"a{i}": "v" for i in range(100)}, "")


# -- the publisher thread's requests ----------------------------------------------------------------
def test_requests_go_per_topic_in_order_within_the_size_and_count_limits():
    outputs = [(TOPIC, b"x" * 4_000_000, {}, "") for _ in range(3)] + [("projects/p/topics/b", b"y", {}, "k")] * 1001
    got = requests(outputs)
    assert [(t, len(m)) for t, m in got] == [(TOPIC, 2), (TOPIC, 1), ("projects/p/topics/b", 1000), ("projects/p/topics/b", 1)]


def test_the_publisher_retries_a_transient_failure_and_does_not_resend_what_was_accepted():
    sent: list[tuple[str, int]] = []
    failures = iter([None, RuntimeError("unavailable"), None])

    def publish(topic, messages):
        sent.append((topic, len(messages)))
        if (error := next(failures)) is not None:
            raise error
        return ["id"] * len(messages)

    inbox = Inbox()
    publisher = OutputPublisher(publish, inbox, lambda exc: True)
    publisher._stopping.wait = lambda _s: False  # no backoff sleep in a unit test
    report = publisher._deliver(OutputBatch("ack-1", [("t1", b"a", {}, ""), ("t2", b"b", {}, "")]))
    assert report == OutputsPublished("ack-1", True, published=2)
    assert sent == [("t1", 1), ("t2", 1), ("t2", 1)]  # t1 went once; t2 was retried
    permanent = OutputPublisher(lambda t, m: (_ for _ in ()).throw(ValueError("NotFound")), inbox, lambda exc: False)
    assert permanent._deliver(OutputBatch("ack-2", [("t1", b"a", {}, "")])) == OutputsPublished(
        "ack-2", False, "t1: ValueError: NotFound", 0
    )


# -- the supervisor: ack only after the outputs were accepted -----------------------------------------
@pytest.fixture
def h(tmp_path):
    return Harness(write_config(tmp_path / "c.toml", '[workers]\nconcurrency = 2\n[publish]\ntopics = ["out"]\n'))


def finish_with_outputs(h, message_id, *outputs):
    h.finish(message_id, Outcome.SUCCESS, outputs=outputs)


def test_a_success_with_outputs_is_acked_only_once_they_were_published(h):
    h.pull(h.message(data=b"12345"))
    finish_with_outputs(h, "m1", Output(1, TOPIC, b"x" * 1000, {"a": "b"}))
    [batch] = h.components.publisher.batches
    assert batch.outputs == [(TOPIC, b"x" * 1000, {"a": "b", SOURCE_ATTRIBUTE: "m1"}, "")]
    assert h.acker.acked == [] and h.stream.settler.publishing() == 1
    assert h.stream.backlog.held_bytes >= 1000 and h.stream.backlog.running_bytes == 1002  # the outputs weigh in the budget
    h.stream.inbox.post(OutputsPublished("ack-m1", True, published=1))
    h.sup.tick()
    assert h.acker.acked == ["ack-m1"] and h.stream.settler.publishing() == 0
    assert h.stream.backlog.held_bytes == 0 and h.stream.backlog.running_bytes == 0
    assert h.log.events("outputs.published")[0]["published"] == 1 and h.log.events("message.done")


def test_outputs_that_could_not_be_published_retry_the_input_after_its_backoff(h):
    h.pull(h.message())
    finish_with_outputs(h, "m1", Output(1, TOPIC, b"x"))
    h.stream.inbox.post(OutputsPublished("ack-m1", False, "out: NotFound: topic deleted"))
    h.sup.tick()
    assert h.acker.acked == [] and h.acker.modacked == [("ack-m1", 10)]  # retry.min_backoff
    [failed] = h.log.events("message.failed")
    assert failed["error"] == "publishing its outputs failed: out: NotFound: topic deleted"
    assert h.log.events("outputs.publish_failed")[0]["outputs"] == 1


def test_an_output_to_a_topic_outside_the_allow_list_fails_the_task_in_the_supervisor_too(h):
    h.pull(h.message())
    finish_with_outputs(h, "m1", Output(1, "projects/p/topics/elsewhere", b"x"))  # a worker that skipped its check
    assert h.components.publisher.batches == [] and h.acker.acked == []
    assert "is not in [publish] topics" in h.log.events("message.failed")[0]["error"]


def test_a_drain_waits_for_outputs_and_shutdown_gives_back_what_is_still_publishing(h):
    h.pull(h.message(), h.message())
    finish_with_outputs(h, "m1", Output(1, TOPIC, b"x"))
    h.signal()
    h.sup.tick()
    assert h.sup.state.value == "draining"  # the outputs of m1 are not accepted yet
    h.stream.inbox.post(OutputsPublished("ack-m1", True, published=1))
    h.finish("m2")
    assert h.sup.state.value == "stopped" or h.stream.settler.publishing() == 0
    assert "ack-m1" in h.acker.acked


def test_shutdown_gives_back_inputs_whose_outputs_are_still_being_published(h):
    h.pull(h.message())
    finish_with_outputs(h, "m1", Output(1, TOPIC, b"x"))
    h.sup.shutdown()
    assert h.acker.acked == [] and ("ack-m1", 0) in h.acker.modacked
