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


def throughput(space, crystals, *, d_model, n_layers, mc, batch_images, amp, compile_, seconds):
    from streamvi.engine import EngineConfig, MergeEngine
    from streamvi.trainer import TrainerConfig

    eng = MergeEngine(space, TrainerConfig(device="cuda", d_model=d_model, n_layers=n_layers,
                                           mc_samples=mc, amp_bf16=amp, compile=compile_),
                      EngineConfig(batch_images=batch_images))
    for c in crystals:
        eng.add(c)
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
         peak_device_bytes=torch.cuda.max_memory_allocated())


def sync_points(space, crystals, *, steps: int = 3) -> None:
    """Host-device synchronisations of a training step, by torch's own count.

    ``torch.cuda.set_sync_debug_mode("warn")`` warns at every synchronising call; the lines
    name the call sites, which docs/performance.md lists from reading the code.
    """
    import warnings

    from streamvi.engine import EngineConfig, MergeEngine
    from streamvi.trainer import TrainerConfig

    eng = MergeEngine(space, TrainerConfig(device="cuda", mc_samples=8),
                      EngineConfig(batch_images=64))
    for c in crystals[:512]:
        eng.add(c)
    for _ in range(3):
        eng.step()
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
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
    emit("step_sync_points", sum(sites.values()) / steps, "per step", sites=sites)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=2000)
    ap.add_argument("--epochs", type=float, default=20)
    args = ap.parse_args()

    from streamvi.engine import EngineConfig
    from streamvi.evaluate import average_merge, compare_to_truth
    from streamvi.merge import merge_crystals
    from streamvi.publish.mtz import snapshot_to_dataset
    from streamvi.symmetry import ReciprocalSpace
    from streamvi.trainer import TrainerConfig
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
    for batch_images, amp in ((64, False), (64, True)):
        t1 = time.perf_counter()
        snap, eng = merge_crystals(crystals, space, trainer_config=TrainerConfig(
            device="cuda", mc_samples=8, amp_bf16=amp), engine_config=EngineConfig(
            batch_images=batch_images), epochs=args.epochs)
        torch.cuda.synchronize()
        el = time.perf_counter() - t1
        c = compare_to_truth(snapshot_to_dataset(snap), tds)
        emit("merge_quality_streamvi", c["cc_F"], "cc", top=c["cc_F_shells"][-1],
             cc_anom=c["cc_anom"], seconds=el, steps=eng.trainer.step, epochs=args.epochs,
             batch_images=batch_images, bf16=amp, shells=[round(x, 4) for x in c["cc_F_shells"]])
    try:
        sync_points(space, crystals)
    except Exception as exc:  # an older torch without the debug mode must not stop the rest
        emit("step_sync_points_error", float("nan"), "", error=f"{type(exc).__name__}: {exc}")
    # the defaults first (merge: d 32, L 2; service: d 16, L 2), then the earlier cases
    for d, L, mc, b, amp, comp in ((32, 2, 8, 256, False, False), (16, 2, 8, 256, False, False),
                                   (32, 2, 8, 1024, True, True),
                                   (32, 4, 8, 64, False, False), (32, 4, 8, 256, False, False),
                                   (32, 20, 32, 256, True, False), (32, 20, 32, 256, True, True),
                                   (256, 5, 32, 128, True, False)):
        try:
            throughput(space, crystals, d_model=d, n_layers=L, mc=mc, batch_images=b, amp=amp,
                       compile_=comp, seconds=4.0)
        except Exception as exc:  # report and go on: one case must not hide the others
            emit("train_throughput_error", float("nan"), "", case=[d, L, mc, b, amp, comp],
                 error=f"{type(exc).__name__}: {exc}"[:300])


if __name__ == "__main__":
    main()
