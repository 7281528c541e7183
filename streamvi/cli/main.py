"""Command-line entry point ``streamvi`` (the only place that reads argv).

Each command is a module of this package with ``add(subparsers)`` and ``run(args)``; its
flags come from the declarations of :mod:`streamvi.config.options`.  ``main(argv)`` can be
called in-process by tests.
"""
from __future__ import annotations

import argparse
import logging
import sys

from streamvi import __version__
from streamvi.cli import config, demo, inspect, keys, merge, send, serve, simulate, status
from streamvi.errors import StreamviError

log = logging.getLogger("streamvi")

#: command name → its module (``add`` and ``run``), in the order ``--help`` lists them
COMMANDS = {"simulate": simulate, "inspect": inspect, "merge": merge, "serve": serve,
            "send": send, "demo": demo, "status": status, "config": config, "keys": keys}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="streamvi",
        description="Online variational merging of serial-crystallography data.")
    parser.add_argument("--version", action="version", version=f"streamvi {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module in COMMANDS.values():
        module.add(sub)
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
        return COMMANDS[args.command].run(args)
    except StreamviError as exc:
        print(f"streamvi {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
