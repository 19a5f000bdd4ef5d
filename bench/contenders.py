"""The alternatives a user would pick instead of consumerd, each written here from its usual shape.

Run as `python -m bench.contenders NAME SUBSCRIPTION N`, with PUBSUB_EMULATOR_HOST and BENCH_OUT
set. Each prints `ready <wall time>` when it starts consuming and, at the end, one JSON line with
its own resource use and RPC counts.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import resource
import sys
import threading
import time

from google.cloud import pubsub_v1

from bench.tasks import record, work


def ceiling(subscription: str, n: int) -> dict:
    """What the emulator and client can move here: pull up to 1,000, ack at once, no task."""
    client = pubsub_v1.SubscriberClient()
    seen: set[str] = set()
    rpcs = {"pull": 0, "ack": 0}
    ready()
    while len(seen) < n:
        response = client.pull(request={"subscription": subscription, "max_messages": 1000}, timeout=30)
        rpcs["pull"] += 1
        if not response.received_messages:
            continue
        client.acknowledge(request={"subscription": subscription, "ack_ids": [m.ack_id for m in response.received_messages]})
        rpcs["ack"] += 1
        for m in response.received_messages:
            if m.message.message_id not in seen:
                seen.add(m.message.message_id)
                record(m.message.message_id, m.message.publish_time.timestamp())
    return {"rpcs": rpcs}


def subscribe(subscription: str, n: int) -> dict:
    """google-cloud-pubsub's streaming pull, default thread pool; the task runs in the callback."""
    client = pubsub_v1.SubscriberClient()
    seen: set[str] = set()
    lock = threading.Lock()
    finished = threading.Event()

    def callback(message: pubsub_v1.subscriber.message.Message) -> None:
        cpu_s = work(message.attributes["kind"])
        record(message.message_id, message.publish_time.timestamp(), cpu_s)
        message.ack()
        with lock:
            seen.add(message.message_id)
            if len(seen) >= n:
                finished.set()

    ready()
    future = client.subscribe(subscription, callback)
    finished.wait()
    future.cancel()
    return {"rpcs": {"streaming_pull": "n/a"}}


def _run_one(kind: str, message_id: str, publish_ts: float) -> None:
    record(message_id, publish_ts, work(kind))


def blog(subscription: str, n: int) -> dict:
    """The seed article's design: pull 8, one multiprocessing.Process per message, wait for all 8,
    ack those that exited 0, repeat. (Its published version sleeps 60 s between rounds; 0 here.)"""
    client = pubsub_v1.SubscriberClient()
    done = 0
    rpcs = {"pull": 0, "ack": 0}
    ready()
    while done < n:
        response = client.pull(request={"subscription": subscription, "max_messages": 8}, timeout=30)
        rpcs["pull"] += 1
        procs = []
        for m in response.received_messages:
            p = multiprocessing.Process(
                target=_run_one, args=(m.message.attributes["kind"], m.message.message_id, m.message.publish_time.timestamp())
            )
            p.start()
            procs.append((p, m.ack_id))
        ok = []
        for p, ack_id in procs:
            p.join(60)
            if p.exitcode == 0:
                ok.append(ack_id)
            elif p.is_alive():
                p.kill()
        if ok:
            client.acknowledge(request={"subscription": subscription, "ack_ids": ok})
            rpcs["ack"] += 1
            done += len(ok)
    return {"rpcs": rpcs}


def ready() -> None:
    print(f"ready {time.time():.6f}", flush=True)


def main() -> None:
    name, subscription, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
    extra = {"ceiling": ceiling, "subscribe": subscribe, "blog": blog}[name](subscription, n)
    self_use = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    print(
        json.dumps(
            {
                "consumer_cpu_s": self_use.ru_utime + self_use.ru_stime,
                "consumer_rss_mb": self_use.ru_maxrss / 1024,
                "worker_rss_mb": children.ru_maxrss / 1024 if children.ru_maxrss else None,
                **extra,
            }
        ),
        flush=True,
    )
    os._exit(0)  # streaming pull and gRPC threads must not hold the exit up


if __name__ == "__main__":
    main()
