import numpy as np

from streamvi.stats import (cc_star, pearson_by_group, resolution_at_cc, shell_edges,
                            shell_index, shell_statistics)
from streamvi.symmetry import ReciprocalSpace


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
    edges = shell_edges(d, 8)
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


def test_format_says_whether_cc_half_reached_the_cut():
    from streamvi.stats import ShellTable

    def table(cc):
        n = len(cc)
        d_min = [4.0, 3.0, 2.5, 2.0][:n]
        return ShellTable(d_max=[9.0] + d_min[:-1], d_min=d_min, n_unique=[10] * n,
                          n_possible=[10] * n, completeness=[1.0] * n, multiplicity=[2.0] * n,
                          i_over_sigma=[5.0] * n, cc_half=cc, cc_star=list(cc_star(np.array(cc))),
                          cc_anom=[0.0] * n, overall=dict(
                              d_max=9.0, d_min=2.0, completeness=1.0, multiplicity=2.0,
                              i_over_sigma=5.0, cc_half=0.9, cc_star=0.97, cc_anom=0.0,
                              n_unique=40), resolution_cc_half=resolution_at_cc(
                              np.array(d_min), np.array(cc)))

    # 1/d² halfway between the 3.0 and 2.5 Å edges
    assert "CC1/2 falls to 0.3 at d = 2.72 Å" in table([0.9, 0.5, 0.1, 0.0]).format()
    text = table([0.9, 0.8, 0.7, 0.6]).format()
    assert "stays above 0.3 to the edge of the merge (d = 2.00 Å)" in text
    assert "falls to" not in text


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
