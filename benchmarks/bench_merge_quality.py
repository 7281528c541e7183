"""Merge quality on the simulated benchmark set (DESIGN.md section 9), against the truth.

Simulates ``--images`` still shots (default 2,000: P 4₃2₁2 lysozyme-like, 1.8 Å, ~800
reflections per image, S and I anomalous scatterers, 2 % misindexed, outliers), then merges
them three ways in anomalous mode:

- ``streamvi``: :func:`streamvi.merging.offline.merge_crystals` with the CPU defaults of
  ``streamvi merge`` (:class:`~streamvi.merging.trainer.TrainerConfig` with 8 Monte Carlo samples and
  one torch thread, :class:`~streamvi.merging.engine.EngineConfig`, ``--epochs`` passes, 10 by
  default) — the wall time of the merge is reported;
- ``inverse_variance`` and ``mean``: the plain averages of
  :func:`streamvi.quality.evaluate.average_merge`.

For each merge prints JSON lines with CC(F, truth) overall (``merge_cc_F``) and in the top
resolution shell (``merge_cc_F_top_shell``), CCanom against the true Bijvoet differences
(``merge_cc_anom``), the anomalous difference map height at the true iodide sites
(``merge_iodide_peak_sigma``: mean over sites; min, max and whether the sites are the top
peaks as extra fields) and the wall time (``merge_seconds``).

    python benchmarks/bench_merge_quality.py [--images N] [--epochs E] [--layers L] [--quick]
        [--space-group 'P 43' --indexing-ambiguity] [--no-refine-geometry]

With ``--indexing-ambiguity`` each image is reported in a random merohedral setting; the
streamvi merge is put in the truth's setting (the truth as ``reference``) and
``merge_setting_consistency`` gives the share of images it put in one setting.
"""
from __future__ import annotations

import argparse
import json
import os
import time

import os as _os
import sys as _sys

_sys.path.insert(0, _os.path.dirname(_os.path.abspath(__file__)))
from _machine import machine_name  # noqa: E402 - shared with the other benchmarks

import numpy as np


def judge(merged, truth_ds, sites: np.ndarray) -> dict:
    """CC figures and iodide peak heights of one merged ``rs.DataSet``."""
    from streamvi.quality.evaluate import anomalous_peak_heights, compare_to_truth

    cmp = compare_to_truth(merged, truth_ds)
    peaks = anomalous_peak_heights(merged, truth_ds, sites)
    heights = np.asarray(peaks["site_sigma"])
    return {"cc_F": cmp["cc_F"], "cc_F_top_shell": cmp["cc_F_shells"][-1],
            "d_min_top_shell": cmp["d_min_shells"][-1], "cc_anom": cmp["cc_anom"],
            "n_common": cmp["n_common"],
            "iodide_mean": float(heights.mean()), "iodide_min": float(heights.min()),
            "iodide_max": float(heights.max()), "sites_are_top": peaks["sites_are_top"],
            "max_away_from_sites": peaks["max_away_from_sites_sigma"]}


def run(*, images: int, epochs: float, seed: int, device: str, dmin: float = 1.8,
        threads: int | None = None, d_model: int | None = None,
        n_layers: int | None = None, space_group: str | None = None,
        cell: tuple[float, ...] | None = None, indexing_ambiguity: bool = False,
        refine_geometry: bool = True) -> dict:
    """Simulate, merge three ways, judge; figures per method."""
    import torch

    from streamvi.merging.engine import EngineConfig
    from streamvi.quality.evaluate import average_merge
    from streamvi.merging.offline import merge_crystals
    from streamvi.publish.mtz import snapshot_to_dataset
    from streamvi.symmetry import ReciprocalSpace
    from streamvi.merging.trainer import TrainerConfig
    from streamvi.merging.reference import ReferenceData
    from streamvi_sim import SimulationConfig, Simulator, simulate_structure

    extra: dict = {}
    if space_group:
        extra["space_group"] = space_group
    if cell:
        extra["cell"] = tuple(cell)
    sim = SimulationConfig(n_images=images, seed=seed, dmin=dmin,
                           indexing_ambiguity=indexing_ambiguity, **extra)
    t0 = time.perf_counter()
    truth = simulate_structure(sim)
    simulator = Simulator(sim, truth)
    pairs = [simulator.image(i) for i in range(images)]
    crystals = [msg for msg, _ in pairs]
    settings = np.array([t.setting for _, t in pairs])
    simulate_s = time.perf_counter() - t0
    truth_ds = truth.to_dataset()
    sites = truth.site_frac("I")
    space = ReciprocalSpace(sim.space_group, sim.cell, sim.dmin, anomalous=True)
    out: dict = {"simulate_seconds": simulate_s, "images": len(crystals),
                 "space_group": sim.space_group,
                 "reflections": int(sum(len(c) for c in crystals)), "n_iodide": len(sites),
                 "methods": {}}
    # what `streamvi merge` uses on a CPU: 8 Monte Carlo samples, one torch thread
    tcfg = TrainerConfig(device=device, mc_samples=8, refine_geometry=refine_geometry,
                         **({} if threads is None else {"cpu_threads": threads}))
    if d_model is not None:
        tcfg.d_model = d_model
    if n_layers is not None:
        tcfg.n_layers = n_layers
    ecfg = EngineConfig()
    t0 = time.perf_counter()
    # the truth as reference: with an indexing ambiguity the merge is judged in its setting
    reference = ReferenceData("truth", truth_ds.get_hkls(), truth_ds["FMODEL"].to_numpy(),
                              truth_ds.spacegroup, truth_ds.cell)
    snap, engine = merge_crystals(crystals, space, trainer_config=tcfg, engine_config=ecfg,
                                  epochs=epochs, reference=reference)
    seconds = time.perf_counter() - t0
    fig = judge(snapshot_to_dataset(snap), truth_ds, sites)
    if space.n_ops > 1:
        # images put in one setting: the chosen operator as a function of the true one
        chosen = engine.store.image_op[: engine.n_images]
        fig["setting_consistency"] = float(sum(
            np.bincount(chosen[settings == k], minlength=space.n_ops).max()
            for k in range(space.n_ops) if (settings == k).any()) / len(settings))
    fig.update(seconds=seconds, steps=engine.trainer.step, epochs=epochs,
               device=str(engine.device).split(":")[0], threads=torch.get_num_threads(),
               d_model=tcfg.d_model, n_layers=tcfg.n_layers, mc_samples=tcfg.mc_samples,
               batch_images=ecfg.batch_images, refine_geometry=refine_geometry)
    out["methods"]["streamvi"] = fig
    for weighting in ("inverse_variance", "mean"):
        t0 = time.perf_counter()
        merged = average_merge(crystals, space, weighting=weighting)
        seconds = time.perf_counter() - t0
        fig = judge(merged, truth_ds, sites)
        fig.update(seconds=seconds, device="cpu")
        out["methods"][weighting] = fig
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=2000)
    ap.add_argument("--epochs", type=float, default=10.0, help="passes of the streamvi merge")
    ap.add_argument("--dmin", type=float, default=1.8, help="resolution of the simulation, Å")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cpu", help="cpu (the section 9 setting), cuda or auto")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch CPU threads (default: TrainerConfig.cpu_threads)")
    ap.add_argument("--d-model", type=int, default=None, help="scale network width")
    ap.add_argument("--layers", type=int, default=None, help="scale network residual blocks")
    ap.add_argument("--space-group", default=None, help="of the simulation (default P 43 21 2)")
    ap.add_argument("--cell", type=float, nargs=6, default=None,
                    help="a b c alpha beta gamma of the simulation, Å and degrees")
    ap.add_argument("--indexing-ambiguity", action="store_true",
                    help="images in random merohedral settings (P 4, P 3, …); the merge is "
                         "judged after reindexing into the truth's setting")
    ap.add_argument("--no-refine-geometry", dest="refine_geometry", action="store_false",
                    help="merge with each image's reported geometry as it is (docs/model.md "
                         "change 9)")
    ap.add_argument("--quick", action="store_true", help="100 images, 2 epochs")
    args = ap.parse_args(argv)
    if args.quick:
        args.images, args.epochs = min(args.images, 100), min(args.epochs, 2.0)
    load = os.getloadavg()[0]
    r = run(images=args.images, epochs=args.epochs, seed=args.seed, device=args.device,
            dmin=args.dmin, threads=args.threads, d_model=args.d_model, n_layers=args.layers,
            space_group=args.space_group, cell=args.cell,
            indexing_ambiguity=args.indexing_ambiguity, refine_geometry=args.refine_geometry)
    import torch

    common = {"machine": machine_name(), "images": r["images"],
              "space_group": r["space_group"], "indexing_ambiguity": args.indexing_ambiguity,
              "reflections": r["reflections"], "dmin": args.dmin, "seed": args.seed,
              "torch": torch.__version__, "load_avg_1m_before": round(load, 2)}
    for method, f in r["methods"].items():
        base = {"method": method, "device": f.pop("device"), **common}
        extra = {k: v for k, v in f.items() if k not in ("cc_F", "cc_F_top_shell", "cc_anom",
                                                          "iodide_mean", "seconds",
                                                          "setting_consistency")}
        lines = [("merge_cc_F", f["cc_F"], "CC", {}),
                 ("merge_cc_F_top_shell", f["cc_F_top_shell"], "CC",
                  {"d_min_top_shell": round(f["d_min_top_shell"], 3)}),
                 ("merge_cc_anom", f["cc_anom"], "CC", {}),
                 ("merge_iodide_peak_sigma", f["iodide_mean"], "sigma",
                  {"min": round(f["iodide_min"], 2), "max": round(f["iodide_max"], 2),
                   "sites": r["n_iodide"], "sites_are_top": f["sites_are_top"],
                   "max_away_from_sites_sigma": round(f["max_away_from_sites"], 2)}),
                 *([("merge_setting_consistency", f["setting_consistency"], "fraction", {})]
                   if "setting_consistency" in f else []),
                 ("merge_seconds", f["seconds"], "s",
                  {k: v for k, v in extra.items() if k in ("steps", "epochs", "threads",
                                                           "d_model", "n_layers",
                                                           "mc_samples", "batch_images")})]
        for name, value, unit, more in lines:
            print(json.dumps({"name": name, "value": round(float(value), 4), "unit": unit,
                              **more, **base}), flush=True)


if __name__ == "__main__":
    main()
