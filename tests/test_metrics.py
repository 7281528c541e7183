"""Prometheus metrics of a real running service: exact counts, isolation, promtool, Prometheus.

Every test runs a real :class:`~streamvi.service.service.Service` (ingest on a loopback ZeroMQ PULL
socket, training thread, HTTP server on a free port) and feeds it crystals over a real PUSH
socket.  The helpers here are also used by test_http.py and test_grafana.py.
"""
from __future__ import annotations

import json
import shutil
import socket
import subprocess
import threading
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import msgpack
import numpy as np
import pytest
import torch
import yaml
import zmq
from conftest import REPO, make_crystal
from prometheus_client import REGISTRY
from prometheus_client.openmetrics.parser import (
    text_string_to_metric_families as openmetrics_families,
)
from prometheus_client.parser import text_string_to_metric_families

from streamvi.config import load_config
from streamvi.publish.metrics import ServiceMetrics, relative_f_change
from streamvi.service.service import Service
from streamvi.wire import encode_crystal, to_wire_dict

CELL = (79.1, 79.1, 37.9, 90.0, 90.0, 90.0)
N_SHELLS = 6


# ---------------------------------------------------------------------- helpers


def make_service(out_dir: Path, **overrides) -> Service:
    """A real service on loopback with free ports, small model, fast snapshots."""
    values = {"listen": ["tcp://127.0.0.1:*"], "publish_endpoint": "", "metrics_port": 0,
              "out_dir": out_dir, "space_group": "P 43 21 2",
              "cell": " ".join(str(x) for x in CELL), "dmin": 3.0, "publish_interval": 0.5,
              "checkpoint_interval": 3600.0, "spool_fsync": "never", "n_shells": N_SHELLS,
              "d_model": 16, "n_layers": 1, "mc_samples": 2, "batch_images": 4,
              # few crystals in these tests: start the merge 0.5 s after the first
              "consensus_wait": 0.5}
    values.update(overrides)
    return Service(load_config(env={}, overrides=values))


@contextmanager
def running_service(out_dir: Path, **overrides) -> Iterator[Service]:
    """Start a service and stop it (no checkpoint) on leaving."""
    svc = make_service(out_dir, **overrides).start()
    try:
        yield svc
    finally:
        svc.stop(checkpoint=False, publish=False)


def push(service: Service, frames: list[bytes], timeout_s: float = 10.0) -> None:
    """Send ``frames`` to the service's PULL endpoint from a real PUSH socket."""
    sock = zmq.Context.instance().socket(zmq.PUSH)
    sock.setsockopt(zmq.SNDTIMEO, int(timeout_s * 1000))
    try:
        sock.connect(service.ingestor.bound_endpoints[0])
        for frame in frames:
            sock.send(frame)
    finally:
        sock.close(linger=int(timeout_s * 1000))


def get(url: str, timeout_s: float = 10.0) -> bytes:
    with urllib.request.urlopen(url, timeout=timeout_s) as resp:
        return resp.read()


def scrape(service: Service) -> dict[tuple[str, frozenset], float]:
    """``/metrics`` over HTTP as {(sample name, labels): value}."""
    return parse_exposition(get(service.metrics_server.url + "metrics").decode())


def parse_exposition(text: str) -> dict[tuple[str, frozenset], float]:
    return {(s.name, frozenset(s.labels.items())): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def sample(samples: dict, name: str, **labels: str) -> float:
    key = (name, frozenset(labels.items()))
    assert key in samples, f"{name}{labels} not in the scrape"
    return samples[key]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Feed:
    """A reproducible mix of good crystals, bad rows, bad messages and one duplicate."""

    def __init__(self, n_images: int = 24, n_refl: int = 120, seed: int = 0, run: str = "r1"):
        rng = np.random.default_rng(seed)
        self.crystals = [make_crystal(rng, n=n_refl, run=run, image=f"img{i}", hmax=9)
                         for i in range(n_images)]
        # rows that ingest must drop but count, in the first three crystals
        self.crystals[0].I[:2] = np.nan
        self.crystals[1].sigI[:3] = -1.0
        self.crystals[2].sigI[5] = 0.0
        self.row_rejects = {"nonfinite_intensity": 2, "nonpositive_sigma": 4}
        good = [encode_crystal(c) for c in self.crystals]
        duplicate = good[-1]
        wrong_schema = to_wire_dict(self.crystals[3])
        wrong_schema["schema"] = "someone.else"
        no_cell = to_wire_dict(self.crystals[4])
        del no_cell["cell"]
        self.bad = {"malformed_msgpack": [b"\xc1 not msgpack", b"\x92\x01"],
                    "unknown_schema": [msgpack.packb(wrong_schema)],
                    "missing_key": [msgpack.packb(no_cell)]}
        self.frames = good + [duplicate] + [f for fs in self.bad.values() for f in fs]
        self.n_images = n_images
        self.n_refl = n_refl

    @property
    def expected(self) -> dict[str, float]:
        rows = self.n_images * self.n_refl - sum(self.row_rejects.values())
        return {"messages_received": len(self.frames),
                "crystals_received": self.n_images + 1,
                "reflections_received": rows + self.n_refl,      # the duplicate's rows too
                "bytes_received": sum(len(f) for f in self.frames)}

    def send_and_settle(self, service: Service, timeout_s: float = 60.0) -> None:
        """Send everything, then wait until stored, visited and snapshotted."""
        push(service, self.frames)
        n = self.n_images

        def settled(s: Service) -> bool:
            c = s.counters.snapshot()
            return (c["messages_received"] == len(self.frames)
                    and s.crystals_merged + s.duplicates == n + 1 and s.all_visited()
                    and s.latest is not None and s.latest.n_images == n)

        assert service.wait_until(settled, timeout_s), service.status()


@pytest.fixture(scope="module")
def fed_service(tmp_path_factory) -> Iterator[tuple[Service, Feed]]:
    """One running service fed with :class:`Feed`, shared by the read-only tests."""
    feed = Feed()
    with running_service(tmp_path_factory.mktemp("svc")) as svc:
        feed.send_and_settle(svc)
        yield svc, feed


# ---------------------------------------------------------------------- exact values


def test_counters_equal_what_was_sent(fed_service):
    svc, feed = fed_service
    s = scrape(svc)
    for key, value in feed.expected.items():
        assert sample(s, f"streamvi_{key}_total") == value, key
    for reason, frames in feed.bad.items():
        assert sample(s, "streamvi_messages_rejected_total", reason=reason) == len(frames)
    assert sum(v for (name, _), v in s.items()
               if name == "streamvi_messages_rejected_total") == 4
    for reason, n in feed.row_rejects.items():
        assert sample(s, "streamvi_reflections_rejected_total", reason=reason) == n
    assert sample(s, "streamvi_duplicates_total") == 1
    assert sample(s, "streamvi_crystals_merged_total") == feed.n_images
    assert sample(s, "streamvi_images_stored") == feed.n_images
    assert sample(s, "streamvi_images_unvisited") == 0
    assert sample(s, "streamvi_queue_depth") == 0
    accepted_bytes = sum(len(f) for f in feed.frames[: feed.n_images + 1])
    assert sample(s, "streamvi_spool_bytes") == svc.spool.bytes_total >= accepted_bytes
    assert sample(s, "streamvi_build_info", version=__import__("streamvi").__version__) == 1


def test_openmetrics_when_asked_for(fed_service):
    svc, feed = fed_service
    req = urllib.request.Request(svc.metrics_server.url + "metrics", headers={
        "Accept": "application/openmetrics-text; version=1.0.0; charset=utf-8"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        assert resp.headers["Content-Type"].startswith("application/openmetrics-text")
        text = resp.read().decode()
    assert text.endswith("# EOF\n")
    families = {f.name: f for f in openmetrics_families(text)}
    (crystals,) = families["streamvi_crystals_received"].samples
    assert crystals.value == feed.expected["crystals_received"]


def test_training_and_store_metrics(fed_service):
    svc, feed = fed_service
    s = scrape(svc)
    steps = sample(s, "streamvi_training_steps_total")
    assert steps >= feed.n_images / 4
    assert sample(s, "streamvi_reflections_trained_total") > 0
    assert sample(s, "streamvi_reflections_trained_per_second") >= 0
    # every stored image has had its first visit: one lag each
    assert sample(s, "streamvi_ingest_lag_seconds_count") == feed.n_images
    assert sample(s, "streamvi_ingest_lag_seconds_bucket", le="+Inf") == feed.n_images
    assert sample(s, "streamvi_ingest_lag_seconds_sum") > 0
    for name in ("streamvi_ingest_lag_seconds", "streamvi_step_duration_seconds"):
        buckets = sorted((float(dict(k)["le"]), v) for (n, k), v in s.items()
                         if n == name + "_bucket")
        counts = [v for _, v in buckets]
        assert counts == sorted(counts), f"{name} buckets not cumulative"
        assert counts[-1] == sample(s, name + "_count")
    visits = [sample(s, "streamvi_image_visits", quantile=q)
              for q in ("0", "0.1", "0.5", "0.9", "1")]
    assert 1 <= visits[0] and visits == sorted(visits)
    assert sample(s, "streamvi_image_visits_count") == feed.n_images
    assert sample(s, "streamvi_image_visits_sum") >= feed.n_images
    assert visits[-1] <= svc.engine.store.visits[: feed.n_images].max()   # training goes on
    for term in ("total", "nll", "kl_F", "kl_scale"):
        assert np.isfinite(sample(s, "streamvi_loss", term=term))
    mem = sample(s, "streamvi_device_memory_bytes", kind="process_rss")
    assert 10 * 2**20 < mem < 64 * 2**30
    assert sample(s, "streamvi_device_memory_bytes", kind="store_device") > 0
    assert sample(s, "streamvi_uptime_seconds") > 0
    assert sample(s, "streamvi_mtz_written_total") >= 1
    assert sample(s, "streamvi_mtz_errors_total") == 0


def test_quality_metrics_match_the_latest_snapshot(fed_service):
    svc, _ = fed_service
    s = scrape(svc)
    table = svc.latest.stats          # snapshots every 0.5 s: read both close together
    labels = [str(i + 1) for i in range(N_SHELLS)] + ["overall"]
    for name, attr in (("streamvi_completeness", "completeness"),
                       ("streamvi_multiplicity", "multiplicity"),
                       ("streamvi_unique_reflections", "n_unique"),
                       ("streamvi_shell_dmin_angstrom", "d_min")):
        values = list(getattr(table, attr)) + [table.overall[attr]]
        for shell, v in zip(labels, values):
            if not np.isfinite(v):          # e.g. multiplicity of an empty shell
                assert (name, frozenset({("shell", shell)})) not in s
                continue
            # counts and shell edges no longer change once every crystal is stored
            assert sample(s, name, shell=shell) == pytest.approx(v, rel=1e-12), (name, shell)
    assert sample(s, "streamvi_completeness", shell="overall") > 0.05
    assert sample(s, "streamvi_shell_dmin_angstrom", shell=str(N_SHELLS)) == pytest.approx(
        3.0, abs=0.01)
    cc = [v for (name, _), v in s.items() if name in ("streamvi_cc_half", "streamvi_cc_star")]
    assert len(cc) >= 2 and all(-1 <= v <= 1 for v in cc)
    # not anomalous: CCanom is undefined and left out rather than exported as NaN
    assert not any(name == "streamvi_cc_anom" for name, _ in s)
    assert sample(s, "streamvi_snapshot_timestamp_seconds") <= time.time()
    if table.resolution_cc_half is not None:
        assert 2.9 < sample(s, "streamvi_resolution_cc_half_angstrom") < 60


def test_snapshot_change_is_computed_between_snapshots(fed_service):
    svc, _ = fed_service
    first = svc.latest.snapshot_id
    scrape(svc)
    assert svc.wait_until(lambda s: s.latest.snapshot_id > first, 10)
    s = scrape(svc)
    change = sample(s, "streamvi_snapshot_change_relative")
    assert 0 <= change < 1


def test_relative_f_change():
    old = np.array([3.0, 4.0, 100.0])
    new = np.array([3.0, 5.0, -7.0])
    observed = np.array([True, True, False])
    assert relative_f_change(old, new, observed) == pytest.approx(1 / 5)
    assert relative_f_change(old, new, np.zeros(3, bool)) is None


def test_step_histogram_counts_every_step_once(tmp_path):
    with running_service(tmp_path) as svc:
        push(svc, [encode_crystal(c) for c in Feed(n_images=8).crystals])
        assert svc.wait_until(lambda s: s.status()["steps"] > 0, 30)
        for _ in range(6):       # scrapes while training, each must add only new steps
            scrape(svc)
            time.sleep(0.2)
        metrics = svc.metrics_server.metrics
    # stopped: the same collector, one last time, against the final step count
    s = parse_exposition(metrics.exposition().decode())
    steps = svc.engine.trainer.step
    assert 0 < steps <= svc.step_seconds.maxlen
    assert sample(s, "streamvi_training_steps_total") == steps
    assert sample(s, "streamvi_step_duration_seconds_count") == steps
    assert sample(s, "streamvi_step_duration_seconds_sum") == pytest.approx(
        sum(svc.step_seconds), rel=1e-9)


def test_every_family_is_announced_before_any_data(fed_service, tmp_path):
    svc, _ = fed_service
    with running_service(tmp_path) as idle:
        before = get(idle.metrics_server.url + "metrics").decode()
    after = get(svc.metrics_server.url + "metrics").decode()
    names = [{f.name for f in text_string_to_metric_families(t)} for t in (before, after)]
    assert names[0] == names[1]
    s = parse_exposition(before)
    assert sample(s, "streamvi_images_stored") == 0
    assert sample(s, "streamvi_crystals_received_total") == 0
    assert sample(s, "streamvi_ingest_lag_seconds_count") == 0
    assert sample(s, "streamvi_image_visits_count") == 0
    assert not any(name.startswith(("streamvi_cc_", "streamvi_loss")) for name, _ in s)


def test_concurrent_scrapes_while_ingesting_and_training(tmp_path):
    errors: list[BaseException] = []
    seen: list[list[tuple[float, float, float]]] = [[] for _ in range(4)]

    def scraper(out: list) -> None:
        try:
            while not done.is_set():
                s = scrape(svc)
                out.append((sample(s, "streamvi_crystals_received_total"),
                            sample(s, "streamvi_training_steps_total"),
                            sample(s, "streamvi_step_duration_seconds_count")))
                get(svc.metrics_server.url + "api/status")
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)

    feed = Feed(n_images=40)
    with running_service(tmp_path) as svc:
        done = threading.Event()
        threads = [threading.Thread(target=scraper, args=(out,)) for out in seen]
        for t in threads:
            t.start()
        feed.send_and_settle(svc)
        done.set()
        for t in threads:
            t.join(timeout=30)
    assert not errors, errors
    for out in seen:
        assert len(out) >= 2
        for column in range(3):       # counters never go back, whoever scrapes
            values = [v[column] for v in out]
            assert values == sorted(values)
        # the histogram is shared by all scrapers: never more observations than steps taken
        assert all(timed <= steps for _, steps, timed in out)


# ---------------------------------------------------------------------- isolation


def test_two_services_do_not_collide(tmp_path):
    with running_service(tmp_path / "a") as a, running_service(tmp_path / "b") as b:
        fa, fb = Feed(n_images=5, seed=1, run="a"), Feed(n_images=9, seed=2, run="b")
        push(a, fa.frames)
        push(b, fb.frames)
        for svc, feed in ((a, fa), (b, fb)):
            assert svc.wait_until(lambda s, f=feed: s.counters.snapshot()[
                "messages_received"] == len(f.frames), 20)
        sa, sb = scrape(a), scrape(b)
        assert sample(sa, "streamvi_crystals_received_total") == 6
        assert sample(sb, "streamvi_crystals_received_total") == 10
        assert a.metrics_server.port != b.metrics_server.port
        assert a.metrics_server.registry is not b.metrics_server.registry
        # a third registry for the same service is independent, too
        ServiceMetrics(a.snapshot).exposition()
    assert not [m for m in REGISTRY.collect() if m.name.startswith("streamvi")]


# ---------------------------------------------------------------------- real tools


def test_promtool_check_metrics(fed_service):
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not installed (Debian package 'prometheus'; .ci/run installs it)")
    svc, _ = fed_service
    text = get(svc.metrics_server.url + "metrics")
    assert b"streamvi_cc_half{" in text
    res = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True,
                         timeout=30)
    assert res.returncode == 0, res.stdout.decode() + res.stderr.decode()


def test_prometheus_server_scrapes_the_service(fed_service, tmp_path):
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.skip("prometheus not installed (Debian package 'prometheus'; .ci/run installs it)")
    svc, feed = fed_service
    # the deployed configuration, pointed at this service and scraping fast
    config = yaml.safe_load((REPO / "deploy/prometheus/prometheus.yml").read_text())
    config["global"].update(scrape_interval="1s", evaluation_interval="1s")
    job = next(j for j in config["scrape_configs"] if j["job_name"] == "streamvi")
    job["static_configs"] = [{"targets": [f"127.0.0.1:{svc.metrics_server.port}"]}]
    job.update(scrape_interval="1s", scrape_timeout="1s")
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    web = f"127.0.0.1:{free_port()}"
    proc = subprocess.Popen(
        [binary, f"--config.file={tmp_path / 'prometheus.yml'}",
         f"--storage.tsdb.path={tmp_path / 'tsdb'}", f"--web.listen-address={web}",
         "--log.level=warn"],
        stdout=subprocess.DEVNULL, stderr=open(tmp_path / "prometheus.log", "wb"))
    try:
        expected = feed.expected["crystals_received"]
        deadline = time.monotonic() + 60
        result = None
        while time.monotonic() < deadline:
            assert proc.poll() is None, (tmp_path / "prometheus.log").read_text()
            try:
                body = json.loads(get(f"http://{web}/api/v1/query?query="
                                      "streamvi_crystals_received_total", timeout_s=2))
                result = body["data"]["result"]
                if result:
                    break
            except OSError:
                pass
            time.sleep(0.3)
        assert result, "Prometheus returned no streamvi_crystals_received_total within 60 s"
        assert float(result[0]["value"][1]) == expected
        assert result[0]["metric"]["job"] == "streamvi"
        up = json.loads(get(f"http://{web}/api/v1/query?query=up"))["data"]["result"]
        assert [float(r["value"][1]) for r in up] == [1.0]
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_images_rejected_counts_the_stores_latest_verdicts(tmp_path):
    # a service of its own: the verdicts set here must not leak into the shared one
    feed = Feed()
    with running_service(tmp_path) as svc:
        feed.send_and_settle(svc)
        assert sample(scrape(svc), "streamvi_images_rejected") == 0
        with svc.lock:   # the test is off on so few reflections: nothing overwrites these
            assert not svc.engine.trainer.model.reject_images
            svc.engine.store.set_rejected(torch.tensor([0, 2]), torch.tensor([True, True]))
        assert sample(scrape(svc), "streamvi_images_rejected") == 2
        assert svc.status()["images_rejected"] == 2


def test_images_by_setting_follows_the_trainers_choices_at_each_snapshot(tmp_path):
    feed = Feed()
    with running_service(tmp_path, space_group="P 43") as svc:
        feed.send_and_settle(svc)
        with svc.lock:
            n = svc.engine.store.n_images
            svc.engine.snapshot()
        s = scrape(svc)
        total = sum(sample(s, "streamvi_images_by_setting", operator=op)
                    for op in ("h,k,l", "-h,k,-l"))
        assert total == n
        # pin three images in the other setting; the trainer's next visits may choose again,
        # and a snapshot between the pin and the scrape (one every 0.5 s) counts those
        # choices instead: then pin and scrape again (the store's applied settings say)
        for _ in range(10):
            with svc.lock:
                store = svc.engine.store
                store.set_ops(torch.tensor([0, 1, 2]), torch.tensor([1, 1, 1]))
                store.set_ops(torch.tensor([3, 4]), torch.tensor([0, 0]))
                expected = int((store._image_op_t[:n] == 1).sum())
                store.apply_settings()
            scraped = sample(scrape(svc), "streamvi_images_by_setting", operator="-h,k,-l")
            reported = svc.status()["images_by_setting"]["-h,k,-l"]
            with svc.lock:       # the settings counted are still the pinned ones
                if int((store.image_op[:n] == 1).sum()) == expected:
                    break
        else:
            pytest.fail("a snapshot changed the settings between every pin and its scrape")
        assert scraped == reported == expected
    with running_service(tmp_path / "plain") as svc:
        feed.send_and_settle(svc)
        assert not any(name == "streamvi_images_by_setting" for name, _ in scrape(svc))
        assert svc.status()["images_by_setting"] == {}


def test_geometry_refinement_summary(tmp_path):
    """The geometry gauges summarise the store's per-image refinement state; images never
    updated do not count."""
    from streamvi.merging.model.geometry import STATE_WIDTH

    feed = Feed()
    with running_service(tmp_path) as svc:
        feed.send_and_settle(svc)
        s = scrape(svc)
        # so few reflections leave the standardiser warming up: nothing refined yet
        assert sample(s, "streamvi_geometry_refined_images") == 0
        assert sample(s, "streamvi_geometry_rotation_rms_degrees") == 0
        state = torch.zeros((2, STATE_WIDTH))
        state[0, :6] = torch.tensor([1.0, 0.0, 0.0, 1.0, -1.0, 0.5])
        state[1, :6] = torch.tensor([0.0, 2.0, 0.0, 3.0, -1.0, 0.5])
        state[:, -1] = 4.0
        with svc.lock:
            svc.engine.store.set_geometry(torch.tensor([3, 7]), state)
        s = scrape(svc)
    # over all 24 stored images, the 22 unrefined ones at 0
    rotation = np.radians(svc.trainer_config.geometry_rotation_deg) * np.array([1.0, 2.0])
    dilation = svc.trainer_config.geometry_dilation
    assert sample(s, "streamvi_geometry_refined_images") == 2
    assert sample(s, "streamvi_geometry_rotation_rms_degrees") == pytest.approx(
        np.degrees(np.sqrt(np.sum(rotation ** 2) / 24)))
    for axis, values in (("a*", [1.0, 3.0]), ("b*", [-1.0, -1.0]), ("c*", [0.5, 0.5])):
        v = dilation * np.array(values + [0.0] * 22)
        assert sample(s, "streamvi_geometry_axis_change_rms", axis=axis) == pytest.approx(
            np.sqrt(np.mean(v ** 2)))


def test_producer_disconnects_are_counted_on_the_metrics_endpoint(tmp_path):
    """A producer that sends a frame over max_message_bytes is cut off by ZeroMQ before
    anything is read: /metrics counts the closed connection, and a good producer after it
    still gets its crystals in."""
    with running_service(tmp_path, max_message_bytes=20_000) as svc:
        before = scrape(svc)
        assert sample(before, "streamvi_producer_disconnects_total") == 0
        assert sample(before, "streamvi_handshake_failures_total") == 0
        sock = zmq.Context.instance().socket(zmq.PUSH)
        sock.connect(svc.ingestor.bound_endpoints[0])
        sock.send(b"\x00" * 40_000)
        deadline = time.time() + 20
        while time.time() < deadline and svc.ingestor.producer_disconnects < 1:
            time.sleep(0.05)
        sock.close(linger=0)
        after = scrape(svc)
        assert sample(after, "streamvi_producer_disconnects_total") == 1
        assert sample(after, "streamvi_handshake_failures_total") == 0
