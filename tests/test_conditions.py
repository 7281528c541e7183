"""Which condition each crystal belongs to (streamvi/producers/conditions.py)."""
from __future__ import annotations

import numpy as np
import pytest

from conftest import make_crystal
from streamvi.errors import ConfigError
from streamvi.producers.conditions import (condition_order, field_key, label_all,
                                           label_by_field, parse_condition_map,
                                           per_input_names)

KEY = "header/int//sim/pump_code"


def test_condition_map_parses_and_refuses_by_name():
    assert parse_condition_map("0=dark, 1=light") == {"0": "dark", "1": "light"}
    for bad, word in (("0=dark,1", "'1' is not VALUE=NAME"), ("0=a,0=b", "mapped twice"),
                      ("", "empty")):
        with pytest.raises(ConfigError, match=word) as err:
            parse_condition_map(bad)
        assert "--condition-map" in str(err.value)


def test_header_values_map_to_conditions():
    assert [field_key(v) for v in (1, 1.0, "1.000", " 2 ", "on", True, 0.5)] == \
        ["1", "1", "1", "2", "on", "1", "0.5"]
    rng = np.random.default_rng(0)
    msgs = [make_crystal(rng, image=f"i{j}") for j in range(4)]
    for m, v in zip(msgs, (0, 1.0, 7)):
        m.metadata = {KEY: v}
    label_by_field(msgs, KEY, {"0": "dark", "1": "light"})
    # an unmapped value and a missing field give no condition (the merge refuses them)
    assert [m.condition for m in msgs] == ["dark", "light", None, None]
    assert condition_order(msgs) == ("dark", "light")
    assert condition_order(msgs, "light") == ("light", "dark")
    with pytest.raises(ConfigError, match="--reference-condition 'pumped'"):
        condition_order(msgs, "pumped")
    label_all(msgs, "x")
    assert {m.condition for m in msgs} == {"x"}


def test_one_name_per_input_or_one_for_all():
    assert per_input_names(["dark"], 3) == ["dark"] * 3
    assert per_input_names(["dark", "light"], 2) == ["dark", "light"]
    with pytest.raises(ConfigError, match="--condition given 2 times for 3 inputs"):
        per_input_names(["dark", "light"], 3)


def test_send_labels_by_event_list_and_refuses_half_given_options(tmp_path):
    from streamvi.producers.conditions import condition_labeller

    events = tmp_path / "events.csv"
    events.write_text("image,event,condition\nrun1.h5,//7,light\nrun1.h5,,dark\n")
    label = condition_labeller(condition=None, field=None, condition_map=None, n_inputs=1,
                               condition_file=str(events))
    rng = np.random.default_rng(0)
    msgs = [make_crystal(rng, image=image) for image in ("run1.h5////7", "run1.h5////8",
                                                         "run2.h5")]
    for msg in msgs:
        label(msg, 0)
    assert [m.condition for m in msgs] == ["light", "dark", None]
    assert condition_labeller(condition=None, field=None, condition_map=None,
                              n_inputs=2) is None
    with pytest.raises(ConfigError, match="--condition-map needs --condition-field"):
        condition_labeller(condition=None, field=None, condition_map="0=dark", n_inputs=1)
