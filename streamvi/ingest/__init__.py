"""Ingest: the sockets producers send to, validation, the spool, dead letters,
counters, CURVE keys and rate-limited logging (docs/architecture.md)."""
