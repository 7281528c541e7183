"""Live feedback end to end: a real service fed a simulated beamtime over ZeroMQ, read over
HTTP (/metrics, /api/status, the status page in headless Chromium), the PUB ``stats``
topic, the MTZ history and ``streamvi status``; the anomalous peak heights against an offline
map of the same MTZ; ``merge --json`` and its row count (issue 17)."""
from __future__ import annotations

import json
import re
from pathlib import Path

import gemmi
import msgpack
import numpy as np
import pytest
import reciprocalspaceship as rs
import zmq
from conftest import subscriber
from test_http import chromium, read_png
from test_metrics import get, make_service, parse_exposition, push

from streamvi.cli.main import main
from streamvi.wire import encode_crystal

N_IMAGES = 240
# two reached (completeness, multiplicity), two still open (CC½ and CCanom) after 240 images
TARGETS = {"target_cc_half": "0.9@2.5", "target_completeness": 0.999,
           "target_multiplicity": 14.0, "target_ccanom": "0.3@4"}


def _no_nan(text: str):
    """json.loads that refuses NaN and infinities (Python's json accepts them)."""
    def refuse(name):
        raise ValueError(f"{name} in JSON")
    return json.loads(text, parse_constant=refuse)


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    """A service with targets and a model, fed 240 simulated images (2.5 Å, anomalous) and
    trained until every image was visited four times; snapshots are taken by the tests."""
    from streamvi_sim import SimulationConfig, simulate_images, simulate_structure

    work = tmp_path_factory.mktemp("live")
    # clean stills (full spots, small gain and scale errors, more photons): the iodide peaks
    # stand at 8-10 σ after 240 images, so their heights can be compared in per cent
    sim = SimulationConfig(n_images=N_IMAGES, seed=5, dmin=2.5, gain_error=0.02,
                           top_shell_photons=30.0, scale_sigma=0.1, partiality_profile="tophat")
    truth = simulate_structure(sim)
    truth.write_model(work / "model.pdb")
    truth.to_mtz(work / "truth.mtz")
    frames = [encode_crystal(m) for m in simulate_images(sim, truth)]
    svc = make_service(work / "svc", space_group=sim.space_group,
                       cell=" ".join(str(x) for x in sim.cell), dmin=sim.dmin, anomalous=True,
                       publish_endpoint="tcp://127.0.0.1:*", publish_interval=3600.0,
                       model=str(work / "model.pdb"), n_shells=6, d_model=16, n_layers=1,
                       mc_samples=4, batch_images=8, consensus_wait=0.2, **TARGETS)
    svc.start()
    try:
        # in two halves, with snapshots after each: the plots have a history against images
        for n in (N_IMAGES // 2, N_IMAGES):
            push(svc, frames[n - N_IMAGES // 2:n])
            # n counts the images sent so far: the wait ends only once all of them are in
            # (a slice compared by identity here once let the second wait end at the first
            # half's count, or never)
            assert svc.wait_until(lambda s: s.crystals_merged == n and s.all_visited(4),
                                  240), svc.status()
            for _ in range(2):           # two snapshots each: provisional flags, history
                assert svc.publish_now() is not None
        yield svc, truth, work
    finally:
        svc.stop(checkpoint=False, publish=False)


def test_metrics_carry_evidence_forecasts_and_peaks(live):
    svc, _, _ = live
    s = parse_exposition(get(svc.metrics_server.url + "metrics").decode())
    table = svc.latest.stats
    for shell, pairs in enumerate(table.cc_half_pairs, start=1):
        assert s[("streamvi_cc_half_pairs", frozenset({("shell", str(shell))}))] == pairs
        if pairs >= table.min_pairs:
            low = s[("streamvi_cc_half_low", frozenset({("shell", str(shell))}))]
            high = s[("streamvi_cc_half_high", frozenset({("shell", str(shell))}))]
            cc = s[("streamvi_cc_half", frozenset({("shell", str(shell))}))]
            assert low < cc < high
        data = ("streamvi_cc_half_data", frozenset({("shell", str(shell))}))
        assert data in s or table.cc_half_data_pairs[shell - 1] < table.min_pairs
    for kind in ("cc_half", "completeness", "multiplicity", "cc_anom"):
        label = frozenset({("target", kind)})
        assert ("streamvi_target_reached", label) in s, kind
        assert ("streamvi_target_goal", label) in s
    reached = {k: s[("streamvi_target_reached", frozenset({("target", k)}))]
               for k in ("completeness", "multiplicity")}
    fb = svc.latest_feedback
    for f in fb.forecasts:
        label = frozenset({("target", f.target.kind)})
        if f.reached:
            assert s[("streamvi_forecast_images", label)] == 0
        elif f.images is not None:
            assert s[("streamvi_forecast_images", label)] == pytest.approx(f.images_needed)
            assert s[("streamvi_forecast_seconds", label)] >= 0 or f.seconds is None
    assert set(reached.values()) <= {0.0, 1.0}
    atoms = [k for k in s if k[0] == "streamvi_anomalous_peak_sigma"]
    assert len(atoms) == 14                      # 4 iodides and 10 sulfurs of the model
    assert any(dict(lbl)["atom"].endswith("/I") for _, lbl in atoms)
    assert ("streamvi_resolution_beyond_dmin", frozenset()) in s


def test_api_status_and_stats_topic_are_valid_json_with_the_decision(live):
    svc, _, _ = live
    d = _no_nan(get(svc.metrics_server.url + "api/status").decode())
    fb = d["feedback"]
    assert [t["target"]["kind"] for t in fb["targets"]] == ["cc_half", "cc_anom",
                                                           "completeness", "multiplicity"]
    for t in fb["targets"]:
        assert t["state"] in ("reached", "forecast", "out_of_reach", "no_signal",
                              "too_few_pairs", "no_figure")
        assert t["text"]
    assert set(fb["provisional"]) == {"cc_half", "cc_anom"}
    assert fb["resolution"]["source"] == "data"
    assert len(d["feedback_history"]) >= 4
    assert {h["n_images"] for h in d["feedback_history"]} >= {N_IMAGES // 2, N_IMAGES}
    assert [h["n_images"] for h in d["feedback_history"]][-1] == N_IMAGES
    shells = d["shells"]
    assert len(shells["cc_half_pairs"]) == len(shells["cc_half_data"]) == 6
    # the PUB stats topic, read by a real SUB socket, carries the same
    sub = subscriber(svc.publisher.endpoint, b"stats")
    try:
        msg = None
        for _ in range(20):            # a SUB socket misses what is sent before it joins
            svc.publish_now()
            try:
                topic, body = sub.recv_multipart()
            except zmq.Again:
                continue
            msg = msgpack.unpackb(body)
            break
    finally:
        sub.close()
    assert msg is not None and topic == b"stats"
    assert msg["shells"]["cc_half_pairs"] == svc.latest.stats.cc_half_pairs or \
        len(msg["shells"]["cc_half_pairs"]) == 6
    assert [t["target"]["kind"] for t in msg["feedback"]["targets"]][0] == "cc_half"
    json.dumps(msg, allow_nan=False)


def test_mtz_history_has_the_evidence_in_80_character_lines(live):
    svc, _, work = live
    mtz = gemmi.read_mtz_file(str(work / "svc" / "latest.mtz"))
    history = list(mtz.history)
    assert all(len(line) <= 80 for line in history)
    assert any(line.startswith("CC1/2 [95% CI] n=pairs") for line in history)
    assert sum(1 for line in history if re.search(r"n=\d+", line)) >= 6
    assert any("resolution at CC1/2=0.3" in line for line in history)


def test_streamvi_status_prints_the_decision(live, capsys):
    svc, _, _ = live
    assert main(["status", svc.metrics_server.url]) == 0
    out = capsys.readouterr().out
    assert "crystals merged" in out
    for words in ("CC½ ≥ 0.9 at 2.5 Å", "completeness ≥ 99.9 %", "multiplicity ≥ 14",
                  "CCanom ≥ 0.3 at 4 Å"):
        assert words in out, out
    assert re.search(r"(reached|more images|no signal|too few pairs|out of reach)", out)
    assert "anomalous peaks at the model's heavy atoms" in out
    assert main(["status", svc.metrics_server.url, "--json"]) == 0
    assert _no_nan(capsys.readouterr().out)["targets"]
    # nobody there: one line naming the URL, exit status 2
    assert main(["status", "http://127.0.0.1:9", "--timeout", "2"]) == 2
    assert "127.0.0.1:9/api/status" in capsys.readouterr().err


def _offline_heights(mtz_path: Path, truth_mtz: Path, sites: np.ndarray) -> np.ndarray:
    """Anomalous difference map heights (σ) at ``sites``, computed apart from streamvi's map
    code: the MTZ's F(+) − F(−) with the simulation's true phases, expanded to P1 and to
    Friedel mates by reciprocalspaceship, summed exactly at each site (no grid, no
    interpolation) and divided by the map's r.m.s., √Σ|c|² (Parseval)."""
    ds = rs.read_mtz(str(mtz_path))
    truth = rs.read_mtz(str(truth_mtz))
    common = ds.index.intersection(truth.index)
    dano = (ds.loc[common, "F(+)"] - ds.loc[common, "F(-)"]).to_numpy(np.float64)
    phi = truth.loc[common, "PHIFMODEL"].to_numpy(np.float64) - 90.0
    ok = np.isfinite(dano) & np.isfinite(phi)
    hkl = np.array(common.tolist())[ok]
    m = rs.DataSet({"H": hkl[:, 0], "K": hkl[:, 1], "L": hkl[:, 2], "DANO": dano[ok],
                    "PHI": phi[ok]}, cell=ds.cell, spacegroup=ds.spacegroup, merged=True)
    m = m.astype({"H": "HKL", "K": "HKL", "L": "HKL", "DANO": "SFAmplitude", "PHI": "Phase"})
    p1 = m.set_index(["H", "K", "L"]).expand_to_p1().expand_anomalous()
    h = p1.get_hkls().astype(np.float64)
    coeff = p1["DANO"].to_numpy(np.float64) * np.exp(1j * np.radians(
        p1["PHI"].to_numpy(np.float64)))
    rms = np.sqrt(np.sum(np.abs(coeff) ** 2))
    # ρ(x) = Σ_h c(h) exp(−2πi h·x): real, since c(−h) = c(h)*
    return np.array([np.sum(coeff * np.exp(-2j * np.pi * (h @ np.asarray(f)))).real / rms
                     for f in sites])


def test_peak_heights_match_an_offline_map_of_the_same_mtz(live):
    svc, truth, work = live
    snap, fb = svc.latest, svc.latest_feedback
    assert fb.snapshot_id == snap.snapshot_id and fb.peaks is not None
    mtz = work / "svc" / f"snapshot-{snap.snapshot_id:06d}.mtz"
    sites = truth.site_frac("I")
    offline = _offline_heights(mtz, work / "truth.mtz", sites)
    # the live labels of the iodides, matched to the truth's sites by position
    model = svc.feedback.model
    frac = model.heavy_frac(snap.space.cell)
    live_heights = []
    for site in sites:
        delta = frac - site
        delta -= np.round(delta)
        k = int(np.argmin((delta ** 2).sum(axis=1)))
        live_heights.append(fb.peaks.atoms[model.labels[k]])
    live_heights = np.array(live_heights)
    print(f"iodide peaks, live {np.round(live_heights, 2)} σ, offline {np.round(offline, 2)} σ")
    assert np.all(offline > 3.0), offline          # real peaks, not noise
    np.testing.assert_allclose(live_heights, offline, rtol=0.10)


def test_status_page_shows_the_forecast_and_counts(live, tmp_path):
    svc, _, _ = live
    url = svc.metrics_server.url
    dom = chromium(url, tmp_path, "--dump-dom").stdout.decode()
    shot = tmp_path / "status_page_feedback.png"
    chromium(url, tmp_path, f"--screenshot={shot}")
    print(f"status page screenshot: {shot}")
    text = re.sub(r"<[^>]+>", " ", dom)
    # the decision panel: one row per target, with what it needs
    body = re.search(r'<tbody id="target-rows">(.*?)</tbody>', dom, re.S).group(1)
    rows = [[re.sub(r"<[^>]+>", "", td).strip() for td in re.findall(r"<td[^>]*>(.*?)</td>",
                                                                      tr, re.S)]
            for tr in re.findall(r"<tr[^>]*>(.*?)</tr>", body, re.S)]
    assert [r[0].split(" ≥")[0] for r in rows] == ["CC½", "CCanom", "completeness",
                                                  "multiplicity"]
    fb = svc.latest_feedback
    for row, f in zip(rows, fb.forecasts):
        assert len(row) == 6
        if f.reached:
            assert row[2].startswith("reached") and row[5] == "done"
        elif f.state == "forecast":
            assert re.fullmatch(r"[\d,]+( \([\d,]+–([\d,]+|∞)\))?", row[3]), row
            assert row[4] == f"{round(f.images_needed):,}", row
    assert re.search(r'id="verdict">[^<]*(targets open|time to move on)', dom)
    # counts behind every CC: a pairs column, and ± intervals or "few"
    shells = re.search(r'<tbody id="shell-rows">(.*?)</tbody>', dom, re.S).group(1)
    cells = [[re.sub(r"<[^>]+>", "", td).strip() for td in re.findall(r"<td[^>]*>(.*?)</td>",
                                                                       tr, re.S)]
             for tr in re.findall(r"<tr[^>]*>(.*?)</tr>", shells, re.S)]
    assert len(cells) == 6 and all(len(r) == 11 for r in cells)
    table = svc.latest.stats
    assert [int(r[7].replace(",", "")) for r in cells] == table.cc_half_data_pairs
    assert all(re.fullmatch(r"(-?\d\.\d{3} ±\d\.\d{3}|few)", r[6]) for r in cells), cells
    assert "Resolution at CC½" in text and re.search(r'id="t-res">[^<]+<', dom)
    # plots against images: the forecast is drawn where there is one
    tag = re.search(r'<canvas id="plot-compl"[^>]*>', dom).group(0)
    assert int(re.search(r'data-points="(\d+)"', tag).group(1)) >= 3
    cc_tag = re.search(r'<canvas id="plot-cchalf"[^>]*>', dom).group(0)
    want = int(any(f.target.kind == "cc_half" and f.state == "forecast" for f in fb.forecasts))
    assert int(re.search(r'data-marks="(\d+)"', cc_tag).group(1)) == want
    assert "hidden" not in re.search(r'<figure[^>]*id="fig-peaks"[^>]*>', dom).group(0)
    image = read_png(shot.read_bytes())[..., :3]
    assert image.shape[:2] == (1600, 1200)
    assert (image.reshape(-1, 3).std(axis=0) > 10).all()    # not a blank page


def test_merge_json_is_valid_and_counts_the_rows_the_mtz_holds(tmp_path, capsys):
    from conftest import REPO

    stream = REPO / "tests" / "data" / "crystfel" / "hewl_palxfel_3crystals.stream"
    out = tmp_path / "m.mtz"
    assert main(["merge", str(stream), "-o", str(out), "--space-group", "P 43 21 2",
                 "--anomalous", "--steps", "20", "--device", "cpu", "--mc-samples", "2",
                 "--quiet", "--json"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    report = _no_nan(lines[-1])               # null where undefined, never NaN
    rows = gemmi.read_mtz_file(str(out)).nreflections
    assert report["mtz_reflections"] == rows == len(rs.read_mtz(str(out)))
    assert f"({rows} reflections)" in "\n".join(lines)
    # three crystals: too few pairs for any CC½, said as such
    assert report["stats"]["cc_half"] == [None] * 10
    assert all(n < report["stats"]["min_pairs"] for n in report["stats"]["cc_half_pairs"])
    assert "few" in "\n".join(lines)


def test_the_dashboards_decision_panels_have_data_from_a_service_with_targets_and_a_model(live):
    """The "When to stop" panels of deploy/grafana query series this service (targets and a
    model) exports with samples, with the labels their legends name."""
    import re

    from conftest import REPO
    from prometheus_client.parser import text_string_to_metric_families

    svc, _, _ = live
    dashboard = json.loads((REPO / "deploy/grafana/dashboards/streamvi.json").read_text())
    titles = {"Images still needed, per target", "Anomalous peaks at the model's heavy atoms"}
    targets = [t for p in dashboard["panels"] if p.get("title") in titles for t in p["targets"]]
    assert len(targets) == 4
    text = get(svc.metrics_server.url + "metrics").decode()
    labels: dict[str, set[str]] = {}
    for fam in text_string_to_metric_families(text):
        for sample in fam.samples:
            labels.setdefault(sample.name, set()).update(sample.labels)
    for target in targets:
        (name,) = re.findall(r"streamvi_[a-z_]+", target["expr"])
        assert name in labels, f"{name}: no sample"
        for label in re.findall(r"\{\{\s*(\w+)\s*\}\}", target["legendFormat"]):
            assert label in labels[name], (name, label)
