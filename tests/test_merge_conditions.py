"""``streamvi merge`` with pump–probe conditions, over real files: a simulated stream with a
copied pump-code header, MTZ files per condition and for the difference (streamvi/cli/merge.py)."""
from __future__ import annotations

import json

import gemmi
import numpy as np
import pytest
import reciprocalspaceship as rs

from streamvi.cli.main import main
from streamvi.errors import ConfigError
from streamvi.quality.difference import calibrate_sigma
from streamvi.symmetry import shell_edges, shell_index

FAST = ["--steps", "30", "--quiet", "--d-model", "8", "--mc-samples", "2", "--device", "cpu"]
FIELD = ["--condition-field", "header/int//sim/pump_code"]


@pytest.fixture(scope="module")
def pumped(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("pp")
    stream = tmp / "pp.stream"
    assert main(["simulate", "--images", "24", "--seed", "2", "--dmin", "3.0", "-o",
                 str(stream), "--truth", str(tmp / "T.mtz"), "--conditions", "dark,light",
                 "--light-change", "move=4,shift=1.5,fraction=0.3"]) == 0
    return stream


def test_a_header_field_names_the_conditions_and_both_mtzs_are_written(pumped, tmp_path, capsys):
    capsys.readouterr()
    out = tmp_path / "m.mtz"
    assert main(["merge", str(pumped), "-o", str(out), *FIELD,
                 "--condition-map", "0=dark,1=light", "--json", *FAST]) == 0
    text = capsys.readouterr().out
    report = json.loads(text.strip().splitlines()[-1])
    assert set(report["conditions"]) == {"dark", "light"}
    assert [report["conditions"][c]["images"] for c in ("dark", "light")] == [12, 12]
    assert list(report["differences"]) == ["light-minus-dark"]
    dark, light = (rs.read_mtz(str(tmp_path / f"m-{c}.mtz")) for c in ("dark", "light"))
    plain_cols = ["F", "SIGF", "I", "SIGI", "N", "F_half1", "SIGF_half1", "I_half1",
                  "SIGI_half1", "F_half2", "SIGF_half2", "I_half2", "SIGI_half2"]
    assert list(dark.columns) == plain_cols and list(light.columns) == plain_cols
    delta = rs.read_mtz(str(tmp_path / "m-light-minus-dark.mtz"))
    common = dark.index.intersection(light.index)
    assert len(delta) == len(common)
    # ΔF: light − dark times the coupled prior's gain correction of its shell (≥ 1)
    res = delta.compute_dHKL()["dHKL"].to_numpy()
    factors = np.array(report["differences"]["light-minus-dark"]["df_gain_factor"])
    assert factors.shape == (10,) and np.all(factors >= 1.0)
    gain = factors[shell_index(res, shell_edges(res.max(), res.min(), 10))]
    np.testing.assert_allclose(delta["DF"].to_numpy(),
                               gain * (light.loc[delta.index, "F"] - dark.loc[delta.index, "F"]
                                       ).to_numpy(), rtol=1e-4, atol=1e-4)
    # SIGDF: the mean-field σ scaled to the half-datasets' scatter of ΔF, recomputed here
    # from the two condition files, times that correction
    lt, dk = light.loc[delta.index], dark.loc[delta.index]
    mean_field = np.hypot(lt["SIGF"], dk["SIGF"]).to_numpy()
    cal = calibrate_sigma((lt["F"] - dk["F"]).to_numpy(), mean_field,
                          (lt["F_half1"] - dk["F_half1"]).to_numpy(),
                          (lt["F_half2"] - dk["F_half2"]).to_numpy(),
                          delta.compute_dHKL()["dHKL"].to_numpy())
    assert cal.calibrated
    np.testing.assert_allclose(delta["SIGDF"].to_numpy(), mean_field * cal.factor * gain,
                               rtol=1e-4)
    # WDF: the q-weight times ΔF as merged (the coupled prior's shrinkage kept for maps)
    np.testing.assert_allclose(delta["WDF"].to_numpy(),
                               delta["W"].to_numpy() * (lt["F"] - dk["F"]).to_numpy(),
                               rtol=1e-4, atol=1e-5)
    history = [h.strip() for h in
               gemmi.read_mtz_file(str(tmp_path / "m-light-minus-dark.mtz")).history]
    assert any(h.startswith("SIGDF: mean-field sigma x half-set scatter") for h in history)
    at = history.index("DF, SIGDF x by shell for the coupled prior's shrinkage, low to high:")
    assert [float(x) for x in history[at + 1].split()] == pytest.approx(factors, abs=0.006)
    assert "WDF: W times DF as merged (before that factor; the map's coefficient)" in history
    # the light condition is merged under the coupled prior given the dark one (default)
    light_history = [h.strip() for h in gemmi.read_mtz_file(str(tmp_path / "m-light.mtz")).history]
    assert any(h.startswith("prior given dark, r by shell: ") for h in light_history)
    assert not any("r by shell" in h.strip()
                   for h in gemmi.read_mtz_file(str(tmp_path / "m-dark.mtz")).history)
    # N per condition: together they are the observations of a plain merge
    assert not (tmp_path / "m.mtz").exists()
    assert main(["merge", str(pumped), "-o", str(out), *FAST]) == 0
    plain = rs.read_mtz(str(out))
    n = dark["N"].reindex(plain.index, fill_value=0).astype(int) \
        + light["N"].reindex(plain.index, fill_value=0).astype(int)
    np.testing.assert_array_equal(n.to_numpy(), plain["N"].to_numpy())


def test_one_condition_is_the_plain_merge_and_unmapped_crystals_are_counted(pumped, tmp_path,
                                                                           capsys):
    plain = tmp_path / "plain.mtz"
    assert main(["merge", str(pumped), "-o", str(plain), *FAST]) == 0
    # --condition for the whole input: the same merge, bit for bit, in m-dark.mtz
    assert main(["merge", str(pumped), "-o", str(tmp_path / "m.mtz"), "--condition", "dark",
                 *FAST]) == 0
    a, b = gemmi.read_mtz_file(str(plain)), gemmi.read_mtz_file(str(tmp_path / "m-dark.mtz"))
    np.testing.assert_array_equal(np.array(a, copy=False), np.array(b, copy=False))
    capsys.readouterr()
    # a map that names only the dark code: the light crystals are refused and counted
    assert main(["merge", str(pumped), "-o", str(tmp_path / "d.mtz"), *FIELD,
                 "--condition-map", "0=dark", *FAST]) == 0
    got = capsys.readouterr()
    assert "not merged: 12 unknown_condition" in got.err
    assert "condition dark: 12 images" in got.out
    assert (tmp_path / "d-dark.mtz").is_file() and not list(tmp_path.glob("d-*-minus-*"))


def test_no_coupled_prior_merges_the_conditions_independently(pumped, tmp_path):
    args = [*FIELD, "--condition-map", "0=dark,1=light", *FAST]
    assert main(["merge", str(pumped), "-o", str(tmp_path / "c.mtz"), *args]) == 0
    assert main(["merge", str(pumped), "-o", str(tmp_path / "i.mtz"), "--no-coupled-prior",
                 *args]) == 0
    light = gemmi.read_mtz_file(str(tmp_path / "i-light.mtz"))
    assert not any("r by shell" in h for h in light.history)
    # without the coupled prior ΔF is the plain difference: nothing to undo
    delta = gemmi.read_mtz_file(str(tmp_path / "i-light-minus-dark.mtz"))
    assert not any("coupled prior's shrinkage" in h for h in delta.history)
    ds = rs.read_mtz(str(tmp_path / "i-light-minus-dark.mtz"))
    plain = rs.read_mtz(str(tmp_path / "i-light.mtz")).loc[ds.index, "F"] \
        - rs.read_mtz(str(tmp_path / "i-dark.mtz")).loc[ds.index, "F"]
    np.testing.assert_allclose(ds["DF"].to_numpy(), plain.to_numpy(), atol=1e-4)
    coupled, independent = (rs.read_mtz(str(tmp_path / f"{x}-light.mtz")) for x in "ci")
    assert coupled.index.equals(independent.index)
    assert not np.allclose(coupled["F"].to_numpy(), independent["F"].to_numpy())


def test_condition_options_are_refused_by_name(pumped, tmp_path, capsys):
    out = ["-o", str(tmp_path / "x.mtz")]
    assert main(["merge", str(pumped), *out, *FIELD, *FAST]) != 0
    assert "--condition-field needs --condition-map" in capsys.readouterr().err
    assert main(["merge", str(pumped), *out, "--condition-map", "0=dark", *FAST]) != 0
    assert "--condition-map needs" in capsys.readouterr().err
    assert main(["merge", str(pumped), *out, *FIELD, "--condition-map", "5=x", *FAST]) != 0
    assert "no crystal has a condition" in capsys.readouterr().err
    assert main(["merge", str(pumped), str(pumped), *out, "--condition", "a",
                 "--condition", "b", "--condition", "c", *FAST]) != 0
    assert "--condition given 3 times for 2 inputs" in capsys.readouterr().err


def test_an_event_list_names_the_conditions(pumped, tmp_path, capsys):
    """--condition-file: the same split as the pump code gives, from a CSV of image files
    (the simulator's images have no event, so rows without one cover their file)."""
    from streamvi.producers.conditions import read_condition_file
    from streamvi_crystfel import read_stream

    crystals = list(read_stream(pumped))
    events = tmp_path / "events.csv"
    lines = ["image,event,condition"]
    for c in crystals:
        code = c.metadata["header/int//sim/pump_code"]
        lines.append(f"{c.image},,{'light' if code else 'dark'}")
    events.write_text("\n".join(lines[:-1]) + "\n")     # the last image not listed
    capsys.readouterr()
    assert main(["merge", str(pumped), "-o", str(tmp_path / "e.mtz"), "--condition-file",
                 str(events), "--json", *FAST]) == 0
    out = capsys.readouterr()
    report = json.loads(out.out.strip().splitlines()[-1])
    n_light = sum(1 for c in crystals[:-1] if c.metadata["header/int//sim/pump_code"])
    assert report["conditions"]["light"]["images"] == n_light
    assert report["conditions"]["dark"]["images"] == len(crystals) - 1 - n_light
    assert "not merged: 1 unknown_condition" in out.err
    # events: a row with one covers that event only, and a file without rows names none
    assert read_condition_file(_csv(tmp_path, "image,event,condition\na.h5,//3,light\n"
                                              "a.h5,,dark\n")) == {"a.h5////3": "light",
                                                                    "a.h5": "dark"}
    for text, message in (("image,cond\na.h5,dark\n", "must name the columns image"),
                          ("image,condition\na.h5,\n", "line 2: image and condition"),
                          ("image,condition\na.h5,dark\na.h5,light\n", "line 3: a.h5 is "
                                                                       "already 'dark'"),
                          ("image,condition\n", "no rows")):
        with pytest.raises(ConfigError, match=message):
            read_condition_file(_csv(tmp_path, text))
    with pytest.raises(ConfigError, match="cannot read it"):
        read_condition_file(tmp_path / "missing.csv")


def _csv(tmp_path, text: str):
    path = tmp_path / "rows.csv"
    path.write_text(text)
    return path
