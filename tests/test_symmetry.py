"""Symmetry against reciprocalspaceship and gemmi, and the ReciprocalSpace table."""
from __future__ import annotations

import json

import gemmi
import numpy as np
import pytest
import reciprocalspaceship as rs

from streamvi.errors import ConfigError
from streamvi.symmetry import (
    ReciprocalSpace,
    dhkl,
    enumerate_asu,
    epsilon,
    friedel_sign,
    hkl_to_asu,
    in_asu,
    is_absent,
    is_centric,
    parse_cell,
    parse_space_group,
    reindex,
    twin_operators,
)

#: Space group and a cell of its family; several are non-reference settings on purpose.
GROUPS = {
    "P 1": (31.0, 42.0, 53.0, 81.0, 95.0, 101.0),
    "P -1": (31.0, 42.0, 53.0, 81.0, 95.0, 101.0),
    "P 1 21 1": (40.0, 50.0, 60.0, 90.0, 105.0, 90.0),
    "P 1 1 21": (40.0, 50.0, 60.0, 90.0, 90.0, 110.0),
    "C 1 2 1": (90.0, 50.0, 60.0, 90.0, 105.0, 90.0),
    "I 1 2 1": (90.0, 50.0, 60.0, 90.0, 105.0, 90.0),
    "P 21 21 21": (40.0, 50.0, 60.0, 90.0, 90.0, 90.0),
    "C 2 2 21": (60.0, 70.0, 80.0, 90.0, 90.0, 90.0),
    "P 43 21 2": (79.1, 79.1, 37.9, 90.0, 90.0, 90.0),
    "P 43": (79.1, 79.1, 37.9, 90.0, 90.0, 90.0),
    "I 41/a": (60.0, 60.0, 90.0, 90.0, 90.0, 90.0),
    "P 21 3": (90.0, 90.0, 90.0, 90.0, 90.0, 90.0),
    "P 61 2 2": (60.0, 60.0, 150.0, 90.0, 90.0, 120.0),
    "P 65": (60.0, 60.0, 150.0, 90.0, 90.0, 120.0),
    "P 3 1 2": (60.0, 60.0, 80.0, 90.0, 90.0, 120.0),
    "P 3 2 1": (60.0, 60.0, 80.0, 90.0, 90.0, 120.0),
    "H 3": (60.0, 60.0, 80.0, 90.0, 90.0, 120.0),
    "R 3:R": (50.0, 50.0, 50.0, 80.0, 80.0, 80.0),
    "F m -3 m": (100.0, 100.0, 100.0, 90.0, 90.0, 90.0),
}


def random_hkl(seed: int, n: int = 3000, hmax: int = 25) -> np.ndarray:
    """Random indices plus the special zones (0, h = ±k, h = l, ...) where ASUs have edges."""
    rng = np.random.default_rng(seed)
    hkl = rng.integers(-hmax, hmax + 1, size=(n, 3)).astype(np.int32)
    q = n // 12
    for i in range(3):
        hkl[i * q:(i + 1) * q, i] = 0
    hkl[3 * q:4 * q, 1] = hkl[3 * q:4 * q, 0]
    hkl[4 * q:5 * q, 1] = -hkl[4 * q:5 * q, 0]
    hkl[5 * q:6 * q, 2] = hkl[5 * q:6 * q, 0]
    hkl[6 * q:7 * q, 1:] = hkl[6 * q:7 * q, :1]
    hkl[7 * q:8 * q, :2] = 0
    hkl[:3] = [(0, 0, 0), (0, 0, 1), (0, 0, -1)]
    return hkl


# ----------------------------------------------------------------------------- parsing


@pytest.mark.parametrize("value,xhm", [
    ("P 43 21 2", "P 43 21 2"), ("P43212", "P 43 21 2"), (96, "P 43 21 2"),
    ("96", "P 43 21 2"), (np.int64(19), "P 21 21 21"), ("P 4nw 2abw", "P 43 21 2"),
    ("R 3", "R 3:H"), ("H 3", "R 3:H"), ("R 3:R", "R 3:R"), ("P21", "P 1 21 1"),
    ("C 1 2 1", "C 1 2 1"), (" P 1 1 21 ", "P 1 1 21"),
])
def test_parse_space_group(value, xhm):
    assert parse_space_group(value).xhm() == xhm


def test_parse_space_group_passes_gemmi_objects_through():
    sg = gemmi.SpaceGroup("P 65")
    assert parse_space_group(sg) is sg


@pytest.mark.parametrize("value", ["P 43 21 3", "Q 1", "", "lysozyme", 0, 231, "-5", None,
                                   True, 96.0])
def test_bad_space_group_names_the_value_and_the_fix(value):
    with pytest.raises(ConfigError) as info:
        parse_space_group(value)
    message = str(info.value)
    assert repr(value) in message or str(value) in message
    assert "'P 43 21 2'" in message and "1-230" in message


@pytest.mark.parametrize("value", [
    "79.1 79.1 37.9 90 90 90", "79.1,79.1,37.9,90,90,90", "79.1, 79.1, 37.9, 90, 90, 90",
    [79.1, 79.1, 37.9, 90, 90, 90], (79.1, 79.1, 37.9, 90.0, 90.0, 90.0),
    np.array([79.1, 79.1, 37.9, 90, 90, 90]),
])
def test_parse_cell(value):
    assert parse_cell(value).parameters == pytest.approx((79.1, 79.1, 37.9, 90, 90, 90))


@pytest.mark.parametrize("value,words", [
    ("79.1 79.1 37.9 90 90", "six"),
    ("79.1 79.1 37.9 90 90 ninety", "six numbers"),
    ([79.1, 79.1, 37.9, 90, 90, float("nan")], "finite"),
    ("0.5 79.1 37.9 90 90 90", "lengths"),
    ("79.1 79.1 37.9 90 90 180", "angles"),
    (None, "six numbers"),
])
def test_bad_cell(value, words):
    with pytest.raises(ConfigError) as info:
        parse_cell(value)
    assert words in str(info.value)
    assert "cell" in str(info.value)


# ----------------------------------------------------------------------------- per reflection


@pytest.mark.parametrize("name", list(GROUPS))
def test_hkl_to_asu_matches_reciprocalspaceship(name):
    sg = gemmi.SpaceGroup(name)
    hkl = random_hkl(seed=len(name))
    asu, isym = hkl_to_asu(hkl, sg)
    want_asu, want_isym = rs.utils.hkl_to_asu(hkl, sg)
    assert asu.dtype == np.int32 and asu.shape == hkl.shape
    np.testing.assert_array_equal(asu, want_asu)
    np.testing.assert_array_equal(isym, want_isym)
    assert in_asu(asu, sg).all()
    np.testing.assert_array_equal(friedel_sign(isym), np.where(want_isym % 2 == 1, 1, -1))


@pytest.mark.parametrize("name", ["P 1 1 21", "R 3:R", "P 61 2 2", "I 41/a"])
def test_hkl_to_asu_matches_gemmi_one_by_one(name):
    sg = gemmi.SpaceGroup(name)
    hkl = random_hkl(seed=7, n=600)
    asu, isym = hkl_to_asu(hkl, sg)
    reciprocal_asu, ops = gemmi.ReciprocalAsu(sg), sg.operations()
    for row, got, got_isym in zip(hkl.tolist(), asu.tolist(), isym.tolist()):
        assert (got, got_isym) == tuple(reciprocal_asu.to_asu(row, ops))


def test_hkl_to_asu_accepts_any_integer_dtype_and_rejects_the_rest():
    hkl = random_hkl(seed=3, n=100)
    for dtype in (np.int16, np.int64):
        np.testing.assert_array_equal(hkl_to_asu(hkl.astype(dtype), "P 43")[0],
                                      hkl_to_asu(hkl, "P 43")[0])
    with pytest.raises(ValueError, match="integers"):
        hkl_to_asu(hkl.astype(np.float32), "P 43")
    with pytest.raises(ValueError, match="shape"):
        hkl_to_asu(hkl[:, :2], "P 43")
    with pytest.raises(ValueError, match="within"):
        hkl_to_asu(np.array([[2**20, 0, 0]]), "P 43")
    assert hkl_to_asu(np.zeros((0, 3), np.int32), "P 43")[0].shape == (0, 3)


def test_friedel_sign():
    np.testing.assert_array_equal(friedel_sign(np.array([1, 2, 3, 4, 15, 16])),
                                  [1, -1, 1, -1, 1, -1])
    assert friedel_sign(np.array([1])).dtype == np.int8


@pytest.mark.parametrize("name", list(GROUPS))
def test_centric_epsilon_absent_and_d_match_reciprocalspaceship(name):
    sg, cell = gemmi.SpaceGroup(name), gemmi.UnitCell(*GROUPS[name])
    hkl = random_hkl(seed=11)
    hkl = hkl[(hkl != 0).any(axis=1)]   # 000 has no d
    np.testing.assert_array_equal(is_centric(hkl, sg), rs.utils.is_centric(hkl, sg))
    np.testing.assert_array_equal(is_absent(hkl, sg), rs.utils.is_absent(hkl, sg))
    eps = epsilon(hkl, sg)
    assert eps.dtype == np.float32
    np.testing.assert_array_equal(eps, rs.utils.compute_structurefactor_multiplicity(hkl, sg))
    d = dhkl(hkl, cell)
    assert d.dtype == np.float32
    np.testing.assert_allclose(d, rs.utils.compute_dHKL(hkl, cell), rtol=2e-6)


def test_epsilon_values_in_p43212():
    # general reflection 1; 00l on the 4-fold 4; h00 and hh0 on 2-folds 2.  Centric: any
    # reflection that a 2-fold perpendicular to it sends to -hkl (zones hk0, h0l, hhl).
    hkl = np.array([[3, 2, 1], [0, 0, 4], [5, 0, 0], [3, 3, 0], [2, 1, 0], [3, 0, 1],
                    [3, 3, 1]])
    np.testing.assert_array_equal(epsilon(hkl, "P 43 21 2"), [1, 4, 2, 2, 1, 1, 1])
    np.testing.assert_array_equal(is_centric(hkl, "P 43 21 2"),
                                  [False, True, True, True, True, True, True])


def test_epsilon_counts_centring():
    assert epsilon(np.array([[1, 1, 1]]), "C 2 2 21")[0] == 2.0


def test_dhkl_of_a_known_reflection():
    assert dhkl(np.array([[1, 0, 0], [0, 0, 2]]), "79.1 79.1 37.9 90 90 90") == pytest.approx(
        [79.1, 37.9 / 2])


# ----------------------------------------------------------------------------- enumeration


@pytest.mark.parametrize("name", ["P 1", "P 1 1 21", "I 1 2 1", "C 2 2 21", "P 43 21 2",
                                  "I 41/a", "P 21 3", "P 61 2 2", "H 3", "R 3:R"])
@pytest.mark.parametrize("anomalous", [False, True])
def test_enumerate_asu_matches_reciprocalspaceship(name, anomalous):
    got = enumerate_asu(GROUPS[name], name, 3.0, anomalous)
    want = rs.utils.generate_reciprocal_asu(GROUPS[name], name, 3.0, anomalous)
    assert got.dtype == np.int32
    np.testing.assert_array_equal(got, want)


def test_enumerate_asu_is_sorted_unique_and_complete_to_dmin():
    cell, sg, dmin = GROUPS["P 43 21 2"], "P 43 21 2", 2.5
    hkl = enumerate_asu(cell, sg, dmin)
    assert (hkl != 0).any(axis=1).all()
    assert np.array_equal(hkl, np.unique(hkl, axis=0))
    assert dhkl(hkl, cell).min() >= np.float32(dmin)
    # every allowed P1 index within dmin maps onto exactly one listed reflection
    g = np.arange(-40, 41)
    p1 = np.stack(np.meshgrid(g, g, np.arange(-20, 21), indexing="ij"), -1).reshape(-1, 3)
    p1 = p1[(dhkl(p1, cell) >= np.float32(dmin)) & ~is_absent(p1, sg) & (p1 != 0).any(1)]
    asu = np.unique(hkl_to_asu(p1, sg)[0], axis=0)
    np.testing.assert_array_equal(asu, hkl)


# ----------------------------------------------------------------------------- twinning


@pytest.mark.parametrize("name,cell,count", [
    ("P 43", GROUPS["P 43"], 2),
    ("P 43 21 2", GROUPS["P 43 21 2"], 1),
    ("P 3", (60.0, 60.0, 80.0, 90.0, 90.0, 120.0), 4),
    ("H 3", GROUPS["H 3"], 2),
    ("P 21 3", GROUPS["P 21 3"], 2),
    ("P 65", GROUPS["P 65"], 2),
    ("P 61 2 2", GROUPS["P 61 2 2"], 1),
    ("P 21 21 21", GROUPS["P 21 21 21"], 1),
    ("P 1", (50.0, 50.0, 50.0, 90.0, 90.0, 90.0), 1),        # cubic metric by accident only
    ("P 1 21 1", (40.0, 50.0, 60.0, 90.0, 90.0, 90.0), 1),   # β = 90° by accident only
])
def test_twin_operator_counts(name, cell, count):
    ops = twin_operators(name, cell)
    assert len(ops) == count
    np.testing.assert_array_equal(ops[0], np.eye(3))
    for op in ops:
        assert op.dtype == np.int32 and op.shape == (3, 3)
        assert round(np.linalg.det(op)) == 1     # proper: Friedel signs survive reindexing


def test_twin_operators_act_like_gemmi_ops():
    sg, cell = gemmi.SpaceGroup("P 3"), gemmi.UnitCell(60, 60, 80, 90, 90, 120)
    laws = gemmi.find_twin_laws(cell, sg, 0.01, False)
    hkl = random_hkl(seed=5, n=50)
    for op, law in zip(twin_operators(sg, cell)[1:], laws):
        want = np.array([law.apply_to_hkl(row) for row in hkl.tolist()])
        np.testing.assert_array_equal(reindex(hkl, op), want)


def test_twin_operator_of_p43_is_the_known_ambiguity():
    op = twin_operators("P 43", GROUPS["P 43"])[1]
    hkl = np.array([[3, 1, 2]])
    # The twin law is k,h,-l up to a symmetry operator of P 43.
    equivalents = hkl_to_asu(np.array([[1, 3, -2]]), "P 43")[0]
    assert np.array_equal(hkl_to_asu(reindex(hkl, op), "P 43")[0], equivalents)


def test_twin_operators_need_a_compatible_cell():
    with pytest.raises(ConfigError, match="metric symmetry"):
        twin_operators("P 43", (79.1, 70.0, 37.9, 90, 90, 90))


def test_reindex_rejects_a_non_3x3_operator():
    with pytest.raises(ValueError, match="3x3"):
        reindex(np.ones((2, 3), np.int32), np.eye(2))


# ----------------------------------------------------------------------------- the table


@pytest.fixture(scope="module")
def lysozyme():
    return ReciprocalSpace("P 43 21 2", GROUPS["P 43 21 2"], 2.5)


@pytest.fixture(scope="module")
def lysozyme_anomalous():
    return ReciprocalSpace("P 43 21 2", GROUPS["P 43 21 2"], 2.5, anomalous=True)


def symmetry_mates(space: ReciprocalSpace, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A random symmetry equivalent (with the Friedel sign kept) of each row's index."""
    rng = np.random.default_rng(seed)
    ops = space.space_group.operations().sym_ops
    pick = rng.integers(0, len(ops), space.n_unique)
    mates = np.empty_like(space.hkl)
    for i, op in enumerate(ops):
        rows = np.flatnonzero(pick == i)
        rot = np.array(op.rot) // gemmi.Op.DEN
        mates[rows] = space.hkl[rows] @ rot
    return mates * space.friedel[:, None], rng.permutation(space.n_unique)


def test_table_attributes(lysozyme):
    sp = lysozyme
    assert sp.n_unique == len(rs.utils.generate_reciprocal_asu(sp.cell, sp.space_group, 2.5))
    assert (sp.hkl.dtype, sp.friedel.dtype, sp.centric.dtype, sp.epsilon.dtype, sp.d.dtype) == (
        np.int32, np.int8, np.bool_, np.float32, np.float32)
    for a in (sp.hkl, sp.friedel, sp.centric, sp.epsilon, sp.d):
        assert len(a) == sp.n_unique and not a.flags.writeable
    assert (sp.friedel == 1).all()
    np.testing.assert_array_equal(sp.hkl, enumerate_asu(sp.cell, sp.space_group, 2.5))
    np.testing.assert_array_equal(sp.centric, is_centric(sp.hkl, sp.space_group))
    np.testing.assert_array_equal(sp.epsilon, epsilon(sp.hkl, sp.space_group))
    np.testing.assert_array_equal(sp.d, dhkl(sp.hkl, sp.cell))
    assert sp.d.min() >= np.float32(2.5)
    assert sp.n_ops == 1 and len(sp) == sp.n_unique


def test_anomalous_table_has_two_rows_per_acentric(lysozyme, lysozyme_anomalous):
    sp, plain = lysozyme_anomalous, lysozyme
    n_centric = int(plain.centric.sum())
    assert sp.n_unique == 2 * plain.n_unique - n_centric
    assert sp.n_unique == len(rs.utils.generate_reciprocal_asu(sp.cell, sp.space_group, 2.5,
                                                               anomalous=True))
    assert (sp.friedel[sp.centric] == 1).all()
    assert (sp.friedel[~sp.centric] == -1).sum() == (sp.friedel[~sp.centric] == 1).sum()
    # rows sorted by (h, k, l), F(+) directly before its F(-)
    minus = np.flatnonzero(sp.friedel == -1)
    np.testing.assert_array_equal(sp.hkl[minus], sp.hkl[minus - 1])
    assert (sp.friedel[minus - 1] == 1).all()
    keys = [tuple(r) + (-f,) for r, f in zip(sp.hkl.tolist(), sp.friedel.tolist())]
    assert keys == sorted(keys)


@pytest.mark.parametrize("dense_limit", [1 << 24, 0])
@pytest.mark.parametrize("anomalous", [False, True])
@pytest.mark.parametrize("name", ["P 43 21 2", "P 1 1 21", "R 3:R", "P 61 2 2", "C 2 2 21"])
def test_lookup_finds_every_row_from_any_symmetry_mate(name, anomalous, dense_limit):
    sp = ReciprocalSpace(name, GROUPS[name], 3.5, anomalous, dense_limit=dense_limit)
    mates, order = symmetry_mates(sp, seed=1)
    rows = sp.lookup(mates[order])
    assert rows.dtype == np.int64
    np.testing.assert_array_equal(rows, order)


@pytest.mark.parametrize("dense_limit", [1 << 24, 0])
def test_anomalous_lookup_separates_friedel_mates_but_not_centrics(dense_limit):
    sp = ReciprocalSpace("P 43 21 2", GROUPS["P 43 21 2"], 2.5, True, dense_limit=dense_limit)
    plus = sp.hkl[sp.friedel == 1]
    up, down = sp.lookup(plus), sp.lookup(-plus)
    centric = is_centric(plus, sp.space_group)
    assert (up >= 0).all() and (down >= 0).all()
    np.testing.assert_array_equal(up[centric], down[centric])
    assert (up[~centric] != down[~centric]).all()
    assert (sp.friedel[up] == 1).all()
    np.testing.assert_array_equal(sp.friedel[down], np.where(centric, 1, -1))
    np.testing.assert_array_equal(sp.hkl[down], plus)


def test_non_anomalous_lookup_merges_friedel_mates(lysozyme):
    np.testing.assert_array_equal(lysozyme.lookup(-lysozyme.hkl), np.arange(lysozyme.n_unique))


@pytest.mark.parametrize("dense_limit", [1 << 24, 0])
def test_lookup_misses(dense_limit):
    sp = ReciprocalSpace("P 43 21 2", GROUPS["P 43 21 2"], 2.5, dense_limit=dense_limit)
    misses = np.array([
        [0, 0, 0],                 # 000
        [0, 0, 1], [0, 0, 2],      # 43 screw: 00l with l != 4n absent
        [1, 0, 0], [3, 0, 0],      # 21 screw: h00 with h odd absent
        [40, 0, 0],                # d = 1.98 Å < dmin
        [2**18, 0, 0], [-2**31, 1, 1], [2**31 - 1, 0, 0],
    ], dtype=np.int64)
    np.testing.assert_array_equal(sp.lookup(misses), -1)
    hits = sp.lookup(np.array([[0, 0, 4], [2, 0, 0], [30, 0, 0], [-30, 0, 0], [31, 1, 0]]))
    assert (hits >= 0).all()
    assert sp.lookup(np.zeros((0, 3), np.int32)).shape == (0,)


def test_dense_and_keyed_lookup_agree_on_random_indices():
    dense = ReciprocalSpace("P 21 3", GROUPS["P 21 3"], 3.0, anomalous=True)
    keyed = ReciprocalSpace("P 21 3", GROUPS["P 21 3"], 3.0, anomalous=True, dense_limit=0)
    assert dense._dense.size > 0 and keyed._dense.size == 0
    hkl = random_hkl(seed=2, n=40000, hmax=35)
    rows = dense.lookup(hkl)
    np.testing.assert_array_equal(rows, keyed.lookup(hkl))
    assert 0.2 < (rows >= 0).mean() < 0.9      # a meaningful mix of hits and misses
    found = rows >= 0
    np.testing.assert_array_equal(dense.hkl[rows[found]], hkl_to_asu(hkl[found], "P 21 3")[0])


def test_lookup_ops_in_p43():
    sp = ReciprocalSpace("P 43", GROUPS["P 43"], 3.0, anomalous=True)
    assert sp.n_ops == 2
    hkl = random_hkl(seed=9, n=2000, hmax=20)
    ids = sp.lookup_ops(hkl)
    assert ids.shape == (2, len(hkl)) and ids.dtype == np.int64
    np.testing.assert_array_equal(ids[0], sp.lookup(hkl))
    np.testing.assert_array_equal(ids[1], sp.lookup(reindex(hkl, sp.twin_ops[1])))
    both = (ids >= 0).all(axis=0)
    assert both.mean() > 0.3
    assert (ids[0, both] != ids[1, both]).mean() > 0.5     # the ambiguity is real
    # reindexing twice returns to the same rows (the twin law is an involution mod symmetry)
    twice = sp.lookup(reindex(reindex(hkl, sp.twin_ops[1]), sp.twin_ops[1]))
    np.testing.assert_array_equal(twice, ids[0])


def test_shell_edges_have_equal_reciprocal_volume(lysozyme):
    edges = lysozyme.shell_edges(10)
    assert edges.shape == (11,)
    assert edges[0] == pytest.approx(lysozyme.d.max()) and edges[-1] == 2.5
    assert (np.diff(edges) < 0).all()
    np.testing.assert_allclose(np.diff(edges ** -3.0), (2.5 ** -3 - edges[0] ** -3) / 10)
    shells = lysozyme.shell_index(lysozyme.d, 10)
    counts = np.bincount(shells, minlength=10)
    assert counts.size == 10 and counts.min() > 0.85 * counts.mean()
    for s in range(10):     # each d falls between its shell's edges
        d = lysozyme.d[shells == s]
        assert d.max() <= edges[s] * (1 + 1e-6) and d.min() >= edges[s + 1] * (1 - 1e-6)


def test_shell_index_edges_and_outside(lysozyme):
    d = np.array([lysozyme.d.max(), 2.5, 2.4, 1000.0, np.nan, 0.0])
    np.testing.assert_array_equal(lysozyme.shell_index(d, 4), [0, 3, -1, -1, -1, -1])
    with pytest.raises(ConfigError, match="n_shells"):
        lysozyme.shell_edges(0)


@pytest.mark.parametrize("name,anomalous", [("P 43 21 2", True), ("P 1 1 21", False),
                                            ("R 3:R", False), ("I 41/a", True)])
def test_to_dict_round_trip(name, anomalous):
    sp = ReciprocalSpace(name, GROUPS[name], 4.0, anomalous)
    record = json.loads(json.dumps(sp.to_dict()))
    assert record == sp.to_dict()
    back = ReciprocalSpace.from_dict(record)
    assert back.space_group.xhm() == sp.space_group.xhm()
    assert back.anomalous == anomalous and back.dmin == 4.0
    np.testing.assert_array_equal(back.hkl, sp.hkl)
    np.testing.assert_array_equal(back.friedel, sp.friedel)


def test_from_dict_names_what_is_missing():
    with pytest.raises(ConfigError, match="cell, dmin"):
        ReciprocalSpace.from_dict({"space_group": "P 1"})


@pytest.mark.parametrize("dmin,words", [
    (0.0, "positive"), (-2.0, "positive"), (float("nan"), "positive"), ("fine", "Å"),
    (0.001, "reflections"), (100.0, "no reflections"),
])
def test_bad_dmin(dmin, words):
    with pytest.raises(ConfigError, match=words):
        ReciprocalSpace("P 43 21 2", GROUPS["P 43 21 2"], dmin)


def test_cell_must_match_the_space_group():
    with pytest.raises(ConfigError, match="metric symmetry"):
        ReciprocalSpace("P 61 2 2", (60.0, 60.0, 150.0, 90, 90, 90), 3.0)


# ----------------------------------------------------------------------------- cell helpers
# (issue 18, item 1: real cells are never exactly symmetric; the merge symmetrises them)


@pytest.mark.parametrize("name", sorted(GROUPS))
def test_symmetrize_cell_gives_a_cell_the_group_accepts(name):
    from streamvi.symmetry import symmetrize_cell

    rng = np.random.default_rng(sum(name.encode()))
    true = np.array(GROUPS[name])
    noisy = true * (1 + rng.normal(0, 0.003, 6))          # as an indexer reports it
    sym = symmetrize_cell(tuple(noisy), name)
    assert sym.is_compatible_with_spacegroup(parse_space_group(name))
    got = np.array(sym.parameters)
    assert np.allclose(got[:3], true[:3], rtol=0.01), (name, got)
    assert np.allclose(got[3:], true[3:], atol=1.5), (name, got)
    # a cell that already has the symmetry is left as it is
    assert np.allclose(symmetrize_cell(GROUPS[name], name).parameters, true, atol=1e-6)


def test_symmetrize_cell_of_the_issue():
    from streamvi.symmetry import symmetrize_cell

    sym = symmetrize_cell("79.1001 79.0984 37.9 89.9998 90 90.0005", "P 43 21 2")
    a, b, c, al, be, ga = sym.parameters
    assert a == pytest.approx(b) and a == pytest.approx(79.09925, abs=1e-4)
    assert (al, be, ga) == pytest.approx((90, 90, 90), abs=1e-9) and c == pytest.approx(37.9)
    # 5-HT2B: angles 90.55, 91.23, 90.54 in C 2 2 21 become 90
    sym = symmetrize_cell((61.5, 122.7, 168.8, 90.55, 91.23, 90.54), "C 2 2 21")
    assert np.allclose(sym.parameters, (61.5, 122.7, 168.8, 90, 90, 90), atol=0.01)


def test_cell_mismatch_names_the_parameter_beyond_tolerance():
    from streamvi.symmetry import cell_mismatch

    ref = (79.1, 79.1, 37.9, 90, 90, 90)
    assert cell_mismatch((79.5, 78.8, 38.2, 90.7, 89.4, 90.2), ref) is None
    msg = cell_mismatch((61.4, 122.6, 168.0, 90, 90, 90), ref)
    assert msg is not None and "c = 168" in msg and "37.9" in msg
    msg = cell_mismatch((79.1, 79.1, 37.9, 90, 90, 97.0), ref)
    assert msg is not None and "γ = 97" in msg
    assert cell_mismatch((79.1, 79.1, 37.9, 90, 90, 97.0), ref, angle_tolerance_deg=8) is None
    assert cell_mismatch((83.5, 79.1, 37.9, 90, 90, 90), ref, length_tolerance=0.06) is None


def test_consensus_cell_is_robust_to_a_hostile_first_crystal():
    from streamvi.symmetry import consensus_cell

    rng = np.random.default_rng(0)
    good = [tuple(np.array((61.5, 122.7, 168.8, 90, 90, 90)) + rng.normal(0, 0.5, 6))
            for _ in range(15)]
    hostile = (300.0, 12.0, 900.0, 60.0, 130.0, 100.0)
    cons = consensus_cell([hostile] + good, "C 2 2 21")
    assert np.allclose(cons.cell.parameters, (61.5, 122.7, 168.8, 90, 90, 90), atol=0.8)
    assert cons.n_crystals == 16 and cons.n_outliers == 1
    assert cons.symmetrized         # the median of noisy angles is not exactly 90
    assert cons.cell.is_compatible_with_spacegroup(gemmi.SpaceGroup("C 2 2 21"))
