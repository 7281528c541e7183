"""DIALS stills source for streamvi.

Reads DIALS output without DIALS: reflection tables (``.refl``, msgpack) with
:func:`read_reflection_table`, experiment lists (``.expt``, JSON) with
:func:`read_experiments`, both together as wire messages with :class:`DialsSource` (entry
point ``dials``), and a summary with :func:`inspect_dials`.
"""
from streamvi_dials.expt import (
    Experiment,
    Panel,
    cell_from_real_space,
    detector_panels,
    read_experiments,
    space_group_from_hall,
)
from streamvi_dials.inspect import inspect_dials
from streamvi_dials.refl import COLUMN_TYPES, ReflectionTable, read_reflection_table
from streamvi_dials.source import (
    FLAG_INTEGRATED_PRF,
    FLAG_INTEGRATED_SUM,
    REASONS,
    DialsCounts,
    DialsSource,
    beam_frame_rotation,
    resolve_paths,
)

__all__ = [
    "COLUMN_TYPES", "FLAG_INTEGRATED_PRF", "FLAG_INTEGRATED_SUM", "REASONS", "DialsCounts",
    "DialsSource", "Experiment", "Panel", "ReflectionTable", "beam_frame_rotation",
    "cell_from_real_space", "detector_panels", "inspect_dials", "read_experiments",
    "read_reflection_table", "resolve_paths", "space_group_from_hall",
]
