"""Space-group symmetry of reciprocal space: the map from an observed hkl to a posterior row.

Everything here is vectorised over numpy arrays of Miller indices (no Python loop per
reflection) and this is the only module that touches gemmi.  Conventions are gemmi's and
CCP4's (the same as ``reciprocalspaceship.utils``):

* the reciprocal-space asymmetric unit (ASU) is CCP4's, defined in the reference setting and
  reached through the space group's change-of-basis for other settings;
* ``isym`` is the MTZ M/ISYM code: symmetry operator ``n`` (1-based, in the order of
  ``GroupOps.sym_ops``) gives ``2n - 1`` when ``hkl`` itself maps into the ASU (Friedel +) and
  ``2n`` when its Friedel mate does (Friedel −);
* ε (epsilon) counts the operators, centring included, that leave ``hkl`` unchanged.
"""
from __future__ import annotations

import functools
import math
import re
from dataclasses import dataclass
from typing import Any, Sequence, Union

import gemmi
import numpy as np

from streamvi.errors import ConfigError, ValueRangeError
from streamvi.wire import validate_cell

SpaceGroupLike = Union[gemmi.SpaceGroup, str, int]
CellLike = Union[gemmi.UnitCell, Sequence[float], str]

#: Indices with ``|h|``, ``|k|`` or ``|l|`` of this or more cannot be mapped or looked up.
#: A symmetry operator at most doubles an index, which keeps results within the key fields.
_INDEX_LIMIT = 1 << 18
_KEY_BITS = 20
_KEY_OFFSET = 1 << 19
#: Rows per block in the vectorised ASU mapping: keeps the (rows × operators) temporaries in
#: cache, which is worth about a factor of two in lookup throughput.
_BLOCK = 16384
#: Above this many P1 reflections the table would take gigabytes; almost surely a typo in dmin.
_MAX_P1_REFLECTIONS = 200_000_000
#: Largest box (entries, 4 bytes each) for the dense lookup table of ReciprocalSpace.
_DENSE_LIMIT = 1 << 24


# ----------------------------------------------------------------------------- parsing


def parse_space_group(name: SpaceGroupLike) -> gemmi.SpaceGroup:
    """Look up a space group by Hermann–Mauguin symbol, number or Hall symbol.

    Parameters
    ----------
    name
        ``'P 43 21 2'``, ``'P43212'``, ``'R 3:H'``, ``'H 3'``, a number 1–230 (as int or
        str, giving the reference setting), a Hall symbol such as ``'P 4nw 2abw'``, or a
        :class:`gemmi.SpaceGroup` (returned unchanged).

    Returns
    -------
    gemmi.SpaceGroup

    Raises
    ------
    ConfigError
        When nothing matches.
    """
    if isinstance(name, gemmi.SpaceGroup):
        return name
    hint = "use a Hermann-Mauguin symbol such as 'P 43 21 2' or a number 1-230"
    if isinstance(name, bool) or not isinstance(name, (int, str, np.integer)):
        raise ConfigError(f"space group {name!r}: expected a symbol or number, got "
                          f"{type(name).__name__}; {hint}")
    text = str(name).strip()
    if re.fullmatch(r"[0-9]+", text):
        number = int(text)
        if not 1 <= number <= 230:
            raise ConfigError(f"space group number {number} is outside 1-230; {hint}")
        return gemmi.find_spacegroup_by_number(number)
    sg = gemmi.find_spacegroup_by_name(text) if text else None
    if sg is None and text:
        try:
            sg = gemmi.find_spacegroup_by_ops(gemmi.symops_from_hall(text))
        except (RuntimeError, ValueError):
            sg = None
    if sg is None:
        raise ConfigError(f"space group {name!r} is not known to gemmi; {hint}")
    return sg


def parse_cell(cell: CellLike) -> gemmi.UnitCell:
    """Read a unit cell ``a b c α β γ`` (Å, degrees).

    Parameters
    ----------
    cell
        Six numbers, as a sequence, a string separated by spaces and/or commas, or a
        :class:`gemmi.UnitCell` (returned unchanged).

    Returns
    -------
    gemmi.UnitCell

    Raises
    ------
    ConfigError
        When the value is not six numbers or is not a possible cell
        (see :func:`streamvi.wire.validate_cell`).
    """
    if isinstance(cell, gemmi.UnitCell):
        return cell
    try:
        if isinstance(cell, str):
            values = [float(x) for x in cell.replace(",", " ").split()]
        else:
            values = [float(x) for x in cell]
    except (TypeError, ValueError):
        raise ConfigError(f"cell {cell!r}: expected six numbers 'a b c alpha beta gamma' in "
                          "Å and degrees, e.g. '79.1 79.1 38.0 90 90 90'") from None
    if len(values) != 6 or not all(math.isfinite(x) for x in values):
        raise ConfigError(f"cell {cell!r}: expected six finite numbers 'a b c alpha beta "
                          "gamma' in Å and degrees, e.g. '79.1 79.1 38.0 90 90 90'")
    try:
        validate_cell(tuple(values), key="cell")
    except ValueRangeError as exc:
        detail = str(exc).removeprefix("key 'cell': ")
        raise ConfigError(f"cell {cell!r}: {detail}; give a b c in Å and α β γ in "
                          "degrees") from exc
    return gemmi.UnitCell(*values)


def _check_compatible(cell: gemmi.UnitCell, sg: gemmi.SpaceGroup) -> None:
    if not cell.is_compatible_with_spacegroup(sg):
        near = symmetrize_cell(cell, sg)
        raise ConfigError(f"cell {format_cell(cell)} does not have the metric symmetry of "
                          f"space group '{sg.xhm()}' ({crystal_system_rule(sg)}); the "
                          f"nearest cell that has it is '{format_cell(near)}': give that, "
                          "or leave the cell empty to take a consensus of the crystals' cells, "
                          "or choose the matching space group")


def require_metric_symmetry(cell: CellLike, sg: SpaceGroupLike, *, key: str = "cell") -> None:
    """Raise :class:`ConfigError` (naming ``key``, the rule and the nearest valid cell) when
    ``cell`` does not have the metric symmetry of ``sg``."""
    try:
        _check_compatible(parse_cell(cell), parse_space_group(sg))
    except ConfigError as exc:
        raise ConfigError(f"{key}: {exc}") from None


# ----------------------------------------------------------------------------- cells

#: Default tolerances of :func:`cell_mismatch`: a crystal whose cell differs from the
#: merge's by more than 5 % in a length or 5° in an angle is not this crystal form.  Real
#: cells of one form scatter far less (5-HT2B at LCLS: 0.5 % and 0.5°, at most 1.5 % and
#: 1.2°; lysozyme at PAL-XFEL: up to 1.9 %), while a different form or a wrong set-up is off
#: by far more (5-HT2B against lysozyme: 22 % in a).
CELL_LENGTH_TOLERANCE = 0.05
CELL_ANGLE_TOLERANCE_DEG = 5.0

_SYSTEM_RULES = {
    "triclinic": "no constraint", "monoclinic": "two angles of 90°",
    "orthorhombic": "α = β = γ = 90°", "tetragonal": "a = b, α = β = γ = 90°",
    "trigonal": "a = b, α = β = 90°, γ = 120° (or a = b = c, α = β = γ on rhombohedral axes)",
    "hexagonal": "a = b, α = β = 90°, γ = 120°", "cubic": "a = b = c, α = β = γ = 90°",
}


def crystal_system_rule(sg: SpaceGroupLike) -> str:
    """The metric constraints of a space group's crystal system, in words."""
    return _SYSTEM_RULES.get(parse_space_group(sg).crystal_system_str(), "its metric symmetry")


def format_cell(cell: CellLike) -> str:
    """``'a b c α β γ'`` with four significant decimals at most (for messages and flags)."""
    return " ".join(f"{x:.4f}".rstrip("0").rstrip(".") for x in parse_cell(cell).parameters)


def _metric(cell: gemmi.UnitCell) -> np.ndarray:
    """Metric tensor ``G = Aᵀ A`` (Å²) of a cell, ``A`` its orthogonalisation matrix."""
    a = np.array(cell.orth.mat.tolist(), dtype=np.float64)
    return a.T @ a


def _cell_of_metric(g: np.ndarray) -> tuple[float, ...]:
    """``(a, b, c, α, β, γ)`` (Å, degrees) of a metric tensor."""
    a, b, c = np.sqrt(np.diag(g))

    def angle(x: float, la: float, lb: float) -> float:
        return math.degrees(math.acos(max(-1.0, min(1.0, x / (la * lb)))))

    return (float(a), float(b), float(c), angle(g[1, 2], b, c), angle(g[0, 2], a, c),
            angle(g[0, 1], a, b))


def symmetrize_cell(cell: CellLike, sg: SpaceGroupLike) -> gemmi.UnitCell:
    """The cell nearest ``cell`` that has the metric symmetry of ``sg``.

    The metric tensor ``G`` is averaged over the point group's rotations ``R`` (fractional,
    as gemmi gives them): ``G' = (1/|P|) Σ Rᵀ G R``.  That average is invariant under every
    operation, so ``G'`` has the group's metric symmetry in whatever setting ``sg`` is
    (a = b in tetragonal groups, γ = 120° in hexagonal axes, two right angles with the
    unique axis of a monoclinic setting, ...), and a cell that already has it is returned
    unchanged.  Indexers never report exactly symmetric cells (5-HT2B in C 2 2 21: angles
    of 90.55°, 91.23°, 90.54°; a ≠ b by 0.01-0.2 Å in tetragonal lysozyme).

    Parameters
    ----------
    cell
        ``a b c α β γ`` in Å and degrees (anything :func:`parse_cell` accepts).
    sg
        The space group (anything :func:`parse_space_group` accepts).

    Returns
    -------
    gemmi.UnitCell
    """
    ucell = parse_cell(cell)
    group = parse_space_group(sg)
    g = _metric(ucell)
    rots = [np.array(op.rot, dtype=np.float64) / gemmi.Op.DEN
            for op in group.operations().sym_ops]
    g_sym = sum(r.T @ g @ r for r in rots) / len(rots)
    params = _cell_of_metric(0.5 * (g_sym + g_sym.T))
    # rounding noise (1e-13 Å) would otherwise show in messages and MTZ headers
    return gemmi.UnitCell(*(round(x, 9) for x in params))


def cell_mismatch(cell: CellLike, reference: CellLike, *,
                  length_tolerance: float = CELL_LENGTH_TOLERANCE,
                  angle_tolerance_deg: float = CELL_ANGLE_TOLERANCE_DEG) -> str | None:
    """Why ``cell`` is not the crystal form of ``reference``, or None when it is.

    Parameters
    ----------
    cell, reference
        ``a b c α β γ`` (Å, degrees).
    length_tolerance
        Largest relative difference of a cell length, e.g. 0.05 for 5 %.
    angle_tolerance_deg
        Largest difference of a cell angle, degrees.

    Returns
    -------
    str or None
        The parameter furthest beyond its tolerance, e.g.
        ``"a = 61.4 Å against 79.1 Å (22.4 %, tolerance 5 %)"``.
    """
    got = parse_cell(cell).parameters
    ref = parse_cell(reference).parameters
    worst, why = 1.0, None
    for name, x, r in zip(("a", "b", "c"), got[:3], ref[:3]):
        rel = abs(x - r) / r
        if rel / length_tolerance > worst:
            worst = rel / length_tolerance
            why = (f"{name} = {x:.4g} Å against {r:.4g} Å ({100 * rel:.1f} %, tolerance "
                   f"{100 * length_tolerance:g} %)")
    for name, x, r in zip(("α", "β", "γ"), got[3:], ref[3:]):
        diff = abs(x - r)
        if diff / angle_tolerance_deg > worst:
            worst = diff / angle_tolerance_deg
            why = f"{name} = {x:.4g}° against {r:.4g}° (tolerance {angle_tolerance_deg:g}°)"
    return why


@dataclass(frozen=True)
class ConsensusCell:
    """A merge cell made from crystals' cells (:func:`consensus_cell`)."""

    #: the cell, with the space group's metric symmetry
    cell: gemmi.UnitCell
    #: per-parameter median of the crystals' cells, before symmetrising
    median: tuple[float, ...]
    #: crystals it was made from
    n_crystals: int
    #: of those, crystals whose cell is beyond tolerance of ``cell``
    n_outliers: int
    #: whether symmetrising changed the median by more than 1e-6 Å or degrees
    symmetrized: bool


def consensus_cell(cells: Sequence[CellLike], sg: SpaceGroupLike, *,
                   length_tolerance: float = CELL_LENGTH_TOLERANCE,
                   angle_tolerance_deg: float = CELL_ANGLE_TOLERANCE_DEG) -> ConsensusCell:
    """A robust merge cell: the per-parameter median of crystals' cells, symmetrised.

    The median, not the mean, so that a hostile or misindexed crystal (even the first) moves
    it by one rank at most; then :func:`symmetrize_cell`, because a median of real cells
    never has the exact metric symmetry of the group.

    Parameters
    ----------
    cells
        One ``a b c α β γ`` (Å, degrees) per crystal; at least one.
    sg
        The merge's space group.
    length_tolerance, angle_tolerance_deg
        As in :func:`cell_mismatch`, to count the crystals that disagree.

    Returns
    -------
    ConsensusCell

    Raises
    ------
    ValueError
        When ``cells`` is empty.
    """
    if len(cells) == 0:
        raise ValueError("consensus_cell needs at least one cell")
    params = np.array([parse_cell(c).parameters for c in cells], dtype=np.float64)
    median = tuple(float(x) for x in np.median(params, axis=0))
    cell = symmetrize_cell(median, sg)
    n_out = sum(cell_mismatch(tuple(p), cell, length_tolerance=length_tolerance,
                              angle_tolerance_deg=angle_tolerance_deg) is not None
                for p in params)
    changed = not np.allclose(cell.parameters, median, rtol=0, atol=1e-6)
    return ConsensusCell(cell=cell, median=median, n_crystals=int(params.shape[0]),
                         n_outliers=int(n_out), symmetrized=bool(changed))


# ----------------------------------------------------------------------------- ASU mapping


def _as_hkl(hkl: Any) -> np.ndarray:
    a = np.asarray(hkl)
    if a.ndim != 2 or a.shape[1] != 3:
        raise ValueError(f"Miller indices must have shape (n, 3), got {a.shape}")
    if a.dtype.kind not in "iu":
        raise ValueError(f"Miller indices must be integers, got dtype {a.dtype}")
    return a


def _hkl32(hkl: Any) -> np.ndarray:
    """C-contiguous int32 copy-if-needed, the layout gemmi's array functions take."""
    return np.ascontiguousarray(_as_hkl(hkl), dtype=np.int32)


_MIRROR = {">=": "<=", "<=": ">=", ">": "<", "<": ">", "==": "==", "=": "=="}


def _compile_condition(condition: str, *, negated: bool = False):
    """Turn gemmi's ASU condition text (``"h>=k and k>=0 and l>=0"``) into a numpy predicate.

    With ``negated`` the predicate answers for ``(-h, -k, -l)``, written with mirrored
    comparisons so that the Friedel test costs no negated copies of the arrays.
    """
    def comparison(m: re.Match) -> str:
        lhs, op, rhs = m[1], m[2], m[3]
        if negated:
            op = _MIRROR[op]
            if rhs not in "hkl":
                rhs = str(-int(rhs))
        return f"({lhs}{'==' if op == '=' else op}{rhs})"

    expr = re.sub(r"([hkl])\s*(>=|<=|==|=|>|<)\s*(-?\d+|[hkl])", comparison, condition)
    expr = expr.replace(" and ", " & ").replace(" or ", " | ")
    if not re.fullmatch(r"[hkl0-9()<>=&| -]*", expr):
        raise RuntimeError(f"unexpected ASU condition from gemmi: {condition!r}")
    code = compile(expr, "<asu condition>", "eval")
    return lambda h, k, l: eval(code, {"__builtins__": {}}, {"h": h, "k": k, "l": l})  # noqa: E741


#: A set of integer 3x3 matrices applied to hkl, stored sparsely: ``terms[i][s]`` lists the
#: ``(j, coefficient)`` pairs with ``hkl'[i] = sum(coefficient * hkl[j])`` for operator ``s``.
_Terms = tuple[tuple[tuple[tuple[int, int], ...], ...], ...]


def _terms(mats: np.ndarray) -> _Terms:
    """Sparse form of ``(nsym, 3, 3)`` matrices acting on row vectors (hkl' = hkl @ m)."""
    return tuple(tuple(tuple((j, int(m[j, i])) for j in range(3) if m[j, i])
                       for m in mats) for i in range(3))


def _apply(terms: _Terms, cols: list[np.ndarray]) -> list[np.ndarray]:
    """Every operator applied to every reflection: three (nsym, n) int32 arrays.

    Laid out (operator, reflection) so each numpy loop runs over the long axis, and written
    term by term because nearly all coefficients are ±1: five times faster than broadcasting.
    """
    n = cols[0].shape[0]
    out = []
    for per_op in terms:
        coord = np.empty((len(per_op), n), dtype=np.int32)
        for s, op_terms in enumerate(per_op):
            row = coord[s]
            (j, c), rest = op_terms[0], op_terms[1:]
            if c == 1:
                np.copyto(row, cols[j])
            elif c == -1:
                np.negative(cols[j], out=row)
            else:
                np.multiply(cols[j], c, out=row)
            for j, c in rest:
                row += c * cols[j]
        out.append(coord)
    return out


@dataclass(frozen=True)
class _AsuMapper:
    """Precomputed operators of one space group for the vectorised ASU mapping."""

    rot: _Terms              # the symmetry operators (gemmi's sym_ops order)
    test: _Terms | None      # the same followed by the change of basis; None in reference
    basis: np.ndarray        # (3, 3) int64, change of basis to the reference setting
    condition: Any           # ASU predicate on (h, k, l) in the reference setting
    condition_negated: Any   # the same predicate evaluated for (-h, -k, -l)

    def in_asu(self, hkl: np.ndarray) -> np.ndarray:
        """Whether each row is in the (Friedel +) ASU."""
        r = hkl.astype(np.int64) @ self.basis
        return self.condition(r[:, 0], r[:, 1], r[:, 2])

    def to_asu(self, hkl: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """ASU indices and ISYM of an (n, 3) int32 block."""
        n, nsym = hkl.shape[0], len(self.rot[0])
        cols = [np.ascontiguousarray(hkl[:, j]) for j in range(3)]
        cand = _apply(self.rot, cols)
        t = cand if self.test is None else _apply(self.test, cols)
        # Candidate order is gemmi's: op 1 (+), op 1 (-), op 2 (+), ...; the first in the
        # ASU wins, which matters for centric reflections (both signs are in the ASU).
        plus, minus = self.condition(*t), self.condition_negated(*t)
        first = np.full(n, 127, dtype=np.int8)
        for s in range(nsym - 1, -1, -1):
            np.copyto(first, np.int8(2 * s + 1), where=minus[s])
            np.copyto(first, np.int8(2 * s), where=plus[s])
        first = first.astype(np.intp)
        flat = (first >> 1) * n + np.arange(n)
        sign = (1 - 2 * (first & 1)).astype(np.int32)
        out = np.empty((n, 3), dtype=np.int32)
        for i in range(3):
            np.multiply(cand[i].ravel().take(flat), sign, out=out[:, i])
        return out, (first + 1).astype(np.int32)


def _cached(build):
    """Memoise a function of a space group (gemmi objects hash by identity, not by value)."""
    cache: dict[tuple[str, str], Any] = {}

    @functools.wraps(build)
    def get(sg: gemmi.SpaceGroup):
        key = (sg.xhm(), sg.hall)
        if key not in cache:
            cache[key] = build(sg)
        return cache[key]
    return get


@_cached
def _mapper(sg: gemmi.SpaceGroup) -> _AsuMapper:
    den = gemmi.Op.DEN
    rot = np.array([op.rot for op in sg.operations().sym_ops], dtype=np.int64)
    if np.any(rot % den):
        raise RuntimeError(f"non-integral rotation in '{sg.xhm()}'")
    rot //= den
    reference = sg.is_reference_setting()
    basis = np.eye(3, dtype=np.int64) if reference else np.array(sg.basisop.rot, np.int64)
    asu = gemmi.ReciprocalAsu(sg).condition_str()
    return _AsuMapper(rot=_terms(rot), test=None if reference else _terms(rot @ basis),
                      basis=basis, condition=_compile_condition(asu),
                      condition_negated=_compile_condition(asu, negated=True))


def _mapper_of(sg: SpaceGroupLike) -> _AsuMapper:
    return _mapper(parse_space_group(sg))


def hkl_to_asu(hkl: np.ndarray, sg: SpaceGroupLike) -> tuple[np.ndarray, np.ndarray]:
    """Map Miller indices to the reciprocal ASU.

    Parameters
    ----------
    hkl
        ``(n, 3)`` integer Miller indices, ``|index| < 2**18``.
    sg
        Space group (anything :func:`parse_space_group` accepts).

    Returns
    -------
    hkl_asu : np.ndarray
        ``(n, 3)`` int32 indices in the ASU (identical to ``rs.utils.hkl_to_asu``).
    isym : np.ndarray
        ``(n,)`` int32 MTZ ISYM codes; odd = Friedel +, even = Friedel −.
    """
    a = _as_hkl(hkl)
    if a.size and (int(a.min()) <= -_INDEX_LIMIT or int(a.max()) >= _INDEX_LIMIT):
        raise ValueError(f"Miller indices must lie within ±{_INDEX_LIMIT - 1}")
    mapper = _mapper_of(sg)
    a = a.astype(np.int32, copy=False)
    out = np.empty((a.shape[0], 3), dtype=np.int32)
    isym = np.empty(a.shape[0], dtype=np.int32)
    for start in range(0, a.shape[0], _BLOCK):
        stop = start + _BLOCK
        out[start:stop], isym[start:stop] = mapper.to_asu(a[start:stop])
    return out, isym


def friedel_sign(isym: np.ndarray) -> np.ndarray:
    """+1 for Friedel + (odd ISYM), −1 for Friedel − (even ISYM), as int8."""
    isym = np.asarray(isym)
    return (1 - 2 * ((isym + 1) & 1)).astype(np.int8)


def in_asu(hkl: np.ndarray, sg: SpaceGroupLike) -> np.ndarray:
    """Whether each index lies in the Friedel + ASU (``rs.utils.in_asu``)."""
    return _mapper_of(sg).in_asu(_as_hkl(hkl))


def is_centric(hkl: np.ndarray, sg: SpaceGroupLike) -> np.ndarray:
    """Whether each reflection is centric in ``sg`` (bool array)."""
    return np.asarray(parse_space_group(sg).operations().centric_flag_array(_hkl32(hkl)),
                      dtype=bool)


def is_absent(hkl: np.ndarray, sg: SpaceGroupLike) -> np.ndarray:
    """Whether each reflection is systematically absent in ``sg`` (bool array)."""
    return np.asarray(parse_space_group(sg).operations().systematic_absences(_hkl32(hkl)),
                      dtype=bool)


def epsilon(hkl: np.ndarray, sg: SpaceGroupLike) -> np.ndarray:
    """Multiplicity factor ε of each reflection, centring included (float32).

    Equal to ``rs.utils.compute_structurefactor_multiplicity(hkl, sg)``: the number of
    operators of ``sg`` (all of them, centring translations included) that leave ``hkl``
    unchanged, so every reflection of a C-centred group has ε >= 2.  ⟨|F|²⟩ = ε Σ.
    """
    eps = parse_space_group(sg).operations().epsilon_factor_array(_hkl32(hkl))
    return np.asarray(eps, dtype=np.float32)


def dhkl(hkl: np.ndarray, cell: CellLike) -> np.ndarray:
    """Resolution d of each reflection, Å (float32; inf for 000)."""
    with np.errstate(divide="ignore"):
        d = parse_cell(cell).calculate_d_array(_hkl32(hkl))
    return np.asarray(d, dtype=np.float32)


def shell_edges(d_max: float, d_min: float, n_shells: int) -> np.ndarray:
    """Boundaries of ``n_shells`` resolution shells from ``d_max`` down to ``d_min``, Å.

    Shells have equal reciprocal-space volume (equal steps in 1/d³), so they hold about
    equal numbers of reflections.  The one shell binning of the package: the shell tables,
    forecasts, comparisons with a truth and :meth:`ReciprocalSpace.shell_edges` use it.

    Returns
    -------
    np.ndarray
        ``(n_shells + 1,)`` float64, from low to high resolution.

    Raises
    ------
    ConfigError
        ``n_shells`` is not an integer >= 1.
    """
    if isinstance(n_shells, bool) or not isinstance(n_shells, (int, np.integer)) \
            or n_shells < 1:
        raise ConfigError(f"n_shells {n_shells!r}: expected an integer >= 1, e.g. 10")
    lo, hi = 1.0 / float(d_max) ** 3, 1.0 / float(d_min) ** 3
    return np.cbrt(1.0 / np.linspace(lo, hi, int(n_shells) + 1))


def shell_index(d: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """Index of the shell (0 = lowest resolution) among ``edges`` (:func:`shell_edges`)
    holding each d (Å); a d beyond the edges counts in the first or last shell."""
    with np.errstate(divide="ignore"):
        s3 = 1.0 / np.asarray(d, dtype=np.float64) ** 3
    e = 1.0 / np.asarray(edges, dtype=np.float64) ** 3
    return np.clip(np.searchsorted(e, s3, side="right") - 1, 0, len(edges) - 2)


def enumerate_asu(cell: CellLike, sg: SpaceGroupLike, dmin: float,
                  anomalous: bool = False) -> np.ndarray:
    """All symmetry-unique, not systematically absent reflections with d >= dmin.

    Parameters
    ----------
    cell, sg
        Unit cell (Å, degrees) and space group.
    dmin
        Resolution limit, Å; reflections with float32 d >= dmin are kept, as
        ``rs.utils.generate_reciprocal_asu`` does.
    anomalous
        Also return ``-hkl`` for every acentric reflection (the Friedel − half), as
        ``rs.utils.generate_reciprocal_asu(..., anomalous=True)`` does.

    Returns
    -------
    np.ndarray
        ``(n, 3)`` int32, sorted lexicographically by (h, k, l); 000 excluded.
    """
    cell, sg = parse_cell(cell), parse_space_group(sg)
    dmin = _check_dmin(dmin, cell)
    mapper = _mapper(sg)
    hmax, kmax, lmax = (x + 1 for x in cell.get_hkl_limits(dmin))
    kk, ll = np.meshgrid(np.arange(-kmax, kmax + 1, dtype=np.int32),
                         np.arange(-lmax, lmax + 1, dtype=np.int32), indexing="ij")
    kl = np.stack([kk.ravel(), ll.ravel()], axis=1)
    slab = max(1, 2_000_000 // kl.shape[0])
    gops = sg.operations()
    parts = []
    for h0 in range(-hmax, hmax + 1, slab):
        hs = np.arange(h0, min(h0 + slab, hmax + 1), dtype=np.int32)
        hkl = np.concatenate([np.repeat(hs, kl.shape[0])[:, None], np.tile(kl, (len(hs), 1))],
                             axis=1)
        hkl = hkl[np.any(hkl != 0, axis=1) & mapper.in_asu(hkl)]
        hkl = hkl[cell.calculate_d_array(hkl).astype(np.float32) >= dmin]
        parts.append(hkl[~np.asarray(gops.systematic_absences(hkl), dtype=bool)])
    hkl = np.concatenate(parts)
    if anomalous:
        acentric = ~np.asarray(gops.centric_flag_array(hkl), dtype=bool)
        hkl = np.concatenate([hkl, -hkl[acentric]])
    order = np.lexsort((hkl[:, 2], hkl[:, 1], hkl[:, 0]))
    return np.ascontiguousarray(hkl[order], dtype=np.int32)


def _check_dmin(dmin: float, cell: gemmi.UnitCell) -> float:
    try:
        dmin = float(dmin)
    except (TypeError, ValueError):
        raise ConfigError(f"dmin {dmin!r}: expected a resolution in Å, e.g. 1.8") from None
    if not (math.isfinite(dmin) and dmin > 0):
        raise ConfigError(f"dmin {dmin!r}: must be a positive resolution in Å, e.g. 1.8")
    n_p1 = 4.0 / 3.0 * math.pi * cell.volume / dmin ** 3
    if n_p1 > _MAX_P1_REFLECTIONS:
        raise ConfigError(f"dmin {dmin:g} Å with a cell of {cell.volume:.3g} Å³ means about "
                          f"{n_p1:.2g} reflections; check the units of dmin (Å) and the cell")
    return dmin


# ----------------------------------------------------------------------------- twinning


def twin_operators(sg: SpaceGroupLike, cell: CellLike) -> list[np.ndarray]:
    """Merohedral twin laws (indexing ambiguities) of ``sg``, identity first.

    Only the operators that the lattice of ``sg``'s crystal family always has are returned
    (e.g. ``k,h,-l`` for P 4, three laws for P 3), not those a cell has by accident
    (pseudo-merohedry, such as β ≈ 90° in a monoclinic cell).

    Parameters
    ----------
    sg, cell
        Space group and a cell compatible with it.

    Returns
    -------
    list of np.ndarray
        3x3 int32 matrices ``M`` acting on column hkl: ``hkl' = M @ hkl``
        (see :func:`reindex`).

    Raises
    ------
    ConfigError
        When ``cell`` lacks the metric symmetry of ``sg``.
    """
    sg, cell = parse_space_group(sg), parse_cell(cell)
    _check_compatible(cell, sg)
    return [m.copy() for m in _twin_matrices(sg)]


@_cached
def _twin_matrices(sg: gemmi.SpaceGroup) -> tuple[np.ndarray, ...]:
    # A metric averaged over the point group has exactly the symmetry every cell of this
    # family has, and no accidental extra symmetry: its twin laws are the merohedral ones.
    g0 = np.array(gemmi.UnitCell(10.3, 13.7, 17.9, 71.3, 83.9, 103.1).metric_tensor()
                  .as_mat33().tolist())
    rots = [np.array(op.rot, dtype=float) / gemmi.Op.DEN for op in sg.operations().sym_ops]
    g = sum(r.T @ g0 @ r for r in rots) / len(rots)
    lengths = np.sqrt(np.diag(g))
    angles = [math.degrees(math.acos(g[i, j] / (lengths[i] * lengths[j])))
              for i, j in ((1, 2), (0, 2), (0, 1))]
    generic = gemmi.UnitCell(*lengths, *angles)
    mats = [np.eye(3, dtype=np.int32)]
    for op in gemmi.find_twin_laws(generic, sg, 0.01, False):
        m = np.array(op.rot, dtype=np.int64).T
        if np.any(m % gemmi.Op.DEN):
            continue  # not an integral reindexing of this cell: cannot be merohedral
        mats.append((m // gemmi.Op.DEN).astype(np.int32))
    for m in mats:
        m.setflags(write=False)
    return tuple(mats)


def reindex(hkl: np.ndarray, op: np.ndarray) -> np.ndarray:
    """Apply a reindexing matrix to Miller indices: ``hkl' = op @ hkl`` per row (int32)."""
    a = _as_hkl(hkl)
    m = np.asarray(op)
    if m.shape != (3, 3):
        raise ValueError(f"reindexing operator must be 3x3, got shape {m.shape}")
    return (a.astype(np.int32, copy=False) @ m.T.astype(np.int32)).astype(np.int32, copy=False)


def op_triplet(op: np.ndarray) -> str:
    """A reindexing matrix as the usual ``h,k,l`` triplet, e.g. ``k,h,-l``."""
    m = np.asarray(op, dtype=np.int64)
    terms = []
    for row in m:
        t = ""
        for coef, name in zip(row, "hkl"):
            if coef == 0:
                continue
            sign = "-" if coef < 0 else ("+" if t else "")
            t += sign + ("" if abs(coef) == 1 else str(abs(coef))) + name
        terms.append(t or "0")
    return ",".join(terms)


# ----------------------------------------------------------------------------- the table


def hkl_key(hkl: np.ndarray) -> np.ndarray:
    """Pack each (h, k, l), every index within ±2**19, into one int64 that sorts like
    (h, k, l): the key to group, match or look up reflections by index (one packing for
    the whole package)."""
    a = hkl.astype(np.int64) + _KEY_OFFSET
    return (a[:, 0] << (2 * _KEY_BITS)) | (a[:, 1] << _KEY_BITS) | a[:, 2]


def _blocked(find, a: np.ndarray) -> np.ndarray:
    """``find`` over blocks of rows of ``a``, so temporaries stay in cache."""
    out = np.empty(a.shape[0], dtype=np.int64)
    for start in range(0, a.shape[0], _BLOCK):
        out[start:start + _BLOCK] = find(a[start:start + _BLOCK])
    return out


class ReciprocalSpace:
    """The table of unique reflections that the posterior indexes.

    Parameters
    ----------
    space_group
        Anything :func:`parse_space_group` accepts.
    cell
        Target cell (Å, degrees), anything :func:`parse_cell` accepts; it must have the
        metric symmetry of the space group.
    dmin
        Resolution limit, Å.
    anomalous
        Keep F(+) and F(−) of acentric reflections as separate rows.
    dense_limit
        Largest number of entries (4 bytes each) of the dense lookup table that spans all
        symmetry equivalents; beyond it lookups map to the ASU and binary-search the sorted
        int64 keys instead (same answers, about ten times slower).

    Attributes
    ----------
    hkl : np.ndarray
        ``(n_unique, 3)`` int32 ASU indices, rows sorted by (h, k, l) then F(+) before F(−).
    friedel : np.ndarray
        ``(n_unique,)`` int8: +1 for F(+) (or the mean, when not anomalous), −1 for F(−).
        In anomalous mode each acentric ASU index has two rows, each centric one (+1).
    centric : np.ndarray
        bool, per row.
    epsilon : np.ndarray
        float32 multiplicity factor ε per row (see :func:`epsilon`).
    d : np.ndarray
        float32 resolution per row, Å.
    twin_ops : list of np.ndarray
        Merohedral reindexing operators, identity first (see :func:`twin_operators`).
    """

    def __init__(self, space_group: SpaceGroupLike, cell: CellLike, dmin: float,
                 anomalous: bool = False, *, dense_limit: int = _DENSE_LIMIT):
        self.space_group = parse_space_group(space_group)
        self.cell = parse_cell(cell)
        _check_compatible(self.cell, self.space_group)
        self.dmin = _check_dmin(dmin, self.cell)
        self.anomalous = bool(anomalous)
        self.twin_ops = twin_operators(self.space_group, self.cell)
        self._mapper = _mapper(self.space_group)

        hkl = enumerate_asu(self.cell, self.space_group, self.dmin)
        if len(hkl) == 0:
            raise ConfigError(f"dmin {self.dmin:g} Å leaves no reflections for cell "
                              f"{tuple(self.cell.parameters)}; give dmin in Å, smaller than "
                              "the longest cell edge")
        centric = is_centric(hkl, self.space_group)
        friedel = np.ones(len(hkl), dtype=np.int8)
        if self.anomalous:
            hkl = np.concatenate([hkl, hkl[~centric]])
            friedel = np.concatenate([friedel, -friedel[~centric]])
            centric = np.concatenate([centric, centric[~centric]])
        row_keys = (hkl_key(hkl) << 1) | (friedel < 0)
        order = np.argsort(row_keys)  # (h, k, l), then F(+) before F(-)
        self.hkl = np.ascontiguousarray(hkl[order])
        self.friedel = friedel[order]
        self.centric = centric[order]
        self.epsilon = epsilon(self.hkl, self.space_group)
        self.d = dhkl(self.hkl, self.cell)
        row_keys = row_keys[order]
        rows = np.arange(len(row_keys), dtype=np.int64)
        if self.anomalous:
            # A centric reflection observed as F(-) is the same unknown as its F(+) row.
            centric_rows = rows[self.centric]
            keys = np.concatenate([row_keys, row_keys[centric_rows] | 1])
            rows = np.concatenate([rows, centric_rows])
            order = np.argsort(keys)
            row_keys, rows = keys[order], rows[order]
        self._keys, self._rows = row_keys, rows
        self._dense, self._half = self._dense_table(dense_limit)
        for a in (self.hkl, self.friedel, self.centric, self.epsilon, self.d,
                  self._keys, self._rows, self._dense):
            a.setflags(write=False)

    def _dense_table(self, limit: int) -> tuple[np.ndarray, np.ndarray]:
        """Row ids of every hkl in the box that holds all symmetry equivalents of the table.

        A memo of :meth:`_lookup_keys` that turns a lookup into one gather (about twenty
        times faster); skipped when the box would exceed ``limit`` entries.
        """
        cols = [np.ascontiguousarray(self.hkl[:, j]) for j in range(3)]
        half = np.array([int(np.abs(c).max()) for c in _apply(self._mapper.rot, cols)],
                        dtype=np.int64)
        width = 2 * half + 1
        if int(np.prod(width)) > limit:
            return np.empty(0, dtype=np.int32), half
        kk, ll = np.meshgrid(np.arange(-half[1], half[1] + 1), np.arange(-half[2], half[2] + 1),
                             indexing="ij")
        slab = np.stack([np.zeros_like(kk.ravel()), kk.ravel(), ll.ravel()], axis=1)
        slab = slab.astype(np.int32)
        dense = np.empty((width[0], slab.shape[0]), dtype=np.int32)
        for i, h in enumerate(range(-half[0], half[0] + 1)):
            slab[:, 0] = h
            dense[i] = _blocked(self._lookup_keys, slab)
        return dense.ravel(), half

    # -- sizes

    @property
    def n_unique(self) -> int:
        """Number of rows (unique reflections, F(+) and F(−) counted apart when anomalous)."""
        return int(self.hkl.shape[0])

    @property
    def n_ops(self) -> int:
        """Number of reindexing operators tried per image (1 when there is no ambiguity)."""
        return len(self.twin_ops)

    def __len__(self) -> int:
        return self.n_unique

    def __repr__(self) -> str:
        return (f"ReciprocalSpace(space_group={self.space_group.xhm()!r}, "
                f"cell={tuple(round(x, 4) for x in self.cell.parameters)}, dmin={self.dmin}, "
                f"anomalous={self.anomalous}, n_unique={self.n_unique})")

    # -- lookup

    def lookup(self, hkl: np.ndarray) -> np.ndarray:
        """Row id of each observed reflection.

        Parameters
        ----------
        hkl
            ``(n, 3)`` integer Miller indices as indexed (any symmetry equivalent).

        Returns
        -------
        np.ndarray
            ``(n,)`` int64 row ids; −1 where the reflection is not in the table (d < dmin,
            systematically absent, 000, or absurd indices).  In anomalous mode F(+) and F(−)
            of an acentric reflection get different rows.
        """
        return _blocked(self._lookup_dense if self._dense.size else self._lookup_keys,
                        _as_hkl(hkl))

    def _lookup_dense(self, a: np.ndarray) -> np.ndarray:
        n = a.shape[0]
        flat = np.zeros(n, dtype=np.int64)
        inside = np.ones(n, dtype=bool)
        for j in range(3):
            x = a[:, j].astype(np.int64)
            x += self._half[j]
            width = 2 * self._half[j] + 1
            inside &= x.view(np.uint64) < np.uint64(width)  # negative wraps to huge
            flat *= width
            flat += x
        np.copyto(flat, 0, where=~inside)
        return np.where(inside, self._dense.take(flat), -1)

    def _lookup_keys(self, a: np.ndarray) -> np.ndarray:
        """The general lookup: map to the ASU, encode, binary-search the sorted keys."""
        valid = ((a > -_INDEX_LIMIT) & (a < _INDEX_LIMIT)).all(axis=1)
        if not valid.all():
            a = np.where(valid[:, None], a, 0)
        asu, isym = self._mapper.to_asu(a.astype(np.int32, copy=False))
        key = hkl_key(asu) << 1
        if self.anomalous:
            key |= (~isym & 1).astype(np.int64)
        pos = np.searchsorted(self._keys, key)
        np.minimum(pos, len(self._keys) - 1, out=pos)
        return np.where(self._keys[pos] == key, self._rows[pos], -1)

    def lookup_ops(self, hkl: np.ndarray) -> np.ndarray:
        """Row ids under each reindexing operator.

        Returns
        -------
        np.ndarray
            ``(n_ops, n)`` int64; row ``i`` is ``lookup(reindex(hkl, twin_ops[i]))``, the
            identity first.
        """
        a = _as_hkl(hkl)
        return np.stack([self.lookup(a if i == 0 else reindex(a, op))
                         for i, op in enumerate(self.twin_ops)])

    def reindex_rows(self, op: np.ndarray) -> np.ndarray:
        """Where every row of the table goes when the merge is reindexed by ``op``.

        Parameters
        ----------
        op
            A 3x3 reindexing matrix (``hkl' = op @ hkl``), normally one of ``twin_ops``.

        Returns
        -------
        np.ndarray
            ``(n_unique,)`` int64 permutation: row ``r`` becomes row ``perm[r]``.  F(+) and
            F(−) rows follow their own indices, so Bijvoet mates swap where ``op`` takes an
            index to the other hemisphere.

        Raises
        ------
        ConfigError
            When ``op`` does not map the table onto itself (not a merohedral operator of
            this space group and cell).
        """
        signed = self.hkl.astype(np.int32) * self.friedel[:, None].astype(np.int32)
        perm = self.lookup(reindex(signed, op))
        if (perm < 0).any() or np.unique(perm).shape[0] != perm.shape[0]:
            raise ConfigError(f"reindexing operator {op_triplet(op)} does not map the "
                              f"{self.space_group.hm} table onto itself; use one of "
                              f"{[op_triplet(m) for m in self.twin_ops]}")
        return perm

    # -- resolution shells

    def shell_edges(self, n_shells: int) -> np.ndarray:
        """Shell boundaries in d, Å, from the table's largest d down to dmin
        (:func:`shell_edges`).

        Returns
        -------
        np.ndarray
            ``(n_shells + 1,)`` float64, decreasing; ``edges[0] = max(d)``,
            ``edges[-1] = dmin``.
        """
        edges = shell_edges(self._dmax, self.dmin, n_shells)
        edges[0], edges[-1] = self._dmax, self.dmin
        return edges

    def shell_index(self, d: np.ndarray, n_shells: int = 10) -> np.ndarray:
        """Shell of each resolution ``d`` (Å) among :meth:`shell_edges` ``(n_shells)``.

        Returns
        -------
        np.ndarray
            int64 in ``[0, n_shells)``, 0 for the lowest resolution; −1 where d lies
            outside ``[dmin, max(d)]`` (beyond a relative 1e-6, which absorbs float32
            rounding of d).
        """
        edges = self.shell_edges(n_shells)
        d = np.asarray(d, dtype=np.float64)
        with np.errstate(invalid="ignore"):
            inside = (d >= self.dmin * (1 - 1e-6)) & (d <= self._dmax * (1 + 1e-6))
        return np.where(inside, shell_index(np.where(inside, d, self.dmin), edges), -1)

    @property
    def _dmax(self) -> float:
        return float(self.d.max())

    # -- checkpoints

    def to_dict(self) -> dict[str, Any]:
        """What rebuilds this table: space group symbol, cell, dmin (Å), anomalous."""
        return {"space_group": self.space_group.xhm(),
                "cell": [float(x) for x in self.cell.parameters],
                "dmin": self.dmin, "anomalous": self.anomalous}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ReciprocalSpace":
        """Inverse of :meth:`to_dict`."""
        missing = [k for k in ("space_group", "cell", "dmin") if k not in d]
        if missing:
            raise ConfigError(f"reciprocal-space record lacks {', '.join(missing)}; it needs "
                              "space_group, cell, dmin and anomalous (see to_dict)")
        return cls(d["space_group"], d["cell"], d["dmin"], bool(d.get("anomalous", False)))
