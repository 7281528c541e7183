"""Tail growing CrystFEL streams, named pipes and standard input; remember what was sent.

:class:`StreamFollower` reads a stream as indexamajig writes it and yields each item together
with the :class:`StreamPosition` to resume from once that item has been handed on.  Bytes go
through :class:`~streamvi_crystfel.StreamParser`, which holds back a chunk until its
``----- End chunk -----`` line has arrived, so a chunk split across writes is read whole.

A regular file is polled every ``poll_s`` s at its end.  When it shrinks below what was read
(truncated, e.g. ``indexamajig -o`` run again on the same name) or its inode changes (replaced:
deleted and written anew, or renamed over), a :class:`~streamvi.sources.Rejected` with reason
``file_truncated`` / ``file_replaced`` says so and the new content is read from its first byte,
header included.  A named pipe (FIFO) or standard input (``"-"``) is read until end of file.

:class:`PositionFile` keeps, per input, where a sender stands (JSON, replaced atomically), so a
restarted sender resumes after the last crystal it sent: ``offset`` is the end of the last chunk
whose crystals were all sent, ``skip`` the crystals after it already sent (a chunk's crystals
go one by one).  Pipes cannot be resumed and are not recorded.  Finished files read by another
source (DIALS ``.refl``/``.expt``) resume as a whole file: :func:`whole_file_positions`.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import select
import stat
import sys
import threading
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Generator, Iterable, Iterator, Sequence

from streamvi.atomic import atomic_write
from streamvi.errors import ConfigError
from streamvi.sources import Rejected, SourceItem, plugin_module
from streamvi.wire import CrystalMessage

if TYPE_CHECKING:
    from streamvi_crystfel import StreamHeader, StreamParser

log = logging.getLogger(__name__)

#: The file name that means standard input.
STDIN = "-"
#: Bytes read per call.
READ_BYTES = 1 << 20
#: Bytes before a resume offset whose hash must match (detects a file replaced in place).
CHECK_BYTES = 4096
#: Longest header searched for when its end is not known, bytes.
MAX_HEADER_BYTES = 64 * 1024 * 1024
_BEGIN_CHUNK = b"----- Begin chunk -----"

Item = tuple[SourceItem | None, "StreamPosition"]


@dataclass(frozen=True)
class StreamPosition:
    """Where a reader of one stream stands: what comes before has been handed on.

    Attributes
    ----------
    offset
        End of the last chunk whose crystals have all been handed on (bytes from the start
        of the file; always the end of the header or of a chunk).
    skip
        Crystals after ``offset`` already handed on.
    inode
        Inode of the file; ``None`` for a pipe or when unknown (then not checked on resume).
    header_end
        End of the header (start of the first chunk), bytes; 0 until it is known.
    line
        Line number at ``offset`` (1-based), if known.
    check
        SHA-256 (hex) of the up to 4,096 bytes before ``offset``; a resume refuses a file
        whose bytes there differ (replaced under a reused inode).  Empty: not checked.
    resumable
        False for pipes and standard input (nothing to seek back to).
    """

    offset: int = 0
    skip: int = 0
    inode: int | None = None
    header_end: int = 0
    line: int | None = None
    check: str = ""
    resumable: bool = True

    def to_json(self) -> dict[str, Any]:
        """The position as a JSON-able map (the entry of a :class:`PositionFile`)."""
        out = asdict(self)
        del out["resumable"]
        return out

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "StreamPosition":
        """Inverse of :meth:`to_json`; unknown keys (``sent``, …) are ignored."""
        return cls(offset=int(d.get("offset", 0)), skip=int(d.get("skip", 0)),
                   inode=d.get("inode"), header_end=int(d.get("header_end", 0)),
                   line=d.get("line"), check=str(d.get("check", "")))


def _crystfel():
    """The CrystFEL plugin (its stream parser), found through the entry points."""
    return plugin_module("crystfel")


def _tail_hash(fd: int, offset: int) -> str:
    n = min(CHECK_BYTES, offset)
    if n <= 0:
        return ""
    return hashlib.sha256(os.pread(fd, n, offset - n)).hexdigest()


class StreamFollower:
    """Read a CrystFEL stream as it grows; yield ``(item, position after it)``.

    Parameters
    ----------
    path
        Stream file, named pipe, or ``"-"`` for standard input.
    run
        Run name of the messages; default: the file name without ``.stream`` (``"stdin"``
        for standard input).
    start
        Resume here (a position saved earlier); its inode and check are verified first and a
        mismatch reads the file from the start after a ``file_replaced`` / ``file_truncated``
        record.  Ignored for pipes.
    follow
        Keep polling a regular file at its end (until ``stop_event`` or ``idle_timeout_s``);
        False reads to the current end and stops.  Pipes are always read to end of file.
    poll_s
        Wait between polls at the end of a file, s.
    idle_timeout_s
        Stop after this many seconds without new bytes (None: never); an incomplete last
        chunk is then reported as ``truncated_chunk``.
    stop_event
        Set it to stop promptly (between reads and between items); nothing is reported for a
        chunk still incomplete, so a resume reads it again.
    block_size
        Bytes per read.

    Notes
    -----
    Each yielded pair is ``(item, position)``; ``item`` is ``None`` when only the position
    moved (chunks without crystals).  ``position`` is where to resume once ``item`` has been
    handed on.  A new parser is made for every file read from its start, so duplicate-image
    detection covers one incarnation of the file.
    """

    def __init__(self, path: str | os.PathLike[str], *, run: str | None = None,
                 start: StreamPosition | None = None, follow: bool = True,
                 poll_s: float = 0.1, idle_timeout_s: float | None = None,
                 stop_event: threading.Event | None = None, block_size: int = READ_BYTES):
        if not poll_s > 0:
            raise ConfigError(f"follow: poll_s={poll_s!r} must be > 0 seconds")
        if idle_timeout_s is not None and idle_timeout_s < 0:
            raise ConfigError(f"follow: idle_timeout_s={idle_timeout_s!r} must be >= 0 seconds "
                              "(or None to follow until stopped)")
        self.path = os.fspath(path)
        self.is_stdin = self.path == STDIN
        if run is None:
            run = "stdin" if self.is_stdin else _crystfel().default_run(self.path)
        self.run = run
        self.start = start
        self.follow = follow
        self.poll_s = poll_s
        self.idle_timeout_s = idle_timeout_s
        self.stop_event = stop_event or threading.Event()
        self.block_size = block_size
        #: The parser of the file incarnation being read (counts, header).
        self.parser: StreamParser | None = None

    def __repr__(self) -> str:
        return f"StreamFollower({self.path!r}, run={self.run!r}, follow={self.follow})"

    def __iter__(self) -> Iterator[Item]:
        if self.is_stdin:
            return self._pipe(sys.stdin.fileno(), own=False)
        try:
            mode = os.stat(self.path).st_mode
        except FileNotFoundError:
            mode = None
        if mode is not None and stat.S_ISFIFO(mode):
            return self._pipe(os.open(self.path, os.O_RDONLY | os.O_NONBLOCK), own=True)
        return self._file()

    # ------------------------------------------------------------------ shared

    def _stopped(self) -> bool:
        return self.stop_event.is_set()

    def _idle(self, since: float) -> bool:
        return self.idle_timeout_s is not None and time.monotonic() - since >= self.idle_timeout_s

    def _new_parser(self, *, header: StreamHeader | None = None, offset: int = 0,
                    line: int | None = None) -> StreamParser:
        self.parser = _crystfel().StreamParser(self.run, source=self.path, header=header,
                                               start_offset=offset, start_line=line)
        return self.parser

    def _items(self, items: list[SourceItem], start: StreamPosition, end: StreamPosition,
               skip: list[int]) -> Iterator[Item]:
        """Pair one feed's items with their positions; drop crystals already sent."""
        m = sum(isinstance(i, CrystalMessage) for i in items)
        k = 0
        last: StreamPosition | None = None
        for item in items:
            if isinstance(item, CrystalMessage):
                k += 1
                if skip[0] > 0:  # handed on before the restart
                    skip[0] -= 1
                    continue
            last = end if k == m else replace(start, skip=k)
            yield item, last
        if last != end and end != start:
            yield None, end

    # ------------------------------------------------------------------ pipes

    def _pipe(self, fd: int, *, own: bool) -> Iterator[Item]:
        parser = self._new_parser()
        where = StreamPosition(resumable=False)
        seen_data = False
        since = time.monotonic()
        try:
            while not self._stopped():
                ready, _, _ = select.select([fd], [], [], self.poll_s)
                data = None
                if ready:
                    try:
                        data = os.read(fd, self.block_size)
                    except BlockingIOError:
                        data = None
                if data:
                    seen_data = True
                    since = time.monotonic()
                    before = where
                    out = parser.feed(data)
                    where = StreamPosition(offset=parser.offset, line=parser.line,
                                           resumable=False)
                    yield from self._items(out, before, where, [0])
                    continue
                if data == b"" and (seen_data or self.is_stdin):
                    break  # end of file: the writer closed its end
                if self._idle(since):
                    break
                if data == b"":
                    # A FIFO whose writer has not opened it yet reads as empty on some systems.
                    self.stop_event.wait(self.poll_s)
            else:
                return
            yield from self._items(parser.close(), where, where, [0])
        finally:
            if own:
                os.close(fd)

    # ------------------------------------------------------------------ regular files

    def _open(self, since: float) -> tuple[int, os.stat_result] | None:
        """Open the file, waiting for it to appear when following; None if stopped."""
        waited = False
        while True:
            try:
                fd = os.open(self.path, os.O_RDONLY)
            except FileNotFoundError:
                if not self.follow:
                    raise ConfigError(f"follow: {self.path}: no such file; check the path "
                                      "(or use --follow to wait for it)") from None
                if not waited:
                    log.info("follow: waiting for %s to appear", self.path)
                    waited = True
                if self._idle(since) or self.stop_event.wait(self.poll_s):
                    return None
                continue
            return fd, os.fstat(fd)

    def _file(self) -> Iterator[Item]:
        since = time.monotonic()
        opened = self._open(since)
        if opened is None:
            return
        fd, st = opened
        start = self.start
        try:
            if start is not None and (start.offset > 0 or start.skip > 0):
                problem = self._resume_problem(fd, st, start)
                if problem is not None:
                    reason, detail = problem
                    yield (Rejected(source=self.path, position=f"byte {start.offset}",
                                    reason=reason, detail=detail),
                           StreamPosition(inode=st.st_ino))
                    start = None
            while True:
                change = yield from self._read_incarnation(fd, st, start)
                if change is None:
                    return
                start = None
                if change.reason == "file_replaced":
                    os.close(fd)
                    fd = -1
                    opened = self._open(time.monotonic())
                    if opened is None:
                        return
                    fd, st = opened
                yield change, StreamPosition(inode=st.st_ino)
        finally:
            if fd >= 0:
                os.close(fd)

    def _resume_problem(self, fd: int, st: os.stat_result, start: StreamPosition
                        ) -> tuple[str, str] | None:
        """Why ``start`` does not fit this file (reason, detail), or None if it does."""
        if start.inode is not None and start.inode != st.st_ino:
            return "file_replaced", (
                f"the position file says inode {start.inode} but {self.path} now has inode "
                f"{st.st_ino}: it is another file, read from its start (the service counts "
                "crystals it already holds as duplicates)")
        if st.st_size < start.offset:
            return "file_truncated", (
                f"the position file says byte {start.offset} but {self.path} holds only "
                f"{st.st_size} bytes: it was cut short or rewritten, read from its start")
        if start.check and _tail_hash(fd, start.offset) != start.check:
            return "file_replaced", (
                f"the bytes before offset {start.offset} differ from those sent before: "
                f"{self.path} was rewritten in place, read from its start")
        return None

    def _header(self, fd: int, header_end: int) -> tuple[StreamHeader, int]:
        """The header (from the file start) and its end, for resuming mid-stream."""
        cf = _crystfel()
        if header_end > 0 and os.pread(fd, len(_BEGIN_CHUNK), header_end) == _BEGIN_CHUNK:
            return cf.parse_header(os.pread(fd, header_end, 0)), header_end
        head = bytearray()
        while len(head) < MAX_HEADER_BYTES:
            block = os.pread(fd, READ_BYTES, len(head))
            head += block
            at = cf.reader.find_chunk(head)
            if at >= 0 or not block:
                end = at if at >= 0 else len(head)
                return cf.parse_header(bytes(head[:end])), end
        raise ConfigError(f"follow: {self.path}: no '----- Begin chunk -----' line in the first "
                          f"{MAX_HEADER_BYTES} bytes; is this a CrystFEL stream?")

    def _read_incarnation(self, fd: int, st: os.stat_result, start: StreamPosition | None
                          ) -> Generator[Item, None, Rejected | None]:
        """Read one file (from ``start``) until it ends, is stopped, truncated or replaced.

        Returns (as the generator's value) None when done, else the ``file_replaced`` /
        ``file_truncated`` record to report before reading the new content.
        """
        inode = st.st_ino
        if start is not None and start.offset > 0:
            header, header_end = self._header(fd, start.header_end)
            parser = self._new_parser(header=header, offset=start.offset, line=start.line)
            where = replace(start, inode=inode, header_end=header_end,
                            check=_tail_hash(fd, start.offset))
        else:
            parser = self._new_parser()
            where = StreamPosition(inode=inode, skip=start.skip if start is not None else 0)
        skip = [where.skip]
        read_at = where.offset
        since = time.monotonic()
        while not self._stopped():
            data = os.pread(fd, self.block_size, read_at)
            if data:
                read_at += len(data)
                since = time.monotonic()
                out = parser.feed(data)
                if parser.offset != where.offset or out:
                    header_end = where.header_end or (parser.header.n_bytes
                                                      if parser.header is not None else 0)
                    end = StreamPosition(offset=parser.offset, inode=inode, header_end=header_end,
                                         line=parser.line, check=_tail_hash(fd, parser.offset))
                    yield from self._items(out, where, end, skip)
                    where = end
                continue
            if not self.follow:
                break
            change = self._changed(fd, st, read_at)
            if change == "file_replaced":
                # Whatever the writer added to the old file before replacing it still counts.
                while (data := os.pread(fd, self.block_size, read_at)):
                    read_at += len(data)
                    yield from self._items(parser.feed(data), where, where, skip)
                yield from self._items(parser.close(), where, where, skip)
                return Rejected(source=self.path, position=f"byte {read_at}", reason=change,
                                detail=f"{self.path} was replaced (inode {inode} → another): "
                                "the new file is read from its start, header included")
            if change == "file_truncated":
                held = read_at - parser.offset
                return Rejected(source=self.path, position=f"byte {read_at}", reason=change,
                                detail=f"{self.path} shrank below byte {read_at} already read: "
                                "it was truncated or rewritten; it is read again from its start"
                                + (f" ({held} bytes of an incomplete chunk are dropped)"
                                   if held else ""))
            if self._idle(since):
                break
            self.stop_event.wait(self.poll_s)
        else:
            return None
        yield from self._items(parser.close(), where, where, skip)
        return None

    def _changed(self, fd: int, st: os.stat_result, read_at: int) -> str | None:
        try:
            now = os.stat(self.path)
        except FileNotFoundError:
            return None  # deleted: keep reading what the writer still appends to it
        if (now.st_ino, now.st_dev) != (st.st_ino, st.st_dev):
            return "file_replaced"
        if os.fstat(fd).st_size < read_at:
            return "file_truncated"
        return None


def follow_stream(path: str | os.PathLike[str], *, run: str | None = None,
                  start_offset: int = 0, poll_s: float = 0.1,
                  idle_timeout_s: float | None = None,
                  stop_event: threading.Event | None = None) -> Iterator[SourceItem]:
    """Tail a growing CrystFEL stream: every crystal as its chunk is completed.

    Parameters
    ----------
    path
        Stream file, named pipe, or ``"-"`` for standard input.
    run
        Run name; default: the file name without ``.stream``.
    start_offset
        Begin at this byte offset (the end of a chunk); the header is read from the file
        start first.
    poll_s, idle_timeout_s, stop_event
        See :class:`StreamFollower`.

    Yields
    ------
    CrystalMessage or Rejected
        Including ``file_truncated`` / ``file_replaced`` records when the file is rewritten.
    """
    start = StreamPosition(offset=start_offset) if start_offset else None
    for item, _ in StreamFollower(path, run=run, start=start, poll_s=poll_s,
                                  idle_timeout_s=idle_timeout_s, stop_event=stop_event):
        if item is not None:
            yield item


# ---------------------------------------------------------------------------- whole files


def file_identity(paths: Sequence[str | os.PathLike[str]]) -> list[list[int]]:
    """``[inode, size, mtime_ns]`` of each file: what a whole-file resume must find again."""
    out = []
    for p in paths:
        st = os.stat(p)
        out.append([st.st_ino, st.st_size, st.st_mtime_ns])
    return out


def whole_file_positions(items: Iterable[SourceItem], files: Sequence[str | os.PathLike[str]],
                         start: dict[str, Any] | None = None, *, source: str = ""
                         ) -> Iterator[tuple[SourceItem | None, dict[str, Any]]]:
    """Resume a finished file (DIALS ``.refl`` + ``.expt``): skip the crystals sent before.

    Parameters
    ----------
    items
        The source's items (deterministic for unchanged files).
    files
        The files the source reads; their inode, size and modification time identify them.
    start
        The saved entry (``{"identity": …, "skip": n}``); None: from the first crystal.
    source
        Name for :class:`Rejected` records.

    Yields
    ------
    (item, entry)
        ``entry`` is the position-file entry to save once ``item`` has been handed on.
    """
    identity = file_identity(files)
    skip = 0
    if start is not None:
        if start.get("identity") == identity:
            skip = int(start.get("skip", 0))
        else:
            yield (Rejected(source=source, position="file", reason="file_replaced",
                            detail=f"{source} changed since the position file was written "
                            "(inode, size or modification time differ): it is sent again from "
                            "its first crystal"), {"identity": identity, "skip": 0})
    k = 0
    for item in items:
        if isinstance(item, CrystalMessage):
            k += 1
            if k <= skip:
                continue
        yield item, {"identity": identity, "skip": max(k, skip)}
    if k < skip:
        log.warning("%s: the position file says %d crystals were sent but the file holds %d",
                    source, skip, k)


# ---------------------------------------------------------------------------- position file


class PositionFile:
    """Where each input of a sender stands, in one JSON file replaced atomically.

    The file maps the absolute path of each input to its entry: for a stream
    ``{"inode", "offset", "skip", "header_end", "line", "check", "sent"}`` (see
    :class:`StreamPosition`), for a whole file ``{"identity", "skip", "sent"}``; ``sent``
    counts the crystals sent from it over every run.  Entries of inputs not read now are kept.

    Parameters
    ----------
    path
        The JSON file (created on the first :meth:`save`).

    Raises
    ------
    ConfigError
        The file exists but is not such a JSON map.
    """

    def __init__(self, path: str | os.PathLike[str]):
        self.path = Path(path)
        self.entries: dict[str, dict[str, Any]] = self._load()

    @staticmethod
    def key(input_path: str | os.PathLike[str]) -> str:
        """The entry name of an input: its absolute path (not resolving links)."""
        return os.path.abspath(os.fspath(input_path))

    def _load(self) -> dict[str, dict[str, Any]]:
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            return {}
        except OSError as exc:
            raise ConfigError(f"position file {self.path}: unreadable ({exc.strerror}); fix "
                              "its permissions or choose another --position-file") from None
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"position file {self.path}: not JSON ({exc}); delete it to send "
                              "every input from its start (the service counts crystals it "
                              "already holds as duplicates)") from None
        if not isinstance(data, dict) or not all(isinstance(v, dict) for v in data.values()):
            raise ConfigError(f"position file {self.path}: expected a map of input path to "
                              "position; delete it to send every input from its start")
        return data

    def get(self, input_path: str | os.PathLike[str]) -> dict[str, Any] | None:
        """The saved entry of an input, or None."""
        return self.entries.get(self.key(input_path))

    def set(self, input_path: str | os.PathLike[str], entry: dict[str, Any]) -> None:
        """Replace an input's entry (in memory; :meth:`save` writes)."""
        self.entries[self.key(input_path)] = entry

    def save(self) -> None:
        """Write every entry: temporary file, fsync, rename over the old file."""
        self.path.parent.mkdir(parents=True, exist_ok=True)

        def write(tmp: Path) -> None:
            with open(tmp, "w") as fh:
                json.dump(self.entries, fh, indent=1, sort_keys=True)

        atomic_write(self.path, write)
