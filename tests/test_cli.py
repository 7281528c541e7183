"""The command line in-process: simulate → inspect → merge, and demo, as a user runs them."""
import json
import re

import gemmi
import numpy as np
import reciprocalspaceship as rs
from conftest import PAL_STREAM

from streamvi.cli.main import main
from streamvi.quality.evaluate import compare_to_truth


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
    # 60 crystals: too few for the partiality check to act on, whatever the trend
    assert report["geometric_partiality"] is False
    ds = rs.read_mtz(str(out))
    history = [h.strip() for h in gemmi.read_mtz_file(str(out)).history]
    b_line = [h for h in history if h.startswith("scales' resolution trend moved to F: B ")]
    if report["falloff_b"] is None:
        assert not b_line
    else:
        assert b_line == [f"scales' resolution trend moved to F: B {report['falloff_b']:+.2f} "
                          "A^2 (docs/model.md)"]
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


# ---------------------------------------------------------------------------- issue 18, item 4
# Set-up errors known before the first crystal fail at start, in one line, exit non-zero.

import time  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")


def error_lines(capsys) -> list[str]:
    err = capsys.readouterr().err
    return [line for line in err.splitlines() if "error" in line.lower()]


def serve_args(tmp_path, *extra: str) -> list[str]:
    return ["serve", "--space-group", "P 43 21 2", "--out-dir", str(tmp_path / "out"),
            "--listen", "tcp://127.0.0.1:*", "--metrics-port", "-1", "--publish-endpoint", "",
            *extra]


def test_serve_refuses_a_cell_without_the_groups_metric_symmetry(tmp_path, capsys):
    t0 = time.monotonic()
    assert main(serve_args(tmp_path, "--cell", "79.1 79.0 37.9 90 90 90")) == 2
    (line,) = error_lines(capsys)
    assert "cell" in line and "metric symmetry" in line and "a = b" in line
    assert "'79.05 79.05 37.9 90 90 90'" in line        # what to give instead
    assert time.monotonic() - t0 < 30


@no_cuda
@pytest.mark.parametrize("command", ["serve", "merge", "demo"])
def test_cuda_on_a_machine_without_it_fails_at_once(tmp_path, capsys, command):
    args = {"serve": serve_args(tmp_path, "--cell", "79.1 79.1 37.9 90 90 90"),
            "merge": ["merge", str(PAL_STREAM), "-o", str(tmp_path / "m.mtz"),
                      "--space-group", "P 43 21 2"],
            "demo": ["demo", "--images", "2000", "--out-dir", str(tmp_path / "demo")]}[command]
    t0 = time.monotonic()
    assert main(args + ["--device", "cuda"]) == 2       # the demo used to hang for ever
    assert time.monotonic() - t0 < 20
    (line,) = error_lines(capsys)
    assert "cuda" in line.lower() and "'cpu'" in line
    assert not (tmp_path / "m.mtz").exists()


@pytest.mark.parametrize("where", ["missing directory", "a file as directory", "a directory"])
def test_merge_to_an_unwritable_place_fails_before_training(tmp_path, capsys, where):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    (tmp_path / "dir.mtz").mkdir()
    target = {"missing directory": tmp_path / "nope" / "m.mtz",
              "a file as directory": blocker / "m.mtz",
              "a directory": tmp_path / "dir.mtz"}[where]
    t0 = time.monotonic()
    assert main(["merge", str(PAL_STREAM), "-o", str(target), "--space-group", "P 43 21 2",
                 "--steps", "100000", "--device", "cpu"]) == 2
    assert time.monotonic() - t0 < 20                   # not after 100,000 steps
    (line,) = error_lines(capsys)
    assert str(target) in line and "-o" in line


def test_demo_with_an_unwritable_out_dir_fails_at_once(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    t0 = time.monotonic()
    assert main(["demo", "--out-dir", str(blocker / "demo"), "--device", "cpu"]) == 2
    assert time.monotonic() - t0 < 20
    (line,) = error_lines(capsys)
    assert str(blocker / "demo") in line and "--out-dir" in line


def test_merge_without_a_cell_symmetrises_the_crystals_consensus(tmp_path, capsys, caplog):
    """Item 1 offline: a stream without a target cell used to be refused ("does not have the
    metric symmetry") for its mean cell; now the median cell is symmetrised, with a note."""
    stream = tmp_path / "sim.stream"
    assert main(["simulate", "--images", "30", "--seed", "2", "--dmin", "3.0",
                 "-o", str(stream)]) == 0
    text = stream.read_text()
    start, end = text.index("----- Begin unit cell -----"), text.index("----- End unit cell -----")
    stream.write_text(text[:start] + text[end + len("----- End unit cell -----\n"):])
    capsys.readouterr()
    caplog.set_level("INFO")
    out = tmp_path / "m.mtz"
    assert main(["merge", str(stream), "-o", str(out), "--space-group", "P 43 21 2",
                 "--steps", "20", "--device", "cpu", "--quiet"]) == 0
    assert "symmetrised" in caplog.text and "median of 30 crystals" in caplog.text
    a, b, c, *angles = rs.read_mtz(str(out)).cell.parameters
    assert a == pytest.approx(b, abs=1e-4) and a == pytest.approx(79.1, abs=0.2)
    # an explicit --cell without the symmetry is a mistake of the user's: refused
    assert main(["merge", str(stream), "-o", str(out), "--space-group", "P 43 21 2",
                 "--cell", "79.1 79.0 37.9 90 90 90"]) == 2
    assert "79.05 79.05 37.9 90 90 90" in capsys.readouterr().err
