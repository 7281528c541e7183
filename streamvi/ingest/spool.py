"""An append-only, segmented spool of the raw messages ingest accepted.

Every accepted message is written here, byte for byte as received, *before* it is counted or
queued, so that a crash (even ``kill -9``) followed by a restart can replay what the last
checkpoint had not absorbed: nothing lost, nothing counted twice (DESIGN.md section 7).

On disk
-------
Segments ``spool-000001.svs``, ``spool-000002.svs``, … each a run of records::

    b"SVR1" | u32 LE payload length | u32 LE crc32(payload) | payload

A new segment starts when the next record would take the current one past
``segment_bytes`` (a record larger than that gets a segment of its own).  Records are
numbered 0, 1, 2, … in append order across segments (the *sequence number*).

Damage
------
- A torn tail (the final record of the newest segment incomplete or failing its crc, as a
  crash during a write leaves it) is truncated away when the spool is opened, logged and
  counted in :attr:`Spool.torn_records`.  That record was never acknowledged, so its
  sequence number is issued again.
- A damaged record elsewhere keeps its sequence number but is skipped when reading, with the
  segment and byte offset in the log, counted in :attr:`Spool.corrupt_records`.  Reading
  resumes at the next intact record (the next ``SVR1`` whose crc checks out), and numbering
  restarts from each segment's first number, so damage never shifts the numbers of other
  segments.

A directory is used by one process at a time (an advisory lock on ``spool.lock``).
"""
from __future__ import annotations

import logging
import mmap
import os
import re
import struct
import threading
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from streamvi.errors import ConfigError, StreamviError

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger(__name__)

MAGIC = b"SVR1"
_HEADER = struct.Struct("<4sII")
HEADER_BYTES = _HEADER.size
MAX_PAYLOAD_BYTES = 0xFFFFFFFF
DEFAULT_SEGMENT_BYTES = 256 * 1024 * 1024
FSYNC_POLICIES = ("batch", "always", "never")
_SEGMENT_RE = re.compile(r"^spool-(\d{6,})\.svs$")
_LOCK_NAME = "spool.lock"

_sync = getattr(os, "fdatasync", os.fsync)


def segment_name(number: int) -> str:
    """File name of segment ``number`` (1-based)."""
    return f"spool-{number:06d}.svs"


@dataclass
class _Segment:
    number: int
    path: Path
    first_seq: int
    n_slots: int
    size: int


# --------------------------------------------------------------------------- scanning


def _intact_at(mm: mmap.mmap, mv: memoryview, p: int, end: int) -> tuple[int, bool] | None:
    """Payload length and crc verdict of a record starting at ``p``, or None if its header
    is not there (no magic, or the length runs past ``end``)."""
    if end - p < HEADER_BYTES:
        return None
    magic, n, crc = _HEADER.unpack_from(mm, p)
    if magic != MAGIC or p + HEADER_BYTES + n > end:
        return None
    return n, zlib.crc32(mv[p + HEADER_BYTES:p + HEADER_BYTES + n]) == crc


def _next_intact(mm: mmap.mmap, mv: memoryview, start: int, end: int) -> int | None:
    """Offset of the next record at or after ``start`` whose header and crc are sound."""
    while True:
        q = mm.find(MAGIC, start, end)
        if q < 0:
            return None
        rec = _intact_at(mm, mv, q, end)
        if rec is not None and rec[1]:
            return q
        start = q + 1


def _walk(mm: mmap.mmap, mv: memoryview, end: int) -> Iterator[tuple[bool, int, int]]:
    """The slots of one segment in order: ``(intact, offset, length)``.

    ``length`` is the payload length of an intact record, or the byte length of a damaged
    region (which takes one sequence number).  A record whose framing holds (the next
    record starts right after it) but whose crc fails is one damaged slot; otherwise the
    damaged region runs to the next intact record, or to ``end``.
    """
    p = 0
    while p < end:
        rec = _intact_at(mm, mv, p, end)
        if rec is not None:
            n, crc_ok = rec
            q = p + HEADER_BYTES + n
            if crc_ok:
                yield True, p, n
                p = q
                continue
            if q == end or mm[q:q + len(MAGIC)] == MAGIC:
                yield False, p, q - p
                p = q
                continue
        q = _next_intact(mm, mv, p + 1, end)
        if q is None:
            yield False, p, end - p
            return
        yield False, p, q - p
        p = q


class _Mapped:
    """A read-only map of the first ``size`` bytes of a file (empty files allowed)."""

    def __init__(self, path: Path, size: int):
        self._file = open(path, "rb")
        self.size = size
        self.mm: mmap.mmap | None = None
        self.mv: memoryview | None = None
        if size > 0:
            self.mm = mmap.mmap(self._file.fileno(), size, access=mmap.ACCESS_READ)
            self.mv = memoryview(self.mm)

    def walk(self) -> Iterator[tuple[bool, int, int]]:
        if self.mm is None or self.mv is None:
            return iter(())
        return _walk(self.mm, self.mv, self.size)

    def close(self) -> None:
        if self.mv is not None:
            self.mv.release()
        if self.mm is not None:
            self.mm.close()
        self._file.close()

    def __enter__(self) -> "_Mapped":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# --------------------------------------------------------------------------- the spool


class Spool:
    """Append-only segmented record log.

    Parameters
    ----------
    directory
        Where the segments live; created if missing.  An existing spool is scanned and
        appending continues after its last record.
    fsync
        ``"always"``: fsync after every record (safest, slowest); ``"batch"``: at most every
        ``fsync_interval_s`` and on :meth:`flush` / :meth:`close`; ``"never"``: leave it to
        the OS.  Every policy hands each record to the OS before :meth:`append` returns, so
        a killed process loses nothing; the policy decides what a power cut can take.
    fsync_interval_s
        Longest time, s, a record may wait for its fsync under ``"batch"``.
    segment_bytes
        Size, bytes, at which a new segment is started.

    Raises
    ------
    ConfigError
        Bad arguments, an unusable directory, or a spool already open in another process.
    """

    def __init__(self, directory: str | os.PathLike[str], *, fsync: str = "batch",
                 fsync_interval_s: float = 0.5, segment_bytes: int = DEFAULT_SEGMENT_BYTES):
        if fsync not in FSYNC_POLICIES:
            raise ConfigError(f"spool: fsync={fsync!r} is not one of {', '.join(FSYNC_POLICIES)}")
        if segment_bytes <= HEADER_BYTES:
            raise ConfigError(f"spool: segment_bytes={segment_bytes} is too small; use at "
                              "least a few MiB (default 256 MiB)")
        if fsync_interval_s < 0:
            raise ConfigError(f"spool: fsync_interval_s={fsync_interval_s} must be >= 0")
        self.directory = Path(directory)
        self.fsync = fsync
        self.fsync_interval_s = float(fsync_interval_s)
        self.segment_bytes = int(segment_bytes)
        #: torn final records truncated away when opening
        self.torn_records = 0
        #: damaged records found (when opening or reading); their numbers are skipped
        self.corrupt_records = 0
        self._corrupt_seen: set[tuple[int, int]] = set()
        self._lock = threading.Lock()
        self._closed = False
        self._dirty = False
        self._last_sync = time.monotonic()
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"spool: cannot create directory {self.directory}: {exc}; give "
                              "a writable spool directory") from exc
        self._lock_fd = self._take_lock()
        try:
            self._segments = self._scan()
            if not self._segments:
                self._segments.append(self._create_segment(1, first_seq=0))
            self._fd = os.open(self._segments[-1].path, os.O_WRONLY | os.O_APPEND)
        except BaseException:
            os.close(self._lock_fd)
            raise
        self._n = self._segments[-1].first_seq + self._segments[-1].n_slots
        self._bytes_total = sum(s.size for s in self._segments)
        log.info("spool %s: %d records in %d segment(s), %d bytes", self.directory, self._n,
                 len(self._segments), self._bytes_total)

    # ------------------------------------------------------------------ opening

    def _take_lock(self) -> int:
        path = self.directory / _LOCK_NAME
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise ConfigError(f"spool: cannot open lock file {path}: {exc}; give a writable "
                              "spool directory") from exc
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                os.close(fd)
                raise ConfigError(f"spool: {self.directory} is in use by another process "
                                  f"(lock {path} is held); stop that streamvi or give this one "
                                  "another spool directory") from None
        return fd

    def _scan(self) -> list[_Segment]:
        found = sorted((int(m.group(1)), self.directory / name)
                       for name in os.listdir(self.directory)
                       if (m := _SEGMENT_RE.match(name)))
        segments: list[_Segment] = []
        seq = 0
        for i, (number, path) in enumerate(found):
            if i and number != found[i - 1][0] + 1:
                log.warning("spool %s: segment %s follows %s (segments missing); records "
                            "continue to be numbered in file order", self.directory, path.name,
                            found[i - 1][1].name)
            last = i == len(found) - 1
            size = path.stat().st_size
            slots = 0
            with _Mapped(path, size) as mapped:
                for intact, offset, length in mapped.walk():
                    if not intact:
                        if last and offset + length == size:
                            self._truncate_torn(path, offset, size)
                            size = offset
                            break
                        self._note_corrupt(path, number, offset, length, seq + slots)
                    slots += 1
            segments.append(_Segment(number, path, seq, slots, size))
            seq += slots
        return segments

    def _truncate_torn(self, path: Path, offset: int, size: int) -> None:
        log.warning("spool %s: torn record at byte %d of %s (%d bytes, incomplete or failing "
                    "its crc, as a crash during a write leaves it); truncated away",
                    self.directory, offset, path.name, size - offset)
        with open(path, "r+b") as f:
            f.truncate(offset)
            if self.fsync != "never":
                _sync(f.fileno())
        self.torn_records += 1

    def _note_corrupt(self, path: Path, number: int, offset: int, length: int, seq: int) -> None:
        if (number, offset) in self._corrupt_seen:
            return
        self._corrupt_seen.add((number, offset))
        self.corrupt_records += 1
        log.warning("spool %s: damaged record %d at byte %d of %s (%d bytes: bad header or "
                    "crc); skipped, reading resumes at the next intact record", self.directory,
                    seq, offset, path.name, length)

    def _create_segment(self, number: int, *, first_seq: int) -> _Segment:
        path = self.directory / segment_name(number)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        os.close(fd)
        if self.fsync != "never":
            dfd = os.open(self.directory, os.O_RDONLY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
        return _Segment(number, path, first_seq, 0, 0)

    # ------------------------------------------------------------------ writing

    def append(self, payload: bytes | bytearray | memoryview) -> int:
        """Append one record.

        Parameters
        ----------
        payload
            The raw message, at most 4 GiB − 1 bytes.

        Returns
        -------
        int
            Its sequence number (0-based, consecutive).

        Raises
        ------
        OSError
            The write failed (disk full, I/O error); the segment is cut back to its last
            whole record, so the call may simply be retried.
        """
        n = len(payload)
        if n > MAX_PAYLOAD_BYTES:
            raise ValueError(f"spool {self.directory}: payload of {n} bytes exceeds the "
                             f"{MAX_PAYLOAD_BYTES}-byte record limit")
        header = _HEADER.pack(MAGIC, n, zlib.crc32(payload))
        rec_bytes = HEADER_BYTES + n
        with self._lock:
            if self._closed:
                raise StreamviError(f"spool {self.directory}: append after close")
            cur = self._segments[-1]
            if cur.size > 0 and cur.size + rec_bytes > self.segment_bytes:
                self._roll()
                cur = self._segments[-1]
            self._write_record(cur, header, payload)
            seq = self._n
            self._n += 1
            cur.n_slots += 1
            cur.size += rec_bytes
            self._bytes_total += rec_bytes
            self._dirty = True
            if self.fsync == "always" or (
                    self.fsync == "batch"
                    and time.monotonic() - self._last_sync >= self.fsync_interval_s):
                self._sync_locked()
        return seq

    def _write_record(self, cur: _Segment, header: bytes,
                      payload: bytes | bytearray | memoryview) -> None:
        try:
            done = os.writev(self._fd, [header, payload])
            total = HEADER_BYTES + len(payload)
            if done < total:
                rest = memoryview(header + bytes(payload))[done:]
                while rest:
                    rest = rest[os.write(self._fd, rest):]
        except OSError:
            try:
                os.ftruncate(self._fd, cur.size)
            except OSError as exc:
                log.error("spool %s: could not cut %s back to %d bytes after a failed write "
                          "(%s); the partial record will be skipped on reading",
                          self.directory, cur.path.name, cur.size, exc)
            raise

    def _roll(self) -> None:
        # the new segment first: if it cannot be made, the current one stays usable
        new = self._create_segment(self._segments[-1].number + 1, first_seq=self._n)
        fd = os.open(new.path, os.O_WRONLY | os.O_APPEND)
        if self.fsync != "never":
            _sync(self._fd)
        os.close(self._fd)
        self._segments.append(new)
        self._fd = fd
        self._dirty = False
        self._last_sync = time.monotonic()

    def _sync_locked(self) -> None:
        if self.fsync != "never" and self._dirty:
            _sync(self._fd)
        self._dirty = False
        self._last_sync = time.monotonic()

    def flush(self) -> None:
        """Make every appended record durable now (fsync), unless the policy is ``"never"``."""
        with self._lock:
            if not self._closed:
                self._sync_locked()

    def maybe_sync(self) -> None:
        """Under ``"batch"``, fsync if records wait longer than ``fsync_interval_s``.

        Call it when idle, so the last records of a burst do not wait for the next append.
        """
        if self.fsync != "batch":
            return
        with self._lock:
            if (not self._closed and self._dirty
                    and time.monotonic() - self._last_sync >= self.fsync_interval_s):
                self._sync_locked()

    def close(self) -> None:
        """Flush and close; idempotent."""
        with self._lock:
            if self._closed:
                return
            try:
                self._sync_locked()
            finally:
                self._closed = True
                os.close(self._fd)
                os.close(self._lock_fd)

    def __enter__(self) -> "Spool":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ reading

    @property
    def n_records(self) -> int:
        """Sequence numbers issued so far (the next append gets this number)."""
        with self._lock:
            return self._n

    @property
    def bytes_total(self) -> int:
        """Bytes in all segments, framing included."""
        with self._lock:
            return self._bytes_total

    @property
    def segments(self) -> list[Path]:
        """Segment files, oldest first."""
        with self._lock:
            return [s.path for s in self._segments]

    @property
    def closed(self) -> bool:
        return self._closed

    def iter_records(self, start: int = 0, stop: int | None = None
                     ) -> Iterator[tuple[int, bytes]]:
        """Replay records ``start <= seq < stop`` in order.

        Parameters
        ----------
        start
            First sequence number wanted.
        stop
            One past the last; default: what had been appended when iteration began.
            Appending may go on meanwhile (from another thread).

        Yields
        ------
        (seq, payload)
            Damaged records are skipped (logged with segment and offset), so ``seq`` may
            jump.
        """
        with self._lock:
            snapshot = [(s.number, s.path, s.first_seq, s.size) for s in self._segments]
            end = self._n if stop is None else min(stop, self._n)
        for number, path, first_seq, size in snapshot:
            if first_seq >= end:
                break
            seq = first_seq
            with _Mapped(path, size) as mapped:
                for intact, offset, length in mapped.walk():
                    if seq >= end:
                        break
                    if seq >= start:
                        if intact:
                            assert mapped.mv is not None
                            payload = bytes(mapped.mv[offset + HEADER_BYTES:
                                                      offset + HEADER_BYTES + length])
                            yield seq, payload
                        else:
                            with self._lock:
                                self._note_corrupt(path, number, offset, length, seq)
                    seq += 1

    def __repr__(self) -> str:
        return (f"Spool({str(self.directory)!r}, records={self._n}, "
                f"segments={len(self._segments)}, fsync={self.fsync!r})")
