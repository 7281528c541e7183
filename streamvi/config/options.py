"""Every option of every ``streamvi`` command, declared once.

The flags of each command (:mod:`streamvi.cli.options`), ``serve``'s TOML file and
``STREAMVI_<NAME>`` variables (:mod:`streamvi.config.resolve`), ``streamvi config --example``
and the tables of docs/configuration.md (:mod:`streamvi.config.render`) are generated from
:data:`OPTIONS`; tests/test_config.py checks that the document is up to date.

Where two commands take an option with different defaults the declaration says so
(``defaults``) and why: ``serve`` trains a narrower network than ``merge`` (``d_model``) so
that each image is first visited within a second at beamline rates.
"""
from __future__ import annotations

import math
from pathlib import Path

from streamvi.config.option import Option, at_least, positive

#: Commands with options, in the order the documentation lists them.
COMMANDS = ("serve", "merge", "demo", "simulate", "send", "status", "inspect", "config", "keys")
#: Groups of ``serve``'s options (the TOML tables) and what each is about.
SECTIONS = {
    "input": "receiving crystals",
    "merge": "what is merged",
    "model": "the model and its training",
    "output": "what comes out, and where",
    "targets": "when to stop, and anomalous peaks",
    "reliability": "checkpoints, spool, memory",
    "run": "what the command reads, runs and prints",
}

TRAINING = ("serve", "merge")


def _sync_free(mode: str) -> bool | None:
    return {"auto": None, "on": True, "off": False}[mode.lower()]


def _sync_free_problem(mode: str) -> str | None:
    return None if mode.lower() in ("auto", "on", "off") else "must be auto, on or off"


def _budget_bytes(mb: float) -> int | None:
    return int(mb * 2**20) if mb > 0 else None


def _dmin_problem(dmin: float) -> str | None:
    if math.isfinite(dmin) and dmin > 0:
        return None
    return "must be a positive resolution in Å, e.g. 1.8"


def _outlier_problem(ratio: float) -> str | None:
    if ratio < 0 or 0 < ratio <= 1:
        return "must be above 1 (default 1000), or 0 to turn the check off"
    return None


OPTIONS: tuple[Option, ...] = (
    # ------------------------------------------------------------------ serve: input
    Option("config", Path, None, "TOML file of `serve`'s options (keys as below; `[input]`, "
           "`[merge]`, … tables optional)", "run", in_file=False, metavar="FILE"),
    Option("listen", str, ["tcp://127.0.0.1:5555"], "ZeroMQ endpoint(s) crystals arrive on. "
           "In `pull` mode the service binds them. Loopback by default; a bind on `0.0.0.0`, "
           "`*` or any non-loopback address without CURVE logs a loud warning, because anyone "
           "who reaches the port can inject data into the merge", "input", multiple=True,
           metavar="URL"),
    Option("listen_mode", str, "pull", "`pull`: bind, producers PUSH to the service (lossless, "
           "the producer waits when the service is busy). `sub`: connect to producers' PUB "
           "sockets (a subscriber that falls behind or is not connected yet misses messages)",
           "input"),
    Option("sub_topic", str, "", "topic prefix to subscribe to when `listen_mode = \"sub\"` "
           "(empty: everything)", "input"),
    Option("max_message_bytes", int, 64 * 1024 * 1024, "larger messages are rejected "
           "(counted by reason, kept in `dead-letter.jsonl`)", "input", unit="bytes"),
    Option("queue_max_messages", int, 2000, "decoded crystals waiting for the trainer; when "
           "the queue is full ingest stops reading and producers are slowed down, never "
           "dropped", "input", unit="messages"),
    Option("rcvhwm", int, 1000, "ZeroMQ receive high-water mark", "input", unit="messages"),
    Option("curve_secret_key", str, "", "the service's secret key file (`NAME.key_secret` "
           "from `streamvi keys`). Set, it makes every receiving socket require CURVE: "
           "traffic encrypted, producers authenticated. Empty: no CURVE", "input"),
    Option("curve_allowed_clients", str, "", "directory of the producers' public key files "
           "(`*.key`) that are let in; required with `curve_secret_key`, and the service "
           "refuses to start if it holds none", "input"),
    Option("om_url", str, "", "OM's data-broadcast URL (e.g. `tcp://om-host:12321`): hit "
           "rate, beam energy and indexing yield on the status page, `/metrics` and the "
           "`stats` topic; empty: off", "input"),
    Option("om_allow_pickle", bool, False, "OM broadcasts with Python pickle: accept them "
           "only for an OM you run, on a network only it can publish on (see "
           "docs/integration.md); refused by default", "input"),
    # ------------------------------------------------------------------ what is merged
    Option("space_group", str, "", "space group of the merge (required): Hermann–Mauguin "
           "(`'P 43 21 2'`, `'P43212'`, `'R 3:H'`), a number 1–230 or a Hall symbol",
           "merge", commands=("serve", "merge", "simulate"),
           defaults={"merge": None, "simulate": None},
           helps={"merge": "space group of the merge, e.g. `'P 43 21 2'`; unset: the one the "
                           "input states, else the lowest symmetry of the stream's lattice",
                  "simulate": "space group of the crystal; unset: `'P 43 21 2'` "
                              "(lysozyme-like)"}),
    Option("cell", str, "", "`'a b c alpha beta gamma'` in Å and degrees. It must have the "
           "space group's metric symmetry (a = b in tetragonal groups, 90° angles, …): a cell "
           "without it stops the start with the nearest cell that has it. Empty: the merge's "
           "cell is the per-parameter median of the first `consensus_crystals` crystals' "
           "cells, symmetrised to the space group (logged, and shown on the status page with "
           "where it came from); a restart takes it from the checkpoint", "merge",
           commands=("serve", "merge", "simulate"), defaults={"merge": None, "simulate": None},
           helps={"merge": "`'a b c alpha beta gamma'` in Å and degrees; unset: the stream's "
                           "target cell, else the crystals' median cell, symmetrised",
                  "simulate": "`'a b c alpha beta gamma'` in Å and degrees; unset: "
                              "79.1 79.1 37.9 90 90 90"}),
    Option("consensus_crystals", int, 16, "the merge starts when this many crystals are in, "
           "or `consensus_wait` s after the first: without `cell` their median cell becomes the "
           "merge's (a median, so a hostile or misindexed first crystal does not move it; one "
           "warning line says how many disagree), and the store judges their intensities "
           "together, so no single early crystal sets the reference", "merge",
           unit="crystals", check=at_least(1, ": the merge needs at least 1 crystal")),
    Option("consensus_wait", float, 5.0, "seconds after the first crystal after which the "
           "merge starts with fewer than `consensus_crystals` crystals (a slow stream)",
           "merge", unit="s", check=at_least(0, " s")),
    Option("cell_length_tolerance", float, 0.05, "a crystal whose cell length differs from "
           "the merge's by more than this fraction is rejected "
           "(`crystals_rejected{reason=\"cell_mismatch\"}`, dead-lettered, logged): it is "
           "another crystal form or the set-up's cell is wrong. Real cells of one form scatter "
           "far less (docs/operations.md)", "merge", unit="ratio",
           check=positive("positive (default 0.05)")),
    Option("cell_angle_tolerance", float, 5.0, "the same for the cell angles", "merge",
           unit="degrees", check=positive("positive (default 5°)")),
    Option("intensity_outlier_ratio", float, 1000.0, "a crystal whose median \\|I\\| is more "
           "than this many times the median of the recent crystals' (or whose median I is "
           "below −10 times it) is rejected (`intensity_outlier`): one such crystal used to set "
           "the intensity scale of a whole run. Real crystals spread over one to two decades. "
           "0: off", "merge", check=_outlier_problem),
    Option("dmin", float, 2.0, "resolution limit; reflections beyond it are counted and left "
           "out (serve says when they carry data worth a larger table; restarted on the same "
           "out_dir with another dmin it replays its spool into the new table: "
           "docs/operations.md)", "merge", unit="Å", commands=("serve", "merge", "simulate"),
           defaults={"merge": None, "simulate": 1.8},
           helps={"merge": "resolution limit; unset: the highest resolution observed",
                  "simulate": "resolution limit of the simulated reflections"},
           check=_dmin_problem),
    Option("anomalous", bool, False, "keep F(+) and F(−) apart (CCanom, anomalous columns in "
           "the MTZ)", "merge", commands=("serve", "merge", "demo"), defaults={"demo": True},
           helps={"demo": "simulate anomalous scatterers and keep F(+) and F(−) apart"}),
    Option("reference", str, "", "MTZ whose indexing setting every published merge takes, in "
           "space groups with an indexing ambiguity (P 4, P 3, P 6₃, I 4, …; see "
           "docs/model.md, \"Indexing ambiguity\"); empty: the setting the merge settled in. A "
           "file that cannot be read, lacks the column or is of another crystal form stops the "
           "start with a message", "merge", commands=TRAINING, defaults={"merge": None},
           metavar="MTZ",
           helps={"merge": "write the merge in this data set's indexing setting (space "
                           "groups with an indexing ambiguity, e.g. P 4, P 3, P 63)"}),
    Option("reference_column", str, "", "amplitude (MTZ type F or G) or intensity (type J or "
           "K, its square root is compared) column of `reference`; empty: the first of `F`, "
           "`FP`, `F-obs`, `FOBS`, `F-model`, `FMODEL`, `FC`, `I`, `IMEAN`, `I-obs`, `IOBS`, "
           "then any F or J column, then any G or K column (one Bijvoet mate is enough to "
           "choose a setting)", "merge", commands=TRAINING, defaults={"merge": None},
           metavar="COL"),
    Option("condition", str, None, "pump–probe: the condition (e.g. `dark`) of every crystal "
           "of the inputs; repeat it once per input, in the inputs' order, to give each its "
           "own. With a condition option the merge keeps one set of tables per condition "
           "(one shared scale model) and `-o OUT.mtz` writes `OUT-<condition>.mtz` and "
           "`OUT-<condition>-minus-<reference>.mtz` (docs/time-resolved.md)", "merge",
           commands=("merge", "send"), multiple=True, metavar="NAME", exclusive="condition",
           helps={"send": "pump–probe: the wire condition (e.g. `dark`) of every crystal of "
                          "the inputs; repeat it once per input, in the inputs' order, to "
                          "give each its own (a service with `conditions` merges them side "
                          "by side; docs/time-resolved.md)"}),
    Option("condition_field", str, None, "pump–probe: a per-chunk header value that names each "
           "crystal's condition through `condition_map`, e.g. an event code copied by "
           "`indexamajig --copy-header` (`header/int//sim/pump_code` in simulated streams). "
           "A crystal without the field, or with a value the map does not name, is not merged "
           "(`unknown_condition`)", "merge", commands=("merge", "send"), metavar="KEY",
           exclusive="condition"),
    Option("condition_file", str, None, "pump–probe: an event list, a CSV file whose first "
           "line names the columns `image` (the image file as in the stream's `Image "
           "filename`), `condition` and optionally `event` (as in its `Event:` line); a row "
           "without an event covers every event of its file. A crystal the list does not name "
           "is not merged (`unknown_condition`)", "merge", commands=("merge", "send"),
           metavar="CSV", exclusive="condition"),
    Option("condition_map", str, None, "values of `condition_field` and their conditions, "
           "e.g. `'0=dark,1=light'`", "merge", commands=("merge", "send"),
           metavar="V=NAME,…"),
    Option("conditions", str, "", "pump–probe, live: the conditions this run interleaves, "
           "comma-separated (e.g. `dark,light`), named by each crystal's wire `condition` "
           "(`send --condition…`). The service keeps one set of tables per condition (one "
           "shared scale model) and writes `latest-<condition>.mtz` and "
           "`latest-<condition>-minus-<reference>.mtz`; a crystal of another condition, or "
           "of none, is refused (`unknown_condition`). Empty: every crystal into one merge "
           "(docs/time-resolved.md)", "merge", metavar="A,B,…"),
    Option("new_conditions", int, 4, "pump–probe, live: how many conditions not listed in "
           "`conditions` may appear mid-run (a new delay added during the beamtime): the "
           "first crystal with a new name gives it its own tables and files, logged; once "
           "they are all taken, further new names are refused (`unknown_condition`). Each "
           "costs three posterior tables of memory until used; 0: only the listed conditions",
           "merge", commands=("serve",), metavar="N"),
    Option("reference_condition", str, "", "the condition the others are differenced "
           "against (`DF = F(condition) − F(reference)`); empty: `dark` when present, else "
           "the first condition seen (`serve`: the first of `conditions`)", "merge",
           commands=TRAINING, defaults={"merge": None}, metavar="NAME"),
    Option("prior_mtz", str, "", "amplitudes (or intensities) of an independent data set of "
           "the same crystal, taken as prior knowledge: the merge (with conditions, the "
           "reference condition) takes the double-Wilson prior given them, one correlation "
           "per resolution shell learnt from the data, so few images go further where the "
           "structure agrees and a real difference is kept; rows the file lacks keep the "
           "Wilson prior. The column is chosen as for `reference` (`prior_column`). In space "
           "groups with an indexing ambiguity give the same file as `--reference` "
           "(docs/time-resolved.md)", "merge", commands=TRAINING, metavar="MTZ",
           exclusive="prior", defaults={"merge": None}),
    Option("prior_model", str, "", "a coordinate model (PDB or mmCIF, in the merged "
           "crystal's cell and space group) whose |F_calc| serve as `prior_mtz` would; the "
           "learnt correlation per shell plays the part of σA. No bulk solvent: the lowest "
           "orders are the model's weakest (docs/time-resolved.md)", "merge",
           commands=TRAINING, metavar="PDB", exclusive="prior", defaults={"merge": None}),
    Option("prior_column", str, "", "column of `prior_mtz`; unset: chosen as for "
           "`reference_column`", "merge", commands=TRAINING, metavar="COL",
           defaults={"merge": None}),
    Option("coupled_prior", bool, True, "pump–probe: every condition but the reference takes "
           "the double-Wilson prior given the reference's amplitudes (one correlation per "
           "condition and resolution shell, learnt from the data), so the conditions borrow "
           "precision where they agree and stay free where they differ; "
           "`--no-coupled-prior`: independent Wilson priors (docs/time-resolved.md)", "merge",
           commands=TRAINING),
    # ------------------------------------------------------------------ model and training
    Option("device", str, "auto", "`auto` (CUDA when available, else CPU), `cpu`, `cuda` or "
           "`cuda:N`. `cuda` (or a `cuda:N` this machine does not have) fails at start-up, in "
           "one line, when no GPU is visible, which is what a GPU deployment wants", "model",
           commands=("serve", "merge", "demo"), target="trainer.device"),
    Option("seed", int, 0, "random seed", "model",
           commands=("serve", "merge", "demo", "simulate"), target="trainer.seed",
           helps={"demo": "random seed of the simulation and of the model",
                  "simulate": "random seed of the simulation"}),
    Option("d_model", int, 16, "width of the image-scale network. `serve` takes 16, which "
           "keeps the first training visit of each image under a second at 200 images/s on 2 "
           "CPU cores; `merge` takes 32, which gains a little in CC and CCanom "
           "(docs/performance.md, docs/model.md)", "model", commands=TRAINING,
           defaults={"merge": 32}, target="trainer.d_model"),
    Option("n_layers", int, 2, "residual blocks in each stack of the image-scale network",
           "model", commands=TRAINING, target="trainer.n_layers", flags=("--layers",)),
    Option("mc_samples", int, 8, "Monte Carlo samples per step (abismal takes 32, which costs "
           "a quarter more time per step on a CPU for no measurable gain; raise it on a GPU)",
           "model", commands=TRAINING, target="trainer.mc_samples"),
    Option("likelihood", str, "student_t", "the likelihood of each observed intensity: "
           "`student_t` (32 degrees of freedom, robust to outliers) or `normal`", "model",
           commands=("merge",), choices=("student_t", "normal"), target="trainer.likelihood"),
    Option("surrogate", str, "folded_normal", "surrogate posterior of the acentric "
           "amplitudes: `folded_normal` or `rice` (a Rice distribution, whose density falls to "
           "0 at F = 0 as the acentric Wilson prior's does; docs/model.md, change 14). Centric "
           "amplitudes keep the folded normal", "model", commands=TRAINING,
           choices=("folded_normal", "rice"), target="trainer.surrogate"),
    Option("posterior_lr", float, 0.01, "learning rate of the merged reflections' surrogate "
           "posterior (Adam): a row moves by about this much (in its units, see "
           "`posterior_wilson_units`) per update, so it sets how far a strong reflection seen "
           "on few images can travel from its Wilson start in a merge (docs/model.md)",
           "model", commands=TRAINING, target="trainer.posterior_lr",
           check=positive("positive (default 0.01)")),
    Option("scale_kl_weight", float, 0.03, "weight of the image-scale prior against the data "
           "(see docs/model.md)", "model", commands=TRAINING, target="trainer.scale_kl_weight"),
    Option("posterior_average", float, 0.99, "publish each merged reflection's exponential "
           "average over its updates (decay per update; young rows follow their current value) "
           "instead of the current value, which jitters by a step at the service's constant "
           "learning rate. 0 turns it off (docs/model.md)", "model",
           target="trainer.posterior_average_decay",
           check=lambda v: None if 0.0 <= v < 1.0 else "must lie in [0, 1)"),
    Option("pooled_merge_ratio", bool, True, "the image-scale network's per-image encoder also "
           "sees each observation against the current merge, `asinh(I / E[F²])`, so an "
           "image's pattern of too-strong and too-weak reflections can correct the "
           "partialities its reported orientation gives (amortised post-refinement, "
           "docs/model.md). `--no-pooled-merge-ratio` (or `false`) resumes a checkpoint written "
           "before this option existed (the network's shape differs)", "model",
           target="trainer.pooled_merge_ratio"),
    Option("refine_geometry", bool, True, "refine each image's reported orientation (a small "
           "rotation) and the lengths of its reciprocal axes a*, b*, c* at every visit of the "
           "image, through the partiality the scale network has learnt (per-image "
           "post-refinement, docs/model.md). Six numbers per image, kept in the store and in "
           "checkpoints. Images without an orientation (no astar/bstar/cstar) are left as they "
           "are", "model", commands=TRAINING, target="trainer.refine_geometry"),
    Option("recentre_falloff", bool, True, "publish the amplitudes with the resolution trend "
           "that the image scales' geometric mean had taken: the likelihood cannot tell a "
           "factor in 1/d² on the scales from one on the amplitudes, and the convention (as in "
           "scaling programs that fix the mean relative B at zero) is that the scales' "
           "geometric mean over the recorded reflections is flat in resolution. One relative "
           "B per snapshot, written to the MTZ history (docs/model.md). Training is not "
           "affected", "model", commands=TRAINING, target="engine.recentre_falloff"),
    Option("falloff_near_full", bool, False, "take that geometric mean over near-full "
           "reflections only (within one profile radius of the Bragg condition): right where "
           "the partialities have a resolution trend of their own (CrystFEL partial_sim: "
           "overall CC 0.894 against 0.719), wrong by 2-4 A^2 on the project's simulator "
           "(docs/model.md, change 10)", "model", commands=TRAINING,
           target="engine.falloff_near_full"),
    Option("falloff_at_bragg", bool, False, "take that geometric mean instead from the "
           "image-scale network read with every reflection on its Bragg condition, over a "
           "sample of the stored images at each snapshot: the images' scales free of "
           "partiality, whatever trend the partialities have (docs/model.md, change 15)",
           "model", commands=TRAINING, target="engine.falloff_at_bragg"),
    Option("falloff_binned", bool, False, "publish the scales' resolution trend that moves to "
           "the amplitudes with its own shape (the record's geometric mean per bin, bins equal "
           "in 1/d, interpolated) instead of its slope in 1/d² (one B): the trend is steepest "
           "below 5 Å, where one B left the lowest orders low (docs/model.md, change 25). "
           "The reported B stays the slope's",
           "model", commands=TRAINING, target="engine.falloff_binned"),
    Option("data_start", bool, False, "start every observed reflection, when the Wilson prior "
           "is first set from the data, at its own raw mean intensity over the Wilson plot "
           "(with its Bijvoet mate; two observations' worth of the Wilson mean mixed in, and "
           "more where its I/σ is low; each half-dataset table from its half) instead of at "
           "the Wilson mean, so that a strong reflection seen on few images does not have to "
           "travel there one learning rate per update (docs/model.md, change 16). On for "
           "`merge`; off for `serve`, where rows first seen later start at their first "
           "crystals' data, which cost the weak top shells on the quality matrix. One "
           "condition only", "model", commands=TRAINING, target="engine.data_start",
           defaults={"merge": True}),
    Option("posterior_wilson_units", bool, False, "express each reflection's surrogate "
           "location and scale in units of its Wilson r.m.s. amplitude √(εΣ), so every row "
           "travels from its Wilson start at the same relative speed (docs/model.md, change "
           "11). Off by default: the quality matrix did not show a gain that passes the "
           "rule for a default", "model", commands=TRAINING,
           target="trainer.posterior_wilson_units"),
    Option("error_model", bool, False, "learn an error model of the aimless/XDS kind, "
           "σ'² = (aσ)² + (b·I_pred)², inside the likelihood (docs/model.md, change 12). Off "
           "by default: neutral on the quality matrix", "model", commands=TRAINING,
           target="trainer.error_model"),
    Option("marginal_scale", bool, False, "let the amplitudes learn from each observation's "
           "learnt scale integrated out (the log-normal's mean; its variance at the current "
           "prediction added to σ(I)²) instead of from its draws, which pull strong amplitudes "
           "down in proportion to F⁴; the scale network still learns from the draws "
           "(docs/model.md, change 24). Off by default: neutral on the ten quality-matrix cases "
           "it was run on",
           "model", commands=TRAINING, target="trainer.marginal_scale"),
    Option("image_b_term", bool, False, "give the image-scale network an explicit relative B "
           "per image: each reflection's log-scale gains b_i · 1/d² (standardised), b_i read "
           "from the image's pooled vector (docs/model.md, change 13). A checkpoint resumes "
           "only with the setting it was written with", "model", commands=TRAINING,
           target="trainer.image_b_term"),
    Option("geometric_partiality", bool, False, "multiply each observation's learnt scale "
           "by a partiality from its reported geometry: CrystFEL's xsphere, a spherical "
           "reflection of the profile radius seen through the pulse's Gaussian spectrum (the "
           "bandwidth projected at the reflection's resolution), peak 1 on the Bragg "
           "condition, each with one learnt factor, and a learnt mosaic spread; "
           "the scales' fall-off convention then reads the network's part over the "
           "observations near their Bragg condition (docs/model.md, change 18). A checkpoint "
           "resumes only with the setting it was written with", "model", commands=TRAINING,
           target="trainer.geometric_partiality"),
    Option("partiality_check", bool, True, "when the geometric partiality is off, take it "
           "where a stream integrates reflections its partialities do not reach (CrystFEL's "
           "partial_sim: overall CC 0.74 against 0.998), saying so in the MTZ history: from "
           "the start where, on 100 crystals or more that report orientations, profile radii "
           "and a bandwidth, the observations that geometry puts beyond reach carry no signal "
           "(docs/model.md, change 26: `merge` before training, `serve` as the crystals "
           "arrive); else where the scales' resolution trend gives the amplitudes B < -8 A^2, "
           "`merge` after its merge (change 19), `serve` once three snapshots in a row show "
           "it, from its spool (change 23). On the quality matrix only the overpredicted case "
           "switches",
           "model", commands=TRAINING),
    Option("row_refresh", bool, True, "at half and four fifths of `merge`'s steps (from step "
           "300 on), restart the reflections seen at most 5 times whose merge is still more "
           "than 3 sigma from their data given the current scales (French-Wilson amplitudes "
           "under the Wilson prior): such a row is updated only when one of its few images is "
           "in the batch, too rarely to travel from its start (CrystFEL partial_sim, 5,000 "
           "crystals: top shell 0.944 without, 0.982 with). One condition without "
           "--prior-mtz/--prior-model only (docs/model.md, change 22)", "model",
           commands=("merge",)),
    Option("sync_free_steps", str, "auto", "`auto` (on with CUDA, off on the CPU), `on` or "
           "`off`: training steps in which the host never waits for the GPU (dense masked "
           "posterior update, skips and losses kept on the device; docs/performance.md). `off` "
           "goes back to the sparse step, which the CPU uses; it is the way back should the GPU "
           "path misbehave on a card it was not measured on", "model",
           check=_sync_free_problem, target="trainer.sync_free", convert=_sync_free),
    Option("cpu_threads", int, 1, "torch intra-op threads for training on the CPU; 1 avoids "
           "contention with the ingest and publishing threads on small machines "
           "(docs/performance.md)", "model", target="trainer.cpu_threads"),
    Option("batch_images", int, 8, "images per training step", "model", commands=TRAINING,
           unit="images", target="engine.batch_images"),
    Option("new_share", float, 0.5, "share of each batch reserved for images never visited "
           "yet (new data first)", "model", unit="ratio", target="engine.new_share"),
    # ------------------------------------------------------------------ output
    Option("out_dir", Path, Path("streamvi-out"), "directory for `latest.mtz`, "
           "`snapshot-NNNNNN.mtz`, `spool/`, `checkpoint.pt` and `dead-letter.jsonl`; created "
           "if missing, must be writable, used by one service at a time", "output",
           commands=("serve", "demo"), defaults={"demo": Path("streamvi-demo")},
           helps={"demo": "directory for the simulation (truth.mtz, model.pdb) and the "
                          "service's output; a demo always starts afresh"}),
    Option("output", Path, None, "file to write", "run", commands=("merge", "simulate"),
           flags=("-o",), required=("merge",),
           helps={"merge": "MTZ to write", "simulate": "CrystFEL stream to write"}),
    Option("publish_interval", float, 10.0, "seconds between snapshots (MTZ files, PUB "
           "topics, statistics). `kill -USR1` asks for one now", "output", unit="s"),
    Option("keep_snapshots", int, 5, "numbered MTZ snapshots kept beside `latest.mtz` (older "
           "ones are deleted)", "output"),
    Option("publish_endpoint", str, "tcp://127.0.0.1:5556", "ZeroMQ PUB endpoint for the "
           "topics `merged` and `stats` ([wire-format.md](wire-format.md)); empty: off. It has "
           "no authentication: whoever reaches it receives the merged data", "output"),
    Option("n_shells", int, 10, "resolution shells of the statistics (CC½, CCanom, "
           "completeness, multiplicity, ⟨I/σ⟩)", "output", commands=TRAINING,
           target="engine.n_shells", flags=("--shells",)),
    Option("metrics_host", str, "127.0.0.1", "address of the HTTP status page, `/api/status`, "
           "`/healthz` and `/metrics`. They are read-only (GET/HEAD) but unauthenticated; any "
           "non-loopback address logs a warning", "output"),
    Option("metrics_port", int, 9108, "port of the status page and `/metrics`; 0: any free "
           "port (logged at start), -1: off (then container health checks and probes fail: "
           "change them too)", "output", commands=("serve", "demo"), defaults={"demo": 0}),
    # ------------------------------------------------------------------ targets
    Option("target_cc_half", str, "0.3@dmin", "CC½ to reach in the shell holding a "
           "resolution, `VALUE@D` with D in Å or `dmin` (the last shell), e.g. `0.3@1.8`. "
           "Judged on the training-free CC½ of the half-set averages (`cc_half_data`); append "
           "`:model` to judge the model's CC½ instead. Empty: no target", "targets"),
    Option("target_ccanom", str, "", "CCanom to reach in the shell holding a resolution, "
           "`VALUE@D`, e.g. `0.3@2.5` (anomalous mode). Judged on the model's CCanom: plain "
           "averages of unscaled stills carry too little of the anomalous signal "
           "(docs/metrics.md); append `:data` for the half-set averages. Empty: no target",
           "targets"),
    Option("target_completeness", float, 0.99, "overall completeness to reach, ratio 0–1 (of "
           "the table to dmin, or to where the data end when they end well before it: "
           "docs/metrics.md); 0: no target", "targets", unit="ratio"),
    Option("target_multiplicity", float, 0.0, "overall multiplicity (observations per "
           "observed unique reflection) to reach; 0: no target", "targets"),
    Option("model", str, "", "PDB or mmCIF file of a known or partial structure in the "
           "merge's cell and space group. In anomalous mode each snapshot computes an anomalous "
           "difference map, ΔF·exp(i(φ − 90°)) with φ from the model (gemmi), and publishes "
           "the peak height (σ of the map) at each of the model's heavy atoms (S and heavier) "
           "and the strongest peaks away from them. With `conditions` (pump–probe) its phases "
           "also make each light-minus-dark map (WDF), whose highest peaks and deepest holes "
           "are published with the model's nearest atoms (heavy atoms or not, anomalous or "
           "not). Empty: off", "targets"),
    # ------------------------------------------------------------------ reliability
    Option("checkpoint_interval", float, 60.0, "seconds between checkpoints (model, "
           "optimiser, standardisation, counters, spool position); also written on SIGTERM and "
           "SIGINT", "reliability", unit="s"),
    Option("spool_fsync", str, "batch", "when accepted messages are forced to disk: `always` "
           "(after every message; safest, slowest), `batch` (at most 0.5 s later, and at every "
           "checkpoint), `never` (left to the OS). A killed process loses nothing under any of "
           "them; a power cut or kernel crash may lose the last half second under `batch`",
           "reliability"),
    Option("device_budget_mb", float, 0.0, "reflection memory on the training device before "
           "later images go to (pinned) host memory and are copied per batch; 0: no limit. "
           "See \"Sizing\" in [deploy.md](deploy.md)", "reliability", unit="MB",
           target="engine.device_budget_bytes", convert=_budget_bytes),
    # ------------------------------------------------------------------ the other commands
    Option("files", Path, None, "CrystFEL streams (`.stream`) or DIALS files (`.refl` or "
           "`.expt`, the pair read together)", "run", commands=("merge", "send"),
           positional=True, multiple=True,
           helps={"send": "CrystFEL streams (`.stream`, named pipes, `-` for standard input) "
                          "and DIALS files (`.refl` or `.expt`, the pair read together)"}),
    Option("path", Path, None, "a `.stream` file, or a DIALS `.refl` or `.expt` (the pair is "
           "read together)", "run", commands=("inspect",), positional=True),
    Option("url", str, None, "the service's status page, e.g. `http://127.0.0.1:9108`", "run",
           commands=("status",), positional=True),
    Option("epochs", float, None, "passes over the data; unset: 10, and at least 1,500 steps "
           "(small data sets need more passes)", "run", commands=("merge",),
           exclusive="length"),
    Option("steps", int, None, "optimiser steps (instead of `--epochs`)", "run",
           commands=("merge",), exclusive="length"),
    Option("json", bool, False, "print JSON", "run", commands=("merge", "status"),
           helps={"merge": "print the shell table as JSON too",
                  "status": "print the feedback as JSON"}),
    Option("quiet", bool, False, "no progress bar", "run", commands=("merge",)),
    Option("images", int, 2000, "images (crystals) to simulate", "run",
           commands=("demo", "simulate"), unit="images"),
    Option("rate", float, None, "images per second sent; unset: as fast as the service takes "
           "them", "run", commands=("demo", "simulate", "send"), unit="images/s",
           defaults={"demo": 200.0},
           helps={"demo": "images per second sent (an XFEL-like pace)",
                  "simulate": "images per second when streaming (`--to`)"}),
    Option("truth", Path, None, "MTZ of the true structure factors to write", "run",
           commands=("simulate",)),
    Option("indexing_ambiguity", bool, False, "report each image in a random one of the space "
           "group's merohedral settings, as an indexer does in P 4, P 3, P 63, …", "run",
           commands=("simulate",)),
    Option("conditions", str, None, "pump–probe conditions, comma-separated, the dark state "
           "first, e.g. `dark,light`: shots interleave by `--condition-ratio`, each message "
           "carries its `condition` and the stream a copied header `header/int//sim/pump_code` "
           "(the condition's index, like an event code; docs/time-resolved.md). Unset: none",
           "run", commands=("simulate",), metavar="NAMES"),
    Option("condition_ratio", str, None, "shots of each condition per cycle, "
           "comma-separated integers, e.g. `1,3` (one dark, three light); unset: one each",
           "run", commands=("simulate",), metavar="N,N"),
    Option("light_change", str, None, "what the pump does to the structure in every condition "
           "after the first: `move=N,shift=Å,fraction=F` moves N atoms by that distance at "
           "occupancy F, `occupancy=N,delta=D` changes N others' occupancy by D, e.g. "
           "`move=5,shift=1.5,fraction=0.3`. With `--truth T.mtz` the truths "
           "`T-<condition>.mtz` and `T-<light>-minus-<dark>.mtz` (column `DF`) are written too",
           "run", commands=("simulate",), metavar="SPEC"),
    Option("to", str, None, "the service's endpoint, `tcp://…`", "run",
           commands=("simulate", "send"), metavar="URL", required=("send",),
           helps={"simulate": "stream the images live to a service (`tcp://…`)",
                  "send": "the service's endpoint, `tcp://…`"}),
    Option("follow", bool, False, "keep reading streams that grow", "run", commands=("send",)),
    Option("position_file", Path, None, "JSON file of what was sent; a restart resumes after "
           "the last crystal sent (pipes are not recorded)", "run", commands=("send",)),
    Option("idle_timeout", float, None, "with `--follow`: stop following a stream after this "
           "long without new data; unset: follow until stopped", "run", commands=("send",),
           unit="s", metavar="S"),
    Option("poll", float, 0.1, "with `--follow`: time between looks at the end of a file",
           "run", commands=("send",), unit="s", metavar="S"),
    Option("run", str, None, "run name of every crystal; unset: each file's name without its "
           "suffix (`stdin` for `-`)", "run", commands=("send",)),
    Option("timeout", float, None, "how long to wait for the service", "run",
           commands=("send", "status"), unit="s", metavar="S", defaults={"status": 10.0},
           helps={"send": "give up when the service takes nothing for this long; unset: wait",
                  "status": "time to wait for an answer"}),
    Option("example", bool, False, "print a commented example TOML of `serve`'s options",
           "run", commands=("config",)),
    Option("check", Path, None, "load this TOML file (and the environment) and print the "
           "resolved values", "run", commands=("config",), metavar="FILE"),
    Option("markdown", Path, None, "rewrite the option tables of this Markdown file (those "
           "between its `options` marker comments, as in docs/configuration.md) from the "
           "declarations", "run", commands=("config",), metavar="FILE"),
    Option("out", Path, None, "directory for the key files", "run", commands=("keys",),
           required=("keys",)),
    Option("name", str, None, "key pair name, e.g. server, producer1", "run",
           commands=("keys",), multiple=True, required=("keys",)),
)

OPTION_BY_NAME = {o.name: o for o in OPTIONS}


def options_of(command: str) -> tuple[Option, ...]:
    """The options ``command`` takes, in declaration order."""
    return tuple(o for o in OPTIONS if command in o.commands)
