"""Values made safe for JSON (and msgpack): plain Python types, no NaN or infinity."""
from __future__ import annotations

import math
from typing import Any

import numpy as np


def jsonable(x: Any) -> Any:
    """``x`` with numpy values made plain and non-finite floats replaced by None.

    JSON has no NaN: ``json.dumps(jsonable(x), allow_nan=False)`` always succeeds for
    dicts, lists, numbers, strings and numpy arrays; anything else becomes its ``str``.
    """
    if isinstance(x, dict):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    if isinstance(x, np.ndarray):
        return jsonable(x.tolist())
    if isinstance(x, (bool, np.bool_)):
        return bool(x)
    if isinstance(x, (int, np.integer)):
        return int(x)
    if isinstance(x, (float, np.floating)):
        return float(x) if math.isfinite(x) else None
    if x is None or isinstance(x, str):
        return x
    return str(x)
