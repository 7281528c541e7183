"""The producer side, against a real PULL socket on loopback."""
from __future__ import annotations

import json
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import zmq

from conftest import PAL_STREAM, PullSocket
from streamvi.errors import ConfigError
from streamvi.producers.send import send_file, send_files, send_messages
from streamvi.sources import Rejected
from streamvi.wire import CrystalMessage, decode_crystal, encode_crystal

TIMEOUT_MS = 2000


def crystal(i: int, *, crystal_index: int = 0, n: int = 30) -> CrystalMessage:
    rng = np.random.default_rng(i)
    return CrystalMessage(
        run="run7", image=f"img{i:05d}", crystal=crystal_index,
        h=rng.integers(1, 20, n).astype(np.int32), k=rng.integers(-20, 20, n).astype(np.int32),
        l=rng.integers(-10, 10, n).astype(np.int32),
        I=rng.gamma(2.0, 100.0, n).astype(np.float32),
        sigI=rng.uniform(5, 20, n).astype(np.float32),
        photon_energy_eV=9500.0, cell=(79.1, 79.1, 38.0, 90.0, 90.0, 90.0),
        astar=(0.01, 0.0, 0.0), timestamp=1.7e9 + i, condition="dark")


class Receiver(PullSocket):
    """A PULL socket on a free loopback port, read until n frames have come."""

    def __init__(self) -> None:
        super().__init__()
        self.frames: list[list[bytes]] = []

    def receive(self, n: int) -> list[list[bytes]]:
        poller = zmq.Poller()
        poller.register(self.sock, zmq.POLLIN)
        while len(self.frames) < n and poller.poll(TIMEOUT_MS):
            self.frames.append(self.sock.recv_multipart())
        if poller.poll(100):          # nothing beyond n may arrive
            self.frames.append(self.sock.recv_multipart())
        return self.frames


@pytest.fixture
def receiver():
    r = Receiver()
    yield r
    r.close()


def test_sends_exactly_the_crystals(receiver: Receiver) -> None:
    msgs = [crystal(i) for i in range(20)]
    bad = Rejected(source="x.stream", position="byte 10 (line 2)", reason="malformed_chunk",
                   detail="no cell")
    items = msgs[:5] + [bad] + msgs[5:] + [bad]
    seen: list[Rejected] = []
    report = send_messages(items, receiver.url, on_rejected=seen.append, timeout_s=2.0)
    assert (report.sent, report.rejected, report.images) == (20, 2, 20)
    assert seen == [bad, bad]
    frames = receiver.receive(20)
    assert len(frames) == 20 and all(len(f) == 1 for f in frames)
    assert report.bytes_sent == sum(len(f[0]) for f in frames)
    for f, want in zip(frames, msgs):
        got = decode_crystal(f[0])
        assert got.key == want.key
        for name in ("h", "k", "l", "I", "sigI"):
            np.testing.assert_array_equal(getattr(got, name), getattr(want, name))
        assert (got.astar, got.timestamp, got.condition) == (want.astar, want.timestamp,
                                                            want.condition)


def test_rate_pacing(receiver: Receiver) -> None:
    msgs = [crystal(i) for i in range(50)]
    report = send_messages(msgs, receiver.url, rate=200.0, timeout_s=2.0)
    assert report.sent == 50
    assert 0.2 <= report.seconds < 5.0        # 49 intervals of 5 ms: ~0.245 s
    assert len(receiver.receive(50)) == 50


def test_rate_counts_images_not_crystals(receiver: Receiver) -> None:
    msgs = [crystal(i // 4, crystal_index=i % 4) for i in range(40)]   # 10 images × 4
    report = send_messages(msgs, receiver.url, rate=100.0, timeout_s=2.0)
    assert (report.sent, report.images) == (40, 10)
    assert 0.08 <= report.seconds < 0.35 * 10     # 9 intervals of 10 ms, not 39
    assert len(receiver.receive(40)) == 40


def test_times_out_when_nobody_reads() -> None:
    ctx = zmq.Context()
    sock = ctx.socket(zmq.PULL)                # bound, never read: HWMs fill, sends block
    sock.setsockopt(zmq.RCVHWM, 2)
    sock.bind("tcp://127.0.0.1:*")
    url = sock.getsockopt_string(zmq.LAST_ENDPOINT)
    try:
        t0 = time.monotonic()
        with pytest.raises(TimeoutError, match="took nothing"):
            send_messages((crystal(i, n=50_000) for i in range(200)), url, sndhwm=2,
                          timeout_s=0.2)
        assert time.monotonic() - t0 < 5.0
    finally:
        sock.close(linger=0)
        ctx.term()


def test_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="socket_type"):
        send_messages([], "tcp://127.0.0.1:1", socket_type="dealer")
    with pytest.raises(ConfigError, match="rate"):
        send_messages([], "tcp://127.0.0.1:1", rate=0)
    with pytest.raises(ConfigError, match="cannot connect"):
        send_messages([], "bogus://nowhere")
    f = tmp_path / "x.stream"
    f.write_text("")
    with pytest.raises(ConfigError, match="idle_timeout_s"):
        send_file(f, "tcp://127.0.0.1:1", follow=True, idle_timeout_s=-1)
    with pytest.raises(ConfigError, match="no such file"):
        send_file(tmp_path / "missing.stream", "tcp://127.0.0.1:1")
    other = tmp_path / "x.h5"
    other.write_text("")
    with pytest.raises(ConfigError, match="unknown file type"):
        send_file(other, "tcp://127.0.0.1:1")


# ----------------------------------------------------------------------------- honest "sent"
# A PUSH socket queues messages before any peer is there; "sent" must mean that a service
# took them (issue #18 item 3).


def dead_url() -> str:
    """A loopback URL where nothing listens (a port just bound and released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"tcp://127.0.0.1:{port}"


def stream_of(path: Path, n: int) -> list[str]:
    """A CrystFEL stream of ``n`` one-crystal chunks: the PAL chunks under new image names.

    Returns the image names, in order.
    """
    text = PAL_STREAM.read_bytes()
    starts = [m.start() for m in re.finditer(rb"^----- Begin chunk -----$", text, re.M)]
    header = text[:starts[0]]
    chunks = [text[a:b] for a, b in zip(starts, starts[1:] + [len(text)])]
    names, out = [], [header]
    for i in range(n):
        name = f"/data/img{i:05d}.h5"
        names.append(name)
        out.append(re.sub(rb"(?m)^Image filename: .*$", b"Image filename: " + name.encode(),
                          chunks[i % len(chunks)]))
    path.write_bytes(b"".join(out))
    return names


def chunks_of(path: Path) -> tuple[bytes, list[bytes]]:
    text = path.read_bytes()
    starts = [m.start() for m in re.finditer(rb"^----- Begin chunk -----$", text, re.M)]
    return text[:starts[0]], [text[a:b] for a, b in zip(starts, starts[1:] + [len(text)])]


class Service(PullSocket):
    """A PULL socket on a given (or free) loopback port; read on demand into ``images``."""

    def __init__(self, url: str | None = None, *, rcvhwm: int = 1000) -> None:
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.PULL)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.RCVHWM, rcvhwm)
        self.sock.bind(url or "tcp://127.0.0.1:*")
        self.url = self.sock.getsockopt_string(zmq.LAST_ENDPOINT)
        self.images: list[str] = []

    def read(self, *, until: int | None = None, quiet_ms: int = 300) -> list[str]:
        deadline = time.monotonic() + 10
        while until is not None and len(self.images) < until and time.monotonic() < deadline:
            if self.sock.poll(20):
                self.images.append(decode_crystal(self.sock.recv()).image)
        while until is None and self.sock.poll(quiet_ms):
            self.images.append(decode_crystal(self.sock.recv()).image)
        return self.images


def image_of(name: str) -> str:
    """The wire ``image`` of a CrystFEL chunk whose file is ``name`` (no event line)."""
    return name


def test_no_service_is_an_error_naming_the_url_and_nothing_counts_as_sent() -> None:
    url = dead_url()
    t0 = time.monotonic()
    with pytest.raises(TimeoutError) as info:
        send_messages([crystal(i) for i in range(32)], url, timeout_s=0.5)
    assert time.monotonic() - t0 < 5.0
    message = str(info.value)
    assert url in message and "\n" not in message
    assert info.value.report.sent == 0 and info.value.report.unconfirmed == 0


def test_a_stop_request_ends_a_send_blocked_by_a_peer_that_reads_nothing() -> None:
    """Ctrl-C (``stop_event``) must end a send that waits on a full service, promptly."""
    ctx = zmq.Context()
    sock = ctx.socket(zmq.PULL)                # connected, never read: every queue fills
    sock.setsockopt(zmq.RCVHWM, 1)
    sock.bind("tcp://127.0.0.1:*")
    url = sock.getsockopt_string(zmq.LAST_ENDPOINT)
    stop = threading.Event()
    reports: list = []
    sender = threading.Thread(target=lambda: reports.append(send_messages(
        (crystal(i, n=50_000) for i in range(400)), url, sndhwm=2, stop_event=stop)),
        daemon=True)
    try:
        sender.start()
        deadline = time.monotonic() + 10       # wait until the send blocks: nothing read
        while sock.getsockopt(zmq.EVENTS) & zmq.POLLIN == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        stop.set()
        t0 = time.monotonic()
        sender.join(15)
        assert not sender.is_alive(), "the stop request was ignored"
        assert time.monotonic() - t0 < 10
        (report,) = reports
        assert report.stopped and report.sent + report.unconfirmed < 400
    finally:
        sock.close(linger=0)
        ctx.term()


def test_a_service_that_goes_away_loses_nothing(tmp_path: Path) -> None:
    """The service dies (its queues with it) while a follow runs: the position stays true."""
    path = tmp_path / "live.stream"
    names = stream_of(path, 60)
    header, chunks = chunks_of(path)
    path.write_bytes(header + b"".join(chunks[:50]))
    positions = tmp_path / "pos.json"
    first = Service()
    url = first.url
    stop = threading.Event()
    reports: list = []
    errors: list = []

    def run() -> None:
        try:
            reports.append(send_files([path], url, follow=True, position_file=positions,
                                      stop_event=stop, poll_s=0.02, sndhwm=4))
        except BaseException as exc:    # reported below
            errors.append(exc)

    sender = threading.Thread(target=run, daemon=True)
    sender.start()
    got_first = list(first.read(until=20))
    first.close()                        # the service dies with what it had queued
    with open(path, "ab") as fh:        # more crystals come while it is down
        fh.write(b"".join(chunks[50:]))
    time.sleep(0.5)
    stop.set()
    sender.join(15)
    assert not sender.is_alive() and not errors, errors
    (report,) = reports
    assert report.unconfirmed > 0
    saved = json.loads(positions.read_text())[str(path)] if positions.exists() else {"sent": 0}
    assert saved["sent"] <= len(got_first)
    second = Service(url)                # the service is back: run the same command again
    try:
        again = send_files([path], url, position_file=positions, timeout_s=5.0)
        got_second = second.read(until=60 - saved["sent"])
    finally:
        second.close()
    assert again.sent == len(got_second) == 60 - saved["sent"]
    assert set(got_first) | set(got_second) == {image_of(n) for n in names}


def run_cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "streamvi", "send", *args],
                          capture_output=True, text=True, timeout=timeout)


def test_cli_with_the_service_down_exits_non_zero_and_sends_it_all_later(tmp_path) -> None:
    path = tmp_path / "run.stream"
    names = stream_of(path, 32)
    positions = tmp_path / "pos.json"
    url = dead_url()
    done = run_cli(str(path), "--to", url, "--timeout", "1", "--position-file", str(positions))
    assert done.returncode != 0, done.stdout
    errors = [line for line in done.stderr.splitlines() if "error" in line]
    assert len(errors) == 1 and url in errors[0], done.stderr
    for line in done.stdout.splitlines():
        assert json.loads(line)["sent"] == 0, done.stdout
    if positions.exists():
        assert json.loads(positions.read_text())[str(path)]["sent"] == 0
    service = Service(url)
    try:
        again = run_cli(str(path), "--to", url, "--timeout", "5", "--position-file",
                        str(positions))
        got = service.read(until=32)
    finally:
        service.close()
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout)["sent"] == 32
    assert sorted(got) == sorted(image_of(n) for n in names)


class Lines:
    """Read a pipe line by line in a thread; wait for a line that contains a text."""

    def __init__(self, pipe) -> None:
        self.lines: list[str] = []
        self.thread = threading.Thread(target=self._read, args=(pipe,), daemon=True)
        self.thread.start()

    def _read(self, pipe) -> None:
        for line in pipe:
            self.lines.append(line)

    def wait_for(self, text: str, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if any(text in line for line in self.lines):
                return True
            time.sleep(0.02)
        return False


def test_cli_follow_with_the_service_down_stops_on_ctrl_c(tmp_path) -> None:
    path = tmp_path / "live.stream"
    names = stream_of(path, 5)
    positions = tmp_path / "pos.json"
    url = dead_url()
    proc = subprocess.Popen([sys.executable, "-m", "streamvi", "send", "--follow", str(path),
                             "--position-file", str(positions), "--poll", "0.02", "--to", url],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        err = Lines(proc.stderr)
        assert err.wait_for("waiting for the service at " + url, timeout=30.0), err.lines
        proc.send_signal(signal.SIGINT)
        t0 = time.monotonic()
        out, _ = proc.communicate(timeout=15)
        elapsed = time.monotonic() - t0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert elapsed < 5.0, f"Ctrl-C took {elapsed:.1f} s"
    assert json.loads(out)["sent"] == 0, out
    if positions.exists():
        assert json.loads(positions.read_text())[str(path)]["sent"] == 0
    service = Service(url)
    try:
        again = run_cli(str(path), "--to", url, "--timeout", "5", "--position-file",
                        str(positions))
        got = service.read(until=5)
    finally:
        service.close()
    assert again.returncode == 0, again.stderr
    assert sorted(got) == sorted(image_of(n) for n in names)


def test_a_crystal_over_the_service_limit_is_not_sent(receiver: Receiver) -> None:
    """The service drops the connection of a frame over its limit (losing what followed on
    it); the sender refuses such a crystal itself."""
    msgs = [crystal(0), crystal(1, n=2000), crystal(2)]
    limit = len(encode_crystal(msgs[0])) * 2
    seen: list[Rejected] = []
    report = send_messages(msgs, receiver.url, timeout_s=2.0, max_message_bytes=limit,
                           on_rejected=seen.append)
    assert (report.sent, report.rejected, report.unconfirmed) == (2, 1, 0)
    assert [r.reason for r in seen] == ["too_large"] and "img00001" in seen[0].position
    assert [decode_crystal(f[0]).image for f in receiver.receive(2)] == ["img00000",
                                                                           "img00002"]
