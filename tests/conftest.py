"""Shared fixtures: small real data and small synthetic crystals."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from streamvi.wire import CrystalMessage

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """../shared/data (real test data sets; read-only)."""
    if not SHARED_DATA.is_dir():
        pytest.fail(f"test data not found at {SHARED_DATA}: the repo must sit beside shared/")
    return SHARED_DATA


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
