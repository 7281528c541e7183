"""Command-line entry point ``streamvi`` (the only module that reads argv).

Each subcommand declares its options in a ``_add_<name>`` function and runs in ``_run_<name>``;
``main(argv)`` can be called in-process by tests.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

from streamvi import __version__
from streamvi.errors import StreamviError

log = logging.getLogger("streamvi")


# ---------------------------------------------------------------------------- simulate

def _add_simulate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("simulate", help="simulate a still-shot beamtime (stream file and truth)")
    p.add_argument("--images", type=int, default=2000, help="images (crystals) to simulate")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("-o", "--output", type=Path, help="CrystFEL stream to write")
    p.add_argument("--truth", type=Path, help="MTZ of the true structure factors to write")
    p.add_argument("--dmin", type=float, default=1.8, help="resolution limit, Å")
    p.add_argument("--space-group", default=None,
                   help="space group of the crystal (default 'P 43 21 2', lysozyme-like)")
    p.add_argument("--cell", default=None, help="'a b c alpha beta gamma', Å and degrees "
                   "(default 79.1 79.1 37.9 90 90 90)")
    p.add_argument("--indexing-ambiguity", action="store_true",
                   help="report each image in a random one of the space group's merohedral "
                        "settings, as an indexer does in P 4, P 3, P 63, …")
    p.add_argument("--to", metavar="URL", help="stream the images live to a service (tcp://…)")
    p.add_argument("--rate", type=float, default=None, help="images/s when streaming (--to)")


def _simulate_command(cfg) -> str:
    """The ``streamvi simulate`` command that makes the same images (for the stream header)."""
    cell = " ".join(f"{x:g}" for x in cfg.cell)
    return (f"streamvi simulate --images {cfg.n_images} --seed {cfg.seed} --dmin {cfg.dmin} "
            f"--space-group '{cfg.space_group}' --cell '{cell}'"
            + (" --indexing-ambiguity" if cfg.indexing_ambiguity else ""))


def _run_simulate(args: argparse.Namespace) -> int:
    from streamvi_sim import SimulationConfig, simulate_images, simulate_structure

    if args.output is None and args.to is None:
        raise StreamviError("simulate: give -o OUT.stream and/or --to tcp://HOST:PORT")
    from streamvi.symmetry import parse_cell, parse_space_group, twin_operators

    extra: dict = {}
    if args.space_group:
        extra["space_group"] = parse_space_group(args.space_group).hm
    if args.cell:
        extra["cell"] = tuple(parse_cell(args.cell).parameters)
    cfg = SimulationConfig(n_images=args.images, seed=args.seed, dmin=args.dmin,
                           indexing_ambiguity=args.indexing_ambiguity, **extra)
    twin_operators(cfg.space_group, cfg.cell)       # refuses a cell the group cannot have
    t0 = time.perf_counter()
    truth = simulate_structure(cfg)
    if args.truth:
        truth.to_mtz(args.truth)
    n = 0
    if args.output:
        from streamvi_crystfel.writer import write_stream
        from streamvi_sim import detector_of

        geometry = detector_of(cfg).geometry_text(photon_energy_eV=cfg.photon_energy_eV)
        n = write_stream(args.output, simulate_images(cfg, truth), target_cell=cfg.cell,
                         space_group=cfg.space_group, geometry=geometry,
                         command_line=_simulate_command(cfg))
    if args.to:
        from streamvi.producers.send import send_messages

        send_messages(simulate_images(cfg, truth), args.to, rate=args.rate)
    print(json.dumps({"images": cfg.n_images, "written": n,
                      "stream": str(args.output) if args.output else None,
                      "truth": str(args.truth) if args.truth else None,
                      "seconds": round(time.perf_counter() - t0, 2)}))
    return 0


# ---------------------------------------------------------------------------- inspect

def _add_inspect(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("inspect", help="summarise a CrystFEL stream (or DIALS files) as JSON")
    p.add_argument("path", type=Path, help="a .stream file, or a DIALS .refl or .expt (the pair "
                   "is read together)")


def _run_inspect(args: argparse.Namespace) -> int:
    if not args.path.exists():
        raise StreamviError(f"inspect: {args.path}: no such file")
    if args.path.suffix in (".refl", ".expt"):
        from streamvi_dials import inspect_dials

        summary = inspect_dials(args.path)
    else:
        from streamvi_crystfel import inspect_stream

        summary = inspect_stream(args.path)
    print(json.dumps(summary, indent=2))
    return 0


# ---------------------------------------------------------------------------- merge

def _add_trainer_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model and training")
    g.add_argument("--device", default="auto", help="auto (CUDA when available), cpu or cuda")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--d-model", type=int, default=None, help="width of the scale network")
    g.add_argument("--layers", type=int, default=None, help="residual blocks of the scale network")
    g.add_argument("--mc-samples", type=int, default=None)
    g.add_argument("--scale-kl-weight", type=float, default=None,
                   help="weight of the image-scale prior against the data (default 0.03)")
    g.add_argument("--batch-images", type=int, default=None, help="images per training step")
    g.add_argument("--no-recentre-falloff", dest="recentre_falloff", action="store_false",
                   help="publish the posterior as trained (default: give the amplitudes the "
                        "resolution trend the image scales had taken, docs/model.md)")
    g.add_argument("--no-refine-geometry", dest="refine_geometry", action="store_false",
                   help="keep each image's reported orientation and cell as they are (default: "
                        "refine them through the learnt partiality, docs/model.md)")
    g.add_argument("--likelihood", choices=("student_t", "normal"), default=None)


def _trainer_config(args: argparse.Namespace):
    from streamvi.merging.trainer import TrainerConfig

    # 8 Monte Carlo samples: the CPU default (abismal's 32 costs ~25 % more time per step
    # for no measurable gain in CC at 2,000 images); raise it on a GPU
    cfg = TrainerConfig(device=args.device, seed=args.seed, mc_samples=8)
    for flag, attr in (("d_model", "d_model"), ("layers", "n_layers"),
                       ("mc_samples", "mc_samples"), ("likelihood", "likelihood"),
                       ("scale_kl_weight", "scale_kl_weight")):
        v = getattr(args, flag)
        if v is not None:
            setattr(cfg, attr, v)
    cfg.refine_geometry = args.refine_geometry
    return cfg


def _add_merge(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("merge", help="merge CrystFEL streams offline with the streamvi model")
    p.add_argument("files", nargs="+", type=Path)
    p.add_argument("-o", "--output", type=Path, required=True, help="MTZ to write")
    p.add_argument("--space-group", help="e.g. 'P 43 21 2' (default: lowest symmetry of the "
                   "stream's lattice)")
    p.add_argument("--cell", help="'a b c alpha beta gamma', Å and degrees (default: target cell)")
    p.add_argument("--dmin", type=float, help="resolution limit, Å (default: highest observed)")
    p.add_argument("--anomalous", action="store_true", help="keep F(+) and F(−) apart")
    p.add_argument("--reference", type=Path, metavar="MTZ",
                   help="write the merge in this data set's indexing setting (space groups "
                        "with an indexing ambiguity, e.g. P 4, P 3, P 63)")
    p.add_argument("--reference-column", metavar="COL",
                   help="amplitude or intensity column of --reference (default: F, FP, …, I)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--epochs", type=float, default=None,
                   help="passes over the data (default 10, and at least 1,500 steps: small "
                        "data sets need more passes)")
    g.add_argument("--steps", type=int, default=None, help="optimiser steps")
    p.add_argument("--shells", type=int, default=10, help="resolution shells in the table")
    p.add_argument("--json", action="store_true", help="print the shell table as JSON too")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    _add_trainer_options(p)


def _run_merge(args: argparse.Namespace) -> int:
    import torch

    from streamvi.config import check_device
    from streamvi.merging.engine import EngineConfig
    from streamvi.merging.offline import (Progress, check_output_path, load_files, merge_crystals,
                                resolve_space)
    from streamvi.publish.mtz import MtzInfo, write_snapshot_mtz
    from streamvi.merging.reference import read_reference

    # mistakes that need no data are refused before anything is read or trained
    check_device(args.device, key="--device")
    check_output_path(args.output, flag="-o")
    reference = (read_reference(args.reference, args.reference_column)
                 if args.reference else None)
    data = load_files(args.files)
    for r in data.rejected[:20]:
        log.warning("skipped: %s", r)
    if len(data.rejected) > 20:
        log.warning("… and %d more skipped pieces", len(data.rejected) - 20)
    space = resolve_space(data, space_group=args.space_group, cell=args.cell, dmin=args.dmin,
                          anomalous=args.anomalous)
    ecfg = EngineConfig(n_shells=args.shells, recentre_falloff=args.recentre_falloff)
    if args.batch_images:
        ecfg.batch_images = args.batch_images
    tcfg = _trainer_config(args)
    print(f"streamvi merge: {len(data.crystals)} crystals, {len(data.rejected)} skipped; "
          f"{space.space_group.hm}, cell {tuple(round(x, 2) for x in space.cell.parameters)}, "
          f"dmin {space.dmin:.2f} Å, {space.n_unique} unique rows, anomalous={space.anomalous}, "
          f"torch threads {torch.get_num_threads()}", file=sys.stderr)
    t0 = time.perf_counter()
    snapshot, engine = merge_crystals(
        data.crystals, space, trainer_config=tcfg, engine_config=ecfg, epochs=args.epochs,
        steps=args.steps, progress=None if args.quiet else Progress,
        history=[f"merge of {', '.join(p.name for p in args.files)}"[:80]],
        reference=reference)
    seconds = time.perf_counter() - t0
    store = engine.store
    # the training-free half-set figures beside the model's (docs/metrics.md)
    from streamvi.quality.feedback import attach_data_estimate, store_sums

    sum_i_half, wilson = store_sums(engine)
    attach_data_estimate(snapshot.stats, snapshot.space, snapshot.obs_count, sum_i_half, wilson)
    write_snapshot_mtz(snapshot, args.output,
                       info=MtzInfo.from_runs(dict(store.runs), store.mean_wavelength()))
    if store.rejected_counts or store.duplicate_counts:
        print("not merged: " + ", ".join(
            [f"{n} {reason}" for reason, n in sorted(store.rejected_counts.items())]
            + [f"{n} duplicates by {kind}" for kind, n in
               sorted(store.duplicate_counts.items())]), file=sys.stderr)
    print(snapshot.stats.format())
    settings = engine.store.setting_counts()
    if settings:
        print("images per indexing setting (the twin law that puts each in the merge's): "
              + ", ".join(f"{op} {n}" for op, n in settings.items()))
    if reference is not None:
        print(_setting_line(engine, reference.name))
    # what the file holds: one row per hkl (Friedel mates side by side in anomalous mode)
    import gemmi

    rows = gemmi.read_mtz_file(str(args.output)).nreflections
    print(f"wrote {args.output} ({rows} reflections) in {seconds:.1f} s on {engine.device}")
    if args.json:
        from streamvi.jsonsafe import jsonable

        # valid JSON: a figure that is not defined is null, never NaN
        print(json.dumps(jsonable({"stats": snapshot.stats.to_dict(), "seconds": seconds,
                                   "mtz": str(args.output), "mtz_reflections": rows}),
                         allow_nan=False))
    return 0


def _setting_line(engine, name: str) -> str:
    """What the --reference did, for the end of a merge."""
    import numpy as np

    from streamvi.symmetry import op_triplet

    choice = engine.setting_choice
    if engine.space.n_ops == 1:
        return f"{engine.space.space_group.hm} has no indexing ambiguity: {name} was not needed"
    if choice is None or not np.isfinite(choice.cc[choice.op_index]):
        return f"too few reflections in common with {name} to choose a setting"
    ccs = ", ".join(f"{op_triplet(op)} {cc:.3f}" for op, cc in zip(engine.space.twin_ops,
                                                                    choice.cc))
    return (f"setting of {name}: reindexed by {choice.op} (CC(F) per operator: {ccs}; "
            f"{choice.n_common} reflections in common)")


# ---------------------------------------------------------------------------- serve

def _add_serve(sub: argparse._SubParsersAction) -> None:
    from streamvi.config import OPTIONS

    p = sub.add_parser("serve", help="run the online merging service",
                       description="Every option may also come from the TOML file (--config) "
                       "or an environment variable STREAMVI_<NAME>; flags win.")
    p.add_argument("--config", type=Path, help="TOML configuration file")
    groups: dict[str, argparse._ArgumentGroup] = {}
    for o in OPTIONS:
        g = groups.setdefault(o.section, p.add_argument_group(o.section))
        flag = "--" + o.name.replace("_", "-")
        if o.type is bool:
            g.add_argument(flag, dest=o.name, action=argparse.BooleanOptionalAction,
                           default=None, help=o.help)
        elif o.multiple:
            g.add_argument(flag, dest=o.name, action="append", default=None, help=o.help)
        else:
            g.add_argument(flag, dest=o.name, type=str, default=None, help=o.help)


def _run_serve(args: argparse.Namespace) -> int:
    import signal
    import threading

    from streamvi.config import OPTIONS, load_config
    from streamvi.service.service import Service

    overrides = {o.name: getattr(args, o.name) for o in OPTIONS}
    cfg = load_config(args.config, overrides=overrides)
    service = Service(cfg).start()
    done = threading.Event()

    def on_signal(signum, _frame):
        log.info("signal %d: checkpointing and stopping", signum)
        done.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    if hasattr(signal, "SIGUSR1"):
        signal.signal(signal.SIGUSR1, lambda *_: service.request_publish())
    print(json.dumps({"listening": service.ingestor.bound_endpoints,
                      "publish": service.publisher.endpoint if service.publisher else None,
                      "http": getattr(service.metrics_server, "url", None),
                      "out_dir": str(service.out_dir)}), flush=True)
    while not done.wait(0.5):
        pass
    service.stop()
    return 0


# ---------------------------------------------------------------------------- send

def _add_send(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "send", help="stream CrystFEL streams (or DIALS .refl files) into a running service",
        description="Send every crystal of the inputs to a service's PULL endpoint; several "
        "inputs are read at once. With --follow, streams are tailed as indexamajig writes "
        "them (a file cut short or replaced is read again from its start) until Ctrl-C or "
        "SIGTERM; named pipes and '-' are read until their writer closes them.")
    p.add_argument("files", nargs="+", help="CrystFEL streams (.stream, named pipes, '-' for "
                   "standard input) and DIALS files (.refl or .expt, the pair read together)")
    p.add_argument("--to", required=True, metavar="URL", help="the service's endpoint, tcp://…")
    p.add_argument("--rate", type=float, default=None, help="images per second (default: as fast "
                   "as the service takes them)")
    p.add_argument("--follow", action="store_true", help="keep reading streams that grow")
    p.add_argument("--position-file", type=Path, help="JSON file of what was sent; a restart "
                   "resumes after the last crystal sent (pipes are not recorded)")
    p.add_argument("--idle-timeout", type=float, default=None, metavar="S",
                   help="with --follow: stop following a stream after S seconds without new "
                   "data (default: follow until stopped)")
    p.add_argument("--poll", type=float, default=0.1, metavar="S",
                   help="with --follow: seconds between looks at the end of a file")
    p.add_argument("--run", default=None, help="run name of every crystal (default: each "
                   "file's name without its suffix; 'stdin' for '-')")
    p.add_argument("--timeout", type=float, default=None, metavar="S",
                   help="give up when the service takes nothing for S seconds (default: wait)")


def _run_send(args: argparse.Namespace) -> int:
    import signal
    import threading

    from streamvi.producers.send import send_files

    stop = threading.Event()
    previous = {}
    if threading.current_thread() is threading.main_thread():
        # A signal ends the run cleanly: what was sent is flushed and the position file saved.
        for signum in (signal.SIGINT, signal.SIGTERM):
            previous[signum] = signal.signal(signum, lambda *_: stop.set())

    def print_report(report) -> None:
        for name, counts in report.by_file.items():
            print(json.dumps({"file": name, **counts, "seconds": round(report.seconds, 3)}),
                  flush=True)

    try:
        report = send_files(args.files, args.to, follow=args.follow,
                            position_file=args.position_file, rate=args.rate, run=args.run,
                            poll_s=args.poll, idle_timeout_s=args.idle_timeout,
                            stop_event=stop, timeout_s=args.timeout)
    except TimeoutError as exc:     # SendTimeout: no service took anything (exit status 2)
        print_report(exc.report)
        raise StreamviError(str(exc)) from None
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    print_report(report)
    if report.unconfirmed:
        return 3                    # some were not confirmed: the next run sends them again
    return 130 if stop.is_set() and not args.follow else 0


# ---------------------------------------------------------------------------- demo

def _add_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="simulated beamtime → ZeroMQ → service → MTZ, in one go")
    p.add_argument("--images", type=int, default=2000)
    p.add_argument("--rate", type=float, default=200.0, help="images per second")
    p.add_argument("--out-dir", type=Path, default=Path("streamvi-demo"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--no-anomalous", action="store_true")
    p.add_argument("--metrics-port", type=int, default=0, help="status page port (0: any free)")


def _run_demo(args: argparse.Namespace) -> int:
    from streamvi.cli.demo import run_demo

    run_demo(images=args.images, rate=args.rate, out_dir=args.out_dir, seed=args.seed,
             device=args.device, anomalous=not args.no_anomalous, metrics_port=args.metrics_port)
    return 0


# ---------------------------------------------------------------------------- status

def _add_status(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("status", help="a running service's decision: per target, reached or "
                       "the forecast", description="Reads URL/api/status of a running "
                       "service (its status page address, e.g. http://127.0.0.1:9108) and "
                       "prints, per target, whether it is reached or how many more images "
                       "(and minutes at the current rate) it needs; then the resolution "
                       "estimate and the anomalous peak heights.")
    p.add_argument("url", help="the service's status page, e.g. http://127.0.0.1:9108")
    p.add_argument("--json", action="store_true", help="print the feedback as JSON")
    p.add_argument("--timeout", type=float, default=10.0, metavar="S",
                   help="seconds to wait for an answer")


def _run_status(args: argparse.Namespace) -> int:
    import urllib.error
    import urllib.request

    from streamvi.quality.feedback import decision_lines

    url = args.url if "://" in args.url else f"http://{args.url}"
    url = url.rstrip("/") + "/api/status"
    try:
        with urllib.request.urlopen(url, timeout=args.timeout) as resp:
            payload = json.loads(resp.read().decode())
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        raise StreamviError(f"{url}: no status ({reason}); is the service running, and is "
                            "this its status page address (metrics_host:metrics_port)?") \
            from None
    feedback = payload.get("feedback")
    if args.json:
        print(json.dumps(feedback, allow_nan=False))
        return 0
    status = payload.get("status") or {}
    snap = payload.get("snapshot") or {}
    merge = payload.get("merge") or {}
    print(f"streamvi {payload.get('version', '?')} at {args.url}: {status.get('state', '?')}, "
          f"{status.get('crystals_merged', 0)} crystals merged, "
          f"{status.get('images_per_s') or 0.0:.1f} images/s; {merge.get('space_group', '?')} "
          f"to {merge.get('dmin', '?')} Å")
    if feedback is None:
        print("no snapshot yet: nothing to judge" if not snap else
              "this service publishes no feedback")
        return 0
    for line in decision_lines(feedback):
        print(line)
    return 0


# ---------------------------------------------------------------------------- config

def _add_config(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("config", help="print an example configuration, or check one")
    p.add_argument("--example", action="store_true", help="print a commented example TOML")
    p.add_argument("--check", type=Path, help="load this file and print the resolved values")


def _run_config(args: argparse.Namespace) -> int:
    from streamvi.config import example_toml, load_config

    if args.check:
        cfg = load_config(args.check)
        print(json.dumps({k: str(v) if isinstance(v, Path) else v
                          for k, v in cfg.values.items()}, indent=2))
        return 0
    print(example_toml())
    return 0


# ---------------------------------------------------------------------------- keys

def _add_keys(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("keys", help="generate ZeroMQ CURVE key pairs (service and producers)")
    p.add_argument("--out", type=Path, required=True, help="directory for the key files")
    p.add_argument("--name", action="append", required=True,
                   help="key pair name (repeatable), e.g. server, producer1")


def _run_keys(args: argparse.Namespace) -> int:
    from streamvi.ingest.keys import generate_keypair

    for name in args.name:
        public, secret = generate_keypair(args.out, name)
        print(json.dumps({"name": name, "public": str(public), "secret": str(secret)}))
    return 0


# ---------------------------------------------------------------------------- main

COMMANDS = {
    "simulate": (_add_simulate, _run_simulate),
    "inspect": (_add_inspect, _run_inspect),
    "merge": (_add_merge, _run_merge),
    "serve": (_add_serve, _run_serve),
    "send": (_add_send, _run_send),
    "demo": (_add_demo, _run_demo),
    "status": (_add_status, _run_status),
    "config": (_add_config, _run_config),
    "keys": (_add_keys, _run_keys),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="streamvi",
        description="Online variational merging of serial-crystallography data.")
    parser.add_argument("--version", action="version", version=f"streamvi {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for add, _ in COMMANDS.values():
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the ``streamvi`` command line; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return COMMANDS[args.command][1](args)
    except StreamviError as exc:
        print(f"streamvi {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
