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

from streamvi.symmetry import ReciprocalSpace

if TYPE_CHECKING:
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

    @property
    def observed(self) -> np.ndarray:
        """Rows with at least one observation."""
        return self.obs_count[0] > 0


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

    @property
    def failure(self) -> str | None:
        """Why the service is failed (None: it is not)."""
        return self.status.get("failure")


class SnapshotSource(Protocol):
    """Where publishers get the service's state: called at each request or scrape.

    ``store``: also read the store's figures and the memory in use (``/metrics``); they
    need the service's lock for a moment.
    """

    def __call__(self, *, store: bool = False) -> ServiceSnapshot: ...
