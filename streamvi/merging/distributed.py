"""Data-parallel merging over ``torch.distributed`` (DESIGN.md section 8).

N ranks (one device each: NCCL between GPUs, gloo between CPU processes) train one model.
Each rank owns an :class:`~streamvi.ingest.receiver.Ingestor` whose PULL socket takes its share of a
producer's PUSH fan-out (ZeroMQ hands each message to one peer, round robin), a store of the
crystals it received and its own scheduler.  Every step the ranks move in lock-step:

1. :meth:`DistributedEngine.sync`: one small all-reduce of per-rank counters and flags; when
   any rank stored new crystals, an all-reduce of the per-row statistics added since the last
   sync (observation counts per table, Σ1/σ², ΣI/σ², ΣI).  Every store then holds the global
   statistics, so the KL weights (``obs_weight`` = 1 / global multiplicity), the Wilson Σ and
   ⟨I/σ(I)⟩ are those of all the data, identical on every rank.
2. each rank draws ``batch_images`` whole images from its own store (global batch:
   ``world_size × batch_images``);
3. while the standardiser warms up, each rank's batch moments are all-gathered and merged in
   rank order (Chan's pairwise update), so every rank freezes at the same step with the same
   statistics (:class:`RankStandardizer`);
4. after ``backward`` (:meth:`DistributedTrainer._reduce_gradients`) the scale network's dense
   gradients go through one all-reduce and the posterior's sparse gradient through one
   all-gather of (row, value) pairs; both are weighted by each rank's reflections, which makes
   the combined gradient that of the mean over the global batch — the objective of one
   process with the whole batch.  The sparse result touches only the union of the ranks'
   rows, so rows outside every rank's minibatch stay bit-identical (lazy updates);
5. every rank takes the same optimiser step on the same gradient: parameters stay identical.

Rank 0 writes the MTZ snapshots and checkpoints (:func:`streamvi.service.rank.run_rank`, the
rank's life cycle; :mod:`streamvi.cli.rank` is its command line, and
:class:`streamvi.producers.fanout.FanOut` a producer's fan-out to the ranks).

Each rank draws its own Monte Carlo noise (generator seeded ``seed + rank × 1000003``).
"""
from __future__ import annotations

import logging
import os
import socket
import time
from dataclasses import dataclass, replace
from typing import Any, Sequence

import numpy as np
import torch
import torch.distributed as dist

from streamvi.errors import ConfigError
from streamvi.merging.engine import EngineConfig, MergeEngine, MergeSnapshot
from streamvi.merging.model.standardize import Standardizer
from streamvi.merging.trainer import StepReport, Trainer, TrainerConfig
from streamvi.symmetry import ReciprocalSpace

log = logging.getLogger(__name__)

#: Store arrays that are summed over ranks (per posterior row).
STORE_STATISTICS = ("obs_count", "sum_w", "sum_wi", "sum_i", "sum_i_half")
_RANK_SEED_STRIDE = 1_000_003


# ---------------------------------------------------------------------- process group


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago (for ``tcp://host:port`` rendezvous in tests)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def default_backend(device: str | torch.device = "auto") -> str:
    """``nccl`` when training on CUDA, else ``gloo``."""
    name = str(device)
    on_cuda = name.startswith("cuda") or (name == "auto" and torch.cuda.is_available())
    return "nccl" if on_cuda else "gloo"


def init_process_group(rank: int, world_size: int, *, init_method: str | None = None,
                       backend: str = "auto", device: str = "auto",
                       timeout_s: float = 300.0) -> None:
    """Join the default process group (no-op when already joined).

    ``init_method`` defaults to ``env://`` (``MASTER_ADDR``, ``MASTER_PORT``, as ``torchrun``
    sets them).  With NCCL each rank selects ``cuda:<LOCAL_RANK>`` (or ``rank`` modulo the
    number of visible GPUs).
    """
    if dist.is_initialized():
        return
    if backend == "auto":
        backend = default_backend(device)
    if backend == "nccl":
        local = int(os.environ.get("LOCAL_RANK", rank))
        torch.cuda.set_device(local % max(torch.cuda.device_count(), 1))
    from datetime import timedelta

    dist.init_process_group(backend, init_method=init_method or "env://", rank=rank,
                            world_size=world_size, timeout=timedelta(seconds=timeout_s))


def _require_group() -> tuple[int, int]:
    if not dist.is_available() or not dist.is_initialized():
        raise ConfigError("data-parallel training needs torch.distributed initialised first: "
                          "call streamvi.merging.distributed.init_process_group(rank, world_size, ...) "
                          "or start the ranks with torchrun")
    return dist.get_rank(), dist.get_world_size()


def _comm_device(fallback: torch.device) -> torch.device:
    """Where collective buffers live: the current CUDA device for NCCL, else the CPU."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu") if fallback.type != "cpu" else fallback


# ---------------------------------------------------------------------- trainer


class RankStandardizer(Standardizer):
    """A :class:`Standardizer` whose warm-up sees every rank's batch.

    :meth:`update` is a collective: each rank's batch moments are all-gathered and merged in
    rank order, so all ranks hold the same statistics (those of the union of the batches,
    exact up to rounding) and reach the freezing threshold at the same step.
    """

    @torch.no_grad()
    def update(self, metadata: torch.Tensor, iobs: torch.Tensor,
               image_index: torch.Tensor | None = None, n_images: int | None = None) -> None:
        if self.is_frozen:
            return
        dev = _comm_device(self.count.device)
        m = self.n_metadata
        n = int(iobs.numel())
        local = torch.zeros(4 + 2 * m, dtype=torch.float64, device=dev)
        rows = torch.zeros((0, 3), dtype=torch.float64, device=dev)
        if n:
            _, mean, m2, i_sum, i_sumsq, rows = self._summary(metadata, iobs, image_index,
                                                               n_images)
            local[0] = n
            local[1:1 + m] = mean.to(dev)
            local[1 + m:1 + 2 * m] = m2.to(dev)
            local[1 + 2 * m] = i_sum.to(dev)
            local[2 + 2 * m] = i_sumsq.to(dev)
            local[3 + 2 * m] = rows.shape[0]
        world = dist.get_world_size()
        gathered = [torch.empty_like(local) for _ in range(world)]
        dist.all_gather(gathered, local)
        # the per-crystal summaries (for the robust intensity scale), padded to the longest
        width = max(int(v[3 + 2 * m]) for v in gathered)
        padded = torch.zeros((width, 3), dtype=torch.float64, device=dev)
        padded[:rows.shape[0]] = rows.to(dev)
        crystal_rows = [torch.empty_like(padded) for _ in range(world)]
        if width:
            dist.all_gather(crystal_rows, padded)
        for v, r in zip(gathered, crystal_rows):
            v = v.to(self.count.device)
            if float(v[0]) == 0.0:
                continue
            part = Standardizer(self.n_metadata).to(self.count.device)
            part.count.copy_(v[0])
            part.meta_mean.copy_(v[1:1 + m])
            part.meta_m2.copy_(v[1 + m:1 + 2 * m])
            part.i_sum.copy_(v[1 + 2 * m])
            part.i_sumsq.copy_(v[2 + 2 * m])
            part._add_crystals(r[:int(v[3 + 2 * m])].to(self.count.device))
            self.merge(part)


class DistributedTrainer(Trainer):
    """A :class:`~streamvi.merging.trainer.Trainer` for one rank of a data-parallel job.

    Same constructor as :class:`Trainer`; the default process group must be initialised
    (:func:`init_process_group`).  Parameters and buffers start from rank 0's, the
    standardiser is a :class:`RankStandardizer`, and :meth:`learn_batch` becomes a
    collective that every rank must call once per step with a non-empty batch.

    Attributes
    ----------
    comm_seconds
        Wall time spent combining gradients, s (summed over steps).
    """

    def __init__(self, config: TrainerConfig, *, centric: np.ndarray, epsilon: np.ndarray,
                 n_metadata: int) -> None:
        self.rank, self.world_size = _require_group()
        # the gradient exchange sends the posterior's sparse rows (sized by the data), so a
        # rank's step waits for its device anyway: keep the sparse, sorted step
        config = replace(config, sync_free=False)
        super().__init__(config, centric=centric, epsilon=epsilon, n_metadata=n_metadata)
        std = RankStandardizer(n_metadata).to(self.device)
        std.load_state_dict(self.model.standardizer.state_dict())
        self.model.standardizer = std
        self.generator.manual_seed(config.seed + _RANK_SEED_STRIDE * self.rank)
        self._local_reflections = 0
        self.comm_seconds = 0.0
        self.broadcast_state()

    @torch.no_grad()
    def broadcast_state(self, src: int = 0) -> None:
        """Overwrite this rank's parameters and buffers with rank ``src``'s."""
        dev = _comm_device(self.device)
        for tensor in self.model.state_dict().values():
            buf = tensor if tensor.device == dev else tensor.to(dev)
            dist.broadcast(buf, src)
            if buf is not tensor:
                tensor.copy_(buf)

    def learn_batch(self, batch) -> StepReport:
        """One collective optimiser step (every rank, each on its own batch)."""
        self._local_reflections = batch.n_reflections
        return super().learn_batch(batch)

    def _params(self) -> list[torch.nn.Parameter]:
        return [p for opt in (self.scale_optimizer, self.posterior_optimizer)
                for group in opt.param_groups for p in group["params"]]

    @torch.no_grad()
    def _reduce_gradients(self) -> None:
        """Reflection-weighted mean of every rank's gradients, identical on every rank.

        Dense gradients and the counters travel in one all-reduce (``Σ n_r g_r``, ``Σ n_r``
        and each rank's number of sparse rows); the sparse rows in one all-gather of
        ``(row, n_r · value)`` padded to the longest, summed per row by ``coalesce``.
        """
        start = time.perf_counter()
        dev = _comm_device(self.device)
        world, rank = self.world_size, self.rank
        n_local = float(self._local_reflections)
        dense, sparse = [], []
        for p in self._params():
            (sparse if p.grad is not None and p.grad.is_sparse else dense).append(p)
        flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1)
                          .to(dev, torch.float32) for p in dense]
                         + [torch.zeros(1 + world * len(sparse), device=dev)])
        n_dense = flat.shape[0] - 1 - world * len(sparse)
        flat[:n_dense] *= n_local
        flat[n_dense] = n_local
        coalesced = []
        for j, p in enumerate(sparse):
            g = p.grad.coalesce()
            coalesced.append(g)
            flat[n_dense + 1 + j * world + rank] = g.indices().shape[1]
        dist.all_reduce(flat)
        total = float(flat[n_dense])
        if total <= 0:
            raise RuntimeError("no rank had reflections in this step")
        offset = 0
        for p in dense:
            n = p.numel()
            g = (flat[offset:offset + n] / total).view_as(p).to(p.device, p.dtype)
            offset += n
            if p.grad is None:
                p.grad = g
            else:
                p.grad.copy_(g)
        for j, (p, g) in enumerate(zip(sparse, coalesced)):
            sizes = flat[n_dense + 1 + j * world:n_dense + 1 + (j + 1) * world].long().tolist()
            p.grad = self._gather_sparse(g, sizes, n_local, total, dev)
        self.comm_seconds += time.perf_counter() - start

    def _gather_sparse(self, g: torch.Tensor, sizes: list[int], n_local: float, total: float,
                       dev: torch.device) -> torch.Tensor:
        """All ranks' ``(row, value)`` pairs → one sparse gradient on the union of rows."""
        width = int(np.prod(g.shape[1:])) if g.dim() > 1 else 1
        longest = max(sizes)
        rows = g.indices()[0]
        payload = torch.zeros((longest, 1 + width), dtype=torch.float64, device=dev)
        payload[:rows.shape[0], 0] = rows.to(dev, torch.float64)
        payload[:rows.shape[0], 1:] = g.values().reshape(rows.shape[0], width).to(
            dev, torch.float64) * n_local
        gathered = [torch.empty_like(payload) for _ in range(self.world_size)]
        dist.all_gather(gathered, payload)
        both = torch.cat([t[:n] for t, n in zip(gathered, sizes)]).to(g.device)
        values = both[:, 1:].reshape((-1,) + tuple(g.shape[1:]))
        out = torch.sparse_coo_tensor(both[:, 0].long().unsqueeze(0), values, g.shape,
                                      check_invariants=False).coalesce()
        return torch.sparse_coo_tensor(out.indices(), (out.values() / total).to(g.dtype),
                                       g.shape, is_coalesced=True, check_invariants=False)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a checkpoint (every rank loads the same one); each rank's generator is
        reseeded from ``(seed, rank, step)`` except rank 0's, which is restored."""
        super().load_state_dict(state)
        if self.rank:
            self.generator.manual_seed(int(self.config.seed) + _RANK_SEED_STRIDE * self.rank
                                       + self.step)


# ---------------------------------------------------------------------- engine


@dataclass
class SyncState:
    """What :meth:`DistributedEngine.sync` learnt from every rank.

    ``images`` and ``reflections`` are per rank (stored crystals and reflections);
    ``flags`` are the callers' flags summed over ranks.
    """

    images: np.ndarray
    reflections: np.ndarray
    flags: np.ndarray

    @property
    def total_images(self) -> int:
        return int(self.images.sum())

    @property
    def min_images(self) -> int:
        return int(self.images.min())


class DistributedEngine(MergeEngine):
    """A :class:`~streamvi.merging.engine.MergeEngine` for one rank of a data-parallel job.

    Crystals are added locally (:meth:`add`); :meth:`step` is a collective: it synchronises
    the store statistics, then trains on this rank's minibatch.  No rank trains before every
    rank holds at least one image (:meth:`step` returns None on all of them until then).
    Snapshots report global image and reflection counts (those of the last sync).
    """

    trainer_class = DistributedTrainer
    # a rank's new rows would start from its own images' sums, unlike the other ranks'
    # copies of the same rows; the starts when Σ is set read the synced (global) sums
    starts_rows_on_add = False

    def __init__(self, space: ReciprocalSpace, trainer_config: TrainerConfig | None = None,
                 config: EngineConfig | None = None):
        self.rank, self.world_size = _require_group()
        super().__init__(space, trainer_config, config)
        self._synced = {name: np.zeros(getattr(self.store, name).shape, np.float64)
                        for name in STORE_STATISTICS}
        self._synced_images = np.zeros(self.world_size, np.int64)
        self.global_images = 0
        self.global_reflections = 0
        self.sync_seconds = 0.0

    def sync(self, flags: Sequence[float] = ()) -> SyncState:
        """Exchange counters and flags; merge new per-row statistics into every store.

        A collective: every rank calls it with the same number of flags.
        """
        start = time.perf_counter()
        dev = _comm_device(self.device)
        w, r = self.world_size, self.rank
        ctrl = torch.zeros(2 * w + len(flags), dtype=torch.float64, device=dev)
        ctrl[r] = self.store.n_images
        ctrl[w + r] = self.store.n_reflections
        if len(flags):
            ctrl[2 * w:] = torch.as_tensor(list(flags), dtype=torch.float64)
        dist.all_reduce(ctrl)
        c = ctrl.cpu().numpy()
        state = SyncState(images=c[:w].astype(np.int64), reflections=c[w:2 * w].astype(np.int64),
                          flags=c[2 * w:])
        if not np.array_equal(state.images, self._synced_images):
            self._merge_statistics(dev)
            self._synced_images = state.images.copy()
        self.global_images = state.total_images
        self.global_reflections = int(state.reflections.sum())
        self.sync_seconds += time.perf_counter() - start
        return state

    def _merge_statistics(self, dev: torch.device) -> None:
        """Global totals = totals at the last sync + Σ over ranks of what each added since."""
        st = self.store
        st.apply_settings()     # each rank recounts its own images, the deltas carry it
        deltas = [(getattr(st, name) - self._synced[name]).ravel() for name in STORE_STATISTICS]
        buf = torch.from_numpy(np.concatenate(deltas)).to(dev)
        dist.all_reduce(buf)
        summed = buf.cpu().numpy()
        offset = 0
        for name in STORE_STATISTICS:
            arr = getattr(st, name)
            n = arr.size
            total = self._synced[name] + summed[offset:offset + n].reshape(arr.shape)
            offset += n
            arr[...] = np.rint(total) if arr.dtype.kind == "i" else total
            self._synced[name] = arr.astype(np.float64)
        st.statistics_changed()

    def _images_everywhere(self) -> int:
        # the count of the last sync: the same on every rank, so all decide alike
        return self.global_images

    def step(self) -> StepReport | None:
        """Sync, then one collective optimiser step; None on every rank while any is empty."""
        state = self.sync()
        return self.step_after_sync(state)

    def step_after_sync(self, state: SyncState) -> StepReport | None:
        """The training half of :meth:`step`, for callers that just called :meth:`sync`."""
        if state.min_images == 0:
            return None
        return super().step()

    def steps_per_epoch(self) -> int:
        per_step = self.config.batch_images * self.world_size
        return max(1, int(np.ceil(self.global_images / per_step)))

    def _left_out(self) -> None:
        # the counts and sums are the last sync's over ranks, the misfit verdicts each
        # rank's own: taking this rank's away from everyone's would count ranks differently
        return None

    def snapshot(self, history: list[str] | None = None) -> MergeSnapshot:
        # the counts of the last sync: every rank's images, not this rank's
        return replace(super().snapshot(history), n_images=self.global_images,
                       n_reflections=self.global_reflections)

    def state_dict(self) -> dict:
        state = super().state_dict()
        state["world_size"] = self.world_size
        return state

    def load_state_dict(self, state: dict) -> None:
        """Model, optimisers and Wilson stage from a checkpoint; this rank's scheduler starts
        afresh (its store is its own: images replayed from its spool count as new)."""
        self.trainer.load_state_dict(state["trainer"])
        self._snapshot_id = int(state["snapshot_id"])
        self.sigma_stage = int(state.get("sigma_stage", 0))
