"""The reflection store: every accepted reflection, columnar, ready to be batched by image.

Reflections are appended image by image (one image = one crystal = one wire message) into
growable columns on the training device; once ``device_budget_bytes`` is used, later images
go to a host-memory tier (pinned when the device is CUDA) and are copied over per batch.
Per-image bookkeeping (arrival time, visits, half-dataset) lives in numpy on the host.

What is merged (docs/operations.md, "What the counters mean"): a crystal is stored once.
A crystal whose identity ``(run, image, crystal)`` *or* content (a hash of its h, k, l, I,
sigI and cell: the same crystal sent again under another file name) is already stored is a
duplicate.  A crystal that is not this crystal form or not sound is refused with a reason,
and a refused crystal does not claim its identity, so a sound one sent under it later is
merged:

- ``cell_mismatch``: its cell differs from the merge's by more than the tolerances
  (:func:`streamvi.symmetry.cell_mismatch`: 5 % in a length, 5° in an angle);
- ``intensity_outlier``: its intensities are absurd against the crystals stored so far
  (:meth:`ReflectionStore.intensity_verdicts`);
- ``outside_table``: none of its reflections is in the table (beyond dmin, absences);
- ``unknown_condition``: the store merges named conditions (pump–probe: ``dark``,
  ``light``, …) and the crystal's ``condition`` is not one of them.

Conditions (docs/time-resolved.md) are fixed when the store is made.  Each image keeps the
index of its condition, and the observation counts and the inverse-variance sums are kept
per condition as well (the posterior has three tables per condition; the KL weights and N
are per condition).  The pooled row statistics (``obs_count``, Σ I for the Wilson plot, the
half-set sums) describe the data of all conditions together, as the shared scale model and
Wilson prior do.  Without conditions (the default) a message's ``condition`` is ignored.
"""
from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import dataclass
from typing import Iterable, NamedTuple, Sequence

import numpy as np
import torch

from streamvi.merging.beyond import BeyondDmin
from streamvi.merging.features import (N_METADATA, reflection_metadata,
                                       reports_partiality_geometry)
from streamvi.merging.reach import ReachTally
from streamvi.merging.model.geometry import N_GEOMETRY, STATE_WIDTH, lattice_axes
from streamvi.merging.model.batch import Batch
from streamvi.symmetry import (CELL_ANGLE_TOLERANCE_DEG, CELL_LENGTH_TOLERANCE,
                               ReciprocalSpace, cell_mismatch, dhkl)
from streamvi.wire import CrystalMessage

log = logging.getLogger(__name__)

#: Reasons a crystal is not stored (besides being a duplicate); the service counts them as
#: ``crystals_rejected{reason}``.
REJECT_REASONS = ("cell_mismatch", "intensity_outlier", "outside_table", "unknown_condition")
#: A crystal whose median |I| exceeds this many times the reference (the median of that
#: figure over the crystals stored recently) is refused.  Crystal sizes and partialities
#: spread real crystals over one to two decades (simulated beamtime: 3.0-6.9; 5-HT2B at
#: LCLS: 82-227); a crystal a thousand times brighter than the typical one is a unit or
#: encoding error, and one such crystal set the intensity scale of a whole run (issue 18).
INTENSITY_OUTLIER_RATIO = 1000.0
#: ... and one whose median I is below −(this) × the reference: noise-only crystals have a
#: median I near zero, never ten typical intensities below it.
NEGATIVE_INTENSITY_RATIO = 10.0
#: Fewest crystals (stored recently plus those being added) to judge intensities against.
MIN_INTENSITY_REFERENCE = 3
#: Crystals' median |I| kept for the reference (the most recent ones stored).
INTENSITY_REFERENCE_SIZE = 1024
#: Distinct run names remembered for the MTZ's crystal and dataset names.
MAX_RUNS_KEPT = 64


def content_key(msg: CrystalMessage) -> int:
    """A 128-bit hash of a crystal's content: h, k, l, I, sigI and cell.

    Two messages with the same key carry the same measurement, whatever their identity
    says (a stream sent again under another file name).
    """
    digest = hashlib.blake2b(digest_size=16)
    for a, dtype in ((msg.h, "<i4"), (msg.k, "<i4"), (msg.l, "<i4"), (msg.I, "<f4"),
                     (msg.sigI, "<f4")):
        digest.update(np.ascontiguousarray(a, dtype=dtype).data)
    digest.update(np.asarray(msg.cell, dtype="<f8").tobytes())
    return int.from_bytes(digest.digest(), "little")


def image_half(run: str, image: str) -> int:
    """Half-dataset (0 or 1) of an image: a stable hash of (run, image).

    Every crystal of one image lands in the same half, and the split does not depend on
    arrival order, process or Python's hash seed.
    """
    digest = hashlib.blake2b(f"{run}\x00{image}".encode(), digest_size=8).digest()
    return digest[0] & 1


class _Kept(NamedTuple):
    """One arriving crystal's reflections inside the table (``k``: its place in the call)."""

    k: int
    ids: np.ndarray
    iobs: np.ndarray
    sigiobs: np.ndarray
    metadata: np.ndarray
    n_outside: int
    #: ``(3, 3)`` reciprocal basis (rows a*, b*, c*), NaN without an orientation
    basis: np.ndarray


@dataclass
class AddResult:
    """What :meth:`ReflectionStore.add` did with one crystal."""

    image_id: int | None
    n_kept: int
    n_outside: int
    duplicate: bool = False
    #: ``"identity"`` (same run, image, crystal) or ``"content"`` (same data) for duplicates
    duplicate_kind: str | None = None
    #: why the crystal was not stored (one of :data:`REJECT_REASONS`); None otherwise
    rejected: str | None = None
    #: what was wrong, for the log and the dead-letter file
    detail: str = ""


class _Columns:
    """Growable columnar reflection arrays on one device."""

    def __init__(self, device: torch.device, n_ops: int, n_metadata: int, capacity: int,
                 pin: bool = False):
        self.device = device
        self.n = 0
        self._pin = pin
        self.asu_id = self._empty((n_ops, capacity), torch.int64)
        self.iobs = self._empty((capacity,), torch.float32)
        self.sigiobs = self._empty((capacity,), torch.float32)
        self.metadata = self._empty((capacity, n_metadata), torch.float32)

    def _empty(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        t = torch.empty(shape, dtype=dtype, device=self.device)
        return t.pin_memory() if self._pin else t

    @property
    def capacity(self) -> int:
        return int(self.iobs.shape[0])

    def nbytes_per_row(self) -> int:
        return 8 * self.asu_id.shape[0] + 4 + 4 + 4 * self.metadata.shape[1]

    def _grow(self, need: int) -> None:
        cap = max(self.capacity * 2, need)

        def grown(old: torch.Tensor, dim: int) -> torch.Tensor:
            shape = list(old.shape)
            shape[dim] = cap
            new = self._empty(tuple(shape), old.dtype)
            new.narrow(dim, 0, self.n).copy_(old.narrow(dim, 0, self.n))
            return new

        self.asu_id = grown(self.asu_id, 1)
        self.iobs = grown(self.iobs, 0)
        self.sigiobs = grown(self.sigiobs, 0)
        self.metadata = grown(self.metadata, 0)

    def append(self, asu_id: np.ndarray, iobs: np.ndarray, sigiobs: np.ndarray,
               metadata: np.ndarray) -> int:
        m = iobs.shape[0]
        if self.n + m > self.capacity:
            self._grow(self.n + m)
        start = self.n
        sl = slice(start, start + m)
        if self.device.type == "cuda":
            # two staged copies (one per dtype) instead of four waits on the device
            (ids,) = _to_device([asu_id], torch.int64, self.device)
            i_t, s_t, meta_t = _to_device([iobs, sigiobs, metadata], torch.float32,
                                          self.device)
        else:
            ids, i_t, s_t, meta_t = (torch.from_numpy(a) for a in (asu_id, iobs, sigiobs,
                                                                    metadata))
        self.asu_id[:, sl].copy_(ids)
        self.iobs[sl].copy_(i_t)
        self.sigiobs[sl].copy_(s_t)
        self.metadata[sl].copy_(meta_t)
        self.n += m
        return start


class RejectedStatistics(NamedTuple):
    """The row statistics of the images a merge leaves out as misfits
    (:meth:`ReflectionStore.rejected_statistics`)."""

    #: ``(n_conditions, 3, n_rows)`` observations: all images, half 1, half 2
    obs_count: np.ndarray
    #: ``(n_conditions, n_rows)`` Σ 1/σ² and Σ I/σ² of their observations
    sum_w: np.ndarray
    sum_wi: np.ndarray


class ReflectionStore:
    """All accepted reflections, mapped to rows of a :class:`ReciprocalSpace`.

    Parameters
    ----------
    space
        The unique-reflection table (space group, cell, dmin, anomalous mode).
    device
        Training device; the first tier of the store lives there.
    device_budget_bytes
        Bytes of reflection data kept on ``device`` before further images go to host
        memory.  ``None``: no limit.
    conditions
        Names of the conditions merged side by side (e.g. ``("dark", "light")``); a crystal
        whose message names another (or none) is refused (``unknown_condition``).  None: one
        unlabelled condition, every crystal's ``condition`` ignored.
    spare_conditions
        With ``conditions``, how many further conditions may appear mid-run: the first
        crystal stored with a name not yet known takes the next free table set (its name
        joins :attr:`conditions`), until all are taken; later new names are refused
        (``unknown_condition``).
    """

    def __init__(self, space: ReciprocalSpace, *, device: torch.device | str = "cpu",
                 device_budget_bytes: int | None = None, initial_capacity: int = 1 << 16,
                 kl_per_pass: bool = True, conditions: Sequence[str] | None = None,
                 spare_conditions: int = 0):
        self.space = space
        if conditions is not None and (len(conditions) == 0
                                       or len(set(conditions)) != len(conditions)
                                       or not all(isinstance(c, str) and c for c in conditions)):
            raise ValueError(f"conditions {tuple(conditions)!r} must be distinct non-empty "
                             "names, at least one (or None: one unlabelled condition)")
        if spare_conditions < 0 or (spare_conditions and conditions is None):
            raise ValueError(f"spare_conditions = {spare_conditions}: must be 0, or positive "
                             "with named conditions")
        #: the conditions' names in table order (None: one unlabelled condition); grows as
        #: new names take the spare table sets
        self.conditions: tuple[str, ...] | None = (None if conditions is None
                                                   else tuple(conditions))
        #: table sets: the named conditions and the spare ones
        self.n_conditions = 1 if conditions is None else len(conditions) + int(spare_conditions)
        self._declared: tuple[str, ...] = () if conditions is None else tuple(conditions)
        self.kl_per_pass = kl_per_pass
        self.device = torch.device(device)
        self.n_ops = int(space.n_ops)
        self.device_budget_bytes = device_budget_bytes
        self._tiers = [_Columns(self.device, self.n_ops, N_METADATA, initial_capacity)]
        self._host_tier: _Columns | None = None
        n0 = 1024
        self.image_tier = np.zeros(n0, np.int8)
        self.image_start = np.zeros(n0, np.int64)
        self.image_length = np.zeros(n0, np.int64)
        self.image_half = np.zeros(n0, np.int8)
        #: index into :attr:`conditions` of each image's condition
        self.image_condition = np.zeros(n0, np.int16)
        #: the same on the training device, for the batches (several conditions only)
        self._condition_t = (torch.zeros(n0, dtype=torch.int64, device=self.device)
                             if self.n_conditions > 1 else None)
        self.arrival_time = np.zeros(n0, np.float64)
        self.first_visit_time = np.full(n0, np.nan)
        self.visits = np.zeros(n0, np.int64)
        #: the latest verdict of the trainer's misfit test (True: left out of the merge),
        #: kept on the training device so recording it costs the step no device→host copy
        self._rejected_t = torch.zeros(n0, dtype=torch.bool, device=self.device)
        #: bumped whenever a misfit verdict or an image's indexing setting is recorded: what
        #: :meth:`rejected_statistics` reads may have changed
        self.verdicts_version = 0
        #: the reindexing operator the trainer last chose per image (merohedral groups),
        #: on the training device like the verdicts; ``image_op`` is what the row statistics
        #: below were last counted under (:meth:`apply_settings`)
        self._image_op_t = torch.zeros(n0 if self.n_ops > 1 else 0, dtype=torch.int64,
                                       device=self.device)
        self.image_op = np.zeros(n0 if self.n_ops > 1 else 0, np.int64)
        #: each image's geometry refinement state (parameters, last gradient and curvature,
        #: update count; :mod:`streamvi.merging.model.geometry`), on the training device
        self._geometry_t = torch.zeros((n0, STATE_WIDTH), dtype=torch.float32,
                                       device=self.device)
        #: each image's reciprocal basis and its inverse
        #: (:func:`~streamvi.merging.model.geometry.lattice_axes`; zeros when the message has no
        #: orientation), which the axial dilations act through
        self._axes_t = torch.zeros((n0, 2, 3, 3), dtype=torch.float32, device=self.device)
        self.n_images = 0
        self.n_reflections = 0
        self.keys: dict[tuple[str, str, int], int] = {}
        #: stored crystals that report what the geometric partiality reads
        #: (:func:`~streamvi.merging.features.reports_partiality_geometry`; read by
        #: :func:`streamvi.merging.offline.partiality_advice`)
        self.n_geometry_images = 0
        #: I/σ of their observations beyond the reported geometry's reach and near full
        #: (:mod:`streamvi.merging.reach`): the partiality check's verdict before training
        self.reach = ReachTally(1.0 / float(space.dmin) ** 2)
        #: :func:`content_key` of every stored crystal → its image id
        self.content_keys: dict[int, int] = {}
        #: tolerances of the cell check (None: no check; :func:`~streamvi.symmetry.cell_mismatch`)
        self.cell_length_tolerance: float | None = CELL_LENGTH_TOLERANCE
        self.cell_angle_tolerance_deg: float | None = CELL_ANGLE_TOLERANCE_DEG
        #: ratio of the intensity check (None: no check; :meth:`intensity_verdicts`)
        self.intensity_outlier_ratio: float | None = INTENSITY_OUTLIER_RATIO
        self._levels = np.full(INTENSITY_REFERENCE_SIZE, np.nan)
        self._n_levels = 0
        #: stored crystals per run name (the first :data:`MAX_RUNS_KEPT` names)
        self.runs: dict[str, int] = {}
        #: crystals refused, by reason, and duplicates, by kind (for offline reports)
        self.rejected_counts: dict[str, int] = {}
        self.duplicate_counts: dict[str, int] = {}
        #: the reflections of arriving crystals beyond the table's dmin (counted, left out)
        self.beyond_dmin = BeyondDmin(space.dmin)
        self._wavelength_sum = 0.0
        #: observations per posterior row, all and per half: under the identity operator
        #: when an image arrives, then under the operator last chosen for it
        self.obs_count = np.zeros((3, space.n_unique), np.int64)
        #: obs_count mirrored on the training device, so a batch's KL weights are gathered
        #: there (no device→host copy of the batch's rows inside the training step)
        self._obs_count_t = torch.zeros((3, space.n_unique), dtype=torch.float32,
                                        device=self.device)
        #: Σ 1/σ² and Σ I/σ² per row: the inverse-variance merge behind ⟨I/σ(I)⟩, which
        #: describes the data themselves, whatever the model has learnt so far
        self.sum_w = np.zeros(space.n_unique, np.float64)
        self.sum_wi = np.zeros(space.n_unique, np.float64)
        #: Σ I per row (unweighted): the Wilson plot of the data
        self.sum_i = np.zeros(space.n_unique, np.float64)
        #: Σ I per row and half dataset: the half-set averages behind the training-free
        #: CC½ (:func:`streamvi.quality.stats.halfset_statistics`), which move only with the data
        self.sum_i_half = np.zeros((2, space.n_unique), np.float64)
        #: with several conditions, ``obs_count``, ``sum_w``, ``sum_wi`` and ``sum_i_half``
        #: per condition (``(C, 3, n)``, ``(C, n)``, ``(C, 2, n)``;
        #: :attr:`condition_obs_count`, :meth:`condition_sum_i_half`), and the counts
        #: mirrored on the device as ``(3C, n)`` (the rows of the posterior's tables)
        self._cond_obs = self._cond_obs_t = self._cond_w = self._cond_wi = None
        self._cond_i_half = None
        if self.n_conditions > 1:
            shape = (self.n_conditions, space.n_unique)
            self._cond_obs = np.zeros((self.n_conditions, 3, space.n_unique), np.int64)
            self._cond_obs_t = torch.zeros((3 * self.n_conditions, space.n_unique),
                                           dtype=torch.float32, device=self.device)
            self._cond_w = np.zeros(shape, np.float64)
            self._cond_wi = np.zeros(shape, np.float64)
            self._cond_i_half = np.zeros((self.n_conditions, 2, space.n_unique), np.float64)

    # ------------------------------------------------------------------ adding

    def _grow_images(self) -> None:
        for name in ("image_tier", "image_start", "image_length", "image_half",
                     "image_condition", "arrival_time", "first_visit_time", "visits"):
            old = getattr(self, name)
            new = np.full(old.shape[0] * 2, np.nan) if name == "first_visit_time" else \
                np.zeros(old.shape[0] * 2, old.dtype)
            new[: old.shape[0]] = old
            setattr(self, name, new)
        self._rejected_t = _doubled(self._rejected_t)
        if self._condition_t is not None:
            self._condition_t = _doubled(self._condition_t)
        self._geometry_t = _doubled(self._geometry_t)
        self._axes_t = _doubled(self._axes_t)
        if self.n_ops > 1:
            self._image_op_t = _doubled(self._image_op_t)
            self.image_op = np.concatenate([self.image_op, np.zeros_like(self.image_op)])

    def add(self, msg: CrystalMessage, *, arrival_time: float | None = None) -> AddResult:
        """Append one crystal's reflections (:meth:`add_many` of one)."""
        return self.add_many([msg], None if arrival_time is None else [arrival_time])[0]

    def add_many(self, msgs: Sequence[CrystalMessage],
                 arrival_times: Sequence[float] | None = None) -> list[AddResult]:
        """Append crystals' reflections, in order; one :class:`AddResult` per crystal.

        Reflections outside the table (beyond dmin, or systematic absences) are counted in
        ``n_outside`` and not stored.  A crystal whose (run, image, crystal) is already
        stored, or earlier in ``msgs``, is not stored again (``duplicate=True``).  The
        symmetry lookup, the row statistics and the copies to the device are done once for
        all of ``msgs``: adding a few hundred at a time costs about half as much per crystal
        as adding them one by one (docs/performance.md).
        """
        now = time.time()
        results: list[AddResult | None] = [None] * len(msgs)
        fresh: list[int] = []
        first_of: dict[tuple[str, str, int], int] = {}
        first_content: dict[int, int] = {}
        contents: dict[int, int] = {}
        repeats: list[tuple[int, int, str]] = []
        for k, msg in enumerate(msgs):
            key, content = msg.key, content_key(msg)
            contents[k] = content
            if key in self.keys:
                results[k] = AddResult(self.keys[key], 0, 0, duplicate=True,
                                       duplicate_kind="identity")
            elif content in self.content_keys:
                results[k] = AddResult(self.content_keys[content], 0, 0, duplicate=True,
                                       duplicate_kind="content")
            elif key in first_of:
                repeats.append((k, first_of[key], "identity"))
            elif content in first_content:
                repeats.append((k, first_content[content], "content"))
            else:
                first_of[key] = k
                first_content[content] = k
                fresh.append(k)
        levels: dict[int, float] = {}
        fresh = self._screen(msgs, fresh, results, levels)
        if fresh:
            hkl = [msgs[k].hkl() for k in fresh]
            bounds = np.cumsum([0] + [h.shape[0] for h in hkl])
            all_ids = self.space.lookup_ops(np.concatenate(hkl))        # (n_ops, n)
            # only a reflection without a row can lie beyond dmin: d of those alone
            out = all_ids[0] < 0
            self.beyond_dmin.add(dhkl(np.concatenate(hkl)[out], self.space.cell),
                                 np.concatenate([msgs[k].I for k in fresh])[out],
                                 np.concatenate([msgs[k].sigI for k in fresh])[out],
                                 in_table=int(out.size - out.sum()))
            self._append_crystals(msgs, arrival_times, now, fresh, all_ids, bounds, results,
                                  contents, levels)
        retry = []
        for k, first, kind in repeats:
            if results[first].rejected is None:
                results[k] = AddResult(results[first].image_id, 0, 0, duplicate=True,
                                       duplicate_kind=kind)
            else:               # a refused crystal claims nothing: judge the repeat itself
                retry.append(k)
        if retry:
            again = self.add_many([msgs[k] for k in retry],
                                  None if arrival_times is None
                                  else [arrival_times[k] for k in retry])
            for k, res in zip(retry, again):
                results[k] = res
            return self._tally(results, skip=set(retry))
        return self._tally(results)

    def _tally(self, results: list[AddResult], skip: set[int] = frozenset()) -> list[AddResult]:
        """Count refusals and duplicates (``skip``: results counted by a nested call)."""
        for k, res in enumerate(results):
            if k in skip:
                continue
            if res.rejected is not None:
                self.rejected_counts[res.rejected] = self.rejected_counts.get(res.rejected, 0) + 1
            elif res.duplicate:
                kind = res.duplicate_kind or "identity"
                self.duplicate_counts[kind] = self.duplicate_counts.get(kind, 0) + 1
        return results

    def is_stored(self, msg: CrystalMessage) -> bool:
        """Whether ``msg`` (by identity or by content) is stored already."""
        return self.duplicate_kind(msg) is not None

    def duplicate_kind(self, msg: CrystalMessage) -> str | None:
        """``"identity"`` or ``"content"`` when ``msg`` is stored already, else None.

        Safe to call from another thread than the one adding (ingest asks it before
        spooling): a crystal stored at that very moment may be reported as not stored yet,
        and is then recognised as a duplicate when it reaches :meth:`add_many`.
        """
        if msg.key in self.keys:
            return "identity"
        return "content" if content_key(msg) in self.content_keys else None

    def _screen(self, msgs: Sequence[CrystalMessage], fresh: list[int],
                results: list[AddResult | None], levels: dict[int, float]) -> list[int]:
        """``fresh`` without the crystals refused for their condition, cell or intensities
        (their results are set here); ``levels`` gets the median |I| of those kept."""
        if self.conditions is not None:
            kept = []
            # new names that may take a spare table set if their crystal is stored
            new: list[str] = []
            free = self.n_conditions - len(self.conditions)
            for k in fresh:
                name = msgs[k].condition
                if name in self.conditions or name in new:
                    kept.append(k)
                    continue
                if name and isinstance(name, str) and len(new) < free:
                    new.append(name)
                    kept.append(k)
                    continue
                what = "no condition" if not name else f"condition {name!r}"
                full = (f"; the {self.n_conditions - len(self.conditions_declared)} spare "
                        "table sets for new conditions are taken" if name and
                        self.n_conditions > len(self.conditions_declared) else "")
                results[k] = AddResult(None, 0, 0, rejected="unknown_condition", detail=(
                    f"{what}, not one of this merge's conditions "
                    f"({', '.join(self.conditions)}){full}; label every crystal with one of "
                    "them (--condition, or --condition-field with --condition-map), or allow "
                    "more new ones (new_conditions)"))
            fresh = kept
        if self.cell_length_tolerance is not None and self.cell_angle_tolerance_deg is not None:
            kept = []
            for k in fresh:
                why = cell_mismatch(msgs[k].cell, self.space.cell,
                                    length_tolerance=self.cell_length_tolerance,
                                    angle_tolerance_deg=self.cell_angle_tolerance_deg)
                if why is None:
                    kept.append(k)
                else:
                    results[k] = AddResult(None, 0, 0, rejected="cell_mismatch", detail=(
                        f"cell {_cell_text(msgs[k].cell)} is not the merge's "
                        f"{_cell_text(self.space.cell.parameters)}: {why}; a crystal of "
                        "another form, or a wrong cell in the set-up (set cell, or "
                        "cell_length_tolerance / cell_angle_tolerance)"))
            fresh = kept
        levels.update((k, _level(msgs[k])) for k in fresh)
        if self.intensity_outlier_ratio is None or not fresh:
            return fresh
        verdicts = self.intensity_verdicts([msgs[k] for k in fresh],
                                           [levels[k] for k in fresh])
        for k, why in zip(fresh, verdicts):
            if why is not None:
                results[k] = AddResult(None, 0, 0, rejected="intensity_outlier", detail=why)
        return [k for k, why in zip(fresh, verdicts) if why is None]

    def intensity_verdicts(self, msgs: Sequence[CrystalMessage],
                           levels: Sequence[float] | None = None) -> list[str | None]:
        """Why each crystal's intensities are absurd, or None where they are not.

        ``levels``: each crystal's median |I|, if known already.

        Each crystal is summarised by its median |I| (a robust level that any sign of
        intensity gives) and its median I.  The reference is the median of the levels of
        the last :data:`INTENSITY_REFERENCE_SIZE` crystals stored *and* of ``msgs``, so one
        crystal counts as one crystal and cannot move it, even when it comes first: the
        service collects its first crystals before it stores any (docs/operations.md).
        A crystal is absurd when its level exceeds :attr:`intensity_outlier_ratio` × the
        reference, or its median I is below −:data:`NEGATIVE_INTENSITY_RATIO` × the
        reference.  Fewer than :data:`MIN_INTENSITY_REFERENCE` crystals: nothing is judged.
        """
        level = np.array([_level(m) for m in msgs] if levels is None else levels, np.float64)
        pool = np.concatenate([self._levels[: min(self._n_levels, self._levels.shape[0])],
                               level[np.isfinite(level)]])
        if pool.shape[0] < MIN_INTENSITY_REFERENCE:
            return [None] * len(msgs)
        ref = float(np.median(pool))
        ratio = float(self.intensity_outlier_ratio or np.inf)
        out: list[str | None] = []
        for m, lv in zip(msgs, level):
            if not np.isfinite(lv) or ref <= 0 or lv <= NEGATIVE_INTENSITY_RATIO * ref:
                # |median I| <= median |I|: below that level the median I cannot be absurd
                out.append(None)
            elif lv > ratio * ref:
                out.append(f"median |I| {lv:.4g} is {lv / ref:.3g} times the median of the "
                           f"crystals' ({ref:.4g}; more than {ratio:g} times is refused): a "
                           "unit or encoding error in the producer")
            elif (mid := float(np.median(m.I))) < -NEGATIVE_INTENSITY_RATIO * ref:
                out.append(f"median I {mid:.4g} is below -{NEGATIVE_INTENSITY_RATIO:g} times "
                           f"the crystals' median |I| ({ref:.4g}): intensities of the wrong "
                           "sign or a background subtraction gone wrong in the producer")
            else:
                out.append(None)
        return out

    def mean_wavelength(self) -> float | None:
        """Mean wavelength of the stored crystals, Å (None before any)."""
        return self._wavelength_sum / self.n_images if self.n_images else None

    def _append_crystals(self, msgs: Sequence[CrystalMessage],
                         arrival_times: Sequence[float] | None, now: float, fresh: list[int],
                         all_ids: np.ndarray, bounds: np.ndarray,
                         results: list[AddResult | None], contents: dict[int, int],
                         levels: dict[int, float]) -> None:
        """The work of :meth:`add_many` for crystals not stored yet (``fresh``)."""
        kept: list[_Kept] = []
        for j, k in enumerate(fresh):
            msg = msgs[k]
            ids = all_ids[:, bounds[j]:bounds[j + 1]]
            keep = ids[0] >= 0
            n_outside = int((~keep).sum())
            if not keep.any():
                results[k] = AddResult(None, 0, n_outside, rejected="outside_table", detail=(
                    f"none of its {len(msg)} reflections is in the table (beyond dmin "
                    f"{self.space.dmin:g} Å or systematically absent in "
                    f"{self.space.space_group.hm})"))
                continue
            ids = ids[:, keep]
            # a reindexed index can fall outside the table where the identity is inside;
            # point it at the identity row so it is merely an unlikely choice, never an error
            bad = ids < 0
            if bad.any():
                ids = np.where(bad, ids[0][None, :], ids)
            basis = (np.array([msg.astar, msg.bstar, msg.cstar], np.float64)
                     if msg.has_orientation() else np.full((3, 3), np.nan))
            kept.append(_Kept(k, ids, np.asarray(msg.I[keep], np.float32),
                              np.asarray(msg.sigI[keep], np.float32),
                              reflection_metadata(msg)[keep], n_outside, basis))
        if not kept:
            return
        lengths = np.array([c.iobs.shape[0] for c in kept], np.int64)
        ends = np.cumsum(lengths)
        ids = np.ascontiguousarray(np.concatenate([c.ids for c in kept], axis=1), np.int64)
        iobs = np.concatenate([c.iobs for c in kept])
        sigiobs = np.concatenate([c.sigiobs for c in kept])
        metadata = np.concatenate([c.metadata for c in kept])
        geometry = np.array([reports_partiality_geometry(msgs[c.k]) for c in kept])
        if geometry.any():
            mine = np.repeat(geometry, lengths)
            self.reach.add(metadata[mine], iobs[mine], sigiobs[mine], int(geometry.sum()))
        # the tier of each crystal, as if they came one at a time: the device's first, then
        # the host's, so each tier takes one contiguous run of the crystals
        tiers = np.array(self._plan_tiers(lengths.tolist()), np.int8)
        starts = np.zeros(len(kept), np.int64)
        for t in np.unique(tiers):
            mine = np.nonzero(tiers == t)[0]
            lo, hi = ends[mine[0]] - lengths[mine[0]], ends[mine[-1]]
            first = self._tiers[t].append(ids[:, lo:hi], iobs[lo:hi], sigiobs[lo:hi],
                                          metadata[lo:hi])
            starts[mine] = first + (ends[mine] - lengths[mine] - lo)
        n_new = len(kept)
        while self.n_images + n_new > self.image_start.shape[0]:
            self._grow_images()
        image_ids = np.arange(self.n_images, self.n_images + n_new)
        halves = np.array([image_half(msgs[c.k].run, msgs[c.k].image) for c in kept], np.int8)
        if self.conditions is not None:
            self._bind_conditions(msgs[c.k].condition for c in kept)
        conds = (np.zeros(n_new, np.int64) if self.conditions is None else
                 np.array([self.conditions.index(msgs[c.k].condition) for c in kept], np.int64))
        self.image_condition[image_ids] = conds
        if self._condition_t is not None:
            (conds_t,) = _to_device([conds], torch.int64, self.device)
            self._condition_t[self.n_images:self.n_images + n_new] = conds_t
        self.image_tier[image_ids] = tiers
        self.image_start[image_ids] = starts
        self.image_length[image_ids] = lengths
        self.image_half[image_ids] = halves
        self.arrival_time[image_ids] = (
            now if arrival_times is None else [arrival_times[c.k] for c in kept])
        (axes,) = _to_device([lattice_axes(np.stack([c.basis for c in kept]))], torch.float32,
                             self.device)
        self._axes_t[self.n_images:self.n_images + n_new] = axes
        self.n_images += n_new
        self.n_reflections += int(ends[-1])
        for i, c in zip(image_ids, kept):
            msg = msgs[c.k]
            self.keys[msg.key] = int(i)
            self.content_keys[contents[c.k]] = int(i)
            results[c.k] = AddResult(int(i), c.iobs.shape[0], c.n_outside)
            self._remember(msg, levels[c.k])
            self.n_geometry_images += reports_partiality_geometry(msg)
        rows = ids[0]
        half_of = np.repeat(halves.astype(np.int64), lengths)
        # rows of table 0 and of each crystal's half, as flat indices into obs_count
        flat = np.concatenate([rows, (1 + half_of) * self.space.n_unique + rows])
        np.add.at(self.obs_count.reshape(-1), flat, 1)
        (flat_t,) = _to_device([flat], torch.int64, self.device)
        self._obs_count_t.view(-1).index_add_(
            0, flat_t, torch.ones(flat.shape[0], dtype=torch.float32, device=self.device))
        # values in the tables' float64: np.add.at takes under 5 ns per index then, and
        # 47-95 ns when it has to convert float32 values (numpy 2.4, measured here)
        w = 1.0 / np.square(sigiobs, dtype=np.float64)
        np.add.at(self.sum_w, rows, w)
        np.add.at(self.sum_wi, rows, w * iobs)
        np.add.at(self.sum_i, rows, iobs.astype(np.float64))
        np.add.at(self.sum_i_half.reshape(-1), half_of * self.space.n_unique + rows,
                  iobs.astype(np.float64))
        if self._cond_obs is not None:
            self._count_conditions(rows, half_of, np.repeat(conds, lengths), w, iobs, 1)

    def _count_conditions(self, rows: np.ndarray, half: np.ndarray, cond: np.ndarray,
                          w: np.ndarray, iobs: np.ndarray, sign: int) -> None:
        """Add (``sign`` 1) or take away (−1) observations from the per-condition counts
        and inverse-variance sums (``rows``, ``half``, ``cond``, ``w`` = 1/σ², ``iobs`` per
        observation)."""
        n_u = self.space.n_unique
        flat = np.concatenate([(3 * cond) * n_u + rows, (3 * cond + 1 + half) * n_u + rows])
        np.add.at(self._cond_obs.reshape(-1), flat, sign)
        (flat_t,) = _to_device([flat], torch.int64, self.device)
        self._cond_obs_t.view(-1).index_add_(0, flat_t, torch.full(
            (flat.shape[0],), float(sign), dtype=torch.float32, device=self.device))
        np.add.at(self._cond_w.reshape(-1), cond * n_u + rows, sign * w)
        np.add.at(self._cond_wi.reshape(-1), cond * n_u + rows,
                  sign * w * np.asarray(iobs, np.float64))
        np.add.at(self._cond_i_half.reshape(-1), (2 * cond + half) * n_u + rows,
                  sign * np.asarray(iobs, np.float64))

    def _bind_conditions(self, names: Iterable[str]) -> None:
        """Give every name not known yet the next spare table set, in order (the screen
        kept only as many new names as there are spare sets)."""
        for name in names:
            if name not in self.conditions:
                if len(self.conditions) >= self.n_conditions:
                    raise RuntimeError(f"no spare table set left for condition {name!r}")
                self.conditions = (*self.conditions, name)
                log.warning("new condition %r merged from image %d on, in table set %d of %d "
                            "(%d spare left)", name, self.n_images, len(self.conditions),
                            self.n_conditions, self.n_conditions - len(self.conditions))

    @property
    def conditions_declared(self) -> tuple[str, ...]:
        """The conditions named when the store was made (empty without conditions)."""
        return self._declared

    @property
    def condition_obs_count(self) -> np.ndarray:
        """``(n_conditions, 3, n_rows)`` observations per row of each condition (all
        images, half 1, half 2); ``obs_count[None]`` with one condition."""
        return self.obs_count[None] if self._cond_obs is None else self._cond_obs

    def condition_sum_i_half(self, condition: int) -> np.ndarray:
        """``(2, n_rows)`` Σ I per row and half of one condition's images (the pooled
        :attr:`sum_i_half` with one condition): with :attr:`condition_obs_count`, the
        condition's training-free half-set averages."""
        if self._cond_i_half is None:
            return self.sum_i_half
        return self._cond_i_half[condition]

    def condition_images(self) -> np.ndarray:
        """``(n_conditions,)`` images stored per condition."""
        return np.bincount(self.image_condition[: self.n_images].astype(np.int64),
                           minlength=self.n_conditions)

    def condition_i_over_sigma(self, condition: int,
                               leave_out: "RejectedStatistics | None" = None) -> np.ndarray:
        """Per row I/σ(I) of the inverse-variance average of one condition's observations
        (0 if unseen); :meth:`merged_i_over_sigma` with one condition.  ``leave_out``: the
        sums of observations to take away first (the misfit images',
        :meth:`rejected_statistics`)."""
        if self._cond_w is None:
            sw, swi = self.sum_w, self.sum_wi
        else:
            sw, swi = self._cond_w[condition], self._cond_wi[condition]
        seen = sw > 0
        if leave_out is not None:
            sw = sw - leave_out.sum_w[condition]
            swi = swi - leave_out.sum_wi[condition]
            # by the counts: a row all of whose observations went keeps a rounding residue
            seen = (self.condition_obs_count[condition][0]
                    - leave_out.obs_count[condition][0]) > 0
        with np.errstate(invalid="ignore", divide="ignore"):
            out = swi / np.sqrt(sw)
        return np.where(seen, out, 0.0)

    def _remember(self, msg: CrystalMessage, level: float) -> None:
        """Keep what the intensity reference (``level``: median |I|) and the MTZ header need
        of a stored crystal."""
        if np.isfinite(level):
            self._levels[self._n_levels % self._levels.shape[0]] = level
            self._n_levels += 1
        self._wavelength_sum += msg.wavelength_A
        if msg.run in self.runs or len(self.runs) < MAX_RUNS_KEPT:
            self.runs[msg.run] = self.runs.get(msg.run, 0) + 1

    def _plan_tiers(self, lengths: list[int]) -> list[int]:
        """Tier of each of several crystals of ``lengths`` reflections, in arrival order:
        the device until ``device_budget_bytes`` is reached, then host memory for good."""
        if self.device_budget_bytes is None:
            return [0] * len(lengths)
        dev = self._tiers[0]
        n_dev = dev.n
        out = []
        for m in lengths:
            if self._host_tier is None and (n_dev + m) * dev.nbytes_per_row() \
                    <= self.device_budget_bytes:
                out.append(0)
                n_dev += m
            else:
                if self._host_tier is None:
                    self._host_tier = _Columns(torch.device("cpu"), self.n_ops, N_METADATA,
                                               1 << 16, pin=torch.cuda.is_available())
                    self._tiers.append(self._host_tier)
                out.append(1)
        return out

    # ------------------------------------------------------------------ batching

    def batch(self, image_ids: np.ndarray, device: torch.device | str | None = None) -> Batch:
        """The reflections of ``image_ids`` (in that order) as a ragged :class:`Batch`.

        The index arrays travel to a CUDA device in one asynchronous copy from pinned memory
        (:func:`_to_device`), so building a batch never waits for the device.
        """
        device = self.device if device is None else torch.device(device)
        image_ids = np.asarray(image_ids, dtype=np.int64)
        lengths = self.image_length[image_ids]
        picks: list[tuple[_Columns, np.ndarray]] = []
        order = []
        for t, tier in enumerate(self._tiers):
            sel = np.nonzero(self.image_tier[image_ids] == t)[0]
            if sel.size == 0:
                continue
            order.append(sel)
            picks.append((tier, _ranges(self.image_start[image_ids[sel]], lengths[sel])))
        perm_ids = image_ids[np.concatenate(order) if order else order]
        lengths = self.image_length[perm_ids]
        offsets = np.zeros(len(perm_ids) + 1, np.int64)
        np.cumsum(lengths, out=offsets[1:])
        image_index = np.repeat(np.arange(len(perm_ids), dtype=np.int64), lengths)
        half = self.image_half[perm_ids].astype(np.int64)
        # every index array bound for the batch's device in one copy; a host tier's
        # gather index stays on the host
        on_device = [i for i, (tier, _) in enumerate(picks) if tier.device == device]
        moved = _to_device([picks[i][1] for i in on_device]
                           + [image_index, offsets, half, perm_ids], torch.int64, device)
        idx_t = {i: moved[k] for k, i in enumerate(on_device)}
        image_index_t, offsets_t, half_t, perm_ids_t = moved[len(on_device):]
        parts = []
        for i, (tier, idx) in enumerate(picks):
            ix = idx_t[i] if i in idx_t else torch.from_numpy(idx).to(tier.device)
            cols = {
                "asu_id": tier.asu_id.index_select(1, ix),
                "iobs": tier.iobs.index_select(0, ix),
                "sigiobs": tier.sigiobs.index_select(0, ix),
                "metadata": tier.metadata.index_select(0, ix),
            }
            parts.append({k: v.to(device, non_blocking=True) for k, v in cols.items()})
        if len(parts) == 1:
            cols = parts[0]
        else:
            cols = {k: torch.cat([p[k] for p in parts], dim=1 if k == "asu_id" else 0)
                    for k in parts[0]}
        condition_t = None
        if self._condition_t is not None:
            condition_t = self._condition_t.index_select(0, perm_ids_t.to(self.device)).to(device)
        obs_weight = None
        if self.kl_per_pass:
            rows = cols["asu_id"][0]
            if condition_t is None:
                counts = self._obs_count_t.to(device)
                m = torch.stack([counts[0, rows], counts[1 + half_t[image_index_t], rows]])
            else:
                counts = self._cond_obs_t.to(device)
                full = 3 * condition_t[image_index_t]
                m = torch.stack([counts[full, rows],
                                 counts[full + 1 + half_t[image_index_t], rows]])
            obs_weight = 1.0 / m.clamp_min(1.0)
        return Batch(
            asu_id=cols["asu_id"], iobs=cols["iobs"], sigiobs=cols["sigiobs"],
            metadata=cols["metadata"],
            image_index=image_index_t,
            image_offsets=offsets_t,
            half=half_t,
            image_id=perm_ids_t,
            obs_weight=obs_weight,
            condition=condition_t,
            image_op=(self._image_op_t.index_select(0, perm_ids_t.to(self.device)).to(device)
                      if self.n_ops > 1 else None),
            geometry=self._geometry_t.index_select(0, perm_ids_t.to(self.device)).to(device),
            axes=self._axes_t.index_select(0, perm_ids_t.to(self.device)).to(device),
        )

    def statistics_changed(self) -> None:
        """Re-mirror ``obs_count`` on the device after it was changed from outside
        (data-parallel ranks merge their counts into it)."""
        self._obs_count_t.copy_(torch.from_numpy(self.obs_count.astype(np.float32)))

    def wilson_sigma(self, *, n_bins: int = 20, floor: float = 1e-3) -> np.ndarray | None:
        """Mean observed intensity per unit ε as a smooth function of resolution, per row.

        Binned in 1/d² with equal numbers of observations per bin and interpolated linearly;
        bins whose mean is not positive (weak high-resolution data) are clamped to
        ``floor`` × the largest bin mean.  None when nothing is stored yet.

        Returns
        -------
        numpy.ndarray
            ``(n_rows,)`` Σ in the units of the stored intensities.
        """
        cnt = self.obs_count[0].astype(np.float64)
        if cnt.sum() == 0:
            return None
        sp = self.space
        x = 1.0 / np.square(sp.d.astype(np.float64))
        seen = cnt > 0
        order = np.argsort(x[seen])
        xs = x[seen][order]
        cs = cnt[seen][order]
        ys = (self.sum_i[seen] / sp.epsilon[seen])[order]
        edges = np.searchsorted(np.cumsum(cs), np.linspace(0, cs.sum(), n_bins + 1)[1:-1])
        groups = np.split(np.arange(xs.shape[0]), edges)
        centres, means = [], []
        for g in groups:
            if g.size == 0 or cs[g].sum() == 0:
                continue
            centres.append(float(np.average(xs[g], weights=cs[g])))
            means.append(float(ys[g].sum() / cs[g].sum()))
        means_a = np.asarray(means)
        top = means_a.max() if means_a.size and means_a.max() > 0 else 1.0
        means_a = np.maximum(means_a, floor * top)
        return np.interp(x, np.asarray(centres), means_a)

    def merged_i_over_sigma(self) -> np.ndarray:
        """Per row I/σ(I) of the inverse-variance average of the observations (0 if unseen)."""
        with np.errstate(invalid="ignore", divide="ignore"):
            out = self.sum_wi / np.sqrt(self.sum_w)
        return np.where(self.sum_w > 0, out, 0.0)

    def mark_visited(self, image_ids: np.ndarray, now: float | None = None) -> np.ndarray:
        """Count a visit of each image; returns the arrival→first-visit lags (s) of images
        visited for the first time."""
        now = time.time() if now is None else now
        image_ids = np.asarray(image_ids, dtype=np.int64)
        np.add.at(self.visits, image_ids, 1)
        fv = self.first_visit_time[image_ids]
        first = np.isnan(fv)
        new_ids = np.unique(image_ids[first])
        self.first_visit_time[new_ids] = now
        return now - self.arrival_time[new_ids]

    def set_ops(self, image_ids: torch.Tensor, ops: torch.Tensor) -> None:
        """Record the reindexing operator the trainer chose for each image (``image_ids``
        and ``ops`` as in a :class:`Batch` and its :class:`StepReport`, on any device).

        The row statistics follow at the next :meth:`apply_settings`.
        """
        if self.n_ops > 1:
            self._image_op_t[image_ids.to(self.device)] = ops.to(self.device)

    def apply_settings(self) -> int:
        """Recount the row statistics of images whose chosen operator changed.

        ``obs_count`` (host and device), ``sum_w``, ``sum_wi``, ``sum_i`` and ``sum_i_half``
        move from the
        rows of the operator an image was counted under to those of the one last chosen for
        it, so N, completeness and ⟨I/σ⟩ describe the merge's own setting.  One copy of the
        per-image operators from the device; called before statistics are read.

        Returns
        -------
        int
            Images recounted.
        """
        n = self.n_images
        if self.n_ops == 1 or n == 0:
            return 0
        ops = self._image_op_t[:n].cpu().numpy()
        changed = np.nonzero(ops != self.image_op[:n])[0]
        if changed.size == 0:
            return 0
        for tier, ids, lengths, idx_t in self._tier_parts(changed):
            asu = tier.asu_id.index_select(1, idx_t).cpu().numpy()
            iobs = tier.iobs.index_select(0, idx_t).cpu().numpy().astype(np.float64)
            sig = tier.sigiobs.index_select(0, idx_t).cpu().numpy().astype(np.float64)
            cols = np.arange(idx_t.shape[0])
            old = asu[np.repeat(self.image_op[ids], lengths), cols]
            new = asu[np.repeat(ops[ids], lengths), cols]
            half = np.repeat(self.image_half[ids].astype(np.int64), lengths)
            w = 1.0 / np.square(sig)
            for rows, sign in ((old, -1), (new, 1)):
                np.add.at(self.obs_count[0], rows, sign)
                np.add.at(self.obs_count, (1 + half, rows), sign)
                np.add.at(self.sum_w, rows, sign * w)
                np.add.at(self.sum_wi, rows, sign * w * iobs)
                np.add.at(self.sum_i, rows, sign * iobs)
                np.add.at(self.sum_i_half, (half, rows), sign * iobs)
                rows_t = torch.from_numpy(rows).to(self.device)
                half_t = torch.from_numpy(1 + half).to(self.device)
                val = torch.full((rows.shape[0],), float(sign), device=self.device)
                self._obs_count_t[0].index_add_(0, rows_t, val)
                self._obs_count_t.index_put_((half_t, rows_t), val, accumulate=True)
                if self._cond_obs is not None:
                    cond = np.repeat(self.image_condition[ids].astype(np.int64), lengths)
                    self._count_conditions(rows, half, cond, w, iobs, sign)
        self.image_op[:n] = ops
        self.verdicts_version += 1
        return int(changed.size)

    def setting_counts(self) -> dict[str, int]:
        """Images per reindexing operator (as triplets) they were last counted under; empty
        when the space group has no indexing ambiguity.  As of the last
        :meth:`apply_settings` (each snapshot), so reading it costs no device copy."""
        if self.n_ops == 1:
            return {}
        from streamvi.symmetry import op_triplet

        counts = np.bincount(self.image_op[: self.n_images], minlength=self.n_ops)
        return {op_triplet(op): int(c) for op, c in zip(self.space.twin_ops, counts)}

    def _tier_parts(self, image_ids: np.ndarray):
        """Per storage tier, the given images it holds: ``(tier, ids, lengths, idx)`` with
        ``idx`` the positions of their observations in the tier (on its device)."""
        for t, tier in enumerate(self._tiers):
            ids = image_ids[self.image_tier[image_ids] == t]
            if ids.size:
                lengths = self.image_length[ids]
                idx = _ranges(self.image_start[ids], lengths)
                yield tier, ids, lengths, torch.from_numpy(idx).to(tier.device)

    def rejected_statistics(self) -> "RejectedStatistics":
        """What :attr:`condition_obs_count` and the inverse-variance sums behind
        :meth:`condition_i_over_sigma` hold of the images now left out as misfits, which
        the likelihood does not take: per condition and row, their observations (all images,
        half 1, half 2) and Σ1/σ², ΣI/σ² (rows of each image's current indexing setting, as
        :meth:`apply_settings` counted them).  Reads the rejected images' rows from the
        device."""
        n_c, n_u = self.n_conditions, self.space.n_unique
        out = RejectedStatistics(np.zeros((n_c, 3, n_u), np.int64), np.zeros((n_c, n_u)),
                                 np.zeros((n_c, n_u)))
        for tier, ids, lengths, idx_t in self._tier_parts(np.nonzero(self.image_rejected)[0]):
            asu = tier.asu_id.index_select(1, idx_t).cpu().numpy()
            iobs = tier.iobs.index_select(0, idx_t).cpu().numpy().astype(np.float64)
            sig = tier.sigiobs.index_select(0, idx_t).cpu().numpy().astype(np.float64)
            ops = self.image_op[ids] if self.n_ops > 1 else np.zeros(ids.size, np.int64)
            rows = asu[np.repeat(ops, lengths), np.arange(idx_t.shape[0])]
            half = np.repeat(self.image_half[ids].astype(np.int64), lengths)
            cond = np.repeat(self.image_condition[ids].astype(np.int64), lengths)
            first = 3 * cond
            # bincount: a few ns per observation, where np.add.at takes tens
            flat = np.concatenate([first * n_u + rows, (first + 1 + half) * n_u + rows])
            out.obs_count.reshape(-1)[:] += np.bincount(flat, minlength=out.obs_count.size)
            w = 1.0 / np.square(sig)
            where = cond * n_u + rows
            out.sum_w.reshape(-1)[:] += np.bincount(where, w, minlength=out.sum_w.size)
            out.sum_wi.reshape(-1)[:] += np.bincount(where, w * iobs, minlength=out.sum_wi.size)
        return out

    def set_geometry(self, image_ids: torch.Tensor, state: torch.Tensor) -> None:
        """Record each image's geometry refinement state after a step (``image_ids`` and
        ``state`` as in a :class:`Batch` and its :class:`~streamvi.merging.trainer.StepReport`)."""
        self._geometry_t[image_ids.to(self.device)] = state.to(self.device, torch.float32)

    @property
    def geometry(self) -> np.ndarray:
        """``(n_images, N_GEOMETRY)`` refined geometry parameters per image, in prior-σ units
        (rotation about x, y, z; dilation); zeros for images not yet refined."""
        return self._geometry_t[: self.n_images, :N_GEOMETRY].cpu().numpy()

    def geometry_totals(self) -> tuple[int, np.ndarray]:
        """Images refined at least once, and the sum over stored images of the squared
        parameters (``(N_GEOMETRY,)``, prior-σ units).  Reduced on the device, so a reader
        copies seven numbers, not the state."""
        state = self._geometry_t[: self.n_images].double()
        totals = torch.cat([(state[:, -1] > 0).sum().reshape(1).double(),
                            state[:, :N_GEOMETRY].square().sum(0)]).cpu().numpy()
        return int(totals[0]), totals[1:]

    def geometry_state(self) -> torch.Tensor:
        """``(n_images, STATE_WIDTH)`` copy of the refinement state (checkpoints)."""
        return self._geometry_t[: self.n_images].cpu().clone()

    def set_rejected(self, image_ids: torch.Tensor, rejected: torch.Tensor) -> None:
        """Record the trainer's latest verdict on whether each image fits the merge
        (``image_ids`` and ``rejected`` as in a :class:`Batch`, on any device)."""
        self._rejected_t[image_ids.to(self.device)] = rejected.to(self.device)
        self.verdicts_version += 1

    @property
    def image_rejected(self) -> np.ndarray:
        """``(n_images,)`` bool: the latest verdict per image (True: left out)."""
        return self._rejected_t[: self.n_images].cpu().numpy()

    @property
    def n_rejected(self) -> int:
        """Images whose latest visit found them not to fit the merge."""
        return int(self._rejected_t[: self.n_images].sum())

    def first_visit_lags(self, n: int | None = None) -> np.ndarray:
        """Arrival → first training visit (s) of every image visited so far (of the first
        ``n`` images: readers outside the service lock pass the ``n_images`` they read)."""
        n = self.n_images if n is None else int(n)
        fv = self.first_visit_time[:n]
        at = self.arrival_time[:n]
        seen = ~np.isnan(fv)
        return fv[seen] - at[seen]

    def bytes_used(self) -> dict[str, int]:
        """Bytes of reflection data per tier (``device`` and ``host``)."""
        out = {"device": 0, "host": 0}
        for t, tier in enumerate(self._tiers):
            out["device" if t == 0 else "host"] += tier.capacity * tier.nbytes_per_row()
        return out


def _level(msg: CrystalMessage) -> float:
    """A crystal's median |I| (NaN without reflections)."""
    return float(np.median(np.abs(msg.I))) if len(msg) else float("nan")


def _cell_text(cell) -> str:
    return "(" + ", ".join(f"{x:.4g}" for x in cell) + ")"


def _doubled(t: torch.Tensor) -> torch.Tensor:
    """``t`` with twice the rows, the new ones zero (per-image tables as the store grows)."""
    grown = torch.zeros((2 * t.shape[0],) + tuple(t.shape[1:]), dtype=t.dtype, device=t.device)
    grown[: t.shape[0]] = t
    return grown


def _to_device(arrays: list[np.ndarray], dtype: torch.dtype, device: torch.device, *,
               pack: bool | None = None) -> list[torch.Tensor]:
    """Host arrays as tensors of ``dtype`` on ``device``, each in its own shape.

    For a CUDA device they are packed into one pinned staging buffer and sent in one
    asynchronous copy: a copy from pageable memory makes the host wait for the device's
    stream first (five of them were five waits per training step, four more per arriving
    crystal).  Torch's pinned-memory allocator keeps the buffer until the copy has run.
    ``pack`` (default: on CUDA) packs without pinning elsewhere, for tests.
    """
    np_dtype = torch.empty(0, dtype=dtype).numpy().dtype
    arrays = [np.asarray(a, dtype=np_dtype) for a in arrays]
    if not (device.type == "cuda" if pack is None else pack):
        return [torch.from_numpy(np.ascontiguousarray(a)).to(device) for a in arrays]
    sizes = [a.size for a in arrays]
    staging = torch.empty(sum(sizes), dtype=dtype, pin_memory=device.type == "cuda")
    if sizes:
        np.concatenate([a.reshape(-1) for a in arrays], out=staging.numpy())
    moved = torch.split(staging.to(device, non_blocking=True), sizes)
    return [t.view(a.shape) for t, a in zip(moved, arrays)]


def _ranges(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Concatenation of ``arange(s, s + n)`` for each (s, n), vectorised."""
    total = int(lengths.sum())
    if total == 0:
        return np.zeros(0, np.int64)
    offsets = np.zeros(lengths.shape[0], np.int64)
    np.cumsum(lengths[:-1], out=offsets[1:])
    return np.repeat(starts - offsets, lengths) + np.arange(total, dtype=np.int64)
