"""Peak memory of ingest under hostile messages: whatever a message declares, one message
never costs more than a few times the message limit (issue #18 item 6).

Messages are real frames on real loopback sockets, sent into a real ingest running in a
subprocess, whose peak resident memory (``VmHWM``, reset between cases through
``/proc/self/clear_refs``) is read after each case:

- a frame that *declares* 1 GiB (a hand-written ZMTP 3.0 frame header) and then streams
  data: ZeroMQ must refuse it unread (``MAXMSGSIZE``) instead of allocating it;
- msgpack bombs inside the size limit: 46 MiB of empty maps, nested arrays of nil, many
  small strings, bins and one 20 MiB string, each of which costs gigabytes as Python
  objects when unpacked without limits.

The last test runs the real ``streamvi serve`` (torch and all) and checks the issue's
figure: its peak RSS stays under 1 GB through the worst of these.
"""
from __future__ import annotations

import json
import os
import re
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable

import msgpack
import pytest
import zmq
from conftest import REPO

MiB = 1 << 20
GiB = 1 << 30
LIMIT = 64 * MiB                  # the service's default max_message_bytes

pytestmark = pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(),
                                reason="needs Linux /proc to measure peak memory")

CHILD = r"""
import json, re, sys
from streamvi.ingest.counters import IngestCounters
from streamvi.ingest.deadletter import DeadLetter
from streamvi.ingest.receiver import Ingestor

def status(key):
    return int(re.search(key + r":\s+(\d+) kB", open("/proc/self/status").read()).group(1)) * 1024

counters = IngestCounters()
ing = Ingestor(["tcp://127.0.0.1:*"], counters=counters, dead_letter=DeadLetter(sys.argv[1]),
               max_message_bytes=int(sys.argv[2]))
ing.start()
print(json.dumps({"url": ing.bound_endpoints[0]}), flush=True)
for line in sys.stdin:
    if line.strip() == "reset":
        open("/proc/self/clear_refs", "w").write("5")
    while ing.get_batch(1000, timeout=0):
        pass
    print(json.dumps({"rss": status("VmRSS"), "peak": status("VmHWM"),
                      "counters": counters.snapshot(),
                      "disconnects": getattr(ing, "producer_disconnects", 0)}), flush=True)
ing.stop()
"""


class IngestChild:
    """An :class:`~streamvi.ingest.receiver.Ingestor` in a subprocess that reports its memory."""

    def __init__(self, work: Path, limit: int = LIMIT):
        self.proc = subprocess.Popen([sys.executable, "-c", CHILD, str(work / "dead.jsonl"),
                                      str(limit)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, cwd=REPO)
        self.url = json.loads(self._line())["url"]

    def _line(self, timeout: float = 120.0) -> str:
        out: list[str] = []
        reader = threading.Thread(target=lambda: out.append(self.proc.stdout.readline()),
                                  daemon=True)
        reader.start()
        reader.join(timeout)
        assert out and out[0], "the ingest subprocess did not answer"
        return out[0]

    def ask(self, command: str = "status") -> dict:
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        return json.loads(self._line())

    def close(self) -> None:
        self.proc.stdin.close()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


# ----------------------------------------------------------------------------- hostile input


def zmtp_declare(url: str, declared: int, *, stream: int, block: int = 4 * MiB) -> int:
    """Open a raw ZMTP 3.0 connection as a PUSH peer, declare a frame of ``declared`` bytes
    and stream up to ``stream`` bytes of it.

    Returns
    -------
    int
        Bytes of the frame body written before the peer closed the connection (or all of
        ``stream``).
    """
    host, port = url[len("tcp://"):].rsplit(":", 1)
    greeting = (b"\xff" + b"\x00" * 8 + b"\x7f" + b"\x03\x00" + b"NULL".ljust(20, b"\x00")
                + b"\x00" + b"\x00" * 31)
    ready = b"\x05READY" + b"\x0bSocket-Type" + struct.pack(">I", 4) + b"PUSH"
    sent = 0
    with socket.create_connection((host, int(port)), timeout=30) as s:
        s.sendall(greeting)
        s.sendall(b"\x04" + bytes([len(ready)]) + ready)
        s.sendall(b"\x02" + struct.pack(">Q", declared))       # a long message frame
        chunk = b"\x00" * block
        try:
            while sent < stream:
                s.sendall(chunk)
                sent += len(chunk)
        except (BrokenPipeError, ConnectionResetError):
            pass
    return sent


def map_with(key: str, header: bytes, body: bytes) -> bytes:
    """``{key: <value>}`` where the value is ``header + body`` (raw msgpack)."""
    return b"\x81" + msgpack.packb(key) + header + body


def empty_maps(nbytes: int) -> bytes:
    """An array of ``nbytes`` empty maps (one byte each; ~100 bytes each as dicts)."""
    return map_with("x", b"\xdd" + struct.pack(">I", nbytes), b"\x80" * nbytes)


def nested_nils(nbytes: int, inner: int = 65535) -> bytes:
    """Arrays of ``inner`` nils each (within any per-array limit), ``nbytes`` in all."""
    one = b"\xdc" + struct.pack(">H", inner) + b"\xc0" * inner
    n = nbytes // len(one)
    return map_with("x", b"\xdd" + struct.pack(">I", n), one * n)


def small_strings(nbytes: int, inner: int = 65535) -> bytes:
    """Arrays of 1-character strings (2 bytes each; ~50 bytes each as str)."""
    one = b"\xdc" + struct.pack(">H", inner) + b"\xa1a" * inner
    n = nbytes // len(one)
    return map_with("x", b"\xdd" + struct.pack(">I", n), one * n)


def small_maps_of_keys(nbytes: int) -> bytes:
    """One map of many 1-key maps: ``{"k0": {"a": nil}, …}`` (~300 bytes each as dicts)."""
    one = b"\x81\xa1a\xc0"
    n = nbytes // (len(one) + 6)
    body = b"".join(msgpack.packb(f"{i:x}") + one for i in range(n))
    return b"\xdf" + struct.pack(">I", n) + body


def long_string(nbytes: int) -> bytes:
    """An array map whose ``dtype`` is a string of ``nbytes`` characters."""
    return msgpack.packb({"schema": "streamvi.crystal", "version": 1,
                          "h": {"dtype": "<" + "x" * nbytes, "shape": [1], "data": b"\0" * 4}})


# ----------------------------------------------------------------------------- the checks


def zmq_send(url: str, frames: list[bytes]) -> None:
    ctx = zmq.Context()
    sock = ctx.socket(zmq.PUSH)
    sock.setsockopt(zmq.SNDTIMEO, 60_000)
    sock.connect(url)
    try:
        sock.send_multipart(frames)
    finally:
        sock.close(linger=60_000)
        ctx.term()


def wait_until(child: IngestChild, cond: Callable[[dict], bool], timeout: float = 120.0
               ) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        state = child.ask()
        if cond(state) or time.monotonic() > deadline:
            return state
        time.sleep(0.05)


def received(state: dict) -> int:
    return state["counters"]["messages_received"]


CASES: dict[str, Callable[[], list[bytes]]] = {
    "46 MiB of empty maps": lambda: [empty_maps(46 * MiB)],
    "60 MiB of arrays of nil": lambda: [nested_nils(60 * MiB)],
    "60 MiB of 1-character strings": lambda: [small_strings(60 * MiB)],
    "8 MiB of one-key maps": lambda: [small_maps_of_keys(8 * MiB)],
    "a 20 MiB dtype string": lambda: [long_string(20 * MiB)],
    "three frames of 20 MiB": lambda: [b"\x00" * (20 * MiB)] * 3,
}


@pytest.fixture(scope="module")
def child():
    with tempfile.TemporaryDirectory() as work:
        c = IngestChild(Path(work))
        yield c
        c.close()


def test_a_frame_declaring_1_gib_is_refused_unread(child):
    base = child.ask("reset")
    written = zmtp_declare(child.url, GiB, stream=512 * MiB)
    state = wait_until(child, lambda s: s["disconnects"] > base["disconnects"]
                       or received(s) > received(base), timeout=30)
    grown = (state["peak"] - base["rss"]) / MiB
    print(f"\nframe declaring 1 GiB: {written / MiB:.0f} MiB written before the service "
          f"closed the connection; peak RSS +{grown:.0f} MiB")
    assert written < 512 * MiB, "the service read on into the frame instead of refusing it"
    assert grown < 32, f"peak RSS grew by {grown:.0f} MiB for a refused frame"
    assert state["disconnects"] == base["disconnects"] + 1


@pytest.mark.parametrize("name", sorted(CASES))
def test_hostile_message_within_the_size_limit(child, name):
    frames = CASES[name]()
    size = max(len(f) for f in frames)
    base = child.ask("reset")
    zmq_send(child.url, frames)
    state = wait_until(child, lambda s: received(s) > received(base))
    grown = (state["peak"] - base["rss"]) / MiB
    reasons = {r: n - base["counters"]["messages_rejected"].get(r, 0)
               for r, n in state["counters"]["messages_rejected"].items()}
    reasons = {r: n for r, n in reasons.items() if n}
    print(f"\n{name}: {sum(map(len, frames)) / MiB:.0f} MiB sent, refused as {reasons}; "
          f"peak RSS +{grown:.0f} MiB")
    assert received(state) == received(base) + 1, "the message was not handled"
    assert len(reasons) == 1
    # what ZeroMQ holds of the frames, one decoded copy at most, and the dead letter's 1 MiB
    assert grown < len(frames) * size / MiB + size / MiB + 48, (
        f"{name}: peak RSS grew by {grown:.0f} MiB")


# ----------------------------------------------------------------------------- the service


def peak_rss(pid: int) -> int:
    """Peak resident memory of a process, bytes (``VmHWM``)."""
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"VmHWM:\s+(\d+) kB", status).group(1)) * 1024


@pytest.mark.slow
def test_the_service_stays_under_1_gb_whatever_a_message_declares(tmp_path):
    """The issue's figure, on the real command line: ``streamvi serve`` fed the worst of the
    messages above, one after the other, never exceeds 1 GB of resident memory."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    proc = subprocess.Popen(
        [sys.executable, "-m", "streamvi", "serve", "--listen", "tcp://127.0.0.1:*",
         "--publish-endpoint", "", "--metrics-port", "-1", "--out-dir", str(tmp_path / "out"),
         "--space-group", "P 43 21 2", "--cell", "79.1 79.1 37.9 90 90 90", "--dmin", "3",
         "--device", "cpu", "--spool-fsync", "never"],
        stdout=subprocess.PIPE, stderr=open(tmp_path / "serve.log", "wb"), env=env, cwd=REPO)
    try:
        line: list[str] = []
        reader = threading.Thread(target=lambda: line.append(proc.stdout.readline()),
                                  daemon=True)
        reader.start()
        reader.join(120)
        assert line and line[0], (tmp_path / "serve.log").read_text()[-3000:]
        url = json.loads(line[0])["listening"][0]
        start = peak_rss(proc.pid)
        written = zmtp_declare(url, GiB, stream=GiB)
        for name in ("46 MiB of empty maps", "60 MiB of arrays of nil",
                     "60 MiB of 1-character strings", "three frames of 20 MiB"):
            zmq_send(url, CASES[name]())
        deadline = time.monotonic() + 120
        log = tmp_path / "serve.log"
        while log.read_text(errors="replace").count("rejected a") < 4:
            assert time.monotonic() < deadline and proc.poll() is None, log.read_text()[-3000:]
            time.sleep(0.1)
        peak = peak_rss(proc.pid)
    finally:
        proc.terminate()
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    print(f"\nstreamvi serve: peak RSS {start / MiB:.0f} MiB after start, {peak / MiB:.0f} MiB "
          f"after a frame declaring 1 GiB ({written / MiB:.0f} MiB of it accepted by the "
          "socket) and 226 MiB of msgpack bombs")
    assert peak < 1e9
