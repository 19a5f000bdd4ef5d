"""Pure lease schedule: which leased messages to renew, and when. Takes `now`; reads no clock.

Every message pulled and not yet acked or nacked holds a lease that expires ``deadline`` seconds
after it was last extended. A lease is due for renewal once ``renew_fraction`` of it has elapsed,
leaving the rest as headroom for a slow or failing RPC. When any lease is due, every lease past
``batch_fraction`` is renewed with it, so leases fall into cohorts and one modack call renews
them all, however many messages are in flight.
"""

from __future__ import annotations

import dataclasses
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
        self._next_due: float | None = None  # cached: None = recompute

    def __len__(self) -> int:
        return len(self._leases)

    def __contains__(self, ack_id: object) -> bool:
        return ack_id in self._leases

    def add(self, ack_id: str, now: float, deadline: float) -> None:
        """A message arrived at ``now`` holding the subscription's ``deadline``."""
        self._leases[ack_id] = Lease(ack_id, now, deadline)
        due = now + deadline * self._renew_fraction
        if self._next_due is not None and due < self._next_due:
            self._next_due = due
        elif len(self._leases) == 1:
            self._next_due = due

    def remove(self, ack_id: str) -> None:
        """The message was acked or nacked: its lease no longer matters."""
        lease = self._leases.pop(ack_id, None)
        if lease is not None and self._next_due is not None:
            if lease.extended_at + lease.deadline * self._renew_fraction <= self._next_due:
                self._next_due = None  # it was the earliest: recompute when asked

    def next_due(self) -> float | None:
        """Monotonic time of the next renewal, or None when nothing is leased."""
        if not self._leases:
            return None
        if self._next_due is None:
            self._next_due = min(lease.extended_at + lease.deadline * self._renew_fraction for lease in self._leases.values())
        return self._next_due

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
        self._next_due = None

    def expires_at(self, ack_id: str) -> float | None:
        """When the lease of ``ack_id`` runs out, as far as we asked for; None if not held."""
        lease = self._leases.get(ack_id)
        return lease.expires_at if lease is not None else None

    def expired(self, now: float) -> list[str]:
        """Leases that ran out (renewals failed, e.g. during an outage): Pub/Sub may redeliver them."""
        return [lease.ack_id for lease in self._leases.values() if now >= lease.expires_at]
