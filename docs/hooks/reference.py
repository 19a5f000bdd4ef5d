"""The generated reference pages: configuration keys from the settings model, commands from the parser.

mkdocs runs this module as a hook (mkdocs.yml `hooks:`). A page that holds a placeholder comment gets
the generated reference in its place at build time, so nothing generated is committed and the
reference cannot drift from the code. `tests/unit/test_docs.py` imports this file by its path and
uses the same functions, so a key without a description or an argument without help fails the unit
tests as well as the strict build. Nothing here imports mkdocs at module level: the tests run
without it.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import types
import typing
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import annotated_types
from pydantic import BaseModel
from pydantic.fields import FieldInfo

from consumerd.cli import build_parser
from consumerd.config import ENV_PREFIX, FIXED_ON_RELOAD, Settings

ROOT = Path(__file__).resolve().parents[2]

CONFIG_PLACEHOLDER = "<!-- generated: configuration reference -->"
CLI_PLACEHOLDER = "<!-- generated: command-line reference -->"

# What each section is for: the settings model has a class per section but no prose for it. A
# section missing here is reported like a key without a description.
SECTION_INTROS = {
    "pubsub": "Where messages come from: the project, the subscription, the endpoint and the credentials.",
    "workers": "The worker processes that run tasks, and what task code gets from the daemon.",
    "leases": "How long a held message stays invisible to other consumers, and how its lease is renewed.",
    "retry": "How long a failed message waits before it comes back.",
    "dead_letter": "Where messages that can never succeed go.",
    "flow": "How much message data one daemon holds at once.",
    "shutdown": "How a stop drains.",
    "tasks": "Which tasks exist, and how a message picks one.",
    "logging": "The structured log of the supervisor, the workers and the Google libraries.",
    "metrics": "The Prometheus endpoint and the health probes.",
    "control": "The control socket that `consumerd status`, `pause`, `resume`, `drain` and `scale` talk to.",
    "tracing": "OpenTelemetry spans around tasks.",
    "subscriptions": "Several subscriptions in one daemon, sharing its workers by weight: one table per subscription, "
    "with the keys below; the dotted ones are that subscription's own values of the global keys of the same name.",
    "publish": "Where tasks may publish their results (`consumerd.publish`), and how much one task call may publish.",
    "rate_limit": "How daemons share their tasks' rate limits (`[tasks] rate_limits`, `@task(rate_limit=...)`): "
    "through Redis for the whole fleet, or each its share.",
}

# Files outside docs/ that pages show, copied into the site under these names.
EXTRA_FILES = {"assets/bench-latest.png": "bench/results/latest.png"}


# == configuration =====================================================================================
class Key(typing.NamedTuple):
    section: str
    name: str
    type: str
    default: str
    description: str
    env: str
    reloadable: bool

    @property
    def dotted(self) -> str:
        return f"{self.section}.{self.name}"


def sections() -> list[tuple[str, type[BaseModel]]]:
    """Every section of the settings model, in the model's order (an array of tables, such as
    [[subscriptions]], by the model of its entries)."""
    found = []
    for name, field in Settings.model_fields.items():
        model = field.annotation
        if typing.get_origin(model) is list:
            (model,) = typing.get_args(model)
        assert isinstance(model, type) and issubclass(model, BaseModel), name
        found.append((name, model))
    return found


def is_array(section: str) -> bool:
    return typing.get_origin(Settings.model_fields[section].annotation) is list


def _fields(model: type[BaseModel], prefix: str = "") -> list[tuple[str, FieldInfo]]:
    """A section's keys; a table inside it (a subscription's [subscriptions.retry]) by its keys, dotted."""
    found = []
    for name, field in model.model_fields.items():
        inner = field.annotation
        if isinstance(inner, type) and issubclass(inner, BaseModel):
            found += _fields(inner, f"{prefix}{name}.")
        else:
            found.append((f"{prefix}{name}", field))
    return found


def config_keys() -> list[Key]:
    keys = []
    for section, model in sections():
        for name, field in _fields(model):
            dotted = f"{section}.{name}"
            keys.append(
                Key(
                    section=section,
                    name=name,
                    type=_type_of(field),
                    default=_default_of(field),
                    description=(field.description or "").strip(),
                    env=f"{ENV_PREFIX}{section.upper()}__{name.upper()}",
                    reloadable=section not in FIXED_ON_RELOAD and dotted not in FIXED_ON_RELOAD,
                )
            )
    return keys


def undescribed() -> list[str]:
    """Sections without an introduction and keys without a description."""
    missing = [f"section [{name}]" for name, _ in sections() if not SECTION_INTROS.get(name)]
    return missing + [f"config key {key.dotted}" for key in config_keys() if not key.description]


def config_reference() -> str:
    keys = config_keys()
    lines = []
    for section, _ in sections():
        title = f"[[{section}]]" if is_array(section) else f"[{section}]"
        lines += [f"## {title} {{ #{section} }}", "", SECTION_INTROS.get(section, ""), ""]
        if section in FIXED_ON_RELOAD:
            lines += ["A reload (SIGHUP) keeps this whole section as it was: changing it needs a restart.", ""]
        lines += ['<div class="reference-table" markdown>', "", "| key | type | default | meaning |", "|---|---|---|---|"]
        for key in (k for k in keys if k.section == section):
            reload = "A reload applies a change." if key.reloadable else "Needs a restart: a reload keeps the old value."
            env = (
                f"Environment: `{key.env}`."
                if not is_array(section)
                else f"Environment: the whole list, as JSON, in `{ENV_PREFIX}{section.upper()}`."
            )
            meaning = f"{_inline(key.description)}<br>{env} {reload}"
            lines.append(f'| <span id="{key.dotted}"></span>`{key.name}` | {key.type} | {_default_cell(key)} | {meaning} |')
        lines += ["", "</div>", ""]
    return "\n".join(lines)


def _type_of(field: FieldInfo) -> str:
    annotation = field.annotation
    if typing.get_origin(annotation) is typing.Literal:
        text = " \\| ".join(f'`"{choice}"`' for choice in typing.get_args(annotation))
    else:
        text = _type_name(annotation)
    bounds = _bounds(field)
    return f"{text}, {bounds}" if bounds else text


def _type_name(annotation: Any) -> str:
    simple = {bool: "boolean", int: "integer", float: "number", str: "string"}
    if annotation in simple:
        return simple[annotation]
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is list:
        return f"list of {_type_name(args[0])}s"
    if origin is dict:
        return f"table of {_type_name(args[1])}s"
    if isinstance(annotation, types.UnionType) or origin is typing.Union:
        return " or ".join(_type_name(arg) for arg in args if arg is not type(None))
    return getattr(annotation, "__name__", str(annotation))


def _bounds(field: FieldInfo) -> str:
    low = high = ""
    parts = []
    for item in field.metadata:
        if isinstance(item, annotated_types.Ge):
            low = f"{item.ge}"
        elif isinstance(item, annotated_types.Gt):
            low = f"> {item.gt}"
        elif isinstance(item, annotated_types.Le):
            high = f"{item.le}"
        elif isinstance(item, annotated_types.Lt):
            high = f"< {item.lt}"
        elif isinstance(item, annotated_types.MinLen) and item.min_length == 1:
            parts.append("not empty")
    if low and high:
        parts.insert(0, f"{low}..{high}" if not low.startswith(">") and not high.startswith("<") else f"{low}, at most {high}")
    elif low:
        parts.insert(0, f">= {low}" if not low.startswith(">") else low)
    elif high:
        parts.insert(0, f"at most {high}")
    return ", ".join(parts)


def _default_of(field: FieldInfo) -> str:
    """The default as it would be written in the TOML file."""
    if field.is_required():
        return "required"
    value = field.get_default(call_default_factory=True)
    if value is None:
        return "the global value"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if isinstance(value, dict):
        return "{}" if not value else json.dumps(value)
    if isinstance(value, int | float | str | list):
        return json.dumps(value)
    return str(value)


def _default_cell(key: Key) -> str:
    cell = f"`{key.default}`"
    if key.name.endswith("_bytes") and key.default.isdigit() and int(key.default) >= 1 << 20:
        cell += f" ({int(key.default) / (1 << 20):g} MiB)"
    return cell


# == command line ======================================================================================
class Command(typing.NamedTuple):
    name: str
    help: str
    usage: str
    arguments: list[Argument]


class Argument(typing.NamedTuple):
    name: str
    help: str
    default: str
    required: bool


def commands() -> list[Command]:
    """`consumerd` itself (its own options) and then every subcommand, in the parser's order."""
    parser = build_parser()
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    helps = {choice.dest: choice.help or "" for choice in subparsers._choices_actions}
    found = [_command("", parser, parser.description or "")]
    for name, sub in subparsers.choices.items():
        found.append(_command(name, sub, helps.get(name, "")))
    return found


def _command(name: str, parser: argparse.ArgumentParser, help_text: str) -> Command:
    formatter = parser._get_formatter()
    arguments = []
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction | argparse._SubParsersAction):
            continue  # -h is everywhere; the subcommands are listed one by one
        if action.option_strings:
            label = ", ".join(action.option_strings)
            if action.nargs != 0:
                label += f" {action.metavar or action.dest.upper()}"
        else:
            label = str(action.metavar or action.dest)
        default = action.default
        shown = "" if default in (None, False, "", [], argparse.SUPPRESS) or isinstance(action, argparse._VersionAction) else str(default)
        arguments.append(Argument(label, formatter._expand_help(action) if action.help else "", shown, bool(action.required)))
    usage = " ".join(parser.format_usage().removeprefix("usage: ").split())
    return Command(name, help_text.strip(), usage, arguments)


def unhelped() -> list[str]:
    """Commands and arguments without help text."""
    missing = []
    for command in commands():
        title = f"consumerd {command.name}".strip()
        if not command.help:
            missing.append(f"command {title}")
        missing += [f"argument {argument.name} of {title}" for argument in command.arguments if not argument.help]
    return missing


def cli_reference() -> str:
    lines = []
    for command in commands():
        title = f"consumerd {command.name}".strip()
        anchor = command.name or "consumerd"
        lines += [f"## `{title}` {{ #{anchor} }}", "", _inline(_sentence(command.help)), "", "```", command.usage, "```", ""]
        if command.arguments:
            lines += ['<div class="reference-table" markdown>', "", "| argument | default | meaning |", "|---|---|---|"]
            for argument in command.arguments:
                required = " (required)" if argument.required else ""
                default = f"`{argument.default}`" if argument.default else ""
                lines.append(f"| `{argument.name}`{required} | {default} | {_inline(argument.help)} |")
            lines += ["", "</div>", ""]
    return "\n".join(lines)


# == the hook ==========================================================================================
GENERATORS: dict[str, Callable[[], str]] = {CONFIG_PLACEHOLDER: config_reference, CLI_PLACEHOLDER: cli_reference}


def on_config(config: Any) -> Any:
    missing = undescribed() + unhelped()
    if missing:
        from mkdocs.exceptions import PluginError

        raise PluginError("the generated reference needs a description or help text for: " + "; ".join(missing))
    return config


def on_files(files: Any, config: Any) -> Any:
    from mkdocs.structure.files import File

    for target, source in EXTRA_FILES.items():
        files.append(File.generated(config, target, abs_src_path=str(ROOT / source)))
    return files


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any) -> str:
    for placeholder, generate in GENERATORS.items():
        if placeholder in markdown:
            markdown = markdown.replace(placeholder, generate())
    return markdown


def on_post_build(config: Any) -> None:
    """Leave out of the site (and so of the .deb) what a reader of it never loads."""
    site = Path(config.site_dir)
    # The theme copies lunr's language support for every language it knows; an English-only
    # search loads none of it.
    search = config.plugins.get("material/search") or config.plugins.get("search")
    languages = getattr(getattr(search, "config", None), "lang", None) or []
    if languages and set(languages) <= {"en"}:
        shutil.rmtree(site / "assets" / "javascripts" / "lunr", ignore_errors=True)
    # Source maps point at the theme's sources, which the site does not carry.
    for source_map in (site / "assets").rglob("*.map"):
        source_map.unlink()
    # Without a site_url the sitemap lists no page: it would only be an empty file and its copy.
    if not config.site_url:
        for sitemap in ("sitemap.xml", "sitemap.xml.gz"):
            (site / sitemap).unlink(missing_ok=True)


# == markdown ==========================================================================================
_CODE = re.compile(r"(`[^`]*`)")
_SPECIAL = re.compile(r"([\\*_\[\]|#])")


def _inline(text: str) -> str:
    """Text for a table cell: one line, markdown's special characters escaped outside `code`."""
    parts: Iterator[str] = iter(_CODE.split(" ".join(text.split())))
    return "".join(part.replace("|", "\\|") if part.startswith("`") else _escape(part) for part in parts)


def _escape(text: str) -> str:
    return _SPECIAL.sub(r"\\\1", text).replace("<", "&lt;").replace(">", "&gt;")


def _sentence(text: str) -> str:
    return text[:1].upper() + text[1:] + ("" if text.endswith(".") else ".")
