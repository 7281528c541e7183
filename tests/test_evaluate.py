"""Judging merges against the truth (streamvi.quality.evaluate): every figure against numpy."""
from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import reciprocalspaceship as rs

from conftest import make_crystal
from streamvi.quality.evaluate import (average_merge, compare_to_truth, fitted_b_correlation,
                               partiality_corrected_merge, strong_reflection_ratios)
from streamvi.symmetry import ReciprocalSpace
from streamvi.wire import CrystalMessage


def test_inverse_variance_average_matches_numpy():
    sp = ReciprocalSpace("P 43 21 2", (79.1, 79.1, 37.9, 90, 90, 90), 3.0)
    rng = np.random.default_rng(0)
    msgs = [make_crystal(rng, n=100, image=f"i{j}") for j in range(20)]
    ds = average_merge(msgs, sp)
    rows = np.concatenate([sp.lookup(m.hkl()) for m in msgs])
    i = np.concatenate([m.I for m in msgs]).astype(np.float64)
    s = np.concatenate([m.sigI for m in msgs]).astype(np.float64)
    r = np.unique(rows[rows >= 0])[5]
    w = 1 / s[rows == r] ** 2
    want = (w * i[rows == r]).sum() / w.sum()
    got = ds.loc[tuple(int(x) for x in sp.hkl[r])]
    np.testing.assert_allclose(got["I"], want, rtol=1e-5)
    np.testing.assert_allclose(got["SIGI"], 1 / np.sqrt(w.sum()), rtol=1e-5)
    assert int(got["N"]) == (rows == r).sum()
    assert len(ds) == np.unique(rows[rows >= 0]).size
    # a table compared with itself correlates perfectly, shell by shell
    truth = ds.rename(columns={"F": "FMODEL"})
    c = compare_to_truth(ds, truth, n_shells=3)
    np.testing.assert_allclose(c["cc_F"], 1.0)
    assert c["n_common"] == len(ds)


# ------------------------------------------------------------------ hand-made tables

CUBE = (10.0, 10.0, 10.0, 90.0, 90.0, 90.0)
# four low-resolution (d 10–7 Å) and four high-resolution (d ≈ 2 Å) reflections of P 1
HKL = [(1, 0, 0), (0, 1, 0), (0, 0, 1), (1, 1, 0), (5, 0, 0), (0, 5, 0), (0, 0, 5), (5, 1, 0)]


def _table(values: dict[str, list[float]], hkl=HKL) -> rs.DataSet:
    h = np.array(hkl)
    ds = rs.DataSet({"H": h[:, 0], "K": h[:, 1], "L": h[:, 2], **values},
                    cell=CUBE, spacegroup="P 1", merged=True)
    return ds.astype({"H": "HKL", "K": "HKL", "L": "HKL"}).set_index(["H", "K", "L"])


def test_strong_reflections_are_chosen_by_e_and_scaled_per_shell():
    # true F: the low shell's 300 has E = 300/√(30000) = √3, the high shell's 5 has
    # E = 5/√7 ≈ 1.89: the high-resolution one is the strongest by E though F is 60× smaller
    truth = _table({"FMODEL": [100, 100, 100, 300, 1, 1, 1, 5]})
    merged = _table({"F": [100, 100, 100, 200, 1, 1, 1, 4]})
    one = strong_reflection_ratios(merged, truth, fraction=1 / 8, n_shells=2)
    # high shell: k = (3 + 20)/(3 + 16) = 23/19, ratio = 23/19 · 4/5 = 92/95
    assert one["hkl"] == [[5, 1, 0]] and one["n"] == 1
    assert one["ratio"][0] == pytest.approx(92 / 95, rel=1e-12)
    assert one["E"][0] == pytest.approx(5 / math.sqrt(7), rel=1e-12)
    assert one["d"][0] == pytest.approx(10 / math.sqrt(26), rel=1e-12)
    two = strong_reflection_ratios(merged, truth, fraction=0.25, n_shells=2)
    # low shell: k = (30000 + 60000)/(30000 + 40000) = 9/7, ratio = 9/7 · 200/300 = 6/7
    assert two["hkl"] == [[5, 1, 0], [1, 1, 0]]
    np.testing.assert_allclose(two["ratio"], [92 / 95, 6 / 7], rtol=1e-12)
    assert two["min"] == pytest.approx(6 / 7) and two["max"] == pytest.approx(92 / 95)
    assert two["worst"] == pytest.approx(6 / 7)          # farther from 1 than 92/95
    assert two["median"] == pytest.approx((6 / 7 + 92 / 95) / 2)
    # one shell: k = Σ F_m F_t / Σ F_m² over all eight
    flat = strong_reflection_ratios(merged, truth, fraction=1 / 8, n_shells=1)
    k = (3e4 + 6e4 + 3 + 20) / (3e4 + 4e4 + 3 + 16)
    assert flat["hkl"] == [[1, 1, 0]] and flat["ratio"][0] == pytest.approx(k * 200 / 300)
    # a merge that is the truth times anything per shell has every ratio at 1
    scaled = _table({"F": [7, 7, 7, 21, 0.5, 0.5, 0.5, 2.5]})
    assert strong_reflection_ratios(scaled, truth, fraction=1, n_shells=2)["ratio"] == \
        pytest.approx([1.0] * 8)
    with pytest.raises(ValueError, match="fraction"):
        strong_reflection_ratios(merged, truth, fraction=0)


def test_fitted_b_removes_a_resolution_trend():
    rng = np.random.default_rng(4)
    f_true = rng.uniform(1, 100, len(HKL))
    s2 = 0.25 * np.sum(np.array(HKL, float) ** 2, axis=1) / 100.0     # 1/(4d²), cube of 10 Å
    truth = _table({"FMODEL": f_true})
    merged = _table({"F": 3.0 * f_true * np.exp(-12.0 * s2)})
    fit = fitted_b_correlation(merged, truth)
    assert fit["b"] == pytest.approx(12.0, abs=1e-3)
    assert fit["cc_F"] == pytest.approx(1.0, abs=1e-9)
    unfitted = compare_to_truth(merged, truth, n_shells=2)["cc_F"]
    assert fit["cc_F_unfitted"] == pytest.approx(unfitted) and unfitted < 0.999
    # a negative B (amplitudes rising with resolution) the same way
    rising = _table({"F": f_true * np.exp(8.0 * s2)})
    assert fitted_b_correlation(rising, truth)["b"] == pytest.approx(-8.0, abs=1e-3)
    # with noise the best B is where the CC peaks: never below the unfitted CC, and no
    # B about it does better
    noisy = _table({"F": f_true * np.exp(-5.0 * s2) + rng.normal(0, 5, len(HKL))})
    fit = fitted_b_correlation(noisy, truth)
    assert fit["cc_F"] >= fit["cc_F_unfitted"]
    fm = noisy["F"].to_numpy()
    for b in np.linspace(fit["b"] - 3, fit["b"] + 3, 61):
        assert np.corrcoef(fm * np.exp(b * s2), f_true)[0, 1] <= fit["cc_F"] + 1e-9


def test_compare_to_truth_names_its_lowest_and_top_shells():
    truth = _table({"FMODEL": [100, 90, 80, 70, 4, 3, 2, 1]})
    merged = _table({"F": [100, 90, 80, 70, 1, 2, 3, 4]})
    c = compare_to_truth(merged, truth, n_shells=2)
    x, y = np.array([1, 2, 3, 4.0]), np.array([4, 3, 2, 1.0])
    assert c["cc_F_lowest_shell"] == pytest.approx(1.0)
    assert c["cc_F_top_shell"] == pytest.approx(np.corrcoef(x, y)[0, 1]) == c["cc_F_shells"][1]
    assert c["d_max"] == pytest.approx(10.0)
    assert c["d_min_shells"][-1] == pytest.approx(10 / math.sqrt(26))


def _msg(image: str, hkl, i, sig) -> CrystalMessage:
    hkl = np.array(hkl, dtype=np.int32).reshape(-1, 3)
    return CrystalMessage(run="r", image=image, crystal=0, h=hkl[:, 0], k=hkl[:, 1],
                          l=hkl[:, 2], I=np.array(i, np.float32),
                          sigI=np.array(sig, np.float32), photon_energy_eV=9500.0, cell=CUBE)


def test_partiality_corrected_mean_divides_by_the_true_factors():
    space = ReciprocalSpace("P 1", CUBE, 2.0)
    msgs = [
        _msg("a", [(1, 0, 0), (0, 1, 0)], [20, 8], [2, 4]),
        # reported in another setting: counted under its true index (1, 0, 0)
        _msg("b", [(0, 1, 0)], [33], [3]),
        # misindexed: left out whatever it says
        _msg("c", [(1, 0, 0)], [1000], [1]),
    ]
    truths = [
        SimpleNamespace(hkl=np.array([(1, 0, 0), (0, 1, 0)]), intensity_factor=[2.0, 4.0],
                        misindexed=False),
        SimpleNamespace(hkl=np.array([(1, 0, 0)]), intensity_factor=[3.0], misindexed=False),
        SimpleNamespace(hkl=np.array([(1, 0, 0)]), intensity_factor=[1.0], misindexed=True),
    ]
    ds = partiality_corrected_merge(msgs, truths, space)
    # (1,0,0): 20/2 ± 1 and 33/3 ± 1 → 10.5 ± 1/√2; (0,1,0): 8/4 ± 1
    assert ds.loc[(1, 0, 0), "I"] == pytest.approx(10.5)
    assert ds.loc[(1, 0, 0), "SIGI"] == pytest.approx(1 / math.sqrt(2))
    assert int(ds.loc[(1, 0, 0), "N"]) == 2
    assert ds.loc[(0, 1, 0), "I"] == pytest.approx(2.0) and ds.loc[(0, 1, 0), "F"] == \
        pytest.approx(math.sqrt(2))
    # the unweighted kind: (10 + 11)/2 and the spread of the two
    mean = partiality_corrected_merge(msgs, truths, space, weighting="mean")
    assert mean.loc[(1, 0, 0), "I"] == pytest.approx(10.5)
    assert mean.loc[(1, 0, 0), "SIGI"] == pytest.approx(0.5)
    with pytest.raises(ValueError, match="true intensity factors"):
        partiality_corrected_merge(msgs[:1], [truths[1]], space)
    with pytest.raises(ValueError, match="weighting"):
        average_merge(msgs, space, weighting="median")


def test_partiality_corrected_mean_beats_the_plain_ones_on_simulated_images():
    from streamvi_sim import SimulationConfig, Simulator

    cfg = SimulationConfig(n_images=150, seed=3, n_atoms=60, n_sulfur=2, n_iodide=1, dmin=3.0)
    sim = Simulator(cfg)
    pairs = [sim.image(i) for i in range(cfg.n_images)]
    msgs, truths = [m for m, _ in pairs], [t for _, t in pairs]
    space = ReciprocalSpace(cfg.space_group, cfg.cell, cfg.dmin)
    truth = sim.truth.to_dataset()
    cc = {name: compare_to_truth(ds, truth)["cc_F"] for name, ds in (
        ("pcorr", partiality_corrected_merge(msgs, truths, space)),
        ("ivar", average_merge(msgs, space)),
        ("mean", average_merge(msgs, space, weighting="mean")))}
    # 150 images at 3 Å: 0.82 against 0.70 / 0.71
    assert cc["pcorr"] > cc["mean"] + 0.05 and cc["pcorr"] > cc["ivar"] + 0.05, cc
    # on the truth's absolute scale (electrons²): the strong reflections within ~10 %
    # (inverse-variance weights favour low counts, so weak ones come out biased low)
    pc = partiality_corrected_merge(msgs, truths, space)
    common = pc.index.intersection(truth.index)
    true_i = truth.loc[common, "FMODEL"].to_numpy(np.float64) ** 2
    strong = true_i > np.quantile(true_i, 0.8)
    ratio = np.median(pc.loc[common, "I"].to_numpy(np.float64)[strong] / true_i[strong])
    assert 0.8 < ratio < 1.1
