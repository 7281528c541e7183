"""The per-reflection metadata the image-scale model sees, column by column, by name.

:func:`streamvi.merging.features.reflection_metadata` fills the columns from a crystal;
:mod:`streamvi.merging.model.geometry` reads and rewrites the Ewald columns when it refines
an image's orientation; the engine reads 1/d².  All of them name a column through
:class:`Column`, never by its position, so a column can be added or moved in one place.
"""
from __future__ import annotations

from enum import IntEnum


class Column(IntEnum):
    """Position of each metadata column (an int: it indexes numpy arrays and tensors)."""

    #: 1/d², Å⁻², from the crystal's own reciprocal basis or its cell
    INV_D2 = 0
    #: detector fast-scan and slow-scan position, pixels
    FS = 1
    SS = 2
    #: photon energy, keV
    PHOTON_ENERGY_KEV = 3
    #: |s1| − 1/λ, Å⁻¹ (0 when the orientation is unknown)
    EWALD_OFFSET = 4
    #: profile radius, Å⁻¹
    PROFILE_RADIUS = 5
    #: ewald_offset / profile_radius: what partiality is a function of
    EWALD_RATIO = 6
    #: direction of the scattered beam, unit vector, lab frame
    S1_X = 7
    S1_Y = 8
    S1_Z = 9
    #: relative bandwidth of the pulse as the source reports it (``beam_bandwidth``; 0 when
    #: unknown).  Read by the geometric partiality (:mod:`streamvi.merging.model.partiality`),
    #: not by the scale network: it is past :data:`N_NETWORK_METADATA`
    BANDWIDTH = 10


#: The direction of the scattered beam, three columns.
S1 = slice(Column.S1_X, Column.S1_Z + 1)
#: Names of the columns, in order (as the wire format and the documentation spell them).
METADATA_COLUMNS: tuple[str, ...] = ("inv_d2", "fs", "ss", "photon_energy_keV", "ewald_offset",
                                     "profile_radius", "ewald_ratio", "s1_x", "s1_y", "s1_z",
                                     "bandwidth")
N_METADATA = len(METADATA_COLUMNS)
#: The columns the scale network and its standardiser see: the first ones, up to the
#: direction of the scattered beam (a checkpoint's network keeps its input width when
#: columns for other readers are added after them).
N_NETWORK_METADATA = int(Column.S1_Z) + 1
