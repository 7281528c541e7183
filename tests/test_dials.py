"""DIALS plugin: reflection tables, experiment lists, the source, on real thermolysin stills.

Expected values come from independent readings of the same files: the msgpack unpacked by
``msgpack`` and decoded with ``struct``/numpy here, the JSON read with ``json``, resolutions
from gemmi.
"""
from __future__ import annotations

import json
import math
import struct
from pathlib import Path

import gemmi
import msgpack
import numpy as np
import pytest
from conftest import DIALS_EXPT, DIALS_REFL

from streamvi.errors import ConfigError, InputError
from streamvi.merging.features import METADATA_COLUMNS, reflection_metadata
from streamvi.sources import Rejected, load_source
from streamvi.wire import ROW_REASONS, CrystalMessage, decode_crystal, encode_crystal
from streamvi_dials import (
    DialsSource,
    beam_frame_rotation,
    inspect_dials,
    read_experiments,
    read_reflection_table,
)

REFL = DIALS_REFL     # MIT, carried in tests/data
EXPT = DIALS_EXPT
HC = 12398.419843320026  # eV·Å
PER_EXPERIMENT = [186, 201, 115]


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def raw() -> list:
    """The .refl as plain msgpack: ["dials::af::reflection_table", 1, {...}]."""
    return msgpack.unpackb(REFL.read_bytes(), raw=False, strict_map_key=False)


@pytest.fixture(scope="module")
def expt_doc() -> dict:
    return json.loads(EXPT.read_text())


@pytest.fixture(scope="module")
def items() -> list:
    return list(DialsSource(REFL))


def raw_column(raw: list, name: str, fmt: str) -> np.ndarray:
    """Decode a column with struct (independent of the reader's dtype table)."""
    n, blob = raw[2]["data"][name][1]
    size = struct.calcsize(fmt)
    return np.array([struct.unpack_from(fmt, blob, i * size) for i in range(n)])


def write_table(tmp_path: Path, raw: list, name: str = "broken.refl", *,
                expt: dict | None = None) -> Path:
    """A copy of the table (and of the .expt beside it) after a test has altered it."""
    out = tmp_path / name
    out.write_bytes(msgpack.packb(raw, use_bin_type=True))
    doc = expt if expt is not None else json.loads(EXPT.read_text())
    out.with_suffix(".expt").write_text(json.dumps(doc))
    return out


def copy_raw(raw: list) -> list:
    return [raw[0], raw[1], {"identifiers": dict(raw[2]["identifiers"]),
                             "nrows": raw[2]["nrows"],
                             "data": {k: [v[0], list(v[1])] for k, v in raw[2]["data"].items()}}]


def set_column(raw: list, name: str, values: np.ndarray, type_name: str | None = None) -> None:
    type_name = type_name or raw[2]["data"][name][0]
    raw[2]["data"][name] = [type_name, [len(values), np.ascontiguousarray(values).tobytes()]]


def messages(items: list) -> list[CrystalMessage]:
    return [m for m in items if isinstance(m, CrystalMessage)]


def rejected(items: list) -> list[Rejected]:
    return [r for r in items if isinstance(r, Rejected)]


# ----------------------------------------------------------------------------- refl


def test_table_header_and_column_types():
    table = read_reflection_table(REFL)
    assert (table.version, table.nrows, table.identifiers) == (1, 502, {})
    assert len(table) == 29 and table.skipped == {} and table.bad_columns == {}
    assert table.types["miller_index"] == "cctbx::miller::index<>"
    assert table.types["bbox"] == "int6"
    shapes = {name: (str(a.dtype), a.shape) for name, a in table.items()}
    assert shapes["miller_index"] == ("int32", (502, 3))
    assert shapes["bbox"] == ("int32", (502, 6))
    assert shapes["xyzcal.px"] == ("float64", (502, 3))
    assert shapes["flags"] == ("uint64", (502,))
    assert shapes["id"] == ("int32", (502,))
    assert shapes["entering"] == ("bool", (502,))
    assert shapes["intensity.sum.value"] == ("float64", (502,))


def test_table_values_match_struct_decoding(raw):
    table = read_reflection_table(REFL)
    assert table["miller_index"][0].tolist() == [-37, -4, 18]
    assert table["miller_index"][501].tolist() == [45, -8, 25]
    assert table["intensity.sum.value"][0] == 100.0531005859375
    assert table["intensity.sum.variance"][0] == 1399.347412109375
    assert table["flags"][0] == 257 and table["panel"][0] == 4
    assert table["bbox"][0].tolist() == [25, 38, 22, 35, 0, 1]
    for name, fmt in (("miller_index", "<3i"), ("intensity.sum.value", "<d"),
                      ("flags", "<Q"), ("id", "<i"), ("xyzcal.px", "<3d"), ("bbox", "<6i"),
                      ("partiality", "<d"), ("background.mean", "<d")):
        expected = raw_column(raw, name, fmt).reshape(table[name].shape)
        np.testing.assert_array_equal(table[name], expected, err_msg=name)
    assert np.bincount(table["id"]).tolist() == PER_EXPERIMENT


def test_all_502_rows_are_summation_integrated(raw):
    flags = raw_column(raw, "flags", "<Q").astype(np.uint64)
    assert int(((flags & np.uint64(1 << 8)) != 0).sum()) == 502   # integrated_sum
    assert int(((flags & np.uint64(1 << 9)) != 0).sum()) == 0     # integrated_prf
    assert "intensity.prf.value" not in raw[2]["data"]


def test_unknown_and_pixel_types_are_skipped_by_name(tmp_path, raw):
    broken = copy_raw(raw)
    broken[2]["data"]["shoebox"] = ["Shoebox<>", [502, b"\x00" * 10]]
    broken[2]["data"]["mystery"] = ["quaternion<float>", [502, b"\x00" * 8032]]
    table = read_reflection_table(write_table(tmp_path, broken))
    assert table.skipped == {"shoebox": "Shoebox<>", "mystery": "quaternion<float>"}
    assert "shoebox" not in table and len(table) == 29


def test_selected_columns_only():
    table = read_reflection_table(REFL, columns=["id", "miller_index"])
    assert sorted(table) == ["id", "miller_index"]
    assert len(table.types) == 29 and table.types["s1"] == "vec3<double>"


# ----------------------------------------------------------------------------- refl, broken


def test_truncated_table_strict_raises_with_file_and_offset(tmp_path):
    cut = tmp_path / "cut.refl"
    cut.write_bytes(REFL.read_bytes()[:100_000])
    with pytest.raises(InputError) as err:
        read_reflection_table(cut)
    assert err.value.reason == "malformed_reflection_table"
    assert str(err.value).startswith(f"{cut}: the file ends at byte 100000, inside the table "
                                     "(from byte ")


def test_truncated_table_keeps_the_columns_before_the_cut(tmp_path, raw):
    data = REFL.read_bytes()
    # Cut inside 'panel', the first column after everything a message needs.
    cut_at = data.index(b"panel") + 40
    cut = tmp_path / "cut.refl"
    cut.write_bytes(data[:cut_at])
    cut.with_suffix(".expt").write_bytes(EXPT.read_bytes())
    table = read_reflection_table(cut, strict=False)
    assert sorted(table)[-1] == "num_pixels.valid" and "panel" not in table
    assert list(table.bad_columns) == ["panel"]
    start = data.index(b"panel") - 1  # the column starts at its name (1-byte str header)
    out = list(DialsSource(cut))
    assert [(r.position, r.reason) for r in rejected(out)] == [
        ("column 'panel'", "malformed_reflection_table"),
        (f"byte {start}", "malformed_reflection_table")]
    assert rejected(out)[0].detail == (f"column 'panel' is cut short: the file ends inside it "
                                       f"(it starts at byte {start}); the column is skipped")
    assert [len(m) for m in messages(out)] == PER_EXPERIMENT
    assert all(m.panel is None and m.fs is None for m in messages(out))


def test_wrong_nrows(tmp_path, raw):
    broken = copy_raw(raw)
    broken[2]["nrows"] = 500
    path = write_table(tmp_path, broken)
    with pytest.raises(InputError) as err:
        read_reflection_table(path)
    assert err.value.reason == "malformed_reflection_table"
    assert str(err.value) == (
        f"{path}: the header says nrows = 500 but column 'background.dispersion' has 502, "
        "'background.mean' has 502, 'background.mse' has 502 (and 26 more columns) rows; the "
        "table is inconsistent — write it again")
    out = list(DialsSource(path))
    assert [(r.position, r.reason) for r in rejected(out)] == [
        ("header 'nrows'", "malformed_reflection_table")]
    assert "header 'nrows' is 500 but every column holds 502 rows" in rejected(out)[0].detail
    assert [len(m) for m in messages(out)] == PER_EXPERIMENT


def test_column_of_wrong_length(tmp_path, raw):
    broken = copy_raw(raw)
    n, blob = broken[2]["data"]["bbox"][1]
    broken[2]["data"]["bbox"][1] = [n, blob[:-24]]         # bytes short of 502 rows
    set_column(broken, "d", raw_column(raw, "d", "<d")[:501])  # 501 self-consistent rows
    path = write_table(tmp_path, broken)
    with pytest.raises(InputError) as err:
        read_reflection_table(path)
    assert err.value.key == "bbox"
    assert "column 'bbox' (int6, byte" in str(err.value)
    assert "says 502 rows but holds 12024 bytes, not 502 × 24" in str(err.value)
    table = read_reflection_table(path, strict=False)
    assert sorted(table.bad_columns) == ["bbox", "d"] and "d" not in table
    assert table.bad_columns["d"] == "column 'd' has 501 rows, the header says nrows = 502"
    # The source reads only the columns messages are made of: bbox and d go unchecked.
    assert not rejected(list(DialsSource(path)))
    set_column(broken, "background.mean", raw_column(raw, "background.mean", "<d")[:501])
    n, blob = broken[2]["data"]["xyzcal.px"][1]
    broken[2]["data"]["xyzcal.px"][1] = [n, blob[:-1]]
    out = list(DialsSource(write_table(tmp_path, broken)))
    assert sorted(r.position for r in rejected(out)) == ["column 'background.mean'",
                                                         "column 'xyzcal.px'"]
    assert [len(m) for m in messages(out)] == PER_EXPERIMENT
    # fs/ss fall back to the observed centroids; no background column is sent.
    xyzobs = raw_column(raw, "xyzobs.px.value", "<3d")
    np.testing.assert_array_equal(messages(out)[0].fs, xyzobs[:186, 0].astype(np.float32))
    assert all(m.background is None for m in messages(out))


def test_damaged_needed_column_rejects_the_table(tmp_path, raw):
    broken = copy_raw(raw)
    n, blob = broken[2]["data"]["intensity.sum.variance"][1]
    broken[2]["data"]["intensity.sum.variance"][1] = [n, blob[:-1]]
    out = list(DialsSource(write_table(tmp_path, broken)))
    assert not messages(out)
    assert [(r.position, r.reason) for r in rejected(out)] == [
        ("column 'intensity.sum.variance'", "malformed_reflection_table"),
        ("column 'intensity.sum.variance'", "malformed_reflection_table")]
    assert "which every message needs" in rejected(out)[1].detail


@pytest.mark.parametrize("content, message", [
    (b"", "the file ends at byte 0, before the table header is complete"),
    (b"\x80\x02}q\x00.", "pickled reflection table (DIALS < 2.0)"),
    (msgpack.packb(["something else", 1, {}]), "starts with 'something else' in an array of 3"),
    (msgpack.packb(["dials::af::reflection_table", 9, {}]), "format version 9 is not one of 1, 2"),
    (msgpack.packb(["dials::af::reflection_table", 2, {"nrows": 0}]), "has no 'data' map"),
])
def test_not_a_table(tmp_path, content, message):
    path = tmp_path / "x.refl"
    path.write_bytes(content)
    with pytest.raises(InputError) as err:
        read_reflection_table(path, strict=False)
    assert err.value.reason == "malformed_reflection_table"
    assert str(err.value).startswith(f"{path}: ") and message in str(err.value)
    path.with_suffix(".expt").write_bytes(EXPT.read_bytes())
    (rec,) = list(DialsSource(path))
    assert (rec.source, rec.position, rec.reason) == (str(path), "file",
                                                      "malformed_reflection_table")


# ----------------------------------------------------------------------------- expt


def test_experiments(expt_doc):
    exps = read_experiments(EXPT)
    assert [e.index for e in exps] == [0, 1, 2]
    assert all(e.error is None and e.problems == [] for e in exps)
    e0 = exps[0]
    assert e0.identifier == "" and e0.wavelength_A == 1.27130570248
    assert e0.photon_energy_eV == pytest.approx(HC / 1.27130570248, rel=1e-15)
    assert e0.beam_direction.tolist() == [0.0, 0.0, 1.0]
    assert e0.s0.tolist() == [0.0, 0.0, -1 / 1.27130570248]
    assert e0.image_path.endswith("idx-20130301054738747.cbf") and e0.image_index is None
    assert (e0.space_group.xhm(), e0.space_group.number) == ("P 61 2 2", 178)
    assert e0.hall_symbol == " P 61 2 (x,y,z+5/12)"
    assert e0.half_mosaicity_deg == 0.0036964542846441065
    assert e0.domain_size_A == 7651.268369029506
    # Cell from the metric tensor G = R Rᵀ (independent of the reader's vector angles).
    for e, crystal in zip(exps, expt_doc["crystal"]):
        r = np.array([crystal[f"real_space_{x}"] for x in "abc"])
        g = r @ r.T
        a, b, c = np.sqrt(np.diag(g))
        cell = (a, b, c, math.degrees(math.acos(g[1, 2] / (b * c))),
                math.degrees(math.acos(g[0, 2] / (a * c))),
                math.degrees(math.acos(g[0, 1] / (a * b))))
        assert e.cell == pytest.approx(cell, rel=1e-12)
        np.testing.assert_allclose(r @ e.A, np.eye(3), atol=1e-14)  # a_i · a*_j = δ_ij
    assert exps[0].cell[:3] == pytest.approx((93.32637, 93.32637, 130.85938), abs=1e-5)


def test_detector_hierarchy_gives_lab_frame_panels(raw):
    """A reflection's lab position on its panel lies along its s1 (both DIALS' frame)."""
    exps = read_experiments(EXPT)
    assert len(exps[0].panels) == 64
    p0 = exps[0].panels[0]
    assert (p0.name, p0.pixel_size, p0.image_size) == ("ARRAY_D0Q0S0A0", (0.10992, 0.10992),
                                                       (194, 185))
    mm = raw_column(raw, "xyzcal.mm", "<3d")
    s1 = raw_column(raw, "s1", "<3d")
    panel = raw_column(raw, "panel", "<Q")[:, 0]
    ids = raw_column(raw, "id", "<i")[:, 0]
    worst = 0.0
    for i in range(502):
        p = exps[ids[i]].panels[panel[i]]
        lab = p.lab_position(mm[i:i + 1, 0], mm[i:i + 1, 1])[0]
        worst = max(worst, float(np.linalg.norm(lab / np.linalg.norm(lab)
                                                - s1[i] / np.linalg.norm(s1[i]))))
    assert worst < 1e-12


def test_experiment_without_crystal_is_rejected_alone(tmp_path, expt_doc, raw):
    doc = json.loads(json.dumps(expt_doc))
    del doc["experiment"][1]["crystal"]
    path = write_table(tmp_path, raw, expt=doc)
    exps = read_experiments(path.with_suffix(".expt"))
    assert exps[1].error.reason == "missing_crystal" and exps[1].cell is None
    assert exps[0].error is None and exps[2].error is None
    out = list(DialsSource(path))
    assert [len(m) for m in messages(out)] == [186, 115]
    (rec,) = rejected(out)
    assert (rec.source, rec.position, rec.reason) == (str(path.with_suffix(".expt")),
                                                      "experiment 1", "missing_crystal")
    assert rec.detail == (f"{path.with_suffix('.expt')}: experiment 1 has no crystal; it was "
                          "not indexed — nothing to merge; its 201 integrated reflections "
                          "are skipped")


def test_unreadable_experiment_list(tmp_path, raw):
    path = write_table(tmp_path, raw)
    path.with_suffix(".expt").write_bytes(EXPT.read_bytes()[:5000])
    with pytest.raises(InputError) as err:
        read_experiments(path.with_suffix(".expt"))
    assert err.value.reason == "malformed_experiment_list"
    (rec,) = list(DialsSource(path))
    assert (rec.position, rec.reason) == ("file", "malformed_experiment_list")
    assert rec.detail.endswith("the reflections need its cells and wavelengths")


# ----------------------------------------------------------------------------- source


def test_source_counts_and_identity(items):
    msgs = messages(items)
    assert not rejected(items)
    assert [len(m) for m in msgs] == PER_EXPERIMENT and sum(map(len, msgs)) == 502
    assert [m.key for m in msgs] == [("thermolysin_3stills", f"thermolysin_3stills.refl#{i}", 0)
                                     for i in range(3)]
    assert all(m.rows_rejected == {} for m in msgs)
    assert [m.metadata["dials_experiment"] for m in msgs] == [0, 1, 2]
    assert {m.metadata["dials_intensity"] for m in msgs} == {"sum"}
    assert {m.metadata["dials_space_group"] for m in msgs} == {"P 61 2 2"}


def test_counts_attribute_and_entry_point():
    source = DialsSource(EXPT)  # the .expt names the pair too
    assert source.refl_path == REFL and source.expt_path == EXPT
    list(source)
    c = source.counts
    assert (c.experiments, c.rows, c.unindexed, c.reflections, c.messages) == (3, 502, 0, 502, 3)
    assert source.intensity_kind == "sum"
    assert load_source("dials") is DialsSource


def test_every_message_is_valid_on_the_wire(items):
    for m in messages(items):
        back = decode_crystal(encode_crystal(m))
        assert back.rows_rejected == {} and len(back) == len(m)
        np.testing.assert_array_equal(back.I, m.I)
        assert back.metadata["dials_partiality"]["shape"] == [len(m)]
        assert (back.panel_names, back.astar, back.cell) == (m.panel_names, m.astar, m.cell)


def test_message_rows_equal_the_raw_columns(items, raw):
    ids = raw_column(raw, "id", "<i")[:, 0]
    hkl = raw_column(raw, "miller_index", "<3i")
    iobs = raw_column(raw, "intensity.sum.value", "<d")[:, 0]
    var = raw_column(raw, "intensity.sum.variance", "<d")[:, 0]
    xyz = raw_column(raw, "xyzcal.px", "<3d")
    bg = raw_column(raw, "background.mean", "<d")[:, 0]
    part = raw_column(raw, "partiality", "<d")[:, 0]
    panel = raw_column(raw, "panel", "<Q")[:, 0]
    names = [p["name"] for p in json.loads(EXPT.read_text())["detector"][0]["panels"]]
    for i, m in enumerate(messages(items)):
        rows = ids == i
        np.testing.assert_array_equal(m.hkl(), hkl[rows])
        np.testing.assert_array_equal(m.I, iobs[rows].astype(np.float32))
        np.testing.assert_array_equal(m.sigI, np.sqrt(var[rows]).astype(np.float32))
        np.testing.assert_array_equal(m.fs, xyz[rows, 0].astype(np.float32))
        np.testing.assert_array_equal(m.ss, xyz[rows, 1].astype(np.float32))
        np.testing.assert_array_equal(m.background, bg[rows].astype(np.float32))
        assert [m.panel_names[j] for j in m.panel] == [names[p] for p in panel[rows]]
        assert np.frombuffer(m.metadata["dials_partiality"]["data"], "<f4").tolist() == \
            part[rows].astype(np.float32).tolist()
    m0 = messages(items)[0]
    assert (m0.h[0], m0.k[0], m0.l[0], float(m0.I[0])) == (-37, -4, 18, 100.0531005859375)
    assert float(m0.sigI[0]) == pytest.approx(math.sqrt(1399.347412109375), rel=1e-7)


def test_wavelength_and_energy(items, expt_doc):
    for m, beam in zip(messages(items), expt_doc["beam"]):
        assert m.photon_energy_eV == HC / beam["wavelength"]
        assert m.wavelength_A == pytest.approx(beam["wavelength"], rel=1e-15)
    assert [round(m.photon_energy_eV, 4) for m in messages(items)] == [9752.5086, 9749.5335,
                                                                        9749.3179]


def test_d_from_cell_orientation_and_table_agree(items, raw):
    ids = raw_column(raw, "id", "<i")[:, 0]
    d_table = raw_column(raw, "d", "<d")[:, 0]
    for i, m in enumerate(messages(items)):
        cell = gemmi.UnitCell(*m.cell)
        d_cell = np.array([cell.calculate_d([int(h), int(k), int(l)])
                           for h, k, l in m.hkl()])
        q = m.hkl() @ np.array([m.astar, m.bstar, m.cstar])
        d_orient = 1 / np.linalg.norm(q, axis=1)
        np.testing.assert_allclose(d_orient, d_cell, rtol=1e-12)
        np.testing.assert_allclose(d_orient, d_table[ids == i], rtol=1e-12)


def test_ewald_offset_in_message_frame_equals_dials(items, raw, expt_doc):
    """features.py (beam along +z) must see DIALS' |s0 + A·h| − 1/λ (beam along −z)."""
    ids = raw_column(raw, "id", "<i")[:, 0]
    hkl = raw_column(raw, "miller_index", "<3i").astype(np.float64)
    col = METADATA_COLUMNS.index("ewald_offset")
    for i, m in enumerate(messages(items)):
        crystal, beam = expt_doc["crystal"][i], expt_doc["beam"][i]
        a_matrix = np.linalg.inv(np.array([crystal[f"real_space_{x}"] for x in "abc"]))
        s0 = -np.array(beam["direction"]) / beam["wavelength"]
        s1 = s0 + hkl[ids == i] @ a_matrix.T
        offset = np.linalg.norm(s1, axis=1) - 1 / beam["wavelength"]
        np.testing.assert_allclose(reflection_metadata(m)[:, col], offset, atol=2e-7)
        assert np.abs(offset).max() < 2e-3  # stills: every spot is close to the sphere
        # the message frame: the 180° turn about y
        np.testing.assert_allclose(m.astar, [-a_matrix[0, 0], a_matrix[1, 0], -a_matrix[2, 0]],
                                   rtol=1e-15)


def test_beam_frame_rotation():
    np.testing.assert_array_equal(beam_frame_rotation(np.array([0.0, 0.0, -1.0])),
                                  np.diag([-1.0, 1.0, -1.0]))
    np.testing.assert_array_equal(beam_frame_rotation(np.array([0.0, 0.0, 1.0])), np.eye(3))
    tilted = np.array([0.01, -0.02, -1.0])
    r = beam_frame_rotation(tilted)
    np.testing.assert_allclose(r @ (tilted / np.linalg.norm(tilted)), [0, 0, 1], atol=1e-15)
    np.testing.assert_allclose(r @ r.T, np.eye(3), atol=1e-15)
    assert np.linalg.det(r) == pytest.approx(1.0, abs=1e-15)


def test_bad_rows_dropped_and_counted_with_wire_labels(tmp_path, raw):
    broken = copy_raw(raw)
    var = raw_column(raw, "intensity.sum.variance", "<d")[:, 0].copy()
    iobs = raw_column(raw, "intensity.sum.value", "<d")[:, 0].copy()
    hkl = raw_column(raw, "miller_index", "<3i").astype(np.int32)
    var[[0, 1]] = (0.0, -3.0)
    iobs[2] = np.nan
    hkl[3] = 0
    set_column(broken, "intensity.sum.variance", var)
    set_column(broken, "intensity.sum.value", iobs)
    set_column(broken, "miller_index", hkl)
    source = DialsSource(write_table(tmp_path, broken))
    msgs = messages(list(source))
    assert msgs[0].rows_rejected == {"nonpositive_sigma": 2, "nonfinite_intensity": 1,
                                     "zero_miller": 1}
    assert set(msgs[0].rows_rejected) <= set(ROW_REASONS)
    assert [len(m) for m in msgs] == [182, 201, 115]
    assert source.counts.rows_rejected == msgs[0].rows_rejected
    assert msgs[0].metadata["dials_partiality"]["shape"] == [182]
    assert decode_crystal(encode_crystal(msgs[0])).rows_rejected == {}
    assert (msgs[0].h[0], msgs[0].k[0], msgs[0].l[0]) == tuple(hkl[4])


def test_flags_and_min_partiality_select_rows(tmp_path, raw):
    broken = copy_raw(raw)
    flags = raw_column(raw, "flags", "<Q")[:, 0].astype(np.uint64)
    flags[:10] &= ~np.uint64(1 << 8)  # no longer integrated_sum
    part = raw_column(raw, "partiality", "<d")[:, 0].copy()
    part[10:15] = 0.25
    set_column(broken, "flags", flags)
    set_column(broken, "partiality", part)
    path = write_table(tmp_path, broken)
    assert [len(m) for m in messages(list(DialsSource(path)))] == [176, 201, 115]
    source = DialsSource(path, min_partiality=0.5)
    assert [len(m) for m in messages(list(source))] == [171, 201, 115]
    assert (source.counts.reflections, source.counts.below_min_partiality) == (492, 5)


def test_intensity_choice():
    out = list(DialsSource(REFL, intensity="profile"))
    (rec,) = out
    assert (rec.position, rec.reason) == ("column 'intensity.prf.value'", "missing_column")
    assert "use intensity='sum'" in rec.detail
    assert [len(m) for m in messages(list(DialsSource(REFL, intensity="sum")))] == PER_EXPERIMENT
    with pytest.raises(ConfigError, match="intensity='prf'; use one of auto, profile, sum"):
        DialsSource(REFL, intensity="prf")
    with pytest.raises(ConfigError, match="min_partiality=1.5 is not in"):
        DialsSource(REFL, min_partiality=1.5)


def test_profile_intensities_when_the_table_has_them(tmp_path, raw):
    broken = copy_raw(raw)
    flags = raw_column(raw, "flags", "<Q")[:, 0].astype(np.uint64)
    flags[::2] |= np.uint64(1 << 9)  # every other row profile-fitted
    set_column(broken, "flags", flags)
    iobs = raw_column(raw, "intensity.sum.value", "<d")[:, 0]
    set_column(broken, "intensity.prf.value", 2 * iobs, "double")
    set_column(broken, "intensity.prf.variance", np.full(502, 4.0), "double")
    path = write_table(tmp_path, broken)
    source = DialsSource(path)  # auto
    msgs = messages(list(source))
    assert source.intensity_kind == "profile"
    assert [len(m) for m in msgs] == [93, 101, 57]
    np.testing.assert_array_equal(msgs[0].I, (2 * iobs[:186:2]).astype(np.float32))
    assert set(msgs[0].sigI.tolist()) == {2.0}
    assert [len(m) for m in messages(list(DialsSource(path, intensity="sum")))] == PER_EXPERIMENT


def test_identifiers_pair_rows_with_experiments(tmp_path, raw, expt_doc):
    broken = copy_raw(raw)
    broken[2]["identifiers"] = {0: "x0", 1: "x1", 2: "x2"}
    doc = json.loads(json.dumps(expt_doc))
    for entry, ident in zip(doc["experiment"], ("x2", "x0", "x1")):
        entry["identifier"] = ident
    msgs = messages(list(DialsSource(write_table(tmp_path, broken, expt=doc))))
    assert [(m.image, m.metadata["dials_experiment"], len(m)) for m in msgs] == [
        ("broken.refl#x2", 0, 115), ("broken.refl#x0", 1, 186), ("broken.refl#x1", 2, 201)]


def test_rows_of_unknown_experiments(tmp_path, raw):
    broken = copy_raw(raw)
    ids = raw_column(raw, "id", "<i")[:, 0].astype(np.int32)
    ids[:4] = 7
    ids[4] = -1
    set_column(broken, "id", ids)
    source = DialsSource(write_table(tmp_path, broken))
    out = list(source)
    (rec,) = rejected(out)
    assert (rec.position, rec.reason) == ("column 'id'", "unknown_experiment")
    assert rec.detail.startswith("4 integrated rows have experiment ids [7] that broken.expt")
    assert [len(m) for m in messages(out)] == [181, 201, 115]
    assert source.counts.unindexed == 1


# ----------------------------------------------------------------------------- inspect


def test_inspect_dials():
    summary = inspect_dials(REFL)
    json.dumps(summary)
    assert {k: summary[k] for k in ("images", "crystals", "rows", "reflections", "messages",
                                    "space_group", "malformed", "intensity")} == {
        "images": 3, "crystals": 3, "rows": 502, "reflections": 502, "messages": 3,
        "space_group": "P 61 2 2", "malformed": 0, "intensity": "sum"}
    assert summary["cell"]["mean"]["a"] == pytest.approx(93.204987, abs=1e-6)
    assert summary["cell"]["std"]["c"] == pytest.approx(0.120462, abs=1e-6)
    assert summary["photon_energy_eV"]["min"] == pytest.approx(9749.317854, abs=1e-6)
    assert summary["photon_energy_eV"]["max"] == pytest.approx(9752.508637, abs=1e-6)
    assert summary["reflection_d_A"] == pytest.approx({"min": 1.7234381, "max": 19.8751287},
                                                      abs=1e-7)
    assert summary["table"]["version"] == 1 and len(summary["table"]["columns"]) == 29
    assert summary["rejected"] == {"count": 0, "by_reason": {}, "first": []}


def test_inspect_counts_malformed_pieces(tmp_path, raw, expt_doc):
    doc = json.loads(json.dumps(expt_doc))
    del doc["experiment"][2]["crystal"]
    summary = inspect_dials(write_table(tmp_path, raw, expt=doc))
    assert (summary["images"], summary["crystals"], summary["messages"]) == (3, 2, 2)
    assert summary["reflections"] == 387 and summary["malformed"] == 1
    assert summary["rejected"]["by_reason"] == {"missing_crystal": 1}
