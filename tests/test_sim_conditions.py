"""Pump–probe conditions in the simulator (plugins/sim/streamvi_sim/conditions.py) and in
``streamvi simulate``: interleaving, the light structure, truths per condition and for ΔF."""
from __future__ import annotations

import dataclasses
import json

import gemmi
import numpy as np
import pytest
import reciprocalspaceship as rs

from streamvi.cli.main import main
from streamvi_crystfel import read_stream
from streamvi_crystfel.writer import write_stream
from streamvi_sim import PUMP_CODE_HEADER, LightChange, SimulationConfig, Simulator, \
    simulate_structure
from streamvi_sim.conditions import changed_atoms, condition_pattern, light_truth
from streamvi_sim.model import structure_factors

BASE = SimulationConfig(n_images=12, seed=7, n_atoms=120, n_sulfur=4, n_iodide=2, dmin=2.5)
PUMPED = dataclasses.replace(BASE, conditions=("dark", "light"), condition_ratio=(1, 2),
                             light_change="move=5,shift=1.5,fraction=0.3,occupancy=2,delta=-0.5")


@pytest.fixture(scope="module")
def dark():
    return simulate_structure(BASE)


def test_interleaving_follows_the_ratio(dark) -> None:
    assert condition_pattern(PUMPED) == [0, 1, 1]
    assert condition_pattern(BASE) == [0]
    sim = Simulator(PUMPED, dark)
    got = [sim.image(i) for i in range(6)]
    assert [m.condition for m, _ in got] == ["dark", "light", "light"] * 2
    assert [t.condition for _, t in got] == [0, 1, 1] * 2
    assert [m.metadata[PUMP_CODE_HEADER] for m, _ in got] == [0, 1, 1] * 2


def test_conditions_change_only_the_structure_an_image_diffracts_from(dark) -> None:
    plain, pumped = Simulator(BASE, dark), Simulator(PUMPED, dark)
    for i in range(3):
        a, ta = plain.image(i)
        b, tb = pumped.image(i)
        np.testing.assert_array_equal(a.hkl(), b.hkl())
        assert a.astar == b.astar and ta.scale == tb.scale
        if tb.condition == 0:            # dark shots are the images of before, photons and all
            np.testing.assert_array_equal(a.I, b.I)
        else:
            assert not np.array_equal(a.I, b.I)
    assert plain.image(0)[0].condition is None and plain.image(0)[0].metadata == {}


def test_light_structure_is_the_changed_model(dark) -> None:
    light = light_truth(PUMPED, dark)
    cell, sg = dark.gemmi_cell, dark.gemmi_space_group
    # the light model's own structure factors, computed from scratch
    fp, _ = structure_factors(light.atoms, cell=cell, space_group=sg, hkl=dark.hkl,
                              photon_energy_eV=dark.photon_energy_eV)
    np.testing.assert_allclose(light.F_plus, np.abs(fp), rtol=1e-9, atol=1e-9)
    picked = changed_atoms(PUMPED, dark.atoms, cell)
    assert picked.moved.shape == (5,) and picked.occupancy_changed.shape == (2,)
    assert not set(picked.moved) & set(picked.occupancy_changed)
    assert set(dark.atoms.elements[picked.moved]) <= {"C", "N", "O"}
    shift = (picked.moved_to - dark.atoms.frac[picked.moved]) @ np.array(cell.orth.mat.tolist()).T
    np.testing.assert_allclose(np.linalg.norm(shift, axis=1), 1.5)
    rel = np.sqrt(np.mean((light.F_model - dark.F_model) ** 2) / np.mean(dark.F_model ** 2))
    assert 0.005 < rel < 0.2
    # no change: the light state is the dark one
    same = light_truth(dataclasses.replace(PUMPED, light_change=""), dark)
    np.testing.assert_allclose(same.F_plus, dark.F_plus, rtol=1e-12)


@pytest.mark.parametrize("spec, word", [("move=x", "move"), ("shift=-1", "shift"),
                                        ("fraction=2", "fraction"), ("speed=3", "speed"),
                                        ("move", "KEY=VALUE")])
def test_a_bad_light_change_is_refused_by_name(spec: str, word: str) -> None:
    with pytest.raises(ValueError, match=word):
        LightChange.parse(spec)


def test_bad_conditions_are_refused() -> None:
    with pytest.raises(ValueError, match="distinct"):
        dataclasses.replace(BASE, conditions=("dark", "dark"))
    with pytest.raises(ValueError, match="condition_ratio"):
        dataclasses.replace(BASE, conditions=("dark", "light"), condition_ratio=(1,))
    with pytest.raises(ValueError, match="needs conditions"):
        dataclasses.replace(BASE, light_change="move=2")


def test_the_pump_code_survives_a_crystfel_stream(dark, tmp_path) -> None:
    sim = Simulator(PUMPED, dark)
    msgs = [sim.image(i)[0] for i in range(3)]
    path = tmp_path / "pumped.stream"
    write_stream(path, msgs, target_cell=BASE.cell, space_group=BASE.space_group)
    assert "header/int//sim/pump_code = 1" in path.read_text()
    back = list(read_stream(path))
    assert [m.metadata[PUMP_CODE_HEADER] for m in back] == [0, 1, 1]


def test_simulate_writes_a_truth_per_condition_and_for_the_difference(tmp_path, capsys) -> None:
    truth = tmp_path / "truth.mtz"
    stream = tmp_path / "pp.stream"
    assert main(["simulate", "--images", "4", "--seed", "3", "--dmin", "3.5", "-o", str(stream),
                 "--truth", str(truth), "--conditions", "dark,light",
                 "--light-change", "move=4,shift=1.5,fraction=0.3"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["conditions"] == ["dark", "light"]
    paths = {p.split("/")[-1] for p in report["condition_truths"]}
    assert paths == {"truth-dark.mtz", "truth-light.mtz", "truth-light-minus-dark.mtz"}
    d, l = (rs.read_mtz(str(tmp_path / f"truth-{c}.mtz")) for c in ("dark", "light"))
    delta = rs.read_mtz(str(tmp_path / "truth-light-minus-dark.mtz"))
    np.testing.assert_allclose(delta["DF"].to_numpy(),
                               (l["FMODEL"] - d["FMODEL"]).to_numpy(), atol=1e-3)
    assert gemmi.read_mtz_file(str(tmp_path / "truth-light-minus-dark.mtz")).column_labels() \
        == ["H", "K", "L", "DF", "FDARK", "PHIDARK", "FLIGHT", "PHILIGHT"]
    # the dark truth is the truth of before
    np.testing.assert_allclose(rs.read_mtz(str(truth))["FMODEL"].to_numpy(),
                               d["FMODEL"].to_numpy())
    assert stream.read_text().count("header/int//sim/pump_code = ") == 4


def test_simulate_refuses_a_bad_condition_option(tmp_path, capsys) -> None:
    assert main(["simulate", "--images", "2", "-o", str(tmp_path / "x.stream"),
                 "--conditions", "dark,light", "--condition-ratio", "1,x"]) != 0
    assert "--condition-ratio" in capsys.readouterr().err
