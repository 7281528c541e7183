"""Prometheus metrics of one service, read from its snapshot at scrape time.

Each :class:`ServiceMetrics` owns its own :class:`~prometheus_client.CollectorRegistry`
(never the process-wide ``REGISTRY``), so two services in one process do not collide.  The
registry holds one custom collector that asks the service for a
:class:`~streamvi.snapshot.ServiceSnapshot` when Prometheus scrapes and reads only its
fields; nothing here is called from the ingest or training threads, and nothing here touches
the trainer, the store or the optimiser.

Names follow Prometheus conventions: base units (seconds, bytes, ratios 0–1), ``_total`` on
counters, and labels with few, stable values (``reason``, ``term``, ``kind``, ``quantile``
and ``shell`` = "1".."N" from low to high resolution, plus "overall").  docs/metrics.md
describes every metric.
"""
from __future__ import annotations

import logging
import math
import threading
import time
from collections import deque
from typing import Any, Iterator, Mapping

import numpy as np
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from streamvi.publish.feedback_metrics import feedback_families
from streamvi.snapshot import ServiceSnapshot, SnapshotSource, StoreFigures

log = logging.getLogger(__name__)

#: Upper bounds (s) of the step-duration histogram.
STEP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
#: Upper bounds (s) of the arrival → first-visit lag histogram.
LAG_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0)
#: Quantiles of visits per stored image.
VISIT_QUANTILES = (0.0, 0.1, 0.5, 0.9, 1.0)
#: Window (s) of ``streamvi_reflections_trained_per_second``.
RATE_WINDOW_S = 30.0

#: (metric, ShellTable attribute, overall key, help) of the per-shell gauges.
SHELL_GAUGES = (
    ("streamvi_cc_half", "cc_half", "cc_half",
     "CC1/2: correlation of the two half-dataset merges, per resolution shell"),
    ("streamvi_cc_star", "cc_star", "cc_star",
     "CC*: estimated correlation of the merge with the true signal, sqrt(2 CC1/2/(1+CC1/2))"),
    ("streamvi_cc_anom", "cc_anom", "cc_anom",
     "CCanom: correlation of the anomalous differences of the two halves"),
    ("streamvi_completeness", "completeness", "completeness",
     "Observed unique reflections / possible unique reflections (ratio 0-1)"),
    ("streamvi_multiplicity", "multiplicity", "multiplicity",
     "Observations per observed unique reflection"),
    ("streamvi_i_over_sigma", "i_over_sigma", "i_over_sigma",
     "Mean merged I/sigma(I) of the observed unique reflections"),
    ("streamvi_unique_reflections", "n_unique", "n_unique",
     "Observed unique reflections"),
    ("streamvi_shell_dmax_angstrom", "d_max", "d_max",
     "Low-resolution edge of the shell, Å"),
    ("streamvi_shell_dmin_angstrom", "d_min", "d_min",
     "High-resolution edge of the shell, Å"),
)


class ServiceMetrics:
    """The registry of one service and the collector that fills it.

    Parameters
    ----------
    source
        Gives the service's state at each scrape
        (:meth:`streamvi.service.service.Service.snapshot`).
    """

    def __init__(self, source: SnapshotSource):
        self.source = source
        self.registry = CollectorRegistry(auto_describe=False)
        self.collector = ServiceCollector(source)
        self.registry.register(self.collector)

    def exposition(self) -> bytes:
        """The Prometheus text exposition of every metric (what ``/metrics`` serves)."""
        return generate_latest(self.registry)


class _Histogram:
    """Cumulative bucket counts of values observed so far (not thread-safe on its own)."""

    def __init__(self, bounds: tuple[float, ...]):
        self.bounds = np.asarray(bounds, dtype=np.float64)
        self.counts = np.zeros(len(bounds) + 1, np.int64)   # last: above every bound
        self.sum = 0.0

    def observe(self, values: np.ndarray) -> None:
        values = np.asarray(values, dtype=np.float64)
        values = values[np.isfinite(values)]
        if values.size:
            idx = np.searchsorted(self.bounds, values, side="left")
            self.counts += np.bincount(idx, minlength=self.counts.size)
            self.sum += float(values.sum())

    def family(self, name: str, documentation: str) -> HistogramMetricFamily:
        return histogram_family(name, documentation, self.bounds, self.counts, self.sum)


def histogram_family(name: str, documentation: str, bounds: np.ndarray, counts: np.ndarray,
                     total: float) -> HistogramMetricFamily:
    """A histogram family from per-bucket (non-cumulative) counts, the last one being +Inf."""
    cumulative = np.cumsum(counts)
    buckets = [(_le(b), float(c)) for b, c in zip(bounds, cumulative[:-1])]
    buckets.append(("+Inf", float(cumulative[-1])))
    return HistogramMetricFamily(name, documentation, buckets=buckets, sum_value=total)


def _le(bound: float) -> str:
    return repr(float(bound))


def relative_f_change(f_old: np.ndarray, f_new: np.ndarray, observed: np.ndarray) -> float | None:
    """‖F_new − F_old‖ / ‖F_old‖ over the rows ``observed`` in the older snapshot.

    Returns None when nothing was observed or ‖F_old‖ is zero.
    """
    rows = np.asarray(observed, dtype=bool)
    a = np.asarray(f_old, dtype=np.float64)[rows]
    b = np.asarray(f_new, dtype=np.float64)[rows]
    ok = np.isfinite(a) & np.isfinite(b)
    norm = float(np.sqrt(np.sum(a[ok] ** 2)))
    if not ok.any() or norm == 0.0:
        return None
    return float(np.sqrt(np.sum((b[ok] - a[ok]) ** 2))) / norm


class ServiceCollector(Collector):
    """Reads one :class:`~streamvi.snapshot.ServiceSnapshot` of the service at each scrape.

    The state it keeps between scrapes (step durations already observed, trained-reflection
    samples of the rate window, the previous snapshot's amplitudes) is guarded by its own
    lock, because the HTTP server answers concurrent scrapes on several threads.
    """

    def __init__(self, source: SnapshotSource):
        self.source = source
        self._lock = threading.Lock()
        self._steps = _Histogram(STEP_BUCKETS)
        self._observed_step: int | None = None
        self._trained: deque[tuple[float, int]] = deque()
        self._trained.append((time.monotonic(),
                              int(source().status["reflections_trained"])))
        self._snap_id: int | None = None
        self._snap_f: np.ndarray | None = None
        self._snap_observed: np.ndarray | None = None
        self._f_change: float | None = None

    def describe(self) -> list[Metric]:
        # one collector per registry, so there are no names to check for collisions, and
        # describing by collecting would advance the step histogram outside a scrape
        return []

    def collect(self) -> list[Metric]:
        # one snapshot per scrape, taken under this collector's lock: concurrent scrapes see
        # states in the order they were taken, so the shared histogram never runs ahead
        with self._lock:
            state = self.source(store=True)
            return [*self._ingest(state), *self._training(state), *self._store(state.store),
                    *self._quality(state), *difference_families(state.status),
                    *feedback_families(state), *self._process(state),
                    *om_families(state.status.get("om"))]

    # ------------------------------------------------------------------ ingest

    def _ingest(self, state: ServiceSnapshot) -> Iterator[Metric]:
        c = state.status["counters"]
        for name, key, doc in (
                ("streamvi_messages_received", "messages_received",
                 "Frames received on the ingest sockets, accepted or not"),
                ("streamvi_crystals_received", "crystals_received",
                 "Crystals accepted by ingest (validated and spooled)"),
                ("streamvi_reflections_received", "reflections_received",
                 "Reflections in accepted crystals, after row-level screening"),
                ("streamvi_bytes_received", "bytes_received",
                 "Bytes of every frame received, accepted or not")):
            yield CounterMetricFamily(name, doc, value=c[key])
        for name, key, doc in (
                ("streamvi_messages_rejected", "messages_rejected",
                 "Whole messages refused and dead-lettered, by reason"),
                ("streamvi_reflections_rejected", "reflections_rejected",
                 "Rows dropped inside accepted messages, by reason")):
            fam = CounterMetricFamily(name, doc, labels=["reason"])
            for reason, n in sorted(c[key].items()):
                fam.add_metric([reason], n)
            yield fam
        fam = CounterMetricFamily("streamvi_crystals_rejected",
                                  "Accepted crystals the store refused, by reason",
                                  labels=["reason"])
        for reason, n in sorted(c["crystals_rejected"].items()):
            fam.add_metric([reason], n)
        yield fam
        yield CounterMetricFamily(
            "streamvi_duplicates", "Crystals already stored (same identity or same content)",
            value=c["duplicates"])
        yield CounterMetricFamily(
            "streamvi_duplicates_not_spooled",
            "Duplicates recognised before spooling (not written to the spool)",
            value=c["duplicates_not_spooled"])
        yield CounterMetricFamily(
            "streamvi_spool_write_errors", "Spool appends that failed and were retried",
            value=c.get("spool_write_errors", 0))
        yield CounterMetricFamily(
            "streamvi_producer_disconnects",
            "Producer connections that closed (a producer that finished, or one that sent a "
            "frame over max_message_bytes; one that reconnects over and over does the latter)",
            value=state.status.get("producer_disconnects", 0))
        yield CounterMetricFamily(
            "streamvi_handshake_failures",
            "Connections refused at the ZeroMQ handshake (not a ZeroMQ peer, CURVE on one "
            "side only, or a CURVE key not authorised)",
            value=state.status.get("handshake_failures", 0))
        yield GaugeMetricFamily("streamvi_queue_depth",
                                "Decoded crystals waiting for the trainer",
                                value=state.status["queue_depth"])
        yield GaugeMetricFamily("streamvi_spool_bytes", "Bytes of accepted messages spooled",
                                value=state.spool_bytes)

    # ------------------------------------------------------------------ training

    def _training(self, state: ServiceSnapshot) -> Iterator[Metric]:
        status = state.status
        # the snapshot read the step durations before the step counter, so that a scrape
        # never shows more timed steps than steps taken
        self._observe_steps(state)
        yield CounterMetricFamily("streamvi_crystals_merged",
                                  "Crystals added to the reflection store",
                                  value=status["crystals_merged"])
        yield CounterMetricFamily(
            "streamvi_reflections_outside",
            "Reflections of stored crystals outside the table (beyond dmin, absences)",
            value=status["reflections_outside"])
        beyond = status.get("beyond_dmin") or {}
        yield GaugeMetricFamily(
            "streamvi_reflections_beyond_dmin",
            "Reflections of the arriving crystals beyond the table's dmin (left out)",
            value=beyond.get("reflections", 0))
        yield GaugeMetricFamily(
            "streamvi_dmin_advice_angstrom",
            "The dmin (A) the service advises a restart with to merge the data beyond its "
            "table; 0 while there is no such advice",
            value=(beyond.get("suggested_dmin") or 0.0) if status.get("dmin_advice") else 0.0)
        yield CounterMetricFamily("streamvi_training_steps", "Optimiser steps taken",
                                  value=status["steps"])
        yield CounterMetricFamily(
            "streamvi_training_steps_skipped",
            "Steps whose update was skipped for non-finite gradients",
            value=status["skipped_steps"])
        yield GaugeMetricFamily(
            "streamvi_failed", "1 while the service is failed (see /healthz for why), else 0",
            value=int(state.failure is not None))
        trained = int(status["reflections_trained"])
        yield CounterMetricFamily("streamvi_reflections_trained",
                                  "Reflections in the minibatches of every step",
                                  value=trained)
        yield GaugeMetricFamily(
            "streamvi_reflections_trained_per_second",
            f"Reflections trained per second over the last {RATE_WINDOW_S:g} s",
            value=self._trained_rate(trained))
        yield self._steps.family("streamvi_step_duration_seconds",
                                 "Wall time of one optimiser step, s")
        report = state.last_step
        fam = GaugeMetricFamily(
            "streamvi_loss", "Loss terms of the last step, per observation", labels=["term"])
        if report is not None:
            for term, value in (("total", report.loss), ("nll", report.nll),
                                ("kl_F", report.kl_F), ("kl_scale", report.kl_scale)):
                _add_finite(fam, [term], value)
        yield fam

    def _trained_rate(self, trained: int) -> float:
        now = time.monotonic()
        samples = self._trained
        samples.append((now, trained))
        # keep one sample older than the window as the rate's base
        while len(samples) > 2 and samples[1][0] <= now - RATE_WINDOW_S:
            samples.popleft()
        t0, n0 = samples[0]
        return (trained - n0) / (now - t0) if now > t0 else 0.0

    def _observe_steps(self, state: ServiceSnapshot) -> None:
        """Feed the step durations appended since the last scrape into the histogram."""
        report = state.last_step               # set after its duration is appended
        durations = state.step_seconds
        if report is None or not durations:
            return
        end = len(durations)
        # the training thread may have appended the next step after `report` was read
        if durations[-1] != report.seconds and end >= 2 and durations[-2] == report.seconds:
            end -= 1
        if self._observed_step is None:
            new = min(end, int(report.step))
        else:
            new = int(report.step) - self._observed_step
        if new > end:
            log.debug("%d step durations were dropped from the service's buffer before a "
                      "scrape; the histogram counts the last %d", new - end, end)
        new = max(0, min(new, end))
        self._steps.observe(np.asarray(list(durations)[end - new:end], dtype=np.float64))
        self._observed_step = int(report.step)

    # ------------------------------------------------------------------ store

    def _store(self, store: StoreFigures | None) -> Iterator[Metric]:
        if store is None:            # the store was busy: its families wait for the next scrape
            return
        n, n_refl, n_rejected = store.n_images, store.n_reflections, store.n_rejected
        visits, lag, settings, geometry = store.visits, store.lags, store.settings, store.geometry
        yield GaugeMetricFamily("streamvi_images_stored", "Images in the reflection store",
                                value=n)
        yield GaugeMetricFamily("streamvi_reflections_stored",
                                "Reflections in the reflection store", value=n_refl)
        yield GaugeMetricFamily("streamvi_images_unvisited",
                                "Stored images not yet in any training step",
                                value=int((visits == 0).sum()))
        yield GaugeMetricFamily("streamvi_images_rejected",
                                "Stored images whose latest visit found them not to fit the "
                                "merge (misindexed or another lattice); left out of it",
                                value=n_rejected)
        if settings:
            fam_s = GaugeMetricFamily("streamvi_images_by_setting",
                                      "Stored images per indexing setting: the twin law that "
                                      "puts each in the merge's setting (as of the last "
                                      "snapshot; space groups with an indexing ambiguity only)",
                                      labels=["operator"])
            for op, count in settings.items():
                fam_s.add_metric([op], count)
            yield fam_s
        yield from _geometry_families(geometry)
        # a summary over images: each image is one observation of its visit count
        fam = Metric("streamvi_image_visits",
                     "Training visits per stored image: quantiles over images, count = images, "
                     "sum = visits", "summary")
        if n:
            for q, v in zip(VISIT_QUANTILES, np.quantile(visits, VISIT_QUANTILES)):
                fam.add_sample("streamvi_image_visits", {"quantile": f"{q:g}"}, float(v))
        fam.add_sample("streamvi_image_visits_count", {}, float(n))
        fam.add_sample("streamvi_image_visits_sum", {}, float(visits.sum()))
        yield fam
        lag = np.clip(lag[np.isfinite(lag)], 0.0, None)   # clock steps must not go negative
        counts = np.bincount(np.searchsorted(LAG_BUCKETS, lag, side="left"),
                             minlength=len(LAG_BUCKETS) + 1)
        yield histogram_family("streamvi_ingest_lag_seconds",
                               "Time from a crystal's arrival to its first training step, s",
                               np.asarray(LAG_BUCKETS), counts, float(lag.sum()))

    # ------------------------------------------------------------------ quality

    def _quality(self, state: ServiceSnapshot) -> Iterator[Metric]:
        # every family is announced even before the first snapshot, so that the set of names
        # a scrape shows does not depend on the state of the merge
        snap = state.merge
        st = None if snap is None else snap.stats
        # with pump-probe conditions every condition's merge, labelled; else the one merge
        by_condition = ({name: s.stats for name, s in state.conditions.items()}
                        if state.conditions else {None: st} if st is not None else {})
        for name, attr, key, doc in SHELL_GAUGES:
            fam = GaugeMetricFamily(name, doc, labels=["shell", "condition"]
                                    if state.conditions else ["shell"])
            for condition, stats in by_condition.items():
                extra = [] if condition is None else [condition]
                shells = [str(i + 1) for i in range(len(stats.d_min))]
                for label, value in zip(shells + ["overall"],
                                        list(getattr(stats, attr)) + [stats.overall.get(key)]):
                    _add_finite(fam, [label, *extra], value)
            yield fam
        fam = GaugeMetricFamily(
            "streamvi_resolution_cc_half_angstrom",
            "Resolution where the training-free CC1/2 falls to 0.3 (fit over shells; "
            "changed only beyond its interval), Å")
        _add_finite(fam, [], None if st is None else st.resolution_cc_half)
        yield fam
        fam = GaugeMetricFamily("streamvi_snapshot_timestamp_seconds",
                                "Unix time of the latest posterior snapshot, s")
        _add_finite(fam, [], None if snap is None else snap.time)
        yield fam
        fam = GaugeMetricFamily(
            "streamvi_snapshot_change_relative",
            "||F_new - F_old|| / ||F_old|| between consecutive snapshots seen by the exporter "
            "(rows observed in the older one)")
        _add_finite(fam, [], None if snap is None else self._snapshot_change(snap))
        yield fam

    def _snapshot_change(self, snap: Any) -> float | None:
        if snap.snapshot_id != self._snap_id:
            f_new = snap.tables["all"]["F"]
            if self._snap_f is not None and self._snap_f.shape == f_new.shape:
                self._f_change = relative_f_change(self._snap_f, f_new, self._snap_observed)
            self._snap_id = snap.snapshot_id
            self._snap_f = f_new
            self._snap_observed = snap.obs_count[0] > 0
        return self._f_change

    # ------------------------------------------------------------------ process

    def _process(self, state: ServiceSnapshot) -> Iterator[Metric]:
        yield CounterMetricFamily("streamvi_mtz_written", "MTZ snapshots written",
                                  value=state.status["mtz_written"])
        yield CounterMetricFamily("streamvi_mtz_errors", "MTZ snapshots that failed to write",
                                  value=state.status["mtz_errors"])
        fam = GaugeMetricFamily("streamvi_device_memory_bytes",
                                "Memory in use, bytes: process RSS, CUDA allocator, store tiers",
                                labels=["kind"])
        for kind, value in state.memory.items():
            fam.add_metric([kind], value)
        yield fam
        yield GaugeMetricFamily("streamvi_uptime_seconds", "Seconds since the service started",
                                value=state.time - state.started_at)
        info = GaugeMetricFamily("streamvi_build_info", "streamvi version (value is always 1)",
                                 labels=["version"])
        info.add_metric([state.version], 1)
        yield info


def difference_families(status: Mapping[str, Any]) -> Iterator[Metric]:
    """Pump–probe figures (``serve --conditions``): images per condition, and per
    light-minus-dark pair the half-set CC of ΔF per shell and the significant differences.
    Announced, without samples, when the service has no conditions."""
    fam = GaugeMetricFamily("streamvi_condition_images",
                            "Images merged per pump-probe condition", labels=["condition"])
    for name, n in (status.get("condition_images") or {}).items():
        fam.add_metric([name], float(n))
    yield fam
    cc = GaugeMetricFamily(
        "streamvi_delta_cc_half",
        "Correlation of the two half-datasets' light-minus-dark differences (the CC1/2 of "
        "Delta F), per resolution shell (1 = lowest) and overall", labels=["pair", "shell"])
    sig = GaugeMetricFamily(
        "streamvi_delta_significant",
        "Reflections with |Delta F| / sigma(Delta F) > 3 (sigma calibrated on the half-"
        "datasets' scatter of Delta F: about 1 % of the reflections where nothing changed)",
        labels=["pair"])
    peak = GaugeMetricFamily(
        "streamvi_delta_peak_sigma",
        "With a model: the light-minus-dark map's highest peak (sign=positive) and deepest "
        "hole (sign=negative), sigma of the map; none under 3 sigma", labels=["pair", "sign"])
    for pair, fig in (status.get("differences") or {}).items():
        shells = [str(i + 1) for i in range(len(fig["delta_cc_half"]))]
        for label, value in zip(shells + ["overall"],
                                list(fig["delta_cc_half"]) + [fig["delta_cc_half_overall"]]):
            _add_finite(cc, [pair, label], value)
        sig.add_metric([pair], float(fig["significant"]))
        for sign in ("positive", "negative"):
            found = (fig.get("peaks") or {}).get(sign) or []
            if found:
                peak.add_metric([pair, sign], float(found[0]["sigma"]))
    yield cc
    yield sig
    yield peak
    # the learnt correlations of the coupled prior: low r in a shell is a large change
    corr = GaugeMetricFamily(
        "streamvi_prior_correlation",
        "Learnt correlation r of the double-Wilson prior per resolution shell (1 = lowest): "
        "of each condition with the reference condition (given=the reference's name), and of "
        "the merge with the prior data set (given=prior)", labels=["condition", "given", "shell"])
    reference = next(iter(status.get("condition_images") or {}), "")
    for name, r in (status.get("coupling") or {}).items():
        for i, value in enumerate(r):
            _add_finite(corr, [name, reference, str(i + 1)], value)
    prior = status.get("prior")
    if prior:
        for i, value in enumerate(prior["r_shells"]):
            _add_finite(corr, [reference, "prior", str(i + 1)], value)
    yield corr


def _geometry_families(summary: dict | None) -> Iterator[Metric]:
    """The per-image geometry refinement, summarised (:meth:`MergeEngine.geometry_summary`);
    announced with no samples while refinement is off or before the first step."""
    refined = GaugeMetricFamily("streamvi_geometry_refined_images",
                                "Images whose reported orientation and cell have been refined "
                                "at least once")
    rotation = GaugeMetricFamily("streamvi_geometry_rotation_rms_degrees",
                                 "RMS over stored images of the rotation the refinement "
                                 "applied to the reported orientation (0 until refined), "
                                 "degrees")
    rms = GaugeMetricFamily("streamvi_geometry_axis_change_rms",
                            "RMS over stored images of the relative change the refinement "
                            "applied to the length of each reciprocal axis (0 until refined)",
                            labels=["axis"])
    if summary is not None:
        refined.add_metric([], summary["refined"])
        _add_finite(rotation, [], summary["rotation_rms_deg"])
        for axis, r in zip(("a*", "b*", "c*"), summary["axis_change_rms"]):
            _add_finite(rms, [axis], r)
    yield from (refined, rotation, rms)


def _add_finite(fam: GaugeMetricFamily, labels: list[str], value: float | None) -> None:
    """Add a sample unless the value is missing or not finite (no NaN in the exposition)."""
    if value is not None and math.isfinite(value):
        fam.add_metric(labels, float(value))


def om_families(status: Mapping[str, Any] | None) -> list[Metric]:
    """The OM bridge's metrics from its status (the snapshot's ``status["om"]``); an empty
    list while no bridge runs.

    ``streamvi_om_hit_rate`` (ratio 0–1, OM's running average at its latest event),
    ``streamvi_om_events_total``, ``streamvi_om_hits_total`` (estimated),
    ``streamvi_om_messages_total``, ``streamvi_om_last_message_timestamp_seconds`` and
    ``streamvi_indexing_yield`` (crystals received per OM hit).  Every family is announced
    once the bridge runs, with a sample once there is a value.
    """
    if status is None:
        return []
    hit_rate = GaugeMetricFamily("streamvi_om_hit_rate",
                                 "OM's running-average hit rate at its latest event (ratio 0-1)")
    if status["hit_rate"] is not None:
        hit_rate.add_metric([], status["hit_rate"])
    last = GaugeMetricFamily("streamvi_om_last_message_timestamp_seconds",
                             "Unix time the latest OM message arrived, s")
    if status["received_at"] is not None:
        last.add_metric([], status["received_at"])
    indexing = GaugeMetricFamily("streamvi_indexing_yield",
                                 "Crystals received per OM hit (can exceed 1 with several "
                                 "crystals per image)")
    if status["indexing_yield"] is not None:
        indexing.add_metric([], status["indexing_yield"])
    return [
        hit_rate,
        CounterMetricFamily("streamvi_om_events", "Events OM processed, seen through its "
                            "broadcasts", value=status["events"]),
        CounterMetricFamily("streamvi_om_hits", "Hits OM found (estimated from its "
                            "running-average hit rate)", value=status["hits"]),
        CounterMetricFamily("streamvi_om_messages", "OM broadcasts received",
                            value=status["messages"]),
        last,
        indexing,
    ]
