"""A random atomic model and its complex structure factors, anomalous scattering included.

The model is not a protein: light atoms are placed uniformly (random sequential addition
with a minimum distance to every atom and symmetry mate), which gives Wilson statistics at
all resolutions -- what merging cares about.  Optionally (:func:`molecular_envelope`) they
fill a compact globule per asymmetric unit instead, and :func:`bulk_solvent_factors` adds
the flat solvent around it, which gives the very strong low-order reflections of real
proteins.  Structure factors are summed directly over
atoms and symmetry operators with numpy:

    F(h) = Σ_j occ_j · exp(−B_j s²) · (f0_j(s) + f'_j + i f''_j) · Σ_ops exp(2πi h·(R x_j + t))

with s² = (sin θ / λ)² = 1/(4d²), f0 from the International Tables (IT92) coefficients that
gemmi carries and f', f'' from gemmi's Cromer–Liberman at the photon energy.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import gemmi
import numpy as np

#: Elemental make-up of the light atoms (roughly that of a protein, hydrogens omitted).
LIGHT_ELEMENTS = (("C", 0.63), ("N", 0.17), ("O", 0.20))

#: Elements that scatter anomalously enough to matter at ~9.5 keV.
ANOMALOUS_ELEMENTS = frozenset({"S", "I"})


@dataclass(frozen=True)
class AtomModel:
    """Atoms of one asymmetric unit.

    Attributes
    ----------
    elements
        Element symbols, ``(n,)`` str.
    frac
        Fractional coordinates, ``(n, 3)``.
    b_iso
        Isotropic displacement parameters, Å².
    occupancy
        Site occupancies in [0, 1].
    """

    elements: np.ndarray
    frac: np.ndarray
    b_iso: np.ndarray
    occupancy: np.ndarray

    def __len__(self) -> int:
        return int(self.elements.shape[0])

    def select(self, mask: np.ndarray) -> "AtomModel":
        """The atoms where ``mask`` is true."""
        return AtomModel(self.elements[mask], self.frac[mask], self.b_iso[mask],
                         self.occupancy[mask])

    def anomalous_sites(self) -> "AtomModel":
        """Only the anomalous scatterers (S, I)."""
        return self.select(np.isin(self.elements, sorted(ANOMALOUS_ELEMENTS)))


def symmetry_matrices(space_group: gemmi.SpaceGroup) -> tuple[np.ndarray, np.ndarray]:
    """All operators of the space group (centring included) as float arrays.

    Returns
    -------
    rot, tran
        ``(n_ops, 3, 3)`` rotation parts and ``(n_ops, 3)`` fractional translations.
    """
    ops = list(space_group.operations())
    rot = np.array([op.rot for op in ops], dtype=np.float64) / gemmi.Op.DEN
    tran = np.array([op.tran for op in ops], dtype=np.float64) / gemmi.Op.DEN
    return rot, tran


def random_atom_model(*, cell: gemmi.UnitCell, space_group: gemmi.SpaceGroup, n_light: int,
                      n_sulfur: int, n_iodide: int, min_distance: float,
                      b_range: tuple[float, float], b_iodide: float, iodide_occupancy: float,
                      rng: np.random.Generator,
                      region: Callable[[np.ndarray], np.ndarray] | None = None) -> AtomModel:
    """Place atoms at random, no two (symmetry mates included) closer than ``min_distance``.

    Parameters
    ----------
    cell, space_group
        The crystal.
    n_light, n_sulfur, n_iodide
        How many C/N/O atoms, sulfur atoms and iodide ions per asymmetric unit.
    min_distance
        Å.
    b_range
        Uniform range of B for C/N/O/S, Å².
    b_iodide, iodide_occupancy
        B (Å²) and occupancy of the iodide ions.
    rng
        Random generator.
    region
        Where atoms may go: a function of fractional coordinates ``(n, 3)`` returning a
        boolean mask (e.g. :meth:`MolecularEnvelope.contains`); ``None``: anywhere.

    Raises
    ------
    ValueError
        If the asymmetric unit cannot hold that many atoms at that distance.
    """
    n_total = n_light + n_sulfur + n_iodide
    n_cand = max(6 * n_total, 64)
    if region is None:
        cand = rng.random((n_cand, 3))
    else:
        # a packed envelope needs more tries per accepted atom than the open cell
        n_cand = max(12 * n_total, 64)
        found: list[np.ndarray] = []
        while sum(len(f) for f in found) < n_cand:
            draw = rng.random((4 * n_cand, 3))
            found.append(draw[region(draw)])
        cand = np.concatenate(found)[:n_cand]
    # gemmi's neighbour search sees symmetry mates and lattice translations; the candidates
    # are residues 0…n−1 of one chain, so a mark's residue_idx names its candidate.
    probe = to_gemmi_structure(AtomModel(np.full(n_cand, "C"), cand, np.zeros(n_cand),
                                         np.ones(n_cand)), cell=cell, space_group=space_group)
    probe.setup_cell_images()
    search = gemmi.NeighborSearch(probe[0], probe.cell, 5).populate()
    orth = np.array(cell.orth.mat.tolist())
    xyz = cand @ orth.T

    accepted = np.zeros(n_cand, dtype=bool)
    chosen: list[int] = []
    for i in range(n_cand):
        if len(chosen) == n_total:
            break
        owners = np.array([m.residue_idx for m in search.find_atoms(
            gemmi.Position(*xyz[i]), "\0", radius=min_distance)], dtype=np.intp)
        # More than one image of itself nearby means a special position: skip it too.
        if (owners == i).sum() > 1 or accepted[owners[owners != i]].any():
            continue
        accepted[i] = True
        chosen.append(i)
    if len(chosen) < n_total:
        raise ValueError(f"could place only {len(chosen)} of {n_total} atoms at "
                         f"{min_distance} Å apart; lower min_atom_distance or n_atoms")

    frac = cand[chosen]
    light = rng.choice([e for e, _ in LIGHT_ELEMENTS], size=n_light,
                       p=[p for _, p in LIGHT_ELEMENTS])
    elements = np.concatenate([np.full(n_iodide, "I"), np.full(n_sulfur, "S"), light])
    b_iso = rng.uniform(*b_range, size=n_total)
    b_iso[:n_iodide] = b_iodide
    occupancy = np.ones(n_total)
    occupancy[:n_iodide] = iodide_occupancy
    return AtomModel(elements.astype(str), frac, b_iso, occupancy)


def form_factor(element: str, stol2: np.ndarray) -> np.ndarray:
    """Normal X-ray form factor f0 (electrons) at ``stol2`` = (sin θ/λ)² in Å⁻²."""
    coefs = gemmi.Element(element).it92.get_coefs()
    a, b, c = coefs[0:4], coefs[4:8], coefs[8]
    return c + sum(ai * np.exp(-bi * stol2) for ai, bi in zip(a, b))


def anomalous_terms(element: str, photon_energy_eV: float) -> tuple[float, float]:
    """f', f'' (electrons) of ``element`` at the photon energy (Cromer–Liberman)."""
    fp, fpp = gemmi.cromer_liberman(z=gemmi.Element(element).atomic_number,
                                    energy=photon_energy_eV)
    return float(fp), float(fpp)


def structure_factors(model: AtomModel, *, cell: gemmi.UnitCell,
                      space_group: gemmi.SpaceGroup, hkl: np.ndarray,
                      photon_energy_eV: float | None, include_fpp: bool = True,
                      chunk: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """Complex F(h) and F(−h) of the model.

    Parameters
    ----------
    model
        Atoms of the asymmetric unit.
    cell, space_group
        The crystal.
    hkl
        ``(n, 3)`` Miller indices.
    photon_energy_eV
        Energy for f', f''; ``None`` switches anomalous scattering off (F(−h) = F(h)*).
    include_fpp
        ``False`` keeps f' but drops f'' (Friedel's law then holds).
    chunk
        Reflections per vectorised block (memory ~ chunk × atoms × operators × 16 bytes).

    Returns
    -------
    f_plus, f_minus
        ``(n,)`` complex128, electrons.
    """
    hkl = np.asarray(hkl)
    rot, tran = symmetry_matrices(space_group)
    # Symmetry-expanded positions (atoms, ops, 3); h·(R x + t) summed over ops below.
    xyz = np.einsum("oij,nj->noi", rot, model.frac) + tran[None]
    n_atoms, n_ops = xyz.shape[:2]
    frac_mat = np.array(cell.frac.mat.tolist())
    stol2 = 0.25 * np.sum((hkl.astype(np.float64) @ frac_mat) ** 2, axis=1)

    elements = sorted(set(model.elements.tolist()))
    f0 = {e: form_factor(e, stol2) for e in elements}
    if photon_energy_eV is None:
        anom = {e: (0.0, 0.0) for e in elements}
    else:
        anom = {e: anomalous_terms(e, photon_energy_eV) for e in elements}
        if not include_fpp:
            anom = {e: (fp, 0.0) for e, (fp, _) in anom.items()}

    # exp(2πi h·x) = Π_axis exp(2πi h_axis x_axis): tables of the per-axis factors replace
    # one complex exponential per (reflection, atom image) by two multiplications.
    flat = xyz.reshape(-1, 3)
    hidx = hkl.astype(np.int64)
    hmax = np.abs(hidx).max(axis=0) if hidx.size else np.zeros(3, dtype=np.int64)
    tables = [np.exp(2j * np.pi * np.outer(np.arange(-hm, hm + 1), flat[:, ax]))
              for ax, hm in enumerate(hmax)]
    f_plus = np.empty(hkl.shape[0], dtype=np.complex128)
    f_minus = np.empty(hkl.shape[0], dtype=np.complex128)
    for lo in range(0, hkl.shape[0], chunk):
        sl = slice(lo, lo + chunk)
        h = hidx[sl]
        geom = tables[0][h[:, 0] + hmax[0]] * tables[1][h[:, 1] + hmax[1]]
        geom *= tables[2][h[:, 2] + hmax[2]]
        geom = geom.reshape(-1, n_atoms, n_ops).sum(axis=2)  # (n, atoms)
        debye = model.occupancy[None] * np.exp(-np.outer(stol2[sl], model.b_iso))
        w_real = np.empty_like(debye)
        w_imag = np.zeros_like(debye)
        for e in elements:
            m = model.elements == e
            fp, fpp = anom[e]
            w_real[:, m] = debye[:, m] * (f0[e][sl, None] + fp)
            w_imag[:, m] = debye[:, m] * fpp
        sum_real = np.sum(w_real * geom, axis=1)
        sum_imag = np.sum(w_imag * geom, axis=1)
        f_plus[sl] = sum_real + 1j * sum_imag
        # Geometric factor of −h is the conjugate; f'' keeps its sign.
        f_minus[sl] = np.conj(sum_real) + 1j * np.conj(sum_imag)
    return f_plus, f_minus


def to_gemmi_structure(model: AtomModel, *, cell: gemmi.UnitCell,
                       space_group: gemmi.SpaceGroup) -> gemmi.Structure:
    """The atoms as a gemmi structure (one chain, one residue per atom)."""
    st = gemmi.Structure()
    st.cell = cell
    st.spacegroup_hm = space_group.xhm()
    gmodel = gemmi.Model(1)
    chain = gemmi.Chain("A")
    orth = np.array(cell.orth.mat.tolist())
    xyz = model.frac @ orth.T
    for n, (el, pos, b, occ) in enumerate(zip(model.elements, xyz, model.b_iso,
                                             model.occupancy), start=1):
        res = gemmi.Residue()
        res.name = "IOD" if el == "I" else ("SUL" if el == "S" else "UNK")
        res.seqid = gemmi.SeqId(n, " ")
        res.het_flag = "H"
        atom = gemmi.Atom()
        atom.name = str(el).upper()
        atom.element = gemmi.Element(str(el))
        atom.pos = gemmi.Position(*pos)
        atom.b_iso = float(b)
        atom.occ = float(occ)
        res.add_atom(atom)
        chain.add_residue(res)
    gmodel.add_chain(chain)
    st.add_model(gmodel)
    st.setup_entities()
    return st


@dataclass(frozen=True)
class MolecularEnvelope:
    """A compact globule per asymmetric unit: where a molecule's atoms may lie.

    Every point of the cell belongs to the nearest of the symmetry images of one centre
    (lattice translations included); the molecule is the points within ``radius`` of their
    centre, with ``radius`` chosen so that the molecules fill ``protein_fraction`` of the
    cell.  :meth:`contains` answers for the molecule about the first centre, so its atoms'
    symmetry mates fill the others without overlapping them.

    Attributes
    ----------
    centres
        ``(n_ops, 3)`` fractional coordinates of the centre and its symmetry images.
    radius
        Å.
    orth
        Orthogonalisation matrix of the cell (fractional → Å).
    """

    centres: np.ndarray
    radius: float
    orth: np.ndarray

    def _nearest(self, frac: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Index of the nearest centre and the distance to it (Å) of each point."""
        delta = frac[:, None, :] - self.centres[None]
        delta -= np.round(delta)      # nearest lattice translation (cells near 90° angles)
        dist = np.linalg.norm(delta @ self.orth.T, axis=2)
        nearest = np.argmin(dist, axis=1)
        return nearest, dist[np.arange(frac.shape[0]), nearest]

    def contains(self, frac: np.ndarray) -> np.ndarray:
        """Whether each point ``(n, 3)`` (fractional) lies in the first centre's molecule."""
        nearest, dist = self._nearest(np.asarray(frac, dtype=np.float64))
        return (nearest == 0) & (dist < self.radius)


def molecular_envelope(*, cell: gemmi.UnitCell, space_group: gemmi.SpaceGroup,
                       protein_fraction: float, rng: np.random.Generator,
                       n_probe: int = 100_000) -> MolecularEnvelope:
    """A random :class:`MolecularEnvelope` filling ``protein_fraction`` of the cell."""
    centre = rng.random(3)
    rot, tran = symmetry_matrices(space_group)
    centres = np.mod(np.einsum("oij,j->oi", rot, centre) + tran, 1.0)
    orth = np.array(cell.orth.mat.tolist())
    probe = MolecularEnvelope(centres, 0.0, orth)
    _, dist = probe._nearest(rng.random((n_probe, 3)))
    return MolecularEnvelope(centres, float(np.quantile(dist, protein_fraction)), orth)


def bulk_solvent_factors(model: AtomModel, *, cell: gemmi.UnitCell,
                         space_group: gemmi.SpaceGroup, hkl: np.ndarray, k_sol: float,
                         b_sol: float, dmin: float) -> np.ndarray:
    """Flat bulk solvent's F(h) (complex, electrons): ``k_sol·exp(−B_sol s²)·F_mask(h)``.

    The mask is gemmi's :class:`gemmi.SolventMasker` (Refmac radii and probe, islands
    removed; 1 in the solvent, 0 in the molecule) on a grid of at most dmin/3 spacing (Å),
    Fourier transformed with the crystallographic sign ``F(h) = ∫ρ(x) exp(2πi h·x) dV``
    (the same as :func:`structure_factors`), s² = 1/(4d²); ``k_sol`` in e/Å³, ``b_sol`` in
    Å².  F(−h) is the complex conjugate (the solvent has no anomalous scattering).
    """
    st = to_gemmi_structure(model, cell=cell, space_group=space_group)
    grid = gemmi.FloatGrid()
    grid.setup_from(st, spacing=min(0.8, dmin / 3.0))
    gemmi.SolventMasker(gemmi.AtomicRadiiSet.Refmac).put_mask_on_float_grid(grid, st[0])
    f_mask = np.array(gemmi.transform_map_to_f_phi(grid), copy=False)
    h = np.asarray(hkl, dtype=np.int64)
    values = f_mask[h[:, 0] % grid.nu, h[:, 1] % grid.nv, h[:, 2] % grid.nw].astype(np.complex128)
    stol2 = 0.25 * cell.calculate_1_d2_array(h.astype(np.int32))
    return k_sol * np.exp(-b_sol * stol2) * values
