"""The producer side: send crystals to a running ``streamvi serve`` over ZeroMQ.

Depends on :mod:`streamvi.wire` and zmq only, so it runs wherever the data are (next to
indexamajig, on a file server) without torch.

A PUSH socket connects to the service's PULL endpoint.  When the service's queue is full it
stops reading, and :func:`send_messages` blocks: that is backpressure working, not a fault.
``timeout_s`` turns a block longer than that into :class:`TimeoutError`.

:func:`send_files` sends several inputs at once (one reader thread each, crystals interleaved
as they come), tails growing CrystFEL streams (``follow``, see :mod:`streamvi.follow`) and
records in a position file what was sent, so that a restart sends nothing twice.
"""
from __future__ import annotations

import importlib
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

from streamvi.errors import ConfigError
from streamvi.follow import (
    STDIN,
    PositionFile,
    StreamFollower,
    StreamPosition,
    whole_file_positions,
)
from streamvi.sources import Rejected, SourceItem
from streamvi.wire import CrystalMessage, encode_crystal

log = logging.getLogger(__name__)

SOCKET_TYPES = {"push": zmq.PUSH, "pub": zmq.PUB}


@dataclass
class SendReport:
    """What :func:`send_messages` did.

    Attributes
    ----------
    sent
        Messages handed to ZeroMQ (and delivered, unless the peer vanished).
    rejected
        Items not sent: :class:`~streamvi.sources.Rejected` records from the source, and
        crystals that could not be encoded.
    seconds
        Wall time, s, including the final flush.
    bytes_sent
        Payload bytes.
    images
        Distinct consecutive (run, image) pairs sent (the unit of ``rate``).
    by_file
        :func:`send_files` only: ``{input: {"sent": n, "rejected": m}}`` for this run.
    """

    sent: int
    rejected: int
    seconds: float
    bytes_sent: int = 0
    images: int = 0
    by_file: dict[str, dict[str, int]] = field(default_factory=dict)

    @property
    def messages_per_s(self) -> float:
        return self.sent / self.seconds if self.seconds > 0 else 0.0


def _log_rejected(item: Rejected) -> None:
    log.warning("send: not sent: %s", item)


def send_messages(items: Iterable[SourceItem], url: str, *, rate: float | None = None,
                  sndhwm: int = 1000, timeout_s: float | None = None,
                  socket_type: str = "push", bind: bool | None = None,
                  on_rejected: Callable[[Rejected], None] | None = None,
                  context: zmq.Context | None = None,
                  curve_server_public: bytes | str | None = None,
                  curve_client_secret: bytes | str | None = None) -> SendReport:
    """Encode and send every crystal of ``items``.

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
        Longest a single send may block, s (None: wait as long as the service needs);
        also bounds the final flush.
    socket_type
        ``"push"`` (lossless, default, connects) or ``"pub"`` (binds; subscribers that
        are not connected yet, or fall behind, miss messages).
    bind
        Override the default of the socket type.
    on_rejected
        Called with each item not sent; default logs a warning.
    context
        ZeroMQ context; by default a private one.
    curve_server_public, curve_client_secret
        z85 CURVE keys, when the service requires CURVE.

    Returns
    -------
    SendReport

    Raises
    ------
    TimeoutError
        A send blocked longer than ``timeout_s``.
    ConfigError
        Bad arguments or an unusable URL.
    """
    if socket_type not in SOCKET_TYPES:
        raise ConfigError(f"send: socket_type={socket_type!r}; use 'push' or 'pub'")
    if rate is not None and not rate > 0:
        raise ConfigError(f"send: rate={rate!r} images/s must be > 0 (or None for no limit)")
    report_rejected = on_rejected or _log_rejected
    own_context = context is None
    ctx = zmq.Context() if context is None else context
    sock = ctx.socket(SOCKET_TYPES[socket_type])
    sent = rejected = nbytes = images = 0
    t0 = time.monotonic()
    try:
        sock.setsockopt(zmq.SNDHWM, int(sndhwm))
        sock.setsockopt(zmq.LINGER, -1 if timeout_s is None else int(timeout_s * 1000))
        if timeout_s is not None:
            sock.setsockopt(zmq.SNDTIMEO, int(timeout_s * 1000))
        if curve_server_public is not None or curve_client_secret is not None:
            _setup_curve_client(sock, curve_server_public, curve_client_secret)
        do_bind = (socket_type == "pub") if bind is None else bind
        try:
            if do_bind:
                sock.bind(url)
            else:
                sock.connect(url)
        except zmq.ZMQError as exc:
            raise ConfigError(f"send: cannot {'bind' if do_bind else 'connect to'} {url}: "
                              f"{exc}; give an address like tcp://127.0.0.1:5555") from exc
        last_image: tuple[str, str] | None = None
        for i, item in enumerate(items):
            if isinstance(item, Rejected):
                rejected += 1
                report_rejected(item)
                continue
            try:
                payload = encode_crystal(item)
            except (TypeError, ValueError, OverflowError) as exc:
                rejected += 1
                report_rejected(Rejected(source="send", position=f"item {i} "
                                         f"(run {item.run!r}, image {item.image!r})",
                                         reason="unencodable", detail=str(exc)))
                continue
            image = (item.run, item.image)
            if image != last_image:
                if rate is not None:
                    delay = t0 + images / rate - time.monotonic()
                    if delay > 0:
                        time.sleep(delay)
                images += 1
                last_image = image
            try:
                sock.send(payload)
            except zmq.Again:
                raise TimeoutError(
                    f"send: {url} took nothing for {timeout_s:g} s after {sent} messages; "
                    "is streamvi serve running and reading? (a full service queue holds "
                    "producers back; raise timeout_s to wait longer)") from None
            sent += 1
            nbytes += len(payload)
    finally:
        sock.close()
        if own_context:
            ctx.term()
    return SendReport(sent=sent, rejected=rejected, seconds=time.monotonic() - t0,
                      bytes_sent=nbytes, images=images)


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



#: File suffixes send_file knows, and the plugin (module, class) that reads them.
FILE_SOURCES = {".stream": ("streamvi_crystfel", "CrystfelSource"),
                ".refl": ("streamvi_dials", "DialsSource"),
                ".expt": ("streamvi_dials", "DialsSource")}
#: Suffixes of growing CrystFEL streams: tailed with ``follow``, resumed by byte offset.
#: Named pipes and standard input are read as CrystFEL streams whatever their name.
STREAM_SUFFIXES = (".stream",)
#: Shortest time between two writes of the position file, s.
POSITION_SAVE_INTERVAL_S = 0.2


def open_file_source(path: str | os.PathLike[str]) -> Iterable[SourceItem]:
    """The source plugin that reads ``path``, chosen by its suffix.

    Raises
    ------
    ConfigError
        No such file, an unknown suffix, or the plugin is not installed.
    """
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"send: {path}: no such file")
    if path.suffix not in FILE_SOURCES:
        raise ConfigError(f"send: {path}: unknown file type {path.suffix!r}; known: "
                          + ", ".join(FILE_SOURCES) + ", a named pipe, or '-' for standard "
                          "input (both read as CrystFEL streams)")
    module_name, class_name = FILE_SOURCES[path.suffix]
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(f"send: {path}: reading {path.suffix} files needs the plugin "
                          f"{module_name}, which is not installed ({exc})") from exc
    return getattr(module, class_name)(path)


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
    if suffix not in FILE_SOURCES:
        raise ConfigError(f"send: {path}: unknown file type {suffix!r}; known: "
                          + ", ".join(FILE_SOURCES) + ", a named pipe, or '-' for standard input")
    return "stream" if suffix in STREAM_SUFFIXES else "whole"


def _make_inputs(paths: Sequence[str | os.PathLike[str]], positions: PositionFile | None, *,
                 follow: bool, run: str | None, poll_s: float,
                 idle_timeout_s: float | None) -> list[_Input]:
    inputs: list[_Input] = []
    seen: set[str] = set()
    for p in paths:
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
                             sent_before=int(saved.get("sent", 0)) if saved else 0))
    return inputs


_END = object()


class _Merger:
    """Reader threads feeding one queue; what was sent, and the position file.

    Positions become durable (written to the position file) only ``lag`` crystals after they
    were handed to ZeroMQ, which may still hold that many unsent: a sender killed outright
    then sends those again after its restart (the service counts them as duplicates) rather
    than losing them.  After a clean stop every position is durable, so nothing is sent twice.
    """

    def __init__(self, inputs: list[_Input], positions: PositionFile | None, *, lag: int,
                 poll_s: float, stop_event: threading.Event | None, queue_size: int = 256):
        self.inputs = inputs
        self.positions = positions
        self.lag = max(0, int(lag))
        self.poll_s = poll_s
        self.stop_event = stop_event
        self.halt = threading.Event()
        self.queue: queue.Queue = queue.Queue(maxsize=queue_size)
        self.errors: list[tuple[str, BaseException]] = []
        self._window: deque[tuple[int, dict[str, Any], bool]] = deque()
        self._window_crystals = 0
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
        """Every input's items as they come; positions advance once an item is handed on."""
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
                yield item
                # send_messages asks for the next item only once this one left
                if is_crystal:
                    inp.sent += 1
                else:
                    inp.rejected += 1
            self._advance(index, where, is_crystal)
            self._save(idle=self.queue.empty())
        if self.errors:
            name, exc = self.errors[0]
            if isinstance(exc, ConfigError):
                raise exc
            raise ConfigError(f"send: reading {name} failed: {exc}") from exc

    def _advance(self, index: int, where: Any, is_crystal: bool) -> None:
        if isinstance(where, StreamPosition):
            if not where.resumable:
                return
            where = where.to_json()
        if where is None:
            return
        self._window.append((index, where, is_crystal))
        self._window_crystals += is_crystal
        while self._window and self._window_crystals > self.lag:
            self._make_durable(*self._window.popleft())

    def _make_durable(self, index: int, where: dict[str, Any], is_crystal: bool) -> None:
        inp = self.inputs[index]
        inp.durable = where
        inp.durable_sent += is_crystal
        self._window_crystals -= is_crystal
        self._dirty = True

    def finish(self, *, clean: bool) -> None:
        """Stop the readers; save positions (all of them if every send was flushed)."""
        self.stop()
        if clean:
            while self._window:
                self._make_durable(*self._window.popleft())
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
               stop_event: threading.Event | None = None, **kwargs: Any) -> SendReport:
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
        JSON file of where each input stands (see :class:`~streamvi.follow.PositionFile`):
        read at the start to resume after the last crystal sent, written (atomically) after
        each batch sent and at the end.  Pipes are not recorded.
    run
        Run name of every message; default: each file's name without its suffix.  Give
        several indexamajig instances' streams of one run the same name.
    poll_s
        Wait at the end of a growing file between polls, s.
    idle_timeout_s
        With ``follow``: stop following a stream after this many seconds without new bytes.
    stop_event
        Set it to stop (within ``poll_s``); what was handed on is then saved exactly.

    Returns
    -------
    SendReport
        With ``by_file``.

    Raises
    ------
    ConfigError
        A missing input (unless followed), an unknown file type, an unusable position file.
    TimeoutError
        As for :func:`send_messages`.
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
    merger = _Merger(inputs, positions, lag=int(kwargs.get("sndhwm", 1000)), poll_s=poll_s,
                     stop_event=stop_event)
    merger.start()
    clean = False
    try:
        report = send_messages(merger.items(), url, rate=rate, **kwargs)
        clean = True
    finally:
        merger.finish(clean=clean)
    report.by_file = {inp.name: {"sent": inp.sent, "rejected": inp.rejected} for inp in inputs}
    return report
