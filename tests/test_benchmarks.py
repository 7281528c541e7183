"""The benchmark runner: every benchmark runs (tiny sizes) and prints well-formed figures."""
from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"benchmarks_{name}",
                                                  REPO / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module       # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


bench_end_to_end = _load("bench_end_to_end")
bench_run = _load("run")

# figures each benchmark must print (name → benchmark)
EXPECTED = {
    "wire_decode": "wire", "hkl_lookup": "wire", "stream_parse": "stream_parse",
    "ingest_throughput": "ingest", "ingest_store_throughput": "ingest", "store_add": "store", "ingest_decode_store": "store",
    "store_add_many": "store", "ingest_decode_store_many": "store",
    "train_throughput": "training", "e2e_images_per_s": "end_to_end",
    "e2e_train_reflections_per_s": "end_to_end", "e2e_lag_first_visit_p99": "end_to_end",
    "e2e_lag_published_p50": "end_to_end", "e2e_visits_median": "end_to_end",
    "e2e_rss_bytes_per_reflection": "end_to_end", "e2e_store_bytes_per_reflection": "end_to_end",
    "distributed_train_throughput": "distributed", "distributed_speedup": "distributed",
    "merge_cc_F": "merge_quality", "merge_cc_anom": "merge_quality",
    "merge_iodide_peak_sigma": "merge_quality", "merge_seconds": "merge_quality",
}


@pytest.mark.slow
def test_run_smoke_prints_every_figure():
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "run.py"), "--smoke",
                           "--device", "cpu"], cwd=REPO, capture_output=True, text=True,
                          timeout=240)
    # a failed benchmark prints a "<bench>_failed" line with its error; show those first
    failed = [line for line in proc.stdout.splitlines() if '_failed"' in line]
    assert proc.returncode == 0, "\n".join(failed) + "\n" + proc.stderr[-3000:]
    figures = [json.loads(line) for line in proc.stdout.splitlines() if line.strip()]
    for fig in figures:
        assert {"name", "value", "unit", "device", "machine"} <= fig.keys(), fig
        assert fig["device"] == "cpu" and fig["mode"] == "smoke"
        m = fig["machine"]
        assert m["cores"] >= 1 and m["torch"] and m["cpu"] and m["gpu"] is None
    by_name: dict[str, list[dict]] = {}
    for fig in figures:
        by_name.setdefault(fig["name"], []).append(fig)
    for name, bench in EXPECTED.items():
        assert name in by_name, f"{name} missing"
        assert all(f["bench"] == bench for f in by_name[name])
    assert {f["bench"] for f in figures} == set(bench_run.BENCHMARKS)
    for name in ("wire_decode", "stream_parse", "ingest_throughput", "store_add", "store_add_many",
                 "train_throughput", "e2e_images_per_s", "distributed_train_throughput"):
        assert all(isinstance(f["value"], (int, float)) and f["value"] > 0
                   for f in by_name[name]), name
    # the producer's pace (200 images/s) is what the service absorbed, within reason
    assert 50 < by_name["e2e_images_per_s"][0]["value"] < 400
    assert by_name["e2e_store_bytes_per_reflection"][0]["value"] > 40
    methods = {f["method"]: f["value"] for f in by_name["merge_cc_F"]}
    assert methods.keys() == {"streamvi", "inverse_variance", "mean"}
    assert all(-1 <= v <= 1 for v in methods.values())
    speedup = by_name["distributed_speedup"][0]
    assert speedup["scaling"] == "strong" and speedup["value"] > 0


def test_failing_benchmark_is_reported(tmp_path, capsys):
    bench = bench_run.Bench(str(tmp_path / "missing_script.py"))
    ok = bench_run.run_bench("broken", bench, "full", "cpu", {"cores": 1}, timeout_s=30)
    assert not ok
    fig = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert fig["name"] == "broken_failed" and fig["value"] is None and fig["returncode"] != 0


def test_publication_lags():
    arrival = np.array([0.0, 1.0, 2.0, 3.0, 4.0])
    # snapshots written at t = 2.5 (3 images held), 3.5 (3 again), 6 (all 5)
    lags = bench_end_to_end.publication_lags(arrival, [(2.5, 3), (3.5, 3), (6.0, 5)])
    np.testing.assert_allclose(lags, [2.5, 1.5, 0.5, 3.0, 2.0])
    # an image that no snapshot held has no lag
    lags = bench_end_to_end.publication_lags(arrival, [(2.5, 3)])
    assert np.isnan(lags[3:]).all() and lags[0] == 2.5
    assert math.isnan(bench_end_to_end.publication_lags(arrival, [])[0])


# ------------------------------------------------------------------ quality matrix

quality_matrix = _load("quality_matrix")


def test_quality_matrix_quick_end_to_end(tmp_path):
    """Two tiny cases through every method, the table of the file and of a difference."""
    out = tmp_path / "quick.jsonl"
    cmd = [sys.executable, str(REPO / "benchmarks" / "quality_matrix.py"), "--quick",
           "--cases", "default,partial_sim", "--jobs", "2", "--out", str(out),
           "--cache-dir", str(tmp_path / "cache"), "--label", "quick-test",
           "--set", "merge.steps=16", "--set", "service.scale_kl_weight=0.05",
           "--mtz-dir", str(tmp_path / "mtz")]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=240)
    # a failed benchmark prints a "<bench>_failed" line with its error; show those first
    failed = [line for line in proc.stdout.splitlines() if '_failed"' in line]
    assert proc.returncode == 0, "\n".join(failed) + "\n" + proc.stderr[-3000:]
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert [json.loads(x) for x in proc.stdout.splitlines() if x.startswith("{")] == lines
    assert sorted((x["case"], x["method"]) for x in lines) == sorted(
        (c, m) for c in ("default", "partial_sim") for m in quality_matrix.METHODS)
    by = {(x["case"], x["method"]): x for x in lines}
    for x in lines:
        assert x["label"] == "quick-test" and x["quick"] is True and x["machine"]
        assert x["images"] == 150 and x["seconds"] >= 0 and 0 < x["completeness"] <= 1
        assert len(x["cc_F_shells"]) == len(x["d_min_shells"]) == 10
        assert x["cc_F_shells"][0] == x["cc_F_lowest_shell"]
        assert x["cc_F_shells"][-1] == x["cc_F_top_shell"]
        assert -1 <= x["cc_F"] <= 1 and -1 <= x["cc_F_fitted_b"] <= 1
        strong = x["strong"]
        assert strong["n"] >= 1 and strong["min"] <= strong["median"] <= strong["max"]
        assert strong["worst"] in (strong["min"], strong["max"])
        low = x["strong_lowest"]
        assert low["n"] >= 1 and low["worst"] in (low["min"], low["max"])
        assert low["d_min"] == x["d_min_shells"][0] <= low["worst_d"]
    # every merge kept as an MTZ, which reads back with the figures' amplitudes
    import reciprocalspaceship as rs

    kept = rs.read_mtz(by[("default", "merge")]["mtz"])
    assert kept.spacegroup.hm == "P 43 21 2" and {"F", "F(+)", "F(-)"} <= set(kept.columns)
    assert len(list((tmp_path / "mtz").glob("*_quick-test.mtz"))) == 10
    # the streamvi methods ran with the settings asked for, and record them
    merge, service = by[("default", "merge")], by[("default", "service")]
    assert merge["steps"] == 16 and merge["settings"]["run"]["steps"] == 16
    assert merge["settings"]["trainer"]["scale_kl_weight"] == 0.03
    assert service["settings"]["trainer"]["scale_kl_weight"] == 0.05
    # `streamvi serve`'s defaults are not `streamvi merge`'s: the service trains a narrower
    # network and publishes an averaged posterior
    assert service["settings"]["trainer"]["d_model"] == 16
    assert service["settings"]["trainer"]["posterior_average_decay"] == 0.99
    assert merge["settings"]["trainer"]["posterior_average_decay"] == 0.0
    assert service["settings"]["run"]["min_visits"] >= 2
    # the truth has iodide sites, the flat partial_sim kind has neither sites nor Bijvoet pairs
    assert by[("default", "pcorr")]["iodide_sigma_mean"] is not None
    assert "iodide_sigma_mean" not in by[("partial_sim", "mean")]
    assert by[("partial_sim", "mean")]["cc_anom"] is None
    # the true scales and partialities make the best average (this tiny default case, as
    # simulated: 0.770 against 0.738 unweighted and 0.708 inverse-variance)
    cc = {m: by[("default", m)]["cc_F"] for m in ("pcorr", "mean", "ivar")}
    assert cc["pcorr"] > max(cc["mean"], cc["ivar"]) + 0.02, cc
    assert 0.74 < cc["pcorr"] < 0.80 and cc["mean"] > cc["ivar"], cc

    table = subprocess.run([sys.executable, str(REPO / "benchmarks" / "quality_matrix.py"),
                            "--table", str(out)], capture_output=True, text=True, timeout=60)
    assert table.returncode == 0, table.stderr
    assert "### merge" in table.stdout and "| default |" in table.stdout
    # a variant 0.01 worse in overall CC than its baseline is flagged
    worse = tmp_path / "worse.jsonl"
    worse.write_text("".join(json.dumps({**x, "cc_F": x["cc_F"] - 0.01}) + "\n" for x in lines))
    diff = quality_matrix.table(worse, out)
    assert "**worse: cc_F**" in diff and "default/merge" in diff
    assert "No case worse" in quality_matrix.table(out, out)


def test_quality_matrix_set_names_what_it_overrides():
    sets = quality_matrix.parse_sets(["d_model=24", "merge.epochs=3",
                                      "service.betas=[0.8, 0.99]", "likelihood=normal"])
    assert sets["merge"] == {"d_model": 24, "epochs": 3, "likelihood": "normal"}
    assert sets["service"] == {"d_model": 24, "betas": [0.8, 0.99], "likelihood": "normal"}
    with pytest.raises(SystemExit, match="no field"):
        quality_matrix.parse_sets(["not_a_field=1"])
    with pytest.raises(SystemExit, match="run setting"):
        quality_matrix.parse_sets(["service.epochs=3"])      # a merge-only setting
    with pytest.raises(SystemExit, match="KEY=VALUE"):
        quality_matrix.parse_sets(["d_model"])
    # refresh epochs as a comma list or JSON; anything else is refused, not passed on
    assert quality_matrix.parse_sets(["merge.refresh_epochs=1,3"])["merge"] == {
        "refresh_epochs": [1.0, 3.0]}
    assert quality_matrix.parse_sets(["merge.refresh_epochs=[1, 2.5]"])["merge"] == {
        "refresh_epochs": [1, 2.5]}
    with pytest.raises(SystemExit, match="list of epochs"):
        quality_matrix.parse_sets(["merge.refresh_epochs=early"])
    # the merge gets `streamvi merge`'s own settings, with the overrides on top
    tcfg, ecfg, run = quality_matrix.merge_configs("cpu", sets["merge"])
    assert tcfg.d_model == 24 and tcfg.mc_samples == 8 and tcfg.likelihood == "normal"
    assert run["epochs"] == 3 and run["steps"] is None and ecfg.n_shells == 10


bench_time_resolved = _load("bench_time_resolved")


def test_time_resolved_benchmark_judges_every_method():
    lines = bench_time_resolved.run(images=24, dmin=3.5, light_change="move=4,shift=1.5",
                                    seed=1, steps=10, epochs=None)
    assert [line["method"] for line in lines] == ["coupled", "online", "joint",
                                                  "inverse_variance", "separate", "truth"]
    for line in lines:
        assert line["benchmark"] == "time_resolved" and line["machine"] and line["device"]
        assert len(line["cc_shells"]) == len(line["d_shells"]) == 6
        json.dumps(line, allow_nan=True)
    truth = lines[-1]
    # the true ΔF through the same judge: perfect correlation, and the map shows the move
    assert truth["cc"] == pytest.approx(1.0)
    assert truth["peak_light_sites"] > 3 and truth["peak_dark_sites"] < -3
    assert truth["df_gain_top10"] == pytest.approx(1.0)
    by = {line["method"]: line for line in lines}
    assert by["online"]["visits"] == 8 and by["online"]["steps"] > 0
    assert len(by["coupled"]["r_shells"]) == 10 and all(0 < r < 1 for r in by["coupled"]["r_shells"])
    assert by["joint"]["light_scale"] == 1.0 and by["inverse_variance"]["light_scale"] > 0
    # SIGDF against the noise left in DF: judged for every estimate, not for the exact truth
    assert truth["sigdf_scatter"] is None
    for method in ("coupled", "online", "joint", "inverse_variance", "separate"):
        line = by[method]
        assert line["sigdf_scatter"] > 0 and len(line["sigdf_scatter_shells"]) == 6
        assert 0.0 <= line["significant_fraction"] < 1.0
