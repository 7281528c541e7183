"""Live feedback: figures that move only with the data, the published resolution, the
provisional flag, and the decision text."""
from __future__ import annotations

import json

import numpy as np
import pytest

from streamvi.quality.feedback import LiveFeedback, decision_lines
from streamvi.quality.forecast import parse_target
from streamvi.quality.stats import ResolutionFit


@pytest.fixture(scope="module")
def trained_engine():
    """A small engine on 160 simulated images (2.5 Å), trained a little."""
    from streamvi_sim import SimulationConfig, simulate_images, simulate_structure

    from streamvi.merging.engine import EngineConfig, MergeEngine
    from streamvi.symmetry import ReciprocalSpace
    from streamvi.merging.trainer import TrainerConfig

    cfg = SimulationConfig(n_images=160, seed=3, dmin=2.5)
    messages = list(simulate_images(cfg, simulate_structure(cfg)))
    space = ReciprocalSpace(cfg.space_group, cfg.cell, cfg.dmin, anomalous=True)
    engine = MergeEngine(space, TrainerConfig(d_model=8, n_layers=1, mc_samples=2, seed=0),
                         EngineConfig(batch_images=8, n_shells=6))
    engine.add_many(messages)
    engine.train(30)
    return engine


def _observe(live: LiveFeedback, engine):
    snap = engine.snapshot()
    fb = live.observe(snap, sum_i_half=engine.store.sum_i_half.copy(),
                      wilson_sigma=engine.store.wilson_sigma(), rate=20.0)
    return snap, fb


def test_published_figures_hold_still_while_only_the_optimiser_moves(trained_engine):
    engine = trained_engine
    live = LiveFeedback([parse_target("cc_half", "0.3@dmin"),
                         parse_target("completeness", 0.999)])
    first, fb1 = _observe(live, engine)
    engine.train(40)                               # no new data: only the optimiser moves
    second, fb2 = _observe(live, engine)
    a, b = first.stats, second.stats
    moved_model = np.nanmax(np.abs(np.array(b.cc_half, float) - np.array(a.cc_half, float)))
    for name in ("cc_half_data", "cc_anom_data"):
        now, before = np.array(getattr(b, name), float), np.array(getattr(a, name), float)
        half = 0.5 * (np.array(getattr(b, f"{name}_high"), float)
                      - np.array(getattr(b, f"{name}_low"), float))
        both = np.isfinite(now) & np.isfinite(before)
        assert both.any()
        # training-free: identical, so certainly within the interval
        assert np.all(np.abs(now[both] - before[both]) < half[both])
        np.testing.assert_array_equal(now[both], before[both])
    assert fb2.resolution == fb1.resolution
    assert [f.images for f in fb2.forecasts] == [f.images for f in fb1.forecasts]
    # the model's CC½ did move with training; whether that is "provisional" follows the rule
    half_model = 0.5 * (np.array(b.cc_half_high, float) - np.array(b.cc_half_low, float))
    beyond = np.abs(np.array(b.cc_half, float) - np.array(a.cc_half, float)) > half_model
    assert fb2.provisional["cc_half"] == bool(np.any(beyond[np.isfinite(half_model)]))
    assert moved_model > 0
    assert fb1.provisional["cc_half"]          # nothing to compare the first one with
    payload = json.dumps(fb2.to_dict(), allow_nan=False)
    assert '"targets"' in payload and "NaN" not in payload
    # the table the publishers read says which resolution it carries
    assert b.resolution_cc_half == (fb2.resolution.d if fb2.resolution else None)


def _fit(d, low, high, state="fit"):
    return ResolutionFit(d=d, low=low, high=high, state=state)


def test_resolution_changes_only_beyond_its_interval():
    live = LiveFeedback()
    assert live._publish_resolution(_fit(2.4, 2.3, 2.5)).d == 2.4
    assert live._publish_resolution(_fit(2.35, 2.25, 2.45)).d == 2.4     # inside: kept
    assert live._publish_resolution(_fit(2.2, 2.15, 2.25)).d == 2.2      # outside: new
    # a change of kind must be seen twice in a row
    beyond = ResolutionFit(None, None, None, "beyond_dmin")
    assert live._publish_resolution(beyond).d == 2.2
    assert live._publish_resolution(_fit(2.21, 2.1, 2.3)).d == 2.2
    assert live._publish_resolution(beyond).state == "fit"
    assert live._publish_resolution(beyond).state == "beyond_dmin"
    assert live._publish_resolution(None).state == "beyond_dmin"


def test_decision_lines_say_what_to_do():
    fb = {"targets": [{"reached": True, "text": "completeness ≥ 99 %: reached"},
                      {"reached": False, "text": "CC½ ≥ 0.3 at 1.8 Å (data): not yet"}],
          "resolution": {"cut": 0.3, "text": "beyond dmin (1.80 Å)"},
          "resolution_model": None, "provisional": {"cc_half": True}, "done": False,
          "peaks": {"atoms": {"A/IOD1/I": 12.3, "A/SUL5/S": 2.0}, "new_peaks": [
              {"sigma": 5.5, "frac": [0.1, 0.2, 0.3], "nearest_atom": "A/UNK7/O",
               "distance": 3.1}]}}
    text = "\n".join(decision_lines(fb))
    assert "DONE  completeness" in text and "not yet" in text
    assert "beyond dmin" in text and "A/IOD1/I 12.3 σ" in text and "new peak 5.5 σ" in text
    fb["done"] = True
    assert "time to move on" in "\n".join(decision_lines(fb))
    assert "no targets set" in decision_lines({"targets": []})[0]


def test_offline_data_figures_pair_the_store_sums_with_the_store_counts(trained_engine):
    """`streamvi merge`'s training-free CC½ (attach_store_estimate) reads the store's sums,
    which hold every stored image: images the merge now leaves out as misfits must not
    change it (their counts left out, their sums kept, gave other figures)."""
    import torch

    from streamvi.quality.feedback import attach_store_estimate

    engine = trained_engine
    store = engine.store
    was = store.image_rejected.copy()
    before = engine.snapshot()
    attach_store_estimate(before, engine)
    left_out = np.arange(0, store.n_images, 5)
    store.set_rejected(torch.from_numpy(left_out), torch.ones(left_out.size, dtype=torch.bool))
    try:
        after = engine.snapshot()
        assert (after.obs_count[0] < before.obs_count[0]).any()     # the merge took fewer
        attach_store_estimate(after, engine)
        for name in ("cc_half_data", "cc_anom_data"):
            now = np.array(getattr(after.stats, name), float)
            then = np.array(getattr(before.stats, name), float)
            assert np.isfinite(now).any()
            np.testing.assert_array_equal(now, then)
    finally:
        store.set_rejected(torch.arange(store.n_images), torch.from_numpy(was))
