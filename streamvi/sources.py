"""The contract every data source (plugin) fulfils, and their discovery.

A source turns a native format (a CrystFEL stream, DIALS files, a simulator) into wire
messages.  Iterating a source yields, in order, either a :class:`~streamvi.wire.CrystalMessage`
for each crystal or a :class:`Rejected` record for each piece of input it could not read (a
malformed chunk, say) -- never an exception for bad input, so the good data around it still flow.
"""
from __future__ import annotations

from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Iterator, Protocol, Union, runtime_checkable

from streamvi.wire import CrystalMessage


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


def available_sources() -> dict[str, object]:
    """Registered sources (entry-point group ``streamvi.sources``), by name, loaded lazily."""
    return {ep.name: ep for ep in entry_points(group="streamvi.sources")}


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
