"""Incremental reader of CrystFEL streams (format 2.3, CrystFEL 0.9–0.12).

:class:`StreamParser` takes bytes as they arrive (a file read in blocks, a FIFO, a socket) and
returns one :class:`~streamvi.wire.CrystalMessage` per crystal, or a
:class:`~streamvi.sources.Rejected` record per piece it could not read; it never parses a
chunk before its ``----- End chunk -----`` line has arrived, so a chunk cut at a block
boundary is simply held back.  :attr:`StreamParser.offset` counts the bytes fully consumed
(always the end of the header or of a chunk), so a reader can resume a stream from there
with ``StreamParser(header=…, start_offset=…)``.

Image identity is ``"<Image filename>//<Event>"`` (see
:func:`~streamvi_crystfel.messages.image_id`); a second chunk with the same identity in a
run is rejected (``duplicate_image``), since ``(run, image, crystal)`` must be unique.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from streamvi.errors import WireError
from streamvi.sources import Rejected, SourceItem
from streamvi.wire import from_wire_dict, to_wire_dict
from streamvi_crystfel.chunk import (
    BEGIN_CHUNK,
    END_CHUNK,
    ChunkError,
    ChunkRecord,
    CrystalRecord,
    check_count,
    parse_chunk,
    table_error,
)
from streamvi_crystfel.header import StreamHeader, parse_header
from streamvi_crystfel.messages import crystal_message, image_id, photon_energy
from streamvi_crystfel.panels import PanelIndex
from streamvi_crystfel.table import ReflectionTable, TableError, parse_tables

#: Reasons of the :class:`Rejected` records this reader emits (besides the wire-validation
#: reasons of :mod:`streamvi.wire`, e.g. ``absurd_cell``, ``no_valid_reflections``).
REASONS = ("malformed_chunk", "truncated_chunk", "bad_reflection_row", "missing_cell",
           "unterminated_crystal", "reflection_count_mismatch", "missing_photon_energy",
           "no_reflections", "duplicate_image", "stray_text")

#: Reasons that mean a chunk (or text between chunks) could not be read at all.
CHUNK_REASONS = frozenset(("malformed_chunk", "truncated_chunk", "bad_reflection_row",
                           "missing_cell", "unterminated_crystal", "reflection_count_mismatch",
                           "stray_text"))

_MARKER = b"----- "
_BLOCK_BEGIN = b"----- Begin "
#: Text between chunks that starts so is the header of a concatenated stream (the format
#: line may have gone with a chunk cut short before it).
_HEADER_STARTS = (b"CrystFEL stream format ", b"----- Begin geometry file",
                  b"----- Begin unit cell")
_KEEP_REJECTED = 20
#: Bytes of reflection rows decoded per batch (~8,000 rows): small tables decode much faster
#: together.
_BATCH_BYTES = 640_000


def find_chunk(buf: bytes | bytearray, start: int = 0) -> int:
    """Offset of the first line at or after ``start`` that begins a chunk; -1 if none.

    ``start`` must be the start of a line.
    """
    if buf.startswith(BEGIN_CHUNK, start):
        return start
    at = buf.find(b"\n" + BEGIN_CHUNK, max(start - 1, 0))
    return at + 1 if at >= 0 else -1


@dataclass
class ParserCounts:
    """Running totals of a :class:`StreamParser`.

    Attributes
    ----------
    chunks
        Complete chunks seen (read or rejected), truncated ones included.
    crystals
        Crystals in chunks that could be read.
    reflections
        Reflection rows in those crystals.
    messages
        Crystal messages emitted.
    indexed_chunks
        Readable chunks with at least one crystal.
    chunks_without_crystals, crystals_without_reflections
        Readable chunks with no crystal; crystals with ``No integrated reflections.``
    malformed
        Chunks (or stray pieces of text) that could not be read.
    rejected
        Every :class:`Rejected` emitted, by reason.
    rows_rejected
        Reflection rows dropped by wire validation (non-finite I, σ ≤ 0, hkl = 000), by reason.
    """

    chunks: int = 0
    crystals: int = 0
    reflections: int = 0
    messages: int = 0
    indexed_chunks: int = 0
    chunks_without_crystals: int = 0
    crystals_without_reflections: int = 0
    malformed: int = 0
    rejected: dict[str, int] = field(default_factory=dict)
    rows_rejected: dict[str, int] = field(default_factory=dict)


@dataclass
class _Pending:
    """A chunk whose structure is read and whose tables wait for the next batch."""

    at: int  # offset of the chunk in the parser's buffer
    data: bytes
    record: ChunkRecord


class StreamParser:
    """Turn CrystFEL stream bytes into crystal messages, incrementally.

    Parameters
    ----------
    run
        Run name put in every message.
    source
        Name of the input for :class:`Rejected` records (usually the file path).
    header
        The stream header when starting mid-stream (``start_offset > 0``); otherwise the
        header is read from the data.
    start_offset
        Absolute byte offset of the first byte fed (the end of a chunk, see :attr:`offset`).
    start_line
        Line number of that byte (1-based); by default 1 at offset 0 and unknown elsewhere
        (positions then give bytes only).

    Attributes
    ----------
    header
        The :class:`StreamHeader` (``None`` until the first chunk starts).
    headers
        Every header seen; concatenated streams carry one per part.
    panels
        Panel numbering shared by every message (geometry order, then new names).
    counts
        :class:`ParserCounts`.
    first_rejected
        The first few :class:`Rejected` records (for ``streamvi inspect``).
    offset
        Bytes fully consumed, absolute: the end of the header or of the last complete chunk.
    line
        Line number at :attr:`offset` (1-based), or ``None`` if unknown.
    """

    def __init__(self, run: str, *, source: str = "<stream>", header: StreamHeader | None = None,
                 start_offset: int = 0, start_line: int | None = None):
        self.run = run
        self.source = source
        self.header: StreamHeader | None = None
        self.headers: list[StreamHeader] = []
        self.panels = PanelIndex()
        self.counts = ParserCounts()
        self.first_rejected: list[Rejected] = []
        self.offset = start_offset
        self.line = start_line if start_line is not None else (1 if start_offset == 0 else None)
        if header is not None:
            self._use_header(header)
        self._buf = bytearray()
        # Offset and line of _buf[0] while a feed is being worked through.
        self._base_offset, self._base_line = self.offset, self.line
        self._scan = 0  # where the search for an End line resumes, relative to _buf
        self._queue: list[_Pending | Rejected] = []
        self._queued_bytes = 0
        self._out: list[SourceItem] = []
        self._seen: set[int] = set()
        self._closed = False

    # ------------------------------------------------------------------ public

    def feed(self, data: bytes) -> list[SourceItem]:
        """Take more bytes; return what the complete chunks among them hold.

        Parameters
        ----------
        data
            The next bytes of the stream, split anywhere.

        Returns
        -------
        list
            In stream order: a :class:`~streamvi.wire.CrystalMessage` per crystal, a
            :class:`Rejected` per unreadable chunk or unusable crystal.
        """
        if self._closed:
            raise RuntimeError("StreamParser.feed() after close(); make a new parser")
        self._buf += data
        return self._drain(final=False)

    def close(self) -> list[SourceItem]:
        """End of input: an incomplete trailing chunk becomes ``truncated_chunk``."""
        if self._closed:
            return []
        out = self._drain(final=True)
        self._closed = True
        return out

    @property
    def position(self) -> str:
        """Where the parser stands, as ``"byte N (line L)"``."""
        return self._where(0)

    # ------------------------------------------------------------------ splitting

    def _drain(self, final: bool) -> list[SourceItem]:
        if self.header is None and not self._read_header(final):
            return []
        buf = self._buf
        self._base_offset, self._base_line = self.offset, self.line
        pos = 0
        while pos < len(buf):
            if not buf.startswith(BEGIN_CHUNK, pos):
                nxt = find_chunk(buf, pos)
                if nxt < 0 and not final:
                    break
                end = len(buf) if nxt < 0 else nxt
                self._between_chunks(bytes(buf[pos:end]), pos)
                pos = end
                continue
            kind, end_at = self._find_end(buf, pos, final)
            if kind == "more":
                break
            if kind == "cut":
                # The stream ends, or another block begins, before this chunk's End line
                # (e.g. a crashed indexamajig whose output was appended to).
                self.counts.chunks += 1
                self._queue.append(self._reject("truncated_chunk", pos, (
                    "the stream ends inside this chunk (no '----- End chunk -----'); it is "
                    "skipped — if the stream is still being written, read it again later")
                    if end_at == len(buf) else (
                    "chunk has no '----- End chunk -----' line before the next block "
                    f"begins at {self._where(end_at)}; the writer was interrupted, the chunk "
                    "is skipped")))
                pos = end_at
                continue
            self._chunk(bytes(buf[pos:end_at]), pos)
            pos = end_at
        self._flush()
        out, self._out = self._out, []
        self.offset = self._base_offset + pos
        if self.line is not None:
            self.line += buf.count(b"\n", 0, pos)
        del buf[:pos]
        self._base_offset, self._base_line = self.offset, self.line
        self._scan = max(0, self._scan - pos)
        return out

    def _find_end(self, buf: bytearray, start: int, final: bool) -> tuple[str, int]:
        """Where the chunk at ``start`` ends, in one pass over it.

        Returns ``("end", offset just past its End line)``, ``("cut", offset of the block
        marker or end of input that comes first)``, or ``("more", -1)`` when its end has not
        arrived yet.
        """
        # Inside a chunk, "----- " only starts its End line, or the next block when the
        # chunk was cut short -- then perhaps in mid-line, if the writer died mid-line.
        at = buf.find(_MARKER, max(start + 1, self._scan))
        while at >= 0:
            eol = buf.find(b"\n", at)
            if eol < 0 and not final:  # the rest of this line has not arrived yet
                self._scan = at
                return "more", -1
            end = len(buf) if eol < 0 else eol + 1
            if buf[at - 1] == 10 and buf[at:end].rstrip(b"\r\n") == END_CHUNK:
                self._scan = 0
                return "end", end
            if buf.startswith(_BLOCK_BEGIN, at):
                self._scan = 0
                # An appended stream's header starts with its format line, before the block.
                fmt = buf.rfind(_HEADER_STARTS[0], start, at)
                return "cut", fmt if fmt > start else at
            at = buf.find(_MARKER, at + 1)
        if final:
            self._scan = 0
            return "cut", len(buf)
        self._scan = max(start + 1, len(buf) - len(_MARKER))
        return "more", -1

    def _read_header(self, final: bool) -> bool:
        """Consume the header once the first chunk begins; whether it is done."""
        at = find_chunk(self._buf, 0)
        if at < 0 and not final:
            return False
        end = len(self._buf) if at < 0 else at
        self._use_header(parse_header(bytes(self._buf[:end])))
        self.offset += end
        if self.line is not None:
            self.line += self._buf.count(b"\n", 0, end)
        del self._buf[:end]
        return True

    def _use_header(self, header: StreamHeader) -> None:
        self.headers.append(header)
        if self.header is None:
            self.header = header
        self.panels.add(header.panel_names)

    def _between_chunks(self, text: bytes, at: int) -> None:
        """Text between two chunks: blank, the header of a concatenated stream, or junk."""
        if not text.strip():
            return
        if text.startswith(_HEADER_STARTS):
            self._flush()  # chunks before it used the previous header
            self._use_header(parse_header(text))
            return
        self._queue.append(self._reject("stray_text", at, (
            f"{len(text)} bytes between chunks are neither a chunk nor a stream header "
            f"(starting {text[:40].decode('utf-8', errors='replace')!r}); they are skipped")))

    # ------------------------------------------------------------------ chunks

    def _chunk(self, data: bytes, at: int) -> None:
        """Read a chunk's structure now; its tables are decoded with the next batch."""
        self.counts.chunks += 1
        try:
            record = parse_chunk(data, decode=False)
        except ChunkError as exc:
            self._queue.append(self._chunk_reject(exc, at, data))
            return
        self._queue.append(_Pending(at, data, record))
        self._queued_bytes += sum(len(c.table_text or b"") for c in record.crystals)
        if self._queued_bytes >= _BATCH_BYTES:
            self._flush()

    def _flush(self) -> None:
        """Decode the queued tables together, then emit the queue in stream order."""
        queue, self._queue, self._queued_bytes = self._queue, [], 0
        failed: dict[int, TableError] = {}
        for has_panel in (True, False):
            crystals = [c for item in queue if isinstance(item, _Pending)
                        for c in item.record.crystals
                        if c.table_text is not None and c.table_has_panel == has_panel]
            if not crystals:
                continue
            tables = parse_tables([c.table_text for c in crystals],  # type: ignore[misc]
                                  self.panels, with_panel=has_panel)
            for crystal, table in zip(crystals, tables):
                if isinstance(table, ReflectionTable):
                    crystal.table = table
                else:
                    failed[id(crystal)] = table
        for item in queue:
            if isinstance(item, Rejected):
                self._emit(item)
                continue
            try:
                for crystal in item.record.crystals:
                    if id(crystal) in failed:
                        raise table_error(crystal, failed[id(crystal)])
                    check_count(crystal)
            except ChunkError as exc:
                self._emit(self._chunk_reject(exc, item.at, item.data))
            else:
                self._messages(item)

    def _messages(self, item: _Pending) -> None:
        chunk, at = item.record, item.at
        image = image_id(chunk)
        key = hash(image)
        if key in self._seen:
            self._emit(self._reject("duplicate_image", at, (
                f"image {image!r} was already read in run {self.run!r}; (run, image, crystal) "
                "must be unique, so this chunk is skipped — give each stream part its own "
                "run name")))
            return
        self._seen.add(key)
        counts = self.counts
        counts.crystals += len(chunk.crystals)
        if chunk.crystals:
            counts.indexed_chunks += 1
        else:
            counts.chunks_without_crystals += 1
        energy = photon_energy(chunk, self.headers[-1] if self.headers else None)
        for index, crystal in enumerate(chunk.crystals):
            self._crystal(index, crystal, chunk, image, energy, at)

    def _crystal(self, index: int, crystal: CrystalRecord, chunk: ChunkRecord, image: str,
                 energy: float | None, at: int) -> None:
        counts = self.counts
        if crystal.table is None or len(crystal.table) == 0:
            counts.crystals_without_reflections += 1
            self._emit(self._reject("no_reflections", at, (
                f"crystal {index} of image {image!r} has no integrated reflections; nothing "
                "to merge")))
            return
        counts.reflections += len(crystal.table)
        if energy is None:
            self._emit(self._reject("missing_photon_energy", at, (
                f"image {image!r} has no photon_energy_eV and the geometry gives none; add "
                "'photon_energy = <eV>' to the geometry file")))
            return
        msg = crystal_message(self.run, image, index, chunk, crystal, energy)
        try:
            # The wire codec's own checks: every message emitted is one a receiver accepts.
            msg = from_wire_dict(to_wire_dict(msg))
        except WireError as exc:
            self._emit(self._reject(exc.reason, at, (
                f"crystal {index} of image {image!r} fails wire validation: {exc}")))
            return
        for reason, n in msg.rows_rejected.items():
            counts.rows_rejected[reason] = counts.rows_rejected.get(reason, 0) + n
        counts.messages += 1
        self._out.append(msg)

    # ------------------------------------------------------------------ rejects

    def _where(self, rel: int, line: int | None = None) -> str:
        """``"byte N (line L)"`` of ``_buf[rel]``."""
        if line is None and self._base_line is not None:
            line = self._base_line + self._buf.count(b"\n", 0, rel)
        at = f"byte {self._base_offset + rel}"
        return at if line is None else f"{at} (line {line})"

    def _chunk_reject(self, exc: ChunkError, at: int, data: bytes) -> Rejected:
        line = None
        if self._base_line is not None:
            line = (self._base_line + self._buf.count(b"\n", 0, at)
                    + data.count(b"\n", 0, exc.offset))
        detail = str(exc)
        if exc.offset:
            detail += f" (in the chunk starting at {self._where(at)})"
        detail += "; the chunk is skipped"
        return self._reject(exc.reason, at + exc.offset, detail, line=line)

    def _reject(self, reason: str, rel: int, detail: str, *, line: int | None = None
                ) -> Rejected:
        counts = self.counts
        counts.rejected[reason] = counts.rejected.get(reason, 0) + 1
        if reason in CHUNK_REASONS:
            counts.malformed += 1
        return Rejected(source=self.source, position=self._where(rel, line), reason=reason,
                        detail=detail)

    def _emit(self, rec: Rejected) -> None:
        if len(self.first_rejected) < _KEEP_REJECTED:
            self.first_rejected.append(rec)
        self._out.append(rec)
