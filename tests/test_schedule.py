import numpy as np
import pytest

from streamvi.schedule import ImageScheduler


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


def test_uniform_part_covers_old_images():
    s = ImageScheduler(batch_images=10, new_share=0.2, seed=1)
    s.cursor = 100                  # nothing new
    counts = np.zeros(100)
    for _ in range(2000):
        ids = s.next_ids(100)
        assert len(ids) == 10 and len(set(ids.tolist())) == 10
        counts[ids] += 1
    assert counts.min() > 0.7 * counts.mean() and counts.max() < 1.3 * counts.mean()


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
