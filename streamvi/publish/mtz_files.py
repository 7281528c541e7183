"""``latest.mtz`` plus numbered snapshots (keep the last K) in the output directory; with a
``tag`` (a pump–probe condition, or a light-minus-dark difference) ``latest-<tag>.mtz`` and
``snapshot-<tag>-NNNNNN.mtz``."""
from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Callable

from streamvi.publish.mtz import InfoSource, safe_name, write_snapshot_mtz

log = logging.getLogger(__name__)

SNAPSHOT_RE = re.compile(r"^snapshot-(\d{6})\.mtz$")


class MtzSnapshots:
    """Writes each snapshot as ``snapshot-NNNNNN.mtz`` and points ``latest.mtz`` at it.

    ``latest.mtz`` is replaced atomically (a hard link to the numbered file renamed over it,
    or a second atomic write where links are not supported), so readers always find a
    complete file.  Every path is built here from the output directory and a counter:
    nothing from the network names a file.
    """

    def __init__(self, out_dir: str | os.PathLike, *, keep: int = 5,
                 info: InfoSource | None = None, tag: str | None = None):
        self.out_dir = Path(out_dir)
        self.keep = max(1, int(keep))
        #: asked at each write for the names and wavelength the files carry
        self.info = info
        # a tag is a name the operator configured, made safe for a file name here
        self._stem = "" if tag is None else f"-{safe_name(tag)}"
        self._numbered_re = (SNAPSHOT_RE if tag is None else
                             re.compile(rf"^snapshot{re.escape(self._stem)}-(\d{{6}})\.mtz$"))
        self.latest = self.out_dir / f"latest{self._stem}.mtz"
        self.n_written = 0
        self.n_errors = 0
        self.last_error: str | None = None

    def write(self, snapshot, *, writer: Callable[..., object] | None = None) -> Path | None:
        """Write ``snapshot``; on failure (disk full, permissions) log, count, return None.

        ``writer(path, info=...)`` writes the file instead of :func:`write_snapshot_mtz`
        (e.g. a difference of two snapshots); ``snapshot`` then only numbers it."""
        numbered = self.out_dir / f"snapshot{self._stem}-{snapshot.snapshot_id:06d}.mtz"
        tmp = self.out_dir / f".latest{self._stem}.mtz.{os.getpid()}.link"
        if writer is None:
            def writer(path, *, info):
                return write_snapshot_mtz(snapshot, path, info=info)
        try:
            info = self.info() if self.info is not None else None
            writer(numbered, info=info)
            try:
                tmp.unlink(missing_ok=True)
                os.link(numbered, tmp)
                os.replace(tmp, self.latest)
            except OSError:
                tmp.unlink(missing_ok=True)
                writer(self.latest, info=info)
            self._prune()
        except Exception as exc:  # publishing must never stop training
            self.n_errors += 1
            self.last_error = f"{numbered}: {exc}"
            log.error("could not write MTZ snapshot %s: %s (training and ingest go on)",
                      numbered, exc)
            return None
        self.n_written += 1
        return numbered

    def _prune(self) -> None:
        found = sorted(p for p in self.out_dir.iterdir() if self._numbered_re.match(p.name))
        for old in found[: max(0, len(found) - self.keep)]:
            try:
                old.unlink()
            except OSError as exc:
                log.warning("could not remove old snapshot %s: %s", old, exc)
