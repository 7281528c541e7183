"""The ZeroMQ PUB side: topics ``merged`` (the merged table) and ``stats`` (the metrics).

Each message is two frames: the topic (``b"merged"`` or ``b"stats"``) and a msgpack map with
``schema`` (``streamvi.merged`` / ``streamvi.stats``) and ``version`` 1.  Arrays use the wire
format's array maps (docs/wire-format.md).  Subscribers that fall behind lose old snapshots
(a PUB socket drops at its high-water mark), which is harmless: each snapshot is complete.
"""
from __future__ import annotations

import logging
from typing import Any

import msgpack
import numpy as np
import zmq

from streamvi.wire import array_map

log = logging.getLogger(__name__)

MERGED_SCHEMA = "streamvi.merged"
STATS_SCHEMA = "streamvi.stats"
VERSION = 1


def merged_message(snapshot, condition: str | None = None) -> dict[str, Any]:
    """The ``merged`` map of a snapshot: one row per observed table row (with
    ``condition``, the pump–probe condition it is the merge of)."""
    sp = snapshot.space
    keep = snapshot.obs_count[0] > 0
    t = snapshot.tables["all"]
    out = {
        "schema": MERGED_SCHEMA, "version": VERSION,
        "snapshot": int(snapshot.snapshot_id), "time": float(snapshot.time),
        "space_group": sp.space_group.hm, "cell": [float(x) for x in sp.cell.parameters],
        "dmin": float(sp.dmin), "anomalous": bool(sp.anomalous),
        "n_images": int(snapshot.n_images),
        "H": array_map(sp.hkl[keep, 0], "<i4"), "K": array_map(sp.hkl[keep, 1], "<i4"),
        "L": array_map(sp.hkl[keep, 2], "<i4"),
        "friedel": array_map(sp.friedel[keep].astype(np.int32), "<i4"),
        "F": array_map(t["F"][keep], "<f4"), "SIGF": array_map(t["SIGF"][keep], "<f4"),
        "I": array_map(t["I"][keep], "<f4"), "SIGI": array_map(t["SIGI"][keep], "<f4"),
        "N": array_map(snapshot.obs_count[0][keep], "<i4"),
    }
    if condition is not None:
        out["condition"] = condition
    return out


def stats_message(snapshot, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """The ``stats`` map: shell table, overall figures and service counters."""
    out = {"schema": STATS_SCHEMA, "version": VERSION, "snapshot": int(snapshot.snapshot_id),
           "time": float(snapshot.time), "n_images": int(snapshot.n_images),
           "n_reflections": int(snapshot.n_reflections), "step": int(snapshot.step),
           "shells": snapshot.stats.to_dict()}
    if extra:
        out.update(extra)
    return _finite(out)


def _finite(x: Any) -> Any:
    """NaN → None so every consumer (JSON included) can read the map."""
    if isinstance(x, float):
        return x if np.isfinite(x) else None
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite(v) for v in x]
    return x


class Publisher:
    """A PUB socket bound to ``endpoint`` (loopback by default)."""

    def __init__(self, endpoint: str, *, context: zmq.Context | None = None, sndhwm: int = 10):
        self.context = context or zmq.Context.instance()
        self.socket = self.context.socket(zmq.PUB)
        self.socket.setsockopt(zmq.SNDHWM, sndhwm)
        self.socket.setsockopt(zmq.LINGER, 0)
        try:
            self.socket.bind(endpoint)
        except zmq.ZMQError as exc:
            self.socket.close()
            from streamvi.errors import ConfigError

            raise ConfigError(f"publish_endpoint {endpoint}: cannot bind ({exc}); choose "
                              "another port or set publish_endpoint = \"\" to switch it off"
                              ) from None
        self.endpoint = self.socket.getsockopt_string(zmq.LAST_ENDPOINT)

    def publish(self, snapshot, extra_stats: dict[str, Any] | None = None, *,
                condition: str | None = None) -> None:
        """Send both topics for ``snapshot`` (never blocks); ``condition`` names the
        pump–probe condition the merged table is of."""
        self._send(b"merged", merged_message(snapshot, condition))
        self._send(b"stats", stats_message(snapshot, extra_stats))

    def publish_merged(self, snapshot, *, condition: str | None = None) -> None:
        """Send the ``merged`` topic alone (the other conditions of a pump–probe merge)."""
        self._send(b"merged", merged_message(snapshot, condition))

    def _send(self, topic: bytes, body: dict[str, Any]) -> None:
        try:
            self.socket.send_multipart([topic, msgpack.packb(body, use_bin_type=True)],
                                       flags=zmq.NOBLOCK)
        except zmq.Again:
            log.debug("PUB %s: subscriber queue full, topic %s skipped", self.endpoint, topic)

    def close(self) -> None:
        self.socket.close(linger=0)
