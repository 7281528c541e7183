"""Repeated log lines at a bounded rate, with how many were left out.

A hostile or broken peer can make the same warning fire thousands of times a second (a
producer with a wrong CURVE key reconnects every 100 ms, a broken producer sends only
malformed messages).  Each would be one line; :class:`RateLimitedLog` keeps a token bucket
per kind of line instead: ``burst`` lines at once, then one every ``interval_s``, and the
next line of that kind (or :meth:`RateLimitedLog.flush`) says how many were suppressed.
"""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Callable

@dataclass
class _Bucket:
    tokens: float
    updated: float
    suppressed: int = 0
    since: float = 0.0          # when the first suppressed line came
    level: int = logging.WARNING
    label: str = ""


class RateLimitedLog:
    """Log lines of one kind at most ``burst`` at once and one per ``interval_s`` after.

    Parameters
    ----------
    logger
        Where the lines go.
    burst
        Lines of one kind logged in a row before limiting starts.
    interval_s
        Seconds per line once the burst is spent (the bucket refills at this rate).
    clock
        Monotonic time source, s (tests pass their own).

    Notes
    -----
    Safe to call from several threads (the ingest thread and ZeroMQ's authenticator thread
    both log through one instance).
    """

    def __init__(self, logger: logging.Logger, *, burst: int = 10, interval_s: float = 10.0,
                 clock: Callable[[], float] = time.monotonic):
        if burst < 1 or not interval_s > 0:
            raise ValueError(f"RateLimitedLog: burst={burst} must be >= 1 and "
                             f"interval_s={interval_s} > 0")
        self.logger = logger
        self.burst = int(burst)
        self.interval_s = float(interval_s)
        self.clock = clock
        self._buckets: dict[str, _Bucket] = {}
        self._lock = threading.Lock()
        #: lines suppressed so far, every kind together
        self.suppressed_total = 0

    def log(self, level: int, key: str, msg: str, *args: object) -> bool:
        """Log ``msg % args`` unless lines of kind ``key`` came too often.

        Parameters
        ----------
        level
            ``logging.WARNING`` etc.
        key
            The kind of line (e.g. ``"curve_refused"``, ``"rejected:malformed_msgpack"``).
        msg, args
            As for :meth:`logging.Logger.log`; format only bounded text into them
            (:func:`streamvi.wire.clip`).

        Returns
        -------
        bool
            Whether the line was logged.
        """
        now = self.clock()
        with self._lock:
            b = self._buckets.get(key)
            if b is None:
                b = self._buckets[key] = _Bucket(tokens=float(self.burst), updated=now)
            b.tokens = min(float(self.burst), b.tokens + (now - b.updated) / self.interval_s)
            b.updated = now
            b.level, b.label = level, key
            if b.tokens < 1.0:
                if b.suppressed == 0:
                    b.since = now
                b.suppressed += 1
                self.suppressed_total += 1
                return False
            b.tokens -= 1.0
            note = self._take_note(b, now)
        self.logger.log(level, msg + note, *args)
        return True

    def flush(self) -> None:
        """Report kinds whose suppressed lines have waited at least ``interval_s``.

        Call it now and then (the ingest thread does at each poll), so that the count of a
        flood that stopped is not left unsaid.
        """
        now = self.clock()
        lines = []
        with self._lock:
            for key, b in self._buckets.items():
                if b.suppressed and now - b.since >= self.interval_s:
                    lines.append((b.level, key, b.suppressed, now - b.since))
                    b.suppressed = 0
        for level, key, n, span in lines:
            self.logger.log(level, "%s more line(s) like this (%s) were suppressed in the last "
                            "%.0f s", f"{n:,}", key, span)

    @staticmethod
    def _take_note(b: _Bucket, now: float) -> str:
        if not b.suppressed:
            return ""
        note = (f" ({b.suppressed:,} more like this were suppressed in the last "
                f"{now - b.since:.0f} s)")
        b.suppressed = 0
        return note.replace("%", "%%")
