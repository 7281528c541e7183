"""CrystFEL's mergers run beside ``streamvi merge`` on the same stream, judged against the truth.

A peer we run, not figures we quote: the script finds an installed CrystFEL (``--crystfel-bin
DIR``, else ``$STREAMVI_CRYSTFEL_BIN``, else ``PATH``; without one it prints a single JSON line
saying so and exits 0), makes or takes a stream whose true intensities are known, merges it

- with ``process_hkl`` (a plain mean, no scaling) and ``process_hkl --scale``,
- with ``partialator --model=xsphere --iterations=3`` (scaling and post-refinement of the
  xsphere partiality model; ``-w`` with the lattice's point group where the space group has
  an indexing ambiguity) and ``partialator --model=unity --iterations=3``,
- with ``streamvi merge`` (the CLI, its defaults; ``--space-group`` and ``--cell`` given),
- with ``streamvi serve`` fed by ``streamvi send --rate R`` over loopback ZeroMQ (its
  defaults; ``--space-group``, ``--cell``, ``--dmin`` and ``--cpu-threads`` given), its
  ``latest.mtz`` judged ``--serve-after`` seconds after the stream's end (one line each,
  ``after_stream_s``; ``partiality_switch_after_stream_s`` when the service's partiality
  check switched it to the geometric partiality, docs/model.md change 23),

and prints one JSON line per merger: CC(F, truth) overall (``cc_F``), CC after one fitted
relative B (``cc_F_fitted_B``, with ``fitted_B``), CC in 10 resolution shells of equal size
(``cc_F_shells``, low to high, on the complete ASU; ``cc_F_top_shell``), completeness overall
and in the top shell, seconds, the machine and the CrystFEL version.  Amplitudes are judged:
F = sqrt(max(I, 0)) for CrystFEL's intensities, the truth likewise.  Both CrystFEL mergers
run with ``--no-polarisation``: neither simulator puts a polarisation factor in the data.

Cases:

- ``--case partial_sim`` (default): CrystFEL's own simulator.  The script writes a
  single-panel geometry (2000 x 2000 px of 100 µm, 9.5 keV, camera length set so the corners
  lie at ``--dmin``, ``--bandwidth``) and a cell file to the work directory, runs
  ``partial_sim -y <Laue class> -n N -r truth.hkl`` (one thread: its output then depends on
  nothing but its arguments) and judges against the saved random intensities.  With
  ``--reindex-fraction f`` a random share f of the crystals is re-labelled by the space
  group's indexing-ambiguity operator (``k,h,-l`` in P 4₃), as an indexer's arbitrary choice
  of setting would; each merge is then judged in whichever setting of the truth fits it best.
- ``--case streamvi_sim``: streamvi's own simulator, ``streamvi simulate --images N --seed S``
  (DESIGN.md section 9: 2,000 images, seed 0), judged against its truth MTZ (FMODEL).  The
  CrystFEL mergers also run in the acentric point group (``-y 422``) and ``streamvi merge``
  with ``--anomalous`` for CCanom (``cc_anom``); disable with ``--no-anomalous``.
- ``--stream S --truth T``: an existing stream and its truth (.hkl or an MTZ with FMODEL or
  I(+)/I(-)); give ``--space-group``, ``--cell`` and ``--dmin``.

Command lines (2 CPU cores; the partialator runs dominate, about 2 min per 1,000 crystals)::

    python benchmarks/peer_crystfel.py --crystfel-bin /work/peers/crystfel/bin \\
        --case partial_sim --crystals 5000
    python benchmarks/peer_crystfel.py --crystfel-bin DIR --case partial_sim --crystals 1000
    python benchmarks/peer_crystfel.py --crystfel-bin DIR --case partial_sim --crystals 1000 \\
        --space-group 'P 43' --reindex-fraction 0.5
    python benchmarks/peer_crystfel.py --crystfel-bin DIR --case streamvi_sim --images 2000 --seed 0
    python benchmarks/peer_crystfel.py --crystfel-bin DIR --stream X.stream --truth T.hkl \\
        --space-group 'P 43 21 2' --cell 79.1 79.1 37.9 90 90 90 --dmin 1.8

``--workdir DIR`` keeps the geometry, streams, merges and logs (default: a temporary
directory, removed at the end), and with ``--resume`` a rerun reuses every simulation and
merge already there with its recorded seconds (``"reused": true``); ``--mergers`` picks a
subset, ``--anomalous-mergers`` those that also merge Bijvoet mates apart; ``--threads`` is
CrystFEL's ``-j`` (default: every core, as ``streamvi merge`` uses them).  To measure a fixed
commit of streamvi while the checkout moves: ``git archive C | tar -x -C DIR``, then run with
``PYTHONPATH=DIR:DIR/plugins/sim STREAMVI_COMMIT=C`` (the lines carry ``streamvi_commit``).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _machine import machine_name, streamvi_commit  # noqa: E402 - shared with the others

import gemmi  # noqa: E402
import numpy as np  # noqa: E402
import reciprocalspaceship as rs  # noqa: E402

#: The CrystFEL programs this benchmark runs.
CRYSTFEL_PROGRAMS = ("partial_sim", "process_hkl", "partialator")
#: Every merger, in the order they run.
MERGERS = ("process_hkl", "process_hkl_scale", "partialator_xsphere", "partialator_unity",
           "streamvi_merge", "streamvi_serve")
#: hc in keV·Å: λ(Å) = HC_KEV_A / E(keV).
HC_KEV_A = 12.398419843320026
#: CrystFEL's lattice point groups → their rotation subgroups (partialator -w when anomalous).
ROTATION_GROUP = {"-1": "1", "2/m": "2", "2/m_uab": "2_uab", "mmm": "222", "4/mmm": "422",
                  "6/mmm": "622", "-3m1_H": "321_H", "m-3m": "432"}
#: Resolution shells of the per-shell CC, and of the relative-B fit.
N_SHELLS, N_B_SHELLS = 10, 20


# ----------------------------------------------------------------------------- CrystFEL


def find_crystfel(bin_dir: str | None) -> Path | None:
    """The directory holding CrystFEL's programs, or None.

    Parameters
    ----------
    bin_dir
        ``--crystfel-bin``; else ``$STREAMVI_CRYSTFEL_BIN``; else the directory of
        ``partialator`` on ``PATH``.

    Returns
    -------
    Path or None
        A directory with every program of :data:`CRYSTFEL_PROGRAMS`, executable.
    """
    candidates = [bin_dir, os.environ.get("STREAMVI_CRYSTFEL_BIN")]
    on_path = shutil.which("partialator")
    if on_path:
        candidates.append(str(Path(on_path).parent))
    for c in candidates:
        if c and all(os.access(Path(c) / p, os.X_OK) for p in CRYSTFEL_PROGRAMS):
            return Path(c)
    return None


def crystfel_version(bin_dir: Path) -> str:
    """``partialator --version``'s version string, e.g. ``"0.10.2"``."""
    out = subprocess.run([str(bin_dir / "partialator"), "--version"], capture_output=True,
                         text=True, check=False).stdout
    m = re.search(r"CrystFEL:\s*(\S+)", out)
    return m.group(1) if m else "unknown"


def crystfel_point_groups(sg: gemmi.SpaceGroup) -> tuple[str, str, str]:
    """CrystFEL's names for ``sg``'s Laue class, point group and lattice point group.

    Returns
    -------
    laue, point_group, holohedry : str
        e.g. ``("4/mmm", "422", "4/mmm")`` for P 4₃2₁2 and ``("4/m", "4", "4/mmm")`` for
        P 4₃; the third is partialator's ``-w`` (the apparent symmetry) where it differs
        from the first.  Monoclinic groups get CrystFEL's ``_uab`` (unique axis b); trigonal
        ones ``-3m1``/``321`` or ``-31m``/``312`` after the position of the two-fold axes.
    """
    laue, pg = sg.laue_str(), sg.point_group_hm()
    system = sg.crystal_system_str()
    holo = {"triclinic": "-1", "monoclinic": "2/m", "orthorhombic": "mmm",
            "tetragonal": "4/mmm", "trigonal": "6/mmm", "hexagonal": "6/mmm",
            "cubic": "m-3m"}[system]
    if system == "monoclinic" and re.match(r"^\S+ 1 \S+ 1$", sg.hm):
        laue, pg, holo = laue + "_uab", pg + "_uab", holo + "_uab"
    if system == "trigonal":
        if sg.hm.startswith("R") and sg.ext == "R":
            raise ValueError(f"{sg.hm} in the rhombohedral setting: use hexagonal axes")
        # CrystFEL names where the two-fold axes lie: P 3 2 1 -> 321_H, P 3 1 2 -> 312_H
        first_is_1 = len(sg.hm.split()) > 2 and sg.hm.split()[2] == "1"
        names = {"32": "312" if first_is_1 else "321", "3m": "31m" if first_is_1 else "3m1",
                 "-3m": "-31m" if first_is_1 else "-3m1"}
        laue, pg = names.get(laue, laue) + "_H", names.get(pg, pg) + "_H"
        if sg.hm.startswith("R"):
            holo = "-3m1_H"
    return laue, pg, holo


# ----------------------------------------------------------------------------- files


def write_geometry(path: Path, *, dmin: float, photon_energy_ev: float, bandwidth: float,
                   pixels: int = 2000, pixel_m: float = 1e-4) -> float:
    """A single square panel, beam centred, whose corners lie at ``dmin``.

    ``partial_sim`` predicts reflections up to the highest resolution the detector reaches
    (its corners), so the camera length sets the resolution of the data.

    Returns
    -------
    float
        The camera length, m (rounded up to 0.1 mm, so the corners lie just below ``dmin``'s
        1/d and every reflection has d >= ``dmin``).
    """
    lam = HC_KEV_A / (photon_energy_ev / 1000.0)
    two_theta = 2.0 * math.asin(lam / (2.0 * dmin))
    corner = math.hypot(pixels / 2 * pixel_m, pixels / 2 * pixel_m)
    clen = math.ceil(corner / math.tan(two_theta) * 1e4) / 1e4
    half = pixels // 2
    path.write_text(
        f"; single panel, {pixels} x {pixels} px of {pixel_m * 1e6:g} um, beam centred;\n"
        f"; corners at {dmin:g} A (peer_crystfel.py)\n"
        f"photon_energy = {photon_energy_ev:g}\nbandwidth = {bandwidth:g}\n"
        f"clen = {clen:.4f}\nadu_per_photon = 1\nres = {1.0 / pixel_m:g}\n\n"
        f"p0/min_fs = 0\np0/max_fs = {pixels - 1}\np0/min_ss = 0\np0/max_ss = {pixels - 1}\n"
        f"p0/corner_x = {-half}\np0/corner_y = {-half}\np0/fs = x\np0/ss = y\n")
    return clen


def write_cell(path: Path, sg: gemmi.SpaceGroup, cell: gemmi.UnitCell) -> None:
    """A CrystFEL unit cell file for ``sg`` and ``cell``."""
    lattice = {"triclinic": "triclinic", "monoclinic": "monoclinic",
               "orthorhombic": "orthorhombic", "tetragonal": "tetragonal",
               "trigonal": "hexagonal", "hexagonal": "hexagonal",
               "cubic": "cubic"}[sg.crystal_system_str()]
    if sg.crystal_system_str() == "trigonal" and sg.hm.startswith("R"):
        lattice = "rhombohedral" if sg.ext == "R" else "hexagonal"
    centring = sg.hm[0]
    axis = "b" if lattice == "monoclinic" and re.match(r"^\S+ 1 \S+ 1$", sg.hm) else "c"
    path.write_text(
        "CrystFEL unit cell file version 1.0\n\n"
        f"lattice_type = {lattice}\ncentering = {centring}\nunique_axis = {axis}\n\n"
        f"a = {cell.a:g} A\nb = {cell.b:g} A\nc = {cell.c:g} A\n"
        f"al = {cell.alpha:g} deg\nbe = {cell.beta:g} deg\nga = {cell.gamma:g} deg\n")


def read_hkl(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, str]:
    """A CrystFEL reflection list (``.hkl``, version 2.0).

    Returns
    -------
    hkl : np.ndarray
        ``(n, 3)`` int32 Miller indices, as written (CrystFEL's ASU of its point group).
    intensity, sigma : np.ndarray
        ``(n,)`` float64.
    symmetry : str
        The ``Symmetry:`` line, e.g. ``"4/mmm"`` (empty when absent).
    """
    hkl, inten, sig, sym = [], [], [], ""
    in_table = False
    with open(path) as fh:
        for line in fh:
            if line.startswith("Symmetry:"):
                sym = line.split(":", 1)[1].strip()
            elif line.lstrip().startswith("h ") and "sigma(I)" in line:
                in_table = True
            elif line.startswith("End of reflections"):
                break
            elif in_table and line.strip():
                t = line.split()
                hkl.append((int(t[0]), int(t[1]), int(t[2])))
                inten.append(float(t[3]))
                sig.append(float(t[5]))
    return (np.asarray(hkl, dtype=np.int32).reshape(-1, 3), np.asarray(inten, np.float64),
            np.asarray(sig, np.float64), sym)


_REFL_ROW = re.compile(r"^\s*(-?\d+)\s+(-?\d+)\s+(-?\d+)(\s.*)?$")
_VECTOR = re.compile(r"^(astar|bstar|cstar) = (\S+) (\S+) (\S+) nm\^-1")


def reindex_stream(src: Path, dst: Path, op: np.ndarray, fraction: float,
                   seed: int) -> int:
    """Re-label a random share of a stream's crystals by a reindexing operator.

    Each chosen crystal gets ``hkl' = op @ hkl`` on every reflection and the reciprocal basis
    that keeps every lattice point where it was (``A*' = op^-T A*``, rows a*, b*, c*), so
    predictions, and partialator's partialities, are unchanged: what an indexer reports when
    it picks the other setting.

    Returns
    -------
    int
        Crystals re-labelled.
    """
    rng = np.random.default_rng(seed)
    m = np.asarray(op, dtype=np.float64)
    basis_op = np.linalg.inv(m).T
    n_done = 0
    with open(src) as fin, open(dst, "w") as fout:
        crystal: list[str] | None = None
        for line in fin:
            if line.startswith("--- Begin crystal"):
                crystal = [line]
                continue
            if crystal is None:
                fout.write(line)
                continue
            crystal.append(line)
            if not line.startswith("--- End crystal"):
                continue
            if rng.random() < fraction:
                crystal = _reindex_crystal(crystal, op, basis_op)
                n_done += 1
            fout.writelines(crystal)
            crystal = None
    return n_done


def _reindex_crystal(lines: list[str], op: np.ndarray, basis_op: np.ndarray) -> list[str]:
    vecs: dict[str, np.ndarray] = {}
    for line in lines:
        mv = _VECTOR.match(line)
        if mv:
            vecs[mv.group(1)] = np.array([float(x) for x in mv.group(2, 3, 4)])
    astar = np.stack([vecs["astar"], vecs["bstar"], vecs["cstar"]])
    new = basis_op @ astar
    real = np.linalg.inv(new).T                      # rows a, b, c in nm
    lengths = np.linalg.norm(real, axis=1)

    def angle(i: int, j: int) -> float:
        return math.degrees(math.acos(real[i] @ real[j] / (lengths[i] * lengths[j])))

    out, in_refl = [], False
    for line in lines:
        if line.startswith("Cell parameters"):
            line = (f"Cell parameters {lengths[0]:.5f} {lengths[1]:.5f} {lengths[2]:.5f} nm, "
                    f"{angle(1, 2):.5f} {angle(0, 2):.5f} {angle(0, 1):.5f} deg\n")
        elif _VECTOR.match(line):
            name = line[:5]
            v = new["abc".index(name[0])]
            line = f"{name} = {v[0]:+.7f} {v[1]:+.7f} {v[2]:+.7f} nm^-1\n"
        elif line.startswith("Reflections measured after indexing"):
            in_refl = True
        elif line.startswith("End of reflections"):
            in_refl = False
        elif in_refl:
            mr = _REFL_ROW.match(line)
            if mr:
                h = op @ np.array([int(x) for x in mr.group(1, 2, 3)])
                line = f"{h[0]:4d} {h[1]:4d} {h[2]:4d}{mr.group(4) or ''}\n"
        out.append(line)
    return out


# ----------------------------------------------------------------------------- tables


@dataclass
class Truth:
    """The true amplitudes in the ASU of ``sg`` (no systematic absences)."""

    sg: gemmi.SpaceGroup
    cell: gemmi.UnitCell
    dmin: float
    ds: rs.DataSet                      # FMODEL (and F(+)/F(-) when anomalous)
    anomalous: bool = False
    source: str = ""
    asu: np.ndarray = field(default_factory=lambda: np.zeros((0, 3), np.int32))


def _dataset(hkl: np.ndarray, cols: dict[str, np.ndarray], sg: gemmi.SpaceGroup,
             cell: gemmi.UnitCell) -> rs.DataSet:
    ds = rs.DataSet({"H": hkl[:, 0], "K": hkl[:, 1], "L": hkl[:, 2], **cols},
                    spacegroup=sg, cell=cell, merged=True).set_index(["H", "K", "L"])
    for c in cols:
        ds[c] = ds[c].astype("SFAmplitude")
    return ds


def _asu_amplitudes(hkl: np.ndarray, intensity: np.ndarray, sg: gemmi.SpaceGroup,
                    cell: gemmi.UnitCell, *, anomalous: bool) -> rs.DataSet:
    """F = sqrt(max(I, 0)) in the ASU of ``sg``; absences dropped; F(+)/F(-) if anomalous."""
    from streamvi.symmetry import friedel_sign, hkl_to_asu, is_absent

    f = np.sqrt(np.clip(intensity, 0.0, None))
    ok = np.isfinite(f) & ~is_absent(hkl, sg) & np.any(hkl != 0, axis=1)
    asu, isym = hkl_to_asu(hkl[ok], sg)
    f = f[ok]
    if not anomalous:
        key = np.unique(asu, axis=0, return_index=True)[1]      # a Laue-class list has one
        return _dataset(asu[key], {"F": f[key]}, sg, cell)
    plus = friedel_sign(isym) > 0
    fp = _dataset(asu[plus], {"F(+)": f[plus]}, sg, cell)
    fm = _dataset(asu[~plus], {"F(-)": f[~plus]}, sg, cell)
    ds = fp.join(fm, how="outer")
    centric = np.asarray(sg.operations().centric_flag_array(
        np.array(ds.index.tolist(), dtype=np.int32)), dtype=bool)
    # a centric reflection has one ASU entry: its value is both halves
    for a, b in (("F(+)", "F(-)"), ("F(-)", "F(+)")):
        fill = centric & ~np.isfinite(ds[a].to_numpy(np.float64))
        ds.loc[fill, a] = ds.loc[fill, b]
    ds["F"] = np.nanmean(np.stack([ds["F(+)"].to_numpy(np.float64),
                                   ds["F(-)"].to_numpy(np.float64)]), axis=0)
    ds["F"] = ds["F"].astype("SFAmplitude")
    return ds


def truth_from_hkl(path: Path, sg: gemmi.SpaceGroup, cell: gemmi.UnitCell,
                   dmin: float) -> Truth:
    """partial_sim's saved random intensities (``-r``) as amplitudes (FMODEL)."""
    from streamvi.symmetry import enumerate_asu

    hkl, inten, _, _ = read_hkl(path)
    keep = cell.calculate_d_array(hkl) >= dmin - 1e-6
    ds = _asu_amplitudes(hkl[keep], inten[keep], sg, cell, anomalous=False).rename(
        columns={"F": "FMODEL"})
    return Truth(sg, cell, dmin, ds, False, str(path), enumerate_asu(cell, sg, dmin))


def truth_from_mtz(path: Path, dmin: float | None) -> Truth:
    """A truth MTZ: FMODEL (and F(+)/F(-)), or I(+)/I(-) as amplitudes."""
    from streamvi.symmetry import enumerate_asu

    ds = rs.read_mtz(str(path))
    if "FMODEL" not in ds.columns:
        for s in ("+", "-"):
            ds[f"F({s})"] = np.sqrt(np.clip(ds[f"I({s})"].to_numpy(np.float64), 0, None))
        ds["FMODEL"] = 0.5 * (ds["F(+)"] + ds["F(-)"])
    keep = [c for c in ("FMODEL", "F(+)", "F(-)") if c in ds.columns]
    ds = ds[keep].astype("SFAmplitude")
    hkl = np.array(ds.index.tolist(), dtype=np.int32)
    d = ds.cell.calculate_d_array(hkl)
    dmin = float(dmin if dmin is not None else d.min())
    ds = ds[d >= dmin - 1e-6]
    anomalous = {"F(+)", "F(-)"} <= set(ds.columns)
    return Truth(ds.spacegroup, ds.cell, dmin, ds, anomalous, str(path),
                 enumerate_asu(ds.cell, ds.spacegroup, dmin))


def merged_from_hkl(path: Path, truth: Truth, *, anomalous: bool) -> rs.DataSet:
    """A CrystFEL merge (``.hkl``) as amplitudes in the truth's ASU."""
    hkl, inten, _, _ = read_hkl(path)
    return _asu_amplitudes(hkl, inten, truth.sg, truth.cell, anomalous=anomalous)


def merged_from_mtz(path: Path) -> rs.DataSet:
    """``streamvi merge``'s MTZ: F (and F(+)/F(-) with ``--anomalous``)."""
    ds = rs.read_mtz(str(path))
    keep = [c for c in ("F", "F(+)", "F(-)") if c in ds.columns]
    return ds[keep]


# ----------------------------------------------------------------------------- judging


def equal_count_edges(d: np.ndarray, n: int) -> np.ndarray:
    """Shell edges in Å, low → high resolution, each shell holding the same count of ``d``."""
    s3 = np.sort(1.0 / np.asarray(d, np.float64) ** 3)
    q = np.quantile(s3, np.linspace(0.0, 1.0, n + 1))
    q[-1] = s3[-1] * (1 + 1e-9)
    return np.cbrt(1.0 / q)


def _shell_of(d: np.ndarray, edges: np.ndarray) -> np.ndarray:
    s3 = 1.0 / np.asarray(d, np.float64) ** 3
    e = 1.0 / edges ** 3
    return np.clip(np.searchsorted(e, s3, side="right") - 1, 0, len(edges) - 2)


def fit_relative_b(fm: np.ndarray, ft: np.ndarray, d: np.ndarray) -> float:
    """One B (Å², intensity convention) between merged and true amplitudes.

    Least squares of ln(<F_merged> / <F_true>) against 1/d² over :data:`N_B_SHELLS` shells of
    equal count (shell means: a log ratio per reflection is ruled by the weak ones), so
    ``F_merged ≈ k F_true exp(−B / (4 d²))``; a negative B means the merge grows relative to
    the truth with resolution.
    """
    edges = equal_count_edges(d, N_B_SHELLS)
    shell = _shell_of(d, edges)
    n = np.bincount(shell, minlength=N_B_SHELLS)
    ok = n >= 3
    sm = np.bincount(shell, fm, N_B_SHELLS)[ok]
    st = np.bincount(shell, ft, N_B_SHELLS)[ok]
    x = (np.bincount(shell, 1.0 / d ** 2, N_B_SHELLS) / np.maximum(n, 1))[ok]
    good = (sm > 0) & (st > 0)
    slope = np.polyfit(x[good], np.log(sm[good] / st[good]), 1)[0]
    return float(-4.0 * slope)


def judge(merged: rs.DataSet, truth: Truth, ops: list[np.ndarray]) -> dict:
    """Every figure of one merge against the truth.

    Parameters
    ----------
    merged
        ``F`` (and ``F(+)``/``F(-)``) in the truth's ASU and space group.
    truth
        The true amplitudes.
    ops
        Reindexing operators to try (identity first): with an indexing ambiguity the merge
        is judged in whichever setting of the truth gives the higher overall CC.

    Returns
    -------
    dict
        ``cc_F``, ``cc_F_fitted_B``, ``fitted_B``, ``cc_F_shells``, ``shell_d`` (edges, Å),
        ``cc_F_top_shell``, ``completeness``, ``completeness_shells``,
        ``completeness_top_shell``, ``n_merged``, ``n_common``, ``setting``,
        ``cc_F_other_settings`` (when there are several), ``cc_anom`` (when both have
        Bijvoet pairs).
    """
    from streamvi.quality.evaluate import compare_to_truth
    from streamvi.quality.stats import pearson_by_group
    from streamvi.symmetry import dhkl, hkl_to_asu, op_triplet, reindex

    f_all = merged["F"].to_numpy(np.float64)
    merged = merged[np.isfinite(f_all)]
    hkl_m = np.array(merged.index.tolist(), dtype=np.int32).reshape(-1, 3)
    d_m = dhkl(hkl_m, truth.cell).astype(np.float64)
    merged = merged[d_m >= truth.dmin - 1e-4]
    best: tuple[float, int, dict] | None = None
    per_op = []
    for i, op in enumerate(ops):
        t = truth.ds
        if i:
            hkl_t = np.array(t.index.tolist(), dtype=np.int32)
            asu, _ = hkl_to_asu(reindex(hkl_t, op), truth.sg)
            t = t.copy()
            t.index = rs.DataSet({"H": asu[:, 0], "K": asu[:, 1], "L": asu[:, 2]}).set_index(
                ["H", "K", "L"]).index
            if truth.anomalous and np.linalg.det(op) < 0:     # a hand change swaps F(+), F(-)
                t = t.rename(columns={"F(+)": "F(-)", "F(-)": "F(+)"})
        cmp = compare_to_truth(merged, t, n_shells=N_SHELLS, f_col="F", truth_f="FMODEL")
        per_op.append(cmp["cc_F"])
        if best is None or cmp["cc_F"] > best[0]:
            best = (cmp["cc_F"], i, {"t": t, "cmp": cmp})
    assert best is not None
    _, i_best, rest = best
    t, cmp = rest["t"], rest["cmp"]
    common = merged.index.intersection(t.index)
    fm = merged.loc[common, "F"].to_numpy(np.float64)
    ft = t.loc[common, "FMODEL"].to_numpy(np.float64)
    hkl = np.array(common.tolist(), dtype=np.int32)
    d = dhkl(hkl, truth.cell).astype(np.float64)
    b = fit_relative_b(fm, ft, d)
    fm_b = fm * np.exp(b / (4.0 * d ** 2))
    cc_b = float(np.corrcoef(fm_b, ft)[0, 1])
    # shells of equal count on the complete ASU: the same shells for every merger
    d_asu = dhkl(truth.asu, truth.cell).astype(np.float64)
    edges = equal_count_edges(d_asu, N_SHELLS)
    cc_sh, _ = pearson_by_group(fm, ft, _shell_of(d, edges), N_SHELLS)
    n_asu = np.bincount(_shell_of(d_asu, edges), minlength=N_SHELLS)
    hkl_merged = np.array(merged.index.tolist(), dtype=np.int32).reshape(-1, 3)
    d_merged = dhkl(hkl_merged, truth.cell).astype(np.float64)
    n_mer = np.bincount(_shell_of(d_merged, edges), minlength=N_SHELLS)
    compl = n_mer / np.maximum(n_asu, 1)
    out = {"cc_F": cmp["cc_F"], "cc_F_fitted_B": cc_b, "fitted_B": b,
           "cc_F_shells": [round(float(x), 4) for x in cc_sh],
           "shell_d": [round(float(x), 3) for x in edges],
           "cc_F_top_shell": float(cc_sh[-1]),
           "top_shell": f"{edges[-2]:.2f}-{edges[-1]:.2f}",
           "completeness": float(len(merged) / len(truth.asu)),
           "completeness_shells": [round(float(x), 3) for x in compl],
           "completeness_top_shell": float(compl[-1]),
           "n_merged": int(len(merged)), "n_common": int(len(common)),
           "setting": op_triplet(ops[i_best])}
    if len(ops) > 1:
        out["cc_F_other_settings"] = [round(float(x), 4) for j, x in enumerate(per_op)
                                      if j != i_best]
    if np.isfinite(cmp.get("cc_anom", float("nan"))):
        out["cc_anom"] = cmp["cc_anom"]
    # for figures on the reflections every merger kept (see common_figures)
    out["_pairs"] = (common, fm, ft)
    return out


def common_figures(figs: list[dict], truth: Truth) -> None:
    """CC overall and in the top shell on the reflections that every merge kept.

    Mergers keep different reflections (partialator drops those seen only at low
    partiality), so each one's own CC is over its own set; ``cc_F_common`` and
    ``cc_F_top_shell_common`` compare them on one set.  Adds those fields (and
    ``n_common_all``) to each figure dict and removes the private ``_pairs``.
    """
    from streamvi.symmetry import dhkl

    pairs = [f.pop("_pairs") for f in figs]
    if not pairs:
        return
    inter = pairs[0][0]
    for idx, _, _ in pairs[1:]:
        inter = inter.intersection(idx)
    d_asu = dhkl(truth.asu, truth.cell).astype(np.float64)
    edges = equal_count_edges(d_asu, N_SHELLS)
    hkl = np.array(inter.tolist(), dtype=np.int32).reshape(-1, 3)
    top = _shell_of(dhkl(hkl, truth.cell).astype(np.float64), edges) == N_SHELLS - 1
    for f, (idx, fm, ft) in zip(figs, pairs):
        pos = idx.get_indexer(inter)
        x, y = fm[pos], ft[pos]
        f["n_common_all"] = int(len(inter))
        f["cc_F_common"] = float(np.corrcoef(x, y)[0, 1]) if len(x) > 2 else float("nan")
        f["cc_F_top_shell_common"] = (float(np.corrcoef(x[top], y[top])[0, 1])
                                      if top.sum() > 2 else float("nan"))


# ----------------------------------------------------------------------------- running


def _run(cmd: list[str], log: Path, cwd: Path, *, outputs: tuple[Path, ...] = (),
         resume: bool = False) -> float:
    """Run ``cmd`` in ``cwd``, stdout and stderr to ``log``; wall seconds.

    The seconds go to ``<log>.json`` beside the log; with ``resume`` a command whose
    record and ``outputs`` are all there is not run again and its recorded seconds return.
    """
    if _recorded(log, outputs, resume):
        return float(json.loads(log.with_suffix(".json").read_text())["seconds"])
    t0 = time.perf_counter()
    with open(log, "w") as fh:
        r = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, cwd=cwd, check=False)
    seconds = time.perf_counter() - t0
    if r.returncode != 0:
        tail = log.read_text()[-2000:]
        raise RuntimeError(f"{' '.join(cmd)} exited {r.returncode}: {tail}")
    log.with_suffix(".json").write_text(
        json.dumps({"seconds": seconds, "command": shlex.join(cmd)}) + "\n")
    return seconds


def _recorded(log: Path, outputs: tuple[Path, ...], resume: bool) -> bool:
    """Whether :func:`_run` reuses an earlier run (``resume``, its record and outputs)."""
    return resume and log.with_suffix(".json").exists() and all(p.exists() for p in outputs)


@dataclass
class Case:
    """A stream to merge and its truth."""

    name: str
    stream: Path
    truth: Truth
    crystals: int
    reflections: int
    data: dict                           # how the stream was made
    ambiguity_ops: list[np.ndarray]


def count_stream(path: Path) -> tuple[int, int]:
    """Crystals and reflections in a stream."""
    crystals = reflections = 0
    with open(path) as fh:
        for line in fh:
            if line.startswith("--- Begin crystal"):
                crystals += 1
            elif line.startswith("num_reflections ="):
                reflections += int(line.split("=")[1])
    return crystals, reflections


def make_partial_sim(args: argparse.Namespace, bin_dir: Path, work: Path) -> Case:
    """Geometry, cell, ``partial_sim``, and the optional re-labelling of settings."""
    from streamvi.symmetry import op_triplet, twin_operators

    sg = gemmi.SpaceGroup(args.space_group)
    cell = gemmi.UnitCell(*args.cell)
    laue, _, _ = crystfel_point_groups(sg)
    geom, cellf = work / "sim.geom", work / "sim.cell"
    clen = write_geometry(geom, dmin=args.dmin, photon_energy_ev=args.photon_energy,
                          bandwidth=args.bandwidth)
    write_cell(cellf, sg, cell)
    raw, truth_hkl = work / "partial_sim.stream", work / "partial_sim_true.hkl"
    cmd = [str(bin_dir / "partial_sim"), "-g", str(geom), "-p", str(cellf), "-y", laue,
           "-n", str(args.crystals), "-o", str(raw), "-r", str(truth_hkl), "-j", "1"]
    if args.profile_radius is not None:
        cmd += ["--profile-radius", f"{args.profile_radius:g}"]
    if args.cnoise:
        cmd += ["-c", f"{args.cnoise:g}"]
    if args.osf_stddev is not None:
        cmd += ["--osf-stddev", f"{args.osf_stddev:g}"]
    if args.noise_stddev is not None:
        cmd += ["--noise-stddev", f"{args.noise_stddev:g}"]
    seconds = _run(cmd, work / "partial_sim.log", work, outputs=(raw, truth_hkl),
                   resume=args.resume)
    ops = twin_operators(sg, cell)
    data = {"generator": "partial_sim", "command": shlex.join(cmd), "seconds": round(seconds, 1),
            "clen_m": clen, "bandwidth": args.bandwidth, "photon_energy_eV": args.photon_energy,
            "profile_radius_m-1": args.profile_radius or 1e6, "cnoise_percent": args.cnoise,
            "osf_stddev": 2.0 if args.osf_stddev is None else args.osf_stddev,
            "noise_stddev": 20.0 if args.noise_stddev is None else args.noise_stddev,
            "intensity_symmetry": laue}
    stream = raw
    if args.reindex_fraction > 0:
        if len(ops) < 2:
            raise SystemExit(f"{sg.hm} has no indexing ambiguity to re-label by")
        stream = work / "partial_sim_reindexed.stream"
        n = reindex_stream(raw, stream, ops[1], args.reindex_fraction, args.seed)
        data.update(reindexed=n, reindex_op=op_triplet(ops[1]), reindex_seed=args.seed)
    crystals, reflections = count_stream(stream)
    truth = truth_from_hkl(truth_hkl, sg, cell, args.dmin)
    return Case("partial_sim", stream, truth, crystals, reflections, data, ops)


def make_streamvi_sim(args: argparse.Namespace, work: Path) -> Case:
    """``streamvi simulate --images N --seed S`` and its truth MTZ."""
    from streamvi.symmetry import twin_operators

    stream, truth_mtz = work / "streamvi_sim.stream", work / "streamvi_sim_truth.mtz"
    cmd = [sys.executable, "-m", "streamvi", "simulate", "--images", str(args.images),
           "--seed", str(args.seed), "-o", str(stream), "--truth", str(truth_mtz)]
    seconds = _run(cmd, work / "simulate.log", work, outputs=(stream, truth_mtz),
                   resume=args.resume)
    truth = truth_from_mtz(truth_mtz, None)
    crystals, reflections = count_stream(stream)
    data = {"generator": "streamvi simulate", "command": shlex.join(["streamvi"] + cmd[3:]),
            "seconds": round(seconds, 1)}
    return Case("streamvi_sim", stream, truth, crystals, reflections, data,
                twin_operators(truth.sg, truth.cell))


def take_files(args: argparse.Namespace) -> Case:
    """``--stream`` and ``--truth`` as given."""
    from streamvi.symmetry import twin_operators

    stream, tpath = Path(args.stream), Path(args.truth)
    if tpath.suffix.lower() == ".mtz":
        truth = truth_from_mtz(tpath, args.dmin)
    else:
        truth = truth_from_hkl(tpath, gemmi.SpaceGroup(args.space_group),
                               gemmi.UnitCell(*args.cell), args.dmin)
    crystals, reflections = count_stream(stream)
    return Case("files", stream, truth, crystals, reflections,
                {"stream": str(stream), "truth": str(tpath)},
                twin_operators(truth.sg, truth.cell))


def merge_all(case: Case, bin_dir: Path, work: Path, *, mergers: list[str], threads: int,
              anomalous: list[str], resume: bool = False) -> list[dict]:
    """Run each merger on ``case`` (but ``streamvi_serve``: :func:`serve_all`); one dict of
    figures per merger, each with its private ``_pairs`` for :func:`common_figures`.

    ``anomalous`` names the mergers that also merge with Bijvoet mates apart (CCanom);
    with ``resume`` a merge already in ``work`` (with its recorded seconds) is reused.
    """
    sg, cell = case.truth.sg, case.truth.cell
    laue, pg, holo = crystfel_point_groups(sg)
    s = str(case.stream)
    cf = {
        "process_hkl": [str(bin_dir / "process_hkl"), "-i", s, "--no-polarisation"],
        "process_hkl_scale": [str(bin_dir / "process_hkl"), "-i", s, "--no-polarisation",
                              "--scale"],
        "partialator_xsphere": [str(bin_dir / "partialator"), "-i", s, "--model=xsphere",
                                "--iterations=3", "--no-polarisation", "-j", str(threads)],
        "partialator_unity": [str(bin_dir / "partialator"), "-i", s, "--model=unity",
                              "--iterations=3", "--no-polarisation", "-j", str(threads)],
    }

    def symmetry(name: str, anom: bool) -> list[str]:
        # partialator resolves an indexing ambiguity with -w (the apparent point group)
        y, w = (pg, ROTATION_GROUP[holo]) if anom else (laue, holo)
        return ["-y", y] + (["-w", w] if name.startswith("partialator") and w != y else [])

    results = []
    for name in mergers:
        if name == "streamvi_serve":
            continue                 # serve_all: one line per time after the stream
        sub = work / name
        sub.mkdir(exist_ok=True)
        if name in cf:
            out = sub / "merged.hkl"
            cmd = cf[name] + symmetry(name, False) + ["-o", str(out)]
            reused = _recorded(sub / "log.txt", (out,), resume)
            seconds = _run(cmd, sub / "log.txt", sub, outputs=(out,), resume=resume)
            merged = merged_from_hkl(out, case.truth, anomalous=False)
            fig = judge(merged, case.truth, case.ambiguity_ops)
            fig.update(seconds=seconds, command=shlex.join(cmd), threads=threads)
            if reused:
                fig["reused"] = True
            if name in anomalous:
                out_a = sub / "merged_anom.hkl"
                cmd_a = cf[name] + symmetry(name, True) + ["-o", str(out_a)]
                sec_a = _run(cmd_a, sub / "log_anom.txt", sub, outputs=(out_a,), resume=resume)
                fa = judge(merged_from_hkl(out_a, case.truth, anomalous=True), case.truth,
                           case.ambiguity_ops)
                fig.update(cc_anom=fa.get("cc_anom", float("nan")),
                           anom_seconds=sec_a, anom_command=shlex.join(cmd_a))
            if name.startswith("partialator"):
                # the last rejection report is the one the final merge used
                m = re.findall(r"(\d+) bad crystals", (sub / "log.txt").read_text())
                fig["rejected_crystals"] = int(m[-1]) if m else 0
        else:
            out = sub / "merged.mtz"
            cmd = [sys.executable, "-m", "streamvi", "merge", s, "-o", str(out),
                   "--space-group", sg.hm, "--cell",
                   " ".join(f"{x:g}" for x in cell.parameters), "--quiet"]
            if name in anomalous:
                cmd.append("--anomalous")
            reused = _recorded(sub / "log.txt", (out,), resume)
            seconds = _run(cmd, sub / "log.txt", sub, outputs=(out,), resume=resume)
            fig = judge(merged_from_mtz(out), case.truth, case.ambiguity_ops)
            fig.update(seconds=seconds, command=shlex.join(["streamvi"] + cmd[3:]))
            if reused:
                fig["reused"] = True
        fig["merger"] = name
        fig["load_avg_1m_after"] = round(os.getloadavg()[0], 2)   # others share the cores
        results.append(fig)
        print(json.dumps({"progress": name, "seconds": round(fig["seconds"], 1),
                          "cc_F": round(fig["cc_F"], 4)}), file=sys.stderr, flush=True)
    return results


def serve_all(case: Case, work: Path, *, rate: float, after: list[float], threads: int,
              anomalous: bool = False) -> list[dict]:
    """``streamvi serve`` fed the stream by ``streamvi send --rate``; one dict of figures per
    time in ``after`` (s after the last crystal was sent), judged on ``latest.mtz`` then."""
    from streamvi.merging.distributed import free_port
    from streamvi.service.lifecycle import CHECKPOINT_NAME, Checkpoints

    sg, cell = case.truth.sg, case.truth.cell
    sub = work / "streamvi_serve"
    shutil.rmtree(sub, ignore_errors=True)
    sub.mkdir()
    url = f"tcp://127.0.0.1:{free_port()}"
    serve = [sys.executable, "-m", "streamvi", "serve", "--listen", url,
             "--space-group", sg.hm, "--cell", " ".join(f"{x:g}" for x in cell.parameters),
             "--dmin", f"{case.truth.dmin:g}", "--out-dir", str(sub / "out"),
             "--metrics-port", "-1", "--publish-endpoint", "", "--cpu-threads", str(threads)]
    if anomalous:
        serve.append("--anomalous")
    send = [sys.executable, "-m", "streamvi", "send", str(case.stream), "--to", url,
            "--rate", f"{rate:g}"]
    # options given as STREAMVI_<NAME> variables reach the service too: say which
    settings_from_environment = {k: v for k, v in sorted(os.environ.items())
                                 if k.startswith("STREAMVI_") and k not in (
                                     "STREAMVI_COMMIT", "STREAMVI_CRYSTFEL_BIN",
                                     "STREAMVI_SHARED_DATA")}
    log_path = sub / "serve.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(serve, stdout=log, stderr=subprocess.STDOUT, cwd=sub)
        try:
            deadline = time.monotonic() + 120
            while '"listening"' not in log_path.read_text():
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"streamvi serve did not start: see {log_path}")
                time.sleep(0.2)
            t0 = time.time()
            subprocess.run(send, check=True, cwd=sub, stdout=subprocess.DEVNULL)
            t_end = time.time()
            results = []
            for wait in sorted(after):
                time.sleep(max(0.0, t_end + wait - time.time()))
                snap = sub / f"latest_{wait:g}s.mtz"
                shutil.copyfile(sub / "out" / "latest.mtz", snap)
                fig = judge(merged_from_mtz(snap), case.truth, case.ambiguity_ops)
                fig.update(after_stream_s=wait, send_seconds=round(t_end - t0, 1),
                           rate=rate, seconds=round(time.time() - t0, 1),
                           environment=settings_from_environment,
                           command=shlex.join(["streamvi"] + serve[3:]) + " & "
                           + shlex.join(["streamvi"] + send[3:]))
                results.append(fig)
                print(json.dumps({"progress": "streamvi_serve", "after_stream_s": wait,
                                  "cc_F": round(fig["cc_F"], 4)}), file=sys.stderr, flush=True)
        finally:
            proc.send_signal(2)           # SIGINT: checkpoint and stop
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
    # the checkpoint written at the stop says whether and when the partiality check switched
    state = Checkpoints(sub / "out" / CHECKPOINT_NAME).load(set_aside=False) or {}
    switch = state.get("partiality_switch")
    for fig in results:
        fig["merger"] = "streamvi_serve"
        fig["load_avg_1m_after"] = round(os.getloadavg()[0], 2)
        if switch:
            fig["partiality_switch_after_stream_s"] = round(switch["time"] - t_end, 1)
    return results


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--crystfel-bin", default=None,
                    help="directory of CrystFEL's programs (else $STREAMVI_CRYSTFEL_BIN, PATH)")
    ap.add_argument("--case", choices=("partial_sim", "streamvi_sim"), default="partial_sim")
    ap.add_argument("--stream", default=None, help="merge this stream instead of simulating")
    ap.add_argument("--truth", default=None, help="its truth: .hkl (CrystFEL) or .mtz")
    ap.add_argument("--crystals", type=int, default=5000, help="partial_sim: crystals")
    ap.add_argument("--images", type=int, default=2000, help="streamvi_sim: images")
    ap.add_argument("--seed", type=int, default=0,
                    help="streamvi_sim's seed; partial_sim: the seed of the re-labelling")
    ap.add_argument("--space-group", default="P 43 21 2")
    ap.add_argument("--cell", type=float, nargs=6, default=[79.1, 79.1, 37.9, 90, 90, 90])
    ap.add_argument("--dmin", type=float, default=1.8, help="resolution, Å")
    ap.add_argument("--photon-energy", type=float, default=9500.0, help="partial_sim: eV")
    ap.add_argument("--bandwidth", type=float, default=1e-3,
                    help="partial_sim: r.m.s. width of the Gaussian spectrum, a fraction of "
                         "k (the geometry file's 'bandwidth')")
    ap.add_argument("--profile-radius", type=float, default=None,
                    help="partial_sim: reciprocal-space profile radius, m^-1 (its default "
                         "1e6)")
    ap.add_argument("--cnoise", type=float, default=0.0,
                    help="partial_sim -c: indexing error, percent")
    ap.add_argument("--osf-stddev", type=float, default=None,
                    help="partial_sim: spread of the crystal scales (its default 2.0)")
    ap.add_argument("--noise-stddev", type=float, default=None,
                    help="partial_sim: Gaussian noise on each intensity (its default 20)")
    ap.add_argument("--reindex-fraction", type=float, default=0.0,
                    help="partial_sim: share of crystals re-labelled by the ambiguity operator")
    ap.add_argument("--mergers", nargs="+", choices=MERGERS, default=list(MERGERS))
    ap.add_argument("--no-anomalous", dest="anomalous", action="store_false", default=None,
                    help="streamvi_sim: skip the anomalous merges")
    ap.add_argument("--anomalous-mergers", nargs="+", choices=MERGERS,
                    default=["process_hkl", "partialator_xsphere", "streamvi_merge",
                             "streamvi_serve"],
                    help="with an anomalous truth: the mergers that also keep Bijvoet mates "
                         "apart (CrystFEL: a second run in the acentric point group)")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                    help="CrystFEL's -j (default: every core)")
    ap.add_argument("--workdir", default=None, help="keep every file here (default: a "
                                                    "temporary directory, removed)")
    ap.add_argument("--resume", action="store_true",
                    help="with --workdir: reuse the simulation and every merge already there "
                         "(and its recorded seconds) instead of running it again")
    ap.add_argument("--serve-rate", type=float, default=500.0,
                    help="streamvi_serve: crystals per second sent (default 500)")
    ap.add_argument("--serve-after", type=float, nargs="+", default=[60.0, 180.0],
                    help="streamvi_serve: seconds after the stream's end at which latest.mtz "
                         "is judged (default 60 180)")
    args = ap.parse_args(argv)

    bin_dir = find_crystfel(args.crystfel_bin)
    if bin_dir is None:
        print(json.dumps({"benchmark": "peer_crystfel", "skipped": True,
                          "reason": "CrystFEL not found: give --crystfel-bin DIR or set "
                                    "STREAMVI_CRYSTFEL_BIN (needs "
                                    + ", ".join(CRYSTFEL_PROGRAMS) + ")",
                          "machine": machine_name()}), flush=True)
        return
    version = crystfel_version(bin_dir)
    commit = streamvi_commit()          # before the runs: a checkout may move while they go
    load = os.getloadavg()[0]
    tmp = None
    if args.workdir:
        work = Path(args.workdir).resolve()
        work.mkdir(parents=True, exist_ok=True)
    else:
        tmp = tempfile.TemporaryDirectory(prefix="peer_crystfel_")
        work = Path(tmp.name)
    try:
        if args.stream:
            if not args.truth:
                ap.error("--stream needs --truth")
            case = take_files(args)
        elif args.case == "partial_sim":
            case = make_partial_sim(args, bin_dir, work)
        else:
            case = make_streamvi_sim(args, work)
        anomalous = case.truth.anomalous if args.anomalous is None else (
            args.anomalous and case.truth.anomalous)
        results = merge_all(case, bin_dir, work, mergers=args.mergers, threads=args.threads,
                            anomalous=args.anomalous_mergers if anomalous else [],
                            resume=args.resume and bool(args.workdir))
        if "streamvi_serve" in args.mergers:
            results += serve_all(case, work, rate=args.serve_rate, after=args.serve_after,
                                 threads=args.threads, anomalous=anomalous and (
                                     "streamvi_serve" in args.anomalous_mergers))
        common_figures(results, case.truth)
    finally:
        if tmp is not None:
            tmp.cleanup()
    import streamvi

    common = {"benchmark": "peer_crystfel", "case": case.name,
              "space_group": case.truth.sg.hm, "dmin": case.truth.dmin,
              "crystals": case.crystals,
              "reflections_per_crystal": round(case.reflections / max(case.crystals, 1), 1),
              "truth_reflections": int(len(case.truth.ds)),
              "asu_reflections": int(len(case.truth.asu)),
              "anomalous": [m for m in args.anomalous_mergers if anomalous],
              "data": case.data, "machine": machine_name(), "cores": os.cpu_count(),
              "crystfel_version": version, "streamvi_version": streamvi.__version__,
              "streamvi_commit": commit, "load_avg_1m_before": round(load, 2),
              "date": time.strftime("%Y-%m-%d")}
    for fig in results:
        line = {"merger": fig.pop("merger")}
        for k, v in fig.items():
            line[k] = round(v, 4) if isinstance(v, float) else v
        print(json.dumps({**line, **common}), flush=True)


if __name__ == "__main__":
    main()
