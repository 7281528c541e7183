"""The partiality of a still from its reported geometry, under the learnt image scale.

A still records a reflection in part: how much depends on how far its reciprocal-lattice
point lies from the Ewald sphere (the Ewald offset ``e``, Å⁻¹) against the reflection's
size in that direction.  Two things set it: the crystal's profile radius ``R`` (mosaic
blocks, size), which the indexer reports, and the pulse's spectrum, which spreads the Ewald
sphere by ``σ_k · (1 − cos 2θ) = σ_k · |q|² / (2k²)`` at scattering vector ``|q|``
(``k = 1/λ``, ``σ_k = bandwidth · k``).  The second grows with resolution, so at a fixed
``e / R`` a low-order reflection is recorded far less than a high-order one: a resolution
trend that a network reading ``e``, ``R`` and ``1/d²`` must otherwise learn as an
interaction, and that no convention for the scales' fall-off can tell from the amplitudes'
(CrystFEL's ``partial_sim``: B of −15 to −19 Å², docs/model.md change 18).

:class:`GeometricPartiality` gives every observation the partiality of CrystFEL 0.10's
``xsphere`` model with a Gaussian spectrum: the reflection is a sphere of radius
``r = a·R + η|q|`` whose cross-section along the offset is ``1 − t²/r²`` (``|t| ≤ r``),
seen through the spectrum's spread ``σ = c · bandwidth · |q|²/(2k)``,

    P(e) = ∫ (1 − t²/r²)₊ N(t; e, σ²) dt / (the same at e = 0),

in closed form (:func:`sphere_profile`), peak-normalised (``P = 1`` on the Bragg condition
at every resolution) and floored at :data:`P_FLOOR`.  ``a`` and ``c`` are learnt factors on
the reported profile radius and bandwidth (sources differ in what they call either; with
CrystFEL's conventions both are 1: a CrystFEL ``partial_sim`` stream's merge learns 1.00 and
1.01, 1.13 before change 21 stopped the refinement moving its exact orientations), ``η`` a
learnt mosaic spread (next to 0 at the start), which no stream reports.  The
image-scale network adds its own log-scale on top and learns what the profile's shape, the
crystal and the beam leave.  Where the geometry is unknown (no profile radius, or no
orientation: ``e = 0``) ``log P`` is 0 and the network does all of it, as before.

The fall-off convention (change 10) then reads the network's part only, over the
observations this partiality puts within 10 % of full (``P ≥ 0.9``): the images' scales free
of partiality, measured close to the Bragg condition.  What the record still carries is the
network's correction near the peak, which depends on how far the learnt profile is from the
real one (the network and the factors share the shape between them; on the project's
simulator it falls with resolution by about the amount the reported geometry's errors would
lower the peak: docs/model.md, change 19).
"""
from __future__ import annotations

import math

import torch
from torch import nn

from streamvi.merging.model.metadata import Column

#: h·c in keV·Å: k = 1/λ = E / HC_KEV_A
HC_KEV_A = 12.398419843320026
#: observations with ``P`` at least this are near their Bragg condition (within 10 % of full)
NEAR_BRAGG_P = 0.9
#: the smallest partiality given (its log, −9.2, stays finite where the sphere and the band
#: do not reach: an observation of pure background)
P_FLOOR = 1e-4
#: the spectrum's spread in offset is kept above this (Å⁻¹): a stream without a bandwidth
#: gives the bare sphere
_MIN_SPREAD = 1e-7
#: its log, as the fall-off record compares it
NEAR_BRAGG_LOG_P = math.log(NEAR_BRAGG_P)


class GeometricPartiality(nn.Module):
    """Peak-normalised partiality of a spherical reflection in a Gaussian spectrum, from the
    Ewald offset, profile radius and bandwidth (CrystFEL's ``xsphere``).

    Parameters are three scalars, ``log a``, ``log c`` and ``η`` in mrad (at the start 0, 0
    and 0.01: the reported values taken as they are, next to no mosaic spread).
    """

    def __init__(self) -> None:
        super().__init__()
        self.log_radius_factor = nn.Parameter(torch.zeros(()))
        self.log_band_factor = nn.Parameter(torch.zeros(()))
        #: mosaic spread η, mrad: widens the reflection by ``|η| · |q|``.  It starts just
        #: off 0, where the gradient of |η| would vanish (0.01 mrad: 0.0006°)
        self.mosaic_mrad = nn.Parameter(torch.full((), 0.01))

    @property
    def factors(self) -> tuple[float, float, float]:
        """The learnt ``(a, c, η)``: factors on the reported profile radius and bandwidth,
        and the mosaic spread in degrees."""
        return (float(self.log_radius_factor.detach().exp()),
                float(self.log_band_factor.detach().exp()),
                math.degrees(1e-3 * float(self.mosaic_mrad.detach().abs())))

    def forward(self, raw: torch.Tensor) -> torch.Tensor:
        """``log P`` per observation, ``(n,)``, from the raw (unstandardised) metadata.

        Parameters
        ----------
        raw
            ``(n, n_columns)`` metadata in :class:`~streamvi.merging.model.metadata.Column`
            layout; without a :attr:`~Column.BANDWIDTH` column the bandwidth counts as 0.
        """
        x = raw.float()
        radius = x[:, Column.PROFILE_RADIUS]
        offset = x[:, Column.EWALD_OFFSET]
        k = (x[:, Column.PHOTON_ENERGY_KEV] / HC_KEV_A).clamp_min(1e-6)
        if x.shape[1] > Column.BANDWIDTH:
            # σ_k · |q|²/(2k²) with σ_k = bandwidth · k
            band = x[:, Column.BANDWIDTH] * x[:, Column.INV_D2] / (2.0 * k)
        else:
            band = torch.zeros_like(radius)
        known = radius > 0
        # the reflection's radius grows with |q| by the mosaic spread (as CrystFEL's R + η|q|)
        mosaic = 1e-3 * self.mosaic_mrad.abs() * x[:, Column.INV_D2].clamp_min(0.0).sqrt()
        r = torch.where(known, radius * self.log_radius_factor.exp() + mosaic,
                        torch.ones_like(radius))
        spread = (band * self.log_band_factor.exp()).clamp_min(_MIN_SPREAD)
        p = sphere_profile(offset, r, spread) / sphere_profile(torch.zeros_like(offset), r,
                                                               spread)
        log_p = torch.log(p.clamp(min=P_FLOOR, max=1.0))
        return torch.where(known, log_p, torch.zeros_like(log_p))


_SQRT2 = math.sqrt(2.0)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)


def sphere_profile(e: torch.Tensor, r: torch.Tensor, spread: torch.Tensor) -> torch.Tensor:
    """``∫ (1 − t²/r²)₊ N(t; e, spread²) dt``: a sphere of radius ``r`` (its cross-section
    along the offset, 1 at the centre) seen through a Gaussian of σ ``spread``, at offset
    ``e`` (all Å⁻¹, same shapes).  Closed form with ``z± = (±r − e)/spread``::

        (1 − e²/r²) ΔΦ − (2 e spread / r²)(φ(z₋) − φ(z₊))
                       − (spread² / r²)(ΔΦ + z₋ φ(z₋) − z₊ φ(z₊)),   ΔΦ = Φ(z₊) − Φ(z₋)

    evaluated in float64 (the terms cancel where the spread is far wider than the sphere)
    and returned in the dtype of ``e``, ≥ 0."""
    dtype = e.dtype
    e, r, spread = e.double(), r.double(), spread.double()
    z_hi = (r - e) / spread
    z_lo = (-r - e) / spread

    def cdf(z: torch.Tensor) -> torch.Tensor:
        return 0.5 * (1.0 + torch.erf(z / _SQRT2))

    def pdf(z: torch.Tensor) -> torch.Tensor:
        return _INV_SQRT_2PI * torch.exp(-0.5 * z * z)

    inside = cdf(z_hi) - cdf(z_lo)
    r2 = r * r
    out = ((1.0 - e * e / r2) * inside - (2.0 * e * spread / r2) * (pdf(z_lo) - pdf(z_hi))
           - (spread * spread / r2) * (inside + z_lo * pdf(z_lo) - z_hi * pdf(z_hi)))
    return out.clamp_min(0.0).to(dtype)
