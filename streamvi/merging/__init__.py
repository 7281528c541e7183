"""Merging: the reflection store, the schedule, features, the model, the trainer and
the engine that drives them; offline and data-parallel merging (docs/architecture.md)."""
