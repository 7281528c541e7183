"""Likelihoods of observed intensities given predicted ones.

``log_prob(ipred, iobs, sigiobs)``: ``ipred`` may carry leading Monte Carlo dimensions
(``(mc, n)``); ``iobs`` and ``sigiobs`` are ``(n,)`` and broadcast.
"""
from __future__ import annotations

import math

import torch
from torch import nn


class NormalLikelihood(nn.Module):
    """``iobs ~ Normal(ipred, sigiobs)``."""

    def log_prob(self, ipred: torch.Tensor, iobs: torch.Tensor,
                 sigiobs: torch.Tensor) -> torch.Tensor:
        z = (iobs - ipred) / sigiobs
        return -0.5 * z * z - torch.log(sigiobs) - 0.5 * math.log(2.0 * math.pi)

    def forward(self, ipred: torch.Tensor, iobs: torch.Tensor,
                sigiobs: torch.Tensor) -> torch.Tensor:
        return self.log_prob(ipred, iobs, sigiobs)


class StudentTLikelihood(nn.Module):
    """``iobs ~ StudentT(dof, loc=ipred, scale=sigiobs)``: robust to outliers.

    Parameters
    ----------
    dof
        Degrees of freedom ν (> 0); abismal's default is 32.
    """

    def __init__(self, dof: float = 32.0) -> None:
        super().__init__()
        if not dof > 0:
            raise ValueError(f"dof must be positive, got {dof}")
        self.dof = float(dof)
        self._const = (math.lgamma(0.5 * (self.dof + 1.0)) - math.lgamma(0.5 * self.dof)
                       - 0.5 * math.log(self.dof * math.pi))

    def log_prob(self, ipred: torch.Tensor, iobs: torch.Tensor,
                 sigiobs: torch.Tensor) -> torch.Tensor:
        z = (iobs - ipred) / sigiobs
        return (self._const - torch.log(sigiobs)
                - 0.5 * (self.dof + 1.0) * torch.log1p(z * z / self.dof))

    def forward(self, ipred: torch.Tensor, iobs: torch.Tensor,
                sigiobs: torch.Tensor) -> torch.Tensor:
        return self.log_prob(ipred, iobs, sigiobs)
