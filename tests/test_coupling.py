"""The double-Wilson prior between conditions (streamvi/merging/model/coupling.py), against
scipy's Rice and folded-normal densities and the Wilson prior it must reduce to at r = 0."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import stats

from streamvi.merging.model.coupling import R_MAX, DoubleWilsonCoupling, difference_gains
from streamvi.merging.model.prior import WilsonPrior


def _coupling(r: float, n_rows: int) -> DoubleWilsonCoupling:
    c = DoubleWilsonCoupling(torch.zeros(n_rows, dtype=torch.long), 1, 2, 0)
    with torch.no_grad():
        c.raw.fill_(float(np.log(r / R_MAX / (1 - r / R_MAX))) if r > 0 else -np.inf)
    return c


@pytest.mark.parametrize("r", [0.3, 0.9, 0.99])
def test_acentric_conditional_is_scipys_rice(r):
    rng = np.random.default_rng(0)
    n = 200
    var = rng.uniform(0.5, 4.0, n)
    f_ref = rng.rayleigh(np.sqrt(var / 2))
    f = rng.rayleigh(np.sqrt(var / 2))
    c = _coupling(r, n)
    got = c.log_prob(torch.tensor(f), torch.tensor(f_ref), torch.ones(n, dtype=torch.long),
                     torch.arange(n), torch.tensor(var), torch.zeros(n, dtype=torch.bool))
    sigma = np.sqrt(var * (1 - r * r) / 2)
    want = stats.rice.logpdf(f / sigma, b=r * f_ref / sigma) - np.log(sigma)
    np.testing.assert_allclose(got.detach().double().numpy(), want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("r", [0.3, 0.95])
def test_centric_conditional_is_scipys_folded_normal(r):
    rng = np.random.default_rng(1)
    n = 200
    var = rng.uniform(0.5, 4.0, n)
    f_ref, f = (np.abs(rng.normal(0, np.sqrt(var))) for _ in range(2))
    c = _coupling(r, n)
    got = c.log_prob(torch.tensor(f), torch.tensor(f_ref), torch.ones(n, dtype=torch.long),
                     torch.arange(n), torch.tensor(var), torch.ones(n, dtype=torch.bool))
    sd = np.sqrt(var * (1 - r * r))
    want = stats.foldnorm.logpdf(f, c=r * f_ref / sd, scale=sd)
    np.testing.assert_allclose(got.detach().double().numpy(), want, rtol=1e-4, atol=1e-4)


def test_uncorrelated_conditions_have_the_wilson_prior():
    n = 50
    centric = torch.arange(n) % 3 == 0
    var = torch.linspace(0.5, 3.0, n)
    wilson = WilsonPrior(centric, torch.ones(n), var)
    f = torch.linspace(0.05, 4.0, n)
    got = _coupling(0.0, n).log_prob(f, torch.full((n,), 2.0), torch.ones(n, dtype=torch.long),
                                     torch.arange(n), var, centric)
    np.testing.assert_allclose(got.detach().numpy(), wilson.log_prob(f, torch.arange(n)).numpy(),
                               rtol=1e-5, atol=1e-5)


def test_a_strong_reference_and_a_large_argument_stay_finite_with_gradients():
    c = _coupling(0.999, 3)
    f = torch.tensor([1e-8, 50.0, 300.0], requires_grad=True)
    f_ref = torch.tensor([300.0, 50.0, 1e-8], requires_grad=True)
    lp = c.log_prob(f, f_ref, torch.ones(3, dtype=torch.long), torch.arange(3),
                    torch.ones(3), torch.zeros(3, dtype=torch.bool))
    lp.sum().backward()
    assert torch.isfinite(lp).all()
    assert torch.isfinite(f.grad).all() and torch.isfinite(f_ref.grad).all()
    assert torch.isfinite(c.raw.grad).all()


def test_bad_layouts_are_refused():
    with pytest.raises(ValueError, match="at least two conditions"):
        DoubleWilsonCoupling(torch.zeros(4, dtype=torch.long), 1, 1, 0)
    with pytest.raises(ValueError, match="reference condition 2 out of range"):
        DoubleWilsonCoupling(torch.zeros(4, dtype=torch.long), 1, 2, 2)
    with pytest.raises(ValueError, match="row_shell must lie in 0..2"):
        DoubleWilsonCoupling(torch.tensor([0, 3]), 3, 2, 0)


@pytest.mark.parametrize("centric", [False, True])
def test_difference_gains_are_those_of_the_gaussian_posterior(centric):
    """From the mean-field σ alone (1/√Λᵢᵢ of a Gaussian posterior with known data
    precisions), the gains of ΔF match a direct solve of that posterior's linear system:
    coupled (Wilson on the reference, the conditional on the condition) and independent."""
    rng = np.random.default_rng(5)
    n = 200
    var = rng.uniform(0.5, 3.0, n)
    r = rng.uniform(0.5, 0.99, n)
    p_ref, p = rng.uniform(0.5, 50.0, n), rng.uniform(0.5, 50.0, n)    # data precisions
    tau2 = var * (1 - r * r) * (1.0 if centric else 0.5)
    w = (1.0 if centric else 2.0) / var
    expected_c, expected_i, sd_ref, sd = (np.empty(n) for _ in range(4))
    for j in range(n):
        data = np.diag([p_ref[j], p[j]])
        coupled = data + np.array([[w[j] + r[j] ** 2 / tau2[j], -r[j] / tau2[j]],
                                   [-r[j] / tau2[j], 1.0 / tau2[j]]])
        independent = data + np.diag([w[j], w[j]])
        change = data @ np.array([-0.5, 0.5])
        moved = np.linalg.solve(coupled, change)
        expected_c[j] = moved[1] - moved[0]
        moved = np.linalg.solve(independent, change)
        expected_i[j] = moved[1] - moved[0]
        sd_ref[j], sd[j] = 1.0 / np.sqrt(np.diag(coupled))
    g_c, g_i = difference_gains(sd_ref, sd, var, np.full(n, centric), r)
    np.testing.assert_allclose(g_c, expected_c, rtol=1e-9)
    np.testing.assert_allclose(g_i, expected_i, rtol=1e-9)
    assert np.all((g_c > 0) & (g_c < g_i) & (g_i <= 1))   # the coupling shrinks ΔF more


def test_difference_gains_without_correlation_are_the_independent_ones():
    """At r = 0 the conditional is the Wilson prior itself: both gains agree; rows with
    no σ give NaN."""
    var = np.array([1.0, 2.0, 1.0])
    sd_ref, sd = np.array([0.2, 0.3, 0.0]), np.array([0.25, 0.1, 0.2])
    g_c, g_i = difference_gains(sd_ref, sd, var, np.array([False, True, False]),
                                np.zeros(3))
    np.testing.assert_allclose(g_c[:2], g_i[:2], rtol=1e-12)
    assert np.isnan(g_c[2]) and np.isnan(g_i[2])
