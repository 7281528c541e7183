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
        ``rows``: ``|loc + scale * (z₁ + i z₂)|``)."""
        z = torch.randn((mc,) + tuple(loc.shape), generator=generator, device=loc.device,
                        dtype=loc.dtype)
        folded = torch.abs(loc + scale * z)
        rice = self._rice_of(rows, loc)
        if rice is None:
            return folded
        z2 = torch.randn((mc,) + tuple(loc.shape), generator=generator, device=loc.device,
                         dtype=loc.dtype)
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
        i0e(Fν/σ²)``: no large terms that cancel for sharp posteriors."""
        s2 = scale * scale
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
        """``(mc, n)`` reparameterised amplitude samples of ``row_ids`` in ``table``."""
        loc, scale = self.loc_scale(self.flat_index(table, row_ids))
        return self.sample_with(loc, scale, mc, generator, row_ids)

    def log_prob(self, F: torch.Tensor, table: int | torch.Tensor,
                 row_ids: torch.Tensor) -> torch.Tensor:
        """Log-density of amplitudes ``F`` (``(..., n)``) of ``row_ids`` in ``table``."""
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
    def _table_params(self, table: int, weight: torch.Tensor | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor]:
        if not 0 <= table < self.n_tables:
            raise ValueError(f"table {table} out of range 0..{self.n_tables - 1}")
        w = self.weight if weight is None else weight
        raw = w[table * self.n_rows:(table + 1) * self.n_rows].double()
        unit = self.unit.double()
        return unit * F_nn.softplus(raw[:, 0]), unit * (F_nn.softplus(raw[:, 1]) + _SCALE_FLOOR)

    @torch.no_grad()
    def moments(self, table: int = 0, weight: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and standard deviation of the amplitude of every row (float64, closed form).

        ``weight`` replaces :attr:`weight` (e.g. an average of it over steps)."""
        mu, sigma = self._table_params(table, weight)
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
        ``Var = 4 mu² sigma² + 2 sigma⁴``.
        """
        mu, sigma = self._table_params(table, weight)
        s2 = sigma * sigma
        if self.rice is None:
            return mu * mu + s2, torch.sqrt(4.0 * mu * mu * s2 + 2.0 * s2 * s2)
        # Rice: F² = X² + Y², X ~ N(ν, σ²), Y ~ N(0, σ²): E = ν² + 2σ², Var = 4ν²σ² + 4σ⁴
        rice = self.rice.to(mu.device)
        return (mu * mu + torch.where(rice, 2.0 * s2, s2),
                torch.sqrt(4.0 * mu * mu * s2 + torch.where(rice, 4.0, 2.0) * s2 * s2))
