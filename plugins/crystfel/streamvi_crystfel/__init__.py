"""CrystFEL stream source for streamvi.

Reads indexamajig streams (format 2.3, CrystFEL 0.9–0.12), incrementally, into wire messages:
:class:`CrystfelSource` (entry point ``crystfel``), :func:`read_stream`, :class:`StreamParser`
for bytes that arrive piecemeal, and :func:`inspect_stream` for a summary.
"""
from streamvi_crystfel.chunk import ChunkError, ChunkRecord, CrystalRecord, parse_chunk
from streamvi_crystfel.header import StreamHeader, parse_header
from streamvi_crystfel.inspect import inspect_stream
from streamvi_crystfel.panels import PanelIndex
from streamvi_crystfel.reader import CHUNK_REASONS, REASONS, ParserCounts, StreamParser
from streamvi_crystfel.source import (
    DEFAULT_BLOCK_SIZE,
    CrystfelSource,
    default_run,
    read_header,
    read_stream,
)
from streamvi_crystfel.table import ReflectionTable, TableError, parse_table, parse_tables

__all__ = [
    "CHUNK_REASONS", "DEFAULT_BLOCK_SIZE", "REASONS", "ChunkError", "ChunkRecord",
    "CrystalRecord", "CrystfelSource", "PanelIndex", "ParserCounts", "ReflectionTable",
    "StreamHeader", "StreamParser", "TableError", "default_run", "inspect_stream",
    "parse_chunk", "parse_header", "parse_table", "parse_tables", "read_header",
    "read_stream",
]
