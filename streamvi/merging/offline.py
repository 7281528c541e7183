"""Offline merging of files (``streamvi merge``) on the same engine the service drives."""
from __future__ import annotations

import itertools
import logging
import math
import os
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterable, Sequence

import gemmi
import numpy as np

from streamvi.merging.engine import (REFRESH_MIN_OBSERVATIONS, EngineConfig, MergeEngine,
                                     MergeSnapshot)
from streamvi.merging.features import reports_partiality_geometry
from streamvi.merging.reach import reach_suspect
from streamvi.errors import ConfigError
from streamvi.merging.reference import ReferenceData, ReferenceSetting
from streamvi.sources import Rejected, load_plugin
from streamvi.symmetry import (ReciprocalSpace, consensus_cell, format_cell, parse_cell,
                               parse_space_group, require_metric_symmetry, symmetrize_cell)
from streamvi.merging.trainer import StepReport, TrainerConfig
from streamvi.wire import CrystalMessage

log = logging.getLogger(__name__)

#: Lowest-symmetry space group of each (lattice type, centering): a safe default when a
#: stream states the lattice but no space group (merging in a subgroup is never wrong).
LATTICE_DEFAULT_GROUP = {
    ("triclinic", "P"): "P 1", ("monoclinic", "P"): "P 1 2 1", ("monoclinic", "C"): "C 1 2 1",
    ("monoclinic", "I"): "I 1 2 1", ("orthorhombic", "P"): "P 2 2 2",
    ("orthorhombic", "C"): "C 2 2 2", ("orthorhombic", "I"): "I 2 2 2",
    ("orthorhombic", "F"): "F 2 2 2", ("tetragonal", "P"): "P 4", ("tetragonal", "I"): "I 4",
    ("rhombohedral", "R"): "R 3", ("hexagonal", "P"): "P 3", ("hexagonal", "H"): "H 3",
    ("cubic", "P"): "P 2 3", ("cubic", "I"): "I 2 3", ("cubic", "F"): "F 2 3",
}


@dataclass
class LoadedData:
    """Crystals read from files, what was rejected, and what the files say of the target."""

    crystals: list[CrystalMessage] = field(default_factory=list)
    rejected: list[Rejected] = field(default_factory=list)
    target_cell: tuple[float, ...] | None = None
    lattice: tuple[str, str] | None = None
    #: a space group the input states (DIALS experiments carry one; CrystFEL streams do not)
    space_group: str | None = None
    #: index into ``crystals`` of each input file's first crystal, in the order read
    file_starts: list[int] = field(default_factory=list)


def open_source(path: str | Path) -> Iterable:
    """The source that reads ``path``: DIALS files (``.refl``, ``.expt``) by their plugin,
    anything else as a CrystFEL stream; plugins are found through the entry points."""
    p = Path(path)
    return load_plugin("dials" if p.suffix in (".refl", ".expt") else "crystfel")(p)


def load_files(paths: Sequence[str | Path]) -> LoadedData:
    """Read every crystal of ``paths``; malformed pieces are collected, not raised."""
    out = LoadedData()
    for path in paths:
        if not Path(path).exists():
            raise ConfigError(f"{path}: no such file")
        src = open_source(path)
        out.file_starts.append(len(out.crystals))
        for item in src:
            if isinstance(item, Rejected):
                out.rejected.append(item)
            else:
                out.crystals.append(item)
        for expt in getattr(src, "experiments", None) or []:
            sg = getattr(expt, "space_group", None)
            if sg is not None and out.space_group is None:
                out.space_group = sg.hm
        header = getattr(src, "header", None)
        if out.target_cell is None and header is not None:
            cell = getattr(header, "target_cell", None)
            if cell is not None:
                out.target_cell = tuple(cell)
                lt, cen = getattr(header, "lattice_type", None), getattr(header, "centering", None)
                if lt and cen:
                    out.lattice = (str(lt), str(cen))
    return out


def resolve_space(data: LoadedData, *, space_group: str | None, cell: str | Sequence[float] | None,
                  dmin: float | None, anomalous: bool) -> ReciprocalSpace:
    """The merge's unique-reflection table, filling gaps from the data.

    The space group defaults to the one the input states, else the lowest-symmetry group of
    the stated lattice; the cell to the stream's target cell, else the crystals' consensus
    (the per-parameter median, :func:`~streamvi.symmetry.consensus_cell`); either is
    symmetrised to the space group, with a note, when it lacks the group's metric symmetry
    (indexers never report exactly symmetric cells).  A ``cell`` given by the user must
    have it.  dmin defaults to the highest resolution observed.
    """
    sg = _space_group(data, space_group)
    if cell is not None:
        require_metric_symmetry(cell, sg, key="--cell")
        ucell = parse_cell(cell)
    elif data.target_cell is not None:
        ucell = _symmetrized(parse_cell(data.target_cell), sg, "the stream's target cell")
    elif data.crystals:
        cons = consensus_cell([c.cell for c in data.crystals], sg)
        ucell = cons.cell
        log.info("no --cell: the median of %d crystals' cells, %s%s", cons.n_crystals,
                 format_cell(cons.cell), f" (symmetrised to {sg.hm})" if cons.symmetrized else "")
        if cons.n_outliers:
            log.warning("%d of %d crystals differ from that cell by more than 5 %% or 5°: "
                        "they are left out (cell_mismatch)", cons.n_outliers, cons.n_crystals)
    else:
        raise ConfigError("no cell: pass --cell 'a b c alpha beta gamma' (Å, degrees)")
    if dmin is None:
        if not data.crystals:
            raise ConfigError("no data and no --dmin")
        dmin = min(_min_d(c, ucell) for c in data.crystals)
        dmin = math.floor(dmin * 100) / 100
    return ReciprocalSpace(sg, ucell, dmin, anomalous=anomalous)


def _space_group(data: LoadedData, space_group: str | None) -> gemmi.SpaceGroup:
    if space_group is None and data.space_group is not None:
        space_group = data.space_group
        log.info("space group %s taken from the input files", space_group)
    if space_group is None:
        if data.lattice is None or data.lattice not in LATTICE_DEFAULT_GROUP:
            raise ConfigError("no space group: the input does not state one; pass "
                              "--space-group, e.g. --space-group 'P 43 21 2'")
        space_group = LATTICE_DEFAULT_GROUP[data.lattice]
        log.warning("no --space-group given: merging in %s, the lowest symmetry of the "
                    "stream's %s %s lattice", space_group, *data.lattice)
    return parse_space_group(space_group)


def _symmetrized(cell: gemmi.UnitCell, sg: gemmi.SpaceGroup, what: str) -> gemmi.UnitCell:
    """``cell``, symmetrised (with a note) when it lacks the metric symmetry of ``sg``."""
    if cell.is_compatible_with_spacegroup(sg):
        return cell
    sym = symmetrize_cell(cell, sg)
    log.info("%s %s lacks the metric symmetry of %s: symmetrised to %s", what,
             format_cell(cell), sg.hm, format_cell(sym))
    return sym


def check_output_path(path: str | Path, *, flag: str = "-o") -> None:
    """Refuse, before anything is read or trained, an output file that cannot be written.

    Raises
    ------
    ConfigError
        Naming the path and the flag: a missing directory, a directory in the file's place,
        no permission to write there.
    """
    path = Path(path)
    parent = path.parent if str(path.parent) else Path(".")
    why = None
    if path.is_dir():
        why = "is a directory"
    elif not parent.is_dir():
        why = f"{parent} is not an existing directory"
    else:
        probe = parent / f".{path.name}.{os.getpid()}.probe"
        try:
            probe.touch(exist_ok=False)
            probe.unlink()
        except OSError as exc:
            why = f"cannot write in {parent} ({exc.strerror})"
    if why is not None:
        raise ConfigError(f"{flag} {path}: {why}; give a file in a directory you can write")


def _min_d(msg: CrystalMessage, cell: gemmi.UnitCell) -> float:
    return float(cell.calculate_d_array(msg.hkl()).min())


class Progress:
    """A one-line progress report on stderr (images/s, loss) for long runs."""

    def __init__(self, total_steps: int, n_images_per_step: int, stream=sys.stderr,
                 every_s: float = 0.5):
        self.total = total_steps
        self.per_step = n_images_per_step
        self.stream = stream
        self.every = every_s
        self.t0 = time.perf_counter()
        self.last = 0.0
        self.done = 0

    def __call__(self, report: StepReport) -> None:
        self.done += 1
        now = time.perf_counter()
        if now - self.last < self.every and self.done < self.total:
            return
        self.last = now
        el = now - self.t0
        rate = self.done * self.per_step / el if el > 0 else 0.0
        frac = self.done / self.total
        bar = "#" * int(30 * frac)
        self.stream.write(f"\r[{bar:<30}] step {self.done}/{self.total}  "
                          f"{rate:7.0f} images/s  loss {report.loss:9.4f}  {el:6.1f} s")
        if self.done >= self.total:
            self.stream.write("\n")
        self.stream.flush()


#: share of an offline merge's steps over which the learning rates are annealed
ANNEAL_FRACTION = 0.5
#: learning-rate factor reached at the last step
FINAL_LR_FACTOR = 0.02
#: passes over the data when neither epochs nor steps are given
DEFAULT_EPOCHS = 10.0
#: fewest steps when neither is given: small data sets need more passes than 10 epochs give
#: them (docs/model.md has the measurements)
DEFAULT_MIN_STEPS = 1500
#: ``row_refresh``: the rows still far from their data restart at their merge given the
#: current scales at these fractions of a merge's steps (docs/model.md, change 22).  A row
#: moves by about one learning rate per update and is updated only when one of its images is
#: in the batch: a reflection seen once or twice has ten updates in a ten-epoch merge, too few
#: to travel from its start to where its data put it
ROW_REFRESH_FRACTIONS = (0.5, 0.8)
#: ... and every row with at least this many observations (the mates together) may restart
ROW_REFRESH_MIN_OBSERVATIONS = 1
#: ... and at most this many: rows seen more often have updates enough to get there
ROW_REFRESH_MAX_OBSERVATIONS = 5
#: ... but not before this step: the restart reads the current scales, which need to have
#: learnt (120 strong stills at 2.5 Å merged in 150 steps, every row restarted at steps 75
#: and 120: CC(F) −0.05; docs/model.md change 22)
ROW_REFRESH_FIRST_STEP = 300


#: B (Å²) of the scales' trend given to the amplitudes (change 10) below which a merge with
#: ``partiality_check`` is run again with the geometric partiality.  Pure-background
#: observations at low resolution push it negative: CrystFEL's partial_sim streams −12.2
#: (5,000 crystals) and −9.0 (1,000), the quality matrix's overpredicted case −10.0; every
#: other case of the matrix ends above −5 (the real 5-HT2B stream −4.9) but the 3-crystal
#: HEWL stream (−8.6), hence :data:`PARTIALITY_CHECK_CRYSTALS` (docs/model.md, changes 18–19)
PARTIALITY_CHECK_B = -8.0
#: fewer crystals than this: the trend is too uncertain to act on
PARTIALITY_CHECK_CRYSTALS = 100


def partiality_trend_suspect(falloff_b: float | None, n_reporting: int) -> bool:
    """Whether change 10 moved a trend onto the amplitudes that the partialities most likely
    made: B below :data:`PARTIALITY_CHECK_B` on at least :data:`PARTIALITY_CHECK_CRYSTALS`
    crystals that report what the geometric partiality reads
    (:func:`reports_partiality_geometry`; ``n_reporting`` of them)."""
    return (falloff_b is not None and falloff_b < PARTIALITY_CHECK_B
            and n_reporting >= PARTIALITY_CHECK_CRYSTALS)


def partiality_advice(falloff_b: float | None, n_reporting: int,
                      geometric_partiality: bool) -> str | None:
    """A line for the crew where a merge without the geometric partiality shows the
    partialities' trend (:func:`partiality_trend_suspect`); None otherwise."""
    if geometric_partiality or not partiality_trend_suspect(falloff_b, n_reporting):
        return None
    return (f"the scales' resolution trend gave the amplitudes B {falloff_b:+.1f} A^2 (MTZ "
            "history): a trend this large usually comes from the partialities, e.g. a stream "
            "that integrates every reflection it predicts, many of them pure background at "
            "low resolution (CrystFEL's partial_sim: overall CC 0.74 against 0.998 with the "
            "option and `merge`'s defaults); these crystals report orientations, profile "
            "radii and a bandwidth: merge with --geometric-partiality (docs/model.md, changes "
            "18-19)")


def merge_crystals(crystals: Iterable[CrystalMessage], space: ReciprocalSpace, *,
                   trainer_config: TrainerConfig | None = None,
                   engine_config: EngineConfig | None = None, epochs: float | None = None,
                   steps: int | None = None,
                   progress: Callable[[int, int], Callable[[StepReport], None]] | None = None,
                   history: list[str] | None = None,
                   anneal: float = ANNEAL_FRACTION,
                   reference: ReferenceData | None = None,
                   refresh_epochs: Sequence[float] = (),
                   assign_settings: bool = True,
                   conditions: Sequence[str] | None = None,
                   coupled_reference: str | None = None,
                   prior: ReferenceData | None = None,
                   partiality_check: bool = False,
                   row_refresh: bool = False
                   ) -> tuple[MergeSnapshot, MergeEngine]:
    """Store every crystal, train for ``steps`` (or ``epochs`` × images / batch) and snapshot.

    With neither, :data:`DEFAULT_EPOCHS` passes and at least :data:`DEFAULT_MIN_STEPS` steps.

    The learning rates decay linearly to :data:`FINAL_LR_FACTOR` of their values over the
    last ``anneal`` of the steps (0: constant rates, as the online service trains).  With a
    ``reference`` (:func:`streamvi.merging.reference.read_reference`), the snapshot is put in its
    indexing setting (merohedral space groups; see :mod:`streamvi.merging.reference`).  In such
    groups every image is first put in one setting by consensus of the data
    (``assign_settings``, :meth:`MergeEngine.assign_settings`).  The rows are restarted at
    their merge given the current scales after ``refresh_epochs`` passes
    (:meth:`MergeEngine.refresh_rows`); with ``row_refresh`` also at
    :data:`ROW_REFRESH_FRACTIONS` of the steps (from step :data:`ROW_REFRESH_FIRST_STEP`
    on), every row with :data:`ROW_REFRESH_MIN_OBSERVATIONS` to
    :data:`ROW_REFRESH_MAX_OBSERVATIONS` observations whose merge is still far from its data
    (one condition and no ``prior`` only: the restart's estimate knows the Wilson prior
    alone).
    With ``conditions`` (pump–probe), every crystal's
    ``condition`` must be one of them; the snapshot returned is the first condition's
    (:meth:`MergeEngine.condition_snapshots` gives them all), and with ``coupled_reference``
    every other condition is merged under the double-Wilson prior given that one.  With a
    ``prior`` data set (``--prior-mtz``), the reference condition (the only one, without
    conditions) is merged under the double-Wilson prior given its amplitudes.

    With ``partiality_check`` and the geometric partiality off, the merge takes the
    geometric partiality from the start where the observations beyond the reported
    geometry's reach carry no signal (:func:`streamvi.merging.reach.reach_suspect`, read
    from the stored data before training), and otherwise a merge whose scales' trend
    :func:`partiality_trend_suspect` finds suspect is run again, from the start, with the
    geometric partiality on, and that merge is returned (its MTZ history says why).

    Returns
    -------
    (MergeSnapshot, MergeEngine)
    """
    tcfg = trainer_config or TrainerConfig()
    if not partiality_check or tcfg.geometric_partiality:
        return _merge_once(crystals, space, tcfg, engine_config, epochs, steps, progress,
                           history, anneal, reference, refresh_epochs, assign_settings,
                           conditions, coupled_reference, prior, row_refresh)
    crystals = list(crystals)
    n_reporting = sum(reports_partiality_geometry(c) for c in crystals)
    engine, n_outside = _stored_engine(crystals, space, tcfg, engine_config, reference,
                                       conditions, coupled_reference, prior)
    evidence = engine.store.reach.evidence()
    if reach_suspect(evidence):
        # the data say it before any training: no first merge to set aside
        log.warning("%s: merging with the geometric partiality (docs/model.md, change 26; "
                    "--no-partiality-check merges without it)", evidence.summary())
        del engine
        return _merge_once(crystals, space, replace(tcfg, geometric_partiality=True),
                           engine_config, epochs, steps, progress,
                           list(history or []) + [evidence.history_line()], anneal,
                           reference, refresh_epochs, assign_settings, conditions,
                           coupled_reference, prior, row_refresh)
    snapshot, engine = _train(engine, n_outside, epochs, steps, progress, history, anneal,
                              refresh_epochs, assign_settings, conditions, prior, row_refresh)
    if not partiality_trend_suspect(snapshot.falloff_b, n_reporting):
        return snapshot, engine
    log.warning("the scales' resolution trend gave the amplitudes B %+.1f A^2 on %d crystals "
                "that report orientations, profile radii and a bandwidth: the mark of "
                "observations the partialities do not reach (pure background at low "
                "resolution); merging again with the geometric partiality (docs/model.md, "
                "change 19; --no-partiality-check keeps the first merge)",
                snapshot.falloff_b, n_reporting)
    note = (f"geometric partiality on: without it the scales' trend gave B "
            f"{snapshot.falloff_b:+.1f} A^2")[:80]
    return _merge_once(crystals, space, replace(tcfg, geometric_partiality=True),
                       engine_config, epochs, steps, progress, list(history or []) + [note],
                       anneal, reference, refresh_epochs, assign_settings, conditions,
                       coupled_reference, prior, row_refresh)


def _merge_once(crystals: Iterable[CrystalMessage], space: ReciprocalSpace,
                trainer_config: TrainerConfig, engine_config: EngineConfig | None,
                epochs: float | None, steps: int | None,
                progress: Callable[[int, int], Callable[[StepReport], None]] | None,
                history: list[str] | None, anneal: float, reference: ReferenceData | None,
                refresh_epochs: Sequence[float], assign_settings: bool,
                conditions: Sequence[str] | None, coupled_reference: str | None,
                prior: ReferenceData | None, row_refresh: bool = False
                ) -> tuple[MergeSnapshot, MergeEngine]:
    """One merge of :func:`merge_crystals` (its parameters, the same meaning)."""
    engine, n_outside = _stored_engine(crystals, space, trainer_config, engine_config,
                                       reference, conditions, coupled_reference, prior)
    return _train(engine, n_outside, epochs, steps, progress, history, anneal,
                  refresh_epochs, assign_settings, conditions, prior, row_refresh)


def _stored_engine(crystals: Iterable[CrystalMessage], space: ReciprocalSpace,
                   trainer_config: TrainerConfig, engine_config: EngineConfig | None,
                   reference: ReferenceData | None, conditions: Sequence[str] | None,
                   coupled_reference: str | None, prior: ReferenceData | None
                   ) -> tuple[MergeEngine, int]:
    """A merge's engine with every crystal stored, untrained, and the count of reflections
    outside the table (:func:`merge_crystals`' parameters, the same meaning)."""
    # every crystal is stored before the first step: the Wilson plot may use them all at once
    # (and the rows are refreshed at ``refresh_epochs``, not by the service's policy)
    engine = MergeEngine(space, trainer_config,
                         replace(engine_config or EngineConfig(), wilson_min_images=0,
                                 refresh_growth=0.0, refresh_idle_steps=0),
                         conditions=conditions, coupled_reference=coupled_reference,
                         prior=prior)
    if reference is not None:
        engine.reference = ReferenceSetting(space, reference)
    n_outside = 0
    remaining = iter(crystals)
    while chunk := list(itertools.islice(remaining, 256)):
        n_outside += sum(r.n_outside for r in engine.add_many(chunk))
    if engine.n_images == 0:
        refused = engine.store.rejected_counts
        if refused.get("unknown_condition"):
            raise ConfigError(f"no crystal was merged: {refused['unknown_condition']} had no "
                              f"condition among {', '.join(conditions or ())} (check "
                              "--condition-field and --condition-map)")
        raise ConfigError("no crystal had reflections inside the table (check --dmin, "
                          "--space-group and --cell)")
    return engine, n_outside


def _train(engine: MergeEngine, n_outside: int, epochs: float | None, steps: int | None,
           progress: Callable[[int, int], Callable[[StepReport], None]] | None,
           history: list[str] | None, anneal: float, refresh_epochs: Sequence[float],
           assign_settings: bool, conditions: Sequence[str] | None,
           prior: ReferenceData | None, row_refresh: bool
           ) -> tuple[MergeSnapshot, MergeEngine]:
    """Train a :func:`_stored_engine` and snapshot it (:func:`merge_crystals`' parameters)."""
    # offline there is no arrival order to favour: every step draws from the passes (epochs)
    engine.scheduler.cursor = engine.n_images
    confidence = engine.assign_settings() if assign_settings else None
    if steps is None and epochs is None:
        steps = max(DEFAULT_MIN_STEPS,
                    int(math.ceil(DEFAULT_EPOCHS * engine.steps_per_epoch())))
    elif steps is None:
        steps = int(math.ceil(epochs * engine.steps_per_epoch()))
    cb = progress(steps, engine.config.batch_images) if progress else None
    start_decay = int(round(steps * (1.0 - anneal)))
    # the refreshes of each step, each with the fewest and most observations (None: no
    # bound) of the rows it may restart (both kinds may fall on one step)
    refresh_at: dict[int, list[tuple[int, int | None]]] = {}
    for e in refresh_epochs:
        refresh_at.setdefault(int(round(e * engine.steps_per_epoch())), []).append(
            (REFRESH_MIN_OBSERVATIONS, None))
    if row_refresh and engine.store.n_conditions <= 1 and prior is None:
        for f in ROW_REFRESH_FRACTIONS:
            if int(round(f * steps)) >= ROW_REFRESH_FIRST_STEP:
                refresh_at.setdefault(int(round(f * steps)), []).append(
                    (ROW_REFRESH_MIN_OBSERVATIONS, ROW_REFRESH_MAX_OBSERVATIONS))
    restarted = []
    for i in range(steps):
        for least, most in refresh_at.get(i, ()):
            restarted.append((i, engine.refresh_rows(min_observations=least,
                                                     max_observations=most)))
        if i >= start_decay:
            engine.trainer.set_lr_factor(
                1.0 - (1.0 - FINAL_LR_FACTOR) * (i + 1 - start_decay) / (steps - start_decay))
        if engine.train(1, cb) is None:
            break
    hist = list(history or [])
    if confidence is not None:
        hist.append(f"indexing settings by consensus, confidence {confidence:.3f}")
    beyond = engine.store.beyond_dmin
    if beyond.n_beyond:         # MTZ history lines hold 80 characters
        hist.append(f"{beyond.n_beyond} reflections beyond dmin {beyond.dmin:g} A (to "
                    f"{beyond.d_min_seen:.2f} A) not merged"[:80])
    if n_outside > beyond.n_beyond:
        hist.append(f"{n_outside - beyond.n_beyond} more outside the table (systematic "
                    "absences) not merged"[:80])
    if restarted:
        hist.append(("rows restarted at their data: " + ", ".join(
            f"{n} at step {i}" for i, n in restarted))[:80])
    first = None if conditions is None else conditions[0]
    return engine.snapshot(history=hist, condition=first), engine
