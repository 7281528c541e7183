"""The service's state as publishers see it: :class:`~streamvi.snapshot.ServiceSnapshot`.

The status page, ``/metrics`` and the ``stats`` topic read one immutable record built here,
at each request, from the service's counters, its latest posterior snapshot and — for
``/metrics`` — the store's figures, read under the service's lock for a moment.  Nothing
outside the service reaches into the trainer, the store or the optimiser.
"""
from __future__ import annotations

import logging
import os
import resource
import time
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Iterator

import numpy as np

import streamvi
from streamvi.publish.http import MAX_HISTORY_POINTS
from streamvi.quality.stats import CC_HALF_CUT
from streamvi.snapshot import ServiceSnapshot, StepFigures, StoreFigures

if TYPE_CHECKING:
    from streamvi.service.service import Service

log = logging.getLogger(__name__)

#: Longest wait (s) for the service lock; the training thread holds it for one step.
LOCK_TIMEOUT_S = 5.0


def service_snapshot(service: "Service", *, store: bool = False) -> ServiceSnapshot:
    """Everything a publisher shows of ``service``, copied now.

    Parameters
    ----------
    service
        The running service.
    store
        Also read the store's figures (under the service's lock, at most
        :data:`LOCK_TIMEOUT_S`; None when it stays busy) and the memory in use.
    """
    # the last step before the durations, and both before the status (which counts the
    # steps): a scrape then never shows more timed steps than steps taken
    report = service.last_step_report
    durations = tuple(service.step_seconds)
    last = None if report is None else StepFigures(
        step=int(report.step), seconds=float(report.seconds), loss=report.loss,
        nll=report.nll, kl_F=report.kl_F, kl_scale=report.kl_scale)
    status = service.status()
    config = service.config
    merge_info = {"space_group": service.space_group.hm, "cell": service.merge_cell(),
                  "cell_source": service.cell_source, "dmin": config.dmin,
                  "anomalous": config.anomalous, "n_shells": config.n_shells,
                  "cc_half_cut": CC_HALF_CUT}
    live = service.feedback
    return ServiceSnapshot(
        time=time.time(), started_at=service.started_at, status=status,
        merge_info=merge_info, merge=service.latest, feedback=service.latest_feedback,
        feedback_history=[] if live is None else live.history_payload(MAX_HISTORY_POINTS),
        history=tuple(service.history.copy()), step_seconds=durations, last_step=last,
        store=store_figures(service) if store else None,
        memory=memory_by_kind(service.engine) if store else {},
        spool_bytes=int(service.spool.bytes_total), version=streamvi.__version__,
        conditions=dict(service.latest_conditions),
        condition_feedback=dict(service.latest_condition_feedback))


@contextmanager
def _holding(lock: Any, timeout: float) -> Iterator[bool]:
    """Acquire ``lock`` for at most ``timeout`` s; yields whether it was acquired."""
    got = lock.acquire(timeout=timeout)
    try:
        yield got
    finally:
        if got:
            lock.release()


def store_figures(service: "Service") -> StoreFigures | None:
    """The store's figures, read under the service's lock; None when it stays busy."""
    engine = service.engine
    if engine is None:
        return StoreFigures()
    st = engine.store
    with _holding(service.lock, LOCK_TIMEOUT_S) as got:
        if not got:
            log.warning("metrics: service lock busy for %.0f s; store metrics skipped in this "
                        "scrape", LOCK_TIMEOUT_S)
            return None
        n = int(st.n_images)
        return StoreFigures(
            n_images=n, n_reflections=int(st.n_reflections), n_rejected=int(st.n_rejected),
            visits=st.visits[:n].copy(),
            lags=st.first_visit_time[:n] - st.arrival_time[:n],
            settings=dict(st.setting_counts()), geometry=engine.geometry_summary())


def process_rss_bytes() -> int:
    """Resident memory of this process, bytes (peak RSS where /proc is absent)."""
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return int(peak) * (1 if os.uname().sysname == "Darwin" else 1024)


def memory_by_kind(engine: Any) -> dict[str, int]:
    """Bytes per ``kind``: process_rss, cuda_allocated/cuda_reserved, store_device/store_host."""
    out = {"process_rss": process_rss_bytes()}
    if engine is None:
        return out
    device = engine.device
    if device.type == "cuda":
        import torch

        out["cuda_allocated"] = int(torch.cuda.memory_allocated(device))
        out["cuda_reserved"] = int(torch.cuda.memory_reserved(device))
    used = engine.store.bytes_used()
    out["store_device"] = int(used.get("device", 0))
    out["store_host"] = int(used.get("host", 0))
    return out


def service_status(service: "Service") -> dict[str, Any]:
    """The service's figures for the stats topic, the status page and the terminal
    (JSON-able), read without the lock: the status page must answer while a step runs."""
    engine = service.engine
    st = engine.store if engine is not None else None
    visits, lags = visit_figures(engine)
    return {
        "uptime_s": time.time() - service.started_at,
        "state": service.state, "failure": service.failure,
        "counters": service.counters.snapshot(),
        "crystals_merged": service.crystals_merged, "duplicates": service.duplicates,
        "duplicates_by_content": service.duplicates_by_content,
        "crystals_rejected": dict(service.crystals_rejected),
        "crystals_waiting": service.crystals_waiting,
        "cell": service.merge_cell(), "cell_source": service.cell_source,
        "skipped_steps": 0 if engine is None else engine.trainer.skipped_steps,
        "reflections_stored": 0 if st is None else st.n_reflections,
        "reflections_outside": service.reflections_outside,
        "queue_depth": service.ingestor.queue_depth,
        # connections, not messages: producers gone, and peers refused at the handshake
        # (not ZeroMQ, CURVE on one side only, an unauthorised CURVE key)
        "producer_disconnects": service.ingestor.producer_disconnects,
        "handshake_failures": service.ingestor.handshake_failures,
        "images_per_s": images_per_second(engine),
        "steps": 0 if engine is None else engine.trainer.step,
        "reflections_trained": service.trained_reflections,
        "unvisited_images": int((visits == 0).sum()),
        "images_rejected": 0 if st is None else st.n_rejected,
        # per twin law, in space groups with an indexing ambiguity (as of the last snapshot)
        "images_by_setting": {} if st is None else st.setting_counts(),
        # the relative B the last snapshot gave the amplitudes (docs/model.md), and what to
        # do where it shows the partialities' trend with the partiality check off; with it
        # on, the switch to the geometric partiality it made (streamvi.service.partiality)
        "falloff_b": None if service.latest is None else service.latest.falloff_b,
        "partiality_advice": partiality_advice_of(service),
        "partiality_switch": (None if service.partiality_switch is None
                              else service.partiality_switch.to_dict()),
        # the arriving reflections beyond the table's dmin (streamvi.merging.beyond), and
        # the restart to merge them where the CC½ fit holds to the table's edge
        "beyond_dmin": None if st is None else st.beyond_dmin.to_dict(),
        "dmin_advice": dmin_advice_of(service),
        "visits_median": float(np.median(visits)) if visits.size else 0.0,
        "lag_p50_s": float(np.percentile(lags, 50)) if lags.size else None,
        "lag_p95_s": float(np.percentile(lags, 95)) if lags.size else None,
        "mtz_written": service.mtz.n_written, "mtz_errors": service.mtz.n_errors,
        "device": str(engine.device) if engine is not None else None,
        "om": service.om_status(),
        # pump-probe: images per condition and, per light-minus-dark pair, the latest
        # publish's half-set CC of ΔF and significant differences (docs/time-resolved.md)
        "condition_images": ({} if st is None or not service.conditions else
                             dict(zip(service.conditions,
                                      (int(n) for n in st.condition_images())))),
        "differences": dict(service.latest_differences),
        # every other condition's own targets, forecasts (at its images' rate), resolution
        # and anomalous peaks, as the reference's feedback has them
        "condition_feedback": {name: fb.to_dict() for name, fb in
                               dict(service.latest_condition_feedback).items()},
        # the learnt correlations per resolution shell of the coupled prior: of each
        # condition with the reference, and of the merge with the prior data set
        "coupling": {} if engine is None else engine.coupled_correlations(),
        "prior": (None if engine is None or engine.prior_name is None else
                  {"name": engine.prior_name, "r_shells": engine.prior_correlation()}),
    }


def dmin_advice_of(service: "Service") -> str | None:
    """What to do where the table's ``dmin`` leaves data out: restart with the suggested
    limit (:meth:`~streamvi.merging.beyond.BeyondDmin.suggested_dmin`) where enough of the
    arriving reflections lie beyond the table and the last snapshot's data CC½ fit does not
    place the resolution inside the table (``beyond dmin``, or a fit whose 95 % interval
    reaches the table's edge); None otherwise (a fit that ends inside the table says the
    reflections beyond it are noise)."""
    engine, feedback = service.engine, service.latest_feedback
    if engine is None or feedback is None or feedback.resolution is None:
        return None
    record = engine.store.beyond_dmin
    fit = feedback.resolution
    if fit.beyond_dmin:
        why = "CC½ holds to the table's edge"
    elif fit.state == "fit" and fit.low is not None and fit.low <= record.dmin * 1.01:
        why = (f"the CC½ fit's 95 % interval ({fit.low:.2f}–{fit.high:.2f} Å) reaches the "
               "table's edge")
    else:
        return None
    new = record.suggested_dmin()
    if new is None:
        return None
    return (f"{record.fraction:.0%} of the arriving reflections ({record.n_beyond}) lie beyond "
            f"the table's dmin {record.dmin:.2f} Å, out to {record.d_min_seen:.2f} Å, and "
            f"{why}: restart on the same out_dir with dmin {new:.2f} (--dmin {new:.2f}, "
            "STREAMVI_DMIN) to merge them; the spool is replayed into the larger table "
            "(docs/operations.md)")


def partiality_advice_of(service: "Service") -> str | None:
    """:func:`streamvi.merging.offline.partiality_advice` for the live merge: restart with
    ``--geometric-partiality`` where the last snapshot's fall-off B shows the partialities'
    trend and the partiality check is off (with it on the service switches by itself), else
    None."""
    from streamvi.merging.offline import partiality_advice

    engine = service.engine
    if engine is None or service.latest is None or service.partiality_watch is not None:
        return None
    return partiality_advice(service.latest.falloff_b, engine.store.n_geometry_images,
                             engine.trainer.config.geometric_partiality)


def images_per_second(engine: Any, window_s: float = 30.0,
                      condition: int | None = None) -> float:
    """Arrival rate of crystals over the last ``window_s`` seconds; ``condition``: of that
    condition's crystals only (the index of its table set; pump–probe)."""
    if engine is None or engine.n_images == 0:
        return 0.0
    st = engine.store
    n = st.n_images
    t = st.arrival_time[:n]
    now = time.time()
    recent_mask = t > now - window_s
    if condition is not None:
        recent_mask &= st.image_condition[:n] == condition
    recent = int(recent_mask.sum())
    span = min(window_s, max(now - float(t.min()), 1e-3))
    return recent / span


def visit_figures(engine: Any) -> tuple[np.ndarray, np.ndarray]:
    """Visits per stored image and the arrival → first-visit lags (s) of the visited ones,
    read without the lock: the ingest side may add images meanwhile, so every per-image
    array is cut at one ``n``."""
    if engine is None:
        return np.zeros(0), np.zeros(0)
    st = engine.store
    n = st.n_images
    return st.visits[:n].copy(), st.first_visit_lags(n)
