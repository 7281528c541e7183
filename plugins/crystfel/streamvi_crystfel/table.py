"""Decode CrystFEL reflection tables (stream format 2.3) into numpy arrays.

indexamajig writes every row as ``"%4i %4i %4i %10.2f %10.2f %10.2f %10.2f %6.1f %6.1f %s"``
(h, k, l, I, σ(I), peak, background, fs/px, ss/px, panel).  Rows that keep to those widths
are decoded by a vectorised fixed-width path: the digits of every field become an integer
mantissa (exact in float64), and one division by 10ⁿ then rounds exactly as parsing the
text does, so every value equals Python's ``float`` of its text.  Tables of many chunks are
decoded together (:func:`parse_tables`), which is what makes small tables fast.  A table
with any other row (an overflowing field, tabs, CRLF line ends, ``nan``, long panel names)
goes through a general whitespace-split path that gives identical values.  A row neither
path can read raises :class:`TableError` naming the row.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from streamvi_crystfel.panels import PanelIndex

#: Number of whitespace-separated fields in a format 2.3 reflection row.
N_FIELDS = 10

# Fixed-width layout of the standard row: (start, end, digits after the point) per field.
_FIELDS = ((0, 4, 0), (5, 9, 0), (10, 14, 0), (15, 25, 2), (26, 36, 2), (37, 47, 2),
           (48, 58, 2), (59, 65, 1), (66, 72, 1))
_NUMERIC_WIDTH = 72  # a space, then the panel name, follow
_PANEL_COLUMN = _NUMERIC_WIDTH + 1


_WINDOW = 12  # digit positions per field: the widest field has 9 digits


@dataclass(frozen=True)
class _Layout:
    """Index arrays of the fixed-width row.

    The digits of each field are read as a ``(12, 9, n)`` cube: digit position
    (right-aligned, the decimal point left out), field, row.  Positions before a field's
    first digit column are taken from column 72 (the space before the panel name), so they
    read as spaces.
    """

    cube: np.ndarray  # (12, 9): row column read at each (position, field)
    points: np.ndarray  # columns that must hold '.'
    around_points: tuple[tuple[int, slice], ...]  # cube positions either side of a '.'
    separators: np.ndarray  # columns that must hold ' ' (including the one before the panel)
    scale: np.ndarray  # (9, 1): 10**decimals


def _layout() -> _Layout:
    n = len(_FIELDS)
    cube = np.full((_WINDOW, n), _NUMERIC_WIDTH, dtype=np.intp)
    in_field = np.zeros(_NUMERIC_WIDTH, dtype=bool)
    points = []
    for j, (a, b, ndec) in enumerate(_FIELDS):
        cols = [c for c in range(a, b) if not ndec or c != b - ndec - 1]
        cube[_WINDOW - len(cols):, j] = cols
        if ndec:
            points.append(b - ndec - 1)
        in_field[a:b] = True
    around = []
    for ndec, fields in ((2, slice(3, 7)), (1, slice(7, 9))):
        assert all(_FIELDS[j][2] == ndec for j in range(fields.start, fields.stop))
        around += [(_WINDOW - ndec - 1, fields), (_WINDOW - ndec, fields)]
    return _Layout(cube=cube, points=np.array(points), around_points=tuple(around),
                   separators=np.append(np.flatnonzero(~in_field), _NUMERIC_WIDTH),
                   scale=np.array([[10.0 ** ndec] for _, _, ndec in _FIELDS]))


_L = _layout()
#: Panel names up to this many bytes take the fast path.
_MAX_FAST_PANEL = 8
_PAD = bytes(_PANEL_COLUMN + _MAX_FAST_PANEL)


class TableError(ValueError):
    """A reflection row could not be read.

    Attributes
    ----------
    row
        0-based row index in the table.
    offset
        Byte offset of the row from the start of the table text.
    """

    def __init__(self, message: str, *, row: int, offset: int):
        super().__init__(message)
        self.row = row
        self.offset = offset


@dataclass
class ReflectionTable:
    """Columns of one table; all arrays have one entry per row.

    Attributes
    ----------
    h, k, l
        Miller indices (int32).
    I, sigI, peak, background
        Intensity, its σ, peak value and mean background (float64, detector units).
    fs, ss
        Detector position, pixels (float64).
    panel
        Index into ``panel_names`` (int16); ``None`` for a table without a panel column.
    panel_names
        The stream's panel names (shared by all tables of a stream).
    """

    h: np.ndarray
    k: np.ndarray
    l: np.ndarray  # noqa: E741 - crystallographic name
    I: np.ndarray  # noqa: E741
    sigI: np.ndarray
    peak: np.ndarray
    background: np.ndarray
    fs: np.ndarray
    ss: np.ndarray
    panel: np.ndarray | None
    panel_names: list[str]

    def __len__(self) -> int:
        return int(self.h.shape[0])


def parse_table(text: bytes | memoryview, *, with_panel: bool = True,
                panels: PanelIndex | None = None) -> ReflectionTable:
    """Decode the rows of one reflection table.

    Parameters
    ----------
    text
        The rows only (no column header, no ``End of reflections``), each ending in a newline.
    with_panel
        Whether rows carry the panel name (format 2.3); without it (format 2.2) there are
        nine fields.
    panels
        The stream's panel numbering (extended with new names); by default a fresh one.

    Returns
    -------
    ReflectionTable

    Raises
    ------
    TableError
        For the first row that has the wrong number of fields or a non-numeric value.
    """
    if panels is None:
        panels = PanelIndex()
    text = bytes(text)
    if not text:
        return _empty(panels)
    if with_panel:
        decoded = _decode_fixed(text + _PAD, len(text), panels)
        if decoded is not None:
            return _split(decoded, [len(decoded[2])], panels)[0]
    return _parse_general(text, with_panel, panels)


def parse_tables(texts: Sequence[bytes | memoryview], panels: PanelIndex, *,
                 with_panel: bool = True) -> list[ReflectionTable | TableError]:
    """Decode many tables at once (much faster than one by one for small tables).

    Parameters
    ----------
    texts
        Row texts as for :func:`parse_table`.
    panels
        The stream's panel numbering.
    with_panel
        As for :func:`parse_table`.

    Returns
    -------
    list
        Per text, its :class:`ReflectionTable`, or the :class:`TableError` it raised.
    """
    if with_panel and all(texts):
        joined = b"".join([*texts, _PAD])
        decoded = _decode_fixed(joined, len(joined) - len(_PAD), panels)
        if decoded is not None:
            # Rows per table: newlines before each table's end.
            ends = np.cumsum([len(t) for t in texts])
            counts = np.diff(np.searchsorted(decoded[3], ends), prepend=0)
            return list(_split(decoded, counts.tolist(), panels))
    out: list[ReflectionTable | TableError] = []
    for text in texts:
        try:
            out.append(parse_table(text, with_panel=with_panel, panels=panels))
        except TableError as exc:
            out.append(exc)
    return out


def _empty(panels: PanelIndex) -> ReflectionTable:
    f = np.zeros(0, dtype=np.float64)
    i = np.zeros(0, dtype=np.int32)
    return ReflectionTable(i, i, i, f, f, f, f, f, f, np.zeros(0, dtype=np.int16), panels.names)


def _split(decoded: tuple[np.ndarray, ...], counts: list[int],
           panels: PanelIndex) -> list[ReflectionTable]:
    """Per-table views of the decoded columns (hkl, values, panel, row ends)."""
    hkl, values, panel = decoded[:3]
    out = []
    start = 0
    for n in counts:
        stop = start + n
        h, k, l = hkl[:, start:stop]  # noqa: E741
        i, sig, peak, bg, fs, ss = values[:, start:stop]
        out.append(ReflectionTable(h=h, k=k, l=l, I=i, sigI=sig, peak=peak, background=bg,
                                   fs=fs, ss=ss, panel=panel[start:stop],
                                   panel_names=panels.names))
        start = stop
    return out


def _windows(buf: np.ndarray, width: int) -> np.ndarray:
    """All ``width``-byte windows of ``buf`` as rows of a 2-D view (no copy)."""
    return np.ndarray((buf.shape[0] - width + 1, width), dtype=np.uint8, buffer=buf,
                      strides=(1, 1))


def _decode_fixed(padded: bytes, size: int, panels: PanelIndex
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None:
    """The fast path over ``padded[:size]`` (``padded`` ends in ``_PAD``).

    Returns ``(hkl (3, n) int32, values (6, n) float64, panel (n,) int16, offsets of the
    row ends (n,))``, or ``None`` when any row departs from the standard layout.  Element-wise
    numpy only (no BLAS, hence no hidden threads), on arrays laid out so that every
    operation runs over contiguous memory.
    """
    if padded[size - 1:size] != b"\n":
        return None
    buf = np.frombuffer(padded, dtype=np.uint8)
    ends = np.flatnonzero(buf[:size] == 10)
    starts = np.empty_like(ends)
    starts[0] = 0
    starts[1:] = ends[:-1] + 1
    panel_starts = starts + _PANEL_COLUMN
    panel_len = ends - panel_starts
    if panel_len.min() < 1 or panel_len.max() > _MAX_FAST_PANEL:
        return None
    columns = np.ascontiguousarray(_windows(buf, _PANEL_COLUMN)[starts].T)  # (73, n)
    if not ((columns[_L.separators] == 32).all() and (columns[_L.points] == 46).all()):
        return None
    cube = columns[_L.cube]  # (12, 9, n)
    digit = cube - np.uint8(48)  # wraps: every non-digit becomes >= 10
    is_digit = digit < 10
    space = cube == 32
    minus = cube == 45
    # A field reads (spaces)(minus)digits[.digits]: only those characters, a digit either
    # side of the point and at the end, no space after a non-space, and a minus sign only
    # right after the spaces.
    if not ((is_digit | space | minus).all() and is_digit[-1].all()
            and all(is_digit[p, f].all() for p, f in _L.around_points)
            and not (space[1:] > space[:-1]).any()
            and not (minus[1:] > space[:-1]).any()):
        return None
    # Digits → pairs (uint8) → groups of four (uint16) → 12-digit integers (int64).
    digits = digit * is_digit
    pairs = digits[0::2] * np.uint8(10) + digits[1::2]
    quads = pairs[0::2].astype(np.uint16) * np.uint16(100) + pairs[1::2]
    mantissa = (quads[0].astype(np.int64) * 10000 + quads[1]) * 10000 + quads[2]
    # Integer mantissas are exact in float64, so one division by ±10**decimals rounds
    # exactly as parsing the text does.
    values = mantissa / np.where(minus.any(axis=0), -_L.scale, _L.scale)
    panel = panels.lookup_fixed(buf, panel_starts, panel_len)
    if panel is None:
        return None
    return values[:3].astype(np.int32), values[3:], panel, ends


def _row_offset(text: bytes, row: int) -> int:
    pos = 0
    for _ in range(row):
        pos = text.index(b"\n", pos) + 1
    return pos


def _parse_general(text: bytes, with_panel: bool,
                   panels: PanelIndex | None = None) -> ReflectionTable:
    """Whitespace-split path for any well-formed table; exact error rows."""
    lines = text.split(b"\n")
    if lines[-1] == b"":
        lines.pop()
    n_fields = N_FIELDS if with_panel else N_FIELDS - 1
    tokens = text.split()
    if len(tokens) != n_fields * len(lines):
        for row, line in enumerate(lines):
            got = len(line.split())
            if got != n_fields:
                raise TableError(f"reflection row has {got} fields, expected {n_fields} "
                                 f"(h k l I sigma(I) peak background fs/px ss/px"
                                 f"{' panel' if with_panel else ''}): {_show(line)}",
                                 row=row, offset=_row_offset(text, row))
    grid = np.array(tokens, dtype=np.bytes_).reshape(len(lines), n_fields)
    try:
        hkl = grid[:, :3].astype(np.int32)
        values = grid[:, 3:9].astype(np.float64)
    except (ValueError, OverflowError):
        row = _first_bad_row(lines)
        raise TableError(f"reflection row holds a non-numeric value where h k l must be "
                         f"integers and I..ss numbers: {_show(lines[row])}",
                         row=row, offset=_row_offset(text, row)) from None
    if panels is None:
        panels = PanelIndex()
    panel: np.ndarray | None = None
    if with_panel:
        uniq, first, inverse = np.unique(grid[:, 9], return_index=True, return_inverse=True)
        # New names are numbered in order of appearance, as on the fast path.
        panels.add(uniq[i].decode("utf-8", errors="replace") for i in np.argsort(first))
        ids = panels.indices([u.decode("utf-8", errors="replace") for u in uniq.tolist()])
        panel = ids[inverse]
    return ReflectionTable(
        h=hkl[:, 0].copy(), k=hkl[:, 1].copy(), l=hkl[:, 2].copy(), I=values[:, 0],
        sigI=values[:, 1], peak=values[:, 2], background=values[:, 3], fs=values[:, 4],
        ss=values[:, 5], panel=panel, panel_names=panels.names)


def _first_bad_row(lines: list[bytes]) -> int:
    for row, line in enumerate(lines):
        parts = line.split()
        try:
            for p in parts[:3]:
                int(p)
            for p in parts[3:9]:
                float(p)
        except ValueError:
            return row
    return 0


def _show(line: bytes) -> str:
    text = line.decode("utf-8", errors="replace").rstrip()
    return repr(text if len(text) <= 120 else text[:117] + "...")
