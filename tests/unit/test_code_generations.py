"""New task code without a drain, over fakes: when a reload starts a new generation, what it applies
once the code is ready, what rejects it; and the pieces (file fingerprints, the Ready packet's file
list, the traceback of code that does not import, the watcher, the `--reload` opt-in)."""

from __future__ import annotations

import importlib
import json
import queue
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from consumerd.adapters.filewatch import FilesChanged, FileWatcher, require_watchfiles
from consumerd.adapters.prometheus import NullMetrics
from consumerd.cli import build_parser
from consumerd.config import load_settings, reload_plan
from consumerd.control.client import format_status
from consumerd.errors import ConfigError, RegistryError
from consumerd.ipc.records import (
    MAX_CODE_FILES,
    MAX_PACKET,
    CodeFile,
    PreloadFailed,
    Ready,
    TaskOptions,
    decode_control,
    encode_control,
)
from consumerd.pool.handles import GenerationFailed, GenerationReady, GenerationRetired
from consumerd.supervisor.codereload import CodeReload, changed_files
from consumerd.supervisor.reload import ReloadPlan
from consumerd.worker.codefiles import loaded_files, preload_failed, ready_packet
from consumerd.worker.registry import load_task_modules
from tests.unit.fakes import Log, write_config

ROOT = Path(__file__).resolve().parents[2]
TASKS = {"ok": TaskOptions(), "slow": TaskOptions(timeout=5)}


class Pool:
    """Records what code reload asks of the pool; a generation is ready when the test says so."""

    def __init__(self, files: tuple[CodeFile, ...]) -> None:
        self.files = files
        self.generation = 1
        self.begun: list[Any] = []
        self.discarded = 0
        self.promoted = 0

    def start(self) -> dict[str, TaskOptions]:
        return dict(TASKS)

    def code_files(self) -> tuple[CodeFile, ...]:
        return self.files

    def begin(self, spec: Any, now: float) -> int:
        self.begun.append(spec)
        return 1 + len(self.begun)

    def discard_starting(self, now: float) -> None:
        self.discarded += 1

    def promote(self, now: float) -> list[GenerationRetired]:
        self.promoted += 1
        self.generation = 1 + len(self.begun)
        return [GenerationRetired(1, "it had no worker left")]

    def generations(self, now: float) -> list[Any]:
        return []


class Tasks:
    def __init__(self) -> None:
        self.tables: list[dict[str, TaskOptions]] = []

    def set_tasks(self, tasks: dict[str, TaskOptions]) -> None:
        self.tables.append(tasks)

    def check_tasks(self, tasks: dict[str, TaskOptions], settings: Any) -> None:
        settings.check_task_names(frozenset(tasks))


def config(path: Path, extra: str = "", tasks: str = 'modules = ["none"]') -> Path:
    """The fakes' config with ``tasks`` as its [tasks] table."""
    write_config(path, extra)
    path.write_text(path.read_text().replace('[tasks]\nmodules = ["none"]\n', f"[tasks]\n{tasks}\n"))
    return path


class Reload:
    """A CodeReload over fakes, started on a task module file of its own."""

    def __init__(self, tmp_path: Path, tasks: str = 'modules = ["none"]') -> None:
        self.module = tmp_path / "mytasks.py"
        self.module.write_text("# v1\n")
        st = self.module.stat()
        self.pool = Pool((CodeFile(str(self.module), st.st_mtime_ns, st.st_size),))
        self.tasks = Tasks()
        self.log = Log()
        self.finished: list[ReloadPlan | None] = []
        self.config = config(tmp_path / "c.toml", tasks=tasks)
        self.settings = load_settings(self.config)
        self.code = CodeReload(self.pool, self.tasks, NullMetrics(), None, lambda: 0.0, self.log, self.finished.append)  # type: ignore[arg-type]
        self.code.start(self.settings, None)  # type: ignore[arg-type]

    def plan(self, extra: str = "", tasks: str = 'modules = ["none"]') -> ReloadPlan:
        merged, applied, refused = reload_plan(self.settings, load_settings(config(self.config, extra, tasks)))
        return ReloadPlan(merged, tuple(applied), tuple(refused))

    def edit(self) -> None:
        self.module.write_text("# v2, a little longer\n")


def test_a_reload_that_finds_the_code_unchanged_applies_its_settings_at_once(tmp_path):
    r = Reload(tmp_path)
    plan = r.plan("[workers]\nconcurrency = 3\n")
    r.code.reload(plan, 1.0)
    assert r.finished == [plan] and r.pool.begun == [] and r.tasks.tables == [TASKS]


def test_changed_code_starts_a_new_generation_and_the_reloads_settings_wait_for_it(tmp_path):
    r = Reload(tmp_path)
    r.edit()
    plan = r.plan("[workers]\nconcurrency = 3\n")
    r.code.reload(plan, 1.0)
    assert len(r.pool.begun) == 1 and r.finished == []
    [changed] = r.log.events("code.changed")
    assert changed == {"generation": 2, "trigger": "reload", "changed": [str(r.module)]}
    new_tasks = {"ok": TaskOptions(concurrency=2)}  # "slow" is gone: its messages are unknown tasks now
    r.code.on_generation(GenerationReady(2, new_tasks, 0.3), 1.3)
    assert r.pool.promoted == 1 and r.tasks.tables[-1] == new_tasks
    assert [p.generation for p in r.finished if p] == [2] and r.finished[0].settings.workers.concurrency == 3  # type: ignore[union-attr]
    assert r.log.events("code.ready")[0]["took_s"] == 0.3 and r.log.events("code.retired") == [
        {"generation": 1, "reason": "it had no worker left"}
    ]


def test_a_new_tasks_modules_list_is_new_code_even_where_no_file_changed(tmp_path):
    r = Reload(tmp_path)
    plan = r.plan(tasks='modules = ["none", "more"]')
    assert "tasks.modules" in plan.applied
    r.code.reload(plan, 1.0)
    assert r.pool.begun[0].modules == ("none", "more") and r.log.events("code.changed")[0]["changed"] == ["tasks.modules"]


def test_new_code_that_raises_or_lacks_the_default_task_is_rejected_and_nothing_of_the_reload_applies(tmp_path):
    default = 'modules = ["none"]\ndefault = "ok"'
    r = Reload(tmp_path, tasks=default)
    r.edit()
    r.code.reload(r.plan("[workers]\nconcurrency = 3\n", tasks=default), 1.0)
    r.code.on_generation(GenerationFailed(2, "importing 'mytasks' failed: SyntaxError", "Traceback ...\nSyntaxError: bad"), 1.2)
    [rejected] = r.log.events("reload.rejected")
    assert rejected["exception"].endswith("SyntaxError: bad") and rejected["trigger"] == "reload"
    assert "generation 1" in rejected["detail"] and r.finished == [None] and r.pool.promoted == 0

    r.code.reload(r.plan(tasks=default), 2.0)
    r.code.on_generation(GenerationReady(3, {"slow": TaskOptions()}, 0.2), 2.2)
    assert "tasks.default: no task named 'ok'" in r.log.events("reload.rejected")[1]["error"]
    assert r.pool.discarded == 1 and r.pool.promoted == 0 and r.tasks.tables == [TASKS] and r.finished == [None, None]


def test_a_watched_change_supersedes_code_still_loading_and_carries_the_reloads_settings(tmp_path):
    r = Reload(tmp_path)
    r.edit()
    plan = r.plan("[workers]\nconcurrency = 4\n")
    r.code.reload(plan, 1.0)
    r.code.files_changed([FilesChanged((str(r.module),)), FilesChanged((str(tmp_path / "helper.py"),))])
    assert r.pool.discarded == 1 and len(r.pool.begun) == 2 and r.log.events("code.superseded") == [{"generation": 2}]
    assert r.log.events("code.changed")[1] == {"generation": 3, "trigger": "watch", "changed": [str(tmp_path / "helper.py"), str(r.module)]}
    r.code.on_generation(GenerationReady(2, TASKS, 0.1), 1.1)  # the superseded one: ignored
    assert r.pool.promoted == 0
    r.code.on_generation(GenerationReady(3, TASKS, 0.1), 1.2)
    assert r.pool.promoted == 1 and [p.settings.workers.concurrency for p in r.finished if p] == [4]


def test_a_rejected_config_changes_nothing(tmp_path):
    r = Reload(tmp_path)
    r.edit()
    r.code.reload(None, 1.0)
    assert r.finished == [None] and r.pool.begun == []


def test_file_fingerprints_change_with_a_write_and_with_a_removal(tmp_path):
    kept, edited, removed = (tmp_path / name for name in ("kept.py", "edited.py", "removed.py"))
    for path in (kept, edited, removed):
        path.write_text("x = 1\n")
    loaded = [CodeFile(str(p), p.stat().st_mtime_ns, p.stat().st_size) for p in (kept, edited, removed)]
    edited.write_text("x = 22\n")
    removed.unlink()
    assert changed_files(loaded) == [str(edited), str(removed)]


def test_a_reload_applies_tasks_modules_and_refuses_the_rest_of_tasks(tmp_path):
    old = load_settings(config(tmp_path / "a.toml"))
    new = load_settings(config(tmp_path / "b.toml", tasks='modules = ["other"]\ndefault = "x"'))
    merged, applied, refused = reload_plan(old, new)
    assert applied == ["tasks.modules"] and refused == ["tasks.default"]
    assert merged.tasks.modules == ["other"] and merged.tasks.default == ""


def test_the_ready_packet_carries_the_files_and_refuses_any_that_is_not_an_absolute_path_with_its_figures():
    ready = Ready((("a", TaskOptions()),), (CodeFile("/app/a.py", 1_700_000_000_123_456_789, 120),))
    assert decode_control(encode_control(ready)) == ready
    failed = PreloadFailed("importing 'a' failed", "Traceback (most recent call last):\n ...")
    assert decode_control(encode_control(failed)) == failed
    for files in (
        [["a.py", 1, 1]],
        [["/a\x00.py", 1, 1]],
        [["/a.py", -1, 1]],
        [["/a.py", 1, True]],
        [["/a.py", 1]],
        [[f"/{i}", 1, 1] for i in range(MAX_CODE_FILES + 1)],
    ):
        with pytest.raises(Exception, match="control packet ready"):
            decode_control(json.dumps({"kind": "ready", "tasks": [], "files": files}).encode())
    with pytest.raises(Exception, match="preload_failed"):
        decode_control(b'{"kind":"preload_failed","error":"x"}')


def test_the_fork_server_lists_the_task_code_it_imported_task_modules_first_not_the_standard_library(tmp_path, monkeypatch):
    package = tmp_path / "shop"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "helpers.py").write_text("import wave  # the standard library: not listed\n")
    (package / "tasks.py").write_text("from shop import helpers\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in ("shop", "shop.helpers", "shop.tasks", "wave"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    before = set(sys.modules)
    importlib.import_module("shop.tasks")
    files = loaded_files(before, ["shop.tasks"])
    assert [f.path for f in files] == [str(package / "tasks.py"), str(package / "__init__.py"), str(package / "helpers.py")]
    assert files[0] == CodeFile(str(package / "tasks.py"), (package / "tasks.py").stat().st_mtime_ns, (package / "tasks.py").stat().st_size)


def test_as_many_files_as_fit_go_in_one_control_packet():
    files = [CodeFile("/" + "d" * 3000 + f"/{i}.py", 1, 1) for i in range(100)]
    ready, left_out = ready_packet((("a", TaskOptions()),), files)
    assert 0 < len(ready.files) < 100 and left_out == 100 - len(ready.files) and ready.files == tuple(files[: len(ready.files)])
    assert len(encode_control(ready)) <= MAX_PACKET


def test_code_that_does_not_import_is_reported_with_its_traceback(tmp_path, monkeypatch):
    (tmp_path / "broken_tasks.py").write_text("import os\n\ndef broken(:\n    pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(RegistryError) as raised:
        load_task_modules(["broken_tasks"], entry_points=False)
    packet = preload_failed(raised.value)
    assert "\n" not in packet.error and "SyntaxError" in packet.error
    assert 'broken_tasks.py", line 3' in packet.traceback and "def broken(:" in packet.traceback

    (tmp_path / "raising_tasks.py").write_text("def connect():\n    raise ValueError('no database')\n\nconnect()\n")
    with pytest.raises(RegistryError) as raised:
        load_task_modules(["raising_tasks"], entry_points=False)
    lines = preload_failed(raised.value).traceback.splitlines()
    assert lines[0] == "Traceback (most recent call last):" and 'raising_tasks.py", line 4, in <module>' in lines[1]
    assert lines[-1] == "ValueError: no database" and not any("importlib" in line or "registry.py" in line for line in lines)


def test_the_watcher_posts_changed_python_files_and_stops(tmp_path):
    pytest.importorskip("watchfiles")
    (tmp_path / "tasks.py").write_text("x = 1\n")
    posted: queue.SimpleQueue[FilesChanged] = queue.SimpleQueue()
    watcher = FileWatcher(posted.put, Log())  # type: ignore[arg-type]
    watcher.watch([str(tmp_path / "tasks.py")])
    time.sleep(0.2)  # the watch is set up on its thread
    started = time.monotonic()
    (tmp_path / "notes.txt").write_text("not code\n")
    (tmp_path / "helper.py").write_text("y = 2\n")
    item = posted.get(timeout=5)
    assert item.paths == (str(tmp_path / "helper.py"),) and time.monotonic() - started < 2
    watcher.stop()


def test_reload_is_a_command_line_flag_only_and_no_shipped_unit_or_image_passes_it(monkeypatch):
    assert build_parser().parse_args(["run", "--reload"]).reload and not build_parser().parse_args(["run"]).reload
    shipped = [*ROOT.glob("systemd/*"), *ROOT.glob("deploy/**/*")]
    passing = [str(p) for p in shipped if p.is_file() and p.suffix not in (".lock",) and "--reload" in p.read_text(errors="ignore")]
    assert len(shipped) > 10 and passing == []
    monkeypatch.setitem(sys.modules, "watchfiles", None)  # not installed
    with pytest.raises(ConfigError, match=r"consumerd\[dev\]"):
        require_watchfiles()


def test_status_shows_which_code_generation_each_worker_runs():
    status: dict[str, Any] = {
        "state": "running",
        "paused": False,
        "uptime_s": 60,
        "concurrency": 3,
        "workers": 3,
        "queued": 0,
        "dead_lettering": 0,
        "held_bytes": 0,
        "counters": {"received": 5, "succeeded": 4, "failed": 0, "dead_lettered": 0, "lease_lapsed": 0},
        "generations": [
            {"generation": 2, "stage": "current", "workers": [201, 202], "busy": 0, "age_s": 3.0},
            {"generation": 1, "stage": "finishing", "workers": [101], "busy": 1, "age_s": 60.0},
        ],
        "running": [
            {"worker_pid": 101, "generation": 1, "task": "slow", "message_id": "m1", "attempt": 1, "running_s": 12.0, "rss_kb": None}
        ],
    }
    text = format_status(status)
    assert "code generation 2 (current, started 3 s ago): 2 workers, 0 busy: 201 202" in text
    assert "code generation 1 (finishing, started 60 s ago): 1 workers, 1 busy: 101" in text
    assert [line.split()[:2] for line in text.splitlines() if line.strip().startswith("101")] == [["101", "1"]]
