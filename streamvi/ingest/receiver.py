"""Ingest: ZeroMQ sockets → decode and validate → spool → counters → a bounded queue.

One background thread owns every socket (ZeroMQ sockets are not thread-safe) and polls them
together.  For each frame:

1. :func:`streamvi.wire.decode_crystal`; a refused message is counted by ``reason`` and
   written to the dead-letter file -- never an exception.
2. An accepted message is appended to the :class:`~streamvi.ingest.spool.Spool` *first*, byte for
   byte, then counted, then queued as ``(seq, msg, arrival_time)``.
3. When the queue is full the thread waits instead of reading: the socket's receive
   high-water mark fills, then the producer's send high-water mark, and a PUSH producer
   blocks.  Backpressure, never a silent drop (DESIGN.md section 5).  PUB/SUB cannot push
   back: a publisher drops what a slow subscriber cannot take, so use PUSH/PULL wherever
   data must not be lost.

The training thread takes work with :meth:`Ingestor.get_batch`.  After a restart,
:func:`replay_spool` yields what the spool holds beyond the checkpoint.
"""
from __future__ import annotations

import collections
import ipaddress
import logging
import threading
import time
from typing import Callable, Iterable, Iterator
from urllib.parse import urlsplit

import zmq
from zmq.utils.monitor import recv_monitor_message

from streamvi.ingest.counters import IngestCounters
from streamvi.ingest.deadletter import DeadLetter
from streamvi.errors import ConfigError, StreamviError, WireError
from streamvi.ingest.ratelimit import RateLimitedLog
from streamvi.ingest.spool import Spool
from streamvi.wire import (
    DEFAULT_MAX_MESSAGE_BYTES,
    MAX_REFLECTIONS,
    CrystalMessage,
    clip,
    decode_crystal,
)

log = logging.getLogger(__name__)

#: One unit of work: (spool sequence number, crystal, arrival time in Unix s).
QueueItem = tuple[int, CrystalMessage, float]

DEFAULT_QUEUE_MAX_MESSAGES = 10_000
_POLL_MS = 100
_BURST = 256          # frames taken from one socket before the others get a turn
_START_TIMEOUT_S = 10.0
#: Connection events ingest follows (socket monitors).
_EVENTS = (zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_DISCONNECTED
           | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
           | zmq.EVENT_HANDSHAKE_FAILED_AUTH)
_HANDSHAKE_FAILED = (zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL, zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL,
                     zmq.EVENT_HANDSHAKE_FAILED_AUTH)


class _BoundedQueue:
    """FIFO bounded by item count and/or bytes; always admits one item when empty."""

    def __init__(self, max_items: int | None, max_bytes: int | None):
        self.max_items = max_items
        self.max_bytes = max_bytes
        self._items: collections.deque[tuple[QueueItem, int]] = collections.deque()
        self._bytes = 0
        self._cond = threading.Condition()
        self.closed = False

    def _full(self, nbytes: int) -> bool:
        if not self._items:
            return False
        if self.max_items is not None and len(self._items) >= self.max_items:
            return True
        return self.max_bytes is not None and self._bytes + nbytes > self.max_bytes

    def put(self, item: QueueItem, nbytes: int, stop: threading.Event,
            idle: Callable[[], None] | None = None) -> bool:
        """Wait for room (calling ``idle`` now and then), then enqueue; False if ``stop``
        was set first.  Stopped while waiting, the item is queued all the same, past the
        bound: it was counted and spooled already, and the consumer's last drain takes it
        (a stop during overload left one crystal received but not merged)."""
        while True:
            with self._cond:
                if not self._full(nbytes) or stop.is_set():
                    self._items.append((item, nbytes))
                    self._bytes += nbytes
                    self._cond.notify_all()
                    return not stop.is_set()
                self._cond.wait(0.1)
                still_full = self._full(nbytes)
            if idle is not None and still_full:
                idle()      # outside the lock: the consumer must not wait on an fsync

    def get_batch(self, max_items: int, timeout: float | None) -> list[QueueItem]:
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while not self._items:
                if self.closed:
                    return []
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return []
                self._cond.wait(remaining)
            out = []
            while self._items and len(out) < max_items:
                item, nbytes = self._items.popleft()
                self._bytes -= nbytes
                out.append(item)
            self._cond.notify_all()
        return out

    def wake(self, *, close: bool = False) -> None:
        with self._cond:
            self.closed = self.closed or close
            self._cond.notify_all()

    def __len__(self) -> int:
        return len(self._items)

    @property
    def nbytes(self) -> int:
        return self._bytes


def _exposure(endpoint: str) -> str | None:
    """'all' for a wildcard TCP bind, 'network' for a non-loopback one, else None."""
    parts = urlsplit(endpoint)
    if parts.scheme != "tcp":
        return None
    host = parts.netloc.rsplit(":", 1)[0].strip("[]")
    if host in ("*", "0.0.0.0", "::", ""):
        return "all"
    if host == "localhost":
        return None
    try:
        return None if ipaddress.ip_address(host).is_loopback else "network"
    except ValueError:
        return "network"    # an interface or host name


class _AllowedKeys:
    """ZAP credentials provider: a fixed set of z85 client public keys.

    A refused producer reconnects every 100 ms or faster, so refusals are logged through a
    :class:`~streamvi.ingest.ratelimit.RateLimitedLog` and counted in :attr:`refused`.
    """

    def __init__(self, keys: Iterable[bytes | str], notices: RateLimitedLog):
        self.keys = {k.encode("ascii") if isinstance(k, str) else bytes(k) for k in keys}
        self.notices = notices
        self.refused = 0

    def callback(self, domain: str, key: bytes) -> bool:
        if key in self.keys:
            return True
        self.refused += 1
        self.notices.log(logging.WARNING, "curve_refused", "ingest: refused a CURVE client with "
                         "unknown public key %s; add it to curve_allowed_clients if it is a "
                         "trusted producer", clip(key.decode("ascii", "replace"), 60))
        return False


class Ingestor:
    """Receive wire messages on ZeroMQ sockets and queue them for training.

    Parameters
    ----------
    endpoints
        ZeroMQ addresses, e.g. ``["tcp://127.0.0.1:5555"]``; ``tcp://127.0.0.1:*`` binds a
        free port (see :attr:`bound_endpoints`).
    mode
        ``"pull"`` (producers PUSH; lossless, with backpressure) or ``"sub"``.
    topic
        SUB subscription prefix.
    bind
        Bind (True) or connect (False); default: PULL binds, SUB connects.
    queue_max_messages, queue_max_bytes
        Bounds of the queue to the consumer (messages; raw bytes).  Default 10,000
        messages when neither is given.
    rcvhwm
        ZeroMQ receive high-water mark, messages per socket.
    spool
        Where accepted raw messages go before being counted; None keeps no spool
        (sequence numbers then count from 0 in this process).
    dead_letter
        Where refused messages go.
    counters
        Shared counters (a fresh set by default).
    max_message_bytes
        Larger frames are refused unread: ZeroMQ (``MAXMSGSIZE``) closes the connection of
        a producer that sends one, so memory never holds more than this per frame; counted
        in :attr:`producer_disconnects`.
    max_reflections
        Crystals with more reflections are refused (reason ``too_many_reflections``).
    context
        ZeroMQ context; by default the ingestor makes (and terminates) its own.
    curve_server_secret
        z85 CURVE secret key of this server: producers must then use CURVE with its public
        key (:func:`zmq.curve_public`).
    curve_allowed_clients
        z85 public keys of producers allowed in; None with CURVE lets any client in
        (encrypted, not authenticated).
    """

    def __init__(self, endpoints: list[str], *, mode: str = "pull", topic: bytes = b"",
                 bind: bool | None = None, queue_max_messages: int | None = None,
                 queue_max_bytes: int | None = None, rcvhwm: int = 1000,
                 spool: Spool | None = None, dead_letter: DeadLetter | None = None,
                 counters: IngestCounters | None = None,
                 max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
                 max_reflections: int = MAX_REFLECTIONS,
                 context: zmq.Context | None = None,
                 curve_server_secret: bytes | str | None = None,
                 curve_allowed_clients: Iterable[bytes | str] | None = None):
        if mode not in ("pull", "sub"):
            raise ConfigError(f"ingest: mode={mode!r}; use 'pull' (lossless, with "
                              "backpressure) or 'sub'")
        if not endpoints:
            raise ConfigError("ingest: no endpoints; give at least one, e.g. "
                              "tcp://127.0.0.1:5555")
        if queue_max_messages is None and queue_max_bytes is None:
            queue_max_messages = DEFAULT_QUEUE_MAX_MESSAGES
        for name, v in (("queue_max_messages", queue_max_messages),
                        ("queue_max_bytes", queue_max_bytes), ("rcvhwm", rcvhwm)):
            if v is not None and v < 1:
                raise ConfigError(f"ingest: {name}={v} must be >= 1")
        self.endpoints = list(endpoints)
        self.mode = mode
        self.topic = topic.encode() if isinstance(topic, str) else bytes(topic)
        self.bind = (mode == "pull") if bind is None else bool(bind)
        self.rcvhwm = int(rcvhwm)
        self.spool = spool
        self.dead_letter = dead_letter
        self.counters = counters if counters is not None else IngestCounters()
        self.max_message_bytes = int(max_message_bytes)
        self.max_reflections = int(max_reflections)
        if self.max_message_bytes < 1 or self.max_reflections < 1:
            raise ConfigError(f"ingest: max_message_bytes={max_message_bytes} and "
                              f"max_reflections={max_reflections} must be >= 1")
        if isinstance(curve_server_secret, str):
            curve_server_secret = curve_server_secret.encode("ascii")
        self.curve_server_secret = curve_server_secret
        self.curve_allowed_clients = (None if curve_allowed_clients is None
                                      else list(curve_allowed_clients))
        self._queue = _BoundedQueue(queue_max_messages, queue_max_bytes)
        self._own_context = context is None
        self._context = context
        self._auth = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._start_error: BaseException | None = None
        self._bound: list[str] = []
        self._next_seq = 0
        #: repeated warnings (rejections, refused producers, disconnects) at a bounded rate
        self.notices = RateLimitedLog(log, burst=10, interval_s=10.0)
        #: producer connections closed after their handshake: producers that finished, and
        #: those cut off for a frame over max_message_bytes
        self.producer_disconnects = 0
        #: connections that failed the ZeroMQ handshake (not ZeroMQ, CURVE refused, …)
        self.handshake_failures = 0
        self._failed_pending = 0
        self._allowed: _AllowedKeys | None = None
        #: set by the service: whether a decoded crystal is stored already (by identity or
        #: content); such a message is counted as a duplicate and not spooled or queued
        self.already_stored: Callable[[CrystalMessage], bool] | None = None

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        """Open the sockets and start the receiving thread.

        Raises
        ------
        ConfigError
            An endpoint could not be bound or connected (the thread is not left running).
        """
        if self._thread is not None:
            raise StreamviError("ingest: start() called twice; make a new Ingestor")
        if self._context is None:
            self._context = zmq.Context()
        self._thread = threading.Thread(target=self._run, name="streamvi-ingest", daemon=True)
        try:
            if self.curve_server_secret is not None:
                self._start_auth()
        except BaseException:
            self.stop()
            raise
        self._thread.start()
        if not self._ready.wait(_START_TIMEOUT_S):
            self.stop()
            raise StreamviError("ingest: sockets not open after "
                                f"{_START_TIMEOUT_S:g} s; this is a bug, please report it")
        if self._start_error is not None:
            err = self._start_error
            self.stop()
            raise err

    def _start_auth(self) -> None:
        from zmq.auth.thread import ThreadAuthenticator

        if not zmq.has("curve"):
            raise ConfigError("ingest: CURVE requested but this libzmq has no CURVE support; "
                              "install a pyzmq wheel (bundles libsodium) or drop the CURVE keys")
        self._auth = ThreadAuthenticator(self._context, log=log.getChild("auth"))
        self._auth.start()
        if self.curve_allowed_clients is None:
            log.warning("ingest: CURVE without curve_allowed_clients: traffic is encrypted "
                        "but any client with the server key gets in; list the producers' "
                        "public keys to authenticate them")
            self._auth.configure_curve(domain="*", location=zmq.auth.CURVE_ALLOW_ANY)
        else:
            self._allowed = _AllowedKeys(self.curve_allowed_clients, self.notices)
            self._auth.configure_curve_callback(domain="*", credentials_provider=self._allowed)

    def stop(self, timeout: float = 5.0) -> None:
        """Stop receiving, close the sockets (linger 0), flush the spool.

        Items already queued stay available to :meth:`get_batch`; what was spooled but not
        yet absorbed is found again by :func:`replay_spool` after a restart.  Idempotent.
        The spool and dead-letter file are left open (they belong to the caller).
        """
        self._stop.set()
        self._queue.wake()
        thread = self._thread
        if thread is not None and thread.is_alive():
            thread.join(timeout)
            if thread.is_alive():
                log.error("ingest: receiving thread did not stop within %g s; its sockets "
                          "stay open until the process exits", timeout)
                return
        self._queue.wake(close=True)
        if self.spool is not None and not self.spool.closed:
            self.spool.flush()
        if self._auth is not None:
            self._auth.stop()
            self._auth = None
        if self._own_context and self._context is not None:
            self._context.term()
            self._context = None

    def __enter__(self) -> "Ingestor":
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def bound_endpoints(self) -> list[str]:
        """Actual addresses (bound ports resolved), or the connect targets."""
        return list(self._bound)

    @property
    def queue_depth(self) -> int:
        """Messages waiting for the consumer."""
        return len(self._queue)

    @property
    def queue_bytes(self) -> int:
        """Raw bytes of the messages waiting for the consumer."""
        return self._queue.nbytes

    def get_batch(self, max_items: int, timeout: float | None = 0.0) -> list[QueueItem]:
        """Up to ``max_items`` queued ``(seq, msg, arrival_time)``, oldest first.

        Waits up to ``timeout`` s (None: until something arrives or the ingestor stops)
        for the first item; returns ``[]`` if none came.
        """
        return self._queue.get_batch(max_items, timeout)

    # ------------------------------------------------------------------ the thread

    def _open_sockets(self) -> list[tuple[zmq.Socket, str]]:
        assert self._context is not None
        sockets: list[tuple[zmq.Socket, str]] = []
        try:
            for endpoint in self.endpoints:
                sock = self._context.socket(zmq.PULL if self.mode == "pull" else zmq.SUB)
                sockets.append((sock, endpoint))
                sock.setsockopt(zmq.LINGER, 0)
                sock.setsockopt(zmq.RCVHWM, self.rcvhwm)
                # A larger frame is refused by ZeroMQ as its header arrives (the producer is
                # disconnected), before any of it is allocated: a frame declaring 1 GiB
                # otherwise costs 1 GiB, and twice that once copied into Python.
                sock.setsockopt(zmq.MAXMSGSIZE, self.max_message_bytes)
                if self.mode == "sub":
                    sock.setsockopt(zmq.SUBSCRIBE, self.topic)
                if self.curve_server_secret is not None:
                    sock.curve_secretkey = self.curve_server_secret
                    sock.curve_publickey = zmq.curve_public(self.curve_server_secret)
                    sock.curve_server = True
                try:
                    if self.bind:
                        sock.bind(endpoint)
                        actual = sock.getsockopt_string(zmq.LAST_ENDPOINT)
                    else:
                        sock.connect(endpoint)
                        actual = endpoint
                except zmq.ZMQError as exc:
                    verb = "bind" if self.bind else "connect to"
                    raise ConfigError(f"ingest: cannot {verb} {endpoint}: {exc}; check the "
                                      "address, or choose a free port (tcp://127.0.0.1:* "
                                      "picks one)") from exc
                sockets[-1] = (sock, actual)
                self._bound.append(actual)
                if self.bind:
                    self._warn_exposure(endpoint, actual)
                log.info("ingest: %s %s (%s)", "bound" if self.bind else "connected",
                         actual, self.mode.upper())
        except BaseException:
            for sock, _ in sockets:
                sock.close(linger=0)
            raise
        return sockets

    def _warn_exposure(self, endpoint: str, actual: str) -> None:
        exposure = _exposure(endpoint)
        if exposure is None:
            return
        if self.curve_server_secret is not None:
            log.info("ingest: %s is reachable from the network, protected by CURVE", actual)
            return
        where = "every network interface" if exposure == "all" else "the network"
        log.warning("ingest: !!! %s is bound on %s WITHOUT authentication: anyone who can "
                    "reach it can inject data into the merge. Bind tcp://127.0.0.1:PORT, or "
                    "enable CURVE (curve_server_secret and curve_allowed_clients) !!!",
                    actual, where)

    def _run(self) -> None:
        try:
            sockets = self._open_sockets()
        except BaseException as exc:    # handed to start(), which raises it
            self._start_error = exc
            self._ready.set()
            return
        self._ready.set()
        poller = zmq.Poller()
        monitors: list[tuple[zmq.Socket, str]] = []
        try:
            for sock, endpoint in sockets:
                poller.register(sock, zmq.POLLIN)
                monitor = sock.get_monitor_socket(_EVENTS)
                monitors.append((monitor, endpoint))
                poller.register(monitor, zmq.POLLIN)
            while not self._stop.is_set():
                events = dict(poller.poll(_POLL_MS))
                for monitor, endpoint in monitors:
                    if monitor in events:
                        self._connection_events(monitor, endpoint)
                for sock, endpoint in sockets:
                    if sock in events and not self._drain(sock, endpoint):
                        return
                if self.spool is not None:
                    self.spool.maybe_sync()
                self.notices.flush()
        except Exception:
            log.exception("ingest: receiving thread failed; no more messages are read. "
                          "This is a bug, please report it with this traceback")
        finally:
            for monitor, _ in monitors:
                monitor.close(linger=0)
            for sock, _ in sockets:
                sock.close(linger=0)
            self._queue.wake(close=True)
            self.notices.flush()

    def _connection_events(self, monitor: zmq.Socket, endpoint: str) -> None:
        """Count producers that were disconnected or failed their handshake; log them at a
        bounded rate (a refused producer reconnects every 100 ms)."""
        while True:
            try:
                code = recv_monitor_message(monitor, zmq.NOBLOCK)["event"]
            except zmq.Again:
                return
            if code in _HANDSHAKE_FAILED:
                self.handshake_failures += 1
                self._failed_pending += 1     # its connection's end is not a producer's
                if code != zmq.EVENT_HANDSHAKE_FAILED_AUTH:   # CURVE refusals name the key
                    self.notices.log(logging.WARNING, "handshake_failed", "ingest: %s: a "
                                     "connection failed the ZeroMQ handshake (not a ZeroMQ "
                                     "peer, or CURVE on one side only); refused", endpoint)
            elif code == zmq.EVENT_DISCONNECTED:
                if self._failed_pending:
                    self._failed_pending -= 1
                    continue
                self.producer_disconnects += 1
                self.notices.log(logging.INFO, "disconnect", "ingest: %s: a producer's "
                                 "connection closed (%d so far): it finished, or it sent a "
                                 "frame over max_message_bytes (%d bytes), which is refused "
                                 "unread; a producer that reconnects over and over is doing "
                                 "the latter", endpoint, self.producer_disconnects,
                                 self.max_message_bytes)

    def _drain(self, sock: zmq.Socket, endpoint: str) -> bool:
        """Handle up to a burst of messages; False when stopping."""
        for _ in range(_BURST):
            try:
                first = sock.recv(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return True
            frames, n_frames, nbytes = _rest_of_message(sock, first)
            if not self._handle(frames, n_frames, nbytes, endpoint):
                return False
            if self._stop.is_set():
                return False
        return True

    def _handle(self, frames: list[zmq.Frame], n_frames: int, nbytes: int,
                endpoint: str) -> bool:
        # Zero-copy view of the payload: the frame's buffer is valid while the frame lives
        # (decoding copies what it keeps), so a message costs its size once, not twice.
        raw = frames[-1].buffer
        allowed = 1 if self.mode == "pull" else 2
        if n_frames > allowed:
            self._reject(endpoint, "unexpected_multipart",
                         f"message of {n_frames} frames; send each crystal as "
                         + ("one frame" if self.mode == "pull" else "[topic,] payload"),
                         raw, nbytes)
            return True
        try:
            msg = decode_crystal(raw, max_bytes=self.max_message_bytes,
                                 max_reflections=self.max_reflections)
        except WireError as exc:
            self._reject(endpoint, exc.reason, str(exc), raw, nbytes)
            return True
        except Exception as exc:    # a decoder bug must not end ingest
            self._reject(endpoint, "decode_error", f"unexpected {type(exc).__name__}: "
                         f"{clip(exc)}", raw, nbytes)
            return True
        if self.already_stored is not None and self.already_stored(msg):
            self.counters.record_duplicate(msg, nbytes=nbytes)
            return True
        seq = self._spool_append(raw)
        if seq is None:
            return False
        self.counters.record_accepted(msg, nbytes=nbytes,
                                      seq=seq if self.spool is not None else None)
        return self._queue.put((seq, msg, time.time()), len(raw), self._stop,
                               self.spool.maybe_sync if self.spool is not None else None)

    def _spool_append(self, raw: bytes | memoryview) -> int | None:
        if self.spool is None:
            self._next_seq += 1
            return self._next_seq - 1
        delay = 0.1
        while True:
            try:
                return self.spool.append(raw)
            except OSError as exc:
                self.counters.record_spool_error()
                log.error("ingest: cannot write to spool %s (%s); not reading more messages "
                          "until it works again (producers are held back), free disk space "
                          "or fix the spool directory", self.spool.directory, exc)
            except StreamviError as exc:
                log.error("ingest: %s; stop the Ingestor before closing its spool", exc)
                return None
            if self._stop.wait(delay):
                return None
            delay = min(delay * 2, 5.0)

    def _reject(self, endpoint: str, reason: str, detail: str, raw: bytes | memoryview,
                nbytes: int) -> None:
        self.counters.record_rejected(reason, nbytes=nbytes)
        detail = clip(detail, 1000)     # built from the message: never echo it unbounded
        if self.dead_letter is not None:
            self.dead_letter.write(source=endpoint, reason=reason, detail=detail, payload=raw,
                                   size=len(raw))
        self.notices.log(logging.WARNING, f"rejected:{reason}", "ingest: %s: rejected a "
                         "%d-byte message (%s): %s", endpoint, len(raw), reason, detail)


def _rest_of_message(sock: zmq.Socket, first: zmq.Frame) -> tuple[list[zmq.Frame], int, int]:
    """The remaining parts of a message whose first part is ``first``.

    Keeps the first and the last part only (a message of more parts than allowed is refused
    anyway, and its payload is taken to be the last part); the others are released as they
    are read.  Returns (kept parts, number of parts, bytes in all).
    """
    kept = [first]
    n, nbytes = 1, len(first)
    last = first
    while last.more:
        last = sock.recv(copy=False)      # the parts of a message arrive together
        n += 1
        nbytes += len(last)
        if len(kept) == 1:
            kept.append(last)
        else:
            kept[-1] = last
    return kept, n, nbytes


def replay_spool(spool: Spool, *, start: int = 0, stop: int | None = None,
                 counters: IngestCounters | None = None,
                 max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
                 max_reflections: int = MAX_REFLECTIONS) -> Iterator[QueueItem]:
    """Decode spooled messages for a restart, counting only those not yet counted.

    Parameters
    ----------
    spool
        The spool of the previous run, opened again.
    start
        First sequence number to yield: one past the last one the checkpointed store held.
    stop
        One past the last; default what the spool held when replay began.
    counters
        Counters restored from the checkpoint: messages with ``seq > counters.last_seq``
        were received after it and are counted now, the others were counted already.
    max_message_bytes, max_reflections
        The limits of :func:`~streamvi.wire.decode_crystal` (those of the service).

    Yields
    ------
    (seq, msg, arrival_time)
        As :meth:`Ingestor.get_batch` does (``arrival_time`` is the replay time).
    """
    for seq, raw in spool.iter_records(start, stop):
        uncounted = counters is not None and seq > counters.last_seq
        try:
            msg = decode_crystal(raw, max_bytes=max_message_bytes,
                                 max_reflections=max_reflections)
        except WireError as exc:
            log.error("ingest: spool %s record %d no longer decodes (%s: %s); skipped",
                      spool.directory, seq, exc.reason, clip(exc, 1000))
            if uncounted:
                counters.record_rejected(exc.reason, nbytes=len(raw))  # type: ignore[union-attr]
            continue
        if uncounted:
            counters.record_accepted(msg, nbytes=len(raw), seq=seq)  # type: ignore[union-attr]
        yield seq, msg, time.time()
