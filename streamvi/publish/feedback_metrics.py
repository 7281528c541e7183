"""Prometheus families of the live feedback: evidence behind each correlation, the
training-free figures, the resolution estimate, targets and forecasts, anomalous peaks.

:func:`feedback_families` reads the latest posterior snapshot's table and its
:class:`~streamvi.quality.feedback.Feedback` from the service's snapshot at scrape time;
every family is announced from the first scrape on, with samples only where a value exists
(no NaN in the exposition).  The metrics are described in docs/metrics.md.
"""
from __future__ import annotations

import math
from typing import Any, Iterator

from prometheus_client.core import GaugeMetricFamily, Metric

from streamvi.snapshot import ServiceSnapshot

#: (metric, ShellTable attribute, help) of the per-shell evidence gauges.
EVIDENCE_GAUGES = (
    ("streamvi_cc_half_pairs", "cc_half_pairs",
     "Reflections seen in both halves behind CC1/2 (model), per shell"),
    ("streamvi_cc_half_low", "cc_half_low",
     "Lower end of the 95 % interval of CC1/2 (model; Fisher z), per shell"),
    ("streamvi_cc_half_high", "cc_half_high",
     "Upper end of the 95 % interval of CC1/2 (model; Fisher z), per shell"),
    ("streamvi_cc_anom_pairs", "cc_anom_pairs",
     "Bijvoet pairs seen in both halves behind CCanom (model), per shell"),
    ("streamvi_cc_anom_low", "cc_anom_low",
     "Lower end of the 95 % interval of CCanom (model), per shell"),
    ("streamvi_cc_anom_high", "cc_anom_high",
     "Upper end of the 95 % interval of CCanom (model), per shell"),
    ("streamvi_cc_half_data", "cc_half_data",
     "CC1/2 of the plain half-set averages of the observations (training-free: moves only "
     "with the data), per shell"),
    ("streamvi_cc_half_data_pairs", "cc_half_data_pairs",
     "Reflections seen in both halves behind the training-free CC1/2, per shell"),
    ("streamvi_cc_half_data_low", "cc_half_data_low",
     "Lower end of the 95 % interval of the training-free CC1/2, per shell"),
    ("streamvi_cc_half_data_high", "cc_half_data_high",
     "Upper end of the 95 % interval of the training-free CC1/2, per shell"),
    ("streamvi_cc_anom_data", "cc_anom_data",
     "CCanom of the plain half-set averages of the observations (training-free), per shell"),
    ("streamvi_cc_anom_data_pairs", "cc_anom_data_pairs",
     "Bijvoet pairs behind the training-free CCanom, per shell"),
    ("streamvi_cc_anom_data_low", "cc_anom_data_low",
     "Lower end of the 95 % interval of the training-free CCanom, per shell"),
    ("streamvi_cc_anom_data_high", "cc_anom_data_high",
     "Upper end of the 95 % interval of the training-free CCanom, per shell"),
)


def feedback_families(state: ServiceSnapshot) -> Iterator[Metric]:
    """Every family of this module, filled from the state's posterior snapshot and its
    feedback (both may be None).  With pump–probe conditions the per-shell evidence, the
    targets, the resolution estimate and the anomalous peaks carry a ``condition`` label,
    one series per condition (each of its own images and map)."""
    table = None if state.merge is None else state.merge.stats
    fb = state.feedback
    if state.conditions:
        tables = {name: snap.stats for name, snap in state.conditions.items()}
        reference = next(iter(state.conditions))
        feedbacks = {reference: fb, **state.condition_feedback}
    else:
        tables, feedbacks = {None: table}, {None: fb}
    yield from _evidence(tables)
    yield from _resolution(feedbacks)
    yield from _targets(feedbacks)
    yield from _peaks(feedbacks)


def _add(fam: GaugeMetricFamily, labels: list[str], value: Any) -> None:
    if value is not None and isinstance(value, (int, float)) and math.isfinite(value):
        fam.add_metric(labels, float(value))


def _evidence(tables: dict[str | None, Any]) -> Iterator[Metric]:
    """The evidence gauges of each table (key: its condition, None without conditions)."""
    by_condition = None not in tables
    for name, attr, doc in EVIDENCE_GAUGES:
        fam = GaugeMetricFamily(name, doc, labels=["shell", "condition"] if by_condition
                                else ["shell"])
        for condition, table in tables.items():
            extra = [] if condition is None else [condition]
            values = [] if table is None else list(getattr(table, attr, []) or [])
            if not values:
                continue
            labels = [str(i + 1) for i in range(len(table.d_min))] + ["overall"]
            values = values + [table.overall.get(attr)]
            base = attr.rsplit("_", 1)[0] if attr.endswith(("_pairs", "_low", "_high")) else attr
            counts = list(getattr(table, f"{base}_pairs", []) or []) + [
                table.overall.get(f"{base}_pairs")]
            for label, value, pairs in zip(labels, values, counts):
                # a figure on too few pairs is left out, never exported as a number
                if not attr.endswith("_pairs") and (pairs or 0) < table.min_pairs:
                    continue
                _add(fam, [label, *extra], value)
        yield fam


def _resolution(feedbacks: dict[str | None, Any]) -> Iterator[Metric]:
    """The resolution families of each feedback (key: its condition, None without
    conditions)."""
    by = ["condition"] if None not in feedbacks else []
    low = GaugeMetricFamily("streamvi_resolution_cc_half_low_angstrom",
                            "Lower end (Å) of the 95 % interval of the published resolution "
                            "estimate", labels=by)
    high = GaugeMetricFamily("streamvi_resolution_cc_half_high_angstrom",
                             "Upper end (Å) of the 95 % interval of the published resolution "
                             "estimate", labels=by)
    beyond = GaugeMetricFamily("streamvi_resolution_beyond_dmin",
                               "1 when CC1/2 (training-free) stays above 0.3 to dmin: the data "
                               "may extend beyond the table, else 0", labels=by)
    model = GaugeMetricFamily("streamvi_resolution_cc_half_model_angstrom",
                              "Resolution where the fit of the model's CC1/2 falls to 0.3, Å "
                              "(provisional while streamvi_model_figures_provisional is 1)",
                              labels=by)
    provisional = GaugeMetricFamily("streamvi_model_figures_provisional",
                                    "1 while the model's figure moved more between snapshots "
                                    "than the data explain (training at work), else 0",
                                    labels=["figure", *by])
    for condition, fb in feedbacks.items():
        if fb is None:
            continue
        extra = [] if condition is None else [condition]
        if fb.resolution is not None:
            _add(low, extra, fb.resolution.low)
            _add(high, extra, fb.resolution.high)
            beyond.add_metric(extra, float(fb.resolution.beyond_dmin))
        if fb.resolution_model is not None:
            _add(model, extra, fb.resolution_model.d)
        for figure, flag in fb.provisional.items():
            provisional.add_metric([figure, *extra], float(flag))
    yield from (low, high, beyond, model, provisional)


def _targets(feedbacks: dict[str | None, Any]) -> Iterator[Metric]:
    """The target families of each feedback (key: its condition, None without
    conditions)."""
    by_condition = None not in feedbacks
    families = _target_families(["target", "condition"] if by_condition else ["target"])
    for condition, fb in feedbacks.items():
        extra = [] if condition is None else [condition]
        for fc in [] if fb is None else fb.forecasts:
            _add_forecast(families, [fc.target.kind, *extra], fc)
    yield from families


def _target_families(labels: list[str]) -> tuple[GaugeMetricFamily, ...]:
    """``(images, images_low, images_high, seconds, reached, current, goal)``, empty."""
    return (
        GaugeMetricFamily("streamvi_forecast_images",
                          "Images still needed to reach the target (0 once reached; no "
                          "sample while no forecast can be made)", labels=labels),
        GaugeMetricFamily("streamvi_forecast_images_low",
                          "Lower end of the 95 % interval of the images still needed",
                          labels=labels),
        GaugeMetricFamily("streamvi_forecast_images_high",
                          "Upper end of the 95 % interval of the images still needed "
                          "(no sample: unbounded)", labels=labels),
        GaugeMetricFamily("streamvi_forecast_seconds",
                          "Seconds still needed to reach the target at the current "
                          "indexed rate (0 once reached; no sample while no images "
                          "arrive)", labels=labels),
        GaugeMetricFamily("streamvi_target_reached",
                          "1 once the target is reached, else 0", labels=labels),
        GaugeMetricFamily("streamvi_target_value",
                          "The figure a target is judged on, now", labels=labels),
        GaugeMetricFamily("streamvi_target_goal", "The level a target asks for",
                          labels=labels))


def _add_forecast(families: tuple[GaugeMetricFamily, ...], label: list[str], fc: Any) -> None:
    """One forecast's samples in :func:`_target_families`' families."""
    images, images_low, images_high, seconds, reached, current, goal = families
    reached.add_metric(label, float(fc.reached))
    _add(current, label, fc.current)
    _add(goal, label, fc.target.value)
    if fc.reached:
        images.add_metric(label, 0.0)
        seconds.add_metric(label, 0.0)
        return
    _add(images, label, fc.images_needed)
    for fam, total in ((images_low, fc.images_low), (images_high, fc.images_high)):
        if total is not None:
            _add(fam, label, max(total - fc.n_images, 0.0))
    _add(seconds, label, fc.seconds)


def _peaks(feedbacks: dict[str | None, Any]) -> Iterator[Metric]:
    """The anomalous peaks of each feedback's map (key: its condition, None without
    conditions)."""
    by = ["condition"] if None not in feedbacks else []
    atoms = GaugeMetricFamily("streamvi_anomalous_peak_sigma",
                              "Height of the anomalous difference map at each heavy atom of the "
                              "model (--model), in sigma of the map", labels=["atom", *by])
    new = GaugeMetricFamily("streamvi_anomalous_new_peak_sigma",
                            "The strongest peaks of the anomalous difference map away from the "
                            "model's heavy atoms, in sigma (rank 1 = highest)",
                            labels=["rank", *by])
    for condition, fb in feedbacks.items():
        peaks = None if fb is None else fb.peaks
        if peaks is None:
            continue
        extra = [] if condition is None else [condition]
        for label, sigma in peaks.atoms.items():
            _add(atoms, [label, *extra], sigma)
        for rank, peak in enumerate(peaks.new_peaks, start=1):
            _add(new, [str(rank), *extra], peak.sigma)
    yield from (atoms, new)
