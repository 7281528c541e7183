"""Count the operations that make the host wait for the device, on any device.

On CUDA, ``torch.cuda.set_sync_debug_mode`` reports synchronisations as they happen, but
only where there is a GPU.  The operations behind them are the same on every device: a
value copied to the host (``item``, ``bool``, ``tolist`` all end in
``aten._local_scalar_dense``), and an output whose size depends on the data (``unique``,
``nonzero``, boolean-mask indexing, coalescing a sparse tensor, ``repeat_interleave``
without ``output_size``).  :class:`HostReadProbe` records them with a
:class:`~torch.utils._python_dispatch.TorchDispatchMode`, so a test on a CPU can show that a
training step queues its whole work without waiting (docs/performance.md).  Copies from
pageable host memory, which also wait on CUDA, do not show here: on a CPU they are not
copies at all.
"""
from __future__ import annotations

from collections import Counter
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

#: ATen operations whose result the host needs before it can go on
HOST_READ_OPS = frozenset({
    "aten._local_scalar_dense",
    "aten.is_nonzero",
    "aten.equal",
    "aten.allclose",
    "aten.nonzero",
    "aten.nonzero_static",
    "aten.masked_select",
    "aten._unique",
    "aten._unique2",
    "aten.unique_dim",
    "aten.unique_consecutive",
    "aten._coalesce",
    "aten.bincount",
})


def _bool_index(args: Any) -> bool:
    """Whether an ``index``/``index_put`` call indexes with a boolean mask (a hidden nonzero)."""
    indices = args[1] if len(args) > 1 else ()
    return any(isinstance(t, torch.Tensor) and t.dtype == torch.bool for t in indices or ())


class HostReadProbe(TorchDispatchMode):
    """Context manager counting host-reading operations by name (``counts``).

    Examples
    --------
    >>> with HostReadProbe() as probe:
    ...     trainer.learn_batch(batch)
    >>> probe.total
    0
    """

    def __init__(self) -> None:
        super().__init__()
        self.counts: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._schema.name.replace("::", ".")
        if name in HOST_READ_OPS:
            self.counts[name] += 1
        elif name == "aten.repeat_interleave" and "Tensor" in func._overloadname:
            if (kwargs or {}).get("output_size") is None:
                self.counts[name] += 1
        elif name in ("aten.index", "aten.index_put", "aten.index_put_", "aten._index_put_impl_"):
            if _bool_index(args):
                self.counts[name + "[bool]"] += 1
        return func(*args, **(kwargs or {}))

    @property
    def total(self) -> int:
        """Host reads recorded so far."""
        return sum(self.counts.values())
