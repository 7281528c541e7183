"""Plain, thread-safe ingest counters.

The ingest thread writes them, the metrics collector and checkpoints read them.  No
Prometheus here: the metrics module exposes them through a custom collector, so the
counters stay importable (and testable) without a registry.

Counting rules
--------------
- ``messages_received`` / ``bytes_received``: every frame read from a socket (or replayed
  from the spool after a crash), accepted or not.
- ``crystals_received`` / ``reflections_received``: accepted messages and the rows they
  carry after row-level screening.
- ``messages_rejected[reason]``: whole messages refused (not spooled, dead-lettered).
- ``reflections_rejected[reason]``: rows dropped inside accepted messages
  (:attr:`streamvi.wire.CrystalMessage.rows_rejected`).
- ``duplicates``: crystals already stored, by identity (run, image, crystal) or by content
  (the store detects them; the service calls :meth:`IngestCounters.add_duplicates`).
  ``duplicates_not_spooled`` of them were recognised by ingest before spooling
  (:meth:`IngestCounters.record_duplicate`): counted as received, never spooled, so a flood
  of resends cannot fill the disk.
- ``crystals_rejected[reason]``: accepted (spooled) crystals the store refused
  (``cell_mismatch``, ``intensity_outlier``, ``outside_table``; streamvi/merging/store.py), so that
  ``crystals_received == crystals_merged + duplicates + Σ crystals_rejected``.
- ``last_seq``: the highest spool sequence number already counted, so that replaying the
  spool after a restart counts only what the checkpoint had not (nothing counted twice).
"""
from __future__ import annotations

import threading
from typing import Any, Mapping

from streamvi.wire import CrystalMessage

_STATE_VERSION = 1
_SCALARS = ("messages_received", "crystals_received", "reflections_received",
            "bytes_received", "duplicates", "duplicates_not_spooled", "spool_write_errors",
            "last_seq")


class IngestCounters:
    """Monotonic counters of what ingest received, accepted and rejected.

    All methods may be called from any thread.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.messages_received = 0
        self.crystals_received = 0
        self.reflections_received = 0
        self.bytes_received = 0
        self.duplicates = 0
        #: of ``duplicates``, those recognised before spooling (never spooled)
        self.duplicates_not_spooled = 0
        #: appends to the spool that failed (disk full, I/O error) and were retried
        self.spool_write_errors = 0
        #: highest spool sequence number counted; -1 before the first
        self.last_seq = -1
        self.messages_rejected: dict[str, int] = {}
        self.reflections_rejected: dict[str, int] = {}
        self.crystals_rejected: dict[str, int] = {}

    # ------------------------------------------------------------------ writers

    def record_accepted(self, msg: CrystalMessage, *, nbytes: int, seq: int | None = None
                        ) -> None:
        """An accepted (and already spooled) message, with its row-level rejects.

        Parameters
        ----------
        msg
            The decoded crystal.
        nbytes
            Size of the raw message, bytes.
        seq
            Its spool sequence number, if spooled; raises ``last_seq`` to it.
        """
        with self._lock:
            self._count_crystal(msg, nbytes)
            if seq is not None and seq > self.last_seq:
                self.last_seq = seq

    def _count_crystal(self, msg: CrystalMessage, nbytes: int) -> None:
        """A valid crystal message received (the caller holds the lock)."""
        self.messages_received += 1
        self.bytes_received += int(nbytes)
        self.crystals_received += 1
        self.reflections_received += len(msg)
        for reason, n in msg.rows_rejected.items():
            self.reflections_rejected[reason] = self.reflections_rejected.get(reason, 0) + n

    def record_rejected(self, reason: str, *, nbytes: int) -> None:
        """A whole message of ``nbytes`` bytes was refused for ``reason`` (snake_case)."""
        with self._lock:
            self.messages_received += 1
            self.bytes_received += int(nbytes)
            self.messages_rejected[reason] = self.messages_rejected.get(reason, 0) + 1

    def record_duplicate(self, msg: CrystalMessage, *, nbytes: int) -> None:
        """A valid message whose crystal is stored already, recognised before spooling: it
        counts as received and as a duplicate, and is neither spooled nor queued."""
        with self._lock:
            self._count_crystal(msg, nbytes)
            self.duplicates += 1
            self.duplicates_not_spooled += 1

    def add_crystals_rejected(self, reason: str, n: int = 1) -> None:
        """``n`` spooled crystals were refused by the store for ``reason``."""
        with self._lock:
            self.crystals_rejected[reason] = self.crystals_rejected.get(reason, 0) + int(n)

    def add_duplicates(self, n: int = 1) -> None:
        """``n`` crystals were already stored (reported by the store)."""
        with self._lock:
            self.duplicates += int(n)

    def record_spool_error(self) -> None:
        """An append to the spool failed and will be retried."""
        with self._lock:
            self.spool_write_errors += 1

    # ------------------------------------------------------------------ readers

    def snapshot(self) -> dict[str, Any]:
        """A consistent copy of every counter (dicts copied)."""
        with self._lock:
            out: dict[str, Any] = {name: getattr(self, name) for name in _SCALARS}
            out["messages_rejected"] = dict(self.messages_rejected)
            out["reflections_rejected"] = dict(self.reflections_rejected)
            out["crystals_rejected"] = dict(self.crystals_rejected)
        return out

    @property
    def messages_rejected_total(self) -> int:
        """All rejected messages, every reason together."""
        with self._lock:
            return sum(self.messages_rejected.values())

    # ------------------------------------------------------------------ checkpoints

    def state_dict(self) -> dict[str, Any]:
        """Plain, msgpack/JSON/torch.save-able state for a checkpoint."""
        state = self.snapshot()
        state["version"] = _STATE_VERSION
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Replace every counter by the values of a :meth:`state_dict`.

        Raises
        ------
        ValueError
            If the state comes from an unknown version of this class.
        """
        version = state.get("version", _STATE_VERSION)
        if version != _STATE_VERSION:
            raise ValueError(f"ingest counters: checkpoint state has version {version!r}, this "
                             f"streamvi reads version {_STATE_VERSION}; start without the "
                             "checkpoint or use the streamvi that wrote it")
        with self._lock:
            for name in _SCALARS:
                default = -1 if name == "last_seq" else 0
                setattr(self, name, int(state.get(name, default)))
            self.messages_rejected = {str(k): int(v) for k, v in
                                      dict(state.get("messages_rejected", {})).items()}
            self.reflections_rejected = {str(k): int(v) for k, v in
                                         dict(state.get("reflections_rejected", {})).items()}
            self.crystals_rejected = {str(k): int(v) for k, v in
                                      dict(state.get("crystals_rejected", {})).items()}

    def __repr__(self) -> str:
        s = self.snapshot()
        return (f"IngestCounters(messages={s['messages_received']}, "
                f"crystals={s['crystals_received']}, "
                f"rejected={sum(s['messages_rejected'].values())})")
