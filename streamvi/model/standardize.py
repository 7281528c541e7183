"""Running standardisation of metadata and intensities.

The trainer feeds the first reflections through :meth:`Standardizer.update` and then calls
:meth:`Standardizer.freeze`: after that the statistics never change, because every
network weight and posterior parameter is expressed in the standardised units.  The
statistics are buffers, so they travel in the model's ``state_dict`` (checkpoints).
"""
from __future__ import annotations

import torch
from torch import nn


class Standardizer(nn.Module):
    """Mean/std of each metadata column (Welford, mergeable) and an intensity scale.

    Parameters
    ----------
    n_metadata
        Number of metadata columns.

    Notes
    -----
    Intensities are divided by their running mean (not centred) so that a standardised
    intensity is ``≈ scale · F²`` with ``E[F²] = ε`` — the Wilson prior with Σ = 1.
    """

    def __init__(self, n_metadata: int) -> None:
        super().__init__()
        f64 = torch.float64
        self.n_metadata = int(n_metadata)
        self.register_buffer("count", torch.zeros((), dtype=f64))
        self.register_buffer("meta_mean", torch.zeros(self.n_metadata, dtype=f64))
        self.register_buffer("meta_m2", torch.zeros(self.n_metadata, dtype=f64))
        self.register_buffer("i_sum", torch.zeros((), dtype=f64))
        self.register_buffer("i_sumsq", torch.zeros((), dtype=f64))
        self.register_buffer("frozen", torch.zeros((), dtype=torch.bool))
        # host copy of ``frozen`` once it is True, so the per-step checks of the trainer and
        # engine do not each wait for the GPU; only a state_dict load can unfreeze
        self._frozen_host = False

    @property
    def is_frozen(self) -> bool:
        if not self._frozen_host:
            self._frozen_host = bool(self.frozen)
        return self._frozen_host

    def _load_from_state_dict(self, *args, **kwargs) -> None:
        super()._load_from_state_dict(*args, **kwargs)
        self._frozen_host = False

    @property
    def n_seen(self) -> int:
        """Reflections the statistics were estimated from."""
        return int(self.count)

    def freeze(self) -> None:
        """Stop updating; the statistics are fixed from now on."""
        self.frozen.fill_(True)
        self._frozen_host = True

    @torch.no_grad()
    def update(self, metadata: torch.Tensor, iobs: torch.Tensor) -> None:
        """Add reflections (``metadata`` ``(n, n_metadata)``, ``iobs`` ``(n,)``); frozen: no-op."""
        if self.is_frozen or iobs.numel() == 0:
            return
        x = metadata.to(self.meta_mean.device, torch.float64).reshape(-1, self.n_metadata)
        i = iobs.to(self.i_sum.device, torch.float64)
        n = torch.tensor(float(x.shape[0]), dtype=torch.float64, device=self.count.device)
        mean = x.mean(dim=0)
        m2 = ((x - mean) ** 2).sum(dim=0)
        self._combine(n, mean, m2, i.sum(), (i * i).sum())

    @torch.no_grad()
    def merge(self, other: "Standardizer") -> None:
        """Fold in the statistics of another standardiser (e.g. another rank's warm-up)."""
        if other.n_metadata != self.n_metadata:
            raise ValueError("cannot merge standardisers with different numbers of columns")
        if self.is_frozen:
            return
        self._combine(other.count.clone(), other.meta_mean.clone(), other.meta_m2.clone(),
                      other.i_sum.clone(), other.i_sumsq.clone())

    def _combine(self, n: torch.Tensor, mean: torch.Tensor, m2: torch.Tensor,
                 i_sum: torch.Tensor, i_sumsq: torch.Tensor) -> None:
        # Chan et al.'s pairwise update: exact for any split of the stream.
        total = self.count + n
        if float(total) == 0.0:
            return
        delta = mean - self.meta_mean
        self.meta_mean += delta * (n / total)
        self.meta_m2 += m2 + delta * delta * (self.count * n / total)
        self.count.copy_(total)
        self.i_sum += i_sum
        self.i_sumsq += i_sumsq

    def metadata_std(self) -> torch.Tensor:
        """Per-column standard deviation; 1 where a column has (numerically) no spread."""
        var = self.meta_m2 / self.count.clamp_min(1.0)
        std = torch.sqrt(var)
        tiny = 1e-12 * torch.clamp(self.meta_mean.abs(), min=1.0)
        return torch.where(std > tiny, std, torch.ones_like(std))

    def intensity_scale_tensor(self) -> torch.Tensor:
        """:meth:`intensity_scale` as a 0-d float64 tensor (no device synchronisation)."""
        n = self.count.clamp_min(1.0)
        mean = self.i_sum / n
        rms = torch.sqrt(self.i_sumsq / n)
        one = torch.ones_like(mean)
        return torch.where(mean > 0, mean, torch.where(rms > 0, rms, one))

    def intensity_scale(self) -> float:
        """Divisor that brings intensities to standardised units.

        The running mean intensity; the root mean square if that is not positive; 1.0
        before any data.
        """
        return float(self.intensity_scale_tensor())

    def standardize_metadata(self, metadata: torch.Tensor) -> torch.Tensor:
        """``(metadata - mean) / std`` in the dtype of ``metadata``."""
        mean = self.meta_mean.to(metadata.device, metadata.dtype)
        std = self.metadata_std().to(metadata.device, metadata.dtype)
        return (metadata - mean) / std

    def standardize_intensity(self, x: torch.Tensor) -> torch.Tensor:
        """Intensity (or its uncertainty) divided by :meth:`intensity_scale`."""
        return x / self.intensity_scale_tensor().to(x.device, x.dtype)
