"""Producers: sending files and growing streams to a service (docs/architecture.md)."""
