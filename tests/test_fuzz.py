"""Hostile input: the wire decoder, the CrystFEL and DIALS readers, and ingest end to end.

What every case asserts:

- the wire decoder returns a sound :class:`~streamvi.wire.CrystalMessage` or raises a
  :class:`~streamvi.errors.WireError` whose ``reason`` is one of the labels documented in
  docs/wire-format.md section 5 (never ``decode_error``, which marks a decoder bug), and
  nothing else;
- the CrystFEL and DIALS readers never raise on bad bytes: they yield
  :class:`~streamvi.sources.Rejected` records, each with a reason label, and every message
  they do yield is one the wire decoder accepts;
- no case hangs: each runs under a time bound (an interval timer for Python code, a
  faulthandler watchdog that ends the process for a hang inside C code);
- end to end, good messages interleaved with every kind of bad one, sent over a real PUSH
  socket into a real :class:`~streamvi.ingest.receiver.Ingestor`, give exactly the good ones in the
  spool (byte for byte, in order) and every bad one counted under its reason, in the
  counters and in the dead-letter file.

Randomness is fixed (hypothesis ``derandomize=True``, seeded :class:`random.Random`), so a
failure reproduces.  The number of cases run is printed per family and in total
(``pytest -s tests/test_fuzz.py``).
"""
from __future__ import annotations

import collections
import contextlib
import faulthandler
import functools
import math
import random
import re
import shutil
import signal
import struct
import time
import warnings
from pathlib import Path
from typing import Any, Iterator

import msgpack
import numpy as np
import pytest
import zmq
from conftest import DIALS_EXPT, DIALS_REFL, LCLS_STREAM, PAL_STREAM, REPO, make_crystal
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from streamvi.ingest.counters import IngestCounters
from streamvi.ingest.deadletter import DeadLetter, read_dead_letters
from streamvi.errors import InputError, WireError
from streamvi.ingest.receiver import Ingestor
from streamvi.sources import Rejected
from streamvi.ingest.spool import Spool
from streamvi.wire import (
    DEFAULT_MAX_MESSAGE_BYTES,
    MAX_MILLER,
    CrystalMessage,
    decode_crystal,
    encode_crystal,
    to_wire_dict,
    validate_cell,
)
from streamvi_crystfel import REASONS as CRYSTFEL_REASONS
from streamvi_crystfel import StreamParser
from streamvi_dials import REASONS as DIALS_REASONS
from streamvi_dials import DialsSource, read_reflection_table

#: Real streams: the GPL 5-HT2B one where it is beside the repository, then the MIT PAL one
#: (carried in tests/data; real_crystfel_messages reads the last).
CRYSTFEL_STREAMS = [p for p in (LCLS_STREAM, PAL_STREAM) if p.is_file()]

#: Longest one case may take, s (they take milliseconds; this is the hang detector).
CASE_BOUND_S = 5.0
#: A case stuck in C code for this long ends the process with a traceback.
WATCHDOG_S = 60.0

FUZZ = settings(derandomize=True, database=None, deadline=None, print_blob=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.filter_too_much])


def fuzz(max_examples: int) -> settings:
    """Fixed-seed hypothesis settings with a bounded number of examples."""
    return settings(FUZZ, max_examples=max_examples)

#: Cases run, by family (printed at the end of the module).
CASES: collections.Counter[str] = collections.Counter()
#: Rejections seen, by reason (wire decoder), so the report shows what was exercised.
WIRE_REASONS_SEEN: collections.Counter[str] = collections.Counter()
SLOWEST: dict[str, float] = {}
#: RuntimeWarnings (float overflow in a cast) that plugin readers let escape, by location.
PLUGIN_WARNINGS: collections.Counter[str] = collections.Counter()


def documented_reasons() -> frozenset[str]:
    """The reason labels of the table in docs/wire-format.md section 5."""
    text = (REPO / "docs" / "wire-format.md").read_text()
    section = text.split("## 5.", 1)[1].split("\n## ", 1)[0]
    return frozenset(re.findall(r"^\| `([a-z_]+)` \|", section, flags=re.M))


ROW_REASONS = {"nonfinite_intensity", "nonpositive_sigma", "zero_miller"}
#: Whole-message reasons; ``decode_error`` is excluded: it marks a bug in the decoder.
WIRE_REASONS = documented_reasons() - {"decode_error"} - ROW_REASONS
SNAKE = re.compile(r"^[a-z][a-z0-9_]*$")


# ----------------------------------------------------------------------------- time bound


class CaseTimeout(Exception):
    """A case ran past :data:`CASE_BOUND_S`."""


def _on_alarm(signum, frame):  # noqa: ARG001 - signal handler signature
    raise CaseTimeout(f"a fuzz case ran longer than {CASE_BOUND_S} s")


@contextlib.contextmanager
def plugin_warnings_recorded() -> Iterator[None]:
    """Record (rather than raise) numeric RuntimeWarnings of the plugin readers.

    Outside the test suite they are only warnings (the value becomes ±inf and wire
    validation drops the row); they are counted and printed in the report.
    """
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", RuntimeWarning)
        yield
    for w in caught:
        if not issubclass(w.category, RuntimeWarning):
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
            continue
        PLUGIN_WARNINGS[f"{Path(w.filename).parent.name}/{Path(w.filename).name}:{w.lineno}: "
                        f"{w.message}"] += 1


@contextlib.contextmanager
def time_bound(family: str, seconds: float = CASE_BOUND_S) -> Iterator[None]:
    """Run one case under a time bound, count it, remember the slowest."""
    old = signal.signal(signal.SIGALRM, _on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    faulthandler.dump_traceback_later(WATCHDOG_S, exit=True)
    t0 = time.perf_counter()
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
        faulthandler.cancel_dump_traceback_later()
        dt = time.perf_counter() - t0
        CASES[family] += 1
        SLOWEST[family] = max(SLOWEST.get(family, 0.0), dt)


# ----------------------------------------------------------------------------- the oracle


def check_sound(msg: CrystalMessage, n_in: int | None = None) -> None:
    """What every accepted message guarantees to the rest of streamvi."""
    n = len(msg)
    assert n >= 1
    for name, dt in (("h", np.int32), ("k", np.int32), ("l", np.int32), ("I", np.float32),
                     ("sigI", np.float32)):
        a = getattr(msg, name)
        assert a.dtype == dt and a.shape == (n,), name
    for name in ("fs", "ss", "peak", "background"):
        a = getattr(msg, name)
        assert a is None or (a.dtype == np.float32 and a.shape == (n,)
                             and np.isfinite(a).all()), name
    if msg.panel is not None:
        assert msg.panel.shape == (n,) and msg.panel_names is not None
        assert msg.panel.min() >= 0 and msg.panel.max() < len(msg.panel_names)
    assert np.isfinite(msg.I).all() and np.isfinite(msg.sigI).all()
    assert (msg.sigI > 0).all()
    hkl = msg.hkl().astype(np.int64)
    assert (np.abs(hkl) <= MAX_MILLER).all()
    assert (hkl != 0).any(axis=1).all()
    assert 100.0 < msg.photon_energy_eV < 1.0e6
    validate_cell(msg.cell)
    assert all(math.isfinite(x) for x in msg.cell)
    for name in ("astar", "bstar", "cstar"):
        v = getattr(msg, name)
        assert v is None or (len(v) == 3 and all(math.isfinite(x) for x in v))
    assert isinstance(msg.run, str) and isinstance(msg.image, str)
    assert isinstance(msg.crystal, int) and msg.crystal >= 0
    assert set(msg.rows_rejected) <= ROW_REASONS
    assert all(c > 0 for c in msg.rows_rejected.values())
    if n_in is not None:
        assert n + sum(msg.rows_rejected.values()) == n_in
    # what was accepted survives a round trip unchanged
    again = decode_crystal(encode_crystal(msg))
    assert again.key == msg.key and len(again) == n and not again.rows_rejected
    for name in ("h", "k", "l", "I", "sigI"):
        assert np.array_equal(getattr(again, name), getattr(msg, name)), name


def decode_or_reason(buf: bytes, *, max_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
                     n_in: int | None = None) -> CrystalMessage | str:
    """The decoder's verdict on ``buf``: a sound message or a documented reason."""
    try:
        msg = decode_crystal(buf, max_bytes=max_bytes)
    except WireError as exc:
        assert isinstance(exc, InputError)
        assert exc.reason in WIRE_REASONS, (exc.reason, str(exc))
        assert str(exc), "a rejection must say what was wrong"
        WIRE_REASONS_SEEN[exc.reason] += 1
        return exc.reason
    check_sound(msg, n_in)
    return msg


def wire_case(family: str, buf: bytes, **kw: Any) -> CrystalMessage | str:
    with time_bound(family):
        return decode_or_reason(buf, **kw)


# ----------------------------------------------------------------------------- base messages


def full_crystal(seed: int = 0, n: int = 40) -> CrystalMessage:
    """A valid crystal with every optional field set."""
    rng = np.random.default_rng(seed)
    msg = make_crystal(rng, n=n, image=f"img{seed}", with_orientation=True)
    msg.peak = rng.uniform(10, 100, n).astype(np.float32)
    msg.background = rng.uniform(0, 5, n).astype(np.float32)
    msg.panel = rng.integers(0, 3, n).astype(np.int16)
    msg.panel_names = ["p0", "p1", "p2"]
    msg.resolution_limit = 2.1
    msg.condition = "dark"
    msg.timestamp = 1.7e9
    msg.detector_distance_m = 0.1
    msg.beam_bandwidth = 0.002
    msg.metadata = {"facility": "test", "shot": seed}
    return msg


BASE = to_wire_dict(full_crystal())
BASE_BYTES = msgpack.packb(BASE, use_bin_type=True)
KEYS = sorted(BASE) + ["panel_names", "unknown_key", ""]


def packed(d: Any) -> bytes:
    return msgpack.packb(d, use_bin_type=True)


def edited(**changes: Any) -> bytes:
    """BASE with keys replaced (a value of ``...`` removes the key)."""
    d = dict(BASE)
    for key, v in changes.items():
        if v is ...:
            d.pop(key, None)
        else:
            d[key] = v
    return packed(d)


def arr(dtype: str, values: Any = None, *, shape: Any = None, data: Any = None) -> dict:
    a = np.asarray([] if values is None else values, dtype=np.dtype(dtype))
    return {"dtype": dtype, "shape": [len(a)] if shape is None else shape,
            "data": a.tobytes() if data is None else data}


# ----------------------------------------------------------------------------- wire: hand-made


def many_panels(n: int) -> bytes:
    """A crystal of ``n`` reflections, each on its own panel named in a string list."""
    d = to_wire_dict(make_crystal(np.random.default_rng(n), n=n))
    d["panel"] = [f"panel{i}" for i in range(n)]
    return packed(d)


@functools.lru_cache(maxsize=1)
def hostile_table() -> list[tuple[str, bytes, str | None]]:
    """(name, message, expected reason or None for "accepted") of every family of defect."""
    n = len(BASE["h"]["data"]) // 4
    ones = np.ones(n)
    cases: list[tuple[str, bytes, str | None]] = [
        ("the base message", BASE_BYTES, None),
        ("empty frame", b"", "malformed_msgpack"),
        ("empty map", b"\x80", "missing_key"),
        ("map header alone", b"\x81", "malformed_msgpack"),
        ("reserved byte 0xc1", b"\xc1", "malformed_msgpack"),
        ("trailing bytes", BASE_BYTES + b"\x00", "malformed_msgpack"),
        ("truncated by one byte", BASE_BYTES[:-1], "malformed_msgpack"),
        ("top level array", packed([BASE]), "malformed_msgpack"),
        ("top level string", packed("streamvi.crystal"), "malformed_msgpack"),
        ("top level nil", packed(None), "malformed_msgpack"),
        ("integer map key", b"\x81\x01\x02", "malformed_msgpack"),
        ("bin32 header claiming 4 GiB", b"\x81\xa4data\xc6\xff\xff\xff\xff" + b"x" * 16,
         "malformed_msgpack"),
        ("str32 header claiming 4 GiB", b"\x81\xa3run\xdb\xff\xff\xff\xff" + b"x" * 16,
         "malformed_msgpack"),
        ("array32 header claiming 4 G items", b"\xdd\xff\xff\xff\xff\x01\x02",
         "malformed_msgpack"),
        ("map32 header claiming 4 G pairs", b"\xdf\xff\xff\xff\xff\xa1a\x01",
         "too_complex"),
        ("100,001 reflections", encode_crystal(full_crystal(5, n=100_001)),
         "too_many_reflections"),
        ("image of 1,025 characters", edited(image="i" * 1025), "string_too_long"),
        ("run of 257 characters", edited(run="r" * 257), "string_too_long"),
        ("condition of 5,000 bytes", edited(condition="c" * 5000), "string_too_long"),
        ("metadata key of 300 characters", edited(**{"k" * 300: 1}), "string_too_long"),
        ("a panel name of 300 characters",
         edited(panel_names=["p" * 300] + list(BASE["panel_names"])[1:]), "string_too_long"),
        ("260 metadata keys", edited(**{f"m{i}": i for i in range(260)}), "too_complex"),
        ("400 metadata keys", edited(**{f"m{i}": i for i in range(400)}), "too_complex"),
        ("a million empty maps in metadata", edited(m=[{}] * 1_000_000), "too_complex"),
        ("200 arrays of 1,000 nils in metadata", edited(m=[[None] * 1000] * 200),
         "too_complex"),
        ("ext32 header claiming 4 GiB", b"\xc9\xff\xff\xff\xff\x01" + b"x" * 8,
         "malformed_msgpack"),
        ("array nested 100,000 deep", b"\x91" * 100_000 + b"\x00", "malformed_msgpack"),
        ("map nested 100,000 deep", b"\x81\xa1a" * 100_000 + b"\x00", "malformed_msgpack"),
        ("invalid utf-8 in a key", b"\x81\xa2\xff\xfe\x01", "malformed_msgpack"),
        ("bin data claiming 4 GiB inside the message",
         packed({**BASE, "h": None})[:-1] + b"\xc6\xff\xff\xff\xff", "malformed_msgpack"),
        ("schema missing", edited(schema=...), "missing_key"),
        ("schema of someone else", edited(schema="someone.else"), "unknown_schema"),
        ("schema as bytes", edited(schema=b"streamvi.crystal"), "unknown_schema"),
        ("version 0", edited(version=0), "unsupported_version"),
        ("version 2", edited(version=2), "unsupported_version"),
        ("version -1", edited(version=-1), "unsupported_version"),
        ("version 2**64-1", edited(version=2**64 - 1), "unsupported_version"),
        ("version '1'", edited(version="1"), "unsupported_version"),
        ("version 1.0", edited(version=1.0), "unsupported_version"),
        ("version true", edited(version=True), "unsupported_version"),
        ("version nil", edited(version=None), "unsupported_version"),
        *[(f"{key} missing", edited(**{key: ...}), "missing_key")
          for key in ("run", "image", "crystal", "h", "k", "l", "I", "sigI",
                      "photon_energy_eV", "cell")],
        ("run nil", edited(run=None), "wrong_type"),
        ("run an int", edited(run=7), "wrong_type"),
        ("image as bytes", edited(image=b"img"), "wrong_type"),
        ("crystal -1", edited(crystal=-1), "wrong_type"),
        ("crystal 1.5", edited(crystal=1.5), "wrong_type"),
        ("crystal true", edited(crystal=True), "wrong_type"),
        ("h as a plain list", edited(h=[1, 2, 3]), "wrong_type"),
        ("h as bin", edited(h=b"\x00" * 4 * n), "wrong_type"),
        ("h as float32 (non-integer Miller indices)", edited(h=arr("<f4", ones)),
         "wrong_dtype"),
        ("h as float64", edited(h=arr("<f8", ones + 0.5)), "wrong_dtype"),
        ("h big-endian", edited(h=arr(">i4", ones)), "wrong_dtype"),
        ("h unsigned", edited(h=arr("<u4", ones)), "wrong_dtype"),
        ("h dtype is an int", edited(h={**BASE["h"], "dtype": 4}), "wrong_dtype"),
        ("I as int32", edited(I=arr("<i4", ones)), "wrong_dtype"),
        ("I as float16", edited(I=arr("<f2", ones)), "wrong_dtype"),
        ("I dtype object", edited(I={**BASE["I"], "dtype": "O"}), "wrong_dtype"),
        ("array without data", edited(I={"dtype": "<f4", "shape": [n]}), "bad_array"),
        ("array shape 2-D", edited(I={**BASE["I"], "shape": [n, 1]}), "bad_array"),
        ("array shape negative", edited(I={**BASE["I"], "shape": [-1]}), "bad_array"),
        ("array shape a float", edited(I={**BASE["I"], "shape": [float(n)]}), "bad_array"),
        ("array shape 2**63 (huge declared length)",
         edited(I={**BASE["I"], "shape": [2**63]}), "bad_array"),
        ("array shape 2**30 over a short buffer", edited(I={**BASE["I"], "shape": [2**30]}),
         "bad_array"),
        ("array data is a str", edited(I={**BASE["I"], "data": "abcd" * n}), "bad_array"),
        ("array data one byte short", edited(I={**BASE["I"], "data": BASE["I"]["data"][:-1]}),
         "bad_array"),
        ("array data one byte long", edited(I={**BASE["I"], "data": BASE["I"]["data"] + b"0"}),
         "bad_array"),
        ("I one row short", edited(I=arr("<f4", ones[:-1] * 5)), "length_mismatch"),
        ("fs one row long", edited(fs=arr("<f4", np.ones(n + 1))), "length_mismatch"),
        ("panel names missing", edited(panel_names=...), "wrong_type"),
        ("panel index outside the names", edited(panel=arr("<i2", np.full(n, 7))),
         "out_of_range"),
        ("panel negative", edited(panel=arr("<i2", np.full(n, -1))), "out_of_range"),
        ("panel index 40000 of 40001 names (beyond int16)",
         edited(panel=arr("<i4", np.full(n, 40000)),
                panel_names=[f"p{i}" for i in range(40001)]), "out_of_range"),
        ("33000 distinct panel names as a list (beyond int16)", many_panels(33000),
         "out_of_range"),
        ("32768 distinct panel names as a list", many_panels(32768), None),
        ("zero reflections", edited(h=arr("<i4"), k=arr("<i4"), l=arr("<i4"), I=arr("<f4"),
                                    sigI=arr("<f4"), fs=arr("<f4"), ss=arr("<f4"),
                                    peak=arr("<f4"), background=arr("<f4"),
                                    panel=arr("<i2")), "no_reflections"),
        ("all I NaN", edited(I=arr("<f4", np.full(n, np.nan))), "no_valid_reflections"),
        ("all sigI +inf", edited(sigI=arr("<f4", np.full(n, np.inf))), "no_valid_reflections"),
        ("all sigI zero", edited(sigI=arr("<f4", np.zeros(n))), "no_valid_reflections"),
        ("all sigI negative", edited(sigI=arr("<f4", -ones)), "no_valid_reflections"),
        ("all sigI -0.0", edited(sigI=arr("<f4", np.full(n, -0.0))), "no_valid_reflections"),
        ("sigI float64 below float32", edited(sigI=arr("<f8", np.full(n, 1e-300))),
         "no_valid_reflections"),
        ("I float64 beyond float32", edited(I=arr("<f8", np.full(n, 1e300))),
         "no_valid_reflections"),
        ("all hkl 000", edited(h=arr("<i4", 0 * ones), k=arr("<i4", 0 * ones),
                               l=arr("<i4", 0 * ones)), "no_valid_reflections"),
        ("h 1025", edited(h=arr("<i4", np.full(n, MAX_MILLER + 1))), "miller_out_of_range"),
        ("k int32 min", edited(k=arr("<i4", np.full(n, -2**31))), "miller_out_of_range"),
        ("l int64 max", edited(l=arr("<i8", np.full(n, 2**63 - 1))), "miller_out_of_range"),
        ("photon energy NaN", edited(photon_energy_eV=float("nan")), "bad_photon_energy"),
        ("photon energy +inf", edited(photon_energy_eV=float("inf")), "bad_photon_energy"),
        ("photon energy 0", edited(photon_energy_eV=0.0), "bad_photon_energy"),
        ("photon energy negative", edited(photon_energy_eV=-9500.0), "bad_photon_energy"),
        ("photon energy 1e7", edited(photon_energy_eV=1e7), "bad_photon_energy"),
        ("photon energy a str", edited(photon_energy_eV="9500"), "wrong_type"),
        ("photon energy true", edited(photon_energy_eV=True), "wrong_type"),
        ("cell of zeros", edited(cell=[0.0] * 6), "absurd_cell"),
        ("cell negative", edited(cell=[-79.1, 79.1, 37.9, 90, 90, 90]), "absurd_cell"),
        ("cell 1e6 Å", edited(cell=[1e6, 79.1, 37.9, 90, 90, 90]), "absurd_cell"),
        ("cell angle 180", edited(cell=[79.1, 79.1, 37.9, 90, 90, 180]), "absurd_cell"),
        ("cell angles without volume", edited(cell=[79.1, 79.1, 37.9, 20, 20, 160]),
         "absurd_cell"),
        ("cell NaN", edited(cell=[float("nan"), 79.1, 37.9, 90, 90, 90]), "out_of_range"),
        ("cell inf", edited(cell=[79.1, float("inf"), 37.9, 90, 90, 90]), "out_of_range"),
        ("cell of five", edited(cell=[79.1, 79.1, 37.9, 90, 90]), "wrong_type"),
        ("cell of seven", edited(cell=[79.1, 79.1, 37.9, 90, 90, 90, 90]), "wrong_type"),
        ("cell a str", edited(cell="79.1 79.1 37.9 90 90 90"), "wrong_type"),
        ("cell with a str", edited(cell=[79.1, "79.1", 37.9, 90, 90, 90]), "wrong_type"),
        ("astar NaN", edited(astar=[float("nan"), 0.0, 0.0]), "out_of_range"),
        ("astar of two", edited(astar=[0.01, 0.0]), "wrong_type"),
        ("timestamp inf", edited(timestamp=float("inf")), "out_of_range"),
        ("profile radius a str", edited(profile_radius="0.003"), "wrong_type"),
        ("condition an int", edited(condition=3), "wrong_type"),
        ("panel list with an int", edited(panel=["p0"] * (n - 1) + [3], panel_names=...),
         "wrong_type"),
        ("fs NaN (feeds the scale model)", edited(fs=arr("<f4", np.full(n, np.nan))),
         "out_of_range"),
        ("ss +inf in one row", edited(ss=arr("<f4", np.r_[np.inf, ones[1:]])), "out_of_range"),
        ("peak float64 beyond float32", edited(peak=arr("<f8", np.full(n, 1e300))),
         "out_of_range"),
        ("background NaN only in a row dropped for its NaN I",
         edited(I=arr("<f4", np.r_[np.nan, ones[1:]]),
                background=arr("<f4", np.r_[np.nan, ones[1:]])), None),
        ("some rows bad, the rest kept",
         edited(I=arr("<f4", np.r_[np.nan, np.inf, ones[2:] * 10]),
                sigI=arr("<f4", np.r_[1.0, 1.0, 0.0, -1.0, ones[4:]])), None),
        ("unknown keys of every type",
         edited(extra_nil=None, extra_bin=b"\x00" * 100, extra_map={"a": [1, {"b": 2}]},
                extra_float=float("nan")), None),
        ("message of 100 MB (default limit 64 MiB)", b"\x00" * (100 * 2**20), "too_large"),
    ]
    return cases


def test_hand_made_hostile_messages():
    wrong = []
    for name, buf, expected in hostile_table():
        verdict = wire_case("wire: hand-made", buf)
        got = verdict if isinstance(verdict, str) else None
        if got != expected:
            wrong.append(f"{name}: expected {expected}, got {got}")
    assert not wrong, "\n".join(wrong)


def test_limit_is_enforced_before_parsing():
    """A message over the limit is refused by its size alone, whatever it holds."""
    for limit in (0, 1, len(BASE_BYTES) - 1):
        assert wire_case("wire: hand-made", BASE_BYTES, max_bytes=limit) == "too_large"
    assert isinstance(wire_case("wire: hand-made", BASE_BYTES, max_bytes=len(BASE_BYTES)),
                      CrystalMessage)


def test_encoder_refuses_integers_that_do_not_fit_and_narrows_floats_quietly():
    """Producers: an index beyond int32 must not wrap into another valid index."""
    rng = np.random.default_rng(3)
    for name, value in (("h", 2**32 + 5), ("k", -2**31 - 1), ("l", 2.5)):
        msg = make_crystal(rng, n=4)
        setattr(msg, name, np.array([value, 1, 2, 3], dtype=np.int64 if name != "l"
                                    else np.float64))
        with time_bound("wire: encoder"), pytest.raises(ValueError, match="do not fit"):
            encode_crystal(msg)
    msg = make_crystal(rng, n=4)
    msg.I = np.array([1e300, 1.0, 2.0, 3.0])          # float64 beyond float32: inf, no warning
    with time_bound("wire: encoder"), warnings.catch_warnings():
        warnings.simplefilter("error")
        got = decode_crystal(encode_crystal(msg))
    assert len(got) == 3 and got.rows_rejected == {"nonfinite_intensity": 1}


def _oriented(**changes: Any) -> bytes:
    k0 = 9500.0 / 12398.419843320026      # 1/λ, Å⁻¹, of the base message
    d = dict(BASE)
    d.update(h=arr("<i4", [1, 2]), k=arr("<i4", [0, 1]), l=arr("<i4", [0, 3]),
             I=arr("<f4", [10.0, 20.0]), sigI=arr("<f4", [1.0, 2.0]), astar=[0.0, 0.0, -k0])
    for key in ("fs", "ss", "peak", "background", "panel", "panel_names"):
        d.pop(key)
    d.update(changes)
    return packed(d)


def _feature_case(name: str, buf: bytes):
    return pytest.param(name, buf, id=name)


@pytest.mark.parametrize("name, buf", [
    _feature_case("fs of 3e38 pixels",
                  edited(fs=arr("<f4", np.full(len(BASE["h"]["data"]) // 4, 3e38)))),
    _feature_case("negative profile radius", edited(profile_radius=-1.0)),
    _feature_case("zero reciprocal basis",
                  edited(astar=[0.0] * 3, bstar=[0.0] * 3, cstar=[0.0] * 3)),
    _feature_case("astar of 1e300 per A", edited(astar=[1e300, 0.0, 0.0])),
    _feature_case("profile radius 1e-320 per A", edited(profile_radius=1e-320)),
    _feature_case("scattered beam of zero length", _oriented()),
])
def test_accepted_messages_give_finite_model_features(name, buf):
    """What the decoder accepts must not poison the scale model (one NaN feature makes the
    loss and every F NaN, for good: the checkpoint keeps it and the spool replays it)."""
    from streamvi.merging.features import reflection_metadata

    with time_bound("wire: feature safety"):
        verdict = decode_or_reason(buf)
        if isinstance(verdict, str):
            return                                  # refused: also safe
        with np.errstate(all="ignore"):
            features = reflection_metadata(verdict)
    assert np.isfinite(features).all(), name


# ----------------------------------------------------------------------------- wire: hypothesis


@fuzz(300)
@given(st.binary(max_size=4096))
def test_random_bytes(buf):
    wire_case("wire: random bytes", buf)


msgpack_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**63, 2**64 - 1) | st.floats()
    | st.text(max_size=20) | st.binary(max_size=64),
    lambda children: st.lists(children, max_size=6)
    | st.dictionaries(st.text(max_size=10), children, max_size=6),
    max_leaves=30)


@fuzz(120)
@given(st.dictionaries(st.sampled_from(KEYS) | st.text(max_size=8), msgpack_values,
                       max_size=16))
def test_random_maps_of_known_keys(d):
    wire_case("wire: random maps", packed(d))


def hostile_values(n: int) -> st.SearchStrategy:
    """Values to put where a field should be: wrong types, edge numbers, bad arrays."""
    dtypes = st.sampled_from(["<i2", "<i4", "<i8", "<f4", "<f8", ">i4", "<u4", "<f2", "|b1",
                              "O", "", "<i4 ", "int32"])
    array_maps = st.builds(
        lambda dt, shape, data: {"dtype": dt, "shape": shape, "data": data},
        dtypes,
        st.sampled_from([[n], [n - 1], [n + 1], [0], [-1], [2**63], [n, 1], [], "n", None])
        | st.lists(st.integers(-2**63, 2**64 - 1), max_size=2),
        st.binary(max_size=16 * n) | st.sampled_from([None, "x", 3])
        | st.integers(1, 8).map(lambda k: b"\x00" * (k * n)))
    numbers = st.floats() | st.integers(-2**63, 2**64 - 1) | st.sampled_from(
        [0, -0.0, 1e-320, 1e308, -1e308, 100.0, 1e6, 9500.0])
    return (msgpack_values | array_maps | numbers
            | st.lists(numbers, min_size=0, max_size=8)
            | st.lists(st.text(max_size=4), max_size=n + 2))


@fuzz(300)
@given(st.data())
def test_one_field_replaced_by_hostile_values(data):
    n = len(BASE["h"]["data"]) // 4
    d = dict(BASE)
    for _ in range(data.draw(st.integers(1, 3), label="fields")):
        key = data.draw(st.sampled_from(KEYS), label="key")
        if data.draw(st.booleans(), label="drop"):
            d.pop(key, None)
        else:
            d[key] = data.draw(hostile_values(n), label="value")
    wire_case("wire: hostile field values", packed(d))


int_arrays = st.sampled_from(["<i2", "<i4", "<i8"])
float_arrays = st.sampled_from(["<f4", "<f8"])


@fuzz(150)
@given(st.data())
def test_row_values_are_screened_and_counted(data):
    """Arbitrary h, k, l, I, sigI: every row is kept or counted under one row reason."""
    n = data.draw(st.integers(1, 30), label="rows")
    idx = st.integers(-2**31, 2**31 - 1) | st.integers(-3, 3) | st.sampled_from(
        [MAX_MILLER, -MAX_MILLER, MAX_MILLER + 1])
    vals = st.floats(width=64) | st.sampled_from([0.0, -0.0, 1e-45, 3.5e38, -1.0])
    cols = {}
    for key in ("h", "k", "l"):
        dt = data.draw(int_arrays, label=f"{key} dtype")
        lim = np.iinfo(np.dtype(dt))
        v = data.draw(st.lists(idx.map(lambda x, lo=lim.min, hi=lim.max: min(max(x, lo), hi)),
                               min_size=n, max_size=n), label=key)
        cols[key] = arr(dt, v)
    for key in ("I", "sigI"):
        dt = data.draw(float_arrays, label=f"{key} dtype")
        v = data.draw(st.lists(vals, min_size=n, max_size=n), label=key)
        with np.errstate(over="ignore"):
            cols[key] = arr(dt, v)
    d = {k: v for k, v in BASE.items() if k not in ("fs", "ss", "peak", "background",
                                                    "panel", "panel_names")}
    d.update(cols)
    wire_case("wire: row values", packed(d), n_in=n)


# ----------------------------------------------------------------------------- wire: mutation


def mutate(buf: bytes, rng: random.Random, *, tokens: tuple[bytes, ...] = ()) -> bytes:
    """One to three random byte-level edits: flips, truncation, insertion, deletion,
    duplication, or a msgpack length field made to lie."""
    b = bytearray(buf)
    for _ in range(rng.randint(1, 3)):
        op = rng.randrange(8)
        at = rng.randrange(len(b) + 1) if b else 0
        if op == 0 and b:                       # flip bits
            i = min(at, len(b) - 1)
            b[i] ^= 1 << rng.randrange(8)
        elif op == 1 and b:                     # set a byte
            b[min(at, len(b) - 1)] = rng.randrange(256)
        elif op == 2:                           # truncate
            del b[at:]
        elif op == 3:                           # insert random bytes
            b[at:at] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 8)))
        elif op == 4:                           # delete a run
            del b[at:at + rng.randint(1, 32)]
        elif op == 5 and b:                     # duplicate a run
            j = rng.randrange(len(b))
            b[at:at] = b[j:j + rng.randint(1, 64)]
        elif op == 6:                           # a header that claims a huge length
            b[at:at] = rng.choice([b"\xc6\xff\xff\xff\xff", b"\xdb\x7f\xff\xff\xff",
                                   b"\xdd\xff\xff\xff\xff", b"\xdf\x00\xff\xff\xff",
                                   b"\xc5\xff\xff"])
        elif op == 7 and tokens:                # a structural token
            b[at:at] = rng.choice(tokens)
    return bytes(b)


def test_mutated_real_messages():
    """Byte-level mutations of real encoded crystals: simulated, CrystFEL and DIALS ones."""
    from streamvi_sim import SimulationConfig, simulate_images

    seeds = [encode_crystal(full_crystal(s, n=12)) for s in range(3)]
    seeds += [encode_crystal(m) for m in simulate_images(
        SimulationConfig(n_images=2, dmin=4.0, n_atoms=100))]
    seeds += [encode_crystal(m) for m in real_crystfel_messages()[:2]]
    seeds += [encode_crystal(m) for m in DialsSource(DIALS_REFL) if isinstance(m, CrystalMessage)]
    tokens = tuple(packed(k) for k in ("h", "I", "sigI", "cell", "dtype", "shape", "data"))
    rng = random.Random(20261126)
    accepted = 0
    for i in range(3000):
        buf = mutate(seeds[i % len(seeds)], rng, tokens=tokens)
        accepted += isinstance(wire_case("wire: mutated real messages", buf), CrystalMessage)
    # some mutations only touch values (still a valid crystal): those must be accepted sound
    assert 0 < accepted < 3000


def test_every_truncation_of_a_message():
    buf = encode_crystal(full_crystal(7, n=5))
    for cut in range(len(buf)):
        assert wire_case("wire: truncations", buf[:cut]) in WIRE_REASONS


# ----------------------------------------------------------------------------- CrystFEL


def real_crystfel_messages() -> list[CrystalMessage]:
    parser = StreamParser("real", source=str(CRYSTFEL_STREAMS[0]))
    items = parser.feed(CRYSTFEL_STREAMS[-1].read_bytes()) + parser.close()
    return [m for m in items if isinstance(m, CrystalMessage)]


def stream_pieces() -> list[bytes]:
    """Real stream text: the 3-crystal PAL stream whole, and the LCLS header + 4 chunks."""
    out = []
    for path in CRYSTFEL_STREAMS:
        data = path.read_bytes()
        starts = [m.start() for m in re.finditer(rb"^----- Begin chunk -----", data, re.M)]
        if len(starts) > 5:
            data = data[:starts[4]]
        out.append(data)
    return out


STREAM_TOKENS = (b"----- Begin chunk -----\n", b"----- End chunk -----\n",
                 b"--- Begin crystal\n", b"--- End crystal\n", b"Reflections measured after "
                 b"indexing\n", b"End of reflections\n", b"Cell parameters 7.9 7.9 3.8 nm, "
                 b"90 90 90 deg\n", b"photon_energy_eV = nan\n", b"photon_energy_eV = -1\n",
                 b"   1    2    3     nan    1.0   1.0   1.0  10.0  10.0 p0\n",
                 b"   1    2    3  1e40   -1.0   1.0   1.0  10.0  10.0 p0\n",
                 b"99999999999 2 3 1 1 1 1 1 1 p0\n", b"astar = nan nan nan nm^-1\n",
                 b"Image filename: ../../etc/passwd\n", b"Event: //\n", b"\x00\xff\xfe",
                 b"\r\n", b"CrystFEL stream format 2.3\n", b"num_reflections = -5\n",
                 b"num_reflections = 99999999999999999999\n")


def parse_case(family: str, data: bytes, rng: random.Random) -> list:
    """Feed ``data`` in random pieces; every item is a sound message or a labelled reject."""
    with time_bound(family), plugin_warnings_recorded():
        parser = StreamParser("fuzz", source="fuzz.stream")
        items = []
        at = 0
        while at < len(data):
            step = rng.choice([1, 7, 100, 4096, 65536, len(data)])
            items += parser.feed(data[at:at + step])
            at += step
        items += parser.close()
        for item in items:
            if isinstance(item, Rejected):
                assert SNAKE.match(item.reason), item
                assert item.reason in set(CRYSTFEL_REASONS) | WIRE_REASONS, item
                assert item.detail and item.position
            else:
                assert isinstance(item, CrystalMessage), type(item)
                check_sound(item)
                decode_or_reason(encode_crystal(item))   # what it emits, ingest accepts
        return items


def test_crystfel_parser_on_mutated_real_streams():
    pieces = stream_pieces()
    rng = random.Random(11)
    for piece in pieces:     # unmutated first: the reference counts
        items = parse_case("crystfel: mutated streams", piece, rng)
        assert any(isinstance(i, CrystalMessage) for i in items)
    for i in range(600):
        piece = pieces[i % len(pieces)]
        parse_case("crystfel: mutated streams", mutate(piece, rng, tokens=STREAM_TOKENS), rng)


def test_crystfel_parser_on_truncated_streams():
    piece = stream_pieces()[-1]
    rng = random.Random(12)
    for cut in sorted(rng.sample(range(len(piece)), 150)):
        parse_case("crystfel: truncations", piece[:cut], rng)


@fuzz(100)
@given(st.data())
def test_crystfel_parser_on_lines_edited_by_hypothesis(data):
    lines = stream_pieces()[-1].splitlines(keepends=True)
    for _ in range(data.draw(st.integers(1, 4), label="edits")):
        i = data.draw(st.integers(0, len(lines) - 1), label="line")
        new = data.draw(st.sampled_from(STREAM_TOKENS) | st.binary(max_size=80)
                        | st.text(max_size=80).map(lambda s: s.encode("utf-8", "replace")),
                        label="text")
        how = data.draw(st.sampled_from(["insert", "replace", "delete"]), label="how")
        if how == "insert":
            lines.insert(i, new)
        elif how == "replace":
            lines[i] = new
        else:
            del lines[i]
    parse_case("crystfel: hypothesis line edits", b"".join(lines), random.Random(0))


# ----------------------------------------------------------------------------- DIALS


def dials_case(family: str, refl: bytes, work: Path) -> None:
    path = work / "fuzz.refl"
    path.write_bytes(refl)
    with time_bound(family), plugin_warnings_recorded():
        for strict in (True, False):
            try:
                read_reflection_table(path, strict=strict)
            except InputError as exc:
                assert SNAKE.match(exc.reason) and str(exc)
        for item in DialsSource(path):
            if isinstance(item, Rejected):
                assert SNAKE.match(item.reason), item
                assert item.reason in set(DIALS_REASONS) | WIRE_REASONS, item
            else:
                assert isinstance(item, CrystalMessage)
                check_sound(item)


@pytest.fixture(scope="module")
def dials_work(tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("dials-fuzz")
    shutil.copy(DIALS_EXPT, work / "fuzz.expt")
    return work


def test_dials_reader_on_mutated_reflection_tables(dials_work):
    refl = DIALS_REFL.read_bytes()
    rng = random.Random(13)
    tokens = (b"\xc6\xff\xff\xff\xff", b"\xdd\xff\xff\xff\xff", packed("nrows"),
              packed("data"), packed(["double", [3, b"\x00" * 24]]), packed(-1),
              packed(2**63), packed("dials::af::reflection_table"))
    dials_case("dials: mutated .refl", refl, dials_work)
    for _ in range(150):
        dials_case("dials: mutated .refl", mutate(refl, rng, tokens=tokens), dials_work)
    for cut in sorted(rng.sample(range(len(refl)), 40)):
        dials_case("dials: truncated .refl", refl[:cut], dials_work)


def test_dials_reader_on_lying_length_headers(dials_work):
    """Column data whose bin header claims 4 GiB, and an nrows of 2**63."""
    raw = msgpack.unpackb(DIALS_REFL.read_bytes(), raw=False, strict_map_key=False)
    blob = packed(raw)
    # every bin8/16/32 header of the file, in turn, made to claim 4 GiB
    heads = [m.start() for m in re.finditer(rb"\xc6", blob)][:40]
    for at in heads:
        dials_case("dials: lying lengths", blob[:at] + b"\xc6\xff\xff\xff\xff" + blob[at + 5:],
                   dials_work)
    raw[2]["nrows"] = 2**63
    dials_case("dials: lying lengths", packed(raw), dials_work)
    raw[2]["nrows"] = -1
    dials_case("dials: lying lengths", packed(raw), dials_work)


# ----------------------------------------------------------------------------- end to end


def bad_frames() -> list[tuple[list[bytes], str]]:
    """(frames, reason) of every bad message kind: hand-made, mutated, multipart."""
    # frames over the size limit never reach the decoder: ZeroMQ refuses them unread and
    # drops the connection (tests/test_ingest.py, tests/test_memory.py)
    out = [([buf], reason) for _, buf, reason in hostile_table()
           if reason is not None and len(buf) <= DEFAULT_MAX_MESSAGE_BYTES]
    rng = random.Random(99)
    base = encode_crystal(full_crystal(3, n=12))
    while len(out) < len(hostile_table()) + 120:
        buf = mutate(base, rng)
        verdict = decode_or_reason(buf)
        if isinstance(verdict, str):
            out.append(([buf], verdict))
    out.append(([base, b"second frame"], "unexpected_multipart"))
    out.append(([b"", b"", b""], "unexpected_multipart"))
    return out


def test_end_to_end_only_good_messages_are_spooled(tmp_path):
    """Good crystals interleaved with every bad kind, over a real PUSH socket."""
    rng = np.random.default_rng(5)
    good = [encode_crystal(make_crystal(rng, n=30, image=f"good{i}")) for i in range(150)]
    bad = bad_frames()
    frames: list[tuple[list[bytes], str | None]] = [([g], None) for g in good] + bad
    random.Random(7).shuffle(frames)
    # the good ones keep their order among themselves in the spool: remember it
    good_in_order = [f[0] for f, reason in frames if reason is None]
    expected = collections.Counter(reason for _, reason in bad)

    spool = Spool(tmp_path / "spool", fsync="never")
    dead = DeadLetter(tmp_path / "dead-letter.jsonl", max_payload_bytes=4096)
    counters = IngestCounters()
    ing = Ingestor(["tcp://127.0.0.1:*"], spool=spool, dead_letter=dead, counters=counters,
                   queue_max_messages=100_000)
    ctx = zmq.Context()
    t0 = time.perf_counter()
    try:
        ing.start()
        sock = ctx.socket(zmq.PUSH)
        sock.setsockopt(zmq.SNDTIMEO, 20_000)
        sock.setsockopt(zmq.LINGER, 20_000)
        sock.connect(ing.bound_endpoints[0])
        for f, _ in frames:
            sock.send_multipart(f)
        sock.close()
        deadline = time.monotonic() + 60
        while counters.snapshot()["messages_received"] < len(frames):
            assert time.monotonic() < deadline, counters.snapshot()
            time.sleep(0.02)
        queued = []
        while len(queued) < len(good):
            batch = ing.get_batch(1000, timeout=5)
            assert batch, "accepted crystals missing from the queue"
            queued += batch
    finally:
        ing.stop()
        ctx.term()
    CASES["end to end: frames sent"] += len(frames)
    c = counters.snapshot()
    assert c["messages_received"] == len(frames)
    assert c["crystals_received"] == len(good)
    assert c["messages_rejected"] == dict(expected)
    assert c["bytes_received"] == sum(len(b) for f, _ in frames for b in f)
    assert [m.image for _, m, _ in queued] == [decode_crystal(g).image for g in good_in_order]
    assert ing.get_batch(10, timeout=0.2) == []
    # the spool holds exactly the good frames, byte for byte, in arrival order
    assert spool.n_records == len(good) and spool.corrupt_records == 0
    assert [p for _, p in spool.iter_records()] == good_in_order
    spool.close()
    # the dead-letter file: one line per bad frame, with its reason and size
    dead.close()
    letters = read_dead_letters(tmp_path / "dead-letter.jsonl")
    assert collections.Counter(r["reason"] for r in letters) == expected
    assert sorted(r["size"] for r in letters) == sorted(len(f[-1]) for f, _ in bad)
    assert all(r["detail"] for r in letters)
    assert max(len(r["payload_b64"]) for r in letters) <= 4 * 4096 // 3 + 4
    print(f"\nend to end: {len(frames)} frames ({len(good)} good, {len(bad)} bad of "
          f"{len(expected)} reasons) in {time.perf_counter() - t0:.1f} s")


# ----------------------------------------------------------------------------- report


def test_zz_report():
    """Print the number of cases run (this module's figure for the report)."""
    assert CASES, "no fuzz case ran"
    width = max(map(len, CASES))
    print("\nfuzz cases run:")
    for family, n in sorted(CASES.items()):
        print(f"  {family:<{width}}  {n:>6}   slowest {SLOWEST.get(family, 0.0) * 1e3:8.1f} ms")
    print(f"  {'total':<{width}}  {sum(CASES.values()):>6}")
    print("  wire rejection reasons exercised: " + ", ".join(
        f"{r} {n}" for r, n in sorted(WIRE_REASONS_SEEN.items())))
    print("  documented reasons the decoder never produced: "
          + ", ".join(sorted(WIRE_REASONS - set(WIRE_REASONS_SEEN) - {"unexpected_multipart"})))
    if PLUGIN_WARNINGS:
        print("  RuntimeWarnings that escaped the plugin readers (not exceptions outside the "
              "test suite):")
        for where, n in sorted(PLUGIN_WARNINGS.items()):
            print(f"    {n:>5} x {where}")
    assert max(SLOWEST.values()) < CASE_BOUND_S
