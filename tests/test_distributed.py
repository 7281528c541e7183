"""Data-parallel training: 2 CPU ranks (gloo over loopback TCP) in real processes.

- the same fixed data split between 2 ranks vs one process on all of it with the same global
  batch: parameters and optimiser states bit-identical across ranks, the combined gradients
  equal to the reflection-weighted mean of the ranks' own, global store statistics equal to
  the single process's, and merged amplitudes that agree with the single process's;
- a producer's PUSH fan-out into 2 ranks (:func:`streamvi.service.rank.run_rank`): every
  crystal lands on exactly one rank, the ranks train together, rank 0 publishes an MTZ
  holding everybody's observations and a checkpoint that a restart resumes from.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from streamvi.merging.distributed import DistributedEngine, free_port, init_process_group
from streamvi.producers.fanout import FanOut
from streamvi.service.partiality import PartialitySwitch
from streamvi.service.rank import run_rank
from streamvi.merging.engine import EngineConfig, MergeEngine
from streamvi.symmetry import ReciprocalSpace
from streamvi.merging.trainer import TrainerConfig
from streamvi.wire import decode_crystal, encode_crystal

WORLD = 2
N_IMAGES = 48
GLOBAL_BATCH = N_IMAGES      # every step sees every image: 2 ranks × 24 vs 1 × 48
N_STEPS = 80
TRAINER = dict(d_model=16, n_layers=2, mc_samples=8, device="cpu", seed=3,
               warmup_reflections=4000)
# measured with seeds 1-5: CC(F, 2 ranks vs 1 process) 0.9994-0.9995 on this set (the same
# data every step; with 8 of the 48 images per step the batch order alone makes two
# single-process runs agree to only ≈ 0.976)
CC_MIN = 0.998


@pytest.fixture(scope="module")
def simulated():
    """48 simulated still shots to 3 Å (about 300 reflections each), encoded."""
    from streamvi_sim import SimulationConfig, simulate_images, simulate_structure

    cfg = SimulationConfig(n_images=N_IMAGES, seed=11, dmin=3.0)
    truth = simulate_structure(cfg)
    payloads = [encode_crystal(m) for m in simulate_images(cfg, truth)]
    space = ReciprocalSpace(cfg.space_group, cfg.cell, cfg.dmin, anomalous=False)
    return payloads, space.to_dict()


def _spawn(fn, args: tuple, timeout_s: float) -> None:
    """Run ``fn(rank, *args)`` in WORLD fresh processes; fail on error or timeout.

    ``args[0]`` is the rendezvous port, free a moment before the ranks bind it: if another
    process took it in between (EADDRINUSE, before any rank did any work), once more on a
    fresh port; any other error fails at once."""
    for attempt in (1, 2):
        ctx = mp.start_processes(fn, args=args, nprocs=WORLD, join=False, start_method="spawn")
        deadline = time.monotonic() + timeout_s
        try:
            while not ctx.join(timeout=0.5):
                if time.monotonic() > deadline:
                    pytest.fail(f"ranks still running after {timeout_s:g} s")
            return
        except mp.ProcessRaisedException as exc:
            if attempt == 2 or "EADDRINUSE" not in str(exc):
                raise
            args = (free_port(), *args[1:])
        finally:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()


# ---------------------------------------------------------------------- same data, 2 vs 1


def _train_rank(rank: int, port: int, payloads: list[bytes], space: dict, out: str) -> None:
    torch.set_num_threads(1)
    init_process_group(rank, WORLD, init_method=f"tcp://127.0.0.1:{port}", backend="gloo")
    try:
        engine = DistributedEngine(ReciprocalSpace.from_dict(space), TrainerConfig(**TRAINER),
                                   EngineConfig(batch_images=GLOBAL_BATCH // WORLD))
        for raw in payloads[rank::WORLD]:          # deterministic split: image i → rank i % 2
            engine.add(decode_crystal(raw))
        trainer = engine.trainer
        dense = list(trainer.model.scale_model.parameters())
        post = trainer.model.posterior.weight
        first: dict = {}
        reduce = trainer._reduce_gradients

        def capture() -> None:     # the first step's gradients, before and after combining
            if not first:
                first["n"] = trainer._local_reflections
                first["dense"] = [p.grad.clone() for p in dense]
                first["sparse"] = post.grad.coalesce().clone()
            reduce()
            if "dense_reduced" not in first:
                first["dense_reduced"] = [p.grad.clone() for p in dense]
                first["sparse_reduced"] = post.grad.clone()

        trainer._reduce_gradients = capture
        engine.train(N_STEPS)
        snap = engine.snapshot()
        torch.save({"model": trainer.model.state_dict(),
                    "scale_opt": trainer.scale_optimizer.state_dict(),
                    "post_opt": trainer.posterior_optimizer.state_dict(),
                    "step": trainer.step, "frozen": trainer.standardizer.is_frozen,
                    "obs_count": engine.store.obs_count.copy(), "sum_i": engine.store.sum_i,
                    "F": snap.tables["all"]["F"], "n_images": snap.n_images, "first": first},
                   Path(out) / f"rank{rank}.pt")
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _assert_same(a, b, where: str) -> None:
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            _assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def test_two_ranks_match_one_process(simulated, tmp_path):
    payloads, space = simulated
    t0 = time.monotonic()
    _spawn(_train_rank, (free_port(), payloads, space, str(tmp_path)), timeout_s=120)
    r0 = torch.load(tmp_path / "rank0.pt", weights_only=False)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=False)
    assert r0["step"] == r1["step"] == N_STEPS
    # every rank holds exactly the same model and optimiser state
    _assert_same(r0["model"], r1["model"], "model")
    _assert_same(r0["scale_opt"]["state"], r1["scale_opt"]["state"], "scale_opt")
    _assert_same(r0["post_opt"]["state"], r1["post_opt"]["state"], "post_opt")
    assert r0["frozen"] and r1["frozen"]      # the standardiser froze on both, identically

    # combined gradient = reflection-weighted mean of the ranks' own (first step)
    f0, f1 = r0["first"], r1["first"]
    n0, n1 = f0["n"], f1["n"]
    for g0, g1, red0, red1 in zip(f0["dense"], f1["dense"], f0["dense_reduced"],
                                  f1["dense_reduced"]):
        assert torch.equal(red0, red1)
        torch.testing.assert_close(red0, (n0 * g0 + n1 * g1) / (n0 + n1), rtol=1e-5, atol=1e-9)
    s0, s1 = f0["sparse"], f1["sparse"]
    red = f0["sparse_reduced"]
    assert red.is_sparse and torch.equal(red.to_dense(), f1["sparse_reduced"].to_dense())
    expected = (n0 * s0.to_dense() + n1 * s1.to_dense()) / (n0 + n1)
    torch.testing.assert_close(red.to_dense(), expected, rtol=1e-5, atol=1e-9)
    rows = set(s0.indices()[0].tolist()) | set(s1.indices()[0].tolist())
    assert set(red.coalesce().indices()[0].tolist()) == rows     # only the union of rows
    assert rows - set(s0.indices()[0].tolist())                  # rank 0 got rank 1's rows
    seconds_2 = time.monotonic() - t0

    # one process, all the data, the same global batch
    threads = torch.get_num_threads()
    torch.set_num_threads(1)      # as the ranks; spinning OpenMP threads crawl on a busy host
    try:
        single = MergeEngine(ReciprocalSpace.from_dict(space), TrainerConfig(**TRAINER),
                             EngineConfig(batch_images=GLOBAL_BATCH))
        for raw in payloads:
            single.add(decode_crystal(raw))
        single.train(N_STEPS)
        ref = single.snapshot()
    finally:
        torch.set_num_threads(threads)
    np.testing.assert_array_equal(r0["obs_count"], single.store.obs_count)  # global statistics
    np.testing.assert_allclose(r0["sum_i"], single.store.sum_i, rtol=1e-9)
    assert r0["n_images"] == N_IMAGES
    seen = single.store.obs_count[0] > 0
    cc = np.corrcoef(r0["F"][seen], ref.tables["all"]["F"][seen])[0, 1]
    print(f"\nCC(F, 2 ranks vs 1 process) = {cc:.4f} over {seen.sum()} rows; "
          f"2-rank run {seconds_2:.1f} s")
    assert cc >= CC_MIN


def _stream_rank(rank: int, port: int, payloads: list[bytes], space: dict, out: str) -> None:
    """Images arrive after the Wilson prior is set, with ``data_start`` on."""
    torch.set_num_threads(1)
    init_process_group(rank, WORLD, init_method=f"tcp://127.0.0.1:{port}", backend="gloo")
    try:
        engine = DistributedEngine(ReciprocalSpace.from_dict(space), TrainerConfig(**TRAINER),
                                   EngineConfig(batch_images=4, wilson_min_images=8,
                                                data_start=True))
        mine = payloads[rank::WORLD]
        for raw in mine[:6]:
            engine.add(decode_crystal(raw))
        engine.train(4)                       # Σ is set from the first 12 images
        for raw in mine[6:]:                  # each rank sees rows new to it
            engine.add(decode_crystal(raw))
        engine.train(4)
        torch.save({"stage": engine.sigma_stage,
                    "weight": engine.trainer.model.posterior.weight.detach().clone()},
                   Path(out) / f"stream{rank}.pt")
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_ranks_keep_the_same_rows_when_new_ones_arrive_with_data_start(simulated, tmp_path):
    """A rank must not start the rows its own new images reach from its own sums: every
    rank holds the same posterior, and the others would not follow."""
    payloads, space = simulated
    _spawn(_stream_rank, (free_port(), payloads, space, str(tmp_path)), timeout_s=120)
    r0 = torch.load(tmp_path / "stream0.pt", weights_only=False)
    r1 = torch.load(tmp_path / "stream1.pt", weights_only=False)
    assert r0["stage"] >= 1 and r1["stage"] >= 1
    assert torch.equal(r0["weight"], r1["weight"])


# ---------------------------------------------------------------------- ZeroMQ fan-out


def _serve_rank(rank: int, port: int, endpoint: str, space: dict, out: str, n: int,
                min_visits: int = 2) -> None:
    result = run_rank(rank, WORLD, endpoints=[endpoint], space=space, out_dir=out,
                      init_method=f"tcp://127.0.0.1:{port}", backend="gloo",
                      trainer_config=TrainerConfig(**TRAINER),
                      engine_config=EngineConfig(batch_images=4), expected_crystals=n,
                      min_visits=min_visits, max_seconds=90, publish_interval=0.5, threads=1,
                      keep_keys=True)
    Path(out, f"result{rank}.json").write_text(json.dumps(result.to_dict()))
    dist.destroy_process_group()


def _fan_out(payloads: list[bytes], space: dict, out, *, min_visits: int,
             timeout_s: float = 150) -> str:
    """Deal ``payloads`` over a producer's PUSH fan-out to WORLD ranks of
    :func:`_serve_rank` (they stop once all were received and visited ``min_visits``
    times); returns the fan-out's endpoint (closed by then: a restart's ranks wait for
    nothing)."""
    with FanOut("tcp://127.0.0.1:*") as fan:
        ctx = mp.start_processes(
            _serve_rank, args=(free_port(), fan.endpoint, space, str(out), len(payloads),
                               min_visits),
            nprocs=WORLD, join=False, start_method="spawn")
        try:
            fan.wait_for_peers(WORLD, timeout_s=60)
            assert fan.send_all(payloads, rate=400) == len(payloads)
            deadline = time.monotonic() + timeout_s
            while not ctx.join(timeout=0.5):
                assert time.monotonic() < deadline, "ranks did not finish"
        finally:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
    return fan.endpoint


def test_fan_out_to_two_ranks(simulated, tmp_path):
    import reciprocalspaceship as rs

    payloads, space = simulated
    # a table to 3.2 Å for spots to 3.0 Å: what arrives beyond it is counted per rank
    space = {**space, "dmin": 3.2}
    messages = [decode_crystal(p) for p in payloads]
    sent_keys = {f"{m.run}/{m.image}/{m.crystal}" for m in messages}
    endpoint = _fan_out(payloads, space, tmp_path, min_visits=2)
    res = [json.loads((tmp_path / f"result{r}.json").read_text()) for r in range(WORLD)]
    keys = [set(r["keys"]) for r in res]
    # nothing lost, nothing twice, and round robin gave each rank half
    assert keys[0] | keys[1] == sent_keys
    assert not keys[0] & keys[1]
    assert [r["crystals_received"] for r in res] == [len(k) for k in keys]
    assert abs(len(keys[0]) - len(keys[1])) <= 2, [len(k) for k in keys]
    # each rank's record of what arrived beyond the table: gemmi's count over its crystals
    table = ReciprocalSpace.from_dict(space)
    beyond = {f"{m.run}/{m.image}/{m.crystal}": int(np.sum(
        table.cell.calculate_d_array(m.hkl().astype(np.int32)) < table.dmin)) for m in messages}
    assert [r["beyond_dmin"]["reflections"] for r in res] == [
        sum(beyond[k] for k in kk) for kk in keys]
    assert all(r["beyond_dmin"]["reflections"] > 0
               and 2.95 <= r["beyond_dmin"]["suggested_dmin"] < 3.2 for r in res)
    assert all(r["beyond_dmin"]["dmin"] == pytest.approx(table.dmin) for r in res)
    # trained together, in lock-step, every image visited twice
    assert res[0]["steps"] == res[1]["steps"] > 0
    assert all(r["visits_min"] >= 2 and r["global_images"] == len(payloads) for r in res)
    # rank 0 published everybody's observations
    mtz = rs.read_mtz(str(tmp_path / "latest.mtz"))
    assert int(mtz["N"].sum()) == sum(r["reflections_stored"] for r in res)
    assert (tmp_path / "checkpoint.pt").exists()
    assert not (tmp_path / "rank1" / "latest.mtz").exists()

    # a restart resumes: each rank replays its own spool, all load rank 0's checkpoint
    saved = torch.load(tmp_path / "checkpoint.pt", weights_only=False)
    assert saved["engine"]["trainer"]["step"] == res[0]["steps"]
    _spawn(_serve_rank, (free_port(), endpoint, space, str(tmp_path), len(payloads)),
           timeout_s=120)
    again = [json.loads((tmp_path / f"result{r}.json").read_text()) for r in range(WORLD)]
    assert [set(r["keys"]) for r in again] == keys
    assert again[0]["steps"] == again[1]["steps"] > res[0]["steps"]
    assert all(r["global_images"] == len(payloads) for r in again)

    # the ranks share the service's checkpoint handling: an unreadable checkpoint is set
    # aside by rank 0 and every rank starts afresh from its spool (not a crash)
    (tmp_path / "checkpoint.pt").write_bytes(b"not a checkpoint")
    _spawn(_serve_rank, (free_port(), endpoint, space, str(tmp_path), len(payloads)),
           timeout_s=120)
    fresh = [json.loads((tmp_path / f"result{r}.json").read_text()) for r in range(WORLD)]
    assert (tmp_path / "checkpoint.corrupt").read_bytes() == b"not a checkpoint"
    assert [set(r["keys"]) for r in fresh] == keys
    assert fresh[0]["steps"] == fresh[1]["steps"] > 0
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=False)["engine"]["trainer"][
        "step"] == fresh[0]["steps"]


# ---------------------------------------------------------------------- partiality check

# CrystFEL partial_sim's kind (tests/test_service_partiality.py): every reflection within 2.5
# profile widths integrated, the intensities xsphere's, zero beyond one radius
OVERPREDICTED = dict(n_images=130, seed=6, dmin=3.5, partiality_profile="xsphere",
                     flat_intensities=True, bandwidth=0.01, profile_radius=(0.0003, 0.0006),
                     mosaicity_deg=0.0, orientation_error_deg=0.0, cell_error=0.0,
                     b_image_sd=0.0, outlier_fraction=0.0, misindexed_fraction=0.0,
                     overprediction=2.5, top_shell_photons=100.0)


def test_ranks_switch_to_the_geometric_partiality_together(tmp_path):
    """130 overpredicted crystals dealt over 2 ranks (about 65 each, below the verdict's 100
    on either alone): the ranks' summed tallies give the verdict, both ranks start again from
    their spools with the geometric partiality, every crystal is stored once, rank 0's MTZ
    says why, and a restart resumes the switched merge."""
    import gemmi

    from streamvi.merging.reach import REACH_MIN_CRYSTALS, REACH_SIGNAL_RATIO
    from streamvi_sim import SimulationConfig, simulate_images, simulate_structure

    sim = SimulationConfig(**OVERPREDICTED)
    payloads = [encode_crystal(m) for m in simulate_images(sim, simulate_structure(sim))]
    space = ReciprocalSpace(sim.space_group, sim.cell, sim.dmin, anomalous=False).to_dict()
    sent = {f"{m.run}/{m.image}/{m.crystal}" for m in map(decode_crystal, payloads)}
    endpoint = _fan_out(payloads, space, tmp_path, min_visits=1)
    res = [json.loads((tmp_path / f"result{r}.json").read_text()) for r in range(WORLD)]
    switches = [r["partiality_switch"] for r in res]
    same = [{k: v for k, v in sw.items() if k != "time"} for sw in switches if sw]
    assert len(same) == WORLD and same[0] == same[1]       # the same verdict, same step
    assert switches[0]["reason"] == "reach"
    assert switches[0]["crystals"] >= REACH_MIN_CRYSTALS
    assert max(r["crystals_received"] for r in res) < REACH_MIN_CRYSTALS   # pooled, not one
    assert switches[0]["signal_ratio"] < REACH_SIGNAL_RATIO
    keys = [set(r["keys"]) for r in res]
    assert keys[0] | keys[1] == sent and not keys[0] & keys[1]
    assert [r["images_stored"] for r in res] == [len(k) for k in keys]
    # those still queued at the switch count as received (stored by the replay), so the
    # ranks see everything sent in and stop (not at max_seconds)
    assert [r["crystals_received"] for r in res] == [len(k) for k in keys]
    assert all(r["global_images"] == len(payloads) for r in res)
    assert res[0]["steps"] == res[1]["steps"] > 0
    line = PartialitySwitch.from_dict(switches[0]).history_line()
    assert line in gemmi.read_mtz_file(str(tmp_path / "latest.mtz")).history
    saved = torch.load(tmp_path / "checkpoint.pt", weights_only=False)
    assert saved["partiality_switch"] == switches[0]

    # a restart resumes the switched merge from the checkpoint (no second switch)
    _spawn(_serve_rank, (free_port(), endpoint, space, str(tmp_path), len(payloads), 1),
           timeout_s=120)
    again = [json.loads((tmp_path / f"result{r}.json").read_text()) for r in range(WORLD)]
    assert [r["partiality_switch"] for r in again] == [switches[0]] * WORLD   # rank 0's
    assert [set(r["keys"]) for r in again] == keys
    assert again[0]["steps"] == again[1]["steps"] > res[0]["steps"]
    assert line in gemmi.read_mtz_file(str(tmp_path / "latest.mtz")).history
