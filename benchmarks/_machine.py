"""Where a benchmark ran: the CPU model and core count, and the streamvi commit measured."""
from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path


def cpu_model() -> str:
    """The CPU's model name (from /proc/cpuinfo where there is one)."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return cpu


def machine_name() -> str:
    """``"<CPU model>, <n> cores"``."""
    return f"{cpu_model()}, {os.cpu_count()} cores"


def streamvi_commit() -> str:
    """The commit of the streamvi being measured (the package imported, not the script).

    ``$STREAMVI_COMMIT`` where that package is not in a git checkout (e.g. a ``git archive``
    snapshot put first on ``PYTHONPATH`` so a benchmark runs on a fixed commit).
    """
    import streamvi

    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, cwd=Path(streamvi.__file__).parent, check=False)
    except OSError:
        out = None
    if out is not None and out.returncode == 0:
        return out.stdout.strip()
    return os.environ.get("STREAMVI_COMMIT", "")
