"""Hide the daemon's credentials from task code with Landlock (Linux >= 5.13), unprivileged.

Every process of the service runs as one user, so task code could open the key the supervisor
uses (`$CREDENTIALS_DIRECTORY/...` from `LoadCredential=`, a `pubsub.credentials_file`, or the
file `GOOGLE_APPLICATION_CREDENTIALS` names). A second user for the workers would need either
root with CAP_SETUID in the service or a second unit whose processes the supervisor could not
signal or inspect; user and mount namespaces would need `RestrictNamespaces=` relaxed and mount(2)
allowed. Landlock needs none of that: an unprivileged process takes away its own rights to read
some files, for itself and every process it forks, irreversibly.

Landlock only grants (there is no "deny this path"), so the ruleset handles reading files and
listing directories and grants both beneath every sibling of every directory on the way to a
hidden path, and nothing on those directories themselves. For a hidden
`/run/credentials/consumerd.service` that grants `/usr`, `/etc`, `/proc`, ..., `/run/consumerd`,
... and `/run/credentials/<other units>`; `/` and `/run` themselves cannot be listed by task code
any more (opening paths beneath them still works), and an entry created directly in one of them
after start-up is not readable by tasks. Only reading is restricted: writes, execution and the
network are left to the unit's sandbox.
"""

from __future__ import annotations

import ctypes
import dataclasses
import os
import stat
from collections.abc import Iterable
from pathlib import Path

from consumerd.adapters import linux

# Same numbers on every architecture: added after the syscall tables were unified (424+).
SYS_CREATE_RULESET, SYS_ADD_RULE, SYS_RESTRICT_SELF = 444, 445, 446
CREATE_RULESET_VERSION = 1 << 0
RULE_PATH_BENEATH = 1
ACCESS_READ_FILE = 1 << 2
ACCESS_READ_DIR = 1 << 3


class _RulesetAttr(ctypes.Structure):
    _fields_ = [("handled_access_fs", ctypes.c_uint64)]  # the ABI 1 layout: all we use


class _PathBeneathAttr(ctypes.Structure):
    _pack_ = 1  # __attribute__((packed)) in <linux/landlock.h>
    _fields_ = [("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]


@dataclasses.dataclass(frozen=True)
class Hidden:
    paths: tuple[str, ...]
    granted: int  # how many beneath-rules it took


@dataclasses.dataclass(frozen=True)
class NotHidden:
    reason: str  # why the kernel would not do it: task code can still read these paths


def grants(hidden: Iterable[str]) -> list[Path]:
    """The paths to grant reading beneath so that everything but ``hidden`` stays readable."""
    targets = {Path(os.path.realpath(p)) for p in hidden if os.path.lexists(p)}
    on_the_way = {parent for target in targets for parent in target.parents}
    granted: list[Path] = []
    for directory in sorted(on_the_way):
        try:
            children = sorted(directory.iterdir())
        except OSError:
            continue  # cannot list it: we cannot grant what is under it either
        for child in children:
            if child in targets or child in on_the_way:
                continue
            resolved = Path(os.path.realpath(child))
            if resolved in on_the_way or any(resolved == t or t in resolved.parents for t in targets):
                continue  # a symlink to a hidden path, into one, or to a directory above one
            granted.append(child)
    return granted


def hide(paths: Iterable[str]) -> Hidden | NotHidden:
    """Make ``paths`` unreadable for this process and all it forks from now on."""
    paths = tuple(sorted({p for p in paths if p and os.path.lexists(p)}))
    if not paths:
        return Hidden((), 0)  # nothing there to hide (with no rules, the ruleset would hide everything)
    to_grant = grants(paths)
    if not to_grant:
        return NotHidden(f"refusing to hide {', '.join(paths)}: nothing else would stay readable")
    libc = linux.libc()
    if libc.syscall(SYS_CREATE_RULESET, None, ctypes.c_size_t(0), ctypes.c_uint32(CREATE_RULESET_VERSION)) < 1:
        return NotHidden(f"Landlock unavailable: {os.strerror(ctypes.get_errno())}")
    attr = _RulesetAttr(ACCESS_READ_FILE | ACCESS_READ_DIR)
    ruleset = libc.syscall(SYS_CREATE_RULESET, ctypes.byref(attr), ctypes.c_size_t(ctypes.sizeof(attr)), ctypes.c_uint32(0))
    if ruleset < 0:
        return NotHidden(f"landlock_create_ruleset: {os.strerror(ctypes.get_errno())}")
    try:
        count = 0
        for path in to_grant:
            if _grant(libc, int(ruleset), path):
                count += 1
        # Required to restrict oneself without CAP_SYS_ADMIN (the unit sets NoNewPrivileges= too).
        try:
            linux.prctl(linux.PR_SET_NO_NEW_PRIVS, 1)
        except OSError as exc:
            return NotHidden(f"prctl(PR_SET_NO_NEW_PRIVS): {exc.strerror}")
        if libc.syscall(SYS_RESTRICT_SELF, ctypes.c_int(int(ruleset)), ctypes.c_uint32(0)) != 0:
            return NotHidden(f"landlock_restrict_self: {os.strerror(ctypes.get_errno())}")
    finally:
        os.close(int(ruleset))
    return Hidden(paths, count)


def _grant(libc: ctypes.CDLL, ruleset: int, path: Path) -> bool:
    try:
        fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
    except OSError:
        return False  # gone, or a dangling symlink: nothing to read there
    try:
        # Directory rights on a file are EINVAL: a file gets only the right to be read.
        access = ACCESS_READ_FILE | ACCESS_READ_DIR if stat.S_ISDIR(os.fstat(fd).st_mode) else ACCESS_READ_FILE
        rule = _PathBeneathAttr(access, fd)
        return (
            libc.syscall(SYS_ADD_RULE, ctypes.c_int(ruleset), ctypes.c_int(RULE_PATH_BENEATH), ctypes.byref(rule), ctypes.c_uint32(0)) == 0
        )
    finally:
        os.close(fd)
