"""The training device: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``, checked before anything runs."""
from __future__ import annotations

from streamvi.errors import ConfigError


def check_device(name: str, *, key: str = "device") -> None:
    """Refuse, before anything starts, a training device this machine does not have.

    Raises
    ------
    ConfigError
        One line naming ``key``, what is missing and what to use instead.
    """
    import torch

    from streamvi.merging.trainer import resolve_device

    try:
        device = resolve_device(str(name))
    except (ValueError, RuntimeError) as exc:
        hint = ("this machine has no usable CUDA GPU (torch " + torch.__version__ + "); use "
                "'cpu' or 'auto'" if "cuda" in str(name).lower() else
                "use auto, cpu, cuda or cuda:N")
        raise ConfigError(f"{key} = {name!r}: {exc}; {hint}") from None
    if device.type == "cuda" and device.index is not None and \
            device.index >= torch.cuda.device_count():
        raise ConfigError(f"{key} = {name!r}: this machine has {torch.cuda.device_count()} "
                          "CUDA device(s); use cuda:0 ... or auto")
