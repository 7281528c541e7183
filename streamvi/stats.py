"""Per-resolution-shell quality statistics of a merge.

Everything here is computed from a posterior snapshot (F, I and their σ for the full and the
two half-dataset tables) and the observation counts of the store, vectorised with
``np.bincount`` over shells.  Shells have equal volume in reciprocal space (equal steps in
1/d³), as is the custom in data-processing tables.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

CC_HALF_CUT = 0.3


def shell_edges(d: np.ndarray, n_shells: int) -> np.ndarray:
    """Shell boundaries in Å, from low to high resolution (``n_shells + 1`` values)."""
    s3 = 1.0 / np.asarray(d, dtype=np.float64) ** 3
    lo, hi = float(s3.min()), float(s3.max())
    edges_s3 = np.linspace(lo, hi, n_shells + 1)
    return np.cbrt(1.0 / edges_s3)


def shell_index(d: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """Index of the shell (0 = lowest resolution) holding each d (Å)."""
    s3 = 1.0 / np.asarray(d, dtype=np.float64) ** 3
    e = 1.0 / np.asarray(edges, dtype=np.float64) ** 3
    return np.clip(np.searchsorted(e, s3, side="right") - 1, 0, len(edges) - 2)


def pearson_by_group(x: np.ndarray, y: np.ndarray, group: np.ndarray, n_groups: int,
                     min_count: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """Pearson correlation of x and y within each group; NaN where fewer than ``min_count``."""
    n = np.bincount(group, minlength=n_groups).astype(np.float64)
    sx = np.bincount(group, x, n_groups)
    sy = np.bincount(group, y, n_groups)
    sxx = np.bincount(group, x * x, n_groups)
    syy = np.bincount(group, y * y, n_groups)
    sxy = np.bincount(group, x * y, n_groups)
    with np.errstate(invalid="ignore", divide="ignore"):
        cov = sxy - sx * sy / n
        vx = sxx - sx * sx / n
        vy = syy - sy * sy / n
        cc = cov / np.sqrt(vx * vy)
    cc[(n < min_count) | ~np.isfinite(cc)] = np.nan
    return cc, n


def cc_star(cc_half: np.ndarray) -> np.ndarray:
    """CC* = sqrt(2 CC½ / (1 + CC½)) (Karplus & Diederichs 2012); NaN where CC½ <= 0."""
    cc = np.asarray(cc_half, dtype=np.float64)
    # CC½ = −1 (two observations of a shell, anticorrelated) would divide by zero
    with np.errstate(invalid="ignore", divide="ignore"):
        out = np.sqrt(2 * cc / (1 + cc))
    out[~(cc > 0)] = np.nan
    return out


@dataclass
class ShellTable:
    """Quality statistics per resolution shell plus the overall row."""

    d_max: list[float]
    d_min: list[float]
    n_unique: list[int]
    n_possible: list[int]
    completeness: list[float]
    multiplicity: list[float]
    i_over_sigma: list[float]
    cc_half: list[float]
    cc_star: list[float]
    cc_anom: list[float]
    overall: dict[str, float] = field(default_factory=dict)
    resolution_cc_half: float | None = None

    def to_dict(self) -> dict:
        return asdict(self)

    def format(self) -> str:
        """The table as text, one line per shell and an overall line."""
        head = (f"{'d_max':>7} {'d_min':>6} {'compl%':>7} {'mult':>6} {'<I/sI>':>7} "
                f"{'CC1/2':>6} {'CC*':>6} {'CCanom':>7} {'unique':>7}")
        lines = [head]

        def fmt(x: float, w: int, p: int) -> str:
            return f"{x:>{w}.{p}f}" if x is not None and np.isfinite(x) else f"{'-':>{w}}"

        for i in range(len(self.d_min)):
            lines.append(
                f"{self.d_max[i]:>7.2f} {self.d_min[i]:>6.2f} {fmt(100 * self.completeness[i], 7, 1)}"
                f" {fmt(self.multiplicity[i], 6, 1)} {fmt(self.i_over_sigma[i], 7, 1)}"
                f" {fmt(self.cc_half[i], 6, 3)} {fmt(self.cc_star[i], 6, 3)}"
                f" {fmt(self.cc_anom[i], 7, 3)} {self.n_unique[i]:>7d}")
        o = self.overall
        lines.append(
            f"{o['d_max']:>7.2f} {o['d_min']:>6.2f} {fmt(100 * o['completeness'], 7, 1)}"
            f" {fmt(o['multiplicity'], 6, 1)} {fmt(o['i_over_sigma'], 7, 1)}"
            f" {fmt(o['cc_half'], 6, 3)} {fmt(o['cc_star'], 6, 3)} {fmt(o['cc_anom'], 7, 3)}"
            f" {int(o['n_unique']):>7d}  overall")
        if self.resolution_cc_half is not None:
            finite = [c for c in self.cc_half if c is not None and np.isfinite(c)]
            if finite and finite[-1] >= CC_HALF_CUT:
                lines.append(f"CC1/2 stays above {CC_HALF_CUT} to the edge of the merge "
                             f"(d = {self.resolution_cc_half:.2f} Å): the crystals may "
                             "diffract further; a lower dmin may pay")
            else:
                lines.append(f"CC1/2 falls to {CC_HALF_CUT} at d = "
                             f"{self.resolution_cc_half:.2f} Å")
        return "\n".join(lines)


def resolution_at_cc(d_min: np.ndarray, cc: np.ndarray, cut: float = CC_HALF_CUT) -> float | None:
    """Resolution (Å) where CC½ first falls below ``cut``, linearly interpolated in 1/d².

    Returns the highest-resolution edge if it never falls below the cut, None if no shell
    has a CC½.
    """
    ok = np.isfinite(cc)
    if not ok.any():
        return None
    d_min, cc = np.asarray(d_min)[ok], np.asarray(cc)[ok]
    below = np.nonzero(cc < cut)[0]
    if below.size == 0:
        return float(d_min[-1])
    j = int(below[0])
    if j == 0:
        return float(d_min[0])
    s0, s1 = 1 / d_min[j - 1] ** 2, 1 / d_min[j] ** 2
    t = (cc[j - 1] - cut) / (cc[j - 1] - cc[j])
    return float(1 / np.sqrt(s0 + t * (s1 - s0)))


def shell_statistics(*, hkl: np.ndarray, d: np.ndarray, centric: np.ndarray,
                     friedel: np.ndarray, obs_count: np.ndarray, i_full: np.ndarray,
                     sigi_full: np.ndarray, i_half: tuple[np.ndarray, np.ndarray],
                     f_half: tuple[np.ndarray, np.ndarray] | None = None,
                     anomalous: bool = False, n_shells: int = 10,
                     cc_cut: float = CC_HALF_CUT,
                     i_over_sigma: np.ndarray | None = None,
                     expected_i: np.ndarray | None = None) -> ShellTable:
    """Per-shell statistics over the rows of a unique-reflection table.

    Parameters
    ----------
    hkl, d, centric, friedel
        Per-row ASU index, resolution (Å), centric flag and Friedel sign (+1/−1).
    obs_count
        ``(3, n_rows)`` observations per row: all images, half A, half B.
    i_full, sigi_full
        Merged intensity and σ per row (full table).
    i_over_sigma
        I/σ(I) per row to average for ⟨I/σ(I)⟩; default ``i_full / sigi_full``.  The engine
        passes the inverse-variance average of the observations, which describes the data
        rather than the posterior's current width.
    i_half
        Merged intensities of the two half-dataset tables.
    f_half
        Merged amplitudes of the two halves (for CCanom; anomalous mode only).
    expected_i
        Expected intensity per row under the prior (εΣ(d), any units).  When given, CC½ is
        computed on ``I / expected_i``: weak reflections sit near their prior mean in both
        halves, and that mean's trend with resolution *within* a shell would otherwise
        correlate the halves without any signal (CC½ read 0.97 in a shell with ⟨I/σ⟩ 0.2).
    """
    edges = shell_edges(d, n_shells)
    shell = shell_index(d, edges)
    # reflections are counted per hkl (a Friedel pair is one reflection for completeness)
    key = _hkl_key(hkl)
    uniq_key, row_to_hkl = np.unique(key, return_inverse=True)
    n_hkl = uniq_key.shape[0]
    hkl_shell = np.zeros(n_hkl, np.int64)
    hkl_shell[row_to_hkl] = shell
    hkl_obs = np.bincount(row_to_hkl, obs_count[0], n_hkl)
    observed = hkl_obs > 0
    n_possible = np.bincount(hkl_shell, minlength=n_shells)
    n_unique = np.bincount(hkl_shell, observed.astype(np.float64), n_shells).astype(np.int64)
    n_obs = np.bincount(hkl_shell, hkl_obs, n_shells)

    seen = obs_count[0] > 0
    with np.errstate(invalid="ignore", divide="ignore"):
        completeness = n_unique / n_possible
        multiplicity = n_obs / n_unique
        ios = np.where(seen, i_full / sigi_full if i_over_sigma is None else i_over_sigma, 0.0)
        n_seen_rows = np.bincount(shell, seen.astype(np.float64), n_shells)
        i_over_sigma = np.bincount(shell, ios, n_shells) / n_seen_rows

    both = (obs_count[1] > 0) & (obs_count[2] > 0)
    if expected_i is not None:
        i_half = (i_half[0] / expected_i, i_half[1] / expected_i)
    cc_half, _ = pearson_by_group(i_half[0][both], i_half[1][both], shell[both], n_shells)
    cc_anom = np.full(n_shells, np.nan)
    overall_anom = np.nan
    if anomalous and f_half is not None:
        da, db, sh = _anomalous_differences(row_to_hkl, friedel, centric, both, f_half, shell)
        if da.size:
            cc_anom, _ = pearson_by_group(da, db, sh, n_shells)
            overall_anom = _pearson(da, db)
    overall_cc = _pearson(i_half[0][both], i_half[1][both])
    total_unique = int(observed.sum())
    overall = {
        "d_max": float(edges[0]), "d_min": float(edges[-1]),
        "n_unique": float(total_unique), "n_possible": float(n_hkl),
        "completeness": total_unique / max(n_hkl, 1),
        "multiplicity": float(hkl_obs.sum() / max(total_unique, 1)),
        "i_over_sigma": float(ios[seen].mean()) if seen.any() else float("nan"),
        "cc_half": overall_cc,
        "cc_star": float(cc_star(np.array([overall_cc]))[0]),
        "cc_anom": overall_anom,
        "n_observations": float(hkl_obs.sum()),
    }
    return ShellTable(
        d_max=[float(x) for x in edges[:-1]], d_min=[float(x) for x in edges[1:]],
        n_unique=[int(x) for x in n_unique], n_possible=[int(x) for x in n_possible],
        completeness=[float(x) for x in completeness],
        multiplicity=[float(x) for x in multiplicity],
        i_over_sigma=[float(x) for x in i_over_sigma],
        cc_half=[float(x) for x in cc_half], cc_star=[float(x) for x in cc_star(cc_half)],
        cc_anom=[float(x) for x in cc_anom], overall=overall,
        resolution_cc_half=resolution_at_cc(edges[1:], cc_half, cc_cut),
    )


def _pearson(x: np.ndarray, y: np.ndarray) -> float:
    if x.size < 3 or np.std(x) == 0 or np.std(y) == 0:
        return float("nan")
    return float(np.corrcoef(x, y)[0, 1])


def _hkl_key(hkl: np.ndarray) -> np.ndarray:
    h = hkl.astype(np.int64) + 2048
    return (h[:, 0] << 24) | (h[:, 1] << 12) | h[:, 2]


def _anomalous_differences(row_to_hkl: np.ndarray, friedel: np.ndarray, centric: np.ndarray,
                           both: np.ndarray, f_half: tuple[np.ndarray, np.ndarray],
                           shell: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ΔF = F(+) − F(−) of each half, for acentric hkl with both mates seen in both halves."""
    use = both & ~centric
    plus = use & (friedel > 0)
    minus = use & (friedel < 0)
    hp, hm = row_to_hkl[plus], row_to_hkl[minus]
    common, ip, im = np.intersect1d(hp, hm, return_indices=True)
    rows_p = np.nonzero(plus)[0][ip]
    rows_m = np.nonzero(minus)[0][im]
    da = f_half[0][rows_p] - f_half[0][rows_m]
    db = f_half[1][rows_p] - f_half[1][rows_m]
    return da, db, shell[rows_p]
