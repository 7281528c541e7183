"""The command line ``streamvi``: the only place that reads argv (docs/architecture.md)."""
from streamvi.cli.main import main

__all__ = ["main"]
