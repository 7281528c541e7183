"""Still shots → integrated reflections → :class:`~streamvi.wire.CrystalMessage`.

Per image (all reflections at once, no Python loop per reflection): a random crystal
orientation, cell and profile radius, a SASE photon energy, the Ewald offset and partiality
(Gaussian by default; ``SimulationConfig.partiality_profile``) of every lattice point
within 1/dmin, the detector position of those recorded,
then photon-counting integration (peak disc minus background annulus, read noise, a
proportional gain error) on top of a per-image scale and relative B.  A few reflections get
zingers; a few images are indexed off by one.  Intensities are as after polarisation
correction; stills need no Lorentz factor beyond the partiality.  Image ``i`` draws from its
own random stream ``SeedSequence(seed, (1, i))``.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, replace
from typing import Any, Iterator, Mapping

import gemmi
import numpy as np

from streamvi.symmetry import reindex, twin_operators
from streamvi.wire import CrystalMessage
from streamvi_sim.conditions import condition_truths, image_condition
from streamvi_sim.config import SimulationConfig
from streamvi_sim.geometry import (Detector, HC_EV_A, cell_of_reciprocal_basis,
                                   excitation_error, profile_partiality, profile_reach,
                                   profile_width, random_rotation, reciprocal_basis,
                                   small_rotation, xsphere_partiality)
from streamvi_sim.truth import Truth, simulate_structure

#: Share of the ASU (highest resolution first) whose mean |F|² sets the flux.
TOP_SHELL_FRACTION = 0.10


@dataclass
class ImageTruth:
    """What really happened on one image (for tests and benchmarks, never for the model).

    Attributes
    ----------
    index
        Image number.
    U
        Crystal orientation (rotation, crystal Cartesian → lab).
    cell
        True cell of this crystal, Å and degrees.
    photon_energy_eV, profile_radius, scale, b_image, background_scale
        True beam energy (eV), profile radius (Å⁻¹), image scale, relative B (Å²) and
        background multiplier.
    misindexed
        Whether the reported indices are shifted by ``index_shift``.
    index_shift
        ``(3,)`` int shift added to the true indices (zeros unless misindexed).
    hkl
        ``(n, 3)`` true indices of the reported rows.
    asu_index, friedel
        Row of the :class:`~streamvi_sim.Truth` table and +1/−1 for F(+)/F(−).
    excitation, partiality
        True Ewald offset (Å⁻¹) and partiality of each row.
    expected_photons
        Expected signal photons (before noise and outliers).
    outlier
        Rows given a spurious extra intensity.
    setting
        Index into :func:`streamvi.symmetry.twin_operators` of the setting the indices are
        reported in (0: the true one; only with ``indexing_ambiguity``).
    intensity_factor
        Expected reported intensity (ADU) per electron² of the true |F|² of each row:
        gain × flux × image scale × exp(−2(B_overall + B_image)s²) × partiality.  Dividing
        ``I`` by it is what a merge that knew every scale and partiality would do.
    """

    index: int
    U: np.ndarray
    cell: tuple[float, ...]
    photon_energy_eV: float
    profile_radius: float
    scale: float
    b_image: float
    background_scale: float
    misindexed: bool
    index_shift: np.ndarray
    hkl: np.ndarray
    asu_index: np.ndarray
    friedel: np.ndarray
    excitation: np.ndarray
    partiality: np.ndarray
    expected_photons: np.ndarray
    outlier: np.ndarray
    setting: int = 0
    intensity_factor: np.ndarray | None = None
    #: index into ``SimulationConfig.conditions`` of the image's condition (0 without them)
    condition: int = 0


#: the copied image header that carries a simulated image's condition index, as
#: indexamajig's ``--copy-header`` writes an event code (``streamvi send --condition-field``)
PUMP_CODE_HEADER = "header/int//sim/pump_code"


@dataclass
class _Shot:
    """Random draws of one image: true crystal and beam, and the indexer's errors."""

    U: np.ndarray
    cell: tuple[float, ...]
    energy: float
    radius: float
    scale: float
    b_image: float
    bg_scale: float
    misindexed: bool
    shift: np.ndarray
    rot_err: np.ndarray
    cell_rep: tuple[float, ...]
    setting: int = 0


def detector_of(config: SimulationConfig) -> Detector:
    """The detector described by ``config``."""
    return Detector(distance_m=config.detector_distance_m, pixel_size_m=config.pixel_size_m,
                    shape=tuple(config.detector_shape),  # type: ignore[arg-type]
                    beam_center_px=tuple(config.beam_center_px),  # type: ignore[arg-type]
                    beamstop_radius_m=config.beamstop_radius_m)


def image_name(config: SimulationConfig, index: int) -> str:
    """The ``image`` key of image ``index`` (one file per frame, as CrystFEL names them)."""
    return f"{config.run}_{index:06d}.h5"


class Simulator:
    """Simulates images of one beamtime; image ``i`` depends only on ``(seed, i)``.

    Parameters
    ----------
    config
        The experiment.
    truth
        Its structure (from :func:`~streamvi_sim.simulate_structure`); built if omitted.
    """

    def __init__(self, config: SimulationConfig, truth: Truth | None = None):
        self.config = config
        self.truth = truth if truth is not None else simulate_structure(config)
        self.detector = detector_of(config)
        #: the structure of each condition, by name (empty without conditions; the first
        #: is :attr:`truth`)
        self.condition_truths = condition_truths(config, self.truth)
        self._p1_lattice()
        #: Reindexing operators an indexer may report an image in (identity first).
        self.settings = (twin_operators(config.space_group, config.cell)
                         if config.indexing_ambiguity else [np.eye(3, dtype=np.int32)])
        top = np.argsort(self.truth.d)[: max(1, int(TOP_SHELL_FRACTION * len(self.truth)))]
        #: Photons per electron² of |F|²: the top shell's mean gives ``top_shell_photons``.
        falloff = np.exp(-0.5 * config.b_overall / self.truth.d[top] ** 2)
        self.flux = config.top_shell_photons / float(np.mean(self.truth.I_mean[top] * falloff))

    def _p1_lattice(self) -> None:
        """Every lattice point within dmin (P1), with its ASU row and Friedel sign."""
        sg = gemmi.SpaceGroup(self.truth.space_group)
        rots = np.unique(np.array([op.rot for op in sg.operations().sym_ops]), axis=0)
        rots = rots // gemmi.Op.DEN
        asu = self.truth.hkl.astype(np.int64)
        n = asu.shape[0]
        # Equivalents of h are h·R (gemmi's apply_to_hkl); Friedel mates are their negatives.
        equiv = np.concatenate([asu @ r for r in rots])
        hkl = np.concatenate([equiv, -equiv])
        row = np.tile(np.arange(n), 2 * len(rots))
        sign = np.repeat(np.array([1, -1], dtype=np.int8), len(rots) * n)
        hkl, first = np.unique(hkl, axis=0, return_index=True)
        self.hkl = hkl.astype(np.int32)
        self.asu_index = row[first]
        self.friedel = sign[first]
        self._hkl_f = hkl.astype(np.float64)
        h, k, l = self._hkl_f.T  # noqa: E741
        self._products = np.stack([h * h, k * k, l * l, h * k, h * l, k * l])
        self._intensity = self._p1_intensity(self.truth)
        #: the P1 intensities of each condition (the light ones differ from the dark)
        self._condition_intensity = [self._p1_intensity(t)
                                     for t in self.condition_truths.values()]

    def _p1_intensity(self, truth: Truth) -> np.ndarray:
        return np.where(self.friedel > 0, truth.I_plus[self.asu_index],
                        truth.I_minus[self.asu_index])

    def _near_ewald(self, a_star: np.ndarray, b_star: np.ndarray, wavelength: float,
                    cut: float) -> np.ndarray:
        """Rows that may lie within ``cut`` (Å⁻¹) of the Ewald sphere: a cheap superset.

        ``|k0 + q|² − k² = 2k·qz + |q|²`` and ``|e| ≥ |2k·qz + |q|²| / (2k + |q|max)``;
        |q|² comes from the metric tensor with precomputed index products (one matrix–
        vector product instead of all of q).
        """
        k = 1.0 / wavelength
        g = b_star.T @ b_star
        metric = np.array([g[0, 0], g[1, 1], g[2, 2], 2 * g[0, 1], 2 * g[0, 2], 2 * g[1, 2]])
        num = 2.0 * k * (self._hkl_f @ a_star[2]) + metric @ self._products
        qmax = 1.01 / self.config.dmin * (1.0 + 5.0 * self.config.cell_jitter)
        return np.nonzero(np.abs(num) < cut * (2.0 * k + qmax))[0]

    # ------------------------------------------------------------------------- images

    def image(self, index: int) -> tuple[CrystalMessage, ImageTruth]:
        """Simulate image ``index``: its message and what really happened."""
        c = self.config
        rng = np.random.default_rng(np.random.SeedSequence(c.seed, spawn_key=(1, index)))
        shot = self._draw_shot(rng)
        if len(self.settings) > 1:
            # from a stream of its own: with and without the ambiguity the images are the
            # same shots, photons and all, only their indices differ
            own = np.random.default_rng(np.random.SeedSequence(c.seed, spawn_key=(2, index)))
            shot.setting = int(own.integers(len(self.settings)))
        U, cell, energy, radius = shot.U, shot.cell, shot.energy, shot.radius
        scale, b_image, shift = shot.scale, shot.b_image, shot.shift
        lam = HC_EV_A / energy

        b_true = reciprocal_basis(cell)
        a_true = U @ b_true
        mosaic = math.radians(c.mosaicity_deg)
        near, q, e, q_norm, p = self._partialities(a_true, b_true, lam, radius, mosaic)
        s1 = q + np.array([0.0, 0.0, 1.0 / lam])
        fs, ss, on = self.detector.project(s1)
        if c.overprediction > 0:
            width = self.prediction_width(q_norm, lam, radius, mosaic)
            keep = (np.abs(e) <= c.overprediction * width) & on
        else:
            keep = (p >= c.partiality_min) & on
        rows = near[keep]
        q_norm, e, p, fs, ss = q_norm[keep], e[keep], p[keep], fs[keep], ss[keep]

        stol2 = 0.25 * q_norm ** 2
        # photons per electron² of |F|², then the signal (the same products in the same order)
        factor = self.flux * scale * np.exp(-2.0 * (c.b_overall + b_image) * stol2) * p
        condition = image_condition(c, index)
        intensity = (self._condition_intensity[condition] if self._condition_intensity
                     else self._intensity)
        signal = factor * intensity[rows]
        ring = c.water_ring_strength * np.exp(-0.5 * ((q_norm - 1.0 / c.water_ring_A)
                                                      / 0.012) ** 2)
        bg_px = c.background_photons * (1.0 + ring)
        iobs, sigiobs, peak, bg_est, outlier = self._integrate(rng, signal,
                                                               bg_px * shot.bg_scale)
        if c.fractional_error > 0:
            # a stream of its own: the photons stay those of the same image without it
            own = np.random.default_rng(np.random.SeedSequence(c.seed, spawn_key=(3, index)))
            iobs = iobs * (1.0 + c.fractional_error * own.normal(size=iobs.shape[0]))
        if c.sigma_scale != 1.0:
            sigiobs = sigiobs * c.sigma_scale

        hkl_true = self.hkl[rows]
        # The indexer's setting M maps true indices to reported ones (hkl' = M hkl); the
        # reported basis is A M⁻¹ so that every spot keeps its scattering vector.
        op = self.settings[shot.setting]
        hkl_rep = reindex(hkl_true, op) + shift
        ok = np.any(hkl_rep != 0, axis=1)
        a_rep = shot.rot_err @ U @ reciprocal_basis(shot.cell_rep)
        cell_rep = shot.cell_rep
        if shot.setting:
            a_rep = a_rep @ np.linalg.inv(op)
            cell_rep = cell_of_reciprocal_basis(a_rep)
        gain = c.adu_per_photon
        msg = CrystalMessage(
            run=c.run, image=image_name(c, index), crystal=0,
            h=hkl_rep[ok, 0].copy(), k=hkl_rep[ok, 1].copy(), l=hkl_rep[ok, 2].copy(),
            I=(gain * iobs[ok]).astype(np.float32), sigI=(gain * sigiobs[ok]).astype(np.float32),
            photon_energy_eV=float(energy),
            cell=tuple(float(x) for x in cell_rep),  # type: ignore[arg-type]
            astar=tuple(float(x) for x in a_rep[:, 0]),  # type: ignore[arg-type]
            bstar=tuple(float(x) for x in a_rep[:, 1]),  # type: ignore[arg-type]
            cstar=tuple(float(x) for x in a_rep[:, 2]),  # type: ignore[arg-type]
            fs=fs[ok].astype(np.float32), ss=ss[ok].astype(np.float32),
            panel=np.zeros(int(ok.sum()), dtype=np.int16), panel_names=[self.detector.panel],
            peak=(gain * peak[ok]).astype(np.float32),
            background=(gain * bg_est[ok]).astype(np.float32),
            profile_radius=radius,
            resolution_limit=float(1.0 / q_norm.max()) if q_norm.size else float(c.dmin),
            detector_distance_m=c.detector_distance_m, beam_bandwidth=c.bandwidth,
        )
        if c.emit_truth_metadata:
            msg.metadata = {"sim_scale": scale, "sim_b_image": b_image,
                            "sim_misindexed": shot.misindexed,
                            "sim_profile_radius": radius}
        if c.conditions:
            msg.condition = c.conditions[condition]
            msg.metadata = {**(msg.metadata or {}), PUMP_CODE_HEADER: condition}
        truth = ImageTruth(
            index=index, U=U, cell=cell, photon_energy_eV=float(energy),
            profile_radius=radius, scale=scale, b_image=b_image,
            background_scale=shot.bg_scale, misindexed=shot.misindexed, index_shift=shift,
            hkl=hkl_true[ok],
            asu_index=self.asu_index[rows][ok], friedel=self.friedel[rows][ok],
            excitation=e[ok], partiality=p[ok], expected_photons=signal[ok],
            outlier=outlier[ok], setting=shot.setting,
            intensity_factor=gain * factor[ok], condition=condition)
        return msg, truth

    def _partialities(self, a_true: np.ndarray, b_true: np.ndarray, lam: float, radius: float,
                      mosaic: float) -> tuple[np.ndarray, ...]:
        """Lattice points near the Ewald sphere and their partialities (``partiality_profile``).

        Returns
        -------
        near, q, e, q_norm, p
            Rows of the P1 lattice examined, their scattering vectors (Å⁻¹), nominal Ewald
            offsets (Å⁻¹), |q| (Å⁻¹) and partialities.
        """
        c = self.config
        qmax = np.array([1.0 / c.dmin])
        predicted = c.overprediction * float(self.prediction_width(qmax, lam, radius, mosaic)[0])
        if c.partiality_profile == "xsphere":
            lam_short, lam_long = lam * (1.0 - 0.5 * c.bandwidth), lam * (1.0 + 0.5 * c.bandwidth)
            r_max = radius + float(qmax[0]) * mosaic
            # the band's thickness in offset at |q|: (1/λ_short − 1/λ_long)·|q|²λ/2
            band = (1.0 / lam_short - 1.0 / lam_long) * float(qmax[0]) ** 2 * lam / 2.0
            near = self._near_ewald(a_true, b_true, lam, 1.05 * max(r_max + band, predicted))
            q = self._hkl_f[near] @ a_true.T
            e = excitation_error(q, lam)
            q_norm = np.sqrt(np.einsum("ij,ij->i", q, q))
            p = xsphere_partiality(excitation_error(q, lam_short), excitation_error(q, lam_long),
                                   radius + q_norm * mosaic)
            return near, q, e, q_norm, p
        reach = profile_reach(c.partiality_profile, c.partiality_min)
        widest = float(profile_width(qmax, profile_radius=radius, wavelength=lam,
                                     bandwidth=c.bandwidth, mosaicity_rad=mosaic)[0])
        near = self._near_ewald(a_true, b_true, lam, 1.001 * max(reach * widest, predicted))
        q = self._hkl_f[near] @ a_true.T
        e = excitation_error(q, lam)
        q_norm = np.sqrt(np.einsum("ij,ij->i", q, q))
        p = profile_partiality(c.partiality_profile, e,
                               profile_width(q_norm, profile_radius=radius, wavelength=lam,
                                             bandwidth=c.bandwidth, mosaicity_rad=mosaic))
        return near, q, e, q_norm, p

    def prediction_width(self, q_norm: np.ndarray, lam: float, radius: float,
                         mosaic: float) -> np.ndarray:
        """Width (Å⁻¹) in Ewald offset within which ``overprediction`` counts a reflection
        predicted: the profile width of :func:`~streamvi_sim.geometry.profile_width`, or for
        the ``xsphere`` profile the reflection's radius and the standard deviation of the
        band's top hat at ``|q|`` (its thickness / √12) in quadrature, as a Gaussian
        predictor would see them."""
        c = self.config
        if c.partiality_profile != "xsphere":
            return profile_width(q_norm, profile_radius=radius, wavelength=lam,
                                 bandwidth=c.bandwidth, mosaicity_rad=mosaic)
        lam_short, lam_long = lam * (1.0 - 0.5 * c.bandwidth), lam * (1.0 + 0.5 * c.bandwidth)
        band = (1.0 / lam_short - 1.0 / lam_long) * q_norm ** 2 * lam / 2.0
        return np.sqrt((radius + q_norm * mosaic) ** 2 + band ** 2 / 12.0)

    def _draw_shot(self, rng: np.random.Generator) -> _Shot:
        """The per-image random draws, always in the same order (so images are stable)."""
        c = self.config
        U = random_rotation(rng)
        cell = self._crystal_cell(rng)
        energy = c.photon_energy_eV * (1.0 + c.energy_jitter * rng.normal())
        radius = float(rng.uniform(*c.profile_radius))
        scale = float(math.exp(c.scale_sigma * rng.normal()))
        b_image = float(c.b_image_sd * rng.normal())
        bg_scale = float(math.exp(c.background_sigma * rng.normal()))
        misindexed = bool(rng.random() < c.misindexed_fraction)
        shift = np.zeros(3, dtype=np.int32)
        axis, direction = int(rng.integers(3)), int(rng.choice([-1, 1]))
        if misindexed:
            shift[axis] = direction
        rot_err = small_rotation(rng, c.orientation_error_deg)
        cell_rep = tuple(x * (1.0 + c.cell_error * rng.normal()) for x in cell[:3]) + cell[3:]
        return _Shot(U, cell, float(energy), radius, scale, b_image, bg_scale, misindexed,
                     shift, rot_err, cell_rep)

    def _crystal_cell(self, rng: np.random.Generator) -> tuple[float, ...]:
        """The target cell with each *independent* length jittered (a = b stays a = b)."""
        a, b, c, al, be, ga = self.config.cell
        f = 1.0 + self.config.cell_jitter * rng.normal(size=3)
        fa = f[0]
        fb = fa if math.isclose(a, b) else f[1]
        fc = fa if math.isclose(a, c) else f[2]
        return (a * fa, b * fb, c * fc, al, be, ga)

    def _integrate(self, rng: np.random.Generator, signal: np.ndarray, bg_px: np.ndarray
                   ) -> tuple[np.ndarray, ...]:
        """Photon counting in a peak disc and a background annulus (photons)."""
        c = self.config
        n = signal.shape[0]
        n_pk, n_bg = float(c.peak_pixels), float(c.background_pixels)
        outlier = rng.random(n) < c.outlier_fraction
        # Zingers and ice: 10-100 σ of the spot's own counting noise.
        noise = np.sqrt(signal + n_pk * bg_px)
        extra = np.where(outlier, 10.0 ** rng.uniform(1.0, 2.0, n) * noise, 0.0)
        read = c.readout_noise
        counts_pk = (rng.poisson(signal + extra + n_pk * bg_px)
                     + rng.normal(0.0, read * math.sqrt(n_pk), n))
        counts_bg = rng.poisson(n_bg * bg_px) + rng.normal(0.0, read * math.sqrt(n_bg), n)
        bg_est = counts_bg / n_bg
        iobs = counts_pk - n_pk * bg_est
        if c.gain_error > 0:
            iobs *= 1.0 + c.gain_error * rng.normal(size=n)
        var = (np.maximum(counts_pk, 0.0) + n_pk * read ** 2
               + n_pk ** 2 * (np.maximum(counts_bg, 0.0) / n_bg ** 2 + read ** 2 / n_bg)
               + (c.gain_error * np.maximum(iobs, 0.0)) ** 2)
        sigiobs = np.sqrt(np.maximum(var, 1.0))
        # Brightest pixel: roughly a fifth of the spot on top of the local background.
        peak = np.round(bg_est + 0.2 * np.maximum(iobs, 0.0))
        return iobs, sigiobs, peak, bg_est, outlier

    def images(self, start: int = 0, stop: int | None = None) -> Iterator[CrystalMessage]:
        """Messages of images ``start … stop − 1`` (``stop`` defaults to ``n_images``)."""
        stop = self.config.n_images if stop is None else stop
        for i in range(start, stop):
            yield self.image(i)[0]


def simulate_images(config: SimulationConfig, truth: Truth | None = None, *,
                    start: int = 0, stop: int | None = None) -> Iterator[CrystalMessage]:
    """Messages of images ``start … stop − 1`` of the beamtime ``config`` describes.

    Image ``i`` depends only on ``(config.seed, i)``, so any range can be produced alone.
    """
    yield from Simulator(config, truth).images(start, stop)


class SimulatedSource:
    """A :class:`~streamvi.sources.Source` of simulated crystals (entry point ``sim``).

    Parameters
    ----------
    config
        The experiment (a :class:`SimulationConfig` or a mapping of its fields); defaults
        to the DESIGN.md section 9 benchmark.
    rate
        Images per second to pace a live stream at (``None``: as fast as possible).
    truth
        Reuse an already computed structure.
    start, stop
        Image range (``stop`` defaults to ``config.n_images``).
    **overrides
        Fields of ``config`` to replace, e.g. ``n_images=100``.
    """

    def __init__(self, config: SimulationConfig | Mapping[str, Any] | None = None,
                 rate: float | None = None, *, truth: Truth | None = None, start: int = 0,
                 stop: int | None = None, **overrides: Any):
        if config is None:
            config = SimulationConfig()
        elif isinstance(config, Mapping):
            config = SimulationConfig.from_dict(dict(config))
        if overrides:
            config = replace(config, **overrides)
        if rate is not None and rate <= 0:
            raise ValueError(f"rate must be positive images/s, got {rate}")
        self.config = config
        self.rate = rate
        self.start = start
        self.stop = config.n_images if stop is None else stop
        self._truth = truth

    @property
    def truth(self) -> Truth:
        """The structure behind the images (computed on first use)."""
        if self._truth is None:
            self._truth = simulate_structure(self.config)
        return self._truth

    def __len__(self) -> int:
        return max(0, self.stop - self.start)

    def __iter__(self) -> Iterator[CrystalMessage]:
        sim = Simulator(self.config, self.truth)
        t0 = time.monotonic()
        for n, i in enumerate(range(self.start, self.stop)):
            if self.rate is not None:
                delay = t0 + n / self.rate - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
            yield sim.image(i)[0]
