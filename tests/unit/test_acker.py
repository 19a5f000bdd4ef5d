"""The acker thread against a fake Pub/Sub: batching, supersession, retries, give-up, flush."""

import threading

from consumerd.adapters.pubsub.acker import Acker
from consumerd.policy.backoff import Backoff


class Transient(Exception):
    pass


class Permanent(Exception):
    pass


class FakeRpc:
    def __init__(self, failures=()):
        self.calls = []
        self.failures = list(failures)  # exceptions to raise on the next calls, in order
        self.gate = threading.Event()
        self.gate.set()

    def ack(self, ids):
        self._call(("ack", tuple(sorted(ids))))

    def modack(self, ids, seconds):
        self._call(("modack", tuple(sorted(ids)), seconds))

    def _call(self, record):
        self.gate.wait(10)
        self.calls.append(record)
        if self.failures:
            raise self.failures.pop(0)


def make(rpc, **kwargs):
    acker = Acker(rpc.ack, rpc.modack, lambda e: isinstance(e, Transient), backoff=Backoff(base=0.001, cap=0.002), **kwargs)
    acker.start()
    return acker


def test_requests_queued_during_an_rpc_are_merged_into_one_batch():
    rpc = FakeRpc()
    rpc.gate.clear()
    acker = make(rpc)
    acker.ack(["a"])
    for ack_id in "bcd":
        acker.ack([ack_id])
    acker.modack(["x", "y"], 30)
    rpc.gate.set()
    assert acker.flush(5)
    assert ("ack", ("b", "c", "d")) in rpc.calls or ("ack", ("a", "b", "c", "d")) in rpc.calls
    assert len([c for c in rpc.calls if c[0] == "ack"]) <= 2
    assert acker.stats["acked"] == 4 and acker.stats["extended"] == 2


def test_a_later_request_for_the_same_ack_id_supersedes_the_earlier():
    rpc = FakeRpc()
    rpc.gate.clear()
    acker = make(rpc)
    acker.ack(["block"])  # holds the thread in an RPC while the next two queue up
    acker.modack(["a"], 60)
    acker.ack(["a"])
    rpc.gate.set()
    assert acker.flush(5)
    assert ("modack", ("a",), 60) not in rpc.calls
    assert any(c[0] == "ack" and "a" in c[1] for c in rpc.calls)


def test_transient_failures_are_retried_until_success():
    rpc = FakeRpc(failures=[Transient(), Transient()])
    acker = make(rpc)
    acker.ack(["a"])
    assert acker.flush(5)
    assert rpc.calls == [("ack", ("a",))] * 3
    assert acker.stats == {"acked": 1, "nacked": 0, "extended": 0, "dropped": 0, "rpc_failures": 2, "ack_id_failures": 0}


def test_permanent_failures_are_dropped_and_counted():
    rpc = FakeRpc(failures=[Permanent()])
    acker = make(rpc)
    acker.modack(["a", "b"], 0)
    assert acker.flush(5)
    assert acker.stats["dropped"] == 2 and acker.stats["nacked"] == 0


def test_retries_give_up_once_the_request_is_too_old():
    clock = [0.0]
    rpc = FakeRpc(failures=[Transient()] * 1000)
    acker = make(rpc, give_up_after=100.0, clock=lambda: clock[0])
    acker.ack(["a"])
    while len(rpc.calls) < 3:
        threading.Event().wait(0.001)
    clock[0] = 101.0
    assert acker.flush(5)
    assert acker.stats["dropped"] == 1


def test_flush_with_nothing_queued_returns_at_once():
    acker = make(FakeRpc())
    assert acker.flush(5)
    acker.stop()


def test_exactly_once_failures_are_handled_per_ack_id():
    calls = []
    answers = [{"bad": "PERMANENT_FAILURE_INVALID_ACK_ID", "later": "TRANSIENT_FAILURE_UNORDERED_ACK_ID"}, {}]

    def ack(ids):
        calls.append(sorted(ids))
        return answers.pop(0)

    acker = Acker(ack, lambda ids, s: {}, lambda e: False, backoff=Backoff(base=0.001, cap=0.002))
    acker.start()
    acker.ack(["good", "bad", "later"])
    assert acker.flush(5)
    assert calls == [["bad", "good", "later"], ["later"]]  # only the transient one is sent again
    assert acker.stats["acked"] == 2 and acker.stats["dropped"] == 1 and acker.stats["ack_id_failures"] == 2


def test_acks_within_the_linger_share_one_rpc_and_a_flush_cuts_the_linger_short():
    rpc = FakeRpc()
    acker = make(rpc, linger=60.0)  # without the cut, flush(5) would time out
    for ack_id in "abc":
        acker.ack([ack_id])
    assert acker.flush(5)
    assert rpc.calls == [("ack", ("a", "b", "c"))]


def test_a_full_batch_is_sent_without_waiting_for_the_linger():
    rpc = FakeRpc()
    sent = threading.Event()

    def ack(ids):
        rpc.ack(ids)
        sent.set()

    acker = Acker(ack, rpc.modack, lambda e: False, linger=60.0, max_batch=3)
    acker.start()
    for ack_id in "abc":
        acker.ack([ack_id])
    assert sent.wait(5), "three queued requests (max_batch) did not go before the 60 s linger"
    assert sorted(ack for call in rpc.calls for ack in call[1]) == ["a", "b", "c"]


def test_stop_during_a_linger_ends_the_thread_at_once():
    rpc = FakeRpc()
    acker = make(rpc, linger=60.0)
    acker.ack(["a"])
    acker.stop()
    acker._thread.join(5)
    assert not acker._thread.is_alive()
