"""Read DIALS experiment lists (``.expt``, dxtbx JSON) without dxtbx.

An ``ExperimentList`` holds shared model lists (``beam``, ``detector``, ``crystal``,
``imageset``, …) and an ``experiment`` list whose entries point into them by index.  What is
read, in DIALS' lab frame (z towards the source, so the beam travels along −z; y up):

- crystal: ``real_space_a/b/c`` (Å), ``space_group_hall_symbol``, and the stills mosaicity
  model ``ML_half_mosaicity_deg`` / ``ML_domain_size_ang`` when present;
- beam: ``direction`` (unit vector from the sample towards the source, so
  s0 = −direction/λ) and ``wavelength`` (Å);
- detector: every panel's ``origin`` (mm), ``fast_axis``, ``slow_axis``, ``pixel_size``
  (mm), ``image_size`` (pixels).  Panels are stored in their parent group's frame; the
  ``hierarchy`` is composed here so :class:`Panel` holds lab-frame vectors;
- imageset: the image file and, for multi-image files, the index in it.

Goniometer, scan, profile and scaling models are ignored (stills have none).  A problem with
one experiment (its crystal missing, say) does not stop the others: it is put in
:attr:`Experiment.error`.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from typing import Any

import gemmi
import numpy as np

from streamvi.errors import InputError

REASON = "malformed_experiment_list"
#: h·c in eV·Å (CODATA 2018), the same constant as streamvi.wire.
HC_EV_A = 12398.419843320026


@dataclass(frozen=True)
class Panel:
    """One detector panel in the lab frame.

    Attributes
    ----------
    name
        Panel name (e.g. ``"ARRAY_D0Q0S0A0"``).
    origin
        Lab position of the panel's (0, 0) pixel corner, mm.
    fast_axis, slow_axis
        Unit vectors along the fast and slow pixel directions.
    pixel_size
        (fast, slow) pixel pitch, mm.
    image_size
        (fast, slow) size, pixels.
    """

    name: str
    origin: np.ndarray
    fast_axis: np.ndarray
    slow_axis: np.ndarray
    pixel_size: tuple[float, float]
    image_size: tuple[int, int]

    @property
    def normal(self) -> np.ndarray:
        """fast × slow (unit)."""
        return np.cross(self.fast_axis, self.slow_axis)

    def lab_position(self, fast_mm: np.ndarray, slow_mm: np.ndarray) -> np.ndarray:
        """Lab positions (mm, shape (n, 3)) of panel coordinates given in mm."""
        return (self.origin[None, :] + np.asarray(fast_mm)[:, None] * self.fast_axis
                + np.asarray(slow_mm)[:, None] * self.slow_axis)


@dataclass
class Experiment:
    """One DIALS experiment: for stills, one crystal on one image.

    Attributes
    ----------
    index
        Position in the experiment list (the ``id`` column of the reflection table).
    identifier
        The experiment's identifier string (often empty in older files).
    real_space
        Rows a, b, c of the direct basis, Å, DIALS lab frame; ``None`` without a crystal.
    cell
        (a, b, c, α, β, γ), Å and degrees, from the real-space vectors.
    hall_symbol
        ``space_group_hall_symbol`` as written.
    space_group
        The group, found by gemmi from the Hall symbol's operations.
    wavelength_A
        Å.
    beam_direction
        Unit vector from the sample towards the source (dxtbx's convention).
    image_path, image_index
        The image file and the image's index in it (``None`` for single-image files).
    panels
        Detector panels, lab frame; empty when the experiment has no detector.
    half_mosaicity_deg, domain_size_A
        Stills mosaicity model (``ML_half_mosaicity_deg``, ``ML_domain_size_ang``).
    error
        Why this experiment cannot be used, or ``None``.
    problems
        Non-fatal remarks (an unknown space group, a missing detector).
    """

    index: int
    identifier: str = ""
    real_space: np.ndarray | None = None
    cell: tuple[float, float, float, float, float, float] | None = None
    hall_symbol: str | None = None
    space_group: gemmi.SpaceGroup | None = None
    wavelength_A: float | None = None
    beam_direction: np.ndarray | None = None
    image_path: str | None = None
    image_index: int | None = None
    panels: list[Panel] = field(default_factory=list)
    half_mosaicity_deg: float | None = None
    domain_size_A: float | None = None
    error: InputError | None = None
    problems: list[str] = field(default_factory=list)

    @property
    def A(self) -> np.ndarray:
        """The setting matrix UB (Å⁻¹): columns a*, b*, c*, so q = A·(h, k, l)."""
        if self.real_space is None:
            raise ValueError(f"experiment {self.index} has no crystal")
        return np.linalg.inv(self.real_space)

    @property
    def reciprocal(self) -> np.ndarray:
        """Rows a*, b*, c* (Å⁻¹, DIALS lab frame)."""
        return self.A.T

    @property
    def s0(self) -> np.ndarray:
        """Incident beam vector −direction/λ, Å⁻¹ (DIALS lab frame)."""
        if self.beam_direction is None or self.wavelength_A is None:
            raise ValueError(f"experiment {self.index} has no beam")
        return -self.beam_direction / self.wavelength_A

    @property
    def photon_energy_eV(self) -> float | None:
        """12398.42 eV·Å / λ."""
        return None if self.wavelength_A is None else HC_EV_A / self.wavelength_A


def cell_from_real_space(real_space: np.ndarray) -> tuple[float, float, float,
                                                            float, float, float]:
    """(a, b, c, α, β, γ) in Å and degrees from rows a, b, c of a direct basis (Å)."""
    a, b, c = (np.asarray(v, dtype=np.float64) for v in real_space)
    la, lb, lc = (float(np.linalg.norm(v)) for v in (a, b, c))

    def angle(u: np.ndarray, v: np.ndarray, lu: float, lv: float) -> float:
        return math.degrees(math.acos(max(-1.0, min(1.0, float(u @ v) / (lu * lv)))))

    return (la, lb, lc, angle(b, c, lb, lc), angle(a, c, la, lc), angle(a, b, la, lb))


def space_group_from_hall(hall: str) -> gemmi.SpaceGroup | None:
    """The tabulated space group whose operations the Hall symbol generates, or ``None``."""
    try:
        return gemmi.find_spacegroup_by_ops(gemmi.symops_from_hall(hall.strip()))
    except (RuntimeError, ValueError):
        return None


def read_experiments(path: str | os.PathLike[str]) -> list[Experiment]:
    """Read a DIALS experiment list.

    Parameters
    ----------
    path
        ``.expt`` (JSON) file.

    Returns
    -------
    list of Experiment
        In file order; an experiment that cannot be used carries its reason in
        :attr:`Experiment.error` instead of raising.

    Raises
    ------
    streamvi.errors.InputError
        Reason ``malformed_experiment_list`` (``unreadable_file`` if it cannot be opened)
        when the file as a whole is not an experiment list.
    """
    spath = str(path)
    try:
        with open(path, "rb") as fh:
            raw = fh.read()
    except OSError as exc:
        raise InputError(f"{spath}: cannot open the experiment list: {exc.strerror}",
                         reason="unreadable_file") from exc
    try:
        doc = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise InputError(f"{spath}: not JSON ({exc}); is this a DIALS .expt file? A file cut "
                         "short must be written again", reason=REASON) from None
    if not isinstance(doc, dict) or not isinstance(doc.get("experiment"), list):
        raise InputError(f"{spath}: no 'experiment' list at the top level; is this a DIALS "
                         "ExperimentList (.expt) file?", reason=REASON)
    return [_experiment(doc, i, entry, spath) for i, entry in enumerate(doc["experiment"])]


def _model(doc: dict[str, Any], kind: str, entry: dict[str, Any]) -> tuple[Any, str | None]:
    """The model ``entry[kind]`` points to, or (None, what is wrong)."""
    ref = entry.get(kind)
    if ref is None:
        return None, f"has no {kind}"
    models = doc.get(kind)
    if isinstance(ref, bool) or not isinstance(ref, int):
        return None, f"refers to {kind} {ref!r}, not an index (external model files are not read)"
    if not isinstance(models, list) or not 0 <= ref < len(models):
        n = len(models) if isinstance(models, list) else 0
        return None, f"refers to {kind} {ref} but the file has {n}"
    if not isinstance(models[ref], dict):
        return None, f"{kind} {ref} is not a JSON object"
    return models[ref], None


def _vector(d: dict[str, Any], key: str, n: int = 3) -> np.ndarray:
    v = d.get(key)
    arr = np.asarray(v, dtype=np.float64) if isinstance(v, list) else None
    if arr is None or arr.shape != (n,) or not np.isfinite(arr).all():
        raise ValueError(f"'{key}' is {v!r}, not {n} finite numbers")
    return arr


def _experiment(doc: dict[str, Any], index: int, entry: Any, path: str) -> Experiment:
    exp = Experiment(index=index)

    def fail(reason: str, what: str) -> Experiment:
        exp.error = InputError(f"{path}: experiment {index} {what}", reason=reason)
        return exp

    if not isinstance(entry, dict):
        return fail(REASON, "is not a JSON object")
    exp.identifier = str(entry.get("identifier") or "")
    crystal, why = _model(doc, "crystal", entry)
    if crystal is None:
        return fail("missing_crystal", f"{why}; it was not indexed — nothing to merge")
    try:
        exp.real_space = np.stack([_vector(crystal, f"real_space_{x}") for x in "abc"])
    except ValueError as exc:
        return fail("bad_crystal", f"crystal: {exc}")
    if abs(np.linalg.det(exp.real_space)) < 1e-6:
        return fail("bad_crystal", "crystal: the real-space vectors are coplanar")
    exp.cell = cell_from_real_space(exp.real_space)
    exp.hall_symbol = crystal.get("space_group_hall_symbol")
    if isinstance(exp.hall_symbol, str):
        exp.space_group = space_group_from_hall(exp.hall_symbol)
    if exp.space_group is None:
        exp.problems.append(f"space group Hall symbol {exp.hall_symbol!r} not recognised")
    for key, attr in (("ML_half_mosaicity_deg", "half_mosaicity_deg"),
                      ("ML_domain_size_ang", "domain_size_A")):
        if isinstance(crystal.get(key), (int, float)):
            setattr(exp, attr, float(crystal[key]))

    beam, why = _model(doc, "beam", entry)
    if beam is None:
        return fail("missing_beam", f"{why}; the wavelength is needed")
    try:
        direction = _vector(beam, "direction")
        wavelength = float(beam.get("wavelength"))  # type: ignore[arg-type]
    except (ValueError, TypeError) as exc:
        return fail("bad_beam", f"beam: {exc}")
    if not (math.isfinite(wavelength) and wavelength > 0) or not np.linalg.norm(direction):
        return fail("bad_beam", f"beam: wavelength {wavelength!r} Å or direction "
                    f"{direction.tolist()} unusable")
    exp.wavelength_A = wavelength
    exp.beam_direction = direction / np.linalg.norm(direction)

    detector, why = _model(doc, "detector", entry)
    if detector is None:
        exp.problems.append(f"detector: experiment {why}")
    else:
        try:
            exp.panels = detector_panels(detector)
        except (ValueError, TypeError, KeyError) as exc:
            exp.problems.append(f"detector: {exc}")
    imageset, _ = _model(doc, "imageset", entry)
    if imageset is not None:
        _image(exp, imageset)
    return exp


def _image(exp: Experiment, imageset: dict[str, Any]) -> None:
    images = imageset.get("images")
    if isinstance(images, list) and len(images) == 1 and isinstance(images[0], str):
        exp.image_path = images[0]
    elif isinstance(imageset.get("template"), str):
        exp.image_path = imageset["template"]
    indices = imageset.get("single_file_indices")
    if isinstance(indices, list) and len(indices) == 1 and isinstance(indices[0], int):
        exp.image_index = indices[0]


def _frame(node: dict[str, Any]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return _vector(node, "origin"), _vector(node, "fast_axis"), _vector(node, "slow_axis")


def detector_panels(detector: dict[str, Any]) -> list[Panel]:
    """Lab-frame panels of a dxtbx detector dict.

    Each group and panel of the ``hierarchy`` gives its frame in its parent's: a position
    (x, y, z) there is parent_origin + x·fast + y·slow + z·(fast × slow).  A detector
    without a hierarchy has its panels in the lab frame already.
    """
    raw = detector.get("panels")
    if not isinstance(raw, list):
        raise ValueError("no 'panels' list")
    # Parent frame of each panel, as (origin, rotation with columns fast, slow, normal).
    parents: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def walk(node: dict[str, Any], origin: np.ndarray, rot: np.ndarray) -> None:
        if "panel" in node:
            parents[int(node["panel"])] = (origin, rot)
            return
        o, f, s = _frame(node)
        g_origin, g_fast, g_slow = origin + rot @ o, rot @ f, rot @ s
        g_rot = np.stack([g_fast, g_slow, np.cross(g_fast, g_slow)], axis=1)
        for child in node.get("children", []):
            walk(child, g_origin, g_rot)

    if isinstance(detector.get("hierarchy"), dict):
        walk(detector["hierarchy"], np.zeros(3), np.eye(3))
    panels = []
    for i, p in enumerate(raw):
        origin, rot = parents.get(i, (np.zeros(3), np.eye(3)))
        o, f, s = _frame(p)
        px = p.get("pixel_size")
        size = p.get("image_size")
        panels.append(Panel(name=str(p.get("name", i)), origin=origin + rot @ o,
                            fast_axis=rot @ f, slow_axis=rot @ s,
                            pixel_size=(float(px[0]), float(px[1])),
                            image_size=(int(size[0]), int(size[1]))))
    return panels
