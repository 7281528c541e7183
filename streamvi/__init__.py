"""streamvi: online variational merging of serial-crystallography data.

The public API re-exported here is the part other programs (sources, notebooks)
are expected to use; everything else is internal.
"""
from streamvi.errors import StreamviError, WireError
from streamvi.wire import CrystalMessage, decode_crystal, encode_crystal

__version__ = "0.1.0"
__all__ = [
    "CrystalMessage",
    "StreamviError",
    "WireError",
    "decode_crystal",
    "encode_crystal",
    "__version__",
]
