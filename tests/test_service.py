"""The service end to end over real loopback sockets: simulated crystals in, MTZ out."""
import threading
import time

import gemmi
import pytest
import reciprocalspaceship as rs

from streamvi.config import load_config
from streamvi.errors import ConfigError
from streamvi.quality.evaluate import average_merge, compare_to_truth
from streamvi.producers.send import send_messages
from streamvi.service.service import Service
from streamvi_sim import SimulationConfig, simulate_images, simulate_structure

SIM = SimulationConfig(n_images=120, seed=3, dmin=3.0)


@pytest.fixture(scope="module")
def beamtime():
    truth = simulate_structure(SIM)
    return truth, list(simulate_images(SIM, truth))


def config(tmp_path, **kw):
    base = {"listen": ["tcp://127.0.0.1:*"], "publish_endpoint": "", "metrics_port": -1,
            "out_dir": str(tmp_path), "space_group": SIM.space_group,
            "cell": " ".join(map(str, SIM.cell)), "dmin": SIM.dmin, "anomalous": True,
            "device": "cpu", "mc_samples": 4, "publish_interval": 0.5,
            "checkpoint_interval": 1000.0}
    base.update(kw)
    return load_config(env={}, overrides=base)


def test_stream_in_mtz_out_while_running(tmp_path, beamtime):
    truth, crystals = beamtime
    service = Service(config(tmp_path)).start()
    try:
        endpoint = service.ingestor.bound_endpoints[0]
        sender = threading.Thread(target=send_messages, args=(crystals, endpoint),
                                  kwargs={"rate": 100.0})
        sender.start()
        seen_snapshots = set()
        latest = tmp_path / "latest.mtz"
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and (sender.is_alive() or service.status()["steps"] < 500):
            if latest.exists():       # readable at any moment, by both readers
                mtz = gemmi.read_mtz_file(str(latest))
                seen_snapshots.add(tuple(mtz.history))
                assert len(rs.read_mtz(str(latest))) > 0
            time.sleep(0.1)
        sender.join()
        assert service.crystals_merged == len(crystals)
        assert service.all_visited(5)
    finally:
        service.stop()
    assert len(seen_snapshots) >= 2, "latest.mtz was not replaced while the stream ran"
    c = service.counters.snapshot()
    assert c["crystals_received"] == len(crystals)
    assert c["reflections_received"] == sum(len(m) for m in crystals)
    merged = rs.read_mtz(str(tmp_path / "latest.mtz"))
    cmp = compare_to_truth(merged, truth.to_dataset())
    # 120 images to 3 Å is little data: an unweighted average reaches CC 0.55, the offline
    # merge 0.59 after 300 steps (measured); online, with data arriving during training and
    # a loaded machine, 0.52-0.60 was seen: the service must come close to the average
    baseline = compare_to_truth(average_merge(crystals, service.engine.space, weighting="mean"),
                                truth.to_dataset())
    assert cmp["cc_F"] > baseline["cc_F"] - 0.06, (cmp["cc_F"], baseline["cc_F"])
    assert (tmp_path / "checkpoint.pt").exists()


def test_restart_resumes_without_counting_twice(tmp_path, beamtime):
    _, crystals = beamtime
    part = crystals[:40]
    service = Service(config(tmp_path)).start()
    try:
        send_messages(part, service.ingestor.bound_endpoints[0])
        assert service.wait_until(lambda s: s.crystals_merged == len(part), timeout=20)
    finally:
        service.stop()
    steps = service.engine.trainer.step
    again = Service(config(tmp_path)).start()
    try:
        assert again.recovered_from_checkpoint
        assert again.crystals_merged == len(part)
        assert again.engine.trainer.step == steps
        # a producer that resends everything after the restart: duplicates are not merged
        send_messages(crystals[:60], again.ingestor.bound_endpoints[0])
        assert again.wait_until(lambda s: s.crystals_merged == 60, timeout=20)
        assert again.wait_until(lambda s: s.counters.snapshot()["duplicates"] == 40, timeout=20)
    finally:
        again.stop()
    assert again.engine.store.n_images == 60


def test_bad_configuration_is_refused_with_the_key_named(tmp_path):
    with pytest.raises(ConfigError, match="P 43 21 3|space group"):
        Service(config(tmp_path, space_group="P 43 21 3"))
    with pytest.raises(ConfigError, match="space_group is required"):
        Service(config(tmp_path, space_group=""))
    with pytest.raises(ConfigError, match="sync_free_steps = 'sometimes'"):
        Service(config(tmp_path, sync_free_steps="sometimes"))
    assert Service(config(tmp_path / "on", sync_free_steps="on")).trainer_config.sync_free
    assert Service(config(tmp_path / "auto")).trainer_config.sync_free is None
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(ConfigError, match="out_dir .*not writable"):
        Service(config(tmp_path, out_dir=str(blocker / "sub")))
    first = Service(config(tmp_path / "a", listen=["tcp://127.0.0.1:*"])).start()
    try:
        port = first.ingestor.bound_endpoints[0]
        with pytest.raises(ConfigError, match=port.rsplit(":", 1)[1]):
            Service(config(tmp_path / "b", listen=[port])).start()
    finally:
        first.stop()


def test_reference_is_read_at_start_and_given_to_the_engine(tmp_path, beamtime):
    truth, crystals = beamtime
    with pytest.raises(ConfigError, match="reference .*missing.mtz: cannot read it as MTZ"):
        Service(config(tmp_path, reference=str(tmp_path / "missing.mtz")))
    ref = tmp_path / "truth.mtz"
    truth.to_mtz(ref)
    with pytest.raises(ConfigError, match="no column NOPE"):
        Service(config(tmp_path, reference=str(ref), reference_column="NOPE"))
    with pytest.raises(ConfigError, match="truth.mtz.*not the merge's"):
        Service(config(tmp_path, reference=str(ref), space_group="P 3",
                       cell="60 60 45 90 90 120"))
    # P 4₃ has the ambiguity k,h,-l that P 4₃2₁2 has not: there the reference is used
    service = Service(config(tmp_path / "p43", reference=str(ref), space_group="P 43"))
    engine = service._make_engine(service.cell)
    assert engine.reference is not None and engine.space.n_ops == 2
    assert engine.reference.n_rows > 1000


# ---------------------------------------------------------------------------- issue 18
# The first hour at a beamline: set-up mistakes fail loudly, nothing is merged wrong or lost.

import copy          # noqa: E402
import json          # noqa: E402
import logging       # noqa: E402
import subprocess    # noqa: E402
import sys           # noqa: E402
import urllib.error  # noqa: E402
import urllib.request  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np   # noqa: E402

from conftest import SHARED_DATA, make_crystal  # noqa: E402
from streamvi.cli.main import main as cli_main  # noqa: E402
from streamvi.ingest.deadletter import read_dead_letters  # noqa: E402
from streamvi.wire import encode_crystal  # noqa: E402

LCLS = SHARED_DATA / "crystfel" / "5ht2b_lcls_32crystals.stream"
needs_lcls = pytest.mark.skipif(not LCLS.exists(), reason="the GPL-3.0 5-HT2B stream lives in "
                                "../shared/data only (it may not be copied into the tests)")


def small(tmp_path, **kw):
    """A small, fast service configuration (no cell unless given)."""
    base = {"listen": ["tcp://127.0.0.1:*"], "publish_endpoint": "", "metrics_port": -1,
            "out_dir": str(tmp_path), "space_group": "P 43 21 2", "dmin": 3.0,
            "device": "cpu", "publish_interval": 0.3, "checkpoint_interval": 3600.0,
            "spool_fsync": "never", "d_model": 16, "n_layers": 1, "mc_samples": 2,
            "batch_images": 4, "consensus_wait": 1.0}
    base.update(kw)
    return load_config(env={}, overrides=base)


def invariant(svc) -> tuple[int, int]:
    """(received, merged + duplicates + rejected): equal whenever the queue is empty."""
    c = svc.counters.snapshot()
    return (c["crystals_received"],
            svc.crystals_merged + c["duplicates"] + sum(c["crystals_rejected"].values()))


def settled(svc, received: int) -> bool:
    c = svc.counters.snapshot()
    return (c["crystals_received"] == received and svc.ingestor.queue_depth == 0
            and invariant(svc)[0] == invariant(svc)[1])


def http_get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def _first_line(proc: subprocess.Popen, timeout_s: float) -> str:
    """The first line a subprocess prints, or a test failure after ``timeout_s``."""
    got: list[str] = []
    reader = threading.Thread(target=lambda: got.append(proc.stdout.readline()), daemon=True)
    reader.start()
    reader.join(timeout_s)
    if not got or not got[0]:
        proc.kill()
        pytest.fail(f"no start line from the service within {timeout_s:g} s "
                    f"(exit status {proc.poll()})")
    return got[0]


@needs_lcls
def test_5ht2b_without_a_cell_merges_all_32_crystals_from_the_command_line(tmp_path):
    """Item 1, done means: `serve --space-group 'C 2 2 21' --dmin 2.5` with no --cell, fed
    the real stream by `streamvi send`, merges all 32 crystals in a consensus cell."""
    out = tmp_path / "out"
    serve = subprocess.Popen(
        [sys.executable, "-m", "streamvi", "serve", "--space-group", "C 2 2 21", "--dmin", "2.5",
         "--out-dir", str(out), "--listen", "tcp://127.0.0.1:*", "--publish-endpoint", "",
         "--metrics-port", "0", "--publish-interval", "0.5", "--consensus-wait", "1"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    # its log is read all along: a full pipe would block the service mid-write
    log_lines: list[str] = []
    drain = threading.Thread(target=lambda: log_lines.extend(serve.stderr), daemon=True)
    drain.start()
    try:
        started = json.loads(_first_line(serve, timeout_s=60))
        assert cli_main(["send", str(LCLS), "--to", started["listening"][0],
                         "--timeout", "30"]) == 0
        deadline = time.monotonic() + 90
        status = {}
        while time.monotonic() < deadline:
            status = json.loads(http_get(started["http"] + "api/status")[1])
            if status["status"]["crystals_merged"] == 32 and status["snapshot"]:
                break
            time.sleep(0.3)
        assert status["status"]["crystals_merged"] == 32, status["status"]
        assert status["status"]["state"] == "merging" and status["status"]["failure"] is None
        assert status["status"]["counters"]["crystals_rejected"] == {}
        cell = status["merge"]["cell"]
        from streamvi.merging.offline import load_files
        first = np.array([m.cell for m in load_files([LCLS]).crystals[:16]])
        # the median of the first 16 crystals; orthorhombic: the angles become 90°
        expected = list(np.median(first, axis=0)[:3]) + [90.0, 90.0, 90.0]
        assert cell == pytest.approx(expected, abs=1e-6), cell
        assert cell == pytest.approx([61.4, 122.6, 168.0, 90, 90, 90], rel=0.01)  # the target
        assert status["merge"]["cell_source"] == "consensus of 16 crystals"
        assert http_get(started["http"] + "healthz") == (200, b"ok\n")
        # item 8: the same stream under another name is recognised, not merged twice
        assert cli_main(["send", str(LCLS), "--to", started["listening"][0], "--run", "copy",
                         "--timeout", "30"]) == 0
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            status = json.loads(http_get(started["http"] + "api/status")[1])["status"]
            if status["counters"]["crystals_received"] == 64:
                break
            time.sleep(0.2)
        assert status["crystals_merged"] == 32 and status["counters"]["duplicates"] == 32
        assert status["duplicates_by_content"] == 32
    finally:
        serve.terminate()
        serve.wait(timeout=60)
        drain.join(timeout=10)
    err = "".join(log_lines)
    assert serve.returncode == 0, err
    assert "training loop error" not in err and "Traceback" not in err, err
    assert err.count("cell from the first 16 crystals") == 1, err
    merged = rs.read_mtz(str(out / "latest.mtz"))
    assert merged.cell.parameters == pytest.approx(tuple(cell), abs=1e-3)
    assert merged.spacegroup.xhm() == "C 2 2 21"
    # item 9: the run's name and the crystals' mean wavelength (~9.51 keV: 1.3037 Å)
    mtz = gemmi.read_mtz_file(str(out / "latest.mtz"))
    assert mtz.datasets[-1].crystal_name == "5ht2b_lcls_32crystals"
    assert mtz.datasets[-1].wavelength == pytest.approx(12398.42 / 9510.23, abs=2e-4)


def test_the_simulators_stream_without_a_cell_is_merged_whole(tmp_path):
    """Item 1: simulated cells have a != b by 0.01-0.2 Å; the consensus is symmetrised."""
    stream = tmp_path / "sim.stream"
    assert cli_main(["simulate", "--images", "40", "--seed", "5", "--dmin", "3.0",
                     "-o", str(stream)]) == 0
    svc = Service(small(tmp_path / "out")).start()
    try:
        assert cli_main(["send", str(stream), "--to", svc.ingestor.bound_endpoints[0],
                         "--timeout", "30"]) == 0
        assert svc.wait_until(lambda s: s.crystals_merged == 40, 60), svc.status()
        st = svc.status()
        assert st["counters"]["crystals_rejected"] == {} and st["failure"] is None
        a, b, c, *angles = svc.engine.space.cell.parameters
        assert a == b and a == pytest.approx(79.1, abs=0.2) and angles == [90, 90, 90]
    finally:
        svc.stop()


def test_a_hostile_first_crystal_neither_sets_the_cell_nor_is_merged(tmp_path, caplog):
    """Items 1 and 11: the consensus is a median; the odd crystal is refused, counted,
    dead-lettered, and does not claim its identity."""
    caplog.set_level(logging.INFO)
    rng = np.random.default_rng(3)
    msgs = [make_crystal(rng, n=80, image=f"img{i}", hmax=9,
                         cell=(79.1 + rng.normal(0, 0.1), 79.1 + rng.normal(0, 0.1), 37.9,
                               90.2, 89.9, 90.1)) for i in range(20)]
    hostile = copy.deepcopy(msgs[0])
    hostile.cell = (61.4, 122.6, 168.0, 90.0, 90.0, 90.0)
    svc = Service(small(tmp_path)).start()
    try:
        send_messages([hostile] + msgs, svc.ingestor.bound_endpoints[0])
        assert svc.wait_until(lambda s: settled(s, 21), 60), svc.status()
        assert svc.crystals_merged == 20             # img0 merged: the hostile copy claimed nothing
        c = svc.counters.snapshot()
        assert c["crystals_rejected"] == {"cell_mismatch": 1} and c["duplicates"] == 0
        assert svc.engine.space.cell.parameters[0] == pytest.approx(79.1, abs=0.1)
        (letter,) = read_dead_letters(tmp_path / "dead-letter.jsonl")
        assert letter["reason"] == "cell_mismatch" and "img0" in letter["detail"]
        assert sum("disagree" in r.getMessage() for r in caplog.records) == 1
    finally:
        svc.stop()


def test_crystals_of_another_form_are_refused_not_merged(tmp_path, caplog):
    """Item 5: crystals far from the set-up's cell are rejected with a counted reason and
    logged (a few lines, not one per crystal), and the merge stays empty."""
    caplog.set_level(logging.INFO)
    rng = np.random.default_rng(4)
    foreign = [make_crystal(rng, n=80, image=f"f{i}", hmax=9,
                            cell=(61.4, 122.6, 168.0, 90, 90, 90)) for i in range(40)]
    svc = Service(small(tmp_path, cell="79.1 79.1 37.9 90 90 90", metrics_port=0)).start()
    try:
        send_messages(foreign, svc.ingestor.bound_endpoints[0])
        assert svc.wait_until(lambda s: settled(s, 40), 60), svc.status()
        assert svc.crystals_merged == 0
        assert svc.counters.snapshot()["crystals_rejected"] == {"cell_mismatch": 40}
        assert len(read_dead_letters(tmp_path / "dead-letter.jsonl")) == 40
        lines = [r for r in caplog.records if "rejected a crystal" in r.getMessage()]
        assert 1 <= len(lines) <= 10, len(lines)
        # an error that can only show at the first crystals: the service says it is failed
        st = svc.status()
        assert st["state"] == "failed" and "61.4 122.6 168" in st["failure"], st["failure"]
        code, body = http_get(svc.metrics_server.url + "healthz")
        assert code == 503 and b"cell_mismatch" in body
        # crystals of the right form: merged, and the service is running again
        rng = np.random.default_rng(44)
        send_messages([make_crystal(rng, n=80, image=f"g{i}", hmax=9) for i in range(4)],
                      svc.ingestor.bound_endpoints[0])
        assert svc.wait_until(lambda s: s.crystals_merged == 4 and s.failure is None, 30)
        assert http_get(svc.metrics_server.url + "healthz")[0] == 200
    finally:
        svc.stop()


@pytest.mark.parametrize("poison", [1e9, -1e6])
def test_a_poisoned_early_crystal_is_refused(tmp_path, beamtime, poison):
    """Item 2: one valid crystal with absurd intensities, first in the stream, is refused
    (the CC cost of the alternative is measured in tests/test_standardize.py's notes)."""
    _, crystals = beamtime
    bad = copy.deepcopy(crystals[0])
    bad.image = "poisoned"
    bad.I[:] = poison
    svc = Service(small(tmp_path, cell=" ".join(map(str, SIM.cell)))).start()
    try:
        send_messages([bad] + crystals[1:30], svc.ingestor.bound_endpoints[0])
        assert svc.wait_until(lambda s: settled(s, 30), 60), svc.status()
        assert svc.crystals_merged == 29
        assert svc.counters.snapshot()["crystals_rejected"] == {"intensity_outlier": 1}
        assert "poisoned" not in {k[1] for k in svc.engine.store.keys}
        assert svc.engine.trainer.standardizer.intensity_scale() < 1e3
    finally:
        svc.stop()


def test_the_same_crystals_under_another_name_are_duplicates_and_not_spooled(tmp_path):
    """Items 8 and 11: a stream sent again as another file is recognised by content; the
    copies are counted as duplicates and never reach the spool (a flood cannot fill it)."""
    rng = np.random.default_rng(6)
    msgs = [make_crystal(rng, n=60, image=f"img{i}", hmax=9) for i in range(20)]
    renamed = [copy.deepcopy(m) for m in msgs]
    for m in renamed:
        m.run = "copy-of-r1"
    svc = Service(small(tmp_path, cell="79.1 79.1 37.9 90 90 90")).start()
    try:
        url = svc.ingestor.bound_endpoints[0]
        send_messages(msgs, url)
        assert svc.wait_until(lambda s: settled(s, 20) and s.crystals_merged == 20, 60)
        for _ in range(3):                       # a flood of resends, renamed or not
            send_messages(renamed + msgs, url)
        assert svc.wait_until(lambda s: settled(s, 140), 60), svc.status()
        c = svc.counters.snapshot()
        assert svc.crystals_merged == 20 and c["duplicates"] == 120
        assert c["duplicates_not_spooled"] == 120 and svc.spool.n_records == 20
        assert svc.status()["duplicates_by_content"] >= 60
    finally:
        svc.stop()
    again = Service(small(tmp_path, cell="79.1 79.1 37.9 90 90 90")).start()
    try:          # the counts survive a restart, and the spool replays only the originals
        assert again.crystals_merged == 20 and invariant(again) == (140, 140)
    finally:
        again.stop()


def test_a_crystal_with_no_reflection_in_the_table_is_counted(tmp_path):
    """Item 11: received = merged + duplicates + rejected holds for such crystals."""
    rng = np.random.default_rng(7)
    msgs = [make_crystal(rng, n=60, image=f"img{i}", hmax=9) for i in range(17)]
    far = make_crystal(rng, n=5, image="far")
    far.h[:], far.k[:], far.l[:] = 60, 60, 30             # beyond 3 Å
    svc = Service(small(tmp_path, cell="79.1 79.1 37.9 90 90 90")).start()
    try:
        send_messages(msgs + [far], svc.ingestor.bound_endpoints[0])
        assert svc.wait_until(lambda s: settled(s, 18), 60), svc.status()
        assert svc.crystals_merged == 17
        assert svc.counters.snapshot()["crystals_rejected"] == {"outside_table": 1}
    finally:
        svc.stop()


def test_a_failing_training_loop_turns_the_service_to_failed_and_back(tmp_path, caplog,
                                                                       monkeypatch):
    """Item 1: a loop error that repeats turns the badge and /healthz to failed, with the
    reason, logged once (not a traceback per batch); when it stops, the service recovers."""
    caplog.set_level(logging.INFO)
    rng = np.random.default_rng(8)
    msgs = [make_crystal(rng, n=60, image=f"img{i}", hmax=9) for i in range(16)]
    svc = Service(small(tmp_path, cell="79.1 79.1 37.9 90 90 90", metrics_port=0)).start()
    url = svc.metrics_server.url
    try:
        assert http_get(url + "healthz") == (200, b"ok\n")
        send_messages(msgs, svc.ingestor.bound_endpoints[0])
        assert svc.wait_until(lambda s: s.crystals_merged == 16, 60)

        def broken_step():        # a fault injected into the real engine: every step fails
            raise RuntimeError("CUDA error: an illegal memory access was encountered")

        monkeypatch.setattr(svc.engine, "step", broken_step)
        assert svc.wait_until(lambda s: s.failure is not None, 30), svc.status()
        code, body = http_get(url + "healthz")
        assert code == 503 and b"illegal memory access" in body
        status = json.loads(http_get(url + "api/status")[1])["status"]
        assert status["state"] == "failed" and "illegal memory access" in status["failure"]
        time.sleep(1.5)                                   # it keeps failing meanwhile
        errors = [r for r in caplog.records if "illegal memory access" in r.getMessage()]
        assert len(errors) == 2, [r.getMessage() for r in errors]   # first error + failed
        assert sum(r.exc_info is not None for r in caplog.records) == 1
        monkeypatch.undo()
        assert svc.wait_until(lambda s: s.failure is None, 30)
        assert http_get(url + "healthz") == (200, b"ok\n")
    finally:
        svc.stop()


def test_an_error_that_shows_only_at_the_first_crystals_fails_the_service_and_a_restart_runs(
        tmp_path, caplog):
    """Item 1: without a cell, a dmin beyond the consensus cell's longest edge is known only
    when crystals arrive: the service turns failed with the reason (it does not idle
    'live'), and a restart on the same out_dir starts (no exit 2 until the spool is
    removed); with the mistake fixed, the spooled crystals are merged."""
    caplog.set_level(logging.INFO)
    rng = np.random.default_rng(9)
    msgs = [make_crystal(rng, n=60, image=f"img{i}", hmax=9) for i in range(16)]
    svc = Service(small(tmp_path, dmin=100.0)).start()
    try:
        send_messages(msgs, svc.ingestor.bound_endpoints[0])
        assert svc.wait_until(lambda s: s.failure is not None, 30), svc.status()
        assert "dmin" in svc.failure and svc.status()["state"] == "failed"
    finally:
        svc.stop()
    again = Service(small(tmp_path, dmin=100.0)).start()        # the same mistake
    try:
        assert again.failure is not None and "dmin" in again.failure
    finally:
        again.stop()
    fixed = Service(small(tmp_path, dmin=3.0)).start()
    try:
        assert fixed.failure is None and fixed.crystals_merged == 16
        assert invariant(fixed) == (16, 16)
    finally:
        fixed.stop()


def test_skipped_training_steps_are_exported(tmp_path):
    """Item 11: steps skipped for non-finite gradients are a Prometheus counter."""
    rng = np.random.default_rng(10)
    svc = Service(small(tmp_path, cell="79.1 79.1 37.9 90 90 90", metrics_port=0)).start()
    try:
        send_messages([make_crystal(rng, n=60, image=f"i{i}", hmax=9) for i in range(16)],
                      svc.ingestor.bound_endpoints[0])
        assert svc.wait_until(lambda s: s.status()["steps"] > 3, 60)
        svc.engine.trainer._skipped_host += 2          # as two skipped steps leave it
        text = http_get(svc.metrics_server.url + "metrics")[1].decode()
        assert "streamvi_training_steps_skipped_total 2.0" in text
        assert svc.status()["skipped_steps"] == 2
    finally:
        svc.stop()


def test_crystals_with_a_condition_are_merged_with_one_warning_per_condition(tmp_path, caplog):
    """Without ``conditions`` the service merges labelled crystals all together and says so
    once per condition name, naming the option that separates them (nothing dropped,
    nothing silent)."""
    caplog.set_level(logging.INFO)
    rng = np.random.default_rng(11)
    msgs = [make_crystal(rng, n=60, image=f"img{i}", hmax=9) for i in range(18)]
    for i, msg in enumerate(msgs):
        msg.condition = ("dark", "light")[i % 2] if i < 16 else None
    svc = Service(small(tmp_path, cell="79.1 79.1 37.9 90 90 90")).start()
    try:
        send_messages(msgs, svc.ingestor.bound_endpoints[0])
        assert svc.wait_until(lambda s: settled(s, 18), 60), svc.status()
        assert svc.crystals_merged == 18
        lines = [r.getMessage() for r in caplog.records if "carries condition" in r.getMessage()]
        assert len(lines) == 2
        assert {"'dark'" in line or "'light'" in line for line in lines} == {True}
        assert all("--conditions dark,light" in line for line in lines)
    finally:
        svc.stop()
