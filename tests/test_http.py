"""The HTTP endpoint of a real service: status page, JSON, methods, ports, headless Chromium."""
from __future__ import annotations

import http.client
import json
import logging
import re
import shutil
import socket
import struct
import subprocess
import zlib
from pathlib import Path

import numpy as np
import pytest
from test_metrics import N_SHELLS, fed_service, get, make_service  # noqa: F401 - fixture

from streamvi.errors import ConfigError
from streamvi.publish.http import start_http_server

CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                  "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--window-size=1200,1600",
                  "--virtual-time-budget=5000")
CANVASES = ("plot-cchalf", "plot-compl", "plot-rate", "plot-loss")


def request(url: str, method: str, path: str) -> tuple[http.client.HTTPResponse, bytes]:
    """One raw request (no client-side path normalisation)."""
    host, port = url.split("//")[1].rstrip("/").rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    try:
        conn.request(method, path, body=b"x=1" if method in ("POST", "PUT", "PATCH") else None)
        resp = conn.getresponse()
        return resp, resp.read()
    finally:
        conn.close()


# ---------------------------------------------------------------------- endpoints


def test_status_page_and_its_assets(fed_service):
    svc, _ = fed_service
    url = svc.metrics_server.url
    resp, body = request(url, "GET", "/")
    assert resp.status == 200
    assert resp.getheader("Content-Type") == "text/html; charset=utf-8"
    assert "default-src 'self'" in resp.getheader("Content-Security-Policy")
    page = body.decode()
    assert '<script src="/static/app.js"' in page and 'id="shell-rows"' in page
    assert all(f'<canvas id="{c}"' in page for c in CANVASES)
    assert "http://" not in page and "https://" not in page     # nothing from outside
    for name, ctype in (("app.js", "text/javascript"), ("style.css", "text/css")):
        resp, body = request(url, "GET", f"/static/{name}")
        assert resp.status == 200 and resp.getheader("Content-Type").startswith(ctype)
        assert len(body) > 500 and b"https://" not in body
    assert request(url, "GET", "/healthz")[1] == b"ok\n"
    for path in ("/nope", "/static/../http.py", "/static/%2e%2e/http.py", "/static/"):
        assert request(url, "GET", path)[0].status == 404, path


def test_api_status_has_counters_shells_and_history(fed_service):
    svc, feed = fed_service
    assert svc.wait_until(lambda s: len(s.history) >= 2, 10)     # two points for the plots
    text = get(svc.metrics_server.url + "api/status?x=1").decode()
    assert "NaN" not in text and "Infinity" not in text
    d = json.loads(text)
    assert d["merge"]["space_group"] == "P 43 21 2" and d["merge"]["dmin"] == 3.0
    counters = d["status"]["counters"]
    assert counters["crystals_received"] == feed.expected["crystals_received"]
    assert counters["messages_rejected"] == {r: len(f) for r, f in feed.bad.items()}
    assert d["status"]["crystals_merged"] == feed.n_images
    shells = d["shells"]
    assert len(shells["d_min"]) == len(shells["cc_half"]) == N_SHELLS
    assert shells["cc_anom"] == [None] * N_SHELLS          # NaN (not anomalous) → null
    assert shells["overall"]["n_unique"] == sum(shells["n_unique"])
    assert d["snapshot"]["n_images"] == feed.n_images
    history = d["history"]
    assert len(history) >= 2
    times = [h["time"] for h in history]
    assert times == sorted(times)
    assert len(history[-1]["cc_half_shells"]) == N_SHELLS


def test_other_methods_are_refused(fed_service):
    svc, _ = fed_service
    for method in ("POST", "PUT", "DELETE", "PATCH", "OPTIONS"):
        for path in ("/api/status", "/metrics", "/"):
            resp, body = request(svc.metrics_server.url, method, path)
            assert resp.status == 405, (method, path)
            assert resp.getheader("Allow") == "GET, HEAD"
            assert b"read-only" in body
    resp, body = request(svc.metrics_server.url, "HEAD", "/metrics")
    assert resp.status == 200 and body == b"" and int(resp.getheader("Content-Length")) > 1000


def test_port_in_use_is_a_config_error(tmp_path):
    svc = make_service(tmp_path)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(ConfigError) as err:
            start_http_server(svc.snapshot, "127.0.0.1", port)
    svc.spool.close()
    message = str(err.value)
    assert str(port) in message and "metrics_port" in message and "--metrics-port" in message


def test_non_loopback_host_warns(tmp_path, caplog):
    svc = make_service(tmp_path)
    with caplog.at_level(logging.WARNING, logger="streamvi.publish.http"):
        server = start_http_server(svc.snapshot, "0.0.0.0", 0)
    try:
        assert any("reachable from other machines" in r.getMessage() for r in caplog.records)
        assert server.url == f"http://127.0.0.1:{server.port}/"
        assert get(server.url + "healthz") == b"ok\n"
    finally:
        server.shutdown()
        svc.spool.close()
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="streamvi.publish.http"):
        start_http_server(svc.snapshot, "127.0.0.1", 0).shutdown()
    assert not caplog.records


# ---------------------------------------------------------------------- in a browser


def read_png(data: bytes) -> np.ndarray:
    """Decode an 8-bit, non-interlaced RGB/RGBA PNG into an (h, w, channels) array."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    pos, idat, header = 8, [], None
    while pos < len(data):
        n, kind = struct.unpack(">I4s", data[pos:pos + 8])
        body = data[pos + 8:pos + 8 + n]
        if kind == b"IHDR":
            header = struct.unpack(">IIBBBBB", body)
        elif kind == b"IDAT":
            idat.append(body)
        elif kind == b"IEND":
            break
        pos += 12 + n
    width, height, depth, colour, _, _, interlace = header
    assert depth == 8 and colour in (2, 6) and interlace == 0, header
    bpp = 3 if colour == 2 else 4
    raw = np.frombuffer(zlib.decompress(b"".join(idat)), np.uint8).reshape(height, -1)
    return _unfilter(raw, bpp).reshape(height, width, bpp)


def _unfilter(raw: np.ndarray, bpp: int) -> np.ndarray:
    height, stride = raw.shape[0], raw.shape[1] - 1
    out = np.zeros((height, stride), np.uint8)
    prev = np.zeros(stride, np.uint8)
    for y in range(height):
        kind, line = raw[y, 0], raw[y, 1:]
        if kind == 0:
            cur = line
        elif kind == 1:           # Sub: a running sum per channel (uint8 wraps mod 256)
            cur = np.cumsum(line.reshape(-1, bpp), axis=0, dtype=np.uint8).ravel()
        elif kind == 2:           # Up
            cur = line + prev
        else:                     # Average and Paeth depend on the byte just decoded
            row, above = bytearray(line.tobytes()), prev.tobytes()
            for i in range(stride):
                a = row[i - bpp] if i >= bpp else 0
                b = above[i]
                if kind == 3:
                    row[i] = (row[i] + ((a + b) >> 1)) & 255
                    continue
                c = above[i - bpp] if i >= bpp else 0
                pa, pb, pc = abs(b - c), abs(a - c), abs(a + b - 2 * c)
                row[i] = (row[i] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 255
            cur = np.frombuffer(bytes(row), np.uint8)
        out[y] = cur
        prev = out[y]
    return out


def chromium(url: str, tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    binary = shutil.which("chromium") or shutil.which("chromium-browser")
    if binary is None:
        pytest.skip("chromium not installed (Debian package 'chromium'; .ci/run installs it)")
    res = subprocess.run([binary, *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile'}",
                          *args, url], capture_output=True, timeout=120)
    assert res.returncode == 0, res.stderr.decode()[-2000:]
    return res


def test_status_page_renders_in_chromium(fed_service, tmp_path):
    svc, feed = fed_service
    assert svc.wait_until(lambda s: len(s.history) >= 2, 10)     # two points for the plots
    url = svc.metrics_server.url
    dom = chromium(url, tmp_path, "--dump-dom").stdout.decode()
    shot = tmp_path / "status_page.png"
    chromium(url, tmp_path, f"--screenshot={shot}")
    print(f"status page screenshot: {shot}")

    body = re.search(r'<tbody id="shell-rows">(.*?)</tbody>', dom, re.S).group(1)
    rows = [[re.sub(r"<[^>]+>", "", td).strip() for td in re.findall(r"<td[^>]*>(.*?)</td>",
                                                                      tr, re.S)]
            for tr in re.findall(r"<tr[^>]*>(.*?)</tr>", body, re.S)]
    assert len(rows) == N_SHELLS and all(len(r) == 11 for r in rows)
    assert [r[0] for r in rows] == [str(i + 1) for i in range(N_SHELLS)]
    assert re.fullmatch(r"\d+\.\d\d – \d+\.\d\d", rows[0][1])
    # CC½ (model, data): a value ± half its interval, or "few" under the minimum of pairs
    assert re.fullmatch(r"\d+\.\d %", rows[0][2])
    assert all(re.fullmatch(r"(-?\d\.\d{3} ±\d\.\d{3}|few)", r[k]) for r in rows for k in (5, 6))
    assert all(re.fullmatch(r"[\d,]+", r[7]) for r in rows)          # the pairs behind them
    overall = re.search(r'<tfoot id="shell-overall">(.*?)</tfoot>', dom, re.S).group(1)
    assert "Overall" in overall and re.search(r"\d+\.\d %", overall)
    assert re.search(rf'id="t-crystals">{feed.n_images}<', dom)

    image = read_png(shot.read_bytes())[..., :3]
    assert image.shape[:2] == (1600, 1200)
    for canvas in CANVASES:
        tag = re.search(rf'<canvas id="{canvas}"[^>]*>', dom).group(0)
        assert int(re.search(r'data-points="(\d+)"', tag).group(1)) >= 2, tag
        x, y, w, h = map(int, re.search(r'data-rect="([\d,]+)"', tag).group(1).split(","))
        assert w > 200 and h > 100 and y + h <= 1600, tag
        area = image[y:y + h, x:x + w].reshape(-1, 3).astype(np.int16)
        # axes, grid and labels are grey; only the data lines are coloured (an empty plot
        # with its "waiting for data" text has no saturated pixel at all)
        lines = area[area.max(axis=1) - area.min(axis=1) > 60]
        colours = np.unique(lines, axis=0).shape[0]
        # CC½ and completeness are plotted against images: this feed arrives at once, so
        # their points stand on one image count (a dot per snapshot and shell, and the
        # target lines; 118 coloured pixels for completeness after this module's other
        # tests, 99 once on a loaded machine, 977 alone); the plots over time are lines
        least = 50 if canvas in ("plot-cchalf", "plot-compl") else 300
        assert lines.shape[0] >= least, f"{canvas}: {lines.shape[0]} coloured pixels"
        assert colours >= 20, f"{canvas}: only {colours} distinct line colours"
        assert lines.shape[0] < 0.5 * area.shape[0], f"{canvas}: mostly coloured"
