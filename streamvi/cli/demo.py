"""``streamvi demo``: a simulated beamtime streamed over loopback ZeroMQ into the service.

Nothing but streamvi is needed: the simulator produces crystals at a realistic rate, a sender
thread pushes them to the service's PULL socket, the service merges them live, and at the end
the per-shell table, the MTZ path and -- since the truth is known -- the correlation of the
merged amplitudes with the true ones are printed.
"""
from __future__ import annotations

import argparse
import os
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from streamvi.cli.options import add_options, resolved
from streamvi.config import load_config


def add(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="simulated beamtime → ZeroMQ → service → MTZ, in one go")
    add_options(p, "demo")


def run(args: argparse.Namespace) -> int:
    opts = resolved(args, "demo")
    run_demo(images=opts.images, rate=opts.rate, out_dir=opts.out_dir, seed=opts.seed,
             device=opts.device, anomalous=opts.anomalous, metrics_port=opts.metrics_port)
    return 0


@dataclass
class DemoResult:
    """What the demo measured."""

    mtz: Path
    truth_mtz: Path
    images_sent: int
    crystals_merged: int
    seconds: float
    comparison: dict
    stats: dict


def run_demo(*, images: int = 2000, rate: float = 200.0, out_dir: str | Path = "streamvi-demo",
             seed: int = 0, device: str = "auto", anomalous: bool = True,
             publish_interval: float = 2.0, catch_up_visits: int = 8, max_catch_up_s: float = 120.0,
             metrics_port: int = 0, stream: TextIO | None = None, live_every_s: float = 1.0,
             overrides: dict | None = None) -> DemoResult:
    """Run the embedded default end to end and return its figures.

    Parameters
    ----------
    images
        Crystals to simulate and stream.
    rate
        Images per second sent (XFEL-like pacing).
    catch_up_visits
        After the stream ends, train until every image has been visited this many times
        (or ``max_catch_up_s`` passes).  With 8, the default 2,000 images end 50–60 s
        after the last one arrived on 2 CPU cores, past CrystFEL partialator's figures of
        DESIGN.md section 9 in every column (docs/model.md).
    """
    import reciprocalspaceship as rs

    stream = sys.stdout if stream is None else stream    # the stdout of the moment (tests)

    from streamvi.merging.device import check_device
    from streamvi.quality.evaluate import compare_to_truth
    from streamvi.producers.send import send_messages
    from streamvi.service.service import Service
    from streamvi_sim import SimulationConfig, simulate_images, simulate_structure

    # mistakes that need no data are refused before the beamtime is simulated
    check_device(device, key="--device")
    out = Path(out_dir)
    _check_writable(out)
    sim = SimulationConfig(n_images=images, seed=seed)
    t_sim = time.perf_counter()
    truth = simulate_structure(sim)
    truth_path = out / "truth.mtz"
    truth.to_mtz(truth_path)
    # simulated up front, so the sender keeps the beamline's pace whatever the CPU load
    crystals = list(simulate_images(sim, truth))
    print(f"streamvi demo: simulated {images} still shots "
          f"({sum(len(c) for c in crystals) / max(images, 1):.0f} reflections each) in "
          f"{time.perf_counter() - t_sim:.1f} s", file=stream)
    cell = " ".join(str(x) for x in sim.cell)
    # the simulation's atoms as the "known structure": live anomalous peak heights
    model = out / "model.pdb"
    if anomalous:
        truth.write_model(model)
    cfg = load_config(env={}, overrides={
        **({"model": str(model)} if anomalous else {}),
        "listen": ["tcp://127.0.0.1:*"], "publish_endpoint": "tcp://127.0.0.1:*",
        "out_dir": str(out), "space_group": sim.space_group, "cell": cell, "dmin": sim.dmin,
        "anomalous": anomalous, "publish_interval": publish_interval, "device": device,
        "seed": seed, "metrics_port": metrics_port, "checkpoint_interval": 30.0,
        **(overrides or {})})
    for stale in (out / "spool", out / "checkpoint.pt"):   # a demo always starts afresh
        if stale.is_dir():
            for f in stale.iterdir():
                f.unlink()
        elif stale.exists():
            stale.unlink()
    service = Service(cfg).start()
    endpoint = service.ingestor.bound_endpoints[0]
    http = getattr(service.metrics_server, "url", None)
    print(f"streamvi demo: {images} simulated images at {rate:g}/s → {endpoint}; "
          f"output in {out}" + (f"; status page {http}" if http else ""), file=stream)
    t0 = time.perf_counter()
    sender = threading.Thread(target=send_messages, args=(crystals, endpoint),
                              kwargs={"rate": rate}, name="demo-sender", daemon=True)
    sender.start()
    try:
        while sender.is_alive():
            sender.join(timeout=live_every_s)
            _live_line(service, stream, t0)
        service.wait_until(lambda s: s.counters.snapshot()["crystals_received"] >= images
                           and s.ingestor.queue_depth == 0, timeout=30)
        # the beam is off: keep training until every image has had its share of visits
        deadline = time.monotonic() + max_catch_up_s
        while not service.all_visited(catch_up_visits) and time.monotonic() < deadline:
            time.sleep(live_every_s)
            _live_line(service, stream, t0)
        _live_line(service, stream, t0)
        print(file=stream)
    finally:
        service.stop()
    seconds = time.perf_counter() - t0
    snap = service.latest
    mtz = out / "latest.mtz"
    comparison = compare_to_truth(rs.read_mtz(str(mtz)), rs.read_mtz(str(truth_path)))
    print(snap.stats.format(), file=stream)
    if service.latest_feedback is not None:
        print("when to stop (as `streamvi status` says it):", file=stream)
        for line in service.latest_feedback.lines():
            print(f"  {line}", file=stream)
    print(f"CC(F, F_true) = {comparison['cc_F']:.4f} overall, "
          f"{comparison['cc_F_shells'][-1]:.4f} in the top shell; "
          f"CCanom(true) = {comparison['cc_anom']:.3f}", file=stream)
    if anomalous:
        peaks = _iodide_peaks(mtz, truth)
        if peaks is not None:
            comparison["iodide_peak_sigma"] = peaks["mean_sigma"]
            print(f"anomalous difference map (true phases): the {peaks['n_sites']} iodide sites "
                  f"at {peaks['mean_sigma']:.1f} σ on average, "
                  + ("the highest peaks of the map" if peaks["sites_are_top"] else
                     "not all of them the highest peaks of the map"), file=stream)
    rejected = service.engine.store.n_rejected if service.engine is not None else 0
    if rejected:
        print(f"{rejected} images left out: the merge explains them no better than the Wilson "
              "prior (misindexed, or another lattice)", file=stream)
    print(f"merged MTZ: {mtz}   ({service.crystals_merged} crystals in {seconds:.1f} s)",
          file=stream)
    return DemoResult(mtz=mtz, truth_mtz=truth_path, images_sent=images,
                      crystals_merged=service.crystals_merged, seconds=seconds,
                      comparison=comparison, stats=snap.stats.to_dict())


def _check_writable(out: Path) -> None:
    """Create ``out`` and make sure files can be written in it.

    Raises
    ------
    ConfigError
        Naming the directory and ``--out-dir``.
    """
    from streamvi.errors import ConfigError

    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test.{os.getpid()}"
        probe.touch()
        probe.unlink()
    except OSError as exc:
        raise ConfigError(f"--out-dir {out}: not writable ({exc.strerror}); choose a "
                          "directory you can write") from None


def _iodide_peaks(mtz: Path, truth) -> dict | None:
    """Mean height (σ) of the anomalous difference map at the simulation's iodide sites."""
    import numpy as np
    import reciprocalspaceship as rs

    from streamvi.quality.evaluate import anomalous_peak_heights

    frac = truth.site_frac("I")
    if frac.shape[0] == 0:
        return None
    peaks = anomalous_peak_heights(rs.read_mtz(str(mtz)), truth.to_dataset(), frac)
    return {"n_sites": int(frac.shape[0]), "mean_sigma": float(np.mean(peaks["site_sigma"])),
            "sites_are_top": bool(peaks["sites_are_top"])}


def _live_line(service, stream: TextIO, t0: float) -> None:
    st = service.status()
    snap = service.latest
    cc = snap.stats.overall.get("cc_half") if snap is not None else None
    comp = snap.stats.overall.get("completeness") if snap is not None else None
    uniq = int(snap.stats.overall.get("n_unique", 0)) if snap is not None else 0
    tty = hasattr(stream, "isatty") and stream.isatty()
    stream.write(("\r" if tty else "") + f"{time.perf_counter() - t0:6.1f} s  images {st['crystals_merged']:6d}  "
                 f"{st['images_per_s']:6.1f} images/s  unique {uniq:6d}  "
                 f"CC1/2 {_f(cc)}  completeness {_f(comp, pct=True)}  "
                 f"steps {st['steps']:6d}  unvisited {st['unvisited_images']:5d}" + ("" if tty else "\n"))
    stream.flush()


def _f(x, pct: bool = False) -> str:
    if x is None or x != x:
        return "   -  "
    return f"{100 * x:5.1f}%" if pct else f"{x:6.3f}"

