"""DIALS stills (``.refl`` + ``.expt``) as a streamvi source: one message per experiment.

Selection of the rows of experiment *i* (``id == i``, or the experiment whose identifier the
table maps ``i`` to): the integrated flag of the chosen intensity (``integrated_prf`` = bit 9
for profile fitting, ``integrated_sum`` = bit 8 for summation, as in DIALS'
``reflection_table.h``), then ``partiality >= min_partiality`` where the table has that
column.  Rows the wire rules would drop (non-finite I or σ, variance ≤ 0, hkl = 000) are
dropped here with the same reason labels and counted in
:attr:`~streamvi.wire.CrystalMessage.rows_rejected`, so per-row metadata stays aligned.

Frames.  DIALS' lab frame has the beam travelling along −z (s0 = −z/λ); streamvi's wire
format, like CrystFEL, has it along +z (k0 = (0, 0, 1/λ), see :mod:`streamvi.merging.features`).
Messages carry a*, b*, c* in that frame: DIALS' vectors rotated by :func:`beam_frame_rotation`,
which for a beam along −z is the 180° turn about y, (x, y, z) → (−x, y, −z) (y stays up).
Rotations keep lengths, so |q|, d and the Ewald offset |s0 + q| − 1/λ are those of DIALS.

Per reflection, besides the wire fields: DIALS' stills ``partiality`` travels as a float32
array map under the metadata key ``dials_partiality``, aligned with ``h``.  Other metadata
(all prefixed ``dials_``): ``experiment`` (index), ``experiment_identifier``, ``image_path``,
``image_index``, ``space_group``, ``intensity`` ("sum" or "profile"),
``half_mosaicity_deg`` and ``domain_size_A`` (the stills mosaicity model).
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np

from streamvi.errors import ConfigError, InputError, WireError
from streamvi.sources import Rejected, SourceItem
from streamvi.wire import CrystalMessage, array_map, from_wire_dict, to_wire_dict
from streamvi_dials.expt import Experiment, read_experiments
from streamvi_dials.refl import ReflectionTable, read_reflection_table

#: DIALS reflection flags (``dials/array_family/reflection_table.h``).
FLAG_INTEGRATED_SUM = 1 << 8
FLAG_INTEGRATED_PRF = 1 << 9

INTENSITY_KINDS = ("auto", "profile", "sum")
#: Intensity columns (value, variance) and integrated flag of each kind.
INTENSITY_COLUMNS = {
    "profile": ("intensity.prf.value", "intensity.prf.variance", FLAG_INTEGRATED_PRF),
    "sum": ("intensity.sum.value", "intensity.sum.variance", FLAG_INTEGRATED_SUM),
}

#: The columns a message is made of; the others are passed over unread.
COLUMNS_READ = frozenset(("miller_index", "id", "flags", "partiality", "xyzcal.px",
                          "xyzobs.px.value", "panel", "background.mean")
                         + tuple(c for kind in INTENSITY_COLUMNS.values() for c in kind[:2]))

#: Reasons of the :class:`Rejected` records this source emits (besides those of
#: :mod:`streamvi.wire` such as ``absurd_cell``).
REASONS = ("malformed_reflection_table", "malformed_experiment_list", "unreadable_file",
           "missing_column", "missing_crystal", "bad_crystal", "missing_beam", "bad_beam",
           "unknown_experiment", "no_reflections", "no_valid_reflections")
#: Reasons that mean a piece of the files could not be read (``malformed`` in summaries).
MALFORMED_REASONS = frozenset(("malformed_reflection_table", "malformed_experiment_list",
                               "unreadable_file", "missing_column", "missing_crystal",
                               "bad_crystal", "missing_beam", "bad_beam"))


@dataclass
class DialsCounts:
    """Totals of one pass over a DIALS table.

    Attributes
    ----------
    experiments
        Experiments in the ``.expt`` file.
    rows
        Rows of the reflection table.
    unindexed
        Rows with ``id`` < 0 (strong spots no lattice explained).
    reflections
        Integrated rows (of the chosen intensity) of usable experiments.
    below_min_partiality
        Of those, rows left out by ``min_partiality``.
    messages
        Crystal messages emitted.
    rejected
        Every :class:`Rejected` emitted, by reason.
    rows_rejected
        Rows dropped by the wire rules, by reason.
    """

    experiments: int = 0
    rows: int = 0
    unindexed: int = 0
    reflections: int = 0
    below_min_partiality: int = 0
    messages: int = 0
    rejected: dict[str, int] = field(default_factory=dict)
    rows_rejected: dict[str, int] = field(default_factory=dict)


def beam_frame_rotation(unit_s0: np.ndarray) -> np.ndarray:
    """Rotation taking DIALS' lab frame to streamvi's (beam along +z).

    Parameters
    ----------
    unit_s0
        Unit vector along the incident beam in DIALS' frame (−z for most files).

    Returns
    -------
    numpy.ndarray
        3 × 3 proper rotation ``R`` with ``R @ unit_s0 = (0, 0, 1)``: the 180° turn about y,
        then the smallest rotation that takes what is left of a tilted beam onto +z.
    """
    flip = np.diag([-1.0, 1.0, -1.0])
    v = flip @ (np.asarray(unit_s0, dtype=np.float64) / np.linalg.norm(unit_s0))
    axis = np.cross(v, [0.0, 0.0, 1.0])
    s, c = float(np.linalg.norm(axis)), float(v[2])
    if s < 1e-12:
        return flip if c > 0 else np.eye(3)
    k = axis / s
    kx = np.array([[0.0, -k[2], k[1]], [k[2], 0.0, -k[0]], [-k[1], k[0], 0.0]])
    return (np.eye(3) + s * kx + (1.0 - c) * (kx @ kx)) @ flip


def detector_distance_mm(exp: Experiment) -> float | None:
    """Median distance along the beam from the sample to the panel centres, mm."""
    if not exp.panels or exp.beam_direction is None:
        return None
    u = -exp.beam_direction
    centres = [p.origin + p.fast_axis * p.image_size[0] * p.pixel_size[0] / 2
               + p.slow_axis * p.image_size[1] * p.pixel_size[1] / 2 for p in exp.panels]
    return float(np.median([c @ u for c in centres]))


def resolve_paths(refl_path: str | os.PathLike[str], expt_path: str | os.PathLike[str] | None
                  ) -> tuple[Path, Path]:
    """(refl, expt): either file may be named first; the other shares its stem."""
    first = Path(refl_path)
    if first.suffix == ".expt":
        return (first.with_suffix(".refl"), first) if expt_path is None \
            else (Path(expt_path), first)
    return first, Path(expt_path) if expt_path is not None else first.with_suffix(".expt")


class DialsSource:
    """DIALS stills output as a streamvi source (entry point ``dials``).

    Parameters
    ----------
    refl_path
        Reflection table (``.refl``); an ``.expt`` path is accepted too and the ``.refl``
        beside it is read.
    expt_path
        Experiment list; default: ``refl_path`` with the suffix ``.expt``.
    intensity
        ``"profile"`` (``intensity.prf.*``, rows flagged integrated_prf), ``"sum"``
        (``intensity.sum.*``, integrated_sum) or ``"auto"``: profile when the table has
        profile-fitted columns, else sum (stills processing usually only sums).
    run
        Run name of the messages; default: the ``.refl`` file name without its suffix.
    min_partiality
        Leave out rows whose ``partiality`` column is below this (ignored when the table
        has no such column).

    Attributes
    ----------
    counts
        :class:`DialsCounts` of the latest iteration.
    intensity_kind
        ``"profile"`` or ``"sum"``: what the latest iteration used.
    experiments
        The experiments read by the latest iteration.
    table
        The reflection table read by the latest iteration (``None`` if unreadable).

    Notes
    -----
    Iterating never raises on bad input: unreadable files, columns, experiments each become
    a :class:`~streamvi.sources.Rejected` and the sound parts are still emitted.  Messages
    are identified as ``image = "<refl file name>#<experiment identifier or index>"``,
    ``crystal = 0``.
    """

    def __init__(self, refl_path: str | os.PathLike[str],
                 expt_path: str | os.PathLike[str] | None = None, *, intensity: str = "auto",
                 run: str | None = None, min_partiality: float = 0.0):
        if intensity not in INTENSITY_KINDS:
            raise ConfigError(f"DialsSource: intensity={intensity!r}; use one of "
                              f"{', '.join(INTENSITY_KINDS)}")
        if not (math.isfinite(min_partiality) and 0.0 <= min_partiality <= 1.0):
            raise ConfigError(f"DialsSource: min_partiality={min_partiality!r} is not in "
                              "[0, 1]")
        self.refl_path, self.expt_path = resolve_paths(refl_path, expt_path)
        self.intensity = intensity
        self.run = run if run is not None else self.refl_path.stem
        self.min_partiality = float(min_partiality)
        self.counts = DialsCounts()
        self.intensity_kind: str | None = None
        self.experiments: list[Experiment] = []
        self.table: ReflectionTable | None = None

    def __repr__(self) -> str:
        return (f"DialsSource({str(self.refl_path)!r}, {str(self.expt_path)!r}, "
                f"intensity={self.intensity!r}, run={self.run!r})")

    def __iter__(self) -> Iterator[SourceItem]:
        self.counts = DialsCounts()
        self.intensity_kind = None
        self.experiments = []
        self.table = None
        return self._items()

    # ------------------------------------------------------------------ reading

    def _reject(self, source: Path, position: str, reason: str, detail: str) -> Rejected:
        self.counts.rejected[reason] = self.counts.rejected.get(reason, 0) + 1
        return Rejected(source=str(source), position=position, reason=reason, detail=detail)

    def _items(self) -> Iterator[SourceItem]:
        try:
            table = read_reflection_table(self.refl_path, strict=False, columns=COLUMNS_READ)
        except InputError as exc:
            yield self._reject(self.refl_path, "file", exc.reason, str(exc))
            return
        self.table = table
        try:
            experiments = read_experiments(self.expt_path)
        except InputError as exc:
            yield self._reject(self.expt_path, "file", exc.reason, str(exc) + "; the "
                               "reflections need its cells and wavelengths")
            return
        self.experiments = experiments
        self.counts.experiments = len(experiments)
        self.counts.rows = table.nrows
        for name, why in table.bad_columns.items():
            yield self._reject(self.refl_path, f"column '{name}'", "malformed_reflection_table",
                               f"{why}; the column is skipped")
        for where, problem in table.problems:
            yield self._reject(self.refl_path, where, "malformed_reflection_table", problem)
        columns = self._columns(table)
        if isinstance(columns, Rejected):
            yield columns
            return
        yield from self._messages(table, experiments, *columns)

    def _columns(self, table: ReflectionTable
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray] | Rejected:
        """(experiment id, selected-row mask, sigma) or why the table cannot be used."""
        kind = self.intensity
        if kind == "auto":
            kind = "profile" if all(c in table for c in INTENSITY_COLUMNS["profile"][:2]) \
                else "sum"
        self.intensity_kind = kind
        value, variance, flag = INTENSITY_COLUMNS[kind]
        for name in ("miller_index", "id", "flags", value, variance):
            if name not in table:
                bad = name in table.bad_columns
                hint = (f"use intensity='{'sum' if kind == 'profile' else 'profile'}' or "
                        "integrate again") if name in (value, variance) else "integrate again"
                return self._reject(self.refl_path, f"column '{name}'",
                                    "malformed_reflection_table" if bad else "missing_column",
                                    f"the table {'has a damaged' if bad else 'has no'} column "
                                    f"'{name}', which every message needs; {hint}")
        ids = table["id"].astype(np.int64)
        selected = (table["flags"] & np.uint64(flag)) != 0
        with np.errstate(invalid="ignore"):
            var = table[variance]
            sigma = np.where(var > 0, np.sqrt(np.where(var > 0, var, 0.0)), 0.0)
            sigma = np.where(np.isfinite(var), sigma, np.nan)
        return ids, selected, sigma

    @staticmethod
    def _table_ids(table: ReflectionTable, experiments: list[Experiment]) -> dict[int, int]:
        """Table ``id`` of each experiment (by list index), as DIALS pairs them.

        The ``id`` column indexes the experiment list, unless both files name experiments
        by identifier: then the table's ``identifiers`` map decides.
        """
        by_ident = {e.identifier: e.index for e in experiments if e.identifier}
        if table.identifiers and by_ident:
            return {by_ident[ident]: i for i, ident in table.identifiers.items()
                    if ident in by_ident}
        return {e.index: e.index for e in experiments}

    def _messages(self, table: ReflectionTable, experiments: list[Experiment],
                  ids: np.ndarray, selected: np.ndarray, sigma: np.ndarray
                  ) -> Iterator[SourceItem]:
        self.counts.unindexed = int((ids < 0).sum())
        rows_of = _group_rows(ids, selected)
        table_id = self._table_ids(table, experiments)
        stray = sorted(set(rows_of) - set(table_id.values()))
        if stray:
            n = sum(rows_of[i].size for i in stray)
            yield self._reject(self.refl_path, "column 'id'", "unknown_experiment",
                               f"{n} integrated rows have experiment ids {stray[:10]} that "
                               f"{self.expt_path.name} does not hold ({len(experiments)} "
                               "experiments); they are skipped — are the .refl and .expt from "
                               "the same run?")
        empty = np.zeros(0, dtype=np.int64)
        for exp in experiments:
            i = table_id.get(exp.index)
            yield from self._experiment(table, exp, rows_of.get(i, empty), sigma)

    def _experiment(self, table: ReflectionTable, exp: Experiment, rows: np.ndarray,
                    sigma: np.ndarray) -> Iterator[SourceItem]:
        where = f"experiment {exp.index}"
        if exp.error is not None:
            yield self._reject(self.expt_path, where, exp.error.reason,
                               f"{exp.error}; its {rows.size} integrated reflections are "
                               "skipped")
            return
        counts = self.counts
        counts.reflections += int(rows.size)
        if "partiality" in table and self.min_partiality > 0:
            keep = table["partiality"][rows] >= self.min_partiality
            counts.below_min_partiality += int((~keep).sum())
            rows = rows[keep]
        if rows.size == 0:
            yield self._reject(self.refl_path, where, "no_reflections",
                               f"experiment {exp.index} has no integrated "
                               f"{self.intensity_kind} reflections"
                               + (f" with partiality >= {self.min_partiality}"
                                  if self.min_partiality > 0 else "") + "; nothing to merge")
            return
        rows, rejected = _screen_rows(table, rows, sigma, self.intensity_kind or "sum")
        for reason, n in rejected.items():
            counts.rows_rejected[reason] = counts.rows_rejected.get(reason, 0) + n
        if rows.size == 0:
            yield self._reject(self.refl_path, where, "no_valid_reflections",
                               f"all reflections of experiment {exp.index} are unusable ("
                               + ", ".join(f"{r}: {n}" for r, n in rejected.items()) + ")")
            return
        msg = self._message(table, exp, rows, sigma)
        try:
            msg = from_wire_dict(to_wire_dict(msg))
        except WireError as exc:
            yield self._reject(self.refl_path, where, exc.reason,
                               f"experiment {exp.index} fails wire validation: {exc}")
            return
        msg.rows_rejected = rejected
        counts.messages += 1
        yield msg

    def _message(self, table: ReflectionTable, exp: Experiment, rows: np.ndarray,
                 sigma: np.ndarray) -> CrystalMessage:
        value = INTENSITY_COLUMNS[self.intensity_kind or "sum"][0]
        hkl = table["miller_index"][rows]
        assert exp.wavelength_A is not None and exp.cell is not None
        rot = beam_frame_rotation(exp.s0)
        astar, bstar, cstar = (tuple(float(x) for x in rot @ v) for v in exp.reciprocal)
        # float64 beyond float32 becomes ±inf here; the wire rules then drop or refuse it
        with np.errstate(over="ignore"):
            return self._narrowed(table, exp, rows, sigma, value, hkl, astar, bstar, cstar)

    def _narrowed(self, table, exp, rows, sigma, value, hkl, astar, bstar, cstar
                  ) -> CrystalMessage:
        msg = CrystalMessage(
            run=self.run, image=f"{self.refl_path.name}#{exp.identifier or exp.index}",
            crystal=0, h=hkl[:, 0], k=hkl[:, 1], l=hkl[:, 2],
            I=table[value][rows].astype(np.float32), sigI=sigma[rows].astype(np.float32),
            photon_energy_eV=float(exp.photon_energy_eV),  # type: ignore[arg-type]
            cell=exp.cell, astar=astar, bstar=bstar, cstar=cstar,  # type: ignore[arg-type]
            metadata=self._metadata(table, exp, rows))
        xy = next((table[c] for c in ("xyzcal.px", "xyzobs.px.value") if c in table), None)
        if xy is not None:
            msg.fs, msg.ss = xy[rows, 0].astype(np.float32), xy[rows, 1].astype(np.float32)
        if "panel" in table:
            msg.panel, msg.panel_names = _panels(table["panel"][rows], exp)
        if "background.mean" in table:
            msg.background = table["background.mean"][rows].astype(np.float32)
        distance = detector_distance_mm(exp)
        if distance is not None and distance > 0:
            msg.detector_distance_m = distance / 1000.0
        return msg

    def _metadata(self, table: ReflectionTable, exp: Experiment, rows: np.ndarray
                  ) -> dict[str, object]:
        """Wire metadata, prefixed ``dials_`` (docs/wire-format.md: own keys carry a prefix)."""
        meta: dict[str, object] = {"dials_experiment": exp.index,
                                   "dials_intensity": self.intensity_kind}
        optional = {"dials_experiment_identifier": exp.identifier or None,
                    "dials_image_path": exp.image_path, "dials_image_index": exp.image_index,
                    "dials_space_group": exp.space_group.xhm() if exp.space_group else None,
                    "dials_half_mosaicity_deg": exp.half_mosaicity_deg,
                    "dials_domain_size_A": exp.domain_size_A}
        meta.update({k: v for k, v in optional.items() if v is not None})
        if "partiality" in table:
            meta["dials_partiality"] = array_map(table["partiality"][rows], "<f4")
        return meta


def _screen_rows(table: ReflectionTable, rows: np.ndarray, sigma: np.ndarray, kind: str
                 ) -> tuple[np.ndarray, dict[str, int]]:
    """Drop the rows the wire rules would drop, counted by the same reason labels."""
    iobs = table[INTENSITY_COLUMNS[kind][0]][rows].astype(np.float32)
    sig = sigma[rows].astype(np.float32)
    hkl = table["miller_index"][rows]
    finite = np.isfinite(iobs) & np.isfinite(sig)
    with np.errstate(invalid="ignore"):
        positive = sig > 0
    nonzero = (hkl != 0).any(axis=1)
    rejected = {}
    for reason, mask in (("nonfinite_intensity", ~finite),
                         ("nonpositive_sigma", finite & ~positive),
                         ("zero_miller", finite & positive & ~nonzero)):
        if mask.any():
            rejected[reason] = int(mask.sum())
    return rows[finite & positive & nonzero], rejected


def _panels(panel: np.ndarray, exp: Experiment) -> tuple[np.ndarray, list[str]]:
    """Per-row index into the names of the panels used, and those names."""
    used, index = np.unique(panel, return_inverse=True)
    names = [exp.panels[int(p)].name if int(p) < len(exp.panels) else str(int(p))
             for p in used]
    return index.astype(np.int16), names


def _group_rows(ids: np.ndarray, selected: np.ndarray) -> dict[int, np.ndarray]:
    """Selected row numbers by experiment id ≥ 0, in file order (one sort, not a scan per id)."""
    rows = np.flatnonzero(selected & (ids >= 0))
    order = np.argsort(ids[rows], kind="stable")
    rows = rows[order]
    keys, starts = np.unique(ids[rows], return_index=True)
    return {int(k): part for k, part in zip(keys, np.split(rows, starts[1:]))}
