"""The coupled ("double-Wilson") prior between conditions of a pump–probe merge.

Conditions of a time-resolved experiment are nearly the same structure.  Each condition's
amplitudes other than the reference's get, instead of the Wilson prior, the conditional of a
bivariate Wilson distribution given the reference's amplitude of the same reflection
(Read's treatment of two related structures; the "double Wilson" of careless):

- acentric: ``p(F | F_ref) = Rice(F; ν = r·F_ref, σ² = εΣ(1 − r²)/2)``
  ``= 2F/v · exp(−(F² + r²F_ref²)/v) · I₀(2 r F F_ref / v)`` with ``v = εΣ(1 − r²)``;
- centric: ``F | F_ref ~ |N(r·F_ref, εΣ(1 − r²))|`` (the same sign for both, the case that
  dominates when ``r`` is near 1).

The same conditional takes a fixed prior instead of a condition: amplitudes from an
independent data set of the same crystal (``streamvi merge --prior-mtz``), normalised per
shell (``E = F / √⟨F²/ε⟩``) and put on the merge's Wilson scale at every use
(``F = E · √(εΣ)``), serve as the reference condition's "reference"; rows the file lacks keep
the Wilson prior.

``r`` is the correlation of the two complex structure factors (``E[F Fᵣ*] / εΣ``), one per
(condition, resolution shell), learnt from the data with the rest of the objective.  Where
the conditions agree the light amplitudes borrow the reference's precision; a reflection
that changed keeps the spread ``εΣ(1 − r²)`` its shell's changes call for.  The reference
condition keeps the Wilson prior, so the pair's prior is the proper joint
``p(F_ref) p(F | F_ref)``.
"""
from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

#: amplitude floor inside logarithms (a folded-normal sample can round to 0 in float32)
_F_FLOOR = 1e-30
#: starting correlation: conditions begin as near the same structure
INITIAL_CORRELATION = 0.95
#: correlations are kept inside [R_MIN, R_MAX]: at 1 the conditional collapses to a point
R_MIN, R_MAX = 0.0, 0.9995


def _logit(p: float) -> float:
    return math.log(p / (1.0 - p))


class DoubleWilsonCoupling(nn.Module):
    """Per-(condition, shell) correlation ``r`` and the conditional log-density.

    Parameters
    ----------
    row_shell
        ``(n_rows,)`` resolution shell (0..n_shells−1) of every unique reflection.
    n_shells
        Number of shells, each with its own ``r`` per condition.
    n_conditions
        Conditions merged side by side.
    reference
        Index of the reference condition (its amplitudes keep the Wilson prior, or take the
        conditional given ``fixed``).
    fixed
        ``(n_rows,)`` normalised amplitudes ``E`` of a fixed prior (:func:`normalised_amplitudes`;
        NaN where it has none), or None.
    """

    def __init__(self, row_shell: torch.Tensor, n_shells: int, n_conditions: int,
                 reference: int, fixed: torch.Tensor | None = None) -> None:
        super().__init__()
        row_shell = torch.as_tensor(row_shell, dtype=torch.long).reshape(-1)
        if n_conditions < 2 and fixed is None:
            raise ValueError("a coupled prior needs at least two conditions or a fixed prior")
        if not 0 <= reference < n_conditions:
            raise ValueError(f"reference condition {reference} out of range "
                             f"0..{n_conditions - 1}")
        if row_shell.numel() and (int(row_shell.min()) < 0 or int(row_shell.max()) >= n_shells):
            raise ValueError(f"row_shell must lie in 0..{n_shells - 1}")
        self.n_shells = int(n_shells)
        self.n_conditions = int(n_conditions)
        self.reference = int(reference)
        self.register_buffer("row_shell", row_shell.contiguous())
        if fixed is not None:
            fixed = torch.as_tensor(fixed, dtype=torch.float32).reshape(-1)
            if fixed.shape != row_shell.shape:
                raise ValueError(f"fixed has {fixed.shape[0]} rows, row_shell {row_shell.shape[0]}")
        #: ``(n_rows,)`` normalised amplitudes of the fixed prior (NaN: none), or None
        self.fixed: torch.Tensor | None
        self.register_buffer("fixed", None if fixed is None else fixed.contiguous())
        # r = R_MAX · sigmoid(raw): smooth, never 1
        start = _logit(INITIAL_CORRELATION / R_MAX)
        self.raw = nn.Parameter(torch.full((self.n_conditions, self.n_shells), start,
                                           dtype=torch.float32))

    @property
    def n_rows(self) -> int:
        return int(self.row_shell.shape[0])

    def correlation(self) -> torch.Tensor:
        """``(n_conditions, n_shells)`` the current ``r`` (the reference's row is unused)."""
        return R_MAX * torch.sigmoid(self.raw)

    def log_prob(self, F: torch.Tensor, F_ref: torch.Tensor, condition: torch.Tensor,
                 rows: torch.Tensor, variance: torch.Tensor, centric: torch.Tensor
                 ) -> torch.Tensor:
        """Log-density of ``F`` given the reference's ``F_ref`` (both ``(..., n)``).

        Parameters
        ----------
        F, F_ref
            Amplitudes of the condition and of the reference, same shape.
        condition, rows
            ``(n,)`` condition and unique-reflection index of each column.
        variance, centric
            ``(n,)`` the Wilson ``εΣ`` and the centric flag of each column.
        """
        r = self.correlation()[condition, self.row_shell[rows]]
        v = variance * (1.0 - r * r)
        Fc = F.clamp_min(_F_FLOOR)
        Fr = F_ref.clamp_min(0.0)
        x = 2.0 * r * Fc * Fr / v
        # I0(x) = e^x i0e(x): the exponent is then −(F − r F_ref)²/v, no large terms that
        # cancel where the reference is strong
        acentric = (math.log(2.0) + torch.log(Fc) - torch.log(v)
                    - (Fc - r * Fr) ** 2 / v + torch.log(torch.special.i0e(x)))
        mu = r * Fr
        a = -0.5 * (F - mu) ** 2 / v
        b = -0.5 * (F + mu) ** 2 / v
        centric_lp = (torch.logaddexp(a, b) - 0.5 * torch.log(v)
                      - 0.5 * math.log(2.0 * math.pi))
        return torch.where(centric, centric_lp, acentric)


def difference_gains(sd_ref: np.ndarray, sd: np.ndarray, variance: np.ndarray,
                     centric: np.ndarray, r: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """How much of a change in the data each row's ΔF = F − F_ref keeps: under the coupled
    prior, and under independent Wilson priors (the gains of a Gaussian approximation).

    The coupled prior is a shrinkage estimate of ΔF: it pulls the condition's amplitude
    towards ``r·F_ref`` and the reference's towards the condition's.  In a Gaussian
    approximation of the pair's posterior (precision ``Λ = D + Π``: the data's precisions
    ``D = diag(p_ref, p)``, the prior's ``Π``) a change ``δ`` of the data's difference moves
    the posterior means' difference by ``g·δ``, ``g = [Λ⁻¹ D (−½, ½)ᵀ]`` differenced.  The
    mean-field surrogate's σ are ``1/√Λᵢᵢ``, so the data's precisions follow from them:

    - coupled: ``Π = [[w + r²/τ², −r/τ²], [−r/τ², 1/τ²]]`` (the reference's Wilson term
      ``w`` and the conditional of :class:`DoubleWilsonCoupling`, ``τ² = εΣ(1 − r²)/2``
      acentric, ``εΣ(1 − r²)`` centric), ``p_ref = 1/σ_ref² − w − r²/τ²``, ``p = 1/σ² − 1/τ²``;
    - independent: ``Π = diag(w, w)``: ``g = ½ (p_ref/(p_ref + w) + p/(p + w))``, what two
      merges with their own Wilson priors keep.

    ``w`` is the Wilson prior's curvature in the Gaussian approximation, ``2/εΣ`` acentric,
    ``1/εΣ`` centric.  A data precision the approximation puts below 5 % of the row's
    posterior precision is taken as that 5 % (rows the prior alone holds).

    Parameters
    ----------
    sd_ref, sd
        ``(n,)`` posterior σ of the amplitude, reference and condition, in the units of
        ``variance`` (amplitude = √intensity).  The gains of a Gaussian approximation do
        not depend on the means.
    variance, centric
        ``(n,)`` the Wilson ``εΣ`` and the centric flag of each row.
    r
        ``(n,)`` the coupling's correlation for each row (its condition and shell).

    Returns
    -------
    (g_coupled, g_independent)
        ``(n,)`` float64 each, in (0, 1]; NaN where an input is not finite or σ ≤ 0.
    """
    sd_ref, sd, var, r = (np.asarray(a, np.float64) for a in (sd_ref, sd, variance, r))
    centric = np.asarray(centric, bool)
    ok = (np.isfinite(sd_ref) & np.isfinite(sd) & np.isfinite(var) & np.isfinite(r)
          & (sd_ref > 0) & (sd > 0) & (var > 0))
    with np.errstate(invalid="ignore", divide="ignore"):
        one_minus = np.maximum(1.0 - r * r, 1e-9)
        tau2 = np.where(centric, var * one_minus, 0.5 * var * one_minus)
        w = np.where(centric, 1.0 / var, 2.0 / var)
        lam_ref, lam = 1.0 / np.square(sd_ref), 1.0 / np.square(sd)
        p_ref = np.maximum(lam_ref - w - r * r / tau2, 0.05 * lam_ref)
        p = np.maximum(lam - 1.0 / tau2, 0.05 * lam)
        l11, l22, l12 = p_ref + w + r * r / tau2, p + 1.0 / tau2, -r / tau2
        det = l11 * l22 - l12 * l12
        v_ref, v = -0.5 * p_ref, 0.5 * p
        moved_ref = (l22 * v_ref - l12 * v) / det
        moved = (l11 * v - l12 * v_ref) / det
        coupled = moved - moved_ref
        independent = 0.5 * (p_ref / (p_ref + w) + p / (p + w))
    nan = np.full(ok.shape, np.nan)
    return np.where(ok, coupled, nan), np.where(ok, independent, nan)


def normalised_amplitudes(f_rows: np.ndarray, epsilon: np.ndarray, row_shell: np.ndarray,
                          n_shells: int) -> np.ndarray:
    """``E = F / √(ε ⟨F²/ε⟩_shell)`` per row: a fixed prior's amplitudes, free of its scale and
    its resolution fall-off, to be put on a merge's Wilson scale (``E · √(εΣ)``).

    Parameters
    ----------
    f_rows
        ``(n_rows,)`` amplitudes per row, NaN where the prior has none.
    epsilon, row_shell
        ``(n_rows,)`` multiplicity factor ε and resolution shell of every row.
    n_shells
        Number of shells.

    Returns
    -------
    np.ndarray
        ``(n_rows,)`` float64, NaN where ``f_rows`` is NaN, negative or in a shell with no
        positive amplitude.
    """
    f = np.asarray(f_rows, dtype=np.float64)
    ok = np.isfinite(f) & (f >= 0)
    eps = np.asarray(epsilon, dtype=np.float64)
    shell = np.asarray(row_shell, dtype=np.int64)
    sums = np.bincount(shell[ok], weights=np.square(f[ok]) / eps[ok], minlength=n_shells)
    counts = np.bincount(shell[ok], minlength=n_shells)
    mean = np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)
    with np.errstate(invalid="ignore", divide="ignore"):
        e = f / np.sqrt(eps * mean[shell])
    return np.where(ok & (mean[shell] > 0), e, np.nan)
