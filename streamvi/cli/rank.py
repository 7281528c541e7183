"""``python -m streamvi.cli.rank JOB.json``: one data-parallel rank started by ``torchrun``.

The command line of a rank (docs/performance.md, "Scale-out"): it reads the job file and
the process group from the environment, and runs :func:`streamvi.service.rank.run_rank`.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Sequence

import torch
import torch.distributed as dist

from streamvi.merging.engine import EngineConfig
from streamvi.merging.trainer import TrainerConfig
from streamvi.service.rank import run_rank


def main_from_env(argv: Sequence[str] | None = None) -> None:
    """``python -m streamvi.cli.rank JOB.json``: one rank started by ``torchrun``.

    Reads ``RANK``/``WORLD_SIZE`` (and ``MASTER_ADDR``/``MASTER_PORT``) from the environment
    and the job from a JSON file: ``endpoints``, ``space`` (``space_group``, ``cell``,
    ``dmin``, ``anomalous``), ``out_dir`` and optionally ``trainer`` and ``engine`` (fields of
    :class:`TrainerConfig`/:class:`EngineConfig`) and any keyword of
    :func:`~streamvi.service.rank.run_rank`.
    Prints the rank's :class:`~streamvi.service.rank.RankResult` as one JSON line.
    """
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 1:
        raise SystemExit("usage: torchrun --nproc-per-node N -m streamvi.cli.rank JOB.json")
    job = json.loads(Path(args[0]).read_text())
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    tcfg = TrainerConfig(**job.pop("trainer", {}))
    if tcfg.device in ("auto", "cuda") and torch.cuda.is_available():
        tcfg.device = f"cuda:{int(os.environ.get('LOCAL_RANK', rank)) % torch.cuda.device_count()}"
    ecfg = EngineConfig(**job.pop("engine", {}))
    result = run_rank(rank, world, trainer_config=tcfg, engine_config=ecfg, **job)
    print(json.dumps(result.to_dict()), flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main_from_env()
