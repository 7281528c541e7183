"""Shared fixtures: small real data and small synthetic crystals."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from streamvi.wire import CrystalMessage

REPO = Path(__file__).resolve().parents[1]
#: Data the project carries (MIT, copied with their licence; tests/data/README.md).
TEST_DATA = REPO / "tests" / "data"
#: Data beside the repository (CI has it; a user's fresh clone does not).
SHARED_DATA = REPO.parent / "shared" / "data"

PAL_STREAM = TEST_DATA / "crystfel" / "hewl_palxfel_3crystals.stream"
DIALS_REFL = TEST_DATA / "dials" / "thermolysin_3stills.refl"
DIALS_EXPT = TEST_DATA / "dials" / "thermolysin_3stills.expt"
#: The 5-HT2B stream is GPL-3.0 and may not be copied into this BSD-3-Clause project.
LCLS_STREAM = SHARED_DATA / "crystfel" / "5ht2b_lcls_32crystals.stream"
LCLS_MISSING = (f"needs the GPL-3.0 5-HT2B stream at {LCLS_STREAM}, which may not be copied "
                "into this BSD-3-Clause project (tests/data/README.md); it is absent here")
#: Mark for tests that read :data:`LCLS_STREAM`: skipped, with the reason, where it is absent.
requires_lcls = pytest.mark.skipif(not LCLS_STREAM.is_file(), reason=LCLS_MISSING)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """../shared/data (real test data sets; read-only); the test is skipped where absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"needs ../shared/data ({SHARED_DATA}), absent here; the data the project "
                    "may carry are in tests/data")
    return SHARED_DATA


@pytest.fixture(scope="session")
def test_data() -> Path:
    """tests/data (the real data sets the project carries; read-only)."""
    return TEST_DATA


@pytest.fixture(scope="session")
def lcls_stream() -> Path:
    """The GPL 5-HT2B stream from ../shared/data; the test is skipped where it is absent."""
    if not LCLS_STREAM.is_file():
        pytest.skip(LCLS_MISSING)
    return LCLS_STREAM


def make_crystal(rng: np.random.Generator, *, n: int = 50, run: str = "r1", image: str = "img0",
                 crystal: int = 0, hmax: int = 10, cell=(79.1, 79.1, 37.9, 90.0, 90.0, 90.0),
                 with_orientation: bool = False) -> CrystalMessage:
    """A random but valid crystal message."""
    hkl = rng.integers(-hmax, hmax + 1, size=(n, 3)).astype(np.int32)
    hkl[(hkl == 0).all(axis=1)] = (1, 0, 0)
    msg = CrystalMessage(
        run=run, image=image, crystal=crystal, h=hkl[:, 0], k=hkl[:, 1], l=hkl[:, 2],
        I=rng.gamma(2.0, 50.0, n).astype(np.float32),
        sigI=rng.uniform(1.0, 10.0, n).astype(np.float32),
        photon_energy_eV=9500.0, cell=tuple(cell),
        fs=rng.uniform(0, 1000, n).astype(np.float32),
        ss=rng.uniform(0, 1000, n).astype(np.float32), profile_radius=0.003)
    if with_orientation:
        msg.astar, msg.bstar, msg.cstar = (1 / cell[0], 0.0, 0.0), (0.0, 1 / cell[1], 0.0), \
            (0.0, 0.0, 1 / cell[2])
    return msg


class PullSocket:
    """A ZeroMQ PULL socket bound to a free loopback port (``url``); subclasses read it."""

    def __init__(self) -> None:
        import zmq

        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.PULL)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.bind("tcp://127.0.0.1:*")
        self.url = self.sock.getsockopt_string(zmq.LAST_ENDPOINT)

    def close(self) -> None:
        self.sock.close()
        self.ctx.term()


def subscriber(endpoint: str, topic: bytes, *, timeout_ms: int = 10_000):
    """A real ZeroMQ SUB socket connected to ``endpoint`` for ``topic`` (close it)."""
    import zmq

    sub = zmq.Context.instance().socket(zmq.SUB)
    sub.setsockopt(zmq.SUBSCRIBE, topic)
    sub.setsockopt(zmq.RCVTIMEO, timeout_ms)
    sub.setsockopt(zmq.LINGER, 0)
    sub.connect(endpoint)
    return sub
