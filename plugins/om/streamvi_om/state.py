"""What the OM bridge learns from successive ``omdata`` messages.

OM's crystallography monitor (``om.processing_layer.crystallography``, OM 23.x) broadcasts, every
``data_broadcast_interval`` events, a map holding among others::

    timestamp                   Unix time of the latest event, s
    hit_rate_timestamp_history  deque of the last 5,000 event timestamps (zeros before the first)
    hit_rate_history            deque of the running-average hit rate at each of them, percent
    beam_energy                 photon energy, eV
    detector_distance           detector distance, mm
    detector_distance_offset    offset added to it, m
    start_timestamp             when OM started, Unix s
    pump_probe_experiment       bool; then also the ``…_dark`` histories of laser-off events

The messages carry no event counters, so :class:`OmState` counts events by how far the
history moved between two messages (exact while fewer than 5,000 events pass between two
messages received), and estimates hits as the sum of the running-average hit fraction over
those events: that sum equals the number of hits except for the last
``running_average_window_size`` events, whose hits are only partly counted yet.
Virtual powder plot and peakogram images are ignored.
"""
from __future__ import annotations

import math
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np

#: Candidate alignments tried per message before the overlap counts as lost.
_MAX_CANDIDATES = 64


def _history(message: Mapping[str, Any], key: str) -> np.ndarray | None:
    value = message.get(key)
    if value is None:
        return None
    try:
        arr = np.asarray(list(value) if isinstance(value, deque) else value, dtype=np.float64)
    except (TypeError, ValueError):
        return None
    return arr if arr.ndim == 1 else None


def _number(message: Mapping[str, Any], key: str) -> float | None:
    value = message.get(key)
    if isinstance(value, bool) or value is None:
        return None
    try:
        x = float(value)
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) else None


def new_events(prev_t: np.ndarray | None, prev_r: np.ndarray | None, t: np.ndarray,
               r: np.ndarray) -> tuple[int, bool]:
    """Events added to a history since the previous message, and whether that is exact.

    ``t``/``r`` are the timestamp and hit-rate histories (equal length, oldest first, zero
    padded before the first event).  The count is the shift ``k`` that makes the new history
    continue the old one; without an overlap (more events than the history holds passed, or
    OM started again) it is the number of events the new history shows, a lower bound.
    """
    valid = t != 0
    if prev_t is None or prev_r is None or prev_t.shape != t.shape or t.size == 0:
        # The first message: every event since OM started, if the padding is still there.
        return int(valid.sum()), bool(t.size and not valid.all())
    n = t.size
    candidates = np.nonzero((t == prev_t[-1]) & (r == prev_r[-1]))[0][::-1]
    for j in candidates[:_MAX_CANDIDATES]:
        k = n - 1 - int(j)
        if np.array_equal(t[:n - k], prev_t[k:]) and np.array_equal(r[:n - k], prev_r[k:]):
            return k, True
    return int(valid.sum()), False


@dataclass
class _Series:
    """One hit-rate history (all events, or the laser-off ones in pump-probe runs)."""

    t: np.ndarray | None = None
    r: np.ndarray | None = None
    events: int = 0
    hits: float = 0.0

    def update(self, t: np.ndarray | None, r: np.ndarray | None) -> bool:
        """Take the next history; returns whether the events were counted exactly."""
        if t is None or r is None or t.shape != r.shape:
            return True
        k, exact = new_events(self.t, self.r, t, r)
        recent = r[t.size - k:] if exact else r[t != 0]
        self.events += k
        self.hits += float(recent.sum()) / 100.0
        self.t, self.r = t, r
        return exact

    def latest(self) -> float | None:
        """Hit rate of the latest event, as a fraction (OM shows percent)."""
        if self.t is None or self.r is None or not (self.t != 0).any():
            return None
        return float(self.r[-1]) / 100.0


@dataclass
class OmState:
    """Running summary of an OM monitor's broadcasts (not thread-safe; the bridge locks).

    Parameters
    ----------
    history_points
        Events of the hit-rate history kept for plots (the latest ones).
    """

    history_points: int = 600
    messages: int = 0
    malformed: int = 0
    restarts: int = 0
    counts_exact: bool = True
    received_at: float | None = None
    timestamp: float | None = None
    start_timestamp: float | None = None
    beam_energy_eV: float | None = None
    detector_distance_mm: float | None = None
    detector_distance_offset_m: float | None = None
    pump_probe: bool = False
    light: _Series = field(default_factory=_Series)
    dark: _Series = field(default_factory=_Series)

    def update(self, message: Mapping[str, Any], *, now: float | None = None) -> None:
        """Take one ``omdata`` message."""
        start = _number(message, "start_timestamp")
        if start is not None and self.start_timestamp is not None and start != self.start_timestamp:
            # OM started again: its histories begin anew, the counts go on.
            self.restarts += 1
            self.light.t = self.light.r = self.dark.t = self.dark.r = None
        self.start_timestamp = start if start is not None else self.start_timestamp
        self.messages += 1
        self.received_at = time.time() if now is None else now
        for attr, key in (("timestamp", "timestamp"), ("beam_energy_eV", "beam_energy"),
                          ("detector_distance_mm", "detector_distance"),
                          ("detector_distance_offset_m", "detector_distance_offset")):
            value = _number(message, key)
            if value is not None:
                setattr(self, attr, value)
        self.pump_probe = bool(message.get("pump_probe_experiment", False))
        exact = self.light.update(_history(message, "hit_rate_timestamp_history"),
                                  _history(message, "hit_rate_history"))
        if self.pump_probe:
            exact &= self.dark.update(_history(message, "hit_rate_timestamp_history_dark"),
                                      _history(message, "hit_rate_history_dark"))
        self.counts_exact &= exact

    @property
    def events(self) -> int:
        """Events OM processed, as seen through its broadcasts."""
        return self.light.events + self.dark.events

    @property
    def hits(self) -> float:
        """Estimated hits among :attr:`events` (see the module notes)."""
        return self.light.hits + self.dark.hits

    def history(self) -> dict[str, list[float]]:
        """The latest events' timestamps (Unix s) and hit rates (fractions), oldest first."""
        t, r = self.light.t, self.light.r
        if t is None or r is None:
            return {"timestamp": [], "hit_rate": []}
        keep = np.nonzero(t != 0)[0][-self.history_points:]
        return {"timestamp": t[keep].tolist(), "hit_rate": (r[keep] / 100.0).tolist()}

    def to_dict(self) -> dict[str, Any]:
        """JSON-able summary (see :meth:`streamvi_om.OmBridge.snapshot`)."""
        return {
            "messages": self.messages, "malformed": self.malformed, "restarts": self.restarts,
            "events": self.events, "hits": round(self.hits, 6),
            "counts_exact": self.counts_exact,
            "hit_rate": self.light.latest(),
            "hit_rate_dark": self.dark.latest() if self.pump_probe else None,
            "timestamp": self.timestamp, "start_timestamp": self.start_timestamp,
            "received_at": self.received_at,
            "beam_energy_eV": self.beam_energy_eV,
            "detector_distance_mm": self.detector_distance_mm,
            "detector_distance_offset_m": self.detector_distance_offset_m,
            "pump_probe": self.pump_probe,
            "history": self.history(),
        }
