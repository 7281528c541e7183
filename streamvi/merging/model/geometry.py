"""Per-image refinement of the reported crystal orientation and cell scale.

A still's partialities follow from where each reciprocal-lattice point lies against the Ewald
sphere.  The indexer reports the orientation and cell to a few hundredths of a degree and a
part in a thousand, which at 1.8 Å moves a reflection by about as much as the width of its
partiality profile (DESIGN.md §9; partialator refines the same quantities).  Each image
therefore carries six parameters: a small rotation (three components, radians) and a
relative dilation of each reciprocal axis (a*, b*, c*).  They move the scattering vectors
``q`` that the Ewald offsets of the metadata (:class:`streamvi.merging.model.metadata.Column`)
were computed from, and the scale network sees the corrected offsets, so the gradient of the
likelihood reaches them through the network's learnt partiality.

The parameters are held in units of their prior σ (a standard normal prior each) and are
maximum-a-posteriori estimates, updated by one Fisher-scoring step at each visit of the image
(:func:`scoring_update`: the step scaled by the observations' information, so that what the
data do not pin down stays at the prior's 0).  The store keeps every image's parameters with
their last gradient, curvature and update count (:data:`STATE_WIDTH` floats per image).
"""
from __future__ import annotations

import numpy as np
import torch

from streamvi.merging.model.metadata import S1, Column

#: refined parameters per image: rotation about x, y, z (lab frame) and the relative
#: dilations of a*, b*, c*
N_GEOMETRY = 6
#: per-image state: the parameters, their last gradient and curvature, and the update count
STATE_WIDTH = 3 * N_GEOMETRY + 1
#: the largest root-mean-square move of an image's Ewald offsets in one refinement step, in
#: profile radii (:func:`trust_factors`)
TRUST_RADIUS = 0.25
#: photon energy × wavelength, keV·Å
HC_KEV_A = 12.398419843320026

# the metadata columns this module reads and rewrites, by name
_ENERGY, _OFFSET = Column.PHOTON_ENERGY_KEV, Column.EWALD_OFFSET
_RADIUS, _RATIO = Column.PROFILE_RADIUS, Column.EWALD_RATIO


def lattice_axes(bases: np.ndarray) -> np.ndarray:
    """``(n, 2, 3, 3)`` float32: each image's reciprocal basis and its inverse.

    Parameters
    ----------
    bases
        ``(n, 3, 3)`` reciprocal bases, rows a*, b*, c* in the lab frame, Å⁻¹.

    Returns
    -------
    numpy.ndarray
        ``[i, 0]`` the basis, ``[i, 1]`` its inverse, so that ``h = q @ [i, 1]`` gives the
        (fractional) indices of a scattering vector.  A singular or non-finite basis gives
        zeros: its image has no axial dilations to refine.
    """
    bases = np.asarray(bases, dtype=np.float64).reshape(-1, 3, 3)
    ok = np.isfinite(bases).all(axis=(1, 2))
    if ok.any():
        ok[ok] = np.abs(np.linalg.det(bases[ok])) > 1e-30
    out = np.zeros((len(bases), 2, 3, 3), np.float32)
    if ok.any():
        out[ok, 0] = bases[ok]
        out[ok, 1] = np.linalg.inv(bases[ok])
    return out


@torch.no_grad()
def offset_jacobian(metadata: torch.Tensor, axes: torch.Tensor) -> torch.Tensor:
    """``(n, N_GEOMETRY)``: change of each reflection's Ewald offset per radian of rotation
    about x, y, z and per unit relative dilation of a*, b*, c*, Å⁻¹.

    Parameters
    ----------
    metadata
        ``(n, n_metadata)`` raw features (:func:`streamvi.merging.features.reflection_metadata`).
    axes
        ``(n, 2, 3, 3)`` each reflection's copy of its image's :func:`lattice_axes`.

    Notes
    -----
    ``q = s1 − k ẑ`` with ``|s1| = k + offset`` and ``k = 1/λ = E / hc`` is recovered from the
    metadata itself, so the store needs no per-reflection columns beyond the features.  To
    first order the offset moves by ``ŝ1 · Δq``: ``r · (q × ŝ1)`` for a rotation ``r`` and
    ``ε_j h_j (b*_j · ŝ1)`` for dilations ``ε_j``.  Reflections without an orientation (zero
    direction) get zeros.
    """
    direction = metadata[:, S1]
    k = metadata[:, _ENERGY] / HC_KEV_A
    q = (k + metadata[:, _OFFSET]).unsqueeze(1) * direction
    q[:, 2] -= k
    rotation = torch.cross(q, direction, dim=1)
    h = torch.einsum("na,nab->nb", q, axes[:, 1])
    dilation = h * torch.einsum("nb,njb->nj", direction, axes[:, 0])
    return torch.cat([rotation, dilation], dim=1)


def corrected_metadata(metadata: torch.Tensor, image_index: torch.Tensor,
                       params: torch.Tensor, axes: torch.Tensor, *,
                       rotation_sigma: float, dilation_sigma: float,
                       jacobian: torch.Tensor | None = None) -> torch.Tensor:
    """The raw metadata with each image's reciprocal lattice rotated and its axes dilated.

    Parameters
    ----------
    metadata
        ``(n, n_metadata)`` raw features (:func:`streamvi.merging.features.reflection_metadata`).
    image_index
        ``(n,)`` image of each reflection.
    params
        ``(n_images, N_GEOMETRY)`` parameters in prior-σ units: rotation vector (lab frame)
        / ``rotation_sigma``, relative dilation of each reciprocal axis / ``dilation_sigma``.
    axes
        ``(n_images, 2, 3, 3)`` :func:`lattice_axes` of each image's reported basis.
    rotation_sigma
        Prior σ of each rotation component, radians.
    dilation_sigma
        Prior σ of each axis's relative dilation.
    jacobian
        Optional ``(n, N_GEOMETRY)`` :func:`offset_jacobian` of these rows, where the caller
        has it already.

    Returns
    -------
    torch.Tensor
        ``(n, n_metadata)``: the Ewald offset and offset / profile radius moved, to first
        order in the corrections (:func:`offset_jacobian`); the other columns as given.
        1/d² and the scattered beam's direction change by parts in 10⁴ for corrections of
        0.05° and 0.2 %, against percent-level changes of the offset, and are left as
        reported.  Zero parameters give the input back exactly.
    """
    jac = (offset_jacobian(metadata, axes.index_select(0, image_index)) if jacobian is None
           else jacobian)
    sigma = torch.tensor([rotation_sigma] * 3 + [dilation_sigma] * 3, dtype=params.dtype,
                         device=params.device)
    d_offset = (jac * (params * sigma).index_select(0, image_index)).sum(1)
    radius = metadata[:, _RADIUS]
    d_ratio = torch.where(radius > 0, d_offset / radius.clamp_min(1e-12),
                          torch.zeros_like(d_offset))
    out = metadata.clone()
    out[:, _OFFSET] = metadata[:, _OFFSET] + d_offset
    out[:, _RATIO] = metadata[:, _RATIO] + d_ratio
    return out


def prior_nll(params: torch.Tensor) -> torch.Tensor:
    """Negative log standard-normal prior of the parameters, summed (constant dropped)."""
    return 0.5 * (params * params).sum()


@torch.no_grad()
def scoring_update(state: torch.Tensor, grad: torch.Tensor, fisher: torch.Tensor, *,
                   lr: float | torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
    """One Fisher-scoring step of each image's parameters; returns the new
    ``(n, STATE_WIDTH)`` state.

    Parameters
    ----------
    state
        ``(n, STATE_WIDTH)``: parameters, the last gradient, the last curvature, update count.
    grad
        ``(n, N_GEOMETRY)`` gradient of the image's negative log posterior (its
        observations' negative log likelihood summed, and the standard-normal prior) with
        respect to the parameters, in prior-σ units.
    fisher
        ``(n, N_GEOMETRY)`` the likelihood's curvature in each parameter: the sum over the
        image's observations of their squared gradients (the empirical Fisher information,
        diagonal).
    lr
        The fraction of the step taken (1: the whole Newton step), one for all or ``(n,)``
        per image (:func:`trust_factors`).
    keep
        Optional 0-d or ``(n,)`` bool: where False (e.g. a step skipped for non-finite
        gradients) the state is returned unchanged.  Rows with a non-finite gradient are
        always left unchanged.

    The step is ``−lr · grad / (1 + fisher)``: the prior's curvature is 1 in these units.  An
    image whose observations say little about a parameter (``fisher`` ≪ 1) is pulled back
    to the prior's 0 at once; one whose observations pin it down takes the Newton step
    towards the likelihood's optimum.  The step's size follows the evidence, so that noise in
    a gradient moves a parameter by its posterior σ, not by a fixed amount (a per-image Adam
    moves every parameter by about ``lr`` at each visit whatever the data say: on a
    CrystFEL ``partial_sim`` stream, whose orientations are exact, that moved the Ewald
    offsets by 37 % of the profile radius, docs/model.md change 21).
    """
    g = N_GEOMETRY
    p, n = state[:, :g], state[:, 3 * g:]
    if isinstance(lr, torch.Tensor) and lr.dim() == 1:
        lr = lr.unsqueeze(1)
    step = lr * newton_step(grad, fisher)
    new = torch.cat([p - step, grad, fisher, n + 1.0], dim=1)
    ok = torch.isfinite(grad).all(dim=1) & torch.isfinite(fisher).all(dim=1)
    if keep is not None:
        ok = ok & keep
    return torch.where(ok.unsqueeze(1), new, state)


def newton_step(grad: torch.Tensor, fisher: torch.Tensor) -> torch.Tensor:
    """``grad / (1 + fisher)``: the whole step :func:`scoring_update` scales (prior-σ units)."""
    return grad / (1.0 + fisher.clamp_min(0.0))


def trust_factors(step: torch.Tensor, jacobian: torch.Tensor, radius: torch.Tensor,
                  image_index: torch.Tensor, *, limit: float = TRUST_RADIUS) -> torch.Tensor:
    """``(n_images,)`` factors ≤ 1 that keep each image's step within the reach of the
    linearisation it was computed from.

    Parameters
    ----------
    step
        ``(n_images, N_GEOMETRY)`` proposed change of the parameters (prior-σ units).
    jacobian
        ``(n, N_GEOMETRY)`` change of each observation's Ewald offset per prior σ of each
        parameter, Å⁻¹ (:func:`offset_jacobian` times the prior σ).
    radius
        ``(n,)`` each observation's reported profile radius, Å⁻¹ (≤ 0: unknown, not counted).
    image_index
        ``(n,)`` image of each observation.
    limit
        The largest root-mean-square move of an image's offsets, in profile radii.

    A partiality changes over one profile radius of offset: a Newton step that moves the
    offsets by more than a fraction of it leaves the region where the gradient and curvature
    it was computed from hold, and on a narrow profile it overshoots (CrystFEL's
    ``partial_sim``, radius 10⁻⁴ Å⁻¹: the whole step moved offsets by 70 % of a radius
    where the orientations were exact).
    """
    n_images = step.shape[0]
    moved = (jacobian * step.index_select(0, image_index)).sum(1)
    known = radius > 0
    ratio2 = torch.where(known, (moved / radius.clamp_min(1e-12)) ** 2,
                         torch.zeros_like(moved))
    total = torch.zeros(n_images, dtype=moved.dtype, device=moved.device)
    count = torch.zeros_like(total)
    total.index_add_(0, image_index, ratio2)
    count.index_add_(0, image_index, known.to(moved.dtype))
    rms = torch.sqrt(total / count.clamp_min(1.0))
    return torch.where(rms > limit, limit / rms.clamp_min(1e-30), torch.ones_like(rms))


def observation_fisher(per_observation: torch.Tensor, image_index: torch.Tensor,
                       n_images: int) -> torch.Tensor:
    """``(n_images, N_GEOMETRY)``: each image's diagonal empirical Fisher information, the
    sum of its observations' squared gradients ``per_observation`` ``(n, N_GEOMETRY)``."""
    out = torch.zeros((n_images, per_observation.shape[1]), dtype=per_observation.dtype,
                      device=per_observation.device)
    return out.index_add_(0, image_index, per_observation * per_observation)
