"""A pickle reader that loads only the types OM's broadcasts hold.

OM's :class:`om.lib.zmq.ZmqDataBroadcaster` sends each message with ``send_pyobj``: a pickle.
Plain :func:`pickle.loads` runs whatever callable a pickle names, so anyone who can publish
on that address could run code in the service.  :func:`loads_om` resolves only the globals
listed in :data:`ALLOWED_GLOBALS` (deques, numpy arrays and scalars, sets, complex numbers)
and refuses the rest.  It narrows the risk; it does not remove it (a large message still costs
memory, and numpy's own reconstruction code runs), so the bridge still needs
``allow_pickle=True`` to use it.
"""
from __future__ import annotations

import io
import pickle
from typing import Any

#: (module, name) pairs a message may refer to.  numpy 1.x writes ``numpy.core``, numpy 2
#: ``numpy._core``; protocol 2 pickles bytes through ``_codecs.encode``.
ALLOWED_GLOBALS = frozenset({
    ("collections", "deque"), ("collections", "OrderedDict"),
    ("builtins", "complex"), ("builtins", "set"), ("builtins", "frozenset"),
    ("builtins", "bytearray"), ("builtins", "slice"), ("_codecs", "encode"),
    ("numpy", "ndarray"), ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"), ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
})


def _numpy_core() -> str:
    try:
        import numpy._core  # noqa: F401
    except ImportError:
        return "numpy.core"
    return "numpy._core"


_NUMPY_CORE = _numpy_core()


class _OmUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in ALLOWED_GLOBALS:
            raise pickle.UnpicklingError(
                f"the message refers to {module}.{name}, which an OM broadcast never holds; "
                "it is not loaded (is something other than OM publishing on this address?)")
        if module.startswith("numpy.core.") and _NUMPY_CORE != "numpy.core":
            # OM runs numpy 1.x; numpy 2 keeps numpy.core only as a deprecated alias.
            module = _NUMPY_CORE + module[len("numpy.core"):]
        return super().find_class(module, name)


def loads_om(data: bytes) -> Any:
    """Unpickle one OM message, resolving only :data:`ALLOWED_GLOBALS`.

    Raises
    ------
    pickle.UnpicklingError
        The data name another global, or are not a pickle.
    """
    return _OmUnpickler(io.BytesIO(data)).load()
