import os
import stat

import gemmi
import numpy as np
import pytest
import reciprocalspaceship as rs

from streamvi.merging.engine import MergeSnapshot
from streamvi.publish.mtz import MtzInfo, snapshot_to_dataset, write_snapshot_mtz
from streamvi.publish.mtz_files import MtzSnapshots
from streamvi.quality.stats import shell_statistics
from streamvi.symmetry import ReciprocalSpace


def fake_snapshot(anomalous: bool, seed: int = 0, snapshot_id: int = 1) -> MergeSnapshot:
    """A snapshot with random posterior tables (publishing does not care where they come from)."""
    sp = ReciprocalSpace("P 43 21 2", (79.1, 79.1, 37.9, 90, 90, 90), 3.5, anomalous=anomalous)
    rng = np.random.default_rng(seed)
    n = sp.n_unique
    tables = {}
    for name in ("all", "half1", "half2"):
        f = rng.gamma(2.0, 10.0, n)
        sigf = rng.uniform(0.1, 1.0, n)
        tables[name] = {"F": f, "SIGF": sigf, "I": f * f, "SIGI": 2 * f * sigf}
    obs = np.zeros((3, n), np.int64)
    obs[1] = rng.poisson(1.0, n)
    obs[2] = rng.poisson(1.0, n)
    obs[0] = obs[1] + obs[2]
    stats = shell_statistics(hkl=sp.hkl, d=sp.d, centric=sp.centric, friedel=sp.friedel,
                             obs_count=obs, i_full=tables["all"]["I"],
                             sigi_full=tables["all"]["SIGI"],
                             i_half=(tables["half1"]["I"], tables["half2"]["I"]),
                             f_half=(tables["half1"]["F"], tables["half2"]["F"]),
                             anomalous=anomalous, n_shells=4)
    return MergeSnapshot(snapshot_id=snapshot_id, time=0.0, space=sp, tables=tables,
                         obs_count=obs, n_images=10, n_reflections=int(obs[0].sum()), step=3,
                         stats=stats)


def test_mean_columns_round_trip_through_gemmi_and_rs(tmp_path):
    snap = fake_snapshot(anomalous=False)
    path = write_snapshot_mtz(snap, tmp_path / "m.mtz")
    mtz = gemmi.read_mtz_file(str(path))
    assert mtz.spacegroup.hm == "P 43 21 2"
    assert mtz.cell.a == pytest.approx(79.1)
    types = {c.label: c.type for c in mtz.columns}
    assert types["F"] == "F" and types["SIGF"] == "Q" and types["I"] == "J" and types["N"] == "I"
    assert any("snapshot 1" in h for h in mtz.history)
    ds = rs.read_mtz(str(path))
    seen = snap.obs_count[0] > 0
    assert len(ds) == seen.sum()
    want = dict(zip(map(tuple, snap.space.hkl[seen]), snap.tables["all"]["F"][seen]))
    got = dict(zip(ds.index.tolist(), ds["F"].to_numpy()))
    assert set(got) == set(want)
    np.testing.assert_allclose([got[k] for k in want], list(want.values()), rtol=1e-6)
    n_want = dict(zip(map(tuple, snap.space.hkl[seen]), snap.obs_count[0][seen]))
    assert all(int(ds.loc[k, "N"]) == v for k, v in list(n_want.items())[:50])
    # half-dataset columns are missing where that half saw nothing
    h1 = ds["F_half1"].to_numpy(np.float64)
    seen1 = dict(zip(map(tuple, snap.space.hkl), snap.obs_count[1] > 0))
    assert all(np.isnan(v) != seen1[k] for k, v in zip(ds.index.tolist(), h1))


def test_anomalous_columns_put_mates_side_by_side(tmp_path):
    snap = fake_snapshot(anomalous=True, seed=1)
    ds = rs.read_mtz(str(write_snapshot_mtz(snap, tmp_path / "a.mtz")))
    sp = snap.space
    f = snap.tables["all"]["F"]
    rows = {(tuple(h), int(s)): i for i, (h, s) in enumerate(zip(sp.hkl, sp.friedel))}
    checked = 0
    for hkl, row in ds.iterrows():
        ip = rows.get((hkl, 1))
        im = rows.get((hkl, -1))
        centric = sp.centric[ip]
        if centric:
            assert row["F(+)"] == pytest.approx(row["F(-)"])
            assert int(row["N(-)"]) == 0
            continue
        if snap.obs_count[0][ip] > 0 and snap.obs_count[0][im] > 0:
            assert row["F(+)"] == pytest.approx(f[ip], rel=1e-6)
            assert row["F(-)"] == pytest.approx(f[im], rel=1e-6)
            assert row["F"] == pytest.approx(0.5 * (f[ip] + f[im]), rel=1e-6)
            checked += 1
        elif snap.obs_count[0][im] == 0:
            assert np.isnan(row["F(-)"]) and row["F"] == pytest.approx(f[ip], rel=1e-6)
    assert checked > 50


def test_snapshots_latest_is_atomic_and_pruned(tmp_path):
    pub = MtzSnapshots(tmp_path, keep=2)
    for i in range(1, 5):
        assert pub.write(fake_snapshot(False, seed=i, snapshot_id=i)) is not None
        ds = rs.read_mtz(str(tmp_path / "latest.mtz"))
        assert len(ds) > 0
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["latest.mtz", "snapshot-000003.mtz", "snapshot-000004.mtz"]


def test_disk_full_is_reported_and_old_latest_survives(tmp_path, monkeypatch):
    pub = MtzSnapshots(tmp_path)
    pub.write(fake_snapshot(False, snapshot_id=1))
    before = (tmp_path / "latest.mtz").read_bytes()

    def no_space(self, path):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(gemmi.Mtz, "write_to_file", no_space)
    assert pub.write(fake_snapshot(False, snapshot_id=2)) is None
    assert pub.n_errors == 1 and "No space left" in pub.last_error
    assert (tmp_path / "latest.mtz").read_bytes() == before
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_dataset_index_is_asu():
    snap = fake_snapshot(False)
    ds = snapshot_to_dataset(snap)
    hkl = np.array(ds.index.tolist())
    asu = gemmi.ReciprocalAsu(gemmi.SpaceGroup("P 43 21 2"))
    assert all(asu.is_in(list(map(int, h))) for h in hkl[:200])


# ------------------------------------------------------------------ issue 18, item 9


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_mtz_files_are_readable_as_the_umask_allows(tmp_path, umask):
    """Not 0600 (mkstemp's): the shift crew's group must read the merge, as systemd's
    UMask says."""
    old = os.umask(umask)
    try:
        pub = MtzSnapshots(tmp_path / "out")
        (tmp_path / "out").mkdir()
        for i in (1, 2):
            assert pub.write(fake_snapshot(False, snapshot_id=i)) is not None
        write_snapshot_mtz(fake_snapshot(True), tmp_path / "merge.mtz")
    finally:
        os.umask(old)
    for path in (tmp_path / "out" / "latest.mtz", tmp_path / "out" / "snapshot-000002.mtz",
                 tmp_path / "merge.mtz"):
        assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask, path


def test_mtz_carries_the_wavelength_and_the_runs_names(tmp_path):
    info = MtzInfo(project="streamvi", crystal="run42", dataset="run42", wavelength_A=1.3051)
    write_snapshot_mtz(fake_snapshot(False), tmp_path / "m.mtz", info=info)
    mtz = gemmi.read_mtz_file(str(tmp_path / "m.mtz"))
    names = {(d.project_name, d.crystal_name, d.dataset_name) for d in mtz.datasets}
    assert names == {("streamvi", "run42", "run42")}
    assert mtz.datasets[-1].wavelength == pytest.approx(1.3051, abs=1e-5)
    assert "reciprocalspaceship" not in str(names)
    # without info: still no library name, wavelength unknown (0)
    write_snapshot_mtz(fake_snapshot(False), tmp_path / "n.mtz")
    plain = gemmi.read_mtz_file(str(tmp_path / "n.mtz"))
    assert all("reciprocalspaceship" not in (d.project_name + d.crystal_name + d.dataset_name)
               for d in plain.datasets)
    pub = MtzSnapshots(tmp_path / "s", info=lambda: info)
    (tmp_path / "s").mkdir()
    pub.write(fake_snapshot(False))
    latest = gemmi.read_mtz_file(str(tmp_path / "s" / "latest.mtz"))
    assert latest.datasets[-1].wavelength == pytest.approx(1.3051, abs=1e-5)
    assert latest.datasets[-1].crystal_name == "run42"


def test_mtz_info_names_are_made_safe():
    info = MtzInfo.from_runs({"../../etc/x\n" + "y" * 100: 3, "b": 1}, 0.98)
    assert info.crystal.startswith("etc_x") or "/" not in info.crystal
    assert len(info.crystal) <= 64 and "\n" not in info.crystal
    assert info.dataset.endswith("+1 more") and info.wavelength_A == 0.98
    assert MtzInfo.from_runs({}, None).crystal == "streamvi"
