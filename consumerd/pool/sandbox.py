"""What task code can reach of the daemon: its environment and the supervisor's memory.

Task code runs in workers forked from the fork server, as the same user as the supervisor (one
systemd service). So the fork server is started with an environment that carries none of the
daemon's secrets or channels: no credential locations, no notify socket or watchdog, no consumerd
settings. Tasks that need Google credentials of their own get them through `[workers] environment`
(or their own files). The supervisor makes itself non-dumpable, so a process of the same user can
neither read its `/proc/<pid>/environ` and `mem` nor attach to it (the unit also denies ptrace and
`process_vm_readv`/`writev` to the whole service, with `SystemCallFilter=~@debug`).
"""

from __future__ import annotations

from collections.abc import Mapping

from consumerd.adapters import linux

# What the supervisor may hold and task code must not see.
HIDDEN = frozenset(
    {
        "CREDENTIALS_DIRECTORY",  # systemd LoadCredential=: the service-account key
        "GOOGLE_APPLICATION_CREDENTIALS",
        "NOTIFY_SOCKET",  # a task could tell systemd READY/STOPPING/WATCHDOG on our behalf
        "WATCHDOG_USEC",
        "WATCHDOG_PID",
        "LISTEN_FDS",
        "LISTEN_PID",
        "LISTEN_FDNAMES",
    }
)
HIDDEN_PREFIXES = ("CONSUMERD_",)  # the daemon's own settings (control socket, metrics address...)


def task_environment(environ: Mapping[str, str], extra: Mapping[str, str]) -> dict[str, str]:
    """The environment the fork server (and so every task) runs with."""
    env = {k: v for k, v in environ.items() if k not in HIDDEN and not k.startswith(HIDDEN_PREFIXES)}
    env.update(extra)
    return env


def hidden_from_tasks(environ: Mapping[str, str]) -> tuple[str, ...]:
    """What the fork server makes unreadable (`landlock`): the LoadCredential= directory.

    Only that one: its way from / (/, /run, /run/credentials) holds nothing task code needs and
    does not change while the daemon runs. A key elsewhere (say /etc/consumerd/key.json) would put
    /etc on that way, and a file replaced there by rename (/etc/passwd by useradd) would turn
    unreadable for tasks; such a key stays readable, and `credentials_exposure` says so.
    """
    directory = environ.get("CREDENTIALS_DIRECTORY", "")
    return (directory,) if directory else ()


def credentials_exposure(key_file: str, environ: Mapping[str, str], hide: bool) -> str:
    """Why task code can still read the daemon's key, or "" when it cannot (or there is none)."""
    adc = environ.get("GOOGLE_APPLICATION_CREDENTIALS", "")
    directory = environ.get("CREDENTIALS_DIRECTORY", "")
    for what, path in (("pubsub.credentials_file", key_file), ("GOOGLE_APPLICATION_CREDENTIALS", adc)):
        if not path:
            continue
        inside = bool(directory) and (path + "/").startswith(directory.rstrip("/") + "/")
        if not inside:
            return f"{what} {path} is not under $CREDENTIALS_DIRECTORY: load it with LoadCredential= to hide it from tasks"
        if not hide:
            return "workers.hide_credentials is false"
    return ""


def make_undumpable() -> bool:
    """PR_SET_DUMPABLE 0: /proc/<our pid>/{environ,mem,maps...} become root's, ptrace is refused,
    and no core dump can leak what we hold. Children that exec (the fork server) start dumpable
    again, with the stripped environment. False where prctl is not available or fails."""
    try:
        linux.prctl(linux.PR_SET_DUMPABLE, 0)
    except OSError:
        return False
    return True
