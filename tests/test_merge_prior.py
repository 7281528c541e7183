"""``streamvi merge --prior-mtz``: an independent data set of the same crystal as prior
knowledge (the double-Wilson prior, streamvi/merging/model/coupling.py), over real files."""
from __future__ import annotations

import gemmi
import numpy as np
import pytest
import reciprocalspaceship as rs

from streamvi.cli.main import main

FAST = ["--steps", "60", "--quiet", "--d-model", "8", "--mc-samples", "2", "--device", "cpu"]


@pytest.fixture(scope="module")
def few(tmp_path_factory):
    """30 stills at 3 Å (too few for a good merge) and the truth of their crystal."""
    tmp = tmp_path_factory.mktemp("prior")
    stream, truth = tmp / "few.stream", tmp / "truth.mtz"
    assert main(["simulate", "--images", "30", "--seed", "3", "--dmin", "3.0", "-o",
                 str(stream), "--truth", str(truth)]) == 0
    return stream, truth


def _cc(path, truth) -> float:
    merged, true = rs.read_mtz(str(path)), rs.read_mtz(str(truth))
    common = merged.index.intersection(true.index)
    return float(np.corrcoef(merged.loc[common, "F"].to_numpy(np.float64),
                             true.loc[common, "FMODEL"].to_numpy(np.float64))[0, 1])


def test_a_prior_data_set_lifts_a_small_merge_and_is_named_in_the_history(few, tmp_path):
    stream, truth = few
    plain, given = tmp_path / "plain.mtz", tmp_path / "prior.mtz"
    assert main(["merge", str(stream), "-o", str(plain), *FAST]) == 0
    assert main(["merge", str(stream), "-o", str(given), "--prior-mtz", str(truth), *FAST]) == 0
    cc_plain, cc_prior = _cc(plain, truth), _cc(given, truth)
    # the prior here is the truth itself: the merge must move most of the way to it
    assert cc_prior > cc_plain + 0.05, (cc_plain, cc_prior)
    history = [h.strip() for h in gemmi.read_mtz_file(str(given)).history]
    assert f"prior {truth.name}:FMODEL" in history
    r_line = next(h for h in history if h.startswith("prior r by shell:"))
    r = [float(x) for x in r_line.split(":")[1].split()]
    assert len(r) == 10 and all(0.0 < x < 1.0 for x in r)
    assert not any(h.startswith("prior") for h in gemmi.read_mtz_file(str(plain)).history)


def test_a_model_as_prior_gives_what_its_amplitudes_give(few, tmp_path):
    from streamvi_sim import SimulationConfig, simulate_structure

    stream, truth = few
    model = tmp_path / "model.pdb"
    # the crystal of the stream (simulate --seed 3), written as coordinates
    simulate_structure(SimulationConfig(seed=3, dmin=3.0)).write_model(model)
    plain, given = tmp_path / "plain.mtz", tmp_path / "model_prior.mtz"
    assert main(["merge", str(stream), "-o", str(plain), *FAST]) == 0
    assert main(["merge", str(stream), "-o", str(given), "--prior-model", str(model),
                 *FAST]) == 0
    assert _cc(given, truth) > _cc(plain, truth) + 0.05
    history = [h.strip() for h in gemmi.read_mtz_file(str(given)).history]
    assert "prior model.pdb:Fcalc" in history


def test_model_amplitudes_are_the_models_structure_factors(tmp_path):
    from streamvi_sim import SimulationConfig, simulate_structure

    from streamvi.merging.reference import model_amplitudes

    truth = simulate_structure(SimulationConfig(seed=0, dmin=2.5))
    truth.write_model(tmp_path / "m.pdb")
    ref = model_amplitudes(tmp_path / "m.pdb", 2.5)
    mine = dict(zip(map(tuple, ref.hkl.tolist()), ref.amplitudes))
    true = dict(zip(map(tuple, truth.hkl.tolist()), truth.F_model))
    assert mine.keys() == true.keys()
    a = np.array([mine[k] for k in true])
    b = np.array([true[k] for k in true])
    # the simulator sums form factors per reflection; the model route goes through a grid
    assert np.corrcoef(a, b)[0, 1] > 0.9999
    assert np.median(a / b) == pytest.approx(1.0, abs=0.01)


def test_a_prior_that_cannot_be_used_stops_the_start_naming_the_option(few, tmp_path, capsys):
    stream, _ = few
    out = tmp_path / "x.mtz"
    assert main(["merge", str(stream), "-o", str(out), "--prior-mtz",
                 str(tmp_path / "missing.mtz"), *FAST]) != 0
    err = capsys.readouterr().err
    assert "--prior-mtz" in err and "missing.mtz: cannot read it as MTZ" in err
    assert main(["merge", str(stream), "-o", str(out), "--prior-model",
                 str(tmp_path / "missing.pdb"), *FAST]) != 0
    assert "--prior-model" in capsys.readouterr().err
    assert not out.exists()
