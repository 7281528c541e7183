"""``streamvi status URL``: a running service's decision, per target, in a terminal."""
from __future__ import annotations

import argparse
import json

from streamvi.cli.options import add_options, resolved
from streamvi.errors import StreamviError


def add(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("status", help="a running service's decision: per target, reached or "
                       "the forecast", description="Reads URL/api/status of a running "
                       "service (its status page address, e.g. http://127.0.0.1:9108) and "
                       "prints, per target, whether it is reached or how many more images "
                       "(and minutes at the current rate) it needs; then the resolution "
                       "estimate and the anomalous peak heights.")
    add_options(p, "status")


def run(args: argparse.Namespace) -> int:
    import urllib.error
    import urllib.request

    from streamvi.quality.feedback import decision_lines

    opts = resolved(args, "status")
    url = opts.url if "://" in opts.url else f"http://{opts.url}"
    url = url.rstrip("/") + "/api/status"
    try:
        with urllib.request.urlopen(url, timeout=opts.timeout) as resp:
            payload = json.loads(resp.read().decode())
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        raise StreamviError(f"{url}: no status ({reason}); is the service running, and is "
                            "this its status page address (metrics_host:metrics_port)?") \
            from None
    feedback = payload.get("feedback")
    status = payload.get("status") or {}
    if opts.json:
        others = status.get("condition_feedback") or {}
        if feedback is not None and others:     # pump-probe: every other condition's too
            feedback = {**feedback, "condition_feedback": others}
        print(json.dumps(feedback, allow_nan=False))
        return 0
    snap = payload.get("snapshot") or {}
    merge = payload.get("merge") or {}
    print(f"streamvi {payload.get('version', '?')} at {opts.url}: {status.get('state', '?')}, "
          f"{status.get('crystals_merged', 0)} crystals merged, "
          f"{status.get('images_per_s') or 0.0:.1f} images/s; {merge.get('space_group', '?')} "
          f"to {merge.get('dmin', '?')} Å")
    by_condition = status.get("condition_images") or {}
    if by_condition:
        names = list(by_condition)
        print("conditions: " + ", ".join(f"{k} {v} images" for k, v in by_condition.items())
              + f"; the targets and the resolution below are {names[0]}'s (the reference), "
              "its images at its own rate")
    switch = status.get("partiality_switch")
    if switch and switch.get("reason") == "reach":
        print(f"geometric partiality switched on: {switch['share_beyond']:.1%} of the "
              f"observations of {switch['crystals']} crystals that report their geometry lie "
              f"beyond its reach and carry no signal (mean I/sigma {switch['signal_ratio']:+.3f}"
              " of near-full ones), so the merge started again with it (docs/model.md, "
              "change 26)")
    elif switch:
        print(f"geometric partiality switched on: the scales' trend gave the amplitudes B "
              f"{switch['falloff_b']:+.1f} A^2 on {switch['crystals']} crystals that report "
              "their geometry, so the merge started again with it (docs/model.md, change 23)")
    elif status.get("partiality_advice"):
        print(f"advice: {status['partiality_advice']}")
    if status.get("dmin_advice"):
        print(f"advice: {status['dmin_advice']}")
    if feedback is None:
        print("no snapshot yet: nothing to judge" if not snap else
              "this service publishes no feedback")
        return 0
    for line in decision_lines(feedback):
        print(line)
    for name, other in (status.get("condition_feedback") or {}).items():
        print(f"condition {name} (its own images, at its rate):")
        for line in decision_lines(other):
            print("  " + line)
    return 0
