"""The merging engine: store + scheduler + trainer, and posterior snapshots.

``streamvi merge`` (offline, over files) and ``streamvi serve`` (online, over ZeroMQ) drive the
same engine: crystals go in with :meth:`MergeEngine.add`, training happens one minibatch at a
time with :meth:`MergeEngine.step`, and :meth:`MergeEngine.snapshot` freezes the current
posterior into a :class:`~streamvi.snapshot.MergeSnapshot` that the publishers (MTZ, ZeroMQ,
metrics) read.
"""
from __future__ import annotations

import logging
import math
import time
from typing import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from streamvi.merging.model.metadata import N_NETWORK_METADATA, Column
from streamvi.merging.model.merging import SETTING_HYSTERESIS
from streamvi.merging.model.coupling import difference_gains, normalised_amplitudes
from streamvi.merging.reference import (ReferenceData, ReferenceSetting, SettingChoice,
                                        align_snapshot)
from streamvi.merging.schedule import ImageScheduler
from streamvi.quality.stats import shell_statistics
from streamvi.merging.store import AddResult, ReflectionStore, RejectedStatistics
from streamvi.snapshot import MergeSnapshot
from streamvi.symmetry import ReciprocalSpace
from streamvi.merging.trainer import StepReport, Trainer, TrainerConfig
from streamvi.wire import CrystalMessage

log = logging.getLogger(__name__)

TABLE_NAMES = ("all", "half1", "half2")
#: fewest observations (of a Bijvoet pair, per table) for a row to be refreshed, and how
#: many standard errors its merge must lie from its estimate
REFRESH_MIN_OBSERVATIONS = 10
REFRESH_MIN_Z = 3.0
#: resolution bins (uniform in 1/d² up to 1/dmin²) of the image scales' running record
FALLOFF_BINS = 20
#: observations' worth of the Wilson mean mixed into a row's data start
#: (:attr:`EngineConfig.data_start`): it keeps a row seen once or twice near the prior
DATA_START_WEIGHT = 2.0
#: I/σ(I) of a row's raw inverse-variance mean at which its data start is half its data,
#: half the Wilson mean
DATA_START_Z = 3.0
#: per-step decay of that record: it follows the scale network over its last ~500 steps
FALLOFF_DECAY = 0.998
#: fewest (decayed) observations in a bin for it to count, and bins for a fit
FALLOFF_MIN_COUNT = 50.0
FALLOFF_MIN_BINS = 5
#: with ``EngineConfig.falloff_near_full``, only observations within this many profile radii
#: of the Bragg condition enter the record (docs/model.md, change 10)
FALLOFF_FULL_RATIO = 1.0
#: with ``EngineConfig.falloff_at_bragg``, images read for the record at each snapshot
FALLOFF_BRAGG_IMAGES = 256


@dataclass
class EngineConfig:
    """How the engine batches and reports.

    Attributes
    ----------
    batch_images
        Whole images per training step.
    new_share
        Share of each batch reserved for never-visited images.
    n_shells
        Resolution shells of the statistics table.
    device_budget_bytes
        Reflection bytes kept on the training device before the host tier is used.
    wilson_from_data
        Set the Wilson prior's Σ from the data's resolution fall-off (docs/model.md).
    kl_per_pass
        Weight each row's KL by 1/multiplicity, so it counts once per pass over the data.
    reject_misfit_images
        Leave out of the likelihood, visit by visit, images the merge explains no better than
        the Wilson prior does (misindexed or foreign lattices; docs/model.md).
    wilson_min_images
        Images stored before the first, provisional Σ is taken from the data (the final one
        follows when the standardiser freezes).  A service's first step may see a single
        still, whose own partialities and B shape its Wilson plot; rows started there kept
        the mark to the end (the demo's stream emulated: CC top shell 0.921 against 0.944).
        Counted in images, not observations, so a small stream of small images still gets
        its Σ early rather than at the freeze, a moment that varies with timing.
    recentre_falloff
        Publish the amplitudes with the resolution dependence that the image scales' geometric
        mean had moved onto them (the likelihood cannot tell the two apart): one relative B
        per snapshot, :meth:`MergeEngine.falloff_correction` (docs/model.md, "The scales'
        resolution trend is given to the amplitudes").
    falloff_near_full
        Keep that record over near-full observations only (within
        :data:`FALLOFF_FULL_RATIO` profile radii of the Bragg condition) instead of all
        recorded ones: right where the partialities have a resolution trend of their own
        (CrystFEL ``partial_sim``), wrong by 2-4 Å² on the project's simulator (docs/model.md).
    falloff_at_bragg
        Take the record instead, at each snapshot, from the scale network read with every
        reflection on its Bragg condition (:meth:`_falloff_at_bragg`): the images' scales
        free of partiality, whatever trend the partialities have (docs/model.md, change 15).
    falloff_binned
        Publish the record's own shape instead of its slope in 1/d²: each row's intensity
        times ``exp(y(1/d²) − ȳ)``, ``y`` the record's mean log location interpolated between
        its bins, which are then equal steps in 1/d (fine at low resolution, where the
        scales' trend is steepest); the B reported stays the slope's (docs/model.md,
        change 25).
    data_start
        Start every observed row, when the Wilson Σ is first set, at its own data rather
        than at the Wilson mean (:meth:`_data_start`: the raw mean intensity of it and its
        Bijvoet mate over the Wilson plot's ``εΣ``, weighted by its I/σ; each half-dataset
        table from its own half; one condition only).  A row moves by about one learning
        rate per update, so a strong reflection seen on few images could not leave its
        Wilson start within a merge (docs/model.md, change 16).  ``streamvi merge`` turns
        it on.
    refresh_growth, refresh_idle_steps
        When to restart the rows at their merge given the current scales
        (:meth:`MergeEngine.refresh_rows`) while training goes on: each time the store has
        grown ``refresh_growth``-fold since the last time (0: never), and once the store has
        not grown for ``refresh_idle_steps`` steps after it last did (0: never; the beam is
        off).  Counted from the final Σ.  ``streamvi merge`` refreshes at fixed epochs instead.
    refresh_max_observations
        With those refreshes, restart only the Bijvoet pairs with at most this many
        observations (None: every pair with one or more), as ``merge``'s row refresh does
        (docs/model.md, change 22): the rows updated too rarely to travel by themselves.
    """

    batch_images: int = 8
    new_share: float = 0.5
    n_shells: int = 10
    device_budget_bytes: int | None = None
    wilson_from_data: bool = True
    kl_per_pass: bool = True
    reject_misfit_images: bool = True
    wilson_min_images: int = 32
    recentre_falloff: bool = True
    falloff_near_full: bool = False
    falloff_at_bragg: bool = False
    falloff_binned: bool = False
    refresh_growth: float = 0.0
    refresh_idle_steps: int = 0
    refresh_max_observations: int | None = None
    data_start: bool = False


def _wilson_posterior_amplitude(j_hat: torch.Tensor, var_j: torch.Tensor,
                                wilson: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Amplitude and its σ from an intensity estimate under the Wilson prior (acentric).

    ``J = F² ≥ 0`` with an exponential prior of mean ``εΣ`` (``wilson``) and a normal
    likelihood ``N(Ĵ; J, var)`` has a posterior that is a normal of mean ``Ĵ − var/εΣ``
    truncated at 0 (French & Wilson); its mean is ``m + sd φ(m/sd)/Φ(m/sd)``.  Returns
    ``√E[J]`` and ``sd / (2√E[J])``, kept within [10⁻³√(εΣ), the amplitude].
    """
    sd = torch.sqrt(var_j)
    m = j_hat - var_j / wilson
    x = m / sd
    ratio = torch.exp(-0.5 * x * x - 0.5 * math.log(2 * math.pi) - torch.special.log_ndtr(x))
    j_post = torch.clamp(m + sd * ratio, min=1e-3 * wilson)
    f = torch.sqrt(j_post)
    return f, torch.minimum(torch.clamp(sd / (2.0 * f), min=1e-3 * torch.sqrt(wilson)), f)


class MergeEngine:
    """Online variational merging of crystals into one unique-reflection table.

    Parameters
    ----------
    space
        Space group, cell, dmin and anomalous mode of the merge.
    trainer_config
        Model and optimiser settings.
    config
        Batching and statistics settings.
    conditions
        Names of the conditions merged side by side (pump–probe, docs/time-resolved.md):
        one shared scale network and Wilson prior, three posterior tables per condition; a
        crystal of another condition is refused (``unknown_condition``).  None (the
        default): one unlabelled condition, exactly the merge without conditions.  With
        more than one, :meth:`refresh_rows` and the data-parallel engine are refused for
        now.
    spare_conditions
        With ``conditions``, how many further conditions may appear mid-run (``serve
        --new-conditions``): each new name takes a spare set of tables (and its own
        correlations under the coupled prior) when its first crystal is stored.
    coupled_reference
        With several conditions, the name of the reference condition (e.g. ``dark``) every
        other condition is coupled to by the double-Wilson prior, with one correlation per
        condition and resolution shell (``config.n_shells``) learnt from the data
        (:mod:`streamvi.merging.model.coupling`).  None: independent Wilson priors.
    prior
        Amplitudes of an independent data set of the same crystal (``--prior-mtz``): the
        reference condition (the only one, without conditions) takes the double-Wilson
        prior given them, one correlation per shell learnt; rows they lack keep the Wilson
        prior.
    """

    #: Trainer class the engine builds (data-parallel engines substitute their own).
    trainer_class: type[Trainer] = Trainer
    #: whether :meth:`add_many` may start new rows at their data (``data_start``) from this
    #: store's own sums: not where every rank must hold the same rows (data-parallel)
    starts_rows_on_add: bool = True

    def __init__(self, space: ReciprocalSpace, trainer_config: TrainerConfig | None = None,
                 config: EngineConfig | None = None, *,
                 conditions: Sequence[str] | None = None,
                 spare_conditions: int = 0,
                 coupled_reference: str | None = None,
                 prior: ReferenceData | None = None):
        self.space = space
        self.config = config or EngineConfig()
        self.trainer_config = trainer_config or TrainerConfig()
        n_conditions = 1 if conditions is None else len(conditions) + int(spare_conditions)
        if n_conditions > 1 and self.trainer_class is not Trainer:
            raise ValueError("several conditions are not supported by the data-parallel "
                             "engine yet: merge them on one device (docs/time-resolved.md)")
        kwargs: dict = {"n_conditions": n_conditions} if n_conditions > 1 else {}
        if coupled_reference is not None:
            if n_conditions < 2 or coupled_reference not in conditions:
                raise ValueError(f"coupled_reference {coupled_reference!r} must be one of "
                                 f"two or more conditions (got "
                                 f"{', '.join(conditions or ()) or 'none'})")
            kwargs["reference_condition"] = list(conditions).index(coupled_reference)
        if prior is not None and self.trainer_class is not Trainer:
            raise ValueError("a prior data set is not supported by the data-parallel engine "
                             "yet: merge on one device")
        if coupled_reference is not None or prior is not None:
            kwargs["row_shell"] = space.shell_index(space.d, self.config.n_shells).clip(0)
        #: the prior data set's name (``file:column``), or None
        self.prior_name = None if prior is None else prior.name
        if prior is not None:
            kwargs["fixed_prior"] = normalised_amplitudes(
                ReferenceSetting(space, prior).f_rows, space.epsilon, kwargs["row_shell"],
                self.config.n_shells)
        self.trainer = self.trainer_class(self.trainer_config, centric=space.centric,
                                          epsilon=space.epsilon, n_metadata=N_NETWORK_METADATA,
                                          **kwargs)
        self.device = self.trainer.device
        #: put snapshots in the indexing setting of this reference (merohedral groups only)
        self.reference: ReferenceSetting | None = None
        #: the reindexing the last snapshot got from :attr:`reference` (None: not chosen yet)
        self.setting_choice: SettingChoice | None = None
        self.store = ReflectionStore(space, device=self.device,
                                     device_budget_bytes=self.config.device_budget_bytes,
                                     kl_per_pass=self.config.kl_per_pass,
                                     conditions=conditions,
                                     spare_conditions=spare_conditions)
        self.scheduler = ImageScheduler(batch_images=self.config.batch_images,
                                        new_share=self.config.new_share,
                                        seed=self.trainer_config.seed)
        self._snapshot_id = 0
        #: decayed sums over observations of the scale's log location and of their count, per
        #: resolution bin (rejected images left out), on the training device
        self._falloff = torch.zeros((2, FALLOFF_BINS), dtype=torch.float32, device=self.device)
        self._inv_d2_max = float(1.0 / space.dmin ** 2)
        #: Wilson Σ set from the data: 0 not yet, 1 provisional, 2 final (standardiser frozen)
        self.sigma_stage = 0
        self._wilson_raw: np.ndarray | None = None
        #: (verdicts version, images) and the rejected images' row statistics then
        #: (:meth:`_left_out`)
        self._rejected_counts: tuple[tuple[int, int], RejectedStatistics] | None = None
        self.last_report: StepReport | None = None
        #: images stored at the last refresh of the rows (None: not counting yet), and the
        #: step at which the store last grew
        self.refreshed_images: int | None = None
        self._grew_at_step = 0
        self._images_last_step = 0
        #: rows restarted by the last refresh (for logs and metrics)
        self.refreshes = 0

    # ------------------------------------------------------------------ data in

    def add(self, msg: CrystalMessage, *, arrival_time: float | None = None) -> AddResult:
        """Store one crystal (see :meth:`ReflectionStore.add`)."""
        return self.add_many([msg], None if arrival_time is None else [arrival_time])[0]

    def add_many(self, msgs: Sequence[CrystalMessage],
                 arrival_times: Sequence[float] | None = None) -> list[AddResult]:
        """Store several crystals at once (see :meth:`ReflectionStore.add_many`).

        With ``data_start``, once the Wilson Σ is set, rows these crystals observe for the
        first time start at their data (:meth:`_data_start`), as the rows observed before Σ
        did: a service's rows mostly arrive after it.  Not in space groups with twin laws: a
        new image's indexing setting is not chosen yet, and rows started from it in the
        wrong one undid the sparse ambiguity case of the quality matrix (docs/model.md,
        change 16)."""
        unseen = None
        if (self.config.data_start and self.starts_rows_on_add and self.sigma_stage
                and self.store.n_conditions == 1 and self._wilson_raw is not None
                and self.space.n_ops == 1):
            unseen = self.store.obs_count[0] == 0
        results = self.store.add_many(msgs, arrival_times)
        if unseen is not None:
            rows = np.nonzero(unseen & (self.store.obs_count[0] > 0))[0]
            if rows.size:
                self.trainer.start_rows(rows, self._data_start(self._wilson_raw, rows))
        return results

    @property
    def n_images(self) -> int:
        return self.store.n_images

    @property
    def conditions(self) -> tuple[str, ...] | None:
        """The conditions' names in table order (None: one unlabelled condition)."""
        return self.store.conditions

    def _one_condition(self, what: str) -> None:
        """Refuse ``what`` (a feature that assumes three posterior tables) with several
        conditions."""
        if self.store.n_conditions > 1:
            raise ValueError(f"{what} is not supported with several conditions yet "
                             f"({', '.join(self.store.conditions or ())}); see "
                             "docs/time-resolved.md")

    # ------------------------------------------------------------------ training

    def step(self) -> StepReport | None:
        """One optimiser step on the next minibatch; None when the store is empty."""
        ids = self.scheduler.next_ids(self.store.n_images)
        if ids.size == 0:
            return None
        batch = self.store.batch(ids)
        report = self.trainer.learn_batch(batch)
        if report.rejected is not None:
            self.store.set_rejected(batch.image_id, report.rejected)
        if report.chosen_ops is not None:
            self.store.set_ops(batch.image_id, report.chosen_ops)
        if report.geometry is not None:
            self.store.set_geometry(batch.image_id, report.geometry)
        if report.scale_loc is not None:
            self._track_falloff(batch, report)
        frozen = self.trainer.standardizer.is_frozen
        if self.config.wilson_from_data and self._wilson_due(frozen):
            self._update_wilson_sigma(final=frozen)
        self.store.mark_visited(ids)
        self.last_report = report
        if self._refresh_due():
            self.refresh_rows(max_observations=self.config.refresh_max_observations)
        return report

    def _refresh_due(self) -> bool:
        """Whether the policy of ``refresh_growth`` / ``refresh_idle_steps`` calls for a
        refresh of the rows now (see :class:`EngineConfig`)."""
        n, step = self.store.n_images, self.trainer.step
        if n != self._images_last_step:
            self._images_last_step, self._grew_at_step = n, step
        cfg = self.config
        if self.sigma_stage < 2 or not (cfg.refresh_growth > 0 or cfg.refresh_idle_steps > 0):
            return False
        if self.refreshed_images is None:          # counting starts at the final Σ
            self.refreshed_images = n
            return False
        if n <= self.refreshed_images:
            return False
        grown = cfg.refresh_growth > 0 and n >= cfg.refresh_growth * self.refreshed_images
        idle = (cfg.refresh_idle_steps > 0
                and step - self._grew_at_step >= cfg.refresh_idle_steps)
        return grown or idle

    def _track_falloff(self, batch, report: StepReport) -> None:
        """Add the step's scale locations to the per-resolution record (no host wait)."""
        loc = report.scale_loc
        inv_d2 = batch.metadata[:, Column.INV_D2].to(loc.device)
        bins = self._falloff_position(inv_d2.clamp_min(0.0)).long().clamp_(0, FALLOFF_BINS - 1)
        weight = torch.isfinite(loc)
        if self.config.falloff_near_full:
            # (without an orientation the ratio is 0: every observation counts)
            weight &= (batch.metadata[:, Column.EWALD_RATIO].to(loc.device).abs()
                       <= FALLOFF_FULL_RATIO)
        weight = weight.to(loc.dtype)
        if report.rejected is not None:
            weight = weight * (~report.rejected).to(loc.dtype)[batch.image_index.to(loc.device)]
        self._falloff.mul_(FALLOFF_DECAY)
        self._falloff[0].index_add_(0, bins, torch.nan_to_num(loc) * weight)
        self._falloff[1].index_add_(0, bins, weight)

    def _falloff_position(self, inv_d2):
        """Fractional bin of the fall-off record for ``1/d²`` (Å⁻², numpy or torch): equal
        steps in 1/d² (the default) or, with ``falloff_binned``, in 1/d."""
        if self.config.falloff_binned:
            return (inv_d2 / self._inv_d2_max) ** 0.5 * FALLOFF_BINS
        return inv_d2 * (FALLOFF_BINS / self._inv_d2_max)

    def _falloff_record(self) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
        """``(1/d², mean log scale location, count)`` of the record's bins with
        :data:`FALLOFF_MIN_COUNT` observations; None while fewer than
        :data:`FALLOFF_MIN_BINS` have."""
        if self.config.falloff_at_bragg:
            sums, counts = self._falloff_at_bragg()
        else:
            sums, counts = self._falloff.double().cpu().numpy()
        ok = counts >= FALLOFF_MIN_COUNT
        if ok.sum() < FALLOFF_MIN_BINS:
            return None
        edges = (np.arange(FALLOFF_BINS) + 0.5) / FALLOFF_BINS
        centres = self._inv_d2_max * (edges ** 2 if self.config.falloff_binned else edges)
        return centres[ok], sums[ok] / counts[ok], counts[ok]

    def falloff_factor(self) -> tuple[np.ndarray, float] | None:
        """Per row, the factor the amplitudes' intensities are published with, and the B
        (Å²) of the record's slope (:meth:`falloff_correction`); None as there."""
        record = self._falloff_record()
        if record is None:
            return None
        beta, x_ref = self._falloff_slope(*record)
        x_rows = 1.0 / np.square(self.space.d.astype(np.float64))
        if self.config.falloff_binned:
            x, y, w = record
            factor = np.exp(np.interp(x_rows, x, y) - np.average(y, weights=w))
        else:
            factor = np.exp(beta * (x_rows - x_ref))
        return factor, -2.0 * beta

    @staticmethod
    def _falloff_slope(x: np.ndarray, y: np.ndarray, w: np.ndarray) -> tuple[float, float]:
        x_ref = float(np.average(x, weights=w))
        beta = float(np.sum(w * (x - x_ref) * (y - np.average(y, weights=w)))
                     / np.sum(w * (x - x_ref) ** 2))
        return beta, x_ref

    def falloff_correction(self) -> tuple[float, float] | None:
        """``(β, s²_ref)`` with which to move the scales' resolution trend onto the amplitudes.

        The likelihood sees only ``scale × F²``: a factor ``g(1/d²)`` taken from every
        image's scale and given to every amplitude changes nothing it can measure, and the
        priors (the Wilson Σ from the observed intensities, the weak scale prior) settle the
        split.  The convention used here, as in scaling programs that fix the mean relative B
        at zero, is that the scales' geometric mean over the recorded observations (or, with
        ``falloff_near_full``, over the near-full ones) does not depend on resolution.  Over
        all recorded observations that also moves the partialities' own resolution trend,
        where they have one, onto the amplitudes (CrystFEL's ``partial_sim``: B −15 Å²).
        β is the slope in 1/d² of the mean log scale location, by weighted least squares over
        the bins of the record; amplitudes are published with ``I × exp(β (1/d² − s²_ref))``,
        ``s²_ref`` the observations' mean 1/d², so their overall level stays.  None while
        fewer than :data:`FALLOFF_MIN_BINS` bins have :data:`FALLOFF_MIN_COUNT` observations.
        """
        record = self._falloff_record()
        return None if record is None else self._falloff_slope(*record)

    @torch.no_grad()
    def _falloff_at_bragg(self, max_images: int = FALLOFF_BRAGG_IMAGES
                          ) -> tuple[np.ndarray, np.ndarray]:
        """The fall-off record of ``falloff_at_bragg``: sums of the scale network's log
        location with every reflection put on its Bragg condition
        (:meth:`VariationalMergingModel.scale_distribution` ``at_bragg``), and their counts,
        per resolution bin, over up to ``max_images`` stored images spread evenly through
        the store (rejected ones left out).  Read at each snapshot, not while training."""
        sums = np.zeros(FALLOFF_BINS)
        counts = np.zeros(FALLOFF_BINS)
        n = self.store.n_images
        if n == 0:
            return sums, counts
        ids = np.unique(np.linspace(0, n - 1, min(n, max_images)).round().astype(np.int64))
        ids = ids[~self.store.image_rejected[ids]]
        model = self.trainer.model
        was_training = model.training
        model.eval()
        try:
            for lo in range(0, ids.size, 64):
                b = self.store.batch(ids[lo:lo + 64])
                loc = model.scale_distribution(b, at_bragg=True)[2].double().cpu().numpy()
                inv_d2 = b.metadata[:, Column.INV_D2].double().cpu().numpy()
                bins = np.clip(self._falloff_position(np.maximum(inv_d2, 0.0)).astype(np.int64),
                               0, FALLOFF_BINS - 1)
                ok = np.isfinite(loc)
                sums += np.bincount(bins[ok], loc[ok], FALLOFF_BINS)
                counts += np.bincount(bins[ok], minlength=FALLOFF_BINS)
        finally:
            model.train(was_training)
        return sums, counts

    def _wilson_due(self, frozen: bool) -> bool:
        """Whether Σ is to be (re)set now: provisional once enough is stored, final at freeze."""
        if self.sigma_stage == 0:
            return frozen or self._images_everywhere() >= self.config.wilson_min_images
        return self.sigma_stage == 1 and frozen

    def _images_everywhere(self) -> int:
        """Images stored for this merge (all ranks' for a data-parallel one)."""
        return self.store.n_images

    def _update_wilson_sigma(self, *, final: bool) -> None:
        """Give the prior the data's resolution fall-off (Σ per row, standardised).

        With a flat Σ the scale network would have to absorb the whole fall-off and the
        likelihood cannot tell the two apart: amplitudes come out flattened.  Rows never
        observed restart at the new Wilson mean.  Final once the standardiser freezes, so
        the parameters keep one meaning from then on.
        """
        sigma = self.store.wilson_sigma()
        if sigma is None:
            return
        scale = self.trainer.standardizer.intensity_scale()
        reset = self.store.obs_count[0] == 0 if self.sigma_stage else np.ones(sigma.shape, bool)
        start = None
        if self.config.data_start and self.store.n_conditions == 1 and np.any(reset):
            start = self._data_start(sigma, np.nonzero(reset)[0])
        self.trainer.set_wilson_sigma(sigma / scale, reset=reset, start=start)
        #: the Wilson plot in the stored intensities' units, for rows' data starts
        self._wilson_raw = sigma
        self.sigma_stage = 2 if final else 1
        # the misfit test compares with the Wilson prior: meaningful once Σ is final
        self.trainer.model.reject_images = self.config.reject_misfit_images and final

    def _data_start(self, sigma: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """``(3, len(rows))`` each row's start as a multiple of its Wilson mean amplitude,
        per table (all images, half 1, half 2).

        ``√J`` with ``J = k·(n·Ê² + w)/(n + w) + (1 − k)``: ``Ê² = ⟨I⟩ / εΣ``, the mean of
        the ``n`` raw intensities of the row and its Bijvoet mate in that table over the
        Wilson plot at their resolution (``sigma``, raw units; negative means count as 0),
        ``w`` = :data:`DATA_START_WEIGHT`, and ``k = Z² / (Z² + Z₀²)`` with ``Z`` the
        I/σ(I) of the pair's inverse-variance mean (a half's: ``Z²`` times its share of the
        observations) and ``Z₀`` = :data:`DATA_START_Z`: rows their data pin down start
        there, rows the data barely see keep the Wilson start (whose pull an unfinished
        merge keeps as a useful shrinkage).  The mates start
        alike: their difference is left to the merge, as the prior leaves it.  Rows without
        observations get 1."""
        st = self.store
        pair = self._bijvoet_pairs()
        n_pairs = int(pair.max()) + 1

        def pooled(values: np.ndarray) -> np.ndarray:
            return np.bincount(pair, weights=values, minlength=n_pairs)[pair][rows]

        eps = self.space.epsilon[rows].astype(np.float64)
        wilson = eps * sigma[rows].astype(np.float64)
        sums = np.stack([pooled(st.sum_i), pooled(st.sum_i_half[0]), pooled(st.sum_i_half[1])])
        n = np.stack([pooled(st.obs_count[t].astype(np.float64)) for t in range(3)])
        sw, swi = pooled(st.sum_w), pooled(st.sum_wi)
        with np.errstate(invalid="ignore", divide="ignore"):
            e2 = np.where(n > 0, sums / np.maximum(n, 1.0) / wilson, 0.0)
            # each table's own I/σ: a half holds its share of the observations
            z2 = (np.where(sw > 0, np.square(swi) / sw, 0.0)
                  * np.where(n[0] > 0, n / np.maximum(n[0], 1.0), 0.0))
        e2 = np.clip(np.nan_to_num(e2, nan=0.0, posinf=0.0), 0.0, None)
        k = z2 / (z2 + DATA_START_Z ** 2)
        j = (n * e2 + DATA_START_WEIGHT) / (n + DATA_START_WEIGHT)
        return np.sqrt(k * j + (1.0 - k))

    def assign_settings(self) -> float | None:
        """Put every stored image in one indexing setting by consensus of the data alone
        (:func:`~streamvi.merging.ambiguity.consensus_settings`), before the model decides.

        In a space group with twin laws the merge's own per-visit choice starts from a
        posterior that prefers no setting; on sparse patterns it may never leave the 50/50
        mixture.  The trainer keeps each image's assigned setting unless the merge explains
        another one clearly better (:data:`~streamvi.merging.model.merging.SETTING_HYSTERESIS`).

        Returns
        -------
        float or None
            The assignment's confidence (estimated share of images placed right), None in a
            group without an ambiguity or with no image stored.
        """
        if self.space.n_ops == 1 or self.store.n_images == 0:
            return None
        from streamvi.merging.ambiguity import consensus_settings

        result = consensus_settings(self.store, seed=self.trainer_config.seed)
        n = self.store.n_images
        self.store.set_ops(torch.arange(n), torch.from_numpy(result.ops[:n]).to(torch.int64))
        self.store.apply_settings()
        self.trainer.model.setting_hysteresis = SETTING_HYSTERESIS
        log.info("indexing settings by consensus: %d images, confidence %.3f (split halves "
                 "agree on %.3f), %.1f s", n, result.confidence, result.split_agreement,
                 result.seconds)
        return float(result.confidence)

    @torch.no_grad()
    def row_estimates(self, *, iterations: int = 3, dof: float = 32.0,
                      images: np.ndarray | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Every row's intensity by weighted least squares given the current image scales.

        With each observation's expected scale ``s = E[scale]`` from the network as it
        stands, ``Ĵ = Σ w s I / Σ w s²`` and its variance ``1/Σ w s²``, with ``w = 1/v`` times
        Student-t weights (``dof``) of the residuals against the previous iterate, starting
        from the merge as it stands (outliers count little); ``v = σ(I)² + Var[s]·Ĵ²`` adds
        the scale distribution's own spread.  Misfit images are left out; each half table
        from its own images.  With ``images`` (sorted store ids) only their observations are
        read: exact for the rows all of whose observations they hold (the network's pass
        over every observation is most of the cost).

        Returns
        -------
        (torch.Tensor, torch.Tensor, torch.Tensor)
            ``(n_tables * n_rows,)`` float64 ``Ĵ``, its variance (standardised units; +inf
            where a row has no observation) and the number of observations, on the training
            device.
        """
        self._one_condition("row_estimates")
        model = self.trainer.model
        post = model.posterior
        n_rows, n_tables = post.n_rows, post.n_tables
        was_training = model.training
        model.eval()
        parts: list[tuple[torch.Tensor, ...]] = []
        ids = np.arange(self.store.n_images) if images is None else np.asarray(images)
        for lo in range(0, ids.size, 512):
            b = self.store.batch(ids[lo:lo + 512])
            iobs, sigiobs, loc, scale = model.scale_distribution(b)
            s = torch.exp(loc + 0.5 * scale * scale)
            # the scale's own uncertainty, Var[s] of the log-normal, as a share of s²
            rel_var = torch.expm1(scale * scale)
            flats, keep = self._observation_rows(b)
            keep = keep.to(iobs.device)
            for flat_rows in flats:
                parts.append((flat_rows[keep], s[keep].double(),
                              iobs[keep].double(), sigiobs[keep].double(),
                              rel_var[keep].double()))
        model.train(was_training)
        size = n_tables * n_rows
        if not parts:
            inf = torch.full((size,), float("inf"), dtype=torch.float64, device=self.device)
            return torch.zeros_like(inf), inf, torch.zeros_like(inf)
        flat = torch.cat([p[0] for p in parts])
        s, i_obs, sig, rel_var = (torch.cat([p[k] for p in parts]) for k in (1, 2, 3, 4))
        # the first weights from the residuals against the merge as it stands, so that a
        # zinger on a row of few observations counts little from the start
        j_hat = torch.cat([post.intensity_moments(t)[0] for t in range(n_tables)]).to(s.device)
        for _ in range(max(1, iterations)):
            pred = s * j_hat[flat].clamp_min(0.0)
            # σ(I)² and the spread that the scale's uncertainty gives the prediction: where
            # the network is unsure (reflections unlike those it learnt from) the
            # observation counts less
            var = torch.square(sig) + rel_var * torch.square(pred)
            w = (dof + 1.0) / (dof + torch.square(i_obs - pred) / var) / var
            sws2 = torch.zeros(size, dtype=torch.float64, device=s.device).index_add_(
                0, flat, w * s * s)
            swsi = torch.zeros_like(sws2).index_add_(0, flat, w * s * i_obs)
            j_hat = swsi / sws2.clamp_min(1e-300)
        var_j = torch.where(sws2 > 0, 1.0 / sws2.clamp_min(1e-300),
                            torch.full_like(sws2, float("inf")))
        count = torch.zeros_like(sws2).index_add_(0, flat, torch.ones_like(s))
        return j_hat, var_j, count

    def _observation_rows(self, b) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Of a batch: the flat row (``table * n_rows + row``) of every observation in each
        table it counts in (all images' table, then its half's), in the setting chosen for
        its image, and which observations count (misfit images left out)."""
        post = self.trainer.model.posterior
        n_rows, n_tables = post.n_rows, post.n_tables
        rows = b.asu_id[0]
        if b.image_op is not None and b.n_ops > 1:
            rows = b.asu_id.gather(0, b.image_op[b.image_index].unsqueeze(0))[0]
        keep = ~self.store._rejected_t.index_select(0, b.image_id.to(self.device))
        keep = keep.to(rows.device)[b.image_index]
        tables = [torch.zeros_like(rows)]
        if n_tables > 1:
            tables.append(1 + b.half[b.image_index])
        return [t * n_rows + rows for t in tables], keep

    @torch.no_grad()
    def _rows_few_observations(self, least: int, most: int
                               ) -> tuple[np.ndarray, torch.Tensor]:
        """The images that hold an observation of a Bijvoet pair with ``least`` to ``most``
        observations in some table (misfit images left out, as :meth:`row_estimates`
        counts), and every row's count, without the network: the rows
        ``refresh_rows(max_observations=…)`` may restart and where their data lie."""
        post = self.trainer.model.posterior
        n_rows, n_tables = post.n_rows, post.n_tables
        pair = torch.from_numpy(self._bijvoet_pairs()).to(self.device)
        n_pairs = int(pair.max()) + 1
        ids = np.arange(self.store.n_images)

        def batches():
            # two passes over the store (cheap without the network), so that no per-
            # observation array of the whole store is held
            for lo in range(0, ids.size, 512):
                b = self.store.batch(ids[lo:lo + 512])
                flats, keep = self._observation_rows(b)
                image = b.image_id.to(self.device)[b.image_index][keep.to(self.device)]
                yield [f.to(self.device)[keep.to(self.device)] for f in flats], image

        count = torch.zeros(n_tables * n_rows, dtype=torch.float64, device=self.device)
        for flats, _ in batches():
            for flat_rows in flats:
                count.index_add_(0, flat_rows, torch.ones_like(flat_rows, dtype=torch.float64))
        candidate = torch.zeros(n_tables * n_rows, dtype=torch.bool, device=self.device)
        for t in range(n_tables):
            n_pair = torch.zeros(n_pairs, dtype=torch.float64, device=self.device).index_add_(
                0, pair, count[t * n_rows:(t + 1) * n_rows])[pair]
            candidate[t * n_rows:(t + 1) * n_rows] = (n_pair >= least) & (n_pair <= most)
        hit = [torch.unique(image[candidate[flat_rows]])
               for flats, image in batches() for flat_rows in flats]
        return torch.unique(torch.cat(hit)).cpu().numpy(), count

    @torch.no_grad()
    def refresh_rows(self, *, min_observations: int = REFRESH_MIN_OBSERVATIONS,
                     min_z: float = REFRESH_MIN_Z,
                     max_observations: int | None = None) -> int:
        """Restart every observed row at its merge given the current image scales.

        The alternation of scaling programs: every row's intensity is re-estimated by
        :meth:`row_estimates`, and the row restarts at the posterior mean of ``F`` under the
        Wilson prior (French & Wilson's treatment of intensities, acentric form).  A row
        moves by about one learning rate per update; this puts every row within its error
        of where the objective will take it, so the rest of the merge refines instead of
        travelling (docs/model.md).  Bijvoet mates are re-estimated together and
        keep the ratio F(+)/F(−) the merge had learnt: a difference estimated from each
        mate's data alone carries their full noise, which the prior had been shrinking.
        Rows with fewer than ``min_observations`` (per table, the mates together) keep their
        values: their estimate rests on the network's scales for a handful of reflections,
        often unlike any it learnt from (the lowest orders, near the beam stop).  And only
        pairs whose merge lies more than ``min_z`` standard errors from their estimate are
        restarted: the refresh is for rows still travelling.  With ``max_observations``
        only pairs with at most that many observations are (the rows updated too rarely to
        travel by themselves).  Restarting every row moved the
        merge's weakest shells as well (the scale network re-balances after a restart, and
        rows the data barely pin down cannot follow): in the 1.5 Å case of the quality
        matrix the top shell fell from 0.736 to 0.677.

        Returns
        -------
        int
            Rows restarted (counted once over the tables).
        """
        self._one_condition("refresh_rows (refresh_growth, refresh_idle_steps)")
        model = self.trainer.model
        post = model.posterior
        n_rows, n_tables = post.n_rows, post.n_tables
        if self.store.n_images == 0:
            return 0
        if max_observations is None:
            j_hat, var_j, count = self.row_estimates()
        else:
            # the network read over the images that hold such rows only: exact for them
            # (all their observations are there), and most of the cost saved where they are
            # few (a merge of 2,000 images, 12 s a refresh)
            images, count = self._rows_few_observations(min_observations, max_observations)
            j_hat, var_j, _ = self.row_estimates(images=images)
        pair = torch.from_numpy(self._bijvoet_pairs()).to(j_hat.device)
        n_pairs = int(pair.max()) + 1
        wilson = model.prior.variance.double()
        restarted = torch.zeros(n_rows, dtype=torch.bool, device=j_hat.device)
        for t in range(n_tables):
            j, v = j_hat[t * n_rows:(t + 1) * n_rows], var_j[t * n_rows:(t + 1) * n_rows]
            n_pair = torch.zeros(n_pairs, dtype=torch.float64, device=v.device).index_add_(
                0, pair, count[t * n_rows:(t + 1) * n_rows])[pair]
            seen = torch.isfinite(v) & (n_pair >= min_observations)
            if max_observations is not None:
                seen &= n_pair <= max_observations
            if not bool(seen.any()):
                continue
            w = torch.where(seen, 1.0 / v, torch.zeros_like(v))
            sw = torch.zeros(n_pairs, dtype=torch.float64, device=w.device).index_add_(0, pair, w)
            swj = torch.zeros_like(sw).index_add_(0, pair, w * torch.where(seen, j, 0.0))
            var_p = (1.0 / sw.clamp_min(1e-300))[pair]
            j_p = (swj / sw.clamp_min(1e-300))[pair]
            wil_p = (torch.zeros_like(sw).index_add_(0, pair, wilson)
                     / torch.bincount(pair, minlength=n_pairs).double())[pair]
            f_pair, sd_pair = _wilson_posterior_amplitude(j_p, var_p, wil_p)
            # how far the pair's merge (its mean intensity) lies from the estimate
            e_j, sd_j = post.intensity_moments(t)
            e_j, var_q = e_j.to(w.device), torch.square(sd_j.to(w.device))
            n_mates = torch.bincount(pair, minlength=n_pairs).double()
            merged_j = (torch.zeros_like(sw).index_add_(0, pair, e_j) / n_mates)[pair]
            merged_var = (torch.zeros_like(sw).index_add_(0, pair, var_q)
                          / torch.square(n_mates))[pair]
            z = (j_p - merged_j) / torch.sqrt(var_p + merged_var)
            seen &= z.abs() > min_z
            # each mate's share of the pair's amplitude, as the merge has it now
            mean_f = post.moments(t)[0].to(w.device)
            pair_f = (torch.zeros_like(sw).index_add_(0, pair, mean_f)
                      / torch.bincount(pair, minlength=n_pairs).double())[pair]
            share = torch.where(pair_f > 0, mean_f / pair_f.clamp_min(1e-300),
                                torch.ones_like(mean_f))
            rows = torch.nonzero(seen).squeeze(1)
            post.reset_table_rows(t, rows, (f_pair * share)[rows].float(),
                                  sd_pair[rows].float())
            self.trainer.forget_rows(post.flat_index(t, rows))
            restarted |= seen
        self.refreshed_images = self.store.n_images
        self.refreshes += 1
        log.info("rows restarted at their merge given the scales (refresh %d): %d rows, "
                 "%d images", self.refreshes, int(restarted.sum()), self.store.n_images)
        return int(restarted.sum())

    def _bijvoet_pairs(self) -> np.ndarray:
        """``(n_rows,)`` one id per ASU index, shared by F(+) and F(−) rows (cached)."""
        if getattr(self, "_pairs", None) is None:
            self._pairs = np.unique(self.space.hkl, axis=0, return_inverse=True)[1].reshape(-1)
        return self._pairs

    def steps_per_epoch(self) -> int:
        """Steps that visit, on average, every stored image once."""
        return max(1, int(np.ceil(self.store.n_images / self.config.batch_images)))

    def train(self, n_steps: int, callback=None) -> StepReport | None:
        """Run ``n_steps`` steps, calling ``callback(report)`` after each."""
        report = None
        for _ in range(n_steps):
            report = self.step()
            if report is None:
                break
            if callback is not None:
                callback(report)
        return report

    def geometry_summary(self) -> dict | None:
        """How far the refinement has moved the images' reported geometry (None while off).

        Returns
        -------
        dict or None
            ``refined``: images updated at least once; over all stored images (0 for those
            not refined yet; NaN with none stored), ``rotation_rms_deg``: RMS rotation angle,
            degrees, and ``axis_change_rms``: RMS relative change of the lengths of a*, b*,
            c*.  (Their mean is not given: a bias common to every image's cell does not show
            in it, the network absorbs it; docs/model.md, "Each image's orientation and cell
            are refined".)
        """
        sigma = self.trainer.model.geometry_sigma
        if sigma is None:
            return None
        refined, squares = self.store.geometry_totals()
        n = self.store.n_images
        out = {"refined": refined, "rotation_rms_deg": float("nan"),
               "axis_change_rms": [float("nan")] * 3}
        if n:
            out["rotation_rms_deg"] = float(np.degrees(sigma[0] * np.sqrt(squares[:3].sum() / n)))
            out["axis_change_rms"] = [float(x) for x in sigma[1] * np.sqrt(squares[3:6] / n)]
        return out

    # ------------------------------------------------------------------ output

    def snapshot(self, history: list[str] | None = None, *,
                 condition: str | None = None) -> MergeSnapshot:
        """Freeze the current posterior and compute the shell statistics.

        With several conditions, of ``condition`` (required): its three tables, its
        observation counts and its ⟨I/σ⟩; the resolution-trend correction is the shared
        scales' and applies to every condition alike.
        """
        self.store.apply_settings()
        c = self._condition_index(condition)
        tables = {name: self.trainer.posterior_table(3 * c + i)
                  for i, name in enumerate(TABLE_NAMES)}
        stored = self.store.condition_obs_count[c].copy()
        obs = self._merged_obs_count(c)
        sp = self.space
        expected_i = self.trainer.model.prior.variance.double().cpu().numpy()
        correction = self.falloff_factor() if self.config.recentre_falloff else None
        falloff_b = None
        if correction is not None:
            factor, b_record = correction
            root = np.sqrt(factor)
            for table in tables.values():
                for col, f in (("F", root), ("SIGF", root), ("I", factor), ("SIGI", factor)):
                    table[col] = (table[col] * f).astype(table[col].dtype, copy=False)
            expected_i = expected_i * factor
            # I ∝ exp(−B/2 · 1/d²): the B the amplitudes gained (the slope's, when binned)
            falloff_b = b_record
        stats = shell_statistics(
            hkl=sp.hkl, d=sp.d, centric=sp.centric, friedel=sp.friedel, obs_count=obs,
            i_full=tables["all"]["I"], sigi_full=tables["all"]["SIGI"],
            i_half=(tables["half1"]["I"], tables["half2"]["I"]),
            f_half=(tables["half1"]["F"], tables["half2"]["F"]),
            anomalous=sp.anomalous, n_shells=self.config.n_shells,
            # ⟨I/σ⟩ of what the merge took, as N: the misfit images' observations left out
            i_over_sigma=self.store.condition_i_over_sigma(c, self._left_out()),
            expected_i=expected_i)
        self._snapshot_id += 1
        n_images, n_reflections = self.store.n_images, self.store.n_reflections
        history = list(history or [])
        if self.store.n_conditions > 1:
            n_images = int(self.store.condition_images()[c])
            n_reflections = int(obs[0].sum())
            history.append(f"condition {self.store.conditions[c]} of "
                           f"{', '.join(self.store.conditions)}")
            coupling = self.trainer.model.coupling
            if coupling is not None and c != coupling.reference:
                # MTZ history lines hold 80 characters: two decimals per shell
                r = self.coupled_correlations()[self.store.conditions[c]]
                history.append(f"prior given {self.store.conditions[coupling.reference]}, "
                               "r by shell: " + " ".join(f"{x:.2f}" for x in r)[:50])
        partiality = self.trainer.model.partiality
        if partiality is not None:
            a, b, eta = partiality.factors
            history.append(f"geometric partiality: profile radius x {a:.3f}, bandwidth "
                           f"x {b:.3f}, mosaic {eta:.4f} deg"[:80])
        prior_r = self.prior_correlation()
        if prior_r is not None and c == self.trainer.model.coupling.reference:
            history.append(f"prior {self.prior_name}"[:80])
            history.append("prior r by shell: " + " ".join(f"{x:.2f}" for x in prior_r)[:60])
        snap = MergeSnapshot(
            snapshot_id=self._snapshot_id, time=time.time(), space=sp, tables=tables,
            obs_count=obs, n_images=n_images,
            n_reflections=n_reflections, step=self.trainer.step,
            stats=stats, falloff_b=falloff_b, stored_obs_count=stored,
            delta_gain=self._delta_gain(c), history=history + (
                [] if falloff_b is None else
                # MTZ history lines hold 80 characters
                [f"scales' resolution trend moved to F: B {falloff_b:+.2f} A^2 "
                 "(docs/model.md)"]))
        if self.reference is not None:
            snap, choice = align_snapshot(snap, self.reference)
            if choice is not None and (self.setting_choice is None
                                       or choice.op_index != self.setting_choice.op_index):
                log.info("setting of %s: %s (CC(F) per operator %s, %d reflections in common)",
                         self.reference.name, choice.op,
                         ", ".join(f"{c:.3f}" for c in choice.cc), choice.n_common)
            self.setting_choice = choice
        return snap

    def _delta_gain(self, condition: int) -> np.ndarray | None:
        """``(2, n_rows)`` gains of ΔF of ``condition`` against the coupled prior's reference
        (:attr:`MergeSnapshot.delta_gain`), from the published posterior's σ; None for the
        reference itself or without a coupling between conditions."""
        model = self.trainer.model
        coupling = model.coupling
        if (coupling is None or coupling.n_conditions < 2
                or condition == coupling.reference):
            return None
        post, average = model.posterior, self.trainer.posterior_average
        _, sd_ref = post.moments(3 * coupling.reference, average)
        _, sd = post.moments(3 * condition, average)
        r = coupling.correlation().detach()[condition, coupling.row_shell]
        gains = difference_gains(sd_ref.cpu().numpy(), sd.cpu().numpy(),
                                 model.prior.variance.double().cpu().numpy(),
                                 model.prior.centric.cpu().numpy(), r.double().cpu().numpy())
        return np.stack(gains)

    def _merged_obs_count(self, condition: int) -> np.ndarray:
        """``(3, n_rows)`` observations the merge takes, per row of one condition: the
        store's counts less those of images now left out as misfits (the likelihood drops
        them).  A row whose every observation is such an image's is the prior alone, not a
        measurement: with no observation counted it is left out of the published tables
        (the misindexed images' mislabelled reflections made such rows)."""
        obs = self.store.condition_obs_count[condition].copy()
        left_out = self._left_out()
        if left_out is not None:
            obs -= left_out.obs_count[condition]
        return obs

    def _left_out(self) -> RejectedStatistics | None:
        """The row statistics of the images now left out as misfits
        (:meth:`~streamvi.merging.store.ReflectionStore.rejected_statistics`), read once for
        every condition's snapshot of a publish; None while no image is left out."""
        if not self.store.n_rejected:
            return None
        key = (self.store.verdicts_version, self.store.n_images)
        if self._rejected_counts is None or self._rejected_counts[0] != key:
            self._rejected_counts = (key, self.store.rejected_statistics())
        return self._rejected_counts[1]

    def _condition_index(self, condition: str | None) -> int:
        """Table-set index of ``condition`` (0 with one condition)."""
        names = self.store.conditions
        if condition is None:
            if self.store.n_conditions > 1:
                raise ValueError(f"this merge has conditions {', '.join(names)}: name one "
                                 "(snapshot(condition=...), or condition_snapshots())")
            return 0
        if names is None or condition not in names:
            raise ValueError(f"condition {condition!r} is not one of this merge's "
                             f"({', '.join(names or ('none: one unlabelled condition',))})")
        return names.index(condition)

    def coupled_correlations(self) -> dict[str, list[float]]:
        """The coupled prior's learnt correlation ``r`` per resolution shell (low to high),
        for every condition but the reference; empty without a coupling."""
        coupling = self.trainer.model.coupling
        if coupling is None or coupling.n_conditions < 2:
            return {}
        r = coupling.correlation().detach().cpu().numpy()
        return {name: [float(x) for x in r[i]] for i, name in enumerate(self.store.conditions)
                if i != coupling.reference}

    def prior_correlation(self) -> list[float] | None:
        """The learnt correlation ``r`` per resolution shell (low to high) between the
        reference condition (the only one, without conditions) and the prior data set;
        None without one."""
        coupling = self.trainer.model.coupling
        if coupling is None or coupling.fixed is None:
            return None
        r = coupling.correlation().detach().cpu().numpy()[coupling.reference]
        return [float(x) for x in r]

    def condition_snapshots(self, history: list[str] | None = None
                            ) -> dict[str, MergeSnapshot]:
        """A :meth:`snapshot` of every condition, by name, in table order."""
        if self.store.conditions is None:
            raise ValueError("this merge has no named conditions: use snapshot()")
        return {name: self.snapshot(history, condition=name)
                for name in self.store.conditions}

    # ------------------------------------------------------------------ checkpoints

    def state_dict(self) -> dict:
        """Trainer, scheduler, snapshot counter and each image's indexing setting and
        geometry refinement (the store itself is rebuilt from the spool, in the same order)."""
        state = {"trainer": self.trainer.state_dict(), "scheduler": self.scheduler.state_dict(),
                 "snapshot_id": self._snapshot_id, "space": self.space.to_dict(),
                 "sigma_stage": self.sigma_stage,
                 "image_geometry": self.store.geometry_state(),
                 "falloff": self._falloff.cpu().clone(),
                 "refreshed_images": self.refreshed_images,
                 "conditions": (None if self.store.conditions is None
                                else list(self.store.conditions)),
                 "wilson_raw": (None if self._wilson_raw is None
                                else torch.from_numpy(np.asarray(self._wilson_raw).copy()))}
        if self.space.n_ops > 1:
            self.store.apply_settings()
            state["image_ops"] = torch.from_numpy(
                self.store.image_op[: self.store.n_images].copy())
        return state

    def load_state_dict(self, state: dict) -> None:
        saved, mine = state.get("conditions"), self.store.conditions
        if "conditions" in state and (saved is None) != (mine is None):
            def what(names):
                return "without conditions" if names is None else \
                    f"of the conditions {', '.join(names)}"
            raise ValueError(f"the checkpoint is of a merge {what(saved)}; this one is "
                             f"{what(mine)}: start with the conditions it was written with, or "
                             "in a fresh out_dir")
        if saved is not None and list(mine[:len(saved)]) != list(saved):
            # the store was rebuilt from the spool, new conditions taking their table sets
            # in order of arrival: they must be the sets the checkpoint trained
            raise ValueError(f"the checkpoint's conditions are {', '.join(saved)} in table "
                             f"order; the replayed spool gives {', '.join(mine)}")
        self.trainer.load_state_dict(state["trainer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self._snapshot_id = int(state["snapshot_id"])
        self.sigma_stage = int(state.get("sigma_stage", 0))
        raw = state.get("wilson_raw")
        self._wilson_raw = None if raw is None else np.asarray(raw, dtype=np.float64)
        self.refreshed_images = state.get("refreshed_images")
        self.trainer.model.reject_images = (self.config.reject_misfit_images
                                            and self.sigma_stage == 2)
        if state.get("falloff") is not None:
            self._falloff.copy_(state["falloff"].to(self._falloff.device))
        geometry = state.get("image_geometry")
        if geometry is not None:
            # images spooled after the checkpoint start unrefined
            n = min(int(geometry.shape[0]), self.store.n_images)
            self.store.set_geometry(torch.arange(n), geometry[:n])
        ops = state.get("image_ops")
        if ops is not None and self.space.n_ops > 1:
            # images spooled after the checkpoint keep the identity until their first visit
            n = min(int(ops.shape[0]), self.store.n_images)
            self.store.set_ops(torch.arange(n), ops[:n].to(torch.int64))
            self.store.apply_settings()

