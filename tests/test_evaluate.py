import numpy as np

from conftest import make_crystal
from streamvi.evaluate import average_merge, compare_to_truth
from streamvi.symmetry import ReciprocalSpace


def test_inverse_variance_average_matches_numpy():
    sp = ReciprocalSpace("P 43 21 2", (79.1, 79.1, 37.9, 90, 90, 90), 3.0)
    rng = np.random.default_rng(0)
    msgs = [make_crystal(rng, n=100, image=f"i{j}") for j in range(20)]
    ds = average_merge(msgs, sp)
    rows = np.concatenate([sp.lookup(m.hkl()) for m in msgs])
    i = np.concatenate([m.I for m in msgs]).astype(np.float64)
    s = np.concatenate([m.sigI for m in msgs]).astype(np.float64)
    r = np.unique(rows[rows >= 0])[5]
    w = 1 / s[rows == r] ** 2
    want = (w * i[rows == r]).sum() / w.sum()
    got = ds.loc[tuple(int(x) for x in sp.hkl[r])]
    np.testing.assert_allclose(got["I"], want, rtol=1e-5)
    np.testing.assert_allclose(got["SIGI"], 1 / np.sqrt(w.sum()), rtol=1e-5)
    assert int(got["N"]) == (rows == r).sum()
    assert len(ds) == np.unique(rows[rows >= 0]).size
    # a table compared with itself correlates perfectly, shell by shell
    truth = ds.rename(columns={"F": "FMODEL"})
    c = compare_to_truth(ds, truth, n_shells=3)
    np.testing.assert_allclose(c["cc_F"], 1.0)
    assert c["n_common"] == len(ds)
