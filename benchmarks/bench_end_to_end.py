"""End to end: a simulated beamline at a fixed rate → a real ``streamvi serve`` over ZeroMQ.

A producer process simulates ``--images`` still shots (DESIGN.md section 9 defaults, ~800
reflections each), then PUSHes them over loopback TCP at ``--rate`` images per second to a
:class:`~streamvi.service.service.Service` running in this process (ingest, spool, store, training,
MTZ snapshots every ``--publish-interval`` s).  When the stream has been absorbed the service
trains on for at most ``--catch-up-s`` seconds (until every image has been visited), publishes
once more and stops.  Prints one JSON line per figure:

- ``e2e_images_per_s``: images absorbed per second while the stream lasted;
- ``e2e_train_reflections_per_s``: reflections trained per second while it lasted;
- ``e2e_lag_first_visit_p50|p95|p99``: arrival → first training visit, s (store's
  ``arrival_time``/``first_visit_time``; images never visited are counted in
  ``unvisited``);
- ``e2e_lag_published_p50|p95|p99``: arrival → the first MTZ snapshot that includes the image
  (written to disk), s;
- ``e2e_visits_median``, ``e2e_visits_min``: training visits per image when the stream has
  been absorbed (``after_catch_up`` gives them after the catch-up);
- ``e2e_rss_bytes_per_reflection``: peak resident memory of this process above what it held
  before the service started, per stored reflection (fixed costs included; the slope of
  RSS against stored reflections is ``marginal_bytes_per_reflection``, sampled every 50 ms,
  when the stream is long enough); ``e2e_store_bytes_per_reflection``: the
  reflection store's allocation (on the device when training on a GPU) per reflection.

    python benchmarks/bench_end_to_end.py [--images N] [--rate R] [--device D] [--quick]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time

import os as _os
import sys as _sys

_sys.path.insert(0, _os.path.dirname(_os.path.abspath(__file__)))
from _machine import machine_name  # noqa: E402 - shared with the other benchmarks

import numpy as np


def produce(endpoint: str, images: int, rate: float, seed: int, dmin: float) -> None:
    """The producer process: simulate everything first, then send at a fixed pace."""
    from streamvi.producers.send import send_messages
    from streamvi_sim import SimulationConfig, simulate_images, simulate_structure

    sim = SimulationConfig(n_images=images, seed=seed, dmin=dmin)
    crystals = list(simulate_images(sim, simulate_structure(sim)))
    report = send_messages(crystals, endpoint, rate=rate, timeout_s=300)
    print(json.dumps({"sent": report.sent, "seconds": report.seconds,
                      "images": report.images,
                      "reflections": int(sum(len(c) for c in crystals))}), flush=True)


def _rss_bytes() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _percentiles(x: np.ndarray) -> dict[str, float | None]:
    x = x[np.isfinite(x)]
    if x.size == 0:
        return {"p50": None, "p95": None, "p99": None}
    p = np.percentile(x, [50, 95, 99])
    return {"p50": float(p[0]), "p95": float(p[1]), "p99": float(p[2])}


def _marginal(samples: list[tuple[int, int]], n_final: int) -> float | None:
    """Slope of RSS against stored reflections once the engine exists (bytes/reflection)."""
    pts = np.array([p for p in samples if p[0] >= 0.05 * n_final], dtype=np.float64)
    if pts.shape[0] < 3 or np.ptp(pts[:, 0]) < 0.5 * n_final:
        return None
    return float(np.polyfit(pts[:, 0], pts[:, 1], 1)[0])


def publication_lags(arrival: np.ndarray, published: list[tuple[float, int]]) -> np.ndarray:
    """Per image (store order), time from arrival to the first snapshot written that holds
    it (a snapshot of ``n`` images holds images ``0 … n-1``); NaN if none did."""
    out = np.full(arrival.shape[0], np.nan)
    if not published:
        return out
    times = np.array([t for t, _ in published])
    held = np.maximum.accumulate(np.array([n for _, n in published]))
    first = np.searchsorted(held, np.arange(arrival.shape[0]), side="right")
    ok = first < len(published)
    out[ok] = times[first[ok]] - arrival[ok]
    return out


def run(*, images: int, rate: float, device: str, publish_interval: float, catch_up_s: float,
        dmin: float, seed: int = 0, threads: int | None = None,
        model: dict | None = None) -> dict:
    from streamvi.config import load_config
    from streamvi.service.service import Service
    from streamvi_sim import SimulationConfig

    sim = SimulationConfig(n_images=images, seed=seed, dmin=dmin)
    rss_before = _rss_bytes()
    with tempfile.TemporaryDirectory(prefix="bench_e2e_") as tmp:
        cfg = load_config(env={}, overrides={
            "listen": ["tcp://127.0.0.1:*"], "publish_endpoint": "", "metrics_port": -1,
            "out_dir": tmp, "space_group": sim.space_group,
            "cell": " ".join(str(x) for x in sim.cell), "dmin": sim.dmin, "anomalous": True,
            "publish_interval": publish_interval, "checkpoint_interval": 3600.0,
            "device": device, "seed": seed,
            **({} if threads is None else {"cpu_threads": threads}), **(model or {})})
        service = Service(cfg).start()
        published: list[tuple[float, int]] = []
        write = service.mtz.write

        def timed_write(snapshot):
            path = write(snapshot)
            if path is not None:
                published.append((time.time(), snapshot.n_images))
            return path

        service.mtz.write = timed_write
        samples: list[tuple[int, int]] = []      # (stored reflections, RSS bytes)
        sampling = threading.Event()

        def sample() -> None:
            while not sampling.wait(0.05):
                engine = service.engine
                samples.append((0 if engine is None else engine.store.n_reflections,
                                _rss_bytes()))

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        endpoint = service.ingestor.bound_endpoints[0]
        proc = subprocess.run(
            [sys.executable, __file__, "--produce", endpoint, "--images", str(images),
             "--rate", str(rate), "--seed", str(seed), "--dmin", str(dmin)],
            capture_output=True, text=True, timeout=3600)
        if proc.returncode != 0:
            service.stop(checkpoint=False, publish=False)
            raise SystemExit(f"bench_end_to_end: producer failed:\n{proc.stderr[-2000:]}")
        sent = json.loads(proc.stdout.strip().splitlines()[-1])
        service.wait_until(lambda s: s.crystals_merged >= images and s.ingestor.queue_depth == 0,
                           timeout=120)
        with service.lock:
            st = service.engine.store
            n = st.n_images
            t_absorbed = time.time()
            visits_stream = st.visits[:n].copy()
            trained_stream = service.trained_reflections
            steps_stream = service.engine.trainer.step
            first_arrival = float(st.arrival_time[0])
            last_arrival = float(st.arrival_time[n - 1])
        deadline = time.monotonic() + catch_up_s
        while not service.all_visited(1) and time.monotonic() < deadline:
            time.sleep(0.05)
        service.request_publish()
        service.wait_until(lambda s: bool(published) and published[-1][1] >= n, timeout=60)
        with service.lock:
            arrival = st.arrival_time[:n].copy()
            first_visit = st.first_visit_time[:n].copy()
            visits_final = st.visits[:n].copy()
            n_reflections = st.n_reflections
            store_bytes = st.bytes_used()["device"] + st.bytes_used()["host"]
            steps_final = service.engine.trainer.step
            step_seconds = float(np.median(service.step_seconds)) if service.step_seconds \
                else float("nan")
            on_cuda = service.engine.device.type == "cuda"
            dev_name = str(service.engine.device)
        sampling.set()
        sampler.join()
        service.stop(checkpoint=False, publish=False)
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    device_peak = None
    if on_cuda:
        import torch

        device_peak = int(torch.cuda.max_memory_allocated())
    stream_s = max(last_arrival - first_arrival, 1e-9)
    return {
        "images": n, "sent": sent, "stream_seconds": stream_s,
        "images_per_s": (n - 1) / stream_s if n > 1 else float("nan"),
        "absorbed_after_last_arrival_s": t_absorbed - last_arrival,
        "train_reflections_per_s": trained_stream / max(t_absorbed - first_arrival, 1e-9),
        "steps_during_stream": steps_stream, "steps_total": steps_final,
        "step_seconds_median": step_seconds,
        "lag_first_visit": _percentiles(first_visit - arrival),
        "unvisited": int(np.isnan(first_visit).sum()),
        "lag_published": _percentiles(publication_lags(arrival, published)),
        "snapshots": len(published),
        "visits_stream": visits_stream, "visits_final": visits_final,
        "reflections": n_reflections,
        "rss_bytes_per_reflection": (peak_rss - rss_before) / max(n_reflections, 1),
        "rss_marginal_bytes_per_reflection": _marginal(samples, n_reflections),
        "peak_rss_mb": peak_rss / 2**20, "rss_before_mb": rss_before / 2**20,
        "store_bytes_per_reflection": store_bytes / max(n_reflections, 1),
        "device_peak_bytes_per_reflection": (None if device_peak is None
                                             else device_peak / max(n_reflections, 1)),
        "device": dev_name,
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=2000)
    ap.add_argument("--rate", type=float, default=200.0, help="images per second sent")
    ap.add_argument("--dmin", type=float, default=1.8, help="resolution, Å (1.8: ~800 "
                    "reflections per image)")
    ap.add_argument("--device", default="auto", help="auto, cpu or cuda")
    ap.add_argument("--publish-interval", type=float, default=2.0, help="s between MTZ snapshots")
    ap.add_argument("--catch-up-s", type=float, default=120.0,
                    help="longest training after the stream until every image is visited")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--d-model", type=int, default=None, help="scale network width")
    ap.add_argument("--layers", type=int, default=None, help="scale network blocks per stack")
    ap.add_argument("--mc-samples", type=int, default=None)
    ap.add_argument("--threads", type=int, default=None,
                    help="torch CPU threads of the service (default: its cpu_threads)")
    ap.add_argument("--quick", action="store_true", help="100 images, 10 s catch-up at most")
    ap.add_argument("--produce", metavar="ENDPOINT", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.produce:
        produce(args.produce, args.images, args.rate, args.seed, args.dmin)
        return
    if args.quick:
        args.images = min(args.images, 100)
        args.catch_up_s = min(args.catch_up_s, 10.0)
        args.publish_interval = min(args.publish_interval, 1.0)
    load = os.getloadavg()[0]
    r = run(images=args.images, rate=args.rate, device=args.device,
            publish_interval=args.publish_interval, catch_up_s=args.catch_up_s,
            dmin=args.dmin, seed=args.seed, threads=args.threads,
            model={k: v for k, v in (("d_model", args.d_model), ("n_layers", args.layers),
                                     ("mc_samples", args.mc_samples)) if v is not None})
    import torch

    dev = r["device"]
    common = {"device": dev.split(":")[0], "machine": machine_name(), "images": r["images"],
              "rate_sent": args.rate, "reflections": r["reflections"],
              "publish_interval_s": args.publish_interval, "torch": torch.__version__,
              "torch_threads": torch.get_num_threads(), "load_avg_1m_before": round(load, 2),
              "model_overrides": {k: v for k, v in (("d_model", args.d_model),
                                                    ("n_layers", args.layers),
                                                    ("mc_samples", args.mc_samples))
                                  if v is not None}}

    def emit(name: str, value, unit: str, **extra) -> None:
        if isinstance(value, float):
            value = round(value, 4)
        print(json.dumps({"name": name, "value": value, "unit": unit, **extra, **common}),
              flush=True)

    emit("e2e_images_per_s", r["images_per_s"], "images/s",
         producer_images_per_s=round(r["sent"]["images"] / r["sent"]["seconds"], 1),
         stream_seconds=round(r["stream_seconds"], 2),
         absorbed_after_last_arrival_s=round(r["absorbed_after_last_arrival_s"], 3))
    emit("e2e_train_reflections_per_s", r["train_reflections_per_s"], "reflections/s",
         steps_during_stream=r["steps_during_stream"],
         step_seconds_median=round(r["step_seconds_median"], 4))
    for q in ("p50", "p95", "p99"):
        emit(f"e2e_lag_first_visit_{q}", r["lag_first_visit"][q], "s",
             unvisited=r["unvisited"], steps_total=r["steps_total"])
    for q in ("p50", "p95", "p99"):
        emit(f"e2e_lag_published_{q}", r["lag_published"][q], "s", snapshots=r["snapshots"])
    vs, vf = r["visits_stream"], r["visits_final"]
    emit("e2e_visits_median", float(np.median(vs)), "visits",
         after_catch_up=float(np.median(vf)), when="stream absorbed")
    emit("e2e_visits_min", int(vs.min()), "visits", after_catch_up=int(vf.min()),
         when="stream absorbed")
    emit("e2e_rss_bytes_per_reflection", r["rss_bytes_per_reflection"], "bytes/reflection",
         peak_rss_mb=round(r["peak_rss_mb"], 1), rss_before_mb=round(r["rss_before_mb"], 1),
         marginal_bytes_per_reflection=(None if r["rss_marginal_bytes_per_reflection"] is None
                                        else round(r["rss_marginal_bytes_per_reflection"], 1)))
    emit("e2e_store_bytes_per_reflection", r["store_bytes_per_reflection"], "bytes/reflection",
         device_peak_bytes_per_reflection=r["device_peak_bytes_per_reflection"])


if __name__ == "__main__":
    main()
