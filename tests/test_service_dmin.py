"""A table too small for the data: ``serve`` counts what arrives beyond its dmin, says how
to extend it, and a restart on the same out_dir with the larger table merges everything
the spool holds (over real loopback sockets, real MTZ files)."""
import logging
import re

import gemmi
import numpy as np
import pytest
import reciprocalspaceship as rs

from streamvi.cli.main import main
from streamvi.config import load_config
from streamvi.errors import ConfigError
from streamvi.producers.send import send_messages
from streamvi.service.service import Service
from streamvi_sim import SimulationConfig, simulate_images, simulate_structure
from test_http import chromium
from test_metrics import sample, scrape

SIM = SimulationConfig(n_images=80, seed=4, dmin=2.6)
SMALL, LARGE = 3.4, 2.6


@pytest.fixture(scope="module")
def crystals():
    return list(simulate_images(SIM, simulate_structure(SIM)))


def config(tmp_path, **kw):
    base = {"listen": ["tcp://127.0.0.1:*"], "publish_endpoint": "", "metrics_port": 0,
            "metrics_host": "127.0.0.1", "out_dir": str(tmp_path),
            "space_group": SIM.space_group, "cell": " ".join(map(str, SIM.cell)),
            "dmin": SMALL, "device": "cpu", "publish_interval": 0.3,
            "checkpoint_interval": 3600.0, "spool_fsync": "never", "d_model": 16,
            "n_layers": 1, "mc_samples": 2, "batch_images": 8}
    base.update(kw)
    return load_config(env={}, overrides=base)


def test_a_table_too_small_is_reported_and_extended_on_restart(tmp_path, crystals, capsys,
                                                               caplog):
    cell = gemmi.UnitCell(*SIM.cell)
    d = np.concatenate([cell.calculate_d_array(c.hkl().astype(np.int32)) for c in crystals])
    # snapshots only when asked, once every crystal is in: the published resolution
    # estimate is then the fit of these data, not one kept from a partial set
    svc = Service(config(tmp_path, publish_interval=1000.0)).start()

    def asked(s):
        s.request_publish()
        return s.status()["dmin_advice"] is not None

    try:
        send_messages(crystals, svc.ingestor.bound_endpoints[0])
        assert svc.wait_until(lambda s: s.crystals_merged == len(crystals), 60), svc.status()
        with caplog.at_level(logging.WARNING, logger="streamvi"):
            assert svc.wait_until(asked, 90, poll=0.5), (
                svc.status()["beyond_dmin"], svc.latest_feedback)
            assert svc.wait_until(lambda s: "restart on the same out_dir" in caplog.text, 30)
        status = svc.status()
        record = status["beyond_dmin"]
        assert record["reflections"] == int(np.sum(d < SMALL))
        assert record["fraction"] == pytest.approx(np.mean(d < SMALL))
        assert record["d_min_seen"] == pytest.approx(d.min(), rel=1e-5)
        suggested = record["suggested_dmin"]
        assert LARGE - 0.05 <= suggested < SMALL and np.mean(d >= suggested) >= 0.99
        assert f"dmin {suggested:.2f}" in status["dmin_advice"]
        samples = scrape(svc)                                       # Prometheus
        assert sample(samples, "streamvi_reflections_beyond_dmin") == record["reflections"]
        assert sample(samples, "streamvi_dmin_advice_angstrom") == pytest.approx(suggested)
        assert main(["status", svc.metrics_server.url]) == 0        # the crew's terminal
        assert f"advice: {status['dmin_advice']}" in capsys.readouterr().out
        dom = chromium(svc.metrics_server.url, tmp_path / "page", "--dump-dom").stdout.decode()
        merge_line = re.search(r'<div id="merge" class="merge"[^>]*>([^<]*)<', dom)
        assert merge_line and (f"data beyond dmin: restart with dmin {suggested:.2f} Å (hover)"
                               in merge_line.group(1)), dom[:2000]
    finally:
        svc.stop()
    before = rs.read_mtz(str(tmp_path / "latest.mtz"))
    assert before.compute_dHKL()["dHKL"].min() >= SMALL - 1e-3
    # the restart asked for: the same out_dir, the larger table
    again = Service(config(tmp_path, dmin=suggested)).start()
    try:
        assert not again.recovered_from_checkpoint
        assert (tmp_path / f"checkpoint.dmin-{SMALL:.2f}.pt").exists()
        assert again.crystals_merged == len(crystals)
        assert again.counters.snapshot()["crystals_received"] == len(crystals)
        assert again.engine.space.dmin == suggested
        assert again.engine.store.beyond_dmin.n_beyond == int(np.sum(d < suggested))
        assert again.status()["dmin_advice"] is None
        assert sample(scrape(again), "streamvi_dmin_advice_angstrom") == 0.0
        again.request_publish()
        assert again.wait_until(lambda s: s.latest is not None and s.latest.step > 0, 60)
    finally:
        again.stop()
    after = rs.read_mtz(str(tmp_path / "latest.mtz"))
    assert after.compute_dHKL()["dHKL"].min() < SMALL - 0.3
    assert len(after) > 1.5 * len(before)
    # another crystal form is still refused
    with pytest.raises(ConfigError, match="another out_dir"):
        Service(config(tmp_path, dmin=suggested, space_group="P 41 21 2")).start()


def test_a_table_larger_than_the_data_judges_its_targets_where_the_data_end(tmp_path, crystals,
                                                                            capsys):
    """Spots to 2.6 Å into a 2.0 Å table: the rows beyond 2.6 Å are never recorded, so the
    completeness target is judged to where 99 % of the observations reach (not promised
    after hundreds of thousands of images), and the crew's terminal says so."""
    cell = gemmi.UnitCell(*SIM.cell)
    d = np.concatenate([cell.calculate_d_array(c.hkl().astype(np.int32)) for c in crystals])
    svc = Service(config(tmp_path, dmin=2.0, publish_interval=1000.0)).start()
    try:
        send_messages(crystals, svc.ingestor.bound_endpoints[0])
        assert svc.wait_until(lambda s: s.crystals_merged == len(crystals), 60), svc.status()
        svc.publish_now()
        targets = {t["target"]["kind"]: t for t in svc.latest_feedback.to_dict()["targets"]}
        completeness = targets["completeness"]
        reach = completeness["reach"]
        # 99 % of the observations lie at d ≥ reach (rounded down to 0.01 Å)
        assert np.mean(d >= reach) >= 0.99 > np.mean(d >= reach + 0.02)
        assert completeness["text"].startswith(f"completeness ≥ 99 % to {reach:.2f} Å, where "
                                               "the data end")
        assert targets["cc_half"]["reach"] == reach
        assert targets["cc_half"]["shell"]["d_min"] <= reach <= targets["cc_half"]["shell"][
            "d_max"]
        capsys.readouterr()
        assert main(["status", svc.metrics_server.url]) == 0
        assert f"to {reach:.2f} Å, where the data end" in capsys.readouterr().out
        dom = chromium(svc.metrics_server.url, tmp_path / "page", "--dump-dom").stdout.decode()
        row = re.search(r'<tr[^>]*data-target="completeness"[^>]*><td[^>]*>([^<]*)<', dom)
        assert row and row.group(1) == f"completeness ≥ 99 % to {reach:.2f} Å, where the data end"
    finally:
        svc.stop()
