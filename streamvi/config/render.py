"""The options written out for people: ``config --example`` and docs/configuration.md.

docs/configuration.md holds prose written by hand and, between marker lines
``<!-- options: NAME -->`` and ``<!-- end options -->``, tables generated here from the
declarations (NAME: ``serve:<section>`` or another command) (:func:`update_document`); tests/test_config.py fails when the document differs
from what :func:`update_document` would write (``streamvi config --markdown`` prints it).
"""
from __future__ import annotations

import re
import textwrap
from pathlib import Path
from typing import Any

from streamvi.config.option import Option, plain
from streamvi.config.options import COMMANDS, SECTIONS, options_of
from streamvi.config.resolve import SERVICE_OPTIONS

_MARKER = re.compile(r"<!-- options: (?P<name>[\w:-]+) -->\n.*?<!-- end options -->", re.S)


def toml_value(v: Any) -> str:
    """``v`` written as a TOML value."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    return '"' + str(v).replace("\\", "\\\\").replace('"', '\\"') + '"'


def example_toml() -> str:
    """A commented example of ``serve``'s configuration with every option at its default."""
    out = ["# streamvi serve configuration. Every key can also be given as an environment",
           "# variable STREAMVI_<KEY> or a flag --<key-with-dashes>; flags win.", ""]
    section = None
    for o in SERVICE_OPTIONS:
        if o.section != section:
            section = o.section
            out.append(f"[{section}]")
        unit = f" [{o.unit}]" if o.unit else ""
        out += textwrap.wrap(plain(o.help) + unit, 88, initial_indent="# ",
                             subsequent_indent="# ")
        out.append(f"{o.name} = {toml_value(o.default_for('serve'))}")
        out.append("")
    return "\n".join(out)


def type_name(o: Option) -> str:
    """``str``, ``int``, ``float``, ``bool``, ``path`` or ``list of …``."""
    name = "path" if o.type is Path else o.type.__name__
    return f"list of {name}" if o.multiple else name


def default_text(o: Option, command: str) -> str:
    """The default as the documentation shows it (``unset`` for None)."""
    value = o.default_for(command)
    if value is None:
        return "unset"
    if isinstance(value, Path):
        value = str(value)
    return f"`{toml_value(value)}`"


def service_table(section: str) -> str:
    """The Markdown table of ``serve``'s options in one section."""
    rows = ["| option | type | default | environment / flag | meaning |",
            "| --- | --- | --- | --- | --- |"]
    for o in SERVICE_OPTIONS:
        if o.section != section:
            continue
        flags = f"`{o.flag}`" + (f" / `--no-{o.flag[2:]}`" if o.type is bool else "")
        unit = f", {o.unit}" if o.unit else ""
        rows.append(f"| `{o.name}` | {type_name(o)}{unit} | {default_text(o, 'serve')} | "
                    f"`{o.env}`, {flags} | {o.help} |")
    return "\n".join(rows)


def command_table(command: str) -> str:
    """The Markdown table of a command's flags (all commands but ``serve``)."""
    rows = ["| flag | type | default | meaning |", "| --- | --- | --- | --- |"]
    # what a command cannot run without first, then the rest in declaration order
    ordered = sorted(options_of(command),
                     key=lambda o: (not o.positional, command not in o.required))
    for o in ordered:
        if o.positional:
            flag = f"`{o.name.upper()}`" + (" …" if o.multiple else "")
        else:
            flag = ", ".join(f"`{f}`" for f in (*o.flags, o.flag))
            if o.type is bool:
                flag += f" / `--no-{o.flag[2:]}`"
        unit = f", {o.unit}" if o.unit else ""
        default = "required" if o.positional or command in o.required else \
            default_text(o, command)
        rows.append(f"| {flag} | {type_name(o)}{unit} | {default} | "
                    f"{o.help_for(command)} |")
    return "\n".join(rows)


def table(name: str) -> str:
    """The table a marker names: ``serve:<section>`` or another command."""
    section = name.removeprefix("serve:")
    if name.startswith("serve:") and section in SECTIONS:
        return service_table(section)
    if name in COMMANDS and name != "serve":
        return command_table(name)
    raise KeyError(f"no option table named {name!r}; known: "
                   + ", ".join([*(f"serve:{s}" for s in SECTIONS), *COMMANDS[1:]]))


def update_document(text: str) -> str:
    """``text`` with every marked table replaced by the declarations' current one."""
    return _MARKER.sub(lambda m: (f"<!-- options: {m.group('name')} -->\n"
                                  f"{table(m.group('name'))}\n<!-- end options -->"), text)


__all__ = ["command_table", "example_toml", "service_table", "table", "toml_value",
           "update_document"]
