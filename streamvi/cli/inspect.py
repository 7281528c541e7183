"""``streamvi inspect``: one JSON summary of a CrystFEL stream or DIALS files."""
from __future__ import annotations

import argparse
import json

from streamvi.cli.options import add_options, resolved
from streamvi.errors import StreamviError


def add(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("inspect", help="summarise a CrystFEL stream (or DIALS files) as JSON")
    add_options(p, "inspect")


def run(args: argparse.Namespace) -> int:
    from streamvi.sources import plugin_module

    opts = resolved(args, "inspect")
    if not opts.path.exists():
        raise StreamviError(f"inspect: {opts.path}: no such file")
    # each plugin's inspector, found through the entry points like its source
    name = "dials" if opts.path.suffix in (".refl", ".expt") else "crystfel"
    plugin = plugin_module(name)
    summary = plugin.inspect_dials(opts.path) if name == "dials" else \
        plugin.inspect_stream(opts.path)
    print(json.dumps(summary, indent=2))
    return 0
