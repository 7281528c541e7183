"""Light-minus-dark differences: the q-weighted coefficients (streamvi/quality/difference.py)
and the difference MTZ (streamvi/publish/mtz.py), read back with gemmi and reciprocalspaceship."""
from __future__ import annotations

from types import SimpleNamespace

import gemmi
import numpy as np
import pytest
import reciprocalspaceship as rs

from streamvi.publish.mtz import difference_dataset, write_difference_mtz
from streamvi.quality.difference import (calibrate_sigma, correct_gain,
                                         difference_coefficients, difference_figures)
from streamvi.symmetry import ReciprocalSpace


def test_weights_follow_the_ursby_bourgeois_ren_form():
    rng = np.random.default_rng(0)
    n = 400
    d = np.full(n, 3.0)                         # one shell: the means are over everything
    f_dark = rng.uniform(50, 100, n)
    f_light = f_dark + rng.normal(0, 5, n)
    s_l, s_d = rng.uniform(1, 4, n), rng.uniform(1, 4, n)
    out = difference_coefficients(f_light, s_l, f_dark, s_d, d, alpha=0.05)
    df = f_light - f_dark
    var = s_l ** 2 + s_d ** 2
    w = 1.0 / (1.0 + var / var.mean() + 0.05 * df ** 2 / np.mean(df ** 2))
    np.testing.assert_allclose(out.DF, df)
    np.testing.assert_allclose(out.SIGDF, np.sqrt(var))
    np.testing.assert_allclose(out.W, w)
    np.testing.assert_allclose(out.WDF, w * df)
    assert np.all((out.W > 0) & (out.W < 1))
    # a noisy difference counts less than an equal precise one
    f_light[:2], f_dark[:2], s_l[:2], s_d[:2] = 110.0, 100.0, (1.0, 20.0), (1.0, 20.0)
    noisy = difference_coefficients(f_light, s_l, f_dark, s_d, d)
    assert noisy.W[1] < noisy.W[0]
    # a missing amplitude gives NaN, not a wrong number
    f_light[5] = np.nan
    assert np.isnan(difference_coefficients(f_light, s_l, f_dark, s_d, d).WDF[5])
    with pytest.raises(ValueError, match="alpha"):
        difference_coefficients(f_light, s_l, f_dark, s_d, d, alpha=-1)


def _shrunk_differences(rng, n, *, signal_sd, gain, half_gain, wrong=3.0):
    """ΔF of a merge that shrinks: the full-data ΔF = g·(Δ + noise), each half's
    g½·(Δ + its own noise, twice the variance), the mean-field σ ``wrong`` times the real
    noise's sd (right in shape).  Returns ΔF, σ_mf, the halves' ΔF, d and the real noise sd of
    the full ΔF and the true Δ."""
    d = 1.0 / np.cbrt(rng.uniform(1 / 40.0 ** 3, 1 / 2.0 ** 3, n))
    noise_sd = rng.uniform(0.5, 2.0, n) * (1.0 + 2.0 / d)     # noisier at high resolution
    true = rng.normal(0.0, signal_sd, n)
    n1, n2 = (rng.normal(0.0, np.sqrt(2.0) * noise_sd) for _ in range(2))
    df = gain * (true + 0.5 * (n1 + n2))
    h1, h2 = half_gain * (true + n1), half_gain * (true + n2)
    return df, wrong * noise_sd, h1, h2, d, gain * noise_sd, true


@pytest.mark.parametrize("signal_sd, gain, half_gain", [
    (0.0, 0.3, 0.18),       # no change, strong shrinkage (the coupled prior's kind)
    (2.0, 0.3, 0.18),       # a change, strong shrinkage
    (2.0, 1.0, 1.0),        # no shrinkage: the classic half-set estimate
    (1.0, 0.8, 0.65)])
def test_sigma_calibration_finds_the_scatter_of_a_shrunk_difference(signal_sd, gain, half_gain):
    rng = np.random.default_rng(3)
    df, sig, h1, h2, d, real, true = _shrunk_differences(rng, 20000, signal_sd=signal_sd, gain=gain,
                                                   half_gain=half_gain)
    cal = calibrate_sigma(df, sig, h1, h2, d, n_shells=8)
    assert cal.calibrated and np.all(cal.pairs >= 2000)
    # the mean-field σ is 3× the real sd: the factor is 1/3 of what no prior's gain hides
    np.testing.assert_allclose(cal.shell_factor, gain / 3.0, rtol=0.06)   # real / sig
    np.testing.assert_allclose(cal.pooled, gain / 3.0, rtol=0.03)
    z = df / (sig * cal.factor)
    if signal_sd == 0.0:
        # no change: |ΔF|/σ beyond 3 as rare as for a unit normal (0.27 %)
        assert 0.001 < np.mean(np.abs(z) > 3.0) < 0.006
        # and before: none, the mean-field σ hid everything
        assert np.mean(np.abs(df / sig) > 3.0) == 0.0
    # the published ΔF's noise (what is left of it after its shrunk signal) in calibrated σ:
    # unit variance
    assert abs(np.std((df - gain * true) / (sig * cal.factor)) - 1.0) < 0.04


def test_sigma_calibration_needs_halves_that_differ_and_enough_pairs():
    rng = np.random.default_rng(4)
    df, sig, h1, h2, d, _, _ = _shrunk_differences(rng, 500, signal_sd=1.0, gain=0.5,
                                                   half_gain=0.4)
    # halves identical to the full table (no half-datasets): nothing to measure the scatter by
    same = calibrate_sigma(df, sig, df, df, d)
    assert not same.calibrated and np.all(same.factor == 1.0)
    # too few reflections in both halves: the mean-field σ is kept
    few = h1.copy()
    few[15:] = np.nan
    sparse = calibrate_sigma(df, sig, few, h2, d)
    assert not sparse.calibrated and np.all(sparse.factor == 1.0)
    # shells short of pairs take the pooled factor; NaN ΔF keeps factor 1
    some = calibrate_sigma(df, sig, h1, h2, d, n_shells=20, min_pairs_shell=30)
    assert some.calibrated and np.any(np.isnan(some.shell_factor))
    short = np.isnan(some.shell_factor)
    assert np.all(np.isfinite(some.shell_factor[~short]))
    df[0] = np.nan
    again = calibrate_sigma(df, sig, h1, h2, d)
    assert again.factor[0] == 1.0 and np.all(again.factor[1:] != 1.0)


def _snapshot(space, f, sigf, observed, step=7, n_images=10):
    n = space.n_unique
    table = {"F": f, "SIGF": sigf, "I": f ** 2, "SIGI": 2 * f * sigf}
    obs = np.zeros((3, n), np.int64)
    obs[0, observed] = 2
    obs[1, observed] = obs[2, observed] = 1
    return SimpleNamespace(space=space, tables={"all": table, "half1": table, "half2": table},
                           obs_count=obs, step=step, n_images=n_images, history=[])


def test_difference_mtz_round_trip(tmp_path):
    space = ReciprocalSpace("P 43 21 2", (79.1, 79.1, 37.9, 90, 90, 90), 4.0)
    n = space.n_unique
    rng = np.random.default_rng(1)
    f_dark = rng.uniform(10, 20, n)
    f_light = f_dark + rng.normal(0, 1, n)
    sig = np.full(n, 0.5)
    seen_dark = np.arange(n) % 7 != 0
    seen_light = np.arange(n) % 5 != 0
    light = _snapshot(space, f_light, sig, seen_light)
    dark = _snapshot(space, f_dark, sig, seen_dark)
    path = write_difference_mtz(light, dark, tmp_path / "x-light-minus-dark.mtz",
                                names=("light", "dark"))
    mtz = gemmi.read_mtz_file(str(path))
    assert mtz.column_labels() == ["H", "K", "L", "DF", "SIGDF", "W", "WDF", "F_DARK",
                                   "SIGF_DARK"]
    assert [c.type for c in mtz.columns][3:] == ["F", "Q", "W", "F", "F", "Q"]
    assert any("Ursby & Bourgeois 1997" in h for h in mtz.history)
    back = rs.read_mtz(str(path))
    both = seen_dark & seen_light
    assert len(back) == int(both.sum())        # reflections observed in both conditions
    rows = space.lookup(back.get_hkls())
    np.testing.assert_allclose(back["DF"].to_numpy(), (f_light - f_dark)[rows], atol=1e-5)
    np.testing.assert_allclose(back["SIGDF"].to_numpy(), np.sqrt(0.5), rtol=1e-6)
    np.testing.assert_allclose(back["F_DARK"].to_numpy(), f_dark[rows], rtol=1e-6)
    ds = difference_dataset(light, dark)
    np.testing.assert_allclose(back["WDF"].to_numpy(), ds["WDF"].to_numpy(), rtol=1e-6)
    # half tables identical to the full one: nothing to calibrate σ(ΔF) by, and it says so
    assert any("too few half-set pairs" in h for h in mtz.history)
    fig = difference_figures(light, dark, dataset=ds)
    assert fig["sigdf_calibrated"] is False and fig["sigdf_factor"] == fig["sigdf_d_min"] == []
    z = np.abs(ds["DF"] / ds["SIGDF"]).to_numpy()
    assert fig["significant"] == int(np.sum(z > 3.0)) and fig["reflections"] == len(ds)


def test_the_true_difference_maps_peaks_sit_on_the_moved_atoms(tmp_path):
    """The light-minus-dark map from the true ΔF and the dark model's phases: its deepest
    holes are on the moved atoms' dark sites, its highest peaks near them (1.5 Å moves),
    each named by the model's nearest atom."""
    from streamvi_sim import SimulationConfig, simulate_structure
    from streamvi_sim.conditions import changed_atoms, condition_truths, delta_dataset

    from streamvi.quality.anomalous import PhasingModel
    from streamvi.quality.difference import difference_peaks

    sim = SimulationConfig(seed=4, dmin=2.5, conditions=("dark", "light"),
                           light_change="move=3,shift=1.5,fraction=0.5")
    dark = simulate_structure(sim)
    delta = delta_dataset(*(condition_truths(sim, dark)[c] for c in ("dark", "light")))
    dark.write_model(tmp_path / "dark.pdb")
    model = PhasingModel(tmp_path / "dark.pdb", require_heavy=False)
    labels = [f"{c.chain.name}/{c.residue.name}{c.residue.seqid.num}/{c.atom.name}"
              for c in model.structure[0].all()]
    moved = {labels[i] for i in changed_atoms(sim, dark.atoms, dark.gemmi_cell).moved}
    out = difference_peaks(delta.cell, delta.spacegroup, delta.get_hkls(),
                           delta["DF"].to_numpy(np.float64), model, dmin=2.5, n=5)
    assert out["n_reflections"] == len(delta)
    holes, peaks = out["negative"][:3], out["positive"][:3]
    assert {p["nearest_atom"] for p in holes} == moved
    assert all(p["distance"] < 1.0 and p["sigma"] < -10 for p in holes)
    assert all(p["sigma"] > 10 for p in peaks)
    # the rest of the map is noise-free but for the change: far weaker
    assert abs(out["negative"][3]["sigma"]) < 0.3 * abs(holes[-1]["sigma"])
    # a live service asks for a growing table every publish: the structure factors are
    # computed once for the merge's cell and dmin, and every subset reads the same phases
    hkl = delta.get_hkls()
    every = model.phases(delta.cell, delta.spacegroup, hkl, 2.5)
    factors = model._factors[1]
    for n in range(100, 1000, 100):
        np.testing.assert_array_equal(model.phases(delta.cell, delta.spacegroup, hkl[:n], 2.5),
                                      every[:n])
    assert model._factors[1] is factors


def test_gain_correction_gives_the_change_its_size_and_keeps_the_contrast():
    """A merge that shrinks ΔF by a gain falling with resolution (the coupled prior's
    kind): with the gains per reflection, each shell's ΔF regains the size of the true
    change (least-squares slope 1 within the noise), while ΔF / σ(ΔF) and the q-weight
    stay as they were (one factor per shell)."""
    rng = np.random.default_rng(11)
    n = 20000
    d = 1.0 / np.cbrt(rng.uniform(1 / 40.0 ** 3, 1 / 2.0 ** 3, n))
    g_true = 0.6 - 0.4 * (1.0 / d ** 2 - 1 / 40.0 ** 2) / (0.25 - 1 / 40.0 ** 2)  # 0.6 → 0.2
    true = rng.normal(0.0, 3.0, n)
    noise = rng.normal(0.0, 1.0, n)
    df = g_true * (true + noise)
    f_dark = np.full(n, 100.0)
    s = np.full(n, 1.0)
    # the gains as a merge reports them: right on average, scattered per reflection
    g_c = g_true * rng.uniform(0.8, 1.2, n)
    g_i = np.full(n, 1.0)
    plain = difference_coefficients(f_dark + df, g_true * s, f_dark, 0 * s, d)
    fixed = difference_coefficients(f_dark + df, g_true * s, f_dark, 0 * s, d,
                                    gains=(g_c, g_i))
    assert fixed.gain is not None and fixed.gain.shell_factor.shape == (10,)
    np.testing.assert_allclose(fixed.DF / fixed.SIGDF, plain.DF / plain.SIGDF)
    np.testing.assert_allclose(fixed.W, plain.W)
    # the map's coefficients keep the merge's ΔF: W times the difference as merged
    np.testing.assert_allclose(fixed.WDF, plain.W * df)
    np.testing.assert_allclose(fixed.WDF, plain.WDF)
    edges = np.concatenate([[np.inf], fixed.gain.d_min])
    for j in range(10):
        m = (d <= edges[j]) & (d > edges[j + 1]) if j < 9 else (d <= edges[j])
        slope_plain = np.sum(plain.DF[m] * true[m]) / np.sum(true[m] ** 2)
        slope = np.sum(fixed.DF[m] * true[m]) / np.sum(true[m] ** 2)
        assert slope_plain < 0.65
        assert abs(slope - 1.0) < 0.06, (j, slope)
    # unknown gains leave a reflection as it was
    g_c[:10] = np.nan
    again = correct_gain(g_c, g_i, d)
    np.testing.assert_array_equal(again.factor[:10], 1.0)
