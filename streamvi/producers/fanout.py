"""A producer's PUSH fan-out to data-parallel ranks (docs/performance.md, "Scale-out").

ZeroMQ deals each message of a bound PUSH socket to one connected peer, in turn, so a
producer that binds one and lets every rank's PULL socket connect to it spreads its crystals
over the ranks (:func:`streamvi.service.rank.run_rank`), with backpressure when all of them
are full.
"""
from __future__ import annotations

import time
from typing import Iterable

import zmq
from zmq.utils.monitor import recv_monitor_message

from streamvi.wire import CrystalMessage, encode_crystal


class FanOut:
    """A producer's PUSH socket that deals messages round robin to the ranks' PULL sockets.

    Binds ``url`` (``tcp://127.0.0.1:*`` picks a port: see :attr:`endpoint`); the ranks
    connect to it.  ZeroMQ gives each message to exactly one connected peer, in turn, and
    blocks (backpressure) when every peer's high-water mark is reached.  Call
    :meth:`wait_for_peers` before sending so that early messages are not all dealt to the
    first rank to connect.
    """

    def __init__(self, url: str = "tcp://127.0.0.1:*", *, sndhwm: int = 1000,
                 context: zmq.Context | None = None):
        self._own = context is None
        self.context = context or zmq.Context()
        self.socket = self.context.socket(zmq.PUSH)
        self.socket.setsockopt(zmq.SNDHWM, int(sndhwm))
        self._monitor = self.socket.get_monitor_socket(
            zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_DISCONNECTED)
        self.socket.bind(url)
        self.endpoint = self.socket.getsockopt_string(zmq.LAST_ENDPOINT)
        self.peers = 0
        self.sent = 0

    def wait_for_peers(self, n_peers: int, timeout_s: float = 60.0) -> None:
        """Block until ``n_peers`` PULL sockets have completed their handshake."""
        deadline = time.monotonic() + timeout_s
        while self.peers < n_peers:
            left = deadline - time.monotonic()
            if left <= 0 or not self._monitor.poll(int(left * 1000)):
                raise TimeoutError(f"fan-out {self.endpoint}: {self.peers} of {n_peers} "
                                   f"ranks connected after {timeout_s:g} s")
            event = recv_monitor_message(self._monitor)["event"]
            self.peers += 1 if event == zmq.EVENT_HANDSHAKE_SUCCEEDED else -1

    def send(self, message: bytes | CrystalMessage) -> None:
        payload = encode_crystal(message) if isinstance(message, CrystalMessage) else message
        self.socket.send(payload)
        self.sent += 1

    def send_all(self, messages: Iterable[bytes | CrystalMessage], *,
                 rate: float | None = None) -> int:
        """Send every message, ``rate`` per second if given (fixed schedule); returns count."""
        t0 = time.monotonic()
        n = 0
        for n, message in enumerate(messages, 1):
            if rate is not None:
                delay = t0 + (n - 1) / rate - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
            self.send(message)
        return n

    def close(self, linger_s: float = 30.0) -> None:
        self.socket.disable_monitor()
        self._monitor.close(linger=0)
        self.socket.close(linger=int(linger_s * 1000))
        if self._own:
            self.context.term()

    def __enter__(self) -> "FanOut":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
