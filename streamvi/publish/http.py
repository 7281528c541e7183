"""The service's HTTP endpoint: status page, JSON status and Prometheus ``/metrics``.

Every endpoint is read-only: GET (and HEAD) are answered, other methods get 405.

=================  ==========================================================================
``/``              the status page (``static/index.html``; plots drawn by ``static/app.js``)
``/static/<file>`` the page's script and style sheet (only files shipped in the package)
``/api/status``    JSON: the service's status, the latest shell table, history for the plots
``/metrics``       Prometheus exposition from the service's own registry
``/healthz``       ``ok`` while the service works; 503 ``failed: <why>`` when it is failed
                   (a training loop that keeps failing, a merge that cannot start)
=================  ==========================================================================

Every answer is built from one :class:`~streamvi.snapshot.ServiceSnapshot` the service hands
out per request; nothing here touches the service itself.
"""
from __future__ import annotations

import errno
import ipaddress
import json
import logging
import socket
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from pathlib import PurePath
from typing import Any
from urllib.parse import urlsplit

import numpy as np
from prometheus_client.exposition import choose_encoder

import streamvi
from streamvi.errors import ConfigError
from streamvi.jsonsafe import jsonable
from streamvi.publish.metrics import ServiceMetrics
from streamvi.snapshot import ServiceSnapshot, SnapshotSource

log = logging.getLogger(__name__)

#: Most history points sent to the status page (older ones are thinned evenly).
MAX_HISTORY_POINTS = 600
ALLOWED_METHODS = "GET, HEAD"
CONTENT_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
                 ".css": "text/css; charset=utf-8", ".svg": "image/svg+xml",
                 ".png": "image/png", ".ico": "image/x-icon"}
# the page must never load anything from outside the service (air-gapped beamline networks)
PAGE_HEADERS = {"Content-Security-Policy": "default-src 'self'; img-src 'self' data:",
                "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer"}


def load_static() -> dict[str, tuple[bytes, str]]:
    """The package's static files: name → (content, content type)."""
    out = {}
    for entry in (resources.files("streamvi.publish") / "static").iterdir():
        suffix = PurePath(entry.name).suffix
        if entry.is_file() and suffix in CONTENT_TYPES:
            out[entry.name] = (entry.read_bytes(), CONTENT_TYPES[suffix])
    return out


class HttpServer:
    """A running status/metrics server (returned by :func:`start_http_server`).

    Attributes
    ----------
    host, port
        The address actually bound (``port`` is the real one when 0 was asked for).
    url
        Base URL to reach it, ending in ``/`` (loopback when bound to every interface).
    metrics
        The service's :class:`~streamvi.publish.metrics.ServiceMetrics` (its registry).
    """

    def __init__(self, httpd: "_Server", thread: threading.Thread):
        self._httpd = httpd
        self._thread = thread
        self.metrics = httpd.metrics
        self.host, self.port = httpd.server_address[:2]
        addr = ipaddress.ip_address(self.host)
        shown = str(addr)
        if addr.is_unspecified:
            shown = "::1" if addr.version == 6 else "127.0.0.1"
        self.url = f"http://[{shown}]:{self.port}/" if ":" in shown else \
            f"http://{shown}:{self.port}/"

    @property
    def registry(self):
        """The service's Prometheus registry."""
        return self.metrics.registry

    def shutdown(self, timeout: float = 5.0) -> None:
        """Stop serving, close the socket and join the thread."""
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout)

    def __repr__(self) -> str:
        return f"HttpServer({self.url})"


def start_http_server(source: SnapshotSource, host: str, port: int) -> HttpServer:
    """Serve the status page and ``/metrics`` of a service from a daemon thread.

    Parameters
    ----------
    source
        Gives the service's state at each request
        (:meth:`streamvi.service.service.Service.snapshot`).
    host
        Address to bind (``metrics_host``); anything but loopback logs a warning.
    port
        Port to bind (``metrics_port``); 0 picks a free port.

    Raises
    ------
    ConfigError
        The port is in use or not allowed, or the host is not an address of this machine.
    """
    try:
        family = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM,
                                    flags=socket.AI_PASSIVE)[0][0]
    except socket.gaierror as exc:
        raise ConfigError(f"metrics_host {host!r}: cannot be resolved ({exc.strerror}); set "
                          "--metrics-host to an address of this machine, e.g. 127.0.0.1") \
            from None
    try:
        httpd = _Server((host, port), family, ServiceMetrics(source), source)
    except OSError as exc:
        raise _bind_error(exc, host, port) from None
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.2},
                              name="streamvi-http", daemon=True)
    thread.start()
    server = HttpServer(httpd, thread)
    if not ipaddress.ip_address(server.host).is_loopback:
        log.warning("status page and /metrics are served on %s:%d, reachable from other "
                    "machines; they are read-only but unauthenticated: bind metrics_host = "
                    "127.0.0.1 unless a firewall or reverse proxy guards the port",
                    server.host, server.port)
    log.info("status page %s, metrics %smetrics", server.url, server.url)
    return server


def _bind_error(exc: OSError, host: str, port: int) -> ConfigError:
    if exc.errno == errno.EADDRINUSE:
        return ConfigError(f"metrics_port {port} on {host} is already in use; choose another "
                           "with --metrics-port (STREAMVI_METRICS_PORT, metrics_port in the "
                           "config; 0 = any free port, -1 = off) or stop the other process")
    if exc.errno == errno.EACCES:
        return ConfigError(f"metrics_port {port}: not allowed for this user (ports below "
                           "1024 need privileges); choose another with --metrics-port")
    return ConfigError(f"metrics_host {host!r}, metrics_port {port}: cannot bind "
                       f"({exc.strerror}); set --metrics-host to an address of this machine "
                       "and --metrics-port to a free port")


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], family: socket.AddressFamily,
                 metrics: ServiceMetrics, source: SnapshotSource):
        self.address_family = family        # read by the base class when it makes the socket
        self.metrics = metrics
        self.source = source
        self.static = load_static()
        super().__init__(address, _Handler)


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"
    server_version = f"streamvi/{streamvi.__version__}"
    timeout = 120          # s; closes idle keep-alive connections (and their threads)

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        self._answer(head=False)

    def do_HEAD(self) -> None:  # noqa: N802
        self._answer(head=True)

    def _not_allowed(self) -> None:
        # a request body we will not read must not be parsed as the next request
        self.close_connection = True
        body = f"{self.command} not allowed: the status endpoints are read-only\n".encode()
        self._send(HTTPStatus.METHOD_NOT_ALLOWED, body, "text/plain; charset=utf-8",
                   {"Allow": ALLOWED_METHODS, "Connection": "close"})

    do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = do_TRACE = _not_allowed  # noqa: N815

    def _answer(self, *, head: bool) -> None:
        path = urlsplit(self.path).path
        try:
            status, body, ctype, headers = self._route(path)
        except Exception:  # one bad scrape must not take the server down; the trace is logged
            log.exception("HTTP %s %s failed", self.command, path)
            status, body, ctype, headers = (HTTPStatus.INTERNAL_SERVER_ERROR,
                                            b"internal error; see the service log\n",
                                            "text/plain; charset=utf-8", {})
        self._send(status, body, ctype, headers, head=head)

    def _route(self, path: str) -> tuple[HTTPStatus, bytes, str, dict[str, str]]:
        no_store = {"Cache-Control": "no-store"}
        if path == "/metrics":
            encoder, ctype = choose_encoder(self.headers.get("Accept", ""))
            return HTTPStatus.OK, encoder(self.server.metrics.registry), ctype, no_store
        if path == "/api/status":
            body = json.dumps(status_payload(self.server.source()), allow_nan=False,
                              separators=(",", ":")).encode()
            return HTTPStatus.OK, body, "application/json", no_store
        if path == "/healthz":
            failure = self.server.source().failure
            if failure is not None:
                return (HTTPStatus.SERVICE_UNAVAILABLE, f"failed: {failure}\n".encode(),
                        "text/plain; charset=utf-8", no_store)
            return HTTPStatus.OK, b"ok\n", "text/plain; charset=utf-8", no_store
        name = "index.html" if path in ("/", "/index.html") else \
            path[len("/static/"):] if path.startswith("/static/") else None
        if name in self.server.static:
            body, ctype = self.server.static[name]
            return HTTPStatus.OK, body, ctype, dict(PAGE_HEADERS)
        return (HTTPStatus.NOT_FOUND, f"not found: {path}\n".encode(),
                "text/plain; charset=utf-8", {})

    def _send(self, status: HTTPStatus, body: bytes, ctype: str, headers: dict[str, str],
              head: bool = False) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        for key, value in headers.items():
            self.send_header(key, value)
        self.end_headers()
        if not head:
            self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - base signature
        log.debug("%s %s", self.address_string(), format % args)


# ---------------------------------------------------------------------- /api/status


def status_payload(state: ServiceSnapshot) -> dict[str, Any]:
    """What ``/api/status`` returns (JSON-able; NaN and infinities become null)."""
    snap = state.merge
    payload: dict[str, Any] = {
        "version": state.version,
        "time": state.time,
        "merge": dict(state.merge_info),
        "status": dict(state.status),
        "snapshot": None,
        "shells": None,
        "history": thin(list(state.history), MAX_HISTORY_POINTS),
        # targets, forecasts, resolution, peaks, and their history against images
        "feedback": None if state.feedback is None else state.feedback.to_dict(),
        "feedback_history": state.feedback_history,
    }
    if snap is not None:
        payload["snapshot"] = {"id": snap.snapshot_id, "time": snap.time,
                               "n_images": snap.n_images, "n_reflections": snap.n_reflections,
                               "step": snap.step}
        payload["shells"] = snap.stats.to_dict()
    return jsonable(payload)


def thin(items: list[Any], n_max: int) -> list[Any]:
    """At most ``n_max`` evenly spaced items, always keeping the first and the last."""
    if len(items) <= n_max:
        return items
    idx = np.unique(np.linspace(0, len(items) - 1, n_max).round().astype(int))
    return [items[i] for i in idx]
