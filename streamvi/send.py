"""The producer side: send crystals to a running ``streamvi serve`` over ZeroMQ.

Depends on :mod:`streamvi.wire` and zmq only, so it runs wherever the data are (next to
indexamajig, on a file server) without torch.

A PUSH socket connects to the service's PULL endpoint.  When the service's queue is full it
stops reading, and :func:`send_messages` blocks: that is backpressure working, not a fault.
``timeout_s`` turns a block longer than that into :class:`TimeoutError`.
"""
from __future__ import annotations

import importlib
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import zmq

from streamvi.errors import ConfigError
from streamvi.sources import Rejected, SourceItem
from streamvi.wire import encode_crystal

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
    """

    sent: int
    rejected: int
    seconds: float
    bytes_sent: int = 0
    images: int = 0

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
FILE_SOURCES = {".stream": ("streamvi_crystfel", "CrystfelSource")}


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
                          + ", ".join(FILE_SOURCES))
    module_name, class_name = FILE_SOURCES[path.suffix]
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(f"send: {path}: reading {path.suffix} files needs the plugin "
                          f"{module_name}, which is not installed ({exc})") from exc
    return getattr(module, class_name)(path)


def send_file(path: str | os.PathLike[str], url: str, *, rate: float | None = None,
              follow: bool = False, position_file: str | os.PathLike[str] | None = None,
              **kwargs: object) -> SendReport:
    """Send every crystal of a file (a CrystFEL stream) to ``url``.

    Parameters
    ----------
    path
        The file.
    url, rate, kwargs
        As for :func:`send_messages`.
    follow, position_file
        Not implemented yet (tailing a growing file; resuming where the last run stopped).
    """
    if follow or position_file is not None:
        raise NotImplementedError(
            "send: --follow and position files are not implemented yet; send a finished "
            "stream file (each run of send_file sends it from the start; the service counts "
            "crystals it already holds as duplicates)")
    return send_messages(open_file_source(path), url, rate=rate, **kwargs)  # type: ignore[arg-type]
