"""The dead-letter file: every rejected message, with why, for people to inspect later.

One JSON object per line::

    {"time": 1717171717.5, "source": "tcp://127.0.0.1:5555", "reason": "missing_key",
     "detail": "required key 'I' is missing; …", "size": 20480,
     "payload_b64": "…", "truncated": false}

``time`` is Unix seconds, ``size`` the full message size in bytes, ``payload_b64`` the first
``max_payload_bytes`` of the message in base64 (``truncated`` says whether that is all of
it).  ``detail``, ``source`` and ``reason`` are cut to at most 2,000, 500 and 64 characters
(``"… [N characters in all]"`` marks a cut), so nothing a message holds is echoed unbounded.  When the file would grow past ``max_file_bytes`` it is renamed to ``<name>.1``
(replacing an older one) and a fresh file is started, so the dead letters of a beamtime take
at most twice that much disk.

Writing never raises: a disk error is logged and counted in :attr:`DeadLetter.write_errors`,
because losing a dead letter must never stop ingest.
"""
from __future__ import annotations

import base64
import json
import logging
import os
import threading
import time
from pathlib import Path
from typing import IO

from streamvi.wire import clip

log = logging.getLogger(__name__)

DEFAULT_MAX_PAYLOAD_BYTES = 1024 * 1024
DEFAULT_MAX_FILE_BYTES = 1024 * 1024 * 1024
#: Longest ``detail``, ``source`` and ``reason`` kept, characters (longer ones are cut, with
#: their full length noted).
MAX_DETAIL_CHARS = 2000
MAX_SOURCE_CHARS = 500
MAX_REASON_CHARS = 64


class DeadLetter:
    """Append-only JSON-lines file of rejected messages; safe to call from any thread.

    Parameters
    ----------
    path
        The file; parent directories are created.
    max_payload_bytes
        Bytes of each message kept (base64-encoded) in its line.
    max_file_bytes
        Size, bytes, at which the file is rotated to ``<path>.1``.
    """

    def __init__(self, path: str | os.PathLike[str], *,
                 max_payload_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES,
                 max_file_bytes: int = DEFAULT_MAX_FILE_BYTES):
        self.path = Path(path)
        self.max_payload_bytes = max(0, int(max_payload_bytes))
        self.max_file_bytes = int(max_file_bytes)
        #: lines written
        self.written = 0
        #: lines lost to disk errors
        self.write_errors = 0
        self._lock = threading.Lock()
        self._file: IO[bytes] | None = None
        self._size = 0
        self._closed = False

    def write(self, *, source: str, reason: str, detail: str,
              payload: bytes | bytearray | memoryview | None = None,
              size: int | None = None) -> bool:
        """Record one rejected message.

        Parameters
        ----------
        source
            Endpoint or file it came from.
        reason
            Short snake_case label (the metrics ``reason``).
        detail
            What was wrong and what to do.
        payload
            The raw message (kept up to ``max_payload_bytes``).
        size
            Its full size in bytes; default ``len(payload)``.

        Returns
        -------
        bool
            Whether the line reached the file.
        """
        raw = b"" if payload is None else bytes(memoryview(payload)[:self.max_payload_bytes])
        full = (0 if payload is None else len(payload)) if size is None else int(size)
        record = {
            "time": time.time(),
            # text built from a message is cut (with its full length noted): the payload's
            # first bytes are kept below, a megabyte-long name needs no second copy
            "source": clip(source, MAX_SOURCE_CHARS),
            "reason": clip(reason, MAX_REASON_CHARS),
            "detail": clip(detail, MAX_DETAIL_CHARS),
            "size": full,
            "payload_b64": base64.b64encode(raw).decode("ascii"),
            "truncated": len(raw) < full,
        }
        line = (json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8")
        with self._lock:
            if self._closed:
                log.error("dead-letter %s: write after close, dropped a %s record from %s",
                          self.path, reason, source)
                self.write_errors += 1
                return False
            try:
                f = self._open_for(len(line))
                f.write(line)
                f.flush()
                self._size += len(line)
                self.written += 1
                return True
            except OSError as exc:
                self.write_errors += 1
                log.error("dead-letter %s: could not write a %s record from %s (%s); ingest "
                          "goes on without it, check the disk", self.path, record["reason"],
                          record["source"], exc)
                self._drop_file()
                return False

    def _open_for(self, nbytes: int) -> IO[bytes]:
        if self._file is not None and self._size > 0 and self._size + nbytes > self.max_file_bytes:
            self._drop_file()
            os.replace(self.path, self.path.with_name(self.path.name + ".1"))
            log.info("dead-letter %s: reached %d bytes, rotated to %s.1", self.path,
                     self._size, self.path.name)
        if self._file is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(self.path, "ab")
            self._size = self._file.tell()
            if self._size > 0 and self._size + nbytes > self.max_file_bytes:
                return self._open_for(nbytes)
        return self._file

    def _drop_file(self) -> None:
        if self._file is not None:
            try:
                self._file.close()
            except OSError:
                pass
            self._file = None

    def close(self) -> None:
        """Close the file; idempotent."""
        with self._lock:
            self._drop_file()
            self._closed = True

    def __enter__(self) -> "DeadLetter":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_dead_letters(path: str | os.PathLike[str]) -> list[dict]:
    """The records of a dead-letter file (for tests and inspection tools)."""
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]
