import json

import numpy as np
import pytest

from streamvi.quality.stats import (MIN_PAIRS, ShellTable, attach_halfset_statistics,
                                    cc_star, correlation_by_shell, fisher_interval,
                                    fit_resolution, halfset_statistics, pearson,
                                    pearson_by_group, resolution_at_cc, shell_statistics)
from streamvi.symmetry import ReciprocalSpace, hkl_key, shell_edges, shell_index


def test_pearson_takes_the_finite_pairs_and_needs_three_with_spread():
    x = np.array([1.0, 2.0, np.nan, 4.0, 5.0])
    y = np.array([2.0, 4.1, 1.0, np.inf, 9.8])
    assert pearson(x, y) == pytest.approx(np.corrcoef([1, 2, 5], [2, 4.1, 9.8])[0, 1])
    assert np.isnan(pearson(x[:2], y[:2])) and np.isnan(pearson(np.ones(5), y))


def test_hkl_keys_sort_and_group_like_the_indices():
    hkl = np.array([[1, -2, 3], [-300000, 5, 0], [1, -2, 3], [0, 0, -1]])
    key = hkl_key(hkl)
    assert key[0] == key[2] and len(set(key.tolist())) == 3
    np.testing.assert_array_equal(np.argsort(key, kind="stable"),
                                  np.lexsort(hkl.T[::-1]))


def test_pearson_by_group_matches_numpy():
    rng = np.random.default_rng(0)
    x = rng.normal(size=600)
    y = 0.5 * x + rng.normal(size=600)
    g = rng.integers(0, 4, 600)
    cc, n = pearson_by_group(x, y, g, 5)
    for k in range(4):
        np.testing.assert_allclose(cc[k], np.corrcoef(x[g == k], y[g == k])[0, 1], rtol=1e-10)
        assert n[k] == (g == k).sum()
    assert np.isnan(cc[4])


def test_shells_have_equal_reciprocal_volume():
    d = np.linspace(1.8, 30, 1000)
    edges = shell_edges(d.max(), d.min(), 8)
    s3 = 1 / edges ** 3
    np.testing.assert_allclose(np.diff(s3), np.diff(s3)[0])
    assert edges[0] == 30 and np.isclose(edges[-1], 1.8)
    idx = shell_index(np.array([30.0, 1.8, edges[3] * 1.0001, edges[3] * 0.9999]), edges)
    np.testing.assert_array_equal(idx, [0, 7, 2, 3])


def test_resolution_at_cc_interpolates_in_one_over_d_squared():
    d_min = np.array([4.0, 3.0, 2.5, 2.0])
    cc = np.array([0.9, 0.5, 0.1, 0.0])
    d = resolution_at_cc(d_min, cc, 0.3)
    s = 1 / 3.0 ** 2 + 0.5 * (1 / 2.5 ** 2 - 1 / 3.0 ** 2)
    np.testing.assert_allclose(d, 1 / np.sqrt(s))
    assert resolution_at_cc(d_min, np.array([0.9, 0.8, 0.7, 0.6])) == 2.0
    assert resolution_at_cc(d_min, np.full(4, np.nan)) is None


def test_cc_star_formula():
    np.testing.assert_allclose(cc_star(np.array([0.5])), np.sqrt(2 * 0.5 / 1.5))
    assert np.isnan(cc_star(np.array([-0.1]))[0])
    # a shell of two anticorrelated pairs: NaN, not a divide-by-zero warning
    assert np.isnan(cc_star(np.array([-1.0]))[0])


def test_shell_statistics_counts_against_numpy():
    sp = ReciprocalSpace("P 21 21 21", (40, 50, 60, 90, 90, 90), 3.0, anomalous=True)
    rng = np.random.default_rng(1)
    n = sp.n_unique
    obs = np.zeros((3, n), np.int64)
    obs[1] = rng.poisson(1.0, n)
    obs[2] = rng.poisson(1.0, n)
    obs[0] = obs[1] + obs[2]
    truth = rng.gamma(1.0, 100.0, n)
    i_half = (truth + rng.normal(0, 10, n), truth + rng.normal(0, 10, n))
    i_full = 0.5 * (i_half[0] + i_half[1])
    st = shell_statistics(hkl=sp.hkl, d=sp.d, centric=sp.centric, friedel=sp.friedel,
                          obs_count=obs, i_full=i_full, sigi_full=np.full(n, 5.0),
                          i_half=i_half, f_half=(np.sqrt(np.abs(i_half[0])),
                                                 np.sqrt(np.abs(i_half[1]))),
                          anomalous=True, n_shells=5)
    # completeness per hkl: a Friedel pair counts once, observed if either mate is
    key = [tuple(h) for h in sp.hkl]
    seen: dict = {}
    for k, c in zip(key, obs[0]):
        seen[k] = seen.get(k, 0) + c
    assert st.overall["n_possible"] == len(seen)
    assert st.overall["n_unique"] == sum(1 for v in seen.values() if v > 0)
    assert st.overall["n_observations"] == obs[0].sum()
    assert sum(st.n_possible) == len(seen)
    both = (obs[1] > 0) & (obs[2] > 0)
    np.testing.assert_allclose(st.overall["cc_half"],
                               np.corrcoef(i_half[0][both], i_half[1][both])[0, 1])
    np.testing.assert_allclose(st.overall["i_over_sigma"], (i_full / 5.0)[obs[0] > 0].mean())
    assert st.overall["cc_half"] > 0.9
    assert "overall" in st.format()


def test_cc_half_ignores_a_shared_prior_trend_when_normalised():
    # two halves that know nothing but the prior mean, which falls with resolution: raw
    # intensities correlate through that trend alone, normalised ones do not
    sp = ReciprocalSpace("P 21 21 21", (40, 50, 60, 90, 90, 90), 3.0)
    rng = np.random.default_rng(2)
    n = sp.n_unique
    obs = np.ones((3, n), np.int64)
    expected = 1000.0 * np.exp(-10.0 / sp.d ** 2)
    halves = tuple(expected * (1.0 + 0.05 * rng.normal(size=n)) for _ in range(2))
    common = dict(hkl=sp.hkl, d=sp.d, centric=sp.centric, friedel=sp.friedel, obs_count=obs,
                  i_full=expected, sigi_full=np.ones(n), i_half=halves, n_shells=3)
    raw = shell_statistics(**common)
    normalised = shell_statistics(**common, expected_i=expected)
    assert raw.overall["cc_half"] > 0.9
    assert abs(normalised.overall["cc_half"]) < 0.1
    assert max(abs(c) for c in normalised.cc_half) < 0.15


# ---------------------------------------------------------------------- evidence (issue 17)


def test_fisher_interval_matches_scipy_on_known_correlations():
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(3)
    for rho, n in ((0.0, 25), (0.5, 40), (0.9, 200), (-0.3, 1000)):
        x = rng.normal(size=n)
        y = rho * x + np.sqrt(1 - rho ** 2) * rng.normal(size=n)
        res = stats.pearsonr(x, y)
        ci = res.confidence_interval(0.95)
        low, high = fisher_interval(res.statistic, n)
        np.testing.assert_allclose([low, high], [ci.low, ci.high], rtol=1e-9, atol=1e-12)


def test_fisher_interval_covers_the_true_correlation_95_percent_of_the_time():
    # 4,000 samples of 30 pairs at ρ = 0.6, one group each: the interval holds ρ in 95 %
    rng = np.random.default_rng(4)
    n_trials, n, rho = 4000, 30, 0.6
    x = rng.normal(size=(n_trials, n))
    y = rho * x + np.sqrt(1 - rho ** 2) * rng.normal(size=(n_trials, n))
    group = np.repeat(np.arange(n_trials), n)
    cc, pairs = pearson_by_group(x.ravel(), y.ravel(), group, n_trials)
    low, high = fisher_interval(cc, pairs)
    coverage = np.mean((low <= rho) & (rho <= high))
    assert 0.935 < coverage < 0.965, coverage


def test_fisher_interval_is_undefined_for_three_pairs_or_none():
    low, high = fisher_interval(np.array([0.5, np.nan, 0.2]), np.array([3, 50, 4]))
    assert np.isnan(low[0]) and np.isnan(high[0]) and np.isnan(low[1])
    assert low[2] < 0.2 < high[2]


def test_shells_with_too_few_pairs_report_their_count_and_no_value():
    rng = np.random.default_rng(5)
    shell = np.repeat([0, 1, 2], [MIN_PAIRS - 1, MIN_PAIRS, 500])
    x = rng.normal(size=shell.size)
    y = x + rng.normal(size=shell.size)
    corr = correlation_by_shell(x, y, shell, np.full(shell.size, 0.1), 4)
    assert list(corr.pairs) == [MIN_PAIRS - 1, MIN_PAIRS, 500, 0]
    assert np.isnan(corr.cc[0]) and np.isnan(corr.low[0]) and np.isnan(corr.cc[3])
    assert np.isfinite(corr.cc[1]) and corr.low[1] < corr.cc[1] < corr.high[1]
    np.testing.assert_allclose(corr.cc[2], np.corrcoef(x[shell == 2], y[shell == 2])[0, 1])
    assert corr.overall_pairs == shell.size
    np.testing.assert_allclose(corr.overall, np.corrcoef(x, y)[0, 1])


def _logistic_cc(s, a, b, c):
    return 1 / (1 + c + np.exp(a + b * s))


def test_resolution_fit_recovers_a_known_crossing_within_its_interval():
    # CC½ = 1/(1 + c + exp(a + b s)) crosses 0.3 at s* = (ln(1/0.3 − 1 − c) − a)/b
    a, b, c = -5.0, 20.0, 0.08
    s_star = (np.log(1 / 0.3 - 1 - c) - a) / b
    s = np.linspace(0.02, 0.34, 10)
    rng = np.random.default_rng(6)
    pairs = np.full(10, 2000)
    true = _logistic_cc(s, a, b, c)
    hits = 0
    for trial in range(20):
        noisy = true + rng.normal(0, (1 - true ** 2) / np.sqrt(pairs - 3))
        fit = fit_resolution(s, noisy, pairs, s_min=0.0, s_max=0.36)
        assert fit.state == "fit"
        assert fit.low < fit.d < fit.high
        hits += fit.low <= 1 / np.sqrt(s_star) <= fit.high
    assert hits >= 17
    assert abs(fit.d - 1 / np.sqrt(s_star)) < 0.05


def test_resolution_fit_says_beyond_dmin_rather_than_dmin():
    s = np.linspace(0.02, 0.3, 10)
    cc = _logistic_cc(s, -6.0, 10.0, 0.02)            # still 0.6 in the last shell
    fit = fit_resolution(s, cc, np.full(10, 500), s_min=0.0, s_max=0.31)
    assert fit.state == "beyond_dmin" and fit.beyond_dmin and fit.d is None
    assert fit.describe(1.8) == "beyond dmin (1.80 Å)"
    low = fit_resolution(s, np.full(10, 0.1), np.full(10, 500), s_min=0.0, s_max=0.31)
    assert low.state == "below_dmax"
    few = fit_resolution(s, np.where(s < 0.07, 0.9, np.nan), np.full(10, 500), s_min=0.0,
                         s_max=0.31)
    assert few.state == "too_few_shells"


def _random_merge(anomalous=True, seed=1):
    sp = ReciprocalSpace("P 21 21 21", (40, 50, 60, 90, 90, 90), 2.5, anomalous=anomalous)
    rng = np.random.default_rng(seed)
    n = sp.n_unique
    obs = np.zeros((3, n), np.int64)
    obs[1] = rng.poisson(2.0, n)
    obs[2] = rng.poisson(2.0, n)
    obs[0] = obs[1] + obs[2]
    # one intensity per hkl: Friedel mates alike (no anomalous signal)
    _, per_hkl = np.unique(sp.hkl, axis=0, return_inverse=True)
    truth = rng.gamma(1.0, 100.0, n)[per_hkl.reshape(-1)]
    sums = np.stack([obs[k + 1] * truth + np.sqrt(obs[k + 1]) * rng.normal(0, 60, n)
                     for k in range(2)])
    return sp, obs, truth, sums


def test_halfset_statistics_are_the_correlation_of_the_half_averages():
    sp, obs, truth, sums = _random_merge()
    half, anom = halfset_statistics(hkl=sp.hkl, d=sp.d, centric=sp.centric, friedel=sp.friedel,
                                    obs_count=obs, sum_i_half=sums, expected_i=None,
                                    anomalous=True, n_shells=4)
    both = (obs[1] > 0) & (obs[2] > 0)
    means = sums / np.maximum(obs[1:], 1)
    shell = shell_index(sp.d, shell_edges(sp.d.max(), sp.d.min(), 4))
    for k in range(4):
        sel = both & (shell == k)
        np.testing.assert_allclose(half.cc[k], np.corrcoef(means[0][sel], means[1][sel])[0, 1])
        assert half.pairs[k] == sel.sum()
    assert half.overall > 0.8
    # no anomalous signal in these sums: CCanom near zero, with its evidence
    assert anom.overall_pairs > 100 and abs(anom.overall) < 0.2
    assert anom.overall_low < anom.overall < anom.overall_high


def test_table_text_json_and_history_carry_the_evidence():
    sp, obs, truth, sums = _random_merge()
    n = sp.n_unique
    i_half = (sums[0] / np.maximum(obs[1], 1), sums[1] / np.maximum(obs[2], 1))
    table = shell_statistics(hkl=sp.hkl, d=sp.d, centric=sp.centric, friedel=sp.friedel,
                             obs_count=obs, i_full=truth, sigi_full=np.ones(n), i_half=i_half,
                             f_half=tuple(np.sqrt(np.abs(x)) for x in i_half),
                             anomalous=True, n_shells=6)
    attach_halfset_statistics(table, hkl=sp.hkl, d=sp.d, centric=sp.centric,
                              friedel=sp.friedel, obs_count=obs, sum_i_half=sums,
                              expected_i=None)
    assert len(table.cc_half_pairs) == len(table.cc_half_data_low) == 6
    assert table.overall["cc_half_pairs"] == ((obs[1] > 0) & (obs[2] > 0)).sum()
    text = table.format()
    assert "pairs" in text and "CC1/2dat" in text and "overall" in text
    lines = table.history_lines()
    assert all(len(line) <= 80 for line in lines)
    assert any("n=" in line and "[" in line for line in lines)
    payload = json.dumps(table.to_dict(), allow_nan=False)     # null, never NaN
    assert "NaN" not in payload
    # a table with too few pairs in every shell says so, in text and in JSON
    few = shell_statistics(hkl=sp.hkl, d=sp.d, centric=sp.centric, friedel=sp.friedel,
                           obs_count=obs, i_full=truth, sigi_full=np.ones(n), i_half=i_half,
                           anomalous=False, n_shells=6, min_pairs=10 ** 6)
    assert "few" in few.format()
    assert few.to_dict()["cc_half"] == [None] * 6
    assert few.resolution["state"] == "too_few_shells"
    assert "too few pairs" in few.format() or "too few" in few.format()


def test_shell_table_made_by_hand_still_formats():
    table = ShellTable(d_max=[9.0, 4.0], d_min=[4.0, 3.0], n_unique=[10, 10],
                       n_possible=[10, 10], completeness=[1.0, 1.0], multiplicity=[2.0, 2.0],
                       i_over_sigma=[5.0, 5.0], cc_half=[0.9, 0.5], cc_star=[0.97, 0.8],
                       cc_anom=[np.nan, np.nan],
                       overall=dict(d_max=9.0, d_min=3.0, completeness=1.0, multiplicity=2.0,
                                    i_over_sigma=5.0, cc_half=0.9, cc_star=0.97,
                                    cc_anom=np.nan, n_unique=20))
    assert "overall" in table.format()
    assert len(table.history_lines()) >= 3
