"""Per-resolution-shell quality statistics of a merge, each with its evidence.

Everything here is computed from a posterior snapshot (F, I and their σ for the full and the
two half-dataset tables) and the observation counts of the store, vectorised with
``np.bincount`` over shells.  Shells have equal volume in reciprocal space (equal steps in
1/d³), as is the custom in data-processing tables.

Two estimates of CC½ and CCanom are kept apart, because they answer different questions:

- **model** (``cc_half``, ``cc_anom``): the correlation of the two half-dataset posteriors.
  It is the merge the MTZ holds, but it depends on how far training has come: it moves while
  the optimiser does, even when no image arrives.
- **data** (``cc_half_data``, ``cc_anom_data``): the correlation of the plain (unweighted)
  half-set averages of the stored observations, kept as running sums by the store
  (:func:`halfset_statistics`).  No training enters it, so it changes only when data arrive;
  with no scaling and no partiality correction it is lower than the model's.

Every correlation comes with the number of pairs behind it and a 95 % interval by Fisher's z
(``tanh(atanh(r) ± 1.96/√(n − 3))``).  A shell with fewer than :data:`MIN_PAIRS` pairs has no
value (NaN here, null in JSON, no sample in Prometheus): "too few pairs", never a number.
The resolution estimate is where a fit of CC½ against 1/d² crosses :data:`CC_HALF_CUT`
(:func:`fit_resolution`), with its interval.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import numpy as np

from streamvi.jsonsafe import jsonable
from streamvi.symmetry import hkl_key, shell_edges, shell_index

CC_HALF_CUT = 0.3
#: Fewest pairs for a shell's correlation to be reported.  With 20 pairs the 95 % interval
#: of r = 0.5 is 0.07–0.77: wide, but it still tells signal from none; below that, one
#: shell read −0.11 with one seed and −0.82 with another (issue 17).
MIN_PAIRS = 20
#: The normal quantile of a two-sided 95 % interval.
Z95 = 1.959963984540054
#: Misfit floor (in CC) added to each shell's variance in the resolution fit, so that the
#: many pairs of the low-resolution shells do not pin a curve whose shape is only a model.
FIT_FLOOR = 0.03


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


def fisher_interval(r: np.ndarray | float, n: np.ndarray | float, z: float = Z95
                    ) -> tuple[np.ndarray, np.ndarray]:
    """Confidence interval of Pearson correlations by Fisher's z transformation.

    Parameters
    ----------
    r
        Sample correlations.
    n
        Pairs behind each.
    z
        Normal quantile (1.96: a two-sided 95 % interval).

    Returns
    -------
    (numpy.ndarray, numpy.ndarray)
        ``tanh(atanh(r) ∓ z/√(n − 3))``; NaN where r is NaN or n ≤ 3.
    """
    r = np.asarray(r, dtype=np.float64)
    n = np.asarray(n, dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        centre = np.arctanh(np.clip(r, -1.0, 1.0))
        half = z / np.sqrt(n - 3.0)
        low, high = np.tanh(centre - half), np.tanh(centre + half)
    bad = ~np.isfinite(r) | ~(n > 3)
    low = np.where(bad, np.nan, low)
    high = np.where(bad, np.nan, high)
    return low, high


def cc_star(cc_half: np.ndarray) -> np.ndarray:
    """CC* = sqrt(2 CC½ / (1 + CC½)) (Karplus & Diederichs 2012); NaN where CC½ <= 0."""
    cc = np.asarray(cc_half, dtype=np.float64)
    # CC½ = −1 (two observations of a shell, anticorrelated) would divide by zero
    with np.errstate(invalid="ignore", divide="ignore"):
        out = np.sqrt(2 * cc / (1 + cc))
    out[~(cc > 0)] = np.nan
    return out


@dataclass
class ShellCorrelation:
    """A correlation per shell and overall, with the pairs behind it and its 95 % interval.

    Shells with fewer than ``min_pairs`` pairs have NaN value and interval (their pairs are
    still given).  ``s_mean`` is the mean 1/d² (Å⁻²) of each shell's pairs.
    """

    cc: np.ndarray
    pairs: np.ndarray
    low: np.ndarray
    high: np.ndarray
    s_mean: np.ndarray
    overall: float
    overall_pairs: int
    overall_low: float
    overall_high: float

    @classmethod
    def empty(cls, n_shells: int) -> "ShellCorrelation":
        nan = np.full(n_shells, np.nan)
        return cls(nan, np.zeros(n_shells, np.int64), nan.copy(), nan.copy(), nan.copy(),
                   float("nan"), 0, float("nan"), float("nan"))


def correlation_by_shell(x: np.ndarray, y: np.ndarray, shell: np.ndarray, s: np.ndarray,
                         n_shells: int, min_pairs: int = MIN_PAIRS) -> ShellCorrelation:
    """Pearson correlation of paired values per shell and overall, with evidence.

    Parameters
    ----------
    x, y
        The paired values (one pair per reflection seen in both halves).
    shell
        Shell index of each pair.
    s
        1/d² of each pair, Å⁻² (for the shells' centres).
    n_shells
        Number of shells.
    min_pairs
        Fewest pairs for a value.
    """
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    cc, n = pearson_by_group(x, y, shell, n_shells, min_count=max(min_pairs, 3))
    low, high = fisher_interval(cc, n)
    with np.errstate(invalid="ignore", divide="ignore"):
        s_mean = np.bincount(shell, s, n_shells) / n
    total = int(x.size)
    overall = pearson(x, y) if total >= max(min_pairs, 3) else float("nan")
    o_low, o_high = fisher_interval(overall, total)
    return ShellCorrelation(cc=cc, pairs=n.astype(np.int64), low=low, high=high,
                            s_mean=s_mean, overall=overall, overall_pairs=total,
                            overall_low=float(o_low), overall_high=float(o_high))


# ---------------------------------------------------------------------- resolution


@dataclass
class ResolutionFit:
    """Where CC½ falls to the cut, from a fit over shells.

    Attributes
    ----------
    d
        Resolution (Å) where the fitted CC½ equals the cut; None unless ``state`` is
        ``"fit"``.
    low, high
        Its 95 % interval, Å (``low`` < ``high``), kept within the table's range.
    state
        ``"fit"``: the cut is crossed inside the table; ``"beyond_dmin"``: CC½ stays above
        the cut to the table's edge (the data may extend further: say "beyond dmin", never
        dmin); ``"below_dmax"``: even the lowest-resolution shell is below the cut;
        ``"too_few_shells"``: fewer than three shells have enough pairs; ``"no_trend"``:
        CC½ does not fall with resolution (no crossing to estimate).
    cut
        The CC½ level (default :data:`CC_HALF_CUT`).
    """

    d: float | None
    low: float | None
    high: float | None
    state: str
    cut: float = CC_HALF_CUT

    @property
    def beyond_dmin(self) -> bool:
        return self.state == "beyond_dmin"

    def to_dict(self) -> dict:
        return asdict(self)

    def describe(self, dmin: float | None = None) -> str:
        """One line for people: ``"2.31 Å (2.20–2.45)"``, ``"beyond dmin (1.80 Å)"``, …"""
        if self.state == "fit":
            return f"{self.d:.2f} Å ({self.low:.2f}–{self.high:.2f})"
        if self.state == "beyond_dmin":
            return "beyond dmin" + (f" ({dmin:.2f} Å)" if dmin is not None else "")
        if self.state == "below_dmax":
            return "below the first shell"
        if self.state == "no_trend":
            return "no estimate (CC½ does not fall with resolution)"
        return "too few pairs"


def _logistic(s: np.ndarray, p: np.ndarray) -> np.ndarray:
    """CC½(s) = 1 / (1 + c + exp(a + b·s)) with ``p = (a, b, log c)``.

    With c = 0 this is the curve aimless and DIALS fit, ½(1 − tanh((s − s0)/r)): the
    half-set noise grows as exp(b·s) against the signal.  The floor c ≥ 0 stands for errors
    proportional to the intensity (scales, partialities), which keep CC½ below 1 even at low
    resolution; without it the curve overshoots there and crosses the cut late (simulated
    beamtime, 1,000 images: the last shell read 0.291 at 1.83 Å and the c = 0 fit crossed
    0.3 at 1.80 Å).
    """
    with np.errstate(over="ignore"):
        return 1.0 / (1.0 + math.exp(p[2]) + np.exp(np.clip(p[0] + p[1] * s, -50, 50)))


def _crossing(p: np.ndarray, cut: float) -> float:
    """The s where :func:`_logistic` equals ``cut`` (NaN if it never reaches the cut)."""
    rest = 1.0 / cut - 1.0 - math.exp(p[2])
    if rest <= 0 or p[1] == 0:
        return float("nan")
    return (math.log(rest) - p[0]) / p[1]


def fit_resolution(s: np.ndarray, cc: np.ndarray, pairs: np.ndarray, *, s_min: float,
                   s_max: float, cut: float = CC_HALF_CUT) -> ResolutionFit:
    """Fit CC½ = 1/(1 + c + exp(a + b·s)) over shells and solve for CC½ = ``cut``.

    Weighted least squares (Levenberg–Marquardt) with each shell's variance
    ``(1 − cc²)²/(n − 3)`` (Fisher) plus :data:`FIT_FLOOR`²; the covariance is scaled up by
    the reduced χ² when the curve fits worse than the intervals say, and the interval of
    the crossing follows by the delta method.  Four shells or more fit the floor c (see
    :func:`_logistic`); three fit c = 0.

    Parameters
    ----------
    s, cc, pairs
        Per shell: mean 1/d² (Å⁻²), CC½ (NaN: too few pairs, left out) and pairs.
    s_min, s_max
        1/d² of the table's low- and high-resolution edges, Å⁻².
    cut
        The CC½ level.
    """
    s = np.asarray(s, dtype=np.float64)
    cc = np.asarray(cc, dtype=np.float64)
    n = np.asarray(pairs, dtype=np.float64)
    ok = np.isfinite(cc) & np.isfinite(s) & (n > 3)
    if ok.sum() < 3:
        return ResolutionFit(None, None, None, "too_few_shells", cut)
    s, cc, n = s[ok], cc[ok], n[ok]
    var = np.square(1.0 - np.minimum(cc * cc, 0.999)) / (n - 3.0) + FIT_FLOOR ** 2
    w = 1.0 / np.sqrt(var)
    free = np.array([True, True, s.size >= 4])
    params = _initial_logistic(s, cc)
    if not free[2]:
        params[2] = -30.0                     # c = 0

    def residuals(p: np.ndarray) -> np.ndarray:
        return (cc - _logistic(s, p)) * w

    def jacobian(p: np.ndarray) -> np.ndarray:
        return np.stack(_central_differences(residuals, p, free), axis=1)

    params, cost = _levenberg_marquardt(residuals, jacobian, params, free)
    j = jacobian(params)
    dof = max(int(s.size) - int(free.sum()), 1)
    inflate = max(1.0, cost / dof)
    try:
        cov = np.linalg.inv(j.T @ j) * inflate
    except np.linalg.LinAlgError:
        cov = np.full((int(free.sum()),) * 2, np.inf)
    if not params[1] > 0:
        # CC½ that does not fall with resolution has no crossing to speak of; say what the
        # shells say
        state = ("beyond_dmin" if np.all(cc >= cut) else "below_dmax" if np.all(cc < cut)
                 else "no_trend")
        return ResolutionFit(None, None, None, state, cut)
    if _logistic(np.array([s_min]), params)[0] < cut:
        return ResolutionFit(None, None, None, "below_dmax", cut)
    if _logistic(np.array([s_max]), params)[0] >= cut:
        return ResolutionFit(None, None, None, "beyond_dmin", cut)
    s_cut = _crossing(params, cut)
    g = np.asarray(_central_differences(lambda p: _crossing(p, cut), params, free))
    var_cut = float(g @ cov @ g) if np.all(np.isfinite(cov)) and np.all(np.isfinite(g)) \
        else math.inf
    sd = math.sqrt(max(var_cut, 0.0))
    lo_s = min(max(s_cut - Z95 * sd, s_min), s_max)
    hi_s = min(max(s_cut + Z95 * sd, s_min), s_max)
    return ResolutionFit(d=1.0 / math.sqrt(s_cut), low=1.0 / math.sqrt(hi_s),
                         high=1.0 / math.sqrt(lo_s), state="fit", cut=cut)


def _central_differences(f, p: np.ndarray, free: np.ndarray) -> list:
    """``∂f/∂p_k`` for every free ``k``, by central differences (step 10⁻⁶ relative)."""
    out = []
    for k in np.nonzero(free)[0]:
        h = 1e-6 * max(1.0, abs(p[k]))
        up, down = p.copy(), p.copy()
        up[k] += h
        down[k] -= h
        out.append((np.asarray(f(up)) - np.asarray(f(down))) / (2 * h))
    return out


def _initial_logistic(s: np.ndarray, cc: np.ndarray) -> np.ndarray:
    """A start for :func:`fit_resolution`: log(1/CC − 1) regressed on s, c = 0.05."""
    use = (cc > 0.02) & (cc < 0.98)
    if use.sum() >= 2 and np.ptp(s[use]) > 0:
        b, a = np.polyfit(s[use], np.log(1.0 / cc[use] - 1.0), 1)
    else:
        b = 10.0 / max(float(np.ptp(s)), 1e-6)
        a = -b * float(np.median(s))
    return np.array([float(a), float(b), math.log(0.05)])


def _levenberg_marquardt(residuals, jacobian, params: np.ndarray, free: np.ndarray,
                         max_iter: int = 200) -> tuple[np.ndarray, float]:
    """Minimise Σ residuals² over the ``free`` parameters; returns (parameters, cost)."""
    lam = 1e-2
    cost = float(np.sum(residuals(params) ** 2))
    for _ in range(max_iter):
        j, res = jacobian(params), residuals(params)
        jtj = j.T @ j
        try:
            step = np.linalg.solve(jtj + lam * np.diag(np.diag(jtj) + 1e-12), -j.T @ res)
        except np.linalg.LinAlgError:
            break
        trial = params.copy()
        trial[free] += step
        trial[2] = min(trial[2], 5.0)         # c below e⁵: the fit stays in range
        new_cost = float(np.sum(residuals(trial) ** 2))
        if np.isfinite(new_cost) and new_cost < cost:
            done = cost - new_cost < 1e-12 * max(cost, 1e-12)
            params, cost, lam = trial, new_cost, lam / 3.0
            if done:
                break
        else:
            lam *= 10.0
            if lam > 1e10:
                break
    return params, cost


def resolution_at_cc(d_min: np.ndarray, cc: np.ndarray, cut: float = CC_HALF_CUT) -> float | None:
    """Resolution (Å) where CC½ first falls below ``cut``, linearly interpolated in 1/d².

    The plain reading of a table (kept for comparisons; the published estimate is
    :func:`fit_resolution`).  Returns the highest-resolution edge if it never falls below
    the cut, None if no shell has a CC½.
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


# ---------------------------------------------------------------------- the table


def _floats(a) -> list[float]:
    return [float(x) for x in a]


def _ints(a) -> list[int]:
    return [int(x) for x in a]


@dataclass
class ShellTable:
    """Quality statistics per resolution shell plus the overall row.

    Per shell (lists, low → high resolution): edges, counts, completeness, multiplicity,
    ⟨I/σ⟩, and for each correlation (``cc_half``, ``cc_anom`` from the model's half
    posteriors; ``cc_half_data``, ``cc_anom_data`` from the half-set averages of the data,
    filled by :func:`attach_halfset_statistics`) its ``_pairs``, ``_low`` and ``_high``.
    ``overall`` holds the same keys for all shells together.  ``resolution`` and
    ``resolution_data`` are :meth:`ResolutionFit.to_dict` of the two CC½ estimates;
    ``resolution_cc_half`` is the model's crossing (Å; None when not inside the table).
    """

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
    cc_half_pairs: list[int] = field(default_factory=list)
    cc_half_low: list[float] = field(default_factory=list)
    cc_half_high: list[float] = field(default_factory=list)
    cc_anom_pairs: list[int] = field(default_factory=list)
    cc_anom_low: list[float] = field(default_factory=list)
    cc_anom_high: list[float] = field(default_factory=list)
    cc_half_data: list[float] = field(default_factory=list)
    cc_half_data_pairs: list[int] = field(default_factory=list)
    cc_half_data_low: list[float] = field(default_factory=list)
    cc_half_data_high: list[float] = field(default_factory=list)
    cc_anom_data: list[float] = field(default_factory=list)
    cc_anom_data_pairs: list[int] = field(default_factory=list)
    cc_anom_data_low: list[float] = field(default_factory=list)
    cc_anom_data_high: list[float] = field(default_factory=list)
    resolution: dict | None = None
    resolution_data: dict | None = None
    min_pairs: int = MIN_PAIRS
    anomalous: bool = False

    def to_dict(self) -> dict:
        """Every field, JSON-safe: NaN and infinities become None."""
        return jsonable(asdict(self))

    def set_correlation(self, name: str, corr: ShellCorrelation) -> None:
        """Store ``corr`` under ``name`` (``cc_half``, ``cc_anom``, ``cc_half_data``, …)."""
        setattr(self, name, _floats(corr.cc))
        setattr(self, f"{name}_pairs", _ints(corr.pairs))
        setattr(self, f"{name}_low", _floats(corr.low))
        setattr(self, f"{name}_high", _floats(corr.high))
        self.overall.update({name: corr.overall, f"{name}_pairs": float(corr.overall_pairs),
                             f"{name}_low": corr.overall_low, f"{name}_high": corr.overall_high})

    def resolution_fit(self, which: str = "model") -> ResolutionFit | None:
        """The resolution estimate of ``which`` CC½ (``model`` or ``data``) as an object."""
        d = self.resolution if which == "model" else self.resolution_data
        return None if d is None else ResolutionFit(**d)

    @property
    def has_data_estimate(self) -> bool:
        return len(self.cc_half_data) == len(self.d_min) > 0

    def format(self) -> str:
        """The table as text, one line per shell and an overall line.

        Each correlation is shown with the pairs behind it; a shell with too few pairs
        shows ``few`` instead of a value.
        """
        data = self.has_data_estimate
        head = (f"{'d_max':>7} {'d_min':>6} {'compl%':>7} {'mult':>6} {'<I/sI>':>7} "
                f"{'CC1/2':>6} {'pairs':>6} {'CC*':>6} {'CCanom':>7} {'pairs':>6}")
        if data:
            head += f" {'CC1/2dat':>8}"
        head += f" {'unique':>7}"
        lines = [head]

        def fmt(x: float | None, w: int, p: int) -> str:
            return f"{x:>{w}.{p}f}" if x is not None and np.isfinite(x) else f"{'-':>{w}}"

        def corr(x: float | None, n: int, w: int) -> str:
            if n < self.min_pairs:
                return f"{'few':>{w}}"
            return fmt(x, w, 3)

        def row(d_max, d_min, compl, mult, ios, cc, n_cc, cs, ca, n_ca, ccd, n_ccd, uniq):
            text = (f"{d_max:>7.2f} {d_min:>6.2f} {fmt(100 * compl, 7, 1)} {fmt(mult, 6, 1)}"
                    f" {fmt(ios, 7, 1)} {corr(cc, n_cc, 6)} {n_cc:>6d} {fmt(cs, 6, 3)}"
                    f" {corr(ca, n_ca, 7) if self.anomalous else fmt(None, 7, 3)} {n_ca:>6d}")
            if data:
                text += f" {corr(ccd, n_ccd, 8)}"
            return text + f" {uniq:>7d}"

        pairs = self.cc_half_pairs or [0] * len(self.d_min)
        apairs = self.cc_anom_pairs or [0] * len(self.d_min)
        dpairs = self.cc_half_data_pairs or [0] * len(self.d_min)
        for i in range(len(self.d_min)):
            lines.append(row(self.d_max[i], self.d_min[i], self.completeness[i],
                             self.multiplicity[i], self.i_over_sigma[i], self.cc_half[i],
                             pairs[i], self.cc_star[i], self.cc_anom[i], apairs[i],
                             self.cc_half_data[i] if data else None, dpairs[i],
                             self.n_unique[i]))
        o = self.overall
        lines.append(row(o["d_max"], o["d_min"], o["completeness"], o["multiplicity"],
                         o["i_over_sigma"], o.get("cc_half"), int(o.get("cc_half_pairs", 0)),
                         o.get("cc_star"), o.get("cc_anom"), int(o.get("cc_anom_pairs", 0)),
                         o.get("cc_half_data"), int(o.get("cc_half_data_pairs", 0)),
                         int(o["n_unique"])) + "  overall")
        lines.append(f"CC1/2 and CCanom: the model's half posteriors; CC1/2dat: plain half-set "
                     f"averages of the data; 'few': under {self.min_pairs} pairs")
        for which, label in (("model", "model"), ("data", "data")):
            fit = self.resolution_fit(which)
            if fit is None:
                continue
            if fit.state == "fit":
                lines.append(f"CC1/2 ({label}) falls to {fit.cut} at d = {fit.d:.2f} Å "
                             f"(95 % {fit.low:.2f}-{fit.high:.2f} Å, logistic fit over shells)")
            elif fit.state == "beyond_dmin":
                lines.append(f"CC1/2 ({label}) stays above {fit.cut} beyond dmin "
                             f"({self.d_min[-1]:.2f} Å): the crystals may diffract further; "
                             "a lower dmin may pay")
            elif fit.state == "below_dmax":
                lines.append(f"CC1/2 ({label}) is below {fit.cut} from the first shell on")
            elif fit.state == "no_trend":
                lines.append(f"CC1/2 ({label}) does not fall with resolution: no estimate")
            else:
                lines.append(f"CC1/2 ({label}): too few pairs for a resolution estimate")
        return "\n".join(lines)

    def history_lines(self) -> list[str]:
        """The statistics as MTZ history lines (80 characters at most each)."""
        data = self.has_data_estimate
        out = ["CC1/2 [95% CI] n=pairs, model halves" + ("; data: half-set averages"
                                                         if data else "")]

        def cc_text(name: str, i: int) -> str:
            x, lo, hi, n = (_at(getattr(self, f"{name}{suffix}"), i)
                            for suffix in ("", "_low", "_high", "_pairs"))
            n = int(n or 0)
            if n < self.min_pairs or x is None or not np.isfinite(x):
                return f"few n={n}"
            return f"{x:.3f} [{lo:.3f},{hi:.3f}] n={n}"

        n_shells = len(self.d_min)
        for i in range(n_shells):
            text = f"{i + 1:>2} {self.d_max[i]:5.2f}-{self.d_min[i]:4.2f} " + cc_text("cc_half", i)
            if data:
                text += "; data " + cc_text("cc_half_data", i)
            out.append(text[:80])
        if self.anomalous:
            out.append("CCanom [95% CI] n=pairs (model halves)")
            for i in range(n_shells):
                out.append((f"{i + 1:>2} {self.d_max[i]:5.2f}-{self.d_min[i]:4.2f} "
                            + cc_text("cc_anom", i))[:80])
        for which in ("model", "data"):
            fit = self.resolution_fit(which)
            if fit is not None:
                out.append(f"resolution at CC1/2={fit.cut} ({which}): "
                           f"{fit.describe(self.d_min[-1])}"[:80])
        return out


def _at(values: list, i: int):
    """``values[i]``, or None where the list is shorter (a table made by hand)."""
    return values[i] if i < len(values) else None


# ---------------------------------------------------------------------- computing it


def shell_statistics(*, hkl: np.ndarray, d: np.ndarray, centric: np.ndarray,
                     friedel: np.ndarray, obs_count: np.ndarray, i_full: np.ndarray,
                     sigi_full: np.ndarray, i_half: tuple[np.ndarray, np.ndarray],
                     f_half: tuple[np.ndarray, np.ndarray] | None = None,
                     anomalous: bool = False, n_shells: int = 10,
                     cc_cut: float = CC_HALF_CUT,
                     i_over_sigma: np.ndarray | None = None,
                     expected_i: np.ndarray | None = None,
                     min_pairs: int = MIN_PAIRS) -> ShellTable:
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
    min_pairs
        Fewest pairs for a shell's CC½ or CCanom (:data:`MIN_PAIRS`).
    """
    edges = shell_edges(float(np.max(d)), float(np.min(d)), n_shells)
    shell = shell_index(d, edges)
    s = 1.0 / np.square(np.asarray(d, dtype=np.float64))
    # reflections are counted per hkl (a Friedel pair is one reflection for completeness)
    key = hkl_key(hkl)
    uniq_key, row_to_hkl = np.unique(key, return_inverse=True)
    row_to_hkl = row_to_hkl.reshape(-1)
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
    half = correlation_by_shell(i_half[0][both], i_half[1][both], shell[both], s[both],
                                n_shells, min_pairs)
    anom = ShellCorrelation.empty(n_shells)
    if anomalous and f_half is not None:
        da, db, sh, rows = _anomalous_differences(row_to_hkl, friedel, centric, both, f_half,
                                                  shell)
        anom = correlation_by_shell(da, db, sh, s[rows], n_shells, min_pairs)
    total_unique = int(observed.sum())
    overall = {
        "d_max": float(edges[0]), "d_min": float(edges[-1]),
        "n_unique": float(total_unique), "n_possible": float(n_hkl),
        "completeness": total_unique / max(n_hkl, 1),
        "multiplicity": float(hkl_obs.sum() / max(total_unique, 1)),
        "i_over_sigma": float(ios[seen].mean()) if seen.any() else float("nan"),
        "cc_star": float(cc_star(np.array([half.overall]))[0]),
        "n_observations": float(hkl_obs.sum()),
    }
    fit = fit_resolution(half.s_mean, half.cc, half.pairs, s_min=float(1 / edges[0] ** 2),
                         s_max=float(1 / edges[-1] ** 2), cut=cc_cut)
    table = ShellTable(
        d_max=_floats(edges[:-1]), d_min=_floats(edges[1:]),
        n_unique=_ints(n_unique), n_possible=_ints(n_possible),
        completeness=_floats(completeness), multiplicity=_floats(multiplicity),
        i_over_sigma=_floats(i_over_sigma),
        cc_half=[], cc_star=_floats(cc_star(half.cc)), cc_anom=[], overall=overall,
        resolution_cc_half=fit.d, resolution=fit.to_dict(), min_pairs=int(min_pairs),
        anomalous=bool(anomalous))
    table.set_correlation("cc_half", half)
    table.set_correlation("cc_anom", anom)
    return table


def halfset_statistics(*, hkl: np.ndarray, d: np.ndarray, centric: np.ndarray,
                       friedel: np.ndarray, obs_count: np.ndarray, sum_i_half: np.ndarray,
                       expected_i: np.ndarray | None, anomalous: bool, n_shells: int,
                       min_pairs: int = MIN_PAIRS
                       ) -> tuple[ShellCorrelation, ShellCorrelation]:
    """CC½ and CCanom of the plain half-set averages of the observations (no training).

    Each half's average of a row is ``Σ I / n`` over that half's observations of it (the
    store's running sums).  CC½ correlates the two halves' averages over the rows seen in
    both, on ``I / expected_i`` as :func:`shell_statistics` does; CCanom correlates the
    halves' ``(Ī(+) − Ī(−)) / √expected_i`` over acentric reflections whose two mates were
    seen in both halves.  Unweighted rather than inverse-variance averages: with
    intensity-dependent σ the latter favour the weak observations of each reflection, and
    on the simulated beamtime they read lower in every shell.

    Parameters
    ----------
    hkl, d, centric, friedel
        The table's rows (as for :func:`shell_statistics`).
    obs_count
        ``(3, n_rows)`` observations per row: all, half A, half B.
    sum_i_half
        ``(2, n_rows)`` sum of the observed intensities per half.
    expected_i
        εΣ(d) per row from the data's Wilson plot (None: no normalisation).
    anomalous
        Whether the rows keep Friedel mates apart (then CCanom is computed).
    n_shells
        Shells (the same edges as :func:`shell_statistics` over ``d``).

    Returns
    -------
    (ShellCorrelation, ShellCorrelation)
        CC½ and CCanom (all NaN outside anomalous mode).
    """
    edges = shell_edges(float(np.max(d)), float(np.min(d)), n_shells)
    shell = shell_index(d, edges)
    s = 1.0 / np.square(np.asarray(d, dtype=np.float64))
    counts = np.asarray(obs_count[1:3], dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        means = np.asarray(sum_i_half, dtype=np.float64) / counts
    scale = np.ones(means.shape[1]) if expected_i is None else np.asarray(expected_i, np.float64)
    both = (counts[0] > 0) & (counts[1] > 0)
    norm = means / scale
    half = correlation_by_shell(norm[0][both], norm[1][both], shell[both], s[both], n_shells,
                                min_pairs)
    anom = ShellCorrelation.empty(n_shells)
    if anomalous:
        key = hkl_key(hkl)
        _, row_to_hkl = np.unique(key, return_inverse=True)
        amp = means / np.sqrt(scale)
        da, db, sh, rows = _anomalous_differences(row_to_hkl.reshape(-1), friedel, centric,
                                                  both, (amp[0], amp[1]), shell)
        anom = correlation_by_shell(da, db, sh, s[rows], n_shells, min_pairs)
    return half, anom


def attach_halfset_statistics(table: ShellTable, *, hkl: np.ndarray, d: np.ndarray,
                              centric: np.ndarray, friedel: np.ndarray,
                              obs_count: np.ndarray, sum_i_half: np.ndarray,
                              expected_i: np.ndarray | None,
                              cc_cut: float = CC_HALF_CUT) -> ShellTable:
    """Fill ``table``'s ``cc_half_data``/``cc_anom_data`` fields and ``resolution_data``
    from :func:`halfset_statistics` (same shells); returns ``table``."""
    n_shells = len(table.d_min)
    half, anom = halfset_statistics(hkl=hkl, d=d, centric=centric, friedel=friedel,
                                    obs_count=obs_count, sum_i_half=sum_i_half,
                                    expected_i=expected_i, anomalous=table.anomalous,
                                    n_shells=n_shells, min_pairs=table.min_pairs)
    table.set_correlation("cc_half_data", half)
    table.set_correlation("cc_anom_data", anom)
    fit = fit_resolution(half.s_mean, half.cc, half.pairs,
                         s_min=float(1 / table.d_max[0] ** 2),
                         s_max=float(1 / table.d_min[-1] ** 2), cut=cc_cut)
    table.resolution_data = fit.to_dict()
    return table


def pearson(x: np.ndarray, y: np.ndarray) -> float:
    """Pearson correlation of the pairs where both are finite; NaN with fewer than 3 such
    pairs or no spread (the one correlation helper of the package)."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    ok = np.isfinite(x) & np.isfinite(y)
    x, y = x[ok], y[ok]
    if x.size < 3 or np.std(x) == 0 or np.std(y) == 0:
        return float("nan")
    return float(np.corrcoef(x, y)[0, 1])


def _anomalous_differences(row_to_hkl: np.ndarray, friedel: np.ndarray, centric: np.ndarray,
                           both: np.ndarray, f_half: tuple[np.ndarray, np.ndarray],
                           shell: np.ndarray
                           ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """ΔF = F(+) − F(−) of each half, for acentric hkl with both mates seen in both halves;
    with each difference's shell and the row of its F(+) mate."""
    use = both & ~centric
    plus = use & (friedel > 0)
    minus = use & (friedel < 0)
    hp, hm = row_to_hkl[plus], row_to_hkl[minus]
    common, ip, im = np.intersect1d(hp, hm, return_indices=True)
    rows_p = np.nonzero(plus)[0][ip]
    rows_m = np.nonzero(minus)[0][im]
    da = f_half[0][rows_p] - f_half[0][rows_m]
    db = f_half[1][rows_p] - f_half[1][rows_m]
    return da, db, shell[rows_p], rows_p
