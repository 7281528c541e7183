"""``streamvi send``: CrystFEL streams and DIALS files into a running service."""
from __future__ import annotations

import argparse
import json

from streamvi.cli.options import add_options, resolved
from streamvi.errors import StreamviError


def add(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "send", help="stream CrystFEL streams (or DIALS .refl files) into a running service",
        description="Send every crystal of the inputs to a service's PULL endpoint; several "
        "inputs are read at once. With --follow, streams are tailed as indexamajig writes "
        "them (a file cut short or replaced is read again from its start) until Ctrl-C or "
        "SIGTERM; named pipes and '-' are read until their writer closes them.")
    add_options(p, "send")


def run(args: argparse.Namespace) -> int:
    import signal
    import threading

    from streamvi.producers.conditions import condition_labeller
    from streamvi.producers.send import send_files

    opts = resolved(args, "send")
    label = condition_labeller(condition=opts.condition, field=opts.condition_field,
                               condition_map=opts.condition_map, n_inputs=len(opts.files),
                               condition_file=opts.condition_file)
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
        report = send_files([str(f) for f in opts.files], opts.to, follow=opts.follow,
                            position_file=opts.position_file, rate=opts.rate, run=opts.run,
                            poll_s=opts.poll, idle_timeout_s=opts.idle_timeout,
                            stop_event=stop, timeout_s=opts.timeout, label=label)
    except TimeoutError as exc:     # SendTimeout: no service took anything (exit status 2)
        print_report(exc.report)
        raise StreamviError(str(exc)) from None
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    print_report(report)
    if report.unconfirmed:
        return 3                    # some were not confirmed: the next run sends them again
    return 130 if stop.is_set() and not opts.follow else 0
