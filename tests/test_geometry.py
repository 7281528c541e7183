"""Per-image geometry refinement: the corrected Ewald features against a message whose
reported basis was changed by the same amount, the lattice axes, and the per-image Adam."""
from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch

from streamvi.merging.features import reflection_metadata
from streamvi.merging.model.geometry import (N_GEOMETRY, STATE_WIDTH, adam_update, corrected_metadata,
                                     lattice_axes)

ROT, DIL = math.radians(0.05), 0.002


@pytest.fixture(scope="module")
def shots():
    from streamvi_sim import SimulationConfig
    from streamvi_sim.beamtime import Simulator

    sim = Simulator(SimulationConfig(n_images=3, seed=2, dmin=2.0))
    return [sim.image(i)[0] for i in range(3)]


def _basis(msg) -> np.ndarray:
    return np.array([msg.astar, msg.bstar, msg.cstar], dtype=np.float64)


def test_lattice_axes_give_back_the_indices(shots):
    msg = shots[0]
    axes = lattice_axes(_basis(msg)[None])[0].astype(np.float64)
    np.testing.assert_allclose(axes[0], _basis(msg), rtol=1e-6)
    q = msg.hkl().astype(np.float64) @ _basis(msg)
    np.testing.assert_allclose(q @ axes[1], msg.hkl(), atol=1e-4)
    # a singular or missing basis refines nothing
    bad = lattice_axes(np.stack([np.zeros((3, 3)), np.full((3, 3), np.nan)]))
    assert not bad.any()


def test_zero_corrections_give_the_metadata_back_exactly(shots):
    msg = shots[0]
    meta = torch.from_numpy(reflection_metadata(msg))
    index = torch.zeros(len(msg), dtype=torch.int64)
    axes = torch.from_numpy(lattice_axes(_basis(msg)[None]))
    out = corrected_metadata(meta, index, torch.zeros(1, N_GEOMETRY), axes,
                             rotation_sigma=ROT, dilation_sigma=DIL)
    assert torch.equal(out, meta)


def _rotation(vector: np.ndarray) -> np.ndarray:
    """Rotation matrix acting on row vectors (``q @ R``) for a rotation vector, radians."""
    angle = np.linalg.norm(vector)
    x, y, z = vector / angle
    K = np.array([[0, -z, y], [z, 0, -x], [-y, x, 0]])
    R = np.eye(3) + math.sin(angle) * K + (1 - math.cos(angle)) * K @ K   # R @ column q
    return R.T


def _moved_offsets(shots, params: np.ndarray) -> np.ndarray:
    """Ewald offsets that features.py computes (in float64) for messages whose reported
    bases were stretched along their axes and rotated by ``params``."""
    moved = []
    for m, p in zip(shots, params):
        basis = (_basis(m) * (1.0 + DIL * p[3:6])[:, None]) @ _rotation(ROT * p[:3])
        moved.append(reflection_metadata(dataclasses.replace(
            m, astar=tuple(basis[0]), bstar=tuple(basis[1]), cstar=tuple(basis[2])))[:, 4])
    return np.concatenate(moved).astype(np.float64)


def test_corrections_match_features_of_the_moved_lattice(shots):
    """The corrected Ewald offsets are those of the lattice moved by the same amounts, to
    first order: the remainder shrinks four-fold when the corrections halve."""
    rng = np.random.default_rng(0)
    params = rng.normal(size=(len(shots), N_GEOMETRY))
    axes = torch.from_numpy(lattice_axes(np.stack([_basis(m) for m in shots])))
    meta = torch.from_numpy(np.concatenate([reflection_metadata(m) for m in shots]))
    index = torch.from_numpy(np.repeat(np.arange(len(shots)), [len(m) for m in shots]))
    radius = np.concatenate([[m.profile_radius] * len(m) for m in shots])
    errors = []
    for p in (params, params / 2):
        out = corrected_metadata(meta, index, torch.from_numpy(p).float(), axes,
                                 rotation_sigma=ROT, dilation_sigma=DIL).numpy()
        moved = _moved_offsets(shots, p)
        change = np.abs(moved - meta[:, 4].numpy())
        errors.append(np.abs(out[:, 4] - moved).max())
        assert errors[-1] < 0.05 * np.median(change)
        np.testing.assert_allclose(out[:, 6], out[:, 4] / radius, rtol=1e-4, atol=1e-3)
        keep = [0, 1, 2, 3, 5, 7, 8, 9]
        np.testing.assert_array_equal(out[:, keep], meta[:, keep].numpy())
    assert errors[1] < 0.35 * errors[0]


def test_reflections_without_orientation_are_left_alone(shots):
    msg = dataclasses.replace(shots[1], astar=None, bstar=None, cstar=None)
    assert not msg.has_orientation()
    meta = torch.from_numpy(reflection_metadata(msg))
    params = torch.ones(1, N_GEOMETRY, requires_grad=True)
    out = corrected_metadata(meta, torch.zeros(len(msg), dtype=torch.int64), params,
                             torch.zeros(1, 2, 3, 3), rotation_sigma=ROT, dilation_sigma=DIL)
    assert torch.equal(out, meta)
    out.sum().backward()
    assert torch.isfinite(params.grad).all()


def test_per_image_adam_counts_its_own_visits_and_skips_bad_rows():
    state = torch.zeros(4, STATE_WIDTH)
    state[1, -1] = 5.0                         # image 1 was updated five times before
    grad = torch.tensor([[1.0] * N_GEOMETRY, [1.0] * N_GEOMETRY,
                         [float("nan")] + [1.0] * (N_GEOMETRY - 1), [-2.0] * N_GEOMETRY])
    new = adam_update(state, grad, lr=0.1, betas=(0.9, 0.999), eps=1e-12)
    # a first update moves by lr against the gradient's sign, whatever its size
    np.testing.assert_allclose(new[0, :N_GEOMETRY].numpy(), -0.1, rtol=1e-5)
    np.testing.assert_allclose(new[3, :N_GEOMETRY].numpy(), 0.1, rtol=1e-5)
    assert new[0, -1] == 1 and new[1, -1] == 6
    # the sixth update's bias correction differs from the first's
    b1, b2 = 0.9, 0.999
    expect = -0.1 * (0.1 / (1 - b1 ** 6)) / math.sqrt(0.001 / (1 - b2 ** 6))
    np.testing.assert_allclose(new[1, 0].item(), expect, rtol=1e-5)
    assert torch.equal(new[2], state[2])       # a non-finite gradient leaves the image be
    kept = adam_update(state, grad, lr=0.1, keep=torch.tensor(False))
    assert torch.equal(kept, state)
