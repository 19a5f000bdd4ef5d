"""`make chaos`: a soak with faults injected everywhere, checked against an independent ledger."""
