"""What spare condition tables cost the training step (``serve --new-conditions``, issue #19).

One two-condition merge (``dark, light``, coupled prior) of ``--images`` simulated stills is
trained with 0 and with ``--spare`` spare table sets, interleaved ``--repeats`` times (the
machines are shared: compare the two within one run).  Spare sets are tables no batch
touches until a new condition takes them, so the step should cost the same.

    python benchmarks/bench_condition_tables.py [--images 200] [--spare 4] [--steps 100]

Prints one JSON line: milliseconds per step for each setting (every repeat, and the
median), the posterior's memory in each, the machine and device.
"""
from __future__ import annotations

import argparse
import json
import os as _os
import sys as _sys
import time

_sys.path.insert(0, _os.path.dirname(_os.path.abspath(__file__)))
from _machine import machine_name  # noqa: E402 - shared with the other benchmarks

import numpy as np  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", type=int, default=200)
    ap.add_argument("--dmin", type=float, default=2.0)
    ap.add_argument("--spare", type=int, default=4)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()

    import torch
    from streamvi.merging.engine import MergeEngine
    from streamvi.merging.trainer import TrainerConfig
    from streamvi.symmetry import ReciprocalSpace, parse_space_group
    from streamvi_sim import SimulationConfig, simulate_images, simulate_structure

    torch.set_num_threads(args.threads)
    sim = SimulationConfig(n_images=args.images, seed=4, dmin=args.dmin,
                           conditions=("dark", "light"), condition_ratio=(1, 1),
                           light_change="move=4,shift=1.5,fraction=0.3")
    msgs = list(simulate_images(sim, simulate_structure(sim)))
    space = ReciprocalSpace(parse_space_group(sim.space_group), sim.cell, sim.dmin,
                            anomalous=True)
    ms: dict[int, list[float]] = {0: [], args.spare: []}
    memory: dict[int, int] = {}
    for _ in range(args.repeats):
        for spare in ms:
            engine = MergeEngine(space, TrainerConfig(device="cpu", seed=1),
                                 conditions=("dark", "light"), spare_conditions=spare,
                                 coupled_reference="dark")
            engine.add_many(msgs)
            engine.train(20)                      # warm-up: allocations, first visits
            t0 = time.perf_counter()
            engine.train(args.steps)
            ms[spare].append(1e3 * (time.perf_counter() - t0) / args.steps)
            memory[spare] = sum(p.numel() * p.element_size()
                                for p in engine.trainer.model.posterior.parameters())
    print(json.dumps({
        "benchmark": "condition_tables", "images": args.images, "dmin": args.dmin,
        "steps": args.steps, "spare": args.spare,
        "ms_per_step": {str(k): [round(x, 2) for x in v] for k, v in ms.items()},
        "ms_per_step_median": {str(k): round(float(np.median(v)), 2) for k, v in ms.items()},
        "posterior_bytes": {str(k): v for k, v in memory.items()},
        "device": "cpu", "threads": args.threads, "machine": machine_name()}), flush=True)


if __name__ == "__main__":
    main()
