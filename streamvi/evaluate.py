"""Judging a merge against known truth, and the classical baselines to judge it beside.

Used by tests, benchmarks and ``streamvi demo`` on simulated data, where the true structure
factors are known.  Everything here works on ``rs.DataSet`` tables indexed by ASU ``H, K, L``
in the same space group, i.e. on what the MTZ files hold.
"""
from __future__ import annotations

import gemmi
import numpy as np
import reciprocalspaceship as rs

from streamvi.stats import pearson_by_group, shell_edges, shell_index


def _pearson(x: np.ndarray, y: np.ndarray) -> float:
    ok = np.isfinite(x) & np.isfinite(y)
    if ok.sum() < 3:
        return float("nan")
    return float(np.corrcoef(x[ok], y[ok])[0, 1])


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
        ``cc_F`` overall, ``cc_F_shells`` (low → high resolution), ``d_min_shells`` (Å),
        ``cc_anom`` (merged ΔF vs true ΔF over acentric pairs, NaN without both columns),
        ``n_common``.
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
    edges = shell_edges(d, n_shells)
    shell = shell_index(d, edges)
    cc_shells, _ = pearson_by_group(fm[ok], ft[ok], shell[ok], n_shells)
    out = {"cc_F": _pearson(fm, ft), "cc_F_shells": [float(x) for x in cc_shells],
           "d_min_shells": [float(x) for x in edges[1:]], "n_common": int(ok.sum()),
           "cc_anom": float("nan")}
    if {"F(+)", "F(-)"} <= set(m.columns) and {"F(+)", "F(-)"} <= set(t.columns):
        centric = merged.spacegroup.operations().centric_flag_array(hkl)
        dm = m["F(+)"].to_numpy(np.float64) - m["F(-)"].to_numpy(np.float64)
        dt = t["F(+)"].to_numpy(np.float64) - t["F(-)"].to_numpy(np.float64)
        sel = ~centric
        out["cc_anom"] = _pearson(dm[sel], dt[sel])
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
    n = space.n_unique
    sw = np.zeros(n)
    swi = np.zeros(n)
    swi2 = np.zeros(n)
    cnt = np.zeros(n, np.int64)
    for msg in crystals:
        rows = space.lookup(msg.hkl())
        ok = rows >= 0
        rows = rows[ok]
        i = msg.I[ok].astype(np.float64)
        s = msg.sigI[ok].astype(np.float64)
        w = 1.0 / (s * s) if weighting == "inverse_variance" else np.ones_like(i)
        np.add.at(sw, rows, w)
        np.add.at(swi, rows, w * i)
        np.add.at(swi2, rows, w * i * i)
        np.add.at(cnt, rows, 1)
    with np.errstate(invalid="ignore", divide="ignore"):
        imean = swi / sw
        if weighting == "inverse_variance":
            sig = 1.0 / np.sqrt(sw)
        else:
            var = swi2 / sw - imean ** 2
            sig = np.sqrt(np.maximum(var, 0) / np.maximum(cnt - 1, 1))
    f = np.sqrt(np.maximum(imean, 0))
    sigf = sig / (2 * np.maximum(f, 1e-3))
    from types import SimpleNamespace

    from streamvi.publish.mtz import snapshot_to_dataset

    # the publisher reads only space, tables and obs_count: the same columns as for the model
    table = {"F": f, "SIGF": sigf, "I": imean, "SIGI": sig}
    zeros = np.zeros_like(cnt)
    ds = snapshot_to_dataset(SimpleNamespace(
        space=space, tables={"all": table, "half1": table, "half2": table},
        obs_count=np.stack([cnt, zeros, zeros])))
    return ds[[c for c in ds.columns if "half" not in c]]


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
    common = merged.index.intersection(truth.index)
    m = merged.loc[common]
    dano = (m["F(+)"] - m["F(-)"]).to_numpy(np.float64)
    phi = truth.loc[common, phase_col].to_numpy(np.float64) - 90.0
    ok = np.isfinite(dano) & np.isfinite(phi)
    hkl = np.array(common.tolist(), dtype=np.int32)[ok]
    coeff = dano[ok] * np.exp(1j * np.radians(phi[ok]))
    asu = gemmi.ComplexAsuData(merged.cell, merged.spacegroup, hkl, coeff.astype(np.complex64))
    grid = asu.transform_f_phi_to_map(sample_rate=sample_rate)
    grid.normalize()   # σ units
    heights = [float(grid.interpolate_value(grid.unit_cell.orthogonalize(gemmi.Fractional(*s))))
               for s in np.asarray(sites_frac, dtype=np.float64)]
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

