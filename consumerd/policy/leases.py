"""Pure lease schedule: which leased messages to renew, and when. Takes `now`; reads no clock.

Every message pulled and not yet acked or nacked holds a lease that expires ``deadline`` seconds
after it was last extended. A lease is due for renewal once ``renew_fraction`` of it has elapsed,
leaving the rest as headroom for a slow or failing RPC. When any lease is due, every lease past
``batch_fraction`` is renewed with it, so leases fall into cohorts and one modack call renews
them all, however many messages are in flight.
"""

from __future__ import annotations

import dataclasses
import heapq
from collections.abc import Iterable


@dataclasses.dataclass(slots=True)
class Lease:
    ack_id: str
    extended_at: float  # monotonic time the last extension was requested (or the pull returned)
    deadline: float  # seconds that extension asked for

    @property
    def expires_at(self) -> float:
        return self.extended_at + self.deadline


class LeaseSchedule:
    def __init__(self, ack_deadline: float, renew_fraction: float = 0.6, batch_fraction: float = 0.3) -> None:
        if not 0 < batch_fraction <= renew_fraction < 1:
            raise ValueError("need 0 < batch_fraction <= renew_fraction < 1")
        self.ack_deadline = ack_deadline
        self._renew_fraction = renew_fraction
        self._batch_fraction = batch_fraction
        self._leases: dict[str, Lease] = {}
        # (renewal due, ack id), pruned lazily: an entry whose lease is gone or was renewed since is
        # dropped when it reaches the top. The loop asks for the next due time on every pass, and
        # the earliest lease is the one acked first, so a cached minimum would be recomputed over
        # every lease on nearly every pass (O(n) per message, n = leases held).
        self._heap: list[tuple[float, str]] = []

    def __len__(self) -> int:
        return len(self._leases)

    def __contains__(self, ack_id: object) -> bool:
        return ack_id in self._leases

    def add(self, ack_id: str, now: float, deadline: float) -> None:
        """A message arrived at ``now`` holding the subscription's ``deadline``."""
        lease = self._leases[ack_id] = Lease(ack_id, now, deadline)
        heapq.heappush(self._heap, (self._due(lease), ack_id))

    def _due(self, lease: Lease) -> float:
        return lease.extended_at + lease.deadline * self._renew_fraction

    def remove(self, ack_id: str) -> None:
        """The message was acked or nacked: its lease no longer matters."""
        self._leases.pop(ack_id, None)
        if len(self._heap) > 2 * len(self._leases) + 64:
            self._compact()

    def _compact(self) -> None:
        # Entries of acked leases wait below a long-lived lease until it is renewed: at a high
        # message rate, far more of them than live leases. Rebuilding once they outnumber the live
        # leases keeps the heap under 2n + 64 entries for O(1) amortized work per removal.
        self._heap = [(self._due(lease), lease.ack_id) for lease in self._leases.values()]
        heapq.heapify(self._heap)

    def next_due(self) -> float | None:
        """Monotonic time of the next renewal, or None when nothing is leased."""
        heap = self._heap
        while heap:
            due, ack_id = heap[0]
            lease = self._leases.get(ack_id)
            if lease is not None and self._due(lease) == due:
                return due
            heapq.heappop(heap)  # acked, nacked, or renewed since (its new entry is further down)
        return None

    def due(self, now: float) -> list[str]:
        """Ack ids to renew at ``now``: empty unless some lease is due, then its whole cohort."""
        next_due = self.next_due()
        if next_due is None or now < next_due:
            return []
        return [lease.ack_id for lease in self._leases.values() if now >= lease.extended_at + lease.deadline * self._batch_fraction]

    def renewed(self, ack_ids: Iterable[str], now: float) -> None:
        """Record that ``ack_ids`` were extended by ``ack_deadline`` at ``now``."""
        for ack_id in ack_ids:
            lease = self._leases.get(ack_id)
            if lease is not None:
                lease.extended_at = now
                lease.deadline = self.ack_deadline
                heapq.heappush(self._heap, (self._due(lease), ack_id))

    def expires_at(self, ack_id: str) -> float | None:
        """When the lease of ``ack_id`` runs out, as far as we asked for; None if not held."""
        lease = self._leases.get(ack_id)
        return lease.expires_at if lease is not None else None

    def expired(self, now: float) -> list[str]:
        """Leases that ran out (renewals failed, e.g. during an outage): Pub/Sub may redeliver them."""
        return [lease.ack_id for lease in self._leases.values() if now >= lease.expires_at]
