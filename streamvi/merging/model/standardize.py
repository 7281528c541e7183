"""Running standardisation of metadata and intensities.

The trainer feeds the first reflections through :meth:`Standardizer.update` and then calls
:meth:`Standardizer.freeze`: after that the statistics never change, because every
network weight and posterior parameter is expressed in the standardised units.  The
statistics are buffers, so they travel in the model's ``state_dict`` (checkpoints).

The intensity scale is robust: one crystal counts as one crystal (see
:meth:`Standardizer.intensity_scale`).
"""
from __future__ import annotations

import torch
from torch import nn

#: Crystals (visits of a crystal during the warm-up) whose intensity summaries are kept.
#: The default warm-up (200,000 reflections) is ~250 crystal visits of 800 reflections and
#: 4,000 of 50; later ones still count in the metadata statistics, not in the scale.
MAX_CRYSTALS = 8192
#: Crystals whose mean intensity lies beyond this many times the median crystal's (in
#: either sign) are left out of the intensity scale.
OUTLIER_FACTOR = 10.0


class Standardizer(nn.Module):
    """Mean/std of each metadata column (Welford, mergeable) and a robust intensity scale.

    Parameters
    ----------
    n_metadata
        Number of metadata columns.

    Notes
    -----
    Intensities are divided by a scale ≈ their mean (not centred) so that a standardised
    intensity is ``≈ scale · F²`` with ``E[F²] = ε`` — the Wilson prior with Σ = 1.  The
    scale is kept from the crystals' own summaries (reflections, ΣI, ΣI² per crystal),
    not from a plain mean over reflections: see :meth:`intensity_scale` for why.
    """

    def __init__(self, n_metadata: int) -> None:
        super().__init__()
        f64 = torch.float64
        self.n_metadata = int(n_metadata)
        self.register_buffer("count", torch.zeros((), dtype=f64))
        self.register_buffer("meta_mean", torch.zeros(self.n_metadata, dtype=f64))
        self.register_buffer("meta_m2", torch.zeros(self.n_metadata, dtype=f64))
        # plain sums over reflections: kept for diagnostics and older checkpoints
        self.register_buffer("i_sum", torch.zeros((), dtype=f64))
        self.register_buffer("i_sumsq", torch.zeros((), dtype=f64))
        #: per crystal seen in the warm-up: (reflections, ΣI, ΣI²)
        self.register_buffer("crystal_stats", torch.zeros((MAX_CRYSTALS, 3), dtype=f64))
        self.register_buffer("n_crystals", torch.zeros((), dtype=torch.int64))
        #: the intensity scale of the statistics so far (0: no data yet)
        self.register_buffer("i_scale", torch.zeros((), dtype=f64))
        self.register_buffer("frozen", torch.zeros((), dtype=torch.bool))
        # host copies of ``frozen`` once it is True and of ``n_crystals``, so the per-step
        # checks and updates do not each wait for the GPU; only a state_dict load resets them
        self._frozen_host = False
        self._n_crystals_host = 0

    @property
    def is_frozen(self) -> bool:
        if not self._frozen_host:
            self._frozen_host = bool(self.frozen)
        return self._frozen_host

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        if prefix + "crystal_stats" not in state_dict and prefix + "i_sum" in state_dict:
            self._upgrade_state(state_dict, prefix)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._frozen_host = False
        self._n_crystals_host = int(self.n_crystals)

    @staticmethod
    def _upgrade_state(state_dict: dict, prefix: str) -> None:
        """A checkpoint written before the per-crystal scale: its reflections become one
        summary row, and its scale stays exactly what it was (the plain mean), because
        changing it would change what the trained parameters mean."""
        count, i_sum, i_sumsq = (state_dict[prefix + k].to(torch.float64)
                                 for k in ("count", "i_sum", "i_sumsq"))
        stats = torch.zeros((MAX_CRYSTALS, 3), dtype=torch.float64)
        stats[0] = torch.stack([count, i_sum, i_sumsq])
        n = count.clamp_min(1.0)
        mean, rms = i_sum / n, torch.sqrt(i_sumsq / n)
        scale = torch.where(mean > 0, mean, torch.where(rms > 0, rms, torch.ones_like(mean)))
        state_dict[prefix + "crystal_stats"] = stats
        state_dict[prefix + "n_crystals"] = torch.tensor(int(count > 0), dtype=torch.int64)
        state_dict[prefix + "i_scale"] = torch.where(count > 0, scale, torch.zeros_like(scale))

    @property
    def n_seen(self) -> int:
        """Reflections the statistics were estimated from."""
        return int(self.count)

    def freeze(self) -> None:
        """Stop updating; the statistics are fixed from now on."""
        self.frozen.fill_(True)
        self._frozen_host = True

    @torch.no_grad()
    def update(self, metadata: torch.Tensor, iobs: torch.Tensor,
               image_index: torch.Tensor | None = None, n_images: int | None = None) -> None:
        """Add reflections; frozen: no-op.

        Parameters
        ----------
        metadata
            ``(n, n_metadata)``.
        iobs
            ``(n,)`` intensities.
        image_index
            ``(n,)`` the crystal (``0 .. n_images - 1``) of each reflection, as in a
            :class:`~streamvi.merging.model.batch.Batch`; None: all of them are one crystal.
        n_images
            Number of crystals with ``image_index`` (known on the host, so no wait).
        """
        if self.is_frozen or iobs.numel() == 0:
            return
        n, mean, m2, i_sum, i_sumsq, rows = self._summary(metadata, iobs, image_index, n_images)
        self._combine(n, mean, m2, i_sum, i_sumsq)
        self._add_crystals(rows)
        self._refresh_scale()

    def _summary(self, metadata: torch.Tensor, iobs: torch.Tensor,
                 image_index: torch.Tensor | None, n_images: int | None
                 ) -> tuple[torch.Tensor, ...]:
        """A batch's (reflections, metadata mean, metadata M2, ΣI, ΣI², per-crystal rows)."""
        # columns past ``n_metadata`` (read by other parts of the model) are not standardised
        x = metadata[..., :self.n_metadata].to(self.meta_mean.device,
                                                torch.float64).reshape(-1, self.n_metadata)
        i = iobs.to(self.i_sum.device, torch.float64).reshape(-1)
        n = torch.tensor(float(x.shape[0]), dtype=torch.float64, device=self.count.device)
        mean = x.mean(dim=0)
        m2 = ((x - mean) ** 2).sum(dim=0)
        if image_index is None or n_images is None:
            rows = torch.stack([n, i.sum(), (i * i).sum()]).reshape(1, 3)
        else:
            idx = image_index.to(i.device, torch.int64).reshape(-1)
            rows = torch.zeros((int(n_images), 3), dtype=torch.float64, device=i.device)
            rows.index_add_(0, idx, torch.stack([torch.ones_like(i), i, i * i], dim=1))
        return n, mean, m2, i.sum(), (i * i).sum(), rows

    def _add_crystals(self, rows: torch.Tensor) -> None:
        """Append per-crystal rows (reflections, ΣI, ΣI²) while there is room."""
        start = self._n_crystals_host
        take = min(int(rows.shape[0]), MAX_CRYSTALS - start)
        if take <= 0:
            return
        self.crystal_stats[start:start + take] = rows[:take].to(self.crystal_stats.device)
        self._n_crystals_host = start + take
        self.n_crystals.fill_(self._n_crystals_host)

    @torch.no_grad()
    def merge(self, other: "Standardizer") -> None:
        """Fold in the statistics of another standardiser (e.g. another rank's warm-up)."""
        if other.n_metadata != self.n_metadata:
            raise ValueError("cannot merge standardisers with different numbers of columns")
        if self.is_frozen:
            return
        self._combine(other.count.clone(), other.meta_mean.clone(), other.meta_m2.clone(),
                      other.i_sum.clone(), other.i_sumsq.clone())
        self._add_crystals(other.crystal_stats[:int(other.n_crystals)].clone())
        self._refresh_scale()

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

    def _refresh_scale(self) -> None:
        """Recompute :attr:`i_scale` from the per-crystal rows (on the device, no wait)."""
        k = self._n_crystals_host
        if k == 0:
            return
        rows = self.crystal_stats[:k]
        n = rows[:, 0]
        valid = n > 0
        safe_n = n.clamp_min(1.0)
        mean = rows[:, 1] / safe_n
        rms = torch.sqrt(rows[:, 2] / safe_n)
        # medians over the crystals that have reflections (the others are pushed past it)
        inf = torch.full_like(mean, float("inf"))
        n_valid = valid.sum()
        med = _masked_median(torch.where(valid, mean, inf), n_valid)
        typical = valid & (mean.abs() <= OUTLIER_FACTOR * med)
        weight = torch.where(typical, n, torch.zeros_like(n))
        trimmed = (weight * mean).sum() / weight.sum().clamp_min(1.0)
        med_rms = _masked_median(torch.where(valid, rms, inf), n_valid)
        one = torch.ones_like(trimmed)
        fallback = torch.where(med_rms > 0, med_rms, one)
        scale = torch.where((med > 0) & (trimmed > 0), trimmed, fallback)
        self.i_scale.copy_(torch.where(n_valid > 0, scale, torch.zeros_like(scale)))

    def metadata_std(self) -> torch.Tensor:
        """Per-column standard deviation; 1 where a column has (numerically) no spread."""
        var = self.meta_m2 / self.count.clamp_min(1.0)
        std = torch.sqrt(var)
        tiny = 1e-12 * torch.clamp(self.meta_mean.abs(), min=1.0)
        return torch.where(std > tiny, std, torch.ones_like(std))

    def intensity_scale_tensor(self) -> torch.Tensor:
        """:meth:`intensity_scale` as a 0-d float64 tensor (no device synchronisation)."""
        return torch.where(self.i_scale > 0, self.i_scale, torch.ones_like(self.i_scale))

    def intensity_scale(self) -> float:
        """Divisor that brings intensities to standardised units.

        The mean intensity over reflections of the *typical* crystals: each crystal seen in
        the warm-up keeps its own summary, and crystals whose mean intensity is more than
        :data:`OUTLIER_FACTOR` times the median crystal's (in either sign) are left out.
        Without outliers this is exactly the plain mean over reflections.

        Why: a plain mean over the first 200,000 reflections, frozen and checkpointed, was
        ruined for the whole run by one valid crystal with I = 10⁹ (CC(F, truth) 0.905 →
        0.147) or I = −10⁶ (a negative mean: non-finite amplitudes).  The scale only sets
        the units of the model, so leaving a crystal out of it costs nothing, while a
        median over crystals is not moved by one crystal, even the first: a single crystal
        in the first update can set the scale only until the next update brings others.
        Where the median crystal's mean is not positive (only noise), the median crystal's
        root mean square is used; 1.0 before any data.
        """
        return float(self.intensity_scale_tensor())

    def standardize_metadata(self, metadata: torch.Tensor) -> torch.Tensor:
        """``(metadata - mean) / std`` in the dtype of ``metadata``, of its first
        ``n_metadata`` columns (the rest are for other readers)."""
        mean = self.meta_mean.to(metadata.device, metadata.dtype)
        std = self.metadata_std().to(metadata.device, metadata.dtype)
        return (metadata[..., :self.n_metadata] - mean) / std

    def standardize_intensity(self, x: torch.Tensor) -> torch.Tensor:
        """Intensity (or its uncertainty) divided by :meth:`intensity_scale`."""
        return x / self.intensity_scale_tensor().to(x.device, x.dtype)


def _masked_median(values: torch.Tensor, n_valid: torch.Tensor) -> torch.Tensor:
    """Lower median of the ``n_valid`` smallest-sorted finite entries of ``values`` (the
    others are +inf), without a host wait: the sorted position is gathered on the device."""
    ordered = torch.sort(values).values
    pos = ((n_valid - 1).clamp_min(0) // 2).reshape(1)
    return ordered.gather(0, pos).reshape(())
