"""Per-reflection metadata features for the image-scale model.

The scale model sees, for every reflection, what drives its measured intensity apart from
|F|²: resolution (per-image B factor), detector position (absorption, polarisation, panel
gain), photon energy, and -- when the crystal orientation is known -- the Ewald offset and the
profile radius, which set the partiality of a still shot.  The pulse's relative bandwidth
rides along for the geometric partiality (:mod:`streamvi.merging.model.partiality`); the
network does not see it.  Missing quantities are 0 and the
standardiser leaves a zero-variance column at 0.
"""
from __future__ import annotations

import math

import numpy as np

from streamvi.merging.model.metadata import METADATA_COLUMNS, N_METADATA, S1, Column
from streamvi.wire import CrystalMessage

__all__ = ["METADATA_COLUMNS", "N_METADATA", "reflection_metadata"]


def reflection_metadata(msg: CrystalMessage) -> np.ndarray:
    """The ``(n, N_METADATA)`` float32 feature matrix of one crystal's reflections.

    Parameters
    ----------
    msg
        A validated crystal.

    Returns
    -------
    numpy.ndarray
        Columns as :class:`~streamvi.merging.model.metadata.Column` names them.
    """
    n = len(msg)
    out = np.zeros((n, N_METADATA), dtype=np.float32)
    hkl = msg.hkl().astype(np.float64)
    wavelength = msg.wavelength_A
    q = hkl @ msg.reciprocal_basis()          # (n, 3) Å⁻¹, lab frame when oriented
    out[:, Column.INV_D2] = np.einsum("ij,ij->i", q, q)
    if msg.fs is not None:
        out[:, Column.FS] = msg.fs
    if msg.ss is not None:
        out[:, Column.SS] = msg.ss
    out[:, Column.PHOTON_ENERGY_KEV] = msg.photon_energy_eV / 1000.0
    if msg.has_orientation():
        s1 = q.copy()
        s1[:, 2] += 1.0 / wavelength          # beam along +z (CrystFEL's lab frame)
        # |s1| = 0 only for a nonsensical orientation; keep the features finite regardless
        s1_len = np.maximum(np.sqrt(np.einsum("ij,ij->i", s1, s1)), 1e-12)
        offset = s1_len - 1.0 / wavelength
        out[:, Column.EWALD_OFFSET] = offset
        out[:, S1] = s1 / s1_len[:, None]
        if msg.profile_radius:
            out[:, Column.EWALD_RATIO] = offset / msg.profile_radius
    if msg.profile_radius:
        out[:, Column.PROFILE_RADIUS] = msg.profile_radius
    if msg.beam_bandwidth and math.isfinite(msg.beam_bandwidth) and msg.beam_bandwidth > 0:
        out[:, Column.BANDWIDTH] = msg.beam_bandwidth
    return out


def reports_partiality_geometry(msg: CrystalMessage) -> bool:
    """Whether a crystal reports what the geometric partiality reads
    (:class:`~streamvi.merging.model.partiality.GeometricPartiality`): an orientation, a
    profile radius and the pulse's bandwidth."""
    return bool(msg.has_orientation() and msg.profile_radius and msg.beam_bandwidth)
