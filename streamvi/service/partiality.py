"""The live merge's partiality check: when to restart ``serve`` with the geometric partiality.

``merge`` checks once, after its merge (:func:`streamvi.merging.offline.merge_crystals`,
change 19 of docs/model.md): a scales' trend that gives the amplitudes B below
:data:`~streamvi.merging.offline.PARTIALITY_CHECK_B` on enough crystals that report their
geometry is the mark of a stream that integrates reflections its partialities do not reach,
and it merges again with the geometric partiality.  The service cannot wait for an end; it
reads the trend at every snapshot and, once it has stayed suspect for
:data:`SWITCH_SNAPSHOTS` snapshots in a row, restarts its merge with the geometric
partiality from the spool (:meth:`streamvi.service.service.Service._switch_partiality`).
The trend of a fresh model starts near 0 and drifts as the scales learn: on such streams it
passes the bar and stays past it, and the run of snapshots keeps one noisy read from acting.
Before that, the data alone may say it (:mod:`streamvi.merging.reach`): once the observations
beyond the reported geometry's reach are many and carry no signal, the switch is made as soon
as the crystals that show it are stored (:meth:`PartialityWatch.observe_reach`, called after
each ingest batch), after the first hundred crystals rather than after the trend has grown.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Any

from streamvi.merging.offline import partiality_trend_suspect
from streamvi.merging.reach import (ReachEvidence, reach_history_line, reach_summary,
                                    reach_suspect)

#: consecutive snapshots whose trend is suspect before the service switches
SWITCH_SNAPSHOTS = 3


@dataclass(frozen=True)
class PartialitySwitch:
    """What the check saw when it switched the live merge to the geometric partiality."""

    #: B (Å²) the scales' trend gave the amplitudes at the last snapshot before the switch
    #: (None before the first record)
    falloff_b: float | None
    #: crystals that reported orientations, profile radii and a bandwidth by then
    crystals: int
    #: training step of the merge that was set aside
    step: int
    #: when (Unix s)
    time: float
    #: what decided it: ``"trend"`` (the scales' trend) or ``"reach"`` (the observations
    #: beyond the reported geometry's reach carry no signal)
    reason: str = "trend"
    #: with ``"reach"``: share of the observations beyond reach, and their mean I/σ over
    #: the near-full observations' (:class:`~streamvi.merging.reach.ReachEvidence`)
    share_beyond: float | None = None
    signal_ratio: float | None = None

    def history_line(self) -> str:
        """The MTZ history line of every snapshot after the switch (≤ 80 characters)."""
        if self.reason == "reach":
            return reach_history_line(self.share_beyond, self.signal_ratio)
        return (f"geometric partiality on: without it the scales' trend gave B "
                f"{self.falloff_b:+.1f} A^2")[:80]

    def reach_warning(self, where: str = "the spool") -> str:
        """The log line of a switch by the data's verdict (``reason == "reach"``): what was
        seen, and that the merge starts again from ``where``."""
        return (f"{reach_summary(self.share_beyond, self.crystals, self.signal_ratio)}. "
                f"Merging again, from {where}, with the geometric partiality (docs/model.md, "
                "change 26; partiality_check = false keeps the merge as it was)")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "PartialitySwitch":
        def opt(key):
            return None if d.get(key) is None else float(d[key])
        return cls(opt("falloff_b"), int(d["crystals"]), int(d["step"]), float(d["time"]),
                   str(d.get("reason", "trend")), opt("share_beyond"), opt("signal_ratio"))


class PartialityWatch:
    """Reads each snapshot's trend; says when the live merge should switch.

    Parameters
    ----------
    snapshots
        Consecutive suspect snapshots needed (:data:`SWITCH_SNAPSHOTS`).
    """

    def __init__(self, snapshots: int = SWITCH_SNAPSHOTS):
        if snapshots < 1:
            raise ValueError(f"snapshots = {snapshots}: give 1 or more")
        self.snapshots = snapshots
        self._run = 0

    def observe_reach(self, evidence: ReachEvidence, falloff_b: float | None, step: int
                      ) -> PartialitySwitch | None:
        """The data's own verdict (:func:`~streamvi.merging.reach.reach_suspect`) at training
        step ``step``: the switch to make now, or None.  It needs no run of snapshots: the
        tally only grows, and the verdict already asks for three standard errors."""
        if not reach_suspect(evidence):
            return None
        return PartialitySwitch(None if falloff_b is None else float(falloff_b),
                                evidence.crystals, int(step), time.time(), "reach",
                                evidence.share_beyond, evidence.signal_ratio)

    def observe(self, falloff_b: float | None, n_reporting: int, step: int
                ) -> PartialitySwitch | None:
        """One snapshot's trend (B in Å², None before the first record) on ``n_reporting``
        crystals that report the geometry, at training step ``step``: the switch to make
        now, or None."""
        if not partiality_trend_suspect(falloff_b, n_reporting):
            self._run = 0
            return None
        self._run += 1
        if self._run < self.snapshots:
            return None
        self._run = 0
        assert falloff_b is not None
        return PartialitySwitch(float(falloff_b), int(n_reporting), int(step), time.time())
