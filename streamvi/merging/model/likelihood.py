"""Likelihoods of observed intensities given predicted ones.

``log_prob(ipred, iobs, sigiobs)``: ``ipred`` may carry leading Monte Carlo dimensions
(``(mc, n)``); ``iobs`` and ``sigiobs`` are ``(n,)`` and broadcast.

Both likelihoods can carry a learnt error model of the kind scaling programs fit (aimless'
SdFac/SdAdd, XDS' a and b): the σ used is ``√((a·σ(I))² + (b·Ipred)²)``, ``a`` and ``b``
parameters of the likelihood learnt with the rest of the objective.  Counting statistics
are not the whole error of a still's intensity: partiality, the spot's spectrum and the
detector's gain add an error proportional to the intensity, which σ(I) from integration
often leaves out.  Without it a strong reflection's observations are each "too precise",
disagree with one another by many σ, and the robust likelihood treats most of them as
outliers (docs/model.md).
"""
from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F_nn


class ErrorModel(nn.Module):
    """``σ' = √((a·σ)² + (b·Ipred)²)`` with learnt ``a > 0`` and ``b ≥ 0``.

    Parameters
    ----------
    a, b
        Starting values (``b`` is kept positive through a softplus, ``a`` through exp).
    """

    def __init__(self, a: float = 1.0, b: float = 0.02) -> None:
        super().__init__()
        self.log_a = nn.Parameter(torch.tensor(math.log(a), dtype=torch.float32))
        self.raw_b = nn.Parameter(torch.tensor(math.log(math.expm1(b)), dtype=torch.float32))

    @property
    def a(self) -> torch.Tensor:
        return torch.exp(self.log_a)

    @property
    def b(self) -> torch.Tensor:
        return F_nn.softplus(self.raw_b)

    def forward(self, ipred: torch.Tensor, sigiobs: torch.Tensor) -> torch.Tensor:
        return torch.sqrt(torch.square(self.a * sigiobs) + torch.square(self.b * ipred))


class _Likelihood(nn.Module):
    """Shared by both likelihoods: the optional :class:`ErrorModel`."""

    def __init__(self, error_model: bool = False) -> None:
        super().__init__()
        self.error_model = ErrorModel() if error_model else None

    def _sigma(self, ipred: torch.Tensor, sigiobs: torch.Tensor) -> torch.Tensor:
        return sigiobs if self.error_model is None else self.error_model(ipred, sigiobs)


class NormalLikelihood(_Likelihood):
    """``iobs ~ Normal(ipred, sigiobs)``."""

    def log_prob(self, ipred: torch.Tensor, iobs: torch.Tensor,
                 sigiobs: torch.Tensor) -> torch.Tensor:
        sigiobs = self._sigma(ipred, sigiobs)
        z = (iobs - ipred) / sigiobs
        return -0.5 * z * z - torch.log(sigiobs) - 0.5 * math.log(2.0 * math.pi)

    def forward(self, ipred: torch.Tensor, iobs: torch.Tensor,
                sigiobs: torch.Tensor) -> torch.Tensor:
        return self.log_prob(ipred, iobs, sigiobs)


class StudentTLikelihood(_Likelihood):
    """``iobs ~ StudentT(dof, loc=ipred, scale=sigiobs)``: robust to outliers.

    Parameters
    ----------
    dof
        Degrees of freedom ν (> 0); abismal's default is 32.
    error_model
        Learn an :class:`ErrorModel` for ``sigiobs``.
    """

    def __init__(self, dof: float = 32.0, *, error_model: bool = False) -> None:
        super().__init__(error_model)
        if not dof > 0:
            raise ValueError(f"dof must be positive, got {dof}")
        self.dof = float(dof)
        self._const = (math.lgamma(0.5 * (self.dof + 1.0)) - math.lgamma(0.5 * self.dof)
                       - 0.5 * math.log(self.dof * math.pi))

    def log_prob(self, ipred: torch.Tensor, iobs: torch.Tensor,
                 sigiobs: torch.Tensor) -> torch.Tensor:
        sigiobs = self._sigma(ipred, sigiobs)
        z = (iobs - ipred) / sigiobs
        return (self._const - torch.log(sigiobs)
                - 0.5 * (self.dof + 1.0) * torch.log1p(z * z / self.dof))

    def forward(self, ipred: torch.Tensor, iobs: torch.Tensor,
                sigiobs: torch.Tensor) -> torch.Tensor:
        return self.log_prob(ipred, iobs, sigiobs)
