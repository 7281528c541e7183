"""Light-minus-dark structure-factor differences and their q-weighted map coefficients.

Given the merged amplitudes of a condition (``light``) and of the reference condition
(``dark``) on the same reflections, ``ΔF = F_light − F_dark``.  Its mean-field error
``√(σ_light² + σ_dark²)`` adds the two surrogates' variances: the tables of different
conditions are independent in q, so it carries no covariance, neither through the shared
scales nor through the coupled prior, which ties the light amplitudes to the dark ones and
shrinks ΔF (with it the mean-field error was 1.4–4 times the real one, measured against
simulated truth: no difference ever looked significant).  :func:`calibrate_sigma` puts it
on the scale of the real scatter of the published ΔF, measured per resolution shell from
the two half-datasets' ΔF.

Weighted coefficients follow the q-weighting of Ursby & Bourgeois (1997, Acta Cryst. A53,
564–575) in the form of Ren et al. (2001, Biochemistry 40, 13788–13801)::

    w = 1 / (1 + σ(ΔF)² / ⟨σ(ΔF)²⟩ + α · ΔF² / ⟨ΔF²⟩),    WDF = w · ΔF

with the means taken per resolution shell (equal reciprocal volume,
:func:`streamvi.symmetry.shell_edges`) and ``α`` :data:`DEFAULT_ALPHA`.  The σ term damps
noisy differences; the α term damps the rare huge ones (outliers, often of weak or
misestimated reflections).  Maps are made with ``WDF`` and the reference condition's phases.

Under the coupled prior ``DF`` is given back its size per shell (:func:`correct_gain`), for
work that reads |ΔF| (occupancies, extrapolated maps); ``WDF`` weights the posterior mean
ΔF as merged, the shrinkage kept.  The shrinkage is strongest where the data are noisiest
(the high-resolution shells), so undoing it amplifies their noise in a map: on the
issue-size pump–probe set the size-corrected coefficients gave peaks 0.03–0.26 σ lower at
11 of 12 moved-atom sites and an overall CC(WDF, ΔF_true) 0.004–0.019 lower than the
posterior mean's (docs/time-resolved.md).  ``W`` is the same for both (its means are per
shell, the correction one factor per shell).
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

from streamvi.symmetry import shell_edges, shell_index

#: weight of the ΔF² term in the q-weight (Ren et al. 2001 use 0.05–1; small keeps true
#: large differences)
DEFAULT_ALPHA = 0.05
#: resolution shells over which ⟨σ(ΔF)²⟩ and ⟨ΔF²⟩ are taken
DEFAULT_SHELLS = 10


#: pairs (reflections with ΔF in both halves) a shell needs for its own calibration factor;
#: fewer: the factor of all shells pooled
MIN_PAIRS_SHELL = 50
#: pairs the pooled factor needs; fewer: no calibration (the mean-field σ is kept)
MIN_PAIRS = 20


class SigmaCalibration(NamedTuple):
    """Factors that turn the mean-field σ(ΔF) into the published ΔF's real scatter."""

    #: per reflection, the factor applied to its mean-field σ(ΔF) (1 where not calibrated)
    factor: np.ndarray
    #: per shell (low to high resolution), the factor (NaN: the shell took the pooled one)
    shell_factor: np.ndarray
    #: pairs per shell
    pairs: np.ndarray
    #: the factor of all shells pooled (NaN: too few pairs, nothing calibrated)
    pooled: float
    #: high-resolution limit of each shell, Å
    d_min: np.ndarray

    @property
    def calibrated(self) -> bool:
        return bool(np.isfinite(self.pooled))

    @property
    def factors(self) -> np.ndarray:
        """Per shell, the factor its reflections take (its own, or the pooled one)."""
        return np.where(np.isfinite(self.shell_factor), self.shell_factor, self.pooled)


def _noise_factor(df: np.ndarray, sig: np.ndarray, h1: np.ndarray, h2: np.ndarray) -> float:
    """√(A·B / (A + C)) over one set of pairs (see :func:`calibrate_sigma`); NaN when the
    halves do not differ."""
    a = float(np.mean(np.square((h1 - h2) / (2.0 * sig))))
    b = float(np.mean(np.square(df / sig)))
    c = max(float(np.mean(h1 * h2 / np.square(sig))), 0.0)
    if not (a > 0 and np.isfinite(a) and np.isfinite(b)):
        return float("nan")
    return float(np.sqrt(a * b / (a + c)))


def calibrate_sigma(df: np.ndarray, sigdf: np.ndarray, df_half1: np.ndarray,
                    df_half2: np.ndarray, d: np.ndarray, *, n_shells: int = DEFAULT_SHELLS,
                    min_pairs_shell: int = MIN_PAIRS_SHELL,
                    min_pairs: int = MIN_PAIRS) -> SigmaCalibration:
    """Scale the mean-field σ(ΔF) to the scatter of the published ΔF, per resolution shell.

    The merge shrinks ΔF towards 0 by a gain ``g`` (the coupled prior strongly, the Wilson
    prior at high resolution), and each half-dataset's ΔF by a smaller gain ``g½`` (half the
    data, the same prior).  In units of the mean-field σ, with ``S`` the true ΔF's variance
    and ``v`` the noise's of an unshrunk full-data ΔF, over the reflections with ΔF in both
    halves::

        A = ⟨(ΔF½₁ − ΔF½₂)²⟩ / 4 = g½² v      (the halves' noise)
        B = ⟨ΔF²⟩                = g² (S + v)  (the published ΔF)
        C = ⟨ΔF½₁ · ΔF½₂⟩        = g½² S      (the signal both halves share)

    so the published ΔF's noise variance is ``g² v = A·B / (A + C)`` whatever the gains
    (``C`` is taken ≥ 0: no signal has no negative variance).  Without shrinkage it is
    ``A``, the usual half-set estimate; with no signal it is all of ``B``.  The factor is
    ``√(A·B / (A + C))``, second moments about zero (ΔF's significance is its distance from
    0).  Checked against the truth of simulated pump–probe sets (docs/time-resolved.md).

    Parameters
    ----------
    df, sigdf
        ΔF and its mean-field σ per reflection.
    df_half1, df_half2
        The two half-datasets' ΔF per reflection (NaN where a half has none).
    d
        Resolution per reflection, Å.
    n_shells
        Shells of equal reciprocal volume between the data's extremes.
    min_pairs_shell, min_pairs
        Pairs a shell needs for its own factor, and all shells pooled for any.

    Returns
    -------
    SigmaCalibration
    """
    df, sigdf, h1, h2, d = (np.asarray(a, np.float64) for a in (df, sigdf, df_half1,
                                                                 df_half2, d))
    ok = (np.isfinite(df) & np.isfinite(sigdf) & (sigdf > 0) & np.isfinite(d) & (d > 0))
    pair = ok & np.isfinite(h1) & np.isfinite(h2)
    n_shells = max(1, int(n_shells))
    factor = np.ones(df.shape)
    shell_factor = np.full(n_shells, np.nan)
    pairs = np.zeros(n_shells, np.int64)
    if not ok.any():
        return SigmaCalibration(factor, shell_factor, pairs, float("nan"),
                                np.full(n_shells, np.nan))
    edges = shell_edges(float(d[ok].max()), float(d[ok].min()), n_shells)
    shell = shell_index(d, edges)
    pairs = np.bincount(shell[pair], minlength=n_shells)[:n_shells].astype(np.int64)
    pooled = (_noise_factor(df[pair], sigdf[pair], h1[pair], h2[pair])
              if pair.sum() >= min_pairs else float("nan"))
    if np.isfinite(pooled):
        for j in range(n_shells):
            m = pair & (shell == j)
            if m.sum() >= min_pairs_shell:
                shell_factor[j] = _noise_factor(df[m], sigdf[m], h1[m], h2[m])
    cal = SigmaCalibration(factor, shell_factor, pairs, pooled, np.asarray(edges[1:]))
    if cal.calibrated:
        cal = cal._replace(factor=np.where(ok, cal.factors[np.clip(shell, 0, n_shells - 1)],
                                           1.0))
    return cal


class GainCorrection(NamedTuple):
    """Factors that undo the coupled prior's shrinkage of ΔF, per resolution shell."""

    #: per reflection, the factor its ΔF and σ(ΔF) were multiplied by (1 where none)
    factor: np.ndarray
    #: per shell (low to high resolution), ``Σ g_independent / Σ g_coupled`` (NaN: empty)
    shell_factor: np.ndarray
    #: high-resolution limit of each shell, Å
    d_min: np.ndarray


def correct_gain(g_coupled: np.ndarray, g_independent: np.ndarray, d: np.ndarray, *,
                 n_shells: int = DEFAULT_SHELLS) -> GainCorrection:
    """Per resolution shell, the factor that gives a coupled merge's ΔF the size that two
    independent merges' ΔF has.

    The coupled prior shrinks ΔF (it is a shrinkage estimate: the noise falls more than
    the signal, so peaks rise in σ while the change itself comes out at a fraction of its
    size).  ``g_coupled`` and ``g_independent`` are each reflection's share of a change in
    the data that ΔF keeps under the coupled prior and under independent Wilson priors
    (:func:`streamvi.merging.model.coupling.difference_gains`); the factor of a shell is
    ``Σ g_independent / Σ g_coupled`` over its reflections.  One factor per shell keeps the
    shell's map contrast (ΔF / σ(ΔF), the q-weight) as it is and gives back the change's
    size, on average over the shell: a reflection's own gain is not used, since dividing by
    it would give back each reflection's noise as well.

    Parameters
    ----------
    g_coupled, g_independent
        Gains per reflection (NaN where unknown: factor 1).
    d
        Resolution per reflection, Å.
    n_shells
        Shells of equal reciprocal volume between the data's extremes.
    """
    gc, gi, d = (np.asarray(a, np.float64) for a in (g_coupled, g_independent, d))
    ok = np.isfinite(gc) & np.isfinite(gi) & (gc > 0) & np.isfinite(d) & (d > 0)
    n_shells = max(1, int(n_shells))
    factor = np.ones(gc.shape)
    if not ok.any():
        return GainCorrection(factor, np.full(n_shells, np.nan), np.full(n_shells, np.nan))
    edges = shell_edges(float(d[ok].max()), float(d[ok].min()), n_shells)
    shell = np.clip(shell_index(d, edges), 0, n_shells - 1)
    sum_c = np.bincount(shell[ok], gc[ok], minlength=n_shells)[:n_shells]
    sum_i = np.bincount(shell[ok], gi[ok], minlength=n_shells)[:n_shells]
    with np.errstate(invalid="ignore", divide="ignore"):
        shell_factor = np.where(sum_c > 0, sum_i / sum_c, np.nan)
    factor = np.where(ok, shell_factor[shell], 1.0)
    factor = np.where(np.isfinite(factor), factor, 1.0)
    return GainCorrection(factor, shell_factor, np.asarray(edges[1:]))


class Differences(NamedTuple):
    """ΔF per reflection and its weighting (float64 arrays of equal length)."""

    DF: np.ndarray
    SIGDF: np.ndarray
    #: the q-weight w (dimensionless, in (0, 1])
    W: np.ndarray
    #: w · ΔF, ΔF before the gain correction (the posterior mean: see the module docstring)
    WDF: np.ndarray
    #: how SIGDF was scaled from the mean-field σ (None: not asked for, the mean-field σ)
    calibration: SigmaCalibration | None = None
    #: how ΔF and SIGDF were scaled for the coupled prior's shrinkage (None: not asked for)
    gain: GainCorrection | None = None


def difference_coefficients(f_light: np.ndarray, sigf_light: np.ndarray, f_dark: np.ndarray,
                            sigf_dark: np.ndarray, d: np.ndarray, *,
                            alpha: float = DEFAULT_ALPHA,
                            n_shells: int = DEFAULT_SHELLS,
                            half_differences: tuple[np.ndarray, np.ndarray] | None = None,
                            gains: tuple[np.ndarray, np.ndarray] | None = None
                            ) -> Differences:
    """ΔF, σ(ΔF) and the q-weighted coefficients (see the module docstring).

    Parameters
    ----------
    f_light, sigf_light, f_dark, sigf_dark
        Amplitudes and their σ per reflection, in the same (arbitrary) units; reflections
        where any is not finite get NaN everywhere.
    d
        Resolution of each reflection, Å.
    alpha
        Weight of the ΔF² term, ≥ 0.
    n_shells
        Resolution shells for the means (fewer when there are few reflections: at least
        about 20 per shell are kept).
    half_differences
        The two half-datasets' ΔF per reflection (NaN where a half has none): σ(ΔF) is then
        calibrated on their scatter (:func:`calibrate_sigma`).  None: the mean-field σ.
    gains
        ``(g_coupled, g_independent)`` per reflection: ΔF and σ(ΔF) (after the
        calibration, which measures the published ΔF's scatter) are multiplied per shell by
        :func:`correct_gain`'s factor, the size two independent merges would give the
        change.  None: as merged.

    Returns
    -------
    Differences
    """
    if not alpha >= 0:
        raise ValueError(f"alpha {alpha!r} must be >= 0 (e.g. {DEFAULT_ALPHA})")
    f_light, sigf_light, f_dark, sigf_dark, d = (np.asarray(a, np.float64) for a in (
        f_light, sigf_light, f_dark, sigf_dark, d))
    df = f_light - f_dark
    var = np.square(sigf_light) + np.square(sigf_dark)
    calibration = None
    if half_differences is not None:
        calibration = calibrate_sigma(df, np.sqrt(var), *half_differences, d)
        var = var * np.square(calibration.factor)
    gain = None
    merged_df = df          # the map coefficients keep the merge's shrinkage
    if gains is not None:
        gain = correct_gain(*gains, d, n_shells=n_shells)
        df = df * gain.factor
        var = var * np.square(gain.factor)
    ok = np.isfinite(df) & np.isfinite(var) & np.isfinite(d) & (d > 0)
    df = np.where(ok, df, np.nan)
    var = np.where(ok, var, np.nan)
    w = np.full(df.shape, np.nan)
    if ok.any():
        n = int(ok.sum())
        shells = max(1, min(int(n_shells), n // 20))
        edges = shell_edges(float(d[ok].max()), float(d[ok].min()), shells)
        shell = shell_index(d, edges)
        count = np.bincount(shell[ok], minlength=shells).astype(np.float64)
        mean_var = np.bincount(shell[ok], var[ok], minlength=shells) / np.maximum(count, 1)
        mean_df2 = (np.bincount(shell[ok], np.square(df[ok]), minlength=shells)
                    / np.maximum(count, 1))
        with np.errstate(invalid="ignore", divide="ignore"):
            denom = (1.0 + var / mean_var[shell]
                     + alpha * np.square(df) / mean_df2[shell])
        w = np.where(ok & np.isfinite(denom) & (denom > 0), 1.0 / denom, np.nan)
    return Differences(DF=df, SIGDF=np.sqrt(var), W=w, WDF=w * np.where(ok, merged_df, np.nan),
                       calibration=calibration,
                       gain=gain)


def difference_figures(light, dark, *, dataset, n_shells: int = DEFAULT_SHELLS,
                       significant_z: float = 3.0) -> dict:
    """What a crew watches of one light-minus-dark difference, live.

    ``delta_cc_half``: per resolution shell (low to high, equal reciprocal volume) and
    overall, the correlation of the two half-datasets' ΔF (``F_light,half1 − F_dark,half1``
    against the same of half 2) over the reflections both conditions observed in both
    halves: the ΔF analogue of CC½, near 0 while the difference is noise.  ``significant``:
    reflections with ``|ΔF| / σ(ΔF) > significant_z``, σ(ΔF) the difference table's
    (calibrated on the half-datasets' scatter, :func:`calibrate_sigma`: on simulated data
    with no change about 1 %, the noise's tails heavier than a normal's 0.27 %);
    ``sigdf_factor``: that calibration's factor per shell, shells ending at ``sigdf_d_min``
    (Å; the difference table's own binning); both empty, and ``sigdf_calibrated`` False,
    while too few reflections are in both halves: σ(ΔF) is then the mean-field one.
    ``df_gain_factor``: the factor per shell (shells ending at ``df_gain_d_min``) by which
    ΔF and σ(ΔF) were scaled for the coupled prior's shrinkage (:func:`correct_gain`;
    None for an empty shell); both empty without a coupled prior.

    Parameters
    ----------
    light, dark
        :class:`~streamvi.snapshot.MergeSnapshot` of the two conditions (same table).
    dataset
        :func:`streamvi.publish.mtz.difference_dataset` of the two (the difference file's
        table: ``DF``, ``SIGDF`` and its calibration in ``attrs["sigma_calibration"]``).
    """
    from streamvi.quality.stats import pearson, pearson_by_group

    space = light.space
    ok = [(s.obs_count[k] > 0) for s in (light, dark) for k in (1, 2)]
    both = ok[0] & ok[1] & ok[2] & ok[3]
    d = space.d.astype(np.float64)
    edges = shell_edges(float(d.max()), float(d.min()), n_shells)
    shell = shell_index(d, edges)
    x = light.tables["half1"]["F"] - dark.tables["half1"]["F"]
    y = light.tables["half2"]["F"] - dark.tables["half2"]["F"]
    sel = both & np.isfinite(x) & np.isfinite(y)
    cc, n = pearson_by_group(x[sel], y[sel], shell[sel], n_shells)
    df = dataset["DF"].to_numpy(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        z = np.abs(df) / dataset["SIGDF"].to_numpy(np.float64)
    calibration = dataset.attrs.get("sigma_calibration")
    calibrated = calibration is not None and calibration.calibrated
    gain = dataset.attrs.get("gain_correction")
    return {"delta_cc_half": [float(c) for c in cc],
            "delta_cc_half_overall": float(pearson(x[sel], y[sel])) if sel.sum() >= 3
            else float("nan"),
            "pairs": [int(v) for v in n], "d_min": [float(e) for e in edges[1:]],
            "reflections": int(np.isfinite(df).sum()),
            "significant": int(np.sum(np.isfinite(z) & (z > significant_z))),
            "sigdf_calibrated": calibrated,
            "sigdf_factor": [float(v) for v in calibration.factors] if calibrated else [],
            "sigdf_d_min": [float(v) for v in calibration.d_min] if calibrated else [],
            "df_gain_factor": [] if gain is None else
            [float(v) if np.isfinite(v) else None for v in gain.shell_factor],
            "df_gain_d_min": [] if gain is None else [float(v) for v in gain.d_min]}


def difference_peaks(cell, space_group, hkl: np.ndarray, coefficients: np.ndarray, model, *,
                     dmin: float, n: int = 5, min_sigma: float = 3.0) -> dict:
    """Where the light-minus-dark map says something changed: its strongest positive peaks
    and deepest negative ones (σ of the map), each with the model's nearest atom.

    Parameters
    ----------
    cell, space_group
        gemmi objects of the merge.
    hkl, coefficients
        ``(n, 3)`` indices and their map coefficients (``WDF``, or ``DF``; NaN: left out).
    model
        :class:`streamvi.quality.anomalous.PhasingModel` of the reference (dark) structure:
        its phases make the map, its atoms name the peaks.
    dmin
        The merge's resolution limit, Å (the model's structure factors are computed once
        for it and read at ``hkl``).

    Returns
    -------
    dict
        ``positive`` and ``negative``: lists of peaks (``sigma``, signed; ``frac``, ``xyz``
        (Å), ``nearest_atom``, ``distance`` (Å)), strongest first; ``n_reflections``.
    """
    from dataclasses import asdict

    from streamvi.quality.anomalous import difference_map, map_peaks

    hkl = np.asarray(hkl, dtype=np.int32)
    phi = model.phases(cell, space_group, hkl, dmin)
    grid = difference_map(cell, space_group, hkl, coefficients, phi, phase_shift_deg=0.0)
    arr = np.array(grid, copy=False)
    out: dict = {"n_reflections": int(np.isfinite(coefficients).sum())}
    for sign, key in ((1.0, "positive"), (-1.0, "negative")):
        peaks = map_peaks(sign * arr, grid.unit_cell, model, space_group, n=n,
                          min_sigma=min_sigma)
        out[key] = [{**asdict(p), "sigma": sign * p.sigma} for p in peaks]
    return out
