"""The partiality of a still from its reported geometry, under the learnt image scale.

A still records a reflection in part: how much depends on how far its reciprocal-lattice
point lies from the Ewald sphere (the Ewald offset ``e``, Å⁻¹) against the reflection's
width in that direction.  Two things set the width: the crystal's profile radius ``R``
(mosaic blocks, size), which the indexer reports, and the pulse's spectrum, which spreads
the Ewald sphere by ``σ_k · (1 − cos 2θ) = σ_k · |q|² / (2k²)`` at scattering vector
``|q|`` (``k = 1/λ``, ``σ_k = bandwidth · k``).  The second grows with resolution, so at a
fixed ``e / R`` a low-order reflection is recorded far less than a high-order one: a
resolution trend that a network reading ``e``, ``R`` and ``1/d²`` must otherwise learn as
an interaction, and that no convention for the scales' fall-off can tell from the
amplitudes' (CrystFEL's ``partial_sim``: B of −15 to −19 Å², docs/model.md change 18).

:class:`GeometricPartiality` gives every observation

    log P = −½ e² / (( a·R )² + ( c·σ_k |q|²/(2k²) )²),

peak-normalised (``P = 1`` on the Bragg condition at every resolution), with one learnt
factor ``a`` on the reported profile radius and one ``c`` on the reported bandwidth: sources
differ in what they call either (a σ or a radius; a FWHM or a σ of the spectrum).  The
image-scale network adds its own log-scale on top and learns what the profile's shape, the
crystal and the beam leave.  Where the geometry is unknown (no profile radius, or no
orientation: ``e = 0``) ``log P`` is 0 and the network does all of it, as before.

The fall-off convention (change 10) then reads the network's part only, over the
observations this partiality puts near their Bragg condition (``P ≥ ½``): the images' scales
free of partiality, measured where every simulator and crystal agrees that a reflection is
recorded in full.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from streamvi.merging.model.metadata import Column

#: h·c in keV·Å: k = 1/λ = E / HC_KEV_A
HC_KEV_A = 12.398419843320026
#: observations with ``P`` at least this are near their Bragg condition (half the peak)
NEAR_BRAGG_P = 0.5
#: its log, as the fall-off record compares it
NEAR_BRAGG_LOG_P = math.log(NEAR_BRAGG_P)


class GeometricPartiality(nn.Module):
    """Peak-normalised Gaussian partiality from the Ewald offset, profile radius and bandwidth.

    Parameters are two scalars, ``log a`` and ``log c`` (both 0 at the start: the reported
    values taken as they are).
    """

    def __init__(self) -> None:
        super().__init__()
        self.log_radius_factor = nn.Parameter(torch.zeros(()))
        self.log_band_factor = nn.Parameter(torch.zeros(()))

    @property
    def factors(self) -> tuple[float, float]:
        """The learnt ``(a, c)``: factors on the reported profile radius and bandwidth."""
        return (float(self.log_radius_factor.detach().exp()),
                float(self.log_band_factor.detach().exp()))

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
        width2 = ((radius * self.log_radius_factor.exp()) ** 2
                  + (band * self.log_band_factor.exp()) ** 2)
        known = radius > 0
        log_p = -0.5 * offset * offset / torch.where(known, width2, torch.ones_like(width2))
        return torch.where(known, log_p, torch.zeros_like(log_p))
