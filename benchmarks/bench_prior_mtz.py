"""A prior data set of the same crystal (``streamvi merge --prior-mtz``) against more images.

Simulates one crystal (DESIGN.md §9's kind by default: P 4₃2₁2, 1.8 Å, S + I), merges an
independent data set of it (images ``--prior-images`` onward, never used again) with
``streamvi merge`` and writes it to an MTZ, then merges the first ``--images`` (e.g. 200)
and twice as many images without a prior, and the first ``--images`` with the MTZ as
prior (read back from the file, as the command line does).  Figures per run, one JSON line
each: CC(F, truth) overall, per shell (10 shells, low to high resolution) and CCanom, the
learnt correlation with the prior per shell, seconds.  The question it answers (issue #19):
do N images with the prior reach what 2N images reach without one?

    python benchmarks/bench_prior_mtz.py [--images 200] [--prior-images 1000] [--dmin 1.8]
        [--seed 0] [--steps S] [--out results.jsonl]
"""
from __future__ import annotations

import argparse
import json
import os as _os
import sys as _sys
import tempfile
import time

_sys.path.insert(0, _os.path.dirname(_os.path.abspath(__file__)))
from _machine import machine_name  # noqa: E402 - shared with the other benchmarks


def run(*, images: int, prior_images: int, dmin: float, seed: int,
        steps: int | None) -> list[dict]:
    import torch

    from streamvi.cli.merge import merge_config, model_configs
    from streamvi.merging.offline import merge_crystals
    from streamvi.merging.reference import read_reference
    from streamvi.publish.mtz import write_mtz
    from streamvi.quality.evaluate import compare_to_truth
    from streamvi.snapshot import snapshot_to_dataset
    from streamvi.symmetry import ReciprocalSpace
    from streamvi_sim import SimulationConfig, simulate_images, simulate_structure

    sim = SimulationConfig(n_images=3 * images + prior_images, seed=seed, dmin=dmin)
    truth = simulate_structure(sim)
    truth_ds = truth.to_dataset()
    space = ReciprocalSpace(sim.space_group, sim.cell, sim.dmin, anomalous=True)
    tcfg, ecfg = model_configs(merge_config(["x.stream", "-o", "x.mtz", "--device", "cpu"]))
    common = {"benchmark": "prior_mtz", "images": images, "prior_images": prior_images,
              "dmin": dmin, "seed": seed, "device": "cpu",
              "threads": torch.get_num_threads(), "machine": machine_name(),
              "d_model": tcfg.d_model, "mc_samples": tcfg.mc_samples}
    lines = []

    def merge(crystals, label, prior=None):
        t = time.perf_counter()
        snap, engine = merge_crystals(crystals, space, trainer_config=tcfg, engine_config=ecfg,
                                      steps=steps, prior=prior)
        ds = snapshot_to_dataset(snap)
        fig = compare_to_truth(ds, truth_ds)
        line = {"run": label, "seconds": round(time.perf_counter() - t, 1),
                "n_images": engine.n_images, "steps": engine.trainer.step,
                "cc_F": fig["cc_F"], "cc_F_shells": [round(x, 4) for x in fig["cc_F_shells"]],
                "cc_F_top_shell": fig["cc_F_top_shell"], "cc_anom": fig["cc_anom"],
                "d_min_shells": [round(x, 2) for x in fig["d_min_shells"]]}
        if engine.prior_correlation() is not None:
            line["prior_r_shells"] = [round(x, 4) for x in engine.prior_correlation()]
        lines.append({**line, **common})
        print(json.dumps(lines[-1]), flush=True)
        return snap, ds

    # the independent data set: images no later run sees
    start = 2 * images
    prior_crystals = list(simulate_images(sim, truth, start=start, stop=start + prior_images))
    _, prior_ds = merge(prior_crystals, f"prior data set ({prior_images} images)")
    with tempfile.TemporaryDirectory() as tmp:
        path = _os.path.join(tmp, "prior.mtz")
        write_mtz(prior_ds, path)
        prior = read_reference(path, flag="--prior-mtz")
    first = list(simulate_images(sim, truth, start=0, stop=2 * images))
    merge(first[:images], f"{images} images")
    merge(first, f"{2 * images} images")
    merge(first[:images], f"{images} images with the prior", prior=prior)
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=200)
    ap.add_argument("--prior-images", type=int, default=1000)
    ap.add_argument("--dmin", type=float, default=1.8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=None,
                    help="optimiser steps per merge; unset: streamvi merge's default")
    ap.add_argument("--out", default=None, help="also append the JSON lines to this file")
    args = ap.parse_args()
    lines = run(images=args.images, prior_images=args.prior_images, dmin=args.dmin,
                seed=args.seed, steps=args.steps)
    if args.out:
        with open(args.out, "a") as fh:
            for line in lines:
                fh.write(json.dumps(line) + "\n")


if __name__ == "__main__":
    main()
