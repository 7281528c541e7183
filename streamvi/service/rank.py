"""One rank of a data-parallel merge: its life cycle (replay, checkpoint, publish, stop).

Each rank runs :func:`run_rank`: it replays its own spool, loads rank 0's checkpoint through
the same :class:`~streamvi.service.lifecycle.Checkpoints` as the service (atomic, forced to
disk, an unusable file set aside), takes crystals from its own ingest, trains in lock-step
with the other ranks (:class:`~streamvi.merging.distributed.DistributedEngine`), and rank 0
writes the MTZ snapshots and checkpoints on their intervals.  The job file of ``torchrun``
is read by :mod:`streamvi.cli.rank`.

The ranks make the service's partiality check on the data (change 26 of docs/model.md,
:mod:`streamvi.merging.reach`): each rank's tally of the observations beyond the reported
geometry's reach is summed over the ranks at every sync, every rank reads the same verdict,
and when it fires all of them start again from their spools with the geometric partiality.
The check on the scales' trend (change 23) needs the service's snapshots and is not made here.
"""
from __future__ import annotations

import logging
import os
import signal
import threading
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch.distributed as dist

from streamvi.errors import ConfigError
from streamvi.ingest.counters import IngestCounters
from streamvi.ingest.deadletter import DeadLetter
from streamvi.ingest.receiver import Ingestor, replay_spool
from streamvi.ingest.spool import Spool
from streamvi.merging.distributed import DistributedEngine, default_backend, init_process_group
from streamvi.merging.engine import EngineConfig
from streamvi.merging.reach import REACH_MAX_CRYSTALS, REACH_VECTOR_SIZE, reach_evidence_of
from streamvi.merging.trainer import TrainerConfig
from streamvi.publish.mtz_files import MtzSnapshots
from streamvi.service.lifecycle import CHECKPOINT_NAME, RANK_KEYS, Checkpoints, Every
from streamvi.service.partiality import PartialitySwitch, PartialityWatch
from streamvi.symmetry import ReciprocalSpace

log = logging.getLogger(__name__)


@dataclass
class RankResult:
    """What :func:`run_rank` did on one rank (JSON-able with :meth:`to_dict`)."""

    rank: int
    world_size: int
    crystals_received: int
    images_stored: int
    reflections_stored: int
    global_images: int
    steps: int
    seconds: float
    train_seconds: float
    comm_seconds: float
    sync_seconds: float
    visits_min: int
    visits_median: float
    snapshots: int
    keys: list[str] = field(default_factory=list)
    mtz: str | None = None
    #: this rank's record of the reflections that arrived beyond the table's dmin
    #: (:meth:`~streamvi.merging.beyond.BeyondDmin.to_dict`)
    beyond_dmin: dict = field(default_factory=dict)
    #: the partiality check's switch to the geometric partiality
    #: (:meth:`~streamvi.service.partiality.PartialitySwitch.to_dict`), None without one
    partiality_switch: dict | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def run_rank(rank: int, world_size: int, *, endpoints: Sequence[str],
             space: ReciprocalSpace | dict, out_dir: str | os.PathLike,
             init_method: str | None = None, backend: str = "auto",
             trainer_config: TrainerConfig | None = None,
             engine_config: EngineConfig | None = None, bind: bool = False,
             expected_crystals: int | None = None, min_visits: int = 1,
             idle_timeout_s: float | None = None, max_seconds: float | None = None,
             publish_interval: float = 10.0, checkpoint_interval: float = 60.0,
             threads: int | None = None, spool: bool = True, resume: bool = True,
             queue_max_messages: int = 2000, rcvhwm: int = 1000,
             keep_keys: bool = False, partiality_check: bool = True) -> RankResult:
    """Run one rank of a data-parallel merge until the ranks agree to stop.

    Parameters
    ----------
    rank, world_size
        This process's place in the job.
    endpoints
        ZeroMQ addresses to PULL from: by default each rank *connects* to a producer's bound
        PUSH socket (:class:`~streamvi.producers.fanout.FanOut`), which deals messages round robin; with ``bind=True``
        each rank binds its own address and the producer connects to all of them.
    space
        The unique-reflection table (or its :meth:`~ReciprocalSpace.to_dict`).
    out_dir
        Rank 0 writes ``latest.mtz``, numbered snapshots and ``checkpoint.pt`` there; each
        rank keeps its spool and dead-letter file in ``out_dir/rank<N>/``.
    init_method
        torch.distributed rendezvous (default ``env://``: ``MASTER_ADDR``/``MASTER_PORT``).
    backend
        ``auto`` (NCCL on CUDA, else gloo), ``nccl`` or ``gloo``.
    expected_crystals
        Stop once this many crystals were received over all ranks (those replayed from the
        spools included) and every stored image has had ``min_visits`` visits.
    idle_timeout_s
        Stop when no rank received anything for this long and every image has had
        ``min_visits`` visits.
    max_seconds
        Stop after this long whatever else (measured on each rank; the first decides).
    threads
        torch CPU threads per rank on the CPU (default: CPU cores / world size, at least 1;
        it replaces ``trainer_config.cpu_threads``).
    spool, resume
        Spool accepted messages per rank; on start, replay the spool and load rank 0's
        checkpoint (model, optimisers) when they exist.
    keep_keys
        Return the ``run/image/crystal`` keys this rank stored (tests).
    partiality_check
        Read the ranks' pooled verdict on the observations beyond the reported geometry's
        reach (:func:`~streamvi.merging.reach.reach_suspect`) as crystals arrive, and start
        again from the spools with the geometric partiality when it fires (as ``serve``;
        needs ``spool``).  A checkpoint written after the switch resumes with it.

    A SIGTERM to any rank stops all of them at the next step, with a final snapshot and
    checkpoint.
    """
    t_start = time.monotonic()
    tcfg = trainer_config or TrainerConfig()
    if threads is None and default_backend(tcfg.device) == "gloo":
        threads = max(1, (os.cpu_count() or 1) // world_size)
    if threads is not None:
        tcfg = replace(tcfg, cpu_threads=threads)      # the trainer sets it on the CPU
    init_process_group(rank, world_size, init_method=init_method, backend=backend,
                       device=tcfg.device)
    if not isinstance(space, ReciprocalSpace):
        space = ReciprocalSpace.from_dict(space)
    out = Path(out_dir)
    rank_dir = out / f"rank{rank}"
    rank_dir.mkdir(parents=True, exist_ok=True)
    the_spool = Spool(rank_dir / "spool") if spool else None
    counters = IngestCounters()
    checkpoints = Checkpoints(out / CHECKPOINT_NAME, required=RANK_KEYS)
    # rank 0 sets an unusable checkpoint aside; the others read the same file and agree
    state = checkpoints.load(set_aside=rank == 0) if resume else None
    if state is not None and state["space"] != space.to_dict():
        raise ConfigError(f"{checkpoints.path} was made for {state['space']}, not "
                          f"{space.to_dict()}; use another out_dir")
    switch = None
    if state is not None and state.get("partiality_switch"):
        # the checkpoint's model was trained with the geometric partiality: resume with it
        switch = PartialitySwitch.from_dict(state["partiality_switch"])
        tcfg = replace(tcfg, geometric_partiality=True)
    checking = partiality_check and not tcfg.geometric_partiality
    if checking and the_spool is None:
        if rank == 0:
            log.warning("the partiality check starts the merge again from the spools when "
                        "it switches; with spool off the ranks merge without it")
        checking = False
    watch = PartialityWatch() if checking else None

    def replayed(count: bool, replay: bool = resume, stop: int | None = None
                 ) -> tuple[DistributedEngine, int]:
        """A fresh engine (a collective) holding this rank's spooled crystals (those below
        record ``stop``; default all)."""
        eng = DistributedEngine(space, tcfg, engine_config)
        n = 0
        if the_spool is not None and replay:
            for _seq, msg, arrival in replay_spool(the_spool, stop=stop,
                                                   counters=counters if count else None):
                eng.add(msg, arrival_time=arrival)
                n += 1
        return eng, n

    def history() -> list[str]:
        lines = [f"streamvi data-parallel, {world_size} ranks"]
        return lines + [switch.history_line()] if switch is not None else lines

    # received: crystals this rank took in, replayed ones included
    engine, received = replayed(count=True)
    if state is not None:
        try:
            engine.load_state_dict(state["engine"])
        except Exception as exc:   # noqa: BLE001 - readable by torch, not a model of ours
            if rank == 0:
                checkpoints.set_aside(exc)
            engine, received = replayed(count=False)   # every rank fails alike: all restart
    ingestor = Ingestor(list(endpoints), bind=bind, spool=the_spool,
                        dead_letter=DeadLetter(rank_dir / "dead-letter.jsonl"),
                        counters=counters, queue_max_messages=queue_max_messages,
                        rcvhwm=rcvhwm)
    ingestor.start()
    stop_requested = threading.Event()
    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, lambda *_: stop_requested.set())
    mtz = MtzSnapshots(out) if rank == 0 else None
    last_arrival = time.monotonic()
    publishing = Every(publish_interval)
    checkpointing = Every(checkpoint_interval)
    train_seconds = 0.0
    snapshots = 0
    replayed_below = 0       # after a switch: spooled records below this are stored already
    try:
        while True:
            have_data = engine.store.n_images > 0
            items = ingestor.get_batch(512, timeout=0 if have_data else 0.02)
            received += len(items)
            arrived = bool(items)
            if replayed_below:
                # still queued at the switch, spooled before it: stored by the replay
                items = [it for it in items if it[0] is None or it[0] >= replayed_below]
            engine.add_many([it[1] for it in items], [it[2] for it in items])
            now = time.monotonic()
            if arrived:
                last_arrival = now
            st = engine.store
            visited = bool((st.visits[:st.n_images] >= min_visits).all()) \
                and ingestor.queue_depth == 0
            idle = idle_timeout_s is not None and now - last_arrival >= idle_timeout_s
            timed_out = max_seconds is not None and now - t_start >= max_seconds
            flags = [received, visited, idle, timed_out, stop_requested.is_set()]
            if watch is not None:
                flags += list(engine.store.reach.state_vector())
            state = engine.sync(flags)
            g_received, n_visited, n_idle, n_timed_out, n_stop = state.flags[:5]
            if watch is not None:
                # every rank holds the same sums, so all of them decide alike
                evidence = reach_evidence_of(state.flags[5:5 + REACH_VECTOR_SIZE])
                switch = watch.observe_reach(evidence, None, engine.trainer.step)
                if switch is not None:
                    watch = None
                    tcfg = replace(tcfg, geometric_partiality=True)
                    if rank == 0:
                        log.warning("%s", switch.reach_warning("the ranks' spools"))
                    the_spool.flush()
                    replayed_below = the_spool.n_records
                    engine, _ = replayed(count=False, replay=True, stop=replayed_below)
                    if rank == 0:
                        checkpoints.save(_checkpoint_state(engine, switch))
                    continue
                if evidence.crystals >= REACH_MAX_CRYSTALS:
                    watch = None     # the tallies read no more crystals: no verdict to come
            all_visited = n_visited == world_size and state.min_images > 0
            if (n_timed_out or n_stop
                    or (expected_crystals is not None and g_received >= expected_crystals
                        and all_visited)
                    or (n_idle == world_size and all_visited)):
                break
            t0 = time.perf_counter()
            report = engine.step_after_sync(state)
            if report is not None:
                train_seconds += time.perf_counter() - t0
            else:
                time.sleep(0.005)     # some rank holds no crystal yet: do not spin
            if rank == 0 and engine.store.n_images and publishing.due(now):
                mtz.write(engine.snapshot(history=history()))
                snapshots += 1
            if rank == 0 and checkpointing.due(now):
                checkpoints.save(_checkpoint_state(engine, switch))
        if rank == 0 and engine.global_images:
            mtz.write(engine.snapshot(history=history()))
            snapshots += 1
            checkpoints.save(_checkpoint_state(engine, switch))
        dist.barrier()
    finally:
        ingestor.stop()
        if the_spool is not None:
            the_spool.close()
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    st = engine.store
    visits = st.visits[:st.n_images]
    result = RankResult(
        rank=rank, world_size=world_size, crystals_received=received,
        images_stored=st.n_images, reflections_stored=st.n_reflections,
        global_images=engine.global_images, steps=engine.trainer.step,
        seconds=time.monotonic() - t_start, train_seconds=train_seconds,
        comm_seconds=engine.trainer.comm_seconds, sync_seconds=engine.sync_seconds,
        visits_min=int(visits.min()) if visits.size else 0,
        visits_median=float(np.median(visits)) if visits.size else 0.0,
        snapshots=snapshots,
        keys=[f"{k[0]}/{k[1]}/{k[2]}" for k in st.keys] if keep_keys else [],
        mtz=str(mtz.latest) if mtz is not None and snapshots else None,
        beyond_dmin=st.beyond_dmin.to_dict(),
        partiality_switch=None if switch is None else switch.to_dict())
    suggested = st.beyond_dmin.suggested_dmin()
    if suggested is not None:
        # the checkpoint's table is fixed: a larger one is a new merge (another out_dir)
        log.warning("rank %d: %d reflections (%.1f %%) arrived beyond the table's dmin "
                    "%.2f Å, out to %.2f Å, and were not merged; to merge them, run the job "
                    "again with dmin %.2f in another out_dir", rank,
                    st.beyond_dmin.n_beyond, 100.0 * st.beyond_dmin.fraction,
                    st.beyond_dmin.dmin, st.beyond_dmin.d_min_seen, suggested)
    return result


def _checkpoint_state(engine: DistributedEngine,
                      switch: PartialitySwitch | None = None) -> dict[str, Any]:
    """What rank 0's checkpoint holds: the model, optimisers, the merge's space and the
    partiality check's switch (None without one)."""
    return {"engine": engine.state_dict(), "space": engine.space.to_dict(), "time": time.time(),
            "partiality_switch": None if switch is None else switch.to_dict()}
