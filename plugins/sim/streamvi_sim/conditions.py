"""Pump–probe conditions of a simulated beamtime: which image is which, and the light structure.

A time-resolved experiment interleaves *dark* shots (no pump) with *light* ones (the pump
laser fired a delay before the X-ray pulse).  The first of
:attr:`~streamvi_sim.SimulationConfig.conditions` is the dark state, the simulated
structure itself; every later condition is the light state, the same crystal after
:class:`LightChange`:

- ``move`` atoms (light atoms, C/N/O, chosen at random from the structure's own seed) each
  shifted by ``shift`` Å in a random direction, at occupancy ``fraction`` in the light state:
  a partially populated photoproduct, ``(1 − fraction)`` of the molecules keep the dark site;
- ``occupancy`` other atoms whose occupancy changes by ``delta`` (a ligand leaving, −0.3,
  or binding, +0.3; clipped to [0, 1]).

Structure factors are linear in the atoms, so the light state's F is the dark F plus the
transform of the changed atoms alone (bulk solvent and anomalous scattering kept as they
are): ``F_light = F_dark + Σ_moved fraction·(f(x + shift) − f(x)) + Σ_occupancy Δocc·f(x)``.

Image ``i`` belongs to condition ``pattern[i mod len(pattern)]``, the pattern being
``condition_ratio[0]`` times the first condition, then ``condition_ratio[1]`` times the
second, …: ``(1, 1)`` alternates dark and light, ``(1, 3)`` fires the pump three shots in
four.  Which condition an image belongs to changes nothing of its random draws (orientation,
scale, photons …): only the structure it diffracts from.
"""
from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import gemmi
import numpy as np

from streamvi_sim.model import AtomModel, structure_factors

if TYPE_CHECKING:
    import reciprocalspaceship as rs

    from streamvi_sim.config import SimulationConfig
    from streamvi_sim.truth import Truth

#: Elements an atom moved or whose occupancy changes may be (the iodide and sulfur sites
#: carry the anomalous signal and stay as they are).
CHANGEABLE_ELEMENTS = ("C", "N", "O")


@dataclass(frozen=True)
class LightChange:
    """What the pump does to the structure (see the module docstring).

    Attributes
    ----------
    move
        Atoms moved.
    shift
        Distance each moved atom travels, Å.
    fraction
        Occupancy of the moved position in the light state (the rest stays put).
    occupancy
        Atoms (others than the moved ones) whose occupancy changes.
    delta
        Their occupancy change (clipped so the occupancy stays in [0, 1]).
    """

    move: int = 0
    shift: float = 1.5
    fraction: float = 0.3
    occupancy: int = 0
    delta: float = -0.3

    def __post_init__(self) -> None:
        problems = []
        if self.move < 0 or self.occupancy < 0:
            problems.append(f"move = {self.move} and occupancy = {self.occupancy} count atoms "
                            "and must be ≥ 0")
        if not (math.isfinite(self.shift) and self.shift > 0):
            problems.append(f"shift = {self.shift} must be a positive distance in Å (1–2 Å "
                            "is typical)")
        if not 0.0 < self.fraction <= 1.0:
            problems.append(f"fraction = {self.fraction} must lie in (0, 1] (0.3: 30 % of "
                            "the molecules in the moved state)")
        if not -1.0 <= self.delta <= 1.0:
            problems.append(f"delta = {self.delta} must lie in [-1, 1]")
        if problems:
            raise ValueError("light change: " + "; ".join(problems))

    @property
    def empty(self) -> bool:
        """Whether the light state is the dark one."""
        return self.move == 0 and (self.occupancy == 0 or self.delta == 0.0)

    @classmethod
    def parse(cls, spec: str) -> "LightChange":
        """``"move=5,shift=1.5,fraction=0.3,occupancy=3,delta=-0.5"`` (any subset; empty:
        no change).  Raises ``ValueError`` naming the key that is wrong."""
        kinds = {"move": int, "shift": float, "fraction": float, "occupancy": int,
                 "delta": float}
        values: dict[str, object] = {}
        for part in (p.strip() for p in spec.split(",")):
            if not part:
                continue
            key, sep, text = part.partition("=")
            key = key.strip()
            if not sep or key not in kinds:
                raise ValueError(f"light change {spec!r}: {part!r} is not KEY=VALUE with KEY "
                                 f"one of {', '.join(kinds)} (e.g. "
                                 "'move=5,shift=1.5,fraction=0.3')")
            try:
                values[key] = kinds[key](text.strip())
            except ValueError:
                raise ValueError(f"light change {spec!r}: {key} = {text.strip()!r} is not "
                                 f"{'an integer' if kinds[key] is int else 'a number'}"
                                 ) from None
        return cls(**values)  # type: ignore[arg-type]

    def spec(self) -> str:
        """The text :meth:`parse` reads back."""
        return (f"move={self.move},shift={self.shift:g},fraction={self.fraction:g},"
                f"occupancy={self.occupancy},delta={self.delta:g}")


@dataclass(frozen=True)
class ChangedAtoms:
    """Which atoms the light change touches, and where they go.

    Attributes
    ----------
    moved
        Indices (into the dark model) of the atoms moved.
    moved_to
        ``(len(moved), 3)`` fractional coordinates of their light positions.
    occupancy_changed
        Indices of the atoms whose occupancy changes.
    """

    moved: np.ndarray
    moved_to: np.ndarray
    occupancy_changed: np.ndarray

    def sites(self, atoms: AtomModel) -> np.ndarray:
        """``(n, 3)`` fractional coordinates where the difference map should show peaks:
        the dark sites of every changed atom (negative) and the moved atoms' light sites
        (positive)."""
        return np.concatenate([atoms.frac[self.moved], self.moved_to,
                               atoms.frac[self.occupancy_changed]])


def condition_pattern(config: "SimulationConfig") -> list[int]:
    """One cycle of conditions (indices into ``config.conditions``); ``[0]`` without them."""
    if not config.conditions:
        return [0]
    ratio = config.condition_ratio or (1,) * len(config.conditions)
    return [c for c, r in enumerate(ratio) for _ in range(int(r))]


def image_condition(config: "SimulationConfig", index: int) -> int:
    """Condition (index into ``config.conditions``) of image ``index``."""
    pattern = condition_pattern(config)
    return pattern[index % len(pattern)]


def changed_atoms(config: "SimulationConfig", atoms: AtomModel,
                  cell: gemmi.UnitCell) -> ChangedAtoms:
    """Draw the atoms :class:`LightChange` touches, from a random stream of their own
    (``SeedSequence(seed, (0, 3))``: the dark structure is the same with or without them)."""
    change = config.light_change_parsed
    rng = np.random.default_rng(np.random.SeedSequence(config.seed, spawn_key=(0, 3)))
    candidates = np.nonzero(np.isin(atoms.elements, CHANGEABLE_ELEMENTS))[0]
    need = change.move + change.occupancy
    if need > candidates.shape[0]:
        raise ValueError(f"light change needs {need} light atoms, the structure has "
                         f"{candidates.shape[0]}: lower move/occupancy or raise n_atoms")
    picked = rng.choice(candidates, size=need, replace=False)
    moved, occ = np.sort(picked[:change.move]), np.sort(picked[change.move:])
    direction = rng.normal(size=(change.move, 3))
    direction /= np.linalg.norm(direction, axis=1, keepdims=True)
    frac_mat = np.array(cell.frac.mat.tolist())
    moved_to = atoms.frac[moved] + (change.shift * direction) @ frac_mat.T
    return ChangedAtoms(moved=moved, moved_to=moved_to, occupancy_changed=occ)


def light_truth(config: "SimulationConfig", dark: "Truth") -> "Truth":
    """The light state's :class:`~streamvi_sim.Truth` (see the module docstring).

    ``dark.atoms`` must be set (a structure simulated from atoms, not flat intensities).
    """
    if dark.atoms is None:
        raise ValueError("a light change needs an atomic model: flat_intensities has none")
    change = config.light_change_parsed
    cell, sg = dark.gemmi_cell, dark.gemmi_space_group
    atoms = dark.atoms
    picked = changed_atoms(config, atoms, cell)
    energy = dark.photon_energy_eV
    # ΔF from the changed atoms alone: +fraction at the new site, −fraction at the old one,
    # and the occupancy change at the others (occupancies kept in [0, 1])
    new_occ = np.clip(atoms.occupancy[picked.occupancy_changed] + change.delta, 0.0, 1.0)
    parts = [
        replace(atoms.select(picked.moved), frac=picked.moved_to,
                occupancy=np.full(picked.moved.shape[0], change.fraction)),
        replace(atoms.select(picked.moved),
                occupancy=np.full(picked.moved.shape[0], -change.fraction)),
        replace(atoms.select(picked.occupancy_changed),
                occupancy=new_occ - atoms.occupancy[picked.occupancy_changed]),
    ]
    delta = AtomModel(np.concatenate([p.elements for p in parts]),
                      np.concatenate([p.frac for p in parts]),
                      np.concatenate([p.b_iso for p in parts]),
                      np.concatenate([p.occupancy for p in parts]))
    if len(delta):
        df_plus, df_minus = structure_factors(delta, cell=cell, space_group=sg, hkl=dark.hkl,
                                              photon_energy_eV=energy)
    else:
        df_plus = df_minus = np.zeros(len(dark), np.complex128)
    f_plus = dark.F_plus * np.exp(1j * np.radians(dark.phi_plus)) + df_plus
    f_minus = dark.F_minus * np.exp(1j * np.radians(dark.phi_minus)) + df_minus
    light_atoms = AtomModel(
        np.concatenate([atoms.elements, atoms.elements[picked.moved]]),
        np.concatenate([atoms.frac, picked.moved_to]),
        np.concatenate([atoms.b_iso, atoms.b_iso[picked.moved]]),
        np.concatenate([np.where(np.isin(np.arange(len(atoms)), picked.moved),
                                 1.0 - change.fraction, atoms.occupancy),
                        np.full(picked.moved.shape[0], change.fraction)]))
    light_atoms.occupancy[picked.occupancy_changed] = new_occ
    return replace(dark, F_plus=np.abs(f_plus), F_minus=np.abs(f_minus),
                   phi_plus=np.degrees(np.angle(f_plus)),
                   phi_minus=np.degrees(np.angle(f_minus)), atoms=light_atoms)


def condition_truths(config: "SimulationConfig", dark: "Truth") -> dict[str, "Truth"]:
    """The truth of every condition, by name: the first is ``dark`` itself, every later one
    the light state (one light structure, computed once)."""
    if not config.conditions:
        return {}
    names = list(config.conditions)
    light = light_truth(config, dark) if len(names) > 1 else dark
    return {name: (dark if c == 0 else light) for c, name in enumerate(names)}


_UNSAFE = re.compile(r"[^A-Za-z0-9_.+-]+")


def file_label(name: str) -> str:
    """A condition name as it may appear in a file name (letters, digits and ``_.+-``), the
    same reduction the service's ``latest-<condition>.mtz`` files use."""
    return _UNSAFE.sub("_", name).strip("_.") or "condition"


def delta_dataset(dark: "Truth", light: "Truth") -> "rs.DataSet":
    """The true difference light − dark on the ASU: ``DF`` = |F_light| − |F_dark| (of the
    structure factor without f'', as a non-anomalous merge estimates it), and both states'
    amplitudes and phases (``FDARK PHIDARK FLIGHT PHILIGHT``)."""
    import reciprocalspaceship as rs

    ds = rs.DataSet({
        "H": dark.hkl[:, 0], "K": dark.hkl[:, 1], "L": dark.hkl[:, 2],
        "DF": light.F_model - dark.F_model,
        "FDARK": dark.F_model, "PHIDARK": dark.phi_model,
        "FLIGHT": light.F_model, "PHILIGHT": light.phi_model,
    }, cell=dark.gemmi_cell, spacegroup=dark.gemmi_space_group)
    ds = ds.astype({"H": "HKL", "K": "HKL", "L": "HKL", "DF": "SFAmplitude",
                    "FDARK": "SFAmplitude", "PHIDARK": "Phase", "FLIGHT": "SFAmplitude",
                    "PHILIGHT": "Phase"})
    return ds.set_index(["H", "K", "L"])


def write_condition_truths(config: "SimulationConfig", truths: dict[str, "Truth"],
                           path: str | os.PathLike[str]) -> list[Path]:
    """Beside the truth MTZ ``path`` (``T.mtz``): ``T-<condition>.mtz`` for every condition
    and ``T-<light>-minus-<dark>.mtz`` (:func:`delta_dataset`) for every light condition.

    Returns
    -------
    list of pathlib.Path
        The files written.
    """
    path = Path(path)
    stem, suffix = path.with_suffix(""), path.suffix or ".mtz"
    names = list(truths)
    written = []
    for name in names:
        out = Path(f"{stem}-{file_label(name)}{suffix}")
        truths[name].to_mtz(out)
        written.append(out)
    dark = truths[names[0]]
    for name in names[1:]:
        out = Path(f"{stem}-{file_label(name)}-minus-{file_label(names[0])}{suffix}")
        delta_dataset(dark, truths[name]).write_mtz(os.fspath(out))
        written.append(out)
    return written
