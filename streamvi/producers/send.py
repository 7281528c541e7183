"""The producer side: send crystals to a running ``streamvi serve`` over ZeroMQ.

Depends on :mod:`streamvi.wire` and zmq only, so it runs wherever the data are (next to
indexamajig, on a file server) without torch.

A PUSH socket connects to the service's PULL endpoint.  When the service's queue is full it
stops reading, and :func:`send_messages` blocks: that is backpressure working, not a fault.
``timeout_s`` turns a block longer than that into :class:`SendTimeout` (a TimeoutError).

"Sent" means that a service took the message: the socket is ``ZMQ_IMMEDIATE`` (nothing is
queued while no service is connected), a socket monitor sees connections come and go, and a
message counts only once it left every queue (see :class:`_Ledger`); what was still queued
when the connection dropped or the final flush ran out is reported as ``unconfirmed``.

:func:`send_files` sends several inputs at once (one reader thread each, crystals interleaved
as they come), tails growing CrystFEL streams (``follow``, see :mod:`streamvi.producers.follow`) and
records in a position file what was sent, so that a restart sends nothing twice.
"""
from __future__ import annotations

import logging
import os
import queue
import stat
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import zmq
from zmq.utils.monitor import recv_monitor_message

from streamvi.errors import ConfigError
from streamvi.producers.follow import (
    STDIN,
    PositionFile,
    StreamFollower,
    StreamPosition,
    whole_file_positions,
)
from streamvi.ingest.ratelimit import RateLimitedLog
from streamvi.sources import Rejected, SourceItem, open_file, source_name_for
from streamvi.wire import DEFAULT_MAX_MESSAGE_BYTES, CrystalMessage, clip, encode_crystal

log = logging.getLogger(__name__)

SOCKET_TYPES = {"push": zmq.PUSH, "pub": zmq.PUB}

#: Messages a service may hold in its receive queue (its default ``rcvhwm``).  They are lost
#: with the service if it stops, so they count as in flight together with this sender's own
#: queue (``sndhwm``): a message is confirmed only once that many newer ones went out.
PEER_QUEUE_MESSAGES = 1000
#: After a stop request (Ctrl-C, SIGTERM), the longest wait for queued messages to leave, s
#: (``timeout_s`` when that is shorter).
STOP_FLUSH_S = 5.0
#: A blocked send looks at the stop request, its deadline and the connection this often, s.
_SLICE_S = 0.1
#: A send blocked this long says so in the log (rate-limited), s.
_WAIT_NOTICE_S = 1.0
#: Monitor events the sender follows.
_EVENTS = (zmq.EVENT_CONNECT_RETRIED | zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_DISCONNECTED
           | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
           | zmq.EVENT_HANDSHAKE_FAILED_AUTH | zmq.EVENT_MONITOR_STOPPED)

_notices = RateLimitedLog(log, burst=10, interval_s=30.0)


@dataclass
class SendReport:
    """What :func:`send_messages` did.

    Attributes
    ----------
    sent
        Messages a service confirmedly took: handed to a connected service, and either
        flushed to it at the end or followed by enough newer ones that they left every
        queue (:data:`PEER_QUEUE_MESSAGES`).
    rejected
        Items not sent: :class:`~streamvi.sources.Rejected` records from the source, and
        crystals that could not be encoded.
    seconds
        Wall time, s, including the final flush.
    bytes_sent
        Payload bytes handed to ZeroMQ.
    images
        Distinct consecutive (run, image) pairs handed over (the unit of ``rate``).
    unconfirmed
        Messages handed to ZeroMQ whose arrival is in doubt: the connection dropped while
        they may have been queued, or the final flush did not finish.  Send them again
        (a position file keeps them unsent; the service drops duplicates).
    stopped
        A stop request (``stop_event``) ended the run.
    by_file
        :func:`send_files` only: ``{input: {"sent": n, "unconfirmed": u, "rejected": m}}``
        for this run.
    """

    sent: int
    rejected: int
    seconds: float
    bytes_sent: int = 0
    images: int = 0
    unconfirmed: int = 0
    stopped: bool = False
    by_file: dict[str, dict[str, int]] = field(default_factory=dict)

    @property
    def messages_per_s(self) -> float:
        return self.sent / self.seconds if self.seconds > 0 else 0.0


class SendTimeout(TimeoutError):
    """The service took nothing for ``timeout_s``; :attr:`report` says what went out first."""

    def __init__(self, message: str, report: SendReport):
        super().__init__(message)
        self.report = report


def _log_rejected(item: Rejected) -> None:
    _notices.log(logging.WARNING, f"rejected:{item.reason}", "send: not sent: %s",
                 clip(item, 1000))


class _Ledger:
    """Which of the messages handed to ZeroMQ may honestly be called sent.

    Messages are numbered in the order they were handed over.  The newest ``window`` may
    still sit in this sender's queue or in the service's receive queue; older ones have left
    both.  A dropped connection, or a final flush that did not finish, puts the window in
    doubt for good: the count of confirmed messages stays where it was for the rest of the
    run (nothing after a gap can be confirmed without the messages in it).

    Items of the source (crystals and the records not sent) are numbered too, from 1, so
    that a position file can be saved up to the last item before the first message in doubt.
    """

    def __init__(self, window: int):
        self.window = max(0, int(window))
        self.handed = 0
        self.processed = 0               # items of the source dealt with (handed or refused)
        self.frozen = False
        self._confirmed = 0
        self._settled = 0
        #: (message number, item number) of the messages not yet confirmed
        self._open: deque[tuple[int, int]] = deque()

    def refused(self) -> None:
        """An item of the source was not sent (a record, an unencodable crystal)."""
        self.processed += 1
        self._advance()

    def handed_one(self) -> None:
        """The next item was handed to ZeroMQ while a service was connected."""
        self.processed += 1
        if not self.frozen:
            self._open.append((self.handed, self.processed))
        self.handed += 1
        self._advance()

    def drop(self) -> None:
        """The connection dropped: the newest ``window`` messages are in doubt for good."""
        if not self.frozen:
            self._confirm(max(0, self.handed - self.window))
            self.frozen = True

    def finish(self, *, flushed: bool) -> None:
        """The socket is closed: every message is confirmed if it all left, else the window
        stays in doubt."""
        if flushed:
            self._confirm(self.handed)
        else:
            self.drop()
        self.frozen = True

    def _advance(self) -> None:
        if not self.frozen:
            self._confirm(max(0, self.handed - self.window))

    def _confirm(self, n: int) -> None:
        if self.frozen:
            return
        self._confirmed = max(self._confirmed, n)
        while self._open and self._open[0][0] < self._confirmed:
            self._open.popleft()
        self._settled = self._open[0][1] - 1 if self._open else self.processed

    @property
    def confirmed(self) -> int:
        """Messages confirmed sent."""
        return self._confirmed

    @property
    def settled(self) -> int:
        """Leading items of the source whose fate is known (confirmed sent, or refused)."""
        return self._settled


class _Link:
    """A socket to the service that knows whether a service is there (a socket monitor).

    A PUSH socket is set ``ZMQ_IMMEDIATE``: with no service connected a send waits (in
    slices, so that a stop request or a deadline ends it) instead of queueing messages for
    a peer that may never come.  A PUB socket drops what no subscriber takes, by design;
    it is not monitored and its messages count as sent when handed over.
    """

    def __init__(self, ctx: zmq.Context, url: str, socket_type: str, *, sndhwm: int,
                 bind: bool, curve_server_public: bytes | str | None,
                 curve_client_secret: bytes | str | None):
        self.url = url
        self.checked = socket_type == "push"
        self.sock = ctx.socket(SOCKET_TYPES[socket_type])
        self.monitor: zmq.Socket | None = None
        self.peers = 0                  # connections whose handshake succeeded, still up
        self.ever_connected = False
        self.drops = 0                  # connections lost after their handshake
        self.problem = ""               # why no service is connected, as far as known
        self.closed_cleanly = True      # False: closed while messages still lingered
        try:
            self.sock.setsockopt(zmq.SNDHWM, int(sndhwm))
            self.sock.setsockopt(zmq.LINGER, 0)
            if self.checked:
                self.sock.setsockopt(zmq.IMMEDIATE, 1)
                self.monitor = self.sock.get_monitor_socket(_EVENTS)
            if curve_server_public is not None or curve_client_secret is not None:
                _setup_curve_client(self.sock, curve_server_public, curve_client_secret)
            try:
                if bind:
                    self.sock.bind(url)
                else:
                    self.sock.connect(url)
            except zmq.ZMQError as exc:
                raise ConfigError(f"send: cannot {'bind' if bind else 'connect to'} {url}: "
                                  f"{exc}; give an address like tcp://127.0.0.1:5555") from exc
        except BaseException:
            self._close_monitor()
            self.sock.close(linger=0)
            raise
        self.poller = zmq.Poller()
        self.poller.register(self.sock, zmq.POLLOUT)
        if self.monitor is not None:
            self.poller.register(self.monitor, zmq.POLLIN)

    # ------------------------------------------------------------------ the monitor

    def poll_events(self) -> bool:
        """Take the monitor's pending events; True once it reports the socket closed."""
        if self.monitor is None:
            return False
        while True:
            try:
                event = recv_monitor_message(self.monitor, zmq.NOBLOCK)
            except zmq.Again:
                return False
            if self._on_event(event["event"]):
                return True

    def _on_event(self, code: int) -> bool:
        if code == zmq.EVENT_HANDSHAKE_SUCCEEDED:
            self.peers += 1
            self.ever_connected = True
            self.problem = ""
        elif code == zmq.EVENT_DISCONNECTED:
            if self.peers > 0:          # a connection that carried messages, not a refusal
                self.peers -= 1
                self.drops += 1
                self.problem = "the connection dropped"
        elif code == zmq.EVENT_CONNECT_RETRIED:
            if not self.problem:
                self.problem = "nothing listens there"
        elif code == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
            self.problem = ("the service refused this producer's CURVE key: add its public "
                            "key to the service's curve_allowed_clients")
        elif code in (zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL, zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL):
            self.problem = ("the ZeroMQ handshake failed: CURVE on one side only, or the "
                            "wrong server key?")
        return code == zmq.EVENT_MONITOR_STOPPED

    def why_waiting(self) -> str:
        """One phrase: why a send waits."""
        if self.peers > 0:
            return "connected, but it takes nothing at the moment (its queue is full)"
        return self.problem or "no service has answered yet"

    # ------------------------------------------------------------------ sending

    def send(self, payload: bytes, *, timeout_s: float | None,
             stop_event: threading.Event | None) -> str:
        """Hand one message over; ``"sent"``, ``"stopped"`` or ``"timeout"``."""
        start = time.monotonic()
        deadline = None if timeout_s is None else start + timeout_s
        noticed = False
        while True:
            self.poll_events()
            try:
                self.sock.send(payload, zmq.NOBLOCK)
                return "sent"
            except zmq.Again:
                pass
            if stop_event is not None and stop_event.is_set():
                return "stopped"
            now = time.monotonic()
            if deadline is not None and now >= deadline:
                return "timeout"
            if not noticed and now - start >= _WAIT_NOTICE_S:
                noticed = True
                _notices.log(logging.INFO, "waiting", "send: waiting for the service at %s "
                             "(%s); Ctrl-C stops, what was sent is kept", self.url,
                             self.why_waiting())
            wait = _SLICE_S if deadline is None else min(_SLICE_S, deadline - now)
            self.poller.poll(max(1, int(wait * 1000)))

    def close(self, linger_s: float | None, stop_event: threading.Event | None) -> bool:
        """Close the socket, waiting up to ``linger_s`` (None: for ever, until a stop
        request) for queued messages to leave.  True if they all left to a connected
        service; False if the wait ran out, was stopped, or the connection dropped."""
        if self.monitor is None:
            self.sock.close(linger=-1 if linger_s is None else int(linger_s * 1000))
            return True
        self.poll_events()
        drops = self.drops
        t0 = time.monotonic()
        self.sock.close(linger=-1 if linger_s is None else int(linger_s * 1000))
        # The monitor says "stopped" once the socket is gone: when its queue has left, or
        # when the linger ran out.  Only the first is a flush.
        grace = None if linger_s is None else t0 + linger_s + 2.0
        closed = False
        while not closed:
            if self.monitor.poll(int(_SLICE_S * 1000)):
                closed = self.poll_events()
                continue
            if grace is not None and time.monotonic() > grace:
                break
            if linger_s is None and stop_event is not None and stop_event.is_set():
                break
        elapsed = time.monotonic() - t0
        self._close_monitor()
        self.closed_cleanly = closed
        return (closed and self.drops == drops
                and (linger_s is None or linger_s > 0 and elapsed < linger_s))

    def _close_monitor(self) -> None:
        if self.monitor is not None:
            self.monitor.close(linger=0)
            self.monitor = None


def send_messages(items: Iterable[SourceItem], url: str, *, rate: float | None = None,
                  sndhwm: int = 1000, timeout_s: float | None = None,
                  socket_type: str = "push", bind: bool | None = None,
                  on_rejected: Callable[[Rejected], None] | None = None,
                  context: zmq.Context | None = None,
                  curve_server_public: bytes | str | None = None,
                  curve_client_secret: bytes | str | None = None,
                  stop_event: threading.Event | None = None,
                  on_settled: Callable[[int, bool], None] | None = None,
                  max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> SendReport:
    """Encode and send every crystal of ``items``.

    A message counts as sent only when a service took it: with no service connected a send
    waits (up to ``timeout_s``) instead of queueing it for a peer that may never come, and
    the messages still queued when the connection drops or the final flush runs out count as
    ``unconfirmed``, not sent.

    Parameters
    ----------
    items
        Crystals and :class:`~streamvi.sources.Rejected` records (a source).
    url
        The service's endpoint, e.g. ``tcp://127.0.0.1:5555``.
    rate
        Images per second (crystals of one image go together); None sends as fast as the
        service takes them.  Paced on a fixed monotonic schedule, so sleeps do not drift.
    sndhwm
        ZeroMQ send high-water mark, messages.
    timeout_s
        Longest a single send may wait for the service, s (None: as long as it needs); also
        bounds the final flush.
    socket_type
        ``"push"`` (lossless, default, connects) or ``"pub"`` (binds; subscribers that
        are not connected yet, or fall behind, miss messages; nothing is confirmed).
    bind
        Override the default of the socket type.
    on_rejected
        Called with each item not sent; default logs a warning (rate-limited).
    context
        ZeroMQ context; by default a private one.
    curve_server_public, curve_client_secret
        z85 CURVE keys, when the service requires CURVE.
    stop_event
        Set it to stop: a waiting send gives up within 0.1 s, queued messages get at most
        :data:`STOP_FLUSH_S` (or ``timeout_s``) to leave.
    on_settled
        Called as ``on_settled(n, final)`` whenever the first ``n`` items of ``items`` are
        settled (confirmed sent, or not sent on purpose), and once more at the end with
        ``final=True``; ``final`` is also True from the moment nothing more can settle in
        this run (after a dropped connection).
    max_message_bytes
        Crystals that encode to more are not sent (reason ``too_large``): the service
        refuses such a frame unread and drops the connection, losing what was queued
        behind it.  Match the service's ``max_message_bytes``.

    Returns
    -------
    SendReport

    Raises
    ------
    SendTimeout
        (a :class:`TimeoutError`) The service took nothing for ``timeout_s``: no service
        at ``url``, or one that stays full.  Its ``report`` says what was sent before.
    ConfigError
        Bad arguments or an unusable URL.
    """
    if socket_type not in SOCKET_TYPES:
        raise ConfigError(f"send: socket_type={socket_type!r}; use 'push' or 'pub'")
    if rate is not None and not rate > 0:
        raise ConfigError(f"send: rate={rate!r} images/s must be > 0 (or None for no limit)")
    if timeout_s is not None and not timeout_s > 0:
        raise ConfigError(f"send: timeout_s={timeout_s!r} must be > 0 seconds (or None to wait)")
    report_rejected = on_rejected or _log_rejected
    own_context = context is None
    ctx = zmq.Context() if context is None else context
    ledger = _Ledger(int(sndhwm) + PEER_QUEUE_MESSAGES)
    try:
        link = _Link(ctx, url, socket_type, sndhwm=sndhwm,
                     bind=(socket_type == "pub") if bind is None else bool(bind),
                     curve_server_public=curve_server_public,
                     curve_client_secret=curve_client_secret)
    except BaseException:
        if own_context:
            ctx.term()
        raise
    rejected = nbytes = images = 0
    stopped = False
    failure: str | None = None
    settled = (0, False)

    def tell(final: bool = False) -> None:
        nonlocal settled
        now = (ledger.settled, final or ledger.frozen)
        if on_settled is not None and now != settled:
            settled = now
            on_settled(*now)

    def refuse(record: Rejected) -> None:
        nonlocal rejected
        rejected += 1
        ledger.refused()
        report_rejected(record)
        tell()

    t0 = time.monotonic()
    linger: float | None = timeout_s
    try:
        last_image: tuple[str, str] | None = None
        for i, item in enumerate(items):
            if stop_event is not None and stop_event.is_set():
                stopped = True
                break
            if isinstance(item, Rejected):
                refuse(item)
                continue
            where = f"item {i} (run {clip(repr(item.run))}, image {clip(repr(item.image))})"
            try:
                payload = encode_crystal(item)
            except (TypeError, ValueError, OverflowError) as exc:
                refuse(Rejected(source="send", position=where, reason="unencodable",
                                detail=str(exc)))
                continue
            if len(payload) > max_message_bytes:
                refuse(Rejected(source="send", position=where, reason="too_large",
                                detail=f"encodes to {len(payload):,} bytes, over the "
                                f"service's max_message_bytes ({max_message_bytes:,}); the "
                                "service would drop the connection: not sent"))
                continue
            image = (item.run, item.image)
            if image != last_image:
                if rate is not None:
                    delay = t0 + images / rate - time.monotonic()
                    if delay > 0 and _sleep(delay, stop_event):
                        stopped = True
                        break
                images += 1
                last_image = image
            outcome = link.send(payload, timeout_s=timeout_s, stop_event=stop_event)
            _note_drops(link, ledger)
            if outcome == "stopped":
                stopped = True
                break
            if outcome == "timeout":
                failure = _timeout_message(link, url, timeout_s, ledger.handed)
                break
            ledger.handed_one()
            nbytes += len(payload)
            tell()
    except BaseException:
        linger = 0.0 if timeout_s is None else min(timeout_s, STOP_FLUSH_S)
        raise
    finally:
        if failure is not None:
            linger = 0.0             # the service took nothing for timeout_s: do not wait more
        elif stopped:
            linger = STOP_FLUSH_S if timeout_s is None else min(timeout_s, STOP_FLUSH_S)
        flushed = link.close(linger, stop_event)
        _note_drops(link, ledger)
        ledger.finish(flushed=flushed or ledger.handed == 0)
        tell(final=True)
        if own_context:
            if link.closed_cleanly:
                ctx.term()
            else:
                # the socket still lingers on a service that takes nothing; let it go in the
                # background rather than hold the caller (a stop request must end promptly)
                threading.Thread(target=ctx.term, name="streamvi-send-linger",
                                 daemon=True).start()
    report = SendReport(sent=ledger.confirmed, rejected=rejected,
                        seconds=time.monotonic() - t0, bytes_sent=nbytes, images=images,
                        unconfirmed=ledger.handed - ledger.confirmed, stopped=stopped)
    if report.unconfirmed and failure is None:
        log.warning("send: %d of %d messages handed to %s are not confirmed (%s); they count "
                    "as not sent: send them again (a position file keeps them; the service "
                    "drops duplicates)", report.unconfirmed, ledger.handed, url,
                    "the connection dropped" if link.drops else "the flush did not finish")
    if failure is not None:
        raise SendTimeout(failure, report)
    return report


def _sleep(seconds: float, stop_event: threading.Event | None) -> bool:
    """Sleep; True if a stop request came first."""
    if stop_event is None:
        time.sleep(seconds)
        return False
    return stop_event.wait(seconds)


def _note_drops(link: _Link, ledger: _Ledger) -> None:
    """Put the window in doubt (once) when the service's connection dropped."""
    if link.drops and not ledger.frozen:
        ledger.drop()
        log.warning("send: the connection to %s dropped after %d messages (the service "
                    "stopped or restarted?); up to the last %d of them may have been lost "
                    "with its queues: they count as unconfirmed from now on, and a position "
                    "file keeps them for the next run (the service drops duplicates)",
                    link.url, ledger.handed, min(ledger.handed, ledger.window))


def _setup_curve_client(sock: zmq.Socket, server_public: bytes | str | None,
                        client_secret: bytes | str | None) -> None:
    if server_public is None or client_secret is None:
        raise ConfigError("send: CURVE needs both the service's public key "
                          "(curve_server_public) and this producer's secret key "
                          "(curve_client_secret)")
    if isinstance(server_public, str):
        server_public = server_public.encode("ascii")
    if isinstance(client_secret, str):
        client_secret = client_secret.encode("ascii")
    sock.curve_serverkey = server_public
    sock.curve_secretkey = client_secret
    sock.curve_publickey = zmq.curve_public(client_secret)


def _timeout_message(link: _Link, url: str, timeout_s: float | None, handed: int) -> str:
    """One line for a send that waited ``timeout_s`` in vain, naming the URL and the cause."""
    t = f"{timeout_s:g}" if timeout_s is not None else "?"
    if not link.ever_connected:
        return (f"send: no service took anything at {url} within {t} s "
                f"({link.why_waiting()}); nothing was sent: start `streamvi serve` there "
                "(or fix --to) and run the same command again")
    return (f"send: {url} took nothing for {t} s after {handed} messages "
            f"({link.why_waiting()}); is streamvi serve running and reading? (a full "
            "service queue holds producers back; raise --timeout to wait longer)")


#: Suffixes of growing CrystFEL streams: tailed with ``follow``, resumed by byte offset.
#: Named pipes and standard input are read as CrystFEL streams whatever their name.
STREAM_SUFFIXES = (".stream",)
#: Shortest time between two writes of the position file, s.
POSITION_SAVE_INTERVAL_S = 0.2


def open_file_source(path: str | os.PathLike[str]) -> Iterable[SourceItem]:
    """The source plugin that reads ``path``, chosen by its suffix (found through the
    entry points, :func:`streamvi.sources.open_file`).

    Raises
    ------
    ConfigError
        No such file, an unknown suffix, or the plugin is not installed.
    """
    try:
        return open_file(path)
    except ConfigError as exc:
        raise ConfigError(f"send: {exc}") from exc.__cause__


def send_file(path: str | os.PathLike[str], url: str, *, rate: float | None = None,
              follow: bool = False, position_file: str | os.PathLike[str] | None = None,
              **kwargs: Any) -> SendReport:
    """Send every crystal of a file (CrystFEL stream, DIALS ``.refl``) to ``url``.

    Parameters
    ----------
    path
        The file (or a named pipe, or ``"-"`` for standard input).
    url, rate, kwargs
        As for :func:`send_messages` (and :func:`send_files` when following).
    follow, position_file
        Tail a growing stream; resume where the last run stopped (see :func:`send_files`).
    """
    if follow or position_file is not None or os.fspath(path) == STDIN:
        return send_files([path], url, rate=rate, follow=follow, position_file=position_file,
                          **kwargs)
    return send_messages(open_file_source(path), url, rate=rate, **kwargs)


@dataclass
class _Input:
    """One input of :func:`send_files` and what became of it."""

    name: str                          # as given
    key: str                           # entry name in the position file
    items: Callable[[threading.Event], Iterator[tuple[SourceItem | None, Any]]]
    sent_before: int = 0               # crystals sent in earlier runs (position file)
    sent: int = 0                      # handed on in this run
    rejected: int = 0
    durable_sent: int = 0              # of ``sent``, those the saved position covers
    durable: dict[str, Any] | None = None
    position: int = 0                  # index of the path among those given


def _input_kind(path: str, follow: bool) -> str:
    """``"stream"`` (tailed by :class:`StreamFollower`) or ``"whole"`` (read by its plugin)."""
    if path == STDIN:
        return "stream"
    suffix = Path(path).suffix
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        if follow and suffix in STREAM_SUFFIXES:
            return "stream"      # indexamajig may not have created it yet
        raise ConfigError(f"send: {path}: no such file (with --follow a .stream file is "
                          "waited for)") from None
    if stat.S_ISFIFO(mode):
        return "stream"
    try:
        source_name_for(path)
    except ConfigError as exc:
        raise ConfigError(f"send: {exc}") from None
    return "stream" if suffix in STREAM_SUFFIXES else "whole"


def _make_inputs(paths: Sequence[str | os.PathLike[str]], positions: PositionFile | None, *,
                 follow: bool, run: str | None, poll_s: float,
                 idle_timeout_s: float | None) -> list[_Input]:
    inputs: list[_Input] = []
    seen: set[str] = set()
    for position, p in enumerate(paths):
        name = os.fspath(p)
        kind = _input_kind(name, follow)
        if kind == "stream":
            key = name if name == STDIN else PositionFile.key(name)
            saved = positions.get(key) if positions is not None and name != STDIN else None
            start = StreamPosition.from_json(saved) if saved else None

            def items(halt: threading.Event, name=name, start=start):
                return iter(StreamFollower(name, run=run, start=start, follow=follow,
                                           poll_s=poll_s, idle_timeout_s=idle_timeout_s,
                                           stop_event=halt))
        else:
            source = open_file_source(name)
            files = [getattr(source, "refl_path", name), getattr(source, "expt_path", None)]
            files = [f for f in files if f is not None]
            key = PositionFile.key(files[0])   # a .refl and its .expt are one input
            saved = positions.get(key) if positions is not None else None
            if run is not None and hasattr(source, "run"):
                source.run = run
            if follow:
                log.info("send: %s is a finished file; it is sent once (--follow tails "
                         "CrystFEL streams only)", name)

            def items(halt: threading.Event, source=source, files=files, saved=saved,
                      name=name):
                return whole_file_positions(source, files, saved, source=name)
        if key in seen:
            log.warning("send: %s is given twice (or as both .refl and .expt); sent once", name)
            continue
        seen.add(key)
        inputs.append(_Input(name=name, key=key, items=items,
                             sent_before=int(saved.get("sent", 0)) if saved else 0,
                             position=position))
    return inputs


_END = object()


class _Merger:
    """Reader threads feeding one queue; what was sent, and the position file.

    A position becomes durable (written to the position file) only once the sending side
    reports every item up to it settled (:class:`_Ledger`: confirmed sent, or not sent on
    purpose).  A sender killed outright resends what it had not confirmed after its restart
    (the service counts those as duplicates) rather than losing it; after a clean stop every
    position a service took is durable, so nothing is sent twice.
    """

    def __init__(self, inputs: list[_Input], positions: PositionFile | None, *,
                 poll_s: float, stop_event: threading.Event | None, queue_size: int = 256,
                 label: Callable[[CrystalMessage, int], None] | None = None):
        self.inputs = inputs
        #: sets each crystal's fields from its input's index before it is sent (conditions)
        self.label = label
        self.positions = positions
        self.poll_s = poll_s
        self.stop_event = stop_event
        self.halt = threading.Event()
        self.queue: queue.Queue = queue.Queue(maxsize=queue_size)
        self.errors: list[tuple[str, BaseException]] = []
        #: (input index, position entry or None, is a crystal, item number) not yet settled
        self._window: deque[tuple[int, dict[str, Any] | None, bool, int]] = deque()
        self._yielded = 0
        self._settled = 0
        self._final = False
        self._dirty = False
        self._last_save = 0.0
        self.threads = [threading.Thread(target=self._read, args=(i,), daemon=True,
                                         name=f"streamvi-send-{i}")
                        for i in range(len(inputs))]

    def start(self) -> None:
        for t in self.threads:
            t.start()

    def stop(self, *, timeout: float = 10.0) -> None:
        self.halt.set()
        deadline = time.monotonic() + timeout
        for t in self.threads:
            t.join(max(0.0, deadline - time.monotonic()))

    # ------------------------------------------------------------------ readers

    def _put(self, entry: tuple) -> bool:
        while not self.halt.is_set():
            try:
                self.queue.put(entry, timeout=self.poll_s)
                return True
            except queue.Full:
                continue
        return False

    def _read(self, index: int) -> None:
        inp = self.inputs[index]
        try:
            for item, where in inp.items(self.halt):
                if not self._put((index, item, where)):
                    return
        except BaseException as exc:  # handed to the sending thread, which raises it
            self.errors.append((inp.name, exc))
        finally:
            self._put((index, _END, None))

    # ------------------------------------------------------------------ the sending side

    def items(self) -> Iterator[SourceItem]:
        """Every input's items as they come, in the order :meth:`settle` counts them."""
        running = len(self.inputs)
        while running and not self.errors:
            if self.stop_event is not None and self.stop_event.is_set():
                break
            try:
                index, item, where = self.queue.get(timeout=self.poll_s)
            except queue.Empty:
                self._save(idle=True)
                continue
            if item is _END:
                running -= 1
                continue
            inp = self.inputs[index]
            is_crystal = isinstance(item, CrystalMessage)
            if item is not None:
                if is_crystal and self.label is not None:
                    self.label(item, inp.position)
                yield item
                # send_messages asks for the next item only once this one was dealt with
                self._yielded += 1
                if is_crystal:
                    inp.sent += 1
                else:
                    inp.rejected += 1
            self._advance(index, where, is_crystal and item is not None)
            self._save(idle=self.queue.empty())
        if self.errors:
            name, exc = self.errors[0]
            if isinstance(exc, ConfigError):
                raise exc
            raise ConfigError(f"send: reading {name} failed: {exc}") from exc

    def _advance(self, index: int, where: Any, is_crystal: bool) -> None:
        if isinstance(where, StreamPosition):
            where = where.to_json() if where.resumable else None
        if self._final:
            return     # nothing more settles in this run: no need to remember positions
        self._window.append((index, where, is_crystal, self._yielded))
        self._make_durable()

    def settle(self, n_items: int, final: bool) -> None:
        """The first ``n_items`` items yielded are settled (``send_messages``' callback);
        ``final``: no more will be in this run."""
        self._settled = max(self._settled, n_items)
        self._make_durable()
        if final:
            self._final = True
            self._window.clear()

    def _make_durable(self) -> None:
        while self._window and self._window[0][3] <= self._settled:
            index, where, is_crystal, _ = self._window.popleft()
            inp = self.inputs[index]
            if where is not None:
                inp.durable = where
                self._dirty = True
            inp.durable_sent += is_crystal

    def finish(self) -> None:
        """Stop the readers; save the positions that settled."""
        self.stop()
        self._save(force=True)

    def _save(self, *, idle: bool = False, force: bool = False) -> None:
        if self.positions is None or not self._dirty:
            return
        now = time.monotonic()
        since = now - self._last_save
        # after each batch (the queue ran dry), and at least every second in a steady flow
        if not force and not (idle and since >= POSITION_SAVE_INTERVAL_S) and since < 1.0:
            return
        for inp in self.inputs:
            if inp.durable is not None:
                self.positions.set(inp.key, {**inp.durable,
                                              "sent": inp.sent_before + inp.durable_sent})
        self.positions.save()
        self._dirty = False
        self._last_save = now


def send_files(paths: Sequence[str | os.PathLike[str]], url: str, *, follow: bool = False,
               position_file: str | os.PathLike[str] | None = None, rate: float | None = None,
               run: str | None = None, poll_s: float = 0.1, idle_timeout_s: float | None = None,
               stop_event: threading.Event | None = None,
               label: Callable[[CrystalMessage, int], None] | None = None,
               **kwargs: Any) -> SendReport:
    """Send the crystals of several inputs at once, tailing streams that grow.

    Parameters
    ----------
    paths
        CrystFEL streams (``.stream``, named pipes, ``"-"`` for standard input) and DIALS
        files (``.refl`` or ``.expt``, the pair read together); one reader thread each, their
        crystals interleaved as they come.
    url, rate, kwargs
        As for :func:`send_messages` (``sndhwm``, ``timeout_s``, CURVE keys, …).
    follow
        Keep reading streams as they grow, until ``stop_event`` is set or every input has
        been idle for ``idle_timeout_s``; truncated or replaced files are read again from
        their start.  Without it each input is read to its current end.  Pipes are read until
        their writer closes them either way; DIALS files are finished files, read once.
    position_file
        JSON file of where each input stands (see :class:`~streamvi.producers.follow.PositionFile`):
        read at the start to resume after the last crystal sent, written (atomically) after
        each batch sent and at the end.  Pipes are not recorded.
    run
        Run name of every message; default: each file's name without its suffix.  Give
        several indexamajig instances' streams of one run the same name.
    poll_s
        Wait at the end of a growing file between polls, s.
    idle_timeout_s
        With ``follow``: stop following a stream after this many seconds without new bytes.
    label
        ``label(msg, i)`` is called on every crystal of input ``i`` (``paths[i]``) before
        it is sent, e.g. to set its pump–probe ``condition``
        (:func:`streamvi.producers.conditions.condition_labeller`).
    stop_event
        Set it to stop (within ``poll_s``, or 0.1 s when a send waits for the service);
        queued messages get up to :data:`STOP_FLUSH_S` to leave, and what the service took
        is then saved exactly.

    Returns
    -------
    SendReport
        With ``by_file``; crystals handed over but not confirmed (``unconfirmed``) are not
        recorded as sent in the position file.

    Raises
    ------
    ConfigError
        A missing input (unless followed), an unknown file type, an unusable position file.
    SendTimeout
        As for :func:`send_messages` (its ``report`` has ``by_file``); the position file
        holds what was confirmed sent.
    """
    if not paths:
        raise ConfigError("send: no input given; name stream files, .refl files, named pipes "
                          "or '-' for standard input")
    if sum(os.fspath(p) == STDIN for p in paths) > 1:
        raise ConfigError("send: '-' (standard input) is given more than once")
    if not poll_s > 0:
        raise ConfigError(f"send: poll_s={poll_s!r} must be > 0 seconds")
    if idle_timeout_s is not None and not idle_timeout_s >= 0:
        raise ConfigError(f"send: idle_timeout_s={idle_timeout_s!r} must be >= 0 seconds (or "
                          "None to follow until stopped)")
    positions = PositionFile(position_file) if position_file is not None else None
    inputs = _make_inputs(paths, positions, follow=follow, run=run, poll_s=poll_s,
                          idle_timeout_s=idle_timeout_s)
    merger = _Merger(inputs, positions, poll_s=poll_s, stop_event=stop_event, label=label)
    merger.start()
    try:
        report = send_messages(merger.items(), url, rate=rate, stop_event=stop_event,
                               on_settled=merger.settle, **kwargs)
    except SendTimeout as exc:
        exc.report.by_file = _by_file(inputs)
        raise
    finally:
        merger.finish()
    report.by_file = _by_file(inputs)
    return report


def _by_file(inputs: list[_Input]) -> dict[str, dict[str, int]]:
    """Per input: crystals confirmed sent, handed over but unconfirmed, records not sent."""
    return {inp.name: {"sent": inp.durable_sent, "unconfirmed": inp.sent - inp.durable_sent,
                       "rejected": inp.rejected} for inp in inputs}
