"""Light-minus-dark structure-factor differences and their q-weighted map coefficients.

Given the merged amplitudes of a condition (``light``) and of the reference condition
(``dark``) on the same reflections, ``ΔF = F_light − F_dark`` and ``σ(ΔF) = √(σ_light² +
σ_dark²)``.  With streamvi's joint merge both amplitudes come from one model (shared image
scales), but the surrogate posterior is mean-field: the tables of different conditions are
independent in q, so σ(ΔF) adds their variances and carries no covariance through the shared
scales.

Weighted coefficients follow the q-weighting of Ursby & Bourgeois (1997, Acta Cryst. A53,
564–575) in the form of Ren et al. (2001, Biochemistry 40, 13788–13801)::

    w = 1 / (1 + σ(ΔF)² / ⟨σ(ΔF)²⟩ + α · ΔF² / ⟨ΔF²⟩),    WDF = w · ΔF

with the means taken per resolution shell (equal reciprocal volume,
:func:`streamvi.symmetry.shell_edges`) and ``α`` :data:`DEFAULT_ALPHA`.  The σ term damps
noisy differences; the α term damps the rare huge ones (outliers, often of weak or
misestimated reflections).  Maps are made with ``WDF`` and the reference condition's phases.
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


class Differences(NamedTuple):
    """ΔF per reflection and its weighting (float64 arrays of equal length)."""

    DF: np.ndarray
    SIGDF: np.ndarray
    #: the q-weight w (dimensionless, in (0, 1])
    W: np.ndarray
    #: w · ΔF
    WDF: np.ndarray


def difference_coefficients(f_light: np.ndarray, sigf_light: np.ndarray, f_dark: np.ndarray,
                            sigf_dark: np.ndarray, d: np.ndarray, *,
                            alpha: float = DEFAULT_ALPHA,
                            n_shells: int = DEFAULT_SHELLS) -> Differences:
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
    return Differences(DF=df, SIGDF=np.sqrt(var), W=w, WDF=w * df)


def difference_figures(light, dark, *, n_shells: int = DEFAULT_SHELLS,
                       significant_z: float = 3.0) -> dict:
    """What a crew watches of one light-minus-dark difference, live.

    ``delta_cc_half``: per resolution shell (low to high, equal reciprocal volume) and
    overall, the correlation of the two half-datasets' ΔF (``F_light,half1 − F_dark,half1``
    against the same of half 2) over the reflections both conditions observed in both
    halves: the ΔF analogue of CC½, near 0 while the difference is noise.  ``significant``:
    reflections with ``|ΔF| / σ(ΔF) > significant_z`` (σ mean-field, over-confident: a
    relative figure).

    Parameters
    ----------
    light, dark
        :class:`~streamvi.snapshot.MergeSnapshot` of the two conditions (same table).
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
    seen = (light.obs_count[0] > 0) & (dark.obs_count[0] > 0)
    df = light.tables["all"]["F"][seen] - dark.tables["all"]["F"][seen]
    sigdf = np.hypot(light.tables["all"]["SIGF"][seen], dark.tables["all"]["SIGF"][seen])
    with np.errstate(divide="ignore", invalid="ignore"):
        z = np.abs(df) / sigdf
    return {"delta_cc_half": [float(c) for c in cc],
            "delta_cc_half_overall": float(pearson(x[sel], y[sel])) if sel.sum() >= 3
            else float("nan"),
            "pairs": [int(v) for v in n], "d_min": [float(e) for e in edges[1:]],
            "reflections": int(seen.sum()),
            "significant": int(np.sum(np.isfinite(z) & (z > significant_z)))}


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
