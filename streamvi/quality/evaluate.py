"""Judging a merge against known truth, and the classical baselines to judge it beside.

Used by tests, benchmarks and ``streamvi demo`` on simulated data, where the true structure
factors are known.  Everything here works on ``rs.DataSet`` tables indexed by ASU ``H, K, L``
in the same space group, i.e. on what the MTZ files hold.
"""
from __future__ import annotations

import numpy as np
import reciprocalspaceship as rs

from streamvi.quality.stats import pearson, pearson_by_group
from streamvi.snapshot import snapshot_to_dataset
from streamvi.symmetry import shell_edges, shell_index


def compare_to_truth(merged: rs.DataSet, truth: rs.DataSet, *, n_shells: int = 10,
                     f_col: str = "F", truth_f: str = "FMODEL") -> dict:
    """Correlation of merged amplitudes with the truth, overall and per resolution shell.

    Parameters
    ----------
    merged
        Merged table with ``F`` (and ``F(+)``/``F(-)`` for the anomalous comparison).
    truth
        True table with ``FMODEL`` and ``F(+)``/``F(-)`` amplitudes.

    Returns
    -------
    dict
        ``cc_F`` overall, ``cc_F_shells`` (low → high resolution; shells of equal volume in
        reciprocal space, :func:`streamvi.symmetry.shell_edges`), ``cc_F_lowest_shell`` and
        ``cc_F_top_shell``, ``d_min_shells`` (Å, the high-resolution edge of each shell) and
        ``d_max`` (Å, the low edge of the first), ``cc_anom`` (merged ΔF vs true ΔF over
        acentric pairs, NaN without both columns) and ``cc_anom_shells``, ``n_common``.
    """
    common = merged.index.intersection(truth.index)
    m = merged.loc[common]
    t = truth.loc[common]
    fm = m[f_col].to_numpy(np.float64)
    ft = t[truth_f].to_numpy(np.float64)
    ok = np.isfinite(fm) & np.isfinite(ft)
    hkl = np.array(common.tolist(), dtype=np.int32)
    cell = merged.cell
    d = cell.calculate_d_array(hkl)
    edges = shell_edges(float(np.max(d)), float(np.min(d)), n_shells)
    shell = shell_index(d, edges)
    cc_shells, _ = pearson_by_group(fm[ok], ft[ok], shell[ok], n_shells)
    out = {"cc_F": pearson(fm, ft), "cc_F_shells": [float(x) for x in cc_shells],
           "cc_F_lowest_shell": float(cc_shells[0]), "cc_F_top_shell": float(cc_shells[-1]),
           "d_min_shells": [float(x) for x in edges[1:]], "d_max": float(edges[0]),
           "n_common": int(ok.sum()), "cc_anom": float("nan"),
           "cc_anom_shells": [float("nan")] * n_shells}
    if {"F(+)", "F(-)"} <= set(m.columns) and {"F(+)", "F(-)"} <= set(t.columns):
        centric = merged.spacegroup.operations().centric_flag_array(hkl)
        dm = m["F(+)"].to_numpy(np.float64) - m["F(-)"].to_numpy(np.float64)
        dt = t["F(+)"].to_numpy(np.float64) - t["F(-)"].to_numpy(np.float64)
        sel = ~centric
        out["cc_anom"] = pearson(dm[sel], dt[sel])
        okanom = sel & np.isfinite(dm) & np.isfinite(dt)
        cc_a, _ = pearson_by_group(dm[okanom], dt[okanom], shell[okanom], n_shells)
        out["cc_anom_shells"] = [float(x) for x in cc_a]
    return out


def average_merge(crystals, space, *, weighting: str = "inverse_variance") -> rs.DataSet:
    """Classical merge by averaging: the baselines of DESIGN.md section 9.

    Parameters
    ----------
    crystals
        Iterable of :class:`~streamvi.wire.CrystalMessage`.
    space
        The :class:`~streamvi.symmetry.ReciprocalSpace` (anomalous mode keeps mates apart).
    weighting
        ``inverse_variance`` (Σ I/σ² / Σ 1/σ²) or ``mean`` (unweighted, the Monte Carlo
        average of CrystFEL's process_hkl without scaling).

    Returns
    -------
    rs.DataSet
        ``F, SIGF, I, SIGI, N`` (and ``F(+)``/``F(-)`` in anomalous mode); F = √max(I, 0).
    """
    acc = _Averager(space, weighting)
    for msg in crystals:
        acc.add(msg.hkl(), msg.I, msg.sigI)
    return acc.dataset()


def partiality_corrected_merge(crystals, image_truths, space, *,
                               weighting: str = "inverse_variance") -> rs.DataSet:
    """The upper-bound baseline: an average of observations corrected with the *true* physics.

    Each observation's I and σ(I) are divided by its image's true ``intensity_factor``
    (simulator: gain × flux × image scale × exp(−2(B_overall + B_image)s²) × partiality,
    :class:`streamvi_sim.ImageTruth`), it is put under its *true* indices (so an indexer's
    choice of setting is undone), and misindexed images are left out; outliers stay, as no
    merge is told which they are.  What is left is counting noise, the gain and fractional
    errors, outliers and the truth's own Bijvoet signal: no merge that must learn scales and
    partialities should beat it by much.  I is on the truth's absolute scale (electrons²).

    Parameters
    ----------
    crystals
        The :class:`~streamvi.wire.CrystalMessage` of each image.
    image_truths
        The matching :class:`streamvi_sim.ImageTruth` (anything with ``hkl``,
        ``intensity_factor`` and ``misindexed``), in the same order.
    space
        The merge's :class:`~streamvi.symmetry.ReciprocalSpace`.
    weighting
        As for :func:`average_merge`.
    """
    acc = _Averager(space, weighting)
    for msg, truth in zip(crystals, image_truths, strict=True):
        if truth.misindexed:
            continue
        factor = np.asarray(truth.intensity_factor, dtype=np.float64)
        if factor.shape[0] != len(msg):
            raise ValueError(f"image {msg.image}: {len(msg)} reflections but "
                             f"{factor.shape[0]} true intensity factors; pass each image's "
                             "ImageTruth in the order of the crystals")
        acc.add(np.asarray(truth.hkl), msg.I / factor, msg.sigI / factor)
    return acc.dataset()


class _Averager:
    """Running sums of one weighted average per unique row (float64)."""

    def __init__(self, space, weighting: str):
        if weighting not in ("inverse_variance", "mean"):
            raise ValueError(f"weighting = {weighting!r}: use 'inverse_variance' or 'mean'")
        n = space.n_unique
        self.space, self.weighting = space, weighting
        self.sw, self.swi, self.swi2 = np.zeros(n), np.zeros(n), np.zeros(n)
        self.cnt = np.zeros(n, np.int64)

    def add(self, hkl: np.ndarray, iobs: np.ndarray, sigiobs: np.ndarray) -> None:
        rows = self.space.lookup(hkl)
        ok = rows >= 0
        rows = rows[ok]
        i = np.asarray(iobs, dtype=np.float64)[ok]
        s = np.asarray(sigiobs, dtype=np.float64)[ok]
        w = 1.0 / (s * s) if self.weighting == "inverse_variance" else np.ones_like(i)
        np.add.at(self.sw, rows, w)
        np.add.at(self.swi, rows, w * i)
        np.add.at(self.swi2, rows, w * i * i)
        np.add.at(self.cnt, rows, 1)

    def dataset(self) -> rs.DataSet:
        sw, cnt = self.sw, self.cnt
        with np.errstate(invalid="ignore", divide="ignore"):
            imean = self.swi / sw
            if self.weighting == "inverse_variance":
                sig = 1.0 / np.sqrt(sw)
            else:
                var = self.swi2 / sw - imean ** 2
                sig = np.sqrt(np.maximum(var, 0) / np.maximum(cnt - 1, 1))
        f = np.sqrt(np.maximum(imean, 0))
        sigf = sig / (2 * np.maximum(f, 1e-3))
        from types import SimpleNamespace

        # the publisher reads only space, tables and obs_count: the same columns as the model's
        table = {"F": f, "SIGF": sigf, "I": imean, "SIGI": sig}
        zeros = np.zeros_like(cnt)
        ds = snapshot_to_dataset(SimpleNamespace(
            space=self.space, tables={"all": table, "half1": table, "half2": table},
            obs_count=np.stack([cnt, zeros, zeros])))
        return ds[[c for c in ds.columns if "half" not in c]]


def _common_amplitudes(merged: rs.DataSet, truth: rs.DataSet, f_col: str, truth_f: str
                       ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """hkl ``(n, 3)``, d (Å), merged F and true F of the rows both tables hold (finite)."""
    common = merged.index.intersection(truth.index)
    fm = merged.loc[common, f_col].to_numpy(np.float64)
    ft = truth.loc[common, truth_f].to_numpy(np.float64)
    hkl = np.array(common.tolist(), dtype=np.int32).reshape(-1, 3)
    ok = np.isfinite(fm) & np.isfinite(ft)
    hkl, fm, ft = hkl[ok], fm[ok], ft[ok]
    return hkl, merged.cell.calculate_d_array(hkl), fm, ft


def fitted_b_correlation(merged: rs.DataSet, truth: rs.DataSet, *, f_col: str = "F",
                         truth_f: str = "FMODEL", b_range: float = 100.0) -> dict:
    """CC(F, truth) after removing one fitted relative B from the merge.

    The B (Å²) that maximises the CC of ``F_merged·exp(B s²)`` with the truth over all
    common reflections (s² = 1/(4d²), Å⁻²; a grid of 1 Å² over ±``b_range``, then golden
    section to 10⁻⁴ Å²), so the figure is never below the unfitted CC.  B > 0: the merge fell
    off faster than the truth.  This takes out what a merge cannot pin (the split of a
    resolution trend between amplitudes and image scales) and leaves what it got wrong
    reflection by reflection.  (A least-squares line through ``ln(F_merged/F_true)`` against
    s² was tried first: weak reflections dominate it, their merged amplitudes are biased
    upwards, and the B it gave lowered the CC of most merges of the quality matrix.)

    Returns
    -------
    dict
        ``b`` (Å²), ``cc_F`` (after the B), ``cc_F_unfitted``.
    """
    _, d, fm, ft = _common_amplitudes(merged, truth, f_col, truth_f)
    s2 = 0.25 / d ** 2
    if fm.shape[0] < 3:
        return {"b": float("nan"), "cc_F": float("nan"), "cc_F_unfitted": float("nan")}

    def cc(b: float) -> float:
        value = pearson(fm * np.exp(b * s2), ft)
        return value if np.isfinite(value) else -2.0

    grid = np.arange(-b_range, b_range + 0.5, 1.0)
    best = float(grid[int(np.argmax([cc(b) for b in grid]))])
    lo, hi = best - 1.0, best + 1.0
    golden = (np.sqrt(5.0) - 1.0) / 2.0
    a, b = hi - golden * (hi - lo), lo + golden * (hi - lo)
    ca, cb = cc(a), cc(b)
    while hi - lo > 1e-4:
        if ca > cb:
            hi, b, cb = b, a, ca
            a = hi - golden * (hi - lo)
            ca = cc(a)
        else:
            lo, a, ca = a, b, cb
            b = lo + golden * (hi - lo)
            cb = cc(b)
    b_fit = 0.5 * (lo + hi)
    return {"b": b_fit, "cc_F": cc(b_fit), "cc_F_unfitted": cc(0.0)}


def strong_reflection_ratios(merged: rs.DataSet, truth: rs.DataSet, *, fraction: float = 0.01,
                             n_shells: int = 10, f_col: str = "F",
                             truth_f: str = "FMODEL") -> dict:
    """F_merged / F_true of the strongest true reflections, after a scale per shell.

    The common reflections are cut into ``n_shells`` resolution shells of equal volume
    (:func:`streamvi.symmetry.shell_edges`).  In each shell the merge is put on the truth's
    scale by least squares, ``k = Σ F_m F_t / Σ F_m²``; the ``fraction`` strongest
    reflections are chosen by the *true* normalised amplitude within their shell, ``E =
    F_t / √(ε ⟨F_t²/ε⟩_shell)`` (by E rather than F so that every resolution can contribute,
    as a map or a molecular-replacement search weighs them), and each gets the ratio
    ``k·F_m / F_t``.  A merge that shrinks its strongest reflections shows ratios below 1.

    Returns
    -------
    dict
        ``ratio``, ``E``, ``d`` (Å) and ``hkl`` of the chosen reflections (strongest first;
        lists), ``min``, ``max``, ``median`` of the ratios, ``worst`` (the ratio farthest
        from 1) and ``n``.
    """
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction = {fraction}: must lie in (0, 1]")
    hkl, d, fm, ft = _common_amplitudes(merged, truth, f_col, truth_f)
    shell = shell_index(d, shell_edges(float(np.max(d)), float(np.min(d)), n_shells))
    eps = merged.spacegroup.operations().epsilon_factor_array(hkl).astype(np.float64)
    s_mt = np.bincount(shell, fm * ft, n_shells)
    s_mm = np.bincount(shell, fm * fm, n_shells)
    mean_i = np.bincount(shell, ft * ft / eps, n_shells) / np.maximum(
        np.bincount(shell, minlength=n_shells), 1)
    with np.errstate(invalid="ignore", divide="ignore"):
        k = s_mt / s_mm
        e = ft / np.sqrt(eps * mean_i[shell])
        ratio = k[shell] * fm / ft
    n = max(1, int(round(fraction * hkl.shape[0])))
    pick = np.argsort(-e, kind="stable")[:n]
    r = ratio[pick]
    worst = float(r[np.argmax(np.abs(r - 1.0))])
    return {"ratio": r.tolist(), "E": e[pick].tolist(), "d": d[pick].tolist(),
            "hkl": hkl[pick].tolist(), "min": float(r.min()), "max": float(r.max()),
            "median": float(np.median(r)), "worst": worst, "n": int(n)}


def anomalous_peak_heights(merged: rs.DataSet, truth: rs.DataSet, sites_frac: np.ndarray, *,
                           phase_col: str = "PHIFMODEL", sample_rate: float = 3.0) -> dict:
    """Heights (in σ of the map) of an anomalous difference map at the true scatterer sites.

    The map has coefficients (F(+) − F(−))·exp(i(φ − 90°)) with φ the true phase, the
    classical way of locating anomalous scatterers once phases are known.

    Returns
    -------
    dict
        ``site_sigma`` per site, ``top_peaks_sigma`` (the highest map peaks), and
        ``sites_are_top`` (all sites higher than every grid point farther than 2 Å from them).
    """
    from streamvi.quality.anomalous import difference_map, heights_at

    common = merged.index.intersection(truth.index)
    m = merged.loc[common]
    dano = (m["F(+)"] - m["F(-)"]).to_numpy(np.float64)
    phi = truth.loc[common, phase_col].to_numpy(np.float64)
    hkl = np.array(common.tolist(), dtype=np.int32)
    grid = difference_map(merged.cell, merged.spacegroup, hkl, dano, phi,
                          sample_rate=sample_rate)
    heights = heights_at(grid, sites_frac)
    arr = np.asarray(grid)
    top = np.sort(arr.ravel())[::-1][:10]
    # the highest point well away from every site (symmetry copies included)
    nu, nv, nw = arr.shape
    fu, fv, fw = np.meshgrid(np.arange(nu) / nu, np.arange(nv) / nv, np.arange(nw) / nw,
                             indexing="ij")
    frac = np.stack([fu.ravel(), fv.ravel(), fw.ravel()], axis=1)
    orth = np.array(grid.unit_cell.orth.mat.tolist())
    near = np.zeros(frac.shape[0], dtype=bool)
    for s in np.asarray(sites_frac, dtype=np.float64):
        for op in merged.spacegroup.operations():
            copy = np.array(op.apply_to_xyz(list(s)))
            delta = frac - copy
            delta -= np.round(delta)
            near |= (np.einsum("ij,nj->ni", orth, delta) ** 2).sum(axis=1) <= 4.0  # 2 Å
    flat = arr.ravel()
    away = float(flat[~near].max()) if (~near).any() else float("nan")
    return {"site_sigma": heights, "top_peaks_sigma": [float(x) for x in top],
            "max_away_from_sites_sigma": away,
            "sites_are_top": bool(min(heights) > away) if heights else False}

