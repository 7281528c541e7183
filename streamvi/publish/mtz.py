"""Merged structure factors as MTZ: snapshot → ``rs.DataSet`` → file, written atomically.

Columns (only reflections with at least one observation are written):

- ``H K L``; ``F SIGF`` (amplitudes, type F/Q); ``I SIGI`` (intensities, J/Q); ``N`` (number of
  observations, I);
- anomalous mode: ``F(+) SIGF(+) F(-) SIGF(-)`` (G/L) and ``I(+) SIGI(+) I(-) SIGI(-)`` (K/M),
  ``N(+) N(-)``; ``F``/``I`` are then the Bijvoet means;
- half datasets: ``F_half1 SIGF_half1 F_half2 SIGF_half2`` (and ``I_half…``), so CC½ can be
  recomputed by any program.

A merge of several conditions (pump–probe) writes one such file per condition and, per
condition against the reference, a difference file (:func:`write_difference_mtz`): ``DF
SIGDF`` (F/Q; SIGDF calibrated on the half-datasets' scatter), the q-weight ``W`` (W), ``WDF`` (F) and the reference's ``F_DARK SIGF_DARK``.

The file is written atomically (:func:`streamvi.atomic.atomic_write`: a temporary name in the
target directory, fsync, renamed over the target), so a reader never sees a partial file.  It gets the permissions the umask
allows (0644 under umask 022), like any file the user writes: the shift crew's group can
read it.  The MTZ's project, crystal and dataset names and its wavelength come from the
merged run (:class:`MtzInfo`).
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping

import numpy as np
import reciprocalspaceship as rs

from streamvi import __version__
from streamvi.atomic import atomic_write
from streamvi.snapshot import snapshot_to_dataset


#: Longest project, crystal or dataset name written (CCP4 programs show 64 characters).
MAX_NAME = 64
_UNSAFE = re.compile(r"[^A-Za-z0-9_.+-]+")


@dataclass(frozen=True)
class MtzInfo:
    """What an MTZ says about where its data came from.

    Attributes
    ----------
    project, crystal, dataset
        The MTZ dataset's names (programs such as CCP4i and Phenix show them).
    wavelength_A
        Wavelength of the data, Å (0 or None: unknown, as MTZ writes it).
    """

    project: str = "streamvi"
    crystal: str = "streamvi"
    dataset: str = "streamvi"
    wavelength_A: float | None = None

    @classmethod
    def from_runs(cls, runs: Mapping[str, int], wavelength_A: float | None) -> "MtzInfo":
        """Names from the runs merged (``run name → crystals``, the most frequent first);
        several runs: ``"<most frequent>+N more"``.  Names come from the network, so only
        letters, digits and ``_.+-`` are kept."""
        if not runs:
            return cls(wavelength_A=wavelength_A)
        ordered = sorted(runs, key=lambda r: -runs[r])
        suffix = f"+{len(ordered) - 1} more" if len(ordered) > 1 else ""
        name = safe_name(ordered[0], MAX_NAME - len(suffix)) + suffix
        return cls(crystal=name, dataset=name, wavelength_A=wavelength_A)


def safe_name(text: str, limit: int = MAX_NAME) -> str:
    """``text`` reduced to letters, digits and ``_.+-`` (runs of others become ``_``), at
    most ``limit`` characters; ``streamvi`` when nothing is left."""
    name = _UNSAFE.sub("_", str(text)).strip("_.")[:limit]
    return name or "streamvi"


def write_mtz(ds: rs.DataSet, path: str | os.PathLike, *, history: list[str] | None = None,
              info: MtzInfo | None = None) -> Path:
    """Write ``ds`` to ``path`` atomically (temporary file in the same directory + rename).

    Parameters
    ----------
    ds
        The merged table.
    path
        Target file; its directory must exist and be writable.
    history
        Lines for the MTZ history (at most 30 are kept by the format).
    info
        Names and wavelength of the data; default :class:`MtzInfo` (names ``streamvi``,
        wavelength unknown).

    Returns
    -------
    pathlib.Path
        The path written.
    """
    path = Path(path)
    info = info or MtzInfo()
    mtz = ds.to_gemmi(project_name=info.project, crystal_name=info.crystal,
                      dataset_name=info.dataset)
    for dataset in mtz.datasets:
        dataset.wavelength = float(info.wavelength_A or 0.0)
    lines = [f"streamvi {__version__}"] + list(history or [])
    mtz.history = [line[:80] for line in lines][:30]
    return atomic_write(path, lambda tmp: mtz.write_to_file(str(tmp)))


def write_snapshot_mtz(snapshot, path: str | os.PathLike, *, info: MtzInfo | None = None
                       ) -> Path:
    """Convenience: :func:`snapshot_to_dataset` + :func:`write_mtz` with a history line."""
    sp = snapshot.space
    hist = [f"snapshot {snapshot.snapshot_id} step {snapshot.step} images {snapshot.n_images}",
            f"{sp.space_group.hm} dmin {sp.dmin:.2f} A anomalous {sp.anomalous}"]
    stats = getattr(snapshot, "stats", None)
    # the shell figures with their pairs and intervals, after what made the file
    lines = stats.history_lines() if hasattr(stats, "history_lines") else []
    return write_mtz(snapshot_to_dataset(snapshot), path,
                     history=hist + list(snapshot.history) + lines, info=info)


#: What :class:`~streamvi.publish.mtz_files.MtzSnapshots` asks for each file's info.
InfoSource = Callable[[], MtzInfo | None]


def difference_dataset(light, dark, *, alpha: float | None = None) -> rs.DataSet:
    """``light − dark`` of two snapshots of one merge (conditions) as an ``rs.DataSet``.

    Reflections observed in both: ``DF``, ``SIGDF`` (the mean-field ``√(σ_light² +
    σ_dark²)`` scaled per resolution shell to the scatter of ΔF that the two half-datasets
    show, :func:`streamvi.quality.difference.calibrate_sigma`; the mean-field value where
    too few reflections are in both halves), the q-weight ``W`` and ``WDF = W·DF`` (under
    the coupled prior ``DF`` given back its size per shell, ``WDF`` of the ΔF as merged:
    :mod:`streamvi.quality.difference`), and ``F_DARK`` ``SIGF_DARK`` (the reference
    condition's amplitudes, for maps with its phases).  In anomalous mode the Bijvoet means
    are differenced.  The calibration is in ``attrs["sigma_calibration"]``.
    """
    from streamvi.quality.difference import DEFAULT_ALPHA, difference_coefficients

    a, b = snapshot_to_dataset(light), snapshot_to_dataset(dark)
    both = a.index.intersection(b.index)
    a, b = a.loc[both], b.loc[both]
    d = a.compute_dHKL()["dHKL"].to_numpy(np.float64)

    def col(ds, name):
        return ds[name].to_numpy(np.float64)

    gains = None
    if getattr(light, "delta_gain", None) is not None:
        gains = tuple(_per_reflection(light, g).reindex(both).to_numpy(np.float64)
                      for g in light.delta_gain)
    diff = difference_coefficients(
        col(a, "F"), col(a, "SIGF"), col(b, "F"), col(b, "SIGF"), d,
        alpha=DEFAULT_ALPHA if alpha is None else alpha,
        half_differences=(col(a, "F_half1") - col(b, "F_half1"),
                          col(a, "F_half2") - col(b, "F_half2")),
        gains=gains)
    out = rs.DataSet({"DF": diff.DF, "SIGDF": diff.SIGDF, "W": diff.W, "WDF": diff.WDF,
                      "F_DARK": col(b, "F"), "SIGF_DARK": col(b, "SIGF")},
                     index=both, cell=a.cell, spacegroup=a.spacegroup, merged=True)
    out = out.astype({"DF": "SFAmplitude", "SIGDF": "Stddev", "W": "Weight",
                      "WDF": "SFAmplitude", "F_DARK": "SFAmplitude", "SIGF_DARK": "Stddev"})
    out.attrs["sigma_calibration"] = diff.calibration
    out.attrs["gain_correction"] = diff.gain
    return out


def _per_reflection(snapshot, values: np.ndarray):
    """``values`` per row of ``snapshot``'s space as a series indexed by ``H, K, L`` like
    :func:`~streamvi.snapshot.snapshot_to_dataset` (anomalous: the mean of the two Bijvoet
    mates' rows, which share their ``hkl``)."""
    import pandas as pd

    hkl = snapshot.space.hkl
    index = pd.MultiIndex.from_arrays([hkl[:, 0], hkl[:, 1], hkl[:, 2]], names=["H", "K", "L"])
    series = pd.Series(np.asarray(values, np.float64), index=index)
    if snapshot.space.anomalous:
        series = series.groupby(level=["H", "K", "L"]).mean()
    return series


def _calibration_history(calibration) -> list[str]:
    """MTZ history lines (80 characters at most) saying how SIGDF was scaled."""
    if calibration is None:
        return []
    if not calibration.calibrated:
        return ["SIGDF: mean-field sqrt(s2_light + s2_dark), too few half-set pairs"]
    return ["SIGDF: mean-field sigma x half-set scatter factor by shell, low to high:",
            " ".join(f"{x:.2f}" for x in calibration.factors)[:80]]


def _gain_history(gain) -> list[str]:
    """MTZ history lines (80 characters at most) saying how DF was scaled for the coupled
    prior's shrinkage."""
    if gain is None:
        return []
    return ["DF, SIGDF x by shell for the coupled prior's shrinkage, low to high:",
            " ".join("-" if not np.isfinite(x) else f"{x:.2f}" for x in gain.shell_factor)[:80]]


def write_difference_mtz(light, dark, path: str | os.PathLike, *, names: tuple[str, str],
                         info: MtzInfo | None = None, alpha: float | None = None,
                         dataset: rs.DataSet | None = None) -> Path:
    """Write :func:`difference_dataset` of two snapshots to ``path`` atomically;
    ``names`` are the two conditions' names (``(light, dark)``) for the history;
    ``dataset``: that data set already made (with the same ``alpha``)."""
    from streamvi.quality.difference import DEFAULT_ALPHA

    a = DEFAULT_ALPHA if alpha is None else alpha
    hist = [f"DF = F({names[0]}) - F({names[1]}), step {light.step}",
            f"images {light.n_images} {names[0]}, {dark.n_images} {names[1]}",
            f"WDF = W*DF, W = 1/(1 + s2/<s2> + {a:g} DF2/<DF2>) per shell",
            "(Ursby & Bourgeois 1997; Ren et al. 2001)"]
    if dataset is None:
        dataset = difference_dataset(light, dark, alpha=alpha)
    hist += _calibration_history(dataset.attrs.get("sigma_calibration"))
    hist += _gain_history(dataset.attrs.get("gain_correction"))
    if dataset.attrs.get("gain_correction") is not None:
        hist.append("WDF: W times DF as merged (before that factor; the map's coefficient)")
    return write_mtz(dataset, path, history=hist, info=info)
