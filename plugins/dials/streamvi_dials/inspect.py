"""One-page summary of DIALS output (what ``streamvi inspect FILE.refl`` prints)."""
from __future__ import annotations

import os
from typing import Any

import numpy as np

from streamvi.sources import Rejected
from streamvi_dials.source import MALFORMED_REASONS, DialsSource

CELL_NAMES = ("a", "b", "c", "alpha", "beta", "gamma")


def _stats(values: list[float]) -> dict[str, float] | None:
    if not values:
        return None
    return {"min": min(values), "max": max(values), "mean": sum(values) / len(values)}


def inspect_dials(path: str | os.PathLike[str], expt_path: str | os.PathLike[str] | None = None,
                  *, intensity: str = "auto", max_rejected: int = 5) -> dict[str, Any]:
    """Read DIALS output as :class:`DialsSource` would and summarise it.

    Parameters
    ----------
    path
        The ``.refl`` (or the ``.expt``; the other file shares its stem).
    expt_path
        The ``.expt`` when it does not.
    intensity
        As for :class:`DialsSource`.
    max_rejected
        How many rejected records to list in full.

    Returns
    -------
    dict
        JSON-able.  ``images`` counts experiments (one still each), ``crystals`` those with a
        usable crystal, ``reflections`` their integrated rows of the chosen intensity;
        ``cell`` gives mean and population standard deviation (Å, degrees) over the crystals
        that became messages, ``photon_energy_eV`` and ``reflection_d_A`` (from each
        crystal's own orientation) their range; ``malformed`` counts pieces of the files
        that could not be read.
    """
    source = DialsSource(path, expt_path, intensity=intensity)
    cells: list[tuple[float, ...]] = []
    energies: list[float] = []
    d_low: list[float] = []
    d_high: list[float] = []
    first: list[Rejected] = []
    for item in source:
        if isinstance(item, Rejected):
            if len(first) < max_rejected:
                first.append(item)
            continue
        cells.append(item.cell)
        energies.append(item.photon_energy_eV)
        d = item.d()
        d_low.append(float(d.min()))
        d_high.append(float(d.max()))
    counts = source.counts
    cell_stats = None
    if cells:
        arr = np.array(cells, dtype=np.float64)
        cell_stats = {"mean": dict(zip(CELL_NAMES, arr.mean(axis=0).tolist())),
                      "std": dict(zip(CELL_NAMES, arr.std(axis=0).tolist()))}
    groups = sorted({e.space_group.xhm() for e in source.experiments
                     if e.space_group is not None})
    table = source.table
    table_info = None if table is None else {
        "version": table.version, "columns": dict(table.types),
        "skipped_columns": dict(table.skipped), "identifiers": len(table.identifiers)}
    return {
        "path": str(source.refl_path),
        "expt": str(source.expt_path),
        "run": source.run,
        "table": table_info,
        "intensity": source.intensity_kind,
        "images": counts.experiments,
        "crystals": sum(1 for e in source.experiments if e.real_space is not None),
        "rows": counts.rows,
        "unindexed_rows": counts.unindexed,
        "reflections": counts.reflections,
        "below_min_partiality": counts.below_min_partiality,
        "messages": counts.messages,
        "space_group": groups[0] if len(groups) == 1 else groups or None,
        "cell": cell_stats,
        "photon_energy_eV": _stats(energies),
        "reflection_d_A": None if not d_low else {"min": min(d_low), "max": max(d_high)},
        "malformed": sum(n for r, n in counts.rejected.items() if r in MALFORMED_REASONS),
        "rejected": {
            "count": sum(counts.rejected.values()),
            "by_reason": dict(counts.rejected),
            "first": [{"source": r.source, "position": r.position, "reason": r.reason,
                       "detail": r.detail} for r in first],
        },
        "rows_rejected": dict(counts.rows_rejected),
    }
