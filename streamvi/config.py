"""Service configuration: one declaration per option, read from TOML, environment and flags.

Every option of ``streamvi serve`` is declared once in :data:`OPTIONS` and can be set, in
increasing precedence, by its default, the TOML file (``--config``), an environment variable
``STREAMVI_<NAME>`` and a command-line flag ``--<name-with-dashes>``.
"""
from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from streamvi.errors import ConfigError


@dataclass(frozen=True)
class Option:
    """One configuration option."""

    name: str
    type: type
    default: Any
    help: str
    section: str
    multiple: bool = False


OPTIONS: tuple[Option, ...] = (
    # --- input
    Option("listen", str, ["tcp://127.0.0.1:5555"], "ZeroMQ endpoint(s) to receive crystals on "
           "(repeatable). PULL binds; loopback unless you say otherwise", "input", multiple=True),
    Option("listen_mode", str, "pull", "pull (bind, producers PUSH to us) or sub (connect to "
           "producers' PUB)", "input"),
    Option("sub_topic", str, "", "topic prefix for listen_mode = sub", "input"),
    Option("max_message_bytes", int, 64 * 1024 * 1024, "larger messages are rejected", "input"),
    Option("queue_max_messages", int, 2000, "decoded crystals waiting for the trainer; when "
           "full, ingest stops reading and producers are slowed (never dropped)", "input"),
    Option("rcvhwm", int, 1000, "ZeroMQ receive high-water mark, messages", "input"),
    Option("curve_secret_key", str, "", "server secret key file (streamvi keys) to require "
           "CURVE encryption and authentication of producers", "input"),
    Option("curve_allowed_clients", str, "", "directory of allowed producer public key files",
           "input"),
    Option("om_url", str, "", "OM data-broadcast URL (tcp://om-host:12321) for hit rate and beam "
           "figures on the status page; empty: off", "input"),
    Option("om_allow_pickle", bool, False, "accept OM's pickled broadcasts (only for an OM you "
           "run, on a network only it can publish on)", "input"),
    # --- merge
    Option("space_group", str, "", "space group of the merge, e.g. 'P 43 21 2' (required)",
           "merge"),
    Option("cell", str, "", "'a b c alpha beta gamma' in Å and degrees, with the space group's "
           "metric symmetry (empty: the median of the first crystals' cells, symmetrised)",
           "merge"),
    Option("consensus_crystals", int, 16, "without a cell: crystals whose median cell becomes "
           "the merge's (the merge starts when they are in, or consensus_wait s after the "
           "first)", "merge"),
    Option("consensus_wait", float, 5.0, "seconds after the first crystal after which the merge "
           "starts with the crystals in by then, if fewer than consensus_crystals", "merge"),
    Option("cell_length_tolerance", float, 0.05, "crystals whose cell lengths differ from the "
           "merge's by more than this fraction are rejected (cell_mismatch)", "merge"),
    Option("cell_angle_tolerance", float, 5.0, "crystals whose cell angles differ from the "
           "merge's by more than this many degrees are rejected (cell_mismatch)", "merge"),
    Option("intensity_outlier_ratio", float, 1000.0, "crystals whose median |I| exceeds this "
           "many times the typical crystal's are rejected (intensity_outlier); 0: off",
           "merge"),
    Option("dmin", float, 2.0, "resolution limit, Å", "merge"),
    Option("anomalous", bool, False, "keep F(+) and F(-) separate", "merge"),
    Option("reference", str, "", "MTZ whose indexing setting the published merge takes (space "
           "groups with an indexing ambiguity: P 4, P 3, P 63, ...); empty: the merge's own",
           "merge"),
    Option("reference_column", str, "", "amplitude or intensity column of the reference "
           "(default: F, FP, ..., then I)", "merge"),
    # --- model
    Option("device", str, "auto", "auto (CUDA when available), cpu or cuda", "model"),
    Option("seed", int, 0, "random seed", "model"),
    Option("d_model", int, 16, "width of the image-scale network (16 keeps the first training "
           "visit under a second at 200 images/s on 2 CPU cores; 32, the merge default, gained "
           "0.0007 in CC and 0.02 in CCanom on the demo)", "model"),
    Option("n_layers", int, 2, "residual blocks in each stack of the image-scale network",
           "model"),
    Option("mc_samples", int, 8, "Monte Carlo samples per step", "model"),
    Option("scale_kl_weight", float, 0.03, "weight of the image-scale prior against the data "
           "(see docs/model.md)", "model"),
    Option("posterior_average", float, 0.99, "publish each merged reflection's exponential "
           "average over its last ~100 updates instead of its current value (0: off; removes "
           "the jitter of a constant learning rate, docs/model.md)", "model"),
    Option("pooled_merge_ratio", bool, True, "the image-scale network also pools each "
           "observation against the current merge (amortised post-refinement of partiality; "
           "false to resume a checkpoint written before this option existed)", "model"),
    Option("refine_geometry", bool, True, "refine each image's reported orientation and "
           "reciprocal-axis lengths at every visit, through the learnt partiality (per-image "
           "post-refinement, docs/model.md change 9)", "model"),
    Option("recentre_falloff", bool, True, "publish the amplitudes with the resolution trend "
           "that the image scales' geometric mean had taken (one relative B per snapshot, in "
           "the MTZ history; docs/model.md change 10); false publishes the posterior as trained",
           "model"),
    Option("sync_free_steps", str, "auto", "auto (on with CUDA), on or off: training steps in "
           "which the host never waits for the GPU (docs/performance.md); off goes back to the "
           "sparse step of the CPU", "model"),
    Option("cpu_threads", int, 1, "torch threads for training on the CPU (1 avoids thread "
           "contention with ingest and publishing on small machines)", "model"),
    Option("batch_images", int, 8, "images per training step", "model"),
    Option("new_share", float, 0.5, "share of each batch reserved for never-visited images",
           "model"),
    # --- output
    Option("out_dir", Path, Path("streamvi-out"), "directory for MTZ files, spool, checkpoints "
           "and the dead-letter file", "output"),
    Option("publish_interval", float, 10.0, "seconds between MTZ snapshots", "output"),
    Option("keep_snapshots", int, 5, "numbered MTZ snapshots kept beside latest.mtz", "output"),
    Option("publish_endpoint", str, "tcp://127.0.0.1:5556", "ZeroMQ PUB endpoint for topics "
           "'merged' and 'stats' (empty: off)", "output"),
    Option("n_shells", int, 10, "resolution shells of the statistics", "output"),
    Option("metrics_host", str, "127.0.0.1", "address of the HTTP status page and /metrics",
           "output"),
    Option("metrics_port", int, 9108, "port of the HTTP status page and /metrics (0: any free "
           "port, -1: off)", "output"),
    # --- targets and live feedback (docs/metrics.md, "When to stop")
    Option("target_cc_half", str, "0.3@dmin", "CC½ to reach at a resolution, 'VALUE@D' (D in Å "
           "or 'dmin'; judged on the training-free half-set CC½ of the shell holding D): the "
           "status page forecasts the images still needed; empty: no target", "targets"),
    Option("target_ccanom", str, "", "CCanom to reach at a resolution, 'VALUE@D' (judged on "
           "the model's CCanom; append ':data' for the half-set averages'); empty: no target",
           "targets"),
    Option("target_completeness", float, 0.99, "overall completeness to reach (ratio 0-1); "
           "0: no target", "targets"),
    Option("target_multiplicity", float, 0.0, "overall multiplicity to reach; 0: no target",
           "targets"),
    Option("model", str, "", "PDB or mmCIF of a known or partial structure: each snapshot "
           "computes an anomalous difference map with its phases and publishes the peak "
           "height at each heavy atom (anomalous mode); empty: off", "targets"),
    # --- reliability
    Option("checkpoint_interval", float, 60.0, "seconds between checkpoints (also on SIGTERM)",
           "reliability"),
    Option("spool_fsync", str, "batch", "always, batch or never: when accepted messages are "
           "forced to disk", "reliability"),
    Option("device_budget_mb", float, 0.0, "reflection memory on the device before the host "
           "tier is used (0: unlimited)", "reliability"),
)
OPTION_BY_NAME = {o.name: o for o in OPTIONS}


@dataclass
class ServiceConfig:
    """Resolved configuration of one service instance (attribute per option)."""

    values: dict[str, Any] = field(default_factory=dict)
    sources: dict[str, str] = field(default_factory=dict)

    def __getattr__(self, name: str) -> Any:
        try:
            return self.__dict__["values"][name]
        except KeyError:
            raise AttributeError(name) from None

    def replace(self, **kw: Any) -> "ServiceConfig":
        v = dict(self.values)
        for k, x in kw.items():
            if k not in OPTION_BY_NAME:
                raise ConfigError(f"unknown option {k!r}")
            v[k] = _coerce(OPTION_BY_NAME[k], x, "override")
        return ServiceConfig(v, dict(self.sources))


def _coerce(opt: Option, value: Any, where: str) -> Any:
    """Convert ``value`` to the option's type, with a message naming where it came from."""
    if opt.multiple:
        if isinstance(value, str):
            items = [x.strip() for x in value.split(",") if x.strip()]
        elif isinstance(value, (list, tuple)):
            items = list(value)
        else:
            raise ConfigError(f"{where}: '{opt.name}' must be a list of strings, got {value!r}")
        return [_coerce(Option(opt.name, opt.type, None, "", opt.section), x, where) for x in items]
    try:
        if opt.type is bool:
            if isinstance(value, bool):
                return value
            s = str(value).strip().lower()
            if s in ("1", "true", "yes", "on"):
                return True
            if s in ("0", "false", "no", "off", ""):
                return False
            raise ValueError(value)
        if opt.type is int and isinstance(value, float) and not value.is_integer():
            raise ValueError(value)
        return opt.type(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{where}: '{opt.name}' = {value!r} is not a valid "
                          f"{opt.type.__name__} ({opt.help})") from None


def load_config(path: str | Path | None = None, *, env: dict[str, str] | None = None,
                overrides: dict[str, Any] | None = None) -> ServiceConfig:
    """Resolve the configuration: defaults < TOML file < environment < overrides (flags).

    Raises
    ------
    ConfigError
        Unknown keys (with the list of known ones), bad values, unreadable file.
    """
    values = {o.name: o.default for o in OPTIONS}
    sources = {o.name: "default" for o in OPTIONS}
    if path is not None:
        p = Path(path)
        try:
            data = tomllib.loads(p.read_text())
        except FileNotFoundError:
            raise ConfigError(f"{p}: configuration file not found") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{p}: not valid TOML: {exc}") from None
        flat: dict[str, Any] = {}
        for k, v in data.items():
            if isinstance(v, dict):     # [section] tables are allowed, names stay flat
                flat.update(v)
            else:
                flat[k] = v
        for k, v in flat.items():
            if k not in OPTION_BY_NAME:
                raise ConfigError(f"{p}: unknown key {k!r}; known keys: "
                                  + ", ".join(sorted(OPTION_BY_NAME)))
            values[k] = _coerce(OPTION_BY_NAME[k], v, f"{p}")
            sources[k] = str(p)
    env = os.environ if env is None else env
    for o in OPTIONS:
        var = "STREAMVI_" + o.name.upper()
        if var in env:
            values[o.name] = _coerce(o, env[var], f"environment variable {var}")
            sources[o.name] = var
    for k, v in (overrides or {}).items():
        if v is None:
            continue
        if k not in OPTION_BY_NAME:
            raise ConfigError(f"unknown option {k!r}")
        values[k] = _coerce(OPTION_BY_NAME[k], v, "--" + k.replace("_", "-"))
        sources[k] = "flag"
    return ServiceConfig(values, sources)


def check_device(name: str, *, key: str = "device") -> None:
    """Refuse, before anything starts, a training device this machine does not have.

    Raises
    ------
    ConfigError
        One line naming ``key``, what is missing and what to use instead.
    """
    import torch

    from streamvi.merging.trainer import resolve_device

    try:
        device = resolve_device(str(name))
    except (ValueError, RuntimeError) as exc:
        hint = ("this machine has no usable CUDA GPU (torch " + torch.__version__ + "); use "
                "'cpu' or 'auto'" if "cuda" in str(name).lower() else
                "use auto, cpu, cuda or cuda:N")
        raise ConfigError(f"{key} = {name!r}: {exc}; {hint}") from None
    if device.type == "cuda" and device.index is not None and \
            device.index >= torch.cuda.device_count():
        raise ConfigError(f"{key} = {name!r}: this machine has {torch.cuda.device_count()} "
                          "CUDA device(s); use cuda:0 ... or auto")


def example_toml() -> str:
    """A commented example configuration with every option at its default."""
    out = ["# streamvi serve configuration. Every key can also be given as an environment",
           "# variable STREAMVI_<KEY> or a flag --<key-with-dashes>; flags win.", ""]
    section = None
    for o in OPTIONS:
        if o.section != section:
            section = o.section
            out.append(f"[{section}]")
        out.append(f"# {o.help}")
        out.append(f"{o.name} = {_toml_value(o.default)}")
        out.append("")
    return "\n".join(out)


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    return '"' + str(v).replace("\\", "\\\\").replace('"', '\\"') + '"'


__all__ = ["OPTIONS", "Option", "ServiceConfig", "load_config", "example_toml", "check_device"]
