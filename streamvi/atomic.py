"""Files written whole or not at all: a temporary name beside the target, fsync, rename.

Every file streamvi replaces while others may read it (MTZ files, checkpoints, the sender's
position file) is written here, so a reader never sees half a file and a crash (even
``kill -9``) leaves either the old file or the new one, plus at most a temporary file that
:func:`stale_temp_files` finds again.
"""
from __future__ import annotations

import os
import re
import secrets
from pathlib import Path
from typing import Callable

#: Temporary names left behind when a writer is killed mid-write (see :func:`sibling_temp_path`).
_STALE = re.compile(r"^\.(checkpoint\.pt|checkpoint|latest\.mtz|snapshot-\d{6}\.mtz)\."
                    r".*\.(tmp|link)$|^\.write-test")


def sibling_temp_path(path: str | os.PathLike) -> Path:
    """A fresh temporary name beside ``path``: ``.<name>.<pid>.<random>.tmp``.

    The file is created by whoever writes it, with the permissions the umask allows
    (``tempfile.mkstemp`` makes 0600, which locked the shift crew out of the MTZ files).
    :func:`stale_temp_files` finds these names again after a crash.
    """
    path = Path(path)
    return path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")


def atomic_write(path: str | os.PathLike, write: Callable[[Path], object], *,
                 fsync: bool = True) -> Path:
    """Write ``path`` through ``write(temporary_path)``, then rename it over ``path``.

    Parameters
    ----------
    path
        The file to (re)place.
    write
        Writes the whole content to the path it is given (which does not exist yet).
    fsync
        Force the content to disk before the rename, so that a power cut cannot leave a
        renamed but empty file.

    Returns
    -------
    pathlib.Path
        ``path``.

    Raises
    ------
    Exception
        Whatever ``write`` or the file system raised; the temporary file is removed first.
    """
    path = Path(path)
    tmp = sibling_temp_path(path)
    try:
        write(tmp)
        if fsync:
            with open(tmp, "rb") as fh:
                os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def stale_temp_files(directory: str | os.PathLike) -> list[Path]:
    """Temporary files of ours in ``directory`` (a kill -9 mid-write leaves them)."""
    try:
        return sorted(p for p in Path(directory).iterdir() if _STALE.match(p.name))
    except FileNotFoundError:
        return []
