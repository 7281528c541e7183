"""Run every benchmark and print one JSON line per figure.

Each benchmark runs in its own process, one after the other (so that they do not disturb
each other), and every line it prints is passed on with the same keys on every line::

    {"name": ..., "value": ..., "unit": ..., "device": "cpu" | "cuda",
     "machine": {"platform", "cpu", "cores", "torch", "python", "gpu"},
     "bench": <benchmark>, "mode": "full" | "quick" | "smoke",
     "load_avg_1m": <host load when the benchmark started>, ...its own extra fields}

A benchmark that fails prints ``{"name": "<bench>_failed", "value": null, "error": ...}`` and
the exit status is 1.  Benchmarks (``--only`` takes any of these names):

- ``wire``: wire decoding and hkl lookup (bench_wire.py);
- ``stream_parse``: the CrystFEL stream reader (bench_stream_parse.py);
- ``ingest``: ZeroMQ → decode → validate → spool (bench_ingest.py);
- ``store``: decode + validate + :meth:`ReflectionStore.add` (symmetry lookup, features,
  columnar append on the training device) — measured here;
- ``training``: reflections trained per second per model size (bench_training.py);
- ``end_to_end``: a simulated beamline at a fixed rate into a real service
  (bench_end_to_end.py);
- ``distributed``: 2 data-parallel ranks against 1 process (bench_distributed.py);
- ``merge_quality``: CC against the truth and iodide peaks, streamvi vs plain averages
  (bench_merge_quality.py).

``--quick`` shrinks every benchmark to finish within a minute on 2 CPU cores; ``--smoke`` to
a few seconds each (a check that they run, not a measurement).

    python benchmarks/run.py [--quick | --smoke] [--device auto|cpu|cuda] [--threads N]
                             [--only NAME ...]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

import os as _os
import sys as _sys

_sys.path.insert(0, _os.path.dirname(_os.path.abspath(__file__)))
from _machine import cpu_model  # noqa: E402 - shared with the other benchmarks

HERE = Path(__file__).resolve().parent


@dataclass
class Bench:
    """How to run one benchmark script in each mode (extra arguments)."""

    script: str
    full: list[str] = field(default_factory=list)
    quick: list[str] = field(default_factory=list)
    smoke: list[str] = field(default_factory=list)
    takes_device: bool = False
    takes_threads: bool = False


BENCHMARKS: dict[str, Bench] = {
    "wire": Bench("bench_wire.py", quick=["--messages", "500", "--repeats", "2"],
                  smoke=["--messages", "50", "--repeats", "1"]),
    "stream_parse": Bench("bench_stream_parse.py", quick=["--images", "2000"],
                          smoke=["--images", "100"]),
    "ingest": Bench("bench_ingest.py", quick=["--messages", "1000"], smoke=["--messages", "100"]),
    "store": Bench("run.py", full=["--store-bench", "5000"], quick=["--store-bench", "500"],
                   smoke=["--store-bench", "50"], takes_device=True),
    "training": Bench("bench_training.py", quick=["--quick", "--seconds", "0.5"],
                      smoke=["--quick", "--seconds", "0.1", "--reflections-per-image", "100",
                             "--rows", "2000"], takes_device=True, takes_threads=True),
    "end_to_end": Bench("bench_end_to_end.py", quick=["--quick", "--catch-up-s", "5"],
                        smoke=["--images", "20", "--dmin", "3.5", "--catch-up-s", "3",
                               "--publish-interval", "0.5"], takes_device=True,
                        takes_threads=True),
    "distributed": Bench("bench_distributed.py",
                         quick=["--images", "40", "--dmin", "2.5", "--steps", "6",
                                "--warmup", "2", "--cases", "one_thread,strong"],
                         smoke=["--images", "12", "--dmin", "3.5", "--steps", "2",
                                "--warmup", "1", "--cases", "strong"], takes_device=True),
    "merge_quality": Bench("bench_merge_quality.py",
                           quick=["--images", "60", "--epochs", "1", "--dmin", "3.0"],
                           smoke=["--images", "20", "--epochs", "1", "--dmin", "3.5"],
                           takes_device=True, takes_threads=True),
}


def machine_info(device: str) -> dict:
    """Where the figures were measured: OS, CPU model, cores, torch, GPU (on CUDA)."""
    cpu = cpu_model()
    try:
        torch_version = metadata.version("torch")
    except metadata.PackageNotFoundError:
        torch_version = None
    gpu = None
    if device == "cuda":
        import torch

        gpu = torch.cuda.get_device_name(0)
    return {"platform": platform.platform(), "cpu": cpu, "cores": os.cpu_count(),
            "torch": torch_version, "python": platform.python_version(), "gpu": gpu}


def resolve_device(name: str) -> str:
    if name == "cpu":
        return "cpu"
    import torch

    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("run.py: --device cuda but CUDA is not available")
    return "cuda" if torch.cuda.is_available() else "cpu"


def run_bench(name: str, bench: Bench, mode: str, device: str, machine: dict,
              timeout_s: float, threads: int | None = None) -> bool:
    """Run one benchmark; print its figures with the common keys; False if it failed."""
    args = list(getattr(bench, mode))
    if bench.takes_device:
        args += ["--device", device]
    if bench.takes_threads and threads is not None:
        args += ["--threads", str(threads)]
    cmd = [sys.executable, str(HERE / bench.script), *args]
    load = round(os.getloadavg()[0], 2)
    common = {"bench": name, "mode": mode, "load_avg_1m": load}
    if bench.takes_threads and threads is not None:
        common["threads_requested"] = threads
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [str(HERE.parent)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, env=env,
                              cwd=HERE.parent)
        out, err, rc = proc.stdout, proc.stderr, proc.returncode
    except subprocess.TimeoutExpired as exc:
        out = exc.stdout.decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        err, rc = f"timed out after {timeout_s:g} s", -1
    seconds = time.perf_counter() - t0
    figures = 0
    for line in out.splitlines():
        line = line.strip()
        if not line.startswith("{"):
            continue
        try:
            fig = json.loads(line)
        except json.JSONDecodeError:
            continue
        detail = fig.pop("machine", None)
        fig.setdefault("value", None)
        fig.setdefault("unit", None)
        fig.setdefault("device", "cpu" if not bench.takes_device else device)
        out_fig = {"name": fig.pop("name", f"{name}_figure"), "value": fig.pop("value"),
                   "unit": fig.pop("unit"), "device": fig.pop("device"), "machine": machine,
                   **common, **fig}
        if detail is not None:
            out_fig["machine_detail"] = detail
        print(json.dumps(out_fig), flush=True)
        figures += 1
    if rc != 0 or figures == 0:
        print(json.dumps({"name": f"{name}_failed", "value": None, "unit": None,
                          "device": device, "machine": machine, **common, "returncode": rc,
                          "seconds": round(seconds, 1), "error": err.strip()[-1500:]}),
              flush=True)
        return False
    print(f"run.py: {name} done in {seconds:.1f} s ({figures} figures)", file=sys.stderr,
          flush=True)
    return True


def store_bench(n_messages: int, device: str) -> None:
    """decode + validate + ``ReflectionStore.add`` of ``n_messages`` random crystals."""
    import torch

    from bench_wire import CELL, make_messages
    from streamvi.merging.store import ReflectionStore
    from streamvi.symmetry import ReciprocalSpace
    from streamvi.wire import decode_crystal

    torch_device = torch.device("cuda" if device == "cuda" else "cpu")
    payloads = make_messages(n_messages, 800)
    space = ReciprocalSpace("P 43 21 2", CELL, 1.8, anomalous=True)
    # warm-up on a throwaway store (first allocations, lazy imports)
    warm = ReflectionStore(space, device=torch_device)
    for p in payloads[:20]:
        warm.add(decode_crystal(p))
    store = ReflectionStore(space, device=torch_device)
    decode_s = add_s = 0.0
    for p in payloads:
        t0 = time.perf_counter()
        msg = decode_crystal(p)
        t1 = time.perf_counter()
        store.add(msg)
        add_s += time.perf_counter() - t1
        decode_s += t1 - t0
    if torch_device.type == "cuda":
        torch.cuda.synchronize()
    n = store.n_reflections
    common = {"device": torch_device.type, "messages": n_messages, "reflections": n,
              "reflections_per_message": 800, "space_group": "P 43 21 2", "dmin_A": 1.8,
              "anomalous": True, "torch_threads": torch.get_num_threads()}
    print(json.dumps({"name": "store_add", "value": round(n / add_s), "unit": "reflections/s",
                      "seconds": round(add_s, 4), **common}))
    print(json.dumps({"name": "ingest_decode_store", "value": round(n / (add_s + decode_s)),
                      "unit": "reflections/s", "seconds": round(add_s + decode_s, 4),
                      "note": "decode + validate + store.add, one thread, no sockets",
                      **common}))
    # the service's way: the crystals the ingest queue hands over, added 256 at a time
    msgs = [decode_crystal(p) for p in payloads]
    batched = ReflectionStore(space, device=torch_device)
    t0 = time.perf_counter()
    for i in range(0, len(msgs), 256):
        batched.add_many(msgs[i:i + 256])
    if torch_device.type == "cuda":
        torch.cuda.synchronize()
    many_s = time.perf_counter() - t0
    print(json.dumps({"name": "store_add_many", "value": round(n / many_s), "unit": "reflections/s",
                      "seconds": round(many_s, 4), "batch_crystals": 256, **common}))
    print(json.dumps({"name": "ingest_decode_store_many", "value": round(n / (many_s + decode_s)),
                      "unit": "reflections/s", "seconds": round(many_s + decode_s, 4),
                      "note": "decode + validate + store.add_many of 256, one thread, no sockets",
                      **common}))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    size = ap.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="every benchmark within a minute")
    size.add_argument("--smoke", action="store_true", help="tiny sizes: check they run")
    ap.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    ap.add_argument("--only", nargs="+", choices=sorted(BENCHMARKS), metavar="NAME",
                    help=f"run only these ({', '.join(BENCHMARKS)})")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch CPU threads for training, end_to_end and merge_quality "
                         "(default: torch's choice, every core)")
    ap.add_argument("--timeout", type=float, default=None,
                    help="seconds per benchmark (default: 3 h, 10 min quick, 2 min smoke)")
    ap.add_argument("--store-bench", type=int, metavar="N", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    device = resolve_device(args.device)
    if args.store_bench:
        store_bench(args.store_bench, device)
        return 0
    mode = "smoke" if args.smoke else "quick" if args.quick else "full"
    timeout = args.timeout or {"full": 3 * 3600.0, "quick": 600.0, "smoke": 120.0}[mode]
    machine = machine_info(device)
    ok = True
    t0 = time.perf_counter()
    for name in args.only or list(BENCHMARKS):
        ok &= run_bench(name, BENCHMARKS[name], mode, device, machine, timeout, args.threads)
    print(f"run.py: {mode} run finished in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
