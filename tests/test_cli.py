"""The command line in-process: simulate → inspect → merge, and demo, as a user runs them."""
import json
import re

import numpy as np
import reciprocalspaceship as rs
from conftest import PAL_STREAM

from streamvi.cli import main
from streamvi.evaluate import compare_to_truth


def test_simulate_inspect_merge(tmp_path, capsys):
    stream = tmp_path / "sim.stream"
    truth = tmp_path / "truth.mtz"
    assert main(["simulate", "--images", "60", "--seed", "1", "--dmin", "3.0", "-o", str(stream),
                 "--truth", str(truth)]) == 0
    capsys.readouterr()
    assert main(["inspect", str(stream)]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["crystals"] == 60
    out = tmp_path / "merged.mtz"
    assert main(["merge", str(stream), "-o", str(out), "--space-group", "P 43 21 2",
                 "--dmin", "3.0", "--anomalous", "--steps", "150", "--device", "cpu",
                 "--mc-samples", "4", "--quiet", "--json"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    report = json.loads(lines[-1])
    assert report["stats"]["overall"]["completeness"] > 0.9
    ds = rs.read_mtz(str(out))
    assert {"F", "SIGF", "F(+)", "F(-)", "N", "F_half1"} <= set(ds.columns)
    assert ds.spacegroup.hm == "P 43 21 2"
    assert compare_to_truth(ds, rs.read_mtz(str(truth)))["cc_F"] > 0.3


def test_inspect_real_streams(capsys):
    assert main(["inspect", str(PAL_STREAM)]) == 0
    s = json.loads(capsys.readouterr().out)
    assert (s["crystals"], s["reflections"]) == (3, 618)


def test_inspect_lcls_stream(capsys, lcls_stream):
    assert main(["inspect", str(lcls_stream)]) == 0
    s = json.loads(capsys.readouterr().out)
    assert (s["images"], s["crystals"], s["reflections"]) == (70, 32, 7966)


def test_demo_runs_end_to_end(tmp_path, capsys):
    assert main(["demo", "--images", "80", "--rate", "400", "--out-dir", str(tmp_path),
                 "--device", "cpu", "--metrics-port", "-1"]) == 0
    out = capsys.readouterr().out
    assert "merged MTZ:" in out and "CC(F, F_true)" in out
    assert len(rs.read_mtz(str(tmp_path / "latest.mtz"))) > 1000
    # the anomalous map at the simulation's iodide sites, in σ
    m = re.search(r"the (\d+) iodide sites at (-?[\d.]+) σ on average", out)
    assert m and int(m.group(1)) > 0 and np.isfinite(float(m.group(2)))


def test_missing_file_and_no_command(capsys):
    assert main(["inspect", "/nonexistent.stream"]) == 2
    assert "no such file" in capsys.readouterr().err
    assert main([]) == 2


def test_every_subcommand_prints_its_help(capsys):
    import pytest

    for command in ("simulate", "inspect", "merge", "serve", "send", "demo", "config", "keys"):
        with pytest.raises(SystemExit) as exit_info:
            main([command, "--help"])
        assert exit_info.value.code == 0, command
        assert "usage:" in capsys.readouterr().out, command


def test_simulate_an_ambiguous_group_and_merge_into_the_references_setting(tmp_path, capsys):
    stream, truth = tmp_path / "p43.stream", tmp_path / "truth.mtz"
    assert main(["simulate", "--images", "40", "--seed", "2", "--dmin", "3.5", "-o", str(stream),
                 "--truth", str(truth), "--space-group", "P 43", "--indexing-ambiguity"]) == 0
    capsys.readouterr()
    assert "--space-group 'P 43'" in stream.read_text()[:4000]   # the header says how
    out = tmp_path / "merged.mtz"
    assert main(["merge", str(stream), "-o", str(out), "--space-group", "P 43", "--dmin", "3.5",
                 "--steps", "40",
                 "--device", "cpu", "--mc-samples", "2", "--quiet",
                 "--reference", str(truth)]) == 0
    text = capsys.readouterr().out
    m = re.search(r"setting of truth\.mtz:(\S+): reindexed by (\S+) \(CC\(F\) per operator: "
                  r"h,k,l (-?[\d.]+), -h,k,-l (-?[\d.]+);", text)
    assert m, text[-600:]
    per_setting = re.search(r"images per indexing setting .*: h,k,l (\d+), -h,k,-l (\d+)", text)
    assert per_setting and sum(map(int, per_setting.groups())) == 40
    ccs = [float(m.group(3)), float(m.group(4))]
    assert m.group(2) == ("h,k,l" if ccs[0] >= ccs[1] else "-h,k,-l")
    assert rs.read_mtz(str(out)).spacegroup.hm == "P 43"
    # a hexagonal cell for a tetragonal group is refused before anything is simulated
    assert main(["simulate", "--images", "2", "-o", str(tmp_path / "x.stream"),
                 "--space-group", "P 43", "--cell", "60 60 45 90 90 120"]) == 2
    assert "P 43" in capsys.readouterr().err
