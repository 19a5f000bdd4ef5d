"""Pure policy: admission, delivery, backlog, leases, flow, backoff, histogram, dead-letter copies.

No I/O and no clock: every function takes `now` (and `rand`) from its caller. Imports only the
standard library and `consumerd.ipc`."""
