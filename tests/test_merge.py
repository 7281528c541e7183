"""Offline merging of simulated stills against the simulator's truth."""
from __future__ import annotations

import numpy as np
import pytest

from streamvi.merging.engine import EngineConfig
from streamvi.merging.offline import merge_crystals
from streamvi.symmetry import ReciprocalSpace
from streamvi.merging.trainer import TrainerConfig


@pytest.fixture(scope="module")
def beamtime():
    from streamvi_sim import SimulationConfig, simulate_images, simulate_structure

    sim = SimulationConfig(n_images=600, seed=5, dmin=2.5, misindexed_fraction=0.05,
                           emit_truth_metadata=True)
    truth = simulate_structure(sim)
    crystals = list(simulate_images(sim, truth))
    space = ReciprocalSpace(sim.space_group, sim.cell, sim.dmin, anomalous=False)
    return crystals, space


def test_misindexed_images_are_left_out_and_good_ones_kept(beamtime):
    crystals, space = beamtime
    misindexed = np.array([c.metadata["sim_misindexed"] for c in crystals])
    assert 15 <= misindexed.sum() <= 50
    snap, engine = merge_crystals(crystals, space, epochs=6,
                                  trainer_config=TrainerConfig(device="cpu", mc_samples=4))
    rejected = engine.store.image_rejected[: engine.n_images]
    # the test is conservative on a merge of this size (2,000 images at 1.8 Å: 32 of 32
    # misindexed flagged, 0 of 1,968 good ones); it must never cost many good images
    assert rejected[misindexed].mean() >= 0.5
    assert rejected[~misindexed].mean() <= 0.01
    assert engine.store.n_rejected == int(rejected.sum()) > 0
    # with the test off nothing is flagged, although the merge got as far (Σ final)
    _, plain = merge_crystals(crystals, space, epochs=6,
                              trainer_config=TrainerConfig(device="cpu", mc_samples=4),
                              engine_config=EngineConfig(reject_misfit_images=False))
    assert plain.sigma_stage == 2 and not plain.trainer.model.reject_images
    assert plain.store.n_rejected == 0


def test_annealing_ends_at_the_final_learning_rate(beamtime):
    from streamvi.merging.offline import FINAL_LR_FACTOR

    crystals, space = beamtime
    tcfg = TrainerConfig(device="cpu", mc_samples=2, lr=2e-3, posterior_lr=1e-2)
    _, engine = merge_crystals(crystals[:40], space, steps=20, trainer_config=tcfg)
    assert engine.trainer.step == 20
    for opt, base in ((engine.trainer.scale_optimizer, 2e-3),
                      (engine.trainer.posterior_optimizer, 1e-2)):
        assert opt.param_groups[0]["lr"] == pytest.approx(base * FINAL_LR_FACTOR)
    _, constant = merge_crystals(crystals[:40], space, steps=20, trainer_config=tcfg, anneal=0.0)
    assert constant.trainer.posterior_optimizer.param_groups[0]["lr"] == pytest.approx(1e-2)



def test_merge_points_to_the_geometric_partiality_when_the_fall_off_is_large(beamtime):
    """`streamvi merge` warns when change 10 gave the amplitudes B < −8 Å² and enough
    crystals report what the geometric partiality reads; not otherwise."""
    import dataclasses

    from streamvi.cli.merge import falloff_advice
    from streamvi.merging.offline import (PARTIALITY_CHECK_B as FALLOFF_ADVICE_B,
                                          PARTIALITY_CHECK_CRYSTALS as FALLOFF_ADVICE_CRYSTALS)

    crystals = beamtime[0]
    assert all(c.has_orientation() and c.profile_radius and c.beam_bandwidth for c in crystals)
    line = falloff_advice(-18.4, crystals, geometric_partiality=False)
    assert "B -18.4 A^2" in line
    assert "--geometric-partiality" in line
    assert falloff_advice(-18.4, crystals, geometric_partiality=True) is None
    assert falloff_advice(FALLOFF_ADVICE_B + 0.1, crystals, geometric_partiality=False) is None
    assert falloff_advice(18.4, crystals, geometric_partiality=False) is None
    few = crystals[:FALLOFF_ADVICE_CRYSTALS - 1]
    assert falloff_advice(-18.4, few, geometric_partiality=False) is None
    assert falloff_advice(None, crystals, geometric_partiality=False) is None
    no_band = [dataclasses.replace(c, beam_bandwidth=None) for c in crystals]
    assert falloff_advice(-18.4, no_band, geometric_partiality=False) is None
