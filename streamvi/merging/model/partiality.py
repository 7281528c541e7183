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

    log P = −½ e² / (( a·R + η|q| )² + ( c·σ_k |q|²/(2k²) )²),

peak-normalised (``P = 1`` on the Bragg condition at every resolution), with one learnt
factor ``a`` on the reported profile radius and one ``c`` on the reported bandwidth (sources
differ in what they call either: a σ or a radius; a FWHM or a σ of the spectrum), and a
learnt mosaic spread ``η`` (next to 0 at the start), which no stream reports and which widens
high-order reflections in proportion to ``|q|``.  The
image-scale network adds its own log-scale on top and learns what the profile's shape, the
crystal and the beam leave.  Where the geometry is unknown (no profile radius, or no
orientation: ``e = 0``) ``log P`` is 0 and the network does all of it, as before.

The fall-off convention (change 10) then reads the network's part only, over the
observations this partiality puts within 10 % of full (``P ≥ 0.9``): the images' scales free
of partiality, measured close to the Bragg condition.  What the record still carries is the
network's correction of this Gaussian's shape inside that window, which depends on how far
the learnt width is from the real profile's (the network and the factors share the shape
between them).  The narrower the window the less of it: at ``P ≥ ½`` a window's edge can
reach past a sharp profile's end (xsphere at low resolution, where the band is thin) and a
merge of 300 such stills kept a B of +14 Å² (docs/model.md, change 18).
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
#: its log, as the fall-off record compares it
NEAR_BRAGG_LOG_P = math.log(NEAR_BRAGG_P)


class GeometricPartiality(nn.Module):
    """Peak-normalised Gaussian partiality from the Ewald offset, profile radius and bandwidth.

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
        # the reflection's radius grows with |q| by the mosaic spread (as CrystFEL's R + η|q|)
        mosaic = 1e-3 * self.mosaic_mrad.abs() * x[:, Column.INV_D2].clamp_min(0.0).sqrt()
        width2 = ((radius * self.log_radius_factor.exp() + mosaic) ** 2
                  + (band * self.log_band_factor.exp()) ** 2)
        known = radius > 0
        log_p = -0.5 * offset * offset / torch.where(known, width2, torch.ones_like(width2))
        return torch.where(known, log_p, torch.zeros_like(log_p))
