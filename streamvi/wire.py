"""Wire format v1: one msgpack map per indexed crystal (DESIGN.md section 3, docs/wire-format.md).

This module imports neither torch nor zmq, so any producer can use it.  Arrays travel as
``{"dtype": "<i4"|"<f4"|"<f8"|…, "shape": [n], "data": <bin>}`` and are decoded zero-copy with
:func:`numpy.frombuffer` (the arrays of a decoded message are read-only views of the buffer).

Validation is strict: a message that cannot be trusted as a whole raises a
:class:`~streamvi.errors.WireError` subclass whose ``reason`` names the family; rows that are
bad on their own (non-finite intensity, σ ≤ 0, hkl = 000) are dropped and counted in
:attr:`CrystalMessage.rows_rejected`, so the sound rows of the crystal are still merged.
"""
from __future__ import annotations

import math
import reprlib
from dataclasses import dataclass, field
from typing import Any, Mapping

import msgpack
import numpy as np

from streamvi.errors import (
    FieldTypeError,
    MalformedMessageError,
    MissingKeyError,
    SchemaError,
    ShapeMismatchError,
    ValueRangeError,
)

SCHEMA = "streamvi.crystal"
VERSION = 1

#: Default upper bound of one encoded message, bytes.  Large enough for any real crystal
#: (100,000 reflections with every optional column is ~5 MB), small enough to bound memory.
DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024

#: Most reflections one crystal may carry.  A still has hundreds to a few thousand; even a
#: wide wedge of a large cell stays below this.  One crystal of 3×10⁶ reflections slowed
#: training twentyfold for good, so more are refused (``too_many_reflections``).
MAX_REFLECTIONS = 100_000

#: Longest ``run``, characters.
MAX_RUN_CHARS = 256
#: Longest ``image``, characters (a file path and an event).
MAX_IMAGE_CHARS = 1024
#: Longest ``condition``, panel name or metadata key, characters.
MAX_LABEL_CHARS = 256
#: Most metadata (unknown) keys in one message.
MAX_METADATA_KEYS = 256
#: Longest msgpack str or ext anywhere in a message (metadata values included), bytes.
MAX_STRING_BYTES = 4096

#: Longest reciprocal basis vector accepted, Å⁻¹ (a cell edge of 0.1 Å).
MAX_RECIPROCAL_LENGTH = 10.0

#: Largest |h|, |k|, |l| accepted: beyond this the indices are not physical for any cell.
MAX_MILLER = 1024

# ------------------------------------------------------------------ echoing a peer's values
# Error messages, log lines and dead-letter records quote what a peer sent; these keep the
# quotes short whatever it sent.

#: Longest piece of a peer's text put into a log line or a record, characters.
MAX_ECHO_CHARS = 200


def clip(text: object, limit: int = MAX_ECHO_CHARS) -> str:
    """``str(text)`` cut to ``limit`` characters, with a marker that gives its full length.

    Parameters
    ----------
    text
        Anything; values from a message (names, reprs) may be megabytes long.
    limit
        Characters kept.

    Returns
    -------
    str
        ``text`` itself when short enough, else its first ``limit`` characters followed by
        ``"… [N characters in all]"``.
    """
    s = text if isinstance(text, str) else str(text)
    if len(s) <= limit:
        return s
    return f"{s[:limit]}… [{len(s):,} characters in all]"


def clip_repr(value: object, limit: int = MAX_ECHO_CHARS) -> str:
    """``repr(value)`` of at most about ``limit`` characters, built without first making a
    huge repr (a 20 MiB string, a list of a million items).

    Strings and bytes are cut and followed by ``"… [N characters in all]"``; containers
    show their first few items (``reprlib``) and their length.
    """
    if isinstance(value, (str, bytes, bytearray)):
        if len(value) <= limit:
            return repr(value)
        unit = "characters" if isinstance(value, str) else "bytes"
        return f"{repr(value[:limit])[:limit]}… [{len(value):,} {unit} in all]"
    text = clip(_REPR.repr(value), limit)
    if isinstance(value, (list, tuple, dict, set)) and len(value) > _REPR.maxlist:
        text += f" [{len(value):,} items in all]"
    return text


#: Bounded reprs: a few items per container, short strings, shallow nesting.
_REPR = reprlib.Repr()
_REPR.maxstring = _REPR.maxother = 60
_REPR.maxlist = _REPR.maxtuple = _REPR.maxdict = _REPR.maxset = 6
_REPR.maxlevel = 3


INT_DTYPES = ("<i2", "<i4", "<i8")
FLOAT_DTYPES = ("<f4", "<f8")

REQUIRED_KEYS = ("schema", "version", "run", "image", "crystal", "h", "k", "l", "I", "sigI",
                 "photon_energy_eV", "cell")
#: Optional per-reflection float arrays.
OPTIONAL_ROW_FLOATS = ("fs", "ss", "peak", "background")
#: Optional scalar floats.
OPTIONAL_SCALARS = ("profile_radius", "resolution_limit", "timestamp", "detector_distance_m",
                    "beam_bandwidth")
OPTIONAL_VECTORS = ("astar", "bstar", "cstar")
KNOWN_KEYS = frozenset(REQUIRED_KEYS + OPTIONAL_ROW_FLOATS + OPTIONAL_SCALARS + OPTIONAL_VECTORS
                       + ("panel", "panel_names", "condition"))

#: Row-level rejection reasons (labels of ``streamvi_reflections_rejected_total``).
ROW_REASONS = ("nonfinite_intensity", "nonpositive_sigma", "zero_miller")


@dataclass
class CrystalMessage:
    """The reflections of one indexed crystal, as carried by the wire format.

    Attributes
    ----------
    run, image, crystal
        Identity: ``image`` is unique within ``run``; ``crystal`` indexes crystals of an image.
    h, k, l
        Miller indices (int32, as indexed, not yet mapped to the ASU).
    I, sigI
        Integrated intensity and its standard uncertainty (float32, detector units).
    photon_energy_eV
        Photon energy, eV.
    cell
        Unit cell of this crystal ``(a, b, c, α, β, γ)`` in Å and degrees.
    astar, bstar, cstar
        Reciprocal basis vectors in the lab frame, Å⁻¹ (optional).
    fs, ss
        Detector position, pixels (optional, float32).
    panel
        Per-reflection index into ``panel_names`` (int16), optional.
    profile_radius
        Reflection profile radius, Å⁻¹ (optional).
    metadata
        Unknown keys, kept verbatim and ignored by the model.
    rows_rejected
        Rows dropped during decoding, by reason.
    """

    run: str
    image: str
    crystal: int
    h: np.ndarray
    k: np.ndarray
    l: np.ndarray  # noqa: E741 - crystallographic name
    I: np.ndarray  # noqa: E741
    sigI: np.ndarray
    photon_energy_eV: float
    cell: tuple[float, float, float, float, float, float]
    astar: tuple[float, float, float] | None = None
    bstar: tuple[float, float, float] | None = None
    cstar: tuple[float, float, float] | None = None
    fs: np.ndarray | None = None
    ss: np.ndarray | None = None
    panel: np.ndarray | None = None
    panel_names: list[str] | None = None
    peak: np.ndarray | None = None
    background: np.ndarray | None = None
    profile_radius: float | None = None
    resolution_limit: float | None = None
    condition: str | None = None
    timestamp: float | None = None
    detector_distance_m: float | None = None
    beam_bandwidth: float | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    rows_rejected: dict[str, int] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.h.shape[0])

    @property
    def n_reflections(self) -> int:
        """Number of reflections carried."""
        return len(self)

    @property
    def wavelength_A(self) -> float:
        """Wavelength, Å (12398.42 eV·Å / E)."""
        return 12398.419843320026 / self.photon_energy_eV

    @property
    def key(self) -> tuple[str, str, int]:
        """Identity ``(run, image, crystal)``: unique within a beamtime."""
        return (self.run, self.image, self.crystal)

    def hkl(self) -> np.ndarray:
        """Miller indices as an ``(n, 3)`` int32 array."""
        return np.stack([self.h, self.k, self.l], axis=1).astype(np.int32, copy=False)

    def has_orientation(self) -> bool:
        """Whether the reciprocal basis (astar, bstar, cstar) is known."""
        return self.astar is not None and self.bstar is not None and self.cstar is not None

    def reciprocal_basis(self) -> np.ndarray:
        """Rows a*, b*, c* (Å⁻¹): the crystal's own, in the lab frame, when the message
        carries them, else those of its cell in the standard orientation
        (:func:`reciprocal_basis`; the lengths of the scattering vectors are the same)."""
        if self.has_orientation():
            return np.array([self.astar, self.bstar, self.cstar], dtype=np.float64)
        return reciprocal_basis(self.cell)

    def d(self) -> np.ndarray:
        """Resolution d = 1/|h a* + k b* + l c*| (Å) of each reflection, float64."""
        q = self.hkl().astype(np.float64) @ self.reciprocal_basis()
        with np.errstate(divide="ignore"):
            return 1.0 / np.sqrt(np.einsum("ij,ij->i", q, q))


def reciprocal_basis(cell: tuple[float, ...]) -> np.ndarray:
    """Rows a*, b*, c* (Å⁻¹) of a cell ``(a, b, c, α, β, γ)`` (Å, degrees) in the standard
    orientation: a along x, b in the xy plane (the PDB convention).

    The one cell → basis conversion of the package and its plugins.
    """
    a, b, c = cell[:3]
    al, be, ga = np.radians(cell[3:6])
    ca, cb, cg, sg = np.cos(al), np.cos(be), np.cos(ga), np.sin(ga)
    v = a * b * c * np.sqrt(1 - ca * ca - cb * cb - cg * cg + 2 * ca * cb * cg)
    avec = np.array([a, 0.0, 0.0])
    bvec = np.array([b * cg, b * sg, 0.0])
    cvec = np.array([c * cb, c * (ca - cb * cg) / sg, v / (a * b * sg)])
    return np.stack([np.cross(bvec, cvec), np.cross(cvec, avec), np.cross(avec, bvec)]) / v


def array_map(a: np.ndarray, dtype: str) -> dict[str, Any]:
    """A 1-D array as a wire array map ``{dtype, shape, data}``.

    Floats beyond the range of a narrower float dtype become ±inf, as decoding expects (it
    drops those rows, ``nonfinite_intensity``).  Values that an integer dtype cannot hold
    exactly raise ``ValueError`` instead of wrapping around into other valid numbers.
    """
    dt = np.dtype(dtype)
    with np.errstate(over="ignore", invalid="ignore"):
        arr = np.ascontiguousarray(a, dtype=dt)
    if dt.kind in "iu" and not np.array_equal(arr, a):
        raise ValueError(f"values do not fit the wire dtype {dtype} exactly (out of its range, "
                         "or not integers)")
    return {"dtype": dtype, "shape": [int(arr.shape[0])], "data": arr.tobytes()}


def to_wire_dict(msg: CrystalMessage) -> dict[str, Any]:
    """The msgpack-ready map of a message (arrays as binary array maps)."""
    out: dict[str, Any] = dict(msg.metadata)
    out.update({
        "schema": SCHEMA,
        "version": VERSION,
        "run": str(msg.run),
        "image": str(msg.image),
        "crystal": int(msg.crystal),
        "h": array_map(msg.h, "<i4"),
        "k": array_map(msg.k, "<i4"),
        "l": array_map(msg.l, "<i4"),
        "I": array_map(msg.I, "<f4"),
        "sigI": array_map(msg.sigI, "<f4"),
        "photon_energy_eV": float(msg.photon_energy_eV),
        "cell": [float(x) for x in msg.cell],
    })
    for name in OPTIONAL_VECTORS:
        v = getattr(msg, name)
        if v is not None:
            out[name] = [float(x) for x in v]
    for name in OPTIONAL_ROW_FLOATS:
        v = getattr(msg, name)
        if v is not None:
            out[name] = array_map(v, "<f4")
    if msg.panel is not None:
        if not msg.panel_names:
            raise ValueError("CrystalMessage.panel needs panel_names (the name of each index)")
        out["panel"] = array_map(msg.panel, "<i2")
        out["panel_names"] = list(msg.panel_names)
    for name in OPTIONAL_SCALARS:
        v = getattr(msg, name)
        if v is not None:
            out[name] = float(v)
    if msg.condition is not None:
        out["condition"] = str(msg.condition)
    return out


def encode_crystal(msg: CrystalMessage) -> bytes:
    """Encode one crystal as a wire-format v1 msgpack message.

    Parameters
    ----------
    msg
        The crystal.

    Returns
    -------
    bytes
        The message, ready for a ZeroMQ frame.
    """
    return msgpack.packb(to_wire_dict(msg), use_bin_type=True)


# ----------------------------------------------------------------------------- decoding


def _require(d: Mapping[str, Any], key: str) -> Any:
    try:
        return d[key]
    except KeyError:
        raise MissingKeyError(
            f"required key '{key}' is missing; every message needs {', '.join(REQUIRED_KEYS)} "
            "(see docs/wire-format.md)", key=key) from None


def _decode_array(key: str, v: Any, allowed: tuple[str, ...]) -> np.ndarray:
    if not isinstance(v, dict):
        raise FieldTypeError(f"key '{key}': expected an array map "
                             "{dtype, shape, data}, got " + type(v).__name__, key=key)
    try:
        dtype, shape, data = v["dtype"], v["shape"], v["data"]
    except KeyError as exc:
        raise FieldTypeError(f"key '{key}': array map lacks '{exc.args[0]}' "
                             "(needs dtype, shape, data)", reason="bad_array", key=key) from None
    if not isinstance(dtype, str) or dtype not in allowed:
        raise FieldTypeError(f"key '{key}': dtype {clip_repr(dtype)} not allowed here; use one of "
                             f"{', '.join(allowed)}", reason="wrong_dtype", key=key)
    if (not isinstance(shape, (list, tuple)) or len(shape) != 1 or not isinstance(shape[0], int)
            or isinstance(shape[0], bool) or shape[0] < 0):
        raise FieldTypeError(f"key '{key}': shape must be [n] with n >= 0, got {clip_repr(shape)}",
                             reason="bad_array", key=key)
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise FieldTypeError(f"key '{key}': data must be msgpack bin, got "
                             f"{type(data).__name__}", reason="bad_array", key=key)
    dt = np.dtype(dtype)
    if len(data) != shape[0] * dt.itemsize:
        raise FieldTypeError(f"key '{key}': data holds {len(data)} bytes but shape {shape} of "
                             f"{dtype} needs {shape[0] * dt.itemsize}",
                             reason="bad_array", key=key)
    return np.frombuffer(data, dtype=dt)


def _decode_str(key: str, v: Any, max_chars: int = MAX_LABEL_CHARS) -> str:
    if not isinstance(v, str):
        raise FieldTypeError(f"key '{key}': expected a string, got {type(v).__name__}", key=key)
    _check_length(key, v, max_chars)
    return v


def _check_length(key: str, v: str, max_chars: int) -> None:
    if len(v) > max_chars:
        raise FieldTypeError(f"key '{clip(key, 60)}': a string of {len(v):,} characters, more "
                             f"than the {max_chars} allowed ({clip_repr(v, 60)})",
                             reason="string_too_long", key=clip(key, 60))


def _decode_float(key: str, v: Any, *, positive: bool = False) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise FieldTypeError(f"key '{key}': expected a number, got {type(v).__name__}", key=key)
    x = float(v)
    if not math.isfinite(x) or (positive and x <= 0):
        raise ValueRangeError(f"key '{key}': {x!r} is not a {'positive ' if positive else ''}"
                              "finite number", reason="bad_photon_energy" if key == (
                                  "photon_energy_eV") else "out_of_range", key=key)
    return x


def _decode_vector(key: str, v: Any, n: int) -> tuple[float, ...]:
    if not isinstance(v, (list, tuple)) or len(v) != n:
        raise FieldTypeError(f"key '{key}': expected a list of {n} numbers", key=key)
    return tuple(_decode_float(key, x) for x in v)


def validate_cell(cell: tuple[float, ...], *, key: str = "cell") -> None:
    """Reject cells no crystal can have.

    Lengths must lie in (1, 10,000) Å, angles in (10, 170)°, and the cell volume must be
    real and positive.

    Raises
    ------
    ValueRangeError
        With reason ``absurd_cell``.
    """
    a, b, c, al, be, ga = cell
    if not all(1.0 < x < 10000.0 for x in (a, b, c)):
        raise ValueRangeError(f"key '{key}': cell lengths {a:g}, {b:g}, {c:g} Å outside "
                              "(1, 10000) Å", reason="absurd_cell", key=key)
    if not all(10.0 < x < 170.0 for x in (al, be, ga)):
        raise ValueRangeError(f"key '{key}': cell angles {al:g}, {be:g}, {ga:g}° outside "
                              "(10, 170)°", reason="absurd_cell", key=key)
    ca, cb, cg = (math.cos(math.radians(x)) for x in (al, be, ga))
    v2 = 1 - ca * ca - cb * cb - cg * cg + 2 * ca * cb * cg
    if v2 <= 1e-6:
        raise ValueRangeError(f"key '{key}': angles {al:g}, {be:g}, {ga:g}° give no real cell "
                              "volume", reason="absurd_cell", key=key)


class _Budget:
    """Counts what msgpack builds and stops it past what any crystal needs.

    Per-container limits (``max_array_len``, …) bound one array or map, not how many a
    message nests: 46 MiB of empty maps are 46 million dicts (4.9 GB).  The hooks see every
    array and map as it is finished and count its items; past the budget the unpacking stops,
    so at most the budget plus one container's items exist at any time.
    """

    __slots__ = ("left",)

    def __init__(self, items: int):
        self.left = items

    def take(self, container: Any) -> Any:
        self.left -= len(container) + 1
        if self.left < 0:
            raise _OverBudget
        return container


class _OverBudget(Exception):
    """Raised inside msgpack's hooks to stop unpacking."""


def unpack_limits(max_reflections: int = MAX_REFLECTIONS) -> dict[str, int]:
    """``msgpack.unpackb`` limits from what the schema allows.

    The longest bin is an array of ``max_reflections`` 8-byte values; the longest array a
    panel list of that many names (or ``panel_names``); the largest map the top level with
    every known key and :data:`MAX_METADATA_KEYS` others.
    """
    return {"max_str_len": MAX_STRING_BYTES, "max_ext_len": MAX_STRING_BYTES,
            "max_bin_len": 8 * max_reflections,
            "max_array_len": max(max_reflections, _PANELS_MAX),
            "max_map_len": len(KNOWN_KEYS) + MAX_METADATA_KEYS}


def _object_budget(max_reflections: int) -> int:
    """Containers and items a message may unpack into: a panel list of one name per
    reflection, the panel names, and room for every other key and metadata."""
    return max_reflections + _PANELS_MAX + 16 * (len(KNOWN_KEYS) + MAX_METADATA_KEYS)


def _precheck(view: memoryview, max_map_len: int) -> None:
    """Refuse from its first bytes a message that cannot be a crystal map of sane size."""
    if not view.nbytes:
        raise MalformedMessageError("empty message: expected a msgpack map")
    first = view[0]
    if 0x80 <= first <= 0x8F:
        return
    if first in (0xDE, 0xDF):
        width = 2 if first == 0xDE else 4
        if view.nbytes < 1 + width:
            raise MalformedMessageError("not a msgpack message: truncated map header")
        n = int.from_bytes(view[1:1 + width], "big")
        if n > max_map_len:
            raise MalformedMessageError(
                f"top-level map of {n:,} keys: a crystal has at most {max_map_len} "
                f"({MAX_METADATA_KEYS} metadata keys besides the known ones)",
                reason="too_complex")
        return
    raise MalformedMessageError(f"top level must be a map, got msgpack type byte 0x{first:02x}")


def _limit_reason(message: str) -> str:
    """The rejection reason of a msgpack limit error (``"N exceeds max_str_len(M)"``)."""
    if "max_str_len" in message or "max_ext_len" in message:
        return "string_too_long"
    if "max_bin_len" in message:
        return "too_many_reflections"
    return "too_complex"


def decode_crystal(buf: bytes | bytearray | memoryview, *,
                   max_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
                   max_reflections: int = MAX_REFLECTIONS) -> CrystalMessage:
    """Decode and validate one wire-format v1 message.

    Memory is bounded whatever the message declares: the size is checked first, then the
    top-level header, and msgpack unpacks under limits derived from the schema
    (:func:`unpack_limits`) and a budget of objects, so a message never turns into more
    than about its own size in Python objects.

    Parameters
    ----------
    buf
        The raw message.
    max_bytes
        Messages larger than this are rejected before parsing (reason ``too_large``).
    max_reflections
        Crystals with more reflections are rejected (reason ``too_many_reflections``).

    Returns
    -------
    CrystalMessage
        With bad rows removed and counted in ``rows_rejected``.

    Raises
    ------
    WireError
        A subclass naming the reason; the message must then be dead-lettered.
    """
    view = memoryview(buf)
    nbytes = view.nbytes
    if nbytes > max_bytes:
        raise MalformedMessageError(f"message of {nbytes} bytes exceeds the limit of "
                                    f"{max_bytes} bytes (raise max_message_bytes if real)",
                                    reason="too_large")
    limits = unpack_limits(max_reflections)
    _precheck(view, limits["max_map_len"])
    budget = _Budget(_object_budget(max_reflections))
    try:
        d = msgpack.unpackb(view, raw=False, strict_map_key=True, object_hook=budget.take,
                            list_hook=budget.take, **limits)
    except _OverBudget:
        raise MalformedMessageError(
            "the message unpacks into more than "
            f"{_object_budget(max_reflections):,} arrays, maps and items; no crystal needs "
            "that many (one per reflection at most, see docs/wire-format.md)",
            reason="too_complex") from None
    except ValueError as exc:
        text = clip(exc)
        if "exceeds max_" in text:
            raise MalformedMessageError(
                f"over a decoding limit: {text} (docs/wire-format.md section 4)",
                reason=_limit_reason(text)) from None
        raise MalformedMessageError(f"not a msgpack message: {text}") from None
    except (msgpack.ExtraData, msgpack.FormatError, msgpack.StackError,
            UnicodeDecodeError, TypeError) as exc:
        raise MalformedMessageError(f"not a msgpack message: {clip(exc)}") from None
    if not isinstance(d, dict):
        raise MalformedMessageError(f"top level must be a map, got {type(d).__name__}")
    return from_wire_dict(d, max_reflections=max_reflections)


def from_wire_dict(d: Mapping[str, Any], *,
                   max_reflections: int = MAX_REFLECTIONS) -> CrystalMessage:
    """Validate an already-unpacked message map; see :func:`decode_crystal`.

    Parameters
    ----------
    d
        The map (string keys).
    max_reflections
        Crystals with more reflections are rejected (reason ``too_many_reflections``).
    """
    schema = _require(d, "schema")
    if schema != SCHEMA:
        raise SchemaError(f"key 'schema': {clip_repr(schema)} is not {SCHEMA!r}; this endpoint "
                          "takes streamvi crystal messages only", key="schema")
    version = _require(d, "version")
    if type(version) is not int or version != VERSION:
        raise SchemaError(f"key 'version': {clip_repr(version)} is not supported (this streamvi "
                          f"reads version {VERSION}); upgrade streamvi or the producer",
                          reason="unsupported_version", key="version")
    for key in REQUIRED_KEYS:
        _require(d, key)

    run = _decode_str("run", d["run"], MAX_RUN_CHARS)
    image = _decode_str("image", d["image"], MAX_IMAGE_CHARS)
    crystal = d["crystal"]
    if isinstance(crystal, bool) or not isinstance(crystal, int) or crystal < 0:
        raise FieldTypeError(f"key 'crystal': expected an integer >= 0, got "
                             f"{clip_repr(crystal)}", key="crystal")
    h = _decode_array("h", d["h"], INT_DTYPES)
    if h.shape[0] > max_reflections:
        raise ValueRangeError(f"keys 'h', 'k', 'l', …: {h.shape[0]:,} reflections in one "
                              f"crystal, more than the {max_reflections:,} allowed; split it or "
                              "raise the limit (max_reflections)",
                              reason="too_many_reflections", key="h")
    k = _decode_array("k", d["k"], INT_DTYPES)
    l = _decode_array("l", d["l"], INT_DTYPES)  # noqa: E741
    iobs = _decode_array("I", d["I"], FLOAT_DTYPES)
    sigiobs = _decode_array("sigI", d["sigI"], FLOAT_DTYPES)
    # Narrow before screening, so <f8 values beyond float32 (inf) or below it (σ = 0) are caught.
    with np.errstate(over="ignore"):
        iobs = iobs.astype(np.float32, copy=False)
        sigiobs = sigiobs.astype(np.float32, copy=False)
    n = h.shape[0]
    rows: dict[str, np.ndarray] = {"h": h, "k": k, "l": l, "I": iobs, "sigI": sigiobs}
    for key in OPTIONAL_ROW_FLOATS:
        if key in d and d[key] is not None:
            rows[key] = _decode_array(key, d[key], FLOAT_DTYPES)
    panel_names = None
    if "panel" in d and d["panel"] is not None:
        panel, panel_names = _decode_panel(d["panel"], d.get("panel_names"))
        rows["panel"] = panel
    lengths = {key: a.shape[0] for key, a in rows.items()}
    if len(set(lengths.values())) != 1:
        raise ShapeMismatchError("per-reflection arrays differ in length: " + ", ".join(
            f"{key}={v}" for key, v in lengths.items()), key="h")
    if n == 0:
        raise ValueRangeError("crystal carries no reflections (arrays of length 0)",
                              reason="no_reflections", key="h")

    photon_energy = _decode_float("photon_energy_eV", d["photon_energy_eV"], positive=True)
    if not 100.0 < photon_energy < 1.0e6:
        raise ValueRangeError(f"key 'photon_energy_eV': {photon_energy:g} eV is outside "
                              "(100, 1e6) eV", reason="bad_photon_energy", key="photon_energy_eV")
    cell = _decode_vector("cell", d["cell"], 6)
    validate_cell(cell)

    # max(-min, max) rather than abs(): abs() of the most negative integer overflows.
    hmax = max(max(-int(a.min()), int(a.max())) for a in (h, k, l))
    if hmax > MAX_MILLER:
        raise ValueRangeError(f"keys 'h','k','l': |index| up to {hmax} exceeds {MAX_MILLER}",
                              reason="miller_out_of_range", key="h")

    # Row-level screening: drop the bad rows, keep the crystal.
    with np.errstate(invalid="ignore"):
        finite = np.isfinite(iobs) & np.isfinite(sigiobs)
        pos_sigma = sigiobs > 0
    nonzero = (h != 0) | (k != 0) | (l != 0)
    good = finite & pos_sigma & nonzero
    rejected: dict[str, int] = {}
    if not good.all():
        for reason, mask in (("nonfinite_intensity", ~finite),
                             ("nonpositive_sigma", finite & ~pos_sigma),
                             ("zero_miller", finite & pos_sigma & ~nonzero)):
            c = int(mask.sum())
            if c:
                rejected[reason] = c
        if not good.any():
            raise ValueRangeError(f"all {n} reflections are unusable ("
                                  + ", ".join(f"{r}: {c}" for r, c in rejected.items()) + ")",
                                  reason="no_valid_reflections", key="I")
        rows = {key: a[good] for key, a in rows.items()}

    def as_(a: np.ndarray, dt: str) -> np.ndarray:
        return a if a.dtype == np.dtype(dt) else a.astype(dt)

    msg = CrystalMessage(
        run=run, image=image, crystal=int(crystal),
        h=as_(rows["h"], "<i4"), k=as_(rows["k"], "<i4"), l=as_(rows["l"], "<i4"),
        I=as_(rows["I"], "<f4"), sigI=as_(rows["sigI"], "<f4"),
        photon_energy_eV=photon_energy, cell=cell,  # type: ignore[arg-type]
        panel=rows.get("panel"), panel_names=panel_names,
        rows_rejected=rejected,
    )
    for key in OPTIONAL_ROW_FLOATS:
        if key in rows:
            with np.errstate(over="ignore"):    # <f8 beyond float32 becomes inf: refused below
                values = as_(rows[key], "<f4")
            if not np.isfinite(values).all():
                # these columns feed the scale model: one NaN would poison the whole merge
                raise ValueRangeError(f"key '{key}': {int((~np.isfinite(values)).sum())} of "
                                      f"{values.size} kept rows are not finite float32 numbers; "
                                      "send finite values or leave the key out",
                                      reason="out_of_range", key=key)
            setattr(msg, key, values)
    for key in OPTIONAL_VECTORS:
        if d.get(key) is not None:
            vec = _decode_vector(key, d[key], 3)
            if math.sqrt(sum(x * x for x in vec)) > MAX_RECIPROCAL_LENGTH:
                raise ValueRangeError(f"key '{key}': |{key}| = {math.hypot(*vec):g} Å⁻¹ is "
                                      f"beyond {MAX_RECIPROCAL_LENGTH} Å⁻¹ (a cell under 0.1 Å): "
                                      "send reciprocal vectors in Å⁻¹", reason="out_of_range",
                                      key=key)
            setattr(msg, key, vec)
    for key in OPTIONAL_SCALARS:
        if d.get(key) is not None:
            setattr(msg, key, _decode_float(key, d[key]))
    if msg.profile_radius is not None and not 1e-7 < msg.profile_radius < 1.0:
        raise ValueRangeError(f"key 'profile_radius': {msg.profile_radius:g} Å⁻¹ is outside "
                              "(1e-7, 1) Å⁻¹; send it in Å⁻¹ (CrystFEL prints nm⁻¹: divide "
                              "by 10)", reason="out_of_range", key="profile_radius")
    if d.get("condition") is not None:
        msg.condition = _decode_str("condition", d["condition"])
    msg.metadata = _metadata(d)
    return msg


def _metadata(d: Mapping[str, Any]) -> dict[str, Any]:
    """The unknown keys, bounded in number and key length (values are bounded by unpacking:
    :data:`MAX_STRING_BYTES` per string, the object budget in all)."""
    meta = {key: v for key, v in d.items() if key not in KNOWN_KEYS}
    if len(meta) > MAX_METADATA_KEYS:
        raise FieldTypeError(f"{len(meta):,} metadata (unknown) keys; at most "
                             f"{MAX_METADATA_KEYS} are kept with a crystal",
                             reason="too_complex", key=clip(next(iter(meta)), 60))
    for key in meta:
        _check_length(key, key, MAX_LABEL_CHARS)
    return meta


#: Panel indices are int16: at most this many distinct panels per message.
_PANELS_MAX = 32768


def _decode_panel(v: Any, names: Any) -> tuple[np.ndarray, list[str]]:
    """Panels as (int16 index, names); accepts an index array + names or a list of str."""
    if isinstance(v, (list, tuple)):
        if not all(isinstance(x, str) for x in v):
            raise FieldTypeError("key 'panel': a list must hold strings only", key="panel")
        for x in v:
            _check_length("panel", x, MAX_LABEL_CHARS)
        uniq, inv = np.unique(np.asarray(v, dtype=object).astype(str), return_inverse=True)
        if len(uniq) > _PANELS_MAX:
            raise ValueRangeError(f"key 'panel': {len(uniq)} distinct panel names; at most "
                                  f"{_PANELS_MAX} are supported", reason="out_of_range",
                                  key="panel")
        return inv.astype(np.int16), [str(x) for x in uniq]
    idx = _decode_array("panel", v, INT_DTYPES)
    if not isinstance(names, (list, tuple)) or not all(isinstance(x, str) for x in names):
        raise FieldTypeError("key 'panel_names': an index array 'panel' needs a list of "
                             "panel name strings in 'panel_names'", key="panel_names")
    for x in names:
        _check_length("panel_names", x, MAX_LABEL_CHARS)
    if idx.size and (int(idx.min()) < 0 or int(idx.max()) >= min(len(names), _PANELS_MAX)):
        # indices are kept as int16: a larger one would wrap into a negative index
        raise ValueRangeError("key 'panel': index outside 'panel_names' (or beyond "
                              f"{_PANELS_MAX - 1})", reason="out_of_range", key="panel")
    return idx.astype(np.int16, copy=False), list(names)
