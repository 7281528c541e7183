"""Soak: ``streamvi serve`` fed a steady simulated beamtime for a long time (not run in CI).

The service runs as a subprocess (the flags of benchmarks/kill9_trials.py, with the status
page on a free port and production-like intervals); this process streams simulated images
(:mod:`streamvi_sim`, image i depends only on (seed, i)) at ``--rate`` images/s with
:func:`streamvi.producers.send.send_messages` for ``--minutes``, and every ``--interval`` seconds
prints one JSON line::

    {"t_s": 60.0, "rss_mb": 612.3, "sent": 1200, "received": 1200, "merged": 1200,
     "queue_depth": 0, "steps": 3410, "lag_p50_s": 0.41, "lag_p95_s": 1.9, ...}

``sent`` is what the producer handed to ZeroMQ (messages in), ``received`` what the service
counted, ``merged`` what it stored (messages out of ingest), ``lag_*`` the arrival → first
training visit lag percentiles over the last 100,000 images.  At the end the producer
stops, the service catches up and gets SIGTERM, and a ``final`` line gives exact counts from
its checkpoint, RSS at start / peak / end, the RSS slope over the second half (MiB/min: the
store grows with the data, nothing else should), the worst lag p95, and ``problems``.

    python benchmarks/soak.py --minutes 30 --rate 20
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import kill9_trials as k9  # noqa: E402 - the serve-process machinery lives there
from overload import api_status, rss_mb  # noqa: E402


def _round(x: float | None, digits: int = 3) -> float | None:
    return None if x is None else round(x, digits)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--minutes", type=float, default=30.0, help="how long to stream")
    p.add_argument("--rate", type=float, default=20.0, help="images per second")
    p.add_argument("--interval", type=float, default=10.0, help="s between report lines")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dmin", type=float, default=3.0, help="Å, of the simulation and merge")
    p.add_argument("--rss-budget-mb", type=float, default=4096.0)
    p.add_argument("--work", type=Path, help="keep the output (spool, MTZ, log) in this "
                   "directory (default: a temporary one, removed at the end)")
    args = p.parse_args(argv)

    from streamvi.producers.send import send_messages
    from streamvi_sim import SimulationConfig, simulate_images, simulate_structure

    work = args.work or Path(tempfile.mkdtemp(prefix="soak-"))
    work.mkdir(parents=True, exist_ok=True)
    n_images = int(args.rate * args.minutes * 60) + 1
    cfg = SimulationConfig(n_images=n_images, seed=args.seed, dmin=args.dmin, n_atoms=300)
    truth = simulate_structure(cfg)
    serve = k9.ServeProcess(work / "out", k9.free_port(), work / "serve.log", extra=[
        "--metrics-port", "0", "--checkpoint-interval", "30", "--publish-interval", "10",
        "--dmin", str(args.dmin)]).start()
    base_url = serve.banner["http"]
    stop = threading.Event()
    produced = {"n": 0}

    def items():
        for msg in simulate_images(cfg, truth):
            if stop.is_set():
                return
            produced["n"] += 1
            yield msg

    report: dict = {}

    def producer() -> None:
        report["send"] = send_messages(items(), serve.url, rate=args.rate, timeout_s=120)

    thread = threading.Thread(target=producer, name="producer", daemon=True)
    t0 = time.monotonic()
    deadline = t0 + args.minutes * 60
    thread.start()
    samples: list[dict] = []
    problems: list[str] = []
    try:
        while True:
            now = time.monotonic()
            if now >= deadline:
                break
            time.sleep(min(args.interval, deadline - now))
            st = api_status(base_url)["status"]
            line = {"t_s": round(time.monotonic() - t0, 1),
                    "rss_mb": round(rss_mb(serve.proc.pid), 1),
                    "sent": produced["n"], "received": st["counters"]["crystals_received"],
                    "merged": st["crystals_merged"], "queue_depth": st["queue_depth"],
                    "steps": st["steps"], "lag_p50_s": _round(st["lag_p50_s"]),
                    "lag_p95_s": _round(st["lag_p95_s"]), "unvisited": st["unvisited_images"],
                    "reflections_stored": st["reflections_stored"],
                    "mtz_written": st["mtz_written"], "mtz_errors": st["mtz_errors"]}
            samples.append(line)
            print(json.dumps(line), flush=True)
        stop.set()
        thread.join(150)
        sent = report["send"].sent if "send" in report else produced["n"]
        t_wait = time.monotonic()
        while api_status(base_url)["status"]["counters"]["crystals_received"] < sent:
            if time.monotonic() - t_wait > 300:
                problems.append("the service did not catch up within 300 s")
                break
            time.sleep(0.5)
        rss_end = round(rss_mb(serve.proc.pid), 1)
        status = serve.terminate(timeout=300)
    finally:
        stop.set()
        serve.kill9()
    final = k9.read_checkpoint(work / "out")
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)
    c = final["counters"] if final else {}
    if not final or not (c["crystals_received"] == sent == final["crystals_merged"]):
        problems.append("counts differ from what was sent")
    if c.get("messages_rejected"):
        problems.append(f"rejects: {c['messages_rejected']}")
    if status != 0:
        problems.append(f"exit status {status} on SIGTERM")
    rss = np.array([s["rss_mb"] for s in samples]) if samples else np.zeros(0)
    ts = np.array([s["t_s"] for s in samples]) if samples else np.zeros(0)
    half = ts >= ts[-1] / 2 if ts.size else ts.astype(bool)
    slope = (float(np.polyfit(ts[half] / 60, rss[half], 1)[0])
             if half.sum() >= 3 else None)
    if rss.size and rss.max() > args.rss_budget_mb:
        problems.append(f"RSS {rss.max():.0f} MiB over the budget {args.rss_budget_mb:g}")
    lag95 = [s["lag_p95_s"] for s in samples if s["lag_p95_s"] is not None]
    print(json.dumps({
        "final": True, "minutes": args.minutes, "rate": args.rate, "sent": sent,
        "crystals_received": c.get("crystals_received"),
        "crystals_merged": final["crystals_merged"] if final else None,
        "duplicates": c.get("duplicates"), "steps": final["step"] if final else None,
        "rss_start_mb": float(rss[0]) if rss.size else None,
        "rss_peak_mb": float(rss.max()) if rss.size else None, "rss_end_mb": rss_end,
        "rss_slope_mb_per_min_second_half": None if slope is None else round(slope, 2),
        "lag_p95_s_worst": max(lag95) if lag95 else None,
        "lag_p95_s_last": lag95[-1] if lag95 else None,
        "exit_status": status, "out_dir": str(work / "out") if args.work else None,
        "problems": problems}),
        flush=True)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
