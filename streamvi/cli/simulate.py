"""``streamvi simulate``: a seeded still-shot beamtime, as a stream file and/or live."""
from __future__ import annotations

import argparse
import json
import time

from streamvi.cli.options import add_options, resolved
from streamvi.errors import StreamviError


def add(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("simulate", help="simulate a still-shot beamtime (stream file and truth)")
    add_options(p, "simulate")


def simulate_command(cfg) -> str:
    """The ``streamvi simulate`` command that makes the same images (for the stream header)."""
    cell = " ".join(f"{x:g}" for x in cfg.cell)
    return (f"streamvi simulate --images {cfg.n_images} --seed {cfg.seed} --dmin {cfg.dmin} "
            f"--space-group '{cfg.space_group}' --cell '{cell}'"
            + (" --indexing-ambiguity" if cfg.indexing_ambiguity else "")
            + (f" --conditions {','.join(cfg.conditions)}" if cfg.conditions else "")
            + (f" --condition-ratio {','.join(map(str, cfg.condition_ratio))}"
               if cfg.condition_ratio else "")
            + (f" --light-change '{cfg.light_change}'" if cfg.light_change else ""))


def _condition_fields(opts) -> dict:
    """``SimulationConfig`` fields of ``--conditions``, ``--condition-ratio`` and
    ``--light-change`` (none given: none)."""
    out: dict = {}
    if opts.conditions:
        out["conditions"] = tuple(c.strip() for c in opts.conditions.split(",") if c.strip())
    if opts.condition_ratio:
        try:
            out["condition_ratio"] = tuple(int(r) for r in opts.condition_ratio.split(","))
        except ValueError:
            raise StreamviError(f"--condition-ratio {opts.condition_ratio!r}: give one integer "
                                "per condition, comma-separated, e.g. 1,3") from None
    if opts.light_change:
        out["light_change"] = opts.light_change
    return out


def run(args: argparse.Namespace) -> int:
    # the command line may name the plugins it drives (docs/architecture.md)
    from streamvi_sim import SimulationConfig, simulate_images, simulate_structure

    opts = resolved(args, "simulate")
    if opts.output is None and opts.to is None:
        raise StreamviError("simulate: give -o OUT.stream and/or --to tcp://HOST:PORT")
    from streamvi.symmetry import parse_cell, parse_space_group, twin_operators

    extra: dict = {}
    if opts.space_group:
        extra["space_group"] = parse_space_group(opts.space_group).hm
    if opts.cell:
        extra["cell"] = tuple(parse_cell(opts.cell).parameters)
    extra.update(_condition_fields(opts))
    try:
        cfg = SimulationConfig(n_images=opts.images, seed=opts.seed, dmin=opts.dmin,
                               indexing_ambiguity=opts.indexing_ambiguity, **extra)
    except ValueError as exc:
        raise StreamviError(f"simulate: {exc}") from None
    twin_operators(cfg.space_group, cfg.cell)       # refuses a cell the group cannot have
    t0 = time.perf_counter()
    truth = simulate_structure(cfg)
    written = []
    if opts.truth:
        truth.to_mtz(opts.truth)
        if cfg.conditions:
            from streamvi_sim.conditions import condition_truths, write_condition_truths

            written = write_condition_truths(cfg, condition_truths(cfg, truth), opts.truth)
    n = 0
    if opts.output:
        from streamvi_crystfel.writer import write_stream
        from streamvi_sim import detector_of

        geometry = detector_of(cfg).geometry_text(photon_energy_eV=cfg.photon_energy_eV)
        n = write_stream(opts.output, simulate_images(cfg, truth), target_cell=cfg.cell,
                         space_group=cfg.space_group, geometry=geometry,
                         command_line=simulate_command(cfg))
    if opts.to:
        from streamvi.producers.send import send_messages

        send_messages(simulate_images(cfg, truth), opts.to, rate=opts.rate)
    print(json.dumps({"images": cfg.n_images, "written": n,
                      "stream": str(opts.output) if opts.output else None,
                      "truth": str(opts.truth) if opts.truth else None,
                      **({"conditions": list(cfg.conditions),
                          "condition_truths": [str(p) for p in written]}
                         if cfg.conditions else {}),
                      "seconds": round(time.perf_counter() - t0, 2)}))
    return 0
