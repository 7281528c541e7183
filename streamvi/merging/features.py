"""Per-reflection metadata features for the image-scale model.

The scale model sees, for every reflection, what drives its measured intensity apart from
|F|²: resolution (per-image B factor), detector position (absorption, polarisation, panel
gain), photon energy, and -- when the crystal orientation is known -- the Ewald offset and the
profile radius, which set the partiality of a still shot.  Missing quantities are 0 and the
standardiser leaves a zero-variance column at 0.
"""
from __future__ import annotations

import numpy as np

from streamvi.wire import CrystalMessage

#: Columns of the metadata matrix, in order.
METADATA_COLUMNS: tuple[str, ...] = (
    "inv_d2",           # 1/d², Å⁻², from the crystal's own reciprocal basis or cell
    "fs",               # detector fast-scan position, pixels
    "ss",               # detector slow-scan position, pixels
    "photon_energy_keV",
    "ewald_offset",     # |s1| − 1/λ, Å⁻¹ (0 when the orientation is unknown)
    "profile_radius",   # Å⁻¹
    "ewald_ratio",      # ewald_offset / profile_radius: what partiality is a function of
    "s1_x",             # direction of the scattered beam, unit vector, lab frame
    "s1_y",
    "s1_z",
)
N_METADATA = len(METADATA_COLUMNS)


def reflection_metadata(msg: CrystalMessage) -> np.ndarray:
    """The ``(n, N_METADATA)`` float32 feature matrix of one crystal's reflections.

    Parameters
    ----------
    msg
        A validated crystal.

    Returns
    -------
    numpy.ndarray
        Columns as :data:`METADATA_COLUMNS`.
    """
    n = len(msg)
    out = np.zeros((n, N_METADATA), dtype=np.float32)
    hkl = msg.hkl().astype(np.float64)
    wavelength = msg.wavelength_A
    q = hkl @ msg.reciprocal_basis()          # (n, 3) Å⁻¹, lab frame when oriented
    out[:, 0] = np.einsum("ij,ij->i", q, q)   # 1/d²
    if msg.fs is not None:
        out[:, 1] = msg.fs
    if msg.ss is not None:
        out[:, 2] = msg.ss
    out[:, 3] = msg.photon_energy_eV / 1000.0
    if msg.has_orientation():
        s1 = q.copy()
        s1[:, 2] += 1.0 / wavelength          # beam along +z (CrystFEL's lab frame)
        # |s1| = 0 only for a nonsensical orientation; keep the features finite regardless
        s1_len = np.maximum(np.sqrt(np.einsum("ij,ij->i", s1, s1)), 1e-12)
        offset = s1_len - 1.0 / wavelength
        out[:, 4] = offset
        out[:, 7:10] = s1 / s1_len[:, None]
        if msg.profile_radius:
            out[:, 6] = offset / msg.profile_radius
    if msg.profile_radius:
        out[:, 5] = msg.profile_radius
    return out
