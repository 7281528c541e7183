"""Live feedback for the shift crew: per snapshot, the figures that move only with the data,
the resolution estimate, whether the model's figures are provisional, the forecast of each
target and the anomalous peak heights.

:class:`LiveFeedback` keeps what one snapshot needs of the previous ones (the published
resolution, the last figures, a history against the number of images);
:meth:`LiveFeedback.observe` turns a :class:`~streamvi.merging.engine.MergeSnapshot` and the store's
half-set sums into a :class:`Feedback`, which the publishers read (status page,
``/api/status``, ``/metrics``, the PUB ``stats`` topic, ``streamvi status``).

What is published, and why:

- CC½ and CCanom of the plain half-set averages (``cc_half_data``; training-free, so they
  change only when data arrive) beside the model's (``cc_half``), each with its pairs and
  95 % interval (:mod:`streamvi.quality.stats`);
- the model's figures are *provisional* while they move more between two snapshots than
  the new data explain: by more than the data figure moved plus half the model figure's
  interval (the optimiser at work, not the data);
- the resolution estimate is the fit of the data CC½ (:func:`~streamvi.quality.stats.fit_resolution`)
  and is replaced only by one outside its interval (or whose interval excludes it); a change
  of kind ("beyond dmin" ↔ a value) must be seen in two snapshots in a row;
- targets and forecasts (:mod:`streamvi.quality.forecast`), and with a model the anomalous peak
  heights (:mod:`streamvi.quality.anomalous`).
"""
from __future__ import annotations

import logging
import math
from collections import deque
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from streamvi.quality.anomalous import PeakReport, PhasingModel, snapshot_peaks
from streamvi.quality.forecast import (Forecast, ForecastInputs, Target, data_reach,
                                      forecast_targets)
from streamvi.jsonsafe import jsonable
from streamvi.quality.stats import ResolutionFit, ShellTable, attach_halfset_statistics

log = logging.getLogger(__name__)

#: Snapshots a change of the resolution's kind must persist before it is published.
STATE_CHANGE_SNAPSHOTS = 2
#: History points kept (one per snapshot).
MAX_HISTORY = 2000


def attach_data_estimate(table: ShellTable, space: Any, obs_count: np.ndarray,
                         sum_i_half: np.ndarray, wilson_sigma: np.ndarray | None) -> ShellTable:
    """Fill the training-free half-set figures of ``table`` (see
    :func:`~streamvi.quality.stats.attach_halfset_statistics`).

    Parameters
    ----------
    table
        The snapshot's shell table.
    space
        The merge's :class:`~streamvi.symmetry.ReciprocalSpace`.
    obs_count
        ``(3, n_rows)`` observations per row (the snapshot's).
    sum_i_half
        ``(2, n_rows)`` Σ I per row and half (the store's, read with ``obs_count``).
    wilson_sigma
        The data's Σ(d) per row (:meth:`~streamvi.merging.store.ReflectionStore.wilson_sigma`), by
        which intensities are normalised; None: not normalised.
    """
    expected = None if wilson_sigma is None else wilson_sigma * space.epsilon
    return attach_halfset_statistics(table, hkl=space.hkl, d=space.d, centric=space.centric,
                                     friedel=space.friedel, obs_count=obs_count,
                                     sum_i_half=sum_i_half, expected_i=expected)


def store_sums(engine: Any, conditions: Sequence[int | None] = (None,)
               ) -> tuple[list[np.ndarray], np.ndarray | None]:
    """The store's half-set sums and Σ(d) per row, in the setting of the engine's last
    snapshot (a merge put in a reference's setting has its rows moved; the store keeps the
    merge's own).  Read them together with the snapshot (under the same lock).

    ``conditions``: whose sums, one array each: None every image's; an index, that
    condition's of a pump–probe merge, whose snapshot counts its observations only.  Σ(d),
    a normaliser, is every image's."""
    store = engine.store
    sums = [(store.sum_i_half if c is None else store.condition_sum_i_half(c)).copy()
            for c in conditions]
    wilson = store.wilson_sigma()
    choice, reference = getattr(engine, "setting_choice", None), getattr(engine, "reference",
                                                                         None)
    if (reference is not None and choice is not None and choice.op_index != 0
            and np.isfinite(choice.cc[choice.op_index])):
        perm = reference.permutation(choice.op_index)     # as reference.reindex_snapshot
        for k, each in enumerate(sums):
            sums[k] = np.empty_like(each)
            sums[k][:, perm] = each
        if wilson is not None:
            w = np.empty_like(wilson)
            w[perm] = wilson
            wilson = w
    return sums, wilson


def attach_store_estimate(snapshot: Any, engine: Any) -> None:
    """Add the training-free half-set figures to ``snapshot.stats``: the engine's store sums
    (:func:`store_sums`) with the counts they were made from (``snapshot.store_counts``:
    every stored image, misfit verdicts included), so the figures move with the data only.
    For an engine the caller holds (an offline merge); the service reads the sums under its
    lock and passes them to :meth:`LiveFeedback.observe`."""
    (sums,), wilson = store_sums(engine)
    attach_data_estimate(snapshot.stats, snapshot.space, snapshot.store_counts, sums, wilson)


@dataclass
class Feedback:
    """What one snapshot tells the shift crew (JSON-able through :meth:`to_dict`).

    Attributes
    ----------
    snapshot_id, time, n_images, rate
        Of the snapshot; ``rate`` is indexed images per second when it was taken.
    forecasts
        One per target, in :data:`~streamvi.quality.forecast.KINDS` order.
    resolution
        The published estimate (:class:`~streamvi.quality.stats.ResolutionFit` of the data CC½,
        changed only beyond its interval).
    resolution_model
        The fit of the model's CC½ (provisional while ``provisional["cc_half"]``).
    provisional
        ``cc_half`` / ``cc_anom``: the model's figure moved more than the data explain.
    peaks
        Anomalous peak heights (with a model, in anomalous mode), else None.
    """

    snapshot_id: int
    time: float
    n_images: int
    rate: float
    forecasts: list[Forecast]
    resolution: ResolutionFit | None
    resolution_model: ResolutionFit | None
    provisional: dict[str, bool]
    peaks: PeakReport | None = None
    dmin: float | None = None

    @property
    def done(self) -> bool:
        """Every target reached (False without targets)."""
        return bool(self.forecasts) and all(f.reached for f in self.forecasts)

    def to_dict(self) -> dict:
        return jsonable({
            "snapshot": self.snapshot_id, "time": self.time, "n_images": self.n_images,
            "rate": self.rate, "done": self.done,
            "targets": [f.to_dict() | {"text": f.describe()} for f in self.forecasts],
            "resolution": None if self.resolution is None else
            self.resolution.to_dict() | {"source": "data",
                                         "text": self.resolution.describe(self.dmin)},
            "resolution_model": None if self.resolution_model is None else
            self.resolution_model.to_dict() | {"source": "model",
                                               "text": self.resolution_model.describe(
                                                   self.dmin)},
            "provisional": dict(self.provisional),
            "peaks": None if self.peaks is None else self.peaks.to_dict(),
        })

    def lines(self) -> list[str]:
        """The decision in a few lines of text (terminal, logs)."""
        return decision_lines(self.to_dict())


def decision_lines(feedback: dict) -> list[str]:
    """The decision as text, from :meth:`Feedback.to_dict` (what ``/api/status`` carries)."""
    out = []
    targets = feedback.get("targets") or []
    if not targets:
        out.append("no targets set (target_cc_half, target_ccanom, target_completeness, "
                   "target_multiplicity)")
    for t in targets:
        out.append(("DONE  " if t.get("reached") else "      ") + str(t.get("text")))
    res = feedback.get("resolution")
    if res:
        out.append(f"resolution at CC½ = {res.get('cut')} (half-set averages): {res['text']}")
    model = feedback.get("resolution_model")
    if model:
        flag = " (provisional)" if (feedback.get("provisional") or {}).get("cc_half") else ""
        out.append(f"resolution at CC½ = {model.get('cut')} (model): {model['text']}{flag}")
    peaks = feedback.get("peaks")
    if peaks:
        atoms = sorted(peaks["atoms"].items(),
                       key=lambda kv: -kv[1] if kv[1] is not None else math.inf)
        shown = ", ".join(f"{k} {v:.1f} σ" for k, v in atoms[:6] if v is not None)
        out.append(f"anomalous peaks at the model's heavy atoms: {shown}")
        for p in peaks.get("new_peaks") or []:
            near = (f", {p['distance']:.1f} Å from {p['nearest_atom']}"
                    if p.get("nearest_atom") else "")
            where = ", ".join(f"{x:.3f}" for x in p["frac"])
            out.append(f"  new peak {p['sigma']:.1f} σ at ({where}){near}")
    verdict = "all targets reached: time to move on" if feedback.get("done") else None
    if verdict:
        out.append(verdict)
    return out


class LiveFeedback:
    """The state that turns snapshots into :class:`Feedback`.

    Parameters
    ----------
    targets
        What to forecast (:func:`~streamvi.quality.forecast.targets_from_config`).
    model
        A structure for anomalous peak heights (None: none).
    """

    def __init__(self, targets: list[Target] | None = None, model: PhasingModel | None = None):
        self.targets = list(targets or [])
        self.model = model
        self.latest: Feedback | None = None
        self.published: ResolutionFit | None = None
        self._pending_state: tuple[str, int] | None = None
        self._previous: ShellTable | None = None
        #: one point per snapshot, for plots against the number of images
        self.history: deque[dict[str, Any]] = deque(maxlen=MAX_HISTORY)

    def observe(self, snapshot: Any, *, sum_i_half: np.ndarray,
                wilson_sigma: np.ndarray | None, rate: float = 0.0) -> Feedback:
        """Attach the data figures to ``snapshot.stats`` and compute the feedback.

        ``sum_i_half`` and ``wilson_sigma`` are the store's, read together with the
        snapshot (under the same lock).  ``snapshot.stats.resolution_cc_half`` becomes the
        published resolution (Å; None unless it is a value inside the table).
        """
        table: ShellTable = snapshot.stats
        sp = snapshot.space
        # the store's counts, with its sums: figures free of the training, misfit verdicts
        # included
        counts = snapshot.store_counts
        attach_data_estimate(table, sp, counts, sum_i_half, wilson_sigma)
        provisional = self._provisional(table)
        resolution = self._publish_resolution(table.resolution_fit("data"))
        table.resolution_cc_half = resolution.d if resolution is not None else None
        inputs = ForecastInputs(n_images=int(snapshot.n_images), rate=float(rate),
                                obs_count=counts, hkl=sp.hkl, d=sp.d,
                                centric=sp.centric, epsilon=sp.epsilon, friedel=sp.friedel,
                                table=table, model_provisional=provisional["cc_anom"],
                                d_reach=data_reach(counts[0], sp.d))
        forecasts = forecast_targets(self.targets, inputs)
        peaks = None
        if self.model is not None:
            try:
                peaks = snapshot_peaks(snapshot, self.model)
            except Exception as exc:  # noqa: BLE001 - a bad model must not stop publishing
                log.warning("anomalous peak heights failed (model %s): %s", self.model.path,
                            exc)
        fb = Feedback(snapshot_id=int(snapshot.snapshot_id), time=float(snapshot.time),
                      n_images=int(snapshot.n_images), rate=float(rate), forecasts=forecasts,
                      resolution=resolution, resolution_model=table.resolution_fit("model"),
                      provisional=provisional, peaks=peaks, dmin=float(sp.dmin))
        self._previous = table
        self.latest = fb
        self.history.append(self._point(fb, table))
        return fb

    # ------------------------------------------------------------------ pieces

    def _provisional(self, table: ShellTable) -> dict[str, bool]:
        """Whether each model figure moved more than the data explain since last time."""
        prev = self._previous
        out = {}
        for name in ("cc_half", "cc_anom"):
            if prev is None or len(getattr(prev, name)) != len(getattr(table, name)):
                out[name] = True           # nothing to compare with yet
                continue
            now, before = np.array(getattr(table, name), float), np.array(getattr(prev, name),
                                                                           float)
            data_now = np.array(getattr(table, f"{name}_data") or np.full(now.shape, np.nan),
                                float)
            data_before = np.array(getattr(prev, f"{name}_data")
                                   or np.full(now.shape, np.nan), float)
            half = 0.5 * (np.array(getattr(table, f"{name}_high"), float)
                          - np.array(getattr(table, f"{name}_low"), float))
            moved = np.abs(now - before)
            explained = np.nan_to_num(np.abs(data_now - data_before), nan=0.0) + half
            ok = np.isfinite(moved) & np.isfinite(explained)
            out[name] = bool(np.any(moved[ok] > explained[ok]))
        return out

    def _publish_resolution(self, new: ResolutionFit | None) -> ResolutionFit | None:
        """The resolution to publish: the last one unless ``new`` differs beyond the
        intervals (or its kind has changed for :data:`STATE_CHANGE_SNAPSHOTS` snapshots)."""
        old = self.published
        if new is None:
            return old
        if old is None:
            self.published = new
            return new
        if new.state != old.state:
            state, count = self._pending_state or (new.state, 0)
            count = count + 1 if state == new.state else 1
            self._pending_state = (new.state, count)
            if count >= STATE_CHANGE_SNAPSHOTS:
                self.published, self._pending_state = new, None
            return self.published
        self._pending_state = None
        if new.state == "fit" and (not old.low <= new.d <= old.high
                                   or not new.low <= old.d <= new.high):
            self.published = new
        return self.published

    def _point(self, fb: Feedback, table: ShellTable) -> dict[str, Any]:
        """One history point: figures against the number of images."""
        return {
            "snapshot": fb.snapshot_id, "time": fb.time, "n_images": fb.n_images,
            "targets": {f.target.kind: {"current": f.current, "images": f.images,
                                        "low": f.images_low, "high": f.images_high,
                                        "reached": f.reached} for f in fb.forecasts},
            "cc_half_data": list(table.cc_half_data), "cc_half": list(table.cc_half),
            "completeness": table.overall.get("completeness"),
            "completeness_shells": list(table.completeness),
            "multiplicity": table.overall.get("multiplicity"),
            "resolution": None if fb.resolution is None else fb.resolution.d,
            "peaks": None if fb.peaks is None else dict(fb.peaks.atoms),
        }

    def history_payload(self, max_points: int = 600) -> list[dict[str, Any]]:
        """The history, thinned evenly to ``max_points`` (first and last kept)."""
        items = list(self.history)
        if len(items) > max_points:
            idx = np.unique(np.linspace(0, len(items) - 1, max_points).round().astype(int))
            items = [items[i] for i in idx]
        return jsonable(items)


__all__ = ["Feedback", "LiveFeedback", "attach_data_estimate", "decision_lines", "store_sums"]
