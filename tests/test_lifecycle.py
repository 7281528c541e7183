"""The life cycle every runner shares (streamvi.service.lifecycle): checkpoints written
atomically and read back with a check, an unusable one set aside; intervals."""
from __future__ import annotations

import os

import pytest
import torch

from streamvi.atomic import atomic_write, sibling_temp_path, stale_temp_files
from streamvi.service.lifecycle import (RANK_KEYS, Checkpoints, Every, checkpoint_problem,
                                        remove_stale_temp_files)

SPACE = {"space_group": "P 1", "cell": [10.0, 11.0, 12.0, 90.0, 90.0, 90.0], "dmin": 2.0,
         "anomalous": False}


def state(**extra):
    return {"engine": {"w": torch.arange(3)}, "counters": {}, "space": dict(SPACE),
            "time": 1.0, **extra}


def test_a_saved_checkpoint_loads_back_and_leaves_no_temporary_file(tmp_path):
    ckpt = Checkpoints(tmp_path / "checkpoint.pt")
    assert ckpt.load() is None                       # none yet
    assert ckpt.save(state()) == tmp_path / "checkpoint.pt"
    assert torch.equal(ckpt.load()["engine"]["w"], torch.arange(3))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt"]


def test_a_failed_save_keeps_the_old_checkpoint(tmp_path, monkeypatch):
    ckpt = Checkpoints(tmp_path / "checkpoint.pt")
    ckpt.save(state(time=1.0))

    def full_disk(obj, f, *a, **k):
        open(f, "wb").write(b"half")
        raise RuntimeError("No space left on device")

    monkeypatch.setattr(torch, "save", full_disk)
    assert ckpt.save(state(time=2.0)) is None
    monkeypatch.undo()
    assert ckpt.load()["time"] == 1.0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt"]


@pytest.mark.parametrize("content", [b"garbage", None])
def test_an_unusable_checkpoint_is_set_aside(tmp_path, content):
    path = tmp_path / "checkpoint.pt"
    if content is None:
        torch.save({"engine": {}, "space": SPACE}, path)     # no counters, no time
    else:
        path.write_bytes(content)
    assert Checkpoints(path).load() is None
    assert not path.exists() and (tmp_path / "checkpoint.corrupt").exists()


def test_a_rank_other_than_0_leaves_the_file_to_rank_0(tmp_path):
    path = tmp_path / "checkpoint.pt"
    path.write_bytes(b"garbage")
    assert Checkpoints(path, required=RANK_KEYS).load(set_aside=False) is None
    assert path.exists()


def test_the_check_sets_aside_what_it_refuses(tmp_path):
    ckpt = Checkpoints(tmp_path / "checkpoint.pt")
    ckpt.save(state())

    def refuse(s):
        raise ValueError("counters of another version")

    assert ckpt.load(check=refuse) is None
    assert (tmp_path / "checkpoint.corrupt").exists()


def test_checkpoint_problem_names_what_is_missing():
    assert checkpoint_problem(state()) is None
    assert checkpoint_problem([1, 2]) == "a list, not a streamvi checkpoint"
    assert "counters" in checkpoint_problem({**state(), "counters": None})
    assert checkpoint_problem({**state(), "counters": None}, RANK_KEYS) is None
    assert "cell" in checkpoint_problem(state(space={**SPACE, "cell": [1, 2]}))


def test_every_comes_back_on_its_interval():
    every = Every(10.0, now=100.0)
    assert not every.due(105.0)
    assert every.due(110.0) and every.next == 120.0
    assert every.due(111.0, force=True) and every.next == 121.0


def test_atomic_write_removes_its_temporary_file_on_failure(tmp_path):
    target = tmp_path / "latest.mtz"
    target.write_text("old")

    def fails(tmp):
        tmp.write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError):
        atomic_write(target, fails)
    assert target.read_text() == "old" and os.listdir(tmp_path) == ["latest.mtz"]
    atomic_write(target, lambda tmp: tmp.write_text("new"))
    assert target.read_text() == "new"


def test_stale_temporary_files_are_found_and_removed(tmp_path):
    for name in ("checkpoint.pt", "latest.mtz", "snapshot-000003.mtz"):
        sibling_temp_path(tmp_path / name).write_text("x")
    (tmp_path / "keep.txt").write_text("x")
    assert len(stale_temp_files(tmp_path)) == 3
    remove_stale_temp_files(tmp_path)
    assert os.listdir(tmp_path) == ["keep.txt"]


def test_a_retired_checkpoint_never_overwrites_an_earlier_one(tmp_path, caplog):
    """dmin 2.0 → 1.8 → 2.0 → 1.8 on one out_dir: each model of the old table is kept."""
    ckpt = Checkpoints(tmp_path / "checkpoint.pt")
    kept = []
    for content in (b"first model", b"second model"):
        (tmp_path / "checkpoint.pt").write_bytes(content)
        kept.append(ckpt.retire("dmin-2.00", "was made for dmin 2.00 Å"))
    assert [p.name for p in kept] == ["checkpoint.dmin-2.00.pt", "checkpoint.dmin-2.00.1.pt"]
    assert [p.read_bytes() for p in kept] == [b"first model", b"second model"]
    assert not ckpt.exists() and "was made for dmin 2.00" in caplog.text
