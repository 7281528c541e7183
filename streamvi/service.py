"""``streamvi serve``: ingest, store, trainer and publishers wired into one running service.

Threads:

- the ingest thread (:class:`~streamvi.ingest.Ingestor`) receives, validates and spools
  messages and puts accepted crystals on a bounded queue;
- the training thread (:meth:`Service._train_loop`) drains that queue into the store without
  waiting, takes one optimiser step whenever there are data, and publishes snapshots and
  checkpoints on their intervals;
- the HTTP thread (status page and ``/metrics``), when enabled.

A checkpoint holds the trainer, scheduler and counters; the store is rebuilt on restart by
replaying the spool, so a crash (even ``kill -9``) loses nothing that was spooled, and
crystals are deduplicated by ``(run, image, crystal)`` so nothing is counted twice.
"""
from __future__ import annotations

import itertools
import logging
import os
import tempfile
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any

import numpy as np
import torch

from streamvi.config import ServiceConfig
from streamvi.counters import IngestCounters
from streamvi.deadletter import DeadLetter
from streamvi.engine import EngineConfig, MergeEngine, MergeSnapshot
from streamvi.errors import ConfigError
from streamvi.ingest import Ingestor, replay_spool
from streamvi.publish.snapshots import MtzSnapshots
from streamvi.reference import ReferenceSetting, check_same_lattice, read_reference
from streamvi.spool import Spool
from streamvi.symmetry import ReciprocalSpace, parse_cell, parse_space_group
from streamvi.trainer import TrainerConfig
from streamvi.wire import CrystalMessage

log = logging.getLogger(__name__)

CHECKPOINT_NAME = "checkpoint.pt"


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
        self.cell = parse_cell(config.cell) if config.cell else None
        if not config.dmin > 0:
            raise ConfigError(f"dmin = {config.dmin}: must be a positive resolution in Å")
        sync_free_modes = {"auto": None, "on": True, "off": False}
        if config.sync_free_steps.lower() not in sync_free_modes:
            raise ConfigError(f"sync_free_steps = {config.sync_free_steps!r}: must be auto, on "
                              "or off")
        sync_free = sync_free_modes[config.sync_free_steps.lower()]
        self.reference = None
        if config.reference:
            self.reference = read_reference(config.reference, config.reference_column or None)
            if self.cell is not None:
                check_same_lattice(self.reference, self.space_group, self.cell)
        self.trainer_config = TrainerConfig(
            d_model=config.d_model, n_layers=config.n_layers, mc_samples=config.mc_samples,
            device=config.device, seed=config.seed, cpu_threads=config.cpu_threads,
            scale_kl_weight=config.scale_kl_weight,
            posterior_average_decay=config.posterior_average,
            pooled_merge_ratio=config.pooled_merge_ratio, sync_free=sync_free,
            refine_geometry=config.refine_geometry)
        budget = int(config.device_budget_mb * 2**20) if config.device_budget_mb > 0 else None
        self.engine_config = EngineConfig(batch_images=config.batch_images,
                                          new_share=config.new_share, n_shells=config.n_shells,
                                          device_budget_bytes=budget,
                                          recentre_falloff=config.recentre_falloff)
        self.engine: MergeEngine | None = None
        self.counters = IngestCounters()
        self.spool = Spool(self.out_dir / "spool", fsync=config.spool_fsync)
        self.dead_letter = DeadLetter(self.out_dir / "dead-letter.jsonl")
        self.mtz = MtzSnapshots(self.out_dir, keep=config.keep_snapshots)
        self.ingestor = Ingestor(
            list(config.listen), mode=config.listen_mode, topic=config.sub_topic.encode(),
            queue_max_messages=config.queue_max_messages, rcvhwm=config.rcvhwm,
            spool=self.spool, dead_letter=self.dead_letter, counters=self.counters,
            max_message_bytes=config.max_message_bytes, **self._curve_options())
        self.publisher = None
        if config.publish_endpoint:
            from streamvi.publish.zmqpub import Publisher

            self.publisher = Publisher(config.publish_endpoint)
        self.latest: MergeSnapshot | None = None
        #: (time, figures) of every snapshot, for the status page's plots over time
        self.history: deque[dict[str, Any]] = deque(maxlen=2000)
        self.lock = threading.RLock()
        self._stop = threading.Event()
        self._publish_request = threading.Event()
        self._thread: threading.Thread | None = None
        self.started_at = time.time()
        self.crystals_merged = 0
        self.duplicates = 0
        self.reflections_outside = 0
        self.step_seconds: deque[float] = deque(maxlen=1000)
        self.trained_reflections = 0
        self.last_step_report = None
        self.recovered_from_checkpoint = False
        self.metrics_server = None
        self.om_bridge = None

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

    def _curve_options(self) -> dict[str, Any]:
        if not self.config.curve_secret_key:
            return {}
        from streamvi.keys import load_allowed_clients, load_secret_key

        return {"curve_server_secret": load_secret_key(self.config.curve_secret_key)[1],
                "curve_allowed_clients": load_allowed_clients(self.config.curve_allowed_clients)}

    def _make_engine(self, cell) -> MergeEngine:
        space = ReciprocalSpace(self.space_group, cell, self.config.dmin,
                                anomalous=self.config.anomalous)
        engine = MergeEngine(space, self.trainer_config, self.engine_config)
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
            from streamvi_om import attach_om

            attach_om(self)       # refuses pickle unless om_allow_pickle: before anything runs
        self._recover()
        self.ingestor.start()
        self._thread = threading.Thread(target=self._train_loop, name="streamvi-train",
                                        daemon=True)
        self._thread.start()
        if self.config.metrics_port >= 0:
            from streamvi.publish.http import start_http_server

            self.metrics_server = start_http_server(self, self.config.metrics_host,
                                                    self.config.metrics_port)
        log.info("listening on %s; output in %s", ", ".join(self.ingestor.bound_endpoints),
                 self.out_dir)
        return self

    def stop(self, *, checkpoint: bool = True, publish: bool = True) -> None:
        """Stop ingest, finish the current step, publish and checkpoint."""
        if self.om_bridge is not None:
            from streamvi_om import detach_om

            detach_om(self)
        self.ingestor.stop()
        self._drain_queue()
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
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

    def _add_many(self, items: list[tuple[Any, CrystalMessage, float]], *,
                  replay: bool = False) -> None:
        """Store ``(seq, crystal, arrival time)`` items from the ingest queue, all at once."""
        if not items:
            return
        if self.engine is None:
            self.engine = self._make_engine(self.cell if self.cell is not None
                                            else parse_cell(items[0][1].cell))
        results = self.engine.add_many([it[1] for it in items], [it[2] for it in items])
        for res in results:
            if res.duplicate:
                self.duplicates += 1
                if not replay:       # duplicates in the spool were counted when they arrived
                    self.counters.add_duplicates()
            elif res.image_id is not None:
                self.crystals_merged += 1
            self.reflections_outside += res.n_outside

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
        next_publish = time.monotonic() + self.config.publish_interval
        next_checkpoint = time.monotonic() + self.config.checkpoint_interval
        while not self._stop.is_set():
            try:
                have_data = self.engine is not None and self.engine.n_images > 0
                items = self.ingestor.get_batch(max_items=256, timeout=0 if have_data else 0.1)
                if items:
                    with self.lock:
                        self._add_many(items)
                if self.engine is not None and self.engine.n_images > 0:
                    with self.lock:
                        report = self.engine.step()
                    if report is not None:
                        self.step_seconds.append(report.seconds)
                        self.trained_reflections += report.n_reflections
                        self.last_step_report = report
                now = time.monotonic()
                if now >= next_publish or self._publish_request.is_set():
                    self._publish_request.clear()
                    self.publish_now()
                    next_publish = now + self.config.publish_interval
                if now >= next_checkpoint:
                    self.checkpoint()
                    next_checkpoint = now + self.config.checkpoint_interval
            except Exception:  # keep the service alive; the error is logged with its trace
                log.exception("training loop error (continuing)")
                time.sleep(0.5)

    # ------------------------------------------------------------------ outputs

    def publish_now(self) -> MergeSnapshot | None:
        """Snapshot the posterior; write MTZ files and publish on PUB.  None if no data."""
        with self.lock:
            if self.engine is None or self.engine.n_images == 0:
                return None
            snap = self.engine.snapshot(history=[f"streamvi serve, {self.crystals_merged} "
                                                 "crystals"])
        self.mtz.write(snap)
        self.latest = snap
        self.history.append(self._figures(snap))
        if self.publisher is not None:
            self.publisher.publish(snap, extra_stats={"service": self.status()})
        return snap

    def _figures(self, snap: MergeSnapshot) -> dict[str, Any]:
        st = snap.stats
        return {"time": snap.time, "n_images": snap.n_images, "step": snap.step,
                "cc_half": st.overall.get("cc_half"), "completeness": st.overall.get("completeness"),
                "cc_half_shells": list(st.cc_half), "completeness_shells": list(st.completeness),
                "d_min_shells": list(st.d_min), "resolution_cc_half": st.resolution_cc_half,
                "loss": None if self.last_step_report is None else self.last_step_report.loss,
                "images_per_s": self.images_per_second()}

    def images_per_second(self, window_s: float = 30.0) -> float:
        """Arrival rate of crystals over the last ``window_s`` seconds."""
        if self.engine is None or self.engine.n_images == 0:
            return 0.0
        st = self.engine.store
        t = st.arrival_time[: st.n_images]
        now = time.time()
        recent = int((t > now - window_s).sum())
        span = min(window_s, max(now - float(t.min()), 1e-3))
        return recent / span

    def status(self) -> dict[str, Any]:
        """Current figures for the stats topic, status page and terminal (JSON-able)."""
        c = self.counters.snapshot()
        st = self.engine.store if self.engine is not None else None
        # read without the lock (the status page must answer while a step runs): the
        # ingest side may add images meanwhile, so every per-image array is cut at one n
        visits, lags = np.zeros(0), np.zeros(0)
        if st is not None:
            n = st.n_images
            visits = st.visits[:n].copy()
            lags = st.first_visit_lags(n)
        return {
            "uptime_s": time.time() - self.started_at,
            "counters": c,
            "crystals_merged": self.crystals_merged, "duplicates": self.duplicates,
            "reflections_stored": 0 if st is None else st.n_reflections,
            "reflections_outside": self.reflections_outside,
            "queue_depth": self.ingestor.queue_depth,
            "images_per_s": self.images_per_second(),
            "steps": 0 if self.engine is None else self.engine.trainer.step,
            "reflections_trained": self.trained_reflections,
            "unvisited_images": int((visits == 0).sum()),
            "images_rejected": 0 if st is None else st.n_rejected,
            # per twin law, in space groups with an indexing ambiguity (as of the last snapshot)
            "images_by_setting": {} if st is None else st.setting_counts(),
            # the relative B the last snapshot gave the amplitudes (docs/model.md change 10)
            "falloff_b": None if self.latest is None else self.latest.falloff_b,
            "visits_median": float(np.median(visits)) if visits.size else 0.0,
            "lag_p50_s": float(np.percentile(lags, 50)) if lags.size else None,
            "lag_p95_s": float(np.percentile(lags, 95)) if lags.size else None,
            "mtz_written": self.mtz.n_written, "mtz_errors": self.mtz.n_errors,
            "device": str(self.engine.device) if self.engine is not None else None,
            "om": self._om_status(),
        }

    def _om_status(self) -> dict[str, Any] | None:
        if self.om_bridge is None:
            return None
        from streamvi_om import om_status

        return om_status(self)

    # ------------------------------------------------------------------ checkpoints

    @property
    def checkpoint_path(self) -> Path:
        return self.out_dir / CHECKPOINT_NAME

    def checkpoint(self) -> Path | None:
        """Save trainer, scheduler and counters atomically; None if nothing to save."""
        self.spool.flush()
        with self.lock:
            if self.engine is None:
                return None
            state = {"engine": self.engine.state_dict(), "counters": self.counters.state_dict(),
                     "crystals_merged": self.crystals_merged,
                     "spool_records": self.spool.n_records, "time": time.time(),
                     "space": self.engine.space.to_dict()}
        tmp = None
        try:
            fd, tmp = tempfile.mkstemp(dir=self.out_dir, prefix=".checkpoint.", suffix=".tmp")
            os.close(fd)
            torch.save(state, tmp)
            with open(tmp, "rb") as fh:
                os.fsync(fh.fileno())
            os.replace(tmp, self.checkpoint_path)
        except (OSError, RuntimeError) as exc:   # torch.save reports a full disk as RuntimeError
            log.error("checkpoint %s failed: %s (disk full? will retry at the next interval)",
                      self.checkpoint_path, exc)
            if tmp is not None:
                Path(tmp).unlink(missing_ok=True)
            return None
        return self.checkpoint_path

    def _recover(self) -> None:
        """Rebuild the store from the spool and load the last checkpoint, if any."""
        state = None
        if self.checkpoint_path.exists():
            try:
                state = torch.load(self.checkpoint_path, map_location="cpu", weights_only=True)
            except Exception as exc:
                bad = self.checkpoint_path.with_suffix(".corrupt")
                os.replace(self.checkpoint_path, bad)
                log.error("checkpoint %s unreadable (%s): moved to %s; training restarts from "
                          "the spooled data", self.checkpoint_path, exc, bad)
        if state is not None:
            # counters first: replay then counts only what arrived after the checkpoint
            self.counters.load_state_dict(state["counters"])
        n = 0
        t0 = time.perf_counter()
        records = replay_spool(self.spool, counters=self.counters,
                               max_message_bytes=self.config.max_message_bytes)
        while chunk := [(None, msg, time.time())
                        for _seq, msg, _arrival in itertools.islice(records, 256)]:
            self._add_many(chunk, replay=True)
            n += len(chunk)
        if n:
            log.info("replayed %d spooled crystals in %.1f s", n, time.perf_counter() - t0)
        # Every spooled record was just replayed, so the duplicates among them are all those
        # ever received; the checkpoint's count lacks the ones counted after it was written
        # (or all of them, without a checkpoint).  Counters only grow.
        missing = self.duplicates - self.counters.duplicates
        if missing > 0:
            self.counters.add_duplicates(missing)
        if state is not None and self.engine is not None:
            if state.get("space") != self.engine.space.to_dict():
                raise ConfigError(f"{self.checkpoint_path} was made for {state.get('space')} "
                                  f"but the configuration says {self.engine.space.to_dict()}; "
                                  "use the same space group/cell/dmin or another out_dir")
            self.engine.load_state_dict(state["engine"])
            self.recovered_from_checkpoint = True
            log.info("resumed from checkpoint of %s (step %d)",
                     time.ctime(state["time"]), self.engine.trainer.step)

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

