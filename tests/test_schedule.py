import io

import numpy as np
import pytest
import torch

from streamvi.merging.schedule import ImageScheduler


def test_new_images_are_handed_out_in_arrival_order():
    s = ImageScheduler(batch_images=8, new_share=0.5, seed=0)
    n = 0
    for step in range(20):
        n += 3                      # three images arrive per step
        ids = s.next_ids(n)
        assert len(set(ids.tolist())) == len(ids)
        assert ids.max() < n
    # every image that arrived was handed out as new, in order, within a few steps
    assert s.cursor >= n - 3
    assert s.backlog(n) <= 3


def test_old_images_are_visited_once_per_pass():
    # 95 old images, 10 per step: passes end mid-batch, and a batch still holds distinct ids
    s = ImageScheduler(batch_images=10, new_share=0.2, seed=1)
    s.cursor = 95                   # nothing new
    counts = np.zeros(95, int)
    for step in range(1, 96):
        ids = s.next_ids(95)
        assert len(ids) == 10 and len(set(ids.tolist())) == 10
        counts[ids] += 1
        if step % 19 == 0:          # 190 draws: two whole passes more
            assert (counts == 2 * step // 19).all()
    assert counts.min() == counts.max() == 10
    assert s.passes == 10


def test_images_arriving_during_a_pass_join_the_next():
    s = ImageScheduler(batch_images=4, new_share=0.5, seed=4, max_new=2)
    s.cursor = 20
    seen_old = []
    for _ in range(5):              # two new (ids 20…29) and two old per step
        ids = s.next_ids(30)
        assert ids[:2].min() >= 20
        seen_old += ids[2:].tolist()
    for _ in range(10):             # nothing new any more: four old per step
        seen_old += s.next_ids(30).tolist()
    assert sorted(seen_old[:20]) == list(range(20))     # the first pass: the first 20 only
    assert sorted(seen_old[20:50]) == list(range(30))   # the second: all 30


def test_pass_survives_a_checkpoint_round_trip():
    s = ImageScheduler(batch_images=8, new_share=0.0, seed=5)
    s.cursor = 50
    for _ in range(3):
        s.next_ids(50)
    buf = io.BytesIO()
    torch.save(s.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    expected = [s.next_ids(50).tolist() for _ in range(10)]
    t = ImageScheduler(batch_images=8, new_share=0.0, seed=99)
    t.load_state_dict(state)
    assert [t.next_ids(50).tolist() for _ in range(10)] == expected
    # a checkpoint written before passes existed starts a fresh pass
    u = ImageScheduler(batch_images=8, new_share=0.0)
    u.load_state_dict({k: v for k, v in state.items() if k not in ("pass", "passes")})
    counts = np.bincount(np.concatenate([u.next_ids(50) for _ in range(25)]), minlength=50)
    assert (counts == 4).all()
    # restored into a smaller store (spool segments lost), no id beyond it is handed out
    w = ImageScheduler(batch_images=8, new_share=0.0)
    w.load_state_dict(state)
    w.cursor = 30
    assert all(w.next_ids(30).max() < 30 for _ in range(10))


def test_backlog_gets_at_least_one_slot_and_state_round_trip():
    s = ImageScheduler(batch_images=4, new_share=0.0, seed=2)
    ids = s.next_ids(10)
    assert 0 in ids
    state = s.state_dict()
    a = [s.next_ids(10).tolist() for _ in range(5)]
    t = ImageScheduler(batch_images=4, new_share=0.0, seed=99)
    t.load_state_dict(state)
    assert [t.next_ids(10).tolist() for _ in range(5)] == a


def test_bad_arguments():
    with pytest.raises(ValueError, match="batch_images"):
        ImageScheduler(batch_images=0)
    with pytest.raises(ValueError, match="new_share"):
        ImageScheduler(new_share=1.5)


def test_backlog_grows_the_batch_up_to_max_new():
    s = ImageScheduler(batch_images=8, new_share=0.5, seed=3, max_new=20)
    s.cursor = 100
    ids = s.next_ids(200)            # 100 images arrived faster than the trainer
    assert len(ids) == 24 and len(set(ids.tolist())) == 24
    np.testing.assert_array_equal(ids[:20], np.arange(100, 120))
    assert (ids[20:] < 100).sum() + (ids[20:] >= 120).sum() == 4
    assert s.cursor == 120
    t = ImageScheduler(batch_images=8, new_share=0.5, seed=3)
    t.cursor = 196
    assert len(t.next_ids(200)) == 8     # a small backlog: the usual batch
