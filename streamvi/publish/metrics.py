"""Prometheus metrics of one service, read from its state at scrape time.

Each :class:`ServiceMetrics` owns its own :class:`~prometheus_client.CollectorRegistry`
(never the process-wide ``REGISTRY``), so two services in one process do not collide.  The
registry holds one custom collector that reads the service's plain attributes and snapshots
when Prometheus scrapes; nothing here is called from the ingest or training threads.

Names follow Prometheus conventions: base units (seconds, bytes, ratios 0–1), ``_total`` on
counters, and labels with few, stable values (``reason``, ``term``, ``kind``, ``quantile``
and ``shell`` = "1".."N" from low to high resolution, plus "overall").  docs/metrics.md
describes every metric.
"""
from __future__ import annotations

import logging
import math
import os
import resource
import threading
import time
from collections import deque
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Iterator

import numpy as np
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

import streamvi
from streamvi.publish.feedback_metrics import feedback_families

if TYPE_CHECKING:
    from streamvi.service.service import Service

log = logging.getLogger(__name__)

#: Upper bounds (s) of the step-duration histogram.
STEP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
#: Upper bounds (s) of the arrival → first-visit lag histogram.
LAG_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0)
#: Quantiles of visits per stored image.
VISIT_QUANTILES = (0.0, 0.1, 0.5, 0.9, 1.0)
#: Window (s) of ``streamvi_reflections_trained_per_second``.
RATE_WINDOW_S = 30.0
#: Longest wait (s) for the service lock; the training thread holds it for one step.
LOCK_TIMEOUT_S = 5.0

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
    service
        The running :class:`~streamvi.service.service.Service` whose state is exported.
    """

    def __init__(self, service: "Service"):
        self.service = service
        self.registry = CollectorRegistry(auto_describe=False)
        self.collector = ServiceCollector(service)
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


def process_rss_bytes() -> int:
    """Resident memory of this process, bytes (peak RSS where /proc is absent)."""
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return int(peak) * (1 if os.uname().sysname == "Darwin" else 1024)


@contextmanager
def _holding(lock: Any, timeout: float) -> Iterator[bool]:
    """Acquire ``lock`` for at most ``timeout`` s; yields whether it was acquired."""
    got = lock.acquire(timeout=timeout)
    try:
        yield got
    finally:
        if got:
            lock.release()


class ServiceCollector(Collector):
    """Reads a service's counters, store, trainer and latest snapshot at each scrape.

    The state it keeps between scrapes (step durations already observed, trained-reflection
    samples of the rate window, the previous snapshot's amplitudes) is guarded by its own
    lock, because the HTTP server answers concurrent scrapes on several threads.
    """

    def __init__(self, service: "Service"):
        self.service = service
        self._lock = threading.Lock()
        self._steps = _Histogram(STEP_BUCKETS)
        self._observed_step: int | None = None
        self._trained: deque[tuple[float, int]] = deque()
        self._trained.append((time.monotonic(), int(service.trained_reflections)))
        self._snap_id: int | None = None
        self._snap_f: np.ndarray | None = None
        self._snap_observed: np.ndarray | None = None
        self._f_change: float | None = None

    def describe(self) -> list[Metric]:
        # one collector per registry, so there are no names to check for collisions, and
        # describing by collecting would advance the step histogram outside a scrape
        return []

    def collect(self) -> list[Metric]:
        with self._lock:
            return [*self._ingest(), *self._training(), *self._store(), *self._quality(),
                    *feedback_families(self.service), *self._process(), *self._om()]

    def _om(self) -> list[Metric]:
        if getattr(self.service, "om_bridge", None) is None:
            return []
        from streamvi_om import om_metric_families

        return om_metric_families(self.service)

    # ------------------------------------------------------------------ ingest

    def _ingest(self) -> Iterator[Metric]:
        svc = self.service
        c = svc.counters.snapshot()
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
        yield GaugeMetricFamily("streamvi_queue_depth",
                                "Decoded crystals waiting for the trainer",
                                value=svc.ingestor.queue_depth)
        yield GaugeMetricFamily("streamvi_spool_bytes", "Bytes of accepted messages spooled",
                                value=svc.spool.bytes_total)

    # ------------------------------------------------------------------ training

    def _training(self) -> Iterator[Metric]:
        svc = self.service
        engine = svc.engine
        # before the step counter is read, so that a scrape never shows more timed steps
        # than steps taken
        self._observe_steps()
        yield CounterMetricFamily("streamvi_crystals_merged",
                                  "Crystals added to the reflection store",
                                  value=svc.crystals_merged)
        yield CounterMetricFamily(
            "streamvi_reflections_outside",
            "Reflections of stored crystals outside the table (beyond dmin, absences)",
            value=svc.reflections_outside)
        yield CounterMetricFamily("streamvi_training_steps", "Optimiser steps taken",
                                  value=0 if engine is None else engine.trainer.step)
        yield CounterMetricFamily(
            "streamvi_training_steps_skipped",
            "Steps whose update was skipped for non-finite gradients",
            value=0 if engine is None else engine.trainer.skipped_steps)
        yield GaugeMetricFamily(
            "streamvi_failed", "1 while the service is failed (see /healthz for why), else 0",
            value=int(svc.failure is not None))
        trained = int(svc.trained_reflections)
        yield CounterMetricFamily("streamvi_reflections_trained",
                                  "Reflections in the minibatches of every step",
                                  value=trained)
        yield GaugeMetricFamily(
            "streamvi_reflections_trained_per_second",
            f"Reflections trained per second over the last {RATE_WINDOW_S:g} s",
            value=self._trained_rate(trained))
        yield self._steps.family("streamvi_step_duration_seconds",
                                 "Wall time of one optimiser step, s")
        report = svc.last_step_report
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

    def _observe_steps(self) -> None:
        """Feed the step durations appended since the last scrape into the histogram."""
        svc = self.service
        report = svc.last_step_report          # set after its duration is appended
        durations = svc.step_seconds.copy()
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

    def _store(self) -> Iterator[Metric]:
        engine = self.service.engine
        n, n_refl, visits, lag, n_rejected = 0, 0, np.zeros(0, np.int64), np.zeros(0), 0
        settings: dict[str, int] = {}
        geometry: dict | None = None
        if engine is not None:
            st = engine.store
            with _holding(self.service.lock, LOCK_TIMEOUT_S) as got:
                if not got:
                    log.warning("metrics: service lock busy for %.0f s; store metrics skipped "
                                "in this scrape", LOCK_TIMEOUT_S)
                    return
                n = int(st.n_images)
                visits = st.visits[:n].copy()
                lag = st.first_visit_time[:n] - st.arrival_time[:n]
                n_refl = int(st.n_reflections)
                n_rejected = st.n_rejected
                settings = st.setting_counts()
                geometry = engine.geometry_summary()
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

    def _quality(self) -> Iterator[Metric]:
        # every family is announced even before the first snapshot, so that the set of names
        # a scrape shows does not depend on the state of the merge
        snap = self.service.latest
        st = None if snap is None else snap.stats
        shells = [] if st is None else [str(i + 1) for i in range(len(st.d_min))]
        for name, attr, key, doc in SHELL_GAUGES:
            fam = GaugeMetricFamily(name, doc, labels=["shell"])
            if st is not None:
                for label, value in zip(shells + ["overall"],
                                        list(getattr(st, attr)) + [st.overall.get(key)]):
                    _add_finite(fam, [label], value)
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

    def _process(self) -> Iterator[Metric]:
        svc = self.service
        yield CounterMetricFamily("streamvi_mtz_written", "MTZ snapshots written",
                                  value=svc.mtz.n_written)
        yield CounterMetricFamily("streamvi_mtz_errors", "MTZ snapshots that failed to write",
                                  value=svc.mtz.n_errors)
        fam = GaugeMetricFamily("streamvi_device_memory_bytes",
                                "Memory in use, bytes: process RSS, CUDA allocator, store tiers",
                                labels=["kind"])
        for kind, value in memory_by_kind(svc).items():
            fam.add_metric([kind], value)
        yield fam
        yield GaugeMetricFamily("streamvi_uptime_seconds", "Seconds since the service started",
                                value=time.time() - svc.started_at)
        info = GaugeMetricFamily("streamvi_build_info", "streamvi version (value is always 1)",
                                 labels=["version"])
        info.add_metric([streamvi.__version__], 1)
        yield info


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


def memory_by_kind(service: "Service") -> dict[str, int]:
    """Bytes per ``kind``: process_rss, cuda_allocated/cuda_reserved, store_device/store_host."""
    out = {"process_rss": process_rss_bytes()}
    engine = service.engine
    if engine is None:
        return out
    device = engine.device
    if device.type == "cuda":
        import torch

        out["cuda_allocated"] = int(torch.cuda.memory_allocated(device))
        out["cuda_reserved"] = int(torch.cuda.memory_reserved(device))
    used = engine.store.bytes_used()
    out["store_device"] = int(used.get("device", 0))
    out["store_host"] = int(used.get("host", 0))
    return out
