"""The pieces of a merge's life cycle that every runner shares: checkpoints and intervals.

``streamvi serve`` (and ``demo``, which runs it) and each data-parallel rank
(:mod:`streamvi.service.rank`) start by replaying their spool and loading the last
checkpoint, train while they publish snapshots and write checkpoints on their intervals,
and end with a last snapshot and checkpoint.  The checkpoint file is handled here, once:
written atomically and forced to disk (:func:`streamvi.atomic.atomic_write`), read back with
a check of its shape, and set aside as ``checkpoint.corrupt`` when it cannot be used, so that
training restarts from the spooled data instead of failing (docs/operations.md).
"""
from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any, Sequence

from streamvi.atomic import atomic_write, stale_temp_files

log = logging.getLogger(__name__)

CHECKPOINT_NAME = "checkpoint.pt"
#: What a service's checkpoint holds (and of which kind); a rank's lacks the counters.
SERVICE_KEYS = ("engine", "counters", "space", "time")
RANK_KEYS = ("engine", "space", "time")


def checkpoint_problem(state: Any, required: Sequence[str] = SERVICE_KEYS) -> str | None:
    """What is wrong with the shape of a loaded checkpoint (None: nothing).

    Parameters
    ----------
    state
        What ``torch.load`` returned.
    required
        Keys that must be present: ``engine``, ``counters`` and ``space`` are maps,
        ``time`` a number (Unix s).
    """
    if not isinstance(state, dict):
        return f"a {type(state).__name__}, not a streamvi checkpoint"
    kinds = {"engine": dict, "counters": dict, "space": dict, "time": (int, float)}
    for key in required:
        if not isinstance(state.get(key), kinds[key]):
            return f"no {key!r} of the right kind"
    space = state["space"]
    cell = space.get("cell")
    if not (isinstance(cell, (list, tuple)) and len(cell) == 6
            and all(isinstance(x, (int, float)) for x in cell)):
        return "its space has no cell of six numbers"
    if not isinstance(space.get("space_group"), str) or \
            not isinstance(space.get("dmin"), (int, float)):
        return "its space lacks the space group or dmin"
    return None


class Checkpoints:
    """The checkpoint file of one output directory.

    Parameters
    ----------
    path
        The checkpoint (``<out_dir>/checkpoint.pt``).
    required
        Keys a loadable checkpoint has (:func:`checkpoint_problem`).
    """

    def __init__(self, path: str | os.PathLike, *, required: Sequence[str] = SERVICE_KEYS):
        self.path = Path(path)
        self.required = tuple(required)

    def exists(self) -> bool:
        return self.path.exists()

    def save(self, state: dict[str, Any]) -> Path | None:
        """Write ``state`` atomically, forced to disk; None (logged) when it failed, for the
        next interval to retry."""
        import torch

        try:
            atomic_write(self.path, lambda tmp: torch.save(state, tmp))
        except (OSError, RuntimeError) as exc:   # torch.save reports a full disk as RuntimeError
            log.error("checkpoint %s failed: %s (disk full? will retry at the next interval)",
                      self.path, exc)
            return None
        return self.path

    def load(self, check: Any = None, *, set_aside: bool = True) -> dict[str, Any] | None:
        """The checkpoint's state, or None: there is none, or it was unusable and is set
        aside (:meth:`set_aside`).

        Parameters
        ----------
        check
            Called with the state after the shape check; raising sets the checkpoint aside
            too (the service checks its counters there before anything uses them).
        set_aside
            False: leave an unusable file where it is (data-parallel ranks other than 0 read
            the same file as rank 0, which moves it).
        """
        if not self.path.exists():
            return None
        import torch

        try:
            state = torch.load(self.path, map_location="cpu", weights_only=True)
            problem = checkpoint_problem(state, self.required)
            if problem is not None:
                raise ValueError(problem)
            if check is not None:
                check(state)
        except Exception as exc:     # noqa: BLE001 - any unreadable file is set aside alike
            if set_aside:
                self.set_aside(exc)
            else:
                log.warning("checkpoint %s unreadable (%s): training starts afresh", self.path,
                            exc)
            return None
        return state

    def retire(self, tag: str, reason: str) -> Path:
        """Move a readable checkpoint that this run does not continue to
        ``<stem>.<tag><suffix>`` (``checkpoint.dmin-2.00.pt``; ``….<tag>.1<suffix>`` and on
        where that exists: a trained model is never overwritten), saying why; returns
        where."""
        kept = self.path.with_name(f"{self.path.stem}.{tag}{self.path.suffix}")
        n = 0
        while kept.exists():
            n += 1
            kept = self.path.with_name(f"{self.path.stem}.{tag}.{n}{self.path.suffix}")
        os.replace(self.path, kept)
        log.warning("checkpoint %s %s: moved to %s; training restarts from the spooled data",
                    self.path, reason, kept)
        return kept

    def set_aside(self, exc: Exception) -> None:
        """Move an unusable checkpoint to ``checkpoint.corrupt`` and say so."""
        bad = self.path.with_suffix(".corrupt")
        os.replace(self.path, bad)
        log.error("checkpoint %s unreadable (%s): moved to %s; training restarts from the "
                  "spooled data", self.path, exc, bad)


class Every:
    """A deadline that comes back every ``interval_s`` seconds (monotonic clock).

    Parameters
    ----------
    interval_s
        Seconds between two occasions.
    now
        The start (default: now); the first occasion is one interval later.
    """

    def __init__(self, interval_s: float, now: float | None = None):
        self.interval_s = float(interval_s)
        self.next = (time.monotonic() if now is None else now) + self.interval_s

    def due(self, now: float, *, force: bool = False) -> bool:
        """True (and the next occasion is set from ``now``) when the time has come or
        ``force``."""
        if not (force or now >= self.next):
            return False
        self.next = now + self.interval_s
        return True


def remove_stale_temp_files(directory: str | os.PathLike) -> None:
    """Remove the temporary files that a kill -9 mid-write left (checkpoints, MTZ files)."""
    for path in stale_temp_files(directory):
        try:
            path.unlink()
            log.info("removed %s, left by an interrupted write", path)
        except OSError as exc:
            log.warning("could not remove %s, left by an interrupted write: %s", path, exc)
