"""Faults: kill -9 and restart, a torn spool, a garbage checkpoint, a full disk, a producer
that disappears.

The kill -9 test runs the real command line (``python -m streamvi serve``) in a subprocess
with the machinery of benchmarks/kill9_trials.py (which runs 20 and more such trials); the
others run a real :class:`~streamvi.service.service.Service` in-process on loopback sockets, so
their logs can be read with ``caplog``.  Counts are exact.

The counting rules checked (streamvi/ingest/counters.py, streamvi/service/service.py):

- every accepted message is spooled, then counted in ``crystals_received``, except a crystal
  already stored, which is counted as a duplicate without being spooled: across restarts
  each spooled record is counted exactly once, so ``crystals_received`` equals the spool's
  record count plus ``duplicates_not_spooled`` (plus any record that was counted and then
  lost to damage of the spool);
- every received crystal is stored, a duplicate or refused by the store, so
  ``crystals_received == crystals_merged + duplicates + crystals_rejected`` whenever the
  spool is intact;
- the store holds each ``(run, image, crystal)`` once.
"""
from __future__ import annotations

import contextlib
import errno
import importlib.util
import logging
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest
import torch
import zmq
from conftest import REPO, make_crystal

from streamvi.config import load_config
from streamvi.errors import ConfigError
from streamvi.producers.send import send_messages
from streamvi.service.service import Service
from streamvi.wire import encode_crystal


def _load_kill9():
    spec = importlib.util.spec_from_file_location("kill9_trials",
                                                  REPO / "benchmarks" / "kill9_trials.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("kill9_trials", module)
    spec.loader.exec_module(module)
    return module


kill9 = _load_kill9()

CELL = "79.1 79.1 37.9 90 90 90"

#: Floors for the two merges compared at SIGTERM (CC of their F, and each one's CC to the
#: truth).  They are far from equal there, and that is not the crash's doing: two
#: *uninterrupted* runs of this size, stopped after ~100 steps, differ as much (measured
#: with benchmarks/kill9_trials.py: CC to truth 0.27-0.70 among runs, because training
#: interleaves with arrival, threads are unsynchronised and the intensity standardiser is
#: still warming up).  After 400 further deterministic steps uninterrupted runs agree within
#: 0.001 in CC to truth; the benchmark's --converge-steps reports the interrupted runs'
#: figures (docs/operations.md).  Here: the merge after crashes is sound, not garbage.
CC_RUNS_FLOOR = 0.3
CC_TRUTH_FLOOR = 0.2


# ----------------------------------------------------------------------------- helpers


def make_service(out_dir: Path, **overrides) -> Service:
    """A real in-process service on loopback: small model, fast snapshots."""
    values = {"listen": ["tcp://127.0.0.1:*"], "publish_endpoint": "", "metrics_port": -1,
              "out_dir": out_dir, "space_group": "P 43 21 2", "cell": CELL, "dmin": 3.0,
              "device": "cpu", "publish_interval": 0.3, "checkpoint_interval": 3600.0,
              "spool_fsync": "never", "d_model": 16, "n_layers": 1, "mc_samples": 2,
              "batch_images": 4}
    values.update(overrides)
    return Service(load_config(env={}, overrides=values))


@contextlib.contextmanager
def running(out_dir: Path, *, checkpoint: bool = True, **overrides) -> Iterator[Service]:
    svc = make_service(out_dir, **overrides).start()
    try:
        yield svc
    finally:
        svc.stop(checkpoint=checkpoint, publish=False)


def crystals(n: int, seed: int = 0, run: str = "r1") -> list:
    rng = np.random.default_rng(seed)
    return [make_crystal(rng, n=60, run=run, image=f"img{i:04d}", hmax=9) for i in range(n)]


def settle(svc: Service, *, received: int, merged: int, timeout: float = 60.0) -> None:
    """Wait until ``received`` crystals are counted and ``merged`` stored, queue drained."""
    assert svc.wait_until(lambda s: s.counters.snapshot()["crystals_received"] == received
                          and s.crystals_merged == merged and s.ingestor.queue_depth == 0,
                          timeout), svc.status()


def push_frames(url: str, frames: list[bytes], *, linger_ms: int = 10_000,
                context: zmq.Context | None = None) -> None:
    ctx = context or zmq.Context.instance()
    sock = ctx.socket(zmq.PUSH)
    sock.setsockopt(zmq.SNDTIMEO, 10_000)
    sock.connect(url)
    try:
        for f in frames:
            sock.send(f)
    finally:
        sock.close(linger=linger_ms)


# ----------------------------------------------------------------------------- kill -9


@pytest.fixture(scope="module")
def beamtime():
    messages, truth = kill9.simulated_beamtime(60, seed=3)
    return messages, kill9.truth_amplitudes(truth)


def test_kill9_restart_resend_nothing_lost_nothing_doubled(tmp_path, beamtime):
    """Real subprocesses: an uninterrupted run, then one killed twice at random moments
    (while streaming, training or checkpointing) and restarted, the producer resending
    everything after each restart; then compare counts, and the merges."""
    messages, truth_f = beamtime
    steps = 40
    base = kill9.run_trial(tmp_path / "base", messages, kills=0, rng=random.Random(0),
                           steps=steps, rate=60.0, timeout=150.0, truth_f=truth_f)
    assert base["problems"] == [], base
    hit = kill9.run_trial(tmp_path / "hit", messages, kills=2, rng=random.Random(2026),
                          steps=steps, rate=60.0, timeout=150.0, truth_f=truth_f,
                          baseline_f=base["_f"])
    print(f"\nkill -9: {hit['kills']} kills at {hit['kill_at']}; lost {hit['lost']}, "
          f"duplicated {hit['duplicated']}; received {hit['crystals_received']} = merged "
          f"{hit['crystals_merged']} + duplicates {hit['duplicates_counted']}; steps "
          f"{base['final_step']} / {hit['final_step']}; CC(F) vs uninterrupted "
          f"{hit['cc_vs_uninterrupted']}, CC to truth {base['cc_truth']} / {hit['cc_truth']}")
    assert hit["problems"] == [], hit
    assert hit["lost"] == 0 and hit["duplicated"] == 0
    assert hit["stored_images"] == hit["crystals_merged"] == len(messages)
    # resent crystals already stored are counted as duplicates and not spooled
    assert hit["crystals_received"] == hit["spool_records"] + hit["duplicates_not_spooled"]
    assert hit["crystals_received"] == hit["crystals_merged"] + hit["duplicates_counted"]
    assert hit["stray_files"] == [], "temporary files left behind by the crashes"
    assert hit["cc_vs_uninterrupted"] > CC_RUNS_FLOOR
    assert min(hit["cc_truth"], base["cc_truth"]) > CC_TRUTH_FLOOR


# ----------------------------------------------------------------------------- damage


def test_torn_spool_tail_and_garbage_checkpoint_are_survived(tmp_path, caplog):
    """Between runs: cut the spool by a few bytes, then overwrite checkpoint.pt with
    garbage.  The service starts each time, says what it found, and goes on; counts stay
    exact."""
    caplog.set_level(logging.INFO)
    n = 24
    msgs = crystals(n, seed=1)
    frames = [encode_crystal(m) for m in msgs]
    out = tmp_path / "out"

    with running(out) as svc:                       # run 1: everything arrives
        push_frames(svc.ingestor.bound_endpoints[0], frames)
        settle(svc, received=n, merged=n)
    assert (out / "checkpoint.pt").exists()

    # a crash in the middle of an append leaves the last record torn
    segment = sorted((out / "spool").glob("spool-*.svs"))[-1]
    with open(segment, "r+b") as f:
        f.truncate(segment.stat().st_size - 5)
    caplog.clear()
    with running(out) as svc:                       # run 2: the torn record is dropped
        assert svc.spool.torn_records == 1
        assert svc.recovered_from_checkpoint
        assert "torn record" in caplog.text
        assert svc.crystals_merged == n - 1        # the last crystal is gone from the spool
        c = svc.counters.snapshot()
        assert c["crystals_received"] == n          # ... but had been counted
        push_frames(svc.ingestor.bound_endpoints[0], frames)     # the producer resends
        settle(svc, received=2 * n, merged=n)
        c = svc.counters.snapshot()
        assert c["duplicates"] == c["duplicates_not_spooled"] == n - 1
        assert svc.spool.n_records == n          # duplicates are not spooled
        # received − spool records − duplicates not spooled = records counted and then
        # lost to damage (1)
        assert c["crystals_received"] - svc.spool.n_records - c["duplicates_not_spooled"] == 1

    (out / "checkpoint.pt").write_bytes(os.urandom(4096))
    caplog.clear()
    with running(out) as svc:                       # run 3: checkpoint unreadable
        assert not svc.recovered_from_checkpoint
        assert "unreadable" in caplog.text and (out / "checkpoint.corrupt").exists()
        assert any(r.levelno == logging.ERROR and "checkpoint" in r.getMessage()
                   for r in caplog.records)
        # counters rebuilt from the spool alone: every record counted once (the duplicates
        # that were never spooled lived in the checkpoint's counters only)
        c = svc.counters.snapshot()
        assert c["crystals_received"] == svc.spool.n_records == n
        assert svc.crystals_merged == n and svc.duplicates == 0
        assert c["crystals_received"] == svc.crystals_merged + c["duplicates"]
        push_frames(svc.ingestor.bound_endpoints[0], frames[:5])
        settle(svc, received=n + 5, merged=n)
        assert svc.counters.snapshot()["duplicates"] == 5
        # and it trains and publishes as before
        steps = svc.status()["steps"]
        assert svc.wait_until(lambda s: s.status()["steps"] > steps + 3
                              and s.mtz.n_written > 0, 30)
        assert svc.engine.store.n_images == n


# ----------------------------------------------------------------------------- disk full


def _mount_tmpfs(path: Path, size: str) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return False
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                         capture_output=True, timeout=10)
    return res.returncode == 0


def _umount(path: Path) -> None:
    if subprocess.run(["umount", str(path)], capture_output=True, timeout=10).returncode:
        subprocess.run(["umount", "-l", str(path)], capture_output=True, timeout=10)


def _fill(path: Path) -> None:
    """Write ``path`` until the file system says it is full."""
    chunk = b"\0" * 65536
    with open(path, "wb", buffering=0) as f:
        with contextlib.suppress(OSError):
            while True:
                f.write(chunk)
    with open(path, "ab", buffering=0) as f:
        with contextlib.suppress(OSError):
            while True:
                f.write(b"\0" * 512)


@contextlib.contextmanager
def full_output_directory(tmp_path: Path, kind: str, monkeypatch
                          ) -> Iterator[tuple[Path, object]]:
    """An output directory whose disk is full, except for the spool; yields the directory
    and a function that frees the disk.

    ``tmpfs``: a 4 MiB tmpfs filled to the last byte, with a roomy tmpfs mounted on its
    ``spool/`` (needs root; skipped otherwise).  ``patched``: writes of MTZ files and
    checkpoints fail with ENOSPC (monkeypatched)."""
    out = tmp_path / "out"
    if kind == "tmpfs":
        if not _mount_tmpfs(out, "4m"):
            pytest.skip("cannot mount a tmpfs here (needs root)")
        try:
            if not _mount_tmpfs(out / "spool", "32m"):
                pytest.skip("cannot mount a second tmpfs")
            filler = out / "filler"
            _fill(filler)
            yield out, filler.unlink
        finally:
            _umount(out / "spool")
            _umount(out)
        return
    full = {"on": True}

    import streamvi.publish.mtz_files as snapshots

    real_mtz = snapshots.write_snapshot_mtz
    real_save = torch.save          # what the checkpoints (streamvi.service.lifecycle) call

    def mtz_no_space(*args, **kwargs):
        if full["on"]:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_mtz(*args, **kwargs)

    def save_no_space(*args, **kwargs):
        if full["on"]:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_save(*args, **kwargs)

    monkeypatch.setattr(snapshots, "write_snapshot_mtz", mtz_no_space)
    monkeypatch.setattr(torch, "save", save_no_space)
    yield out, lambda: full.update(on=False)


@pytest.mark.parametrize("kind", ["tmpfs", "patched"])
def test_disk_full_publishing_fails_loudly_training_and_ingest_go_on(tmp_path, kind, caplog,
                                                                      monkeypatch):
    caplog.set_level(logging.INFO)
    n = 40
    frames = [encode_crystal(m) for m in crystals(n, seed=2)]
    with full_output_directory(tmp_path, kind, monkeypatch) as (out, free_disk):
        svc = make_service(out, publish_interval=0.2, checkpoint_interval=0.5)
        svc.start()
        try:
            push_frames(svc.ingestor.bound_endpoints[0], frames)
            settle(svc, received=n, merged=n)          # ingest goes on
            steps0 = svc.status()["steps"]
            assert svc.wait_until(lambda s: s.mtz.n_errors >= 3 and s.status()["steps"]
                                  > steps0 + 5, 60), svc.status()   # training goes on
            st = svc.status()
            assert st["mtz_written"] == 0 and st["mtz_errors"] >= 3
            assert "could not write MTZ snapshot" in caplog.text
            errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
            assert any("MTZ snapshot" in m for m in errors)
            assert any(m.startswith("checkpoint") and "failed" in m for m in errors)
            assert not any("training loop error" in m for m in errors), errors
            if kind == "patched":
                assert any("No space left" in m for m in errors)
            assert svc.metrics_server is None
            # space comes back: the next snapshot is written, with everything in it
            free_disk()
            assert svc.wait_until(lambda s: s.mtz.n_written >= 1, 30), svc.status()
            assert (out / "latest.mtz").exists()
            assert svc.wait_until(lambda s: (out / "checkpoint.pt").exists(), 30)
            assert svc.counters.snapshot()["crystals_received"] == n
        finally:
            svc.stop(checkpoint=False, publish=False)
        # after the stop: while it runs, a snapshot being written has its temporary file
        # (which made this check fail now and then when it was made in the loop)
        stray = [p.name for p in out.iterdir() if p.name.startswith(".")]
        assert stray == [], f"temporary files left behind: {stray}"


# ----------------------------------------------------------------------------- producer


def test_producer_disappears_and_comes_back(tmp_path):
    """A producer closes its socket mid-stream and reconnects from a new context: with a
    linger the messages it had queued are delivered, counts exact; closed abruptly (linger
    0) some in flight are lost, and resending everything restores exactly the unique set."""
    n = 60
    frames = [encode_crystal(m) for m in crystals(n, seed=4)]
    with running(tmp_path / "out", checkpoint=False) as svc:
        url = svc.ingestor.bound_endpoints[0]
        ctx1 = zmq.Context()
        push_frames(url, frames[:25], linger_ms=10_000, context=ctx1)   # graceful goodbye
        ctx1.term()
        ctx2 = zmq.Context()
        push_frames(url, frames[25:], context=ctx2)                       # comes back
        ctx2.term()
        settle(svc, received=n, merged=n)
        c = svc.counters.snapshot()
        assert c["duplicates"] == 0 and c["messages_received"] == n

        # abrupt: queue everything, vanish without waiting for delivery
        ctx3 = zmq.Context()
        push_frames(url, frames, linger_ms=0, context=ctx3)
        ctx3.term()
        time.sleep(0.5)
        delivered = svc.counters.snapshot()["crystals_received"] - n
        assert 0 <= delivered <= n
        report = send_messages(iter(crystals(n, seed=4)), url, timeout_s=10)  # resend all
        assert report.sent == n
        settle(svc, received=n + delivered + n, merged=n)
        c = svc.counters.snapshot()
        assert c["duplicates"] == delivered + n
        assert c["crystals_received"] == svc.crystals_merged + c["duplicates"]
        assert svc.engine.store.n_images == n
        assert sorted(k[1] for k in svc.engine.store.keys) == [f"img{i:04d}" for i in range(n)]


# ----------------------------------------------------------------------------- issue 18, item 7


def test_a_checkpoint_without_its_spool_is_refused_not_overwritten(tmp_path):
    """A missing spool beside a trained model: refuse to start, naming both paths and the
    two ways out, instead of training a fresh model over it."""
    out = tmp_path / "out"
    frames = [encode_crystal(m) for m in crystals(16, seed=5)]
    with running(out) as svc:
        push_frames(svc.ingestor.bound_endpoints[0], frames)
        settle(svc, received=16, merged=16)
    before = (out / "checkpoint.pt").read_bytes()
    shutil.rmtree(out / "spool")
    with pytest.raises(ConfigError) as err:
        make_service(out)
    text = str(err.value)
    assert str(out / "checkpoint.pt") in text and str(out / "spool") in text
    assert "Restore the spool" in text and "move the checkpoint aside" in text
    assert "\n" not in text
    assert (out / "checkpoint.pt").read_bytes() == before
    # and the command line says it in one line, exit status 2
    from streamvi.cli.main import main

    assert main(["serve", "--out-dir", str(out), "--space-group", "P 43 21 2", "--cell", CELL,
                 "--listen", "tcp://127.0.0.1:*", "--metrics-port", "-1",
                 "--publish-endpoint", ""]) == 2
    # moved aside: a fresh start
    (out / "checkpoint.pt").rename(out / "checkpoint.pt.old")
    with running(out) as svc:
        assert not svc.recovered_from_checkpoint


@pytest.mark.parametrize("content", ["a list", "no engine", "wrong engine", "bad counters",
                                     "bad space"])
def test_a_checkpoint_torch_reads_but_of_the_wrong_shape_is_set_aside(tmp_path, caplog, content):
    """As the docs promise for unreadable ones: moved to checkpoint.corrupt, logged at
    ERROR, a fresh start from the spool with every record counted once."""
    import torch

    caplog.set_level(logging.INFO)
    out = tmp_path / "out"
    n = 16
    frames = [encode_crystal(m) for m in crystals(n, seed=6)]
    with running(out) as svc:
        push_frames(svc.ingestor.bound_endpoints[0], frames)
        settle(svc, received=n, merged=n)
    good = torch.load(out / "checkpoint.pt", weights_only=True)
    bad = {"a list": [1, 2, 3],
           "no engine": {k: v for k, v in good.items() if k != "engine"},
           "wrong engine": dict(good, engine={"trainer": {"nonsense": torch.zeros(3)}}),
           "bad counters": dict(good, counters={"version": 99}),
           "bad space": dict(good, space={"cell": "big"})}[content]
    torch.save(bad, out / "checkpoint.pt")
    caplog.clear()
    with running(out) as svc:
        assert not svc.recovered_from_checkpoint
        assert (out / "checkpoint.corrupt").exists()
        assert any(r.levelno == logging.ERROR and "unreadable" in r.getMessage()
                   for r in caplog.records)
        c = svc.counters.snapshot()
        assert c["crystals_received"] == svc.spool.n_records == n
        assert svc.crystals_merged == n
        steps = svc.status()["steps"]
        assert svc.wait_until(lambda s: s.status()["steps"] > steps + 3, 30)


def test_temporary_files_of_an_interrupted_write_are_removed_at_start(tmp_path):
    """kill -9 in the middle of a checkpoint or an MTZ write leaves a temporary file; the
    next start removes it (and nothing else)."""
    out = tmp_path / "out"
    with running(out) as svc:
        push_frames(svc.ingestor.bound_endpoints[0],
                    [encode_crystal(m) for m in crystals(16, seed=7)])
        settle(svc, received=16, merged=16)
    stale = [".checkpoint.pt.4242.0a1b2c3d.tmp", ".checkpoint.x1y2z3.tmp",
             ".snapshot-000007.mtz.4242.99aa88bb.tmp", ".latest.mtz.4242.1234abcd.tmp",
             ".latest.mtz.4242.link"]
    for name in stale:
        (out / name).write_bytes(b"half a file")
    keep = [out / ".hidden-notes", out / "notes.tmp"]
    for p in keep:
        p.write_text("mine")
    with running(out):
        left = {p.name for p in out.iterdir()}
    assert not left & set(stale), left & set(stale)
    assert all(p.exists() for p in keep)


def test_a_killed_checkpoint_write_leaves_only_a_file_the_next_start_removes(tmp_path):
    """The real thing: SIGKILL a service subprocess while it writes checkpoints and MTZ
    files as often as it can; whatever temporary file it leaves is gone after a restart."""
    out = tmp_path / "out"
    messages, _ = kill9.simulated_beamtime(40, seed=8)
    found = set()
    for attempt in range(2):
        proc = subprocess.Popen(
            [sys.executable, "-m", "streamvi", "serve", "--out-dir", str(out),
             "--space-group", "P 43 21 2", "--cell", CELL, "--dmin", "3.0",
             "--listen", "tcp://127.0.0.1:*", "--metrics-port", "-1",
             "--publish-endpoint", "", "--checkpoint-interval", "0.01",
             "--publish-interval", "0.01", "--device", "cpu", "--consensus-wait", "0"],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        try:
            url = __import__("json").loads(proc.stdout.readline())["listening"][0]
            send_messages(iter(messages), url, timeout_s=30)
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and not (out / "checkpoint.pt").exists():
                time.sleep(0.05)
            time.sleep(0.5 + 0.3 * attempt)
        finally:
            proc.kill()
            proc.wait(timeout=30)
        found |= {p.name for p in out.iterdir() if p.name.startswith(".")}
    svc = make_service(out, consensus_wait=0.0)
    try:
        assert not [p.name for p in out.iterdir() if p.name.startswith(".")]
    finally:
        svc.spool.close()
    print(f"\ntemporary files seen after the kills: {sorted(found) or 'none'}")
