"""Wilson prior on structure-factor amplitudes.

Acentric amplitudes follow a Rayleigh distribution and centric amplitudes a half-normal one,
both with intensity scale ``epsilon * sigma`` (``sigma`` = Σ, 1 on standardised intensities).
"""
from __future__ import annotations

import math

import torch
from torch import nn

# log F is evaluated on samples of a folded normal: F == 0 has probability zero but float32
# can still round a sample to 0; a floor keeps the log-density finite.
_F_FLOOR = 1e-30


class WilsonPrior(nn.Module):
    """Wilson's distribution of amplitudes, per unique reflection.

    Parameters
    ----------
    centric
        ``(n_rows,)`` bool, True where the reflection is centric.
    epsilon
        ``(n_rows,)`` multiplicity factor ε of each reflection.
    sigma
        Σ, the mean intensity per unit ε (1 on standardised intensities): a number, or an
        ``(n_rows,)`` tensor for a resolution-dependent Σ (e.g. from a Wilson plot).
    """

    def __init__(self, centric: torch.Tensor, epsilon: torch.Tensor,
                 sigma: float | torch.Tensor = 1.0) -> None:
        super().__init__()
        centric = torch.as_tensor(centric, dtype=torch.bool)
        epsilon = torch.as_tensor(epsilon, dtype=torch.float32)
        if centric.shape != epsilon.shape or centric.dim() != 1:
            raise ValueError(
                f"centric {tuple(centric.shape)} and epsilon {tuple(epsilon.shape)} must be "
                "1-d arrays of the same length (one entry per unique reflection)")
        sigma = torch.broadcast_to(torch.as_tensor(sigma, dtype=torch.float32), epsilon.shape)
        if not (bool(torch.all(epsilon > 0)) and bool(torch.all(sigma > 0))):
            raise ValueError("epsilon and sigma must be positive for every reflection")
        self.register_buffer("centric", centric)
        self.register_buffer("epsilon", epsilon.contiguous())
        # εΣ = E[F²] is all the densities need
        self.register_buffer("variance", (epsilon * sigma).contiguous())

    @property
    def n_rows(self) -> int:
        return int(self.centric.shape[0])

    def log_prob(self, F: torch.Tensor, row_ids: torch.Tensor) -> torch.Tensor:
        """Log-density of amplitudes ``F`` (shape ``(..., n)``) for rows ``row_ids`` ``(n,)``."""
        var = self.variance[row_ids]
        centric = self.centric[row_ids]
        F2 = F * F
        acentric_lp = math.log(2.0) + torch.log(F.clamp_min(_F_FLOOR)) - torch.log(var) - F2 / var
        centric_lp = 0.5 * (math.log(2.0 / math.pi) - torch.log(var)) - F2 / (2.0 * var)
        return torch.where(centric, centric_lp, acentric_lp)

    @torch.no_grad()
    def set_sigma(self, sigma: torch.Tensor) -> None:
        """Replace Σ (per row, or one value) keeping ε: the variance becomes ε·Σ."""
        eps = self.epsilon
        sigma = torch.broadcast_to(torch.as_tensor(sigma, dtype=torch.float32,
                                                   device=self.variance.device), eps.shape)
        if not bool(torch.all(sigma > 0)):
            raise ValueError("sigma must be positive for every reflection")
        self.variance.copy_(eps * sigma)

    def mean(self, row_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Expected amplitude under the prior (all rows when ``row_ids`` is None)."""
        if row_ids is None:
            row_ids = torch.arange(self.n_rows, device=self.centric.device)
        var = self.variance[row_ids]
        centric = self.centric[row_ids]
        return torch.where(centric, torch.sqrt(2.0 * var / math.pi),
                           0.5 * torch.sqrt(math.pi * var))
