"""Overload: a producer offering several times what ``streamvi serve`` can take.

The service runs as a subprocess (``python -m streamvi serve``, the flags of
benchmarks/kill9_trials.py plus ``--metrics-port 0`` and a small ``--queue-max-messages``
and ``--rcvhwm``).  This process is the producer and the observer:

1. calibration (``--calibrate-seconds``): the producer sends as fast as the service takes
   messages; the rate it achieves is the service's rate R (messages/s);
2. overload (``--seconds``): the producer offers ``--ratio`` × R on a fixed schedule with
   non-blocking sends; a send refused by the high-water mark (EAGAIN) is counted as
   *blocked* and retried, never dropped, so the producer is slowed rather than data lost;
3. meanwhile a prober GETs ``/metrics`` every 100 ms (latency of each answer) and a sampler
   reads the service's RSS from ``/proc/<pid>/status`` every 200 ms;
4. at the end the service must have received exactly what was sent (``/api/status``), then
   SIGTERM checkpoints it and the checkpoint's counters are read.

Messages are big on purpose (``--rows`` reflections, most beyond the resolution limit so
the store stays small), so the service's work per message is what limits it.

Prints JSON lines: ``calibration``, ``overload`` (offered and achieved rate, the ratio held,
blocked sends, queue depth seen, metrics latency percentiles, RSS), and ``final`` (exact
counts).  Exit status 1 if a count is off, RSS passed ``--rss-budget-mb`` or a scrape failed.

    python benchmarks/overload.py --seconds 60 --ratio 5
"""
from __future__ import annotations

import argparse
import json
import shutil
import struct
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import zmq

sys.path.insert(0, str(Path(__file__).resolve().parent))
import kill9_trials as k9  # noqa: E402 - the serve-process machinery lives there


# ----------------------------------------------------------------------------- messages


class FrameMaker:
    """Unique wire messages made cheaply: one pre-encoded body, a new image name each.

    The body is a msgpack map of every key but ``image``; a frame is the body with its map
    header raised by one and ``"image": name`` appended (valid msgpack, ~µs per frame).  The
    intensity of the last row (beyond the table, never stored) is the frame's number, so
    every frame is a different crystal by content too (the service recognises the same
    content sent under another name as a duplicate)."""

    def __init__(self, rows: int, inside: int = 40, run: str = "overload", seed: int = 0):
        from streamvi.wire import CrystalMessage, to_wire_dict

        rng = np.random.default_rng(seed)
        # `inside` rows within 3.0 Å of the target cell; the rest beyond it (not stored)
        h = np.r_[rng.integers(1, 12, inside), rng.integers(28, 40, rows - inside)]
        k = np.r_[rng.integers(0, 12, inside), rng.integers(28, 40, rows - inside)]
        l = np.r_[rng.integers(0, 6, inside), rng.integers(12, 19, rows - inside)]  # noqa: E741
        msg = CrystalMessage(run=run, image="", crystal=0, h=h.astype(np.int32),
                             k=k.astype(np.int32), l=l.astype(np.int32),
                             I=rng.gamma(2.0, 50.0, rows).astype(np.float32),
                             sigI=rng.uniform(1.0, 10.0, rows).astype(np.float32),
                             photon_energy_eV=9500.0, cell=(79.1, 79.1, 37.9, 90.0, 90.0, 90.0))
        d = to_wire_dict(msg)
        del d["image"]
        if len(d) >= 15:
            raise ValueError("FrameMaker needs a fixmap body (fewer than 15 keys)")
        body = msgpack.packb(d, use_bin_type=True)
        self._head = bytes([0x80 | (len(d) + 1)])
        self._body = body[1:] + msgpack.packb("image")
        # where the last row's I sits in the body (float32, little-endian)
        i_data = msg.I.astype("<f4").tobytes()
        at = self._body.find(i_data)
        if at < 0 or self._body.find(i_data, at + 1) >= 0:
            raise ValueError("FrameMaker could not locate the intensities in the body")
        self._cut = at + len(i_data) - 4
        self.run = run

    def frame(self, i: int) -> bytes:
        body = self._body
        return (self._head + body[:self._cut] + struct.pack("<f", 1.0 + i)
                + body[self._cut + 4:] + msgpack.packb(f"img{i:08d}"))

    def __len__(self) -> int:
        return len(self._body) + 16


# ----------------------------------------------------------------------------- observers


def rss_mb(pid: int) -> float:
    """Resident set size of process ``pid``, MiB."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


@dataclass
class Observer:
    """Scrapes ``/metrics`` every ``probe_s`` and samples RSS every ``rss_s`` in threads."""

    url: str
    pid: int
    probe_s: float = 0.1
    rss_s: float = 0.2
    latencies: list[float] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    rss: list[tuple[float, float]] = field(default_factory=list)
    queue_depths: list[float] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._probe, daemon=True),
                         threading.Thread(target=self._sample, daemon=True)]
        self.t0 = time.monotonic()

    def start(self) -> "Observer":
        for t in self._threads:
            t.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(10)

    def _probe(self) -> None:
        while not self._stop.is_set():
            t = time.perf_counter()
            try:
                with urllib.request.urlopen(self.url + "metrics", timeout=10) as resp:
                    text = resp.read().decode()
                self.latencies.append(time.perf_counter() - t)
                for line in text.splitlines():
                    if line.startswith("streamvi_queue_depth "):
                        self.queue_depths.append(float(line.split()[1]))
            except Exception as exc:  # noqa: BLE001 - every failure is a finding
                self.failures.append(f"{type(exc).__name__}: {exc}")
            self._stop.wait(max(0.0, self.probe_s - (time.perf_counter() - t)))

    def _sample(self) -> None:
        while not self._stop.is_set():
            try:
                self.rss.append((time.monotonic() - self.t0, rss_mb(self.pid)))
            except OSError:
                return
            self._stop.wait(self.rss_s)

    def latency_ms(self) -> dict[str, float]:
        a = np.asarray(self.latencies) * 1e3
        if not a.size:
            return {}
        return {"n": int(a.size), "p50": round(float(np.percentile(a, 50)), 1),
                "p95": round(float(np.percentile(a, 95)), 1),
                "p99": round(float(np.percentile(a, 99)), 1), "max": round(float(a.max()), 1)}

    def peak_rss_mb(self) -> float:
        return round(max(v for _, v in self.rss), 1) if self.rss else float("nan")


def api_status(base_url: str) -> dict[str, Any]:
    with urllib.request.urlopen(base_url + "api/status", timeout=10) as resp:
        return json.loads(resp.read())


def received(base_url: str) -> int:
    return int(api_status(base_url)["status"]["counters"]["crystals_received"])


def wait_received(base_url: str, n: int, timeout: float) -> float:
    """Wait until the service counts ``n`` crystals received; the seconds it took."""
    t0 = time.monotonic()
    while received(base_url) < n and time.monotonic() - t0 < timeout:
        time.sleep(0.05)
    return time.monotonic() - t0


# ----------------------------------------------------------------------------- the producer


@dataclass
class Offered:
    """What the producer did in one phase."""

    sent: int = 0
    blocked: int = 0          # sends refused by the high-water mark (then retried)
    blocked_s: float = 0.0    # time spent waiting for room
    seconds: float = 0.0
    target_rate: float | None = None

    @property
    def rate(self) -> float:
        return self.sent / self.seconds if self.seconds else 0.0


def produce(sock: zmq.Socket, maker: FrameMaker, first: int, seconds: float,
            rate: float | None, limit: int | None = None) -> Offered:
    """Send frames ``first, first+1, …`` for ``seconds`` (or ``limit`` frames): at ``rate``
    messages/s on a fixed schedule, or as fast as accepted (None).  A refused send is
    retried until it goes."""
    out = Offered(target_rate=rate)
    t0 = time.monotonic()
    i = first
    while limit is None or out.sent < limit:
        now = time.monotonic()
        if now - t0 >= seconds:
            break
        if rate is not None:
            due = t0 + (i - first) / rate
            if due > now:
                time.sleep(min(due - now, 0.01))
                continue
        frame = maker.frame(i)
        waited = None
        while True:
            try:
                sock.send(frame, zmq.NOBLOCK)
                break
            except zmq.Again:
                if waited is None:
                    out.blocked += 1
                    waited = time.monotonic()
                time.sleep(0.0005)
        if waited is not None:
            out.blocked_s += time.monotonic() - waited
        i += 1
        out.sent += 1
    out.seconds = time.monotonic() - t0
    return out


# ----------------------------------------------------------------------------- a run


def run_overload(work: Path, *, seconds: float, calibrate_seconds: float, ratio: float,
                 rows: int, queue_max_messages: int, hwm: int, rss_budget_mb: float,
                 settle_timeout: float = 120.0, echo=None) -> dict[str, Any]:
    """The whole experiment; returns the three reports (and prints them with ``echo``)."""
    work.mkdir(parents=True, exist_ok=True)
    out_dir = work / "out"
    serve = k9.ServeProcess(out_dir, k9.free_port(), work / "serve.log", extra=[
        "--metrics-port", "0", "--queue-max-messages", str(queue_max_messages),
        "--rcvhwm", str(hwm), "--checkpoint-interval", "30", "--publish-interval", "5",
        "--spool-fsync", "never"]).start()
    base_url = serve.banner["http"]
    maker = FrameMaker(rows)
    ctx = zmq.Context()
    sock = ctx.socket(zmq.PUSH)
    sock.setsockopt(zmq.SNDHWM, hwm)
    sock.setsockopt(zmq.LINGER, 30_000)
    sock.connect(serve.url)
    reports: dict[str, Any] = {}
    try:
        rss0 = round(rss_mb(serve.proc.pid), 1)
        # warm up (the first crystal builds the engine), then saturate and count what the
        # service takes in: its rate
        warm = produce(sock, maker, 0, 60.0, None, limit=50)
        wait_received(base_url, warm.sent, settle_timeout)
        rss_warm = round(rss_mb(serve.proc.pid), 1)
        n0, t0 = received(base_url), time.monotonic()
        cal = produce(sock, maker, warm.sent, calibrate_seconds, None)
        r_service = (received(base_url) - n0) / (time.monotonic() - t0)
        cal.sent += warm.sent
        reports["calibration"] = {"messages": cal.sent, "seconds": round(cal.seconds, 2),
                                  "service_rate_msgs_s": round(r_service, 1),
                                  "blocked_sends": cal.blocked,
                                  "message_bytes": len(maker), "rss_idle_mb": rss0,
                                  "rss_after_warmup_mb": rss_warm}
        if echo:
            echo({"phase": "calibration", **reports["calibration"]})
        obs = Observer(base_url, serve.proc.pid).start()
        over = produce(sock, maker, cal.sent, seconds, ratio * r_service)
        total = cal.sent + over.sent
        # everything offered must arrive: wait for the service to catch up
        catch_up_s = wait_received(base_url, total, settle_timeout)
        obs.stop()
        reports["overload"] = {
            "offered_rate_msgs_s": round(ratio * r_service, 1),
            "achieved_rate_msgs_s": round(over.rate, 1),
            "ratio_offered": ratio,
            "ratio_held": round(ratio * r_service / over.rate, 2) if over.rate else None,
            "sent": over.sent, "blocked_sends": over.blocked,
            "blocked_s": round(over.blocked_s, 2), "seconds": round(over.seconds, 2),
            "catch_up_s": round(catch_up_s, 2),
            "queue_depth_max": max(obs.queue_depths) if obs.queue_depths else None,
            "queue_max_messages": queue_max_messages,
            "metrics_latency_ms": obs.latency_ms(), "metrics_failures": len(obs.failures),
            "rss_idle_mb": rss0, "rss_after_warmup_mb": rss_warm,
            "rss_peak_mb": obs.peak_rss_mb(),
            "rss_budget_mb": rss_budget_mb,
            "rss_mb_over_time": [(round(t, 1), round(v, 1)) for t, v in obs.rss[::10]]}
        if echo:
            echo({"phase": "overload", **reports["overload"]})
        status = api_status(base_url)["status"]
        exit_status = serve.terminate()
        final = k9.read_checkpoint(out_dir)
        c = final["counters"] if final else {}
        reports["final"] = {
            "sent": total, "crystals_received": c.get("crystals_received"),
            "messages_rejected": sum(c.get("messages_rejected", {}).values()),
            "crystals_merged": final["crystals_merged"] if final else None,
            "duplicates": c.get("duplicates"), "exit_status": exit_status,
            "steps": final["step"] if final else None,
            "status_received": status["counters"]["crystals_received"],
            "spool_records": final["spool_records"] if final else None}
        problems = []
        f = reports["final"]
        if not (f["crystals_received"] == f["sent"] == f["crystals_merged"]
                == f["spool_records"]) or f["messages_rejected"] or f["duplicates"]:
            problems.append("counts differ from what was sent")
        if obs.failures:
            problems.append(f"{len(obs.failures)} scrapes failed: {obs.failures[:3]}")
        if obs.peak_rss_mb() > rss_budget_mb:
            problems.append(f"RSS {obs.peak_rss_mb()} MiB over the budget {rss_budget_mb}")
        if exit_status != 0:
            problems.append(f"exit status {exit_status} on SIGTERM")
        f["problems"] = problems
        if echo:
            echo({"phase": "final", **f})
    finally:
        sock.close(linger=0)
        ctx.term()
        serve.kill9()
    return reports


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seconds", type=float, default=60.0, help="length of the overload")
    p.add_argument("--calibrate-seconds", type=float, default=5.0)
    p.add_argument("--ratio", type=float, default=5.0, help="offered / service rate")
    p.add_argument("--rows", type=int, default=4000, help="reflections per message")
    p.add_argument("--queue-max-messages", type=int, default=16)
    p.add_argument("--hwm", type=int, default=16, help="send and receive high-water marks")
    p.add_argument("--rss-budget-mb", type=float, default=1500.0)
    p.add_argument("--work", type=Path, help="keep the output (spool, log) in this directory "
                   "(default: a temporary one, removed at the end: the spool takes GBs)")
    args = p.parse_args(argv)
    work = args.work or Path(tempfile.mkdtemp(prefix="overload-"))
    try:
        reports = run_overload(work, seconds=args.seconds,
                               calibrate_seconds=args.calibrate_seconds, ratio=args.ratio,
                               rows=args.rows, queue_max_messages=args.queue_max_messages,
                               hwm=args.hwm, rss_budget_mb=args.rss_budget_mb,
                               echo=lambda d: print(json.dumps(d), flush=True))
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    return 1 if reports["final"]["problems"] else 0


if __name__ == "__main__":
    sys.exit(main())
