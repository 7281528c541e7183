"""Read DIALS reflection tables (``.refl``, msgpack) into numpy columns, without DIALS.

The file is one msgpack array, as DIALS' ``reflection_table_msgpack_adapter.h`` writes it::

    ["dials::af::reflection_table", VERSION (1 or 2),
     {"identifiers": {experiment id (int): identifier (str)},
      "nrows": N,
      "data": {column name: [type name, [N, <bin: N × element bytes, native order>]]}}]

Column types and their element layout (little-endian, as written on x86):

==========================  ==============  =========================
type name                   numpy dtype     shape
==========================  ==============  =========================
``bool``                    ``bool``        (N,)
``int``                     ``<i4``         (N,)
``std::size_t``             ``<u8``         (N,)
``double``                  ``<f8``         (N,)
``vec2<double>``            ``<f8``         (N, 2)
``vec3<double>``            ``<f8``         (N, 3)
``mat3<double>``            ``<f8``         (N, 3, 3)
``int6``                    ``<i4``         (N, 6)
``cctbx::miller::index<>``  ``<i4``         (N, 3)
==========================  ==============  =========================

``Shoebox<>`` and ``FrameSlicedShoebox<>`` (pixel data, variable length) and any type not
listed are skipped and reported by name in :attr:`ReflectionTable.skipped`.  The old pickle
format (DIALS < 2.0) is refused: this reader never unpickles.

The file is walked column by column, so a file cut short still yields the columns that
precede the cut (with ``strict=False``).
"""
from __future__ import annotations

import os
from typing import Any, Iterable

import msgpack
import numpy as np

from streamvi.errors import InputError

FILETYPE = "dials::af::reflection_table"
SUPPORTED_VERSIONS = (1, 2)
REASON = "malformed_reflection_table"

#: Element layout of each fixed-size column type: (numpy dtype, trailing shape).
COLUMN_TYPES: dict[str, tuple[str, tuple[int, ...]]] = {
    "bool": ("?", ()),
    "int": ("<i4", ()),
    "std::size_t": ("<u8", ()),
    "double": ("<f8", ()),
    "vec2<double>": ("<f8", (2,)),
    "vec3<double>": ("<f8", (3,)),
    "mat3<double>": ("<f8", (3, 3)),
    "int6": ("<i4", (6,)),
    "cctbx::miller::index<>": ("<i4", (3,)),
}
_PICKLE_START = (b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05")


class ReflectionTable(dict):
    """Columns of a DIALS reflection table, by name (a ``dict[str, numpy.ndarray]``).

    Arrays are read-only views of the file's bytes, shaped as :data:`COLUMN_TYPES`.

    Attributes
    ----------
    path
        The file read.
    version
        Format version in the file (1 or 2).
    nrows
        Row count of the table (every column in the dict has this length).
    identifiers
        Experiment identifier strings by experiment id (the ``id`` column); often empty.
    types
        DIALS type name of every column in the file, decoded or not.
    skipped
        Columns not decoded because of their type (pixel data, unknown types), with the
        type names.
    bad_columns
        With ``strict=False``: columns dropped because they were inconsistent or cut
        short, with what was wrong.
    problems
        With ``strict=False``: table-level problems that did not stop reading (a header
        ``nrows`` that disagrees with every column, a file cut short), as
        ``(where, what)`` pairs.
    """

    def __init__(self, path: str) -> None:
        super().__init__()
        self.path = path
        self.version = 0
        self.nrows = 0
        self.identifiers: dict[int, str] = {}
        self.types: dict[str, str] = {}
        self.skipped: dict[str, str] = {}
        self.bad_columns: dict[str, str] = {}
        self.problems: list[tuple[str, str]] = []


def _fail(path: str, message: str, key: str | None = None) -> InputError:
    return InputError(f"{path}: {message}", reason=REASON, key=key)



def read_reflection_table(path: str | os.PathLike[str], *, strict: bool = True,
                          columns: Iterable[str] | None = None) -> ReflectionTable:
    """Decode a DIALS msgpack reflection table.

    Parameters
    ----------
    path
        ``.refl`` file written by DIALS ≥ 2.0.
    strict
        If true, any inconsistency (a column whose length disagrees with ``nrows``, a file
        cut short) raises.  If false, the sound columns are kept and the bad ones are listed
        in :attr:`ReflectionTable.bad_columns` / :attr:`ReflectionTable.problems`; only a
        file that gives no usable table at all raises.
    columns
        Decode only these columns (the others are passed over without being kept in memory,
        and only their type names are recorded); default: all.

    Returns
    -------
    ReflectionTable
        Columns by name.

    Raises
    ------
    streamvi.errors.InputError
        Reason ``malformed_reflection_table`` (``unreadable_file`` if it cannot be opened);
        the message names the file, the column or byte offset, what was wrong and what to do.
    """
    spath = str(path)
    try:
        fh = open(path, "rb")
    except OSError as exc:
        raise InputError(f"{spath}: cannot open the reflection table: {exc.strerror}",
                         reason="unreadable_file") from exc
    with fh:
        size = os.fstat(fh.fileno()).st_size
        head = fh.read(2)
        fh.seek(0)
        if head in _PICKLE_START:
            raise _fail(spath, "this is a pickled reflection table (DIALS < 2.0), which is not "
                        "read for safety; re-save it with DIALS ≥ 2.0 (any dials program "
                        "that writes .refl) to get the msgpack format")
        # Unpacker walks the file object by object, so columns before a cut survive.
        unpacker = msgpack.Unpacker(fh, raw=False, strict_map_key=False,
                                    max_buffer_size=max(size, 1 << 20))
        wanted = None if columns is None else frozenset(columns)
        return _Reader(unpacker, ReflectionTable(spath), strict, size, wanted).read()


class _Reader:
    """One pass over the msgpack objects of a table file."""

    def __init__(self, u: msgpack.Unpacker, table: ReflectionTable, strict: bool, size: int,
                 wanted: frozenset[str] | None):
        self.u = u
        self.table = table
        self.path = table.path
        self.strict = strict
        self.size = size
        self.wanted = wanted
        self.lengths: dict[str, int] = {}
        self.cut_at: int | None = None  # start of the column the file ends in

    def read(self) -> ReflectionTable:
        u, path, table = self.u, self.path, self.table
        try:
            n_top = u.read_array_header()
            filetype = u.unpack() if n_top >= 1 else None
            version = u.unpack() if n_top >= 2 else None
        except msgpack.OutOfData:
            raise _fail(path, f"the file ends at byte {self.size}, before the table header is "
                        "complete; it is empty or was cut short — write it again") from None
        except (ValueError, msgpack.FormatError, msgpack.StackError, UnicodeDecodeError) as exc:
            raise _fail(path, f"not a msgpack reflection table ({exc}); is this a DIALS .refl "
                        "file?") from None
        if n_top != 3 or filetype != FILETYPE:
            raise _fail(path, f"starts with {filetype!r} in an array of {n_top}, not "
                        f"['{FILETYPE}', version, contents]; is this a DIALS .refl file?")
        if version not in SUPPORTED_VERSIONS:
            raise _fail(path, f"format version {version!r} is not one of "
                        f"{', '.join(map(str, SUPPORTED_VERSIONS))}; convert it with a DIALS "
                        "release that reads it, or report the new version")
        table.version = int(version)
        nrows: int | None = None
        data_found = False
        try:
            for _ in range(u.read_map_header()):
                key = u.unpack()
                if key == "nrows":
                    nrows = u.unpack()
                    if isinstance(nrows, bool) or not isinstance(nrows, int) or nrows < 0:
                        raise _fail(path, f"'nrows' is {nrows!r}, not a row count", key="nrows")
                elif key == "identifiers":
                    self._identifiers(u.unpack())
                elif key == "data":
                    if nrows is None:
                        raise _fail(path, "'data' comes before 'nrows'; DIALS writes 'nrows' "
                                    "first — the file was not written by DIALS", key="nrows")
                    data_found = True
                    self._columns(nrows)
                else:
                    u.skip()
                    table.problems.append((f"header key {key!r}", "unknown header key ignored"))
        except msgpack.OutOfData:
            at = self.cut_at if self.cut_at is not None else u.tell()
            message = (f"the file ends at byte {self.size}, inside the table (from byte {at} "
                       "on it is incomplete); it was cut short (still being written, or a "
                       "failed copy)")
            if self.strict or not table:
                raise _fail(path, message + " — write or copy it again") from None
            table.problems.append((f"byte {at}", message + "; the complete columns before "
                                   "the cut are used"))
        except (ValueError, msgpack.FormatError, msgpack.StackError, UnicodeDecodeError,
                TypeError) as exc:
            raise _fail(path, f"unreadable msgpack near byte {u.tell()} ({exc})") from None
        if nrows is None:
            raise _fail(path, "the table header has no 'nrows'", key="nrows")
        if not data_found:
            raise _fail(path, "the table has no 'data' map of columns", key="data")
        if table.nrows != nrows:
            table.problems.append(("header 'nrows'", f"header 'nrows' is {nrows} but every "
                                   f"column holds {table.nrows} rows; the columns were used"))
        return table

    def _identifiers(self, idents: Any) -> None:
        if not isinstance(idents, dict):
            raise _fail(self.path, "'identifiers' is not a map of experiment id to identifier",
                        key="identifiers")
        self.table.identifiers = {int(k): str(v) for k, v in idents.items()}

    def _columns(self, nrows: int) -> None:
        """Decode the ``data`` map; check each column against ``nrows``."""
        try:
            for _ in range(self.u.read_map_header()):
                self._column()
        except msgpack.OutOfData:
            if not self.strict:
                # The columns read before the cut are checked and kept.
                self._check_lengths(nrows)
            raise
        self._check_lengths(nrows)

    def _column(self) -> None:
        u, table = self.u, self.table
        at = u.tell()
        name = u.unpack()
        try:
            if self.wanted is not None and name not in self.wanted:
                # Only the type name is kept; the bytes are passed over.
                n_parts = u.read_array_header()
                if n_parts:
                    table.types[str(name)] = str(u.unpack())
                for _ in range(n_parts - 1):
                    u.skip()
                return
            value = u.unpack()
        except msgpack.OutOfData:
            table.bad_columns[str(name)] = (f"column '{name}' is cut short: the file ends "
                                            f"inside it (it starts at byte {at})")
            self.cut_at = at
            raise
        try:
            type_name, arr = _decode_column(name, value, self.path, at)
        except InputError as exc:
            if self.strict:
                raise
            table.bad_columns[str(name)] = str(exc)
            return
        table.types[name] = type_name
        if arr is None:
            table.skipped[name] = type_name
            return
        self.lengths[name] = arr.shape[0]
        table[name] = arr

    def _check_lengths(self, nrows: int) -> None:
        """Every column must hold ``nrows`` rows; lenient mode drops those that do not."""
        table = self.table
        bad = {name: n for name, n in self.lengths.items() if n != nrows}
        table.nrows = nrows
        if not bad:
            return
        if self.strict:
            names = sorted(bad)
            listing = ", ".join(f"'{name}' has {bad[name]}" for name in names[:3])
            if len(names) > 3:
                listing += f" (and {len(names) - 3} more columns)"
            raise _fail(self.path, f"the header says nrows = {nrows} but column {listing} "
                        "rows; the table is inconsistent — write it again", key=names[0])
        # A header that disagrees with every column is a bad header, not bad columns.
        if len(bad) == len(self.lengths) and len(set(bad.values())) == 1:
            table.nrows = next(iter(bad.values()))
            return
        for name, n in bad.items():
            table.bad_columns[name] = (f"column '{name}' has {n} rows, the header says "
                                       f"nrows = {nrows}")
            del table[name]


def _decode_column(name: Any, value: Any, path: str, at: int
                   ) -> tuple[str, np.ndarray | None]:
    """One ``[type, [n, bin]]`` column; ``(type, None)`` for a type that is skipped."""
    if not isinstance(name, str):
        raise _fail(path, f"column name {name!r} at byte {at} is not a string")
    if not (isinstance(value, (list, tuple)) and len(value) == 2 and isinstance(value[0], str)):
        raise _fail(path, f"column '{name}' (byte {at}) is not [type name, data]", key=name)
    type_name, payload = value
    layout = COLUMN_TYPES.get(type_name)
    if layout is None:
        return type_name, None
    if not (isinstance(payload, (list, tuple)) and len(payload) == 2
            and isinstance(payload[0], int) and isinstance(payload[1], (bytes, bytearray))):
        raise _fail(path, f"column '{name}' ({type_name}, byte {at}) is not [row count, "
                    "binary data]", key=name)
    n, blob = payload
    dtype, shape = layout
    item = np.dtype(dtype).itemsize * int(np.prod(shape, dtype=np.int64))
    if len(blob) != n * item:
        raise _fail(path, f"column '{name}' ({type_name}, byte {at}) says {n} rows but holds "
                    f"{len(blob)} bytes, not {n} × {item}; the file is damaged — write it "
                    "again", key=name)
    arr = np.frombuffer(blob, dtype=dtype)
    return type_name, arr.reshape((n,) + shape)
