"""One short GPU session: training throughput and merge quality on CUDA (JSON lines).

Run on a machine with a GPU: ``python benchmarks/gpu_check.py [--images 2000]``.  Prints one
JSON line per figure with the card's name; every case is bounded in time.
"""
from __future__ import annotations

import argparse
import json
import platform
import time

import torch


def emit(name: str, value: float, unit: str, **extra) -> None:
    dev = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    print(json.dumps({"name": name, "value": value, "unit": unit, "device": dev,
                      "machine": platform.node(), "torch": torch.__version__, **extra}),
          flush=True)


def throughput(space, crystals, *, d_model, n_layers, mc, batch_images, amp, compile_, seconds,
               sync_free=None, refine_geometry=True):
    from streamvi.merging.engine import EngineConfig, MergeEngine
    from streamvi.merging.trainer import TrainerConfig

    eng = MergeEngine(space, TrainerConfig(device="cuda", d_model=d_model, n_layers=n_layers,
                                           mc_samples=mc, amp_bf16=amp, compile=compile_,
                                           sync_free=sync_free,
                                           refine_geometry=refine_geometry),
                      EngineConfig(batch_images=batch_images))
    eng.add_many(crystals)
    for _ in range(5):                       # warm-up (and compilation)
        eng.step()
    torch.cuda.synchronize()
    n = 0
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        n += eng.step().n_reflections
    torch.cuda.synchronize()
    el = time.perf_counter() - t0
    emit("train_throughput", n / el, "reflections/s", d_model=d_model, n_layers=n_layers,
         mc_samples=mc, batch_images=batch_images, bf16=amp, compile=compile_,
         sync_free=eng.trainer.sync_free, refine_geometry=refine_geometry,
         peak_device_bytes=torch.cuda.max_memory_allocated())


def _engine(space, crystals, *, sync_free, batch_images=64, n=512):
    from streamvi.merging.engine import EngineConfig, MergeEngine
    from streamvi.merging.trainer import TrainerConfig

    # warm-up of 1 reflection: the standardiser is frozen (no more reads of its count)
    eng = MergeEngine(space, TrainerConfig(device="cuda", mc_samples=8, sync_free=sync_free,
                                           warmup_reflections=1),
                      EngineConfig(batch_images=batch_images))
    eng.add_many(crystals[:n])
    for _ in range(3):
        eng.step()
    torch.cuda.synchronize()
    return eng


def sync_points(space, crystals, *, steps: int = 3) -> None:
    """Host-device synchronisations of a training step, by torch's own count.

    ``torch.cuda.set_sync_debug_mode("warn")`` warns at every synchronising call; the lines
    name the call sites (docs/performance.md).  ``tests/syncprobe.py`` counts the operations
    behind them as the CPU tests do, for comparison.
    """
    import warnings

    import sys
    from pathlib import Path

    # a test helper, not part of the package: the tests' own copy
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from syncprobe import HostReadProbe

    for sync_free in (False, True):
        eng = _engine(space, crystals, sync_free=sync_free)
        with warnings.catch_warnings(record=True) as caught, HostReadProbe() as probe:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                for _ in range(steps):
                    eng.step()
            finally:
                torch.cuda.set_sync_debug_mode(0)
        sites: dict[str, int] = {}
        for w in caught:
            if "synchroniz" in str(w.message).lower():
                key = f"{w.filename.rsplit('/', 2)[-1]}:{w.lineno}"
                sites[key] = sites.get(key, 0) + 1
        emit("step_sync_points", sum(sites.values()) / steps, "per step", sync_free=sync_free,
             sites=sites, probe=dict(probe.counts))


def profile(space, crystals, *, steps: int = 10) -> None:
    """The CUDA kernels and host operations a step spends its time in (top 15 each)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    for sync_free in (False, True):
        eng = _engine(space, crystals, sync_free=sync_free, batch_images=256, n=2000)
        with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            t0 = time.perf_counter()
            for _ in range(steps):
                eng.step()
            torch.cuda.synchronize()
            el = time.perf_counter() - t0
        events = prof.key_averages()
        device_key = "self_device_time_total" if hasattr(events[0], "self_device_time_total") \
            else "self_cuda_time_total"
        top = {}
        for key in (device_key, "self_cpu_time_total"):
            rows = sorted(events, key=lambda e: getattr(e, key), reverse=True)[:15]
            top[key] = [[e.key[:60], e.count, round(getattr(e, key) / steps / 1000.0, 3)]
                        for e in rows]
        emit("step_profile", el / steps * 1000.0, "ms per step (profiled)", sync_free=sync_free,
             batch_images=256, top_ms_per_step=top)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=2000)
    ap.add_argument("--epochs", type=float, default=20)
    args = ap.parse_args()

    from streamvi.merging.engine import EngineConfig
    from streamvi.quality.evaluate import average_merge, compare_to_truth
    from streamvi.merging.offline import merge_crystals
    from streamvi.publish.mtz import snapshot_to_dataset
    from streamvi.symmetry import ReciprocalSpace
    from streamvi.merging.trainer import TrainerConfig
    from streamvi_sim import SimulationConfig, simulate_images, simulate_structure

    t0 = time.perf_counter()
    sim = SimulationConfig(n_images=args.images, seed=0)
    truth = simulate_structure(sim)
    crystals = list(simulate_images(sim, truth))
    emit("simulate", time.perf_counter() - t0, "s", images=args.images)
    space = ReciprocalSpace(sim.space_group, sim.cell, sim.dmin, anomalous=True)
    tds = truth.to_dataset()
    avg = compare_to_truth(average_merge(crystals, space, weighting="mean"), tds)
    emit("merge_quality_mean_average", avg["cc_F"], "cc", top=avg["cc_F_shells"][-1],
         cc_anom=avg["cc_anom"])
    # the CUDA default (sync-free steps), with bf16, and the sparse CPU-style step
    for batch_images, amp, sync_free in ((64, False, None), (64, True, None), (64, False, False)):
        t1 = time.perf_counter()
        snap, eng = merge_crystals(crystals, space, trainer_config=TrainerConfig(
            device="cuda", mc_samples=8, amp_bf16=amp, sync_free=sync_free),
            engine_config=EngineConfig(batch_images=batch_images), epochs=args.epochs)
        torch.cuda.synchronize()
        el = time.perf_counter() - t1
        c = compare_to_truth(snapshot_to_dataset(snap), tds)
        emit("merge_quality_streamvi", c["cc_F"], "cc", top=c["cc_F_shells"][-1],
             cc_anom=c["cc_anom"], seconds=el, steps=eng.trainer.step, epochs=args.epochs,
             batch_images=batch_images, bf16=amp, sync_free=eng.trainer.sync_free,
             shells=[round(x, 4) for x in c["cc_F_shells"]])
    for name, check in (("step_sync_points", sync_points), ("step_profile", profile)):
        try:
            check(space, crystals)
        except Exception as exc:  # an older torch without the debug mode must not stop the rest
            emit(name + "_error", float("nan"), "", error=f"{type(exc).__name__}: {exc}"[:300])
    # the defaults first (merge: d 32, L 2; service: d 16, L 2) with and without sync-free
    # steps and geometry refinement, then the earlier cases
    # (d_model, layers, MC samples, images/step, bf16, compile, sync_free, refine_geometry)
    for d, L, mc, b, amp, comp, sf, geo in ((32, 2, 8, 256, False, False, None, True),
                                            (32, 2, 8, 256, False, False, False, True),
                                            (32, 2, 8, 256, False, False, None, False),
                                            (16, 2, 8, 256, False, False, None, True),
                                            (32, 2, 8, 1024, True, True, None, True),
                                            (32, 2, 8, 1024, True, True, False, True),
                                            (32, 4, 8, 64, False, False, None, True),
                                            (32, 4, 8, 256, False, False, None, True),
                                            (32, 20, 32, 256, True, False, None, True),
                                            (32, 20, 32, 256, True, True, None, True),
                                            (256, 5, 32, 128, True, False, None, True)):
        try:
            throughput(space, crystals, d_model=d, n_layers=L, mc=mc, batch_images=b, amp=amp,
                       compile_=comp, seconds=4.0, sync_free=sf, refine_geometry=geo)
        except Exception as exc:  # report and go on: one case must not hide the others
            emit("train_throughput_error", float("nan"), "",
                 case=[d, L, mc, b, amp, comp, sf, geo],
                 error=f"{type(exc).__name__}: {exc}"[:300])

if __name__ == "__main__":
    main()
