"""CrystFEL stream files as streamvi sources: :func:`read_stream` and :class:`CrystfelSource`."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator

from streamvi.sources import SourceItem
from streamvi_crystfel.header import StreamHeader, parse_header
from streamvi_crystfel.reader import StreamParser, find_chunk

#: Bytes read from a file per :meth:`StreamParser.feed`.
DEFAULT_BLOCK_SIZE = 4 * 1024 * 1024


def default_run(path: str | os.PathLike[str]) -> str:
    """Run name of a stream file: its name without the ``.stream`` suffix."""
    name = Path(path).name
    return name[:-len(".stream")] if name.endswith(".stream") else Path(name).stem or name


def read_header(path: str | os.PathLike[str], *, max_bytes: int = 64 * 1024 * 1024
                ) -> StreamHeader:
    """The header of a stream file (everything before its first chunk).

    Parameters
    ----------
    path
        Stream file.
    max_bytes
        Give up if no chunk begins within this many bytes.

    Raises
    ------
    ValueError
        No chunk begins within ``max_bytes``.
    """
    head = bytearray()
    with open(path, "rb") as fh:
        while len(head) < max_bytes:
            block = fh.read(1024 * 1024)
            head += block
            at = find_chunk(head)
            if at >= 0:
                return parse_header(bytes(head[:at]))
            if not block:
                return parse_header(bytes(head))
    raise ValueError(f"{path}: no '----- Begin chunk -----' line in the first {max_bytes} "
                     "bytes; is this a CrystFEL stream?")


def read_stream(path: str | os.PathLike[str], run: str | None = None, *,
                start_offset: int = 0, block_size: int = DEFAULT_BLOCK_SIZE,
                parser: StreamParser | None = None) -> Iterator[SourceItem]:
    """Read a stream file: one message per crystal, a ``Rejected`` per unreadable piece.

    Parameters
    ----------
    path
        Stream file (or FIFO).
    run
        Run name for the messages; default: the file name without ``.stream``.
    start_offset
        Resume at this byte offset (a previous parser's :attr:`StreamParser.offset`); the
        header is then read from the start of the file, and positions give bytes only.
    block_size
        Bytes per read.
    parser
        Feed this parser (to read its counts afterwards; its own run and offset apply).

    Yields
    ------
    CrystalMessage or Rejected
    """
    if parser is None:
        header = read_header(path) if start_offset else None
        parser = StreamParser(run if run is not None else default_run(path), source=str(path),
                              header=header, start_offset=start_offset)
    with open(path, "rb") as fh:
        if parser.offset:
            fh.seek(parser.offset)
        while True:
            block = fh.read(block_size)
            if not block:
                break
            yield from parser.feed(block)
    yield from parser.close()


class CrystfelSource:
    """A CrystFEL stream file as a streamvi source (entry point ``crystfel``).

    Parameters
    ----------
    path
        Stream file.
    run
        Run name; default: the file name without ``.stream``.
    start_offset, block_size
        As for :func:`read_stream`.

    Attributes
    ----------
    parser
        The :class:`StreamParser` of the latest iteration (counts, header, offset).
    """

    def __init__(self, path: str | os.PathLike[str], run: str | None = None, *,
                 start_offset: int = 0, block_size: int = DEFAULT_BLOCK_SIZE):
        self.path = Path(path)
        self.run = run if run is not None else default_run(self.path)
        self.start_offset = start_offset
        self.block_size = block_size
        self.parser: StreamParser | None = None

    def __iter__(self) -> Iterator[SourceItem]:
        header = read_header(self.path) if self.start_offset else None
        self.parser = StreamParser(self.run, source=str(self.path), header=header,
                                   start_offset=self.start_offset)
        return read_stream(self.path, block_size=self.block_size, parser=self.parser)

    @property
    def header(self) -> StreamHeader:
        """The stream header (from the latest iteration, else read from the file)."""
        if self.parser is not None and self.parser.header is not None:
            return self.parser.header
        return read_header(self.path)

    def __repr__(self) -> str:
        return f"CrystfelSource({str(self.path)!r}, run={self.run!r})"
