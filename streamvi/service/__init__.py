"""The service: the one life cycle (start, replay, checkpoint, stop) that wires ingest,
merging and the publishers together (docs/architecture.md)."""
from streamvi.service.service import Service

__all__ = ["Service"]
