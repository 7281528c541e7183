"""What publishers read: immutable snapshots of the merge and of the service.

The training thread owns the model, the store and the optimiser; the publishers (MTZ files,
the ZeroMQ topics, the status page, ``/metrics``) run beside it.  They never touch those
objects: the engine hands out a :class:`MergeSnapshot` (the merged tables, copied out of the
model) and the service a :class:`ServiceSnapshot` (everything a publisher shows, figures
copied at one moment).  Both are frozen; their arrays and maps are copies nobody else
writes to.  This module needs neither torch nor ZeroMQ (docs/architecture.md).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Mapping, Protocol

import numpy as np

from streamvi.symmetry import ReciprocalSpace, hkl_key

if TYPE_CHECKING:
    import reciprocalspaceship as rs

    from streamvi.quality.feedback import Feedback
    from streamvi.quality.stats import ShellTable


@dataclass(frozen=True)
class MergeSnapshot:
    """The merge at one step: what every publisher of merged data reads.

    ``tables[name]`` holds numpy arrays F, SIGF, I, SIGI per row of ``space`` for the tables
    ``all``, ``half1`` and ``half2``; ``obs_count`` is ``(3, n_rows)``.
    """

    snapshot_id: int
    time: float
    space: ReciprocalSpace
    tables: dict[str, dict[str, np.ndarray]]
    obs_count: np.ndarray
    n_images: int
    n_reflections: int
    step: int
    stats: "ShellTable"
    history: list[str] = field(default_factory=list)
    #: the relative B (Å²) given to the amplitudes from the image scales' resolution trend
    #: (None: not applied; :meth:`~streamvi.merging.engine.MergeEngine.falloff_correction`)
    falloff_b: float | None = None
    #: ``(3, n_rows)`` the store's counts, every stored image's observations (``obs_count``
    #: leaves out those of images the merge now drops as misfits): what the store's sums
    #: were made from, for figures that pair counts with them and must not move while only
    #: the optimiser does (the training-free CC½, the forecasts); None: ``obs_count``
    stored_obs_count: np.ndarray | None = None
    #: ``(2, n_rows)`` for a condition coupled to a reference: the share of a change in the
    #: data that ΔF against the reference keeps under the coupled prior (row 0) and under
    #: independent Wilson priors (row 1), each row's Gaussian approximation
    #: (:func:`~streamvi.merging.model.coupling.difference_gains`); the difference file
    #: undoes the coupled prior's shrinkage with them.  None: no such coupling
    delta_gain: np.ndarray | None = None

    @property
    def store_counts(self) -> np.ndarray:
        """:attr:`stored_obs_count`, or ``obs_count`` where the snapshot has none."""
        return self.obs_count if self.stored_obs_count is None else self.stored_obs_count

    @property
    def observed(self) -> np.ndarray:
        """Rows with at least one observation."""
        return self.obs_count[0] > 0

    def to_dataset(self) -> "rs.DataSet":
        """The merge as an ``rs.DataSet`` (:func:`snapshot_to_dataset`)."""
        return snapshot_to_dataset(self)


@dataclass(frozen=True)
class StepFigures:
    """The last optimiser step: its number, wall time (s) and loss terms per observation."""

    step: int
    seconds: float
    loss: float
    nll: float
    kl_F: float
    kl_scale: float


@dataclass(frozen=True)
class StoreFigures:
    """The reflection store at one moment (read under the service's lock).

    ``visits`` and ``lags`` are per stored image: training visits, and seconds from arrival
    to the first visit (NaN while unvisited).
    """

    n_images: int = 0
    n_reflections: int = 0
    n_rejected: int = 0
    visits: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    lags: np.ndarray = field(default_factory=lambda: np.zeros(0))
    #: images per indexing setting (twin law), in space groups with an ambiguity
    settings: Mapping[str, int] = field(default_factory=dict)
    #: the per-image geometry refinement, summarised (None: off or not yet)
    geometry: Mapping[str, Any] | None = None


@dataclass(frozen=True)
class ServiceSnapshot:
    """The service at one moment: everything the status page, ``/metrics`` and the ``stats``
    topic show.

    Attributes
    ----------
    time
        Unix time it was taken, s.
    started_at
        Unix time the service started, s.
    status
        The JSON-able status (:meth:`streamvi.service.service.Service.status`): counters,
        state, failure, queue depth, steps, visits, lags, MTZ files written, OM figures.
    merge_info
        The merge's space group, cell (and where it came from), dmin, anomalous mode,
        shells and the CC½ cut.
    merge
        The latest posterior snapshot (None before the first).
    feedback
        Its live feedback: targets, forecasts, resolution, anomalous peaks (None: none).
    feedback_history
        The feedback's figures against images, thinned for the page's plots.
    history
        Figures of every snapshot (time, images, CC½, completeness, …), for the plots.
    step_seconds
        Wall times of the latest steps, s, oldest first (the step-duration histogram).
    last_step
        The latest step (None before the first).
    store
        The store's figures; None when they were not asked for or the store was busy.
    memory
        Bytes in use by kind: process_rss, cuda_allocated, cuda_reserved, store_device,
        store_host (asked for with ``store``).
    spool_bytes
        Bytes of accepted messages spooled.
    version
        streamvi's version.
    conditions
        With pump–probe conditions, the latest snapshot of every condition by name,
        reference first (``merge`` is the reference's); empty without conditions.
    condition_feedback
        With conditions, the live feedback of every condition but the reference (whose is
        ``feedback``), by name.
    """

    time: float
    started_at: float
    status: Mapping[str, Any]
    merge_info: Mapping[str, Any]
    merge: MergeSnapshot | None = None
    feedback: "Feedback | None" = None
    feedback_history: list[Any] = field(default_factory=list)
    history: tuple[Mapping[str, Any], ...] = ()
    step_seconds: tuple[float, ...] = ()
    last_step: StepFigures | None = None
    store: StoreFigures | None = None
    memory: Mapping[str, int] = field(default_factory=dict)
    spool_bytes: int = 0
    version: str = ""
    conditions: Mapping[str, MergeSnapshot] = field(default_factory=dict)
    condition_feedback: Mapping[str, "Feedback"] = field(default_factory=dict)

    @property
    def failure(self) -> str | None:
        """Why the service is failed (None: it is not)."""
        return self.status.get("failure")


# ---------------------------------------------------------------------- the merge as a table


def snapshot_to_dataset(snapshot: Any) -> "rs.DataSet":
    """The merge of a :class:`MergeSnapshot` as an ``rs.DataSet`` (the table at streamvi's
    edges: MTZ files, comparisons with a truth or a reference).

    Indexed by ``H, K, L`` in the reciprocal ASU of the snapshot's space group; only rows
    with observations.  Anything with ``space``, ``tables`` and ``obs_count`` will do.
    """
    sp = snapshot.space
    obs = snapshot.obs_count
    tables = snapshot.tables
    if not sp.anomalous:
        keep = obs[0] > 0
        cols: dict[str, tuple[np.ndarray, object]] = {
            "F": (tables["all"]["F"][keep], "SFAmplitude"),
            "SIGF": (tables["all"]["SIGF"][keep], "Stddev"),
            "I": (tables["all"]["I"][keep], "Intensity"),
            "SIGI": (tables["all"]["SIGI"][keep], "Stddev"),
            "N": (obs[0][keep], "MTZInt"),
        }
        hkl = sp.hkl[keep]
        for t in ("half1", "half2"):
            seen = obs[1 if t == "half1" else 2][keep] > 0
            for c, dt in (("F", "SFAmplitude"), ("SIGF", "Stddev"),
                          ("I", "Intensity"), ("SIGI", "Stddev")):
                cols[f"{c}_{t}"] = (np.where(seen, tables[t][c][keep], np.nan), dt)
        return _dataset(hkl, cols, sp)
    return _anomalous_dataset(snapshot)


def _dataset(hkl: np.ndarray, cols: dict, sp) -> "rs.DataSet":
    import reciprocalspaceship as rs     # pandas: only where a table is asked for

    data = {"H": hkl[:, 0], "K": hkl[:, 1], "L": hkl[:, 2]}
    data.update({name: values for name, (values, _) in cols.items()})
    ds = rs.DataSet(data, cell=sp.cell, spacegroup=sp.space_group, merged=True)
    ds = ds.astype({"H": "HKL", "K": "HKL", "L": "HKL"})
    ds = ds.astype({name: dt for name, (_, dt) in cols.items()})
    return ds.set_index(["H", "K", "L"])


def _anomalous_dataset(snapshot: Any) -> "rs.DataSet":
    """Anomalous table: one MTZ row per hkl with the two Bijvoet mates side by side."""
    sp = snapshot.space
    obs = snapshot.obs_count
    key = hkl_key(sp.hkl)
    uniq, inv = np.unique(key, return_inverse=True)
    n = uniq.shape[0]
    first_row = np.zeros(n, np.int64)
    first_row[inv[::-1]] = np.arange(inv.shape[0])[::-1]
    hkl = sp.hkl[first_row]
    plus = sp.friedel > 0
    rows_p = np.full(n, -1)
    rows_m = np.full(n, -1)
    rows_p[inv[plus]] = np.nonzero(plus)[0]
    rows_m[inv[~plus]] = np.nonzero(~plus)[0]
    centric = sp.centric[first_row]
    # centric reflections have one row: it serves as both mates
    rows_m = np.where(centric & (rows_m < 0), rows_p, rows_m)

    def take(table: str, col: str, rows: np.ndarray, t: int) -> np.ndarray:
        v = snapshot.tables[table][col][np.maximum(rows, 0)].astype(np.float64)
        seen = (rows >= 0) & (obs[t][np.maximum(rows, 0)] > 0)
        return np.where(seen, v, np.nan)

    n_p = np.where(rows_p >= 0, obs[0][np.maximum(rows_p, 0)], 0)
    n_m = np.where((rows_m >= 0) & ~centric, obs[0][np.maximum(rows_m, 0)], 0)
    keep = (n_p + n_m) > 0
    cols: dict[str, tuple[np.ndarray, object]] = {}
    for t_name, t, suffix in (("all", 0, ""), ("half1", 1, "_half1"), ("half2", 2, "_half2")):
        fp, fm = take(t_name, "F", rows_p, t), take(t_name, "F", rows_m, t)
        sfp, sfm = take(t_name, "SIGF", rows_p, t), take(t_name, "SIGF", rows_m, t)
        ip, im = take(t_name, "I", rows_p, t), take(t_name, "I", rows_m, t)
        sip, sim = take(t_name, "SIGI", rows_p, t), take(t_name, "SIGI", rows_m, t)
        f, sf = _bijvoet_mean(fp, sfp, fm, sfm)
        i, si = _bijvoet_mean(ip, sip, im, sim)
        cols[f"F{suffix}"] = (f[keep], "SFAmplitude")
        cols[f"SIGF{suffix}"] = (sf[keep], "Stddev")
        cols[f"I{suffix}"] = (i[keep], "Intensity")
        cols[f"SIGI{suffix}"] = (si[keep], "Stddev")
        if t == 0:
            cols["N"] = ((n_p + n_m)[keep], "MTZInt")
            cols["F(+)"] = (fp[keep], "FriedelSFAmplitude")
            cols["SIGF(+)"] = (sfp[keep], "StddevFriedelSF")
            cols["F(-)"] = (fm[keep], "FriedelSFAmplitude")
            cols["SIGF(-)"] = (sfm[keep], "StddevFriedelSF")
            cols["I(+)"] = (ip[keep], "FriedelIntensity")
            cols["SIGI(+)"] = (sip[keep], "StddevFriedelI")
            cols["I(-)"] = (im[keep], "FriedelIntensity")
            cols["SIGI(-)"] = (sim[keep], "StddevFriedelI")
            cols["N(+)"] = (n_p[keep], "MTZInt")
            cols["N(-)"] = (n_m[keep], "MTZInt")
    return _dataset(hkl[keep], cols, sp)


def _bijvoet_mean(a: np.ndarray, sa: np.ndarray, b: np.ndarray, sb: np.ndarray
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Mean of two mates (either may be missing) and its σ."""
    both = np.isfinite(a) & np.isfinite(b)
    mean = np.where(both, 0.5 * (a + b), np.where(np.isfinite(a), a, b))
    sig = np.where(both, 0.5 * np.sqrt(sa * sa + sb * sb), np.where(np.isfinite(a), sa, sb))
    return mean, sig


class SnapshotSource(Protocol):
    """Where publishers get the service's state: called at each request or scrape.

    ``store``: also read the store's figures and the memory in use (``/metrics``); they
    need the service's lock for a moment.
    """

    def __call__(self, *, store: bool = False) -> ServiceSnapshot: ...
