"""The contract every data source (plugin) fulfils, and the registry that finds plugins.

A source turns a native format (a CrystFEL stream, DIALS files, a simulator) into wire
messages.  Iterating a source yields, in order, either a :class:`~streamvi.wire.CrystalMessage`
for each crystal or a :class:`Rejected` record for each piece of input it could not read (a
malformed chunk, say) -- never an exception for bad input, so the good data around it still flow.

Plugins are found only through the entry-point group ``streamvi.sources`` (pyproject.toml):
each entry names a source class, or, for ``om``, the OM bridge (a monitor, not a source of
crystals).  The core never imports a plugin package by name: it asks this registry
(:func:`load_source`, :func:`open_file`, :func:`load_plugin`, :func:`plugin_module`), so a
third party adds a source by declaring an entry point, and a missing plugin is one clear
error (docs/architecture.md).
"""
from __future__ import annotations

import importlib
import os
from dataclasses import dataclass
from importlib.metadata import EntryPoint, entry_points
from pathlib import Path
from types import ModuleType
from typing import Any, Iterator, Protocol, Union, runtime_checkable

from streamvi.errors import ConfigError
from streamvi.wire import CrystalMessage

#: The entry-point group plugins register in.
GROUP = "streamvi.sources"
#: Entries of the group that are not sources of crystals (see the module docstring).
NOT_SOURCES = frozenset({"om"})
#: File suffixes the core reads, and the source registered for each.  Named pipes and
#: standard input are read as CrystFEL streams.
FILE_SOURCES = {".stream": "crystfel", ".refl": "dials", ".expt": "dials"}


@dataclass(frozen=True)
class Rejected:
    """A piece of input a source skipped.

    Attributes
    ----------
    source
        The file path or endpoint read.
    position
        Where in it, e.g. ``"byte 12345 (line 77)"``.
    reason
        Short snake_case label (metrics ``reason``).
    detail
        What was wrong and what to do, for people.
    """

    source: str
    position: str
    reason: str
    detail: str

    def __str__(self) -> str:
        return f"{self.source}: {self.position}: {self.reason}: {self.detail}"


SourceItem = Union[CrystalMessage, Rejected]


@runtime_checkable
class Source(Protocol):
    """Anything iterable over :data:`SourceItem`."""

    def __iter__(self) -> Iterator[SourceItem]: ...


def plugins() -> dict[str, EntryPoint]:
    """Every entry of the group ``streamvi.sources``, by name, not loaded yet."""
    return {ep.name: ep for ep in entry_points(group=GROUP)}


def available_sources() -> dict[str, EntryPoint]:
    """Registered sources of crystals (entry-point group ``streamvi.sources``), by name,
    loaded lazily."""
    return {name: ep for name, ep in plugins().items() if name not in NOT_SOURCES}


def load_plugin(name: str) -> Any:
    """The object registered under ``name`` (a source class, or the OM bridge's class).

    Raises
    ------
    ConfigError
        No such entry (with the installed ones), or its package cannot be imported.
    """
    eps = plugins()
    if name not in eps:
        raise ConfigError(f"no plugin named {name!r} in the entry-point group {GROUP}; "
                          f"installed: {', '.join(sorted(eps)) or 'none'}; install streamvi "
                          "with its plugins (pip install -e . in a clone)")
    try:
        return eps[name].load()
    except ImportError as exc:
        raise ConfigError(f"plugin {name!r} ({eps[name].value}) cannot be imported: {exc}; "
                          "reinstall streamvi with its plugins") from exc


def plugin_module(name: str) -> ModuleType:
    """The package that holds plugin ``name``: its other documented functions (a stream
    parser, an inspector, a writer) are reached through it."""
    load_plugin(name)               # the same errors when it is missing
    return importlib.import_module(plugins()[name].module.partition(".")[0])


def load_source(name: str) -> type:
    """Load the source class registered under ``name``.

    Raises
    ------
    KeyError
        With the list of known names.
    """
    eps = available_sources()
    if name not in eps:
        raise KeyError(f"no source named {name!r}; installed: {', '.join(sorted(eps)) or 'none'}")
    return eps[name].load()  # type: ignore[attr-defined]


def source_name_for(path: str | os.PathLike[str]) -> str:
    """The registered source that reads ``path``, chosen by its suffix.

    Raises
    ------
    ConfigError
        A suffix no source reads.
    """
    suffix = Path(path).suffix
    if suffix not in FILE_SOURCES:
        raise ConfigError(f"{path}: unknown file type {suffix!r}; known: "
                          + ", ".join(FILE_SOURCES) + ", a named pipe, or '-' for standard "
                          "input (both read as CrystFEL streams)")
    return FILE_SOURCES[suffix]


def open_file(path: str | os.PathLike[str], **kwargs: Any) -> Source:
    """The source that reads the file ``path`` (chosen by its suffix), opened.

    Raises
    ------
    ConfigError
        No such file, an unknown suffix, or the plugin is not installed.
    """
    if not Path(path).exists():
        raise ConfigError(f"{path}: no such file")
    return load_plugin(source_name_for(path))(Path(path), **kwargs)
