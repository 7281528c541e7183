"""Wire format v1: round trips, zero-copy decoding, and every rejection reason."""
from __future__ import annotations

import math
import re
from pathlib import Path

import msgpack
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from streamvi.errors import (
    FieldTypeError,
    MalformedMessageError,
    MissingKeyError,
    SchemaError,
    ShapeMismatchError,
    ValueRangeError,
    WireError,
)
from streamvi.wire import (
    MAX_IMAGE_CHARS,
    MAX_LABEL_CHARS,
    MAX_METADATA_KEYS,
    MAX_MILLER,
    MAX_REFLECTIONS,
    MAX_RUN_CHARS,
    MAX_STRING_BYTES,
    REQUIRED_KEYS,
    CrystalMessage,
    decode_crystal,
    encode_crystal,
    to_wire_dict,
)

CELL = (79.1, 79.1, 37.9, 90.0, 90.0, 90.0)


def full_message(n: int = 6) -> CrystalMessage:
    """A message with every optional field set, values distinct per row."""
    r = np.arange(n)
    return CrystalMessage(
        run="run-0042", image="data_000017.h5//123", crystal=1,
        h=(r + 1).astype(np.int32), k=(-r).astype(np.int32), l=(2 * r).astype(np.int32),
        I=(100.0 + r).astype(np.float32), sigI=(1.0 + 0.5 * r).astype(np.float32),
        photon_energy_eV=9500.5, cell=CELL,
        astar=(0.0126, 0.0, 0.0), bstar=(0.0, 0.0126, 0.0), cstar=(0.0, 0.0, 0.0264),
        fs=(10.5 + r).astype(np.float32), ss=(20.25 + r).astype(np.float32),
        panel=(r % 3).astype(np.int16), panel_names=["p0a0", "p0a1", "p1a0"],
        peak=(50.0 + r).astype(np.float32), background=(3.0 + r).astype(np.float32),
        profile_radius=0.0025, resolution_limit=1.8, condition="+100ps",
        timestamp=1_700_000_000.25, detector_distance_m=0.12, beam_bandwidth=0.001,
        metadata={"indexer": "xgandalf", "tags": [1, "two", {"three": 3.0}]},
    )


def wire(**changes) -> dict:
    """The map of :func:`full_message` with keys replaced (value None deletes the key)."""
    d = to_wire_dict(full_message())
    for key, value in changes.items():
        if value is None:
            d.pop(key, None)
        else:
            d[key] = value
    return d


def pack(d) -> bytes:
    return msgpack.packb(d, use_bin_type=True)


def arr(values, dtype: str) -> dict:
    a = np.asarray(values, dtype=np.dtype(dtype))
    return {"dtype": dtype, "shape": [int(a.shape[0])], "data": a.tobytes()}


# ----------------------------------------------------------------------------- round trips


def test_full_message_round_trip():
    msg = full_message()
    got = decode_crystal(encode_crystal(msg))
    for name in ("run", "image", "crystal", "photon_energy_eV", "cell", "astar", "bstar",
                 "cstar", "panel_names", "profile_radius", "resolution_limit", "condition",
                 "timestamp", "detector_distance_m", "beam_bandwidth", "metadata"):
        assert getattr(got, name) == getattr(msg, name), name
    for name, dtype in (("h", np.int32), ("k", np.int32), ("l", np.int32), ("I", np.float32),
                        ("sigI", np.float32), ("fs", np.float32), ("ss", np.float32),
                        ("peak", np.float32), ("background", np.float32),
                        ("panel", np.int16)):
        a = getattr(got, name)
        assert a.dtype == dtype, name
        np.testing.assert_array_equal(a, getattr(msg, name), err_msg=name)
    assert got.rows_rejected == {}
    assert got.key == ("run-0042", "data_000017.h5//123", 1)
    assert got.wavelength_A == pytest.approx(12398.419843320026 / 9500.5)
    assert got.has_orientation()
    np.testing.assert_array_equal(got.hkl(), np.stack([msg.h, msg.k, msg.l], axis=1))


def test_minimal_message_leaves_optional_fields_unset():
    d = {key: value for key, value in wire().items() if key in REQUIRED_KEYS}
    got = decode_crystal(pack(d))
    assert len(got) == 6
    for name in ("astar", "fs", "ss", "panel", "panel_names", "peak", "background",
                 "profile_radius", "resolution_limit", "condition", "timestamp",
                 "detector_distance_m", "beam_bandwidth"):
        assert getattr(got, name) is None, name
    assert got.metadata == {}
    assert not got.has_orientation()


def test_panel_as_list_of_strings():
    names = ["q2", "q0", "q2", "q1", "q0", "q2"]
    got = decode_crystal(pack(wire(panel=names, panel_names=None)))
    assert got.panel.dtype == np.int16
    assert [got.panel_names[i] for i in got.panel] == names
    assert got.panel_names == ["q0", "q1", "q2"]


def test_unknown_keys_are_kept_verbatim_as_metadata():
    extra = {"facility": "EuXFEL", "pulse_id": 2**40, "nested": {"a": [1, 2.5, None]},
             "blob": b"\x00\x01"}
    got = decode_crystal(pack(wire(**extra)))
    assert got.metadata == {"indexer": "xgandalf", "tags": [1, "two", {"three": 3.0}], **extra}


def test_wider_dtypes_are_accepted_and_narrowed():
    d = wire(h=arr([1, 2, 3, 4, 5, 6], "<i8"), k=arr([0, 0, 1, 1, 2, 2], "<i2"),
             l=arr([0] * 6, "<i4"), I=arr([1.5, 2, 3, 4, 5, 6], "<f8"),
             sigI=arr([0.25] * 6, "<f8"), fs=arr(np.arange(6), "<f8"))
    got = decode_crystal(pack(d))
    assert (got.h.dtype, got.k.dtype, got.I.dtype, got.sigI.dtype, got.fs.dtype) == (
        np.int32, np.int32, np.float32, np.float32, np.float32)
    np.testing.assert_array_equal(got.h, [1, 2, 3, 4, 5, 6])
    np.testing.assert_array_equal(got.I, [1.5, 2, 3, 4, 5, 6])


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 300), seed=st.integers(0, 2**32 - 1))
def test_random_messages_round_trip(n, seed):
    rng = np.random.default_rng(seed)
    hkl = rng.integers(-MAX_MILLER, MAX_MILLER + 1, size=(n, 3)).astype(np.int32)
    hkl[(hkl == 0).all(axis=1)] = (0, 0, 1)
    msg = CrystalMessage(run="r", image=str(seed), crystal=int(rng.integers(0, 5)),
                         h=hkl[:, 0], k=hkl[:, 1], l=hkl[:, 2],
                         I=rng.normal(0, 1e4, n).astype(np.float32),
                         sigI=rng.uniform(1e-3, 1e3, n).astype(np.float32),
                         photon_energy_eV=float(rng.uniform(200, 5e5)), cell=CELL,
                         fs=rng.uniform(0, 4000, n).astype(np.float32))
    got = decode_crystal(encode_crystal(msg))
    np.testing.assert_array_equal(got.hkl(), hkl)
    np.testing.assert_array_equal(got.I, msg.I)
    np.testing.assert_array_equal(got.sigI, msg.sigI)
    np.testing.assert_array_equal(got.fs, msg.fs)
    assert got.photon_energy_eV == msg.photon_energy_eV
    assert got.crystal == msg.crystal


# ----------------------------------------------------------------------------- zero copy


def test_decoded_arrays_are_read_only_views_of_the_message_buffers():
    got = decode_crystal(encode_crystal(full_message()))
    for name in ("h", "k", "l", "I", "sigI", "fs", "ss", "peak", "background", "panel"):
        a = getattr(got, name)
        assert isinstance(a.base, bytes), name    # np.frombuffer on msgpack's bin object
        assert not a.flags.writeable, name
    with pytest.raises(ValueError):
        got.I[0] = 0.0


def test_decoded_arrays_are_separate_from_each_other():
    got = decode_crystal(encode_crystal(full_message()))
    assert not np.shares_memory(got.h, got.k)
    assert not np.shares_memory(got.I, got.sigI)


# ----------------------------------------------------------------------------- rejections


def rejects(buf: bytes, cls: type, reason: str, key: str | None = None, **kwargs) -> WireError:
    with pytest.raises(cls) as info:
        decode_crystal(buf, **kwargs)
    assert info.value.reason == reason
    if key is not None:
        assert info.value.key == key
    assert str(info.value)   # a human message, always
    return info.value


@pytest.mark.parametrize("buf", [
    b"",                                    # nothing at all
    b"\xc1",                                # the one byte msgpack never uses
    pack(wire())[:-7],                      # truncated
    pack(wire()) + b"\x00",                 # trailing data
    pack({1: "integer key"}),               # keys must be strings
])
def test_malformed_msgpack(buf):
    rejects(buf, MalformedMessageError, "malformed_msgpack")


@pytest.mark.parametrize("value", [[1, 2, 3], "streamvi.crystal", 7, None])
def test_top_level_must_be_a_map(value):
    err = rejects(pack(value), MalformedMessageError, "malformed_msgpack")
    assert "map" in str(err)


def test_too_large():
    buf = encode_crystal(full_message())
    err = rejects(buf, MalformedMessageError, "too_large", max_bytes=len(buf) - 1)
    assert str(len(buf)) in str(err)
    assert decode_crystal(buf, max_bytes=len(buf)).n_reflections == 6


def test_unknown_schema():
    err = rejects(pack(wire(schema="crystfel.chunk")), SchemaError, "unknown_schema", "schema")
    assert "crystfel.chunk" in str(err)


@pytest.mark.parametrize("version", [0, 2, "1"])
def test_unsupported_version(version):
    rejects(pack(wire(version=version)), SchemaError, "unsupported_version", "version")


@pytest.mark.parametrize("key", REQUIRED_KEYS)
def test_missing_key(key):
    err = rejects(pack(wire(**{key: None})), MissingKeyError, "missing_key", key)
    assert f"'{key}'" in str(err)


@pytest.mark.parametrize("key,value", [
    ("run", 42),
    ("image", b"bytes-not-str"),
    ("crystal", -1),
    ("crystal", True),
    ("crystal", 1.0),
    ("h", [1, 2, 3, 4, 5, 6]),                  # a list, not an array map
    ("I", b"\x00" * 24),                         # raw bin, not an array map
    ("photon_energy_eV", "9500"),
    ("photon_energy_eV", True),
    ("cell", [79.1, 79.1, 37.9, 90.0, 90.0]),    # five numbers
    ("cell", "79.1 79.1 37.9 90 90 90"),
    ("astar", [0.01, 0.0]),
    ("timestamp", "yesterday"),
    ("condition", 3),
    ("panel", ["p0", "p1", 2, "p0", "p1", "p0"]),
])
def test_wrong_type(key, value):
    rejects(pack(wire(**{key: value})), FieldTypeError, "wrong_type", key)


def test_index_panels_need_names():
    rejects(pack(wire(panel_names=None)), FieldTypeError, "wrong_type", "panel_names")


@pytest.mark.parametrize("key,dtype", [
    ("h", "<f4"), ("k", ">i4"), ("l", "<u4"), ("I", "<i4"), ("sigI", ">f4"), ("fs", "<f2"),
    ("panel", "<f4"),
])
def test_wrong_dtype(key, dtype):
    d = wire(**{key: arr(np.ones(6), dtype)})
    err = rejects(pack(d), FieldTypeError, "wrong_dtype", key)
    assert dtype in str(err)


def test_wrong_dtype_that_is_not_a_string():
    d = wire(h={"dtype": 4, "shape": [6], "data": np.ones(6, "<i4").tobytes()})
    rejects(pack(d), FieldTypeError, "wrong_dtype", "h")


@pytest.mark.parametrize("array_map", [
    {"dtype": "<f4", "shape": [6]},                                   # no data
    {"shape": [6], "data": bytes(24)},                                # no dtype
    {"dtype": "<f4", "data": bytes(24)},                              # no shape
    {"dtype": "<f4", "shape": [3, 2], "data": bytes(24)},            # 2-D
    {"dtype": "<f4", "shape": 6, "data": bytes(24)},                  # not a list
    {"dtype": "<f4", "shape": [-6], "data": bytes(24)},
    {"dtype": "<f4", "shape": [6.0], "data": bytes(24)},
    {"dtype": "<f4", "shape": [True], "data": bytes(4)},
    {"dtype": "<f4", "shape": [6], "data": "text, not bin"},
    {"dtype": "<f4", "shape": [6], "data": bytes(23)},                # one byte short
    {"dtype": "<f4", "shape": [5], "data": bytes(24)},                # shape disagrees
])
def test_bad_array(array_map):
    rejects(pack(wire(sigI=array_map)), FieldTypeError, "bad_array", "sigI")


@pytest.mark.parametrize("key", ["k", "l", "I", "sigI", "fs", "background", "panel"])
def test_length_mismatch(key):
    dtype = {"k": "<i4", "l": "<i4", "panel": "<i2"}.get(key, "<f4")
    err = rejects(pack(wire(**{key: arr(np.ones(5), dtype)})), ShapeMismatchError,
                  "length_mismatch")
    assert f"{key}=5" in str(err) and "h=6" in str(err)


def test_length_mismatch_of_panel_string_list():
    rejects(pack(wire(panel=["a"] * 7, panel_names=None)), ShapeMismatchError,
            "length_mismatch")


@pytest.mark.parametrize("cell", [
    [0.5, 79.1, 37.9, 90, 90, 90],         # shorter than 1 Å
    [79.1, 79.1, 20000.0, 90, 90, 90],     # longer than 10,000 Å
    [79.1, 79.1, 37.9, 90, 180, 90],
    [79.1, 79.1, 37.9, 5, 90, 90],
    [50.0, 50.0, 50.0, 120, 120, 120],     # angles with no real volume
])
def test_absurd_cell(cell):
    rejects(pack(wire(cell=cell)), ValueRangeError, "absurd_cell", "cell")


@pytest.mark.parametrize("energy", [50.0, 2.0e6, 0.0, -9500.0, math.nan, math.inf])
def test_bad_photon_energy(energy):
    rejects(pack(wire(photon_energy_eV=energy)), ValueRangeError, "bad_photon_energy",
            "photon_energy_eV")


def test_no_reflections():
    empty = {"h": arr([], "<i4"), "k": arr([], "<i4"), "l": arr([], "<i4"),
             "I": arr([], "<f4"), "sigI": arr([], "<f4")}
    d = {key: value for key, value in wire().items() if key in REQUIRED_KEYS}
    d.update(empty)
    rejects(pack(d), ValueRangeError, "no_reflections")


def test_no_valid_reflections():
    d = wire(I=arr([np.nan, 1, 2, np.inf, 4, 5], "<f4"),
             sigI=arr([1, 0, -1, 1, np.nan, 1], "<f4"),
             h=arr([1, 2, 3, 4, 5, 0], "<i4"), k=arr([0] * 6, "<i4"), l=arr([0] * 6, "<i4"))
    err = rejects(pack(d), ValueRangeError, "no_valid_reflections")
    assert "all 6 reflections" in str(err)


@pytest.mark.parametrize("key,value", [
    ("h", MAX_MILLER + 1), ("k", -MAX_MILLER - 1), ("l", 2**31 - 1), ("h", -2**31),
])
def test_miller_out_of_range(key, value):
    values = np.ones(6, np.int64)
    values[3] = value
    rejects(pack(wire(**{key: arr(values, "<i4")})), ValueRangeError, "miller_out_of_range")


def test_miller_out_of_range_in_int64():
    values = np.ones(6, np.int64)
    values[2] = np.iinfo(np.int64).min
    rejects(pack(wire(h=arr(values, "<i8"))), ValueRangeError, "miller_out_of_range")


def test_miller_at_the_limit_is_accepted():
    got = decode_crystal(pack(wire(h=arr([MAX_MILLER, -MAX_MILLER, 1, 1, 1, 1], "<i4"))))
    assert got.h[:2].tolist() == [MAX_MILLER, -MAX_MILLER]


@pytest.mark.parametrize("key,value", [
    ("panel", arr([0, 1, 3, 0, 1, 2], "<i2")),  # 3 names only
    ("panel", arr([0, -1, 2, 0, 1, 2], "<i2")),
    ("timestamp", math.nan),
    ("profile_radius", math.inf),
    ("astar", [0.01, math.nan, 0.0]),
    ("cell", [79.1, math.nan, 37.9, 90, 90, 90]),
])
def test_out_of_range(key, value):
    rejects(pack(wire(**{key: value})), ValueRangeError, "out_of_range", key)


# ----------------------------------------------------------------------------- bad rows


def test_bad_rows_are_dropped_counted_and_the_rest_kept_in_order():
    n = 10
    h = np.arange(1, n + 1, dtype=np.int32)
    k = np.zeros(n, np.int32)
    l = np.zeros(n, np.int32)  # noqa: E741
    iobs = np.arange(n, dtype=np.float32) * 10
    sig = np.ones(n, np.float32)
    iobs[1] = np.nan                                    # nonfinite_intensity
    sig[2] = np.inf                                     # nonfinite_intensity (σ)
    iobs[3] = -np.inf                                   # nonfinite_intensity
    sig[4] = 0.0                                        # nonpositive_sigma
    sig[6] = -2.0                                       # nonpositive_sigma
    h[8] = 0                                            # zero_miller
    iobs[9], sig[9] = np.nan, -1.0                      # counted once, as nonfinite
    d = wire(h=arr(h, "<i4"), k=arr(k, "<i4"), l=arr(l, "<i4"), I=arr(iobs, "<f4"),
             sigI=arr(sig, "<f4"), fs=arr(np.arange(n) + 0.5, "<f4"), ss=None, peak=None,
             background=None, panel=[f"p{i}" for i in range(n)], panel_names=None)
    got = decode_crystal(pack(d))
    assert got.rows_rejected == {"nonfinite_intensity": 4, "nonpositive_sigma": 2,
                                 "zero_miller": 1}
    keep = [0, 5, 7]
    np.testing.assert_array_equal(got.h, h[keep])
    np.testing.assert_array_equal(got.I, iobs[keep])
    np.testing.assert_array_equal(got.fs, np.arange(n)[keep] + 0.5)
    assert [got.panel_names[i] for i in got.panel] == [f"p{i}" for i in keep]


def test_clean_message_reports_no_rejected_rows():
    assert decode_crystal(encode_crystal(full_message())).rows_rejected == {}


def test_values_that_overflow_float32_are_screened_as_nonfinite():
    d = wire(I=arr([1e300, 1, 2, 3, 4, 5], "<f8"), sigI=arr([1, 1e-60, 1, 1, 1, 1], "<f8"))
    got = decode_crystal(pack(d))
    assert got.rows_rejected == {"nonfinite_intensity": 1, "nonpositive_sigma": 1}
    assert np.isfinite(got.I).all() and (got.sigI > 0).all()
    np.testing.assert_array_equal(got.I, [2, 3, 4, 5])


# ----------------------------------------------------------------------------- the spec


def test_worked_example_in_docs_decodes():
    """docs/wire-format.md's example, run as written, gives a valid message and the hex shown."""
    text = (Path(__file__).resolve().parents[1] / "docs" / "wire-format.md").read_text()
    namespace: dict = {}
    exec(re.findall(r"```python\n(.*?)```", text, re.S)[0], namespace)
    got = decode_crystal(namespace["payload"])
    assert got.hkl().tolist() == [[1, 0, 3], [-2, 5, 1], [0, 0, 4]]
    assert [got.panel_names[i] for i in got.panel] == ["p0a0", "p1a1", "p0a1"]
    assert got.metadata == {"my_facility_train_id": 123456789}
    assert got.rows_rejected == {}
    shown = re.search(r"`((?:[0-9a-f]{2} )+)…`", text)[1].strip()
    assert pack(namespace["message"]["l"]).hex(" ").startswith(shown)
    assert len(shown) > 80


# ----------------------------------------------------------------------------- limits (#18)


def many_reflections(n: int) -> bytes:
    r = np.arange(n)
    return encode_crystal(CrystalMessage(
        run="r", image="i", crystal=0, h=(r % 40 + 1).astype(np.int32),
        k=(r // 40 % 40).astype(np.int32), l=(r // 1600 % 40).astype(np.int32),
        I=np.ones(n, np.float32), sigI=np.ones(n, np.float32), photon_energy_eV=9500.0,
        cell=CELL))


def test_reflection_limit_is_a_parameter():
    buf = encode_crystal(full_message(6))
    err = rejects(buf, ValueRangeError, "too_many_reflections", "h", max_reflections=5)
    assert "6 reflections" in str(err) and "5 allowed" in str(err)
    assert decode_crystal(buf, max_reflections=6).n_reflections == 6
    assert decode_crystal(many_reflections(MAX_REFLECTIONS)).n_reflections == MAX_REFLECTIONS
    rejects(many_reflections(MAX_REFLECTIONS + 1), ValueRangeError, "too_many_reflections",
            "h")


@pytest.mark.parametrize("key, chars", [("run", MAX_RUN_CHARS), ("image", MAX_IMAGE_CHARS),
                                        ("condition", MAX_LABEL_CHARS)])
def test_string_fields_have_a_length_limit(key, chars):
    assert decode_crystal(pack(wire(**{key: "x" * chars})))
    err = rejects(pack(wire(**{key: "é" * (chars + 1)})), FieldTypeError, "string_too_long", key)
    assert f"{chars + 1:,} characters" in str(err) and len(str(err)) < 400


def test_panel_names_and_metadata_keys_have_a_length_limit():
    long = "p" * (MAX_LABEL_CHARS + 1)
    rejects(pack(wire(panel_names=[long, "p1", "p2"])), FieldTypeError, "string_too_long",
            "panel_names")
    rejects(pack(wire(panel=[long] * 6, panel_names=None)), FieldTypeError, "string_too_long",
            "panel")
    err = rejects(pack(wire(**{long: 1})), FieldTypeError, "string_too_long")
    assert len(str(err)) < 400


def test_metadata_is_bounded():
    keys = {f"m{i}": i for i in range(MAX_METADATA_KEYS - 2)}   # + "indexer", "tags"
    assert len(decode_crystal(pack(wire(**keys))).metadata) == MAX_METADATA_KEYS
    rejects(pack(wire(**keys, one_more=1)), WireError, "too_complex")
    rejects(pack(wire(**keys, one_more=1, fs=None, ss=None)), FieldTypeError, "too_complex")
    err = rejects(pack(wire(blob="b" * (MAX_STRING_BYTES + 1))), MalformedMessageError,
                  "string_too_long")
    assert "max_str_len" in str(err)


@pytest.mark.parametrize("value", [
    [{}] * 200_000,                         # one array longer than any crystal needs
    [[None] * 50_000] * 4,                 # arrays within the limit, too many in all
    {f"k{i}": {f"j{j}": {} for j in range(280)} for i in range(280)},   # maps within it, ...
    [[{}] * 1000] * 200,                   # ... and nested ones
])
def test_msgpack_bombs_are_refused_before_they_grow(value):
    rejects(pack(wire(bomb=value)), MalformedMessageError, "too_complex")


def test_text_from_the_message_is_never_echoed_unbounded():
    dtype = "<" + "x" * 5_000_000
    d = wire(h={"dtype": dtype, "shape": [6], "data": b"\0" * 24})
    # a str longer than any field allows is refused while unpacking, unread
    err = rejects(pack(d), MalformedMessageError, "string_too_long")
    assert len(str(err)) < 400
    # and where a long value gets through unpacking (a list), its repr is cut with a marker
    err = rejects(pack(wire(schema=["s" * 4000] * 50)), SchemaError, "unknown_schema", "schema")
    assert len(str(err)) < 500 and "50 items in all" in str(err)
    err = rejects(pack(wire(version="v" * 4000)), SchemaError, "unsupported_version", "version")
    assert len(str(err)) < 500 and "4,000 characters in all" in str(err)
