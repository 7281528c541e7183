"""Tailing growing CrystFEL streams, pipes and standard input; resuming from a position file.

Streams are real chunks of the LCLS 5-HT2B stream (70 chunks, 32 crystals), written piece by
piece while the follower reads them; crystals are sent over real ZeroMQ sockets on loopback.
"""
from __future__ import annotations

import fcntl
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Callable, Iterable

import pytest

from streamvi.cli.main import main
from conftest import DIALS_REFL, LCLS_STREAM, PAL_STREAM, PullSocket, requires_lcls
from streamvi.errors import ConfigError
from streamvi.producers.follow import PositionFile, StreamFollower, StreamPosition, follow_stream
from streamvi.producers.send import send_files
from streamvi.sources import Rejected
from streamvi.wire import CrystalMessage, decode_crystal
from streamvi_crystfel import read_stream

LCLS = LCLS_STREAM    # GPL-3.0, from ../shared/data: tests that read it skip where absent
PAL = PAL_STREAM      # MIT, carried in tests/data
TIMEOUT_S = 10.0
POLL_S = 0.02


# ----------------------------------------------------------------------------- helpers


def split_stream(path: Path) -> tuple[bytes, list[bytes]]:
    """(header, chunks) of a stream file, as bytes."""
    text = path.read_bytes()
    starts = [m.start() for m in re.finditer(rb"^----- Begin chunk -----$", text, re.M)]
    return text[:starts[0]], [text[a:b] for a, b in zip(starts, starts[1:] + [len(text)])]


HEADER, CHUNKS = split_stream(LCLS) if LCLS.is_file() else (b"", [])


def n_crystals(chunks: Iterable[bytes]) -> int:
    return sum(c.count(b"--- Begin crystal\n") for c in chunks)


def keys_of(path: Path, run: str) -> list[tuple[str, str, int]]:
    return [m.key for m in read_stream(path, run=run) if isinstance(m, CrystalMessage)]


ALL_KEYS = keys_of(LCLS, "r") if LCLS.is_file() else []


def crystal_keys(items: Iterable) -> list[tuple[str, str, int]]:
    return [i.key for i in items if isinstance(i, CrystalMessage)]


def rejected(items: Iterable) -> list[Rejected]:
    return [i for i in items if isinstance(i, Rejected)]


def two_crystal_stream(path: Path) -> Path:
    """The LCLS stream with every crystal block doubled: 64 crystals, two per chunk."""
    text = LCLS.read_bytes()
    block = re.compile(rb"--- Begin crystal\n.*?--- End crystal\n", re.S)
    path.write_bytes(block.sub(lambda m: m.group(0) * 2, text))
    return path


class Drain:
    """Iterate in a thread; the test thread watches what has arrived."""

    def __init__(self, iterable: Iterable):
        self.items: list = []
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, args=(iterable,), daemon=True)
        self.thread.start()

    def _run(self, iterable: Iterable) -> None:
        try:
            for item in iterable:
                self.items.append(item)
        except BaseException as exc:  # reported by the test
            self.error = exc

    def wait(self, predicate: Callable[[list], bool], timeout: float = TIMEOUT_S) -> bool:
        deadline = time.monotonic() + timeout
        while not predicate(self.items):
            if time.monotonic() > deadline or self.error is not None:
                return False
            time.sleep(0.005)
        return True

    def crystals(self) -> int:
        return len(crystal_keys(self.items))

    def join(self) -> None:
        self.thread.join(TIMEOUT_S)
        assert not self.thread.is_alive(), "the follower did not stop"
        assert self.error is None, self.error


def append(path: Path, data: bytes) -> None:
    with open(path, "ab") as fh:
        fh.write(data)


class Receiver(PullSocket):
    """A PULL socket on a free loopback port."""

    def __init__(self) -> None:
        super().__init__()
        self.keys: list[tuple[str, str, int]] = []

    def receive(self, *, until: int | None = None, quiet_ms: int = 300) -> list:
        """Read until ``until`` messages have come (within the timeout), then until quiet."""
        deadline = time.monotonic() + TIMEOUT_S
        while until is not None and len(self.keys) < until and time.monotonic() < deadline:
            if self.sock.poll(50):
                self.keys.append(decode_crystal(self.sock.recv()).key)
        while self.sock.poll(quiet_ms):
            self.keys.append(decode_crystal(self.sock.recv()).key)
        return self.keys


@pytest.fixture
def receiver():
    r = Receiver()
    yield r
    r.close()


# ----------------------------------------------------------------------------- following


@requires_lcls
def test_growing_file_written_in_bursts(tmp_path):
    path = tmp_path / "live.stream"
    path.write_bytes(b"")
    stop = threading.Event()
    drain = Drain(follow_stream(path, run="r", poll_s=POLL_S, stop_event=stop))
    append(path, HEADER[:100])                      # the header, in two pieces
    time.sleep(0.05)
    append(path, HEADER[100:] + b"".join(CHUNKS[:3]))
    assert drain.wait(lambda _: drain.crystals() == n_crystals(CHUNKS[:3]))
    at = 3
    for burst in (1, 4, 2, 8):
        append(path, b"".join(CHUNKS[at:at + burst]))
        at += burst
        time.sleep(0.03)
    # one chunk split mid-line across two writes: nothing of it may come out early
    assert drain.wait(lambda _: drain.crystals() == n_crystals(CHUNKS[:at]))
    chunk = CHUNKS[at]
    assert n_crystals([chunk]) == 1
    cut = chunk.index(b"\n", len(chunk) // 2) - 7
    append(path, chunk[:cut])
    time.sleep(10 * POLL_S)
    assert drain.crystals() == n_crystals(CHUNKS[:at]) and not rejected(drain.items)
    append(path, chunk[cut:])
    at += 1
    assert drain.wait(lambda _: drain.crystals() == n_crystals(CHUNKS[:at]))
    while at < len(CHUNKS):
        append(path, b"".join(CHUNKS[at:at + 9]))
        at += 9
        time.sleep(0.01)
    assert drain.wait(lambda _: drain.crystals() == 32)
    time.sleep(5 * POLL_S)            # anything extra would come within a few polls
    stop.set()
    drain.join()
    assert crystal_keys(drain.items) == ALL_KEYS and not rejected(drain.items)


@requires_lcls
def test_named_pipe_read_until_its_writer_closes(tmp_path):
    fifo = tmp_path / "live.fifo"
    os.mkfifo(fifo)
    drain = Drain(follow_stream(fifo, run="r", poll_s=POLL_S))
    deadline = time.monotonic() + TIMEOUT_S
    while True:   # the follower opens the pipe in its own thread; the writer waits for it
        try:
            fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
            break
        except OSError:
            assert time.monotonic() < deadline, "the follower never opened the pipe"
            time.sleep(0.01)
    fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)
    with os.fdopen(fd, "wb", buffering=0) as pipe:
        pipe.write(HEADER + b"".join(CHUNKS[:20]))
        chunk = CHUNKS[20]
        pipe.write(chunk[:500])
        time.sleep(5 * POLL_S)
        assert drain.crystals() == n_crystals(CHUNKS[:20])
        pipe.write(chunk[500:])
        for at in range(21, len(CHUNKS), 5):
            pipe.write(b"".join(CHUNKS[at:at + 5]))
            time.sleep(0.01)
    drain.join()                      # end of file ends the iteration
    assert crystal_keys(drain.items) == ALL_KEYS and not rejected(drain.items)


@requires_lcls
def test_truncated_file_is_read_again_from_its_start(tmp_path):
    path = tmp_path / "live.stream"
    path.write_bytes(HEADER + b"".join(CHUNKS[:12]))
    n12 = n_crystals(CHUNKS[:12])
    stop = threading.Event()
    drain = Drain(follow_stream(path, run="r", poll_s=POLL_S, stop_event=stop))
    assert drain.wait(lambda _: drain.crystals() == n12)
    append(path, CHUNKS[12][:300])    # half a chunk, then indexamajig starts over
    time.sleep(3 * POLL_S)
    with open(path, "r+b") as fh:
        fh.truncate(0)
    assert drain.wait(lambda items: len(rejected(items)) == 1)
    append(path, HEADER + b"".join(CHUNKS[12:]))
    assert drain.wait(lambda _: drain.crystals() == 32)
    time.sleep(5 * POLL_S)
    stop.set()
    drain.join()
    (rec,) = rejected(drain.items)
    assert rec.reason == "file_truncated" and rec.source == str(path)
    assert "300 bytes of an incomplete chunk" in rec.detail
    assert crystal_keys(drain.items) == ALL_KEYS
    assert drain.items.index(rec) == n12


@requires_lcls
def test_replaced_file_is_read_from_its_start(tmp_path):
    path = tmp_path / "live.stream"
    path.write_bytes(HEADER + b"".join(CHUNKS[:11]))
    n11 = n_crystals(CHUNKS[:11])
    stop = threading.Event()
    drain = Drain(follow_stream(path, run="r", poll_s=POLL_S, stop_event=stop))
    assert drain.wait(lambda _: drain.crystals() == n11)
    new = tmp_path / "new.stream"
    new.write_bytes(HEADER + b"".join(CHUNKS[20:30]))
    with open(path, "ab") as old:     # the old writer's last chunk, just before the swap
        old.write(CHUNKS[11])
        old.flush()
        os.replace(new, path)
    n_new = n_crystals(CHUNKS[20:30])
    assert drain.wait(lambda _: drain.crystals() == n11 + 1 + n_new)
    append(path, b"".join(CHUNKS[30:]))
    total = n11 + 1 + n_crystals(CHUNKS[20:])
    assert drain.wait(lambda _: drain.crystals() == total)
    time.sleep(5 * POLL_S)
    stop.set()
    drain.join()
    (rec,) = rejected(drain.items)
    assert rec.reason == "file_replaced" and "read from its start" in rec.detail
    skipped = n_crystals(CHUNKS[12:20])
    assert crystal_keys(drain.items) == ALL_KEYS[:n11 + 1] + ALL_KEYS[n11 + 1 + skipped:]
    assert drain.items.index(rec) == n11 + 1


@requires_lcls
def test_idle_timeout_ends_and_reports_an_incomplete_chunk(tmp_path):
    path = tmp_path / "live.stream"
    path.write_bytes(HEADER + b"".join(CHUNKS[:6]) + CHUNKS[6][:400])
    t0 = time.monotonic()
    items = list(follow_stream(path, run="r", poll_s=POLL_S, idle_timeout_s=0.2))
    assert 0.2 <= time.monotonic() - t0 < 2.0
    assert crystal_keys(items) == ALL_KEYS[:n_crystals(CHUNKS[:6])]
    assert [r.reason for r in rejected(items)] == ["truncated_chunk"]


@requires_lcls
def test_waits_for_the_file_to_appear(tmp_path):
    path = tmp_path / "later.stream"
    stop = threading.Event()
    drain = Drain(follow_stream(path, run="r", poll_s=POLL_S, stop_event=stop))
    time.sleep(5 * POLL_S)
    path.write_bytes(HEADER + b"".join(CHUNKS))
    assert drain.wait(lambda _: drain.crystals() == 32)
    stop.set()
    drain.join()
    with pytest.raises(ConfigError, match="no such file"):
        list(StreamFollower(path.with_name("never.stream"), follow=False))


# ----------------------------------------------------------------------------- positions


@requires_lcls
def test_resume_from_every_position_is_exact(tmp_path):
    path = two_crystal_stream(tmp_path / "two.stream")
    everything = keys_of(path, "two")
    assert len(everything) == 64 and len(set(everything)) == 64
    for block in (5000, 1 << 20):     # offsets advance per chunk, or skips carry the resume
        items = list(StreamFollower(path, follow=False, block_size=block))
        assert crystal_keys(i for i, _ in items) == everything
        for n, (item, where) in enumerate(items):
            if n % 5 and n != len(items) - 1:
                continue
            where = StreamPosition.from_json(json.loads(json.dumps(where.to_json())))
            rest = [i for i, _ in StreamFollower(path, follow=False, start=where,
                                                 block_size=block)]
            assert crystal_keys(i for i, _ in items[:n + 1]) + crystal_keys(rest) == everything
            assert not rejected(rest)
        assert any(w.skip == 1 for _, w in items)   # a stop between two crystals of a chunk


@requires_lcls
def test_resume_refuses_another_file(tmp_path):
    path = tmp_path / "a.stream"
    path.write_bytes(HEADER + b"".join(CHUNKS[:30]))
    items = list(StreamFollower(path, follow=False, block_size=4096))
    where = items[-1][1]
    assert where.offset == path.stat().st_size and where.check
    # rewritten in place: same inode, other bytes before the offset
    path.write_bytes(HEADER + b"".join(CHUNKS[40:]))
    again = [i for i, _ in StreamFollower(path, follow=False, start=where)]
    assert rejected(again)[0].reason in ("file_replaced", "file_truncated")
    assert crystal_keys(again)[-1] == ("a", *ALL_KEYS[-1][1:])
    moved = replace(where, inode=where.inode + 1)
    other = [i for i, _ in StreamFollower(path, follow=False, start=moved)]
    assert rejected(other)[0].reason == "file_replaced" and "inode" in rejected(other)[0].detail


@requires_lcls
def test_stopped_sender_resumes_with_nothing_twice_and_nothing_missing(tmp_path, receiver):
    full = two_crystal_stream(tmp_path / "full.stream")
    everything = keys_of(full, "two")
    header, chunks = split_stream(full)
    path = tmp_path / "two.stream"
    path.write_bytes(header + b"".join(chunks[:60]))
    positions = tmp_path / "send.position.json"
    stop = threading.Event()
    reports = []
    sender = threading.Thread(target=lambda: reports.append(send_files(
        [path], receiver.url, follow=True, position_file=positions, stop_event=stop,
        poll_s=POLL_S, rate=100.0, timeout_s=5.0)), daemon=True)
    sender.start()
    receiver.receive(until=11, quiet_ms=0)
    stop.set()
    sender.join(TIMEOUT_S)
    assert not sender.is_alive()
    first = list(receiver.receive())
    assert 11 <= len(first) < 64
    (report,) = reports
    assert report.sent == len(first) == report.by_file[str(path)]["sent"]
    saved = json.loads(positions.read_text())[str(path)]
    assert saved["sent"] == len(first)
    append(path, b"".join(chunks[60:]))   # the stream grew while no sender ran
    report = send_files([path], receiver.url, position_file=positions, timeout_s=5.0)
    second = receiver.receive(until=64)[len(first):]
    assert report.sent == len(second) == 64 - len(first)
    assert sorted(first + second) == sorted(everything) and len(set(first + second)) == 64
    saved = json.loads(positions.read_text())[str(path)]
    assert (saved["offset"], saved["skip"], saved["sent"]) == (path.stat().st_size, 0, 64)
    assert send_files([path], receiver.url, position_file=positions, timeout_s=5.0).sent == 0


def test_position_file_errors_name_the_file(tmp_path):
    bad = tmp_path / "pos.json"
    bad.write_text("{not json")
    with pytest.raises(ConfigError, match=r"pos\.json.*not JSON.*delete it"):
        PositionFile(bad)
    bad.write_text("[1, 2]")
    with pytest.raises(ConfigError, match="expected a map"):
        PositionFile(bad)


# ----------------------------------------------------------------------------- several inputs


@requires_lcls
def test_several_growing_files_are_interleaved(tmp_path, receiver):
    a, b = tmp_path / "a.stream", tmp_path / "b.stream"
    pal_header, pal_chunks = split_stream(PAL)
    a.write_bytes(HEADER)
    b.write_bytes(b"")
    stop = threading.Event()
    reports = []
    sender = threading.Thread(target=lambda: reports.append(send_files(
        [a, b], receiver.url, follow=True, run="shared", stop_event=stop, poll_s=POLL_S,
        timeout_s=5.0)), daemon=True)
    sender.start()
    for i, chunk in enumerate(CHUNKS):
        append(a, chunk)
        if i == 20:
            append(b, pal_header + b"".join(pal_chunks))
        time.sleep(0.005)
    got = receiver.receive(until=35)
    stop.set()
    sender.join(TIMEOUT_S)
    assert not sender.is_alive()
    pal_keys = [("shared", *k[1:]) for k in keys_of(PAL, "x")]
    assert sorted(got) == sorted([("shared", *k[1:]) for k in ALL_KEYS] + pal_keys)
    last_pal = max(got.index(k) for k in pal_keys)
    assert last_pal < len(got) - 1    # b's crystals came while a was still being written
    (report,) = reports
    assert report.by_file == {str(a): {"sent": 32, "unconfirmed": 0, "rejected": 0},
                              str(b): {"sent": 3, "unconfirmed": 0, "rejected": 0}}


# ----------------------------------------------------------------------------- command line


@requires_lcls
def test_cli_send_with_position_file(tmp_path, receiver, capsys):
    positions = tmp_path / "pos.json"
    args = ["send", str(LCLS), "--to", receiver.url, "--position-file", str(positions),
            "--timeout", "5"]
    assert main(args) == 0
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (line["file"], line["sent"], line["rejected"]) == (str(LCLS), 32, 0)
    assert len(receiver.receive(until=32)) == 32
    assert main(args) == 0
    assert json.loads(capsys.readouterr().out.strip())["sent"] == 0
    assert json.loads(positions.read_text())[str(LCLS)]["sent"] == 32


@requires_lcls
def test_cli_send_reads_standard_input(receiver):
    with open(LCLS, "rb") as stdin:
        done = subprocess.run([sys.executable, "-m", "streamvi", "send", "-", "--to",
                               receiver.url, "--run", "piped", "--timeout", "5"],
                              stdin=stdin, capture_output=True, timeout=60, text=True)
    assert done.returncode == 0, done.stderr
    line = json.loads(done.stdout)
    assert (line["file"], line["sent"], line["rejected"]) == ("-", 32, 0)
    assert receiver.receive(until=32) == [("piped", *k[1:]) for k in ALL_KEYS]


@requires_lcls
def test_cli_follow_stops_cleanly_on_sigterm(tmp_path, receiver):
    path = tmp_path / "live.stream"
    path.write_bytes(HEADER + b"".join(CHUNKS[:40]))
    positions = tmp_path / "pos.json"
    proc = subprocess.Popen([sys.executable, "-m", "streamvi", "send", "--follow", str(path),
                             "--position-file", str(positions), "--poll", "0.02", "--to",
                             receiver.url], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        receiver.receive(until=n_crystals(CHUNKS[:40]), quiet_ms=0)
        append(path, b"".join(CHUNKS[40:]))
        receiver.receive(until=32, quiet_ms=0)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=TIMEOUT_S)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    assert json.loads(out)["sent"] == 32 and receiver.receive() == [
        ("live", *k[1:]) for k in ALL_KEYS]
    saved = json.loads(positions.read_text())[str(path)]
    assert (saved["offset"], saved["sent"]) == (path.stat().st_size, 32)


def test_cli_inspect_dials(capsys):
    assert main(["inspect", str(DIALS_REFL.with_suffix(".expt"))]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert (summary["images"], summary["crystals"], summary["reflections"]) == (3, 3, 502)


# ----------------------------------------------------------------------------- into the service


@requires_lcls
def test_appended_crystal_reaches_the_store_within_a_second(tmp_path):
    from streamvi.config import load_config
    from streamvi.service.service import Service

    cell = "61.4 122.6 168.0 90 90 90"   # the stream's target cell (5HT2B.cell)
    # The store takes new crystals between training steps; a small model keeps the steps
    # short, so the figure is the path file → parser → ZeroMQ → ingest → store, not the step.
    cfg = load_config(env={}, overrides={
        "listen": ["tcp://127.0.0.1:*"], "publish_endpoint": "", "metrics_port": -1,
        "out_dir": tmp_path / "out", "space_group": "C 2 2 21", "cell": cell, "dmin": 3.0,
        "device": "cpu", "mc_samples": 2, "d_model": 8, "n_layers": 1, "batch_images": 4})
    service = Service(cfg).start()
    path = tmp_path / "live.stream"
    with_crystal = [c for c in CHUNKS if n_crystals([c]) == 1]
    path.write_bytes(HEADER + with_crystal[0])
    stop = threading.Event()
    sender = threading.Thread(target=send_files, args=([path], service.ingestor.bound_endpoints[0]),
                              kwargs={"follow": True, "stop_event": stop, "timeout_s": 5.0},
                              daemon=True)
    sender.start()
    latencies, ingested = [], []
    try:
        def stored() -> int:
            return 0 if service.engine is None else service.engine.store.n_images

        def received() -> int:
            return service.counters.snapshot()["crystals_received"]

        assert service.wait_until(lambda s: stored() == 1, TIMEOUT_S)
        for n, chunk in enumerate(with_crystal[1:6], start=2):
            time.sleep(0.15)          # land anywhere in the sender's 0.1 s poll cycle
            t0 = time.monotonic()
            append(path, chunk)
            while stored() < n and time.monotonic() - t0 < TIMEOUT_S:
                if received() == n and len(ingested) < n - 1:
                    ingested.append(time.monotonic() - t0)
                time.sleep(0.001)
            latencies.append(time.monotonic() - t0)
            assert stored() == n
    finally:
        stop.set()
        sender.join(TIMEOUT_S)
        service.stop(checkpoint=False, publish=False)
    # the store takes crystals between training steps: the step time dominates
    print(f"append → accepted by ingest, s: {[round(x, 3) for x in ingested]}; "
          f"append → in the store, s: {[round(x, 3) for x in latencies]}")
    assert max(latencies) < 1.0
