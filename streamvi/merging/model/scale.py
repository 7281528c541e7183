"""Amortised per-reflection scale model (no per-image parameters, so it streams).

Each reflection's features ``[metadata…, iobs, sigiobs]`` (standardised) go through a
residual feed-forward encoder; the reflections of one image are mean-pooled into an image
vector; a second residual stack maps ``Linear(metadata) + image vector`` to the parameters
of a log-normal scale distribution per reflection.  Images are ragged: pooling works on
``image_index`` with ``index_add_``, never on padded blocks.
"""
from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F_nn


class ResidualBlock(nn.Module):
    """Pre-norm residual feed-forward block: ``x + W2 relu(W1 LayerNorm(x))``."""

    def __init__(self, d_model: int, d_hidden: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(d_model)
        self.fc1 = nn.Linear(d_model, d_hidden)
        self.fc2 = nn.Linear(d_hidden, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(F_nn.relu(self.fc1(self.norm(x))))


def _stack(d_model: int, n_layers: int) -> nn.Sequential:
    return nn.Sequential(*(ResidualBlock(d_model, 2 * d_model) for _ in range(n_layers)))


def segment_mean(x: torch.Tensor, index: torch.Tensor, n_segments: int) -> torch.Tensor:
    """Mean of the rows of ``x`` ``(n, d)`` per segment ``index`` ``(n,)`` → ``(n_segments, d)``.

    Sums in float32 even under bf16 autocast: an image has hundreds of reflections.
    """
    x = x.float()
    sums = torch.zeros((n_segments, x.shape[1]), device=x.device, dtype=x.dtype)
    sums.index_add_(0, index, x)
    counts = torch.zeros(n_segments, device=x.device, dtype=x.dtype)
    counts.index_add_(0, index, torch.ones_like(index, dtype=x.dtype))
    return sums / counts.clamp_min(1.0).unsqueeze(1)


def lognormal_exponential_kl(loc: torch.Tensor, scale: torch.Tensor,
                             rate: float = 1.0) -> torch.Tensor:
    """``KL(LogNormal(loc, scale) ‖ Exponential(rate))``, elementwise, in closed form.

    ``E_q[log q] = -loc - log scale - ½(1 + log 2π)`` and
    ``E_q[log p] = log rate - rate · exp(loc + scale²/2)``.
    """
    return (-loc - torch.log(scale) - 0.5 * (1.0 + math.log(2.0 * math.pi))
            - math.log(rate) + rate * torch.exp(loc + 0.5 * scale * scale))


class ImageScaleModel(nn.Module):
    """Per-reflection log-normal scale distribution from ragged images.

    Parameters
    ----------
    n_metadata
        Number of (standardised) metadata columns.
    d_model
        Width of the residual stream (abismal: 256).
    n_layers
        Residual blocks in each of the two stacks (abismal: 5).
    prior_rate
        Rate λ of the weak exponential prior on the scale.
    min_scale
        Floor on the log-normal's σ, so the KL and samples stay finite.
    n_pooled_extra
        Extra per-reflection inputs of the pooled encoder only.
    b_column
        Metadata column holding 1/d² (standardised): adds a per-image B term, ``b_i · x``, to
        each reflection's log-scale location, ``b_i`` read linearly from the image vector.
        None: no such term.
    """

    def __init__(self, n_metadata: int, d_model: int = 32, n_layers: int = 4, *,
                 prior_rate: float = 1.0, min_scale: float = 1e-3, n_pooled_extra: int = 0,
                 b_column: int | None = None) -> None:
        super().__init__()
        self.n_metadata = int(n_metadata)
        self.d_model = int(d_model)
        self.n_layers = int(n_layers)
        self.prior_rate = float(prior_rate)
        self.min_scale = float(min_scale)
        #: extra per-reflection inputs seen by the pooled encoder only (not by the head)
        self.n_pooled_extra = int(n_pooled_extra)
        self.embed = nn.Linear(self.n_metadata + 2 + self.n_pooled_extra, self.d_model)
        self.encoder = _stack(self.d_model, self.n_layers)
        # a Linear on zero metadata columns would be empty; it still adds its bias
        self.metadata_embed = nn.Linear(self.n_metadata, self.d_model)
        self.head = _stack(self.d_model, self.n_layers)
        self.out_norm = nn.LayerNorm(self.d_model)
        self.out = nn.Linear(self.d_model, 2)
        # Start every image at scale ≈ 1 (log-normal(0, 0.1)): on standardised intensities
        # that is the right order, and zero output weights keep early steps gentle.
        nn.init.zeros_(self.out.weight)
        with torch.no_grad():
            self.out.bias[0] = 0.0
            self.out.bias[1] = math.log(math.expm1(0.1 - self.min_scale))
        #: metadata column of 1/d² for the per-image B term (None: no such term)
        self.b_column = b_column
        if b_column is not None:
            # one relative B per image, read from the image vector: log scale gains
            # b_i · (standardised 1/d²).  The head could only build this product of an image
            # feature and a reflection feature from its ReLUs; a per-image B of ±15 Å² moves
            # a 1.8 Å intensity tenfold.  Zero at the start.
            self.image_b = nn.Linear(self.d_model, 1)
            nn.init.zeros_(self.image_b.weight)
            nn.init.zeros_(self.image_b.bias)

    def forward(self, metadata: torch.Tensor, iobs: torch.Tensor, sigiobs: torch.Tensor,
                image_index: torch.Tensor, n_images: int,
                extra: torch.Tensor | None = None,
                head_metadata: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Log-normal ``(loc, scale)``, each ``(n,)``, for every reflection.

        Parameters
        ----------
        metadata
            ``(n, n_metadata)`` standardised metadata.
        iobs, sigiobs
            ``(n,)`` standardised intensities and uncertainties.
        image_index
            ``(n,)`` image of each reflection, ``0..n_images-1``.
        n_images
            Number of images in the batch.
        head_metadata
            What the per-reflection head sees instead of ``metadata`` (the image vectors are
            still pooled from ``metadata``): e.g. every reflection put at its Bragg condition,
            to read each image's scale free of partiality.
        """
        parts = [metadata, iobs.unsqueeze(1), sigiobs.unsqueeze(1)]
        if self.n_pooled_extra:
            parts.append(extra.reshape(iobs.shape[0], self.n_pooled_extra))
        features = torch.cat(parts, dim=1)
        h = self.encoder(self.embed(features))
        image_vector = segment_mean(h, image_index, n_images).to(h.dtype)
        head_in = metadata if head_metadata is None else head_metadata
        x = self.metadata_embed(head_in) + image_vector[image_index]
        out = self.out(self.out_norm(self.head(x))).float()
        loc = out[:, 0]
        if self.b_column is not None:
            b = self.image_b(image_vector).float()[:, 0]
            loc = loc + b[image_index] * head_in[:, self.b_column].float()
        return loc, F_nn.softplus(out[:, 1]) + self.min_scale

    def kl(self, loc: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """Elementwise KL of the scale distribution from the exponential prior."""
        return lognormal_exponential_kl(loc, scale, self.prior_rate)
