"""Ingest throughput: PUSH producer → Ingestor (decode, validate, spool) → draining consumer.

Prints one JSON line per figure::

    {"name": "ingest_throughput", "value": …, "unit": "reflections/s", …}
    {"name": "ingest_messages", "value": …, "unit": "messages/s", …}

The producer sends pre-encoded messages (encoding is not timed) over loopback TCP; the clock
runs from the first send to the last message taken off the queue, with the spool in a
temporary directory (``--fsync`` policy, default ``batch``).  A second run
(``ingest_store_throughput``, ``ingest_store_messages``) also adds what the consumer takes to
a ``ReflectionStore`` with ``add_many``, as the service's training thread does: the most one
service process can take in before it trains at all, since the ingest and training threads
share the interpreter.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import threading
import time

import numpy as np
import zmq

from streamvi.ingest.counters import IngestCounters
from streamvi.ingest.receiver import Ingestor
from streamvi.ingest.spool import Spool
from streamvi.wire import CrystalMessage, encode_crystal


def make_payloads(n_messages: int, n_reflections: int, *, seed: int = 0) -> list[bytes]:
    """Realistic messages: required columns plus detector position, peak, orientation."""
    rng = np.random.default_rng(seed)
    distinct = min(n_messages, 64)      # encoding is not what is measured: reuse arrays
    out = []
    for i in range(n_messages):
        j = i % distinct
        r = np.random.default_rng(seed + j)
        n = n_reflections
        msg = CrystalMessage(
            run="bench", image=f"frame{i:07d}", crystal=0,
            h=r.integers(-40, 40, n).astype(np.int32), k=r.integers(-40, 40, n).astype(np.int32),
            l=r.integers(1, 20, n).astype(np.int32), I=r.gamma(2.0, 100.0, n).astype(np.float32),
            sigI=r.uniform(5, 20, n).astype(np.float32), photon_energy_eV=9500.0,
            cell=(79.1, 79.1, 38.0, 90.0, 90.0, 90.0),
            astar=tuple(rng.normal(size=3) * 0.01), bstar=tuple(rng.normal(size=3) * 0.01),
            cstar=tuple(rng.normal(size=3) * 0.02),
            fs=r.uniform(0, 1024, n).astype(np.float32),
            ss=r.uniform(0, 1024, n).astype(np.float32),
            peak=r.uniform(0, 1000, n).astype(np.float32), profile_radius=0.002,
            timestamp=1.7e9 + i)
        out.append(encode_crystal(msg))
    return out


def run(n_messages: int, n_reflections: int, fsync: str, store: bool = False) -> dict:
    payloads = make_payloads(n_messages, n_reflections)
    counters = IngestCounters()
    the_store = None
    if store:
        from streamvi.merging.store import ReflectionStore
        from streamvi.symmetry import ReciprocalSpace

        the_store = ReflectionStore(ReciprocalSpace("P 43 21 2", (79.1, 79.1, 38.0, 90, 90, 90),
                                                    1.8, anomalous=True))
    with tempfile.TemporaryDirectory(prefix="bench_ingest_") as tmp:
        spool = Spool(tmp, fsync=fsync)
        ing = Ingestor(["tcp://127.0.0.1:*"], spool=spool, counters=counters)
        ing.start()
        ctx = zmq.Context()
        url = ing.bound_endpoints[0]
        started = threading.Event()

        def produce() -> None:
            sock = ctx.socket(zmq.PUSH)
            sock.setsockopt(zmq.SNDHWM, 1000)
            sock.connect(url)
            started.set()
            for p in payloads:
                sock.send(p, copy=False)
            sock.close(linger=-1)

        producer = threading.Thread(target=produce)
        t0 = time.perf_counter()
        producer.start()
        got = 0
        n_refl = 0
        deadline = time.monotonic() + 600
        while got < n_messages and time.monotonic() < deadline:
            items = ing.get_batch(256, timeout=0.5)
            for _, msg, _ in items:
                got += 1
                n_refl += len(msg)
            if the_store is not None and items:
                # what the service's training thread does with them, less the training
                the_store.add_many([it[1] for it in items], [it[2] for it in items])
        seconds = time.perf_counter() - t0
        producer.join()
        ing.stop()
        ctx.term()
        spool_bytes = spool.bytes_total
        spool.close()
    if got != n_messages:
        raise SystemExit(f"bench_ingest: only {got} of {n_messages} messages arrived")
    return {"seconds": seconds, "messages": got, "reflections": n_refl,
            "bytes": sum(map(len, payloads)), "spool_bytes": spool_bytes}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--messages", type=int, default=5000)
    ap.add_argument("--reflections", type=int, default=800, help="per message")
    ap.add_argument("--fsync", default="batch", choices=("batch", "always", "never"))
    ap.add_argument("--no-store", action="store_true",
                    help="skip the second run, in which the consuming thread also adds every "
                         "crystal to a ReflectionStore (add_many of each batch taken off the "
                         "queue), as the service's training thread does")
    args = ap.parse_args()
    for store in (False,) if args.no_store else (False, True):
        report(run(args.messages, args.reflections, args.fsync, store), args, store)


def report(r: dict, args: argparse.Namespace, store: bool) -> None:
    machine = f"{platform.machine()} {os.cpu_count()} cpus, {platform.system()}"
    common = {"device": "cpu", "machine": machine, "messages": r["messages"],
              "reflections_per_message": args.reflections, "fsync": args.fsync,
              "seconds": round(r["seconds"], 3),
              "mb_per_s": round(r["bytes"] / r["seconds"] / 1e6, 1)}
    name = "ingest_store_throughput" if store else "ingest_throughput"
    print(json.dumps({"name": name,
                      "value": round(r["reflections"] / r["seconds"]),
                      "unit": "reflections/s", **common}))
    print(json.dumps({"name": name.replace("throughput", "messages"), "value": round(r["messages"] / r["seconds"], 1),
                      "unit": "messages/s", **common}))


if __name__ == "__main__":
    main()
