"""The merging engine's staging of the Wilson prior while data stream in."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from streamvi.engine import EngineConfig, MergeEngine
from streamvi.merge import merge_crystals
from streamvi.symmetry import ReciprocalSpace
from streamvi.trainer import TrainerConfig


@pytest.fixture(scope="module")
def stills():
    from streamvi_sim import SimulationConfig, simulate_images, simulate_structure

    sim = SimulationConfig(n_images=12, seed=3, dmin=2.5)
    crystals = list(simulate_images(sim, simulate_structure(sim)))
    return crystals, ReciprocalSpace(sim.space_group, sim.cell, sim.dmin, anomalous=False)


def _flat(engine: MergeEngine) -> bool:
    prior = engine.trainer.model.prior
    return bool(torch.equal(prior.variance, prior.epsilon.to(prior.variance.dtype)))


def test_provisional_sigma_waits_for_enough_images(stills):
    crystals, space = stills
    engine = MergeEngine(space, TrainerConfig(device="cpu", mc_samples=2),
                         EngineConfig(wilson_min_images=5))
    assert _flat(engine)
    engine.add(crystals[0])
    engine.step()                           # a service's first step: one still stored
    assert engine.sigma_stage == 0 and _flat(engine)
    for c in crystals[1:4]:
        engine.add(c)
    engine.step()
    assert engine.sigma_stage == 0 and _flat(engine)
    engine.add(crystals[4])
    engine.step()
    assert engine.sigma_stage == 1 and not _flat(engine)
    # Σ follows the data's fall-off: larger at low resolution than at high
    var = (engine.trainer.model.prior.variance / engine.trainer.model.prior.epsilon).numpy()
    low, high = space.d > np.quantile(space.d, 0.8), space.d < np.quantile(space.d, 0.2)
    assert var[low].mean() > 2 * var[high].mean()


def test_offline_merge_takes_sigma_from_all_data_at_once(stills):
    crystals, space = stills
    # two stills are far fewer than the streaming threshold
    assert 2 < EngineConfig().wilson_min_images
    _, engine = merge_crystals(crystals[:2], space, steps=1,
                               trainer_config=TrainerConfig(device="cpu", mc_samples=2))
    assert engine.sigma_stage >= 1 and not _flat(engine)
