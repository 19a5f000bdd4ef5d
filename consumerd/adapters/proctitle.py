"""Process titles, as `ps`, `top` and `systemctl status` show them: what each process is and does.

`consumerd: supervisor [SUBSCRIPTION]`, `consumerd: fork server`, `consumerd: worker N idle` and
`consumerd: worker N TASK MESSAGE_ID`. Uses setproctitle (the field's standard, as gunicorn and
Celery do); a no-op where it is missing.
"""

from __future__ import annotations

try:
    from setproctitle import setproctitle as _set
except ImportError:  # pragma: no cover - it is a dependency; a broken install must not stop the daemon
    _set = None  # type: ignore[assignment]

PREFIX = "consumerd: "


def set_title(title: str) -> None:
    if _set is not None:
        _set(PREFIX + title[:200])


def worker_title(worker_id: int, task: str = "", message_id: str = "") -> str:
    return f"worker {worker_id} {task} {message_id}" if task else f"worker {worker_id} idle"
