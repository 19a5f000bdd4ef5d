"""Composition root: parse arguments, load settings, configure logging, build, run, map to exit codes."""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import stat
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from structlog.stdlib import BoundLogger

from consumerd import __version__
from consumerd.config import Settings, config_path, load_settings
from consumerd.errors import ConfigError, ConsumerdError, ExitCode
from consumerd.logsetup import configure_logging, get_logger
from consumerd.pool.sandbox import credentials_exposure, make_undumpable
from consumerd.supervisor.descriptors import check_concurrency, raise_nofile

DEFAULT_SOCKET = "/run/consumerd/control.sock"  # RuntimeDirectory=consumerd in the unit


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="consumerd", description="Run Pub/Sub messages as tasks in worker processes.")
    parser.add_argument("--version", action="version", version=f"consumerd {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, help_text: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help_text, description=help_text)
        sub.add_argument("--config", metavar="PATH", help="config file (default: $CONSUMERD_CONFIG or /etc/consumerd.toml)")
        return sub

    run = command("run", "run the daemon")
    run.add_argument(
        "--reload",
        action="store_true",
        help="development only: replace the workers when a Python file where the task code came from changes "
        "(needs the dev extra: pip install 'consumerd[dev]'); production reloads with SIGHUP",
    )
    command("check-config", "validate the configuration and print the effective settings")
    tasks = command("tasks", "list the registered tasks and where they come from")
    tasks.add_argument("--schema", action="store_true", help="print each typed task's payload JSON Schema instead, as JSON by task name")

    publish = command("publish", "publish messages (batched) and print their ids")
    publish.add_argument("--topic", required=True, help="topic name or projects/P/topics/T")
    publish.add_argument("--attr", action="append", default=[], metavar="KEY=VALUE", help="message attribute (repeatable)")
    publish.add_argument(
        "--task",
        metavar="NAME",
        help="route to this task (sets tasks.route_attribute) and refuse a payload its type does not accept (exit 65)",
    )
    publish.add_argument("--file", metavar="PATH", help="read the payload from PATH, or stdin with -")
    publish.add_argument("--count", type=int, default=1, metavar="N", help="publish the payload N times (default 1)")
    publish.add_argument("data", nargs="?", help="the payload as text")

    control_command(commands, "status", "what the running daemon is doing: state, counters, every subscription and running task")
    for name, text in (
        ("pause", "stop pulling (running and queued tasks go on)"),
        ("resume", "start pulling again after pause"),
        ("drain", "what SIGTERM does: stop pulling, finish running tasks, exit; of one subscription: it pulls no more"),
    ):
        control_command(commands, name, text).add_argument(
            "--subscription", default="", metavar="NAME", help="only this subscription (a name or path; default: all of them)"
        )
    scale = control_command(commands, "scale", "set the number of workers")
    scale.add_argument("n", type=int, metavar="N", help="workers to run from now on (1 .. what the open-file limit holds)")

    setup = command("setup", "create the topic and subscription if missing (idempotent)")
    setup.add_argument("--topic", required=True, help="the topic (created if missing): a name or projects/P/topics/T")
    setup.add_argument("--subscription", required=True, help="its subscription (created if missing): a name or projects/P/subscriptions/S")
    setup.add_argument("--ack-deadline", type=int, default=60, metavar="N", help="seconds (10..600, default 60)")
    setup.add_argument(
        "--dead-letter-topic", default="", metavar="D", help="the dead-letter topic of the subscription's policy (created if missing)"
    )
    setup.add_argument("--max-delivery-attempts", type=int, default=0, metavar="N", help="5..100, with --dead-letter-topic")
    return parser


def control_command(commands: Any, name: str, help_text: str) -> argparse.ArgumentParser:
    sub = commands.add_parser(name, help=help_text, description=help_text)
    sub.add_argument(
        "--config", metavar="PATH", help="config file, for [control] socket (default: $CONSUMERD_CONFIG or /etc/consumerd.toml)"
    )
    sub.add_argument(
        "--socket",
        metavar="PATH",
        help=f"the control socket (default: [control] socket, $RUNTIME_DIRECTORY/control.sock or {DEFAULT_SOCKET})",
    )
    sub.add_argument("--json", action="store_true", help="print the daemon's answer as JSON")
    return sub


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handler = {
        "run": cmd_run,
        "check-config": cmd_check_config,
        "tasks": cmd_tasks,
        "publish": cmd_publish,
        "setup": cmd_setup,
        **dict.fromkeys(("status", "pause", "resume", "drain", "scale"), cmd_control),
    }[args.command]
    try:
        return int(handler(args))
    except ConfigError as exc:
        print(f"consumerd: config error: {exc}", file=sys.stderr)
        return int(exc.exit_code)
    except ConsumerdError as exc:
        print(f"consumerd: {exc}", file=sys.stderr)
        return int(exc.exit_code)
    except KeyboardInterrupt:
        return int(ExitCode.FAILURE)


def _settings(args: argparse.Namespace, *, file_required: bool) -> tuple[Settings, Path | None]:
    path, named = config_path(args.config)
    if not named and not file_required and not path.exists():
        return load_settings(None), None
    return load_settings(path), path


def cmd_run(args: argparse.Namespace) -> ExitCode:
    settings, path = _settings(args, file_required=True)
    settings.require_subscription(str(path))
    configure_logging(settings.logging.format, settings.logging.level, google_level=settings.logging.google_level)
    log = get_logger("consumerd")
    log.info("daemon.starting", version=__version__, config=str(path))
    warn_if_readable_by_others(path, settings, log)
    warn_if_emulator_is_remote(settings.pubsub.emulator_host, log)
    warn_if_tasks_can_read_the_key(settings, log)
    if not make_undumpable():  # task code (same user) must not read our memory or environment
        log.warning("daemon.dumpable", detail="prctl(PR_SET_DUMPABLE, 0) failed: same-user processes can read this one's memory")
    if args.reload:
        warn_about_watching(log)
    from consumerd.supervisor.loop import (
        Supervisor,  # imports grpc: only for the commands that talk to Pub/Sub
    )

    try:
        return Supervisor(settings, path, watch_code=args.reload).run()
    except ConfigError as exc:
        log.error("daemon.config_error", error=str(exc))
        raise
    except ConsumerdError as exc:
        log.error("daemon.startup_failed", error=str(exc), exit_code=int(exc.exit_code))
        raise


def warn_about_watching(log: BoundLogger) -> None:
    """`--reload` is opt-in on the command line only (no config key, no variable: the shipped units
    never pass it); it needs watchfiles, and says so when it runs unattended."""
    from consumerd.adapters.filewatch import require_watchfiles

    require_watchfiles()
    if not sys.stdout.isatty():
        log.warning(
            "daemon.watching_code", detail="consumerd run --reload is for development: workers are replaced whenever a task file changes"
        )


def warn_if_tasks_can_read_the_key(settings: Settings, log: BoundLogger) -> None:
    if settings.pubsub.emulator_host:
        return  # no credentials are used
    key_file = str(settings.pubsub.credentials_path() or "")
    reason = credentials_exposure(key_file, os.environ, settings.workers.hide_credentials)
    if reason:
        log.warning("workers.credentials_readable", reason=reason)


def warn_if_emulator_is_remote(host_port: str, log: BoundLogger) -> None:
    """An emulator connection is plaintext without credentials: fine on loopback, not across a network."""
    if not host_port:
        return
    host = host_port.rpartition(":")[0].strip("[]")
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        log.warning(
            "pubsub.emulator_not_loopback",
            emulator_host=host_port,
            detail="PUBSUB_EMULATOR_HOST / pubsub.emulator_host sends everything in plaintext and without credentials",
        )


def warn_if_readable_by_others(path: Path | None, settings: Settings, log: BoundLogger) -> None:
    """The key must be private to the service user; the config must not be writable by others."""
    checks = ((settings.pubsub.credentials_path(), 0o077, "chmod 600"), (path, 0o022, "chmod 644 at most"))
    for candidate, forbidden, fix in checks:
        try:
            mode = stat.S_IMODE(candidate.stat().st_mode) if candidate else 0
        except OSError:
            continue
        if mode & forbidden:
            log.warning("security.permissions", file=str(candidate), mode=oct(mode), fix=fix)


def cmd_check_config(args: argparse.Namespace) -> ExitCode:
    """Everything `run` refuses before it connects: settings, task modules, tasks.default, fd limit."""
    settings, path = _settings(args, file_required=True)
    settings.require_subscription(str(path))
    check_concurrency(settings.workers.concurrency, raise_nofile())
    settings.check_task_names(frozenset(_import_in_child(settings)))
    print(json.dumps({"config": str(path), "settings": settings.masked()}, indent=2))
    print(f"consumerd: {path}: OK", file=sys.stderr)
    return ExitCode.OK


def _import_in_child(settings: Settings) -> list[str]:
    """Import the task modules in a fork server, as `run` does: none of the user's code runs here."""
    from consumerd.pool.pool import Pool, fork_server_spec

    pool = Pool(fork_server_spec(settings), 0, forget=lambda _sock: None)
    try:
        return list(pool.start())
    finally:
        pool.stop()


def cmd_tasks(args: argparse.Namespace) -> ExitCode:
    from consumerd.worker.registry import load_task_modules

    settings, _ = _settings(args, file_required=True)
    registry = load_task_modules(settings.tasks.modules)
    specs = registry.specs()
    if not specs:
        raise ConfigError("tasks.modules: no tasks registered (decorate functions with @consumerd.task(NAME))")
    if args.schema:
        schemas = {spec.name: spec.signature.json_schema() for spec in specs if spec.signature.typed}
        print(json.dumps(schemas, indent=2))
        return ExitCode.OK
    width = max(len(spec.name) for spec in specs)
    for spec in specs:
        print(f"{spec.name:<{width}}  {spec.origin}")
    return ExitCode.OK


def cmd_control(args: argparse.Namespace) -> ExitCode:
    from consumerd.control.client import format_status, request

    path = args.socket or _control_socket(args)
    try:
        answer = request(path, args.command, _control_args(args))
    except (OSError, ValueError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise ConsumerdError(f"control socket {path}: {reason} (is the daemon running, and may you use its socket?)") from None
    if args.json:
        print(json.dumps(answer, indent=2))
    elif not answer.get("ok"):
        print(f"consumerd: {answer.get('error', 'refused')}", file=sys.stderr)
    elif args.command == "status":
        print(format_status(answer))
    else:
        print(", ".join(f"{k}: {v}" for k, v in answer.items() if k != "ok"))
    return ExitCode.OK if answer.get("ok") else ExitCode.FAILURE


def _control_args(args: argparse.Namespace) -> dict[str, Any]:
    if args.command == "scale":
        return {"n": args.n}
    return {"subscription": args.subscription} if getattr(args, "subscription", "") else {}


def _control_socket(args: argparse.Namespace) -> str:
    path, named = config_path(args.config)
    if named or path.exists():
        configured = load_settings(path).control.socket_path()
        if configured:
            return configured
    return (
        os.environ.get("RUNTIME_DIRECTORY", "").split(":")[0] + "/control.sock" if os.environ.get("RUNTIME_DIRECTORY") else DEFAULT_SOCKET
    )


def cmd_publish(args: argparse.Namespace) -> ExitCode:
    settings, _ = _settings(args, file_required=False)
    data = _payload(args)
    attributes = dict(_attribute(item) for item in args.attr)
    if args.count < 1:
        raise ConfigError("--count must be at least 1")
    if args.task is not None:
        route = settings.tasks.route_attribute
        if attributes.get(route, args.task) != args.task:
            raise ConfigError(f"--task {args.task!r} and --attr {route}={attributes[route]!r} disagree")
        attributes[route] = args.task
        refused = _payload_refused(settings, args.task, data)
        if refused:
            print(f"consumerd: not published: {refused}", file=sys.stderr)
            return ExitCode.DATAERR
    _require_project(settings, args.topic)
    from consumerd.adapters.pubsub.client import PubSub

    adapter = PubSub(settings.pubsub)
    publisher = adapter.batch_publisher()
    topic = settings.pubsub.topic_path(args.topic)
    futures = [publisher.publish(topic, data, **attributes) for _ in range(args.count)]
    for future in futures:
        print(future.result(timeout=60))
    publisher.stop()
    return ExitCode.OK


def _payload_refused(settings: Settings, name: str, data: bytes) -> str:
    """Why task ``name`` would reject ``data`` (empty: it accepts it, or takes any payload)."""
    from consumerd.errors import PayloadError
    from consumerd.message import Message
    from consumerd.worker.registry import load_task_modules

    spec = load_task_modules(settings.tasks.modules).get(name)
    if spec is None:
        raise ConfigError(f"--task {name!r}: no such task in tasks.modules (see `consumerd tasks`)")
    if not spec.signature.typed:
        return ""
    try:
        spec.signature.validate(Message("", data, {}, None, None, "", ""))
    except PayloadError as exc:
        return f"task {name!r}: {exc.reason}"
    return ""


def cmd_setup(args: argparse.Namespace) -> ExitCode:
    settings, _ = _settings(args, file_required=False)
    _require_project(settings, args.topic)
    if not 10 <= args.ack_deadline <= 600:
        raise ConfigError(f"--ack-deadline must be 10..600 seconds, got {args.ack_deadline}")
    if args.dead_letter_topic and not 5 <= args.max_delivery_attempts <= 100:
        raise ConfigError("--max-delivery-attempts must be 5..100 with --dead-letter-topic")
    from consumerd.adapters.pubsub.client import PubSub

    adapter = PubSub(settings.pubsub)
    pubsub = settings.pubsub
    topic = pubsub.topic_path(args.topic)
    subscription = (
        args.subscription if args.subscription.startswith("projects/") else f"projects/{pubsub.project}/subscriptions/{args.subscription}"
    )
    created = {"topic": adapter.ensure_topic(topic)}
    dead_letter = pubsub.topic_path(args.dead_letter_topic) if args.dead_letter_topic else ""
    if dead_letter:
        created["dead_letter_topic"] = adapter.ensure_topic(dead_letter)
    created["subscription"] = adapter.ensure_subscription(topic, subscription, args.ack_deadline, dead_letter, args.max_delivery_attempts)
    for kind, was_created in created.items():
        name = {"topic": topic, "dead_letter_topic": dead_letter, "subscription": subscription}[kind]
        print(f"{kind} {name}: {'created' if was_created else 'exists'}")
    adapter.close()
    return ExitCode.OK


def _require_project(settings: Settings, topic: str) -> None:
    if not settings.pubsub.project and not topic.startswith("projects/"):
        raise ConfigError("pubsub.project: required (set it in the config or GOOGLE_CLOUD_PROJECT)")


def _payload(args: argparse.Namespace) -> bytes:
    if args.file and args.data is not None:
        raise ConfigError("give the payload either as DATA or with --file, not both")
    if args.file == "-":
        return sys.stdin.buffer.read()
    if args.file:
        try:
            return Path(args.file).read_bytes()
        except OSError as exc:
            raise ConfigError(f"--file {args.file}: {exc.strerror}") from None
    return (args.data or "").encode()


def _attribute(item: str) -> tuple[str, str]:
    key, sep, value = item.partition("=")
    if not sep or not key:
        raise ConfigError(f"--attr {item!r}: expected KEY=VALUE")
    return key, value
