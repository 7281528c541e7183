"""The data's own partiality verdict (streamvi/merging/reach.py, docs/model.md change 26):
which observations the reported geometry puts beyond reach, against the simulator's true
partialities; the verdict on a stream that integrates pure background and on one whose
profile reaches further than the reported geometry; its bars."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from streamvi.merging import reach
from streamvi.merging.features import reflection_metadata
from streamvi.merging.reach import ReachEvidence, ReachTally, reach_suspect
from streamvi.merging.store import ReflectionStore
from streamvi.symmetry import ReciprocalSpace
from streamvi_sim import SimulationConfig, simulate_images, simulate_structure
from streamvi_sim.beamtime import Simulator

# CrystFEL partial_sim's kind: xsphere intensities, every reflection within 2.5 profile
# widths integrated (pure background beyond one radius), exact geometry reported
OVERPREDICTED = dict(partiality_profile="xsphere", flat_intensities=True, bandwidth=0.01,
                     profile_radius=(0.0003, 0.0006), mosaicity_deg=0.0,
                     orientation_error_deg=0.0, cell_error=0.0, b_image_sd=0.0,
                     outlier_fraction=0.0, misindexed_fraction=0.0, overprediction=2.5,
                     top_shell_photons=100.0)


def _store(cfg: SimulationConfig) -> ReflectionStore:
    store = ReflectionStore(ReciprocalSpace(cfg.space_group, cfg.cell, cfg.dmin))
    store.add_many(list(simulate_images(cfg, simulate_structure(cfg))))
    return store


def test_beyond_reach_is_where_the_true_partiality_is_zero():
    """With the geometry reported exactly, every observation the tally puts beyond reach is
    one the simulator gave no intensity (true partiality 0).  The simulator's band has a
    sharp edge and the model's a Gaussian tail, so the model keeps some of the true zeros
    within reach (P up to 0.5): the verdict rests on those it is sure of."""
    cfg = SimulationConfig(n_images=6, seed=3, dmin=3.0, **OVERPREDICTED)
    sim = Simulator(cfg)
    tally = ReachTally(1.0 / cfg.dmin ** 2)
    zero = beyond = observations = 0
    z_beyond = []
    for i in range(cfg.n_images):
        msg, truth = sim.image(i)
        factor = np.asarray(truth.intensity_factor)
        with torch.no_grad():
            log_p = tally._partiality(torch.from_numpy(reflection_metadata(msg))).numpy()
        mine = log_p <= reach._BEYOND_LOG_P
        assert (factor[mine] == 0).all()              # beyond reach: no intensity, ever
        z_beyond.append(np.asarray(msg.I)[mine] / np.asarray(msg.sigI)[mine])
        before = tally.evidence().beyond
        tally.add(reflection_metadata(msg), msg.I, msg.sigI, crystals=1)
        assert tally.evidence().beyond - before == int(mine.sum())
        zero += int((factor == 0).sum())
        beyond += int(mine.sum())
        observations += len(msg)
    assert beyond > 0.1 * zero
    ev = tally.evidence()
    assert (ev.crystals, ev.observations, ev.beyond) == (cfg.n_images, observations, beyond)
    # their mean I/σ is pure background's: 0 within its error
    z = np.concatenate(z_beyond)
    assert abs(z.mean()) < 3 * z.std() / np.sqrt(z.size)
    assert abs(ev.signal_ratio) < 3 * ev.ratio_error


def test_the_verdict_on_pure_background_and_on_a_profile_that_reaches_further():
    """120 stills of the partial_sim kind: suspect (the merge then takes the geometric
    partiality before training).  120 stills of the project's default simulation with the
    same photons, whose Gaussian profile has signal beyond the reported radius: not
    suspect, by far (a quarter of the near-full signal)."""
    suspect = _store(SimulationConfig(n_images=120, seed=5, dmin=3.0, **OVERPREDICTED))
    ev = suspect.reach.evidence()
    assert ev.crystals == 120 == suspect.n_geometry_images
    assert ev.beyond >= reach.REACH_MIN_BEYOND and ev.share_beyond > 0.01
    assert reach_suspect(ev)
    assert ev.history_line().startswith("geometric partiality on: ")
    assert len(ev.history_line()) <= 80
    gaussian = _store(SimulationConfig(n_images=120, seed=5, dmin=3.0, bandwidth=0.01,
                                       top_shell_photons=100.0))
    ev = gaussian.reach.evidence()
    assert ev.beyond >= reach.REACH_MIN_BEYOND
    assert ev.signal_ratio - 3 * ev.ratio_error > 0.1 and not reach_suspect(ev)


def test_the_bars_of_the_verdict():
    empty = ReachEvidence(crystals=100, observations=50_000, beyond=1000, signal_ratio=0.0,
                          ratio_error=0.005)
    assert reach_suspect(empty)
    assert not reach_suspect(ReachEvidence(99, 50_000, 1000, 0.0, 0.005))     # crystals
    assert not reach_suspect(ReachEvidence(100, 50_000, 999, 0.0, 0.005))     # beyond
    assert not reach_suspect(ReachEvidence(100, 50_000, 1000, 0.0, 0.007))    # 0 + 3σ ≥ 0.02
    assert not reach_suspect(ReachEvidence(100, 50_000, 1000, 0.03, 0.0))
    assert not reach_suspect(ReachEvidence(100, 50_000, 0, math.nan, math.nan))
    assert empty.share_beyond == pytest.approx(0.02)


def test_observations_without_a_measurement_are_left_out():
    cfg = SimulationConfig(n_images=1, seed=3, dmin=3.0, **OVERPREDICTED)
    msg, _ = Simulator(cfg).image(0)
    meta = reflection_metadata(msg)
    iobs = np.asarray(msg.I, np.float64).copy()
    sig = np.asarray(msg.sigI, np.float64).copy()
    iobs[0], sig[1], sig[2] = np.nan, 0.0, np.inf
    tally = ReachTally(1.0 / cfg.dmin ** 2)
    tally.add(meta, iobs, sig, crystals=1)
    ev = tally.evidence()
    assert ev.observations == len(msg) - 3 and math.isfinite(ev.signal_ratio)
    with pytest.raises(ValueError, match="1/dmin"):
        ReachTally(0.0)


def test_the_tally_stops_reading_at_its_crystal_cap(monkeypatch):
    """Past :data:`REACH_MAX_CRYSTALS` crystals nothing more is read (the verdict is settled
    and the ingest of a long stream does not pay for it)."""
    cfg = SimulationConfig(n_images=3, seed=3, dmin=3.0, **OVERPREDICTED)
    sim = Simulator(cfg)
    monkeypatch.setattr(reach, "REACH_MAX_CRYSTALS", 2)
    tally = ReachTally(1.0 / cfg.dmin ** 2)
    sizes = []
    for i in range(3):
        msg, _ = sim.image(i)
        tally.add(reflection_metadata(msg), msg.I, msg.sigI, crystals=1)
        sizes.append(len(msg))
    ev = tally.evidence()
    assert ev.crystals == 2 and ev.observations == sizes[0] + sizes[1]


def test_tallies_of_disjoint_crystals_add_up():
    """The data-parallel ranks sum their tallies' vectors: the sum of two halves' vectors
    gives the evidence of one tally over all the crystals (numbers to float precision)."""
    cfg = SimulationConfig(n_images=60, seed=8, dmin=3.0, **OVERPREDICTED)
    crystals = list(simulate_images(cfg, simulate_structure(cfg)))
    space = ReciprocalSpace(cfg.space_group, cfg.cell, cfg.dmin)
    whole, first, second = (ReflectionStore(space) for _ in range(3))
    whole.add_many(crystals)
    first.add_many(crystals[0::2])
    second.add_many(crystals[1::2])
    summed = reach.reach_evidence_of(first.reach.state_vector() + second.reach.state_vector())
    ev = whole.reach.evidence()
    assert (summed.crystals, summed.observations, summed.beyond) == (
        ev.crystals, ev.observations, ev.beyond)
    assert ev.crystals == 60 and ev.beyond > 0
    assert summed.signal_ratio == pytest.approx(ev.signal_ratio, rel=1e-9, abs=1e-12)
    assert summed.ratio_error == pytest.approx(ev.ratio_error, rel=1e-9)
    assert first.reach.evidence().crystals == 30
    with pytest.raises(ValueError, match="values"):
        reach.reach_evidence_of(np.zeros(reach.REACH_VECTOR_SIZE - 1))
