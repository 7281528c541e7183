"""OM (OnDA Monitor) bridge for streamvi.

:class:`OmBridge` subscribes to an OM monitor's data broadcast and keeps its hit rate, event
counts, beam energy and detector distance; the service finds it through the entry point
``om`` and shows :func:`om_status` (status, stats topic, metrics).  Not a crystal source:
OM's crystals reach streamvi through indexamajig (``--zmq-input``) and ``streamvi send``.
"""
from streamvi_om.bridge import DEFAULT_MAX_MESSAGE_BYTES, PICKLE_RISK, OmBridge
from streamvi_om.state import OmState, new_events
from streamvi_om.unpickle import ALLOWED_GLOBALS, loads_om
from streamvi_om.wiring import om_status

__all__ = [
    "ALLOWED_GLOBALS", "DEFAULT_MAX_MESSAGE_BYTES", "PICKLE_RISK", "OmBridge", "OmState",
    "loads_om", "new_events", "om_status",
]
