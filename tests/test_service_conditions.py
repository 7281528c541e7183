"""``serve`` with pump–probe conditions (issue #19, the live path): crystals sent over a real
ZeroMQ socket with their wire ``condition``, one merge with tables per condition under the
coupled prior, ``latest-<condition>.mtz`` and ``latest-light-minus-dark.mtz`` written while it
runs, a checkpoint that restarts with both conditions (streamvi/service/service.py)."""
from __future__ import annotations

import json
import logging
import re
import urllib.request

import gemmi
import msgpack
import numpy as np
import pytest
import reciprocalspaceship as rs
import zmq
from prometheus_client.parser import text_string_to_metric_families

from streamvi.cli.main import main
from streamvi.config import load_config
from streamvi.errors import ConfigError
from streamvi.producers.send import send_messages
from streamvi.quality.stats import halfset_statistics
from streamvi.symmetry import shell_edges, shell_index
from streamvi.service.service import Service, service_conditions
from streamvi.service.status import images_per_second
from streamvi_sim import SimulationConfig, simulate_images, simulate_structure
from conftest import subscriber
from test_grafana import DASHBOARD, METRIC_NAME, PUMP_PROBE_METRICS, queries
from test_http import chromium

SIM = SimulationConfig(n_images=60, seed=4, dmin=3.0, conditions=("dark", "light"),
                       condition_ratio=(1, 1), light_change="move=4,shift=1.5,fraction=0.3")


@pytest.fixture(scope="module")
def dark_model(tmp_path_factory):
    """The dark structure of SIM as coordinates (the model a crew would give)."""
    path = tmp_path_factory.mktemp("model") / "dark.pdb"
    simulate_structure(SIM).write_model(path)
    return path


@pytest.fixture(scope="module")
def pump_probe():
    truth = simulate_structure(SIM)
    # three more images, of a condition the service was not given, or of none
    stray = list(simulate_images(SIM, truth, start=SIM.n_images, stop=SIM.n_images + 3))
    for msg, name in zip(stray, ("pump", None, "pump")):
        msg.condition = name
    return list(simulate_images(SIM, truth)), stray


def config(tmp_path, **kw):
    base = {"listen": ["tcp://127.0.0.1:*"], "publish_endpoint": "", "metrics_port": -1,
            "out_dir": str(tmp_path), "space_group": SIM.space_group,
            "cell": " ".join(map(str, SIM.cell)), "dmin": SIM.dmin, "anomalous": False,
            "device": "cpu", "mc_samples": 2, "d_model": 8, "publish_interval": 0.5,
            "checkpoint_interval": 1000.0, "conditions": "light,dark", "new_conditions": 0}
    base.update(kw)
    return load_config(env={}, overrides=base)


def test_conditions_arrive_interleaved_and_each_gets_its_files(tmp_path, pump_probe,
                                                                dark_model, caplog, capsys):
    pump_probe, stray = pump_probe
    # a non-anomalous merge with a model: it phases the difference maps
    # one publish, publish_now's: what /metrics serves and the snapshots compared with it
    # (N and completeness count the observations the merge takes, which move with the
    # misfit verdicts between publishes)
    service = Service(config(tmp_path, metrics_port=0, model=str(dark_model),
                             publish_endpoint="tcp://127.0.0.1:*",
                             publish_interval=1000.0, target_multiplicity=500.0)).start()
    try:
        # the reference (dark, listed second) comes first in the tables
        assert service.conditions == ("dark", "light")
        send_messages(pump_probe + stray, service.ingestor.bound_endpoints[0])
        assert service.wait_until(
            lambda s: s.crystals_merged == len(pump_probe) and s.engine.trainer.step >= 60,
            timeout=120)
        service.publish_now()
        merged = merged_topic(service)
        with urllib.request.urlopen(service.metrics_server.url + "metrics", timeout=10) as r:
            metrics = r.read().decode()
        published = dict(service.latest_conditions)
        with urllib.request.urlopen(service.metrics_server.url + "api/status", timeout=10) as r:
            api = json.loads(r.read())
        dom = chromium(service.metrics_server.url, tmp_path / "page", "--dump-dom"
                       ).stdout.decode()
        capsys.readouterr()
        assert main(["status", service.metrics_server.url]) == 0      # the crew's terminal
        out = capsys.readouterr().out
        status_feedback = service.latest_feedback.to_dict()
        assert ("conditions: dark 30 images, light 30 images; the targets and the resolution "
                "below are dark's (the reference)") in out
        assert "condition light (its own images, at its rate):\n" in out
        light_lines = out.split("condition light (its own images, at its rate):\n")[1]
        assert "\n        multiplicity ≥ 500" in light_lines
        assert main(["status", service.metrics_server.url, "--json"]) == 0
        as_json = json.loads(capsys.readouterr().out)
        assert as_json["condition_feedback"]["light"]["n_images"] == 30
    finally:
        service.stop()
    # the status page's difference panel: shown, ten shells and the overall line
    panel = re.search(r'<section class="panel" id="differences"( hidden)?', dom)
    assert panel is not None and panel.group(1) is None
    body = re.search(r'<tbody id="diff-rows">(.*?)</tbody>', dom, re.S).group(1)
    assert body.count("<tr") == 11 and "light-minus-dark" in body
    assert re.search(r"light-minus-dark: overall.*?significant", dom, re.S)
    assert "dark 30 · light 30" in dom
    # the verdict under the targets: the reference's, then the light condition's own
    verdict = re.search(r'id="verdict"[^>]*>([^<]*)<', dom).group(1)
    assert re.fullmatch(r"dark: \d of \d targets open · about [\d,]+ more images · snapshot "
                        r"\d+ at 30 images · light: \d of \d targets open · about [\d,]+ more "
                        r"images at 30 images", verdict), verdict
    assert re.search(r'id="diff-peaks">light-minus-dark: \+\d+\.\d σ at A/', dom)
    # the CC½ of ΔF against the pair's images: one point per publish with differences, the
    # latest the status's own figure
    points = [h["differences"]["light-minus-dark"] for h in api["history"]
              if "differences" in h]
    assert points and points[-1]["images"] == 60
    assert points[-1]["cc_half"] == pytest.approx(
        api["status"]["differences"]["light-minus-dark"]["delta_cc_half_overall"])
    canvas = re.search(r'<canvas id="plot-delta"[^>]*data-points="(\d+)"', dom)
    assert canvas is not None and int(canvas.group(1)) == len(points), dom[:500]
    assert 'streamvi_condition_images{condition="light"} 30.0' in metrics
    # the per-shell families carry every condition's merge, labelled
    for name in ("dark", "light"):
        cc = re.search(r'streamvi_completeness\{condition="%s",shell="overall"\} (\S+)' % name,
                       metrics)
        assert cc is not None, name
        snap = published[name]
        assert float(cc.group(1)) == pytest.approx(snap.stats.overall["completeness"])
        assert len(re.findall(r'streamvi_cc_half\{condition="%s",shell="\d+"\}' % name,
                              metrics)) == 10
    # the evidence and the targets per condition too, each of its own images
    for name in ("dark", "light"):
        for family in ("streamvi_cc_half_data", "streamvi_cc_half_pairs"):
            assert re.search(r'%s\{condition="%s",shell="overall"\} \S+' % (family, name),
                             metrics), (family, name)
        assert re.search(r'streamvi_target_goal\{condition="%s",target="multiplicity"\} 500\.0'
                         % name, metrics), name
    light_needed = float(re.search(r'streamvi_forecast_images\{condition="light",'
                                   r'target="multiplicity"\} (\S+)', metrics).group(1))
    assert light_needed > 0
    assert 'streamvi_delta_cc_half{pair="light-minus-dark",shell="overall"}' in metrics
    assert 'streamvi_delta_significant{pair="light-minus-dark"}' in metrics
    r = [float(x) for x in re.findall(
        r'streamvi_prior_correlation\{condition="light",given="dark",shell="\d+"\} (\S+)',
        metrics)]
    assert len(r) == 10 and all(0.0 < x < 1.0 for x in r)
    assert 'streamvi_delta_peak_sigma{pair="light-minus-dark",sign="negative"} -' in metrics
    assert service.crystals_rejected == {"unknown_condition": 3}
    # the PUB merged topic, read by a real SUB socket: one table per condition, named
    assert [m["condition"] for m in merged] == ["dark", "light"]
    assert all(m["n_images"] == 30 for m in merged)
    status = service.status()
    assert status["condition_images"] == {"dark": 30, "light": 30}
    # the reference's training-free CC½ is of the dark images alone: half-set averages of
    # their intensities, recounted here from the crystals sent (the light ones' would
    # have been divided by the dark counts)
    store, sp, ref = service.engine.store, service.engine.space, service.latest
    sums = np.zeros((2, sp.n_unique))
    for msg in pump_probe:
        if msg.condition == "dark":
            rows = sp.lookup(msg.hkl())
            keep = rows >= 0
            np.add.at(sums[store.image_half[store.keys[msg.key]]], rows[keep],
                      msg.I[keep].astype(np.float64))
    half, _ = halfset_statistics(hkl=sp.hkl, d=sp.d, centric=sp.centric, friedel=sp.friedel,
                                 obs_count=ref.store_counts, sum_i_half=sums,
                                 expected_i=store.wilson_sigma() * sp.epsilon,
                                 anomalous=False, n_shells=len(ref.stats.d_min),
                                 min_pairs=ref.stats.min_pairs)
    np.testing.assert_allclose(np.asarray(ref.stats.cc_half_data, float), half.cc,
                               rtol=1e-6, atol=1e-9)
    # the light condition's own feedback: its images, its observations per reflection
    light_fb = status["condition_feedback"]["light"]
    assert list(status["condition_feedback"]) == ["light"] and light_fb["n_images"] == 30
    (target,) = [t for t in light_fb["targets"] if t["target"]["label"] == "multiplicity"]
    assert [t["target"]["label"] for t in light_fb["targets"]] == [
        t["target"]["label"] for t in status_feedback["targets"]]
    counts = published["light"].store_counts[0]
    assert target["target"]["label"] == "multiplicity" and not target["reached"]
    assert target["current"] == pytest.approx(counts.sum() / (counts > 0).sum(), rel=0.1)
    assert target["images_needed"] > 0
    # 30 images each: the light's rate is the dark's, of the same publish (stop's; read
    # a few ms apart)
    assert light_fb["rate"] == pytest.approx(service.latest_feedback.rate, rel=0.05, abs=1e-9)
    # and its forecasts run at the rate of the dark images alone: half of all, here
    assert images_per_second(service.engine, 1e6, condition=0) == pytest.approx(
        0.5 * images_per_second(service.engine, 1e6), rel=1e-3)
    fig = status["differences"]["light-minus-dark"]
    assert list(status["coupling"]) == ["light"] and len(status["coupling"]["light"]) == 10
    # the dashboard's pump-probe panels have samples here, with the labels they show
    samples: dict[str, set[str]] = {}
    for fam in text_string_to_metric_families(metrics):
        for sample in fam.samples:
            samples.setdefault(sample.name, set()).update(sample.labels)
    shown = 0
    for where, expr, legend in queries(json.loads(DASHBOARD.read_text())):
        names = set(METRIC_NAME.findall(expr))
        if not names <= PUMP_PROBE_METRICS:
            continue
        shown += 1
        for name in names:
            assert name in samples, f"{where}: no sample of {name}"
        for label in re.findall(r"\{\{\s*(\w+)\s*\}\}", legend):
            assert any(label in samples[n] for n in names), f"{where}: no label {label!r}"
    assert shown >= 4
    assert len(fig["delta_cc_half"]) == 10 and fig["reflections"] > 0
    assert 0 <= fig["significant"] <= fig["reflections"]
    # the difference map's peaks and holes, named by the model's atoms (60 images: noise
    # mostly; what is checked is that they are found, signed and named)
    peaks = fig["peaks"]
    assert peaks["n_reflections"] == fig["reflections"]
    for sign, found in (("positive", peaks["positive"]), ("negative", peaks["negative"])):
        assert found and all((p["sigma"] >= 3.0) if sign == "positive" else (p["sigma"] <= -3.0)
                             for p in found)
        assert all(p["nearest_atom"].startswith("A/") for p in found)
    assert service.feedback.model is None       # no anomalous peaks without F(+)/F(-)
    # the half-set CC of ΔF, recomputed from the written files' half columns
    dark_h, light_h = (rs.read_mtz(str(tmp_path / f"latest-{c}.mtz")) for c in ("dark", "light"))
    both = dark_h.index.intersection(light_h.index)
    x = (light_h.loc[both, "F_half1"] - dark_h.loc[both, "F_half1"]).to_numpy(np.float64)
    y = (light_h.loc[both, "F_half2"] - dark_h.loc[both, "F_half2"]).to_numpy(np.float64)
    ok = np.isfinite(x) & np.isfinite(y)
    assert fig["delta_cc_half_overall"] == pytest.approx(np.corrcoef(x[ok], y[ok])[0, 1],
                                                         abs=0.02)
    assert service.engine.store.condition_images().tolist() == [30, 30]
    dark, light = (rs.read_mtz(str(tmp_path / f"latest-{c}.mtz")) for c in ("dark", "light"))
    delta = rs.read_mtz(str(tmp_path / "latest-light-minus-dark.mtz"))
    assert {"DF", "SIGDF", "W", "WDF", "F_DARK"} <= set(delta.columns)
    # the live count of significant differences is the file's, in its calibrated SIGDF
    z = np.abs(delta["DF"] / delta["SIGDF"]).to_numpy(np.float64)
    assert fig["significant"] == int(np.sum(z > 3.0))
    assert fig["sigdf_calibrated"] is True and len(fig["sigdf_factor"]) == 10
    assert len(fig["sigdf_d_min"]) == 10 and fig["sigdf_d_min"][-1] == pytest.approx(
        delta.compute_dHKL()["dHKL"].min(), rel=1e-4)
    assert all(np.isfinite(fig["sigdf_factor"])) and min(fig["sigdf_factor"]) > 0
    # ΔF is light − dark times the coupled prior's gain correction of its resolution shell
    # (≥ 1: the prior shrinks), the factors the status JSON and the file's history give
    common = delta.index
    res = delta.compute_dHKL()["dHKL"].to_numpy(np.float64)
    factors = np.array(fig["df_gain_factor"], dtype=np.float64)
    assert len(factors) == 10 and np.all(factors >= 1.0)
    assert fig["df_gain_d_min"][-1] == pytest.approx(res.min(), rel=1e-4)
    shell = shell_index(res, shell_edges(res.max(), res.min(), 10))
    np.testing.assert_allclose(delta["DF"].to_numpy(),
                               factors[shell] * (light.loc[common, "F"]
                                                 - dark.loc[common, "F"]).to_numpy(),
                               rtol=1e-4, atol=1e-4)
    delta_history = [h.strip() for h in gemmi.read_mtz_file(
        str(tmp_path / "latest-light-minus-dark.mtz")).history]
    at = delta_history.index("DF, SIGDF x by shell for the coupled prior's shrinkage, low to high:")
    assert [float(x) for x in delta_history[at + 1].split()] == pytest.approx(factors, abs=0.006)
    history = {c: [h.strip() for h in gemmi.read_mtz_file(str(tmp_path / f"latest-{c}.mtz")
                                                          ).history] for c in ("dark", "light")}
    assert "condition light of dark, light" in history["light"]
    assert any(h.startswith("prior given dark, r by shell: ") for h in history["light"])
    # latest.mtz is the reference condition's merge, as the metrics and the feedback are
    plain = rs.read_mtz(str(tmp_path / "latest.mtz"))
    np.testing.assert_allclose(plain["F"].to_numpy(), dark.loc[plain.index, "F"].to_numpy())
    # numbered snapshots per condition and per difference beside the plain ones
    for tag in ("dark", "light", "light-minus-dark"):
        assert list(tmp_path.glob(f"snapshot-{tag}-*.mtz"))

    # a restart resumes the merge of both conditions from its checkpoint
    steps = service.engine.trainer.step
    again = Service(config(tmp_path)).start()
    try:
        assert again.recovered_from_checkpoint
        assert again.engine.trainer.step == steps
        assert again.engine.store.condition_images().tolist() == [30, 30]
    finally:
        again.stop()
    # ... but not as a merge without them: that checkpoint is set aside, saying why, and
    # the merge starts again from the spooled crystals
    with caplog.at_level(logging.ERROR):
        third = Service(config(tmp_path, conditions="")).start()
        third.stop()
    assert not third.recovered_from_checkpoint
    assert (tmp_path / "checkpoint.corrupt").exists()
    assert ("the checkpoint is of a merge of the conditions dark, light; this one is without "
            "conditions") in caplog.text


def test_each_condition_reads_its_own_anomalous_map_and_resolution(tmp_path, pump_probe,
                                                                   dark_model, capsys):
    """Anomalous mode with the dark model: every condition's anomalous difference map is
    read at the model's heavy atoms (the light condition's from its own table, not the
    dark's), and the peaks and the resolution estimate reach /metrics with a
    ``condition`` label, the status JSON and ``streamvi status`` per condition."""
    from streamvi.quality.anomalous import snapshot_peaks

    pump_probe, _ = pump_probe
    service = Service(config(tmp_path, metrics_port=0, model=str(dark_model), anomalous=True,
                             publish_endpoint="tcp://127.0.0.1:*", publish_interval=1000.0,
                             target_multiplicity=500.0)).start()
    try:
        send_messages(pump_probe, service.ingestor.bound_endpoints[0])
        assert service.wait_until(
            lambda s: s.crystals_merged == len(pump_probe) and s.engine.trainer.step >= 40,
            timeout=120)
        # the PUB stats topic, read by a real SUB socket (which misses what was sent before
        # it joined: publish until one arrives); its last publish is the one read below
        sub = subscriber(service.publisher.endpoint, b"stats", timeout_ms=2000)
        try:
            stats = None
            for _ in range(20):
                service.publish_now()
                try:
                    stats = msgpack.unpackb(sub.recv_multipart()[1])
                    break
                except zmq.Again:
                    continue
        finally:
            sub.close()
        with urllib.request.urlopen(service.metrics_server.url + "metrics", timeout=10) as r:
            metrics = r.read().decode()
        published = dict(service.latest_conditions)
        status = service.status()
        reference = service.latest_feedback
        capsys.readouterr()
        assert main(["status", service.metrics_server.url]) == 0
        out = capsys.readouterr().out
    finally:
        service.stop()
    model = service.feedback.model
    assert model is not None
    light = status["condition_feedback"]["light"]["peaks"]
    dark = reference.peaks.to_dict()
    assert light is not None and set(light["atoms"]) == set(model.labels)
    # each condition's heights are its own table's map, the same code offline
    for name, peaks in (("light", light), ("dark", dark)):
        again = snapshot_peaks(published[name], model).to_dict()
        assert peaks["atoms"] == pytest.approx(again["atoms"], abs=1e-9), name
        for atom, sigma in peaks["atoms"].items():
            line = re.search(r'streamvi_anomalous_peak_sigma\{atom="%s",condition="%s"\} (\S+)'
                             % (re.escape(atom), name), metrics)
            assert line is not None and float(line.group(1)) == pytest.approx(sigma), atom
    assert light["atoms"] != pytest.approx(dark["atoms"], abs=1e-6)    # two maps, not one
    assert stats is not None
    assert stats["service"]["condition_feedback"]["light"]["peaks"]["atoms"] == \
        pytest.approx(light["atoms"])
    assert stats["feedback"]["peaks"]["atoms"] == pytest.approx(dark["atoms"])
    # the resolution estimate of each condition, labelled
    for name, fb in (("dark", reference.to_dict()), ("light", status["condition_feedback"]
                                                      ["light"])):
        for key, family in (("low", "low"), ("high", "high")):
            value = (fb["resolution"] or {}).get(key)
            line = re.search(r'streamvi_resolution_cc_half_%s_angstrom\{condition="%s"\} (\S+)'
                             % (family, name), metrics)
            assert (line is None) == (value is None), (name, key)
            assert value is None or float(line.group(1)) == pytest.approx(value), (name, key)
        # the fit's verdict, each condition's own (30 images each at 3 Å: dark has no
        # trend, light falls below its first shell, in this set)
        beyond = re.search(r'streamvi_resolution_beyond_dmin\{condition="%s"\} (\S+)' % name,
                           metrics)
        assert float(beyond.group(1)) == float(fb["resolution"]["state"] == "beyond_dmin")
        assert re.search(r'streamvi_model_figures_provisional\{condition="%s",figure="cc_half"'
                         r'\} [01]\.0' % name, metrics), name
    states = {reference.resolution.state,
              status["condition_feedback"]["light"]["resolution"]["state"]}
    assert len(states) == 2, states      # two estimates, not the reference's twice
    # the crew's terminal: the light condition's peaks under its own heading
    light_lines = out.split("condition light (its own images, at its rate):\n")[1]
    assert "  anomalous peaks at the model's heavy atoms: " in light_lines


@pytest.fixture(scope="module")
def later():
    """Five more images of SIM: two of a condition that appears mid-run (``pump``), one of
    none, two of yet another (``pump2``)."""
    msgs = list(simulate_images(SIM, simulate_structure(SIM), start=SIM.n_images + 3,
                                stop=SIM.n_images + 8))
    for msg, name in zip(msgs, ("pump", None, "pump", "pump2", "pump2")):
        msg.condition = name
    return msgs


def test_a_condition_that_appears_mid_run_gets_its_tables_and_files(tmp_path, pump_probe,
                                                                     later, caplog):
    """``new_conditions = 1``: the first new name after the run started takes the spare
    tables (logged, its own files, its own images count, coupled to the reference); the
    next new name is refused and counted; a restart binds the same names to the same
    tables."""
    pump_probe, _ = pump_probe
    caplog.set_level(logging.WARNING)
    service = Service(config(tmp_path, new_conditions=1)).start()
    try:
        send_messages(pump_probe, service.ingestor.bound_endpoints[0])
        assert service.wait_until(lambda s: s.crystals_merged == len(pump_probe), timeout=120)
        service.publish_now()
        assert service.conditions == ("dark", "light")
        assert not list(tmp_path.glob("latest-pump*.mtz"))
        send_messages(later, service.ingestor.bound_endpoints[0])
        assert service.wait_until(
            lambda s: s.crystals_merged == len(pump_probe) + 2
            and sum(s.crystals_rejected.values()) == 3, timeout=120)
        steps = service.engine.trainer.step
        assert service.wait_until(lambda s: s.engine.trainer.step >= steps + 20, timeout=120)
        service.publish_now()
        status = service.status()
    finally:
        service.stop()
    assert service.conditions == ("dark", "light", "pump")
    assert status["condition_images"] == {"dark": 30, "light": 30, "pump": 2}
    assert service.crystals_rejected == {"unknown_condition": 3}
    assert "new condition 'pump' merged from image 60 on, in table set 3 of 3" in caplog.text
    assert "spare table sets for new conditions are taken" in \
        (tmp_path / "dead-letter.jsonl").read_text()
    pump = rs.read_mtz(str(tmp_path / "latest-pump.mtz"))
    delta = rs.read_mtz(str(tmp_path / "latest-pump-minus-dark.mtz"))
    assert len(pump) > 0 and {"DF", "SIGDF", "WDF"} <= set(delta.columns)
    history = [h.strip() for h in gemmi.read_mtz_file(str(tmp_path / "latest-pump.mtz")).history]
    assert "condition pump of dark, light, pump" in history
    assert any(h.startswith("prior given dark, r by shell: ") for h in history)
    assert "pump-minus-dark" in status["differences"]
    # a restart rebuilds the store from the spool: the same names in the same table sets
    again = Service(config(tmp_path, new_conditions=1)).start()
    try:
        assert again.recovered_from_checkpoint
        assert again.conditions == ("dark", "light", "pump")
        assert again.engine.store.condition_images().tolist() == [30, 30, 2]
    finally:
        again.stop()


def merged_topic(service: Service) -> list[dict]:
    """The ``merged`` messages of one publish, through a real SUB socket (which misses what
    was sent before it joined: publish until a whole set arrives)."""
    sub = subscriber(service.publisher.endpoint, b"merged", timeout_ms=2000)
    try:
        for _ in range(20):
            service.publish_now()
            got = []
            try:
                while len(got) < 2:
                    got.append(msgpack.unpackb(sub.recv_multipart()[1]))
            except zmq.Again:
                continue
            # one publish: its conditions' snapshots are numbered one after the other
            if got[0].get("condition") == "dark" and \
                    got[1]["snapshot"] == got[0]["snapshot"] + 1:
                return got
        raise AssertionError("no merged messages on the PUB socket")
    finally:
        sub.close()


@pytest.mark.parametrize("text, reference, wanted", [
    ("dark,light", None, ("dark", "light")),
    ("light, dark ,light2", None, ("dark", "light", "light2")),
    ("on,off", None, ("on", "off")),
    ("on,off", "off", ("off", "on")),
    ("", None, None),
])
def test_the_conditions_option_is_read_with_the_reference_first(text, reference, wanted):
    assert service_conditions(text, reference) == wanted


@pytest.mark.parametrize("kw, message", [
    ({"conditions": "dark,,light"}, "an empty name"),
    ({"conditions": "dark,dark"}, "a name given twice"),
    ({"conditions": "dark,light", "reference_condition": "pump"},
     "reference_condition = 'pump' is not one of conditions"),
    ({"conditions": "", "reference_condition": "dark"}, "needs `conditions`"),
])
def test_bad_conditions_stop_the_start_naming_the_key(tmp_path, kw, message):
    with pytest.raises(ConfigError, match=message):
        Service(config(tmp_path, **kw))


def test_send_labels_a_streams_crystals_by_their_pump_code(tmp_path):
    from streamvi.cli.main import main

    stream = tmp_path / "pp.stream"
    assert main(["simulate", "--images", "20", "--seed", "2", "--dmin", "3.0", "-o",
                 str(stream), "--conditions", "dark,light",
                 "--light-change", "move=4,shift=1.5,fraction=0.3"]) == 0
    out = tmp_path / "out"
    # the stream's own cell (simulate's default crystal), not the module's pump-probe one
    service = Service(config(out, cell="", conditions="dark,light")).start()
    try:
        url = service.ingestor.bound_endpoints[0]
        assert main(["send", str(stream), "--to", url, "--condition-field",
                     "header/int//sim/pump_code", "--condition-map", "0=dark,1=light"]) == 0
        assert service.wait_until(lambda s: s.crystals_merged == 20
                                  and s.engine.trainer.step >= 10, timeout=120)
        service.publish_now()
    finally:
        service.stop()
    assert service.engine.store.condition_images().tolist() == [10, 10]
    assert (out / "latest-light-minus-dark.mtz").is_file()
    # a map without its field is refused before anything is sent
    assert main(["send", str(stream), "--to", "tcp://127.0.0.1:9", "--condition-map",
                 "0=dark"]) != 0
