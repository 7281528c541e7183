"""The intensity standardiser against one poisoned early crystal (issue 18, item 2).

A plain mean over the first reflections, frozen and checkpointed, was ruined for the whole run
by one valid crystal with I = 1e9 or I = -1e6.  The scale is now kept per crystal and
crystals far from the median crystal are left out of it.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from streamvi.merging.model.standardize import Standardizer


def crystals(rng: np.random.Generator, n: int = 40, size: int = 60) -> list[np.ndarray]:
    # crystals of different sizes: their mean intensities spread over a decade
    return [rng.exponential(50.0, size) * rng.lognormal(0.0, 0.6) for _ in range(n)]


def feed(std: Standardizer, batches: list[list[np.ndarray]]) -> None:
    for batch in batches:
        iobs = torch.tensor(np.concatenate(batch))
        index = torch.repeat_interleave(torch.arange(len(batch)),
                                        torch.tensor([len(c) for c in batch]))
        std.update(torch.zeros(iobs.shape[0], 2), iobs, index, len(batch))


@pytest.mark.parametrize("poison", [1e9, -1e6])
@pytest.mark.parametrize("where", ["first, alone", "inside the first batch", "later"])
def test_one_poisoned_crystal_does_not_move_the_scale(poison, where):
    rng = np.random.default_rng(0)
    good = crystals(rng)
    bad = np.full(60, poison)
    clean = Standardizer(2)
    feed(clean, [good[i:i + 8] for i in range(0, len(good), 8)])
    expected = np.concatenate(good).mean()
    assert clean.intensity_scale() == pytest.approx(expected, rel=1e-9)   # plain mean

    std = Standardizer(2)
    if where == "first, alone":
        batches = [[bad]] + [good[i:i + 8] for i in range(0, len(good), 8)]
    elif where == "inside the first batch":
        batches = [[bad] + good[:7]] + [good[i:i + 8] for i in range(7, len(good), 8)]
    else:
        batches = [good[:8], [bad] + good[8:15]] + [good[i:i + 8] for i in range(15, 40, 8)]
    feed(std, batches)
    assert std.intensity_scale() == pytest.approx(expected, rel=1e-9)
    # the plain mean it replaces: 1e9 → 20 million times too large; -1e6 → negative
    plain = float(std.i_sum / std.count)
    assert abs(plain / expected - 1) > 10


def test_the_scale_survives_a_checkpoint_and_merges_across_ranks():
    rng = np.random.default_rng(1)
    good = crystals(rng)
    one = Standardizer(2)
    feed(one, [good[i:i + 8] for i in range(0, 40, 8)])
    restored = Standardizer(2)
    restored.load_state_dict(one.state_dict())
    assert restored.intensity_scale() == one.intensity_scale()
    feed(restored, [[np.full(60, 1e9)]])
    assert restored.intensity_scale() == pytest.approx(one.intensity_scale(), rel=1e-12)
    a, b = Standardizer(2), Standardizer(2)
    feed(a, [good[i:i + 8] for i in range(0, 16, 8)])
    feed(b, [good[i:i + 8] for i in range(16, 40, 8)])
    a.merge(b)
    assert a.intensity_scale() == pytest.approx(one.intensity_scale(), rel=1e-12)


def test_a_checkpoint_from_before_keeps_its_scale():
    """Older checkpoints hold only the plain sums: their scale must not change on loading."""
    old = {"count": torch.tensor(1000.0, dtype=torch.float64),
           "meta_mean": torch.zeros(2, dtype=torch.float64),
           "meta_m2": torch.ones(2, dtype=torch.float64),
           "i_sum": torch.tensor(123_000.0, dtype=torch.float64),
           "i_sumsq": torch.tensor(3e7, dtype=torch.float64),
           "frozen": torch.tensor(True)}
    std = Standardizer(2)
    std.load_state_dict(old)
    assert std.is_frozen and std.intensity_scale() == pytest.approx(123.0)
    negative = dict(old, i_sum=torch.tensor(-5.0, dtype=torch.float64))
    std.load_state_dict(negative)
    assert std.intensity_scale() == pytest.approx(np.sqrt(3e7 / 1000))


def test_crystals_of_noise_only_fall_back_to_their_rms():
    rng = np.random.default_rng(2)
    noise = [rng.normal(0.0, 5.0, 60) - 1.0 for _ in range(9)]
    std = Standardizer(2)
    feed(std, [noise])
    rms = np.median([np.sqrt(np.mean(c ** 2)) for c in noise])
    assert std.intensity_scale() == pytest.approx(rms, rel=0.2)
    assert Standardizer(2).intensity_scale() == 1.0
