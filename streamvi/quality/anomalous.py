"""Anomalous difference maps: peak heights at the heavy atoms of a model, and new peaks.

The map has coefficients ``ΔF·exp(i(φ − 90°))`` with ``ΔF = F(+) − F(−)`` and φ the phase
of the structure's (non-anomalous) structure factor: the classical way to see anomalous
scatterers once phases are known.  Heights are in σ of the map (its r.m.s. about the mean).

- :func:`difference_map` and :func:`heights_at` build a map and read it, for any phases
  (:func:`streamvi.quality.evaluate.anomalous_peak_heights` uses the simulation's true ones);
- :class:`PhasingModel` reads a PDB or mmCIF file once, computes its phases for the rows of
  a merge and knows which of its atoms are heavy;
- :func:`snapshot_peaks` is what the service publishes for each snapshot: the height at each
  heavy atom and the strongest peaks away from them.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import gemmi
import numpy as np

from streamvi.errors import ConfigError
from streamvi.symmetry import hkl_key

#: Atoms from this atomic number up count as heavy (sulfur and everything heavier): the
#: anomalous scatterers of a typical SAD experiment.
HEAVY_Z = 16
#: Grid points per dmin along each axis (with tricubic interpolation, heights within ~4 % of a
#: finely sampled map's).
SAMPLE_RATE = 3.0
#: A peak farther than this from every heavy atom of the model is reported as new, Å.
NEW_PEAK_DISTANCE = 2.0
#: New peaks reported (the strongest first), and the lowest height reported, σ.
N_NEW_PEAKS = 5
NEW_PEAK_MIN_SIGMA = 3.0


def difference_map(cell: gemmi.UnitCell, space_group: gemmi.SpaceGroup, hkl: np.ndarray,
                   dano: np.ndarray, phi_deg: np.ndarray, *,
                   sample_rate: float = SAMPLE_RATE,
                   phase_shift_deg: float = -90.0) -> gemmi.FloatGrid:
    """The anomalous difference map, in σ units (with ``phase_shift_deg`` 0, any difference
    map: light-minus-dark ΔF with the dark phases).

    Parameters
    ----------
    cell, space_group
        Of the merge.
    hkl
        ``(n, 3)`` ASU indices.
    dano
        F(+) − F(−) per index (NaN: left out).
    phi_deg
        Phase of the structure factor per index, degrees (NaN: left out).
    sample_rate
        Grid points per dmin.
    phase_shift_deg
        Added to ``phi_deg``: −90° for anomalous differences, 0 for isomorphous ones.

    Returns
    -------
    gemmi.FloatGrid
        Normalised to mean 0 and r.m.s. 1 (σ units).
    """
    dano = np.asarray(dano, dtype=np.float64)
    phi = np.asarray(phi_deg, dtype=np.float64)
    ok = np.isfinite(dano) & np.isfinite(phi)
    coeff = dano[ok] * np.exp(1j * np.radians(phi[ok] + phase_shift_deg))
    asu = gemmi.ComplexAsuData(cell, space_group, np.asarray(hkl, dtype=np.int32)[ok],
                               coeff.astype(np.complex64))
    grid = asu.transform_f_phi_to_map(sample_rate=sample_rate)
    grid.normalize()
    return grid


def heights_at(grid: gemmi.FloatGrid, frac: np.ndarray) -> list[float]:
    """The map's value at fractional positions ``(n, 3)``, by tricubic interpolation.

    Trilinear interpolation flattens peaks: at 3 grid points per dmin it read an iodide
    10-13 % below the converged height (2.5 Å, simulated); tricubic reads within 4 %.
    """
    return [float(grid.tricubic_interpolation(gemmi.Fractional(*map(float, f))))
            for f in np.asarray(frac, dtype=np.float64).reshape(-1, 3)]


@dataclass
class Peak:
    """A peak of the map away from the model's heavy atoms.

    ``sigma``: height; ``frac`` / ``xyz``: position (fractional, Å); ``nearest_atom`` and
    ``distance``: the closest atom of the model (symmetry copies included) and how far, Å.
    """

    sigma: float
    frac: list[float]
    xyz: list[float]
    nearest_atom: str | None
    distance: float | None


@dataclass
class PeakReport:
    """What one snapshot's map says: heights at the heavy atoms and new peaks.

    ``atoms`` maps each heavy atom's label (``chain/residue+number/atom``) to its height, σ;
    ``elements`` gives each label's element; ``n_reflections`` is the number of ΔF in the
    map.
    """

    atoms: dict[str, float]
    elements: dict[str, str]
    new_peaks: list[Peak]
    n_reflections: int
    model: str

    def to_dict(self) -> dict:
        return asdict(self)


class PhasingModel:
    """A structure used for the phases of anomalous difference maps.

    Parameters
    ----------
    path
        PDB or mmCIF file; its cell and space group should be the merge's (they are taken
        from the merge, so a model in another setting gives a meaningless map).
    heavy_z
        Atomic number from which an atom counts as heavy.
    require_heavy
        Refuse a model without a heavy atom (for anomalous maps); False for a model used
        only for its phases and atoms (light-minus-dark maps).

    Raises
    ------
    ConfigError
        The file cannot be read, has no atoms, or no heavy atom.
    """

    def __init__(self, path: str | Path, *, heavy_z: int = HEAVY_Z, require_heavy: bool = True):
        self.path = Path(path)
        try:
            st = gemmi.read_structure(str(self.path))
        except (OSError, RuntimeError, ValueError) as exc:
            raise ConfigError(f"model = {self.path}: cannot read it as PDB or mmCIF ({exc}); "
                              "give a coordinate file of the merged crystal") from None
        if len(st) == 0 or not any(True for _ in st[0].all()):
            raise ConfigError(f"model = {self.path}: no atoms; give a coordinate file of the "
                              "merged crystal")
        st.setup_entities()
        self.structure = st
        labels, elements, positions = [], [], []
        for cra in st[0].all():
            if cra.atom.element.atomic_number >= heavy_z:
                labels.append(f"{cra.chain.name}/{cra.residue.name}{cra.residue.seqid.num}"
                              f"/{cra.atom.name}")
                elements.append(cra.atom.element.name)
                positions.append(cra.atom.pos)
        if not labels and require_heavy:
            raise ConfigError(f"model = {self.path}: no atom from sulfur (Z = {heavy_z}) up, so "
                              "no anomalous scatterer to follow; give a model with its heavy "
                              "atoms")
        self.labels, self.elements, self._positions = labels, elements, positions
        #: the model's structure factors in the last (cell, space group, dmin) asked for
        self._factors: tuple[tuple, CalculatedFactors] | None = None

    def heavy_frac(self, cell: gemmi.UnitCell) -> np.ndarray:
        """Fractional coordinates ``(n, 3)`` of the heavy atoms in ``cell``."""
        return np.array([cell.fractionalize(p).tolist() for p in self._positions])

    def phases(self, cell: gemmi.UnitCell, space_group: gemmi.SpaceGroup, hkl: np.ndarray,
               dmin: float) -> np.ndarray:
        """Phase (degrees) of the model's structure factor for each of ``hkl``.

        The structure factors are computed once per (cell, space group, ``dmin``) — the
        merge's, which a service keeps for its whole run — and read at any indices
        (:class:`CalculatedFactors`), so the growing tables a live service asks about each
        publish cost a lookup, not a transform.
        """
        key = (tuple(cell.parameters), space_group.xhm(), float(dmin))
        if self._factors is None or self._factors[0] != key:
            st = self.structure.clone()
            st.cell = cell
            st.spacegroup_hm = space_group.xhm()
            self._factors = (key, CalculatedFactors(st, dmin))
        return np.degrees(np.angle(self._factors[1].at(hkl)))

    def describe(self) -> str:
        return f"{self.path.name}: {len(self.labels)} heavy atoms"

    def searches(self, cell: gemmi.UnitCell, space_group: gemmi.SpaceGroup
                 ) -> tuple["_Search", "_Search"]:
        """Neighbour searches (symmetry copies included) over the heavy atoms and over
        every atom, in the merge's cell and space group (cached)."""
        key = (tuple(cell.parameters), space_group.xhm())
        if getattr(self, "_search_key", None) != key:
            heavy = self.structure.clone()
            for model in heavy:
                for chain in model:
                    for residue in chain:
                        for i in reversed(range(len(residue))):
                            if residue[i].element.atomic_number < HEAVY_Z:
                                del residue[i]
            heavy.remove_empty_chains()
            self._searches = (_Search(heavy, cell, space_group),
                              _Search(self.structure.clone(), cell, space_group))
            self._search_key = key
        return self._searches


class CalculatedFactors:
    """Structure factors of a coordinate model, read at any Miller indices.

    The model's density (X-ray form factors, its B factors and occupancies, a
    Refmac-compatible blur) is put on gemmi's grid for ``dmin`` and transformed once; the
    blur is taken out again per reflection (``exp(B_blur/4 · 1/d²)``).  Amplitudes agree
    with a direct sum over the atoms to CC 0.9999+ (tests/test_merge_prior.py).

    Parameters
    ----------
    structure
        The model, in the cell and space group the indices refer to.
    dmin
        Resolution limit of the indices to be read, Å.
    """

    def __init__(self, structure: gemmi.Structure, dmin: float):
        dc = gemmi.DensityCalculatorX()
        dc.d_min = float(dmin)
        dc.grid.setup_from(structure)
        dc.set_refmac_compatible_blur(structure[0])
        dc.put_model_density_on_grid(structure[0])
        # a copy: the array must not outlive gemmi's grid as a view of it
        self._grid = np.array(gemmi.transform_map_to_f_phi(dc.grid, half_l=False))
        self._blur = float(dc.blur)
        self.cell = structure.cell

    def at(self, hkl: np.ndarray) -> np.ndarray:
        """``(n,)`` complex F_calc of the indices ``hkl`` (``(n, 3)``, none of them 0 0 0)."""
        hkl = np.asarray(hkl, dtype=np.int64).reshape(-1, 3)
        nu, nv, nw = self._grid.shape
        values = self._grid[hkl[:, 0] % nu, hkl[:, 1] % nv, hkl[:, 2] % nw]
        inv_d2 = 1.0 / np.square(self.cell.calculate_d_array(hkl.astype(np.int32)))
        return values * np.exp(0.25 * self._blur * inv_d2)


class _Search:
    """A gemmi neighbour search that keeps its structure alive."""

    def __init__(self, st: gemmi.Structure, cell: gemmi.UnitCell,
                 space_group: gemmi.SpaceGroup):
        st.cell = cell
        st.spacegroup_hm = space_group.xhm()
        st.setup_cell_images()
        self.structure = st
        self.cell = st.cell
        self.ns = gemmi.NeighborSearch(st[0], st.cell, 6).populate()

    def nearest(self, pos: gemmi.Position, radius: float) -> tuple[str | None, float | None]:
        """Label and distance (Å) of the nearest atom within ``radius``, else (None, None)."""
        mark = self.ns.find_nearest_atom(pos, radius=radius)
        if mark is None:
            return None, None
        cra = mark.to_cra(self.structure[0])
        label = f"{cra.chain.name}/{cra.residue.name}{cra.residue.seqid.num}/{cra.atom.name}"
        return label, float(self.cell.find_nearest_image(mark.pos, pos, gemmi.Asu.Any).dist())


def snapshot_dano(snapshot) -> tuple[np.ndarray, np.ndarray]:
    """Rows of the F(+) mates and F(+) − F(−) of a snapshot's full table (acentric
    reflections with both mates seen): the amplitudes the MTZ carries in ``F(+)``/``F(-)``.
    """
    sp = snapshot.space
    obs = snapshot.obs_count[0]
    f = snapshot.tables["all"]["F"].astype(np.float64)
    key = hkl_key(sp.hkl)
    use = ~sp.centric & (obs > 0)
    plus = np.nonzero(use & (sp.friedel > 0))[0]
    minus = np.nonzero(use & (sp.friedel < 0))[0]
    _, ip, im = np.intersect1d(key[plus], key[minus], return_indices=True)
    rows_p, rows_m = plus[ip], minus[im]
    return rows_p, f[rows_p] - f[rows_m]


def snapshot_peaks(snapshot, model: PhasingModel, *, sample_rate: float = SAMPLE_RATE,
                   n_new: int = N_NEW_PEAKS) -> PeakReport | None:
    """Peak heights at the model's heavy atoms in the snapshot's anomalous difference map.

    None outside anomalous mode or before ten Bijvoet pairs are seen.
    """
    sp = snapshot.space
    if not sp.anomalous:
        return None
    rows, dano = snapshot_dano(snapshot)
    if rows.shape[0] < 10:
        return None
    phi = model.phases(sp.cell, sp.space_group, sp.hkl, sp.dmin)[rows]
    grid = difference_map(sp.cell, sp.space_group, sp.hkl[rows], dano, phi,
                          sample_rate=sample_rate)
    heights = heights_at(grid, model.heavy_frac(sp.cell))
    return PeakReport(atoms=dict(zip(model.labels, heights)),
                      elements=dict(zip(model.labels, model.elements)),
                      new_peaks=new_peaks(grid, model, sp.space_group, n=n_new),
                      n_reflections=int(rows.shape[0]), model=model.path.name)


def new_peaks(grid: gemmi.FloatGrid, model: PhasingModel, space_group: gemmi.SpaceGroup, *,
              n: int = N_NEW_PEAKS, min_sigma: float = NEW_PEAK_MIN_SIGMA,
              min_distance: float = NEW_PEAK_DISTANCE) -> list[Peak]:
    """The strongest local maxima of ``grid`` farther than ``min_distance`` (Å) from every
    heavy atom of ``model`` (symmetry copies included), one per group of symmetry copies."""
    return map_peaks(np.array(grid, copy=False), grid.unit_cell, model, space_group, n=n,
                     min_sigma=min_sigma, away_from_heavy=min_distance)


def map_peaks(arr: np.ndarray, cell: gemmi.UnitCell, model: PhasingModel,
              space_group: gemmi.SpaceGroup, *, n: int = N_NEW_PEAKS,
              min_sigma: float = NEW_PEAK_MIN_SIGMA,
              away_from_heavy: float | None = None) -> list[Peak]:
    """The ``n`` strongest local maxima of the map values ``arr`` (a grid over ``cell``, σ)
    at or above ``min_sigma``, one per group of symmetry copies, each with the model's
    nearest atom; with ``away_from_heavy`` (Å), only those farther than that from every
    heavy atom.  Negate ``arr`` for the deepest minima."""
    # a local maximum over the six face neighbours (periodic), above the floor
    peak = arr >= min_sigma
    for axis in range(3):
        for shift in (1, -1):
            peak &= arr >= np.roll(arr, shift, axis=axis)
    idx = np.argwhere(peak)
    if idx.size == 0:
        return []
    order = np.argsort(-arr[peak])
    heavy, everyone = model.searches(cell, space_group)
    kept: list[Peak] = []
    shape = np.array(arr.shape, dtype=np.float64)
    # two maxima closer than this are one peak (or symmetry copies of one)
    apart = NEW_PEAK_DISTANCE if away_from_heavy is None else away_from_heavy
    for j in order:
        if len(kept) >= n:
            break
        f = idx[j] / shape
        pos = cell.orthogonalize(gemmi.Fractional(*map(float, f)))
        if away_from_heavy is not None and heavy.nearest(pos, away_from_heavy)[0] is not None:
            continue
        if any(everyone.cell.find_nearest_image(gemmi.Position(*p.xyz), pos,
                                                gemmi.Asu.Any).dist() < apart for p in kept):
            continue        # a symmetry copy of a peak already kept
        label, dist = everyone.nearest(pos, 12.0)
        kept.append(Peak(sigma=float(arr[tuple(idx[j])]), frac=[float(x) for x in f],
                         xyz=[pos.x, pos.y, pos.z], nearest_atom=label, distance=dist))
    return kept
