"""``streamvi merge``: the engine offline over files, with a progress bar and the shell table."""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any, Sequence

from streamvi.cli.options import add_options, resolved
from streamvi.config import Config
from streamvi.errors import ConfigError

log = logging.getLogger("streamvi")


def add(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("merge", help="merge CrystFEL streams offline with the streamvi model")
    add_options(p, "merge")


def merge_config(argv: Sequence[str]) -> Config:
    """``streamvi merge``'s options from its arguments (``argv`` without ``merge``), as the
    command resolves them (benchmarks build their merges from it)."""
    parser = argparse.ArgumentParser(prog="streamvi merge")
    add_options(parser, "merge")
    return resolved(parser.parse_args(list(argv)), "merge")


def model_configs(opts: Config) -> tuple[Any, Any]:
    """The :class:`TrainerConfig` and :class:`EngineConfig` of a merge, derived from its
    options (fields no option sets keep the classes' defaults)."""
    from streamvi.merging.engine import EngineConfig
    from streamvi.merging.trainer import TrainerConfig

    return TrainerConfig(**opts.settings("trainer")), EngineConfig(**opts.settings("engine"))


def run(args: argparse.Namespace) -> int:
    import torch

    from streamvi.merging.device import check_device
    from streamvi.merging.offline import (Progress, check_output_path, load_files,
                                          merge_crystals, resolve_space)
    from streamvi.merging.reference import read_reference
    from streamvi.publish.mtz import MtzInfo, write_snapshot_mtz

    opts = resolved(args, "merge")
    # mistakes that need no data are refused before anything is read or trained
    check_device(opts.device, key="--device")
    check_output_path(opts.output, flag="-o")
    reference = (read_reference(opts.reference, opts.reference_column)
                 if opts.reference else None)
    prior = (read_reference(opts.prior_mtz, opts.prior_column, flag="--prior-mtz")
             if opts.prior_mtz else None)
    if opts.prior_model and not Path(opts.prior_model).is_file():
        raise ConfigError(f"--prior-model {opts.prior_model}: no such file; give the PDB or "
                          "mmCIF model of the merged crystal")
    data = load_files(opts.files)
    for r in data.rejected[:20]:
        log.warning("skipped: %s", r)
    if len(data.rejected) > 20:
        log.warning("… and %d more skipped pieces", len(data.rejected) - 20)
    conditions = label_conditions(opts, data)
    space = resolve_space(data, space_group=opts.space_group, cell=opts.cell, dmin=opts.dmin,
                          anomalous=opts.anomalous)
    if opts.prior_model:
        from streamvi.merging.reference import model_amplitudes

        prior = model_amplitudes(opts.prior_model, space.dmin)
    tcfg, ecfg = model_configs(opts)
    print(f"streamvi merge: {len(data.crystals)} crystals, {len(data.rejected)} skipped; "
          f"{space.space_group.hm}, cell {tuple(round(x, 2) for x in space.cell.parameters)}, "
          f"dmin {space.dmin:.2f} Å, {space.n_unique} unique rows, anomalous={space.anomalous}, "
          f"torch threads {torch.get_num_threads()}", file=sys.stderr)
    t0 = time.perf_counter()
    snapshot, engine = merge_crystals(
        data.crystals, space, trainer_config=tcfg, engine_config=ecfg, epochs=opts.epochs,
        steps=opts.steps, progress=None if opts.quiet else Progress,
        history=[f"merge of {', '.join(p.name for p in opts.files)}"[:80]],
        reference=reference, conditions=conditions,
        coupled_reference=(conditions[0] if conditions is not None and len(conditions) > 1
                           and opts.coupled_prior else None),
        prior=prior, partiality_check=opts.partiality_check, row_refresh=opts.row_refresh)
    seconds = time.perf_counter() - t0
    store = engine.store
    if conditions is not None:
        return _write_conditions(opts, engine, seconds, reference)
    # the training-free half-set figures beside the model's (docs/metrics.md)
    from streamvi.quality.feedback import attach_store_estimate

    attach_store_estimate(snapshot, engine)
    write_snapshot_mtz(snapshot, opts.output,
                       info=MtzInfo.from_runs(dict(store.runs), store.mean_wavelength()))
    if store.rejected_counts or store.duplicate_counts:
        print("not merged: " + ", ".join(
            [f"{n} {reason}" for reason, n in sorted(store.rejected_counts.items())]
            + [f"{n} duplicates by {kind}" for kind, n in
               sorted(store.duplicate_counts.items())]), file=sys.stderr)
    print(snapshot.stats.format())
    beyond = store.beyond_dmin
    if beyond.n_beyond:
        # --dmin cut the data (unset, the table reaches the highest resolution observed)
        shells = ", ".join(f"{sh['d_max']:.2f}–{sh['d_min']:.2f} Å {sh['mean_i_over_sigma']:.2f}"
                           for sh in beyond.shells() if sh["mean_i_over_sigma"] is not None)
        print(f"{beyond.n_beyond} reflections ({beyond.fraction:.1%}) beyond --dmin "
              f"{beyond.dmin:g} Å, out to {beyond.d_min_seen:.2f} Å, not merged (mean I/σ(I) "
              f"per observation: {shells}); unset, --dmin is the data's own limit")
    settings = engine.store.setting_counts()
    if settings:
        print("images per indexing setting (the twin law that puts each in the merge's): "
              + ", ".join(f"{op} {n}" for op, n in settings.items()))
    if reference is not None:
        print(setting_line(engine, reference.name))
    # what the file holds: one row per hkl (Friedel mates side by side in anomalous mode)
    import gemmi

    rows = gemmi.read_mtz_file(str(opts.output)).nreflections
    print(f"wrote {opts.output} ({rows} reflections) in {seconds:.1f} s on {engine.device}")
    from streamvi.merging.offline import partiality_advice, reports_partiality_geometry

    # where the partiality check was turned off (it acts where this would speak)
    advice = partiality_advice(snapshot.falloff_b,
                               sum(reports_partiality_geometry(c) for c in data.crystals),
                               engine.trainer.config.geometric_partiality)
    if advice:
        log.warning(advice)
    if opts.json:
        from streamvi.jsonsafe import jsonable

        # valid JSON: a figure that is not defined is null, never NaN
        print(json.dumps(jsonable({"stats": snapshot.stats.to_dict(), "seconds": seconds,
                                   "mtz": str(opts.output), "mtz_reflections": rows,
                                   # the relative B given to the amplitudes (change 10), and
                                   # whether the merge ran with the geometric partiality
                                   # (asked for, or turned on by the partiality check)
                                   "falloff_b": snapshot.falloff_b,
                                   "geometric_partiality":
                                       engine.trainer.config.geometric_partiality}),
                         allow_nan=False))
    return 0


def label_conditions(opts: Config, data: Any) -> tuple[str, ...] | None:
    """Set each loaded crystal's condition from ``--condition`` or ``--condition-field``
    with ``--condition-map``; the conditions in table order (the reference first), or None
    when no condition option is given."""
    from streamvi.producers.conditions import (condition_order, label_all, label_by_field,
                                               label_by_file, parse_condition_map,
                                               per_input_names, read_condition_file)

    if opts.condition:
        names = per_input_names(opts.condition, len(data.file_starts))
        ends = data.file_starts[1:] + [len(data.crystals)]
        for name, lo, hi in zip(names, data.file_starts, ends):
            label_all(data.crystals[lo:hi], name)
    elif opts.condition_field:
        if not opts.condition_map:
            raise ConfigError("--condition-field needs --condition-map, the conditions of its "
                              "values, e.g. --condition-map '0=dark,1=light'")
        label_by_field(data.crystals, opts.condition_field,
                       parse_condition_map(opts.condition_map))
    elif opts.condition_file:
        label_by_file(data.crystals, read_condition_file(opts.condition_file))
    elif opts.condition_map or opts.reference_condition:
        flag = "--condition-map" if opts.condition_map else "--reference-condition"
        raise ConfigError(f"{flag} needs the crystals' conditions: give --condition NAME, "
                          "--condition-field KEY or --condition-file FILE as well")
    else:
        return None
    conditions = condition_order(data.crystals, opts.reference_condition)
    if not conditions:
        if opts.condition_file:
            example = data.crystals[0].image if data.crystals else "?"
            raise ConfigError(f"no crystal has a condition: --condition-file "
                              f"{opts.condition_file} names none of the images (the stream's "
                              f"are like {example!r}: image file, then //event)")
        raise ConfigError(f"no crystal has a condition: --condition-field "
                          f"{opts.condition_field!r} with --condition-map "
                          f"{opts.condition_map!r} named none (is the header copied into "
                          "the stream, with these values?)")
    return conditions


def condition_paths(output: Path, conditions: Sequence[str]) -> tuple[dict[str, Path],
                                                                      dict[str, Path]]:
    """``OUT-<condition>.mtz`` per condition and ``OUT-<condition>-minus-<reference>.mtz``
    per condition after the first (the reference), beside ``output``."""
    from streamvi.publish.mtz import safe_name

    def beside(tag: str) -> Path:
        return output.with_name(f"{output.stem}-{tag}{output.suffix or '.mtz'}")

    ref = safe_name(conditions[0])
    merged = {c: beside(safe_name(c)) for c in conditions}
    diffs = {c: beside(f"{safe_name(c)}-minus-{ref}") for c in conditions[1:]}
    return merged, diffs


def _write_conditions(opts: Config, engine: Any, seconds: float, reference: Any) -> int:
    """Outputs of a merge with conditions: an MTZ per condition and a difference MTZ per
    condition against the reference, with their tables on stdout."""
    import gemmi
    import numpy as np

    from streamvi.publish.mtz import MtzInfo, difference_dataset, write_difference_mtz, \
        write_snapshot_mtz

    store = engine.store
    conditions = engine.conditions
    info = MtzInfo.from_runs(dict(store.runs), store.mean_wavelength())
    history = [f"merge of {', '.join(p.name for p in opts.files)}"[:80]]
    snaps = engine.condition_snapshots(history)
    merged, diffs = condition_paths(Path(opts.output), conditions)
    report: dict[str, Any] = {"seconds": seconds, "conditions": {}, "differences": {}}
    if store.rejected_counts or store.duplicate_counts:
        print("not merged: " + ", ".join(
            [f"{n} {reason}" for reason, n in sorted(store.rejected_counts.items())]
            + [f"{n} duplicates by {kind}" for kind, n in
               sorted(store.duplicate_counts.items())]), file=sys.stderr)
    for name, snap in snaps.items():
        write_snapshot_mtz(snap, merged[name], info=info)
        rows = gemmi.read_mtz_file(str(merged[name])).nreflections
        print(f"condition {name}: {snap.n_images} images")
        print(snap.stats.format())
        print(f"wrote {merged[name]} ({rows} reflections)")
        report["conditions"][name] = {"stats": snap.stats.to_dict(), "mtz": str(merged[name]),
                                      "images": snap.n_images, "mtz_reflections": rows}
    ref = conditions[0]
    for name, path in diffs.items():
        ds = difference_dataset(snaps[name], snaps[ref])
        write_difference_mtz(snaps[name], snaps[ref], path, names=(name, ref), info=info,
                             dataset=ds)
        z = (ds["DF"] / ds["SIGDF"]).to_numpy(np.float64)
        ok = np.isfinite(z)
        n_sig = int((np.abs(z[ok]) > 3).sum())
        rms = float(np.sqrt(np.nanmean(np.square(ds["DF"].to_numpy(np.float64)))))
        gain = ds.attrs.get("gain_correction")
        print(f"wrote {path}: {name} - {ref}, {int(ok.sum())} reflections, r.m.s. DF "
              f"{rms:.4g}, {n_sig} with |DF|/SIGDF > 3")
        if gain is not None:
            print("  DF x by shell for the coupled prior's shrinkage (low to high "
                  "resolution): " + " ".join(f"{x:.2f}" for x in gain.shell_factor))
        report["differences"][f"{name}-minus-{ref}"] = {
            "mtz": str(path), "reflections": int(ok.sum()), "rms_df": rms,
            "significant": n_sig,
            "df_gain_factor": None if gain is None else gain.shell_factor.tolist(),
            "df_gain_d_min": None if gain is None else gain.d_min.tolist()}
    if reference is not None:
        print(setting_line(engine, reference.name))
    print(f"merged {len(conditions)} conditions in {seconds:.1f} s on {engine.device}")
    if opts.json:
        from streamvi.jsonsafe import jsonable

        print(json.dumps(jsonable(report), allow_nan=False))
    return 0


def setting_line(engine, name: str) -> str:
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
