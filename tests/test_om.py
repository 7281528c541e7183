"""OM bridge, fed by OM's own code: ZmqDataBroadcaster on loopback, messages made the way
OM's crystallography monitor makes them (EventCounter, CrystallographyPlots), counts checked
against OM's own counters."""
from __future__ import annotations

import logging
import pickle
import socket
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
from prometheus_client import CollectorRegistry, generate_latest

from streamvi.errors import ConfigError
from streamvi.ingest.counters import IngestCounters
from streamvi.publish.metrics import om_families
from streamvi.sources import plugin_module

try:
    import streamvi_om
except ImportError:  # plugins/om not yet installed as a package: use the source tree
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "plugins" / "om"))
    import streamvi_om

from streamvi_om import OmBridge, new_events, om_status

TIMEOUT_S = 5.0
WINDOW = 20            # OM's running_average_window_size
BROADCAST_EVERY = 50   # OM's data_broadcast_interval


@pytest.fixture(scope="module")
def om() -> SimpleNamespace:
    """OM's modules (ondamonitor 23.8.3), or a skip saying why they cannot be used."""
    saved_hook = sys.excepthook
    mp = pytest.MonkeyPatch()
    # OM 23.8 was written for numpy 1.x: it names numpy.float_ (removed in numpy 2) in
    # annotations and in a typing.cast inside CrystallographyPlots.update_plots, so the alias
    # is put back while this module's tests run.
    if not hasattr(np, "float_"):
        mp.setattr(np, "float_", np.float64, raising=False)
    try:
        import om as om_package
        from om.lib.crystallography import CrystallographyPlots
        from om.lib.event_management import EventCounter
        from om.lib.geometry import DataVisualizer
        from om.lib.zmq import ZmqDataBroadcaster
    except ImportError as exc:
        mp.undo()
        pytest.skip(f"OM is not importable ({exc}); pip install ondamonitor==23.8.3")
    finally:
        sys.excepthook = saved_hook  # om.lib.rich_console installs rich's traceback hook
    yield SimpleNamespace(version=om_package.__version__, EventCounter=EventCounter,
                          ZmqDataBroadcaster=ZmqDataBroadcaster,
                          CrystallographyPlots=CrystallographyPlots,
                          DataVisualizer=DataVisualizer)
    mp.undo()


def free_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"tcp://127.0.0.1:{s.getsockname()[1]}"


class OmMonitor:
    """OM's crystallography collecting node, reduced to what goes into ``omdata``.

    Mirrors ``CrystallographyProcessing.collect_data`` of OM 23.8.3 with OM's own classes:
    EventCounter counts and decides when to broadcast, CrystallographyPlots keeps the
    hit-rate histories (and the powder plot and peakogram), ZmqDataBroadcaster sends.
    """

    def __init__(self, om: SimpleNamespace, url: str, *, pump_probe: bool = False):
        ss, fs = np.mgrid[0:20, 0:30].astype(np.float64)
        x, y = fs - 15.0, ss - 10.0
        pixel_maps = {"x": x, "y": y, "z": np.zeros_like(x), "radius": np.hypot(x, y),
                      "phi": np.arctan2(y, x)}
        self.plots = om.CrystallographyPlots(
            parameters={"running_average_window_size": WINDOW},
            data_visualizer=om.DataVisualizer(pixel_maps=pixel_maps),
            pump_probe_experiment=pump_probe, bin_size=1)
        self.counter = om.EventCounter(om_parameters={"data_broadcast_interval": BROADCAST_EVERY,
                                                      "speed_report_interval": 0},
                                       node_pool_size=2)
        self.broadcaster = om.ZmqDataBroadcaster(parameters={"data_broadcast_url": url})
        self.pump_probe = pump_probe

    def event(self, timestamp: float, hit: bool, laser_on: bool = True) -> dict | None:
        """Process one event; the omdata message if OM would broadcast now."""
        if hit:
            self.counter.add_hit_event()
        else:
            self.counter.add_non_hit_event()
        n = 1 if hit else 0
        peaks = {"num_peaks": n, "fs": [3.0] * n, "ss": [4.0] * n, "intensity": [900.0] * n,
                 "num_pixels": [3] * n, "max_pixel_intensity": [400.0] * n, "snr": [9.0] * n}
        (t, r, t_dark, r_dark, powder, peakogram, radius_bin, intensity_bin, _, _) = \
            self.plots.update_plots(timestamp=timestamp, peak_list=peaks, frame_is_hit=hit,
                                    optical_laser_active=laser_on)
        if not self.counter.should_broadcast_data():
            return None
        message: dict[str, Any] = {
            "geometry_is_optimized": True, "timestamp": timestamp,
            "hit_rate_timestamp_history": t, "hit_rate_history": r,
            "virtual_powder_plot": powder, "beam_energy": 9500.0, "detector_distance": 150.0,
            "detector_distance_offset": 0.0, "pixel_size": 1.0 / 5814.0,
            "pump_probe_experiment": self.pump_probe,
            "start_timestamp": self.counter.get_start_timestamp(), "peakogram": peakogram,
            "peakogram_radius_bin_size": radius_bin,
            "peakogram_intensity_bin_size": intensity_bin}
        if self.pump_probe:
            message["hit_rate_timestamp_history_dark"] = t_dark
            message["hit_rate_history_dark"] = r_dark
        return message

    def send(self, message: dict) -> None:
        self.broadcaster.send_data(tag="omdata", message=message)

    def close(self) -> None:
        # ZmqDataBroadcaster has no close(); its socket and context are released here.
        self.broadcaster._sock.close(linger=0)
        self.broadcaster._context.term()


@pytest.fixture
def monitor_and_bridge(om):
    url = free_url()
    monitor = OmMonitor(om, url)
    bridge = OmBridge(url, allow_pickle=True).start()
    yield monitor, bridge
    bridge.stop()
    monitor.close()


def run_events(monitor: OmMonitor, n: int, seed: int, *, laser=lambda i: True) -> list[dict]:
    rng = np.random.default_rng(seed)
    hits = rng.random(n) < 0.3
    out = []
    for i in range(n):
        message = monitor.event(1.7e9 + 0.01 * i, bool(hits[i]), laser(i))
        if message is not None:
            out.append(pickle.loads(pickle.dumps(message)))  # frozen as sent
    return out


def send_all(monitor: OmMonitor, bridge: OmBridge, messages: list[dict]) -> None:
    """Deliver each message, sending it again until the bridge shows it.

    OM's PUB socket keeps one message (high-water mark 1) and drops what it cannot queue: the
    first sends go nowhere until the subscription is in place, and a broadcast right after
    another can be dropped.  Copies that do arrive twice add no events (the histories match).
    A message has arrived when the bridge's latest event timestamp is the message's.
    """
    for message in messages:
        for _ in range(int(TIMEOUT_S / 0.1)):
            monitor.send(message)
            if wait_until(lambda: bridge.snapshot()["timestamp"] == message["timestamp"], 0.1):
                break
        else:
            pytest.fail(f"OM's broadcast did not reach the bridge in {TIMEOUT_S} s")


def wait_until(predicate, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.005)
    return True


class Collector:
    """The service's OM families, as its collector builds them from the status."""

    def __init__(self, bridge, counters):
        self.bridge, self.counters = bridge, counters

    def collect(self):
        return om_families(om_status(self.bridge,
                                     self.counters.snapshot()["crystals_received"]))


def test_counts_and_figures_match_om(om, monitor_and_bridge):
    monitor, bridge = monitor_and_bridge
    messages = run_events(monitor, 1000, seed=3)
    assert len(messages) == 1000 // BROADCAST_EVERY
    del messages[7]   # one broadcast lost: the history still overlaps, counts stay exact
    send_all(monitor, bridge, messages)

    snap = bridge.snapshot()
    t = np.asarray(monitor.plots._hit_rate_timestamp_history)
    r = np.asarray(monitor.plots._hit_rate_history)
    assert snap["events"] == monitor.counter.get_num_events() == 1000
    assert snap["counts_exact"] is True
    assert snap["hit_rate"] == r[-1] / 100.0
    assert snap["hits"] == pytest.approx(r[t != 0].sum() / 100.0, rel=1e-12)
    # the running average lags: hits of the last window are only partly counted
    true_hits = monitor.counter.get_num_hits()
    assert 0 <= true_hits - snap["hits"] <= WINDOW
    assert (snap["beam_energy_eV"], snap["detector_distance_mm"]) == (9500.0, 150.0)
    assert snap["detector_distance_offset_m"] == 0.0
    assert snap["timestamp"] == messages[-1]["timestamp"]
    assert snap["start_timestamp"] == monitor.counter.get_start_timestamp()
    assert snap["malformed"] == 0 and snap["restarts"] == 0 and snap["pump_probe"] is False
    assert snap["history"]["timestamp"] == t[t != 0][-600:].tolist()
    assert snap["history"]["hit_rate"] == (r[t != 0][-600:] / 100.0).tolist()
    assert bridge.indexing_yield(150) == pytest.approx(150 / snap["hits"])


def test_pump_probe_counts_light_and_dark(om):
    url = free_url()
    monitor = OmMonitor(om, url, pump_probe=True)
    bridge = OmBridge(url, allow_pickle=True).start()
    try:
        messages = run_events(monitor, 400, seed=5, laser=lambda i: i % 3 != 0)
        send_all(monitor, bridge, messages)
        snap = bridge.snapshot()
        assert snap["events"] == 400 and snap["counts_exact"] is True and snap["pump_probe"]
        assert snap["hit_rate_dark"] == monitor.plots._hit_rate_history_dark[-1] / 100.0
        assert snap["hit_rate"] == monitor.plots._hit_rate_history[-1] / 100.0
    finally:
        bridge.stop()
        monitor.close()


def test_refuses_pickle_unless_allowed():
    with pytest.raises(ConfigError) as err:
        OmBridge("tcp://127.0.0.1:12321")
    text = str(err.value)
    assert "pickle" in text and "om_allow_pickle" in text and "allow_pickle=True" in text
    # the service finds the bridge through the entry point and refuses the same way
    with pytest.raises(ConfigError, match="om_allow_pickle"):
        plugin_module("om").OmBridge("tcp://127.0.0.1:12321", allow_pickle=False)


def test_warns_when_pickle_is_allowed(caplog):
    with caplog.at_level(logging.WARNING, logger="streamvi_om"):
        bridge = OmBridge(free_url(), allow_pickle=True)
    bridge.stop()
    assert any("unpickling" in r.getMessage() and r.levelno == logging.WARNING
               for r in caplog.records)


class _Payload:
    """A pickle whose loading would create a file (what an attacker's message would do)."""

    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        return (Path.touch, (self.path,))


def test_foreign_objects_are_not_loaded(om, monitor_and_bridge, tmp_path):
    monitor, bridge = monitor_and_bridge
    messages = run_events(monitor, 100, seed=1)
    send_all(monitor, bridge, messages[:1])
    target = tmp_path / "pwned"
    for _ in range(int(TIMEOUT_S / 0.1)):
        monitor.broadcaster.send_data(tag="omdata", message={"x": _Payload(target)})
        if wait_until(lambda: bridge.snapshot()["malformed"] > 0, 0.1):
            break
    send_all(monitor, bridge, messages[1:])
    snap = bridge.snapshot()
    assert not target.exists()
    assert snap["malformed"] >= 1 and snap["events"] == 100
    assert snap["hit_rate"] == messages[-1]["hit_rate_history"][-1] / 100.0


def test_service_wiring(om):
    url = free_url()
    monitor = OmMonitor(om, url)
    counters = IngestCounters()
    bridge = plugin_module("om").OmBridge(url, allow_pickle=True).start()
    try:
        registry = CollectorRegistry()
        registry.register(Collector(bridge, counters))
        text = generate_latest(registry).decode()
        assert "# TYPE streamvi_om_hit_rate gauge" in text
        assert "streamvi_om_events_total 0.0" in text
        send_all(monitor, bridge, run_events(monitor, 200, seed=2))
        status = om_status(bridge, counters.snapshot()["crystals_received"])
        assert status["events"] == 200 and status["crystals_received"] == 0
        assert status["indexing_yield"] == 0.0
        text = generate_latest(registry).decode()
        assert "streamvi_om_events_total 200.0" in text
        assert f"streamvi_om_hit_rate {status['hit_rate']!r}" in text
        assert "streamvi_indexing_yield 0.0" in text
        assert f"streamvi_om_messages_total {float(status['messages'])!r}" in text
    finally:
        bridge.stop()
        monitor.close()
    assert om_families(None) == []          # no bridge: no OM families


def test_history_overlap_rules():
    t_old = np.r_[np.zeros(6), np.arange(1.0, 5.0)]
    r_old = np.r_[np.zeros(6), [10.0, 20.0, 20.0, 30.0]]
    t_new = np.r_[t_old[3:], [5.0, 6.0, 7.0]]
    r_new = np.r_[r_old[3:], [30.0, 40.0, 40.0]]
    assert new_events(None, None, t_old, r_old) == (4, True)
    assert new_events(t_old, r_old, t_new, r_new) == (3, True)
    assert new_events(t_old, r_old, t_old, r_old) == (0, True)
    full = np.arange(20.0, 30.0)
    assert new_events(t_old, r_old, full, np.ones(10)) == (10, False)   # no overlap: lower bound
    assert new_events(None, None, full, np.ones(10)) == (10, False)
