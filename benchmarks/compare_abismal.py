"""Judge another merger's MTZ (e.g. abismal's) against the simulator's truth, like
``bench_merge_quality.py`` judges streamvi.

    streamvi simulate --images 2000 -o sim.stream --truth truth.mtz
    abismal --space-group "P 43 21 2" --cell 79.1 79.1 37.9 90 90 90 -d 1.8 --anomalous \\
        --d-model 256 --layers 5 --mc-samples 32 -t 32 --epochs 1 --steps-per-epoch 20 \\
        -o out sim.stream
    python benchmarks/compare_abismal.py out/asu_0_epoch_1.mtz --seconds 158

abismal writes only ``F(+)``/``F(-)`` in anomalous mode: ``F`` is their mean where both are
present (the one there otherwise).  The truth (and the iodide sites) are rebuilt from
``SimulationConfig(seed=--seed)``, which is what ``streamvi simulate`` used.  Prints JSON lines
with the names of ``bench_merge_quality.py`` and ``method`` = ``--method``.
"""
from __future__ import annotations

import argparse
import json
import os as _os
import sys as _sys

_sys.path.insert(0, _os.path.dirname(_os.path.abspath(__file__)))
from _machine import machine_name  # noqa: E402 - shared with the other benchmarks

import numpy as np  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    import reciprocalspaceship as rs

    from bench_merge_quality import judge
    from streamvi_sim import SimulationConfig, simulate_structure

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("mtz")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--images", type=int, default=2000)
    ap.add_argument("--method", default="abismal")
    ap.add_argument("--seconds", type=float, default=None, help="the merger's wall time")
    ap.add_argument("--note", default="", help="settings of the run, kept in every line")
    args = ap.parse_args(argv)
    merged = rs.read_mtz(args.mtz)
    if "F" not in merged.columns:
        fp = merged["F(+)"].to_numpy(np.float64)
        fm = merged["F(-)"].to_numpy(np.float64)
        merged["F"] = rs.DataSeries(np.where(np.isnan(fp), fm, np.where(np.isnan(fm), fp,
                                                                      0.5 * (fp + fm))),
                                    index=merged.index, dtype="SFAmplitude")
    truth = simulate_structure(SimulationConfig(n_images=args.images, seed=args.seed))
    fig = judge(merged, truth.to_dataset(), truth.site_frac("I"))
    base = {"method": args.method, "machine": machine_name(), "device": "cpu",
            "mtz": _os.path.basename(args.mtz), "note": args.note}
    for name, key, unit in (("merge_cc_F", "cc_F", "CC"),
                            ("merge_cc_F_top_shell", "cc_F_top_shell", "CC"),
                            ("merge_cc_anom", "cc_anom", "CC"),
                            ("merge_iodide_peak_sigma", "iodide_mean", "sigma")):
        print(json.dumps({"name": name, "value": round(float(fig[key]), 4), "unit": unit,
                          **base}))
    if args.seconds is not None:
        print(json.dumps({"name": "merge_seconds", "value": args.seconds, "unit": "s", **base}))


if __name__ == "__main__":
    main()
