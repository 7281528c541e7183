"""The record of reflections beyond a table's dmin (streamvi/merging/beyond.py), against
counts made here with gemmi on the same reflections."""
import re

import gemmi
import numpy as np
import pytest

from streamvi.merging import beyond
from streamvi.merging.beyond import BeyondDmin
from streamvi.merging.store import ReflectionStore
from streamvi.symmetry import ReciprocalSpace
from streamvi_sim import SimulationConfig, simulate_images, simulate_structure


def test_counts_shells_and_the_reach_of_what_arrives():
    rng = np.random.default_rng(3)
    s = rng.uniform(0.0, 1 / 1.5 ** 2, 20000)            # uniform in 1/d²: 1/∞ .. 1/1.5²
    d = 1 / np.sqrt(s)
    i_over_sig = np.where(d < 2.0, 4.0 * (d - 1.5), 5.0)    # falls to 0 at 1.5 Å
    rec = BeyondDmin(2.0)
    n = rec.add(d, 2.0 * i_over_sig, np.full(d.shape, 2.0))
    assert n == int(np.sum(d < 2.0)) == rec.n_beyond
    assert rec.inside == int(np.sum(d >= 2.0))
    assert rec.fraction == pytest.approx(np.mean(d < 2.0))
    assert rec.d_min_seen == pytest.approx(d.min())
    # 99 % of the reflections reach the suggestion: as counted here, within a fine shell
    reach = rec.suggested_dmin()
    assert reach == rec.reach() and reach < 2.0
    assert np.mean(d >= reach) >= 0.99 - 1e-9
    assert np.mean(d >= reach + 0.02) < 0.99
    shells = rec.shells()
    assert sum(sh["reflections"] for sh in shells) == n
    assert shells[0]["d_max"] == 2.0 and shells[-1]["d_min"] <= d.min() + 1e-3
    for sh in shells:       # the mean I/σ of the shell, as computed here
        m = (d < sh["d_max"]) & (d >= sh["d_min"])
        assert sh["mean_i_over_sigma"] == pytest.approx(np.mean(i_over_sig[m]), abs=0.05)
    assert [sh["mean_i_over_sigma"] for sh in shells] == sorted(
        sh["mean_i_over_sigma"] for sh in shells)[::-1]
    # bad σ: counted, not in the mean; NaN d: not counted at all
    rec2 = BeyondDmin(2.0)
    assert rec2.add(np.array([1.9, 1.9, np.nan]), np.array([5.0, 5.0, 1.0]),
                    np.array([1.0, 0.0, 1.0])) == 2
    assert rec2.shells()[-1]["reflections"] == 2
    assert rec2.shells()[-1]["mean_i_over_sigma"] == pytest.approx(5.0)


def test_no_suggestion_while_few_reflections_lie_beyond():
    rec = BeyondDmin(2.0)
    rec.add(np.r_[np.full(10000, 3.0), np.full(150, 1.9)], np.ones(10150), np.ones(10150))
    assert rec.fraction < beyond.MIN_FRACTION and rec.suggested_dmin() is None
    assert 1.85 <= rec.to_dict()["reach"] <= 1.9       # the fine shell holding 1.9 Å
    rec.add(np.full(600, 1.8), np.ones(600), np.ones(600))
    assert rec.suggested_dmin() is not None and 1.75 <= rec.suggested_dmin() < 1.8
    assert BeyondDmin(2.0).to_dict() == {"dmin": 2.0, "reflections": 0, "fraction": 0.0,
                                         "d_min_seen": None, "reach": None,
                                         "suggested_dmin": None, "shells": []}
    with pytest.raises(ValueError, match="dmin"):
        BeyondDmin(0.0)


def test_the_store_records_every_arriving_reflection_beyond_its_table():
    sim = SimulationConfig(n_images=30, seed=2, dmin=2.4)
    crystals = list(simulate_images(sim, simulate_structure(sim)))
    space = ReciprocalSpace(sim.space_group, sim.cell, 3.0)
    store = ReflectionStore(space)
    results = store.add_many(crystals)
    cell = gemmi.UnitCell(*sim.cell)
    d = np.concatenate([cell.calculate_d_array(c.hkl().astype(np.int32)) for c in crystals])
    assert store.beyond_dmin.n_beyond == int(np.sum(d < 3.0)) > 0
    assert store.beyond_dmin.inside == int(np.sum(d >= 3.0))
    # what the store left out is what lies beyond, plus the absences
    assert sum(r.n_outside for r in results) >= store.beyond_dmin.n_beyond
    assert store.beyond_dmin.d_min_seen == pytest.approx(d.min(), rel=1e-5)


def test_merge_says_what_its_dmin_left_out(tmp_path, capsys):
    """``streamvi merge --dmin`` below the data's reach: the MTZ history and the terminal
    give the reflections beyond it, counted as gemmi counts them in the stream it read."""
    from streamvi.cli.main import main
    from streamvi.sources import open_file
    from streamvi.wire import CrystalMessage

    stream, out = tmp_path / "s.stream", tmp_path / "m.mtz"
    assert main(["simulate", "--images", "24", "--seed", "3", "--dmin", "2.8",
                 "-o", str(stream)]) == 0
    capsys.readouterr()
    assert main(["merge", str(stream), "-o", str(out), "--space-group", "P 43 21 2",
                 "--dmin", "3.4", "--steps", "10", "--device", "cpu", "--mc-samples", "2",
                 "--quiet"]) == 0
    text = capsys.readouterr().out
    crystals = [c for c in open_file(stream) if isinstance(c, CrystalMessage)]
    mtz = gemmi.read_mtz_file(str(out))
    d = np.concatenate([mtz.cell.calculate_d_array(c.hkl().astype(np.int32))
                        for c in crystals])
    n = int(np.sum(d < 3.4))
    assert n > 0
    assert f"{n} reflections beyond dmin 3.4 A (to {d.min():.2f} A) not merged" in [
        h.strip() for h in mtz.history]
    assert re.search(rf"^{n} reflections \([\d.]+%\) beyond --dmin 3.4 Å, out to "
                     rf"{d.min():.2f} Å, not merged \(mean I/σ\(I\) per observation: 3\.40–",
                     text, re.M), text[-800:]
