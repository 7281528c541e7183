"""Drives the merging model: one stochastic variational step per minibatch of images.

The trainer owns the explicit training state — model, optimisers, standardiser, random
generator, counters — and nothing about where batches come from (no sockets, no store).
"""
from __future__ import annotations

import math
import time
import warnings
from dataclasses import asdict, dataclass, fields, replace
from typing import Any, Callable

import numpy as np
import torch

from streamvi.merging.model.batch import Batch
from streamvi.merging.model.coupling import DoubleWilsonCoupling
from streamvi.merging.model.geometry import (N_GEOMETRY, newton_step, observation_fisher,
                                             scoring_update, trust_factors)
from streamvi.merging.model.likelihood import NormalLikelihood, StudentTLikelihood
from streamvi.merging.model.merging import VariationalMergingModel
from streamvi.merging.model.metadata import N_METADATA, N_NETWORK_METADATA, Column
from streamvi.merging.model.partiality import GeometricPartiality
from streamvi.merging.model.posterior import FoldedNormalPosterior
from streamvi.merging.model.prior import WilsonPrior
from streamvi.merging.model.scale import ImageScaleModel
from streamvi.merging.model.standardize import Standardizer
from streamvi.merging.optim import RowSparseAdam

LIKELIHOODS = ("student_t", "normal")
#: surrogate posteriors of the acentric rows (centric rows keep the folded normal)
SURROGATES = ("folded_normal", "rice")


@dataclass
class TrainerConfig:
    """Model and optimiser settings (defaults follow abismal except where noted).

    ``posterior_lr`` is the learning rate of the folded-normal table (abismal uses ``lr``
    for everything): a row moves only in the steps that contain it, so to converge within
    a few epochs the table needs a larger rate — with 1e-3 a synthetic set of 300 rows
    reaches CC 0.82 after 300 steps, with 1e-2 CC 0.999.
    ``amp_bf16`` runs the scale network under bfloat16 autocast (CUDA only); ``compile``
    wraps it in ``torch.compile``.  ``sync_free`` takes steps in which the host never waits
    for the device (None: on CUDA only; see :meth:`Trainer.learn_batch`).
    """

    d_model: int = 32
    n_layers: int = 2
    mc_samples: int = 32
    likelihood: str = "student_t"
    dof: float = 32.0
    lr: float = 1e-3
    posterior_lr: float = 1e-2
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-7
    kl_weight: float = 1.0
    #: weight of the scale KL against the likelihood.  At 1 the Exponential(1) prior holds
    #: every reflection's E[scale] near 1, which the likelihood of weak partial reflections
    #: cannot overrule: partialities and per-image B were learnt poorly and amplitudes came
    #: out flattened (docs/model.md, "A weak scale prior").
    scale_kl_weight: float = 0.03
    warmup_reflections: int = 200_000
    device: str = "auto"
    seed: int = 0
    amp_bf16: bool = False
    compile: bool = False
    #: publish an exponential average of each posterior row's parameters over its updates
    #: instead of the current ones (0: off).  The decay per update of a row is
    #: ``min(decay, (1 + n) / (10 + n))`` after ``n`` updates, so young rows follow the
    #: iterate.  At a constant learning rate (the service) the iterate keeps a step-sized
    #: jitter as large as weak Bijvoet differences; the average reduces it (docs/model.md,
    #: "Online, the published posterior is averaged").  Offline merges anneal instead.
    posterior_average_decay: float = 0.0
    #: torch intra-op threads on the CPU (None: leave torch's setting).  One is the default:
    #: with minibatches of a few thousand reflections and ingest/publishing threads beside
    #: it, two threads on two shared cores made a step many times slower
    #: (docs/performance.md).
    cpu_threads: int | None = 1
    sync_free: bool | None = None
    #: the scale network's encoder (pooled per image, not seen by the per-reflection head)
    #: also takes each observation against the current merge, ``asinh(I / E_q[F²])``: an
    #: image's pattern of too-strong and too-weak reflections tells where its reported
    #: orientation misplaces the Ewald sphere, which partiality depends on (amortised
    #: post-refinement; docs/model.md, "The scale encoder sees each observation against the
    #: merge", with what it gains).
    pooled_merge_ratio: bool = True
    #: refine each image's orientation (a small rotation) and reciprocal-lattice scale at
    #: every visit, through the scale network's learnt partiality (docs/model.md, "Each
    #: image's orientation and cell are refined";
    #: :mod:`streamvi.merging.model.geometry`).  Priors: σ ``geometry_rotation_deg`` per rotation
    #: component and ``geometry_dilation`` (relative); ``geometry_lr`` is the fraction of
    #: each visit's Fisher-scoring step taken (1: the whole Newton step).
    refine_geometry: bool = True
    #: express each posterior row in units of its Wilson r.m.s. amplitude √(εΣ) once Σ is
    #: known (docs/model.md): Adam's steps are then the same fraction of every
    #: row's expected size, and strong low-resolution amplitudes reach their value
    posterior_wilson_units: bool = False
    #: learn an error model σ' = √((a σ)² + (b Ipred)²) in the likelihood (docs/model.md;
    #: :class:`streamvi.merging.model.likelihood.ErrorModel`)
    error_model: bool = False
    #: the amplitudes learn from each observation's scale integrated out (mean and variance
    #: of its log-normal) rather than from its draws (docs/model.md, change 24)
    marginal_scale: bool = False
    #: a per-image relative B in the scale model's output, ``log scale += b_i · 1/d²``
    #: (standardised), ``b_i`` from the image vector (docs/model.md, change 13)
    image_b_term: bool = False
    #: multiply each observation's learnt scale by a peak-normalised partiality from its
    #: reported geometry (Ewald offset, profile radius, bandwidth; two learnt factors and a
    #: learnt mosaic spread):
    #: :class:`streamvi.merging.model.partiality.GeometricPartiality`, docs/model.md change 18
    geometric_partiality: bool = False
    #: surrogate of the acentric rows: ``folded_normal`` or ``rice`` (docs/model.md,
    #: change 14; centric rows keep the folded normal)
    surrogate: str = "folded_normal"
    geometry_rotation_deg: float = 0.05
    geometry_dilation: float = 0.002
    geometry_lr: float = 1.0

    def __post_init__(self) -> None:
        if not 0.0 <= self.posterior_average_decay < 1.0:
            raise ValueError("posterior_average_decay must lie in [0, 1), got "
                             f"{self.posterior_average_decay}")
        if not (self.posterior_lr > 0 and self.lr > 0):
            raise ValueError(f"posterior_lr and lr must be positive, got {self.posterior_lr} "
                             f"and {self.lr}")
        if self.likelihood not in LIKELIHOODS:
            raise ValueError(f"likelihood must be one of {LIKELIHOODS}, got {self.likelihood!r}")
        if self.surrogate not in SURROGATES:
            raise ValueError(f"surrogate must be one of {SURROGATES}, got {self.surrogate!r}")
        self.betas = (float(self.betas[0]), float(self.betas[1]))
        if self.refine_geometry and not (self.geometry_rotation_deg > 0
                                         and self.geometry_dilation > 0
                                         and self.geometry_lr > 0):
            raise ValueError("geometry_rotation_deg, geometry_dilation and geometry_lr must be "
                             "positive with refine_geometry (or set refine_geometry to False)")


_NAN4 = (float("nan"),) * 4


@dataclass
class StepReport:
    """What one :meth:`Trainer.learn_batch` did (losses per observation, time in s).

    The losses (``loss``, ``nll``, ``kl_F``, ``kl_scale``) may still be on the device: they
    are copied to the host when first read, so a caller that does not read them does not
    make the step wait for the device.  ``seconds`` is the host's time in the step, which
    for a step that did not wait is the time to queue its work.
    """

    step: int
    n_images: int
    n_reflections: int
    seconds: float
    #: per image of the batch (batch order), on the training device: the twin-law operator
    #: chosen (None with one operator)
    chosen_ops: torch.Tensor | None = None
    #: per image of the batch (batch order), on the training device: left out as not
    #: fitting the merge (None while the test is off)
    rejected: torch.Tensor | None = None
    #: ``(loss, nll, kl_F, kl_scale)``: a ``(4,)`` tensor until first read, then floats
    terms: torch.Tensor | tuple[float, float, float, float] = _NAN4
    #: whether the update was taken (a 0-d bool tensor until first read, then a bool);
    #: a skipped step reports NaN losses
    taken: torch.Tensor | bool = True
    #: per image of the batch (batch order), on the training device: the refined geometry
    #: state after this step (:mod:`streamvi.merging.model.geometry`; None when not refined)
    geometry: torch.Tensor | None = None
    #: per reflection of the batch, on the training device: the location (log scale) of its
    #: scale distribution in this step
    scale_loc: torch.Tensor | None = None

    def _resolve(self) -> tuple[float, float, float, float]:
        if isinstance(self.terms, torch.Tensor):
            values = torch.cat([self.terms.detach().float().reshape(-1),
                                torch.as_tensor(self.taken, device=self.terms.device)
                                .float().reshape(1)]).cpu().tolist()
            self.taken = bool(values[4])
            self.terms = tuple(values[:4]) if self.taken else _NAN4
        return self.terms

    loss = property(lambda self: self._resolve()[0], doc="Loss per observation.")
    nll = property(lambda self: self._resolve()[1], doc="Negative log-likelihood, table 0.")
    kl_F = property(lambda self: self._resolve()[2], doc="KL of the amplitudes, table 0.")
    kl_scale = property(lambda self: self._resolve()[3], doc="KL of the image scales.")

    @property
    def update_taken(self) -> bool:
        """Whether the step updated the parameters (False: non-finite gradients)."""
        self._resolve()
        return bool(self.taken)


def resolve_device(name: str = "auto") -> torch.device:
    """``'auto'`` → CUDA when available, else CPU; ``'cpu'``/``'cuda[:i]'`` as given."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {name!r} requested but CUDA is not available")
        if device.index is None:  # so it compares equal to the device of a tensor on it
            device = torch.device("cuda", torch.cuda.current_device())
    return device


def _compiled_or_eager(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``torch.compile(fn)``, falling back to ``fn`` for good if compiling fails.

    Compilation happens at the first call (a missing C++ toolchain or an unsupported
    backend shows up only then); merging must go on without it.
    """
    current = [torch.compile(fn, dynamic=True)]

    def call(*args: Any) -> Any:
        if current[0] is fn:
            return fn(*args)
        try:
            return current[0](*args)
        except Exception as exc:
            warnings.warn(f"torch.compile failed ({type(exc).__name__}: {exc}); running the "
                          "scale network eagerly", RuntimeWarning, stacklevel=2)
            current[0] = fn
            return fn(*args)

    return call


def _adam(params: list[torch.nn.Parameter], **kwargs: Any) -> torch.optim.Adam:
    """Adam with the fused kernel where this torch and device have one (CPU from torch 2.4).

    The scale network has a few dozen small tensors: the per-tensor loop of the default
    implementation took ~1.5 ms of a d 16 step on the CPU, the fused kernel ~0.6 ms.
    """
    try:
        return torch.optim.Adam(params, fused=True, **kwargs)
    except (RuntimeError, TypeError, ValueError):
        return torch.optim.Adam(params, **kwargs)


def _finite(tensors: list[torch.Tensor]) -> torch.Tensor:
    """0-d bool tensor on the tensors' device: whether every element of ``tensors`` is finite.

    The largest of the per-tensor max-norms is NaN or inf exactly when some element is (a
    2-norm could overflow on large finite values).
    """
    inf = float("inf")
    norms = (torch._foreach_norm(tensors, ord=inf) if hasattr(torch, "_foreach_norm") else
             [torch.linalg.vector_norm(t, ord=inf) for t in tensors])
    return torch.isfinite(torch.stack(list(norms)).max())


def _all_finite(tensors: list[torch.Tensor]) -> bool:
    """Whether every element of ``tensors`` is finite, with one host synchronisation."""
    return True if not tensors else bool(_finite(tensors))


#: a synchronisation-free trainer reads its device count of skipped steps (and warns of new
#: ones) once per this many steps
SKIP_CHECK_STEPS = 256


class Trainer:
    """Continuous stochastic variational inference over minibatches of whole images.

    Parameters
    ----------
    config
        Model and optimiser settings.
    centric
        ``(n_rows,)`` bool centric flag of every unique reflection.
    epsilon
        ``(n_rows,)`` multiplicity factor ε of every unique reflection.
    n_metadata
        Number of metadata columns in the batches.
    n_conditions
        Conditions merged side by side (pump–probe; docs/time-resolved.md): the posterior
        holds three tables (all images, half 1, half 2) per condition, condition ``c`` in
        tables ``3c..3c+2``; one scale network and one Wilson prior serve them all.
    reference_condition
        With several conditions, the index of the reference (e.g. dark): every other
        condition's amplitudes take the double-Wilson prior given the reference's
        (:mod:`streamvi.merging.model.coupling`).  None: independent Wilson priors.
    row_shell
        ``(n_rows,)`` resolution shell of every row: the coupling learns one correlation per
        condition and shell.  Required with ``reference_condition`` or ``fixed_prior``.
    fixed_prior
        ``(n_rows,)`` normalised amplitudes ``E`` of a prior data set
        (:func:`~streamvi.merging.model.coupling.normalised_amplitudes`, NaN where it has
        none): the reference condition (the only one, without conditions) takes the
        double-Wilson prior given them.
    """

    def __init__(self, config: TrainerConfig, *, centric: np.ndarray, epsilon: np.ndarray,
                 n_metadata: int, n_conditions: int = 1,
                 reference_condition: int | None = None,
                 row_shell: np.ndarray | None = None,
                 fixed_prior: np.ndarray | None = None) -> None:
        if n_conditions < 1:
            raise ValueError(f"n_conditions must be at least 1, got {n_conditions}")
        self.config = config
        self.n_conditions = int(n_conditions)
        self.device = resolve_device(config.device)
        if self.device.type == "cpu" and config.cpu_threads:
            torch.set_num_threads(int(config.cpu_threads))
        # copies: the caller's arrays may be read-only views
        centric_t = torch.from_numpy(np.array(centric, dtype=bool))
        epsilon_t = torch.from_numpy(np.array(epsilon, dtype=np.float32))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)
            prior = WilsonPrior(centric_t, epsilon_t)
            posterior = FoldedNormalPosterior(prior.n_rows, 3 * self.n_conditions,
                                              init_loc=prior.mean())
            scale_model = ImageScaleModel(
                n_metadata, config.d_model, config.n_layers,
                n_pooled_extra=int(config.pooled_merge_ratio),
                b_column=(int(Column.INV_D2) if config.image_b_term and n_metadata > Column.INV_D2
                          else None))
        likelihood = (StudentTLikelihood(config.dof, error_model=config.error_model)
                      if config.likelihood == "student_t"
                      else NormalLikelihood(config.error_model))
        self.model = VariationalMergingModel(
            prior, posterior, scale_model, likelihood, mc_samples=config.mc_samples,
            kl_weight=config.kl_weight, standardizer=Standardizer(n_metadata),
            scale_kl_weight=config.scale_kl_weight)
        self.model.marginal_scale = bool(config.marginal_scale)
        if config.geometric_partiality:
            self.model.set_partiality(GeometricPartiality())
        self.model.to(self.device)
        if config.surrogate == "rice":
            self.model.posterior.use_rice(~self.model.prior.centric)
        self._configure_scale_forward()
        self.scale_optimizer = _adam(list(self.model.scale_model.parameters())
                                     + list(self.model.likelihood.parameters())
                                     + ([] if self.model.partiality is None
                                        else list(self.model.partiality.parameters())),
                                     lr=config.lr,
                                     betas=config.betas, eps=config.eps)
        coupled = reference_condition is not None and self.n_conditions > 1
        if coupled or fixed_prior is not None:
            if row_shell is None:
                raise ValueError("a coupled prior needs row_shell (each row's resolution shell)")
            shells = torch.from_numpy(np.asarray(row_shell, dtype=np.int64))
            fixed = (None if fixed_prior is None
                     else torch.from_numpy(np.asarray(fixed_prior, dtype=np.float32)))
            coupling = DoubleWilsonCoupling(shells, int(shells.max()) + 1 if shells.numel() else 1,
                                            self.n_conditions,
                                            int(reference_condition or 0) if coupled else 0,
                                            fixed)
            self.model.set_coupling(coupling.to(self.device))
            # the correlations learn at the posterior's rate (a few hundred steps to settle)
            self.scale_optimizer.add_param_group({"params": list(coupling.parameters()),
                                                  "lr": config.posterior_lr,
                                                  "base_lr": config.posterior_lr})
        self.posterior_optimizer = RowSparseAdam(
            list(self.model.posterior.parameters()), lr=config.posterior_lr, betas=config.betas,
            eps=config.eps)
        self.generator = torch.Generator(device=self.device)
        self.generator.manual_seed(config.seed)
        #: running average of the posterior's parameters and each row's update count
        #: (None when ``posterior_average_decay`` is 0)
        self.posterior_average: torch.Tensor | None = None
        self.posterior_updates: torch.Tensor | None = None
        if config.posterior_average_decay > 0:
            self._reset_average()
        self.model.sync_free = (self.device.type == "cuda" if config.sync_free is None
                                else bool(config.sync_free))
        # the corrections rewrite the Ewald columns of streamvi.merging.features' layout: a model
        # fed other metadata (tests, synthetic benchmarks of other widths) has none to refine
        if config.refine_geometry and n_metadata in (N_NETWORK_METADATA, N_METADATA):
            self.model.geometry_sigma = (math.radians(config.geometry_rotation_deg),
                                         float(config.geometry_dilation))
        self.step = 0
        self.reflections_trained = 0
        self._skipped_host = 0
        self._skipped_t = torch.zeros((), dtype=torch.int64, device=self.device)
        self._skips_warned = 0

    @property
    def standardizer(self) -> Standardizer:
        return self.model.standardizer

    @property
    def sync_free(self) -> bool:
        """Whether steps never make the host wait for the device (see :meth:`learn_batch`)."""
        return self.model.sync_free

    @property
    def skipped_steps(self) -> int:
        """Steps whose update was skipped for non-finite gradients (reading it may wait for
        the device)."""
        return self._skipped_host + int(self._skipped_t)

    def _configure_scale_forward(self) -> None:
        fn = self.model.scale_model.forward
        if self.config.compile:
            fn = _compiled_or_eager(fn)
        if self.config.amp_bf16 and self.device.type == "cuda":
            inner = fn

            def fn(*args: Any) -> tuple[torch.Tensor, torch.Tensor]:
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    loc, scale = inner(*args)
                return loc.float(), scale.float()
        self.model.set_scale_forward(fn)

    def learn_batch(self, batch: Batch) -> StepReport:
        """One optimiser step on ``batch`` (moved to the trainer's device if needed).

        With :attr:`sync_free` (the default on CUDA) the host queues the whole step without
        waiting for the device: the objective has shapes that do not depend on the data, the
        posterior gets a dense gradient and a masked update (:meth:`RowSparseAdam.masked_step`),
        a step with non-finite gradients is skipped on the device (fused Adam's ``found_inf``
        and the mask), and the losses stay on the device until read.  The standardiser's
        warm-up still reads its count each step until it freezes.  Such a step counts its
        reflections in :attr:`reflections_trained` even when it is skipped; skips show in
        :attr:`skipped_steps` and are warned of every :data:`SKIP_CHECK_STEPS` steps.
        """
        start = time.perf_counter()
        if batch.iobs.device != self.device:
            batch = batch.to(self.device, non_blocking=True)
        std = self.model.standardizer
        if not std.is_frozen:
            std.update(batch.metadata, batch.iobs, batch.image_index, batch.n_images)
            if std.n_seen >= self.config.warmup_reflections:
                std.freeze()
        self.model.train()
        geometry_state = geometry = None
        if (self.model.geometry_sigma is not None and batch.geometry is not None
                and batch.axes is not None and std.is_frozen):
            # refined once the standardiser is frozen: the corrections then keep one
            # meaning for the network, and the merge has something to fit them against
            geometry_state = batch.geometry
            geometry = geometry_state[:, :N_GEOMETRY].detach().clone().requires_grad_(True)
            batch = replace(batch, geometry=geometry)
        terms = self.model(batch, generator=self.generator)
        self.scale_optimizer.zero_grad(set_to_none=True)
        self.posterior_optimizer.zero_grad(set_to_none=True)
        terms.loss.backward()
        if self.sync_free:
            report = self._finish_sync_free(batch, terms, start)
            if geometry is not None:
                report.geometry = self._geometry_step(geometry_state, geometry.grad,
                                                      report.taken, batch)
            return report
        self._coalesce_sparse_gradients()
        self._reduce_gradients()
        if not self._gradients_finite():
            # one bad batch must not poison every parameter (and, through checkpoints, the
            # rest of the beamtime): skip its update, count it, go on.  Checked after the
            # reduction, so data-parallel ranks all skip the same step.
            self._skipped_host += 1
            warnings.warn(f"step {self.step + 1}: non-finite gradients; update skipped "
                          f"({self.skipped_steps} so far)", RuntimeWarning, stacklevel=2)
            return StepReport(step=self.step, n_images=batch.n_images, n_reflections=0,
                              seconds=time.perf_counter() - start, taken=False)
        self.scale_optimizer.step()
        self.posterior_optimizer.step()
        self._update_average()
        report = self._stepped(batch, terms, start, taken=True)
        if geometry is not None:
            report.geometry = self._geometry_step(geometry_state, geometry.grad, None, batch)
        return report

    def _geometry_step(self, state: torch.Tensor, grad: torch.Tensor | None,
                       taken: torch.Tensor | bool | None, batch: Batch) -> torch.Tensor:
        """The batch's per-image geometry state after one Fisher-scoring step (``taken``
        False, or a device flag that is False: unchanged)."""
        if grad is None:                # nothing in the objective depended on it
            grad = torch.zeros_like(state[:, :N_GEOMETRY])
        keep = taken if isinstance(taken, torch.Tensor) else None
        # the objective is per observation of the batch; the image's log posterior is a sum
        n = float(batch.n_reflections)
        shares, jacobian = self.model._geometry_observations, self.model._geometry_jacobian
        self.model._geometry_observations = self.model._geometry_jacobian = None
        if shares is None or shares.grad is None:
            fisher = torch.zeros_like(grad)
        else:
            fisher = observation_fisher(n * shares.grad, batch.image_index, batch.n_images)
        # the factor set_lr_factor gave the posterior's rate (saved with its optimiser)
        lr = self.config.geometry_lr * self.posterior_optimizer.param_groups[0]["lr"] \
            / self.config.posterior_lr
        if jacobian is not None:
            lr = lr * trust_factors(lr * newton_step(n * grad, fisher), jacobian,
                                    batch.metadata[:, Column.PROFILE_RADIUS], batch.image_index)
        return scoring_update(state, n * grad, fisher, lr=lr, keep=keep)

    def _stepped(self, batch: Batch, terms: Any, start: float,
                 taken: torch.Tensor | bool) -> StepReport:
        """Count a step taken (or, with ``taken`` a device flag, maybe skipped) and report it;
        the losses stay on the device where the step did not wait for it anyway."""
        self.step += 1
        self.reflections_trained += batch.n_reflections
        values = torch.stack([terms.loss, terms.nll, terms.kl_F, terms.kl_scale]).detach()
        chosen = None if terms.chosen_ops is None else terms.chosen_ops.detach()
        return StepReport(step=self.step, n_images=batch.n_images,
                          n_reflections=batch.n_reflections,
                          seconds=time.perf_counter() - start, chosen_ops=chosen,
                          rejected=terms.rejected, taken=taken, scale_loc=terms.scale_loc,
                          terms=values if self.sync_free else tuple(values.cpu().tolist()))

    def _finish_sync_free(self, batch: Batch, terms: Any, start: float) -> StepReport:
        """The rest of a :attr:`sync_free` step, after ``backward`` (see :meth:`learn_batch`).

        There is no :meth:`_reduce_gradients` here: data-parallel ranks, which override it,
        always take the sparse step."""
        weight = self.model.posterior.weight
        touched = torch.zeros(weight.shape[0], dtype=torch.bool, device=weight.device)
        for rows in terms.flat_rows:
            touched.index_fill_(0, rows, True)
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        taken = _finite(grads)
        if self.scale_optimizer.defaults.get("fused"):
            # fused Adam skips the update (and its step count) where found_inf is nonzero
            self.scale_optimizer.found_inf = (~taken).to(torch.float32)
            self.scale_optimizer.step()
        elif bool(taken):      # an Adam without the fused kernel: one wait for the device
            self.scale_optimizer.step()
        touched &= taken
        self.posterior_optimizer.masked_step(touched)
        self._update_average(touched)
        self._skipped_t += (~taken).to(torch.int64)
        report = self._stepped(batch, terms, start, taken)
        if self.step % SKIP_CHECK_STEPS == 0:
            self._warn_new_skips()
        return report

    def _warn_new_skips(self) -> None:
        skipped = self.skipped_steps
        if skipped > self._skips_warned:
            warnings.warn(f"{skipped - self._skips_warned} of the steps up to step {self.step} "
                          f"had non-finite gradients; their updates were skipped ({skipped} so "
                          "far)", RuntimeWarning, stacklevel=3)
            self._skips_warned = skipped

    @torch.no_grad()
    def _reset_average(self, rows: torch.Tensor | None = None) -> None:
        """Restart the average at the current parameters (all rows, or flat ``rows``)."""
        weight = self.model.posterior.weight
        if rows is None:
            self.posterior_average = weight.detach().clone()
            self.posterior_updates = torch.zeros(weight.shape[0], dtype=torch.float32,
                                                 device=weight.device)
        else:
            self.posterior_average.index_copy_(0, rows, weight.index_select(0, rows))
            self.posterior_updates.index_fill_(0, rows, 0.0)

    @torch.no_grad()
    def _update_average(self, touched: torch.Tensor | None = None) -> None:
        """Move the average of the rows this step updated towards their new values
        (``touched``: a mask of those rows, for a dense gradient)."""
        if self.posterior_average is None:
            return
        weight = self.model.posterior.weight
        if touched is not None:
            n = self.posterior_updates
            new = torch.lerp(self.posterior_average, weight, self._average_rate(n))
            self.posterior_average.copy_(torch.where(touched.unsqueeze(1), new,
                                                     self.posterior_average))
            self.posterior_updates.add_(touched.to(n.dtype))
            return
        grad = weight.grad
        if grad is None:
            return
        rows = grad.coalesce()._indices()[0]
        n = self.posterior_updates.index_select(0, rows)
        old = self.posterior_average.index_select(0, rows)
        new = torch.lerp(old, weight.index_select(0, rows), self._average_rate(n))
        self.posterior_average.index_copy_(0, rows, new)
        self.posterior_updates.index_add_(0, rows, torch.ones_like(n))

    def _average_rate(self, n: torch.Tensor) -> torch.Tensor:
        """``(rows, 1)`` weight of the new value for rows updated ``n`` times before:
        ``1 − min(decay, (1 + n)/(10 + n))``."""
        decay = torch.clamp((1.0 + n) / (10.0 + n), max=self.config.posterior_average_decay)
        return (1.0 - decay).unsqueeze(1)

    def set_lr_factor(self, factor: float) -> None:
        """Scale the learning rates (network, posterior, per-image geometry) to ``factor`` ×
        their configured values.

        An offline merge anneals them over its last steps: with a constant rate the
        posterior means keep jittering by about one step, as large as weak anomalous
        differences.
        """
        for opt, base in ((self.scale_optimizer, self.config.lr),
                          (self.posterior_optimizer, self.config.posterior_lr)):
            for group in opt.param_groups:
                group["lr"] = group.get("base_lr", base) * float(factor)

    def _coalesce_sparse_gradients(self) -> None:
        """Coalesce the posterior's sparse gradient once (its two lookups leave duplicates);
        the finiteness check and the sparse Adam would each coalesce it again otherwise."""
        for p in self.model.posterior.parameters():
            if p.grad is not None and p.grad.is_sparse and not p.grad.is_coalesced():
                p.grad = p.grad.coalesce()

    def _gradients_finite(self) -> bool:
        grads = []
        for p in self.model.parameters():
            g = p.grad
            if g is not None:
                grads.append(g.coalesce().values() if g.is_sparse else g)
        return _all_finite(grads)

    def _reduce_gradients(self) -> None:
        """Hook between ``backward`` and the optimiser steps; a no-op for one process.

        Data-parallel ranks override it to combine their gradients so that every rank takes
        the same step (:class:`streamvi.merging.distributed.DistributedTrainer`).
        """

    def set_wilson_sigma(self, sigma: np.ndarray, *, reset: np.ndarray | None = None,
                         start: np.ndarray | None = None) -> None:
        """Set the Wilson prior's Σ per row (standardised units) from a Wilson plot.

        Parameters
        ----------
        sigma
            ``(n_rows,)`` positive mean intensity per unit ε at each row's resolution.
        reset
            ``(n_rows,)`` bool: rows put back to the new Wilson mean (those not yet learnt
            from, so they start where the prior now says they should).
        start
            ``(3, n_reset)`` (or ``(n_reset,)``) multiples of the Wilson mean the reset rows
            start at instead, per table kind (all images, half 1, half 2; every condition
            alike): their data (:meth:`MergeEngine._data_start`).  None: 1.

        With ``posterior_wilson_units`` every row is re-expressed in units of its new
        √(εΣ) first, keeping the values of the rows not reset.
        """
        prior = self.model.prior
        post = self.model.posterior
        prior.set_sigma(torch.from_numpy(np.asarray(sigma, dtype=np.float32)).to(self.device))
        if self.config.posterior_wilson_units:
            extra = () if self.posterior_average is None else (self.posterior_average,)
            post.set_unit(torch.sqrt(prior.variance), *extra)
        if reset is not None and bool(np.any(reset)):
            self.start_rows(np.nonzero(reset)[0], start)

    @torch.no_grad()
    def start_rows(self, rows: np.ndarray, start: np.ndarray | None = None) -> None:
        """Put ``rows`` of every table at ``start`` (``(3, k)`` per table kind, or ``(k,)``)
        times their Wilson mean (1: at it), with their averages restarted there."""
        post = self.model.posterior
        rows_t = torch.from_numpy(np.asarray(rows, dtype=np.int64)).to(self.device)
        loc = self.model.prior.mean(rows_t)
        if start is not None:
            factor = torch.from_numpy(np.asarray(start, dtype=np.float32)).to(self.device)
            factor = factor.reshape(-1, rows_t.shape[0])
            loc = loc * factor.repeat(post.n_tables // factor.shape[0], 1)
        post.reset_rows(rows_t, loc)
        if self.posterior_average is not None:
            self._reset_average(torch.cat([post.flat_index(t, rows_t)
                                           for t in range(post.n_tables)]))

    @torch.no_grad()
    def forget_rows(self, flat_rows: torch.Tensor) -> None:
        """Clear the optimiser's momentum (and restart the average) of rows ``flat_rows`` of
        the posterior's parameter matrix after they were put somewhere new: it pointed from
        where they were.  The second moments stay: they measure the gradients' size, and
        cleared ones would make the next updates several learning rates long."""
        for state in self.posterior_optimizer.state.values():
            if "exp_avg" in state:
                state["exp_avg"].index_fill_(0, flat_rows.to(state["exp_avg"].device), 0.0)
        if self.posterior_average is not None:
            self._reset_average(flat_rows)

    def posterior_table(self, table: int = 0) -> dict[str, np.ndarray]:
        """``F``, ``SIGF``, ``I``, ``SIGI`` of every row of ``table`` (original units): of
        the running average of the parameters when ``posterior_average_decay`` is set."""
        merged = self.model.merged(table, self.posterior_average)
        return {"F": merged.F, "SIGF": merged.SIGF, "I": merged.I, "SIGI": merged.SIGI}

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume (tensors may live on the device).

        On the CPU the steps after a round trip are bit-identical to those without one.  On
        CUDA they are only when the caller sets ``torch.use_deterministic_algorithms(True)``
        (and ``CUBLAS_WORKSPACE_CONFIG``): otherwise atomic adds in the sparse-gradient and
        pooling kernels differ in the last bits from run to run, checkpoint or not.
        """
        return {
            "n_conditions": self.n_conditions,
            "coupled": self.model.coupling is not None,
            "config": asdict(self.config),
            "model": self.model.state_dict(),
            "scale_optimizer": self.scale_optimizer.state_dict(),
            "posterior_optimizer": self.posterior_optimizer.state_dict(),
            "generator": self.generator.get_state(),
            "step": self.step,
            "reflections_trained": self.reflections_trained,
            "posterior_average": self.posterior_average,
            "posterior_updates": self.posterior_updates,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict`; the model's shape settings must match this trainer's."""
        saved = state["config"]
        mine = (self.n_conditions, self.model.coupling is not None)
        theirs = (int(state.get("n_conditions", 1)), bool(state.get("coupled", False)))
        if theirs != mine:
            raise ValueError(f"the checkpoint is of a merge with {theirs[0]} set(s) of "
                             f"tables (conditions and spare ones, new_conditions)"
                             f"{' under a coupled prior' if theirs[1] else ''}; this one has "
                             f"{mine[0]}{' under a coupled prior' if mine[1] else ''}: "
                             "start with the conditions (new_conditions, coupled_prior) it "
                             "was written with, or in a fresh out_dir")
        # checkpoints from before pooled_merge_ratio existed were written without it
        for name in ("d_model", "n_layers", "likelihood", "pooled_merge_ratio", "error_model",
                     "image_b_term", "geometric_partiality", "surrogate"):
            value = (saved.get(name, False)
                     if name in ("pooled_merge_ratio", "error_model", "image_b_term",
                                 "geometric_partiality")
                     else saved.get(name, "folded_normal") if name == "surrogate"
                     else saved[name])
            if value != getattr(self.config, name):
                raise ValueError(f"checkpoint has {name}={value!r}, trainer has "
                                 f"{getattr(self.config, name)!r}: set {name} to {value!r} to "
                                 "resume it, or start in another output directory")
        model_state = state["model"]
        if "posterior.unit" not in model_state:
            # checkpoints from before the per-row unit held every row in absolute units
            model_state = {**model_state, "posterior.unit": torch.ones_like(
                self.model.posterior.unit)}
        self.model.load_state_dict(model_state)
        self.scale_optimizer.load_state_dict(state["scale_optimizer"])
        self.posterior_optimizer.load_state_dict(state["posterior_optimizer"])
        try:
            self.generator.set_state(state["generator"].cpu())
        except RuntimeError:
            # CPU and CUDA generators keep different states: a checkpoint moved between
            # device types resumes with a fresh stream, still a function of (seed, step)
            warnings.warn("random state saved on another device type; reseeding",
                          RuntimeWarning, stacklevel=2)
            self.generator.manual_seed(int(saved["seed"]) + int(state["step"]))
        self.step = int(state["step"])
        self.reflections_trained = int(state["reflections_trained"])
        if self.config.posterior_average_decay > 0:
            if state.get("posterior_average") is not None:
                self.posterior_average = state["posterior_average"].to(self.device).clone()
                self.posterior_updates = state["posterior_updates"].to(self.device).clone()
            else:       # a checkpoint without an average: start one at the loaded state
                self._reset_average()
        else:
            self.posterior_average = self.posterior_updates = None

    @staticmethod
    def config_from_state(state: dict[str, Any]) -> TrainerConfig:
        """The :class:`TrainerConfig` a checkpoint was written with."""
        known = {f.name for f in fields(TrainerConfig)}
        return TrainerConfig(**{k: v for k, v in state["config"].items() if k in known})
