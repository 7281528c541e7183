"""Merged structure factors as MTZ: snapshot → ``rs.DataSet`` → file, written atomically.

Columns (only reflections with at least one observation are written):

- ``H K L``; ``F SIGF`` (amplitudes, type F/Q); ``I SIGI`` (intensities, J/Q); ``N`` (number of
  observations, I);
- anomalous mode: ``F(+) SIGF(+) F(-) SIGF(-)`` (G/L) and ``I(+) SIGI(+) I(-) SIGI(-)`` (K/M),
  ``N(+) N(-)``; ``F``/``I`` are then the Bijvoet means;
- half datasets: ``F_half1 SIGF_half1 F_half2 SIGF_half2`` (and ``I_half…``), so CC½ can be
  recomputed by any program.

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


def snapshot_to_dataset(snapshot) -> rs.DataSet:
    """The merge of a :class:`~streamvi.merging.engine.MergeSnapshot` as an ``rs.DataSet``.

    Indexed by ``H, K, L`` in the reciprocal ASU of the snapshot's space group.
    """
    sp = snapshot.space
    obs = snapshot.obs_count
    tables = snapshot.tables
    if not sp.anomalous:
        keep = obs[0] > 0
        cols: dict[str, tuple[np.ndarray, object]] = {
            "F": (tables["all"]["F"][keep], "SFAmplitude"),
            "SIGF": (tables["all"]["SIGF"][keep], "Stddev"),
            "I": (tables["all"]["I"][keep], "Intensity"),
            "SIGI": (tables["all"]["SIGI"][keep], "Stddev"),
            "N": (obs[0][keep], "MTZInt"),
        }
        hkl = sp.hkl[keep]
        for t in ("half1", "half2"):
            seen = obs[1 if t == "half1" else 2][keep] > 0
            for c, dt in (("F", "SFAmplitude"), ("SIGF", "Stddev"),
                          ("I", "Intensity"), ("SIGI", "Stddev")):
                cols[f"{c}_{t}"] = (np.where(seen, tables[t][c][keep], np.nan), dt)
        return _dataset(hkl, cols, sp)
    return _anomalous_dataset(snapshot)


def _dataset(hkl: np.ndarray, cols: dict, sp) -> rs.DataSet:
    data = {"H": hkl[:, 0], "K": hkl[:, 1], "L": hkl[:, 2]}
    data.update({name: values for name, (values, _) in cols.items()})
    ds = rs.DataSet(data, cell=sp.cell, spacegroup=sp.space_group, merged=True)
    ds = ds.astype({"H": "HKL", "K": "HKL", "L": "HKL"})
    ds = ds.astype({name: dt for name, (_, dt) in cols.items()})
    return ds.set_index(["H", "K", "L"])


def _anomalous_dataset(snapshot) -> rs.DataSet:
    """Anomalous table: one MTZ row per hkl with the two Bijvoet mates side by side."""
    sp = snapshot.space
    obs = snapshot.obs_count
    key = _key(sp.hkl)
    uniq, inv = np.unique(key, return_inverse=True)
    n = uniq.shape[0]
    first_row = np.zeros(n, np.int64)
    first_row[inv[::-1]] = np.arange(inv.shape[0])[::-1]
    hkl = sp.hkl[first_row]
    plus = sp.friedel > 0
    rows_p = np.full(n, -1)
    rows_m = np.full(n, -1)
    rows_p[inv[plus]] = np.nonzero(plus)[0]
    rows_m[inv[~plus]] = np.nonzero(~plus)[0]
    centric = sp.centric[first_row]
    # centric reflections have one row: it serves as both mates
    rows_m = np.where(centric & (rows_m < 0), rows_p, rows_m)

    def take(table: str, col: str, rows: np.ndarray, t: int) -> np.ndarray:
        v = snapshot.tables[table][col][np.maximum(rows, 0)].astype(np.float64)
        seen = (rows >= 0) & (obs[t][np.maximum(rows, 0)] > 0)
        return np.where(seen, v, np.nan)

    n_p = np.where(rows_p >= 0, obs[0][np.maximum(rows_p, 0)], 0)
    n_m = np.where((rows_m >= 0) & ~centric, obs[0][np.maximum(rows_m, 0)], 0)
    keep = (n_p + n_m) > 0
    cols: dict[str, tuple[np.ndarray, object]] = {}
    for t_name, t, suffix in (("all", 0, ""), ("half1", 1, "_half1"), ("half2", 2, "_half2")):
        fp, fm = take(t_name, "F", rows_p, t), take(t_name, "F", rows_m, t)
        sfp, sfm = take(t_name, "SIGF", rows_p, t), take(t_name, "SIGF", rows_m, t)
        ip, im = take(t_name, "I", rows_p, t), take(t_name, "I", rows_m, t)
        sip, sim = take(t_name, "SIGI", rows_p, t), take(t_name, "SIGI", rows_m, t)
        f, sf = _bijvoet_mean(fp, sfp, fm, sfm)
        i, si = _bijvoet_mean(ip, sip, im, sim)
        cols[f"F{suffix}"] = (f[keep], "SFAmplitude")
        cols[f"SIGF{suffix}"] = (sf[keep], "Stddev")
        cols[f"I{suffix}"] = (i[keep], "Intensity")
        cols[f"SIGI{suffix}"] = (si[keep], "Stddev")
        if t == 0:
            cols["N"] = ((n_p + n_m)[keep], "MTZInt")
            cols["F(+)"] = (fp[keep], "FriedelSFAmplitude")
            cols["SIGF(+)"] = (sfp[keep], "StddevFriedelSF")
            cols["F(-)"] = (fm[keep], "FriedelSFAmplitude")
            cols["SIGF(-)"] = (sfm[keep], "StddevFriedelSF")
            cols["I(+)"] = (ip[keep], "FriedelIntensity")
            cols["SIGI(+)"] = (sip[keep], "StddevFriedelI")
            cols["I(-)"] = (im[keep], "FriedelIntensity")
            cols["SIGI(-)"] = (sim[keep], "StddevFriedelI")
            cols["N(+)"] = (n_p[keep], "MTZInt")
            cols["N(-)"] = (n_m[keep], "MTZInt")
    return _dataset(hkl[keep], cols, sp)


def _bijvoet_mean(a: np.ndarray, sa: np.ndarray, b: np.ndarray, sb: np.ndarray
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Mean of two mates (either may be missing) and its σ."""
    both = np.isfinite(a) & np.isfinite(b)
    mean = np.where(both, 0.5 * (a + b), np.where(np.isfinite(a), a, b))
    sig = np.where(both, 0.5 * np.sqrt(sa * sa + sb * sb), np.where(np.isfinite(a), sa, sb))
    return mean, sig


def _key(hkl: np.ndarray) -> np.ndarray:
    h = hkl.astype(np.int64) + 2048
    return (h[:, 0] << 24) | (h[:, 1] << 12) | h[:, 2]


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


#: What :class:`~streamvi.publish.snapshots.MtzSnapshots` asks for each file's info.
InfoSource = Callable[[], MtzInfo | None]
