"""``streamvi keys``: ZeroMQ CURVE key pairs for the service and its producers."""
from __future__ import annotations

import argparse
import json

from streamvi.cli.options import add_options, resolved


def add(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("keys", help="generate ZeroMQ CURVE key pairs (service and producers)")
    add_options(p, "keys")


def run(args: argparse.Namespace) -> int:
    from streamvi.ingest.keys import generate_keypair

    opts = resolved(args, "keys")
    for name in opts.name:
        public, secret = generate_keypair(opts.out, name)
        print(json.dumps({"name": name, "public": str(public), "secret": str(secret)}))
    return 0
