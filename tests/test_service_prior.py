"""``serve --prior-mtz`` / ``--prior-model``: a live merge under the double-Wilson prior given
an independent data set of the same crystal (streamvi/service/service.py), crystals sent
over a real ZeroMQ socket, the MTZ read back with reciprocalspaceship."""
from __future__ import annotations

import gemmi
import pytest

from streamvi.cli.main import main
from streamvi.config import load_config
from streamvi.errors import ConfigError
from streamvi.producers.send import send_messages
from streamvi.service.service import Service
from streamvi_sim import SimulationConfig, simulate_images, simulate_structure
from test_merge_prior import _cc as cc_with

SIM = SimulationConfig(n_images=30, seed=3, dmin=3.0)


@pytest.fixture(scope="module")
def few(tmp_path_factory):
    """30 stills of one crystal at 3 Å (too few for a good merge) and its truth MTZ."""
    tmp = tmp_path_factory.mktemp("prior")
    truth = tmp / "truth.mtz"
    assert main(["simulate", "--images", "1", "--seed", "3", "--dmin", "3.0", "-o",
                 str(tmp / "one.stream"), "--truth", str(truth)]) == 0
    return list(simulate_images(SIM, simulate_structure(SIM))), truth


def config(tmp_path, **kw):
    base = {"listen": ["tcp://127.0.0.1:*"], "publish_endpoint": "", "metrics_port": -1,
            "out_dir": str(tmp_path), "space_group": SIM.space_group,
            "cell": " ".join(map(str, SIM.cell)), "dmin": SIM.dmin, "anomalous": False,
            "device": "cpu", "mc_samples": 2, "d_model": 8, "publish_interval": 1000.0,
            "checkpoint_interval": 1000.0}
    base.update(kw)
    return load_config(env={}, overrides=base)


def serve(cfg, crystals, steps: int = 200) -> dict:
    service = Service(cfg).start()
    try:
        send_messages(crystals, service.ingestor.bound_endpoints[0])
        assert service.wait_until(lambda s: s.crystals_merged == len(crystals)
                                  and s.engine.trainer.step >= steps, timeout=120)
        service.publish_now()
        return service.status()
    finally:
        service.stop()


def test_a_prior_data_set_lifts_a_live_merge_and_is_reported(few, tmp_path):
    crystals, truth = few
    plain_dir, prior_dir = tmp_path / "plain", tmp_path / "prior"
    serve(config(plain_dir), crystals)
    status = serve(config(prior_dir, prior_mtz=str(truth)), crystals)
    cc_plain = cc_with(plain_dir / "latest.mtz", truth)
    cc_prior = cc_with(prior_dir / "latest.mtz", truth)
    # the prior here is the truth itself: the merge must move most of the way to it
    print(f"CC(F, truth) plain {cc_plain:.4f}, with the prior {cc_prior:.4f}")
    assert cc_prior > cc_plain + 0.05, (cc_plain, cc_prior)
    assert status["prior"]["name"] == f"{truth.name}:FMODEL"
    r = status["prior"]["r_shells"]
    assert len(r) == 10 and all(0.0 < x < 1.0 for x in r)
    history = [h.strip() for h in gemmi.read_mtz_file(str(prior_dir / "latest.mtz")).history]
    assert f"prior {truth.name}:FMODEL" in history
    # a restart with the same prior resumes the checkpoint
    again = Service(config(prior_dir, prior_mtz=str(truth))).start()
    try:
        assert again.recovered_from_checkpoint
    finally:
        again.stop()


def test_a_model_as_live_prior(few, tmp_path):
    crystals, truth = few
    model = tmp_path / "model.pdb"
    simulate_structure(SIM).write_model(model)
    status = serve(config(tmp_path / "out", prior_model=str(model)), crystals, steps=50)
    assert status["prior"]["name"].startswith("model.pdb")
    assert len(status["prior"]["r_shells"]) == 10


@pytest.mark.parametrize("kw, message", [
    ({"prior_mtz": "nowhere.mtz"}, "prior_mtz nowhere.mtz: cannot read it as MTZ"),
    ({"prior_model": "nowhere.pdb"}, "prior_model = nowhere.pdb: no such file"),
])
def test_a_prior_that_cannot_be_read_stops_the_start_naming_the_key(tmp_path, kw, message):
    with pytest.raises(ConfigError, match=message):
        Service(config(tmp_path, **kw))
