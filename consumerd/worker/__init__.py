"""Child side: the fork server, the worker loop, the async runner, batches, the task registry, tracing.

Nothing here imports `consumerd.supervisor`, `consumerd.pool`, `consumerd.control` or Google's client."""
