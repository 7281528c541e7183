"""Each command's flags, made from the declarations of :mod:`streamvi.config.options`.

Every flag's help ends with its type, unit and default, so ``streamvi serve --help`` shows
them all.  Flags are read as text and turned into values by the same declarations as the
TOML file and the environment (:meth:`streamvi.config.Option.coerce`), so every way of
giving an option is checked alike.
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from streamvi.config import Config, Option, options_of, plain, resolve
from streamvi.config.render import toml_value, type_name


def describe(o: Option, command: str) -> str:
    """The flag's help: what it does, then its type, unit and default."""
    value = o.default_for(command)
    if value is None:
        default = "unset"
    elif o.type is bool:
        default = "on" if value else "off"
    else:
        default = toml_value(str(value) if not isinstance(value, (list, int, float)) else value)
    unit = f", {o.unit}" if o.unit else ""
    required = "required" if command in o.required or o.positional else f"default {default}"
    choices = f"; one of {', '.join(o.choices)}" if o.choices else ""
    text = plain(o.help_for(command)).replace("%", "%%")
    return f"{text} ({type_name(o)}{unit}{choices}; {required})"


def add_options(parser: argparse.ArgumentParser, command: str, *,
                grouped: bool = False) -> None:
    """Add ``command``'s flags to ``parser`` (in argument groups by section if ``grouped``).

    Every value is left as text (or a list of text) with default None, so that
    :func:`given` tells what the user gave; :func:`streamvi.config.resolve` does the rest.
    """
    groups: dict[str, Any] = {}
    exclusive: dict[str, Any] = {}
    for o in options_of(command):
        where: Any = parser
        if grouped:
            if o.section not in groups:
                groups[o.section] = parser.add_argument_group(o.section)
            where = groups[o.section]
        if o.exclusive:
            if o.exclusive not in exclusive:
                exclusive[o.exclusive] = where.add_mutually_exclusive_group()
            where = exclusive[o.exclusive]
        help_text = describe(o, command)
        if o.positional:
            where.add_argument(o.name, nargs="+" if o.multiple else None, help=help_text,
                               metavar=o.metavar or o.name.upper(),
                               type=Path if o.type is Path else None)
            continue
        # a short flag first (-o), then the declared name, then older spellings
        short = [f for f in o.flags if not f.startswith("--")]
        names = [*short, o.flag, *(f for f in o.flags if f.startswith("--"))]
        kwargs: dict[str, Any] = {"dest": o.name, "default": None, "help": help_text}
        if o.type is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            kwargs["metavar"] = o.metavar or o.name.upper()
            if o.type is Path:
                kwargs["type"] = Path
            kwargs["required"] = command in o.required
            if o.multiple:
                kwargs["action"] = "append"
        where.add_argument(*names, **kwargs)


def given(args: argparse.Namespace, command: str) -> dict[str, Any]:
    """The options the user gave on the command line (text; None: not given)."""
    return {o.name: getattr(args, o.name, None) for o in options_of(command)}


def resolved(args: argparse.Namespace, command: str) -> Config:
    """The typed, checked options of ``command`` from its parsed arguments.

    Raises
    ------
    ConfigError
        A value its declaration refuses, naming the flag.
    """
    values = {}
    for o in options_of(command):
        value = getattr(args, o.name, None)
        values[o.name] = None if value is None else o.coerce(value, o.flag)
    return resolve(command, values)
