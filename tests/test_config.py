import tomllib

import pytest

from streamvi.cli.main import main
from streamvi.config import SERVICE_OPTIONS, load_config
from streamvi.config.render import example_toml
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
    assert set(flat) == {o.name for o in SERVICE_OPTIONS}
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


# ------------------------------------------------------------------ one declaration per option

from pathlib import Path  # noqa: E402

from streamvi.cli.main import build_parser  # noqa: E402
from streamvi.config import OPTIONS, options_of  # noqa: E402
from streamvi.config.render import update_document  # noqa: E402

DOC = Path(__file__).resolve().parents[1] / "docs" / "configuration.md"


def test_the_configuration_document_is_generated_from_the_declarations():
    text = DOC.read_text()
    assert update_document(text) == text, (
        "docs/configuration.md differs from the option declarations; run "
        "`streamvi config --markdown docs/configuration.md`")


def _help(command: str) -> str:
    parser = build_parser()
    sub = next(a for a in parser._actions if hasattr(a, "choices") and a.choices
               and command in a.choices)
    return " ".join(sub.choices[command].format_help().split())


@pytest.mark.parametrize("command", ["serve", "merge", "demo", "simulate", "send", "status"])
def test_every_flag_shows_its_type_and_default(command):
    text = _help(command)
    for o in options_of(command):
        if o.positional:
            continue
        value = o.default_for(command)
        shown = ("required" if command in o.required else
                 "default unset" if value is None else
                 f"default {'on' if value else 'off'}" if o.type is bool else "default ")
        assert shown in text, (command, o.name)
        assert f"({'list of ' if o.multiple else ''}" in text


def test_serve_help_names_type_and_default_of_each_flag():
    text = _help("serve")
    assert "--dmin DMIN resolution limit; reflections beyond it are counted and left out " \
           "(serve says when they carry data worth a larger table; restarted on the same " \
           "out_dir with another dmin it replays its spool into the new table: " \
           "docs/operations.md) (float, Å; default 2.0)" in text
    assert "(int; default 16)" in text and "(bool; default on)" in text


def test_the_model_and_engine_settings_are_derived_not_copied():
    """Every target names a real field; the commands' effective settings are today's."""
    import dataclasses

    from streamvi.cli.merge import merge_config, model_configs
    from streamvi.merging.engine import EngineConfig
    from streamvi.merging.trainer import TrainerConfig

    fields = {"trainer": {f.name for f in dataclasses.fields(TrainerConfig)},
              "engine": {f.name for f in dataclasses.fields(EngineConfig)}}
    for o in OPTIONS:
        if o.target is not None:
            component, name = o.target.split(".")
            assert name in fields[component], o.name
    tcfg, ecfg = model_configs(merge_config(["x.stream", "-o", "x.mtz"]))
    assert tcfg == TrainerConfig(device="auto", seed=0, mc_samples=8, d_model=32, n_layers=2,
                                 likelihood="student_t", scale_kl_weight=0.03,
                                 refine_geometry=True)
    assert ecfg == EngineConfig(n_shells=10, recentre_falloff=True, batch_images=8,
                                data_start=True)
    cfg = load_config(env={})
    assert TrainerConfig(**cfg.settings("trainer")) == TrainerConfig(
        d_model=16, n_layers=2, mc_samples=8, device="auto", seed=0, cpu_threads=1,
        scale_kl_weight=0.03, posterior_average_decay=0.99, pooled_merge_ratio=True,
        sync_free=None, refine_geometry=True)
    assert EngineConfig(**cfg.settings("engine")) == EngineConfig(
        batch_images=8, new_share=0.5, n_shells=10, device_budget_bytes=None,
        recentre_falloff=True)
    assert cfg.replace(device_budget_mb=2.0).settings("engine")["device_budget_bytes"] == 2 << 20
    # the older spellings of merge still work
    assert merge_config(["x.stream", "-o", "x.mtz", "--layers", "3", "--shells", "4"]).n_layers == 3


def test_a_declared_check_names_the_key_and_where_the_value_came_from():
    with pytest.raises(ConfigError, match=r"dmin = -1.0: must be a positive resolution in Å.*"
                                          "STREAMVI_DMIN"):
        load_config(env={"STREAMVI_DMIN": "-1"})
    with pytest.raises(ConfigError, match="consensus_crystals = 0: must be at least 1"):
        load_config(overrides={"consensus_crystals": "0"}, env={})
    assert main(["merge", "x.stream", "-o", "x.mtz", "--dmin", "0"]) == 2
