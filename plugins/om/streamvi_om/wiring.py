"""The OM bridge's figures for a running streamvi service.

The service finds this plugin through the entry point ``om`` (group ``streamvi.sources``),
runs an :class:`~streamvi_om.bridge.OmBridge` while ``om_url`` is set, and adds
:func:`om_status` to its status (stats topic, ``/api/status``, status page, ``/metrics``).
The plugin knows nothing of the service: it is handed the bridge and a count.
"""
from __future__ import annotations

from typing import Any

from streamvi_om.bridge import OmBridge


def om_status(bridge: OmBridge, crystals_received: int) -> dict[str, Any]:
    """The bridge's snapshot plus ``crystals_received`` and ``indexing_yield`` (crystals
    received per OM hit).

    Parameters
    ----------
    bridge
        A running bridge.
    crystals_received
        Crystals the service has accepted so far.
    """
    out = bridge.snapshot()
    out["crystals_received"] = int(crystals_received)
    out["indexing_yield"] = bridge.indexing_yield(int(crystals_received))
    return out
