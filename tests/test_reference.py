"""Indexing ambiguity end to end: the simulator's merohedral settings, the merge's per-image
choice, its row statistics, and the reindexing of the output into a reference's setting."""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import reciprocalspaceship as rs

from streamvi.errors import ConfigError
from streamvi.merging.offline import merge_crystals
from streamvi.publish.mtz import snapshot_to_dataset
from streamvi.merging.reference import (ReferenceData, ReferenceSetting, align_snapshot,
                                read_reference, reindex_snapshot)
from streamvi.symmetry import ReciprocalSpace, op_triplet
from streamvi.merging.trainer import TrainerConfig

P43_CELL = (79.1, 79.1, 37.9, 90.0, 90.0, 90.0)
P3_CELL = (60.0, 60.0, 45.0, 90.0, 90.0, 120.0)


# ----------------------------------------------------------------------------- symmetry


def test_op_triplet_spells_matrices_as_crystallographers_do():
    assert op_triplet(np.eye(3, dtype=int)) == "h,k,l"
    assert op_triplet(np.array([[0, 1, 0], [1, 0, 0], [0, 0, -1]])) == "k,h,-l"
    assert op_triplet(np.array([[-1, -1, 0], [0, 1, 0], [0, 0, -1]])) == "-h-k,k,-l"
    assert op_triplet(np.array([[2, 0, 0], [0, 1, 0], [0, 0, 1]])) == "2h,k,l"


@pytest.mark.parametrize("group, cell, anomalous", [("P 43", P43_CELL, False),
                                                    ("P 43", P43_CELL, True),
                                                    ("P 3", P3_CELL, True),
                                                    ("P 63", P3_CELL, False)])
def test_reindex_rows_is_a_permutation_that_keeps_resolution_and_centricity(group, cell,
                                                                           anomalous):
    space = ReciprocalSpace(group, cell, 3.0, anomalous=anomalous)
    assert space.n_ops > 1
    for op in space.twin_ops:
        perm = space.reindex_rows(op)
        assert np.array_equal(np.sort(perm), np.arange(space.n_unique))
        np.testing.assert_allclose(space.d[perm], space.d, rtol=1e-5)
        assert np.array_equal(space.centric[perm], space.centric)
    # the identity leaves every row where it is; a twin law moves most of them
    assert np.array_equal(space.reindex_rows(space.twin_ops[0]), np.arange(space.n_unique))
    assert (space.reindex_rows(space.twin_ops[1]) != np.arange(space.n_unique)).mean() > 0.5


def test_reindex_rows_refuses_an_operator_that_is_not_a_twin_law():
    space = ReciprocalSpace("P 43", P43_CELL, 3.0)
    with pytest.raises(ConfigError, match="does not map the P 43 table onto itself"):
        space.reindex_rows(np.array([[1, 1, 0], [0, 1, 0], [0, 0, 1]]))


# ----------------------------------------------------------------------------- choice


def _snapshot_like(space, f_rows):
    """The parts of a MergeSnapshot that the reference code reads."""
    from streamvi.merging.engine import MergeSnapshot

    n = space.n_unique
    table = {"F": f_rows.astype(np.float32), "SIGF": np.ones(n, np.float32),
             "I": (f_rows ** 2).astype(np.float32), "SIGI": np.ones(n, np.float32)}
    return MergeSnapshot(snapshot_id=1, time=0.0, space=space,
                         tables={"all": table, "half1": dict(table), "half2": dict(table)},
                         obs_count=np.tile(np.arange(n) % 5 + 1, (3, 1)), n_images=1,
                         n_reflections=n, step=1, stats=None)


@pytest.mark.parametrize("group, cell", [("P 43", P43_CELL), ("P 3", P3_CELL)])
def test_reference_picks_the_twin_law_that_undoes_the_merges_setting(group, cell):
    space = ReciprocalSpace(group, cell, 3.0, anomalous=True)
    rng = np.random.default_rng(0)
    # Bijvoet mates equal (a reference holds one amplitude per index)
    truth = rng.rayleigh(size=space.n_unique)[space.lookup(space.hkl)]
    reference = ReferenceSetting(space, ReferenceData("truth", space.hkl, truth))
    for k in range(1, space.n_ops):
        # a merge that settled in setting k holds at row r what the truth has at perm_k[r]
        perm = space.reindex_rows(space.twin_ops[k])
        merged = truth[perm] + 0.05 * rng.normal(size=space.n_unique)
        snap = _snapshot_like(space, merged)
        aligned, choice = align_snapshot(snap, reference)
        assert op_triplet(space.twin_ops[k]) == choice.op
        assert choice.cc[k] > 0.99 and max(np.delete(choice.cc, k)) < 0.8
        np.testing.assert_allclose(aligned.tables["all"]["F"], truth, atol=0.3)
        assert np.array_equal(aligned.obs_count[:, perm], snap.obs_count)
        assert aligned.history[-2].startswith(f"reindexed by {choice.op} into the setting of "
                                              "truth")
        assert aligned.history[-1].startswith("CC(F) with it per operator: h,k,l ")
    # in its own setting nothing moves
    same, choice = align_snapshot(_snapshot_like(space, truth), reference)
    assert choice.op_index == 0 and choice.cc[0] > 0.99
    assert np.array_equal(same.tables["all"]["F"], truth.astype(np.float32))
    assert same.history == []


def test_reindex_snapshot_moves_every_table_and_the_counts():
    space = ReciprocalSpace("P 43", P43_CELL, 3.0)
    snap = _snapshot_like(space, np.arange(space.n_unique, dtype=np.float64))
    perm = space.reindex_rows(space.twin_ops[1])
    gains = np.stack([np.arange(space.n_unique) + 0.5, np.arange(space.n_unique) + 0.25])
    snap = replace(snap, delta_gain=gains)
    moved = reindex_snapshot(snap, perm, ["note"])
    for name in ("all", "half1", "half2"):
        for col in ("F", "SIGF", "I", "SIGI"):
            assert np.array_equal(moved.tables[name][col][perm], snap.tables[name][col])
    assert np.array_equal(moved.obs_count[:, perm], snap.obs_count)
    # a condition's ΔF gains travel with their rows
    assert np.array_equal(moved.delta_gain[:, perm], gains)
    assert moved.history == ["note"]


def test_reference_of_another_crystal_form_is_refused(tmp_path):
    space = ReciprocalSpace("P 43", P43_CELL, 3.0)
    other = ReciprocalSpace("P 3", P3_CELL, 3.0)
    ds = _write_reference(tmp_path / "hexagonal.mtz", other, "FP", "F")
    with pytest.raises(ConfigError, match="hexagonal.mtz.*not the merge's"):
        ReferenceSetting(space, read_reference(ds))


def _write_reference(path, space, column, mtztype):
    rng = np.random.default_rng(1)
    ds = rs.DataSet({"H": space.hkl[:, 0], "K": space.hkl[:, 1], "L": space.hkl[:, 2],
                     column: rng.rayleigh(size=space.n_unique)},
                    cell=space.cell, spacegroup=space.space_group, merged=True)
    ds = ds.astype({"H": "HKL", "K": "HKL", "L": "HKL", column: mtztype})
    ds.set_index(["H", "K", "L"]).write_mtz(str(path))
    return path


def test_read_reference_finds_the_column_or_says_which_exist(tmp_path):
    space = ReciprocalSpace("P 43", P43_CELL, 3.0)
    f = read_reference(_write_reference(tmp_path / "f.mtz", space, "FP", "F"))
    assert f.name == "f.mtz:FP" and f.amplitudes.shape == (space.n_unique,)
    i = read_reference(_write_reference(tmp_path / "i.mtz", space, "IMEAN", "J"))
    assert i.name == "i.mtz:IMEAN" and (i.amplitudes >= 0).all()
    g = read_reference(_write_reference(tmp_path / "g.mtz", space, "F(+)", "G"))
    assert g.name == "g.mtz:F(+)"
    with pytest.raises(ConfigError, match="column N has MTZ type I, not an amplitude"):
        read_reference(_write_reference(tmp_path / "n.mtz", space, "N", "I"), "N")
    with pytest.raises(ConfigError, match=r"no column FOO; it has \['FP'\]"):
        read_reference(tmp_path / "f.mtz", "FOO")
    with pytest.raises(ConfigError, match="cannot read it as MTZ"):
        (tmp_path / "junk.mtz").write_bytes(b"not an mtz")
        read_reference(tmp_path / "junk.mtz")


# ----------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def ambiguous_beamtime():
    from streamvi_sim import SimulationConfig
    from streamvi_sim.beamtime import Simulator

    sim = SimulationConfig(n_images=600, seed=4, dmin=3.0, space_group="P 43", cell=P43_CELL,
                           indexing_ambiguity=True, misindexed_fraction=0.0)
    simulator = Simulator(sim)
    pairs = [simulator.image(i) for i in range(sim.n_images)]
    return sim, simulator.truth, pairs


def test_simulated_settings_keep_every_spots_geometry(ambiguous_beamtime):
    import dataclasses

    from streamvi.merging.features import reflection_metadata
    from streamvi.symmetry import reindex
    from streamvi_sim.beamtime import Simulator

    sim, truth, pairs = ambiguous_beamtime
    settings = np.array([t.setting for _, t in pairs])
    assert 0.35 < settings.mean() < 0.65            # two settings, drawn uniformly
    plain = Simulator(dataclasses.replace(sim, indexing_ambiguity=False), truth)
    ops = ReciprocalSpace("P 43", P43_CELL, 3.0).twin_ops
    for i in np.nonzero(settings)[0][:3]:
        msg, t = pairs[i]
        ref, _ = plain.image(i)
        # the same spots, indices reindexed, and the same 1/d², Ewald offsets and s1
        assert np.array_equal(msg.hkl(), reindex(ref.hkl(), ops[1]))
        np.testing.assert_allclose(reflection_metadata(msg), reflection_metadata(ref),
                                   rtol=1e-4, atol=1e-6)
        assert np.array_equal(msg.I, ref.I)


def test_merge_resolves_the_ambiguity_and_the_reference_fixes_the_setting(ambiguous_beamtime,
                                                                          tmp_path):
    import dataclasses

    from streamvi.quality.evaluate import average_merge, compare_to_truth
    from streamvi_sim.beamtime import Simulator

    sim, truth, pairs = ambiguous_beamtime
    crystals = [m for m, _ in pairs]
    settings = np.array([t.setting for _, t in pairs])
    space = ReciprocalSpace(sim.space_group, sim.cell, sim.dmin)
    truth_mtz = tmp_path / "truth.mtz"
    truth.to_mtz(truth_mtz)
    truth_ds = rs.read_mtz(str(truth_mtz))
    snap, engine = merge_crystals(crystals, space, epochs=8,
                                  trainer_config=TrainerConfig(device="cpu", mc_samples=4),
                                  reference=read_reference(truth_mtz, "FMODEL"))
    # every image put in one setting: chosen operator = a fixed function of the true one
    chosen = engine.store.image_op[: engine.n_images]
    agree = max(np.mean(chosen == settings), np.mean(chosen != settings))
    assert agree > 0.97
    # the published merge is in the truth's setting, as good as a merge of the same shots
    # reported in one setting, and far better than a plain average that mixes the settings
    cc = compare_to_truth(snapshot_to_dataset(snap), truth_ds)["cc_F"]
    one_setting = Simulator(dataclasses.replace(sim, indexing_ambiguity=False), truth)
    plain, _ = merge_crystals([one_setting.image(i)[0] for i in range(len(pairs))], space,
                              epochs=8, trainer_config=TrainerConfig(device="cpu", mc_samples=4))
    cc_plain = compare_to_truth(snapshot_to_dataset(plain), truth_ds)["cc_F"]
    print(f"CC(F) ambiguous {cc:.4f}, one setting {cc_plain:.4f}")
    assert cc > 0.85 and cc > cc_plain - 0.02
    assert compare_to_truth(average_merge(crystals, space, weighting="mean"),
                            truth_ds)["cc_F"] < cc - 0.2
    choice = engine.setting_choice
    assert choice.op_index == int(np.mean(chosen == settings) < 0.5)
    assert choice.cc[choice.op_index] > 0.85 and min(choice.cc) < 0.4
    # N counts each observation in the row the merge put it in: a recount from the
    # stored indices and the chosen operators gives the same table
    store = engine.store
    recount = np.zeros(space.n_unique, np.int64)
    for i in range(store.n_images):
        rows = space.lookup_ops(crystals[i].hkl())[:, space.lookup(crystals[i].hkl()) >= 0]
        np.add.at(recount, rows[chosen[i]], 1)
    assert np.array_equal(store.obs_count[0], recount)
    assert np.array_equal(store.obs_count[1] + store.obs_count[2], recount)


def test_checkpoint_keeps_each_images_setting(ambiguous_beamtime):
    import io

    import torch

    from streamvi.merging.engine import MergeEngine

    sim, truth, pairs = ambiguous_beamtime
    space = ReciprocalSpace(sim.space_group, sim.cell, sim.dmin)
    tcfg = TrainerConfig(device="cpu", mc_samples=2)
    engine = MergeEngine(space, tcfg)
    crystals = [m for m, _ in pairs[:60]]
    for msg in crystals:
        engine.add(msg)
    engine.store.set_ops(torch.arange(60), torch.from_numpy(np.arange(60) % 2))
    buf = io.BytesIO()
    torch.save(engine.state_dict(), buf)
    counts = engine.store.obs_count.copy()
    # a restart: the store rebuilt from the spool (same order), then the checkpoint
    again = MergeEngine(space, tcfg)
    for msg in crystals:
        again.add(msg)
    assert not np.array_equal(again.store.obs_count, counts)
    buf.seek(0)
    again.load_state_dict(torch.load(buf, weights_only=True))
    assert np.array_equal(again.store.image_op[:60], np.arange(60) % 2)
    assert np.array_equal(again.store.obs_count, counts)
