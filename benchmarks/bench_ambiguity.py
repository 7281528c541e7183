"""Consensus indexing-ambiguity assignment
(:func:`streamvi.merging.ambiguity.consensus_settings`).

Simulates stills reported in random merohedral settings (P 4₃: two, P 3: four) with the
project's simulator, stores them, and times the assignment.  One JSON line per case:
the share of images put in one consistent setting (up to a global relabelling, against the
simulator's truth; over all images and over the correctly indexed ones, the simulator
misindexes 2 %), the function's own reliability figures (``confidence``, its lower
estimate of the share, and the two figures it is the smaller of), the time (the assignment only, not the simulation),
images and reflections per image, and the machine.

Cases (``--cases``, any of):

- ``sparse``: narrow profiles at 2.5 Å, ~110 reflections per image, the simulator's flux
  (a weak still: even the true structure factors place only ~95 % of them);
- ``sparse_bright``: the same geometry, ten times the photons (``top_shell_photons=30``);
- ``dense``: the simulator's default profiles at 2.5 Å, ~400 reflections per image;
- ``medium_1p8``: narrow profiles at 1.8 Å, ~330 reflections per image;
- ``flat_xsphere``: ``partial_sim``-like (random intensities, no fall-off, CrystFEL's
  xsphere partiality) at 2.5 Å, ~105 reflections per image.

``peak_rss_mb`` is the process's peak resident memory after the call (simulation
included), ``rss_growth_mb`` how much the call raised it.

    python benchmarks/bench_ambiguity.py [--images 1000 2000] [--groups P43 P3]
                                         [--cases sparse sparse_bright dense] [--seed 0]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _machine import machine_name  # noqa: E402 - shared with the other benchmarks

from streamvi.merging.ambiguity import consensus_settings  # noqa: E402
from streamvi.merging.store import ReflectionStore  # noqa: E402
from streamvi.symmetry import ReciprocalSpace  # noqa: E402

GROUPS = {"P43": ("P 43", (79.1, 79.1, 37.9, 90.0, 90.0, 90.0)),
          "P3": ("P 3", (79.1, 79.1, 37.9, 90.0, 90.0, 120.0))}
CASES = {
    "sparse": dict(profile_radius=(0.00015, 0.0003), dmin=2.5),
    "sparse_bright": dict(profile_radius=(0.00015, 0.0003), dmin=2.5, top_shell_photons=30.0),
    "dense": dict(dmin=2.5),
    # the second case: ~330 reflections per image at 1.8 Å
    "medium_1p8": dict(profile_radius=(0.0002, 0.0004), dmin=1.8),
    # partial_sim-like: random intensities without fall-off, CrystFEL's xsphere partiality
    "flat_xsphere": dict(profile_radius=(0.0002, 0.0004), dmin=2.5, flat_intensities=True,
                         partiality_profile="xsphere"),
}


def simulate(group: str, case: str, n_images: int, seed: int
             ) -> tuple[ReflectionStore, np.ndarray, np.ndarray]:
    """A store of ``n_images`` simulated stills, their true settings and misindexed flags."""
    from streamvi_sim import SimulationConfig
    from streamvi_sim.beamtime import Simulator

    sg, cell = GROUPS[group]
    cfg = SimulationConfig(n_images=n_images, seed=seed, space_group=sg, cell=cell,
                           indexing_ambiguity=True, **CASES[case])
    sim = Simulator(cfg)
    pairs = [sim.image(i) for i in range(n_images)]
    store = ReflectionStore(ReciprocalSpace(sg, cell, cfg.dmin, anomalous=True))
    results = store.add_many([m for m, _ in pairs])
    kept = [t for (_, t), r in zip(pairs, results) if r.image_id is not None]
    return (store, np.array([t.setting for t in kept], np.int64),
            np.array([t.misindexed for t in kept], bool))


def consistent_share(ops: np.ndarray, settings: np.ndarray, store: ReflectionStore) -> float:
    """Largest share of images whose operator composed with the true setting is one law."""
    from streamvi.merging.ambiguity import _group

    mul = _group(store.space).mul
    rel = mul[ops, settings]
    return float(np.bincount(rel, minlength=mul.shape[0]).max() / max(len(ops), 1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, nargs="+", default=[1000, 2000])
    ap.add_argument("--groups", nargs="+", default=list(GROUPS), choices=list(GROUPS))
    ap.add_argument("--cases", nargs="+", default=["sparse", "sparse_bright", "dense"],
                    choices=list(CASES))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-validate", action="store_true",
                    help="skip the split-half check (about halves the time)")
    args = ap.parse_args()
    machine = machine_name()
    for group in args.groups:
        for case in args.cases:
            for n in args.images:
                store, settings, misindexed = simulate(group, case, n, args.seed)
                rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
                t0 = time.perf_counter()
                res = consensus_settings(store, seed=args.seed,
                                         validate=not args.no_validate)
                seconds = time.perf_counter() - t0
                rss1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
                ok = ~misindexed
                print(json.dumps({
                    "name": "ambiguity_share_consistent",
                    "value": round(consistent_share(res.ops, settings, store), 4),
                    "unit": "fraction",
                    "share_correctly_indexed": round(
                        consistent_share(res.ops[ok], settings[ok], store), 4),
                    "confidence": round(res.confidence, 4),
                    "split_agreement": round(res.split_agreement, 4),
                    "lead_estimate": round(res.lead_estimate, 4),
                    "share_margin_z_above_3": round(res.share_confident, 4),
                    "seconds": round(seconds, 2),
                    "space_group": GROUPS[group][0], "settings": store.n_ops, "case": case,
                    "images": store.n_images,
                    "reflections_per_image": round(store.n_reflections / store.n_images, 1),
                    "rounds": res.rounds, "validate": not args.no_validate,
                    "peak_rss_mb": round(rss1), "rss_growth_mb": round(rss1 - rss0),
                    "machine": machine,
                }), flush=True)


if __name__ == "__main__":
    main()
