"""The merging engine's staging of the Wilson prior while data stream in."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from streamvi.merging.engine import EngineConfig, MergeEngine
from streamvi.merging.offline import merge_crystals
from streamvi.symmetry import ReciprocalSpace
from streamvi.merging.trainer import TrainerConfig


@pytest.fixture(scope="module")
def stills():
    from streamvi_sim import SimulationConfig, simulate_images, simulate_structure

    sim = SimulationConfig(n_images=12, seed=3, dmin=2.5)
    crystals = list(simulate_images(sim, simulate_structure(sim)))
    return crystals, ReciprocalSpace(sim.space_group, sim.cell, sim.dmin, anomalous=False)


def _flat(engine: MergeEngine) -> bool:
    prior = engine.trainer.model.prior
    return bool(torch.equal(prior.variance, prior.epsilon.to(prior.variance.dtype)))


def test_provisional_sigma_waits_for_enough_images(stills):
    crystals, space = stills
    engine = MergeEngine(space, TrainerConfig(device="cpu", mc_samples=2),
                         EngineConfig(wilson_min_images=5))
    assert _flat(engine)
    engine.add(crystals[0])
    engine.step()                           # a service's first step: one still stored
    assert engine.sigma_stage == 0 and _flat(engine)
    for c in crystals[1:4]:
        engine.add(c)
    engine.step()
    assert engine.sigma_stage == 0 and _flat(engine)
    engine.add(crystals[4])
    engine.step()
    assert engine.sigma_stage == 1 and not _flat(engine)
    # Σ follows the data's fall-off: larger at low resolution than at high
    var = (engine.trainer.model.prior.variance / engine.trainer.model.prior.epsilon).numpy()
    low, high = space.d > np.quantile(space.d, 0.8), space.d < np.quantile(space.d, 0.2)
    assert var[low].mean() > 2 * var[high].mean()


def test_offline_merge_takes_sigma_from_all_data_at_once(stills):
    crystals, space = stills
    # two stills are far fewer than the streaming threshold
    assert 2 < EngineConfig().wilson_min_images
    _, engine = merge_crystals(crystals[:2], space, steps=1,
                               trainer_config=TrainerConfig(device="cpu", mc_samples=2))
    assert engine.sigma_stage >= 1 and not _flat(engine)


def test_sync_free_engine_step_never_waits_for_the_device():
    """Scheduler, store gather, twin-law and misfit bookkeeping and the step itself queue
    their work without a host read (the CUDA default, run here on the CPU)."""
    from syncprobe import HostReadProbe
    from streamvi_sim import SimulationConfig, simulate_images, simulate_structure

    sim = SimulationConfig(n_images=24, seed=5, dmin=3.0, space_group="P 43",
                           cell=(79.1, 79.1, 37.9, 90.0, 90.0, 90.0), indexing_ambiguity=True)
    space = ReciprocalSpace(sim.space_group, sim.cell, sim.dmin, anomalous=True)
    assert space.n_ops == 2
    engine = MergeEngine(space, TrainerConfig(device="cpu", mc_samples=2, sync_free=True,
                                              warmup_reflections=1, posterior_average_decay=0.9),
                         EngineConfig(batch_images=4, wilson_min_images=1))
    assert engine.store.kl_per_pass
    for c in simulate_images(sim, simulate_structure(sim)):
        engine.add(c)
    for _ in range(3):
        engine.step()
    engine.trainer.model.reject_images = True
    with HostReadProbe() as probe:
        for _ in range(4):
            report = engine.step()
    assert probe.total == 0, probe.counts
    assert report.chosen_ops is not None and report.rejected is not None
    assert np.isfinite(report.loss)
    # what the step recorded on the device reaches the host at the snapshot
    # a batch carries each image's last chosen setting (the scale encoder's merge ratio)
    engine.store.set_ops(torch.tensor([5, 0, 17, 3]), torch.tensor([1, 0, 1, 0]))
    assert engine.store.batch(np.array([5, 0, 17, 3])).image_op.tolist() == [1, 0, 1, 0]
    assert engine.store.batch(np.array([3, 17])).image_op.tolist() == [0, 1]
    snap = engine.snapshot()
    assert np.array_equal(engine.store.image_op[:24], engine.store._image_op_t[:24].numpy())
    assert sum(engine.store.setting_counts().values()) == 24
    # N counts what the merge took: the observations of images left out as misfits do not
    left_out = int(engine.store.image_length[:24][engine.store.image_rejected].sum())
    assert int(snap.obs_count[0].sum()) == engine.store.n_reflections - left_out
    assert np.isfinite(snap.tables["all"]["F"][snap.observed]).all()


@pytest.fixture(scope="module")
def stills_with_truth():
    from streamvi_sim import SimulationConfig, simulate_structure
    from streamvi_sim.beamtime import Simulator

    sim = SimulationConfig(n_images=300, seed=11, dmin=2.2, misindexed_fraction=0.0)
    simulator = Simulator(sim, simulate_structure(sim))
    pairs = [simulator.image(i) for i in range(sim.n_images)]
    return pairs, ReciprocalSpace(sim.space_group, sim.cell, sim.dmin, anomalous=False)


def _offset_errors(engine: MergeEngine, truths) -> tuple[float, float]:
    """RMS of (reported, refined) Ewald offsets against the simulator's, Å⁻¹."""
    ids = np.arange(engine.n_images)
    batch = engine.store.batch(ids)
    with torch.no_grad():
        corrected = engine.trainer.model.corrected_metadata(batch)[:, 4].numpy()
    true = np.concatenate([truths[i].excitation for i in batch.image_id.tolist()])
    reported = batch.metadata[:, 4].numpy()
    return (float(np.sqrt(np.mean((reported - true) ** 2))),
            float(np.sqrt(np.mean((corrected - true) ** 2))))


def test_geometry_refinement_moves_offsets_towards_the_truth(stills_with_truth):
    """Each image's refined rotation and axis lengths bring its Ewald offsets closer to the
    simulator's true ones than the indexer's reported geometry; with refinement off nothing
    moves."""
    pairs, space = stills_with_truth
    crystals = [m for m, _ in pairs]
    truths = [t for _, t in pairs]
    tcfg = TrainerConfig(device="cpu", mc_samples=4, seed=1)
    _, engine = merge_crystals(crystals, space, epochs=12, trainer_config=tcfg)
    assert all(len(t.excitation) == engine.store.image_length[i] for i, t in enumerate(truths))
    reported, refined = _offset_errors(engine, truths)
    assert refined < 0.85 * reported, (reported, refined)      # 0.77 here
    geometry = engine.store.geometry
    assert geometry.shape == (300, 6) and np.isfinite(geometry).all()
    # rotation about the beam leaves every Ewald offset as it is: nothing to refine there
    assert np.abs(geometry[:, 2]).max() < 0.05 < np.abs(geometry[:, :2]).mean()

    _, plain = merge_crystals(crystals, space, epochs=1,
                              trainer_config=TrainerConfig(device="cpu", mc_samples=2,
                                                           refine_geometry=False))
    assert plain.last_report.geometry is None
    assert not plain.store.geometry.any()
    assert np.allclose(_offset_errors(plain, truths), reported)


def test_geometry_state_survives_a_checkpoint(stills):
    crystals, space = stills
    cfg = TrainerConfig(device="cpu", mc_samples=2, warmup_reflections=1)
    engine = MergeEngine(space, cfg, EngineConfig(batch_images=4))
    engine.add_many(crystals)
    engine.train(9)
    assert engine.last_report.geometry is not None
    state = engine.state_dict()
    geometry = engine.store.geometry_state()
    # one update per visit (the standardiser froze at the first step)
    assert geometry[:, -1].tolist() == engine.store.visits[:12].tolist()
    assert geometry[:, :6].abs().sum() > 0

    again = MergeEngine(space, cfg, EngineConfig(batch_images=4))
    again.add_many(crystals)
    again.load_state_dict(state)
    assert torch.equal(again.store.geometry_state(), geometry)
    a, b = engine.step(), again.step()
    assert a.loss == b.loss
    assert torch.equal(again.store.geometry_state(), engine.store.geometry_state())


def test_falloff_correction_moves_the_scales_trend_onto_the_amplitudes(stills):
    """With the record of the scales set by hand to a line in 1/d², the published table is
    the uncorrected one times exp(β (1/d² − mean)); the record's fit returns that β."""
    from streamvi.merging.engine import FALLOFF_BINS

    crystals, space = stills
    engines = []
    for recentre in (True, False):
        engine = MergeEngine(space, TrainerConfig(device="cpu", mc_samples=2),
                             EngineConfig(batch_images=4, recentre_falloff=recentre))
        engine.add_many(crystals)
        engine.train(3)
        engines.append(engine)
    on, off = engines
    # before any step there is nothing to fit: the table is published as it is
    fresh = MergeEngine(space, TrainerConfig(device="cpu", mc_samples=2))
    fresh.add_many(crystals)
    assert fresh.falloff_correction() is None
    assert fresh.snapshot().falloff_b is None

    x = (np.arange(FALLOFF_BINS) + 0.5) / space.dmin ** 2 / FALLOFF_BINS
    counts = np.where(np.arange(FALLOFF_BINS) % 3 == 0, 40.0, 100.0 + 10 * np.arange(20))
    beta = -0.8
    on._falloff[0] = torch.as_tensor(counts * (0.3 + beta * x), dtype=torch.float32)
    on._falloff[1] = torch.as_tensor(counts, dtype=torch.float32)
    fit, x_ref = on.falloff_correction()
    used = counts >= 50                       # bins below the minimum count are ignored
    assert fit == pytest.approx(beta, rel=1e-4)
    assert x_ref == pytest.approx(np.average(x[used], weights=counts[used]), rel=1e-6)
    a, b = on.snapshot(), off.snapshot()
    factor = np.exp(beta * (1.0 / space.d.astype(np.float64) ** 2 - x_ref))
    for name in ("all", "half1", "half2"):
        np.testing.assert_allclose(a.tables[name]["I"], b.tables[name]["I"] * factor,
                                   rtol=2e-4)
        np.testing.assert_allclose(a.tables[name]["F"], b.tables[name]["F"] * np.sqrt(factor),
                                   rtol=2e-4)
    assert a.falloff_b == pytest.approx(-2 * beta, rel=1e-4) and b.falloff_b is None
    (line,) = [line for line in a.history if "B +1.60 A^2" in line]
    assert len(line) <= 80                       # what an MTZ history line holds



def test_falloff_binned_publishes_the_records_own_shape(stills):
    """With ``falloff_binned`` the record's bins are equal steps in 1/d and the published
    table is the uncorrected one times exp(y(1/d²) − ȳ), y the record interpolated between
    its bins' centres; the B reported is still the slope's."""
    from streamvi.merging.engine import FALLOFF_BINS

    crystals, space = stills
    engines = []
    for binned, recentre in ((True, True), (False, False)):
        engine = MergeEngine(space, TrainerConfig(device="cpu", mc_samples=2),
                             EngineConfig(batch_images=4, recentre_falloff=recentre,
                                          falloff_binned=binned))
        engine.add_many(crystals)
        engine.train(3)
        engines.append(engine)
    on, off = engines
    x_max = 1.0 / space.dmin ** 2
    # a reflection at d is recorded in bin ⌊(d_min/d)·bins⌋: equal steps in 1/d
    d = np.array([40.0, 8.0, 3.0, space.dmin * 1.0001])
    np.testing.assert_array_equal(on._falloff_position(1.0 / d ** 2).astype(int),
                                  np.floor(space.dmin / d * FALLOFF_BINS).astype(int))
    x = ((np.arange(FALLOFF_BINS) + 0.5) / FALLOFF_BINS) ** 2 * x_max
    counts = np.where(np.arange(FALLOFF_BINS) % 3 == 0, 40.0, 100.0 + 10 * np.arange(20))
    y = 0.3 - 2.0 * np.sqrt(x)                 # steepest at low resolution: not a line
    on._falloff[0] = torch.as_tensor(counts * y, dtype=torch.float32)
    on._falloff[1] = torch.as_tensor(counts, dtype=torch.float32)
    used = counts >= 50
    x_rows = 1.0 / space.d.astype(np.float64) ** 2
    y_mean = np.average(y[used], weights=counts[used])
    factor = np.exp(np.interp(x_rows, x[used], y[used]) - y_mean)
    a, b = on.snapshot(), off.snapshot()
    for name in ("all", "half1", "half2"):
        np.testing.assert_allclose(a.tables[name]["I"], b.tables[name]["I"] * factor,
                                   rtol=2e-4)
    x_ref = np.average(x[used], weights=counts[used])
    slope = (np.sum(counts[used] * (x[used] - x_ref) * (y[used] - y_mean))
             / np.sum(counts[used] * (x[used] - x_ref) ** 2))
    assert a.falloff_b == pytest.approx(-2 * slope, rel=1e-4)

def _observations(engine: MergeEngine) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Every stored observation's row, half, standardised I and σ(I), from the store."""
    b = engine.store.batch(np.arange(engine.n_images))
    scale = engine.trainer.standardizer.intensity_scale()
    return (b.asu_id[0].numpy(), b.half[b.image_index].numpy(),
            b.iobs.double().numpy() / scale, b.sigiobs.double().numpy() / scale)


def test_row_estimates_are_robust_scaled_weighted_means_of_each_table(stills):
    crystals, space = stills
    engine = MergeEngine(space, TrainerConfig(device="cpu", mc_samples=2),
                         EngineConfig(wilson_min_images=1, reject_misfit_images=False))
    engine.add_many(crystals)
    engine.step()
    # the network starts every scale at LogNormal(0, 0.1): E[scale] = exp(0.005) whatever
    # the reflection, until it is trained
    model = engine.trainer.model
    with torch.no_grad():
        model.scale_model.out.weight.zero_()
        model.scale_model.out.bias.copy_(torch.tensor([0.0, np.log(np.expm1(0.1 - 1e-3))]))
    s = np.exp(0.5 * 0.1 ** 2)
    j_hat, var_j, count = engine.row_estimates(iterations=1)
    rows, half, i_obs, sig = _observations(engine)
    n = space.n_unique
    for t, sel in enumerate([np.ones_like(rows, bool), half == 0, half == 1]):
        # Student-t weights (32 degrees of freedom) of the residuals against the merge
        j0 = model.posterior.intensity_moments(t)[0].numpy()[rows[sel]]
        var = sig[sel] ** 2 + np.expm1(0.1 ** 2) * (s * np.maximum(j0, 0)) ** 2
        tw = 33.0 / (32.0 + (i_obs[sel] - s * j0) ** 2 / var) / var
        w = np.bincount(rows[sel], weights=s * s * tw, minlength=n)
        wi = np.bincount(rows[sel], weights=s * i_obs[sel] * tw, minlength=n)
        seen = w > 0
        np.testing.assert_allclose(j_hat[t * n:(t + 1) * n].numpy()[seen], wi[seen] / w[seen],
                                   rtol=2e-5, atol=1e-6)
        np.testing.assert_allclose(var_j[t * n:(t + 1) * n].numpy()[seen], 1 / w[seen],
                                   rtol=2e-5)
        assert np.isinf(var_j[t * n:(t + 1) * n].numpy()[~seen]).all()
        np.testing.assert_array_equal(count[t * n:(t + 1) * n].numpy(),
                                      np.bincount(rows[sel], minlength=n))


def test_wilson_posterior_amplitude_is_the_truncated_normal_mean():
    from scipy import stats

    from streamvi.merging.engine import _wilson_posterior_amplitude

    j = torch.tensor([50.0, 2.0, -3.0, 0.0], dtype=torch.float64)
    var = torch.tensor([4.0, 1.0, 1.0, 9.0], dtype=torch.float64)
    wilson = torch.tensor([10.0, 2.0, 2.0, 5.0], dtype=torch.float64)
    f, sd_f = _wilson_posterior_amplitude(j, var, wilson)
    m, sd = (j - var / wilson).numpy(), np.sqrt(var.numpy())
    mean = stats.truncnorm(-m / sd, np.inf, loc=m, scale=sd).mean()
    np.testing.assert_allclose(f.numpy() ** 2, mean, rtol=1e-6)
    assert (sd_f <= f).all() and (sd_f > 0).all()


def test_refresh_restarts_rows_at_their_merge_and_keeps_bijvoet_ratios():
    from streamvi_sim import SimulationConfig, simulate_images, simulate_structure

    sim = SimulationConfig(n_images=16, seed=4, dmin=3.0)
    space = ReciprocalSpace(sim.space_group, sim.cell, sim.dmin, anomalous=True)
    engine = MergeEngine(space, TrainerConfig(device="cpu", mc_samples=2, warmup_reflections=1),
                         EngineConfig(wilson_min_images=1))
    engine.add_many(list(simulate_images(sim, simulate_structure(sim))))
    for _ in range(5):
        engine.step()
    post = engine.trainer.model.posterior
    before = post.moments(0)[0].numpy()
    j_hat, var_j, _ = engine.row_estimates()
    restarted = engine.refresh_rows(min_observations=1, min_z=-np.inf)
    after = post.moments(0)[0].numpy()
    n = space.n_unique
    seen = np.isfinite(var_j[:n].numpy())
    assert restarted == seen.sum() and engine.refreshes == 1
    assert engine.refreshed_images == engine.n_images
    # rows never observed keep their values; a pair's F(+)/F(−) ratio is kept
    np.testing.assert_array_equal(after[~seen], before[~seen])
    plus = np.nonzero((space.friedel > 0) & ~space.centric)[0]
    minus = plus + 1            # F(−) follows its F(+) row
    both = seen[plus] & seen[minus]
    loc = post.loc_scale(torch.arange(n))[0].detach().numpy()
    np.testing.assert_allclose((loc[plus] / loc[minus])[both],
                               (before[plus] / before[minus])[both], rtol=1e-4)
    # a pair restarts at the Wilson posterior of the weighted mean of its two estimates
    from streamvi.merging.engine import _wilson_posterior_amplitude

    i_plus, i_minus = j_hat[plus].numpy()[both], j_hat[minus].numpy()[both]
    v_plus, v_minus = var_j[plus].numpy()[both], var_j[minus].numpy()[both]
    var = 1 / (1 / v_plus + 1 / v_minus)
    pooled = (i_plus / v_plus + i_minus / v_minus) * var
    wilson = engine.trainer.model.prior.variance.double().numpy()
    f_pair, _ = _wilson_posterior_amplitude(torch.from_numpy(pooled), torch.from_numpy(var),
                                            torch.from_numpy(wilson[plus][both]))
    np.testing.assert_allclose(0.5 * (loc[plus] + loc[minus])[both], f_pair.numpy(), rtol=1e-4)
    assert both.sum() > 500


def test_rarely_seen_rows_are_estimated_from_their_images_alone(stills):
    """``refresh_rows(max_observations=…)`` reads the network over the images that hold
    the rows it may restart, not over every image: those images are exactly the ones
    holding an observation of a pair seen 1–3 times in some table, and the rows' estimates
    from them alone are the full read's, bit for bit."""
    crystals, space = stills
    engine = MergeEngine(space, TrainerConfig(device="cpu", mc_samples=2, warmup_reflections=1),
                         EngineConfig(wilson_min_images=1, reject_misfit_images=False))
    engine.add_many(crystals)
    for _ in range(3):
        engine.step()
    images, count = engine._rows_few_observations(1, 3)
    j_full, v_full, c_full = engine.row_estimates()
    torch.testing.assert_close(count, c_full, rtol=0, atol=0)
    # by hand: every observation's row, half and image; pairs counted per table
    b = engine.store.batch(np.arange(engine.n_images))
    rows, half = b.asu_id[0].numpy(), b.half[b.image_index].numpy()
    image = b.image_id.numpy()[b.image_index.numpy()]
    pair = engine._bijvoet_pairs()
    n = space.n_unique
    wanted, candidate = set(), np.zeros(3 * n, bool)
    for t, sel in enumerate([np.ones_like(rows, bool), half == 0, half == 1]):
        n_pair = np.bincount(pair[rows[sel]], minlength=pair.max() + 1)[pair]
        few = (n_pair >= 1) & (n_pair <= 3)
        candidate[t * n:(t + 1) * n] = few
        wanted |= set(image[sel][few[rows[sel]]].tolist())
    assert 0 < len(wanted) and images.tolist() == sorted(wanted)
    j_part, v_part, _ = engine.row_estimates(images=images)
    mine = torch.from_numpy(candidate)
    assert int(mine.sum()) > 0
    torch.testing.assert_close(j_part[mine], j_full[mine], rtol=0, atol=0)
    torch.testing.assert_close(v_part[mine], v_full[mine], rtol=0, atol=0)


def _refreshing_engine(stills, **config) -> MergeEngine:
    """An engine whose policy refreshes at each doubling of the store (and ``config``),
    given three crystals and two steps: its Σ is final and its refresh count at 0."""
    crystals, space = stills
    engine = MergeEngine(space, TrainerConfig(device="cpu", mc_samples=2, warmup_reflections=1),
                         EngineConfig(wilson_min_images=1, refresh_growth=2.0, **config))
    engine.add_many(crystals[:3])
    engine.step()
    engine.step()
    return engine


def test_refresh_policy_follows_growth_and_idle_steps(stills):
    crystals, _ = stills
    engine = _refreshing_engine(stills, refresh_idle_steps=3)
    assert engine.sigma_stage == 2 and engine.refreshed_images == 3 and engine.refreshes == 0
    engine.add_many(crystals[3:5])                  # 5 < 2 × 3: not yet
    engine.step()
    assert engine.refreshes == 0
    engine.add_many(crystals[5:6])                  # 6 = 2 × 3
    engine.step()
    assert engine.refreshes == 1 and engine.refreshed_images == 6
    engine.add_many(crystals[6:8])
    for _ in range(2):
        engine.step()
    assert engine.refreshes == 1                    # grew, but only two idle steps so far
    engine.step()
    engine.step()
    assert engine.refreshes == 2 and engine.refreshed_images == 8
    for _ in range(5):                              # nothing new: nothing to refresh
        engine.step()
    assert engine.refreshes == 2


def test_the_policy_s_refresh_keeps_to_the_rarely_seen_rows_when_bounded(stills):
    """With ``refresh_max_observations`` the policy's refresh is bounded like ``merge``'s
    row refresh, and a bounded refresh restarts exactly the pairs seen 1 to that many
    times (every one of them here: no distance asked)."""
    crystals, space = stills
    engine = _refreshing_engine(stills, refresh_max_observations=2)
    engine.add_many(crystals[3:6])
    calls = []
    original = engine.refresh_rows
    engine.refresh_rows = lambda **kw: calls.append(kw) or original(**kw)
    engine.step()                                   # 6 = 2 × 3: the policy refreshes
    assert calls == [{"max_observations": 2}] and engine.refreshes == 1
    post = engine.trainer.model.posterior
    before = post.moments(0)[0].detach().clone()
    _, _, count = engine.row_estimates()
    pair = engine._bijvoet_pairs()
    n = space.n_unique
    n_pair = np.bincount(pair, weights=count[:n].numpy(), minlength=pair.max() + 1)[pair]
    few = (n_pair >= 1) & (n_pair <= 2)
    assert few.sum() > 10 and (n_pair > 2).sum() > 10
    original(min_observations=1, max_observations=2, min_z=-np.inf)
    changed = (post.moments(0)[0] != before).numpy()
    np.testing.assert_array_equal(changed, few)


def test_falloff_record_keeps_only_near_full_observations(stills):
    """With falloff_near_full the scales' record takes the observations within
    FALLOFF_FULL_RATIO profile radii of the Bragg condition, and every observation of a
    crystal without an orientation (ratio 0); by default it takes them all."""
    from types import SimpleNamespace

    from streamvi.merging.engine import FALLOFF_FULL_RATIO
    from streamvi.merging.model.metadata import Column

    crystals, space = stills
    engine = MergeEngine(space, TrainerConfig(device="cpu", mc_samples=2),
                         EngineConfig(batch_images=4, falloff_near_full=True))
    engine.add_many(crystals)
    batch = engine.store.batch(np.arange(4))
    ratio = batch.metadata[:, Column.EWALD_RATIO].abs()
    near = int((ratio <= FALLOFF_FULL_RATIO).sum())
    assert 0 < near < batch.n_reflections          # the stills have partials on both sides
    report = SimpleNamespace(scale_loc=torch.full((batch.n_reflections,), 0.25),
                             rejected=None)
    engine._falloff.zero_()
    engine._track_falloff(batch, report)
    assert float(engine._falloff[1].sum()) == pytest.approx(near)
    assert float(engine._falloff[0].sum()) == pytest.approx(0.25 * near)
    # the default record takes every observation
    every = MergeEngine(space, TrainerConfig(device="cpu", mc_samples=2),
                        EngineConfig(batch_images=4))
    every._falloff.zero_()
    every._track_falloff(batch, report)
    assert float(every._falloff[1].sum()) == pytest.approx(batch.n_reflections)
    batch.metadata[:, Column.EWALD_RATIO] = 0.0
    engine._falloff.zero_()
    engine._track_falloff(batch, report)
    assert float(engine._falloff[1].sum()) == pytest.approx(batch.n_reflections)


def test_falloff_at_bragg_reads_the_scales_on_the_bragg_condition(stills):
    """With falloff_at_bragg the record is read at the snapshot from the network with every
    reflection's Ewald offset and ratio at 0 (the image vectors pooled as observed): its
    sums are those of scale_distribution(at_bragg=True), not of the observations' own."""
    from streamvi.merging.engine import FALLOFF_BINS
    from streamvi.merging.model.metadata import Column

    crystals, space = stills
    engine = MergeEngine(space, TrainerConfig(device="cpu", mc_samples=2),
                         EngineConfig(batch_images=4, falloff_at_bragg=True))
    engine.add_many(crystals)
    engine.train(20)
    sums, counts = engine._falloff_at_bragg()
    assert counts.sum() == engine.store.n_reflections      # 12 stills: every one read
    model = engine.trainer.model
    batch = engine.store.batch(np.arange(engine.n_images))
    with torch.no_grad():
        at = model.scale_distribution(batch, at_bragg=True)[2].double().numpy()
        seen = model.scale_distribution(batch)[2].double().numpy()
        moved = batch.metadata.clone()
        moved[:, Column.EWALD_OFFSET] = 0.0
        moved[:, Column.EWALD_RATIO] = 0.0
        # the same as a batch whose observations lay on their Bragg condition, but for
        # the image vectors, which still pool the observations as they are
        std = model.standardizer
        head = std.standardize_metadata(moved)
        iobs = std.standardize_intensity(batch.iobs)
        sig = std.standardize_intensity(batch.sigiobs)
        extra = model._merge_ratio(batch, iobs)
        direct = model.scale_model(std.standardize_metadata(batch.metadata), iobs, sig,
                                   batch.image_index, batch.n_images, extra,
                                   head_metadata=head)[0].double().numpy()
    np.testing.assert_allclose(at, direct, rtol=1e-5, atol=1e-6)
    assert not np.allclose(at, seen)
    inv_d2 = batch.metadata[:, Column.INV_D2].double().numpy()
    bins = np.clip((inv_d2 * FALLOFF_BINS * space.dmin ** 2).astype(int), 0, FALLOFF_BINS - 1)
    np.testing.assert_allclose(sums, np.bincount(bins, at, FALLOFF_BINS), rtol=1e-6, atol=1e-6)
    snap = engine.snapshot()
    assert snap.falloff_b is None or np.isfinite(snap.falloff_b)


# --- pump-probe conditions ----------------------------------------------------------------

def _merge(crystals, space, conditions=None, steps=30):
    return merge_crystals(crystals, space, trainer_config=TrainerConfig(
        device="cpu", mc_samples=2, d_model=8, n_layers=1),
        engine_config=EngineConfig(batch_images=4), steps=steps, conditions=conditions)


def test_one_named_condition_merges_exactly_as_no_condition(stills):
    import copy

    crystals, space = stills
    plain, _ = _merge(crystals, space)
    labelled = copy.deepcopy(crystals)
    for m in labelled:
        m.condition = "dark"
    named, engine = _merge(labelled, space, conditions=("dark",))
    assert engine.trainer.model.posterior.n_tables == 3
    for table in ("all", "half1", "half2"):
        for col in ("F", "SIGF", "I", "SIGI"):
            np.testing.assert_array_equal(plain.tables[table][col], named.tables[table][col])
    np.testing.assert_array_equal(plain.obs_count, named.obs_count)


@pytest.fixture(scope="module")
def pump_probe():
    from streamvi_sim import SimulationConfig, simulate_images, simulate_structure

    sim = SimulationConfig(n_images=16, seed=4, dmin=3.0, conditions=("dark", "light"),
                           condition_ratio=(1, 1), light_change="move=4,shift=1.5,fraction=0.3")
    crystals = list(simulate_images(sim, simulate_structure(sim)))
    return crystals, ReciprocalSpace(sim.space_group, sim.cell, sim.dmin, anomalous=False)


def test_two_conditions_share_the_scales_and_keep_their_own_tables(pump_probe):
    crystals, space = pump_probe
    _, engine = _merge(crystals, space, conditions=("dark", "light"), steps=40)
    post = engine.trainer.model.posterior
    assert post.n_tables == 6
    snaps = engine.condition_snapshots()
    assert list(snaps) == ["dark", "light"]
    assert [s.n_images for s in snaps.values()] == [8, 8]
    ratios = []
    for c, (name, snap) in enumerate(snaps.items()):
        np.testing.assert_array_equal(snap.obs_count, engine.store.condition_obs_count[c])
        ratios.append(snap.tables["all"]["F"] / engine.trainer.posterior_table(3 * c)["F"])
        assert f"condition {name} of dark, light" in snap.history
    # one resolution-trend correction, the shared scales', for both conditions
    np.testing.assert_allclose(ratios[0], ratios[1], rtol=1e-6)
    # Σ I per row and half of each condition's own images, recounted here from the crystals
    # (the training-free half-set figures of a condition's snapshot divide these by its
    # counts); together they are the pooled sums
    store = engine.store
    for c, name in enumerate(store.conditions):
        want = np.zeros((2, space.n_unique))
        for i, msg in enumerate(crystals):
            if msg.condition == name:
                rows = space.lookup(msg.hkl())
                keep = rows >= 0
                np.add.at(want[store.image_half[i]], rows[keep], msg.I[keep].astype(np.float64))
        np.testing.assert_allclose(store.condition_sum_i_half(c), want, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(store.condition_sum_i_half(0) + store.condition_sum_i_half(1),
                               store.sum_i_half, rtol=1e-9, atol=1e-9)
    dark, light = (s.obs_count[0] > 0 for s in snaps.values())
    only_dark = np.nonzero(dark & ~light)[0]
    assert only_dark.size > 0
    # more steps move a row only the dark images saw in the dark table, never in the light one
    before = post.weight.detach().clone()
    engine.train(10)
    after = post.weight.detach()
    n = post.n_rows
    assert torch.equal(after[3 * n + only_dark], before[3 * n + only_dark])
    assert not torch.equal(after[only_dark], before[only_dark])
    with pytest.raises(ValueError, match="name one"):
        engine.snapshot()
    with pytest.raises(ValueError, match="not supported with several conditions"):
        engine.refresh_rows()
    # a checkpoint round trip keeps both conditions' tables; another layout is refused
    state = engine.state_dict()
    _, again = _merge(crystals, space, conditions=("dark", "light"), steps=1)
    again.load_state_dict(state)
    assert torch.equal(again.trainer.model.posterior.weight, post.weight)
    _, single = _merge(crystals[:4], space, steps=1)
    with pytest.raises(ValueError, match="checkpoint is of a merge of the conditions dark, light; this one is without"):
        single.load_state_dict(state)


def test_a_coupled_prior_ties_each_condition_to_the_reference(pump_probe):
    crystals, space = pump_probe
    tcfg = TrainerConfig(device="cpu", mc_samples=2, d_model=8, n_layers=1)
    _, engine = merge_crystals(crystals, space, trainer_config=tcfg,
                               engine_config=EngineConfig(batch_images=4, n_shells=4), steps=40,
                               conditions=("dark", "light"), coupled_reference="dark")
    coupling = engine.trainer.model.coupling
    assert coupling is not None and coupling.reference == 0
    r = engine.coupled_correlations()
    assert list(r) == ["light"] and len(r["light"]) == 4
    # learnt from the data: every shell's r moved from where it started
    assert all(abs(x - 0.95) > 1e-4 and 0.0 < x < 1.0 for x in r["light"])
    snaps = engine.condition_snapshots()
    assert any(line.startswith("prior given dark, r by shell: ") for line in
               snaps["light"].history)
    assert not any("r by shell" in line for line in snaps["dark"].history)
    # a row only light images saw: its dark row moves through the coupling, not without it
    post = engine.trainer.model.posterior
    dark, light = (s.obs_count[0] > 0 for s in snaps.values())
    only_light = torch.from_numpy(np.nonzero(light & ~dark)[0])
    assert only_light.numel() > 0
    before = post.weight.detach().clone()
    engine.train(10)
    assert not torch.equal(post.weight.detach()[only_light], before[only_light])
    _, plain = _merge(crystals, space, conditions=("dark", "light"), steps=40)
    before = plain.trainer.model.posterior.weight.detach().clone()
    plain.train(10)
    assert torch.equal(plain.trainer.model.posterior.weight.detach()[only_light],
                       before[only_light])
    with pytest.raises(ValueError, match="coupled_reference 'pump' must be one of"):
        merge_crystals(crystals, space, trainer_config=tcfg, steps=1,
                       conditions=("dark", "light"), coupled_reference="pump")


def test_a_merge_whose_crystals_all_lack_the_condition_says_so(stills):
    from streamvi.errors import ConfigError

    crystals, space = stills            # no crystal carries a condition
    with pytest.raises(ConfigError, match="12 had no condition among dark, light"):
        _merge(crystals, space, conditions=("dark", "light"))


def test_data_start_puts_each_observed_row_at_its_own_data(stills):
    """``data_start``: when Σ is first set, every observed row of each table starts at
    √(k·(n·Ê² + 2)/(n + 2) + 1 − k) times its Wilson mean, Ê² its table's raw mean intensity
    over εΣ, k = Z²/(Z² + 9) from the I/σ of its inverse-variance mean (a half's Z² times its
    share of the observations); unobserved rows at
    the Wilson mean (the formula recomputed here from the store's sums; no Bijvoet mates)."""
    crystals, space = stills
    engine = MergeEngine(space, TrainerConfig(device="cpu", mc_samples=2, posterior_lr=1e-6),
                         EngineConfig(wilson_min_images=5, data_start=True))
    engine.add_many(crystals)
    engine.step()                       # Σ from the data, rows started; one tiny update
    assert engine.sigma_stage >= 1
    st, post, prior = engine.store, engine.trainer.model.posterior, engine.trainer.model.prior
    sigma = st.wilson_sigma()
    wilson_mean = prior.mean().numpy().astype(np.float64)
    n = st.obs_count.astype(np.float64)
    sums = np.stack([st.sum_i, st.sum_i_half[0], st.sum_i_half[1]])
    z2 = np.where(st.sum_w > 0, st.sum_wi ** 2 / np.where(st.sum_w > 0, st.sum_w, 1), 0.0)
    for t in range(3):
        share = np.where(n[0] > 0, n[t] / np.maximum(n[0], 1), 0.0)
        k = z2 * share / (z2 * share + 9.0)
        e2 = np.where(n[t] > 0, sums[t] / np.maximum(n[t], 1) / (space.epsilon * sigma), 0.0)
        j = (n[t] * np.clip(e2, 0, None) + 2.0) / (n[t] + 2.0)
        want = wilson_mean * np.sqrt(k * j + 1.0 - k)
        loc = post.loc_scale(post.flat_index(t, torch.arange(post.n_rows)))[0]
        got = loc.detach().numpy().astype(np.float64)
        np.testing.assert_allclose(got, want, rtol=2e-3, atol=1e-4)
    # the halves start from their own data: they differ where the data pin the row down
    loc_h1, loc_h2 = (post.loc_scale(post.flat_index(t, torch.arange(post.n_rows)))[0]
                      .detach().numpy() for t in (1, 2))
    k = z2 / (z2 + 9.0)
    both = (n[1] > 0) & (n[2] > 0) & (k > 0.5)
    assert both.sum() >= 10
    assert np.mean(np.abs(loc_h1[both] - loc_h2[both]) > 1e-3 * wilson_mean[both]) > 0.9
    # the strongest observed rows start far above the Wilson mean, unobserved ones at it
    seen = n[0] > 0
    assert np.max(loc_h1[seen] / wilson_mean[seen]) > 2.0
    unseen = ~seen
    if unseen.any():
        np.testing.assert_allclose(loc_h1[unseen], wilson_mean[unseen], rtol=2e-3)


def test_data_start_starts_rows_first_seen_after_sigma_at_their_data(stills):
    """A service's rows mostly arrive after Σ is set: with ``data_start`` each starts at its
    data when its first crystal is stored (the same formula), not at the Wilson mean."""
    crystals, space = stills
    def engine_with(data_start: bool) -> MergeEngine:
        e = MergeEngine(space, TrainerConfig(device="cpu", mc_samples=2, posterior_lr=1e-6),
                        EngineConfig(wilson_min_images=3, data_start=data_start))
        e.add_many(crystals[:3])
        e.step()                        # Σ set from three stills
        assert e.sigma_stage >= 1
        return e

    on, off = engine_with(True), engine_with(False)
    before = on.store.obs_count[0] == 0
    on.add_many(crystals[3:])
    off.add_many(crystals[3:])
    new = np.nonzero(before & (on.store.obs_count[0] > 0))[0]
    assert new.size > 100
    post, prior = on.trainer.model.posterior, on.trainer.model.prior
    rows = torch.from_numpy(new)
    got = post.loc_scale(post.flat_index(0, rows))[0].detach().numpy()
    want = prior.mean(rows).numpy() * on._data_start(on._wilson_raw, new)[0]
    np.testing.assert_allclose(got, want, rtol=1e-5)
    # without it they wait at the Wilson mean; with it the strong ones start well above it
    plain = off.trainer.model.posterior.loc_scale(post.flat_index(0, rows))[0].detach().numpy()
    np.testing.assert_allclose(plain, off.trainer.model.prior.mean(rows).numpy(), rtol=1e-5)
    assert np.max(got / prior.mean(rows).numpy()) > 1.5
    # the checkpoint keeps the Wilson plot the starts are made from
    state = on.state_dict()
    again = MergeEngine(space, TrainerConfig(device="cpu", mc_samples=2),
                        EngineConfig(wilson_min_images=3, data_start=True))
    again.add_many(crystals)
    again.load_state_dict(state)
    np.testing.assert_allclose(again._wilson_raw, on._wilson_raw)


def test_rows_only_misfit_images_reached_are_not_published(stills):
    """N counts the observations the merge took; a row whose every observation is an image
    left out as a misfit is the prior alone and is not in the published table."""
    from streamvi.snapshot import snapshot_to_dataset

    crystals, space = stills
    _, engine = _merge(crystals, space, steps=10)
    per_image = [space.lookup(np.stack([c.h, c.k, c.l], 1)) for c in crystals]
    # the store keeps every reflection in range; count rows per image the same way
    kept = [r[r >= 0] for r in per_image]
    left_out = np.array([1, 4, 7])
    engine.store.set_rejected(torch.from_numpy(left_out), torch.ones(3, dtype=torch.bool))
    snap = engine.snapshot()
    taken = np.zeros(space.n_unique, np.int64)
    reached = np.zeros(space.n_unique, np.int64)
    for i, rows in enumerate(kept):
        np.add.at(reached, rows, 1)
        if i not in left_out:
            np.add.at(taken, rows, 1)
    np.testing.assert_array_equal(snap.obs_count[0], taken)
    np.testing.assert_array_equal(snap.obs_count[1] + snap.obs_count[2], taken)
    only_misfits = (reached > 0) & (taken == 0)
    assert only_misfits.sum() > 0
    published = space.lookup(snapshot_to_dataset(snap).get_hkls())
    assert not np.isin(np.nonzero(only_misfits)[0], published).any()
    assert set(published.tolist()) == set(np.nonzero(taken > 0)[0].tolist())
    # the store itself still holds them (a later verdict may take the images back), and the
    # snapshot carries its counts for the figures made from the store's sums
    np.testing.assert_array_equal(engine.store.obs_count[0], reached)
    np.testing.assert_array_equal(snap.store_counts[0], reached)
    # ⟨I/σ⟩ per row of what the merge took, as N: the inverse-variance average over the
    # other images' observations, recomputed here from the messages
    sw = np.zeros(space.n_unique)
    swi = np.zeros(space.n_unique)
    for i, (c, rows) in enumerate(zip(crystals, per_image)):
        if i in left_out:
            continue
        keep = rows >= 0
        w = 1.0 / np.square(np.asarray(c.sigI, np.float64)[keep])
        np.add.at(sw, rows[keep], w)
        np.add.at(swi, rows[keep], w * np.asarray(c.I, np.float64)[keep])
    expected = np.where(taken > 0, swi / np.sqrt(np.where(sw > 0, sw, 1.0)), 0.0)
    got = engine.store.condition_i_over_sigma(0, engine._left_out())
    np.testing.assert_allclose(got, expected, rtol=1e-9, atol=1e-9)
    assert not np.allclose(engine.store.condition_i_over_sigma(0), expected)
    engine.store.set_rejected(torch.from_numpy(left_out), torch.zeros(3, dtype=torch.bool))
    np.testing.assert_array_equal(engine.snapshot().obs_count[0], reached)
    assert engine._left_out() is None
