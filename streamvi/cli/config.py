"""``streamvi config``: an example configuration of ``serve``, or a check of one."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from streamvi.atomic import atomic_write
from streamvi.cli.options import add_options, resolved


def add(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("config", help="print an example configuration, or check one")
    add_options(p, "config")


def run(args: argparse.Namespace) -> int:
    from streamvi.config import SERVICE_OPTIONS, load_config
    from streamvi.config.render import example_toml, update_document

    opts = resolved(args, "config")
    if opts.check:
        cfg = load_config(opts.check)
        print(json.dumps({o.name: str(v) if isinstance(v, Path) else v
                          for o in SERVICE_OPTIONS for v in [getattr(cfg, o.name)]},
                         indent=2))
        return 0
    if opts.markdown:
        text = opts.markdown.read_text()
        new = update_document(text)
        if new != text:
            atomic_write(opts.markdown, lambda tmp: tmp.write_text(new))
        print(json.dumps({"file": str(opts.markdown), "changed": new != text}))
        return 0
    print(example_toml())
    return 0
