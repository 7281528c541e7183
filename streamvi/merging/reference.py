"""Put a merge in the indexing setting of a reference data set.

In a space group whose lattice has more symmetry than its point group (P 4, P 3, P 6₃, I 4,
…), an indexer reports each still in one of several equally valid settings, related by the
merohedral twin laws (:func:`streamvi.symmetry.twin_operators`).  The merge resolves this per
image (each image is reindexed into the merge's own setting, by likelihood), but the setting
the merge itself settles in is decided by its first images: any one of the laws.  To compare
with earlier data, a model or another run, the published merge is reindexed into the setting
of a reference MTZ: the twin law whose reindexed amplitudes correlate best with the
reference's.  Only twin laws are tried (an operator of the space group itself would change
nothing), and reindexing renames reflections: it never changes what was merged.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from streamvi.errors import ConfigError
from streamvi.quality.anomalous import CalculatedFactors
from streamvi.symmetry import ReciprocalSpace, op_triplet

log = logging.getLogger(__name__)

#: Amplitude columns tried, in order, when the reference's column is not named.
AMPLITUDE_COLUMNS = ("F", "FP", "F-obs", "FOBS", "F-model", "FMODEL", "FC")
#: Intensity columns tried next (their square roots are compared).
INTENSITY_COLUMNS = ("I", "IMEAN", "I-obs", "IOBS")
#: Fewest reflections in common with the reference for a choice to be made.
MIN_COMMON = 50


@dataclass(frozen=True)
class SettingChoice:
    """The reindexing chosen for one snapshot.

    Attributes
    ----------
    op_index
        Index into the space's ``twin_ops`` (0: the merge is already in the reference's
        setting).
    op
        The operator as a triplet, e.g. ``k,h,-l``.
    cc
        CC(F) against the reference under each operator, ``twin_ops`` order (NaN where too
        few reflections are shared).
    n_common
        Reflections shared with the reference.
    """

    op_index: int
    op: str
    cc: tuple[float, ...]
    n_common: int


@dataclass(frozen=True)
class ReferenceData:
    """Amplitudes read from a reference file, before they meet a merge's table.

    Attributes
    ----------
    name
        ``file:column``, for logs and history lines.
    hkl
        ``(n, 3)`` int32 Miller indices.
    amplitudes
        ``(n,)`` amplitudes (square roots of intensities when the column holds those).
    space_group, cell
        The reference's own symmetry (gemmi objects), or None when the file has none.
    """

    name: str
    hkl: np.ndarray
    amplitudes: np.ndarray
    space_group: object = None
    cell: object = None


def read_reference(path: str | Path, column: str | None = None, *,
                   flag: str = "--reference") -> ReferenceData:
    """Read a reference MTZ: an amplitude column, or an intensity column's square roots.

    Parameters
    ----------
    path
        The MTZ file.
    column
        Amplitude or intensity column; by default the first of :data:`AMPLITUDE_COLUMNS`,
        then :data:`INTENSITY_COLUMNS`, then any column of MTZ type F or J, then of type G
        or K (one Bijvoet mate, e.g. ``F(+)``: a twin law's choice does not need both).
    flag
        The option that named the file (``--reference``, ``--prior-mtz``): errors name it,
        and its ``-column`` companion.

    Raises
    ------
    ConfigError
        When the file cannot be read or has no such column.
    """
    import reciprocalspaceship as rs

    path = Path(path)
    try:
        ds = rs.read_mtz(str(path))
    except (OSError, RuntimeError, ValueError) as exc:
        raise ConfigError(f"{flag} {path}: cannot read it as MTZ ({exc})") from exc
    dtypes = {c: ds[c].dtype.mtztype for c in ds.columns}
    name = column
    if name is None:
        name = next((c for c in AMPLITUDE_COLUMNS + INTENSITY_COLUMNS if c in dtypes), None)
    if name is None:
        name = next((c for c, t in dtypes.items() if t in ("F", "J")), None)
    if name is None:
        name = next((c for c, t in dtypes.items() if t in ("G", "K")), None)
    if name is None or name not in dtypes:
        wanted = column or "of amplitudes (F) or intensities (J)"
        raise ConfigError(f"{flag} {path}: no column {wanted}; it has {sorted(dtypes)}; "
                          f"name one with {flag}-column")
    if dtypes[name] not in ("F", "J", "G", "K"):
        raise ConfigError(f"{flag} {path}: column {name} has MTZ type {dtypes[name]}, "
                          "not an amplitude (F, G) or an intensity (J, K)")
    values = ds[name].to_numpy(np.float64)
    if dtypes[name] in ("J", "K"):
        values = np.sqrt(np.maximum(values, 0.0))
    log.info("reference %s: column %s, %d reflections", path, name, len(values))
    return ReferenceData(name=f"{path.name}:{name}", hkl=ds.get_hkls().astype(np.int32),
                         amplitudes=values, space_group=ds.spacegroup, cell=ds.cell)


def model_amplitudes(path: str | Path, dmin: float, *, flag: str = "--prior-model"
                     ) -> ReferenceData:
    """|F_calc| of a coordinate model to ``dmin`` Å, as a reference data set.

    The model's structure factors in its own cell and space group
    (:class:`streamvi.quality.anomalous.CalculatedFactors`); no bulk solvent, so the lowest orders are the model's
    weakest point (a coupled prior learns a lower correlation there).

    Raises
    ------
    ConfigError
        The file cannot be read as PDB or mmCIF, or has no atoms, cell or space group.
    """
    import gemmi

    path = Path(path)
    try:
        st = gemmi.read_structure(str(path))
    except (OSError, RuntimeError, ValueError) as exc:
        raise ConfigError(f"{flag} {path}: cannot read it as PDB or mmCIF ({exc})") from None
    if len(st) == 0 or not any(True for _ in st[0].all()):
        raise ConfigError(f"{flag} {path}: no atoms; give a model of the merged crystal")
    sg = st.find_spacegroup()
    if sg is None or st.cell.volume <= 1.0:
        raise ConfigError(f"{flag} {path}: no cell or space group (CRYST1); give a model in "
                          "the merged crystal's cell")
    st.setup_entities()
    hkl = gemmi.make_miller_array(st.cell, sg, float(dmin), unique=True).astype(np.int32)
    amplitudes = np.abs(CalculatedFactors(st, dmin).at(hkl))
    log.info("%s %s: |F_calc| of %d atoms at %d reflections to %.2f A", flag, path,
             st[0].count_atom_sites(), len(hkl), dmin)
    return ReferenceData(name=f"{path.name}:Fcalc", hkl=hkl, amplitudes=amplitudes,
                         space_group=sg, cell=st.cell)


class ReferenceSetting:
    """A reference's amplitudes laid out on the rows of a merge's :class:`ReciprocalSpace`.

    Parameters
    ----------
    space
        The merge's reciprocal space (space group, cell, dmin, anomalous mode).
    reference
        What :func:`read_reference` read (or amplitudes made in memory).

    Raises
    ------
    ConfigError
        When the reference's lattice is not the merge's, or it shares fewer than
        :data:`MIN_COMMON` reflections with the merge's table.
    """

    def __init__(self, space: ReciprocalSpace, reference: ReferenceData):
        check_same_lattice(reference, space.space_group, space.cell)
        self.space = space
        self.name = reference.name
        amplitudes = np.asarray(reference.amplitudes, dtype=np.float64)
        hkl = np.asarray(reference.hkl, dtype=np.int32)
        f = np.full(space.n_unique, np.nan)
        ok = np.isfinite(amplitudes)
        # A non-anomalous reference stands for both Bijvoet mates.
        for sign in ((1, -1) if space.anomalous else (1,)):
            rows = space.lookup(sign * hkl[ok])
            hit = rows >= 0
            f[rows[hit]] = amplitudes[ok][hit]
        #: reference amplitude per row of ``space`` (NaN where the reference has none)
        self.f_rows = f
        self.n_rows = int(np.isfinite(f).sum())
        if self.n_rows < MIN_COMMON:
            raise ConfigError(f"reference {self.name}: only {self.n_rows} of its reflections "
                              f"fall in the merge's table ({space.space_group.hm}, dmin "
                              f"{space.dmin:g} Å); check that it is a data set of the same "
                              "crystal form")
        self._perms = [space.reindex_rows(op) for op in space.twin_ops]

    def choose(self, f_rows: np.ndarray) -> SettingChoice:
        """The twin law that best maps merged amplitudes ``f_rows`` onto the reference.

        Parameters
        ----------
        f_rows
            ``(n_unique,)`` merged amplitudes per row, NaN where unobserved.
        """
        ccs = []
        n_common = 0
        for perm in self._perms:
            moved = np.full(self.space.n_unique, np.nan)
            moved[perm] = f_rows
            both = np.isfinite(moved) & np.isfinite(self.f_rows)
            n = int(both.sum())
            n_common = max(n_common, n)
            if n < MIN_COMMON:
                ccs.append(float("nan"))
                continue
            ccs.append(float(np.corrcoef(moved[both], self.f_rows[both])[0, 1]))
        finite = np.isfinite(ccs)
        best = int(np.nanargmax(np.where(finite, ccs, -np.inf))) if finite.any() else 0
        return SettingChoice(op_index=best, op=op_triplet(self.space.twin_ops[best]),
                             cc=tuple(ccs), n_common=n_common)

    def permutation(self, op_index: int) -> np.ndarray:
        """Row permutation of ``twin_ops[op_index]`` (see :meth:`ReciprocalSpace.reindex_rows`)."""
        return self._perms[op_index]


def check_same_lattice(reference: ReferenceData, space_group, cell) -> None:
    """Raise :class:`ConfigError` unless ``reference`` is of the merge's crystal form.

    Same crystal system and centring as ``space_group`` (gemmi), cell edges within 5 % of
    ``cell`` (gemmi); a reference without symmetry passes.
    """
    ref_sg, ref_cell, path = reference.space_group, reference.cell, reference.name
    if ref_sg is None or ref_cell is None:
        return
    ours, theirs = space_group, ref_sg
    lengths = np.array(cell.parameters[:3])
    ref_lengths = np.array(ref_cell.parameters[:3])
    if (theirs.crystal_system_str() != ours.crystal_system_str()
            or theirs.centring_type() != ours.centring_type()
            or np.any(np.abs(ref_lengths / lengths - 1.0) > 0.05)):
        raise ConfigError(
            f"reference {path}: its lattice ({theirs.hm}, cell "
            f"{tuple(round(x, 2) for x in ref_cell.parameters)}) is not the merge's "
            f"({ours.hm}, cell {tuple(round(x, 2) for x in cell.parameters)}); "
            "give a reference of the same crystal form")


def reindex_snapshot(snapshot, perm: np.ndarray, notes: list[str]):
    """A copy of a :class:`~streamvi.merging.engine.MergeSnapshot` with its rows moved by ``perm``.

    Row ``r`` of every table and of ``obs_count`` becomes row ``perm[r]``; the shell
    statistics do not change (twin laws keep resolution, centricity and Bijvoet pairs).
    ``notes`` are appended to the history (MTZ history lines hold 80 characters).
    """
    tables = {}
    for name, table in snapshot.tables.items():
        moved = {}
        for col, values in table.items():
            out = np.empty_like(values)
            out[perm] = values
            moved[col] = out
        tables[name] = moved
    obs = np.empty_like(snapshot.obs_count)
    obs[:, perm] = snapshot.obs_count
    stored = snapshot.stored_obs_count
    if stored is not None:
        stored = np.empty_like(stored)
        stored[:, perm] = snapshot.stored_obs_count
    gain = snapshot.delta_gain
    if gain is not None:
        gain = np.empty_like(gain)
        gain[:, perm] = snapshot.delta_gain
    return replace(snapshot, tables=tables, obs_count=obs, stored_obs_count=stored,
                   delta_gain=gain, history=list(snapshot.history) + list(notes))


def align_snapshot(snapshot, reference: ReferenceSetting):
    """``snapshot`` in the reference's setting, and the :class:`SettingChoice` made.

    Returns the snapshot unchanged when the space has a single setting or the reference
    shares too few reflections with the merge yet.
    """
    if snapshot.space.n_ops == 1:
        return snapshot, None
    observed = snapshot.obs_count[0] > 0
    f = np.where(observed, snapshot.tables["all"]["F"].astype(np.float64), np.nan)
    choice = reference.choose(f)
    if choice.op_index == 0 or not np.isfinite(choice.cc[choice.op_index]):
        return snapshot, choice
    ccs = ", ".join(f"{op_triplet(op)} {cc:.3f}"
                    for op, cc in zip(snapshot.space.twin_ops, choice.cc))
    notes = [f"reindexed by {choice.op} into the setting of {reference.name}",
             f"CC(F) with it per operator: {ccs}"]
    return reindex_snapshot(snapshot, reference.permutation(choice.op_index), notes), choice
