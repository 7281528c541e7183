"""The live partiality check (docs/model.md, change 23): ``serve`` restarts its merge with
the geometric partiality, from its spool, over real loopback sockets."""
import dataclasses
import threading

import gemmi
import pytest

from streamvi.cli.main import main
from streamvi.config import load_config
from streamvi.merging import offline
from streamvi.merging.offline import PARTIALITY_CHECK_B, PARTIALITY_CHECK_CRYSTALS
from streamvi.producers.send import send_messages
from streamvi.merging import reach
from streamvi.merging.reach import ReachEvidence
from streamvi.service.partiality import SWITCH_SNAPSHOTS, PartialitySwitch, PartialityWatch
from streamvi.service.service import Service
from streamvi_sim import SimulationConfig, simulate_images, simulate_structure

# CrystFEL partial_sim's kind: every reflection within 2.5 profile widths integrated
SIM = SimulationConfig(n_images=90, seed=6, dmin=3.5, partiality_profile="xsphere",
                       flat_intensities=True, bandwidth=0.01, profile_radius=(0.0003, 0.0006),
                       mosaicity_deg=0.0, orientation_error_deg=0.0, cell_error=0.0,
                       b_image_sd=0.0, outlier_fraction=0.0, misindexed_fraction=0.0,
                       overprediction=2.5)


def test_the_watch_switches_after_a_run_of_suspect_snapshots_only():
    n = PARTIALITY_CHECK_CRYSTALS
    below = PARTIALITY_CHECK_B - 1.0
    watch = PartialityWatch()
    for i in range(SWITCH_SNAPSHOTS - 1):
        assert watch.observe(below, n, step=100 + i) is None
    assert watch.observe(PARTIALITY_CHECK_B + 0.5, n, step=110) is None   # the run breaks
    for i in range(SWITCH_SNAPSHOTS - 1):
        assert watch.observe(below, n, step=200 + i) is None
    switch = watch.observe(below - 2.0, n + 5, step=300)
    assert switch == PartialitySwitch(below - 2.0, n + 5, 300, switch.time)
    assert switch.history_line() == (f"geometric partiality on: without it the scales' "
                                     f"trend gave B {below - 2.0:+.1f} A^2")
    assert PartialitySwitch.from_dict(switch.to_dict()) == switch
    # too few crystals that report their geometry, or no trend yet: never
    watch = PartialityWatch(snapshots=1)
    assert watch.observe(below, n - 1, step=1) is None
    assert watch.observe(None, n, step=1) is None
    with pytest.raises(ValueError, match="snapshots = 0"):
        PartialityWatch(snapshots=0)


def test_the_watch_switches_at_once_on_the_data_s_own_verdict():
    """The observations beyond the reported geometry's reach carry no signal
    (streamvi/merging/reach.py): the switch is made at the first snapshot that sees it,
    with no trend needed; a verdict short of it does nothing; the switch round-trips
    through the checkpoint's dict, and an old dict without a reason reads as the trend's."""
    watch = PartialityWatch()
    empty = ReachEvidence(crystals=reach.REACH_MIN_CRYSTALS, observations=40_000,
                          beyond=reach.REACH_MIN_BEYOND, signal_ratio=-0.001,
                          ratio_error=0.002)
    assert watch.observe_reach(dataclasses.replace(empty, signal_ratio=0.05), None, 10) is None
    switch = watch.observe_reach(empty, None, step=12)
    assert (switch.reason, switch.step, switch.crystals, switch.falloff_b) == (
        "reach", 12, reach.REACH_MIN_CRYSTALS, None)
    assert switch.share_beyond == pytest.approx(reach.REACH_MIN_BEYOND / 40_000)
    assert switch.history_line() == empty.history_line()
    assert PartialitySwitch.from_dict(switch.to_dict()) == switch
    old = {"falloff_b": -9.5, "crystals": 120, "step": 300, "time": 1.0}
    assert PartialitySwitch.from_dict(old) == PartialitySwitch(-9.5, 120, 300, 1.0)


@pytest.fixture(scope="module")
def overpredicted():
    return list(simulate_images(SIM, simulate_structure(SIM)))


def config(tmp_path, **kw):
    base = {"listen": ["tcp://127.0.0.1:*"], "publish_endpoint": "", "metrics_port": -1,
            "out_dir": str(tmp_path), "space_group": SIM.space_group,
            "cell": " ".join(map(str, SIM.cell)), "dmin": SIM.dmin, "device": "cpu",
            "publish_interval": 0.2, "checkpoint_interval": 3600.0, "spool_fsync": "never",
            "d_model": 16, "n_layers": 1, "mc_samples": 2, "batch_images": 4}
    base.update(kw)
    return load_config(env={}, overrides=base)


def test_the_service_merges_again_with_the_geometric_partiality_losing_nothing(
        tmp_path, overpredicted, monkeypatch, capsys):
    """With the bar moved so that these few crystals' trend passes it, the service switches
    while crystals keep arriving: every crystal is merged exactly once (the spool replayed,
    what was still queued not stored twice), the snapshots say why, and a restart resumes
    the switched merge from its checkpoint."""
    monkeypatch.setattr(offline, "PARTIALITY_CHECK_B", 100.0)      # any trend is suspect
    monkeypatch.setattr(offline, "PARTIALITY_CHECK_CRYSTALS", 20)
    first, rest = overpredicted[:40], overpredicted[40:]
    svc = Service(config(tmp_path, metrics_port=0, metrics_host="127.0.0.1")).start()
    try:
        url = svc.ingestor.bound_endpoints[0]
        send_messages(first, url)
        # the rest arrives while the check watches and switches
        sender = threading.Thread(target=send_messages, args=(rest, url),
                                  kwargs={"rate": 40.0})
        sender.start()
        assert svc.wait_until(lambda s: s.partiality_switch is not None, 60), svc.status()
        sender.join()
        assert svc.wait_until(lambda s: s.crystals_merged == len(overpredicted)
                              and s.ingestor.queue_depth == 0, 60), svc.status()
        assert svc.engine.trainer.config.geometric_partiality
        assert svc.engine.store.n_images == len(overpredicted)
        c = svc.counters.snapshot()
        assert c["crystals_received"] == len(overpredicted) and c["duplicates"] == 0
        assert svc.partiality_switch.crystals >= 20
        status = svc.status()
        assert status["partiality_switch"]["falloff_b"] == svc.partiality_switch.falloff_b
        assert status["partiality_advice"] is None
        assert main(["status", svc.metrics_server.url]) == 0       # the crew's terminal
        assert (f"geometric partiality switched on: the scales' trend gave the amplitudes B "
                f"{svc.partiality_switch.falloff_b:+.1f} A^2") in capsys.readouterr().out
        svc.request_publish()
        assert svc.wait_until(lambda s: s.latest is not None and s.latest.history
                              and svc.partiality_switch.history_line() in s.latest.history, 30)
    finally:
        svc.stop()
    history = gemmi.read_mtz_file(str(tmp_path / "latest.mtz")).history
    assert svc.partiality_switch.history_line() in history
    steps = svc.engine.trainer.step
    again = Service(config(tmp_path)).start()
    try:
        assert again.recovered_from_checkpoint
        assert again.partiality_switch == svc.partiality_switch
        assert again.engine.trainer.config.geometric_partiality
        assert again.engine.trainer.step == steps
        assert again.crystals_merged == len(overpredicted)
    finally:
        again.stop()


def test_crystals_spooled_and_still_queued_at_the_switch_are_stored_once(tmp_path, overpredicted):
    """The switch replays the spool while crystals it holds may still wait on the ingest
    queue: those are not stored a second time (nor counted as duplicates).  The training
    thread is not started, so the queue holds them for certain."""
    svc = Service(config(tmp_path))
    svc._recover()
    svc.ingestor.start()
    try:
        send_messages(overpredicted[:50], svc.ingestor.bound_endpoints[0])
        assert svc.wait_until(lambda s: s.ingestor.queue_depth == 50, 30)
        with svc.lock:
            svc._add_many(svc.ingestor.get_batch(max_items=20, timeout=0))
        assert svc.crystals_merged == 20 and svc.ingestor.queue_depth == 30
        svc._switch_partiality(PartialitySwitch(-9.0, 50, svc.engine.trainer.step, 0.0))
        assert svc.crystals_merged == 50        # replayed: every spooled crystal
        send_messages(overpredicted[50:60], svc.ingestor.bound_endpoints[0])
        assert svc.wait_until(lambda s: s.counters.snapshot()["crystals_received"] == 60, 30)
        svc._drain_queue()
        assert svc.crystals_merged == 60 and svc.engine.store.n_images == 60
        assert svc.counters.snapshot()["duplicates"] == 0
        assert svc.engine.trainer.config.geometric_partiality
    finally:
        svc.stop()


def test_with_the_check_off_the_service_keeps_its_merge(tmp_path, overpredicted, monkeypatch,
                                                        capsys):
    monkeypatch.setattr(offline, "PARTIALITY_CHECK_B", 100.0)
    monkeypatch.setattr(offline, "PARTIALITY_CHECK_CRYSTALS", 20)
    svc = Service(config(tmp_path, partiality_check=False, metrics_port=0,
                         metrics_host="127.0.0.1")).start()
    try:
        send_messages(overpredicted[:40], svc.ingestor.bound_endpoints[0])
        assert svc.wait_until(lambda s: s.crystals_merged == 40 and s.latest is not None
                              and s.engine.trainer.step > 100, 60)
        assert svc.partiality_switch is None
        assert not svc.engine.trainer.config.geometric_partiality
        assert "--geometric-partiality" in svc.status()["partiality_advice"]
        assert main(["status", svc.metrics_server.url]) == 0
        assert "advice: " in capsys.readouterr().out
    finally:
        svc.stop()


# the same kind with more photons: at 100 crystals the observations beyond reach are many
# and their emptiness is sure (mean I/σ −0.009 ± 0.006 of the near-full ones')
BRIGHT = dataclasses.replace(SIM, n_images=130, top_shell_photons=100.0)


def test_the_service_switches_on_the_data_s_own_verdict_after_a_hundred_crystals(
        tmp_path, monkeypatch, capsys):
    """No trend needed (the bar is put out of reach): once 100 crystals are in, the first
    snapshot reads the data's verdict and the service merges again with the geometric
    partiality; every crystal is merged once, the crew's terminal and the MTZ say why."""
    monkeypatch.setattr(offline, "PARTIALITY_CHECK_B", -1e9)
    crystals = list(simulate_images(BRIGHT, simulate_structure(BRIGHT)))
    svc = Service(config(tmp_path, metrics_port=0, metrics_host="127.0.0.1")).start()
    try:
        url = svc.ingestor.bound_endpoints[0]
        send_messages(crystals[:60], url)
        assert svc.wait_until(lambda s: s.crystals_merged == 60 and s.latest is not None, 60)
        assert svc.partiality_switch is None            # 60 crystals: no verdict yet
        send_messages(crystals[60:], url)
        assert svc.wait_until(lambda s: s.partiality_switch is not None, 60), svc.status()
        assert svc.wait_until(lambda s: s.crystals_merged == len(crystals)
                              and s.ingestor.queue_depth == 0, 60), svc.status()
        switch = svc.partiality_switch
        assert switch.reason == "reach" and switch.crystals >= reach.REACH_MIN_CRYSTALS
        assert switch.signal_ratio < reach.REACH_SIGNAL_RATIO
        assert svc.engine.trainer.config.geometric_partiality
        assert svc.engine.store.n_images == len(crystals)
        assert svc.counters.snapshot()["duplicates"] == 0
        assert svc.status()["partiality_switch"]["reason"] == "reach"
        assert main(["status", svc.metrics_server.url]) == 0
        assert "lie beyond its reach and carry no signal" in capsys.readouterr().out
        svc.request_publish()
        assert svc.wait_until(lambda s: s.latest is not None and s.latest.history
                              and switch.history_line() in s.latest.history, 30)
    finally:
        svc.stop()
    assert switch.history_line() in gemmi.read_mtz_file(str(tmp_path / "latest.mtz")).history
