"""When to stop: how many more images each target needs, from growth laws of the data.

A *target* is what the shift crew wants (``--target-cc-half 0.3@1.8``, ``--target-ccanom
0.3@2.5``, ``--target-completeness 0.99``, ``--target-multiplicity 50``).  At each snapshot
:func:`forecast_targets` predicts each figure as a function of the number of images N' and
solves for the N' at which it reaches its target, with an interval:

- **completeness**: each unique reflection is recorded at a rate per image that depends on
  its class (resolution bin, centric or not, ε), estimated from the counts so far.  Within a
  class the rates differ too (a reflection along a symmetry axis, one near the beam stop),
  which a gamma-distributed rate describes: the class's spread of counts gives its shape
  α (α → ∞ is plain Poisson).  A reflection not seen in N images is still unseen after N'
  with probability ((β + N)/(β + N'))^α, β = α/λ: the slow tail of the last per cent.
- **multiplicity**: observations grow linearly with N'; the unique reflections as the
  completeness law says.
- **CC½ and CCanom** in the shell of a resolution: the half-set noise of a reflection's
  average falls as 1/m with its m observations, so CC = 1/(1 + k⟨1/m⟩), with ⟨1/m⟩ over the
  shell's pairs (a Poisson count per half, at the class's rate, seen at least once) and k
  measured now.  A CC target counts as reached when the figure's whole 95 % interval
  (Fisher z) lies above it, and the forecast is for that moment; its own interval follows
  from the ends of CC's interval now.

**Where the data end before the table does** (:func:`data_reach`): a ``serve`` table sized
beyond what the indexer integrates (``dmin`` 1.8 Å, spots integrated to 2.6 Å) holds rows no
image will ever record.  Judged to ``dmin``, completeness then stays far from its target and
its law promises it after hundreds of thousands of images (an unseen class is rare to it,
not impossible), and a CC target at dmin never gets a pair.  Once the observations show such
a gap, the targets asked of the whole table (completeness, multiplicity, CC at dmin) are
judged to the data's reach instead, and each forecast says so (``reach``).

Seconds follow at the current indexed rate.  Every law uses only counts and the current
figure, so a forecast moves only when the data do (the model's CCanom excepted: its figure
moves with training, and its forecast is marked provisional when the figure is).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from streamvi.errors import ConfigError
from streamvi.jsonsafe import jsonable
from streamvi.quality.stats import Z95, ShellTable, fisher_interval
from streamvi.symmetry import hkl_key, shell_edges, shell_index

#: The kinds of target, in the order they are shown; also the ``target`` label of metrics.
KINDS = ("cc_half", "cc_anom", "completeness", "multiplicity")
#: Resolution bins (equal steps in 1/d³) of the reflection classes whose rates are counted.
RATE_BINS = 40
#: Fewest unique reflections in a class for its own gamma shape (else the pooled one).
MIN_CLASS_SIZE = 30
#: Forecasts beyond this many times the images so far are reported as out of reach.
MAX_FACTOR = 1.0e4
#: The data's reach: the resolution this share of the observations reaches.
REACH_QUANTILE = 0.99
#: ... taken in place of dmin only when the table's rows beyond it are at least this share
#: of its rows (observations fill the reciprocal volume evenly or more so towards high
#: resolution, so a data set that reaches dmin has about 1 % of its rows beyond the reach)
REACH_EMPTY_SHARE = 0.05
#: ... and their observations per row at most this share of the rows' inside it: a gap, not
#: the gradual thinning of real data towards the edge (the 32 crystals of 5-HT2B in a 2.0 Å
#: table thin out from 2.04 Å on: 6 % of the rows, under 1 % of the observations)
REACH_DENSITY = 0.05
#: ... and once this many observations are in.
REACH_MIN_OBSERVATIONS = 1000


@dataclass(frozen=True)
class Target:
    """One goal of the data collection.

    Attributes
    ----------
    kind
        One of :data:`KINDS`.
    value
        The level to reach (a correlation, a ratio 0–1, a multiplicity).
    d
        Resolution, Å, for CC targets (the shell holding it is judged); None otherwise.
    at_dmin
        The CC target was given as ``VALUE@dmin`` (the last shell, whatever its d).
    source
        ``"data"``: the training-free half-set figure; ``"model"``: the model's figure.
    """

    kind: str
    value: float
    d: float | None = None
    at_dmin: bool = False
    source: str = "data"

    def describe(self) -> str:
        """What the target asks, in words."""
        if self.kind == "completeness":
            return f"completeness ≥ {100 * self.value:g} %"
        if self.kind == "multiplicity":
            return f"multiplicity ≥ {self.value:g}"
        name = "CC½" if self.kind == "cc_half" else "CCanom"
        where = "dmin" if self.at_dmin or self.d is None else f"{self.d:g} Å"
        return f"{name} ≥ {self.value:g} at {where} ({self.source})"


def parse_target(kind: str, spec: Any, *, key: str | None = None) -> Target | None:
    """A :class:`Target` from its configuration value; None when it is off.

    Parameters
    ----------
    kind
        One of :data:`KINDS`.
    spec
        ``"VALUE@D"`` (D in Å or ``dmin``; optional ``:data`` or ``:model``) for the CC
        kinds, a number for completeness and multiplicity; empty or 0: off.
    key
        The configuration key, for error messages.

    Raises
    ------
    ConfigError
        Naming the key, what was wrong and an example.
    """
    key = key or f"target_{kind}"
    if kind not in KINDS:
        raise ConfigError(f"{key}: unknown target kind {kind!r}; use one of {', '.join(KINDS)}")
    if spec is None or (isinstance(spec, str) and not spec.strip()):
        return None
    if kind in ("completeness", "multiplicity"):
        try:
            value = float(spec)
        except (TypeError, ValueError):
            raise ConfigError(f"{key} = {spec!r}: not a number") from None
        if value == 0:
            return None
        if kind == "completeness" and not 0 < value <= 1:
            raise ConfigError(f"{key} = {value:g}: completeness is a ratio in (0, 1], e.g. "
                              "0.99 (not 99)")
        if kind == "multiplicity" and not value > 0:
            raise ConfigError(f"{key} = {value:g}: must be positive, e.g. 50")
        return Target(kind, value)
    text = str(spec).strip()
    source = "data" if kind == "cc_half" else "model"
    if ":" in text:
        text, source = (part.strip() for part in text.rsplit(":", 1))
        if source not in ("data", "model"):
            raise ConfigError(f"{key} = {spec!r}: the figure after ':' must be 'data' or "
                              "'model', e.g. 0.3@2.5:model")
    value_text, sep, where = text.partition("@")
    if not sep:
        raise ConfigError(f"{key} = {spec!r}: give VALUE@RESOLUTION, e.g. 0.3@1.8 (Å) or "
                          "0.3@dmin")
    try:
        value = float(value_text)
    except ValueError:
        raise ConfigError(f"{key} = {spec!r}: {value_text!r} is not a number; e.g. "
                          "0.3@1.8") from None
    if not 0 < value < 1:
        raise ConfigError(f"{key} = {spec!r}: the correlation to reach must lie in (0, 1), "
                          "e.g. 0.3")
    if where.strip().lower() == "dmin":
        return Target(kind, value, None, at_dmin=True, source=source)
    try:
        d = float(where)
    except ValueError:
        raise ConfigError(f"{key} = {spec!r}: {where!r} is not a resolution in Å; e.g. "
                          "0.3@1.8 or 0.3@dmin") from None
    if not d > 0:
        raise ConfigError(f"{key} = {spec!r}: the resolution must be positive (Å)")
    return Target(kind, value, d, source=source)


def targets_from_config(config: Any, *, dmin: float, anomalous: bool) -> list[Target]:
    """The targets a service configuration sets (``target_*`` options).

    Raises
    ------
    ConfigError
        A malformed target, a resolution beyond ``dmin``, a CCanom target outside anomalous
        mode.
    """
    out = []
    for kind, key in (("cc_half", "target_cc_half"), ("cc_anom", "target_ccanom"),
                      ("completeness", "target_completeness"),
                      ("multiplicity", "target_multiplicity")):
        target = parse_target(kind, getattr(config, key, None), key=key)
        if target is None:
            continue
        if target.d is not None and target.d < dmin * (1 - 1e-9):
            raise ConfigError(f"{key}: {target.d:g} Å is beyond the merge's dmin ({dmin:g} Å); "
                              f"give a resolution of at least {dmin:g} Å, or 'dmin'")
        if kind == "cc_anom" and not anomalous:
            raise ConfigError(f"{key} is set but the merge is not anomalous: set anomalous = "
                              "true, or leave target_ccanom empty")
        out.append(target)
    return out


@dataclass
class Forecast:
    """What one target needs, as of one snapshot.

    Attributes
    ----------
    target
        The target (as a dict in :meth:`to_dict`).
    state
        ``"reached"``; ``"forecast"`` (``images`` is the prediction); ``"out_of_reach"``
        (more than :data:`MAX_FACTOR` times the images so far, or a level the law never
        reaches); ``"no_signal"`` (the figure is not above zero yet: no law to extrapolate);
        ``"too_few_pairs"``; ``"no_figure"`` (e.g. the model's CCanom before a snapshot).
    current, current_low, current_high
        The figure now, with its 95 % interval where it has one.
    images, images_low, images_high
        Total images at which the target is reached (prediction and 95 % interval; None:
        unknown or unbounded), from the images so far (``n_images``).
    images_needed
        ``images − n_images`` (0 once reached).
    seconds, seconds_low, seconds_high
        The images still needed at ``rate`` (images/s); None while no images arrive.
    shell
        The shell judged (CC targets): index from 0, and its d range, Å.
    provisional
        The figure moves with training (the model's): the forecast may move without data.
    reach
        Å: the data end before the table's dmin (:func:`data_reach`) and the target, asked
        of the whole table, is judged to here; None: judged to dmin.
    """

    target: Target
    state: str
    n_images: int
    rate: float
    current: float | None = None
    current_low: float | None = None
    current_high: float | None = None
    images: float | None = None
    images_low: float | None = None
    images_high: float | None = None
    seconds: float | None = None
    seconds_low: float | None = None
    seconds_high: float | None = None
    shell: dict | None = None
    provisional: bool = False
    reach: float | None = None

    @property
    def reached(self) -> bool:
        return self.state == "reached"

    @property
    def images_needed(self) -> float | None:
        if self.reached:
            return 0.0
        return None if self.images is None else max(self.images - self.n_images, 0.0)

    def to_dict(self) -> dict:
        out = asdict(self)
        out["target"] = asdict(self.target) | {"label": self.target.kind,
                                               "text": self.target.describe()}
        out["heading"] = self.heading()
        out["reached"] = self.reached
        out["images_needed"] = self.images_needed
        return jsonable(out)

    def heading(self) -> str:
        """The target as judged: its text, and where the data end when it is judged there."""
        head = self.target.describe()
        if self.reach is not None:       # asked of the whole table: judged where data are
            head += (f" to {self.reach:.2f} Å, where the data end"
                     if self.target.kind in ("completeness", "multiplicity")
                     else f", at {self.reach:.2f} Å where the data end")
        return head

    def describe(self) -> str:
        """One line for a terminal."""
        head = self.heading()
        now = "" if self.current is None else f" (now {_fmt(self.current, self.target)})"
        if self.state == "reached":
            return f"{head}: reached{now}"
        if self.state == "forecast":
            rng = ""
            if self.images_low is not None:
                hi = "∞" if self.images_high is None else f"{self.images_high:,.0f}"
                rng = f" [{self.images_low:,.0f}–{hi}]"
            more = f"{self.images_needed:,.0f} more images"
            when = ("" if self.seconds is None else
                    f", ~{_duration(self.seconds)} at {self.rate:.1f} images/s")
            flag = " (provisional: the model is still training)" if self.provisional else ""
            return (f"{head}: not yet{now}; at about {self.images:,.0f} images{rng}: "
                    f"{more}{when}{flag}")
        words = {"out_of_reach": "out of reach at this rate of growth",
                 "no_signal": "no signal yet at that resolution: no forecast",
                 "too_few_pairs": "too few pairs yet for a figure",
                 "no_figure": "no figure yet"}
        return f"{head}: {words.get(self.state, self.state)}{now}"


def _fmt(x: float, target: Target) -> str:
    if target.kind == "completeness":
        return f"{100 * x:.1f} %"
    if target.kind == "multiplicity":
        return f"{x:.1f}"
    return f"{x:.3f}"


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


# ---------------------------------------------------------------------- counting laws


def mean_inverse_count(mu: np.ndarray) -> np.ndarray:
    """E[1/m | m ≥ 1] for m ~ Poisson(μ), elementwise (exact series, asymptotic for μ > 60)."""
    mu = np.asarray(mu, dtype=np.float64)
    out = np.empty_like(mu)
    big = mu > 60
    m = mu[big]
    out[big] = (1 + 1 / m + 2 / m ** 2 + 6 / m ** 3) / m
    small = ~big & (mu > 0)
    if small.any():
        m = mu[small][None, :]
        k = np.arange(1, 200, dtype=np.float64)[:, None]
        log_fact = np.cumsum(np.log(k), axis=0)
        terms = np.exp(-m + k * np.log(m) - log_fact - np.log(k))
        out[small] = terms.sum(axis=0) / -np.expm1(-mu[small])
    out[mu <= 0] = 1.0
    return out


@dataclass
class ReflectionClasses:
    """Reflections grouped by how often the data record them.

    A class is a resolution bin (:data:`RATE_BINS`, equal steps in 1/d³) × centric × ε.
    ``of`` gives each item's class; ``rate`` the observations per item per image;
    ``shape`` the gamma shape α of the rates within the class (inf: Poisson).
    """

    of: np.ndarray
    size: np.ndarray
    rate: np.ndarray
    shape: np.ndarray


def reflection_classes(counts: np.ndarray, d: np.ndarray, centric: np.ndarray,
                       epsilon: np.ndarray, n_images: int) -> ReflectionClasses:
    """Rates and gamma shapes per class from the counts of ``n_images`` images.

    The shape comes from the counts' spread by the method of moments, α = mean²/(var − mean)
    (inf where var ≤ mean); small classes take the pooled value.  Each class's rate counts
    half an observation more than it saw, so that a class not seen yet (a few axial
    reflections after the first images) slows the forecast instead of making it impossible.
    """
    counts = np.asarray(counts, dtype=np.float64)
    edges = shell_edges(float(np.max(d)), float(np.min(d)), RATE_BINS)
    b = shell_index(d, edges)
    eps_code = np.unique(np.asarray(epsilon), return_inverse=True)[1].reshape(-1)
    key = (b * 2 + np.asarray(centric, dtype=np.int64)) * (int(eps_code.max()) + 1) + eps_code
    _, of = np.unique(key, return_inverse=True)
    of = of.reshape(-1)
    n_cls = int(of.max()) + 1
    size = np.bincount(of, minlength=n_cls).astype(np.float64)
    total = np.bincount(of, counts, n_cls)
    sq = np.bincount(of, counts * counts, n_cls)
    mean = total / size
    var = sq / size - mean * mean
    with np.errstate(divide="ignore", invalid="ignore"):
        shape = np.where(var > mean, mean * mean / (var - mean), np.inf)
        pooled_excess = np.sum((var - mean)[size >= MIN_CLASS_SIZE] * size[size >= MIN_CLASS_SIZE])
        pooled_mean2 = np.sum((mean * mean)[size >= MIN_CLASS_SIZE] * size[size >= MIN_CLASS_SIZE])
        pooled = pooled_mean2 / pooled_excess if pooled_excess > 0 else np.inf
    shape = np.where(size >= MIN_CLASS_SIZE, shape, pooled)
    shape = np.where(np.isfinite(shape) & (shape > 0), shape, np.inf)
    # half an observation per class: a class not seen yet is rare, not impossible
    return ReflectionClasses(of=of, size=size,
                             rate=(total + 0.5) / (size * max(n_images, 1)), shape=shape)


def _unseen_fraction(rate: np.ndarray, shape: np.ndarray, n_now: float, n_then: float
                     ) -> np.ndarray:
    """P(still unseen after ``n_then`` images | unseen after ``n_now``), per class."""
    extra = max(n_then - n_now, 0.0)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        poisson = np.exp(-rate * extra)
        beta = shape / np.maximum(rate, 1e-300)
        gamma = np.exp(-shape * (np.log1p(extra / (beta + n_now))))
    return np.where(np.isfinite(shape), gamma, poisson)


@dataclass
class CompletenessLaw:
    """Completeness (and multiplicity) as a function of the number of images.

    Built from the per-hkl counts (a Friedel pair counts once) of the images so far.
    """

    n_images: int
    n_possible: int
    n_observations: float
    unseen_by_class: np.ndarray
    classes: ReflectionClasses

    @classmethod
    def from_counts(cls, hkl_counts: np.ndarray, d: np.ndarray, centric: np.ndarray,
                    epsilon: np.ndarray, n_images: int) -> "CompletenessLaw":
        classes = reflection_classes(hkl_counts, d, centric, epsilon, n_images)
        unseen = np.bincount(classes.of, (np.asarray(hkl_counts) == 0).astype(np.float64),
                             classes.size.shape[0])
        return cls(n_images=int(n_images), n_possible=int(np.asarray(hkl_counts).shape[0]),
                   n_observations=float(np.sum(hkl_counts)), unseen_by_class=unseen,
                   classes=classes)

    def completeness(self, n: float, rate_factor: float = 1.0) -> float:
        """Expected completeness after ``n`` images (``rate_factor`` scales every rate)."""
        c = self.classes
        still = _unseen_fraction(c.rate * rate_factor, c.shape, self.n_images, n)
        unseen = float(np.sum(self.unseen_by_class * still))
        return 1.0 - unseen / max(self.n_possible, 1)

    def multiplicity(self, n: float, rate_factor: float = 1.0) -> float:
        """Expected observations per observed unique reflection after ``n`` images."""
        seen = self.completeness(n, rate_factor) * self.n_possible
        obs = self.n_observations * rate_factor * n / max(self.n_images, 1)
        return obs / max(seen, 1e-300)

    def rate_bounds(self) -> tuple[float, float]:
        """Factors on the rates at the ends of their 95 % interval (Poisson counts)."""
        rel = Z95 / math.sqrt(max(self.n_observations, 1.0))
        return max(1.0 - rel, 1e-3), 1.0 + rel


def _solve_increasing(f, target: float, n_now: float) -> float | None:
    """The smallest n ≥ n_now with f(n) ≥ target (f increasing), by bisection in log n;
    None beyond :data:`MAX_FACTOR` × n_now."""
    lo = max(float(n_now), 1.0)
    if f(lo) >= target:
        return lo
    hi = lo * MAX_FACTOR
    if f(hi) < target:
        return None
    for _ in range(80):
        mid = math.sqrt(lo * hi)
        if f(mid) >= target:
            hi = mid
        else:
            lo = mid
        if hi / lo < 1 + 1e-5:
            break
    return hi


# ---------------------------------------------------------------------- CC laws


@dataclass
class PairLaw:
    """⟨1/m⟩ over a shell's pairs, and their number, as functions of the number of images.

    Each of the ``k`` counts that make a pair (2 for CC½: one per half; 4 for CCanom: each
    mate in each half) is Poisson at its class's rate; a pair exists when all are ≥ 1.
    """

    n_images: int
    size: np.ndarray          # items per class
    rates: np.ndarray         # (k, n_classes) observations per item per image

    def mean_inverse(self, n: float) -> float:
        mu = self.rates * n
        p = np.prod(-np.expm1(-mu), axis=0)
        f = mean_inverse_count(mu.reshape(-1)).reshape(mu.shape).mean(axis=0)
        w = self.size * p
        return float(np.sum(w * f) / max(np.sum(w), 1e-300))

    def pairs(self, n: float) -> float:
        """Expected number of pairs after ``n`` images."""
        return float(np.sum(self.size * np.prod(-np.expm1(-self.rates * n), axis=0)))


def pair_law(counts: np.ndarray, d: np.ndarray, centric: np.ndarray, epsilon: np.ndarray,
             n_images: int) -> PairLaw:
    """A :class:`PairLaw` from ``counts`` ``(k, n_items)`` of the shell's items."""
    counts = np.asarray(counts, dtype=np.float64)
    classes = reflection_classes(counts.sum(axis=0), d, centric, epsilon, n_images)
    n_cls = classes.size.shape[0]
    rates = np.stack([np.bincount(classes.of, c, n_cls) / (classes.size * max(n_images, 1))
                      for c in counts])
    return PairLaw(n_images=int(n_images), size=classes.size, rates=rates)


def cc_forecast(cc: float, low: float, high: float, law: PairLaw, target: float
                ) -> tuple[float | None, float | None, float | None, str]:
    """Images at which the 95 % interval of CC = 1/(1 + k⟨1/m⟩) lies above ``target``, with
    k from the CC now (the rule by which a CC target counts as reached).

    Returns
    -------
    (images, images_low, images_high, state)
        ``images_low`` from the upper end of CC's interval, ``images_high`` from the lower
        one (None when that end is not above zero: unbounded).
    """
    now = law.mean_inverse(law.n_images)

    def images_for(c: float) -> float | None:
        if not np.isfinite(c) or c <= 0:
            return None
        k = (1.0 / c - 1.0) / now

        def lower_end(n: float) -> float:
            # the expected CC after n images, less its interval at the pairs expected then
            cc_n = 1.0 / (1.0 + k * law.mean_inverse(n))
            return float(fisher_interval(cc_n, law.pairs(n))[0])

        return _solve_increasing(lower_end, target, law.n_images)

    if not np.isfinite(cc) or cc <= 0:
        return None, images_for(high), None, "no_signal"
    n_mid = images_for(cc)
    if n_mid is None:
        return None, images_for(high), None, "out_of_reach"
    return n_mid, images_for(high), images_for(low), "forecast"


# ---------------------------------------------------------------------- the forecast


@dataclass
class ForecastInputs:
    """What the forecasts read from one snapshot.

    Attributes
    ----------
    n_images
        Images merged (stored).
    rate
        Indexed images per second now (0: none arriving).
    obs_count
        ``(3, n_rows)`` observations per row: all, half A, half B.
    hkl, d, centric, epsilon, friedel
        The table's rows.
    table
        The snapshot's :class:`~streamvi.quality.stats.ShellTable`, data estimate attached.
    model_provisional
        Whether the model's figures are provisional now (they moved with training).
    d_reach
        Å, where the data end before the table's dmin (:func:`data_reach`), or None.
    """

    n_images: int
    rate: float
    obs_count: np.ndarray
    hkl: np.ndarray
    d: np.ndarray
    centric: np.ndarray
    epsilon: np.ndarray
    friedel: np.ndarray
    table: ShellTable
    model_provisional: bool = False
    d_reach: float | None = None
    _hkl_index: np.ndarray | None = field(default=None, repr=False)

    @property
    def hkl_index(self) -> np.ndarray:
        """Row → index of its hkl (Friedel mates share one)."""
        if self._hkl_index is None:
            self._hkl_index = np.unique(hkl_key(self.hkl),
                                        return_inverse=True)[1].reshape(-1)
        return self._hkl_index


def data_reach(obs_count: np.ndarray, d: np.ndarray) -> float | None:
    """Where the data end inside the table, when they end well before its dmin.

    Parameters
    ----------
    obs_count
        ``(n_rows,)`` observations per row (all images).
    d
        ``(n_rows,)`` resolution of each row, Å.

    Returns
    -------
    float or None
        The resolution, Å (rounded down to 0.01 Å), that :data:`REACH_QUANTILE` of the
        observations reach, where the rows beyond it are at least :data:`REACH_EMPTY_SHARE`
        of the table's and hold at most :data:`REACH_DENSITY` of the observations per row
        that the rows inside it hold; None otherwise (the data fill the table, thinning
        towards its edge or not), or before :data:`REACH_MIN_OBSERVATIONS` observations.
    """
    obs = np.asarray(obs_count, np.float64)
    d = np.asarray(d, np.float64)
    total = float(obs.sum())
    if total < REACH_MIN_OBSERVATIONS or d.size == 0:
        return None
    order = np.argsort(d, kind="stable")              # highest resolution first
    # rows order[:k] hold at most 1 − REACH_QUANTILE of the observations
    cumulative = np.cumsum(obs[order])
    k = int(np.searchsorted(cumulative, (1.0 - REACH_QUANTILE) * total, side="right"))
    if k < REACH_EMPTY_SHARE * d.size or k >= d.size:
        return None
    beyond = float(cumulative[k - 1])
    if beyond / k > REACH_DENSITY * (total - beyond) / (d.size - k):
        return None
    return math.floor(float(d[order[k]]) * 100.0) / 100.0


def forecast_targets(targets: list[Target], inputs: ForecastInputs) -> list[Forecast]:
    """One :class:`Forecast` per target (see the module docstring for the laws)."""
    out = []
    law = None
    for target in targets:
        if target.kind in ("completeness", "multiplicity"):
            if law is None:
                law = _completeness_law(inputs)
            fc = _count_forecast(target, law, inputs)
            fc.reach = inputs.d_reach
        else:
            fc = _correlation_forecast(target, inputs)
            if (target.at_dmin or target.d is None) and inputs.d_reach is not None:
                fc.reach = inputs.d_reach
        out.append(fc)
    return out


def _completeness_law(inputs: ForecastInputs) -> CompletenessLaw:
    """The law of the table's unique reflections (Friedel mates as one), of those the
    data reach where :attr:`ForecastInputs.d_reach` is set."""
    rows = (np.arange(inputs.d.shape[0]) if inputs.d_reach is None
            else np.nonzero(inputs.d >= inputs.d_reach)[0])
    idx = np.unique(inputs.hkl_index[rows], return_inverse=True)[1].reshape(-1)
    n_hkl = int(idx.max()) + 1
    first = np.zeros(n_hkl, np.int64)
    first[idx[::-1]] = rows[np.arange(idx.shape[0])[::-1]]
    counts = np.bincount(idx, inputs.obs_count[0][rows], n_hkl)
    return CompletenessLaw.from_counts(counts, inputs.d[first], inputs.centric[first],
                                       inputs.epsilon[first], inputs.n_images)


def _count_forecast(target: Target, law: CompletenessLaw, inputs: ForecastInputs) -> Forecast:
    figure = law.completeness if target.kind == "completeness" else law.multiplicity
    now = figure(law.n_images)
    fc = Forecast(target=target, state="forecast", n_images=inputs.n_images,
                  rate=inputs.rate, current=now)
    if inputs.n_images == 0:
        fc.state, fc.current = "no_figure", None
        return fc
    if now >= target.value:
        fc.state = "reached"
        return fc
    slow, fast = law.rate_bounds()
    fc.images = _solve_increasing(figure, target.value, law.n_images)
    fc.images_low = _solve_increasing(lambda n: figure(n, fast), target.value, law.n_images)
    fc.images_high = _solve_increasing(lambda n: figure(n, slow), target.value, law.n_images)
    if fc.images is None:
        fc.state = "out_of_reach"
    _seconds(fc)
    return fc


def _target_shell(target: Target, table: ShellTable, d_reach: float | None = None) -> int:
    if (target.at_dmin or target.d is None) and d_reach is not None:
        target = Target(target.kind, target.value, d=d_reach)   # the shell the data end in
    elif target.at_dmin or target.d is None:
        return len(table.d_min) - 1
    for i, (hi, lo) in enumerate(zip(table.d_max, table.d_min)):
        if lo <= target.d <= hi:
            return i
    return 0 if target.d > table.d_max[0] else len(table.d_min) - 1


def _correlation_forecast(target: Target, inputs: ForecastInputs) -> Forecast:
    table = inputs.table
    fc = Forecast(target=target, state="no_figure", n_images=inputs.n_images, rate=inputs.rate)
    if not table.d_min:
        return fc
    shell = _target_shell(target, table, inputs.d_reach)
    fc.shell = {"index": shell, "d_max": table.d_max[shell], "d_min": table.d_min[shell]}
    name = target.kind + ("_data" if target.source == "data" else "")
    values = getattr(table, name, None) or []
    if shell >= len(values):
        return fc
    fc.provisional = target.source == "model" and inputs.model_provisional
    pairs = int((getattr(table, f"{name}_pairs") or [0] * (shell + 1))[shell])
    cc = values[shell]
    low = getattr(table, f"{name}_low")[shell]
    high = getattr(table, f"{name}_high")[shell]
    if cc is None or not np.isfinite(cc):
        fc.state = "too_few_pairs" if pairs < table.min_pairs else "no_figure"
        return fc
    fc.current, fc.current_low, fc.current_high = cc, low, high
    # reached only when the whole 95 % interval is at or above the target: a shell of few
    # pairs can read 0.31 by chance (simulated P 1, 40 images: 0.307, then 0.07 at 100)
    if np.isfinite(low) and low >= target.value:
        fc.state = "reached"
        return fc
    law = _shell_pair_law(target, inputs, shell)
    images, images_low, images_high, state = cc_forecast(cc, low, high, law, target.value)
    fc.images, fc.images_low, fc.images_high, fc.state = images, images_low, images_high, state
    _seconds(fc)
    return fc


def _shell_pair_law(target: Target, inputs: ForecastInputs, shell: int) -> PairLaw:
    table = inputs.table
    edges = shell_edges(float(np.max(inputs.d)), float(np.min(inputs.d)), len(table.d_min))
    in_shell = shell_index(inputs.d, edges) == shell
    halves = inputs.obs_count[1:3]
    if target.kind == "cc_half":
        rows = np.nonzero(in_shell)[0]
        return pair_law(halves[:, rows], inputs.d[rows], inputs.centric[rows],
                        inputs.epsilon[rows], inputs.n_images)
    # CCanom: the two mates of each acentric hkl, in each half
    idx = inputs.hkl_index
    use = in_shell & ~inputs.centric
    plus = np.nonzero(use & (inputs.friedel > 0))[0]
    minus = np.nonzero(use & (inputs.friedel < 0))[0]
    _, ip, im = np.intersect1d(idx[plus], idx[minus], return_indices=True)
    rp, rm = plus[ip], minus[im]
    counts = np.concatenate([halves[:, rp], halves[:, rm]])
    return pair_law(counts, inputs.d[rp], inputs.centric[rp], inputs.epsilon[rp],
                    inputs.n_images)


def _seconds(fc: Forecast) -> None:
    if fc.rate <= 0:
        return
    for attr in ("", "_low", "_high"):
        n = getattr(fc, f"images{attr}")
        if n is not None:
            setattr(fc, f"seconds{attr}", max(n - fc.n_images, 0.0) / fc.rate)
