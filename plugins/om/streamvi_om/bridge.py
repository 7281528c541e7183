"""Subscribe to an OM monitor's data broadcast and keep its latest figures.

OM (OnDA Monitor) publishes monitor data on a ZeroMQ PUB socket
(:class:`om.lib.zmq.ZmqDataBroadcaster`, ``data_broadcast_url`` in the ``crystallography``
group of ``monitor.yaml``; default port 12321): two frames, the tag (``omdata``) and the
message pickled by ``send_pyobj``.  :class:`OmBridge` subscribes to one tag in a thread and
keeps an :class:`~streamvi_om.state.OmState`: hit rate and its history, events, estimated
hits, beam energy, detector distance, timestamps.

Unpickling network data is a risk: the bridge refuses to start unless ``allow_pickle=True``,
and even then loads only the types OM's messages hold (:mod:`streamvi_om.unpickle`).
"""
from __future__ import annotations

import logging
import threading
import time
from typing import Any

import zmq

from streamvi.errors import ConfigError
from streamvi_om.state import OmState
from streamvi_om.unpickle import loads_om

log = logging.getLogger(__name__)

PICKLE_RISK = (
    "OM broadcasts its monitor data as Python pickles (om.lib.zmq.ZmqDataBroadcaster uses "
    "send_pyobj); unpickling what arrives on a network socket lets whoever can publish on that "
    "address run code in this process. streamvi loads only the types OM's messages hold, but "
    "only enable this for an OM you run, on a network only it can publish on")

#: Messages of this many bytes or more are dropped by ZeroMQ before they are read.
DEFAULT_MAX_MESSAGE_BYTES = 256 * 1024 * 1024


class OmBridge:
    """Latest hit rate, counts and beam figures of an OM monitor, received in a thread.

    Parameters
    ----------
    url
        OM's ``data_broadcast_url``, e.g. ``tcp://om-host:12321`` (the bridge connects).
    allow_pickle
        Must be True: OM's messages are pickles (see :data:`PICKLE_RISK`).
    tag
        Message tag to subscribe to (OM's crystallography monitor: ``omdata``).
    history_points
        Latest events of the hit-rate history kept for plots.
    rcvhwm
        Receive high-water mark, messages; older ones are dropped when the bridge falls
        behind (counts stay exact while fewer than 5,000 events pass unseen).
    max_message_bytes
        Larger messages are refused by ZeroMQ (OM's virtual powder plot is detector-sized).
    context
        ZeroMQ context; by default a private one.

    Raises
    ------
    ConfigError
        ``allow_pickle`` is False, or the URL is unusable.
    """

    def __init__(self, url: str, *, allow_pickle: bool = False, tag: str = "omdata",
                 history_points: int = 600, rcvhwm: int = 100,
                 max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
                 context: zmq.Context | None = None):
        if not allow_pickle:
            raise ConfigError(f"OM bridge for {url}: refused. {PICKLE_RISK}. To accept that, "
                              "set om_allow_pickle = true (OmBridge(..., allow_pickle=True)); "
                              "otherwise leave om_url empty")
        log.warning("OM bridge: unpickling OM's broadcasts from %s. %s.", url, PICKLE_RISK)
        self.url = url
        self.tag = tag
        self.allow_pickle = allow_pickle
        self._own_context = context is None
        self._context = zmq.Context() if context is None else context
        self._socket = self._context.socket(zmq.SUB)
        try:
            self._socket.setsockopt(zmq.LINGER, 0)
            self._socket.setsockopt(zmq.RCVHWM, int(rcvhwm))
            self._socket.setsockopt(zmq.MAXMSGSIZE, int(max_message_bytes))
            self._socket.setsockopt(zmq.SUBSCRIBE, tag.encode())
            self._socket.connect(url)
        except zmq.ZMQError as exc:
            self._close()
            raise ConfigError(f"OM bridge: cannot connect to {url!r} ({exc}); give OM's "
                              "data_broadcast_url, e.g. tcp://om-host:12321") from None
        self._state = OmState(history_points=history_points)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __repr__(self) -> str:
        return f"OmBridge({self.url!r}, tag={self.tag!r})"

    # ------------------------------------------------------------------ life cycle

    def start(self) -> "OmBridge":
        """Start the receiving thread; returns self."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="streamvi-om-bridge",
                                            daemon=True)
            self._thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the thread and close the socket."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        self._close()

    def _close(self) -> None:
        if not self._socket.closed:
            self._socket.close(linger=0)
        if self._own_context and not self._context.closed:
            self._context.term()

    def _run(self) -> None:
        poller = zmq.Poller()
        poller.register(self._socket, zmq.POLLIN)
        while not self._stop.is_set():
            try:
                if not poller.poll(100):
                    continue
                frames = self._socket.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                continue
            except zmq.ZMQError as exc:
                if self._stop.is_set():
                    break
                log.error("OM bridge: receiving from %s failed (%s); retrying", self.url, exc)
                time.sleep(0.5)
                continue
            self._receive(frames)

    def _receive(self, frames: list[bytes]) -> None:
        if len(frames) != 2 or frames[0] != self.tag.encode():
            # the subscription is a prefix: "omdataX" would match too
            if len(frames) != 2:
                self._malformed(f"{len(frames)} frames instead of 2 (tag, pickle)")
            return
        try:
            message = loads_om(frames[1])
        except Exception as exc:  # any unpickling failure is the sender's fault
            self._malformed(str(exc))
            return
        if not isinstance(message, dict):
            self._malformed(f"a {type(message).__name__} instead of a map")
            return
        with self._lock:
            self._state.update(message)

    def _malformed(self, why: str) -> None:
        with self._lock:
            self._state.malformed += 1
            n = self._state.malformed
        if n == 1 or n % 100 == 0:
            log.warning("OM bridge: message %d from %s not read: %s", n, self.url, why)

    # ------------------------------------------------------------------ readers

    def snapshot(self) -> dict[str, Any]:
        """The latest figures (JSON-able).

        Returns
        -------
        dict
            ``url``, ``tag``; ``messages`` received, ``malformed`` ones, OM ``restarts``
            seen; ``events`` OM processed and ``hits`` (estimated) since the bridge started
            listening, ``counts_exact``; ``hit_rate`` of the latest event (fraction 0–1, OM's
            running average; ``hit_rate_dark`` for laser-off events in pump-probe runs);
            ``timestamp`` of the latest event and OM's ``start_timestamp`` (Unix s),
            ``received_at`` (local Unix s); ``beam_energy_eV``, ``detector_distance_mm``,
            ``detector_distance_offset_m``; ``pump_probe``; ``history`` (``timestamp``,
            ``hit_rate`` lists of the latest events).  Values not received yet are None.
        """
        with self._lock:
            out = self._state.to_dict()
        out.update({"url": self.url, "tag": self.tag})
        return out

    @property
    def hits(self) -> float:
        """Estimated hits OM found since the bridge started listening."""
        with self._lock:
            return self._state.hits

    def indexing_yield(self, crystals_received: int) -> float | None:
        """Crystals received per OM hit (None before the first hit).

        Parameters
        ----------
        crystals_received
            Crystals the service accepted (``counters.snapshot()["crystals_received"]``).
            Both counts should cover the same run: start the bridge with the service.
            A multi-crystal image counts each crystal, so the yield can exceed 1.
        """
        hits = self.hits
        return crystals_received / hits if hits > 0 else None
