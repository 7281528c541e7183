"""CrystFEL stream reader: real files, unit conversions, incremental feeding, broken input."""
from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import LCLS_STREAM, PAL_STREAM, requires_lcls
from hypothesis import given, settings
from hypothesis import strategies as st

from streamvi.sources import Rejected, load_source
from streamvi.wire import CrystalMessage
from streamvi_crystfel import (
    CrystfelSource,
    StreamParser,
    inspect_stream,
    parse_table,
    read_header,
    read_stream,
)
from streamvi_crystfel.panels import PanelIndex
from streamvi_crystfel.table import TableError, _decode_fixed, _parse_general, parse_tables

LCLS = LCLS_STREAM    # GPL-3.0, from ../shared/data: tests that read it skip where absent
PAL = PAL_STREAM      # MIT, carried in tests/data


def _parse_all(text: bytes, run: str = "r", source: str = "s") -> tuple[list, StreamParser]:
    parser = StreamParser(run, source=source)
    items = parser.feed(text) + parser.close()
    return items, parser


def _messages(items: list) -> list[CrystalMessage]:
    return [i for i in items if isinstance(i, CrystalMessage)]


def _rejected(items: list) -> list[Rejected]:
    return [i for i in items if isinstance(i, Rejected)]


def _at(text: bytes, offset: int) -> str:
    line = text.count(b"\n", 0, offset) + 1
    return f"byte {offset} (line {line})"


def _same(a: CrystalMessage, b: CrystalMessage) -> None:
    assert a.key == b.key
    assert a.cell == b.cell and a.astar == b.astar and a.metadata == b.metadata
    for name in ("h", "k", "l", "I", "sigI", "fs", "ss", "peak", "background", "panel"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
    assert a.panel_names == b.panel_names


# ----------------------------------------------------------------------------- real files


@requires_lcls
def test_lcls_counts():
    parser = StreamParser("5ht2b", source=str(LCLS))
    items = list(read_stream(LCLS, parser=parser))
    assert len(items) == 32 and all(isinstance(i, CrystalMessage) for i in items)
    c = parser.counts
    assert (c.chunks, c.crystals, c.reflections, c.messages) == (70, 32, 7966, 32)
    assert (c.indexed_chunks, c.chunks_without_crystals, c.crystals_without_reflections) == \
        (32, 38, 0)
    assert (c.malformed, c.rejected, c.rows_rejected) == (0, {}, {})
    assert parser.offset == 800844 == LCLS.stat().st_size
    assert parser.line == 12637
    assert sum(len(m) for m in items) == 7966
    assert len({m.image for m in items}) == 32


def test_pal_counts():
    items = list(read_stream(PAL))
    assert [len(m) for m in items] == [263, 102, 253]
    assert {m.run for m in items} == {"hewl_palxfel_3crystals"}


@requires_lcls
def test_first_lcls_crystal_against_file_text():
    msg = next(iter(read_stream(LCLS, run="run92")))
    assert msg.key == ("run92", "r0092-ab/data1/LCLS_2013_Mar22_r0092_035103_1824f.h5", 0)
    # "Cell parameters 6.13532 12.19726 16.88163 nm, 90.54524 91.23016 90.53769 deg"
    assert msg.cell == pytest.approx((61.3532, 121.9726, 168.8163, 90.54524, 91.23016,
                                      90.53769), rel=1e-12)
    # "astar = +0.0706577 -0.1444151 +0.0270631 nm^-1" and so on: nm⁻¹ → Å⁻¹ is / 10.
    assert msg.astar == pytest.approx((0.00706577, -0.01444151, 0.00270631), rel=1e-12)
    assert msg.bstar == pytest.approx((-0.00612585, -0.00381529, -0.00389182), rel=1e-12)
    assert msg.cstar == pytest.approx((0.00296121, 0.00034501, -0.00512061), rel=1e-12)
    assert msg.profile_radius == pytest.approx(0.000258, rel=1e-12)  # 0.00258 nm^-1
    assert msg.resolution_limit == pytest.approx(10 / 1.80, rel=1e-12)  # 1.80 nm^-1
    assert msg.photon_energy_eV == 9511.868397
    assert msg.beam_bandwidth == 1.0e-8
    assert msg.detector_distance_m == 0.152001
    assert msg.metadata == {
        "serial": 1, "indexed_by": "xgandalf-nolatt-cell", "beam_divergence_rad": 0.0,
        "lattice_type": "orthorhombic", "centering": "C", "unique_axis": "?",
        "final_residual": 3.289294e-07, "num_saturated_reflections": 0,
        "num_implausible_reflections": 0, "det_shift_mm": [0.022, -0.009],
        "hdf5/LCLS/detector0-EncoderValue": -429.99881,
        "hdf5/LCLS/photon_energy_eV": 9511.868397}
    assert len(msg) == 257
    # " -28   10    5     185.09     155.78     217.00      64.71  634.8 1057.6 q1a11"
    row0 = (msg.h[0], msg.k[0], msg.l[0], msg.I[0], msg.sigI[0], msg.peak[0],
            msg.background[0], msg.fs[0], msg.ss[0], msg.panel_names[msg.panel[0]])
    assert row0 == (-28, 10, 5, np.float32(185.09), np.float32(155.78), np.float32(217.0),
                    np.float32(64.71), np.float32(634.8), np.float32(1057.6), "q1a11")
    # "  25    9   34     188.34      90.75     169.00      71.46 1461.9 1093.9 q3a11"
    assert (msg.h[-1], msg.k[-1], msg.l[-1], msg.I[-1], msg.sigI[-1], msg.fs[-1],
            msg.ss[-1], msg.panel_names[msg.panel[-1]]) == (
        25, 9, 34, np.float32(188.34), np.float32(90.75), np.float32(1461.9),
        np.float32(1093.9), "q3a11")
    assert msg.I.dtype == np.float32 and msg.h.dtype == np.int32 and msg.panel.dtype == np.int16


def test_last_pal_crystal_against_file_text():
    msg = list(read_stream(PAL))[-1]
    assert msg.image.endswith("/0000337/data1/PAL_2019_Apr01_r0000_055428_42f.h5")
    assert msg.crystal == 0
    # "  38   -9    0     352.53      70.56      99.00      21.27  122.0 1094.7 p0"
    assert (msg.h[-1], msg.k[-1], msg.l[-1], msg.I[-1], msg.sigI[-1], msg.peak[-1],
            msg.background[-1], msg.fs[-1], msg.ss[-1]) == (
        38, -9, 0, np.float32(352.53), np.float32(70.56), np.float32(99.0),
        np.float32(21.27), np.float32(122.0), np.float32(1094.7))
    assert msg.panel_names == ["p0"] and not msg.panel.any()
    assert msg.photon_energy_eV == 9700.0 and msg.detector_distance_m == 0.149


@requires_lcls
def test_headers():
    lcls = read_header(LCLS)
    assert (lcls.format_version, lcls.crystfel_version) == ("2.3", "0.9.1+2c51b20e")
    assert lcls.command_line.startswith("/home/taw/crystfel-master/build/indexamajig -i ")
    assert lcls.indexing_methods == "xgandalf"
    assert lcls.target_cell == (61.40, 122.60, 168.00, 90.0, 90.0, 90.0)
    assert (lcls.lattice_type, lcls.centering, lcls.bravais_lattice) == \
        ("orthorhombic", "C", "oC")
    assert lcls.space_group is None
    assert (lcls.photon_energy_eV, lcls.photon_energy_key) == (None, "/LCLS/photon_energy_eV")
    assert lcls.geometry_text.startswith("adu_per_eV = 0.00105\n")
    assert lcls.n_bytes == 15452
    pal = read_header(PAL)
    assert pal.crystfel_version == "0.9.0" and pal.bravais_lattice == "tP"
    assert pal.target_cell == (79.20, 79.20, 38.00, 90.0, 90.0, 90.0)
    assert (pal.photon_energy_eV, pal.clen_m, pal.unique_axis) == (9700.0, 0.149, "c")


@requires_lcls
def test_source_entry_point_and_inspect():
    assert load_source("crystfel") is CrystfelSource
    source = CrystfelSource(PAL, run="hewl")
    assert [m.key[2] for m in source] == [0, 0, 0]
    assert source.parser.counts.reflections == 618
    summary = inspect_stream(LCLS)
    json.dumps(summary)
    assert (summary["images"], summary["indexed_images"], summary["crystals"],
            summary["reflections"], summary["malformed_chunks"]) == (70, 32, 32, 7966, 0)
    assert summary["target_cell"] == [61.4, 122.6, 168.0, 90.0, 90.0, 90.0]
    assert summary["crystfel_version"] == "0.9.1+2c51b20e"
    assert summary["photon_energy_eV"]["min"] == 9497.194563
    assert summary["photon_energy_eV"]["max"] == 9524.324769
    assert summary["resolution_limit_A"]["min"] == pytest.approx(10 / 2.66)
    assert summary["reflection_d_A"]["min"] == pytest.approx(1.9168287, rel=1e-6)
    assert summary["cell"]["mean"]["a"] == pytest.approx(61.526303125, rel=1e-12)
    pal = inspect_stream(PAL)
    assert (pal["images"], pal["crystals"], pal["reflections"]) == (3, 3, 618)


# ----------------------------------------------------------------------------- incremental


@requires_lcls
def test_random_pieces_give_the_same_result():
    text = LCLS.read_bytes()
    whole, ref = _parse_all(text)
    rng = np.random.default_rng(7)
    parser = StreamParser("r", source="s")
    items, pos, offsets = [], 0, []
    while pos < len(text):
        n = int(rng.integers(1, 3000))
        items += parser.feed(text[pos:pos + n])
        pos += n
        offsets.append(parser.offset)
    items += parser.close()
    assert len(items) == len(whole) == 32
    for a, b in zip(items, whole):
        _same(a, b)
    assert parser.counts == ref.counts and parser.offset == len(text)
    # The offset only ever stands at the end of the header or of a chunk.
    chunk_ends = {i + len(b"----- End chunk -----\n")
                  for i in range(len(text)) if text.startswith(b"----- End chunk -----", i)}
    assert set(offsets) <= chunk_ends | {0, 15452}


def test_byte_by_byte():
    text = PAL.read_bytes()
    whole, _ = _parse_all(text)
    parser = StreamParser("r", source="s")
    items = []
    for i in range(len(text)):
        got = parser.feed(text[i:i + 1])
        # A chunk is reported the moment its End line is complete, not before.
        if got:
            assert text[:i + 1].endswith(b"----- End chunk -----\n")
        items += got
    items += parser.close()
    assert [m.key for m in items] == [m.key for m in whole]
    for a, b in zip(items, whole):
        _same(a, b)


@requires_lcls
def test_resume_from_offset(tmp_path):
    text = LCLS.read_bytes()
    whole, _ = _parse_all(text)
    first = StreamParser("r", source="s")
    items = first.feed(text[:400_000])
    resumed = list(read_stream(LCLS, run="r", start_offset=first.offset))
    assert first.offset == 391_464 and text[:391_464].endswith(b"\n----- End chunk -----\n")
    assert len(items) + len(resumed) == 32
    for a, b in zip(items + resumed, whole):
        _same(a, b)
    # With the header handed over, positions continue in absolute bytes.
    second = StreamParser("r", source="s", header=first.header, start_offset=first.offset)
    rest = second.feed(text[first.offset:]) + second.close()
    assert [m.key for m in rest] == [m.key for m in resumed]
    assert second.offset == len(text) and second.line is None


def test_crlf_line_ends_read_the_same():
    text = PAL.read_bytes()
    whole, _ = _parse_all(text)
    crlf, parser = _parse_all(text.replace(b"\n", b"\r\n"))
    for a, b in zip(crlf, whole):
        _same(a, b)
    assert len(crlf) == 3 and parser.offset == len(text) + text.count(b"\n")


# ----------------------------------------------------------------------------- broken input


def _lcls_broken() -> dict[str, tuple[bytes, int]]:
    """Each breakage: (broken text, byte offset where the Rejected must point)."""
    text = LCLS.read_bytes()
    out = {}
    row = b" -13  -39  -22      45.43      99.45      96.00      48.46  818.1  672.2 q2a6\n"
    assert text.count(row) == 1  # crystal 1 (chunk 1)
    out["bad_reflection_row"] = (text.replace(row, row.replace(b"99.45", b"99.4#")),
                                 text.index(row))
    begins = [i for i in range(len(text)) if text.startswith(b"--- Begin crystal\n", i)]
    end = text.index(b"--- End crystal\n", begins[4])  # crystal 4 (chunk 7)
    out["unterminated_crystal"] = (text[:end] + text[end + 16:], end)
    cell = text.index(b"Cell parameters", begins[8])  # crystal 8 (chunk 14)
    out["missing_cell"] = (text[:cell] + text[text.index(b"\n", cell) + 1:], begins[8])
    table = text.index(b"Reflections measured after indexing\n", begins[31])
    cut = table + 400  # crystal 31 (chunk 62), a few rows into its table
    chunk = text.rindex(b"----- Begin chunk -----\n", 0, cut)
    out["truncated_chunk"] = (text[:cut], chunk)
    return out


BROKEN_COUNTS = {
    # reason: (chunks, crystals, reflections, messages)
    "bad_reflection_row": (70, 31, 7966 - 242, 31),
    "unterminated_crystal": (70, 31, 7966 - 166, 31),
    "missing_cell": (70, 31, 7966 - 1072, 31),
    "truncated_chunk": (63, 31, 7966 - 148, 31),
}


@requires_lcls
@pytest.mark.parametrize("reason", sorted(BROKEN_COUNTS))
def test_broken_chunk_is_rejected_and_the_rest_read(reason, tmp_path):
    text, at = _lcls_broken()[reason]
    path = tmp_path / "broken.stream"
    path.write_bytes(text)
    parser = StreamParser("r", source=str(path))
    items = list(read_stream(path, parser=parser, block_size=65536))
    rejected = _rejected(items)
    assert [(r.reason, r.position, r.source) for r in rejected] == [(reason, _at(text, at),
                                                                     str(path))]
    assert rejected[0].detail
    c = parser.counts
    assert (c.chunks, c.crystals, c.reflections, c.messages) == BROKEN_COUNTS[reason]
    assert c.malformed == 1 and c.rejected == {reason: 1}
    assert len(_messages(items)) == 31


@requires_lcls
def test_all_breakages_at_once(tmp_path):
    text = LCLS.read_bytes()
    broken = _lcls_broken()
    # Apply the edits from the end of the file backwards so earlier offsets stay valid.
    row = b" -13  -39  -22      45.43      99.45      96.00      48.46  818.1  672.2 q2a6\n"
    text = broken["truncated_chunk"][0]
    begins = [i for i in range(len(text)) if text.startswith(b"--- Begin crystal\n", i)]
    cell = text.index(b"Cell parameters", begins[8])
    text = text[:cell] + text[text.index(b"\n", cell) + 1:]
    end = text.index(b"--- End crystal\n", begins[4])
    text = text[:end] + text[end + 16:]
    text = text.replace(row, row.replace(b"99.45", b"99.4#"))
    path = tmp_path / "broken.stream"
    path.write_bytes(text)
    summary = inspect_stream(path)
    assert summary["rejected"]["by_reason"] == {"bad_reflection_row": 1,
                                                "unterminated_crystal": 1, "missing_cell": 1,
                                                "truncated_chunk": 1}
    assert (summary["images"], summary["crystals"], summary["reflections"],
            summary["messages"], summary["malformed_chunks"]) == (
        63, 28, 7966 - 242 - 166 - 1072 - 148, 28, 4)
    assert summary["images_without_crystals"] == 31
    first = summary["rejected"]["first"]
    assert [f["reason"] for f in first] == ["bad_reflection_row", "unterminated_crystal",
                                            "missing_cell", "truncated_chunk"]
    assert first[0]["position"] == _at(text, text.index(row.replace(b"99.45", b"99.4#")))


def test_cut_chunk_followed_by_more_data():
    text = PAL.read_bytes()
    c0, c1, c2 = (i for i in range(len(text)) if text.startswith(b"----- Begin chunk", i))
    # Chunk 1 breaks off 500 bytes in and chunk 2 follows; then, after another chunk cut
    # short, a second stream (header and all) is appended.
    part = text[:c1 + 500] + text[c2:]
    second = text[:c0].replace(b"0.9.0", b"0.10.2") + text[c0:].replace(
        b".h5\n", b".h5\nEvent: //1\n")
    broken = part + text[c0:c0 + 300] + second
    items, parser = _parse_all(broken)
    assert [(r.reason, r.position) for r in _rejected(items)] == [
        ("truncated_chunk", _at(broken, c1)), ("truncated_chunk", _at(broken, len(part)))]
    assert [m.image.rsplit("/", 1)[-1] for m in _messages(items)] == [
        "PAL_2019_Apr01_r0000_062014_e88.h5", "PAL_2019_Apr01_r0000_055428_42f.h5", "1", "1",
        "1"]
    assert [m.image.split("/")[-5] for m in _messages(items)[2:]] == [
        "PAL_2019_Apr01_r0000_062014_e88.h5", "PAL_2019_Apr01_r0000_061300_9bb.h5",
        "PAL_2019_Apr01_r0000_055428_42f.h5"]
    assert [h.crystfel_version for h in parser.headers] == ["0.9.0", "0.10.2"]
    assert parser.counts.chunks == 7 and parser.counts.malformed == 2


@requires_lcls
def test_reflection_count_mismatch():
    text = LCLS.read_bytes()
    row = b" -13  -39  -22      45.43      99.45      96.00      48.46  818.1  672.2 q2a6\n"
    broken = text.replace(row, b"")
    items, parser = _parse_all(broken)
    begin = broken.index(b"--- Begin crystal", broken.index(b"Image serial number: 2\n"))
    assert [(r.reason, r.position) for r in _rejected(items)] == [
        ("reflection_count_mismatch", _at(broken, begin))]
    assert parser.counts.messages == 31


@requires_lcls
def test_panels_numbered_as_in_the_geometry():
    parser = StreamParser("r")
    items = parser.feed(LCLS.read_bytes()) + parser.close()
    names = parser.header.panel_names
    assert len(names) == 64 and names[:3] == ["q0a0", "q0a1", "q0a2"] and names[-1] == "q3a15"
    assert all(m.panel_names == names for m in items)
    pal = _messages(_parse_all(PAL.read_bytes())[0])
    assert all(m.panel_names == ["p0"] for m in pal)


def test_no_integrated_reflections_and_energy_fallback():
    text = PAL.read_bytes()
    start = text.index(b"Reflections measured after indexing\n")
    stop = text.index(b"End of reflections\n") + len(b"End of reflections\n")
    text = text[:start] + b"No integrated reflections.\n" + text[stop:]
    # Without photon_energy_eV lines the geometry's "photon_energy = 9700" is used.
    lines = [ln for ln in text.split(b"\n") if not ln.startswith(b"photon_energy_eV = ")]
    items, parser = _parse_all(b"\n".join(lines))
    assert [(r.reason, r.position) for r in _rejected(items)] == [
        ("no_reflections", "byte 1952 (line 67)")]
    assert [m.photon_energy_eV for m in _messages(items)] == [9700.0, 9700.0]
    assert parser.counts.crystals_without_reflections == 1 and parser.counts.malformed == 0


@requires_lcls
def test_energy_from_named_image_header():
    text = LCLS.read_bytes()
    text = text.replace(b"\nphoton_energy_eV = 9511.868397\n", b"\n")
    msg = _messages(_parse_all(text)[0])[0]
    # The geometry says "photon_energy = /LCLS/photon_energy_eV".
    assert msg.photon_energy_eV == 9511.868397


def test_wire_validation_rejects_absurd_cell():
    text = PAL.read_bytes().replace(b"Cell parameters 7.93850 8.04039 3.85562 nm",
                                    b"Cell parameters 0.00850 8.04039 3.85562 nm")
    items, parser = _parse_all(text)
    assert [r.reason for r in _rejected(items)] == ["absurd_cell"]
    assert parser.counts.messages == 2 and parser.counts.malformed == 0


def test_concatenated_streams_and_events():
    text = PAL.read_bytes()
    items, parser = _parse_all(text + text)
    assert [r.reason for r in _rejected(items)] == ["duplicate_image"] * 3
    assert len(parser.headers) == 2
    with_event = text.replace(b"_e88.h5\n", b"_e88.h5\nEvent: //7\n")
    msg = _messages(_parse_all(with_event)[0])[0]
    assert msg.image.endswith("_e88.h5////7")


def test_stray_text_between_chunks():
    text = PAL.read_bytes()
    at = text.index(b"----- Begin chunk -----", 3000)
    broken = text[:at] + b"garbage line\n" + text[at:]
    items, parser = _parse_all(broken)
    assert [(r.reason, r.position) for r in _rejected(items)] == [
        ("stray_text", _at(broken, at))]
    assert parser.counts.messages == 3


# ----------------------------------------------------------------------------- tables


def _row(h, k, l, i, s, p, b, fs, ss, panel):
    return b"%4i %4i %4i %10.2f %10.2f %10.2f %10.2f %6.1f %6.1f %s\n" % (
        h, k, l, i, s, p, b, fs, ss, panel)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(
    st.integers(-999, 9999), st.integers(-999, 9999), st.integers(-99, 99),
    st.floats(-1e8, 1e9, allow_nan=False), st.floats(0, 1e6), st.floats(-1e4, 1e7),
    st.floats(-1e3, 1e5), st.floats(-10, 2e4), st.floats(-10, 2e4),
    st.sampled_from([b"p0", b"q0a10", b"panel_with_a_long_name"])), min_size=1, max_size=40))
def test_table_paths_agree_with_python_parsing(rows):
    text = b"".join(_row(*r) for r in rows)
    table = parse_table(text)
    tokens = [line.split() for line in text.splitlines()]
    assert table.h.tolist() == [int(t[0]) for t in tokens]
    assert table.l.tolist() == [int(t[2]) for t in tokens]
    for col, name in enumerate(("I", "sigI", "peak", "background", "fs", "ss"), start=3):
        assert getattr(table, name).tolist() == [float(t[col]) for t in tokens]
    assert [table.panel_names[p] for p in table.panel] == [t[9].decode() for t in tokens]
    general = _parse_general(text, True)
    for name in ("h", "k", "l", "I", "sigI", "peak", "background", "fs", "ss", "panel"):
        np.testing.assert_array_equal(getattr(table, name), getattr(general, name))


def test_fixed_width_path_taken_for_standard_rows():
    text = _row(-28, 10, 5, 185.09, 155.78, 217.0, 64.71, 634.8, 1057.6, b"q1a11") + \
        _row(3, -4, 0, -0.001, 1.0, 0.0, -3.0, 0.0, 9999.9, b"p0")
    decoded = _decode_fixed(text + bytes(100), len(text), PanelIndex(["p0"]))
    assert decoded is not None
    hkl, values, panel, ends = decoded
    assert hkl.tolist() == [[-28, 3], [10, -4], [5, 0]]
    assert values[0].tolist() == [185.09, -0.0] and panel.tolist() == [1, 0]
    assert np.signbit(values[0, 1])  # "-0.00" stays negative zero, as float() reads it
    for bad in (b"18 .09", b"18-.09", b"185-09", b"1-5.09", b"--5.09", b"185.0x"):
        broken = text.replace(b"185.09", bad)
        assert _decode_fixed(broken + bytes(100), len(broken), PanelIndex()) is None
    broken = text.replace(b"q1a11", b"q1 a1")
    assert _decode_fixed(broken + bytes(100), len(broken), PanelIndex()) is None


@requires_lcls
def test_batch_decoding_matches_one_by_one():
    text = LCLS.read_bytes()
    tables, pos = [], 0
    while (pos := text.find(b"panel\n", pos)) >= 0:
        stop = text.index(b"End of reflections\n", pos)
        tables.append(text[pos + 6:stop])
        pos = stop
    panels = PanelIndex()
    batch = parse_tables(tables, panels)
    assert sum(len(t) for t in batch) == 7966 and len(panels) == 64
    for text_, got in zip(tables, batch):
        one = _parse_general(text_, True, panels)
        for name in ("h", "k", "l", "I", "sigI", "peak", "background", "fs", "ss", "panel"):
            np.testing.assert_array_equal(getattr(got, name), getattr(one, name))
    tables[3] = tables[3].replace(b"\n", b" extra\n", 1)  # an 11th field in row 0
    batch = parse_tables(tables, panels)
    assert isinstance(batch[3], TableError) and batch[3].row == 0
    assert [len(batch[i]) for i in (2, 4, 5)] == [232, 166, 187]


@pytest.mark.parametrize("row, row_index, message", [
    (b"   1    2    3       1.00       1.00       1.00       1.00   10.0   10.0\n", 1,
     "9 fields"),
    (b"   1    2  3.5       1.00       1.00       1.00       1.00   10.0   10.0 p0\n", 1,
     "non-numeric"),
    (b"   1    2    3       nan?       1.00       1.00       1.00   10.0   10.0 p0\n", 1,
     "non-numeric"),
])
def test_table_errors_name_the_row(row, row_index, message):
    good = _row(1, 2, 3, 1.0, 1.0, 1.0, 1.0, 10.0, 10.0, b"p0")
    text = good + row + good
    with pytest.raises(TableError, match=message) as info:
        parse_table(text)
    assert (info.value.row, info.value.offset) == (row_index, len(good))


def test_format_2_2_tables_without_panel_column():
    text = PAL.read_bytes().replace(b"  ss/px panel\n", b"  ss/px\n").replace(b" p0\n", b"\n")
    items, parser = _parse_all(text)
    assert [len(m) for m in items] == [263, 102, 253]
    assert items[0].panel is None and items[0].h[0] == -37 and items[0].ss[0] == \
        np.float32(1025.9)


def test_nan_rows_are_dropped_by_wire_validation():
    text = PAL.read_bytes()
    row = b" -37   11   -7     -15.11      20.15      14.00       7.51   17.5 1025.9 p0\n"
    items, parser = _parse_all(text.replace(row, row.replace(b"    20.15", b"     -nan")))
    assert parser.counts.rows_rejected == {"nonfinite_intensity": 1}
    assert [len(m) for m in _messages(items)] == [262, 102, 253]
