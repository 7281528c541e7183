"""Surrogate posterior: one folded normal per (table, unique reflection).

Table 0 merges all images; tables 1 and 2 merge the two half datasets (for CC1/2 and CCanom
while streaming).  The parameters live in one ``(n_tables * n_rows, 2)`` matrix looked up
with a sparse embedding, so a sparse Adam step (:class:`streamvi.merging.optim.RowSparseAdam`)
touches only the rows of the current minibatch and every other row stays bit-identical.

Each row's location and scale are expressed in a unit of its own, :attr:`FoldedNormalPosterior.unit`
(the Wilson r.m.s. amplitude ``√(εΣ)`` of the row, set by the trainer; 1 until then).  Adam
moves a parameter by about one learning rate per update whatever its gradient, so in absolute
units every row travelled at the same speed: a strong low-resolution amplitude, tens of times
the r.m.s. amplitude of a high-resolution one, needed thousands of updates to leave its Wilson
start and was still shrunk when a merge ended (issue #16; docs/model.md).

**Difference tables** (:meth:`FoldedNormalPosterior.use_differences`, a pump–probe merge's
joint surrogate): a table may be drawn around its *base* table's draw (the reference
condition's table of the same kind) instead of independently.  A row with location ``μ``
and scale ``s`` whose base row has location ``μ_b`` is drawn as ``|F_base + (μ − μ_b) +
s·z|`` (Rice rows: ``|F_base + (μ − μ_b) + s·(z₁ + i z₂)|``), ``F_base`` the base row's
draw in the same step, so that ``q(F_base, F) = q(F_base) q(F | F_base)``: the two
amplitudes are correlated in q, and ``s`` is the posterior σ of their difference.  The
location keeps its meaning (the row's own amplitude, travelling from its start as an
independent row's would); only the scale's changes.
"""
from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F_nn

# Keeps the scale strictly positive so log-densities stay finite however far the optimiser
# pushes the unconstrained parameter.
_SCALE_FLOOR = 1e-6
#: largest |a - b| the folded-normal log-density evaluates: log1p(e^-20) ≈ 2e-9, below
#: float32 resolution; a larger cap sends ``log1p`` down its slow path for tiny arguments
_LOGADDEXP_CAP = 20.0


def _inverse_softplus(x: torch.Tensor) -> torch.Tensor:
    return x + torch.log(-torch.expm1(-x))


class FoldedNormalPosterior(nn.Module):
    """Folded normal ``|N(loc, scale²)|`` per row of each table.

    Parameters
    ----------
    n_rows
        Number of unique reflections.
    n_tables
        Number of posterior tables (3: all images, half A, half B).
    init_loc
        ``(n_rows,)`` positive initial location, normally the Wilson mean.
    init_scale
        ``(n_rows,)`` positive initial scale; ``0.01 * init_loc`` when None.

    Notes
    -----
    Both location and scale are kept through a softplus: the location has to stay positive
    only to make the parameterisation one-to-one (the folded normal is symmetric in loc).
    Both are multiplied by the row's :attr:`unit`.
    """

    def __init__(self, n_rows: int, n_tables: int = 3, *, init_loc: torch.Tensor,
                 init_scale: torch.Tensor | None = None) -> None:
        super().__init__()
        init_loc = torch.as_tensor(init_loc, dtype=torch.float32).reshape(-1)
        if init_loc.shape[0] != n_rows:
            raise ValueError(f"init_loc has {init_loc.shape[0]} entries, expected n_rows={n_rows}")
        if init_scale is None:
            init_scale = 0.01 * init_loc
        init_scale = torch.as_tensor(init_scale, dtype=torch.float32).reshape(-1)
        if not (bool(torch.all(init_loc > 0)) and bool(torch.all(init_scale > _SCALE_FLOOR))):
            raise ValueError("init_loc and init_scale must be positive")
        self.n_rows = int(n_rows)
        self.n_tables = int(n_tables)
        #: ``(n_rows,)`` the unit of each row's location and scale (see the module docstring)
        self.register_buffer("unit", torch.ones(self.n_rows, dtype=torch.float32))
        self.weight = nn.Parameter(self._raw(init_loc, init_scale).repeat(self.n_tables, 1))
        #: ``(n_rows,)`` bool where the row's surrogate is a Rice distribution instead of a
        #: folded normal (:meth:`use_rice`), or None: folded normals everywhere
        self.rice: torch.Tensor | None = None
        #: ``(n_tables,)`` long: the base table of each difference table, −1 for the others
        #: (:meth:`use_differences`), or None: every table holds amplitudes (mean field)
        self.base: torch.Tensor | None = None

    def use_differences(self, base: list[int] | torch.Tensor) -> None:
        """Make the tables ``t`` with ``base[t] >= 0`` difference tables of ``base[t]`` (see
        the module docstring); ``base[t] = -1`` keeps table ``t`` an amplitude table.  A
        base must itself hold amplitudes.  The parameters keep their values: a row's
        location stays its own, its scale becomes the σ of its difference from the base.
        Not a module buffer: checkpoints keep their keys (the trainer's configuration says
        which tables are drawn so)."""
        base = torch.as_tensor(base, dtype=torch.long, device=self.weight.device).reshape(-1)
        if base.shape[0] != self.n_tables:
            raise ValueError(f"base has {base.shape[0]} entries, expected n_tables="
                             f"{self.n_tables}")
        if bool(torch.any((base >= self.n_tables) | (base < -1))):
            raise ValueError(f"base tables must lie in -1..{self.n_tables - 1}")
        for t, b in enumerate(base.tolist()):
            if b >= 0 and (b == t or int(base[b]) >= 0):
                raise ValueError(f"table {t}'s base {b} must hold amplitudes, not differences")
        self.base = base.clone()

    def is_difference(self, table: int) -> bool:
        """Whether ``table`` is a difference table (:meth:`use_differences`)."""
        return self.base is not None and int(self.base[table]) >= 0

    def difference_rows(self, flat_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(is_difference, base_flat)`` of rows ``flat_ids`` of :attr:`weight`: whether each
        lies in a difference table, and the same row of its base table (itself otherwise)."""
        table = torch.div(flat_ids, self.n_rows, rounding_mode="floor")
        base = self.base.index_select(0, table.reshape(-1)).reshape(table.shape)
        is_diff = base >= 0
        return is_diff, torch.where(is_diff, base * self.n_rows
                                    + torch.remainder(flat_ids, self.n_rows), flat_ids)

    def use_rice(self, rows: torch.Tensor) -> None:
        """Make the surrogate of the rows where ``rows`` (``(n_rows,)`` bool, e.g. the
        acentric ones) a Rice distribution ``|ν + σ·(z₁ + i z₂)|`` with the same two
        parameters: its density falls to 0 at F = 0 as the acentric Wilson prior's does,
        where a folded normal keeps a finite density and pushes weak amplitudes up
        (docs/model.md, change 14).  Not a module buffer: checkpoints keep their keys."""
        self.rice = torch.as_tensor(rows, dtype=torch.bool, device=self.weight.device
                                    ).reshape(-1).clone()
        if self.rice.shape[0] != self.n_rows:
            raise ValueError(f"rows has {self.rice.shape[0]} entries, expected {self.n_rows}")

    def _rice_of(self, rows: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor | None:
        """The Rice flag of ``rows`` broadcast like ``like`` (None: no Rice rows)."""
        if self.rice is None or rows is None:
            return None
        return self.rice.index_select(0, rows.reshape(-1)).reshape(rows.shape)

    @staticmethod
    def _raw(loc: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """``(n, 2)`` unconstrained parameters of ``(loc, scale)`` given in units of the rows."""
        return torch.stack([_inverse_softplus(loc.float()),
                            _inverse_softplus((scale.float() - _SCALE_FLOOR)
                                              .clamp_min(_SCALE_FLOOR))], dim=1)

    @torch.no_grad()
    def reset_rows(self, row_ids: torch.Tensor, loc: torch.Tensor,
                   scale: torch.Tensor | None = None) -> None:
        """Put rows ``row_ids`` of every table back to ``(loc, scale)`` (default 0.01·loc),
        in absolute units: ``(k,)`` for every table alike or ``(n_tables, k)`` per table."""
        if scale is None:
            scale = 0.01 * loc
        loc = torch.broadcast_to(loc, (self.n_tables, row_ids.shape[0]))
        scale = torch.broadcast_to(scale, loc.shape)
        unit = self.unit[row_ids]
        for t in range(self.n_tables):
            self.weight[t * self.n_rows + row_ids] = self._raw(
                loc[t] / unit, scale[t] / unit).to(self.weight.dtype)

    @torch.no_grad()
    def reset_table_rows(self, table: int, row_ids: torch.Tensor, loc: torch.Tensor,
                         scale: torch.Tensor) -> None:
        """Put rows ``row_ids`` of one ``table`` at ``(loc, scale)``, absolute units."""
        unit = self.unit[row_ids]
        self.weight[table * self.n_rows + row_ids] = self._raw(
            loc / unit, scale / unit).to(self.weight.dtype)

    @torch.no_grad()
    def set_unit(self, unit: torch.Tensor, *extra: torch.Tensor) -> None:
        """Express every row in a new ``unit`` (``(n_rows,)``, positive), keeping its absolute
        location and scale; ``extra`` are more ``(n_tables * n_rows, 2)`` parameter matrices
        (e.g. a running average of :attr:`weight`) converted the same way in place."""
        unit = torch.as_tensor(unit, dtype=torch.float32, device=self.unit.device)
        if unit.shape != self.unit.shape or not bool(torch.all(unit > 0)):
            raise ValueError(f"unit must be {tuple(self.unit.shape)} positive values")
        ratio = (self.unit / unit).repeat(self.n_tables).double()
        for w in (self.weight, *extra):
            raw = w.double()
            loc = F_nn.softplus(raw[:, 0]) * ratio
            scale = (F_nn.softplus(raw[:, 1]) + _SCALE_FLOOR) * ratio
            w.copy_(self._raw(loc, scale).to(w.dtype))
        self.unit.copy_(unit)

    def flat_index(self, table: int | torch.Tensor, row_ids: torch.Tensor) -> torch.Tensor:
        """Row of :attr:`weight` for ``row_ids`` in ``table`` (an int or a tensor like row_ids)."""
        return table * self.n_rows + row_ids

    def loc_scale(self, flat_ids: torch.Tensor, *, dense_grad: bool = False
                  ) -> tuple[torch.Tensor, torch.Tensor]:
        """Constrained ``(loc, scale)`` of rows ``flat_ids`` of :attr:`weight`.

        The gradient of :attr:`weight` is sparse (one entry per lookup, for
        :class:`~streamvi.merging.optim.RowSparseAdam`) unless ``dense_grad``: then it is a dense
        ``index_add_`` of the lookups, whose shape does not depend on the data (the
        synchronisation-free step of :class:`~streamvi.merging.trainer.Trainer`).
        """
        if dense_grad:
            raw = self.weight.index_select(0, flat_ids.reshape(-1)).reshape(
                flat_ids.shape + (2,))
        else:
            raw = F_nn.embedding(flat_ids, self.weight, sparse=True)
        unit = self.unit.index_select(0, torch.remainder(flat_ids.reshape(-1), self.n_rows)
                                      ).reshape(flat_ids.shape)
        return (unit * F_nn.softplus(raw[..., 0]),
                unit * (F_nn.softplus(raw[..., 1]) + _SCALE_FLOOR))

    def sample_with(self, loc: torch.Tensor, scale: torch.Tensor, mc: int,
                    generator: torch.Generator | None = None,
                    rows: torch.Tensor | None = None) -> torch.Tensor:
        """Reparameterised ``(mc, n)`` draws of ``|loc + scale * z|`` (Rice rows among
        ``rows``: ``|loc + scale * (z₁ + i z₂)|``).  ``loc`` is ``(n,)``, or ``(mc, n)``
        where each draw has its own (a difference table's: around its base's draw)."""
        shape = torch.broadcast_shapes((mc,) + tuple(scale.shape), tuple(loc.shape))
        z = torch.randn(shape, generator=generator, device=loc.device, dtype=loc.dtype)
        folded = torch.abs(loc + scale * z)
        rice = self._rice_of(rows, loc)
        if rice is None:
            return folded
        z2 = torch.randn(shape, generator=generator, device=loc.device, dtype=loc.dtype)
        return torch.where(rice, torch.hypot(loc + scale * z, scale * z2), folded)

    def log_prob_with(self, F: torch.Tensor, loc: torch.Tensor, scale: torch.Tensor,
                      rows: torch.Tensor | None = None) -> torch.Tensor:
        """Log-density of ``F`` under each row's surrogate (see :meth:`folded_log_prob`;
        Rice rows among ``rows``: :meth:`rice_log_prob`)."""
        folded = self.folded_log_prob(F, loc, scale)
        rice = self._rice_of(rows, loc)
        if rice is None:
            return folded
        return torch.where(rice, self.rice_log_prob(F, loc, scale), folded)

    @staticmethod
    def rice_log_prob(F: torch.Tensor, loc: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """Rice log-density ``F/σ² · exp(−(F² + ν²)/2σ²) · I₀(Fν/σ²)``, ``ν = loc``,
        ``σ = scale``, written with ``I₀(x) = eˣ i0e(x)`` as ``F/σ² · exp(−(F − ν)²/2σ²) ·
        i0e(Fν/σ²)``: no large terms that cancel for sharp posteriors.  The density depends
        on ``|ν|`` only (a difference table's location may be negative)."""
        s2 = scale * scale
        loc = loc.abs()
        Fc = F.clamp_min(1e-30)
        return (torch.log(Fc) - torch.log(s2) - (Fc - loc) ** 2 / (2.0 * s2)
                + torch.log(torch.special.i0e(Fc * loc / s2)))

    @staticmethod
    def folded_log_prob(F: torch.Tensor, loc: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """Folded-normal log-density of ``F`` (``(..., n)``) given ``loc``, ``scale`` ``(n,)``.

        ``log(e^a + e^b) = max(a, b) + log1p(e^-|a-b|)`` with ``|a-b| = 2|F·loc|/scale²``
        capped at :data:`_LOGADDEXP_CAP`: beyond it the second term is below float32
        resolution.  A sharp posterior makes ``|a-b|`` thousands, and ``torch.logaddexp``'s
        backward then takes ``exp`` of arguments that over- or underflow, which runs ~50×
        slower on the CPU (~2.5 ms of a 30 ms d 16 training step).
        """
        a = -0.5 * ((F - loc) / scale) ** 2
        b = -0.5 * ((F + loc) / scale) ** 2
        gap = (a - b).abs().clamp_max(_LOGADDEXP_CAP)
        return (torch.maximum(a, b) + torch.log1p(torch.exp(-gap)) - torch.log(scale)
                - 0.5 * math.log(2.0 * math.pi))

    def rsample(self, table: int | torch.Tensor, row_ids: torch.Tensor, mc: int,
                generator: torch.Generator | None = None) -> torch.Tensor:
        """``(mc, n)`` reparameterised amplitude samples of ``row_ids`` in ``table`` (a
        difference table's: around a draw of its base, i.e. of its marginal)."""
        flat = self.flat_index(table, row_ids)
        loc, scale = self.loc_scale(flat)
        if self.base is not None:
            is_diff, base_flat = self.difference_rows(flat)
            loc_b, scale_b = self.loc_scale(base_flat)
            F_base = self.sample_with(loc_b, scale_b, mc, generator, row_ids)
            loc = self.around(is_diff, F_base, loc_b, loc)
        return self.sample_with(loc, scale, mc, generator, row_ids)

    @staticmethod
    def around(is_diff: torch.Tensor, F_base: torch.Tensor, loc_base: torch.Tensor,
               loc: torch.Tensor) -> torch.Tensor:
        """The location each draw takes: ``F_base + (loc − loc_base)`` where ``is_diff``
        (a difference table's row, around its base's draw ``F_base``), else ``loc``."""
        return torch.where(is_diff, F_base + (loc - loc_base), loc)

    def log_prob(self, F: torch.Tensor, table: int | torch.Tensor,
                 row_ids: torch.Tensor) -> torch.Tensor:
        """Log-density of amplitudes ``F`` (``(..., n)``) of ``row_ids`` in ``table`` (an
        amplitude table's; a difference table's density is conditional on its base's draw:
        :meth:`log_prob_with` with that draw plus ``m``)."""
        loc, scale = self.loc_scale(self.flat_index(table, row_ids))
        return self.log_prob_with(F, loc, scale, row_ids)

    def second_moment(self, loc: torch.Tensor, scale: torch.Tensor,
                      rows: torch.Tensor | None = None) -> torch.Tensor:
        """``E[F²]``: ``loc² + scale²`` (folded normal), ``loc² + 2 scale²`` (Rice rows)."""
        rice = self._rice_of(rows, loc)
        s2 = scale * scale
        if rice is None:
            return loc * loc + s2
        return loc * loc + torch.where(rice, 2.0 * s2, s2)

    @torch.no_grad()
    def second_moment_at(self, flat_ids: torch.Tensor) -> torch.Tensor:
        """``E[F²]`` of rows ``flat_ids`` of :attr:`weight` (:meth:`second_moment`; a
        difference table's row: ``E[(X + μ − μ_b)²] + k s²`` with ``X`` its base's draw
        taken as ``N(μ_b, k σ_b²)`` before the fold, i.e. ``μ² + k (σ_b² + s²)``, ``k`` 2
        for Rice rows, else 1)."""
        loc, scale = self.loc_scale(flat_ids)
        rows = torch.remainder(flat_ids, self.n_rows)
        if self.base is None:
            return self.second_moment(loc, scale, rows)
        is_diff, base_flat = self.difference_rows(flat_ids)
        loc_b, scale_b = self.loc_scale(base_flat)
        rice = self._rice_of(rows, loc)
        k = 1.0 if rice is None else torch.where(rice, 2.0, 1.0)
        own = loc * loc + k * scale * scale
        diff = loc * loc + k * (scale_b * scale_b + scale * scale)
        return torch.where(is_diff, diff, own)

    @torch.no_grad()
    def _table_params(self, table: int, weight: torch.Tensor | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor]:
        """A table's own ``(loc, scale)`` per row, absolute units, float64."""
        if not 0 <= table < self.n_tables:
            raise ValueError(f"table {table} out of range 0..{self.n_tables - 1}")
        w = self.weight if weight is None else weight
        raw = w[table * self.n_rows:(table + 1) * self.n_rows].double()
        unit = self.unit.double()
        return unit * F_nn.softplus(raw[:, 0]), unit * (F_nn.softplus(raw[:, 1]) + _SCALE_FLOOR)

    @torch.no_grad()
    def _marginal_params(self, table: int, weight: torch.Tensor | None = None
                         ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(ν, σ)`` per row of the folded-normal (Rice) distribution that stands for the
        table's marginal: its own parameters for an amplitude table.  A difference table's
        rows are ``|F_base + m + s·z|``, ``m = μ − μ_b`` (the two locations); with the base's
        amplitude taken as normal (its mean ``E_b`` and variance ``v_b``) the argument is
        normal, ``ν = E_b + m``, ``σ² = v_b + s²``: exact where ``F_base`` is normal.  Rice
        rows, ``|F_base + m + s·(z₁ + i z₂)|``, have a real part of variance ``v_b + s²`` and
        an imaginary one of ``s²``: they take the Rice distribution with ``σ² = v_b + s²``
        (the spread far from 0) and ``ν² = (E_b + m)² − v_b`` (the exact ``E[F²]``), ``ν =
        0`` where that is negative."""
        mu, sigma = self._table_params(table, weight)
        if not self.is_difference(table):
            return mu, sigma
        base = int(self.base[table])
        mean_b, sd_b = self.moments(base, weight)
        var_b = sd_b * sd_b
        nu = mean_b + mu - self._table_params(base, weight)[0]
        if self.rice is not None:
            rice = self.rice.to(mu.device)
            nu = torch.where(rice, torch.sqrt((nu * nu - var_b).clamp_min(0.0)), nu)
        return nu, torch.sqrt(var_b + sigma * sigma)

    @torch.no_grad()
    def difference_moments(self, table: int, weight: torch.Tensor | None = None
                           ) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and standard deviation of ``F − F_base`` per row of a difference table, from
        the joint surrogate: the difference of the two marginals' means, and ``s`` (exact
        where neither amplitude is near 0, where the fold does not act)."""
        if not self.is_difference(table):
            raise ValueError(f"table {table} holds amplitudes, not differences")
        _, s = self._table_params(table, weight)
        mean = self.moments(table, weight)[0] - self.moments(int(self.base[table]), weight)[0]
        return mean, s

    @torch.no_grad()
    def moments(self, table: int = 0, weight: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and standard deviation of the amplitude of every row (float64, closed form).

        ``weight`` replaces :attr:`weight` (e.g. an average of it over steps).  A difference
        table's: of its marginal (:meth:`_marginal_params`)."""
        mu, sigma = self._marginal_params(table, weight)
        mean = (sigma * math.sqrt(2.0 / math.pi) * torch.exp(-0.5 * (mu / sigma) ** 2)
                + mu * torch.erf(mu / (sigma * math.sqrt(2.0))))
        second = mu * mu + sigma * sigma
        if self.rice is not None:
            # Rice: E[F] = σ √(π/2) L½(−ν²/2σ²), L½(−2a) = (1 + 2a) i0e(a) + 2a i1e(a),
            # a = ν²/4σ²; E[F²] = ν² + 2σ²
            a = (mu / sigma) ** 2 / 4.0
            rice_mean = (sigma * math.sqrt(math.pi / 2.0)
                         * ((1.0 + 2.0 * a) * torch.special.i0e(a)
                            + 2.0 * a * torch.special.i1e(a)))
            rice = self.rice.to(mu.device)
            mean = torch.where(rice, rice_mean, mean)
            second = torch.where(rice, mu * mu + 2.0 * sigma * sigma, second)
        var = (second - mean * mean).clamp_min(0.0)
        return mean, torch.sqrt(var)

    @torch.no_grad()
    def intensity_moments(self, table: int = 0, weight: torch.Tensor | None = None
                          ) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and standard deviation of ``F²`` of every row (float64, closed form).

        ``F² = X²`` with ``X ~ N(mu, sigma²)``: ``E = mu² + sigma²``,
        ``Var = 4 mu² sigma² + 2 sigma⁴``.  A difference table's: of its marginal
        (:meth:`_marginal_params`).
        """
        mu, sigma = self._marginal_params(table, weight)
        s2 = sigma * sigma
        if self.rice is None:
            return mu * mu + s2, torch.sqrt(4.0 * mu * mu * s2 + 2.0 * s2 * s2)
        # Rice: F² = X² + Y², X ~ N(ν, σ²), Y ~ N(0, σ²): E = ν² + 2σ², Var = 4ν²σ² + 4σ⁴
        rice = self.rice.to(mu.device)
        return (mu * mu + torch.where(rice, 2.0 * s2, s2),
                torch.sqrt(4.0 * mu * mu * s2 + torch.where(rice, 4.0, 2.0) * s2 * s2))
