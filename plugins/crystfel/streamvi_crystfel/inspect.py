"""One-page summary of a CrystFEL stream (what ``streamvi inspect FILE.stream`` prints)."""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import numpy as np

from streamvi.sources import Rejected
from streamvi_crystfel.reader import StreamParser
from streamvi_crystfel.source import default_run, read_stream

CELL_NAMES = ("a", "b", "c", "alpha", "beta", "gamma")


class _Range:
    """Running min/max/mean of a scalar."""

    def __init__(self) -> None:
        self.n = 0
        self.total = 0.0
        self.low = math.inf
        self.high = -math.inf

    def add(self, lo: float, hi: float | None = None, *, total: float | None = None,
            n: int = 1) -> None:
        self.low = min(self.low, lo)
        self.high = max(self.high, lo if hi is None else hi)
        self.total += lo if total is None else total
        self.n += n

    def to_dict(self) -> dict[str, float] | None:
        if not self.n:
            return None
        return {"min": self.low, "max": self.high, "mean": self.total / self.n}


def inspect_stream(path: str | os.PathLike[str], *, run: str | None = None,
                   max_rejected: int = 5) -> dict[str, Any]:
    """Read a whole stream and summarise it.

    Parameters
    ----------
    path
        Stream file.
    run
        Run name (default: the file name without ``.stream``).
    max_rejected
        How many rejected records to list in full.

    Returns
    -------
    dict
        JSON-able.  ``images`` counts chunks, ``indexed_images`` chunks with a crystal;
        ``cell`` gives the mean and population standard deviation of each cell parameter
        (Å, degrees) over the crystals that became messages; ``photon_energy_eV`` is over
        those crystals.  Two resolution figures, both in Å: ``resolution_limit_A`` is the
        range of CrystFEL's per-crystal ``diffraction_resolution_limit`` (how far each
        crystal was judged to diffract), ``reflection_d_A`` the range of d over every
        reflection, from each crystal's own reciprocal basis (what the data actually
        reach).  ``rejected.first`` lists the first rejected pieces with their positions.
    """
    path = Path(path)
    parser = StreamParser(run if run is not None else default_run(path), source=str(path))
    cells: list[tuple[float, ...]] = []
    energy = _Range()
    limit = _Range()
    d_range = _Range()
    rejected: list[Rejected] = []
    for item in read_stream(path, parser=parser):
        if isinstance(item, Rejected):
            if len(rejected) < max_rejected:
                rejected.append(item)
            continue
        cells.append(item.cell)
        energy.add(item.photon_energy_eV)
        if item.resolution_limit is not None:
            limit.add(item.resolution_limit)
        d = item.d()        # from the crystal's own basis, else its cell
        d = d[np.isfinite(d)]
        if d.size:
            d_range.add(float(d.min()), float(d.max()), total=float(d.sum()), n=int(d.size))
    counts = parser.counts
    header = parser.header
    cell_stats = None
    if cells:
        arr = np.array(cells, dtype=np.float64)
        cell_stats = {"mean": dict(zip(CELL_NAMES, arr.mean(axis=0).tolist())),
                      "std": dict(zip(CELL_NAMES, arr.std(axis=0).tolist()))}
    header_info = header.to_dict() if header is not None else {}
    return {
        "path": str(path),
        "run": parser.run,
        "bytes": parser.offset,
        "format_version": header_info.get("format_version"),
        "crystfel_version": header_info.get("crystfel_version"),
        "generated_by": header_info.get("generated_by"),
        "command_line": header_info.get("command_line"),
        "indexing_methods": header_info.get("indexing_methods"),
        "images": counts.chunks,
        "indexed_images": counts.indexed_chunks,
        "images_without_crystals": counts.chunks_without_crystals,
        "crystals": counts.crystals,
        "crystals_without_reflections": counts.crystals_without_reflections,
        "reflections": counts.reflections,
        "messages": counts.messages,
        "panels": len(parser.panels),
        "target_cell": header_info.get("target_cell"),
        "bravais_lattice": header_info.get("bravais_lattice"),
        "space_group": header_info.get("space_group"),
        "cell": cell_stats,
        "photon_energy_eV": energy.to_dict(),
        "resolution_limit_A": limit.to_dict(),
        "reflection_d_A": d_range.to_dict(),
        "malformed_chunks": counts.malformed,
        "rejected": {
            "count": sum(counts.rejected.values()),
            "by_reason": dict(counts.rejected),
            "first": [{"position": r.position, "reason": r.reason, "detail": r.detail}
                      for r in rejected],
        },
        "rows_rejected": dict(counts.rows_rejected),
    }
