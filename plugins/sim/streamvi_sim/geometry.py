"""Diffraction geometry of a still shot: orientation, Ewald offsets, partiality, detector.

Lab frame (CrystFEL's): the beam travels along +z, the incident wave vector is
``k0 = (0, 0, 1/λ)``; a reflection with scattering vector ``q = A*·hkl`` (``A* = U·B``, the
columns of ``A*`` are a*, b*, c* in the lab) diffracts along ``s1 = k0 + q``.  Its excitation
error (Ewald offset) is ``|k0 + q| − 1/λ``, Å⁻¹, positive outside the Ewald sphere.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from streamvi.wire import reciprocal_basis as wire_reciprocal_basis

HC_EV_A = 12398.419843320026  # eV·Å


def wavelength_A(photon_energy_eV: float) -> float:
    """Wavelength, Å, of photons of the given energy (eV)."""
    return HC_EV_A / photon_energy_eV


def random_rotation(rng: np.random.Generator) -> np.ndarray:
    """A rotation matrix drawn uniformly from SO(3) (normalised Gaussian quaternion)."""
    q = rng.normal(size=4)
    w, x, y, z = q / np.linalg.norm(q)
    return np.array([
        [1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
        [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
        [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)],
    ])


def small_rotation(rng: np.random.Generator, sigma_deg: float) -> np.ndarray:
    """A rotation about a uniformly random axis by an angle ~ N(0, sigma_deg) degrees."""
    axis = rng.normal(size=3)
    axis /= np.linalg.norm(axis)
    angle = math.radians(rng.normal(0.0, sigma_deg)) if sigma_deg > 0 else 0.0
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + math.sin(angle) * k + (1 - math.cos(angle)) * (k @ k)


def reciprocal_basis(cell: tuple[float, ...]) -> np.ndarray:
    """B: columns are a*, b*, c* (Å⁻¹) in the standard crystal Cartesian frame.

    The frame is the PDB/gemmi one (a along x, b in the xy plane), so ``B`` is the transpose
    of the fractionalisation matrix; :func:`streamvi.wire.reciprocal_basis` gives its rows.
    """
    return wire_reciprocal_basis(cell).T


def cell_of_reciprocal_basis(basis: np.ndarray) -> tuple[float, ...]:
    """The cell ``(a, b, c, α, β, γ)`` (Å, degrees) of a basis whose columns are a*, b*, c*.

    The inverse of :func:`reciprocal_basis` up to orientation.
    """
    direct = np.linalg.inv(np.asarray(basis, dtype=np.float64)).T   # columns a, b, c
    lengths = np.linalg.norm(direct, axis=0)

    def angle(i: int, j: int) -> float:
        cos = float(direct[:, i] @ direct[:, j]) / float(lengths[i] * lengths[j])
        return math.degrees(math.acos(max(-1.0, min(1.0, cos))))

    return (*(float(x) for x in lengths), angle(1, 2), angle(0, 2), angle(0, 1))


def excitation_error(q: np.ndarray, wavelength: float) -> np.ndarray:
    """Ewald offset ``|k0 + q| − 1/λ`` (Å⁻¹) of scattering vectors ``q`` (``(n, 3)``, Å⁻¹).

    Written as ``(2 k qz + |q|²)/(|k0 + q| + k)`` to avoid cancellation.
    """
    k = 1.0 / wavelength
    q2 = np.einsum("ij,ij->i", q, q)
    s1_norm = np.sqrt(q[:, 0] ** 2 + q[:, 1] ** 2 + (k + q[:, 2]) ** 2)
    return (2.0 * k * q[:, 2] + q2) / (s1_norm + k)


def profile_width(q_norm: np.ndarray, *, profile_radius: float, wavelength: float,
                  bandwidth: float, mosaicity_rad: float) -> np.ndarray:
    """σ of the Gaussian partiality profile in excitation error, Å⁻¹.

    The crystal's profile radius ``R`` contributes σ = R/2; the pulse spectrum (relative
    FWHM ``bandwidth``) spreads the Ewald sphere by ``(|q|² λ / 2)·δλ/λ`` at scattering
    vector ``|q|``; mosaic spread adds ``|q|·η``.  The three add in quadrature.
    """
    sigma_bw = bandwidth / (2.0 * math.sqrt(2.0 * math.log(2.0)))
    return np.sqrt((0.5 * profile_radius) ** 2
                   + (0.5 * q_norm ** 2 * wavelength * sigma_bw) ** 2
                   + (q_norm * mosaicity_rad) ** 2)


def partiality(excitation: np.ndarray, width: np.ndarray) -> np.ndarray:
    """Fraction of a reflection recorded on a still: ``exp(−e²/(2σ²))``, 1 on the sphere."""
    return np.exp(-0.5 * (excitation / width) ** 2)


#: γ/σ of the Lorentzian with the Gaussian's full width at half maximum
LORENTZ_GAMMA = math.sqrt(2.0 * math.log(2.0))
#: half width of the top hat in units of σ: the profile radius when R/2 dominates σ
TOPHAT_HALF_WIDTH = 2.0


def profile_partiality(profile: str, excitation: np.ndarray, width: np.ndarray) -> np.ndarray:
    """Partiality of a profile that depends on the Ewald offset alone.

    Parameters
    ----------
    profile
        ``"gaussian"`` (``exp(−e²/(2σ²))``), ``"lorentzian"`` (``1/(1 + e²/γ²)``, γ =
        σ·√(2 ln 2): the Gaussian's FWHM) or ``"tophat"`` (1 for ``|e| ≤ 2σ``, else 0).
    excitation
        Ewald offsets e, Å⁻¹.
    width
        σ of :func:`profile_width`, Å⁻¹.
    """
    if profile == "gaussian":
        return partiality(excitation, width)
    if profile == "lorentzian":
        return 1.0 / (1.0 + (excitation / (LORENTZ_GAMMA * width)) ** 2)
    if profile == "tophat":
        return (np.abs(excitation) <= TOPHAT_HALF_WIDTH * width).astype(np.float64)
    raise ValueError(f"profile {profile!r} is not a function of the Ewald offset alone "
                     "(gaussian, lorentzian or tophat; xsphere has xsphere_partiality)")


def profile_reach(profile: str, partiality_min: float) -> float:
    """Largest ``|e|/σ`` at which ``profile_partiality`` still reaches ``partiality_min``."""
    if profile == "gaussian":
        return math.sqrt(2.0 * math.log(1.0 / partiality_min))
    if profile == "lorentzian":
        return LORENTZ_GAMMA * math.sqrt(1.0 / partiality_min - 1.0)
    if profile == "tophat":
        return TOPHAT_HALF_WIDTH
    raise ValueError(f"no reach in units of σ for profile {profile!r}")


def _volume_below(t: np.ndarray, radius: np.ndarray) -> np.ndarray:
    """Fraction of a sphere's volume on the near side of a plane ``t`` from its centre."""
    u = np.clip((t + radius) / (2.0 * radius), 0.0, 1.0)
    return u * u * (3.0 - 2.0 * u)


def xsphere_partiality(e_short: np.ndarray, e_long: np.ndarray, radius: np.ndarray
                       ) -> np.ndarray:
    """CrystFEL-style partiality of a spherical reflection in a band of wavelengths.

    The reflection is a sphere of radius ``radius`` (Å⁻¹) about its reciprocal-lattice
    point.  Its Ewald offsets from the spheres of the band's shortest and longest
    wavelengths are ``e_short ≤ e_long`` (Å⁻¹; the shortest wavelength has the largest
    sphere, so the smallest offset).  In the plane approximation the band covers the slab
    ``−e_long ≤ t ≤ −e_short`` of the reflection, and the recorded fraction is the sphere's
    volume in that slab, ``V(−e_short) − V(−e_long)`` with ``V(t) = u²(3 − 2u)``, u =
    (t + R)/(2R) clamped to [0, 1].  It is divided by the same fraction for the reflection
    centred in the band (offsets ±(e_long − e_short)/2), as CrystFEL 0.10 normalises its
    ``xsphere`` model, so a reflection in the middle of the band has partiality 1.
    """
    inside = _volume_below(-e_short, radius) - _volume_below(-e_long, radius)
    half = 0.5 * (e_long - e_short)
    centred = _volume_below(half, radius) - _volume_below(-half, radius)
    return np.clip(inside / centred, 0.0, 1.0)


@dataclass(frozen=True)
class Detector:
    """A flat single-panel detector normal to the beam.

    Attributes
    ----------
    distance_m
        Sample–detector distance, m.
    pixel_size_m
        Pixel pitch, m.
    shape
        ``(n_fs, n_ss)`` pixels.
    beam_center_px
        Where the direct beam hits, ``(fs, ss)`` pixels.
    beamstop_radius_m
        Radius of the shadow of the beam stop, m.
    panel
        Panel name.
    """

    distance_m: float = 0.1
    pixel_size_m: float = 100e-6
    shape: tuple[int, int] = (2000, 2000)
    beam_center_px: tuple[float, float] = (1000.0, 1000.0)
    beamstop_radius_m: float = 0.003
    panel: str = "p0"

    def project(self, s1: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Where diffracted rays ``s1`` (``(n, 3)``, any length) hit the panel.

        Returns
        -------
        fs, ss, on_panel
            Pixel coordinates (fs along +x, ss along +y) and whether the ray is recorded
            (forward, inside the panel, outside the beam stop).
        """
        forward = s1[:, 2] > 0
        t = np.where(forward, self.distance_m / np.where(forward, s1[:, 2], 1.0), 0.0)
        x = t * s1[:, 0]
        y = t * s1[:, 1]
        fs = self.beam_center_px[0] + x / self.pixel_size_m
        ss = self.beam_center_px[1] + y / self.pixel_size_m
        on = (forward & (fs >= 0) & (fs < self.shape[0]) & (ss >= 0) & (ss < self.shape[1])
              & (x * x + y * y >= self.beamstop_radius_m ** 2))
        return fs, ss, on

    def geometry_text(self, *, photon_energy_eV: float, adu_per_photon: float = 1.0) -> str:
        """A CrystFEL geometry file describing this detector."""
        res = 1.0 / self.pixel_size_m
        return "\n".join([
            "; Simulated flat detector (streamvi_sim)",
            f"photon_energy = {photon_energy_eV:g}",
            f"clen = {self.distance_m:g}",
            f"res = {res:g}",
            f"adu_per_photon = {adu_per_photon:g}",
            "data = /data/data",
            "dim0 = %",
            "dim1 = ss",
            "dim2 = fs",
            "",
            f"{self.panel}/min_fs = 0",
            f"{self.panel}/min_ss = 0",
            f"{self.panel}/max_fs = {self.shape[0] - 1}",
            f"{self.panel}/max_ss = {self.shape[1] - 1}",
            f"{self.panel}/fs = +1.000000x +0.000000y",
            f"{self.panel}/ss = +0.000000x +1.000000y",
            f"{self.panel}/corner_x = {-self.beam_center_px[0]:.4f}",
            f"{self.panel}/corner_y = {-self.beam_center_px[1]:.4f}",
            f"{self.panel}/coffset = 0.0",
            "",
        ])
