"""Reflections that arrive beyond the table's resolution limit: how many, how far, how strong.

A service's table is sized at its start (``dmin``, 2.0 Å unless configured), before any data
arrive; an indexer that integrates further sends reflections the table has no rows for.
They are counted and left out (``reflections_outside``, with the systematic absences), and
this record keeps what a crew needs to decide whether to extend the table: the share of the
arriving reflections beyond ``dmin``, how far they reach, and their mean ``I/σ(I)`` per
observation in shells beyond the edge.  The suggested limit is the resolution that 99 % of
the arriving reflections reach (:data:`REACH_QUANTILE`), rounded down to 0.01 Å: the
indexer's own integration limit, robust to a few stray indices.  Where the signal ends
inside it is for the CC½ fit to say once the table holds those shells (merge to the edge,
cut with CC½); a suggestion is made only where enough of the data lie beyond the table
(:data:`MIN_FRACTION`, :data:`MIN_REFLECTIONS`).
"""
from __future__ import annotations

import math

import numpy as np

#: shells of equal width in 1/d² between dmin and :data:`REACH` · dmin
N_SHELLS = 200
#: the record reaches out to this fraction of dmin (0.5: twice the resolution); beyond it
#: reflections count in the last shell's overflow
REACH = 0.5
#: shells of the mean I/σ(I) reported (each several of the fine shells)
N_REPORT_SHELLS = 4
#: share of the arriving reflections the suggested limit keeps inside
REACH_QUANTILE = 0.99
#: share of the arriving reflections (inside and beyond) that must lie beyond dmin
MIN_FRACTION = 0.02
#: reflections beyond dmin a suggestion needs
MIN_REFLECTIONS = 500


class BeyondDmin:
    """Running record of the reflections beyond a table's ``dmin``.

    Parameters
    ----------
    dmin
        The table's resolution limit, Å.
    """

    def __init__(self, dmin: float) -> None:
        if not dmin > 0:
            raise ValueError(f"dmin {dmin!r} must be > 0 Å")
        self.dmin = float(dmin)
        self._s_lo = 1.0 / self.dmin ** 2                     # 1/d² at the edge, Å⁻²
        self._s_hi = 1.0 / (REACH * self.dmin) ** 2
        self.count = np.zeros(N_SHELLS, np.int64)
        self.i_over_sigma = np.zeros(N_SHELLS, np.float64)   # sums of I/σ(I)
        self._n_sigma = np.zeros(N_SHELLS, np.int64)          # ... over this many
        #: reflections inside the table's resolution (rows or absences)
        self.inside = 0
        #: the highest resolution seen, Å (inf before any beyond dmin)
        self.d_min_seen = math.inf

    def add(self, d: np.ndarray, intensity: np.ndarray, sigma: np.ndarray, *,
            in_table: int = 0) -> int:
        """Count one crystal's reflections (or several crystals'); returns how many lie
        beyond dmin.

        Parameters
        ----------
        d
            Resolution of each reflection, Å.
        intensity, sigma
            Its I and σ(I); a σ ≤ 0 or not finite leaves it out of the mean I/σ (it is
            still counted).
        in_table
            Reflections more, not in ``d``, known to lie inside dmin (the store passes
            ``d`` of the reflections without a row only, and counts the others here).
        """
        d = np.asarray(d, np.float64)
        beyond = np.isfinite(d) & (d > 0) & (d < self.dmin)
        self.inside += int(in_table) + int(np.sum(np.isfinite(d) & (d >= self.dmin)))
        n = int(beyond.sum())
        if not n:
            return 0
        s = 1.0 / np.square(d[beyond])
        width = (self._s_hi - self._s_lo) / N_SHELLS
        shell = np.clip(((s - self._s_lo) / width).astype(np.int64), 0, N_SHELLS - 1)
        self.count += np.bincount(shell, minlength=N_SHELLS)
        i = np.asarray(intensity, np.float64)[beyond]
        sig = np.asarray(sigma, np.float64)[beyond]
        ok = np.isfinite(i) & np.isfinite(sig) & (sig > 0)
        self.i_over_sigma += np.bincount(shell[ok], i[ok] / sig[ok], minlength=N_SHELLS)
        self._n_sigma += np.bincount(shell[ok], minlength=N_SHELLS)
        self.d_min_seen = min(self.d_min_seen, float(d[beyond].min()))
        return n

    @property
    def n_beyond(self) -> int:
        return int(self.count.sum())

    @property
    def fraction(self) -> float:
        """Share of the arriving reflections that lie beyond dmin (0 before any)."""
        total = self.inside + self.n_beyond
        return self.n_beyond / total if total else 0.0

    def _edge(self, k: int) -> float:
        """d (Å) of the outer edge of fine shell ``k``."""
        return 1.0 / math.sqrt(self._s_lo + (k + 1) * (self._s_hi - self._s_lo) / N_SHELLS)

    def reach(self) -> float | None:
        """The resolution (Å) that :data:`REACH_QUANTILE` of the arriving reflections
        reach (the outer edge of the shell where that share is passed, rounded down to
        0.01 Å); None while fewer than 1 − :data:`REACH_QUANTILE` of them lie beyond dmin."""
        total = self.inside + self.n_beyond
        if not self.n_beyond or total == 0:
            return None
        need = max(0.0, (1.0 - REACH_QUANTILE) * total)    # may stay outside the suggestion
        outside = self.n_beyond - np.cumsum(self.count)    # beyond each shell's outer edge
        if self.n_beyond <= need:
            return None
        k = int(np.argmax(outside <= need))
        return math.floor(self._edge(k) * 100.0) / 100.0

    def suggested_dmin(self) -> float | None:
        """The ``dmin`` to restart with, or None: too few of the data lie beyond the table
        (:data:`MIN_FRACTION`, :data:`MIN_REFLECTIONS`)."""
        if self.n_beyond < MIN_REFLECTIONS or self.fraction < MIN_FRACTION:
            return None
        return self.reach()      # defined: MIN_FRACTION is above 1 − REACH_QUANTILE

    def shells(self) -> list[dict]:
        """Mean I/σ(I) per observation in :data:`N_REPORT_SHELLS` shells beyond dmin
        (``d_max``, ``d_min`` in Å, ``reflections``, ``mean_i_over_sigma``: None when empty),
        out to the shell holding the highest resolution seen."""
        if not self.n_beyond:
            return []
        last = int(np.nonzero(self.count)[0].max()) + 1
        per = max(1, math.ceil(last / N_REPORT_SHELLS))
        out = []
        for lo in range(0, last, per):
            hi = min(last, lo + per)
            n, with_sigma = int(self.count[lo:hi].sum()), int(self._n_sigma[lo:hi].sum())
            d_max = self.dmin if lo == 0 else self._edge(lo - 1)
            out.append({"d_max": round(d_max, 3), "d_min": round(self._edge(hi - 1), 3),
                        "reflections": n,
                        "mean_i_over_sigma": (float(self.i_over_sigma[lo:hi].sum()
                                                    / with_sigma) if with_sigma else None)})
        return out

    def to_dict(self) -> dict:
        """For the status JSON: ``reflections``, ``fraction``, ``d_min_seen`` (Å, None
        before any), ``reach`` (Å), ``suggested_dmin`` (Å or None) and ``shells``."""
        return {"dmin": self.dmin, "reflections": self.n_beyond,
                "fraction": self.fraction,
                "d_min_seen": None if math.isinf(self.d_min_seen) else self.d_min_seen,
                "reach": self.reach(), "suggested_dmin": self.suggested_dmin(),
                "shells": self.shells()}
