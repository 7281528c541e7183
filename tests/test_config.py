import tomllib

import pytest

from streamvi.cli.main import main
from streamvi.config import OPTIONS, example_toml, load_config
from streamvi.errors import ConfigError


def test_precedence_default_file_env_flag(tmp_path):
    f = tmp_path / "s.toml"
    f.write_text('[merge]\ndmin = 2.5\nspace_group = "P 43 21 2"\n[model]\nseed = 3\n')
    cfg = load_config(f, env={"STREAMVI_DMIN": "2.2", "STREAMVI_SEED": "4"},
                      overrides={"seed": "5"})
    assert cfg.dmin == 2.2 and cfg.sources["dmin"] == "STREAMVI_DMIN"
    assert cfg.seed == 5 and cfg.sources["seed"] == "flag"
    assert cfg.space_group == "P 43 21 2" and cfg.sources["space_group"] == str(f)
    assert cfg.batch_images == 8 and cfg.sources["batch_images"] == "default"


def test_example_is_valid_toml_with_every_option(tmp_path):
    text = example_toml()
    data = tomllib.loads(text)
    flat = {k: v for sec in data.values() for k, v in sec.items()}
    assert set(flat) == {o.name for o in OPTIONS}
    f = tmp_path / "ex.toml"
    f.write_text(text)
    assert load_config(f, env={}).listen == ["tcp://127.0.0.1:5555"]


def test_errors_name_key_and_source(tmp_path):
    f = tmp_path / "bad.toml"
    f.write_text("dmn = 2\n")
    with pytest.raises(ConfigError, match="unknown key 'dmn'.*dmin"):
        load_config(f, env={})
    with pytest.raises(ConfigError, match="STREAMVI_DMIN.*'dmin' = 'abc'"):
        load_config(env={"STREAMVI_DMIN": "abc"})
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.toml", env={})
    f.write_text("dmin = [")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(f, env={})


def test_booleans_and_lists():
    cfg = load_config(env={"STREAMVI_ANOMALOUS": "yes",
                           "STREAMVI_LISTEN": "tcp://127.0.0.1:1, tcp://127.0.0.1:2"})
    assert cfg.anomalous is True
    assert cfg.listen == ["tcp://127.0.0.1:1", "tcp://127.0.0.1:2"]


def test_cli_config_example_and_check(tmp_path, capsys):
    assert main(["config", "--example"]) == 0
    out = capsys.readouterr().out
    tomllib.loads(out)
    f = tmp_path / "c.toml"
    f.write_text('space_group = "C 2 2 21"\n')
    assert main(["config", "--check", str(f)]) == 0
    assert '"space_group": "C 2 2 21"' in capsys.readouterr().out
    f.write_text("nonsense = 1\n")
    assert main(["config", "--check", str(f)]) == 2
    assert "unknown key 'nonsense'" in capsys.readouterr().err
