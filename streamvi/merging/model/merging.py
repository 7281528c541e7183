"""The variational merging model: assembles prior, posterior, scale model and likelihood.

Objective per minibatch (as abismal): ``−mean over observations of the Monte Carlo mean
log-likelihood + KL per observation`` — the KL of the amplitudes by Monte Carlo over the
unique rows the batch touches (``Σ_rows E_q[log q − log p] / n_obs``) and the analytic KL
of each reflection's scale, averaged.  It is evaluated for table 0 (all images) and for
each image's half-dataset table, and the two are summed.  The scale KL is weighted by
``scale_kl_weight`` (docs/model.md), and images that fail :meth:`misfit_images` (when the
engine has switched the test on) add nothing to the likelihood.  While a batch's per-image
geometry corrections are refined (they require grad), their standard-normal prior joins the
objective once per image, per observation like the rest.

With several conditions (pump–probe: a batch's ``condition``), the posterior holds three
tables per condition and each image's reflections enter its own condition's full and half
tables; the scale network, the Wilson prior and the standardiser are shared by all.  With a
coupling (:meth:`VariationalMergingModel.set_coupling`), every condition but the reference
takes the double-Wilson conditional given the reference's amplitudes as its prior
(:mod:`streamvi.merging.model.coupling`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, NamedTuple

import numpy as np
import torch
from torch import nn

from streamvi.merging.model.batch import Batch
from streamvi.merging.model.coupling import DoubleWilsonCoupling
from streamvi.merging.model.geometry import (N_GEOMETRY, corrected_metadata, offset_jacobian,
                                             prior_nll)
from streamvi.merging.model.metadata import Column
from streamvi.merging.model.partiality import NEAR_BRAGG_LOG_P, GeometricPartiality
from streamvi.merging.model.posterior import FoldedNormalPosterior
from streamvi.merging.model.prior import WilsonPrior
from streamvi.merging.model.scale import ImageScaleModel
from streamvi.merging.model.standardize import Standardizer

ScaleForward = Callable[..., tuple[torch.Tensor, torch.Tensor]]

#: lead, in nats of an image's log-likelihood, that its current indexing setting keeps over
#: the others when the trainer re-chooses (:meth:`VariationalMergingModel.choose_ops`)
SETTING_HYSTERESIS = 2.0


@dataclass
class LossTerms:
    """Terms of one minibatch objective (0-d tensors; ``loss`` carries the graph).

    ``nll`` and ``kl_F`` are those of table 0; ``nll_half`` and ``kl_F_half`` those of the
    half-dataset tables; ``loss`` is their weighted sum plus ``kl_scale``.  ``chosen_ops``
    is the twin-law operator picked per image (``(n_images,)``) or None with one operator;
    ``rejected`` flags the images left out of the likelihood (``(n_images,)`` bool) or is
    None when image rejection is off.
    """

    nll: torch.Tensor
    kl_F: torch.Tensor
    kl_scale: torch.Tensor
    loss: torch.Tensor
    n_obs: int
    nll_half: torch.Tensor
    kl_F_half: torch.Tensor
    chosen_ops: torch.Tensor | None = None
    rejected: torch.Tensor | None = None
    #: rows of the posterior's ``weight`` this objective looked up, one tensor per table
    #: term (with repeats): the rows a lazy optimiser step may move
    flat_rows: tuple[torch.Tensor, ...] = ()
    #: ``(n,)`` the log-normal scale's location per observation (detached): the engine's
    #: record of the scales' resolution dependence (:meth:`MergeEngine.falloff_correction`);
    #: with a geometric partiality its network part near the Bragg condition, NaN elsewhere
    scale_loc: torch.Tensor | None = None


#: :attr:`VariationalMergingModel.marginal_scale`'s form of the scale in
#: :meth:`VariationalMergingModel._table_terms`: ``(draws or None, E[s], Var[s]/E[s]²)``
_ScaleMoments = tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]


def _first_occurrence(flat: torch.Tensor, n_flat: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``torch.unique(flat, return_inverse=True)`` with shapes that do not depend on the data.

    Every observation stands in for a row, and the first observation of each row is its
    representative: ``inverse[j]`` is the position of the first ``j'`` with
    ``flat[j'] == flat[j]``.  Returns ``(inverse, first)`` with ``first`` 1.0 at the
    representatives and 0.0 elsewhere, so that terms per row are counted once.  The int64
    scratch table is ``n_flat`` long: 24 MB for 10⁶ reflections × 3 tables, cheap on a GPU,
    not on a CPU, where ``torch.unique`` is the better choice.
    """
    n = flat.shape[0]
    pos = torch.arange(n, device=flat.device)
    scratch = torch.full((n_flat,), n, dtype=torch.long, device=flat.device)
    scratch.scatter_reduce_(0, flat, pos, reduce="amin")
    inverse = scratch.index_select(0, flat)
    return inverse, (inverse == pos).to(torch.float32)


class MergedTable(NamedTuple):
    """Posterior summary per unique reflection, in the original intensity units (float64)."""

    F: np.ndarray
    SIGF: np.ndarray
    I: np.ndarray
    SIGI: np.ndarray


class VariationalMergingModel(nn.Module):
    """Stochastic variational merging of ragged minibatches of images.

    Parameters
    ----------
    prior
        Wilson prior over the rows of the posterior tables.
    posterior
        Folded-normal surrogate posterior (table 0 = all images, 1 and 2 = halves).
    scale_model
        Amortised per-reflection scale model.
    likelihood
        Object with ``log_prob(ipred, iobs, sigiobs)``.
    mc_samples
        Monte Carlo samples per step.
    kl_weight
        Weight of both KL terms.
    standardizer
        Running standardisation; a fresh one (identity until updated) when None.

    Notes
    -----
    The half-dataset terms use a *detached* scale sample: the scale network is trained by
    the full-table objective alone.  Otherwise each observation would pull on the scales
    twice (once through its half table, fitted to half the data and so noisier), doubling
    the data weight against the scale prior and letting half-table noise leak into the
    shared scales that the full-table merge depends on.
    """

    def __init__(self, prior: WilsonPrior, posterior: FoldedNormalPosterior,
                 scale_model: ImageScaleModel, likelihood: nn.Module, *, mc_samples: int = 32,
                 kl_weight: float = 1.0, standardizer: Standardizer | None = None,
                 scale_kl_weight: float = 1.0) -> None:
        super().__init__()
        if posterior.n_rows != prior.n_rows:
            raise ValueError(f"posterior has {posterior.n_rows} rows, prior {prior.n_rows}")
        if mc_samples < 1:
            raise ValueError(f"mc_samples must be at least 1, got {mc_samples}")
        self.prior = prior
        self.posterior = posterior
        self.scale_model = scale_model
        self.likelihood = likelihood
        self.standardizer = (standardizer if standardizer is not None
                             else Standardizer(scale_model.n_metadata))
        self.mc_samples = int(mc_samples)
        self.kl_weight = float(kl_weight)
        self.scale_kl_weight = float(scale_kl_weight)
        #: leave out of the likelihood images that the merge explains no better than the
        #: Wilson prior (:meth:`misfit_images`); the engine turns it on once the merge has
        #: learnt enough for the test to mean something
        self.reject_images = False
        #: lead (nats) the current setting of an image keeps in :meth:`choose_ops`: 0 until a
        #: consensus puts the images in settings worth keeping (the engine sets
        #: :data:`SETTING_HYSTERESIS` then).  Without one, an image's first choice is made
        #: against a young posterior and must stay free to change (the service emulated,
        #: sparse P 4₃: CC(F) 0.895 free, 0.745 held at 2 nats)
        self.setting_hysteresis = 0.0
        #: evaluate the objective with shapes that do not depend on the data (no
        #: ``torch.unique``) and a dense gradient for the posterior: nothing in the step
        #: waits on the device (:class:`~streamvi.merging.trainer.Trainer`, ``sync_free``)
        self.sync_free = False
        #: the per-observation copies of the refined geometry parameters of the last
        #: :meth:`scale_distribution` (their gradients: each observation's share), or None
        self._geometry_observations: torch.Tensor | None = None
        #: their offsets' change per prior σ of each parameter, ``(n, N_GEOMETRY)`` Å⁻¹
        self._geometry_jacobian: torch.Tensor | None = None
        #: prior σ of the per-image geometry corrections, ``(rotation rad, dilation)``;
        #: None: a batch's ``geometry`` is ignored (:mod:`streamvi.merging.model.geometry`)
        self.geometry_sigma: tuple[float, float] | None = None
        self._scale_forward: ScaleForward | None = None
        #: the double-Wilson prior between conditions (pump–probe), or None: every table
        #: under the Wilson prior (:meth:`set_coupling`)
        self.coupling: DoubleWilsonCoupling | None = None
        #: the partiality from the reported geometry under the learnt scale, or None: the
        #: network learns all of it (:meth:`set_partiality`)
        self.partiality: GeometricPartiality | None = None
        #: ``log P`` of the last :meth:`scale_distribution` (None without a partiality)
        self._last_log_p: torch.Tensor | None = None
        #: the amplitudes learn from each observation's scale integrated out (its
        #: log-normal's mean, and its variance at the current prediction added to σ(I)²)
        #: instead of from its draws, which pull strong amplitudes down; the scale network
        #: still learns from the draws (docs/model.md, change 24)
        self.marginal_scale = False

    def set_coupling(self, coupling: DoubleWilsonCoupling | None) -> None:
        """Put the amplitudes of every condition but ``coupling.reference`` under the
        coupled prior (:mod:`streamvi.merging.model.coupling`); None: independent Wilson
        priors."""
        if coupling is not None:
            n_conditions = self.posterior.n_tables // 3
            if coupling.n_rows != self.posterior.n_rows or coupling.n_conditions != n_conditions:
                raise ValueError(f"the coupling covers {coupling.n_conditions} conditions × "
                                 f"{coupling.n_rows} rows; the posterior has {n_conditions} × "
                                 f"{self.posterior.n_rows}")
        self.coupling = coupling

    def set_partiality(self, partiality: GeometricPartiality | None) -> None:
        """Multiply every observation's scale by ``partiality``'s P from its geometry (the
        network's log-scale is added to ``log P``); None: the network's scale alone.  A
        submodule when set, so its three parameters travel in the ``state_dict``."""
        self.partiality = partiality

    def set_scale_forward(self, fn: ScaleForward | None) -> None:
        """Run the scale network through ``fn`` (e.g. compiled or autocast); None resets.

        Stored outside the module registry so the ``state_dict`` keys never change.
        """
        object.__setattr__(self, "_scale_forward", fn)

    def scale_distribution(self, batch: Batch, *, at_bragg: bool = False
                           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Standardised ``(iobs, sigiobs)`` and the log-normal ``(loc, scale)`` per reflection.

        ``at_bragg``: each reflection's scale as if it lay on its Bragg condition (Ewald
        offset and its ratio to the profile radius 0 for the per-reflection head; the image
        vectors still pooled from the observations as they are): the image's scale free of
        partiality, for the fall-off record of ``EngineConfig.falloff_at_bragg``.

        With :attr:`partiality` set, ``loc`` includes its ``log P`` (0 on the Bragg
        condition)."""
        std = self.standardizer
        iobs = std.standardize_intensity(batch.iobs)
        sigiobs = std.standardize_intensity(batch.sigiobs)
        raw = self.corrected_metadata(batch)
        metadata = std.standardize_metadata(raw)
        fn = self._scale_forward if self._scale_forward is not None else self.scale_model
        kwargs = {}
        if at_bragg:
            fn = self.scale_model
            on_bragg = raw.clone()
            on_bragg[:, Column.EWALD_OFFSET] = 0.0
            on_bragg[:, Column.EWALD_RATIO] = 0.0
            kwargs["head_metadata"] = std.standardize_metadata(on_bragg)
        if self.scale_model.n_pooled_extra:
            loc, scale = fn(metadata, iobs, sigiobs, batch.image_index, batch.n_images,
                            self._merge_ratio(batch, iobs), **kwargs)
        else:
            loc, scale = fn(metadata, iobs, sigiobs, batch.image_index, batch.n_images,
                            **kwargs)
        log_p = None
        if self.partiality is not None and not at_bragg:
            log_p = self.partiality(raw).to(loc.dtype)
            loc = loc + log_p
        # the step reads it again (the network's part of ``loc``) without a second pass
        self._last_log_p = log_p
        return iobs, sigiobs, loc, scale

    @staticmethod
    def _falloff_locations(network_loc: torch.Tensor, log_p: torch.Tensor | None
                           ) -> torch.Tensor:
        """The scale locations the fall-off record of change 10 reads (detached): the
        network's part of each observation's scale location, and with a geometric
        partiality (``log_p``) only where ``P ≥ NEAR_BRAGG_P``, NaN (left out of the
        record) elsewhere."""
        if log_p is None:
            return network_loc
        log_p = log_p.to(network_loc.dtype)
        return torch.where(log_p >= NEAR_BRAGG_LOG_P, network_loc,
                           torch.full_like(network_loc, float("nan")))

    def corrected_metadata(self, batch: Batch) -> torch.Tensor:
        """The batch's raw metadata with each image's geometry corrections applied (as given
        when there are none or refinement is off)."""
        if batch.geometry is None or batch.axes is None or self.geometry_sigma is None:
            return batch.metadata
        rotation, dilation = self.geometry_sigma
        params = batch.geometry[:, :N_GEOMETRY]
        if not params.requires_grad:
            return corrected_metadata(batch.metadata, batch.image_index, params, batch.axes,
                                      rotation_sigma=rotation, dilation_sigma=dilation)
        # refined: each observation gets its own copy of its image's parameters, whose
        # gradient is that observation's share (the trainer's Fisher-scoring step reads
        # their squares: :func:`~streamvi.merging.model.geometry.observation_fisher`)
        per_observation = params.index_select(0, batch.image_index)
        per_observation.retain_grad()
        self._geometry_observations = per_observation
        jacobian = offset_jacobian(batch.metadata,
                                   batch.axes.index_select(0, batch.image_index))
        sigma = torch.tensor([rotation] * 3 + [dilation] * 3, dtype=params.dtype,
                             device=params.device)
        # what the step's trust region reads: the offsets' change per prior σ
        self._geometry_jacobian = jacobian * sigma
        return corrected_metadata(batch.metadata, torch.arange(
            batch.n_reflections, device=params.device), per_observation, batch.axes,
            rotation_sigma=rotation, dilation_sigma=dilation, jacobian=jacobian)

    @staticmethod
    def full_table(batch: Batch) -> int | torch.Tensor:
        """Table of all images of each reflection's condition: 0 with one condition, else
        ``(n,)`` ``3 · condition`` of the reflection's image."""
        if batch.condition is None:
            return 0
        return 3 * batch.condition.index_select(0, batch.image_index)

    @torch.no_grad()
    def _merge_ratio(self, batch: Batch, iobs: torch.Tensor) -> torch.Tensor:
        """Each observation against the current merge: ``asinh(I / E_q[F²])`` of its row,
        pooled per image by the scale encoder.  The row is the one in the setting chosen for
        the image at its last visit (``batch.image_op``; the identity without one)."""
        rows = batch.asu_id[0]
        if batch.image_op is not None and batch.n_ops > 1:
            rows = batch.asu_id.gather(0, batch.image_op[batch.image_index].unsqueeze(0))[0]
        loc, scale = self.posterior.loc_scale(self.posterior.flat_index(self.full_table(batch),
                                                                        rows))
        return torch.asinh(iobs / self.posterior.second_moment(loc, scale, rows).clamp_min(1e-6))

    def _expected_scale_and_intensity(self, row_ids: torch.Tensor, scale_loc: torch.Tensor,
                                      scale_scale: torch.Tensor, table: int | torch.Tensor = 0
                                      ) -> tuple[torch.Tensor, torch.Tensor]:
        """``E[scale]`` per reflection and ``E_q[F²]`` of rows ``row_ids`` (in ``table``:
        0, or per reflection its condition's full table)."""
        loc, scale = self.posterior.loc_scale(self.posterior.flat_index(table, row_ids))
        return (torch.exp(scale_loc + 0.5 * scale_scale ** 2),
                self.posterior.second_moment(loc, scale, row_ids))

    def _image_log_likelihood(self, batch: Batch, ipred: torch.Tensor, iobs: torch.Tensor,
                              sigiobs: torch.Tensor) -> torch.Tensor:
        """Log-likelihood summed over each image's reflections: ``(..., n)`` →
        ``(..., n_images)``."""
        ll = self.likelihood.log_prob(ipred, iobs, sigiobs)
        out = torch.zeros(ll.shape[:-1] + (batch.n_images,), device=ll.device, dtype=ll.dtype)
        return out.index_add_(ll.dim() - 1, batch.image_index, ll)

    @torch.no_grad()
    def misfit_images(self, batch: Batch, row_ids: torch.Tensor, iobs: torch.Tensor,
                      sigiobs: torch.Tensor, scale_loc: torch.Tensor,
                      scale_scale: torch.Tensor) -> torch.Tensor:
        """Images the current merge explains worse than the Wilson prior does (``(n_images,)``).

        An image's summed log-likelihood with ``Ipred = E[scale] · E_q[F²]`` is compared with
        the same sum when every reflection is predicted at its Wilson mean ``E[scale] · εΣ``
        (amplitudes unrelated to the merge; resolution fall-off and partiality kept).  A
        crystal indexed on a shifted or wrong lattice, or a hit that is not this crystal
        form, fits no better than that; a good image fits by hundreds of nats.  A very weak
        image, which neither prediction explains, sits near zero and can go either way: on
        the 2,000-image benchmark no good image was flagged, on 600 images at 2.5 Å 0.2 %.
        """
        e_scale, e_intensity = self._expected_scale_and_intensity(row_ids, scale_loc,
                                                                  scale_scale,
                                                                  self.full_table(batch))
        by_merge = self._image_log_likelihood(batch, e_scale * e_intensity, iobs, sigiobs)
        by_null = self._image_log_likelihood(batch, e_scale * self.prior.variance[row_ids],
                                             iobs, sigiobs)
        return by_merge < by_null

    @torch.no_grad()
    def choose_ops(self, batch: Batch, iobs: torch.Tensor, sigiobs: torch.Tensor,
                   scale_loc: torch.Tensor, scale_scale: torch.Tensor) -> torch.Tensor:
        """Per image, the twin-law operator whose rows best explain its intensities.

        Scores each operator by the image's summed log-likelihood with ``Ipred = E[scale] ·
        E[F²]`` under the current table-0 posterior.  The setting the image has now
        (``batch.image_op``: its last choice, or a consensus assigned before the merge)
        keeps a lead of :attr:`setting_hysteresis` nats (:data:`SETTING_HYSTERESIS` once a
        consensus assigned the settings, else 0), so exact ties (a posterior still at its
        Wilson start prefers no setting) and the noise of a sparse pattern leave it in place;
        remaining ties go to the lowest operator.
        """
        e_scale, e_intensity = self._expected_scale_and_intensity(batch.asu_id, scale_loc,
                                                                  scale_scale,
                                                                  self.full_table(batch))
        per_image = self._image_log_likelihood(batch, e_scale * e_intensity, iobs, sigiobs)
        if batch.image_op is not None and self.setting_hysteresis:
            per_image = per_image.scatter_add(
                0, batch.image_op.unsqueeze(0),
                torch.full((1, batch.n_images), self.setting_hysteresis,
                           dtype=per_image.dtype, device=per_image.device))
        return torch.argmax(per_image, dim=0)

    def _table_terms(self, table: int | torch.Tensor, row_ids: torch.Tensor,
                     scale_sample: torch.Tensor | _ScaleMoments, iobs: torch.Tensor,
                     sigiobs: torch.Tensor,
                     generator: torch.Generator | None,
                     obs_weight: torch.Tensor | None = None,
                     obs_keep: torch.Tensor | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        post = self.posterior
        flat = post.flat_index(table, row_ids)
        # One draw per unique row, shared by all of its observations in the batch, and
        # reused for the Monte Carlo KL of exactly those rows.
        if self.sync_free:          # every observation stands in for its row
            unique_flat = flat
            inverse, first = _first_occurrence(flat, post.n_tables * post.n_rows)
            loc, scale = post.loc_scale(unique_flat, dense_grad=True)
        else:
            unique_flat, inverse = torch.unique(flat, return_inverse=True)
            first = None
            loc, scale = post.loc_scale(unique_flat)
        rows = torch.remainder(unique_flat, post.n_rows)
        F = post.sample_with(loc, scale, self.mc_samples, generator, rows=rows)  # (mc, u)
        F_obs = torch.index_select(F, 1, inverse)  # backward is index_add_, cheaper than index_put_
        if isinstance(scale_sample, tuple):
            # marginal_scale: (draws of s or None, E[s], Var[s]/E[s]²), all but the draws
            # without a gradient.  The amplitudes learn from the scale integrated out, its
            # spread taken at the prediction as it stands, so that it weighs the observation
            # and does not pull on F (sampled, it adds Var[s]·(E[s]F²)²/σ², a pull towards 0
            # that grows with F⁴; in the variance with a gradient, the log-determinant pulls
            # the same way); the scales learn from the draws with F held, as without the
            # option, so that their spread keeps its meaning
            draws, mean_scale, rel_var = scale_sample
            ipred = mean_scale * F_obs * F_obs
            spread = rel_var * torch.square(ipred.detach())
            ll = self.likelihood.log_prob(ipred, iobs, torch.sqrt(sigiobs * sigiobs + spread))
            if draws is not None:
                f2 = torch.square(F_obs.detach())
                ll_scale = self.likelihood.log_prob(draws * f2, iobs, sigiobs)
                ll = ll + (ll_scale - ll_scale.detach())     # its gradient, not its value
        else:
            ipred = scale_sample * F_obs * F_obs
            ll = self.likelihood.log_prob(ipred, iobs, sigiobs)
        if obs_keep is None:
            nll = -ll.mean()
        else:
            # rejected images add nothing; the mean stays per observation of the batch
            nll = -(ll * obs_keep).sum() / (ll.shape[0] * ll.shape[1])
        log_q = post.log_prob_with(F, loc, scale, rows=rows)
        log_p = self.prior.log_prob(F, rows)
        ref_flat = None
        if self.coupling is not None:
            log_p, ref_flat = self._coupled_log_prior(F, log_p, unique_flat, rows, generator)
        kl_rows = (log_q - log_p).mean(dim=0)
        if obs_weight is not None:
            # each observation carries 1/multiplicity of its row's KL: summed over a pass
            # through the data every row's KL counts once
            w = torch.zeros_like(kl_rows).index_add_(0, inverse, obs_weight.to(kl_rows.dtype))
            kl_rows = kl_rows * w
        if first is not None:
            kl_rows = kl_rows * first        # each row's KL once, at its first observation
        kl = kl_rows.sum() / row_ids.shape[0]
        if ref_flat is not None:       # the reference's rows moved too
            flat = torch.cat([flat, ref_flat])
        return nll, kl, flat

    def _coupled_log_prior(self, F: torch.Tensor, log_wilson: torch.Tensor,
                           unique_flat: torch.Tensor, rows: torch.Tensor,
                           generator: torch.Generator | None
                           ) -> tuple[torch.Tensor, torch.Tensor]:
        """The prior term of rows ``unique_flat`` under :attr:`coupling`: the conditional
        given a draw of the reference condition's amplitude of the same reflection (same
        table kind: all images or the same half) where the row belongs to another condition,
        the Wilson ``log_wilson`` where it belongs to the reference.  Returns the log-prior
        and the reference's rows it looked up."""
        post, coupling = self.posterior, self.coupling
        table = torch.div(unique_flat, post.n_rows, rounding_mode="floor")
        condition = torch.div(table, 3, rounding_mode="floor")
        variance, centric = self.prior.variance[rows], self.prior.centric[rows]
        log_p, ref_flat = log_wilson, None
        if coupling.n_conditions > 1:
            ref_flat = (3 * coupling.reference + torch.remainder(table, 3)) * post.n_rows + rows
            loc_r, scale_r = post.loc_scale(ref_flat, dense_grad=self.sync_free)
            F_ref = post.sample_with(loc_r, scale_r, self.mc_samples, generator, rows=rows)
            conditional = coupling.log_prob(F, F_ref, condition, rows, variance, centric)
            log_p = torch.where(condition != coupling.reference, conditional, log_p)
        if coupling.fixed is not None:
            e = coupling.fixed[rows]
            has = torch.isfinite(e)
            F_fix = torch.where(has, e, 0.0) * torch.sqrt(variance)
            given_fixed = coupling.log_prob(F, F_fix.expand_as(F), condition, rows, variance,
                                            centric)
            log_p = torch.where((condition == coupling.reference) & has, given_fixed, log_p)
        return log_p, ref_flat

    def forward(self, batch: Batch, generator: torch.Generator | None = None) -> LossTerms:
        """Objective terms for one minibatch (see the module docstring)."""
        if batch.n_reflections == 0:
            raise ValueError("cannot take a step on an empty batch")
        iobs, sigiobs, s_loc, s_scale = self.scale_distribution(batch)

        chosen = None
        if batch.n_ops > 1:
            chosen = self.choose_ops(batch, iobs, sigiobs, s_loc.detach(), s_scale.detach())
            row_ids = batch.asu_id.gather(0, chosen[batch.image_index].unsqueeze(0)).squeeze(0)
        else:
            row_ids = batch.asu_id[0]

        rejected = obs_keep = None
        if self.reject_images:
            rejected = self.misfit_images(batch, row_ids, iobs, sigiobs, s_loc.detach(),
                                          s_scale.detach())
            obs_keep = (~rejected)[batch.image_index].to(iobs.dtype)
        # the network's part of the scale: the whole of it without a geometric partiality
        log_p = None if self._last_log_p is None else self._last_log_p.detach()
        network_loc = s_loc.detach() if log_p is None else s_loc.detach() - log_p

        z = torch.randn((self.mc_samples, batch.n_reflections), generator=generator,
                        device=s_loc.device, dtype=s_loc.dtype)
        scale_sample = torch.exp(s_loc + s_scale * z)  # (mc, n)
        half_scale = scale_sample.detach()
        if self.marginal_scale:
            # E[s] and Var[s]/E[s]² of the log-normal for the amplitudes' likelihood
            # (:meth:`_table_terms`); the draws train the scales
            moments = (torch.exp(s_loc + 0.5 * s_scale * s_scale).detach(),
                       torch.expm1(s_scale * s_scale).detach())
            scale_sample, half_scale = (scale_sample,) + moments, (None,) + moments

        w = batch.obs_weight
        full = self.full_table(batch)
        nll, kl_F, flat0 = self._table_terms(full, row_ids, scale_sample, iobs, sigiobs,
                                             generator, None if w is None else w[0], obs_keep)
        half_table = 1 + batch.half[batch.image_index] + full
        nll_half, kl_F_half, flat_half = self._table_terms(half_table, row_ids, half_scale,
                                                iobs, sigiobs, generator,
                                                None if w is None else w[1], obs_keep)
        kl_scale = self.scale_model.kl(s_loc, s_scale).mean()
        loss = nll + nll_half + self.kl_weight * (kl_F + kl_F_half
                                                  + self.scale_kl_weight * kl_scale)
        if batch.geometry is not None and batch.geometry.requires_grad:
            # the corrections' standard-normal prior, once per image visit, per observation
            # like the rest of the objective
            loss = loss + prior_nll(batch.geometry[:, :N_GEOMETRY]) / batch.n_reflections
        return LossTerms(nll=nll, kl_F=kl_F, kl_scale=kl_scale, loss=loss,
                         n_obs=batch.n_reflections, nll_half=nll_half, kl_F_half=kl_F_half,
                         chosen_ops=chosen, rejected=rejected, flat_rows=(flat0, flat_half),
                         scale_loc=self._falloff_locations(network_loc, log_p))

    @torch.no_grad()
    def merged(self, table: int = 0, weight: torch.Tensor | None = None) -> MergedTable:
        """F, SIGF, I, SIGI of every row of ``table`` in the original intensity units.

        ``weight`` replaces the posterior's parameters (e.g. their average over steps).

        Standardised intensities are the originals divided by the standardiser's intensity
        scale ``c``, so intensities are multiplied by ``c`` and amplitudes by ``√c``.
        """
        c = self.standardizer.intensity_scale()
        mean_F, std_F = self.posterior.moments(table, weight)
        mean_I, std_I = self.posterior.intensity_moments(table, weight)
        root_c = float(np.sqrt(c))
        return MergedTable(F=(mean_F * root_c).cpu().numpy(), SIGF=(std_F * root_c).cpu().numpy(),
                           I=(mean_I * c).cpu().numpy(), SIGI=(std_I * c).cpu().numpy())
