"""Hooks that put an OM bridge into a running streamvi service.

The service calls :func:`attach_om` after it started and :func:`detach_om` when it stops;
:func:`om_status` adds an ``"om"`` map to its status (stats topic, ``/api/status``, status
page) and :func:`om_metric_families` adds the OM metrics to its Prometheus collector.  Each
takes the service object and reads only ``config.om_url``, ``config.om_allow_pickle``,
``counters`` and the ``om_bridge`` attribute that :func:`attach_om` sets.
"""
from __future__ import annotations

from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from streamvi_om.bridge import OmBridge


def attach_om(service: Any, *, url: str | None = None, allow_pickle: bool | None = None
              ) -> OmBridge | None:
    """Start a bridge to OM if ``om_url`` is set; stored as ``service.om_bridge``.

    Parameters
    ----------
    service
        The :class:`~streamvi.service.service.Service`.
    url, allow_pickle
        Override ``service.config.om_url`` / ``om_allow_pickle``.

    Raises
    ------
    ConfigError
        ``om_url`` is set but ``om_allow_pickle`` is not (the message says why), or the URL
        is unusable.
    """
    if url is None:
        url = getattr(service.config, "om_url", "") or ""
    if allow_pickle is None:
        allow_pickle = bool(getattr(service.config, "om_allow_pickle", False))
    service.om_bridge = None
    if not url:
        return None
    service.om_bridge = OmBridge(url, allow_pickle=allow_pickle).start()
    return service.om_bridge


def detach_om(service: Any) -> None:
    """Stop the service's bridge, if any."""
    bridge = getattr(service, "om_bridge", None)
    if bridge is not None:
        bridge.stop()
        service.om_bridge = None


def om_status(service: Any) -> dict[str, Any] | None:
    """The bridge's snapshot plus ``crystals_received`` and ``indexing_yield``; None if off."""
    bridge = getattr(service, "om_bridge", None)
    if bridge is None:
        return None
    out = bridge.snapshot()
    crystals = int(service.counters.snapshot()["crystals_received"])
    out["crystals_received"] = crystals
    out["indexing_yield"] = bridge.indexing_yield(crystals)
    return out


def om_metric_families(service: Any) -> list[Metric]:
    """OM metrics for the service's collector (an empty list when no bridge runs).

    ``streamvi_om_hit_rate`` (ratio 0–1, OM's running average at its latest event),
    ``streamvi_om_events_total``, ``streamvi_om_hits_total`` (estimated),
    ``streamvi_om_messages_total``, ``streamvi_om_last_message_timestamp_seconds`` and
    ``streamvi_indexing_yield`` (crystals received per OM hit).  Every family is announced
    once the bridge runs, with a sample once there is a value.
    """
    status = om_status(service)
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
