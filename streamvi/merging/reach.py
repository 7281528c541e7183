"""Whether the reported geometry bounds the signal: observations it puts beyond reach.

An indexer integrates every reflection it predicts, and its prediction may reach further from
the Ewald sphere than the crystal diffracts (CrystFEL's ``partial_sim`` predicts with a
Gaussian overlap whose reach runs to ~3 profile radii and computes intensities with
``xsphere``, zero beyond one radius).  Such observations are pure background, in a share that
falls with resolution, and the scales' fall-off record (change 10 of docs/model.md) reads that
share as a fall-off: B −10 to −19 Å² given to the amplitudes.  The merge's partiality check
(change 19) catches it from that trend, but only once the scales have learnt it: after a whole
``merge``, or tens of seconds after a stream's end in ``serve`` (change 23).

The data say it sooner, before any training.  :class:`ReachTally` takes every observation of
a crystal that reports its geometry (orientation, profile radius, bandwidth) and puts it,
with the reported values as they are, under the geometric partiality of
:mod:`streamvi.merging.model.partiality`: *beyond reach* where the reflection's sphere and the
band do not meet the Ewald sphere (``P`` at its floor), *near full* where ``P ≥ 0.5``.  If
the observations beyond reach carry no signal, their mean I/σ is 0 where the near-full ones'
at the same resolution is several: the reported geometry then bounds where the signal is,
and the merge should read it (:func:`reach_suspect`).  Measured over the quality matrix's
simulated cases (mean I/σ beyond reach over that of near-full observations at the same
resolutions, pooled): the overpredicted case −0.005 ± 0.001; every case whose profile is
Gaussian, Lorentzian or top-hat 0.05–0.99 (multiplicity 300: 0.051 ± 0.003, 3 Å: 0.053 ±
0.008); the real 5-HT2B stream of ../shared/data 0.17 ± 0.02.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from streamvi.merging.model.metadata import Column
from streamvi.merging.model.partiality import P_FLOOR, GeometricPartiality

#: resolution bins (equal in 1/d²) in which near-full and beyond-reach observations are
#: compared: the signal of both falls with resolution, and the share beyond reach too
REACH_BINS = 8
#: observations with at least this partiality (reported geometry) are near full
REACH_NEAR_P = 0.5
#: the observations beyond reach count as empty when their mean I/σ, with
#: :data:`REACH_SIGMAS` standard errors added, is below this share of the near-full ones'
REACH_SIGNAL_RATIO = 0.02
#: standard errors added to the ratio before it is compared
REACH_SIGMAS = 3.0
#: fewer observations beyond reach than this: no verdict
REACH_MIN_BEYOND = 1000
#: fewer crystals that report the geometry than this: no verdict (as the trend check)
REACH_MIN_CRYSTALS = 100
#: the tally reads the first this many crystals that report the geometry and no more: the
#: verdict is settled long before (the overpredicted case: ratio −0.005 ± 0.001 on 1,000),
#: and a stream of hours would otherwise pay the partiality of every observation at ingest
REACH_MAX_CRYSTALS = 2000

# log P at or below this is "beyond reach" (the floor of GeometricPartiality, a little above)
_BEYOND_LOG_P = math.log(P_FLOOR) + 1e-3
_NEAR_LOG_P = math.log(REACH_NEAR_P)


@dataclass(frozen=True)
class ReachEvidence:
    """What :class:`ReachTally` has seen (the observations of crystals reporting the geometry)."""

    #: crystals that reported an orientation, a profile radius and a bandwidth
    crystals: int
    #: their observations
    observations: int
    #: of them beyond the reach of the reported geometry
    beyond: int
    #: mean I/σ beyond reach over the mean I/σ of near-full observations at the same
    #: resolutions (NaN without both kinds in a bin)
    signal_ratio: float
    #: its standard error (from the spread of I/σ beyond reach)
    ratio_error: float

    @property
    def share_beyond(self) -> float:
        """Share of the observations beyond reach (0 without observations)."""
        return self.beyond / self.observations if self.observations else 0.0

    def history_line(self) -> str:
        """The MTZ history line of a merge switched by it (≤ 80 characters)."""
        return reach_history_line(self.share_beyond, self.signal_ratio)

    def summary(self) -> str:
        """The verdict in words, for the log."""
        return reach_summary(self.share_beyond, self.crystals, self.signal_ratio)


def reach_history_line(share_beyond: float, signal_ratio: float) -> str:
    """The MTZ history line of a merge the verdict switched (≤ 80 characters)."""
    return (f"geometric partiality on: {share_beyond:.1%} of observations beyond "
            f"reach, I/sig {signal_ratio:+.3f} of full")[:80]


def reach_summary(share_beyond: float, crystals: int, signal_ratio: float) -> str:
    """The verdict in words, for the log: what was seen on how many crystals."""
    return (f"{100 * share_beyond:.1f}% of the observations of {crystals} crystals that "
            "report orientations, profile radii and a bandwidth lie beyond the reach of that "
            f"geometry and carry no signal (mean I/sigma {signal_ratio:+.3f} of near-full "
            "observations')")


def reach_suspect(evidence: ReachEvidence) -> bool:
    """Whether the observations beyond the reported geometry's reach are empty: at least
    :data:`REACH_MIN_BEYOND` of them, on :data:`REACH_MIN_CRYSTALS` crystals or more, with
    a mean I/σ below :data:`REACH_SIGNAL_RATIO` of the near-full observations' at the same
    resolutions even after :data:`REACH_SIGMAS` standard errors are added."""
    return (evidence.crystals >= REACH_MIN_CRYSTALS and evidence.beyond >= REACH_MIN_BEYOND
            and math.isfinite(evidence.signal_ratio)
            and evidence.signal_ratio + REACH_SIGMAS * evidence.ratio_error
            < REACH_SIGNAL_RATIO)


class ReachTally:
    """Running sums of I/σ beyond reach and near full, per resolution bin.

    Parameters
    ----------
    inv_d2_max
        The table's ``1/dmin²`` (Å⁻²): the top of the bins.
    """

    def __init__(self, inv_d2_max: float):
        if not (inv_d2_max > 0 and math.isfinite(inv_d2_max)):
            raise ValueError(f"inv_d2_max = {inv_d2_max}: give the table's 1/dmin² (> 0)")
        self.inv_d2_max = float(inv_d2_max)
        self._partiality = GeometricPartiality()       # the reported values, as they are
        self.crystals = 0
        self.observations = 0
        # per bin: count, Σz, Σz² beyond reach; count, Σz near full
        self._beyond = np.zeros((3, REACH_BINS))
        self._near = np.zeros((2, REACH_BINS))

    @torch.no_grad()
    def add(self, metadata: np.ndarray, iobs: np.ndarray, sigiobs: np.ndarray,
            crystals: int) -> None:
        """Take ``crystals`` crystals' observations (all of them reporting the geometry).

        Parameters
        ----------
        metadata
            ``(n, N_METADATA)`` raw features
            (:func:`~streamvi.merging.features.reflection_metadata`).
        iobs, sigiobs
            ``(n,)`` intensities and their σ, as measured; observations with a σ that is
            not positive and finite, or an intensity that is not finite, are left out.
        crystals
            How many crystals these observations are.  Once :data:`REACH_MAX_CRYSTALS` are
            in (counted by whole calls: the store adds up to 256 at a time), later ones are
            not read.
        """
        if self.crystals >= REACH_MAX_CRYSTALS:
            return
        self.crystals += int(crystals)
        if len(iobs) == 0:
            return
        iobs = np.asarray(iobs, np.float64)
        sig = np.asarray(sigiobs, np.float64)
        ok = np.isfinite(iobs) & np.isfinite(sig) & (sig > 0)
        log_p = self._partiality(torch.from_numpy(np.ascontiguousarray(metadata,
                                                                        np.float32))).numpy()
        ok &= metadata[:, Column.PROFILE_RADIUS] > 0
        z = np.where(ok, iobs / np.where(ok, sig, 1.0), 0.0)
        bins = np.clip((metadata[:, Column.INV_D2] / self.inv_d2_max * REACH_BINS).astype(
            np.int64), 0, REACH_BINS - 1)
        self.observations += int(ok.sum())
        beyond = ok & (log_p <= _BEYOND_LOG_P)
        near = ok & (log_p >= _NEAR_LOG_P)
        for sums, sel, powers in ((self._beyond, beyond, (0, 1, 2)), (self._near, near, (0, 1))):
            for row, p in enumerate(powers):
                np.add.at(sums[row], bins[sel], z[sel] ** p)

    def evidence(self) -> ReachEvidence:
        """The tally as it stands (:class:`ReachEvidence`)."""
        return reach_evidence_of(self.state_vector())

    def state_vector(self) -> np.ndarray:
        """The tally's counts and sums as one vector of :data:`REACH_VECTOR_SIZE` floats.

        Tallies of disjoint sets of crystals (the ranks of a data-parallel merge) add up:
        :func:`reach_evidence_of` of their vectors' sum is the evidence of all of them.
        """
        return np.concatenate([[float(self.crystals), float(self.observations)],
                               self._beyond.ravel(), self._near.ravel()])


#: length of :meth:`ReachTally.state_vector`: crystals, observations, then per bin the
#: count, Σz and Σz² beyond reach and the count and Σz near full
REACH_VECTOR_SIZE = 2 + 5 * REACH_BINS


def reach_evidence_of(vector: np.ndarray | list[float]) -> ReachEvidence:
    """The evidence of a tally's :meth:`~ReachTally.state_vector` (or of several summed)."""
    v = np.asarray(vector, np.float64)
    if v.shape != (REACH_VECTOR_SIZE,):
        raise ValueError(f"a reach tally's vector has {REACH_VECTOR_SIZE} values, not "
                         f"{v.shape}")
    n_b, s_b, ss_b = v[2:2 + 3 * REACH_BINS].reshape(3, REACH_BINS)
    n_n, s_n = v[2 + 3 * REACH_BINS:].reshape(2, REACH_BINS)
    both = (n_b > 0) & (n_n > 0)
    if not both.any():
        ratio = error = float("nan")
    else:
        # the near-full signal expected at the beyond-reach observations' resolutions
        expected = float(np.sum(n_b[both] * s_n[both] / n_n[both]))
        spread = float(np.sum(ss_b[both] - s_b[both] ** 2 / n_b[both]))
        ratio = float(np.sum(s_b[both])) / expected if expected > 0 else float("nan")
        error = math.sqrt(max(spread, 0.0)) / expected if expected > 0 else float("nan")
    return ReachEvidence(int(round(v[0])), int(round(v[1])), int(round(n_b.sum())), ratio,
                         error)
