"""Parse one stream chunk (``----- Begin chunk -----`` … ``----- End chunk -----``).

A chunk is one image: a few ``key = value`` lines, a peak list (skipped: merging does not
use it), and zero or more crystals, each with its cell, orientation and reflection table.
Units are converted here: lengths nm → Å, reciprocal lengths nm⁻¹ → Å⁻¹.  A chunk that
cannot be read raises :class:`ChunkError` with a reason label and the byte offset of the
offending line inside the chunk; the caller turns that into a
:class:`~streamvi.sources.Rejected` record.

Reflection tables can be left undecoded (``decode=False``) so that a reader decodes the
tables of many chunks in one go (:func:`~streamvi_crystfel.table.parse_tables`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from streamvi_crystfel.panels import PanelIndex
from streamvi_crystfel.table import ReflectionTable, TableError, parse_table

BEGIN_CHUNK = b"----- Begin chunk -----"
END_CHUNK = b"----- End chunk -----"
BEGIN_CRYSTAL = b"--- Begin crystal"
END_CRYSTAL = b"--- End crystal"
PEAKS_BEGIN = b"Peaks from peak search"
PEAKS_END = b"End of peak list"
REFLECTIONS_BEGIN = b"Reflections measured after indexing"
REFLECTIONS_END = b"End of reflections"
NO_REFLECTIONS = b"No integrated reflections."

Value = float | int | str


class ChunkError(ValueError):
    """A chunk that cannot be read.

    Attributes
    ----------
    reason
        Snake_case label (``malformed_chunk``, ``bad_reflection_row``, ``missing_cell``,
        ``unterminated_crystal``, ``reflection_count_mismatch``).
    offset
        Byte offset, inside the chunk, of the line at fault.
    """

    def __init__(self, reason: str, message: str, offset: int):
        super().__init__(message)
        self.reason = reason
        self.offset = offset


@dataclass
class CrystalRecord:
    """One crystal as the stream describes it, in Å, Å⁻¹ and degrees.

    Attributes
    ----------
    cell
        ``(a, b, c, α, β, γ)`` (Å, degrees).
    astar, bstar, cstar
        Reciprocal basis vectors in the lab frame, Å⁻¹.
    profile_radius
        Å⁻¹.
    resolution_limit
        Å (``10 / diffraction_resolution_limit[nm⁻¹]``).
    det_shift_mm
        ``predict_refine/det_shift`` (x, y), mm.
    offset
        Byte offset of the ``--- Begin crystal`` line in the chunk.
    table_text, table_offset, table_has_panel
        The undecoded rows of the reflection table (``None`` after ``No integrated
        reflections.``), their byte offset in the chunk, and whether rows name a panel.
    table
        The decoded rows, once decoded.
    """

    cell: tuple[float, float, float, float, float, float] | None = None
    astar: tuple[float, float, float] | None = None
    bstar: tuple[float, float, float] | None = None
    cstar: tuple[float, float, float] | None = None
    lattice_type: str | None = None
    centering: str | None = None
    unique_axis: str | None = None
    profile_radius: float | None = None
    resolution_limit: float | None = None
    final_residual: float | None = None
    det_shift_mm: tuple[float, float] | None = None
    num_reflections: int | None = None
    num_saturated_reflections: int | None = None
    num_implausible_reflections: int | None = None
    offset: int = 0
    table_text: bytes | memoryview | None = None
    table_offset: int = 0
    table_has_panel: bool = True
    table: ReflectionTable | None = None


@dataclass
class ChunkRecord:
    """One image.

    Attributes
    ----------
    filename, event
        ``Image filename`` and ``Event`` (``None`` if the stream has no Event line).
    photon_energy_eV
        eV, ``None`` if absent.
    beam_divergence
        rad.
    beam_bandwidth
        Fraction (FWHM/E).
    camera_length_m
        ``average_camera_length``, m.
    headers
        ``hdf5/…`` and ``header/…`` lines, by their full key, as numbers where they parse.
    """

    filename: str | None = None
    event: str | None = None
    serial: int | None = None
    hit: int | None = None
    indexed_by: str | None = None
    n_indexing_tries: int | None = None
    photon_energy_eV: float | None = None
    beam_divergence: float | None = None
    beam_bandwidth: float | None = None
    camera_length_m: float | None = None
    num_peaks: int | None = None
    headers: dict[str, Value] = field(default_factory=dict)
    crystals: list[CrystalRecord] = field(default_factory=list)


def _show(text: bytes) -> str:
    s = text.decode("utf-8", errors="replace").rstrip()
    return repr(s if len(s) <= 100 else s[:97] + "...")


def _text(value: bytes) -> str:
    return value.decode("utf-8", errors="replace").strip()


def _first_number(kind: Callable[[bytes], Value]) -> Callable[[bytes], Value]:
    """Converter reading the first word (``"0.152001 m"`` → 0.152001)."""
    def convert(value: bytes) -> Value:
        return kind(value.split()[0])
    return convert


def _nm_inverse(value: bytes) -> float:
    """``"0.00258 nm^-1"`` → Å⁻¹."""
    return float(value.split()[0]) / 10.0


def _resolution(value: bytes) -> float | None:
    """``"1.80 nm^-1 or 5.56 A"`` → d in Å (10 / 1.80), from the more precise nm⁻¹ figure."""
    limit = float(value.split()[0])
    return 10.0 / limit if limit > 0 else None


def _vector(value: bytes) -> tuple[float, float, float]:
    """``"+0.0706577 -0.1444151 +0.0270631 nm^-1"`` → Å⁻¹."""
    parts = value.split()
    if len(parts) != 4 or parts[3] != b"nm^-1":
        raise ValueError("expected three numbers and 'nm^-1'")
    return (float(parts[0]) / 10.0, float(parts[1]) / 10.0, float(parts[2]) / 10.0)


def _det_shift(value: bytes) -> tuple[float, float]:
    """``"x = 0.022 y = -0.009 mm"`` (after ``det_shift``) → (x, y) in mm."""
    parts = value.split()
    if len(parts) != 7 or parts[:2] != [b"x", b"="] or parts[3:5] != [b"y", b"="]:
        raise ValueError("expected 'x = X y = Y mm'")
    return (float(parts[2]), float(parts[5]))


#: ``key = value`` lines of a chunk: attribute and converter.
_CHUNK_KEYS: dict[bytes, tuple[str, Callable[[bytes], Value]]] = {
    b"hit": ("hit", _first_number(int)),
    b"indexed_by": ("indexed_by", _text),
    b"n_indexing_tries": ("n_indexing_tries", _first_number(int)),
    b"photon_energy_eV": ("photon_energy_eV", _first_number(float)),
    b"beam_divergence": ("beam_divergence", _first_number(float)),
    b"beam_bandwidth": ("beam_bandwidth", _first_number(float)),
    b"average_camera_length": ("camera_length_m", _first_number(float)),
    b"num_peaks": ("num_peaks", _first_number(int)),
}
#: ``key: value`` lines of a chunk.
_CHUNK_LABELS: dict[bytes, tuple[str, Callable[[bytes], Value]]] = {
    b"Image filename": ("filename", lambda v: v.decode("utf-8", errors="replace")),
    b"Event": ("event", _text),
    b"Image serial number": ("serial", _first_number(int)),
}
#: ``key = value`` lines of a crystal.
_CRYSTAL_KEYS: dict[bytes, tuple[str, Callable[[bytes], object]]] = {
    b"astar": ("astar", _vector),
    b"bstar": ("bstar", _vector),
    b"cstar": ("cstar", _vector),
    b"lattice_type": ("lattice_type", _text),
    b"centering": ("centering", _text),
    b"unique_axis": ("unique_axis", _text),
    b"profile_radius": ("profile_radius", _nm_inverse),
    b"predict_refine/final_residual": ("final_residual", _first_number(float)),
    b"predict_refine/det_shift x": ("det_shift_mm", lambda v: _det_shift(b"x = " + v)),
    b"diffraction_resolution_limit": ("resolution_limit", _resolution),
    b"num_reflections": ("num_reflections", _first_number(int)),
    b"num_saturated_reflections": ("num_saturated_reflections", _first_number(int)),
    b"num_implausible_reflections": ("num_implausible_reflections", _first_number(int)),
}


def _convert(convert: Callable[[bytes], object], key: bytes, value: bytes, pos: int) -> object:
    try:
        return convert(value)
    except (ValueError, IndexError) as exc:
        raise ChunkError("malformed_chunk", f"{key.decode(errors='replace')}: cannot read "
                         f"{_show(value)} ({exc}); the chunk is corrupt", pos) from None


def _header_value(text: bytes) -> Value:
    s = text.decode("utf-8", errors="replace").strip()
    for kind in (int, float):
        try:
            return kind(s)
        except ValueError:
            pass
    return s


def _cell(value: bytes, pos: int) -> tuple[float, float, float, float, float, float]:
    """``"A B C nm, AL BE GA deg"`` (after ``Cell parameters``) → Å and degrees."""
    parts = value.replace(b",", b" ").split()
    try:
        if len(parts) != 8 or parts[3] != b"nm" or parts[7] != b"deg":
            raise ValueError
        a, b, c, al, be, ga = (float(parts[i]) for i in (0, 1, 2, 4, 5, 6))
    except ValueError:
        raise ChunkError("malformed_chunk", "expected 'Cell parameters a b c nm, al be ga "
                         f"deg', got {_show(value)}", pos) from None
    return (a * 10.0, b * 10.0, c * 10.0, al, be, ga)


class _Cursor:
    """Line cursor over the chunk bytes (line ends: LF, optionally CRLF)."""

    __slots__ = ("data", "pos", "end")

    def __init__(self, data: bytes):
        self.data = data
        self.pos = 0
        self.end = len(data)

    def line(self) -> tuple[bytes, int] | None:
        """The next line without its line end, and its offset; ``None`` at the end."""
        start = self.pos
        if start >= self.end:
            return None
        nl = self.data.find(b"\n", start)
        if nl < 0:
            nl = self.end
        self.pos = nl + 1
        if self.data[nl - 1:nl] == b"\r":
            return self.data[start:nl - 1], start
        return self.data[start:nl], start

    def skip_to(self, marker: bytes) -> int | None:
        """Move past the next line equal to ``marker``; its offset, or ``None``."""
        at = self.data.find(b"\n" + marker, self.pos - 1)
        while at >= 0:
            after = at + 1 + len(marker)
            tail = self.data[after:after + 2]
            if tail[:1] == b"\n" or tail == b"\r\n" or after == self.end:
                self.pos = after + (2 if tail == b"\r\n" else 1)
                return at + 1
            at = self.data.find(b"\n" + marker, after)
        return None


def parse_chunk(data: bytes, *, decode: bool = True,
                panels: PanelIndex | None = None) -> ChunkRecord:
    """Parse one chunk.

    Parameters
    ----------
    data
        The chunk from its ``----- Begin chunk -----`` line to its ``----- End chunk -----``
        line inclusive.
    decode
        Decode the reflection tables now; otherwise leave them in
        :attr:`CrystalRecord.table_text` for the caller.
    panels
        The stream's panel numbering, for decoding.

    Returns
    -------
    ChunkRecord

    Raises
    ------
    ChunkError
        Naming the reason and the byte offset inside ``data`` of the line at fault.
    """
    cur = _Cursor(data)
    first = cur.line()
    if first is None or first[0] != BEGIN_CHUNK:
        raise ChunkError("malformed_chunk", "chunk does not start with "
                         f"{BEGIN_CHUNK.decode()!r}", 0)
    chunk = ChunkRecord()
    while True:
        got = cur.line()
        if got is None:
            raise ChunkError("truncated_chunk", f"no {END_CHUNK.decode()!r} line", cur.end)
        line, pos = got
        if line.startswith((b"Image ", b"Event: ")):
            key, sep, value = line.partition(b": ")
            spec = _CHUNK_LABELS.get(key) if sep else None
            if spec is not None:
                setattr(chunk, spec[0], _convert(spec[1], key, value, pos))
            continue
        key, sep, value = line.partition(b" = ")
        if sep:
            spec = _CHUNK_KEYS.get(key)
            if spec is not None:
                setattr(chunk, spec[0], _convert(spec[1], key, value, pos))
            elif key.startswith((b"hdf5/", b"header/")):
                chunk.headers[key.decode("utf-8", errors="replace")] = _header_value(value)
            # Other keys (peak_resolution, those of newer CrystFEL versions) carry nothing
            # merging needs.
            continue
        if line == END_CHUNK:
            break
        if line == PEAKS_BEGIN:
            if cur.skip_to(PEAKS_END) is None:
                raise ChunkError("malformed_chunk", f"peak list has no {PEAKS_END.decode()!r} "
                                 "line", pos)
            continue
        if line == BEGIN_CRYSTAL:
            chunk.crystals.append(_parse_crystal(cur, pos))
            continue
        if line in (END_CRYSTAL, REFLECTIONS_BEGIN, REFLECTIONS_END, BEGIN_CHUNK):
            raise ChunkError("malformed_chunk", f"unexpected {_show(line)} outside a crystal",
                             pos)
    if chunk.filename is None:
        raise ChunkError("malformed_chunk", "chunk has no 'Image filename:' line", 0)
    if decode:
        decode_tables(chunk, panels if panels is not None else PanelIndex())
    return chunk


def decode_tables(chunk: ChunkRecord, panels: PanelIndex) -> None:
    """Decode the tables of a chunk parsed with ``decode=False`` (one by one).

    Raises
    ------
    ChunkError
        ``bad_reflection_row`` at the offending row, or ``reflection_count_mismatch``.
    """
    for crystal in chunk.crystals:
        if crystal.table_text is not None and crystal.table is None:
            try:
                crystal.table = parse_table(crystal.table_text,
                                            with_panel=crystal.table_has_panel, panels=panels)
            except TableError as exc:
                raise table_error(crystal, exc) from None
        check_count(crystal)


def check_count(crystal: CrystalRecord) -> None:
    """The decoded table must hold ``num_reflections`` rows (else rows were lost or added).

    Raises
    ------
    ChunkError
        ``reflection_count_mismatch``, at the crystal's Begin line.
    """
    rows = 0 if crystal.table is None else len(crystal.table)
    if crystal.num_reflections is not None and crystal.table_text is not None \
            and rows != crystal.num_reflections:
        raise ChunkError("reflection_count_mismatch", f"num_reflections = "
                         f"{crystal.num_reflections} but the table has {rows} rows: rows "
                         "were lost or added", crystal.offset)


def table_error(crystal: CrystalRecord, exc: TableError) -> ChunkError:
    """The :class:`ChunkError` for a row of ``crystal``'s table that could not be read."""
    return ChunkError("bad_reflection_row", str(exc), crystal.table_offset + exc.offset)


def _parse_crystal(cur: _Cursor, begin: int) -> CrystalRecord:
    crystal = CrystalRecord(offset=begin)
    have_cell = False
    while True:
        got = cur.line()
        if got is None or got[0] in (END_CHUNK, BEGIN_CRYSTAL, BEGIN_CHUNK):
            pos = cur.end if got is None else got[1]
            raise ChunkError("unterminated_crystal", "crystal starting at chunk byte "
                             f"{begin} has no {END_CRYSTAL.decode()!r} line", pos)
        line, pos = got
        key, sep, value = line.partition(b" = ")
        if sep:
            spec = _CRYSTAL_KEYS.get(key)
            if spec is not None:
                setattr(crystal, spec[0], _convert(spec[1], key, value, pos))
            continue
        if line == END_CRYSTAL:
            break
        if line.startswith(b"Cell parameters "):
            crystal.cell = _cell(line[16:], pos)
            have_cell = True
        elif line == REFLECTIONS_BEGIN:
            _find_table(cur, crystal, pos)
        elif line == NO_REFLECTIONS:
            crystal.table_text = None
    if not have_cell:
        raise ChunkError("missing_cell", "crystal has no 'Cell parameters' line; the chunk is "
                         "corrupt (CrystFEL always writes one)", begin)
    return crystal


def _find_table(cur: _Cursor, crystal: CrystalRecord, begin: int) -> None:
    got = cur.line()
    if got is None:
        raise ChunkError("malformed_chunk", "reflection table has no column header", begin)
    columns, pos = got
    names = columns.split()
    if names[:3] != [b"h", b"k", b"l"] or len(names) not in (9, 10):
        raise ChunkError("malformed_chunk", "reflection table header is not 'h k l I "
                         f"sigma(I) peak background fs/px ss/px panel': {_show(columns)}", pos)
    start = cur.pos
    end = cur.skip_to(REFLECTIONS_END)
    if end is None:
        raise ChunkError("malformed_chunk", f"reflection table has no "
                         f"{REFLECTIONS_END.decode()!r} line", begin)
    crystal.table_text = memoryview(cur.data)[start:end]
    crystal.table_offset = start
    crystal.table_has_panel = len(names) == 10
