"""Resolving options into typed configuration objects.

``streamvi serve`` takes each option, in increasing precedence, from its default, the TOML
file (``--config``), an environment variable ``STREAMVI_<NAME>`` and a command-line flag
(:func:`load_config`).  The other commands take flags only (:func:`resolve`).  Either way the
result is a frozen dataclass with one typed field per option of the command
(:func:`config_class`), every value checked by its declaration, and the settings of the
model and the engine derived from it (:meth:`Config.settings`), never copied by hand.
"""
from __future__ import annotations

import dataclasses
import functools
import os
import tomllib
from pathlib import Path
from typing import Any, Mapping

from streamvi.config.option import Option
from streamvi.config.options import OPTION_BY_NAME, options_of
from streamvi.errors import ConfigError

#: The options of ``serve``'s TOML file and environment (``--config`` itself is not one).
SERVICE_OPTIONS: tuple[Option, ...] = tuple(o for o in options_of("serve") if o.in_file)


class Config:
    """Methods of every generated configuration class (:func:`config_class`)."""

    command: str = ""
    sources: dict[str, str]

    @property
    def values(self) -> dict[str, Any]:
        """Every option's value, by name (``serve``: those of its file, not ``config``)."""
        return {o.name: getattr(self, o.name) for o in options_of(self.command) if o.in_file}

    def replace(self, **changes: Any) -> "Config":
        """A copy with some options changed (coerced and checked like a flag).

        Raises
        ------
        ConfigError
            An option this command does not take, or a bad value.
        """
        known = {o.name for o in options_of(self.command)}
        values = {}
        for name, value in changes.items():
            if name not in known:
                raise ConfigError(f"unknown option {name!r} of {self.command}; known: "
                                  + ", ".join(sorted(known)))
            opt = OPTION_BY_NAME[name]
            values[name] = opt.coerce(value, "override")
            opt.validate(values[name], "override")
        sources = {**self.sources, **{k: "override" for k in values}}
        return dataclasses.replace(self, **values, sources=sources)

    def settings(self, component: str) -> dict[str, Any]:
        """The fields of ``component`` (``trainer``: :class:`TrainerConfig`, ``engine``:
        :class:`EngineConfig`) that this command's options set, converted.

        Fields no option of the command sets keep their defaults in those classes.
        """
        out = {}
        for o in options_of(self.command):
            if o.target is None or not o.target.startswith(component + "."):
                continue
            value = getattr(self, o.name)
            out[o.target.split(".", 1)[1]] = o.convert(value) if o.convert else value
        return out


def _annotation(o: Option) -> Any:
    kind = list[o.type] if o.multiple else o.type
    return kind | None if o.default is None or any(v is None for v in o.defaults.values()) \
        else kind


@functools.cache
def config_class(command: str) -> type[Config]:
    """The frozen dataclass of ``command``'s options: one typed field per option."""
    fields = [(o.name, _annotation(o), dataclasses.field(default=None))
              for o in options_of(command)]
    fields.append(("sources", dict[str, str],
                   dataclasses.field(default_factory=dict, compare=False, repr=False)))
    name = "".join(p.capitalize() for p in command.split("_")) + "Config"
    cls = dataclasses.make_dataclass(name, fields, bases=(Config,), frozen=True,
                                     namespace={"command": command,
                                                "__module__": __name__})
    cls.__doc__ = (f"Resolved options of ``streamvi {command}`` "
                   "(streamvi.config.options), with where each came from (``sources``).")
    return cls


ServiceConfig = config_class("serve")


def _default(o: Option, command: str) -> Any:
    value = o.default_for(command)
    return list(value) if isinstance(value, list) else value


def _build(command: str, values: dict[str, Any], sources: dict[str, str]) -> Config:
    for o in options_of(command):
        o.validate(values[o.name], sources.get(o.name, ""))
    return config_class(command)(**values, sources=sources)


def resolve(command: str, given: Mapping[str, Any]) -> Config:
    """The options of ``command`` from its flags (already coerced; None: not given).

    Raises
    ------
    ConfigError
        A value its declaration refuses.
    """
    values, sources = {}, {}
    for o in options_of(command):
        value = given.get(o.name)
        if value is None:
            values[o.name], sources[o.name] = _default(o, command), "default"
        else:
            values[o.name], sources[o.name] = value, "flag"
    return _build(command, values, sources)


def load_config(path: str | Path | None = None, *, env: Mapping[str, str] | None = None,
                overrides: Mapping[str, Any] | None = None) -> Config:
    """Resolve ``serve``'s configuration: defaults < TOML file < environment < overrides
    (flags).

    Raises
    ------
    ConfigError
        Unknown keys (with the list of known ones), bad values, an unreadable file.
    """
    known = {o.name: o for o in SERVICE_OPTIONS}
    values = {o.name: _default(o, "serve") for o in options_of("serve")}
    sources = {o.name: "default" for o in options_of("serve")}
    if path is not None:
        p = Path(path)
        try:
            data = tomllib.loads(p.read_text())
        except FileNotFoundError:
            raise ConfigError(f"{p}: configuration file not found") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{p}: not valid TOML: {exc}") from None
        flat: dict[str, Any] = {}
        for k, v in data.items():
            if isinstance(v, dict):     # [section] tables are allowed, names stay flat
                flat.update(v)
            else:
                flat[k] = v
        for k, v in flat.items():
            if k not in known:
                raise ConfigError(f"{p}: unknown key {k!r}; known keys: "
                                  + ", ".join(sorted(known)))
            values[k] = known[k].coerce(v, f"{p}")
            sources[k] = str(p)
        values["config"], sources["config"] = p, "flag"
    env = os.environ if env is None else env
    for o in SERVICE_OPTIONS:
        if o.env in env:
            values[o.name] = o.coerce(env[o.env], f"environment variable {o.env}")
            sources[o.name] = o.env
    for k, v in (overrides or {}).items():
        if v is None:
            continue
        if k not in known:
            raise ConfigError(f"unknown option {k!r}")
        values[k] = known[k].coerce(v, known[k].flag)
        sources[k] = "flag"
    return _build("serve", values, sources)


__all__ = ["Config", "SERVICE_OPTIONS", "ServiceConfig", "config_class", "load_config",
           "resolve"]
