"""Write crystals as a CrystFEL stream (format 2.3, as indexamajig 0.9–0.12 writes it).

Reflection rows follow CrystFEL's ``"%4i %4i %4i %10.2f %10.2f %10.2f %10.2f %6.1f %6.1f %s"``
exactly, but are formatted as whole numpy blocks (digits computed arithmetically) rather than
one ``printf`` per row: 16 million rows take seconds, not minutes.  A field too wide for its
column (``%10.2f`` of 1e8, a NaN) widens as printf would; those rows go through Python.

The ``image`` of a message is split at its first ``//`` into ``Image filename`` and
``Event`` (the convention of :mod:`streamvi_crystfel.reader`); without ``//`` the event is
CrystFEL's empty ``//``.  Consecutive messages of the same image share one chunk.
"""
from __future__ import annotations

import io
import math
import os
import re
from typing import IO, Iterable, Sequence

import gemmi
import numpy as np

from streamvi import __version__
from streamvi.wire import CrystalMessage

FORMAT_LINE = "CrystFEL stream format 2.3"
TABLE_HEADER = ("   h    k    l          I   sigma(I)       peak background  fs/px  ss/px "
                "panel")
#: (width, decimals) of the numeric columns; decimals None for integers.
_COLUMNS = ((4, None), (4, None), (4, None), (10, 2), (10, 2), (10, 2), (10, 2), (6, 1),
            (6, 1))
_ROW_FORMAT = "%4i %4i %4i %10.2f %10.2f %10.2f %10.2f %6.1f %6.1f %s\n"
_BATCH_ROWS = 200_000
_POW10 = 10 ** np.arange(19, dtype=np.int64)


def _format_column(values: np.ndarray, width: int, decimals: int | None
                   ) -> tuple[np.ndarray, np.ndarray]:
    """Right-aligned ASCII of ``values`` as printf's ``%{width}i`` / ``%{width}.{decimals}f``.

    Returns
    -------
    chars, overflow
        ``(n, width)`` uint8 and the rows whose text would not fit (or is not finite).
    """
    d = 0 if decimals is None else decimals
    v = np.asarray(values, dtype=np.float64)
    finite = np.isfinite(v)
    raw = np.abs(np.where(finite, v, 0.0)) * 10.0 ** d
    scaled = np.rint(raw)
    too_big = scaled >= 1e15
    m = np.where(too_big, 0, scaled).astype(np.int64)
    neg = np.signbit(v) & finite  # printf writes "-0.00" for small negatives too
    n_digits = np.maximum(np.searchsorted(_POW10, m, side="right"), d + 1)
    length = n_digits + (1 if d else 0) + neg
    overflow = ~finite | too_big | (length > width)

    # Built column-major (one contiguous row of characters per text position).
    out = np.empty((width, v.shape[0]), dtype=np.uint8)
    point = width - 1 - d if d else -1
    if d:
        out[point] = ord(".")
    rest = m.astype(np.uint32) if m.size and m.max() < 2 ** 32 else m
    most = int(n_digits.max()) if m.size else 0
    k = 0
    for col in range(width - 1, -1, -1):
        if col == point:
            continue
        if k >= most:
            out[col] = ord(" ")
        else:
            rest, digit = np.divmod(rest, 10)
            out[col] = np.where(k < n_digits, digit.astype(np.uint8) + ord("0"), ord(" "))
        k += 1
    sign_col = width - 1 - n_digits - (1 if d else 0)
    rows = np.nonzero(neg & ~overflow)[0]
    out[sign_col[rows], rows] = ord("-")
    out = out.T
    # printf rounds the exact binary value; near a half the scaled product cannot tell, so
    # those few values are printed by Python (same C rounding) and patched in.
    if decimals is not None:
        tie = np.nonzero(finite & ~too_big
                         & (np.abs(raw - np.floor(raw) - 0.5) < 1e-9 * np.maximum(raw, 1.0)))[0]
        fmt = f"%{width}.{d}f"
        for i in tie:
            text = (fmt % v[i]).encode("ascii")
            if len(text) == width:
                out[i, :] = np.frombuffer(text, dtype=np.uint8)
                overflow[i] = False
            else:
                overflow[i] = True
    return out, overflow


def format_reflections(h: np.ndarray, k: np.ndarray, l: np.ndarray,  # noqa: E741
                       iobs: np.ndarray, sigiobs: np.ndarray, peak: np.ndarray,
                       background: np.ndarray, fs: np.ndarray, ss: np.ndarray,
                       panel: Sequence[str] | np.ndarray) -> bytes:
    """Reflection rows exactly as CrystFEL's ``write_stream_reflections`` prints them.

    Parameters
    ----------
    h, k, l
        Miller indices.
    iobs, sigiobs, peak, background
        Intensity, its σ, peak pixel value and mean background (detector units).
    fs, ss
        Detector position, pixels.
    panel
        Panel name of each row.

    Returns
    -------
    bytes
        ASCII lines, each ending in a newline (no table header).
    """
    names, idx = np.unique(np.asarray(panel, dtype=object).astype(str), return_inverse=True)
    cols = (h, k, l, iobs, sigiobs, peak, background, fs, ss)
    return _format_rows(cols, idx.ravel(), [str(x) for x in names])[0]


def _format_rows(cols: Sequence[np.ndarray], panel_idx: np.ndarray, names: Sequence[str]
                 ) -> tuple[bytes, np.ndarray]:
    """Rows as bytes and the byte offset of each row's start (plus the end).

    ``panel_idx`` indexes ``names`` per row.
    """
    n = int(np.asarray(cols[0]).shape[0])
    if n == 0:
        return b"", np.zeros(1, dtype=np.int64)
    parts: list[np.ndarray] = []
    overflow = np.zeros(n, dtype=bool)
    space = np.full((n, 1), ord(" "), dtype=np.uint8)
    for values, (width, decimals) in zip(cols, _COLUMNS):
        chars, over = _format_column(np.asarray(values), width, decimals)
        parts += [chars, space]
        overflow |= over
    fixed = np.hstack(parts)

    name_bytes = [s.encode("ascii") for s in names]
    if len({len(b) for b in name_bytes}) == 1 and not overflow.any():
        tails = np.frombuffer(b"".join(b + b"\n" for b in name_bytes), dtype=np.uint8)
        tails = tails.reshape(len(name_bytes), -1)
        line = fixed.shape[1] + tails.shape[1]
        return (np.hstack([fixed, tails[panel_idx]]).tobytes(),
                np.arange(n + 1, dtype=np.int64) * line)

    fixed_bytes = fixed.tobytes()
    width = fixed.shape[1]
    lines = []
    for i in range(n):
        if overflow[i]:
            values = tuple(int(c[i]) if j < 3 else float(c[i]) for j, c in enumerate(cols))
            lines.append((_ROW_FORMAT % (*values, names[panel_idx[i]])).encode("ascii"))
        else:
            lines.append(fixed_bytes[i * width:(i + 1) * width] + name_bytes[panel_idx[i]]
                         + b"\n")
    offsets = np.zeros(n + 1, dtype=np.int64)
    np.cumsum([len(x) for x in lines], out=offsets[1:])
    return b"".join(lines), offsets


def lattice_of(space_group: str) -> tuple[str, str, str]:
    """CrystFEL's ``(lattice_type, centering, unique_axis)`` of a space group."""
    sg = gemmi.SpaceGroup(space_group)
    system = sg.crystal_system_str()
    centering = sg.centring_type()
    if system == "trigonal":
        if centering == "R" and sg.ext == "R":
            return "rhombohedral", "R", "*"
        return "hexagonal", centering if centering in "PR" else "P", "c"
    if system in ("tetragonal", "hexagonal"):
        return system, centering, "c"
    if system == "monoclinic":
        return system, centering, _monoclinic_axis(sg)
    return system, centering, "*"


def _monoclinic_axis(sg: gemmi.SpaceGroup) -> str:
    """The unique axis of a monoclinic setting (the 2-fold's direction)."""
    for op in sg.operations().sym_ops:
        rot = np.array(op.rot) // gemmi.Op.DEN
        if not np.array_equal(rot, np.eye(3, dtype=int)):
            return "abc"[int(np.argmax(np.diag(rot)))]
    return "b"


def default_geometry(panel_names: Sequence[str] = ("p0",), *, clen_m: float = 0.1,
                     res: float = 10000.0, photon_energy_eV: float | None = None) -> str:
    """A minimal geometry block (CrystFEL needs one in every stream header)."""
    lines = ["; Placeholder geometry written by streamvi: the crystals were not",
             "; integrated on a described detector.",
             f"clen = {clen_m:g}", f"res = {res:g}", "adu_per_photon = 1"]
    if photon_energy_eV is not None:
        lines.append(f"photon_energy = {photon_energy_eV:g}")
    for name in panel_names:
        lines += ["", f"{name}/min_fs = 0", f"{name}/min_ss = 0", f"{name}/max_fs = 4095",
                  f"{name}/max_ss = 4095", f"{name}/fs = +1.000000x +0.000000y",
                  f"{name}/ss = +0.000000x +1.000000y", f"{name}/corner_x = -2048.0",
                  f"{name}/corner_y = -2048.0"]
    return "\n".join(lines) + "\n"


def _cell_block(cell: Sequence[float], lattice: tuple[str, str, str]) -> str:
    a, b, c, al, be, ga = cell
    lattice_type, centering, unique_axis = lattice
    return ("----- Begin unit cell -----\n"
            "CrystFEL unit cell file version 1.0\n\n"
            f"lattice_type = {lattice_type}\n"
            f"unique_axis = {unique_axis}\n"
            f"centering = {centering}\n"
            f"a = {a:.2f} A\nb = {b:.2f} A\nc = {c:.2f} A\n"
            f"al = {al:.2f} deg\nbe = {be:.2f} deg\nga = {ga:.2f} deg\n"
            "; Please note: this is the target unit cell.\n"
            "; The actual unit cells produced by indexing depend on many other factors.\n"
            "----- End unit cell -----\n")


def _reciprocal_from_cell(cell: Sequence[float]) -> np.ndarray:
    """Columns a*, b*, c* (Å⁻¹) in gemmi's standard orientation."""
    return np.array(gemmi.UnitCell(*cell).frac.mat.tolist()).T


def _cell_from_reciprocal(astar: np.ndarray) -> tuple[float, ...]:
    real = np.linalg.inv(astar).T
    lengths = [float(np.linalg.norm(real[:, i])) for i in range(3)]

    def angle(i: int, j: int) -> float:
        cosine = float(real[:, i] @ real[:, j]) / (lengths[i] * lengths[j])
        return math.degrees(math.acos(max(-1.0, min(1.0, cosine))))

    return (*lengths, angle(1, 2), angle(0, 2), angle(0, 1))


class StreamWriter:
    """Writes crystals to a CrystFEL stream, chunk by chunk (a live indexamajig imitation).

    Parameters
    ----------
    path_or_file
        File name (created, or appended to with ``append=True``) or an open file (text or
        binary).  A file object is not closed by :meth:`close`.
    target_cell
        ``(a, b, c, α, β, γ)`` (Å, degrees) for the unit-cell block; omitted if ``None``.
    space_group
        Gives lattice type, centering and unique axis (e.g. ``"P 43 21 2"``).
    lattice_type, centering, unique_axis
        Override those (default triclinic P, ``*`` when no space group is given).
    geometry
        Geometry file text for the header (a placeholder is written if ``None``: CrystFEL
        cannot read a stream without one).
    command_line
        Audit line recorded after the version line.
    indexed_by
        ``indexed_by`` of each chunk.  CrystFEL's readers know only their own method
        names, hence an xgandalf name by default.
    append
        Append chunks to an existing stream: no header, serial numbers continue.
    """

    def __init__(self, path_or_file: str | os.PathLike[str] | IO, *,
                 target_cell: Sequence[float] | None = None, space_group: str | None = None,
                 lattice_type: str | None = None, centering: str | None = None,
                 unique_axis: str | None = None, geometry: str | None = None,
                 command_line: str | None = None,
                 indexed_by: str = "xgandalf-nolatt-cell", append: bool = False):
        if space_group is not None:
            lat = lattice_of(space_group)
        else:
            lat = ("triclinic", "P", "*")
        self.lattice = (lattice_type or lat[0], centering or lat[1], unique_axis or lat[2])
        self.indexed_by = indexed_by
        self.serial = 0
        self._owns = not hasattr(path_or_file, "write")
        write_header = True
        if self._owns:
            path = os.fspath(path_or_file)  # type: ignore[arg-type]
            if append and os.path.exists(path) and os.path.getsize(path) > 0:
                self.serial = _last_serial(path)
                write_header = False
            self._fh: IO = open(path, "ab" if append else "wb")
        else:
            self._fh = path_or_file  # type: ignore[assignment]
            write_header = not append
        self._text = isinstance(self._fh, io.TextIOBase)
        if write_header:
            header = [FORMAT_LINE, f"Generated by streamvi {__version__} (CrystFEL-compatible "
                      "stream writer)"]
            if command_line:
                header.append(command_line)
            header.append(f"Indexing methods selected: {indexed_by.split('-')[0]}")
            header.append("----- Begin geometry file -----")
            geom = geometry if geometry is not None else default_geometry()
            header.append(geom.rstrip("\n"))
            header.append("----- End geometry file -----")
            text = "\n".join(header) + "\n"
            if target_cell is not None:
                text += _cell_block(target_cell, self.lattice)
            self._write(text.encode("ascii"))

    def _write(self, data: bytes) -> None:
        self._fh.write(data.decode("ascii") if self._text else data)

    def write(self, messages: Iterable[CrystalMessage] | CrystalMessage) -> int:
        """Write crystals; consecutive crystals of one image share a chunk.

        Returns
        -------
        int
            Chunks written.
        """
        if isinstance(messages, CrystalMessage):
            messages = [messages]
        n_chunks = 0
        batch: list[list[CrystalMessage]] = []
        n_rows = 0
        for msg in messages:
            if batch and (msg.run, msg.image) == (batch[-1][0].run, batch[-1][0].image):
                batch[-1].append(msg)
            else:
                if n_rows >= _BATCH_ROWS:
                    n_chunks += self._write_batch(batch)
                    batch, n_rows = [], 0
                batch.append([msg])
            n_rows += len(msg)
        if batch:
            n_chunks += self._write_batch(batch)
        return n_chunks

    def write_chunk(self, crystals: Sequence[CrystalMessage]) -> None:
        """Write the crystals of one image as one chunk."""
        self._write_batch([list(crystals)])

    def _write_batch(self, chunks: list[list[CrystalMessage]]) -> int:
        """Format the rows of many chunks in one go (numpy overhead is per call)."""
        crystals = [msg for chunk in chunks for msg in chunk]
        cols = [np.concatenate([np.asarray(x) for x in col]) for col in
                zip(*(self._columns(msg) for msg in crystals))]
        names: dict[str, int] = {}
        panel_idx = np.concatenate([self._panels(msg, names) for msg in crystals])
        rows, offsets = _format_rows(cols, panel_idx, list(names))
        out: list[bytes] = []
        start = 0
        it = iter(crystals)
        for chunk in chunks:
            out.append(self._chunk_header(chunk[0]))
            for _ in chunk:
                msg = next(it)
                stop = start + len(msg)
                out += [self._crystal_header(msg), rows[offsets[start]:offsets[stop]],
                        b"End of reflections\n--- End crystal\n"]
                start = stop
            out.append(b"----- End chunk -----\n")
        self._write(b"".join(out))
        return len(chunks)

    def _chunk_header(self, first: CrystalMessage) -> bytes:
        self.serial += 1
        filename, sep, event = first.image.partition("//")
        if not sep:
            event = "//"
        out = ["----- Begin chunk -----",
               f"Image filename: {filename}",
               f"Event: {event}",
               f"Image serial number: {self.serial}",
               "hit = 1",
               f"indexed_by = {self.indexed_by}",
               "n_indexing_tries = 1",
               f"photon_energy_eV = {first.photon_energy_eV:f}",
               "beam_divergence = 0.00e+00 rad",
               f"beam_bandwidth = {(first.beam_bandwidth or 0.0):.2e} (fraction)"]
        if first.detector_distance_m is not None:
            out.append(f"average_camera_length = {first.detector_distance_m:f} m")
        # copied image headers (indexamajig --copy-header; an event code, a pump flag) go
        # back where the reader found them, so a stream written from messages keeps them
        for key, value in (first.metadata or {}).items():
            if (isinstance(key, str) and key.startswith(("hdf5/", "header/"))
                    and isinstance(value, (int, float, str)) and _header_safe(key, value)):
                out.append(f"{key} = {value}")
        out += ["num_peaks = 0", "peak_resolution = 0.000000 nm^-1 or inf A",
                "Peaks from peak search",
                "  fs/px   ss/px (1/d)/nm^-1   Intensity  Panel",
                "End of peak list"]
        return ("\n".join(out) + "\n").encode("ascii")

    def _crystal_header(self, msg: CrystalMessage) -> bytes:
        if msg.has_orientation():
            astar = np.array([msg.astar, msg.bstar, msg.cstar], dtype=np.float64).T
            cell = _cell_from_reciprocal(astar)
        else:
            # No orientation known: a standard one keeps the stream readable.
            astar = _reciprocal_from_cell(msg.cell)
            cell = tuple(msg.cell)
        n = len(msg)
        if msg.resolution_limit is not None:
            res_limit = 1.0 / msg.resolution_limit
        else:
            q = msg.hkl().astype(np.float64) @ astar.T
            res_limit = float(np.sqrt(np.einsum("ij,ij->i", q, q)).max()) if n else 0.0
        a_nm = [x / 10.0 for x in cell[:3]]
        lines = ["--- Begin crystal",
                 f"Cell parameters {a_nm[0]:7.5f} {a_nm[1]:7.5f} {a_nm[2]:7.5f} nm, "
                 f"{cell[3]:7.5f} {cell[4]:7.5f} {cell[5]:7.5f} deg"]
        for name, vec in zip(("astar", "bstar", "cstar"), astar.T):
            nm = vec * 10.0
            lines.append(f"{name} = {nm[0]:+9.7f} {nm[1]:+9.7f} {nm[2]:+9.7f} nm^-1")
        lines += [f"lattice_type = {self.lattice[0]}",
                  f"centering = {self.lattice[1]}",
                  f"unique_axis = {self.lattice[2]}",
                  f"profile_radius = {(msg.profile_radius or 0.0) * 10.0:.5f} nm^-1",
                  "predict_refine/det_shift x = 0.000 y = 0.000 mm",
                  f"diffraction_resolution_limit = {res_limit * 10.0:.2f} nm^-1 or "
                  f"{(1.0 / res_limit if res_limit > 0 else math.inf):.2f} A",
                  f"num_reflections = {n}",
                  "num_saturated_reflections = 0",
                  "num_implausible_reflections = 0",
                  "Reflections measured after indexing",
                  TABLE_HEADER]
        return ("\n".join(lines) + "\n").encode("ascii")

    @staticmethod
    def _columns(msg: CrystalMessage) -> tuple[np.ndarray, ...]:
        zeros = np.zeros(len(msg), dtype=np.float32)

        def opt(a: np.ndarray | None) -> np.ndarray:
            return zeros if a is None else a

        return (msg.h, msg.k, msg.l, msg.I, msg.sigI, opt(msg.peak), opt(msg.background),
                opt(msg.fs), opt(msg.ss))

    @staticmethod
    def _panels(msg: CrystalMessage, names: dict[str, int]) -> np.ndarray:
        """Panel of each row as an index into ``names`` (extended as needed)."""
        ids = np.array([names.setdefault(str(x), len(names))
                        for x in (msg.panel_names or ["p0"])], dtype=np.intp)
        if msg.panel is None:
            return np.full(len(msg), ids[0], dtype=np.intp)
        return ids[np.asarray(msg.panel, dtype=np.intp)]

    def flush(self) -> None:
        """Flush the file (a live reader sees every chunk written so far)."""
        self._fh.flush()

    def close(self) -> None:
        """Flush, and close the file if this writer opened it."""
        if self._owns:
            self._fh.close()
        else:
            self._fh.flush()

    def __enter__(self) -> "StreamWriter":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _header_safe(key: str, value: object) -> bool:
    """Whether a copied header can be written as one ASCII line (anything else is left out:
    it came from a producer and must not break the stream)."""
    text = f"{key} = {value}"
    return text.isascii() and text.isprintable() and len(text) < 1024


def _last_serial(path: str) -> int:
    """The last ``Image serial number`` of an existing stream (0 if none)."""
    size = os.path.getsize(path)
    with open(path, "rb") as fh:
        for span in (1 << 20, size):
            fh.seek(max(0, size - span))
            found = re.findall(rb"^Image serial number: (\d+)", fh.read(), flags=re.M)
            if found:
                return int(found[-1])
            if span >= size:
                break
    return 0


def write_stream(path_or_file: str | os.PathLike[str] | IO,
                 messages: Iterable[CrystalMessage], **options: object) -> int:
    """Write crystals as a complete CrystFEL stream; options as for :class:`StreamWriter`.

    Returns
    -------
    int
        Chunks written.
    """
    with StreamWriter(path_or_file, **options) as writer:  # type: ignore[arg-type]
        return writer.write(messages)
