"""Time-resolved (pump–probe) differences on a simulated set with known truth (issue #19).

Simulates ``--images`` stills (default 1,200: P 4₃2₁2 lysozyme-like, 2.0 Å), dark and light
interleaved 1:1, the light state with ``--light-change`` (default: 5 atoms moved by 1.5 Å at
30 % occupancy), then estimates ΔF = F_light − F_dark five ways:

- ``coupled``: (a) offline: one streamvi merge with conditions, the light amplitudes under the
  double-Wilson prior given the dark ones (``streamvi merge``'s default with conditions);
- ``online``: (a) live: ``serve --conditions dark,light`` (coupled prior), the crystals sent
  over loopback ZeroMQ at 200 images/s, trained until every image had 8 visits
  (``--online-visits``), its ``latest-light-minus-dark.mtz`` judged;
- ``joint``: (b) one streamvi merge with conditions ``dark, light`` (one shared scale model,
  independent Wilson priors per condition, ``--no-coupled-prior``;
  :meth:`MergeEngine.condition_snapshots`);
- ``inverse_variance``: (c) two inverse-variance averages (one per condition) subtracted;
- ``separate``: (d) two separate streamvi merges (one per condition) subtracted.

(c) and (d) put the light amplitudes on the dark ones' scale by one factor (the ratio of
the mean amplitudes over the common reflections), as a crew would (two separate merges have independent overall
scales); (b) is not rescaled (its conditions share the scales).  Every streamvi merge uses
``streamvi merge``'s CPU settings and its default length (10 epochs, at least 1,500 steps).

Figures per method, one JSON line each: CC(ΔF, ΔF_true) overall and per resolution shell
(6 shells of equal reciprocal volume; ``cc_shells`` low to high resolution), the same for the
q-weighted WDF, and the heights (σ of the map) of the ΔF and WDF difference maps computed
with the true dark phases at the moved atoms' light sites (positive peaks expected) and at
their dark sites (negative), means over atoms; and ``df_gain_top10``, the least-squares gain
of DF on the true ΔF over the 10 % largest true changes (1: the change kept at full size;
a prior that hid changes would lower it); ``sigdf_scatter`` (per shell
``sigdf_scatter_shells``), the r.m.s. of the noise in DF (what is left after each shell's
shrunk true change) over SIGDF: 1 where SIGDF is the real error; ``significant_fraction``,
the share of |DF|/SIGDF > 3 (0.27 % for pure unit-normal noise).

    python benchmarks/bench_time_resolved.py [--images N] [--dmin D] [--light-change SPEC]
        [--steps S] [--methods coupled,online,joint,inverse_variance,separate,truth]
        [--online-visits V] [--set FIELD=VALUE] [--out results.jsonl]

``--set`` changes a field of the offline merges' ``TrainerConfig`` (e.g. ``error_model=true``;
repeatable), recorded as ``trainer_settings`` in every line.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os as _os
import sys as _sys
import time

_sys.path.insert(0, _os.path.dirname(_os.path.abspath(__file__)))
from _machine import machine_name, streamvi_commit  # noqa: E402 - shared with the others

import numpy as np  # noqa: E402

N_SHELLS = 6


def judge(delta, truth_delta, light_sites: np.ndarray, dark_sites: np.ndarray) -> dict:
    """CC of ``delta``'s ``DF`` and ``WDF`` with the true ΔF, and their map heights."""
    from streamvi.quality.anomalous import difference_map, heights_at
    from streamvi.quality.stats import pearson, pearson_by_group
    from streamvi.symmetry import shell_edges, shell_index

    common = delta.index.intersection(truth_delta.index)
    d = delta.loc[common]
    t = truth_delta.loc[common]
    true_df = t["DF"].to_numpy(np.float64)
    res = d.compute_dHKL()["dHKL"].to_numpy(np.float64)
    shell = shell_index(res, shell_edges(res.max(), res.min(), N_SHELLS))
    hkl = np.array(common.tolist(), dtype=np.int32)
    out: dict = {"n_common": int(len(common))}
    for col, tag in (("DF", ""), ("WDF", "_wdf")):
        x = d[col].to_numpy(np.float64)
        ok = np.isfinite(x)
        out[f"cc{tag}"] = float(pearson(x[ok], true_df[ok]))
        cc, _ = pearson_by_group(x[ok], true_df[ok], shell[ok], N_SHELLS)
        out[f"cc{tag}_shells"] = [round(float(c), 4) for c in cc]
        grid = difference_map(delta.cell, delta.spacegroup, hkl[ok], x[ok],
                              t["PHIDARK"].to_numpy(np.float64)[ok], phase_shift_deg=0.0,
                              sample_rate=3.0)
        out[f"peak{tag}_light_sites"] = float(np.mean(heights_at(grid, light_sites)))
        out[f"peak{tag}_dark_sites"] = float(np.mean(heights_at(grid, dark_sites)))
        out[f"map{tag}_max"] = float(np.asarray(grid).max())
    # how much of the true change the merge keeps, in absolute terms (a prior that hid
    # changes would shrink it; the map heights above are in σ and rise as noise falls):
    # the least-squares gain of DF on the true ΔF over the 10 % largest true changes
    # (the merge's amplitudes put on the truth's scale by the ratio of the dark means)
    k = float(np.nansum(t["FDARK"].to_numpy(np.float64))
              / np.nansum(d["F_DARK"].to_numpy(np.float64)))
    x = k * d["DF"].to_numpy(np.float64)
    big = np.isfinite(x) & (np.abs(true_df) >= np.quantile(np.abs(true_df), 0.9))
    out["df_gain_top10"] = float(np.sum(x[big] * true_df[big]) / np.sum(true_df[big] ** 2))
    # is SIGDF the scatter of DF?  The noise left after each shell's shrunk true change
    # (the least-squares gain of DF on the true ΔF per shell), in units of SIGDF: 1 when
    # calibrated; and how many |DF|/SIGDF exceed 3 (0.27 % of pure unit-normal noise)
    if "SIGDF" not in d.columns:           # the truth has no error
        out.update(sigdf_scatter=None, sigdf_scatter_shells=None, significant_fraction=None,
                   d_shells=[round(float(v), 2) for v in
                             shell_edges(res.max(), res.min(), N_SHELLS)[1:]])
        return out
    sig = k * d["SIGDF"].to_numpy(np.float64)
    ok = np.isfinite(x) & np.isfinite(sig) & (sig > 0)
    noise = np.full(x.shape, np.nan)
    for j in range(N_SHELLS):
        m = ok & (shell == j)
        t2 = float(np.sum(true_df[m] ** 2))
        g = float(np.sum(x[m] * true_df[m]) / t2) if t2 > 0 else 0.0
        noise[m] = (x[m] - g * true_df[m]) / sig[m]
    out["sigdf_scatter"] = float(np.sqrt(np.mean(noise[ok] ** 2)))
    out["sigdf_scatter_shells"] = [round(float(np.sqrt(np.mean(noise[ok & (shell == j)] ** 2))), 3)
                                   for j in range(N_SHELLS)]
    out["significant_fraction"] = float(np.mean(np.abs(x[ok]) / sig[ok] > 3.0))
    d_edges = shell_edges(res.max(), res.min(), N_SHELLS)
    out["d_shells"] = [round(float(x), 2) for x in d_edges[1:]]
    return out


def _online(crystals, sim, truth_delta, light_sites, dark_sites, *, rate: float = 200.0,
            visits: int = 8, timeout_s: float = 900.0) -> dict:
    """(a) online: a ``serve --conditions dark,light`` service in this process (its
    defaults: d_model 16, constant learning rates, averaged posterior), the crystals sent to
    it over loopback ZeroMQ at ``rate`` images/s, trained until every image had ``visits``
    visits (as ``streamvi demo`` does), then its ``latest-light-minus-dark.mtz`` judged."""
    import tempfile

    import reciprocalspaceship as rs

    from streamvi.config import load_config
    from streamvi.producers.send import send_messages
    from streamvi.service.service import Service

    with tempfile.TemporaryDirectory() as out:
        cfg = load_config(env={}, overrides={
            "listen": ["tcp://127.0.0.1:*"], "publish_endpoint": "", "metrics_port": -1,
            "out_dir": out, "space_group": sim.space_group, "cell": " ".join(map(str, sim.cell)),
            "dmin": sim.dmin, "anomalous": False, "device": "cpu", "conditions": "dark,light",
            "publish_interval": 30.0, "checkpoint_interval": 1e6})
        t = time.perf_counter()
        service = Service(cfg).start()
        try:
            send_messages(crystals, service.ingestor.bound_endpoints[0], rate=rate)
            sent_s = time.perf_counter() - t
            service.wait_until(lambda s: s.crystals_merged == len(crystals)
                               and s.all_visited(visits), timeout=timeout_s)
            service.publish_now()
            steps = service.engine.trainer.step
        finally:
            service.stop()
        seconds = time.perf_counter() - t
        delta = rs.read_mtz(_os.path.join(out, "latest-light-minus-dark.mtz"))
    return {"seconds": seconds, "stream_seconds": sent_s, "rate": rate, "visits": visits,
            "steps": steps, "light_scale": 1.0, **judge(delta, truth_delta, light_sites,
                                                          dark_sites)}


def _scaled(light_f: np.ndarray, dark_f: np.ndarray) -> float:
    """Factor putting ``light_f`` on ``dark_f``'s scale: the ratio of their means (a least-
    squares fit of noisy amplitudes would be biased low by their noise)."""
    ok = np.isfinite(light_f) & np.isfinite(dark_f)
    return float(np.sum(dark_f[ok]) / np.sum(light_f[ok]))


def _delta_from(light, dark, *, rescale: bool):
    """A ``DF SIGDF W WDF`` data set of two ``F SIGF`` data sets (light optionally rescaled)."""
    import reciprocalspaceship as rs

    from streamvi.quality.difference import difference_coefficients

    common = light.index.intersection(dark.index)
    l, dk = light.loc[common], dark.loc[common]
    k = _scaled(l["F"].to_numpy(np.float64), dk["F"].to_numpy(np.float64)) if rescale else 1.0
    res = l.compute_dHKL()["dHKL"].to_numpy(np.float64)
    diff = difference_coefficients(k * l["F"].to_numpy(np.float64),
                                   k * l["SIGF"].to_numpy(np.float64),
                                   dk["F"].to_numpy(np.float64),
                                   dk["SIGF"].to_numpy(np.float64), res)
    ds = rs.DataSet({"DF": diff.DF, "SIGDF": diff.SIGDF, "W": diff.W, "WDF": diff.WDF,
                     "F_DARK": dk["F"].to_numpy(np.float64)},
                    index=common, cell=light.cell, spacegroup=light.spacegroup, merged=True)
    return ds, k


METHODS = ("coupled", "online", "joint", "inverse_variance", "separate", "truth")


def run(*, images: int, dmin: float, light_change: str, seed: int, steps: int | None,
        epochs: float | None, methods: tuple[str, ...] = METHODS,
        online_visits: int = 8, trainer_settings: dict | None = None) -> list[dict]:
    import torch

    from streamvi.cli.merge import merge_config, model_configs
    from streamvi.merging.offline import merge_crystals
    from streamvi.publish.mtz import difference_dataset
    from streamvi.quality.evaluate import average_merge
    from streamvi.snapshot import snapshot_to_dataset
    from streamvi.symmetry import ReciprocalSpace
    from streamvi_sim import SimulationConfig, simulate_images, simulate_structure
    from streamvi_sim.conditions import changed_atoms, condition_truths, delta_dataset

    sim = SimulationConfig(n_images=images, seed=seed, dmin=dmin, conditions=("dark", "light"),
                           condition_ratio=(1, 1), light_change=light_change)
    t0 = time.perf_counter()
    dark_truth = simulate_structure(sim)
    crystals = list(simulate_images(sim, dark_truth))
    simulate_s = time.perf_counter() - t0
    truths = condition_truths(sim, dark_truth)
    truth_delta = delta_dataset(truths["dark"], truths["light"])
    picked = changed_atoms(sim, dark_truth.atoms, dark_truth.gemmi_cell)
    light_sites = picked.moved_to
    dark_sites = dark_truth.atoms.frac[picked.moved]
    rel = float(np.sqrt(np.mean(truth_delta["DF"].to_numpy() ** 2)
                        / np.mean(truth_delta["FDARK"].to_numpy() ** 2)))
    space = ReciprocalSpace(sim.space_group, sim.cell, sim.dmin, anomalous=False)
    tcfg, ecfg = model_configs(merge_config(["x.stream", "-o", "x.mtz", "--device", "cpu"]))
    if trainer_settings:
        tcfg = dataclasses.replace(tcfg, **{
            k: type(getattr(tcfg, k))(v) if not isinstance(getattr(tcfg, k), bool)
            else v.lower() in ("1", "true", "yes") for k, v in trainer_settings.items()})
    common = {"images": images, "dmin": dmin, "light_change": light_change, "seed": seed,
              "rms_dF_over_F": rel, "simulate_seconds": simulate_s, "device": "cpu",
              "threads": torch.get_num_threads(), "machine": machine_name(),
              "streamvi_commit": streamvi_commit(),
              "d_model": tcfg.d_model, "mc_samples": tcfg.mc_samples,
              **({"trainer_settings": trainer_settings} if trainer_settings else {})}
    dark = [c for c in crystals if c.condition == "dark"]
    light = [c for c in crystals if c.condition == "light"]
    lines = []

    def merge(msgs, conditions=None, coupled_reference=None):
        t = time.perf_counter()
        snap, engine = merge_crystals(msgs, space, trainer_config=tcfg, engine_config=ecfg,
                                      steps=steps, epochs=epochs, conditions=conditions,
                                      coupled_reference=coupled_reference)
        return snap, engine, time.perf_counter() - t

    if "coupled" in methods:        # (a) one merge, light under the double-Wilson prior
        _, engine, seconds = merge(crystals, ("dark", "light"), coupled_reference="dark")
        snaps = engine.condition_snapshots()
        fig = judge(difference_dataset(snaps["light"], snaps["dark"]), truth_delta,
                    light_sites, dark_sites)
        lines.append({"method": "coupled", "seconds": seconds, "steps": engine.trainer.step,
                      "light_scale": 1.0,
                      "r_shells": [round(x, 4) for x in engine.coupled_correlations()["light"]],
                      **fig})
    if "online" in methods:         # (a) live: serve --conditions dark,light over loopback
        lines.append({"method": "online", **_online(crystals, sim, truth_delta, light_sites,
                                                     dark_sites, visits=online_visits)})
    if "joint" in methods:          # (b) one joint merge with conditions
        _, engine, seconds = merge(crystals, ("dark", "light"))
        snaps = engine.condition_snapshots()
        fig = judge(difference_dataset(snaps["light"], snaps["dark"]), truth_delta,
                    light_sites, dark_sites)
        lines.append({"method": "joint", "seconds": seconds, "steps": engine.trainer.step,
                      "light_scale": 1.0, **fig})
    if "inverse_variance" in methods:   # (c) two inverse-variance averages subtracted
        t = time.perf_counter()
        delta, k = _delta_from(average_merge(light, space), average_merge(dark, space),
                               rescale=True)
        lines.append({"method": "inverse_variance", "seconds": time.perf_counter() - t,
                      "light_scale": k, **judge(delta, truth_delta, light_sites, dark_sites)})
    if "separate" in methods:       # (d) two separate streamvi merges subtracted
        snap_d, eng_d, s_d = merge(dark)
        snap_l, eng_l, s_l = merge(light)
        delta, k = _delta_from(snapshot_to_dataset(snap_l), snapshot_to_dataset(snap_d),
                               rescale=True)
        lines.append({"method": "separate", "seconds": s_d + s_l,
                      "steps": eng_d.trainer.step + eng_l.trainer.step, "light_scale": k,
                      **judge(delta, truth_delta, light_sites, dark_sites)})
    if "truth" in methods:          # the true ΔF through the same judge: the ceiling
        exact = truth_delta.assign(WDF=truth_delta["DF"], F_DARK=truth_delta["FDARK"])
        lines.append({"method": "truth", **judge(exact, truth_delta, light_sites, dark_sites)})
    return [{"benchmark": "time_resolved", **line, **common} for line in lines]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=1200)
    ap.add_argument("--dmin", type=float, default=2.0)
    ap.add_argument("--light-change", default="move=5,shift=1.5,fraction=0.3")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=None,
                    help="optimiser steps per merge; unset: streamvi merge's default")
    ap.add_argument("--epochs", type=float, default=None)
    ap.add_argument("--methods", default=",".join(METHODS),
                    help=f"comma-separated, of {', '.join(METHODS)}")
    ap.add_argument("--online-visits", type=int, default=8,
                    help="online: train until every image had this many visits (default 8, "
                         "as streamvi demo)")
    ap.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                    help="the offline merges' TrainerConfig field (repeatable), e.g. "
                         "error_model=true; the online service keeps its defaults")
    ap.add_argument("--out", default=None, help="also append the JSON lines to this file")
    args = ap.parse_args()
    methods = tuple(m.strip() for m in args.methods.split(",") if m.strip())
    unknown = set(methods) - set(METHODS)
    if unknown:
        ap.error(f"--methods: {', '.join(sorted(unknown))} unknown; choose from "
                 f"{', '.join(METHODS)}")
    lines = run(images=args.images, dmin=args.dmin, light_change=args.light_change,
                seed=args.seed, steps=args.steps, epochs=args.epochs, methods=methods,
                online_visits=args.online_visits,
                trainer_settings=dict(kv.split("=", 1) for kv in args.set))
    for line in lines:
        text = json.dumps(line)
        print(text, flush=True)
        if args.out:
            with open(args.out, "a") as fh:
                fh.write(text + "\n")


if __name__ == "__main__":
    main()
