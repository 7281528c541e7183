import numpy as np
import pytest
import torch

from conftest import make_crystal
from streamvi.merging.features import N_METADATA
from streamvi.merging.store import REJECT_REASONS, ReflectionStore, _ranges, image_half
from streamvi.symmetry import ReciprocalSpace


@pytest.fixture()
def space():
    return ReciprocalSpace("P 43 21 2", (79.1, 79.1, 37.9, 90, 90, 90), 3.0)


def test_ranges_matches_python():
    starts = np.array([5, 0, 100], np.int64)
    lengths = np.array([3, 2, 4], np.int64)
    want = np.concatenate([np.arange(s, s + n) for s, n in zip(starts, lengths)])
    np.testing.assert_array_equal(_ranges(starts, lengths), want)


def test_image_half_is_stable_and_balanced():
    halves = [image_half("run7", f"file.h5//{i}") for i in range(2000)]
    assert halves == [image_half("run7", f"file.h5//{i}") for i in range(2000)]
    assert 900 < sum(halves) < 1100


def test_add_and_batch_round_trip(space):
    rng = np.random.default_rng(0)
    store = ReflectionStore(space, initial_capacity=16)   # forces several doublings
    msgs = [make_crystal(rng, n=40, image=f"i{j}") for j in range(6)]
    results = [store.add(m) for m in msgs]
    assert [r.image_id for r in results] == list(range(6))
    for m, r in zip(msgs, results):
        rows = space.lookup(m.hkl())
        assert r.n_kept == int((rows >= 0).sum())
        assert r.n_outside == int((rows < 0).sum())
    assert store.n_reflections == sum(r.n_kept for r in results)

    batch = store.batch(np.array([4, 1]))
    assert batch.n_images == 2
    for pos, img in enumerate([4, 1]):
        m = msgs[img]
        keep = space.lookup(m.hkl()) >= 0
        sl = slice(int(batch.image_offsets[pos]), int(batch.image_offsets[pos + 1]))
        np.testing.assert_array_equal(batch.iobs[sl].numpy(), m.I[keep])
        np.testing.assert_array_equal(batch.sigiobs[sl].numpy(), m.sigI[keep])
        np.testing.assert_array_equal(batch.asu_id[0, sl].numpy(), space.lookup(m.hkl())[keep])
        assert (batch.image_index[sl].numpy() == pos).all()
        assert int(batch.image_id[pos]) == img
    assert batch.metadata.shape == (batch.n_reflections, N_METADATA)


def test_duplicates_are_not_stored_twice(space):
    rng = np.random.default_rng(1)
    store = ReflectionStore(space)
    m = make_crystal(rng)
    first = store.add(m)
    again = store.add(m)
    assert again.duplicate and again.image_id == first.image_id
    assert store.n_images == 1 and store.n_reflections == first.n_kept
    assert store.obs_count[0].sum() == first.n_kept


def test_obs_count_per_half(space):
    rng = np.random.default_rng(2)
    store = ReflectionStore(space)
    for j in range(20):
        store.add(make_crystal(rng, image=f"x{j}"))
    np.testing.assert_array_equal(store.obs_count[0], store.obs_count[1] + store.obs_count[2])
    assert store.obs_count[0].sum() == store.n_reflections


def test_host_tier_beyond_budget_keeps_batches_identical(space):
    rng = np.random.default_rng(3)
    msgs = [make_crystal(rng, n=60, image=f"i{j}") for j in range(10)]
    plain = ReflectionStore(space)
    tiered = ReflectionStore(space, device_budget_bytes=3 * 60 * 64)
    for m in msgs:
        plain.add(m)
        tiered.add(m)
    assert tiered.image_tier[:10].max() == 1 and tiered.image_tier[0] == 0
    ids = np.array([9, 0, 5, 2])
    a, b = plain.batch(ids), tiered.batch(ids)
    # the tiered store may order images by tier; compare per image id
    for img in ids:
        pa = int(np.nonzero(a.image_id.numpy() == img)[0][0])
        pb = int(np.nonzero(b.image_id.numpy() == img)[0][0])
        sa = slice(int(a.image_offsets[pa]), int(a.image_offsets[pa + 1]))
        sb = slice(int(b.image_offsets[pb]), int(b.image_offsets[pb + 1]))
        np.testing.assert_array_equal(a.iobs[sa].numpy(), b.iobs[sb].numpy())
        np.testing.assert_array_equal(a.metadata[sa].numpy(), b.metadata[sb].numpy())
    assert tiered.bytes_used()["host"] > 0


def test_visits_and_first_visit_lag(space):
    rng = np.random.default_rng(4)
    store = ReflectionStore(space)
    for j in range(3):
        store.add(make_crystal(rng, image=f"i{j}"), arrival_time=100.0 + j)
    lags = store.mark_visited(np.array([0, 2]), now=110.0)
    np.testing.assert_allclose(sorted(lags), [8.0, 10.0])
    lags = store.mark_visited(np.array([0, 1]), now=111.0)
    np.testing.assert_allclose(lags, [10.0])
    np.testing.assert_array_equal(store.visits[:3], [2, 1, 1])


def test_merged_i_over_sigma_is_the_inverse_variance_average(space):
    rng = np.random.default_rng(5)
    store = ReflectionStore(space)
    msgs = [make_crystal(rng, n=80, image=f"i{j}") for j in range(8)]
    for m in msgs:
        store.add(m)
    rows = np.concatenate([space.lookup(m.hkl()) for m in msgs])
    i = np.concatenate([m.I for m in msgs]).astype(np.float64)
    s = np.concatenate([m.sigI for m in msgs]).astype(np.float64)
    ok = rows >= 0
    r = np.unique(rows[ok])[3]
    sel = ok & (rows == r)
    w = 1 / s[sel] ** 2
    want = (w * i[sel]).sum() / w.sum() * np.sqrt(w.sum())
    np.testing.assert_allclose(store.merged_i_over_sigma()[r], want, rtol=1e-5)
    unseen = store.obs_count[0] == 0
    assert (store.merged_i_over_sigma()[unseen] == 0).all()


def test_batch_obs_weight_is_one_over_row_multiplicity(space):
    rng = np.random.default_rng(6)
    store = ReflectionStore(space)
    for j in range(10):
        store.add(make_crystal(rng, n=60, image=f"i{j}"))
    b = store.batch(np.array([3, 7]))
    rows = b.asu_id[0].numpy()
    half = np.repeat(store.image_half[[3, 7]], np.diff(b.image_offsets.numpy()))
    np.testing.assert_allclose(b.obs_weight[0].numpy(), 1 / store.obs_count[0][rows])
    np.testing.assert_allclose(b.obs_weight[1].numpy(), 1 / store.obs_count[1 + half, rows])
    assert ReflectionStore(space, kl_per_pass=False).kl_per_pass is False


def test_wilson_sigma_follows_the_binned_mean_intensity(space):
    rng = np.random.default_rng(7)
    store = ReflectionStore(space)
    for j in range(40):
        m = make_crystal(rng, n=200, image=f"i{j}")
        # a Wilson-like fall-off: mean I = 1000 exp(-B s²/2) with s² = 1/d²
        rows = space.lookup(m.hkl())
        d = np.where(rows >= 0, space.d[np.maximum(rows, 0)], 10.0)
        m.I = (1000 * np.exp(-10.0 / d ** 2) * rng.exponential(1.0, len(m))).astype(np.float32)
        store.add(m)
    sig = store.wilson_sigma(n_bins=8)
    assert sig.shape == (space.n_unique,) and (sig > 0).all()
    x = 1 / space.d.astype(np.float64) ** 2
    lo, hi = x < np.quantile(x, 0.2), x > np.quantile(x, 0.8)
    want_ratio = np.exp(-10.0 * x[hi].mean()) / np.exp(-10.0 * x[lo].mean())
    got_ratio = sig[hi].mean() / sig[lo].mean()
    assert 0.6 * want_ratio < got_ratio < 1.6 * want_ratio
    assert ReflectionStore(space).wilson_sigma() is None


def test_first_visit_lags_cover_visited_images_only(space):
    rng = np.random.default_rng(8)
    store = ReflectionStore(space)
    for j in range(3):
        store.add(make_crystal(rng, image=f"i{j}"), arrival_time=10.0 * j)
    store.mark_visited(np.array([2, 0]), now=25.0)
    np.testing.assert_allclose(sorted(store.first_visit_lags()), [5.0, 25.0])
    # a reader outside the service lock passes the n_images it read: images added after
    # that (here image 3, visited at once) are not looked at, and the arrays stay aligned
    n_read = store.n_images
    store.add(make_crystal(rng, image="i3"), arrival_time=30.0)
    store.mark_visited(np.array([3]), now=31.0)
    np.testing.assert_allclose(sorted(store.first_visit_lags(n_read)), [5.0, 25.0])
    np.testing.assert_allclose(sorted(store.first_visit_lags()), [1.0, 5.0, 25.0])


@pytest.mark.parametrize("pack", [False, True])
def test_arrays_reach_the_device_in_their_shapes_packed_or_not(pack):
    from streamvi.merging.store import _to_device

    arrays = [np.arange(6).reshape(2, 3), np.array([7, 8]), np.zeros(0, np.int32),
              np.array([[1.5], [2.5]])]
    out = _to_device(arrays, torch.int64, torch.device("cpu"), pack=pack)
    assert [t.shape for t in out] == [(2, 3), (2,), (0,), (2, 1)]
    assert all(t.dtype == torch.int64 for t in out)
    for t, a in zip(out, arrays):
        assert np.array_equal(t.numpy(), a.astype(np.int64))
    floats = _to_device([np.float64([0.1, 0.2]), np.ones((2, 2))], torch.float32,
                        torch.device("cpu"), pack=pack)
    assert floats[0].dtype == torch.float32 and floats[1].shape == (2, 2)
    assert np.array_equal(floats[0].numpy(), np.float32([0.1, 0.2]))


@pytest.mark.parametrize("budget", [None, 3 * 60 * 64])
def test_add_many_stores_exactly_what_adding_one_by_one_does(space, budget):
    rng = np.random.default_rng(8)
    msgs = [make_crystal(rng, n=60, image=f"i{j}") for j in range(10)]
    msgs.insert(4, msgs[1])                        # a repeat inside the batch
    msgs.insert(7, make_crystal(rng, n=5, image="far", hmax=60))    # maybe all outside
    far = make_crystal(rng, n=3, image="out")
    far.h[:], far.k[:], far.l[:] = 90, 90, 90      # beyond dmin: nothing kept
    msgs.insert(2, far)
    times = [100.0 + j for j in range(len(msgs))]
    one = ReflectionStore(space, device_budget_bytes=budget)
    one.add(msgs[0], arrival_time=99.0)            # stored before: a duplicate below
    many = ReflectionStore(space, device_budget_bytes=budget)
    many.add(msgs[0], arrival_time=99.0)
    expected = [one.add(m, arrival_time=t) for m, t in zip(msgs, times)]
    got = many.add_many(msgs[:6], times[:6]) + many.add_many(msgs[6:], times[6:])
    assert got == expected
    # m0 was stored before; m1 comes twice in the first batch
    assert got[0].duplicate and got[5].duplicate and got[5].image_id == got[1].image_id
    assert got[2].image_id is None and got[2].n_outside == 3
    assert one.n_images == many.n_images and one.n_reflections == many.n_reflections
    n = one.n_images
    for name in ("image_tier", "image_start", "image_length", "image_half", "arrival_time"):
        np.testing.assert_array_equal(getattr(many, name)[:n], getattr(one, name)[:n], name)
    for name in ("obs_count", "sum_w", "sum_wi", "sum_i"):
        np.testing.assert_array_equal(getattr(many, name), getattr(one, name), name)
    assert torch.equal(many._obs_count_t, one._obs_count_t)
    assert many.keys == one.keys
    ids = np.arange(n)[::-1]
    a, b = one.batch(ids), many.batch(ids)
    for field in ("asu_id", "iobs", "sigiobs", "metadata", "image_index", "image_offsets",
                  "half", "image_id", "obs_weight"):
        assert torch.equal(getattr(a, field), getattr(b, field)), field
    if budget is not None:
        assert many.image_tier[:n].max() == 1


# ------------------------------------------------------------------ issue 18: what is merged


def test_the_same_crystal_under_another_name_is_a_duplicate(space):
    """Item 8: a crystal resent under another file (run) name is recognised by content."""
    rng = np.random.default_rng(11)
    store = ReflectionStore(space)
    msgs = [make_crystal(rng, image=f"i{j}") for j in range(4)]
    renamed = [make_crystal(rng, image="x") for _ in range(4)]
    for src, dst in zip(msgs, renamed):
        for name in ("h", "k", "l", "I", "sigI", "cell"):
            setattr(dst, name, getattr(src, name))
        dst.run, dst.image = "other-file", "renamed/" + src.image
    first = store.add_many(msgs)
    again = store.add_many(renamed + renamed[:1])
    assert [r.duplicate for r in again] == [True] * 5
    assert [r.duplicate_kind for r in again] == ["content"] * 5
    assert [r.image_id for r in again[:4]] == [r.image_id for r in first]
    assert store.n_images == 4
    # the same identity with other content is still a duplicate (by identity)
    changed = make_crystal(rng, image="i0")
    (r,) = store.add_many([changed])
    assert r.duplicate and r.duplicate_kind == "identity"
    assert store.is_stored(msgs[2]) and store.is_stored(renamed[1])
    assert not store.is_stored(make_crystal(rng, image="new"))


def test_a_crystal_of_another_cell_is_rejected_with_the_reason(space):
    """Items 5 and 1: crystals beyond 5 % / 5° of the merge's cell are refused, never merged."""
    rng = np.random.default_rng(12)
    store = ReflectionStore(space)
    good = [make_crystal(rng, image=f"g{j}", cell=(79.6, 78.8, 38.1, 90.4, 89.7, 90.2))
            for j in range(3)]
    foreign = make_crystal(rng, image="5ht2b", cell=(61.4, 122.6, 168.0, 90, 90, 90))
    res = store.add_many(good[:1] + [foreign] + good[1:])
    assert [r.rejected for r in res] == [None, "cell_mismatch", None, None]
    assert res[1].image_id is None and not res[1].duplicate
    assert "c = 168" in res[1].detail and "tolerance 5 %" in res[1].detail
    assert store.n_images == 3
    # the rejected crystal did not claim its identity: a sound one under it is merged
    sound = make_crystal(rng, image="5ht2b")
    (r,) = store.add_many([sound])
    assert r.rejected is None and not r.duplicate and r.image_id == 3
    loose = ReflectionStore(space)
    loose.cell_length_tolerance = None
    assert loose.add_many([foreign])[0].rejected is None


@pytest.mark.parametrize("poison", [1e9, -1e6])
def test_an_absurd_crystal_is_rejected_even_when_it_comes_first(space, poison):
    """Item 2: one valid crystal with absurd intensities is refused, not merged."""
    rng = np.random.default_rng(13)
    bad = make_crystal(rng, image="poison")
    bad.I[:] = poison
    normal = [make_crystal(rng, image=f"n{j}") for j in range(8)]
    for j, m in enumerate(normal):          # crystals of very different sizes are fine
        m.I *= (1.0, 30.0, 0.05, 3.0)[j % 4]
    store = ReflectionStore(space)
    res = store.add_many([bad] + normal)
    assert res[0].rejected == "intensity_outlier", res[0]
    assert [r.rejected for r in res[1:]] == [None] * 8
    assert "median" in res[0].detail
    # later ones are judged against the crystals stored so far
    late = make_crystal(rng, image="late")
    late.I[:] = poison
    assert store.add_many([late])[0].rejected == "intensity_outlier"
    # a crystal alone cannot be judged: it is stored
    alone = ReflectionStore(space)
    assert alone.add_many([bad])[0].rejected is None


def test_a_crystal_with_no_reflection_in_the_table_is_counted_as_rejected(space):
    """Item 11: received = merged + duplicates + rejected, also for such crystals."""
    rng = np.random.default_rng(14)
    far = make_crystal(rng, n=3, image="out")
    far.h[:], far.k[:], far.l[:] = 90, 90, 90
    store = ReflectionStore(space)
    (r,) = store.add_many([far])
    assert r.rejected == "outside_table" and r.n_outside == 3 and r.image_id is None
    assert not store.is_stored(far)


def test_the_store_keeps_the_runs_and_wavelengths_of_what_it_merged(space):
    rng = np.random.default_rng(15)
    store = ReflectionStore(space)
    a = make_crystal(rng, image="a", run="run42")
    b = make_crystal(rng, image="b", run="run42")
    b.photon_energy_eV = 10000.0
    store.add_many([a, b])
    assert store.runs == {"run42": 2}
    assert store.mean_wavelength() == pytest.approx(
        0.5 * (12398.419843320026 / 9500.0 + 12398.419843320026 / 10000.0))
    assert ReflectionStore(space).mean_wavelength() is None


def test_half_sums_follow_adds_and_reindexing():
    """``sum_i_half`` is Σ I per row and half, under each image's chosen setting."""
    sp = ReciprocalSpace("P 43", (79.1, 79.1, 37.9, 90, 90, 90), 3.0)
    rng = np.random.default_rng(9)
    store = ReflectionStore(sp)
    msgs = [make_crystal(rng, n=60, image=f"h{j}") for j in range(12)]
    store.add_many(msgs)

    def expected(ops):
        want = np.zeros((2, sp.n_unique))
        for j, m in enumerate(msgs):
            ids = sp.lookup_ops(m.hkl())
            keep = ids[0] >= 0
            ids = np.where(ids < 0, ids[0][None, :], ids)    # as the store does
            np.add.at(want[image_half(m.run, m.image)], ids[ops[j], keep], m.I[keep])
        return want

    np.testing.assert_allclose(store.sum_i_half, expected([0] * 12), rtol=1e-6)
    np.testing.assert_allclose(store.sum_i_half.sum(0), store.sum_i, rtol=1e-9)
    store.set_ops(torch.tensor([0, 5, 7]), torch.tensor([1, 1, 1]))
    assert store.apply_settings() == 3
    ops = [1 if j in (0, 5, 7) else 0 for j in range(12)]
    np.testing.assert_allclose(store.sum_i_half, expected(ops), rtol=1e-6, atol=1e-6)


# --- pump-probe conditions ----------------------------------------------------------------

def test_conditions_are_counted_per_condition_and_unknown_ones_refused(space):
    rng = np.random.default_rng(5)
    store = ReflectionStore(space, conditions=("dark", "light"))
    msgs = [make_crystal(rng, n=40, image=f"i{j}") for j in range(7)]
    for m, c in zip(msgs, ["dark", "light", "light", "dark", "light", "pumped", None]):
        m.condition = c
    results = store.add_many(msgs)
    assert [r.rejected for r in results[5:]] == ["unknown_condition"] * 2
    assert "'pumped', not one of this merge's conditions (dark, light)" in results[5].detail
    assert "no condition" in results[6].detail
    assert store.rejected_counts == {"unknown_condition": 2}
    assert "unknown_condition" in REJECT_REASONS
    assert store.image_condition[:5].tolist() == [0, 1, 1, 0, 1]
    np.testing.assert_array_equal(store.condition_images(), [2, 3])
    per = store.condition_obs_count
    assert per.shape == (2, 3, space.n_unique)
    # the conditions' counts add up to the pooled ones, table by table
    np.testing.assert_array_equal(per.sum(axis=0), store.obs_count)
    for c in range(2):
        np.testing.assert_array_equal(per[c, 1] + per[c, 2], per[c, 0])
    dark_rows = np.concatenate([space.lookup(msgs[k].hkl()) for k in (0, 3)])
    want = np.bincount(dark_rows[dark_rows >= 0], minlength=space.n_unique)
    np.testing.assert_array_equal(per[0, 0], want)
    # ⟨I/σ⟩ of one condition is the inverse-variance average of its own observations
    row = int(dark_rows[dark_rows >= 0][0])
    i, s = [], []
    for k in (0, 3):
        rows = space.lookup(msgs[k].hkl())
        i += list(msgs[k].I[rows == row]); s += list(msgs[k].sigI[rows == row])
    w = 1 / np.square(np.asarray(s, np.float64))
    assert store.condition_i_over_sigma(0)[row] == pytest.approx(
        np.sum(w * np.asarray(i, np.float64)) / np.sqrt(w.sum()))


def test_batches_carry_conditions_and_per_condition_kl_weights(space):
    rng = np.random.default_rng(6)
    store = ReflectionStore(space, conditions=("dark", "light"), initial_capacity=8)
    msgs = [make_crystal(rng, n=30, image=f"i{j}") for j in range(1200)]
    for j, m in enumerate(msgs):
        m.condition = ("dark", "light")[j % 2]
    store.add_many(msgs)            # past the first 1024 images: the per-image arrays grew
    ids = np.array([1, 1100, 0, 1199])
    batch = store.batch(ids)
    assert batch.condition.tolist() == [1, 0, 0, 1]
    rows = batch.asu_id[0].numpy()
    cond = batch.condition.numpy()[batch.image_index.numpy()]
    half = batch.half.numpy()[batch.image_index.numpy()]
    counts = store.condition_obs_count
    np.testing.assert_allclose(batch.obs_weight[0].numpy(), 1.0 / counts[cond, 0, rows])
    np.testing.assert_allclose(batch.obs_weight[1].numpy(),
                               1.0 / counts[cond, 1 + half, rows])
    # one named condition is the merge without conditions: no per-image condition
    one = ReflectionStore(space, conditions=("dark",))
    m = make_crystal(rng, n=30)
    m.condition = "dark"
    one.add(m)
    assert one.batch(np.array([0])).condition is None
    with pytest.raises(ValueError, match="distinct"):
        ReflectionStore(space, conditions=("dark", "dark"))


def test_crystals_that_report_the_partialitys_geometry_are_counted(space):
    """What `serve`'s partiality advice reads: crystals with an orientation, a profile
    radius and a bandwidth; a duplicate is not counted twice."""
    rng = np.random.default_rng(4)
    store = ReflectionStore(space)
    plain = make_crystal(rng, image="a")                            # no orientation
    oriented = make_crystal(rng, image="b", with_orientation=True)  # no bandwidth
    full = make_crystal(rng, image="c", with_orientation=True)
    full.beam_bandwidth = 0.002
    for m in (plain, oriented, full, full):
        store.add(m)
    assert store.n_images == 3 and store.n_geometry_images == 1
