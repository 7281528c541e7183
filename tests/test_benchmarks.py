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
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
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
