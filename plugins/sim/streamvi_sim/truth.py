"""The true structure factors of a simulation, with MTZ and PDB input/output."""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

import gemmi
import numpy as np
import reciprocalspaceship as rs

from streamvi_sim.model import (AtomModel, bulk_solvent_factors, molecular_envelope,
                                random_atom_model, structure_factors, to_gemmi_structure)

if TYPE_CHECKING:
    from streamvi_sim.config import SimulationConfig

#: MTZ columns written by :meth:`Truth.to_mtz`, with their MTZ types.
MTZ_COLUMNS = {
    "FMODEL": "F", "PHIFMODEL": "P",
    "F(+)": "G", "PHI(+)": "P", "F(-)": "G", "PHI(-)": "P",
    "I(+)": "K", "I(-)": "K",
}


@dataclass
class Truth:
    """True amplitudes and phases on the reciprocal asymmetric unit.

    F(+) is F(hkl) and F(−) is F(−h −k −l) for each ASU index ``hkl`` (gemmi's ReciprocalAsu
    convention); they differ only through f''.

    Attributes
    ----------
    cell
        ``(a, b, c, α, β, γ)`` in Å and degrees.
    space_group
        Hermann–Mauguin symbol.
    hkl
        ``(n, 3)`` int32 ASU indices (systematic absences excluded).
    F_plus, F_minus
        Amplitudes |F(h)|, |F(−h)|, electrons.
    phi_plus, phi_minus
        Phases of F(h) and F(−h), degrees.
    atoms
        The model (``None`` when read from an MTZ without a model file).
    photon_energy_eV
        Energy at which f', f'' were taken (``None``: no anomalous scattering).
    """

    cell: tuple[float, float, float, float, float, float]
    space_group: str
    hkl: np.ndarray
    F_plus: np.ndarray
    F_minus: np.ndarray
    phi_plus: np.ndarray
    phi_minus: np.ndarray
    atoms: AtomModel | None = None
    photon_energy_eV: float | None = None

    def __len__(self) -> int:
        return int(self.hkl.shape[0])

    @property
    def gemmi_cell(self) -> gemmi.UnitCell:
        """The cell as a gemmi object."""
        return gemmi.UnitCell(*self.cell)

    @property
    def gemmi_space_group(self) -> gemmi.SpaceGroup:
        """The space group as a gemmi object."""
        return gemmi.SpaceGroup(self.space_group)

    @property
    def d(self) -> np.ndarray:
        """Resolution of each reflection, Å."""
        return self.gemmi_cell.calculate_d_array(self.hkl)

    @property
    def centric(self) -> np.ndarray:
        """Whether each reflection is centric (then |F(+)| = |F(−)|)."""
        return self.gemmi_space_group.operations().centric_flag_array(self.hkl).astype(bool)

    @property
    def epsilon(self) -> np.ndarray:
        """Multiplicity factor ε of each reflection."""
        return self.gemmi_space_group.operations().epsilon_factor_array(self.hkl)

    @property
    def F_model(self) -> np.ndarray:
        """Amplitude of (F(h) + F(−h)*)/2: the structure factor without f''."""
        return np.abs(self._f_mean())

    @property
    def phi_model(self) -> np.ndarray:
        """Phase of (F(h) + F(−h)*)/2, degrees."""
        return np.degrees(np.angle(self._f_mean()))

    @property
    def I_plus(self) -> np.ndarray:
        """|F(h)|², electrons²."""
        return self.F_plus ** 2

    @property
    def I_minus(self) -> np.ndarray:
        """|F(−h)|², electrons²."""
        return self.F_minus ** 2

    @property
    def I_mean(self) -> np.ndarray:
        """(|F(+)|² + |F(−)|²)/2: what a non-anomalous merge estimates."""
        return 0.5 * (self.I_plus + self.I_minus)

    def sites(self) -> AtomModel:
        """The anomalous scatterers (S, I) of the model."""
        if self.atoms is None:
            raise ValueError("this Truth carries no atoms (read it with sites_path=...)")
        return self.atoms.anomalous_sites()

    def site_frac(self, element: str) -> np.ndarray:
        """Fractional coordinates ``(n, 3)`` of the model's ``element`` atoms (e.g. "I")."""
        sites = self.sites()
        return np.asarray(sites.frac)[np.asarray(sites.elements) == element]

    def _f_mean(self) -> np.ndarray:
        fp = self.F_plus * np.exp(1j * np.radians(self.phi_plus))
        fm = self.F_minus * np.exp(1j * np.radians(self.phi_minus))
        return 0.5 * (fp + np.conj(fm))

    # ------------------------------------------------------------------------- files

    def to_dataset(self) -> rs.DataSet:
        """The truth as a reciprocalspaceship DataSet (columns of :data:`MTZ_COLUMNS`)."""
        ds = rs.DataSet({
            "H": self.hkl[:, 0], "K": self.hkl[:, 1], "L": self.hkl[:, 2],
            "FMODEL": self.F_model, "PHIFMODEL": self.phi_model,
            "F(+)": self.F_plus, "PHI(+)": self.phi_plus,
            "F(-)": self.F_minus, "PHI(-)": self.phi_minus,
            "I(+)": self.I_plus, "I(-)": self.I_minus,
        }, cell=self.gemmi_cell, spacegroup=self.gemmi_space_group)
        for name in ("H", "K", "L"):
            ds[name] = ds[name].astype("HKL")
        for name, mtz_type in MTZ_COLUMNS.items():
            ds[name] = ds[name].astype(_dtype(mtz_type))
        return ds.set_index(["H", "K", "L"])

    def to_mtz(self, path: str | os.PathLike[str]) -> None:
        """Write the truth as an MTZ file (readable by gemmi, CCP4, Phenix)."""
        self.to_dataset().write_mtz(os.fspath(path))

    @classmethod
    def from_mtz(cls, path: str | os.PathLike[str], *,
                 sites_path: str | os.PathLike[str] | None = None) -> "Truth":
        """Read an MTZ written by :meth:`to_mtz` (and optionally a model PDB)."""
        ds = rs.read_mtz(os.fspath(path))
        hkl = ds.get_hkls().astype(np.int32)
        cell = ds.cell
        atoms = None
        if sites_path is not None:
            atoms = read_atoms(sites_path)
        return cls(
            cell=(cell.a, cell.b, cell.c, cell.alpha, cell.beta, cell.gamma),
            space_group=ds.spacegroup.hm,
            hkl=hkl,
            F_plus=ds["F(+)"].to_numpy(np.float64), F_minus=ds["F(-)"].to_numpy(np.float64),
            phi_plus=ds["PHI(+)"].to_numpy(np.float64),
            phi_minus=ds["PHI(-)"].to_numpy(np.float64),
            atoms=atoms,
        )

    def write_sites(self, path: str | os.PathLike[str]) -> None:
        """Write the anomalous scatterers (S, I) as a PDB file with CRYST1."""
        self._write_pdb(self.sites(), path)

    def write_model(self, path: str | os.PathLike[str]) -> None:
        """Write every atom of the model as a PDB file with CRYST1."""
        if self.atoms is None:
            raise ValueError("this Truth carries no atoms")
        self._write_pdb(self.atoms, path)

    def _write_pdb(self, atoms: AtomModel, path: str | os.PathLike[str]) -> None:
        st = to_gemmi_structure(atoms, cell=self.gemmi_cell,
                                space_group=self.gemmi_space_group)
        st.write_pdb(os.fspath(path))


def _dtype(mtz_type: str) -> str:
    return {"F": "SFAmplitude", "P": "Phase", "G": "FriedelSFAmplitude",
            "K": "FriedelIntensity"}[mtz_type]


def read_atoms(path: str | os.PathLike[str]) -> AtomModel:
    """Atoms of a PDB/mmCIF file as an :class:`AtomModel` (fractional coordinates)."""
    st = gemmi.read_structure(os.fspath(path))
    elements, xyz, b_iso, occ = [], [], [], []
    for cra in st[0].all():
        elements.append(cra.atom.element.name)
        xyz.append(cra.atom.pos.tolist())
        b_iso.append(cra.atom.b_iso)
        occ.append(cra.atom.occ)
    frac = np.array(xyz, dtype=np.float64).reshape(-1, 3) @ np.array(st.cell.frac.mat.tolist()).T
    return AtomModel(np.array(elements, dtype=str), frac, np.array(b_iso), np.array(occ))


def simulate_structure(config: "SimulationConfig") -> Truth:
    """Build the random model of ``config`` and its structure factors to ``config.dmin``.

    Deterministic in ``config.seed``; independent of every image's random stream.  With
    ``config.flat_intensities`` the truth is :func:`flat_truth`; with
    ``config.solvent_fraction`` the atoms fill a molecular envelope and the bulk solvent's
    contribution is added (:func:`~streamvi_sim.model.bulk_solvent_factors`).
    """
    cell = gemmi.UnitCell(*config.cell)
    sg = gemmi.SpaceGroup(config.space_group)
    if config.flat_intensities:
        return flat_truth(config)
    rng = np.random.default_rng(np.random.SeedSequence(config.seed, spawn_key=(0,)))
    region = None
    if config.solvent_fraction > 0:
        # the envelope from a stream of its own, the atoms from the structure's
        envelope = molecular_envelope(
            cell=cell, space_group=sg, protein_fraction=1.0 - config.solvent_fraction,
            rng=np.random.default_rng(np.random.SeedSequence(config.seed, spawn_key=(0, 1))))
        region = envelope.contains
    atoms = random_atom_model(
        cell=cell, space_group=sg, n_light=config.n_atoms, n_sulfur=config.n_sulfur,
        n_iodide=config.n_iodide, min_distance=config.min_atom_distance,
        b_range=config.b_range, b_iodide=config.b_iodide,
        iodide_occupancy=config.iodide_occupancy, rng=rng, region=region)
    hkl = gemmi.make_miller_array(cell, sg, config.dmin, unique=True).astype(np.int32)
    energy = config.photon_energy_eV if config.anomalous else None
    f_plus, f_minus = structure_factors(atoms, cell=cell, space_group=sg, hkl=hkl,
                                        photon_energy_eV=energy)
    if config.solvent_fraction > 0:
        f_solvent = bulk_solvent_factors(atoms, cell=cell, space_group=sg, hkl=hkl,
                                         k_sol=config.solvent_k, b_sol=config.solvent_b,
                                         dmin=config.dmin)
        f_plus = f_plus + f_solvent
        f_minus = f_minus + np.conj(f_solvent)
    return Truth(
        cell=tuple(float(x) for x in config.cell),  # type: ignore[arg-type]
        space_group=sg.xhm(), hkl=hkl,
        F_plus=np.abs(f_plus), F_minus=np.abs(f_minus),
        phi_plus=np.degrees(np.angle(f_plus)), phi_minus=np.degrees(np.angle(f_minus)),
        atoms=atoms, photon_energy_eV=energy,
    )


def flat_truth(config: "SimulationConfig") -> Truth:
    """Random intensities with no atoms and no resolution fall-off (CrystFEL partial_sim's kind).

    I = ε·Σ·x per unique reflection, x exponential (acentric) or χ²₁ (centric), Σ =
    :data:`~streamvi_sim.config.FLAT_SIGMA` electrons²; F(+) = F(−) (no anomalous signal);
    phases are uniform at random (φ(−) = −φ(+)), meaningless but consistent.  Deterministic
    in ``config.seed``.
    """
    from streamvi_sim.config import FLAT_SIGMA

    cell = gemmi.UnitCell(*config.cell)
    sg = gemmi.SpaceGroup(config.space_group)
    rng = np.random.default_rng(np.random.SeedSequence(config.seed, spawn_key=(0, 2)))
    hkl = gemmi.make_miller_array(cell, sg, config.dmin, unique=True).astype(np.int32)
    ops = sg.operations()
    centric = ops.centric_flag_array(hkl).astype(bool)
    epsilon = ops.epsilon_factor_array(hkl).astype(np.float64)
    x = np.where(centric, rng.normal(size=len(hkl)) ** 2, rng.exponential(size=len(hkl)))
    amplitude = np.sqrt(FLAT_SIGMA * epsilon * x)
    phase = rng.uniform(-180.0, 180.0, size=len(hkl))
    return Truth(cell=tuple(float(v) for v in config.cell),  # type: ignore[arg-type]
                 space_group=sg.xhm(), hkl=hkl, F_plus=amplitude, F_minus=amplitude.copy(),
                 phi_plus=phase, phi_minus=-phase, atoms=None, photon_energy_eV=None)
