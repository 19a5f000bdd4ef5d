"""adapters.linux: the one prctl wrapper and the process helpers the fork server, workers and sandbox share."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import time

import pytest

from consumerd.adapters import landlock, linux
from consumerd.pool import sandbox


def test_libc_is_loaded_once():
    assert linux.libc() is linux.libc()


def test_prctl_raises_oserror_with_the_errno_and_its_text():
    with pytest.raises(OSError) as raised:
        linux.prctl(-1, 0)  # no such option
    assert raised.value.errno == errno.EINVAL
    assert raised.value.strerror == os.strerror(errno.EINVAL)


def test_prctl_sets_what_it_is_asked_in_a_child_process():
    code = (
        "import ctypes, signal; from consumerd.adapters import linux; "
        "linux.prctl(linux.PR_SET_PDEATHSIG, signal.SIGKILL); linux.prctl(linux.PR_SET_CHILD_SUBREAPER, 1); "
        "got = ctypes.c_int(); linux.libc().prctl(2, ctypes.byref(got), 0, 0, 0); "  # PR_GET_PDEATHSIG
        "print(got.value, linux.libc().prctl(37, ctypes.byref(got), 0, 0, 0), got.value)"  # PR_GET_CHILD_SUBREAPER
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == [str(int(signal.SIGKILL)), "0", "1"]


def test_make_undumpable_is_false_where_prctl_fails(monkeypatch):
    def refuse(option: int, value: int) -> None:
        raise OSError(errno.EPERM, os.strerror(errno.EPERM))

    monkeypatch.setattr(linux, "prctl", refuse)
    assert sandbox.make_undumpable() is False


def test_landlock_reports_a_refused_no_new_privs_with_the_errno_text(monkeypatch, tmp_path):
    secret = tmp_path / "secret"
    secret.mkdir()
    calls: list[tuple[int, int]] = []

    def refuse(option: int, value: int) -> None:
        calls.append((option, value))
        raise OSError(errno.EPERM, os.strerror(errno.EPERM))

    monkeypatch.setattr(linux, "prctl", refuse)
    result = landlock.hide([str(secret)])  # refused before landlock_restrict_self: this process keeps its rights
    if isinstance(result, landlock.NotHidden) and result.reason.startswith(("Landlock unavailable", "landlock_create_ruleset")):
        pytest.skip(result.reason)
    assert result == landlock.NotHidden(f"prctl(PR_SET_NO_NEW_PRIVS): {os.strerror(errno.EPERM)}")
    assert calls == [(linux.PR_SET_NO_NEW_PRIVS, 1)]


def test_children_of_lists_direct_children_and_kill_group_ends_the_group():
    child = subprocess.Popen(["sleep", "30"], start_new_session=True)
    try:
        assert child.pid in linux.children_of(os.getpid())
        linux.kill_group(child.pid, signal.SIGKILL)
        assert child.wait(timeout=10) == -signal.SIGKILL
    finally:
        child.kill()
        child.wait()
    deadline = time.monotonic() + 5
    while child.pid in linux.children_of(os.getpid()) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert child.pid not in linux.children_of(os.getpid())


def test_kill_group_leaves_a_group_that_is_gone():
    child = subprocess.Popen(["true"], start_new_session=True)
    child.wait()
    linux.kill_group(child.pid, signal.SIGKILL)  # no such group any more: no error


def test_children_of_an_unknown_process_is_empty():
    assert linux.children_of(2**22 + 12345) == []
