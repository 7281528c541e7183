"""The producer side, against a real PULL socket on loopback."""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
import zmq

from conftest import PullSocket
from streamvi.errors import ConfigError
from streamvi.send import send_file, send_messages
from streamvi.sources import Rejected
from streamvi.wire import CrystalMessage, decode_crystal

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
