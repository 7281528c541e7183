"""One option: its declaration, and turning text into its value.

An :class:`Option` says everything about one setting once: its name (the TOML key, the
``STREAMVI_<NAME>`` variable and the ``--<name-with-dashes>`` flag), type, unit, default
(per command where the commands differ), help, validation, which commands take it and
which field of :class:`~streamvi.merging.trainer.TrainerConfig` or
:class:`~streamvi.merging.engine.EngineConfig` it sets.  The flags, the TOML file, the
environment, ``streamvi config --example`` and docs/configuration.md are generated from
these declarations (:mod:`streamvi.config.options`).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

from streamvi.errors import ConfigError

#: What a check returns: None when the value is fine, else what is wrong with it (and what
#: to do), said after ``<name> = <value>: ``.
Check = Callable[[Any], "str | None"]

@dataclass(frozen=True)
class Option:
    """One setting of one or more commands.

    Attributes
    ----------
    name
        snake_case; the TOML key, ``STREAMVI_<NAME>`` and ``--<name-with-dashes>``.
    type
        ``str``, ``int``, ``float``, ``bool`` or ``Path`` (of each item when ``multiple``).
    default
        The value when nothing sets it; None: unset (the command decides, the help says how).
    help
        What it does, for people: the flag's help, the TOML comment and the documentation
        row (Markdown: backticks, links).
    section
        The group it is listed in (a TOML table of ``serve``'s file).
    commands
        The commands that take it.
    unit
        The unit of a number (``Å``, ``s``, ``MB``, ``images/s``), shown with the default.
    defaults
        A command's own default where it differs from ``default`` (the help says why).
    helps
        A command's own help where the option means something narrower there.
    multiple
        A list: repeat the flag, comma-separate the variable, a TOML array.
    choices
        The values allowed (checked, and listed in the help).
    check
        Validation of a value: returns what is wrong, or None.
    target
        ``"trainer.<field>"`` or ``"engine.<field>"``: the model or engine setting it gives.
    convert
        Turns the option's value into the target's (MB into bytes, ``auto`` into None).
    flags
        Other spellings on the command line (``-o``, an older name).
    positional
        An argument without a flag (a file, a URL).
    required
        The commands that cannot run without it (on their command line).
    metavar
        The placeholder of its value in the help.
    exclusive
        Options with the same name here cannot be given together.
    in_file
        False for options of ``serve`` that only the command line gives (``--config``).
    """

    name: str
    type: type
    default: Any
    help: str
    section: str
    commands: tuple[str, ...] = ("serve",)
    unit: str = ""
    defaults: Mapping[str, Any] = field(default_factory=dict)
    helps: Mapping[str, str] = field(default_factory=dict)
    multiple: bool = False
    choices: tuple[str, ...] | None = None
    check: Check | None = None
    target: str | None = None
    convert: Callable[[Any], Any] | None = None
    flags: tuple[str, ...] = ()
    positional: bool = False
    required: tuple[str, ...] = ()
    metavar: str | None = None
    exclusive: str | None = None
    in_file: bool = True

    @property
    def env(self) -> str:
        """The environment variable of ``serve``: ``STREAMVI_<NAME>``."""
        return "STREAMVI_" + self.name.upper()

    @property
    def flag(self) -> str:
        """The command-line flag: ``--<name-with-dashes>``."""
        return "--" + self.name.replace("_", "-")

    def default_for(self, command: str) -> Any:
        """The default of ``command`` (its own where it has one)."""
        return self.defaults.get(command, self.default)

    def help_for(self, command: str) -> str:
        return self.helps.get(command, self.help)

    def coerce(self, value: Any, where: str) -> Any:
        """``value`` as this option's type, checked.

        Parameters
        ----------
        value
            From a TOML file, the environment (text) or a flag (text, or a list of text).
        where
            Where it came from, for the message (the file, the variable, the flag).

        Raises
        ------
        ConfigError
            Naming ``where``, the option, the value, what is wrong and the option's help.
        """
        if value is None:
            return None
        if self.multiple:
            if isinstance(value, str):
                items = [x.strip() for x in value.split(",") if x.strip()]
            elif isinstance(value, (list, tuple)):
                items = list(value)
            else:
                raise ConfigError(f"{where}: '{self.name}' must be a list of "
                                  f"{self.type.__name__}, got {value!r}")
            return [self._one(x, where) for x in items]
        return self._one(value, where)

    def _one(self, value: Any, where: str) -> Any:
        try:
            out = _convert(self.type, value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: '{self.name}' = {value!r} is not a valid "
                              f"{self.type.__name__} ({plain(self.help)})") from None
        if self.choices is not None and out not in self.choices:
            raise ConfigError(f"{where}: '{self.name}' = {out!r}: must be one of "
                              + ", ".join(self.choices))
        return out

    def validate(self, value: Any, where: str) -> None:
        """Run :attr:`check` on a resolved value.

        Raises
        ------
        ConfigError
            ``<name> = <value>: <what is wrong>`` and where the value came from.
        """
        if self.check is None or value is None:
            return
        problem = self.check(value)
        if problem is not None:
            raise ConfigError(f"{self.name} = {value!r}: {problem}"
                              + ("" if where in ("default", "") else f" (from {where})"))


def _convert(kind: type, value: Any) -> Any:
    if kind is bool:
        if isinstance(value, bool):
            return value
        s = str(value).strip().lower()
        if s in ("1", "true", "yes", "on"):
            return True
        if s in ("0", "false", "no", "off", ""):
            return False
        raise ValueError(value)
    if kind is int and isinstance(value, float) and not value.is_integer():
        raise ValueError(value)
    if kind is int and isinstance(value, bool):
        raise ValueError(value)
    return kind(value)


def plain(text: str) -> str:
    """Markdown of a help text as plain text (a terminal, a TOML comment)."""
    text = re.sub(r"\[([^\]]+)\]\([^)]+\)", r"\1", text)
    return text.replace("\\|", "|").replace("`", "")


# ---------------------------------------------------------------------------- checks

def positive(what: str = "a number above 0") -> Check:
    """A check that the value is finite and above 0."""
    return lambda v: None if (math.isfinite(v) and v > 0) else f"must be {what}"


def at_least(low: float, what: str = "") -> Check:
    """A check that the value is at least ``low``."""
    return lambda v: None if v >= low else f"must be at least {low:g}{what}"


__all__ = ["Check", "Option", "at_least", "plain", "positive"]
