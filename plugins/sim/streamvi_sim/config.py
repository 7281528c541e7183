"""Every knob of the simulated beamtime, in one dataclass with physical units."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from streamvi_sim.conditions import LightChange

#: Shapes of the partiality against the Ewald offset (see :class:`SimulationConfig`).
PARTIALITY_PROFILES = ("gaussian", "lorentzian", "tophat", "xsphere")
#: Mean intensity per unit ε of ``flat_intensities`` truths, electrons² (any value would do:
#: ``top_shell_photons`` sets the flux).
FLAT_SIGMA = 1.0e4


@dataclass
class SimulationConfig:
    """Parameters of a simulated still-shot serial-crystallography experiment.

    The defaults are the benchmark of DESIGN.md section 9: a lysozyme-sized crystal in
    P 4₃2₁2 to 1.8 Å at 9.5 keV, ~800 reflections per image, sulfur and iodide anomalous
    scatterers, 2 % misindexed images and a few outliers.  Image ``i`` depends only on
    ``(seed, i)``.  With them a plain inverse-variance average of 2,000 images reaches
    CC(F, truth) ≈ 0.94 (top shell ≈ 0.86), an unweighted mean ≈ 0.98 (≈ 0.84), and the
    iodide sites stand at ≈ 10 σ in the anomalous difference map.

    Attributes
    ----------
    n_images
        Images a :class:`~streamvi_sim.SimulatedSource` yields (one crystal each).
    seed
        Seed of everything random (structure and images).
    run
        Run name carried by every message.
    space_group, cell
        Hermann–Mauguin symbol; ``(a, b, c, α, β, γ)`` in Å and degrees.
    dmin
        High-resolution limit, Å (applied with the target cell).
    photon_energy_eV
        Nominal photon energy, eV.
    energy_jitter
        Shot-to-shot relative σ of the central photon energy (SASE jitter).
    bandwidth
        Relative FWHM of each pulse's spectrum (reported as ``beam_bandwidth``).
    anomalous
        Use f', f'' (Cromer–Liberman at ``photon_energy_eV``); ``False`` gives F(+) = F(−).
    n_atoms, n_sulfur, n_iodide
        Light (C/N/O) atoms, sulfur atoms and iodide ions in the asymmetric unit.
    min_atom_distance
        Closest approach of two atoms (symmetry mates included), Å.
    b_range, b_iodide
        Atomic displacement B of protein atoms (uniform range) and of iodide, Å².
    iodide_occupancy
        Occupancy of the iodide sites.
    cell_jitter
        Relative σ of each crystal's a, b, c about the target cell.
    cell_error, orientation_error_deg
        Errors of the *reported* cell (relative σ) and orientation (σ of the rotation
        angle, degrees), as an indexer's refinement would leave.
    profile_radius
        Per-crystal profile radius range (uniform), Å⁻¹: the Gaussian partiality profile
        has σ = radius / 2 in excitation error.
    mosaicity_deg
        Mosaic spread (σ, degrees): adds ``|q|·η`` to the profile width.
    partiality_min
        Reflections predicted with a partiality below this are not integrated.
    overprediction
        0 (default): integrate the reflections whose partiality reaches ``partiality_min``.
        Above 0: the indexer predicts, and integrates, every reflection within this many
        profile widths of the Ewald sphere (the width :meth:`Simulator.prediction_width`
        gives: profile and band together), whatever its true partiality, as indexamajig
        integrates every spot it predicts: the stream then carries observations of pure
        background (partiality 0), in a share that changes with resolution where the band
        widens the reflections (CrystFEL's ``partial_sim`` predicts with one profile and
        integrates with another).
    scale_sigma
        σ of the log-normal per-image scale (median 1).
    b_overall
        Overall Wilson B of the crystals (lattice disorder on top of the atomic B), Å².
    b_image_sd
        σ of the per-image relative Wilson B, Å².
    top_shell_photons
        Mean photons of a fully recorded reflection of the outer 10 % of the ASU (by
        resolution) at unit image scale, overall B included: sets the flux.
    background_photons
        Mean background per pixel, photons (before the water ring and image variation).
    background_sigma
        σ of the log-normal per-image background multiplier.
    water_ring_A, water_ring_strength
        Position (Å) and relative height of the solvent ring in the background.
    readout_noise
        Detector read noise per pixel, photons (Gaussian).
    gain_error
        Relative σ of a multiplicative error on each spot (pixel gain calibration, shot
        spectrum within the spot); the reported σ(I) carries it as ``gain_error·I``.
    peak_pixels, background_pixels
        Pixels in the integration disc and in the background annulus.
    adu_per_photon
        Detector gain: intensities are reported in ADU.
    outlier_fraction
        Fraction of reflections hit by zingers/ice (large spurious intensity).
    misindexed_fraction
        Fraction of images whose indices are off by one along a random axis.
    indexing_ambiguity
        Report each image in one of the space group's merohedral settings (the twin laws of
        :func:`streamvi.symmetry.twin_operators`), drawn uniformly, as an indexer does when
        the lattice has more symmetry than the point group (P 4, P 3, P 6₃, …): Miller
        indices and reciprocal basis are both reindexed, so the geometry stays consistent.
        Off by default, and without effect in groups that have no such ambiguity.
    detector_distance_m, pixel_size_m, detector_shape, beam_center_px
        Flat detector normal to the beam: distance, pixel pitch, (n_fs, n_ss) pixels and
        where the direct beam hits it (fs, ss) in pixels.
    beamstop_radius_m
        Reflections closer than this to the direct beam are lost.
    emit_truth_metadata
        Add per-image truth (``sim_*`` keys) to each message's metadata; off by default
        because a model must not see it.

    Variations (each at its default leaves the images exactly as without it; they exist so
    that a merge can be judged on data it was not tuned to, ``benchmarks/quality_matrix.py``):

    solvent_fraction
        0: the atoms are spread through the whole cell (no molecular envelope, so no
        solvent contrast).  > 0: the atoms are packed into a compact molecular envelope
        (one globule per asymmetric unit, about its own centre) filling ``1 −
        solvent_fraction`` of the cell, and the rest is flat bulk solvent, added as
        refinement programs model it: ``F = F_atoms + k_sol·exp(−B_sol s²)·F_mask`` with
        ``F_mask`` the transform of gemmi's solvent mask of the atoms (1 in the solvent) and
        s² = 1/(4d²).  This gives real proteins' very strong low-order reflections
        (normalised amplitudes E > 3 below ~10 Å).  Typical: 0.45.  The atoms then sit at
        protein density: 1,000 atoms in the default cell need ``min_atom_distance`` ≤ 2 Å
        (1.8 Å is used in the benchmarks; bonded atoms are 1.5 Å apart).
    solvent_k
        Electron density of the bulk solvent, e/Å³ (k_sol; water ≈ 0.33, refined ≈ 0.35).
    solvent_b
        B of the bulk-solvent term, Å² (B_sol; refined values ≈ 40–60).
    partiality_profile
        Shape of the partiality as a function of the Ewald offset ``e`` (Å⁻¹), with σ the
        width of :func:`~streamvi_sim.geometry.profile_width` (profile radius R/2, bandwidth
        and mosaic spread in quadrature):

        - ``"gaussian"``: ``exp(−e²/(2σ²))`` (streamvi's model assumes this kind);
        - ``"lorentzian"``: ``1/(1 + e²/γ²)`` with γ = σ·√(2 ln 2), the same full width at
          half maximum; long tails, so many more weak partials reach ``partiality_min``;
        - ``"tophat"``: 1 for ``|e| ≤ 2σ`` (the profile radius when bandwidth and mosaicity
          are negligible), else 0: every recorded reflection is a full;
        - ``"xsphere"``: CrystFEL's kind — the reflection is a sphere of radius ``R = r +
          |q|·η`` (profile radius r, mosaic spread η in rad) and its partiality is the
          fraction of its volume lying between the Ewald spheres of the band's extreme
          wavelengths λ(1 ± bandwidth/2), divided by the same fraction for a sphere centred
          on the nominal Ewald sphere (so a reflection in the middle of the band has 1).  With
          t the signed distance of a cutting sphere from the reflection's centre (plane
          approximation), the volume below it is ``u²(3 − 2u)``, u = (t + R)/(2R) clamped to
          [0, 1].
    fractional_error
        Relative σ of an unmodelled multiplicative error on each observed intensity (one
        Gaussian factor ``1 + fractional_error·N(0, 1)`` per reflection, from a random stream
        of its own); the reported σ(I) does *not* carry it.
    sigma_scale
        Multiplies every reported σ(I) (mis-estimated errors: 0.5 reports them half as large
        as they are).
    conditions
        Pump–probe conditions, e.g. ``("dark", "light")``: each image belongs to one
        (:mod:`streamvi_sim.conditions`) and its message carries it (``condition``, and a
        copied header ``header/int//sim/pump_code`` with the condition's index, as
        indexamajig's ``--copy-header`` writes an event code).  The first is the dark state
        (the structure simulated); every later one the light state, ``light_change`` applied.
        Empty: no conditions (the images of before).
    condition_ratio
        Shots of each condition per cycle of the interleaving (integers ≥ 1, one per
        condition; empty: one each, so dark and light alternate).
    light_change
        What the pump does, :meth:`streamvi_sim.conditions.LightChange.parse`'s text, e.g.
        ``"move=5,shift=1.5,fraction=0.3"`` (5 atoms moved by 1.5 Å at 30 % occupancy) or
        ``"occupancy=4,delta=-0.5"``; empty: none (light = dark).
    flat_intensities
        The truth of CrystFEL's ``partial_sim``: random intensities with no atoms, no
        resolution fall-off and no anomalous signal (F(+) = F(−)); I = ε·Σ·x with x
        exponential (acentric) or χ²₁ (centric), Σ = :data:`FLAT_SIGMA`, random phases.
        ``anomalous``, the atom counts and ``solvent_fraction`` are then ignored.
    """

    n_images: int = 2000
    seed: int = 0
    run: str = "sim"
    space_group: str = "P 43 21 2"
    cell: tuple[float, float, float, float, float, float] = (79.1, 79.1, 37.9, 90.0, 90.0, 90.0)
    dmin: float = 1.8
    photon_energy_eV: float = 9500.0
    energy_jitter: float = 0.001
    bandwidth: float = 0.002
    anomalous: bool = True
    n_atoms: int = 1000
    n_sulfur: int = 10
    n_iodide: int = 4
    min_atom_distance: float = 2.2
    b_range: tuple[float, float] = (15.0, 25.0)
    b_iodide: float = 20.0
    iodide_occupancy: float = 1.0
    cell_jitter: float = 0.002
    cell_error: float = 0.001
    orientation_error_deg: float = 0.02
    profile_radius: tuple[float, float] = (0.0007, 0.0015)
    mosaicity_deg: float = 0.02
    partiality_min: float = 0.01
    overprediction: float = 0.0
    scale_sigma: float = 0.5
    b_overall: float = 0.0
    b_image_sd: float = 5.0
    top_shell_photons: float = 3.0
    background_photons: float = 0.2
    background_sigma: float = 0.25
    water_ring_A: float = 3.7
    water_ring_strength: float = 1.5
    readout_noise: float = 0.3
    gain_error: float = 0.15
    peak_pixels: int = 50
    background_pixels: int = 75
    adu_per_photon: float = 1.0
    outlier_fraction: float = 0.002
    misindexed_fraction: float = 0.02
    indexing_ambiguity: bool = False
    detector_distance_m: float = 0.1
    pixel_size_m: float = 100e-6
    detector_shape: tuple[int, int] = (2000, 2000)
    beam_center_px: tuple[float, float] = (1000.3, 990.7)
    beamstop_radius_m: float = 0.003
    emit_truth_metadata: bool = False
    solvent_fraction: float = 0.0
    solvent_k: float = 0.35
    solvent_b: float = 46.0
    partiality_profile: str = "gaussian"
    fractional_error: float = 0.0
    sigma_scale: float = 1.0
    flat_intensities: bool = False
    conditions: tuple[str, ...] = ()
    condition_ratio: tuple[int, ...] = ()
    light_change: str = ""

    def __post_init__(self) -> None:
        if self.partiality_profile not in PARTIALITY_PROFILES:
            raise ValueError(f"partiality_profile = {self.partiality_profile!r}: choose one of "
                             + ", ".join(PARTIALITY_PROFILES))
        if not 0.0 <= self.solvent_fraction < 0.95:
            raise ValueError(f"solvent_fraction = {self.solvent_fraction}: must lie in [0, 0.95) "
                             "(0 spreads the atoms through the cell, 0.45 is typical)")
        if self.fractional_error < 0 or not self.sigma_scale > 0:
            raise ValueError(f"fractional_error = {self.fractional_error} must be ≥ 0 and "
                             f"sigma_scale = {self.sigma_scale} > 0")
        if not 0.0 < self.partiality_min < 1.0:
            raise ValueError(f"partiality_min = {self.partiality_min}: must lie in (0, 1)")
        if not (math.isfinite(self.overprediction) and self.overprediction >= 0.0):
            raise ValueError(f"overprediction = {self.overprediction}: must be ≥ 0 (profile "
                             "widths; 0 integrates what reaches partiality_min)")
        self.conditions = tuple(str(c) for c in self.conditions)
        self.condition_ratio = tuple(self.condition_ratio)
        if any(not c.strip() for c in self.conditions) or \
                len(set(self.conditions)) != len(self.conditions):
            raise ValueError(f"conditions = {self.conditions}: names must be distinct and "
                             "non-empty, e.g. ('dark', 'light')")
        if self.condition_ratio and (
                len(self.condition_ratio) != len(self.conditions)
                or any(int(r) != r or r < 1 for r in self.condition_ratio)):
            raise ValueError(f"condition_ratio = {self.condition_ratio}: give one integer ≥ 1 "
                             f"per condition ({len(self.conditions)}), e.g. (1, 3), or none")
        if self.light_change and not self.conditions:
            raise ValueError(f"light_change = {self.light_change!r} needs conditions, e.g. "
                             "('dark', 'light')")
        self.light_change_parsed      # refuses a spec it cannot read, naming the key

    @property
    def light_change_parsed(self) -> "LightChange":
        """:attr:`light_change` as a :class:`~streamvi_sim.conditions.LightChange`."""
        from streamvi_sim.conditions import LightChange

        return LightChange.parse(self.light_change)

    @property
    def wavelength_A(self) -> float:
        """Nominal wavelength, Å."""
        return 12398.419843320026 / self.photon_energy_eV

    def to_dict(self) -> dict[str, Any]:
        """Plain mapping of every field (tuples as lists), e.g. for a history line."""
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "SimulationConfig":
        """Inverse of :meth:`to_dict`; unknown keys raise ``TypeError``."""
        names = {f.name for f in fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise TypeError(f"unknown simulation option(s): {', '.join(sorted(unknown))}")
        kw = {k: (tuple(v) if isinstance(v, list) else v) for k, v in d.items()}
        return cls(**kw)
