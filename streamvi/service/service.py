"""``streamvi serve``: ingest, store, trainer and publishers wired into one running service.

Threads:

- the ingest thread (:class:`~streamvi.ingest.receiver.Ingestor`) receives, validates and spools
  messages and puts accepted crystals on a bounded queue;
- the training thread (:meth:`Service._train_loop`) drains that queue into the store without
  waiting, takes one optimiser step whenever there are data, and publishes snapshots and
  checkpoints on their intervals;
- the HTTP thread (status page and ``/metrics``), when enabled.

A checkpoint holds the trainer, scheduler and counters; the store is rebuilt on restart by
replaying the spool, so a crash (even ``kill -9``) loses nothing that was spooled, and
crystals are deduplicated by ``(run, image, crystal)`` and by content so nothing is counted
twice.

The merge starts once the first ``consensus_crystals`` crystals are in (or
``consensus_wait`` s after the first): without a configured cell their median cell,
symmetrised to the space group, becomes the merge's; either way the store judges them
together, so one absurd first crystal cannot set the intensity reference.  Crystals the
store refuses (another cell, absurd intensities, nothing in the table) are counted by
reason, logged (a few lines per reason) and dead-lettered.

An error of the training loop that repeats, or one that stops the merge from starting,
turns the service *failed* (status, ``/healthz``, the page's badge) with the reason; ingest
goes on spooling, so nothing is lost while someone fixes the cause.
"""
from __future__ import annotations

import itertools
import logging
import os
import tempfile
import threading
import time
from collections import deque
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from streamvi.config import ServiceConfig
from streamvi.errors import ConfigError
from streamvi.ingest.counters import IngestCounters
from streamvi.ingest.deadletter import DeadLetter
from streamvi.ingest.ratelimit import RateLimitedLog
from streamvi.ingest.receiver import Ingestor, replay_spool
from streamvi.ingest.spool import Spool
from streamvi.merging.device import check_device
from streamvi.merging.engine import EngineConfig, MergeEngine, MergeSnapshot
from streamvi.merging.reference import ReferenceSetting, check_same_lattice, read_reference
from streamvi.merging.trainer import TrainerConfig
from streamvi.publish.mtz import MtzInfo, difference_dataset, write_difference_mtz
from streamvi.publish.mtz_files import MtzSnapshots
from streamvi.quality.difference import difference_figures, difference_peaks
from streamvi.quality.feedback import Feedback, LiveFeedback, store_sums
from streamvi.service.lifecycle import (CHECKPOINT_NAME, Checkpoints, Every,
                                        remove_stale_temp_files)
from streamvi.service.partiality import PartialitySwitch, PartialityWatch
from streamvi.service.status import (dmin_advice_of, images_per_second, service_snapshot,
                                     service_status)
from streamvi.snapshot import ServiceSnapshot
from streamvi.sources import plugin_module
from streamvi.symmetry import (ReciprocalSpace, consensus_cell, format_cell, parse_cell,
                               parse_space_group, require_metric_symmetry)
from streamvi.wire import CrystalMessage, clip, encode_crystal

log = logging.getLogger(__name__)

#: consecutive training-loop errors after which the service is *failed*
FAIL_AFTER_ERRORS = 3
#: longest pause between retries of a failing training loop, s
MAX_RETRY_DELAY_S = 5.0


def service_conditions(text: str | None, reference: str | None = None
                       ) -> tuple[str, ...] | None:
    """The ``conditions`` option of ``serve`` (``'dark,light'``) in table order: the
    reference first (``reference``, else ``dark`` when listed, else the first listed), then
    the others as listed; None when empty.

    Raises
    ------
    ConfigError
        An empty or repeated name, or a ``reference_condition`` not among them.
    """
    reference = reference or None
    if not text or not text.strip():
        if reference:
            raise ConfigError(f"reference_condition = {reference!r} needs `conditions` "
                              "(e.g. conditions = \"dark,light\")")
        return None
    names = [n.strip() for n in text.split(",")]
    if any(not n for n in names):
        raise ConfigError(f"conditions = {text!r}: an empty name; give them comma-separated, "
                          "e.g. conditions = \"dark,light\"")
    if len(set(names)) != len(names):
        raise ConfigError(f"conditions = {text!r}: a name given twice; give each once")
    if reference is None:
        reference = "dark" if "dark" in names else names[0]
    if reference not in names:
        raise ConfigError(f"reference_condition = {reference!r} is not one of conditions "
                          f"({', '.join(names)}); name one of them")
    return (reference,) + tuple(n for n in names if n != reference)


class Service:
    """One running streamvi instance.

    Parameters
    ----------
    config
        The resolved configuration (:func:`streamvi.config.load_config`).

    Raises
    ------
    ConfigError
        At construction, for an unusable configuration (unknown space group, unwritable
        output directory, port in use), with the key and the fix named.
    """

    def __init__(self, config: ServiceConfig):
        self.config = config
        self.out_dir = Path(config.out_dir).resolve()
        self._check_out_dir()
        if not config.space_group:
            raise ConfigError("space_group is required: set it in the config file, "
                              "STREAMVI_SPACE_GROUP or --space-group (e.g. 'P 43 21 2')")
        self.space_group = parse_space_group(config.space_group)
        check_device(config.device)
        #: targets, forecasts and anomalous peaks per snapshot (docs/metrics.md)
        #: pump-probe conditions merged side by side (reference first), or None
        self._declared_conditions = service_conditions(config.conditions,
                                                       config.reference_condition)
        if config.new_conditions < 0:
            raise ConfigError(f"new_conditions = {config.new_conditions}: give 0 or more")
        #: the ``model`` for the light-minus-dark maps' phases and atom names (conditions)
        self.difference_model = None
        self.feedback = self._make_feedback()
        self.latest_feedback: Feedback | None = None
        self.cell = parse_cell(config.cell) if config.cell else None
        #: the table of a configured cell, built now so that its mistakes stop the start
        self._space: ReciprocalSpace | None = None
        if self.cell is not None:
            require_metric_symmetry(self.cell, self.space_group, key="cell")
            self._space = ReciprocalSpace(self.space_group, self.cell, config.dmin,
                                          anomalous=config.anomalous)
        self.reference = None
        if config.reference:
            self.reference = read_reference(config.reference, config.reference_column or None)
            if self.cell is not None:
                check_same_lattice(self.reference, self.space_group, self.cell)
        #: amplitudes of an independent data set (prior_mtz) or a model (prior_model) the
        #: merge's reference condition takes the double-Wilson prior given, or None
        self.prior = self._read_prior()
        # the model's and the engine's settings, derived from the declared options
        self.trainer_config = TrainerConfig(**config.settings("trainer"))
        self.engine_config = EngineConfig(**config.settings("engine"))
        #: the live partiality check (option partiality_check): reads every snapshot's trend
        #: while the geometric partiality is off (:mod:`streamvi.service.partiality`)
        self.partiality_watch = (PartialityWatch() if config.partiality_check
                                 and not self.trainer_config.geometric_partiality else None)
        #: the switch it made, if it did (kept in the checkpoint), else None
        self.partiality_switch: PartialitySwitch | None = None
        #: the dmin the last advice to extend the table suggested (logged once per value)
        self._dmin_advised: float | None = None
        self.engine: MergeEngine | None = None
        self.counters = IngestCounters()
        self.checkpoints = Checkpoints(self.out_dir / CHECKPOINT_NAME)
        self.spool = Spool(self.out_dir / "spool", fsync=config.spool_fsync)
        try:        # the spool's lock is ours now: no other service writes in out_dir
            self._check_spool_beside_checkpoint()
        except ConfigError:
            self.spool.close()
            raise
        remove_stale_temp_files(self.out_dir)
        self.dead_letter = DeadLetter(self.out_dir / "dead-letter.jsonl")
        self.mtz = MtzSnapshots(self.out_dir, keep=config.keep_snapshots, info=self._mtz_info)
        #: with conditions: ``latest-<condition>.mtz`` per condition and
        #: ``latest-<condition>-minus-<reference>.mtz`` per other condition
        self.condition_mtz: dict[str, MtzSnapshots] = {}
        #: per light-minus-dark pair, the figures of the latest publish
        #: (:func:`streamvi.quality.difference.difference_figures`)
        self.latest_differences: dict[str, dict] = {}
        self.difference_mtz: dict[str, MtzSnapshots] = {}
        for name in self.conditions or ():
            self._condition_files(name)
        self.ingestor = Ingestor(
            list(config.listen), mode=config.listen_mode, topic=config.sub_topic.encode(),
            queue_max_messages=config.queue_max_messages, rcvhwm=config.rcvhwm,
            spool=self.spool, dead_letter=self.dead_letter, counters=self.counters,
            max_message_bytes=config.max_message_bytes, **self._curve_options())
        # crystals stored already are counted as duplicates by ingest and never spooled
        self.ingestor.already_stored = self._already_stored
        self.publisher = None
        if config.publish_endpoint:
            from streamvi.publish.zmqpub import Publisher

            self.publisher = Publisher(config.publish_endpoint)
        self.latest: MergeSnapshot | None = None
        #: with conditions, the latest snapshot of each, by name (reference first)
        self.latest_conditions: dict[str, MergeSnapshot] = {}
        #: pump–probe: the targets' feedback of every condition but the reference (whose is
        #: :attr:`latest_feedback`), each with its own history (no anomalous peaks)
        self.condition_feedback: dict[str, LiveFeedback] = {}
        self.latest_condition_feedback: dict[str, Feedback] = {}
        #: (time, figures) of every snapshot, for the status page's plots over time
        self.history: deque[dict[str, Any]] = deque(maxlen=2000)
        self.lock = threading.RLock()
        self._stop = threading.Event()
        self._publish_request = threading.Event()
        self._thread: threading.Thread | None = None
        self.started_at = time.time()
        self.crystals_merged = 0
        #: duplicates among the spooled crystals (rebuilt from the spool at each start)
        self._spooled_duplicates = 0
        #: crystals recognised as duplicates by their content (not their identity), by the
        #: store (training thread) and by ingest before spooling (ingest thread)
        self._content_duplicates = 0
        self._content_duplicates_unspooled = 0
        #: cells of the crystals refused as cell_mismatch while none is merged (a few)
        self._mismatch_cells: list[tuple[float, ...]] = []
        #: crystals refused by the store, by reason (rebuilt from the spool at each start)
        self.crystals_rejected: dict[str, int] = {}
        #: ten lines per reason at once, then one per 10 s with a count of the others
        self._reject_log = RateLimitedLog(log, burst=10, interval_s=10.0)
        #: pump-probe conditions seen on merged crystals, each warned about once (the service
        #: merges every condition into one table for now; docs/time-resolved.md)
        self._conditions_seen: set[str] = set()
        #: crystals waiting for the merge to start (see the module docstring)
        self._pending: list[tuple[Any, CrystalMessage, float]] = []
        #: spool sequence numbers below this were replayed into the store: the same
        #: crystals still on the ingest queue after a restart of the merge are not stored
        #: twice (:meth:`_switch_partiality`)
        self._replayed_below = 0
        self._pending_since = 0.0
        self._pending_replay = False
        #: where the merge's cell came from (``config``, ``checkpoint``, a consensus)
        self.cell_source: str | None = "config" if self.cell is not None else None
        self._checkpoint_cell: list[float] | None = None
        #: why the service is failed (None: it is not), and the kind of failure
        #: (``loop``, ``start``, ``cell``; see :meth:`_fail`)
        self.failure: str | None = None
        self._failure_kind: str | None = None
        self._failure_permanent = False
        self._loop_errors = 0
        self.reflections_outside = 0
        self.step_seconds: deque[float] = deque(maxlen=1000)
        self.trained_reflections = 0
        self.last_step_report = None
        self.recovered_from_checkpoint = False
        self.metrics_server = None
        #: the OM bridge (plugin ``om``) while om_url is set
        self.om_bridge = None
        self._om = None

    # ------------------------------------------------------------------ set-up

    def _check_out_dir(self) -> None:
        try:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            fd, probe = tempfile.mkstemp(dir=self.out_dir, prefix=".write-test")
            os.close(fd)
            os.unlink(probe)
        except OSError as exc:
            raise ConfigError(f"out_dir {self.out_dir}: not writable ({exc.strerror}); choose a "
                              "directory you can write with --out-dir") from None

    def _make_feedback(self) -> LiveFeedback:
        """Targets and the model of the anomalous peaks, checked before anything starts."""
        from streamvi.quality.anomalous import PhasingModel
        from streamvi.quality.forecast import targets_from_config

        c = self.config
        targets = targets_from_config(c, dmin=c.dmin, anomalous=c.anomalous)
        model = None
        if c.model:
            pump_probe = self._table_sets() > 1
            if not c.anomalous and not pump_probe:
                raise ConfigError(f"model = {c.model}: the anomalous difference map needs "
                                  "F(+) and F(-); set anomalous = true, or leave model empty")
            # with conditions the model also phases the light-minus-dark maps, heavy atoms
            # or not
            model = PhasingModel(c.model, require_heavy=not pump_probe)
            if pump_probe:
                self.difference_model = model
                log.info("light-minus-dark map peaks named by the atoms of %s", model.path.name)
            if not (c.anomalous and model.labels):
                model = None
            else:
                log.info("anomalous peak heights from %s", model.describe())
        return LiveFeedback(targets, model)

    def _read_prior(self):
        """``prior_mtz`` or ``prior_model``, read before anything starts (their mistakes
        stop the start, naming the key)."""
        c = self.config
        if c.prior_mtz and c.prior_model:
            raise ConfigError("prior_mtz and prior_model are both set: give one of them")
        if c.prior_mtz:
            prior = read_reference(c.prior_mtz, c.prior_column or None, flag="prior_mtz")
        elif c.prior_model:
            from streamvi.merging.reference import model_amplitudes

            if not Path(c.prior_model).is_file():
                raise ConfigError(f"prior_model = {c.prior_model}: no such file; give the PDB "
                                  "or mmCIF model of the merged crystal")
            prior = model_amplitudes(c.prior_model, c.dmin, flag="prior_model")
        else:
            return None
        if self.cell is not None:
            check_same_lattice(prior, self.space_group, self.cell)
        log.info("prior knowledge: %s (%d reflections); the merge takes the double-Wilson "
                 "prior given it", prior.name, len(prior.hkl))
        return prior

    @property
    def conditions(self) -> tuple[str, ...] | None:
        """The conditions merged, reference first: those configured, then those that
        appeared mid-run (``new_conditions``) in order of arrival; None without."""
        engine = getattr(self, "engine", None)
        if engine is not None and self._declared_conditions:
            return engine.conditions
        return self._declared_conditions

    def _table_sets(self) -> int:
        """Conditions the merge can hold: those configured and the spare ones (0 without)."""
        declared = self._declared_conditions
        return len(declared) + self.config.new_conditions if declared else 0

    def _condition_files(self, name: str) -> MtzSnapshots:
        """``latest-<name>.mtz`` (and, but for the reference, ``latest-<name>-minus-<ref>
        .mtz``): made on first use, so that conditions appearing mid-run get theirs."""
        if name not in self.condition_mtz:
            keep, ref = self.config.keep_snapshots, self._declared_conditions[0]
            self.condition_mtz[name] = MtzSnapshots(self.out_dir, keep=keep,
                                                    info=self._mtz_info, tag=name)
            if name != ref:
                self.difference_mtz[name] = MtzSnapshots(
                    self.out_dir, keep=keep, info=self._mtz_info, tag=f"{name}-minus-{ref}")
        return self.condition_mtz[name]

    def _check_spool_beside_checkpoint(self) -> None:
        """A checkpoint without its spool is a trained model without its data: refuse."""
        if self.checkpoint_path.exists() and self.spool.n_records == 0:
            ckpt = self.checkpoint_path
            raise ConfigError(
                f"{ckpt} holds a trained model but its spool {self.spool.directory} holds no "
                "crystals (removed or moved?); starting would train a new model over it. "
                f"Restore the spool directory, or move the checkpoint aside (mv {ckpt} "
                f"{ckpt}.old) to start afresh")

    def _curve_options(self) -> dict[str, Any]:
        if not self.config.curve_secret_key:
            return {}
        from streamvi.ingest.keys import load_allowed_clients, load_secret_key

        return {"curve_server_secret": load_secret_key(self.config.curve_secret_key)[1],
                "curve_allowed_clients": load_allowed_clients(self.config.curve_allowed_clients)}

    def _make_engine(self, cell) -> MergeEngine:
        if self._space is not None and parse_cell(cell).parameters == self.cell.parameters:
            space = self._space
        else:
            space = ReciprocalSpace(self.space_group, cell, self.config.dmin,
                                    anomalous=self.config.anomalous)
        coupled = (self.conditions[0] if self._table_sets() > 1 and self.config.coupled_prior
                   else None)
        engine = MergeEngine(space, self.trainer_config, self.engine_config,
                             conditions=self.conditions, coupled_reference=coupled,
                             spare_conditions=(self.config.new_conditions
                                               if self.conditions else 0),
                             prior=self.prior)
        store = engine.store
        store.cell_length_tolerance = self.config.cell_length_tolerance
        store.cell_angle_tolerance_deg = self.config.cell_angle_tolerance
        store.intensity_outlier_ratio = self.config.intensity_outlier_ratio or None
        if self.reference is not None:
            try:
                engine.reference = ReferenceSetting(space, self.reference)
            except ConfigError as exc:
                # the cell came from the first crystal: too late to refuse to start
                log.error("%s; publishing in the merge's own indexing setting", exc)
        log.info("merging in %s, cell %s, dmin %.2f Å: %d unique rows on %s",
                 self.space_group.hm, tuple(round(x, 3) for x in space.cell.parameters),
                 space.dmin, space.n_unique, engine.device)
        return engine

    # ------------------------------------------------------------------ life cycle

    def start(self) -> "Service":
        """Recover (checkpoint + spool), then start ingest and training threads."""
        if self.config.om_url:
            # the OM bridge plugin, found through the entry points; it refuses pickle unless
            # om_allow_pickle, before anything runs
            self._om = plugin_module("om")
            self.om_bridge = self._om.OmBridge(self.config.om_url,
                                               allow_pickle=self.config.om_allow_pickle).start()
        self._recover()
        self.ingestor.start()
        self._thread = threading.Thread(target=self._train_loop, name="streamvi-train",
                                        daemon=True)
        self._thread.start()
        if self.config.metrics_port >= 0:
            from streamvi.publish.http import start_http_server

            self.metrics_server = start_http_server(self.snapshot, self.config.metrics_host,
                                                    self.config.metrics_port)
        log.info("listening on %s; output in %s", ", ".join(self.ingestor.bound_endpoints),
                 self.out_dir)
        return self

    def stop(self, *, checkpoint: bool = True, publish: bool = True) -> None:
        """Stop ingest, finish the current step, publish and checkpoint."""
        if self.om_bridge is not None:
            self.om_bridge.stop()
            self.om_bridge = None
        self.ingestor.stop()
        self._drain_queue()
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        with self.lock:           # crystals still waiting for the merge to start go in now
            self._maybe_start(force=True)
        if publish:
            self.publish_now()
        if checkpoint:
            self.checkpoint()
        self.spool.close()
        if self.publisher is not None:
            self.publisher.close()
        if self.metrics_server is not None:
            self.metrics_server.shutdown()

    def request_publish(self) -> None:
        """Ask the training thread to publish a snapshot at its next turn."""
        self._publish_request.set()

    # ------------------------------------------------------------------ training thread

    @property
    def duplicates(self) -> int:
        """Crystals received that were stored already (spooled or recognised before)."""
        return self._spooled_duplicates + self.counters.duplicates_not_spooled

    def _already_stored(self, msg: CrystalMessage) -> bool:
        """Ingest's question before spooling (its thread): is ``msg`` stored already?"""
        engine = self.engine
        kind = None if engine is None else engine.store.duplicate_kind(msg)
        if kind == "content":
            self._content_duplicates_unspooled += 1
        return kind is not None

    def _add_many(self, items: list[tuple[Any, CrystalMessage, float]], *,
                  replay: bool = False) -> None:
        """Store ``(seq, crystal, arrival time)`` items from the ingest queue, all at once;
        before the merge has started they wait for it (:meth:`_maybe_start`)."""
        if not replay and self._replayed_below:
            items = [it for it in items if it[0] is None or it[0] >= self._replayed_below]
        if not items:
            return
        if self.engine is None:
            if self._failure_permanent:
                return            # spooled: a restart with the cause fixed merges them
            if not self._pending:
                self._pending_since = time.monotonic()
            self._pending.extend(items)
            self._pending_replay = replay
            self._maybe_start()
            return
        self._store(items, replay=replay)

    def _maybe_start(self, *, force: bool = False) -> None:
        """Start the merge once the first crystals are in (or the wait is over, or
        ``force``): the cell (configured, from the checkpoint, or their consensus), then the
        store takes them all at once."""
        if self.engine is not None or not self._pending or self._failure_permanent:
            return
        enough = len(self._pending) >= self.config.consensus_crystals
        waited = (not self._pending_replay and time.monotonic() - self._pending_since
                  >= self.config.consensus_wait)
        if not (force or enough or waited):
            return
        items, self._pending = self._pending, []
        try:
            self.engine = self._make_engine(self._merge_cell(items))
        except Exception as exc:      # a mistake the first crystals reveal: fail, loudly
            self._fail(f"cannot start the merge: {exc}", kind="start", permanent=True)
            return
        self._store(items, replay=self._pending_replay)

    def _merge_cell(self, items: list[tuple[Any, CrystalMessage, float]]):
        """The merge's cell: configured, the checkpoint's, or the first crystals' consensus."""
        if self.cell is not None:
            return self.cell
        if self._checkpoint_cell is not None:
            self.cell_source = "checkpoint"
            return self._checkpoint_cell
        first = [it[1].cell for it in items[: self.config.consensus_crystals]]
        cons = consensus_cell(first, self.space_group,
                              length_tolerance=self.config.cell_length_tolerance,
                              angle_tolerance_deg=self.config.cell_angle_tolerance)
        self.cell_source = f"consensus of {cons.n_crystals} crystals"
        log.info("no cell configured: cell from the first %d crystals %s (median %s%s)",
                 cons.n_crystals, format_cell(cons.cell),
                 " ".join(f"{x:.4g}" for x in cons.median),
                 f", symmetrised to {self.space_group.hm}" if cons.symmetrized else "")
        if cons.n_outliers:
            log.warning("%d of the first %d crystals disagree with that cell by more than "
                        "%g %% in a length or %g° in an angle: they are rejected "
                        "(cell_mismatch). If the cell is wrong, set cell", cons.n_outliers,
                        cons.n_crystals, 100 * self.config.cell_length_tolerance,
                        self.config.cell_angle_tolerance)
        return cons.cell

    def _note_condition(self, msg: CrystalMessage) -> None:
        """Warn, once per condition name, that a crystal labelled with a pump-probe condition
        was merged with all the others: ``conditions`` is not set."""
        name = msg.condition
        if (self.conditions or not name or name in self._conditions_seen
                or len(self._conditions_seen) >= 32):
            return
        self._conditions_seen.add(name)
        log.warning("crystal %s/%s carries condition %r: this service merges every "
                    "condition into one table because `conditions` is not set; to merge "
                    "them side by side with a live light-minus-dark, start it with "
                    "--conditions (e.g. --conditions dark,%s; docs/time-resolved.md)",
                    msg.run, msg.image, name, name if name != "dark" else "light")

    def _store(self, items: list[tuple[Any, CrystalMessage, float]], *, replay: bool) -> None:
        """Add items to the store and count what it did with each."""
        results = self.engine.add_many([it[1] for it in items], [it[2] for it in items])
        for item, res in zip(items, results):
            if res.duplicate:
                self._spooled_duplicates += 1
                if res.duplicate_kind == "content":
                    self._content_duplicates += 1
                if not replay:       # duplicates in the spool were counted when they arrived
                    self.counters.add_duplicates()
            elif res.rejected is not None:
                self.crystals_rejected[res.rejected] = \
                    self.crystals_rejected.get(res.rejected, 0) + 1
                if not replay:       # counted and dead-lettered when they first arrived
                    self.counters.add_crystals_rejected(res.rejected)
                    self._report_rejected(item[1], res.rejected, res.detail)
                if res.rejected == "cell_mismatch":
                    self._note_mismatch(item[1])
            elif res.image_id is not None:
                self.crystals_merged += 1
                self._note_condition(item[1])
            self.reflections_outside += res.n_outside
        if self.crystals_merged and self._failure_kind == "cell":
            log.warning("crystals of the merge's cell arrive now: the service is running again")
            self._clear_failure("cell")

    def _note_mismatch(self, msg: CrystalMessage) -> None:
        """When the first ``consensus_crystals`` crystals are all of another cell, the set-up
        is wrong (or the sample): fail, saying which cell the crystals have."""
        if self.crystals_merged or self._failure_kind is not None:
            return
        self._mismatch_cells.append(tuple(msg.cell))
        if len(self._mismatch_cells) < self.config.consensus_crystals:
            return
        median = np.median(np.array(self._mismatch_cells), axis=0)
        self._fail(f"none of the first {len(self._mismatch_cells)} crystals has the merge's "
                   f"cell {format_cell(self.engine.space.cell)} (their median cell: "
                   f"{' '.join(f'{x:.4g}' for x in median)}); all are rejected as "
                   "cell_mismatch: fix cell (or leave it empty for a consensus), or check the "
                   "sample", kind="cell")
        self._mismatch_cells = []
    def _report_rejected(self, msg: CrystalMessage, reason: str, detail: str) -> None:
        """Dead-letter a crystal the store refused, and log the first few of each reason."""
        what = (f"run {clip(msg.run, 80)!r} image {clip(msg.image)!r} crystal {msg.crystal}: "
                f"{detail}")
        try:
            payload = encode_crystal(msg)
        except Exception:            # noqa: BLE001 - the record goes without its payload
            payload = None
        self.dead_letter.write(source="store", reason=reason, detail=what, payload=payload)
        self._reject_log.log(logging.WARNING, f"store:{reason}",
                             "rejected a crystal (%s; kept in dead-letter.jsonl): %s", reason,
                             what)

    def _drain_queue(self, max_items: int = 1 << 30) -> int:
        n = 0
        while n < max_items:
            items = self.ingestor.get_batch(max_items=512, timeout=0)
            if not items:
                break
            with self.lock:
                self._add_many(items)
            n += len(items)
        return n

    def _train_loop(self) -> None:
        publishing = Every(self.config.publish_interval)
        checkpointing = Every(self.config.checkpoint_interval)
        while not self._stop.is_set():
            try:
                have_data = self.engine is not None and self.engine.n_images > 0
                items = self.ingestor.get_batch(max_items=256, timeout=0 if have_data else 0.1)
                with self.lock:
                    self._add_many(items)
                    self._maybe_start()
                if items:
                    self._check_reach()
                if self.engine is not None and self.engine.n_images > 0:
                    with self.lock:
                        report = self.engine.step()
                    if report is not None:
                        self.step_seconds.append(report.seconds)
                        self.trained_reflections += report.n_reflections
                        self.last_step_report = report
                now = time.monotonic()
                if publishing.due(now, force=self._publish_request.is_set()):
                    self._publish_request.clear()
                    self.publish_now()
                    self._check_partiality()
                    self._check_dmin()
                if checkpointing.due(now):
                    self.checkpoint()
                if self._loop_errors:
                    self._recovered()
            except Exception as exc:  # keep the service alive; say so once, then fail
                self._loop_error(exc)
                self._stop.wait(min(MAX_RETRY_DELAY_S, 0.5 * 2 ** min(self._loop_errors, 6)))

    def _loop_error(self, exc: Exception) -> None:
        """Log the first error of a run of them with its trace; at the
        :data:`FAIL_AFTER_ERRORS`-th the service is failed (no trace per batch)."""
        self._loop_errors += 1
        text = f"{type(exc).__name__}: {exc}"
        if self._loop_errors == 1:
            log.error("training loop error (retrying): %s", text, exc_info=exc)
        elif self._loop_errors == FAIL_AFTER_ERRORS:
            self._fail(f"training loop keeps failing ({FAIL_AFTER_ERRORS} times in a row): "
                       f"{text}", kind="loop")

    def _recovered(self) -> None:
        if self._failure_kind == "loop":
            log.warning("training recovered after %d failed attempts; the service is "
                        "running again", self._loop_errors)
            self._clear_failure("loop")
        self._loop_errors = 0

    def _fail(self, reason: str, *, kind: str, permanent: bool = False) -> None:
        """Mark the service failed (status, /healthz, the page's badge) and say why, once.

        ``kind``: ``loop`` (the training loop keeps failing; clears when it works again),
        ``cell`` (no crystal fits the merge's cell; clears when one does), ``start`` (the
        merge cannot start; ``permanent``: until a restart with the cause fixed)."""
        self._failure_permanent = self._failure_permanent or permanent
        if self.failure == reason:
            return
        self.failure, self._failure_kind = reason, kind
        log.error("service FAILED: %s. Ingest goes on and spools what arrives (nothing is "
                  "lost); fix the cause and restart on the same out_dir", reason)

    def _clear_failure(self, kind: str) -> None:
        if self._failure_kind == kind and not self._failure_permanent:
            self.failure = self._failure_kind = None

    @property
    def state(self) -> str:
        """``failed``, ``waiting`` (no crystal merged yet), ``collecting`` (the first crystals,
        before the merge starts) or ``merging``."""
        if self.failure is not None:
            return "failed"
        if self.engine is None:
            return "collecting" if self._pending else "waiting"
        return "merging" if self.crystals_merged else "waiting"

    def merge_cell(self) -> list[float] | None:
        """The merge's cell (Å, degrees), once known."""
        if self.engine is not None:
            return [float(x) for x in self.engine.space.cell.parameters]
        return None if self.cell is None else [float(x) for x in self.cell.parameters]

    # ------------------------------------------------------------------ outputs

    def publish_now(self) -> MergeSnapshot | None:
        """Snapshot the posterior; write MTZ files and publish on PUB.  None if no data."""
        with self.lock:
            if self.engine is None or self.engine.n_images == 0:
                return None
            history = [f"streamvi serve, {self.crystals_merged} crystals"]
            if self.partiality_switch is not None:
                history.append(self.partiality_switch.history_line())
            snaps = None
            if self.conditions:
                # the reference condition's merge is the one the feedback, the metrics and
                # latest.mtz follow; every condition has its own files
                snaps = self.engine.condition_snapshots(history)
                snap = snaps[self.conditions[0]]
            else:
                snap = self.engine.snapshot(history=history)
            # the half-set sums as they were when the snapshots' counts were taken: with
            # conditions each condition's own, as its counts are (the reference first)
            store = self.engine.store
            names: list[str | None] = [None]
            if snaps is not None:
                names = [self.conditions[0]] + [n for n in snaps if n != self.conditions[0]]
            index = {n: None if n is None else store.conditions.index(n) for n in names}
            sums, wilson = store_sums(self.engine, [index[n] for n in names])
        # with conditions the forecasts are of each condition's images, at their own rate
        feedback = self._observe(snap, sums[0], wilson,
                                 self.images_per_second(condition=index[names[0]]))
        for name, own in zip(names[1:], sums[1:]):
            fb = self._observe(snaps[name], own, wilson,
                               self.images_per_second(condition=index[name]),
                               live=self._condition_feedback(name))
            if fb is not None:
                self.latest_condition_feedback[name] = fb
        self.mtz.write(snap)
        if snaps is not None:
            self._write_conditions(snaps)
        self._reject_log.flush()       # how many refusals the log left out lately
        self.latest_feedback = feedback
        self.latest = snap
        self.latest_conditions = snaps or {}
        self.history.append(self._figures(snap))
        if self.publisher is not None:
            extra = {"service": self.status()}
            if feedback is not None:
                extra["feedback"] = feedback.to_dict()
            ref = None if snaps is None else self.conditions[0]
            self.publisher.publish(snap, extra_stats=extra, condition=ref)
            for name, other in (snaps or {}).items():
                if name != ref:
                    self.publisher.publish_merged(other, condition=name)
        return snap

    def _condition_feedback(self, name: str) -> LiveFeedback:
        """The live feedback of condition ``name`` (made at its first snapshot: a condition
        may appear mid-run), with the reference's targets and model (the anomalous peaks of
        its own map)."""
        if name not in self.condition_feedback:
            self.condition_feedback[name] = LiveFeedback(self.feedback.targets,
                                                         self.feedback.model)
        return self.condition_feedback[name]

    def _write_conditions(self, snaps: dict[str, MergeSnapshot]) -> None:
        """``latest-<condition>.mtz`` per condition and the differences against the
        reference (DF, SIGDF, W, WDF; docs/time-resolved.md), each replaced atomically."""
        ref = self.conditions[0]
        figures = {}
        for name, snap in snaps.items():
            self._condition_files(name).write(snap)
            if name == ref:
                continue
            # one ΔF table per pair and publish: the file and the map's peaks read it (made
            # again by the writer, whose failures MtzSnapshots counts, if it fails here)
            ds = None
            try:
                ds = difference_dataset(snap, snaps[ref])
                fig = difference_figures(snap, snaps[ref], n_shells=self.config.n_shells,
                                         dataset=ds)
                fig["images"] = int(snap.n_images + snaps[ref].n_images)   # the pair's
                if self.difference_model is not None:
                    fig["peaks"] = difference_peaks(
                        ds.cell, ds.spacegroup, ds.get_hkls(), ds["WDF"].to_numpy(np.float64),
                        self.difference_model, dmin=snap.space.dmin)
                figures[f"{name}-minus-{ref}"] = fig
            except Exception:  # noqa: BLE001 - the files are written all the same
                log.exception("difference figures of %s minus %s failed", name, ref)

            def difference(path, *, info, light=snap, name=name, ds=ds):
                return write_difference_mtz(light, snaps[ref], path, names=(name, ref),
                                            info=info, dataset=ds)

            self.difference_mtz[name].write(snap, writer=difference)
        self.latest_differences = figures

    def _observe(self, snap: MergeSnapshot, sum_i_half: np.ndarray,
                 wilson: np.ndarray | None, rate: float,
                 live: LiveFeedback | None = None) -> Feedback | None:
        """The snapshot's live feedback (training-free figures, forecasts, peaks; ``rate``:
        the snapshot's images per second; ``live``: whose, default :attr:`feedback`); a
        failure is logged and must not stop the MTZ files."""
        try:
            return (live or self.feedback).observe(snap, sum_i_half=sum_i_half,
                                                   wilson_sigma=wilson, rate=rate)
        except Exception:  # noqa: BLE001 - publishing goes on without it
            log.exception("live feedback of snapshot %d failed", snap.snapshot_id)
            return None

    def _figures(self, snap: MergeSnapshot) -> dict[str, Any]:
        st = snap.stats
        out = {"time": snap.time, "n_images": snap.n_images, "step": snap.step,
               "cc_half": st.overall.get("cc_half"), "completeness": st.overall.get("completeness"),
               "cc_half_shells": list(st.cc_half), "completeness_shells": list(st.completeness),
               "d_min_shells": list(st.d_min), "resolution_cc_half": st.resolution_cc_half,
               "loss": None if self.last_step_report is None else self.last_step_report.loss,
               "images_per_s": self.images_per_second()}
        if self.latest_differences:
            # per pair, against the images of its two conditions: is a signal emerging
            out["differences"] = {
                pair: {"images": f["images"], "cc_half": f["delta_cc_half_overall"],
                       "significant": f["significant"]}
                for pair, f in self.latest_differences.items()}
        return out

    def images_per_second(self, window_s: float = 30.0, condition: int | None = None) -> float:
        """Arrival rate of crystals over the last ``window_s`` seconds (of one condition's,
        by its table set's index)."""
        return images_per_second(self.engine, window_s, condition)

    def status(self) -> dict[str, Any]:
        """Current figures for the stats topic, status page and terminal (JSON-able)."""
        return service_status(self)

    def _mtz_info(self) -> MtzInfo:
        """Names and wavelength for the MTZ files: the runs merged, their mean wavelength."""
        store = self.engine.store if self.engine is not None else None
        if store is None:
            return MtzInfo()
        return MtzInfo.from_runs(dict(store.runs), store.mean_wavelength())

    @property
    def duplicates_by_content(self) -> int:
        """Crystals recognised as duplicates by their content, by the store and by ingest."""
        return self._content_duplicates + self._content_duplicates_unspooled

    @property
    def crystals_waiting(self) -> int:
        """Crystals waiting for the merge to start."""
        return len(self._pending)

    def om_status(self) -> dict[str, Any] | None:
        """The OM bridge's figures with the crystals received per OM hit; None if off."""
        if self.om_bridge is None:
            return None
        return self._om.om_status(self.om_bridge,
                                  int(self.counters.snapshot()["crystals_received"]))

    def snapshot(self, *, store: bool = False) -> ServiceSnapshot:
        """Everything the publishers show, copied now (:mod:`streamvi.service.status`);
        ``store``: with the store's figures and the memory in use (``/metrics``)."""
        return service_snapshot(self, store=store)

    # ------------------------------------------------------------------ checkpoints

    @property
    def checkpoint_path(self) -> Path:
        return self.checkpoints.path

    def checkpoint(self) -> Path | None:
        """Save trainer, scheduler and counters atomically; None if nothing to save."""
        self.spool.flush()
        with self.lock:
            if self.engine is None:
                return None
            state = {"engine": self.engine.state_dict(), "counters": self.counters.state_dict(),
                     "crystals_merged": self.crystals_merged,
                     "spool_records": self.spool.n_records, "time": time.time(),
                     "space": self.engine.space.to_dict(),
                     "partiality_switch": (None if self.partiality_switch is None
                                           else self.partiality_switch.to_dict())}
        return self.checkpoints.save(state)

    def _recover(self) -> None:
        """Rebuild the store from the spool and load the last checkpoint, if any.

        A checkpoint that cannot be read, or is not shaped as this version writes them, is
        moved to ``checkpoint.corrupt`` and training starts afresh from the spool
        (docs/operations.md).  One made for another space group or cell is refused; one made
        for another ``dmin`` (the same merge, its table extended or cut) is moved to
        ``checkpoint.dmin-<old>.pt`` and the spool replayed into the new table.
        """
        state = self._load_checkpoint()
        other_dmin = None
        if state is not None:
            other_dmin = self._check_checkpoint_space(state["space"])
            # counters first: replay then counts only what arrived after the checkpoint
            self.counters.load_state_dict(state["counters"])
            if self.cell is None:
                self._checkpoint_cell = [float(x) for x in state["space"]["cell"]]
            if state.get("partiality_switch") and self.partiality_watch is not None:
                # the merge was switched before the restart: build it switched, so that
                # the checkpoint, written with the geometric partiality, loads
                self._apply_partiality_switch(
                    PartialitySwitch.from_dict(state["partiality_switch"]))
        t0 = time.perf_counter()
        n = self._replay(count=True)
        if n:
            log.info("replayed %d spooled crystals in %.1f s", n, time.perf_counter() - t0)
        if state is None:
            return
        if other_dmin is not None:
            # the spool went into a table of the new dmin: the model of the old one stays
            # on disk beside it, and training starts afresh on everything the spool holds
            self.checkpoints.retire(f"dmin-{other_dmin:.2f}",
                                    f"was made for dmin {other_dmin:.2f} Å, this run asks "
                                    f"for {self.config.dmin:.2f} Å")
            return
        if self.engine is None:
            return
        if state["space"] != self.engine.space.to_dict():
            raise ConfigError(f"{self.checkpoint_path} was made for {state['space']} but the "
                              f"configuration says {self.engine.space.to_dict()}; use the same "
                              "space group/cell/dmin or another out_dir")
        try:
            self.engine.load_state_dict(state["engine"])
        except Exception as exc:         # readable by torch, but not a model of ours
            self.checkpoints.set_aside(exc)
            self._restart_from_spool()
            return
        self.recovered_from_checkpoint = True
        log.info("resumed from checkpoint of %s (step %d)", time.ctime(state["time"]),
                 self.engine.trainer.step)

    def _load_checkpoint(self) -> dict | None:
        """The checkpoint's state, or None (none, or set aside as corrupt)."""
        # the counters are checked before anything uses them
        return self.checkpoints.load(
            check=lambda state: IngestCounters().load_state_dict(state["counters"]))

    def _check_checkpoint_space(self, space: dict) -> float | None:
        """Refuse a checkpoint made for another merge before anything is replayed; one made
        for the same merge with another ``dmin`` is not refused: returns that dmin (the
        spool is then replayed into the new table and the checkpoint moved aside), else
        None."""
        want = {"space_group": self.space_group.xhm(), "dmin": float(self.config.dmin),
                "anomalous": bool(self.config.anomalous)}
        if self.cell is not None:
            want["cell"] = [float(x) for x in self.cell.parameters]
        got = {k: space.get(k) for k in want}
        if got != want and {**got, "dmin": want["dmin"]} == want:
            return float(got["dmin"])
        if got != want:
            raise ConfigError(f"{self.checkpoint_path} was made for {got} but the configuration "
                              f"says {want}; use the same space group, cell and anomalous "
                              "mode (another dmin is taken: the spool is replayed into its "
                              "table), or another out_dir")

    def _replay(self, *, count: bool) -> int:
        """Feed every spooled crystal to the store (counting the uncounted ones if
        ``count``); returns how many."""
        n = 0
        stop = self.spool.n_records
        records = replay_spool(self.spool, stop=stop,
                               counters=self.counters if count else None,
                               max_message_bytes=self.config.max_message_bytes)
        while chunk := [(seq, msg, time.time())
                        for seq, msg, _arrival in itertools.islice(records, 256)]:
            self._add_many(chunk, replay=True)
            n += len(chunk)
        self._maybe_start(force=True)
        self._pending_replay = False
        self._replayed_below = max(self._replayed_below, stop)
        self._recount()
        return n

    def _recount(self) -> None:
        """Every spooled record was just replayed, so the duplicates and refusals among them
        are all those ever counted for the spool; the checkpoint's counts lack the ones
        counted after it was written (or all, without a checkpoint).  Counters only grow."""
        c = self.counters
        missing = self._spooled_duplicates - (c.duplicates - c.duplicates_not_spooled)
        if missing > 0:
            c.add_duplicates(missing)
        counted = c.snapshot()["crystals_rejected"]
        for reason, n in self.crystals_rejected.items():
            if n > counted.get(reason, 0):
                c.add_crystals_rejected(reason, n - counted.get(reason, 0))

    def _restart_from_spool(self) -> None:
        """A fresh model: forget the engine built for the checkpoint, replay again."""
        self.engine = None
        self._checkpoint_cell = None
        self.cell_source = "config" if self.cell is not None else None
        self.crystals_merged = self._spooled_duplicates = self._content_duplicates = 0
        self.crystals_rejected = {}
        self.reflections_outside = 0
        self._replay(count=False)

    # ------------------------------------------------------------------ partiality check

    def _check_partiality(self) -> None:
        """After a publish: hand the snapshot's trend to the partiality check, and switch
        the merge to the geometric partiality when it says so."""
        watch, snap, engine = self.partiality_watch, self.latest, self.engine
        if watch is None or snap is None or engine is None:
            return
        switch = watch.observe(snap.falloff_b, engine.store.n_geometry_images,
                               engine.trainer.step)
        if switch is not None:
            self._switch_partiality(switch)

    def _check_reach(self) -> None:
        """After crystals are stored: the data's own verdict (no snapshot or training needed,
        :mod:`streamvi.merging.reach`), and the switch when it says so."""
        watch, engine = self.partiality_watch, self.engine
        if watch is None or engine is None:
            return
        snap = self.latest
        switch = watch.observe_reach(engine.store.reach.evidence(),
                                     None if snap is None else snap.falloff_b,
                                     engine.trainer.step)
        if switch is not None:
            self._switch_partiality(switch)

    def _check_dmin(self) -> None:
        """After a publish: say once (and again when the suggested limit moves by 0.05 Å or
        more) where the table's dmin leaves data out (:func:`dmin_advice_of`)."""
        advice = dmin_advice_of(self)
        if advice is None or self.engine is None:
            return
        new = self.engine.store.beyond_dmin.suggested_dmin()
        if self._dmin_advised is None or abs(new - self._dmin_advised) >= 0.05:
            self._dmin_advised = new
            log.warning("%s", advice)

    def _apply_partiality_switch(self, switch: PartialitySwitch) -> None:
        self.partiality_switch = switch
        self.partiality_watch = None
        self.trainer_config = replace(self.trainer_config, geometric_partiality=True)

    def _switch_partiality(self, switch: PartialitySwitch) -> None:
        """Start the merge again, from the spool, with the geometric partiality (``merge``
        merges again; the service replays what it has, a few seconds, and trains on)."""
        if switch.reason == "reach":
            log.warning("%s", switch.reach_warning())
        else:
            log.warning("the scales' resolution trend has given the amplitudes B %+.1f A^2 "
                        "for %d snapshots in a row, on %d crystals that report orientations, "
                        "profile radii and a bandwidth: the mark of observations the "
                        "partialities do not reach (pure background at low resolution). "
                        "Merging again, from the spool, with the geometric partiality "
                        "(docs/model.md, change 23; partiality_check = false keeps the merge "
                        "as it was)", switch.falloff_b,
                        self.partiality_watch.snapshots if self.partiality_watch else 1,
                        switch.crystals)
        t0 = time.perf_counter()
        with self.lock:
            self._apply_partiality_switch(switch)
            self.spool.flush()
            self._restart_from_spool()
        log.info("merge restarted with the geometric partiality: %d crystals replayed in "
                 "%.1f s", self.crystals_merged, time.perf_counter() - t0)
        self.checkpoint()      # a restart from now on resumes the switched merge

    # ------------------------------------------------------------------ helpers for callers

    def wait_until(self, predicate, timeout: float, poll: float = 0.05) -> bool:
        """Block until ``predicate(self)`` is true or ``timeout`` s pass; returns success."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if predicate(self):
                return True
            time.sleep(poll)
        return bool(predicate(self))

    def all_visited(self, min_visits: int = 1) -> bool:
        """Every stored image visited at least ``min_visits`` times and the queue empty."""
        if self.engine is None:
            return False
        st = self.engine.store
        return self.ingestor.queue_depth == 0 and bool(
            (st.visits[: st.n_images] >= min_visits).all())

