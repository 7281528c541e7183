"""``streamvi serve``: the online merging service, until SIGTERM or Ctrl-C."""
from __future__ import annotations

import argparse
import json
import logging

from streamvi.cli.options import add_options, given

log = logging.getLogger("streamvi")


def add(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="run the online merging service",
                       description="Every option may also come from the TOML file (--config) "
                       "or an environment variable STREAMVI_<NAME>; flags win.")
    add_options(p, "serve", grouped=True)


def run(args: argparse.Namespace) -> int:
    import signal
    import threading

    from streamvi.config import load_config
    from streamvi.service import Service

    options = given(args, "serve")
    cfg = load_config(options.pop("config"), overrides=options)
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
