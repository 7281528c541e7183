"""How good are the "when to stop" forecasts?  Replay a simulated run and check them.

The images of a simulated beamtime are fed in order to a :class:`~streamvi.merging.engine.MergeEngine`
with training steps between (as the service interleaves them), a snapshot is taken every
``--every`` images and given to :class:`~streamvi.quality.feedback.LiveFeedback`, exactly as the
service does.  For each target the script records the forecast made at 10 %, 25 % and 50 %
of the run and compares it with the snapshot at which the target was really reached.

One JSON line per (case, target, fraction)::

    {"name": "forecast_error", "case", "target", "fraction", "n_images" (when forecast),
     "forecast" (total images), "low", "high", "reached_at" (images from which the target
     stays reached to the end; null: not reached in the run), "first_reached_at",
     "error" ((forecast − reached_at)/reached_at), "in_interval", "state"}

and a ``forecast_summary`` line per case (largest |error| from 25 % on, per target kind).
Cases: ``lysozyme`` (the default simulated beamtime: P 4₃2₁2 to 1.8 Å, anomalous) and
``triclinic`` (P 1 to 2.2 Å, where completeness takes hundreds of images).

    python benchmarks/forecast_replay.py [--images 2000] [--case lysozyme triclinic]
                                         [--steps-per-image 0.25] [--no-train]

``--no-train`` skips the optimiser (the data figures need none; the model's CCanom then
stays at the prior and its target is reported as such).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass, field

import numpy as np

FRACTIONS = (0.10, 0.25, 0.50)

#: name → (simulation overrides, target specs)
CASES = {
    "lysozyme": ({}, {"cc_half": "0.3@1.8", "cc_anom": "0.3@2.5", "completeness": 0.99,
                      "multiplicity": 50}),
    "triclinic": ({"space_group": "P 1", "cell": (40.0, 50.0, 60.0, 80.0, 95.0, 105.0),
                   "dmin": 2.2, "n_atoms": 600},
                  {"cc_half": "0.3@3.5", "completeness": 0.999, "multiplicity": 15}),
}


@dataclass
class Replay:
    """What a replay recorded: per snapshot, the images and each target's forecast."""

    case: str
    n_images: int
    snapshots: list[int] = field(default_factory=list)
    forecasts: list[list] = field(default_factory=list)     # per snapshot: list[Forecast]
    seconds: float = 0.0


def simulate(case: str, n_images: int, seed: int = 0, **overrides):
    """The case's simulated images (messages) and its configuration."""
    from streamvi_sim import SimulationConfig, simulate_images, simulate_structure

    sim, _ = CASES[case]
    cfg = SimulationConfig(n_images=n_images, seed=seed, **{**sim, **overrides})
    truth = simulate_structure(cfg)
    return cfg, list(simulate_images(cfg, truth))


def replay(case: str, cfg, messages, *, every: int = 50, chunk: int = 10,
           steps_per_image: float = 0.25, train: bool = True, d_model: int = 16,
           rate: float = 200.0, targets: dict | None = None, seed: int = 0) -> Replay:
    """Feed ``messages`` in order with steps between; forecast at every ``every`` images.

    Parameters
    ----------
    steps_per_image
        Optimiser steps per arriving image (0.25 with 8 images per step: each image is
        visited about twice while the beam is on, as the service on 2 CPU cores manages at
        200 images/s).
    rate
        The indexed rate the forecasts convert images into seconds with, images/s.
    """
    from streamvi.merging.engine import EngineConfig, MergeEngine
    from streamvi.quality.feedback import LiveFeedback
    from streamvi.quality.forecast import parse_target
    from streamvi.symmetry import ReciprocalSpace
    from streamvi.merging.trainer import TrainerConfig

    specs = targets if targets is not None else CASES[case][1]
    goals = [parse_target(kind, spec) for kind, spec in specs.items()]
    goals = [g for g in goals if g is not None and (cfg.anomalous or g.kind != "cc_anom")]
    space = ReciprocalSpace(cfg.space_group, cfg.cell, cfg.dmin, anomalous=cfg.anomalous)
    engine = MergeEngine(space, TrainerConfig(d_model=d_model, n_layers=2, mc_samples=8,
                                              seed=seed, posterior_average_decay=0.99),
                         EngineConfig(batch_images=8))
    live = LiveFeedback(goals)
    out = Replay(case=case, n_images=len(messages))
    t0 = time.perf_counter()
    owed = 0.0
    for start in range(0, len(messages), chunk):
        batch = messages[start:start + chunk]
        engine.add_many(batch)
        if train:
            owed += steps_per_image * len(batch)
            steps, owed = int(owed), owed - int(owed)
            engine.train(steps)
        n = engine.n_images
        if n // every != (n - len(batch)) // every or start + chunk >= len(messages):
            snap = engine.snapshot()
            store = engine.store
            fb = live.observe(snap, sum_i_half=store.sum_i_half.copy(),
                              wilson_sigma=store.wilson_sigma(), rate=rate)
            out.snapshots.append(n)
            out.forecasts.append(fb.forecasts)
    out.seconds = time.perf_counter() - t0
    return out


def evaluate(rec: Replay, fractions=FRACTIONS) -> list[dict]:
    """One line per (target, fraction): the forecast then against when it was reached."""
    lines = []
    n_targets = len(rec.forecasts[0]) if rec.forecasts else 0
    for t in range(n_targets):
        reached = [fcs[t].reached for fcs in rec.forecasts]
        # "really reached": from the first snapshot after which it stays reached to the
        # end of the run (a figure on few pairs can touch its target by chance earlier)
        reached_at = None
        for k in range(len(reached) - 1, -1, -1):
            if not reached[k]:
                break
            reached_at = rec.snapshots[k]
        first_reached = next((n for n, r in zip(rec.snapshots, reached) if r), None)
        target = rec.forecasts[0][t].target
        for frac in fractions:
            want = frac * rec.n_images
            k = int(np.argmin([abs(n - want) for n in rec.snapshots]))
            fc = rec.forecasts[k][t]
            line = {"name": "forecast_error", "case": rec.case, "target": target.kind,
                    "target_text": target.describe(), "fraction": frac,
                    "n_images": rec.snapshots[k], "state": fc.state,
                    "forecast": None if fc.images is None else round(fc.images, 1),
                    "low": None if fc.images_low is None else round(fc.images_low, 1),
                    "high": None if fc.images_high is None else round(fc.images_high, 1),
                    "reached_at": reached_at, "first_reached_at": first_reached,
                    "run_images": rec.n_images,
                    "current": fc.current, "error": None, "in_interval": None}
            if fc.reached and reached_at is not None and reached_at <= rec.snapshots[k]:
                # reached for good by then: nothing left to forecast, and that is right
                line["forecast"] = reached_at
                line["already_reached"] = True
            elif fc.reached:
                line["forecast"] = rec.snapshots[k]     # says "reached", and is wrong
            if reached_at is not None and line["forecast"] is not None:
                line["error"] = round((line["forecast"] - reached_at) / reached_at, 4)
                if fc.images_low is not None:
                    hi = fc.images_high if fc.images_high is not None else float("inf")
                    line["in_interval"] = bool(fc.images_low <= reached_at <= hi)
            elif reached_at is None and line["forecast"] is not None:
                # not reached in the run: a forecast beyond its end is right so far
                line["beyond_run"] = bool(line["forecast"] > rec.n_images)
            lines.append(line)
    return lines


def summary(rec: Replay, lines: list[dict]) -> dict:
    """The largest |error| from 25 % of the run on, per target kind."""
    worst: dict[str, float | None] = {}
    for line in lines:
        if line["fraction"] < 0.25 - 1e-9:
            continue
        err = line["error"]
        kind = line["target"]
        if err is not None:
            worst[kind] = max(worst.get(kind) or 0.0, abs(err))
        else:
            worst.setdefault(kind, None)
    return {"name": "forecast_summary", "case": rec.case, "run_images": rec.n_images,
            "snapshots": len(rec.snapshots), "max_abs_error_from_25pct": worst,
            "seconds": round(rec.seconds, 1)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=2000)
    p.add_argument("--case", nargs="+", choices=sorted(CASES), default=sorted(CASES))
    p.add_argument("--every", type=int, default=50, help="images between snapshots")
    p.add_argument("--steps-per-image", type=float, default=0.25)
    p.add_argument("--no-train", action="store_true", help="no optimiser steps")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    for case in args.case:
        t0 = time.perf_counter()
        cfg, messages = simulate(case, args.images, args.seed)
        sim_s = time.perf_counter() - t0
        rec = replay(case, cfg, messages, every=args.every,
                     steps_per_image=args.steps_per_image, train=not args.no_train,
                     seed=args.seed)
        lines = evaluate(rec)
        for line in lines:
            print(json.dumps(line), flush=True)
        print(json.dumps(summary(rec, lines) | {"simulate_seconds": round(sim_s, 1),
                                                "trained": not args.no_train}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
