"""Security: loopback by default, loud warnings otherwise, CURVE keeps strangers out, no
pickle on the wire, output paths confined to out_dir, HTTP endpoints read-only.

Every test runs a real :class:`~streamvi.service.service.Service` on real sockets.
"""
from __future__ import annotations

import contextlib
import http.client
import logging
import os
import pickle
import re
import shutil
import socket
import time
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest
import zmq
from conftest import REPO, make_crystal

from streamvi.config import OPTION_BY_NAME, load_config
from streamvi.ingest.deadletter import read_dead_letters
from streamvi.ingest.keys import generate_keypair, load_public_key, load_secret_key
from streamvi.producers.send import send_messages
from streamvi.service.service import Service
from streamvi.wire import encode_crystal

CELL = "79.1 79.1 37.9 90 90 90"


def config(out_dir: Path, **overrides):
    values = {"out_dir": out_dir, "space_group": "P 43 21 2", "cell": CELL, "dmin": 3.0,
              "device": "cpu", "publish_interval": 0.3, "checkpoint_interval": 3600.0,
              "spool_fsync": "never", "d_model": 16, "n_layers": 1, "mc_samples": 2,
              "batch_images": 4, "publish_endpoint": "", "metrics_port": -1,
              "listen": ["tcp://127.0.0.1:*"]}
    values.update(overrides)
    return load_config(env={}, overrides=values)


@contextlib.contextmanager
def running(out_dir: Path, **overrides) -> Iterator[Service]:
    svc = Service(config(out_dir, **overrides)).start()
    try:
        yield svc
    finally:
        svc.stop(checkpoint=False, publish=False)


def crystals(n: int, seed: int = 0, **kw) -> list:
    rng = np.random.default_rng(seed)
    return [make_crystal(rng, n=40, image=f"img{seed}-{i}", hmax=9, **kw) for i in range(n)]


def received(svc: Service) -> int:
    return svc.counters.snapshot()["crystals_received"]


def stored(svc: Service) -> int:
    return 0 if svc.engine is None else svc.engine.store.n_images


def non_loopback_address() -> str | None:
    """An IPv4 address of this machine that is not loopback, if it has one."""
    with contextlib.suppress(OSError):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect(("192.0.2.1", 9))          # TEST-NET-1: nothing is sent
            addr = s.getsockname()[0]
            if not addr.startswith("127."):
                return addr
    with contextlib.suppress(OSError):
        for info in socket.getaddrinfo(socket.gethostname(), None, socket.AF_INET):
            addr = info[4][0]
            if not addr.startswith("127."):
                return addr
    return None


def reachable(host: str, port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(1.0)
        return s.connect_ex((host, port)) == 0


# ----------------------------------------------------------------------------- binding


def test_loopback_is_the_default_everywhere(tmp_path):
    assert OPTION_BY_NAME["listen"].default == ["tcp://127.0.0.1:5555"]
    assert OPTION_BY_NAME["metrics_host"].default == "127.0.0.1"
    assert OPTION_BY_NAME["publish_endpoint"].default.startswith("tcp://127.0.0.1:")
    default = OPTION_BY_NAME["listen"].default[0]
    pub_default = OPTION_BY_NAME["publish_endpoint"].default
    # the defaults, with free ports instead of the fixed ones
    with running(tmp_path / "out", listen=[default.rsplit(":", 1)[0] + ":*"],
                 metrics_port=0, metrics_host=OPTION_BY_NAME["metrics_host"].default,
                 publish_endpoint=pub_default.rsplit(":", 1)[0] + ":*") as svc:
        (endpoint,) = svc.ingestor.bound_endpoints
        assert re.fullmatch(r"tcp://127\.0\.0\.1:\d+", endpoint)
        assert svc.metrics_server.host == "127.0.0.1"
        assert svc.publisher.endpoint.startswith("tcp://127.0.0.1:")
        ports = [int(endpoint.rsplit(":", 1)[1]), svc.metrics_server.port,
                 int(svc.publisher.endpoint.rsplit(":", 1)[1])]
        assert all(reachable("127.0.0.1", p) for p in ports)
        other = non_loopback_address()
        if other is not None:            # from another interface nothing answers
            assert not any(reachable(other, p) for p in ports), other


def test_binding_every_interface_warns_loudly(tmp_path, caplog):
    caplog.set_level(logging.INFO)
    with running(tmp_path / "out", listen=["tcp://0.0.0.0:*"], metrics_port=0,
                 metrics_host="0.0.0.0"):
        pass
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("!!!" in w and "WITHOUT authentication" in w and "every network interface" in w
               for w in warnings), warnings
    assert any("status page and /metrics are served on 0.0.0.0" in w for w in warnings)


# ----------------------------------------------------------------------------- CURVE


@pytest.fixture
def keys(tmp_path) -> dict[str, Path]:
    """server, producer and intruder key pairs; allowed/ holds the producer's public key."""
    kdir = tmp_path / "keys"
    server_pub, server_secret = generate_keypair(kdir, "server")
    prod_pub, prod_secret = generate_keypair(kdir / "producers", "producer1")
    _, intruder_secret = generate_keypair(tmp_path / "elsewhere", "intruder")
    allowed = kdir / "allowed"
    allowed.mkdir()
    shutil.copy(prod_pub, allowed / prod_pub.name)
    assert oct(server_secret.stat().st_mode & 0o777) == "0o600"
    return {"server_public": server_pub, "server_secret": server_secret,
            "producer_secret": prod_secret, "intruder_secret": intruder_secret,
            "allowed": allowed}


def test_curve_lets_the_authorised_producer_in_and_no_one_else(tmp_path, keys, caplog):
    caplog.set_level(logging.INFO)
    server_pub = load_public_key(keys["server_public"])
    producer_secret = load_secret_key(keys["producer_secret"])[1]
    intruder_secret = load_secret_key(keys["intruder_secret"])[1]
    stranger_server_secret = zmq.curve_keypair()[1]
    with running(tmp_path / "out", curve_secret_key=str(keys["server_secret"]),
                 curve_allowed_clients=str(keys["allowed"])) as svc:
        url = svc.ingestor.bound_endpoints[0]
        rep = send_messages(crystals(10, seed=1), url, timeout_s=10,
                            curve_server_public=server_pub,
                            curve_client_secret=producer_secret)
        assert rep.sent == 10
        assert svc.wait_until(lambda s: received(s) == 10 and stored(s) == 10, 30)
        before = svc.counters.snapshot()

        attempts = 0
        # an unknown key; no CURVE at all; a producer that trusts another server key
        for opts in ({"curve_server_public": server_pub, "curve_client_secret": intruder_secret},
                     {},
                     {"curve_server_public": zmq.curve_public(stranger_server_secret),
                      "curve_client_secret": producer_secret}):
            with contextlib.suppress(TimeoutError):
                send_messages(crystals(10, seed=2 + attempts), url, timeout_s=0.5, **opts)
            attempts += 1
        # and a raw PUSH that just writes bytes at the port
        host, port = url[len("tcp://"):].rsplit(":", 1)
        with socket.create_connection((host, int(port)), timeout=2) as raw:
            raw.sendall(b"\xff\x00\x00\x00\x00\x00\x00\x00\x01\x7f" + encode_crystal(
                crystals(1, seed=9)[0]))
            time.sleep(0.3)
        time.sleep(1.5)
        after = svc.counters.snapshot()
        accepted = after["messages_received"] - before["messages_received"]
        print(f"\nunauthorised messages accepted: {accepted} (of {10 * attempts} sent in "
              f"{attempts} attempts, plus raw bytes)")
        assert accepted == 0
        assert after == before and stored(svc) == 10
        assert not (svc.out_dir / "dead-letter.jsonl").exists()
        assert "refused a CURVE client with unknown public key" in caplog.text

        # the authorised producer still gets through, counted exactly
        send_messages(crystals(5, seed=20), url, timeout_s=10,
                      curve_server_public=server_pub, curve_client_secret=producer_secret)
        assert svc.wait_until(lambda s: received(s) == 15 and stored(s) == 15, 30)


def test_curve_on_every_interface_is_not_the_loud_warning(tmp_path, keys, caplog):
    caplog.set_level(logging.INFO)
    with running(tmp_path / "out", listen=["tcp://0.0.0.0:*"],
                 curve_secret_key=str(keys["server_secret"]),
                 curve_allowed_clients=str(keys["allowed"])):
        pass
    assert "protected by CURVE" in caplog.text
    assert "WITHOUT authentication" not in caplog.text


# ----------------------------------------------------------------------------- no pickle


PICKLE_USE = re.compile(r"^\s*(import|from)\s+(c?pickle|dill|cloudpickle|shelve|marshal)\b"
                        r"|\b(c?pickle|dill|cloudpickle|marshal)\.(loads?|Unpickler|dumps?)\b"
                        r"|\b(send|recv)_pyobj\b|\bsend_serialized\b|\brecv_serialized\b",
                        re.M)


def test_no_pickle_on_the_wire_in_the_source():
    """Only the OM bridge (plugins/om, which reads OM's own broadcasts, opt-in) may touch
    pickle; nothing else in the package or the plugins serialises with it."""
    roots = [REPO / "streamvi", *[p for p in (REPO / "plugins").iterdir()
                                  if p.is_dir() and p.name != "om"]]
    hits = []
    n_files = 0
    for root in roots:
        for path in root.rglob("*.py"):
            n_files += 1
            for m in PICKLE_USE.finditer(path.read_text(errors="replace")):
                hits.append(f"{path.relative_to(REPO)}: {m.group(0).strip()}")
    assert n_files > 40
    assert hits == [], hits


class _Trap:
    """Unpickling this would create the file named by ``path``."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return (os.mkdir, (self.path,))


def test_a_pickled_payload_is_never_unpickled(tmp_path):
    trap = tmp_path / "unpickled"
    payloads = [pickle.dumps(_Trap(trap), protocol=p) for p in (0, 2, 4, 5)]
    with running(tmp_path / "out") as svc:
        sock = zmq.Context.instance().socket(zmq.PUSH)
        sock.connect(svc.ingestor.bound_endpoints[0])
        for p in payloads:
            sock.send(p)
        sock.close(linger=5000)
        assert svc.wait_until(lambda s: s.counters.snapshot()["messages_received"] == 4, 20)
        c = svc.counters.snapshot()
    assert c["crystals_received"] == 0 and sum(c["messages_rejected"].values()) == 4
    assert set(c["messages_rejected"]) <= {"malformed_msgpack", "missing_key"}
    assert not trap.exists()


# ----------------------------------------------------------------------------- paths


def test_output_paths_are_confined_to_out_dir(tmp_path):
    out = tmp_path / "deep" / "out"
    hostile = ["../../escaped", "../../../../../../tmp/streamvi-escaped", "/etc/passwd",
               "..", "a/../../b", "nul\x00byte", "~root", "$(touch x)", "C:\\Windows\\x"]
    msgs = []
    rng = np.random.default_rng(0)
    for i, name in enumerate(hostile):
        msgs.append(make_crystal(rng, n=40, run=name, image=name, hmax=9))
        msgs.append(make_crystal(rng, n=40, run="r", image=f"{name}/{i}", hmax=9))
    out.parent.mkdir(parents=True)
    outside_before = {p for p in tmp_path.rglob("*") if out not in p.parents and p != out}
    passwd_mtime = os.stat("/etc/passwd").st_mtime_ns
    with running(out, metrics_port=0) as svc:
        paths = [svc.mtz.latest, svc.spool.directory, svc.checkpoint_path,
                 svc.dead_letter.path, *svc.spool.segments]
        for p in paths:
            assert Path(p).resolve().is_relative_to(svc.out_dir), p
        send_messages(msgs, svc.ingestor.bound_endpoints[0], timeout_s=10)
        # and one bad message whose image name is hostile too (goes to the dead letters)
        bad = encode_crystal(make_crystal(rng, n=4, run="../../x", image="../../../x"))
        sock = zmq.Context.instance().socket(zmq.PUSH)
        sock.connect(svc.ingestor.bound_endpoints[0])
        sock.send(bad[:-3])
        sock.close(linger=5000)
        assert svc.wait_until(lambda s: stored(s) == len(msgs) and s.mtz.n_written >= 2
                              and s.counters.snapshot()["messages_received"]
                              == len(msgs) + 1, 60), svc.status()
        assert svc.checkpoint() is not None
    outside_after = {p for p in tmp_path.rglob("*") if out not in p.parents and p != out}
    assert outside_after == outside_before
    # where a path built from the names would have landed (other processes share /tmp and
    # the working directory, so only these names are checked there)
    for where in (Path("/tmp"), Path.cwd(), tmp_path.parent):
        for name in ("escaped", "streamvi-escaped", "$(touch x)"):
            assert not (where / name).exists(), where / name
    for where in (out.parent, tmp_path):          # ours alone: generic names checked too
        assert {p.name for p in where.iterdir()} <= {"out", "deep"}, list(where.iterdir())
    assert os.stat("/etc/passwd").st_mtime_ns == passwd_mtime
    # every file written is one of the service's own names, under out_dir
    names = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()}
    pattern = re.compile(r"(latest\.mtz|snapshot-\d{6}\.mtz|checkpoint\.pt|dead-letter\.jsonl"
                         r"|spool/spool-\d{6}\.svs|spool/spool\.lock)")
    assert all(pattern.fullmatch(n) for n in names), names
    assert len(read_dead_letters(out / "dead-letter.jsonl")) == 1


# ----------------------------------------------------------------------------- HTTP


def test_http_endpoints_are_read_only(tmp_path):
    with running(tmp_path / "out", metrics_port=0) as svc:
        send_messages(crystals(6), svc.ingestor.bound_endpoints[0], timeout_s=10)
        assert svc.wait_until(lambda s: stored(s) == 6, 30)
        host, port = svc.metrics_server.host, svc.metrics_server.port
        before = svc.counters.snapshot()
        paths = ["/", "/metrics", "/api/status", "/healthz", "/static/app.js", "/nowhere"]
        for path in paths:
            for method in ("POST", "PUT", "DELETE", "PATCH"):
                conn = http.client.HTTPConnection(host, port, timeout=10)
                conn.request(method, path, body=b'{"crystals_received": 0}',
                             headers={"Content-Type": "application/json"})
                resp = conn.getresponse()
                assert resp.status == 405, (method, path, resp.status)
                assert resp.getheader("Allow") == "GET, HEAD"
                resp.read()
                conn.close()
        for path in ("/static/../service.py", "/static/%2e%2e/service.py",
                     "/static/..%2f..%2fservice.py", "/../../etc/passwd", "//etc/passwd"):
            conn = http.client.HTTPConnection(host, port, timeout=10)
            conn.request("GET", path)
            resp = conn.getresponse()
            body = resp.read()
            assert resp.status == 404 and b"import" not in body, (path, resp.status)
            conn.close()
        assert svc.counters.snapshot() == before
        conn = http.client.HTTPConnection(host, port, timeout=10)
        conn.request("GET", "/healthz")
        assert conn.getresponse().status == 200
        conn.close()
