"""The still-shot simulator (plugins/sim) and the CrystFEL stream writer."""
from __future__ import annotations

import dataclasses
import io
import math
import time

import gemmi
import numpy as np
import pytest
import reciprocalspaceship as rs

from streamvi.sources import load_source
from streamvi.wire import decode_crystal, encode_crystal
from streamvi_crystfel.writer import (StreamWriter, _ROW_FORMAT, format_reflections,
                                      lattice_of, write_stream)
from streamvi_sim import (SimulatedSource, SimulationConfig, Simulator, Truth, detector_of,
                          simulate_images, simulate_structure)
from streamvi_sim.geometry import (excitation_error, profile_width, random_rotation,
                                   reciprocal_basis)
from streamvi_sim.model import structure_factors, to_gemmi_structure
from streamvi_sim.truth import read_atoms

SMALL = SimulationConfig(n_images=12, seed=7, n_atoms=120, n_sulfur=4, n_iodide=2, dmin=2.5)


@pytest.fixture(scope="module")
def truth() -> Truth:
    return simulate_structure(SMALL)


@pytest.fixture(scope="module")
def simulator(truth: Truth) -> Simulator:
    return Simulator(SMALL, truth)


# ----------------------------------------------------------------------------- structure


def test_structure_factors_match_gemmi(truth: Truth) -> None:
    cell, sg = truth.gemmi_cell, truth.gemmi_space_group
    hkl = truth.hkl[::97]
    f_plus, f_minus = structure_factors(truth.atoms, cell=cell, space_group=sg, hkl=hkl,
                                        photon_energy_eV=None)
    st = to_gemmi_structure(truth.atoms, cell=cell, space_group=sg)
    st.setup_cell_images()
    calc = gemmi.StructureFactorCalculatorX(st.cell)
    ref = np.array([calc.calculate_sf_from_model(st[0], [int(x) for x in h]) for h in hkl])
    np.testing.assert_allclose(f_plus, ref, atol=1e-3 * np.abs(ref).mean())
    np.testing.assert_allclose(f_minus, np.conj(f_plus), atol=1e-9)


def test_friedel_pairs_differ_only_through_fpp(truth: Truth) -> None:
    flat = simulate_structure(dataclasses.replace(SMALL, anomalous=False))
    np.testing.assert_allclose(flat.F_plus, flat.F_minus, rtol=1e-10)
    np.testing.assert_allclose(flat.phi_plus, -flat.phi_minus, atol=1e-6)
    acentric = ~truth.centric
    rel = np.abs(truth.F_plus - truth.F_minus)[acentric] / truth.F_model[acentric]
    assert np.median(rel) > 0.005
    # f' alone keeps Friedel's law, and (F(+) + F(−)*)/2 is exactly F without f''.
    f_plus, f_minus = structure_factors(truth.atoms, cell=truth.gemmi_cell,
                                        space_group=truth.gemmi_space_group, hkl=truth.hkl,
                                        photon_energy_eV=SMALL.photon_energy_eV,
                                        include_fpp=False)
    np.testing.assert_allclose(np.abs(f_plus), np.abs(f_minus), rtol=1e-10)
    np.testing.assert_allclose(truth.F_model, np.abs(f_plus), rtol=1e-9)


def test_centric_reflections_have_equal_friedel_amplitudes(truth: Truth) -> None:
    centric = truth.centric
    assert centric.sum() > 50
    np.testing.assert_allclose(truth.F_plus[centric], truth.F_minus[centric], rtol=1e-9)


def test_truth_table_is_the_asu_without_absences(truth: Truth) -> None:
    asu = gemmi.ReciprocalAsu(truth.gemmi_space_group)
    ops = truth.gemmi_space_group.operations()
    assert all(asu.is_in([int(x) for x in h]) for h in truth.hkl[::50])
    assert not ops.systematic_absences(truth.hkl).any()
    assert truth.d.min() >= SMALL.dmin
    assert len(truth.sites()) == SMALL.n_sulfur + SMALL.n_iodide
    iodide = truth.site_frac("I")
    assert iodide.shape == (SMALL.n_iodide, 3) and truth.site_frac("S").shape[0] == SMALL.n_sulfur
    sites = truth.sites()
    np.testing.assert_array_equal(iodide, sites.frac[sites.elements == "I"])


def test_atoms_keep_their_distance(truth: Truth) -> None:
    st = to_gemmi_structure(truth.atoms, cell=truth.gemmi_cell,
                            space_group=truth.gemmi_space_group)
    st.setup_entities()
    ns = gemmi.NeighborSearch(st[0], st.cell, 5).populate()
    contacts = gemmi.ContactSearch(SMALL.min_atom_distance - 0.01)
    contacts.ignore = gemmi.ContactSearch.Ignore.Nothing
    assert len(contacts.find_contacts(ns)) == 0


def test_truth_mtz_round_trip(truth: Truth, tmp_path) -> None:
    path = tmp_path / "truth.mtz"
    truth.to_mtz(path)
    back = Truth.from_mtz(path)
    order = np.lexsort(truth.hkl.T)
    border = np.lexsort(back.hkl.T)
    np.testing.assert_array_equal(back.hkl[border], truth.hkl[order])
    for name in ("F_plus", "F_minus", "phi_plus", "phi_minus"):
        np.testing.assert_allclose(getattr(back, name)[border], getattr(truth, name)[order],
                                   rtol=1e-6, atol=1e-3)
    assert back.space_group == "P 43 21 2"
    np.testing.assert_allclose(back.cell, truth.cell, rtol=1e-6)

    mtz = gemmi.read_mtz_file(str(path))
    assert mtz.spacegroup.hm == "P 43 21 2"
    assert mtz.cell.approx(truth.gemmi_cell, 1e-4)
    types = {c.label: c.type for c in mtz.columns}
    assert types["FMODEL"] == "F" and types["PHIFMODEL"] == "P"
    assert types["F(+)"] == types["F(-)"] == "G"
    assert types["I(+)"] == types["I(-)"] == "K"
    ds = rs.read_mtz(str(path))
    assert ds.merged and len(ds) == len(truth)


def test_sites_pdb(truth: Truth, tmp_path) -> None:
    path = tmp_path / "sites.pdb"
    truth.write_sites(path)
    st = gemmi.read_structure(str(path))
    assert st.find_spacegroup().hm == "P 43 21 2"
    assert st.cell.approx(truth.gemmi_cell, 1e-3)
    sites = read_atoms(path)
    assert sorted(sites.elements.tolist()) == ["I"] * 2 + ["S"] * 4
    want = truth.sites()
    order_w, order_s = np.argsort(want.frac[:, 0]), np.argsort(sites.frac[:, 0])
    np.testing.assert_allclose(sites.frac[order_s] * SMALL.cell[:3],
                               want.frac[order_w] * SMALL.cell[:3], atol=2e-3)


# ----------------------------------------------------------------------------- images


def test_p1_lattice_maps_like_gemmi(simulator: Simulator, truth: Truth) -> None:
    sg = truth.gemmi_space_group
    asu, ops = gemmi.ReciprocalAsu(sg), sg.operations()
    rows = np.random.default_rng(0).choice(len(simulator.hkl), 300, replace=False)
    lookup = {tuple(h): i for i, h in enumerate(truth.hkl.tolist())}
    for r in rows:
        h_asu, isym = asu.to_asu([int(x) for x in simulator.hkl[r]], ops)
        assert lookup[tuple(h_asu)] == simulator.asu_index[r]
        # A centric reflection is both its own F(+) and F(−) (equal amplitudes).
        if not ops.is_reflection_centric(h_asu):
            assert (isym % 2 == 1) == (simulator.friedel[r] > 0)


def test_images_are_deterministic_and_independent(truth: Truth) -> None:
    first = list(simulate_images(SMALL, truth, start=0, stop=5))
    again = list(simulate_images(SMALL, truth, start=3, stop=5))
    for a, b in zip(first[3:], again):
        assert a.image == b.image
        for name in ("h", "k", "l", "I", "sigI", "fs", "ss"):
            np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
        assert a.astar == b.astar and a.photon_energy_eV == b.photon_energy_eV
    other = next(iter(simulate_images(dataclasses.replace(SMALL, seed=8), truth, stop=1)))
    assert len(other) != len(first[0]) or not np.array_equal(other.I, first[0].I)


def test_structure_is_deterministic() -> None:
    cfg = dataclasses.replace(SMALL, n_atoms=30, dmin=4.0)
    a, b = simulate_structure(cfg), simulate_structure(cfg)
    np.testing.assert_array_equal(a.F_plus, b.F_plus)
    np.testing.assert_array_equal(a.atoms.frac, b.atoms.frac)


def test_reflections_per_image_at_the_benchmark_setting() -> None:
    cfg = SimulationConfig(n_atoms=40, n_sulfur=2, n_iodide=1)
    counts = [len(m) for m in simulate_images(cfg, stop=30)]
    assert 650 < np.mean(counts) < 950


def test_kept_reflections_lie_near_the_ewald_sphere(simulator: Simulator) -> None:
    cfg = simulator.config
    reach = math.sqrt(2 * math.log(1 / cfg.partiality_min))
    for i in range(6):
        msg, truth = simulator.image(i)
        lam = 12398.419843320026 / truth.photon_energy_eV
        widest = profile_width(np.array([1 / cfg.dmin * 1.01]),
                               profile_radius=truth.profile_radius, wavelength=lam,
                               bandwidth=cfg.bandwidth,
                               mosaicity_rad=math.radians(cfg.mosaicity_deg))[0]
        assert np.all(np.abs(truth.excitation) <= reach * widest)
        assert np.all(truth.partiality >= cfg.partiality_min)
        assert np.abs(truth.excitation).max() < 3 * truth.profile_radius
        # The true excitation errors follow from the true orientation and indices.
        q = truth.hkl @ (truth.U @ reciprocal_basis(truth.cell)).T
        np.testing.assert_allclose(excitation_error(q, lam), truth.excitation, atol=1e-12)
        if not truth.misindexed:
            # The reported orientation is off by little: offsets stay within a few radii.
            astar = np.array([msg.astar, msg.bstar, msg.cstar]).T
            e_rep = excitation_error(msg.hkl() @ astar.T, msg.wavelength_A)
            assert np.abs(e_rep).max() < 4 * truth.profile_radius


def test_intensities_follow_the_model(simulator: Simulator) -> None:
    msg, truth = simulator.image(1)
    assert not truth.misindexed
    assert 0 < truth.partiality.min() and truth.partiality.max() <= 1
    strong = truth.expected_photons > 10 * np.median(truth.expected_photons)
    ratio = msg.I[strong] / truth.expected_photons[strong]
    assert 0.5 < np.median(ratio) < 1.5
    corr = np.corrcoef(msg.I[~truth.outlier], truth.expected_photons[~truth.outlier])[0, 1]
    assert corr > 0.5
    assert np.all(msg.sigI > 0)
    on = (msg.fs >= 0) & (msg.fs < SMALL.detector_shape[0]) & (msg.ss >= 0) \
        & (msg.ss < SMALL.detector_shape[1])
    assert on.all()


def test_misindexed_images_are_shifted_by_one(truth: Truth) -> None:
    sim = Simulator(dataclasses.replace(SMALL, misindexed_fraction=0.5), truth)
    flags = []
    for i in range(20):
        msg, t = sim.image(i)
        flags.append(t.misindexed)
        assert np.abs(t.index_shift).sum() == (1 if t.misindexed else 0)
        np.testing.assert_array_equal(msg.hkl(), t.hkl + t.index_shift)
    assert 4 <= sum(flags) <= 16


def test_outliers_are_large(truth: Truth) -> None:
    sim = Simulator(dataclasses.replace(SMALL, outlier_fraction=0.05), truth)
    msg, t = sim.image(2)
    assert t.outlier.sum() > 3
    z = (msg.I - t.expected_photons) / msg.sigI
    assert np.median(z[t.outlier]) > 5 > np.median(np.abs(z[~t.outlier]))


def test_messages_pass_wire_validation(simulator: Simulator) -> None:
    msg, _ = simulator.image(0)
    back = decode_crystal(encode_crystal(msg))
    assert back.rows_rejected == {}
    assert len(back) == len(msg) and back.profile_radius == msg.profile_radius


def test_truth_metadata_only_on_request(truth: Truth) -> None:
    msg, t = Simulator(dataclasses.replace(SMALL, emit_truth_metadata=True), truth).image(0)
    assert msg.metadata["sim_scale"] == t.scale
    assert Simulator(SMALL, truth).image(0)[0].metadata == {}


def test_random_rotation_is_proper() -> None:
    rng = np.random.default_rng(3)
    for _ in range(5):
        u = random_rotation(rng)
        np.testing.assert_allclose(u @ u.T, np.eye(3), atol=1e-12)
        assert np.linalg.det(u) == pytest.approx(1.0)


def test_simulated_source(truth: Truth) -> None:
    assert load_source("sim") is SimulatedSource
    src = SimulatedSource(SMALL, truth=truth, n_images=3)
    msgs = list(src)
    assert len(src) == 3 and [m.image for m in msgs] == ["sim_000000.h5", "sim_000001.h5",
                                                         "sim_000002.h5"]
    t0 = time.monotonic()
    list(SimulatedSource(SMALL, rate=100.0, truth=truth, n_images=4))
    assert time.monotonic() - t0 >= 0.03
    with pytest.raises(ValueError):
        SimulatedSource(SMALL, rate=0.0)


# ----------------------------------------------------------------------------- writer


def _parse_tables(text: str) -> list[np.ndarray]:
    tables, rows, inside = [], [], False
    for line in text.splitlines():
        if line.startswith("   h    k    l"):
            inside, rows = True, []
        elif line == "End of reflections":
            inside = False
            tables.append(np.array(rows, dtype=np.float64).reshape(-1, 9))
        elif inside:
            rows.append(line.split()[:9])
    return tables


def test_stream_structure_and_values(simulator: Simulator, tmp_path) -> None:
    msgs = [simulator.image(i)[0] for i in range(4)]
    path = tmp_path / "sim.stream"
    geom = detector_of(SMALL).geometry_text(photon_energy_eV=SMALL.photon_energy_eV)
    n = write_stream(path, msgs, target_cell=SMALL.cell, space_group=SMALL.space_group,
                     geometry=geom)
    text = path.read_text()
    lines = text.splitlines()
    assert n == 4 and lines[0] == "CrystFEL stream format 2.3"
    assert lines[1].startswith("Generated by streamvi")
    assert text.count("----- Begin chunk -----") == text.count("----- End chunk -----") == 4
    assert text.count("--- Begin crystal") == text.count("--- End crystal") == 4
    assert "lattice_type = tetragonal\nunique_axis = c\ncenter" in text
    assert "----- Begin geometry file -----\n; Simulated" in text
    counts = [int(x.split("=")[1]) for x in lines if x.startswith("num_reflections")]
    assert counts == [len(m) for m in msgs]
    for table, msg in zip(_parse_tables(text), msgs):
        np.testing.assert_array_equal(table[:, :3], msg.hkl())
        np.testing.assert_allclose(table[:, 3], msg.I, atol=0.0051)
        np.testing.assert_allclose(table[:, 4], msg.sigI, atol=0.0051)
        np.testing.assert_allclose(table[:, 7], msg.fs, atol=0.051)
        np.testing.assert_allclose(table[:, 8], msg.ss, atol=0.051)
    m = msgs[0]
    want = "".join(_ROW_FORMAT % (m.h[i], m.k[i], m.l[i], m.I[i], m.sigI[i], m.peak[i],
                                  m.background[i], m.fs[i], m.ss[i], "p0")
                   for i in range(len(m)))
    assert want in text
    astar = [x for x in lines if x.startswith("astar = ")][0].split()[2:5]
    np.testing.assert_allclose([float(x) for x in astar], np.array(m.astar) * 10, atol=1e-7)


def test_stream_is_read_back_by_the_crystfel_reader(simulator: Simulator, tmp_path) -> None:
    from streamvi_crystfel import read_stream

    msgs = [simulator.image(i)[0] for i in range(3)]
    path = tmp_path / "back.stream"
    write_stream(path, msgs, target_cell=SMALL.cell, space_group=SMALL.space_group)
    back = [m for m in read_stream(path)]
    assert [m.image for m in back] == [m.image for m in msgs]
    for a, b in zip(back, msgs):
        np.testing.assert_array_equal(a.hkl(), b.hkl())
        np.testing.assert_allclose(a.I, b.I, atol=0.0051)
        np.testing.assert_allclose(a.astar, b.astar, atol=1e-8)
        assert a.photon_energy_eV == pytest.approx(b.photon_energy_eV, abs=1e-6)


def test_writer_appends_and_groups_crystals(simulator: Simulator, tmp_path) -> None:
    a, b, c = (simulator.image(i)[0] for i in range(3))
    second = dataclasses.replace(a, crystal=1)
    path = tmp_path / "live.stream"
    with StreamWriter(path, target_cell=SMALL.cell, space_group=SMALL.space_group) as w:
        assert w.write([a, second]) == 1
        w.flush()
    with StreamWriter(path, append=True) as w:
        w.write_chunk([b])
        w.write(c)
    text = path.read_text()
    assert text.count("CrystFEL stream format") == 1
    assert text.count("----- Begin chunk -----") == 3
    assert text.count("--- Begin crystal") == 4
    serials = [int(x.split(":")[1]) for x in text.splitlines()
               if x.startswith("Image serial number")]
    assert serials == [1, 2, 3]


def test_writer_to_text_file_object(simulator: Simulator) -> None:
    buf = io.StringIO()
    write_stream(buf, [simulator.image(0)[0]])
    assert buf.getvalue().startswith("CrystFEL stream format 2.3\n")
    assert "lattice_type = triclinic" in buf.getvalue()


def test_row_formatting_matches_printf() -> None:
    rng = np.random.default_rng(5)
    n = 2000
    h, k, l = (rng.integers(-60, 60, n) for _ in range(3))  # noqa: E741
    cols = [rng.normal(0, 500, n) for _ in range(4)] + [rng.uniform(0, 3000, n)
                                                       for _ in range(2)]
    cols[0][:6] = [1e9, -0.004, 0.005, 0.015, -0.0, 12.125]  # overflow, -0.00, ties
    cols[4][0] = 12345.6  # wider than %6.1f
    panels = np.where(rng.random(n) < 0.5, "q0a1", "q10a12")
    got = format_reflections(h, k, l, *cols, panels).decode()
    want = "".join(_ROW_FORMAT % (h[i], k[i], l[i], cols[0][i], cols[1][i], cols[2][i],
                                  cols[3][i], cols[4][i], cols[5][i], panels[i])
                   for i in range(n))
    assert got == want


@pytest.mark.parametrize("symbol, expected", [
    ("P 43 21 2", ("tetragonal", "P", "c")), ("C 1 2 1", ("monoclinic", "C", "b")),
    ("P 21 21 21", ("orthorhombic", "P", "*")), ("R 3 :H", ("hexagonal", "R", "c")),
    ("P 61 2 2", ("hexagonal", "P", "c")), ("I 2 3", ("cubic", "I", "*")),
    ("P 1", ("triclinic", "P", "*")),
])
def test_lattice_of(symbol: str, expected: tuple[str, str, str]) -> None:
    assert lattice_of(symbol) == expected


# ----------------------------------------------------------------------------- defaults stay


#: Fingerprints of images made by the simulator before the variation knobs (solvent,
#: partiality profiles, fractional error, σ scale, flat intensities) existed: with every
#: new knob at its default the images must stay what they were.  (image, reflections,
#: Σh, Σk, Σl, Σh², ΣI, Σσ(I), ΣI·fs, a*, photon energy eV)
_FINGERPRINTS = {
    "small": (SMALL, [
        (0, 390, 584, 129, -720, 86844, 804.0507394969463, 2039.2108852863312,
         809473.9640293345, (0.008936791252805555, 0.008217601263886144, -0.00362041593469215),
         9509.86204665881),
        (1, 442, 989, -203, -767, 62653, 2117.511491436977, 2515.305610179901, 2194247.62901581,
         (-0.00596775311592401, -0.0074970540384709065, -0.008269912242826045),
         9490.723745239655),
        (5, 453, -1441, -87, -587, 32235, 2913.096223785542, 3030.5368275642395,
         3000386.599730244, (0.0006586946844378429, 0.006242310087386218, 0.01100409514695554),
         9507.57212374143),
    ], (639937.0401825057, 639056.1017443435, 402690.3183774766)),
    "benchmark_geometry": (SimulationConfig(n_atoms=40, n_sulfur=2, n_iodide=1), [
        (0, 656, 2524, -4628, -672, 230496, 4198.527750587091, 3756.1541934013367,
         4215919.764283167,
         (0.010838598628286523, 0.0005992042891983791, -0.006594484728142601),
         9486.445484051153),
        (3, 1004, -5435, -2118, -2663, 284431, 8738.327375745808, 6230.964107275009,
         8633902.916499648,
         (-0.004374660815071667, 0.008313342181749216, 0.008469545274845872),
         9484.487527417385),
    ], (701495.651531133, 701810.6348819621, 1048535.7820927423)),
}


@pytest.mark.parametrize("name", sorted(_FINGERPRINTS))
def test_default_images_are_unchanged(name: str) -> None:
    cfg, images, structure = _FINGERPRINTS[name]
    truth = simulate_structure(cfg)
    # float sums to 1e-9: the same numbers, whatever summation order numpy's SIMD picks
    np.testing.assert_allclose([truth.F_plus.sum(), truth.F_minus.sum(),
                                np.abs(truth.phi_plus).sum()], structure, rtol=1e-9)
    sim = Simulator(cfg, truth)
    for index, n, sh, sk, sl, sh2, s_i, s_sig, s_ifs, astar, energy in images:
        msg, _ = sim.image(index)
        assert (len(msg), int(msg.h.sum()), int(msg.k.sum()), int(msg.l.sum()),
                int((msg.h.astype(np.int64) ** 2).sum())) == (n, sh, sk, sl, sh2)
        i64 = msg.I.astype(np.float64)
        np.testing.assert_allclose(
            [i64.sum(), msg.sigI.astype(np.float64).sum(), (i64 * msg.fs).sum()],
            [s_i, s_sig, s_ifs], rtol=1e-9)
        np.testing.assert_allclose(msg.astar, astar, rtol=1e-12)
        assert msg.photon_energy_eV == pytest.approx(energy, rel=1e-12)


# ----------------------------------------------------------------------------- variations


def _max_e_per_shell(truth: Truth, n_shells: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """Largest normalised amplitude E per resolution shell, and how many exceed 3."""
    from streamvi.symmetry import shell_edges, shell_index

    shell = shell_index(truth.d, shell_edges(truth.d.max(), truth.d.min(), n_shells))
    f, eps = truth.F_model, truth.epsilon
    e_max, n_over = np.zeros(n_shells), np.zeros(n_shells, dtype=int)
    for s in range(n_shells):
        m = shell == s
        e = f[m] / np.sqrt(eps[m] * np.mean(f[m] ** 2 / eps[m]))
        e_max[s], n_over[s] = e.max(), (e > 3).sum()
    return e_max, n_over


def test_bulk_solvent_gives_strong_low_order_reflections() -> None:
    cfg = SimulationConfig(dmin=3.0, min_atom_distance=1.8)
    spread = simulate_structure(cfg)
    packed = simulate_structure(dataclasses.replace(cfg, solvent_fraction=0.45))
    e_spread, n_spread = _max_e_per_shell(spread)
    e_packed, n_packed = _max_e_per_shell(packed)
    print("max E per shell, low → high: atoms spread", np.round(e_spread[:3], 2),
          "; in an envelope with bulk solvent", np.round(e_packed[:3], 2))
    # atoms spread through the cell give Wilson statistics even at low resolution ...
    assert e_spread[0] < 3.0 and n_spread[:2].sum() == 0
    # ... an envelope in flat solvent gives real proteins' very strong low-order terms
    assert e_packed[0] > 4.0 and n_packed[:2].sum() >= 2
    # the contrast lives at low resolution: the top shell keeps Wilson statistics
    assert e_packed[-1] < 3.5
    # every atom sits in the first molecule's envelope, so molecules do not interpenetrate
    from streamvi_sim.model import molecular_envelope

    env = molecular_envelope(cell=packed.gemmi_cell, space_group=packed.gemmi_space_group,
                             protein_fraction=0.55, rng=np.random.default_rng(
                                 np.random.SeedSequence(cfg.seed, spawn_key=(0, 1))))
    assert env.contains(packed.atoms.frac).all()
    assert not env.contains(spread.atoms.frac).all()
    # the solvent scatters no anomalous signal: F(+) − F(−) comes from the same atoms' f''
    acentric = ~packed.centric
    assert np.median(np.abs(packed.F_plus - packed.F_minus)[acentric]) > 0


def test_bulk_solvent_term_matches_a_flat_solvent_by_hand() -> None:
    """k_sol·exp(−B s²)·F_mask against the transform of the mask taken apart by numpy."""
    from streamvi_sim.model import AtomModel, bulk_solvent_factors

    cell, sg = gemmi.UnitCell(30, 30, 30, 90, 90, 90), gemmi.SpaceGroup("P 1")
    one_atom = AtomModel(np.array(["C"]), np.array([[0.25, 0.5, 0.75]]), np.zeros(1),
                         np.ones(1))
    hkl = np.array([[0, 0, 0], [1, 0, 0], [0, 2, 1]], dtype=np.int32)
    f = bulk_solvent_factors(one_atom, cell=cell, space_group=sg, hkl=hkl, k_sol=0.35,
                             b_sol=0.0, dmin=2.0)
    # F(000) is the solvent's electrons: k_sol times the cell less the masked sphere
    assert 0.9 * 0.35 * cell.volume < f[0].real < 0.35 * cell.volume
    # the hole about the atom: F(h) = −k_sol V_hole exp(2πi h·x) away from the origin
    phase = np.exp(2j * np.pi * hkl[1:] @ one_atom.frac[0])
    hole = -f[1:] / (0.35 * phase)
    np.testing.assert_allclose(hole.imag, 0.0, atol=1e-3 * np.abs(hole).max())
    assert (hole.real > 0).all()
    damped = bulk_solvent_factors(one_atom, cell=cell, space_group=sg, hkl=hkl, k_sol=0.35,
                                  b_sol=46.0, dmin=2.0)
    stol2 = 0.25 * cell.calculate_1_d2_array(hkl)
    np.testing.assert_allclose(damped, f * np.exp(-46.0 * stol2), rtol=1e-6)


def test_partiality_profiles(truth: Truth) -> None:
    from streamvi_sim.geometry import LORENTZ_GAMMA, TOPHAT_HALF_WIDTH

    shots = {}
    for profile in ("gaussian", "lorentzian", "tophat", "xsphere"):
        sim = Simulator(dataclasses.replace(SMALL, partiality_profile=profile), truth)
        shots[profile] = [sim.image(i) for i in range(4)]
    for profile, pairs in shots.items():
        for (msg, t), (_, g) in zip(pairs, shots["gaussian"]):
            # the same shot: orientation, cell and beam do not depend on the profile
            np.testing.assert_array_equal(t.U, g.U)
            assert t.photon_energy_eV == g.photon_energy_eV
            assert (t.partiality >= SMALL.partiality_min).all() and (t.partiality <= 1).all()
            lam = 12398.419843320026 / t.photon_energy_eV
            q_norm = np.linalg.norm(t.hkl @ (t.U @ reciprocal_basis(t.cell)).T, axis=1)
            width = profile_width(q_norm, profile_radius=t.profile_radius, wavelength=lam,
                                  bandwidth=SMALL.bandwidth,
                                  mosaicity_rad=math.radians(SMALL.mosaicity_deg))
            if profile == "lorentzian":
                np.testing.assert_allclose(
                    t.partiality, 1 / (1 + (t.excitation / (LORENTZ_GAMMA * width)) ** 2))
            elif profile == "tophat":
                # fulls or nothing: every recorded reflection within the radius, complete
                np.testing.assert_array_equal(t.partiality, 1.0)
                assert (np.abs(t.excitation) <= TOPHAT_HALF_WIDTH * width).all()
    count = {p: np.mean([len(m) for m, _ in pairs]) for p, pairs in shots.items()}
    # the Lorentzian's tails reach partiality_min far from the sphere: many more partials
    assert count["lorentzian"] > 2.5 * count["gaussian"]
    assert count["tophat"] < count["gaussian"]
    mean_p = {p: np.mean(np.concatenate([t.partiality for _, t in pairs]))
              for p, pairs in shots.items()}
    assert mean_p["lorentzian"] < mean_p["gaussian"] < mean_p["tophat"] == 1.0


def test_xsphere_partiality_is_the_volume_between_the_band_spheres() -> None:
    """The closed form against a Monte Carlo count of points of the reflection's sphere
    lying between the exact Ewald spheres of the band's shortest and longest wavelengths."""
    from streamvi_sim.geometry import xsphere_partiality

    rng = np.random.default_rng(11)
    lam, band, radius = 1.3, 0.01, 0.002
    k_short, k_long = 1 / (lam * (1 - band / 2)), 1 / (lam * (1 + band / 2))
    # points uniformly in a ball, shared by all cases
    ball = rng.normal(size=(400_000, 3))
    ball *= (radius * rng.random(400_000) ** (1 / 3) / np.linalg.norm(ball, axis=1))[:, None]

    def between(points: np.ndarray) -> np.ndarray:
        e_s = np.linalg.norm(points + [0, 0, k_short], axis=1) - k_short
        e_l = np.linalg.norm(points + [0, 0, k_long], axis=1) - k_long
        return (e_s <= 0) & (e_l >= 0)

    # a lattice point at 0.5 Å⁻¹ scattering, moved along the sphere's normal
    qz = -0.5 ** 2 / (2 / lam)                       # on the nominal sphere: |k0 + q| = k
    centre_nominal = np.array([math.sqrt(0.5 ** 2 - qz ** 2), 0.0, qz])
    normal = centre_nominal + [0, 0, 1 / lam]
    normal /= np.linalg.norm(normal)
    for shift in (-0.004, -0.002, -0.001, 0.0, 0.0015, 0.003):
        centre = centre_nominal + shift * normal
        fraction = between(centre + ball).mean()
        mid = between(centre_nominal + ball).mean()
        q = centre[None]
        got = xsphere_partiality(excitation_error(q, 1 / k_short),
                                 excitation_error(q, 1 / k_long), np.array([radius]))[0]
        want = min(fraction / mid, 1.0)
        assert got == pytest.approx(want, abs=0.01), shift


def test_xsphere_reflections_in_the_band_are_full(truth: Truth) -> None:
    # a band much thicker than the reflections: fulls in the middle, partials at its edges
    cfg = dataclasses.replace(SMALL, partiality_profile="xsphere", bandwidth=0.04,
                              profile_radius=(0.0002, 0.0003), mosaicity_deg=0.0)
    _, t = Simulator(cfg, truth).image(0)
    assert (t.partiality > 0.999).mean() > 0.5 and (t.partiality < 0.5).mean() > 0.05


def test_overprediction_integrates_reflections_the_band_does_not_reach(truth: Truth) -> None:
    """With ``overprediction`` every reflection within that many prediction widths is
    integrated, partiality 0 or not; those that reach ``partiality_min`` are there as before,
    with the same partialities."""
    cfg = dataclasses.replace(SMALL, partiality_profile="xsphere", bandwidth=0.01,
                              profile_radius=(0.0003, 0.0006), mosaicity_deg=0.0)
    plain, over = Simulator(cfg, truth), Simulator(dataclasses.replace(cfg, overprediction=2.5),
                                                   truth)
    zero_low, zero_high = [], []
    for i in range(4):
        (m0, t0), (m1, t1) = plain.image(i), over.image(i)
        lam = 12398.419843320026 / t1.photon_energy_eV
        q_norm = np.linalg.norm(t1.hkl @ (t1.U @ reciprocal_basis(t1.cell)).T, axis=1)
        width = over.prediction_width(q_norm, lam, t1.profile_radius, 0.0)
        assert (np.abs(t1.excitation) <= 2.5 * width).all()
        assert len(m1) > len(m0)
        # what reaches partiality_min is recorded in both, with the same partiality
        both = {tuple(h): k for k, h in enumerate(m1.hkl())}
        idx = np.array([both[tuple(h)] for h in m0.hkl()])
        np.testing.assert_array_equal(t1.partiality[idx], t0.partiality)
        zero = t1.partiality < 1e-9
        assert (m1.sigI[zero] > 0).all() and np.isfinite(m1.I[zero]).all()
        low = q_norm < np.median(q_norm)
        zero_low.append(zero[low].mean())
        zero_high.append(zero[~low].mean())
    # the band widens the high-order reflections: fewer of them are pure background
    assert np.mean(zero_low) > 0.3 and np.mean(zero_high) < np.mean(zero_low) - 0.1
    with pytest.raises(ValueError, match="overprediction"):
        dataclasses.replace(cfg, overprediction=-1.0)


def test_fractional_error_widens_intensities_not_sigmas(truth: Truth) -> None:
    # bright spots and no gain error: the plain spread is a few % of counting noise
    bright = dataclasses.replace(SMALL, top_shell_photons=1000.0, gain_error=0.0)
    plain = Simulator(bright, truth)
    noisy = Simulator(dataclasses.replace(bright, fractional_error=0.2), truth)
    ratios = {"plain": [], "noisy": []}
    for i in range(6):
        (m0, t0), (m1, t1) = plain.image(i), noisy.image(i)
        np.testing.assert_array_equal(m0.sigI, m1.sigI)        # σ(I) does not carry it
        np.testing.assert_array_equal(m0.hkl(), m1.hkl())
        strong = (t0.expected_photons > 1000) & ~t0.outlier
        ratios["plain"].append(m0.I[strong] / t0.expected_photons[strong])
        ratios["noisy"].append(m1.I[strong] / t1.expected_photons[strong])
    sd = {k: np.std(np.concatenate(v)) for k, v in ratios.items()}
    assert sd["plain"] < 0.06 and sum(len(r) for r in ratios["plain"]) > 200
    # about √(sd² + 0.2²): the extra spread is the unmodelled 20 %
    assert 0.16 < math.sqrt(sd["noisy"] ** 2 - sd["plain"] ** 2) < 0.24


def test_sigma_scale_misreports_sigmas_only(truth: Truth) -> None:
    m0, _ = Simulator(SMALL, truth).image(3)
    m1, _ = Simulator(dataclasses.replace(SMALL, sigma_scale=0.5), truth).image(3)
    np.testing.assert_array_equal(m0.I, m1.I)
    np.testing.assert_allclose(m1.sigI, 0.5 * m0.sigI, rtol=1e-6)


def test_flat_intensities_are_wilson_with_no_falloff() -> None:
    from streamvi.symmetry import shell_edges, shell_index
    from streamvi_sim.config import FLAT_SIGMA

    cfg = dataclasses.replace(SMALL, flat_intensities=True, dmin=2.0)
    flat = simulate_structure(cfg)
    assert flat.atoms is None and flat.photon_energy_eV is None
    np.testing.assert_array_equal(flat.F_plus, flat.F_minus)       # no anomalous signal
    np.testing.assert_allclose(flat.F_model, flat.F_plus, rtol=1e-9)
    z = flat.I_mean / (FLAT_SIGMA * flat.epsilon)
    acentric, centric = z[~flat.centric], z[flat.centric]
    # exponential: mean 1, variance 1; χ²₁: mean 1, variance 2
    assert abs(acentric.mean() - 1) < 0.05 and abs(acentric.var() - 1) < 0.15
    assert abs(centric.mean() - 1) < 0.15 and abs(centric.var() - 2) < 0.6
    shell = shell_index(flat.d, shell_edges(flat.d.max(), flat.d.min(), 5))
    means = np.array([z[shell == s].mean() for s in range(5)])
    assert np.abs(means - 1).max() < 0.1                           # no resolution fall-off
    # images are simulated from it as from any truth
    msg, t = Simulator(cfg, flat).image(0)
    assert len(msg) > 100 and np.isfinite(msg.I).all()
    np.testing.assert_allclose(t.expected_photons,
                               t.intensity_factor * flat.I_plus[t.asu_index] / cfg.adu_per_photon)


def test_intensity_factor_divides_out_scale_and_partiality(simulator: Simulator,
                                                           truth: Truth) -> None:
    msg, t = simulator.image(2)
    true_i = np.where(t.friedel > 0, truth.I_plus[t.asu_index], truth.I_minus[t.asu_index])
    np.testing.assert_allclose(t.intensity_factor * true_i,
                               SMALL.adu_per_photon * t.expected_photons, rtol=1e-12)
    stol2 = 0.25 * np.sum((t.hkl @ (t.U @ reciprocal_basis(t.cell)).T) ** 2, axis=1)
    np.testing.assert_allclose(
        t.intensity_factor,
        simulator.flux * t.scale * np.exp(-2 * (SMALL.b_overall + t.b_image) * stol2)
        * t.partiality, rtol=1e-9)


@pytest.mark.parametrize("bad, word", [
    (dict(partiality_profile="voigt"), "partiality_profile"),
    (dict(solvent_fraction=1.2), "solvent_fraction"),
    (dict(fractional_error=-0.1), "fractional_error"),
    (dict(sigma_scale=0.0), "sigma_scale"),
    (dict(partiality_min=0.0), "partiality_min"),
])
def test_bad_variation_is_refused_by_name(bad: dict, word: str) -> None:
    with pytest.raises(ValueError, match=word):
        SimulationConfig(**bad)
