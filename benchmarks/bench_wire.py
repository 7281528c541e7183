"""Wire decoding and reflection lookup throughput on one core.

Encodes ``--messages`` crystals (default 2,000) of about ``--reflections`` reflections
(default 800, with fs, ss and a panel index into 64 panel names, as indexamajig sends them),
then times :func:`streamvi.wire.decode_crystal` over all of them, and
:meth:`streamvi.symmetry.ReciprocalSpace.lookup` over all their Miller indices (lysozyme cell,
P 43 21 2, 1.8 Å, anomalous).  Each figure is the best of ``--repeats`` passes, so that other
work on the machine disturbs it less.  Prints one JSON line per figure::

    {"name": "wire_decode", "value": ..., "unit": "reflections/s", "device": "cpu", ...}
    {"name": "hkl_lookup", "value": ..., "unit": "reflections/s", "device": "cpu", ...}

    python benchmarks/bench_wire.py [--messages N] [--reflections N] [--repeats N]
"""
from __future__ import annotations

import os

# One core means one BLAS/OpenMP thread too; set before numpy is imported.
for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402

from streamvi.symmetry import ReciprocalSpace  # noqa: E402
from streamvi.wire import CrystalMessage, decode_crystal, encode_crystal  # noqa: E402

CELL = (79.1, 79.1, 37.9, 90.0, 90.0, 90.0)
PANELS = [f"p{p}a{a}" for p in range(16) for a in range(4)]


def make_messages(n_messages: int, n_reflections: int, seed: int = 0) -> list[bytes]:
    """Encoded random crystals; the reflection count varies ±25 % around ``n_reflections``."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n_messages):
        n = int(rng.integers(3 * n_reflections // 4, 5 * n_reflections // 4 + 1))
        hkl = rng.integers(-44, 45, size=(n, 3)).astype(np.int32)
        hkl[:, 2] //= 2
        hkl[(hkl == 0).all(axis=1)] = (1, 0, 0)
        msg = CrystalMessage(
            run="bench", image=f"run0001.h5//{i}", crystal=0,
            h=hkl[:, 0], k=hkl[:, 1], l=hkl[:, 2],
            I=rng.gamma(1.0, 300.0, n).astype(np.float32),
            sigI=rng.uniform(5.0, 50.0, n).astype(np.float32),
            photon_energy_eV=9500.0, cell=CELL,
            astar=tuple(rng.normal(0, 0.01, 3)), bstar=tuple(rng.normal(0, 0.01, 3)),
            cstar=tuple(rng.normal(0, 0.02, 3)),
            fs=rng.uniform(0, 1024, n).astype(np.float32),
            ss=rng.uniform(0, 512, n).astype(np.float32),
            panel=rng.integers(0, len(PANELS), n).astype(np.int16), panel_names=PANELS,
            profile_radius=0.002, timestamp=1.7e9 + i)
        out.append(encode_crystal(msg))
    return out


def best_seconds(work, repeats: int) -> float:
    """Shortest wall time of ``repeats`` calls of ``work()``."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        work()
        best = min(best, time.perf_counter() - start)
    return best


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=2000)
    parser.add_argument("--reflections", type=int, default=800)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)

    payloads = make_messages(args.messages, args.reflections)
    decoded = [decode_crystal(p) for p in payloads]
    n_refl = sum(len(m) for m in decoded)
    machine = f"{platform.machine()} {platform.processor() or ''} {os.cpu_count()} cpus, " \
              f"{platform.system()}, Python {platform.python_version()}, numpy {np.__version__}"
    common = {"device": "cpu", "machine": " ".join(machine.split()), "threads": 1}

    seconds = best_seconds(lambda: [decode_crystal(p) for p in payloads], args.repeats)
    print(json.dumps({"name": "wire_decode", "value": round(n_refl / seconds),
                      "unit": "reflections/s", **common, "messages": args.messages,
                      "reflections": n_refl, "messages_per_s": round(args.messages / seconds),
                      "bytes": sum(len(p) for p in payloads), "seconds": round(seconds, 4)}))

    hkl = np.concatenate([m.hkl() for m in decoded])
    for name, dense_limit in (("hkl_lookup", 1 << 24), ("hkl_lookup_keyed", 0)):
        start = time.perf_counter()
        space = ReciprocalSpace("P 43 21 2", CELL, 1.8, anomalous=True, dense_limit=dense_limit)
        build = time.perf_counter() - start
        seconds = best_seconds(lambda: space.lookup(hkl), args.repeats)
        print(json.dumps({"name": name, "value": round(len(hkl) / seconds),
                          "unit": "reflections/s", **common, "reflections": len(hkl),
                          "space_group": "P 43 21 2", "dmin_A": 1.8, "anomalous": True,
                          "n_unique": space.n_unique, "build_seconds": round(build, 3),
                          "seconds": round(seconds, 4)}))


if __name__ == "__main__":
    main()
