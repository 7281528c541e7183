"""kill -9 trials: crash ``streamvi serve`` at random moments, restart, resend, count.

Each trial runs the real command line in a subprocess::

    python -m streamvi serve --listen tcp://127.0.0.1:PORT --out-dir DIR \\
        --space-group 'P 43 21 2' --cell '79.1 79.1 37.9 90 90 90' --dmin 3.0 --device cpu \\
        --mc-samples 2 --metrics-port -1 --publish-endpoint '' \\
        --checkpoint-interval 1 --publish-interval 1

and streams a simulated beamtime into it with :func:`streamvi.producers.send.send_messages`.  At a
random moment (while crystals stream in, while they are trained on, while a checkpoint or a
snapshot is written) the service gets SIGKILL; it is restarted on the same directory and
port, and the producer resends everything from the start, as producers do after a restart
(the service deduplicates by ``(run, image, crystal)``).  A trial has 1 to ``--max-kills``
kills, the later ones during the resends.  After the last restart the producer resends once
more without interruption, the service trains to ``--steps`` optimiser steps and is stopped
with SIGTERM (which checkpoints).

Checked after every trial, from the final checkpoint and from the output directory opened
again in-process (spool replayed into a fresh store):

- lost: crystals sent but not in the store (must be 0);
- duplicated: crystals stored more than once (store images minus unique keys; must be 0);
- ``crystals_received == spool records + duplicates not spooled`` (each spooled record
  counted once across restarts) and ``crystals_received == crystals merged + duplicates +
  crystals rejected``;
- no rejects, no damaged spool record, the final checkpoint readable.

With ``--baselines N`` uninterrupted runs on the same data, trained to the same number of
steps, give the reference merge: each trial's ``latest.mtz`` is compared with the first (CC
of F over the reflections both observed) and with the truth.  Uninterrupted runs do not
agree exactly either (training interleaves with arrival, and the service's threads are not
synchronised), so their spread is printed too (``baseline_pair_cc``, ``baseline_cc_truth``).
Small runs stop far from convergence, where that spread is large; ``--converge-steps M``
also compares every run after M more steps of deterministic training from its final state
(checkpoint + spool, as a restart loads them), the fair comparison.

Prints one JSON line per trial and a summary line; exits non-zero if anything was lost,
duplicated or miscounted.  Bounded: ``--trial-timeout`` per trial, ``--max-seconds`` overall.

    python benchmarks/kill9_trials.py --trials 20 --baselines 2 --converge-steps 400
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np

REPO = Path(__file__).resolve().parents[1]
CELL = "79.1 79.1 37.9 90 90 90"
SPACE_GROUP = "P 43 21 2"
DMIN = 3.0


def serve_args(port: int, out_dir: Path, *extra: str) -> list[str]:
    """The command line of one service run."""
    return [sys.executable, "-m", "streamvi", "serve",
            "--listen", f"tcp://127.0.0.1:{port}", "--out-dir", str(out_dir),
            "--space-group", SPACE_GROUP, "--cell", CELL, "--dmin", str(DMIN),
            "--device", "cpu", "--mc-samples", "2", "--metrics-port", "-1",
            "--publish-endpoint", "", "--checkpoint-interval", "1", "--publish-interval", "1",
            *extra]


def free_port() -> int:
    """A TCP port on loopback that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ----------------------------------------------------------------------------- the process


class ServeProcess:
    """``python -m streamvi serve`` in a subprocess, started and stopped the hard or soft way.

    Parameters
    ----------
    out_dir
        Its output directory.
    port
        TCP port of its PULL endpoint on 127.0.0.1.
    log_path
        Where its standard error (the log) is appended.
    extra
        More command-line flags.
    """

    def __init__(self, out_dir: Path, port: int, log_path: Path, extra: Iterable[str] = ()):
        self.out_dir = Path(out_dir)
        self.port = port
        self.log_path = Path(log_path)
        self.extra = list(extra)
        self.proc: subprocess.Popen | None = None
        self.banner: dict[str, Any] | None = None
        self.starts = 0

    @property
    def url(self) -> str:
        return f"tcp://127.0.0.1:{self.port}"

    def start(self, timeout: float = 60.0) -> "ServeProcess":
        """Start it and wait for its JSON line with the bound endpoints."""
        env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1",
                   MKL_NUM_THREADS="1")
        with open(self.log_path, "ab") as log:
            log.write(f"\n===== start {self.starts + 1} =====\n".encode())
            log.flush()
            self.proc = subprocess.Popen(serve_args(self.port, self.out_dir, *self.extra),
                                         stdout=subprocess.PIPE, stderr=log, cwd=REPO,
                                         env=env)
        self.starts += 1
        line: list[bytes] = []
        reader = threading.Thread(target=lambda: line.append(self.proc.stdout.readline()),
                                  daemon=True)
        reader.start()
        reader.join(timeout)
        if not line or not line[0].strip():
            self.kill9()
            raise RuntimeError(f"streamvi serve did not start within {timeout:g} s; its log:\n"
                               + self.log_tail())
        self.banner = json.loads(line[0])
        assert self.banner["listening"] == [self.url], self.banner
        return self

    def kill9(self) -> None:
        """SIGKILL, no goodbye."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(30)

    def terminate(self, timeout: float = 60.0) -> int:
        """SIGTERM (the service publishes and checkpoints), then its exit status."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill9()
            raise RuntimeError(f"streamvi serve ignored SIGTERM for {timeout:g} s; its log:\n"
                               + self.log_tail()) from None

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "(no log)"


# ----------------------------------------------------------------------------- the producer


class Producer:
    """send_messages in a thread over ``messages``; :meth:`stop` cuts it off mid-stream."""

    def __init__(self, messages: list, url: str, *, rate: float | None = None,
                 timeout_s: float = 2.0):
        self.messages = messages
        self.url = url
        self.rate = rate
        self.timeout_s = timeout_s
        self._stop = threading.Event()
        self.report = None
        self.error: BaseException | None = None
        self.yielded = 0
        self._thread = threading.Thread(target=self._run, name="producer", daemon=True)

    def _items(self) -> Iterator:
        for msg in self.messages:
            if self._stop.is_set():
                return
            self.yielded += 1
            yield msg

    def _run(self) -> None:
        from streamvi.producers.send import send_messages

        try:
            self.report = send_messages(self._items(), self.url, rate=self.rate,
                                        timeout_s=self.timeout_s)
        except BaseException as exc:      # a send that times out after a kill is expected
            self.error = exc

    def start(self) -> "Producer":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(self.timeout_s * 2 + 10)

    def join(self, timeout: float) -> None:
        self._thread.join(timeout)


# ----------------------------------------------------------------------------- reading results


def read_checkpoint(out_dir: Path) -> dict[str, Any] | None:
    """The parts of ``checkpoint.pt`` the checks need, or None if there is none yet."""
    import torch

    path = Path(out_dir) / "checkpoint.pt"
    if not path.exists():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except FileNotFoundError:     # replaced between exists() and open()
        return None
    return {"counters": state["counters"], "crystals_merged": int(state["crystals_merged"]),
            "step": int(state["engine"]["trainer"]["step"]),
            "spool_records": int(state["spool_records"])}


def wait_for(predicate: Callable[[], bool], timeout: float, poll: float = 0.25) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(poll)
    return predicate()


def wait_checkpoint(out_dir: Path, *, merged: int, steps: int, timeout: float,
                    alive: Callable[[], bool] = lambda: True) -> dict[str, Any] | None:
    """Poll the checkpoint until ``merged`` crystals and ``steps`` steps are in it."""
    last: list[dict | None] = [None]

    def done() -> bool:
        if not alive():
            raise RuntimeError("streamvi serve exited on its own")
        last[0] = read_checkpoint(out_dir)
        return last[0] is not None and last[0]["crystals_merged"] >= merged \
            and last[0]["step"] >= steps

    return last[0] if wait_for(done, timeout, poll=0.5) else None


@dataclass
class Recovered:
    """What the output directory holds, as a restarted service sees it."""

    keys: list[tuple[str, str, int]]
    n_images: int
    crystals_merged: int
    duplicates_replayed: int
    counters: dict[str, Any]
    spool_records: int
    torn_records: int
    corrupt_records: int
    recovered_from_checkpoint: bool
    stray_files: list[str] = field(default_factory=list)


def recover(out_dir: Path) -> Recovered:
    """Open ``out_dir`` in-process as a restarted service would (start, then stop at once,
    writing nothing) and report what it found."""
    from streamvi.config import load_config
    from streamvi.service.service import Service

    cfg = load_config(env={}, overrides={
        "listen": ["tcp://127.0.0.1:*"], "out_dir": out_dir, "space_group": SPACE_GROUP,
        "cell": CELL, "dmin": DMIN, "device": "cpu", "mc_samples": 2, "metrics_port": -1,
        "publish_endpoint": "", "checkpoint_interval": 3600, "publish_interval": 3600})
    svc = Service(cfg).start()
    try:
        with svc.lock:
            st = svc.engine.store if svc.engine is not None else None
            keys = list(st.keys) if st is not None else []
            n_images = st.n_images if st is not None else 0
            out = Recovered(keys=keys, n_images=n_images, crystals_merged=svc.crystals_merged,
                            duplicates_replayed=svc.duplicates,
                            counters=svc.counters.snapshot(),
                            spool_records=svc.spool.n_records,
                            torn_records=svc.spool.torn_records,
                            corrupt_records=svc.spool.corrupt_records,
                            recovered_from_checkpoint=svc.recovered_from_checkpoint)
    finally:
        svc.stop(checkpoint=False, publish=False)
    out.stray_files = sorted(p.name for p in Path(out_dir).iterdir()
                             if p.name.startswith(".") or p.name.endswith(".tmp"))
    return out


def continue_training(out_dir: Path, steps: int) -> dict[tuple[int, int, int], float]:
    """Open ``out_dir`` as a restart does (checkpoint + spool), train ``steps`` more steps in
    this thread (no ingest, no timing effects) and return F of the observed reflections.

    Runs that stopped at different points of the online schedule are compared after the
    same amount of further, deterministic training."""
    from streamvi.config import load_config
    from streamvi.service.service import Service

    cfg = load_config(env={}, overrides={
        "listen": ["tcp://127.0.0.1:*"], "out_dir": out_dir, "space_group": SPACE_GROUP,
        "cell": CELL, "dmin": DMIN, "device": "cpu", "mc_samples": 2, "metrics_port": -1,
        "publish_endpoint": ""})
    svc = Service(cfg)
    try:
        svc._recover()         # what start() does first; no threads are started
        engine = svc.engine
        engine.train(steps)
        snap = engine.snapshot()
    finally:
        svc.spool.close()
        svc.dead_letter.close()
    f = snap.tables["all"]["F"]
    return {tuple(int(x) for x in h): float(v)
            for h, v, o in zip(engine.space.hkl, f, snap.observed) if o and np.isfinite(v)}


def mtz_amplitudes(path: Path) -> dict[tuple[int, int, int], float]:
    """F of every observed reflection (N > 0) in an MTZ file written by streamvi."""
    import gemmi

    mtz = gemmi.read_mtz_file(str(path))
    hkl = mtz.make_miller_array()
    f = mtz.column_with_label("F").array
    n = mtz.column_with_label("N").array
    return {tuple(int(x) for x in h): float(v) for h, v, c in zip(hkl, f, n)
            if c > 0 and np.isfinite(v)}


def cc(a: dict, b: dict) -> float:
    """Pearson CC over the keys both hold."""
    keys = sorted(set(a) & set(b))
    if len(keys) < 3:
        return float("nan")
    return float(np.corrcoef([a[k] for k in keys], [b[k] for k in keys])[0, 1])


def truth_amplitudes(truth) -> dict[tuple[int, int, int], float]:
    """sqrt(mean of I(+), I(−)): what a non-anomalous merge estimates."""
    return {tuple(int(x) for x in h): float(np.sqrt(i))
            for h, i in zip(truth.hkl, truth.I_mean)}


# ----------------------------------------------------------------------------- a trial


def simulated_beamtime(n_images: int, seed: int):
    """(messages, truth) of a small simulated beamtime (P 43 21 2, 3.0 Å)."""
    from streamvi_sim import SimulationConfig, simulate_images, simulate_structure

    cfg = SimulationConfig(n_images=n_images, seed=seed, dmin=DMIN, n_atoms=300)
    truth = simulate_structure(cfg)
    return list(simulate_images(cfg, truth)), truth


def check_counts(rec: Recovered, ckpt: dict[str, Any], sent_keys: set) -> dict[str, Any]:
    """The figures of one finished run and whether they are all right."""
    c = ckpt["counters"]
    stored = set(rec.keys)
    out = {
        "sent_unique": len(sent_keys),
        "stored_images": rec.n_images,
        "lost": len(sent_keys - stored),
        "duplicated": rec.n_images - len(stored),
        "unexpected": len(stored - sent_keys),
        "crystals_merged": ckpt["crystals_merged"],
        "crystals_received": c["crystals_received"],
        "duplicates_counted": c["duplicates"],
        "duplicates_not_spooled": c.get("duplicates_not_spooled", 0),
        "spool_records": rec.spool_records,
        "messages_rejected": sum(c["messages_rejected"].values()),
        "torn_records": rec.torn_records,
        "corrupt_records": rec.corrupt_records,
        "stray_files": rec.stray_files,
    }
    problems = []
    if out["lost"] or out["duplicated"] or out["unexpected"]:
        problems.append("store differs from what was sent")
    if ckpt["crystals_merged"] != len(sent_keys) or rec.crystals_merged != len(sent_keys):
        problems.append("crystals_merged != unique crystals sent")
    # duplicates recognised before spooling are counted but never spooled (operations.md §4)
    if c["crystals_received"] != rec.spool_records + c.get("duplicates_not_spooled", 0):
        problems.append("crystals_received != spool records + duplicates not spooled (a record "
                        "counted twice or never)")
    rejected = sum(c.get("crystals_rejected", {}).values())
    if c["crystals_received"] != ckpt["crystals_merged"] + c["duplicates"] + rejected:
        problems.append("crystals_received != crystals_merged + duplicates + rejected")
    if rec.counters["crystals_received"] != c["crystals_received"] or \
            rec.counters["duplicates"] != c["duplicates"]:
        problems.append("counters after a clean restart differ from the final checkpoint")
    if out["messages_rejected"] or rec.corrupt_records:
        problems.append("rejects or damaged spool records")
    out["problems"] = problems
    return out


def run_trial(work: Path, messages: list, *, kills: int, rng: random.Random, steps: int,
              rate: float, timeout: float, truth_f: dict | None = None,
              baseline_f: dict | None = None, converge_steps: int = 0,
              baseline_converged_f: dict | None = None) -> dict[str, Any]:
    """One trial with ``kills`` SIGKILLs (0: the uninterrupted reference run).

    With ``converge_steps``, the final state is also trained that many more steps
    (:func:`continue_training`) and compared again (keys ending in ``_converged``)."""
    t0 = time.monotonic()
    work.mkdir(parents=True, exist_ok=True)
    out_dir = work / "out"
    port = free_port()
    serve = ServeProcess(out_dir, port, work / "serve.log").start()
    kill_at = []
    try:
        for _ in range(kills):
            producer = Producer(messages, serve.url, rate=rate).start()
            # while streaming (len/rate s), or while training, checkpointing, publishing after
            t_kill = rng.uniform(0.0, len(messages) / rate + 2.5)
            time.sleep(t_kill)
            serve.kill9()
            producer.stop()
            kill_at.append({"after_s": round(t_kill, 2), "yielded": producer.yielded})
            serve.start()
        from streamvi.producers.send import send_messages

        report = send_messages(messages, serve.url, timeout_s=30)
        assert report.sent == len(messages), report
        ckpt = wait_checkpoint(out_dir, merged=len(messages), steps=steps,
                               timeout=max(10.0, timeout - (time.monotonic() - t0)),
                               alive=serve.alive)
        if ckpt is None:
            raise RuntimeError(f"not all {len(messages)} crystals merged and {steps} steps "
                               f"trained within {timeout:g} s: {read_checkpoint(out_dir)}")
        status = serve.terminate()
        if status != 0:
            raise RuntimeError(f"streamvi serve exited with {status} on SIGTERM:\n"
                               + serve.log_tail())
    finally:
        serve.kill9()
    final = read_checkpoint(out_dir)
    rec = recover(out_dir)
    sent_keys = {m.key for m in messages}
    result: dict[str, Any] = {"kills": kills, "kill_at": kill_at, "starts": serve.starts,
                              "final_step": final["step"], **check_counts(rec, final, sent_keys)}
    f = mtz_amplitudes(out_dir / "latest.mtz")
    if truth_f is not None:
        result["cc_truth"] = round(cc(f, truth_f), 4)
    if baseline_f is not None:
        result["cc_vs_uninterrupted"] = round(cc(f, baseline_f), 4)
    result["_f"] = f
    if converge_steps:
        fc = continue_training(out_dir, converge_steps)
        result["_f_converged"] = fc
        if truth_f is not None:
            result["cc_truth_converged"] = round(cc(fc, truth_f), 4)
        if baseline_converged_f is not None:
            result["cc_vs_uninterrupted_converged"] = round(cc(fc, baseline_converged_f), 4)
    result["seconds"] = round(time.monotonic() - t0, 1)
    return result


# ----------------------------------------------------------------------------- main


def _spread(values: list[float]) -> dict[str, float] | None:
    if not values:
        return None
    return {"min": round(min(values), 4), "median": round(float(np.median(values)), 4),
            "max": round(max(values), 4)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--trials", type=int, default=20)
    p.add_argument("--max-kills", type=int, default=3, help="SIGKILLs per trial: 1 to this")
    p.add_argument("--images", type=int, default=200)
    p.add_argument("--rate", type=float, default=100.0, help="images/s while streaming")
    p.add_argument("--steps", type=int, default=100, help="optimiser steps before SIGTERM")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--baselines", type=int, default=0,
                   help="uninterrupted runs to compare the merges with (2 or more also "
                   "measures how much uninterrupted runs differ among themselves)")
    p.add_argument("--converge-steps", type=int, default=0,
                   help="also compare after this many more deterministic steps")
    p.add_argument("--converge-trials", type=int, default=3,
                   help="trials (the first ones) that get --converge-steps")
    p.add_argument("--trial-timeout", type=float, default=300.0, help="s per trial")
    p.add_argument("--max-seconds", type=float, default=3000.0, help="s for everything")
    p.add_argument("--keep", type=Path, help="keep trial directories here")
    args = p.parse_args(argv)

    t_start = time.monotonic()
    messages, truth = simulated_beamtime(args.images, args.seed)
    truth_f = truth_amplitudes(truth)
    rng = random.Random(args.seed)
    root = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="kill9-"))
    root.mkdir(parents=True, exist_ok=True)
    common = {"steps": args.steps, "rate": args.rate, "timeout": args.trial_timeout,
              "truth_f": truth_f}
    summary: dict[str, Any] = {"name": "kill9_trials", "images": args.images,
                               "steps": args.steps, "converge_steps": args.converge_steps}
    base_f = base_fc = None
    results: list[dict[str, Any]] = []
    try:
        bases = []
        for i in range(args.baselines):
            r = run_trial(root / f"baseline{i}", messages, kills=0, rng=rng,
                          converge_steps=args.converge_steps, **common)
            bases.append(r)
            print(json.dumps({"trial": f"baseline{i}",
                              **{k: v for k, v in r.items() if not k.startswith("_")}}),
                  flush=True)
        if bases:
            base_f, base_fc = bases[0]["_f"], bases[0].get("_f_converged")
            summary["baseline_cc_truth"] = [b["cc_truth"] for b in bases]
            summary["baseline_pair_cc"] = [round(cc(base_f, b["_f"]), 4) for b in bases[1:]]
            if base_fc is not None:
                summary["baseline_cc_truth_converged"] = [b["cc_truth_converged"]
                                                          for b in bases]
                summary["baseline_pair_cc_converged"] = [
                    round(cc(base_fc, b["_f_converged"]), 4) for b in bases[1:]]
        for i in range(args.trials):
            if time.monotonic() - t_start > args.max_seconds:
                print(json.dumps({"stopped": f"--max-seconds {args.max_seconds:g} reached"}))
                break
            kills = rng.randint(1, args.max_kills)
            try:
                r = run_trial(root / f"trial{i:03d}", messages, kills=kills, rng=rng,
                              baseline_f=base_f, baseline_converged_f=base_fc,
                              converge_steps=args.converge_steps
                              if i < args.converge_trials else 0, **common)
            except Exception as exc:   # a failed trial is a finding: report it and go on
                r = {"kills": kills, "problems": [f"{type(exc).__name__}: {exc}"]}
            r = {k: v for k, v in r.items() if not k.startswith("_")}
            results.append(r)
            print(json.dumps({"trial": i, **r}), flush=True)
            if not args.keep:
                shutil.rmtree(root / f"trial{i:03d}", ignore_errors=True)
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    ok = [r for r in results if not r.get("problems")]
    summary.update({
        "trials": len(results), "kills": sum(r["kills"] for r in results),
        "trials_ok": len(ok),
        "lost": sum(r.get("lost", 0) for r in results),
        "duplicated": sum(r.get("duplicated", 0) for r in results),
        "problems": sorted({p for r in results for p in r.get("problems", [])}),
        "cc_truth": _spread([r["cc_truth"] for r in results if "cc_truth" in r]),
        "cc_vs_uninterrupted": _spread([r["cc_vs_uninterrupted"] for r in results
                                        if "cc_vs_uninterrupted" in r]),
        "cc_truth_converged": _spread([r["cc_truth_converged"] for r in results
                                       if "cc_truth_converged" in r]),
        "cc_vs_uninterrupted_converged": _spread([r["cc_vs_uninterrupted_converged"]
                                                  for r in results
                                                  if "cc_vs_uninterrupted_converged" in r]),
        "seconds": round(time.monotonic() - t_start, 1)})
    print(json.dumps({k: v for k, v in summary.items() if v is not None}), flush=True)
    return 0 if len(ok) == len(results) and results else 1


if __name__ == "__main__":
    sys.exit(main())
