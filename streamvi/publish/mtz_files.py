"""``latest.mtz`` plus numbered snapshots (keep the last K) in the output directory."""
from __future__ import annotations

import logging
import os
import re
from pathlib import Path

from streamvi.publish.mtz import InfoSource, write_snapshot_mtz

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
                 info: InfoSource | None = None):
        self.out_dir = Path(out_dir)
        self.keep = max(1, int(keep))
        #: asked at each write for the names and wavelength the files carry
        self.info = info
        self.latest = self.out_dir / "latest.mtz"
        self.n_written = 0
        self.n_errors = 0
        self.last_error: str | None = None

    def write(self, snapshot) -> Path | None:
        """Write ``snapshot``; on failure (disk full, permissions) log, count, return None."""
        numbered = self.out_dir / f"snapshot-{snapshot.snapshot_id:06d}.mtz"
        tmp = self.out_dir / f".latest.mtz.{os.getpid()}.link"
        try:
            info = self.info() if self.info is not None else None
            write_snapshot_mtz(snapshot, numbered, info=info)
            try:
                tmp.unlink(missing_ok=True)
                os.link(numbered, tmp)
                os.replace(tmp, self.latest)
            except OSError:
                tmp.unlink(missing_ok=True)
                write_snapshot_mtz(snapshot, self.latest, info=info)
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
        found = sorted(p for p in self.out_dir.iterdir() if SNAPSHOT_RE.match(p.name))
        for old in found[: max(0, len(found) - self.keep)]:
            try:
                old.unlink()
            except OSError as exc:
                log.warning("could not remove old snapshot %s: %s", old, exc)
