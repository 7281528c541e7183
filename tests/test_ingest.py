"""Ingest over real ZeroMQ sockets on loopback: validation, spooling, SUB, backpressure."""
from __future__ import annotations

import logging
import time
from pathlib import Path

import msgpack
import numpy as np
import pytest
import zmq

from streamvi.ingest.counters import IngestCounters
from streamvi.ingest.deadletter import DeadLetter, read_dead_letters
from streamvi.errors import ConfigError
from streamvi.ingest.receiver import Ingestor, replay_spool
from streamvi.ingest.ratelimit import RateLimitedLog
from streamvi.producers.send import send_messages
from streamvi.ingest.spool import Spool
from streamvi.wire import CrystalMessage, clip, encode_crystal, to_wire_dict

TIMEOUT_MS = 2000
LOCAL = "tcp://127.0.0.1:*"


def crystal(i: int, n: int = 20, *, run: str = "r1") -> CrystalMessage:
    rng = np.random.default_rng(i)
    return CrystalMessage(
        run=run, image=f"img{i:05d}", crystal=0,
        h=rng.integers(1, 20, n).astype(np.int32), k=rng.integers(-20, 20, n).astype(np.int32),
        l=rng.integers(-10, 10, n).astype(np.int32),
        I=rng.gamma(2.0, 100.0, n).astype(np.float32),
        sigI=rng.uniform(5, 20, n).astype(np.float32),
        photon_energy_eV=9500.0, cell=(79.1, 79.1, 38.0, 90.0, 90.0, 90.0))


def packed(d: dict) -> bytes:
    return msgpack.packb(d, use_bin_type=True)


def bad_payloads() -> list[tuple[str, list[bytes]]]:
    """(expected reason, frames) for each rejection family."""
    base = to_wire_dict(crystal(999))

    def edit(**changes) -> bytes:
        d = dict(base)
        for key, v in changes.items():
            if v is None:
                d.pop(key)
            else:
                d[key] = v
        return packed(d)

    short = dict(base["I"], shape=[19], data=base["I"]["data"][:76])
    bad_rows = crystal(998)
    bad_rows.I[:] = np.nan
    return [
        ("malformed_msgpack", [b"\xc1 this is not msgpack"]),
        ("malformed_msgpack", [packed([1, 2, 3])]),
        ("unknown_schema", [edit(schema="someone.else")]),
        ("unsupported_version", [edit(version=2)]),
        ("missing_key", [edit(sigI=None)]),
        ("wrong_dtype", [edit(h=dict(base["h"], dtype="<u2"))]),
        ("length_mismatch", [edit(I=short, sigI=dict(base["sigI"]))]),
        ("absurd_cell", [edit(cell=[79.0, 79.0, 38.0, 90.0, 90.0, 200.0])]),
        ("no_valid_reflections", [encode_crystal(bad_rows)]),
        ("unexpected_multipart", [encode_crystal(crystal(997)), b"extra"]),
    ]


def push_socket(ctx: zmq.Context, url: str, *, sndhwm: int = 1000) -> zmq.Socket:
    sock = ctx.socket(zmq.PUSH)
    sock.setsockopt(zmq.SNDHWM, sndhwm)
    sock.setsockopt(zmq.SNDTIMEO, TIMEOUT_MS)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(url)
    return sock


def collect(ing: Ingestor, n: int, *, timeout_s: float = 10.0) -> list:
    got: list = []
    deadline = time.monotonic() + timeout_s
    while len(got) < n and time.monotonic() < deadline:
        got += ing.get_batch(64, timeout=0.1)
    return got


def wait_for(cond, *, timeout_s: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.01)
    return cond()


def stop_quickly(ing: Ingestor) -> None:
    t0 = time.monotonic()
    ing.stop()
    assert time.monotonic() - t0 < 2.0


def assert_same(a: CrystalMessage, b: CrystalMessage) -> None:
    assert a.key == b.key
    for name in ("h", "k", "l", "I", "sigI"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
    assert a.cell == b.cell and a.photon_energy_eV == b.photon_energy_eV


def test_good_and_bad_messages_are_sorted_exactly(tmp_path: Path) -> None:
    bad = bad_payloads()
    bad = (bad * 2)[:20]                              # 20 rejects, every family at least once
    expected_rejects: dict[str, int] = {}
    for reason, _ in bad:
        expected_rejects[reason] = expected_rejects.get(reason, 0) + 1
    good = [crystal(i) for i in range(100)]
    good[7].I[:3] = np.inf                            # 3 bad rows in an accepted crystal
    good[8].sigI[:2] = 0.0                            # 2 more, another reason
    counters = IngestCounters()
    spool = Spool(tmp_path / "spool")
    dead = DeadLetter(tmp_path / "dead.jsonl")
    ing = Ingestor([LOCAL], spool=spool, dead_letter=dead, counters=counters,
                   max_message_bytes=20_000)
    ing.start()
    ctx = zmq.Context()
    try:
        url = ing.bound_endpoints[0]
        assert url.startswith("tcp://127.0.0.1:") and not url.endswith("*")
        sock = push_socket(ctx, url)
        sent_good: list[bytes] = []
        for i, msg in enumerate(good):
            raw = encode_crystal(msg)
            sock.send(raw)
            sent_good.append(raw)
            if i % 5 == 2:
                sock.send_multipart(bad[i // 5][1])
        items = collect(ing, 100)
        assert wait_for(lambda: counters.messages_received == 120)
        assert ing.get_batch(10, timeout=0.2) == []
    finally:
        sock.close(linger=0)
        ctx.term()
        stop_quickly(ing)
    assert [seq for seq, _, _ in items] == list(range(100))
    for (_, msg, arrival), want in zip(items, good):
        assert msg.key == want.key and abs(arrival - time.time()) < 60
    assert len(items[7][1]) == 17 and len(items[8][1]) == 18
    assert list(spool.iter_records()) == list(enumerate(sent_good))
    snap = counters.snapshot()
    assert snap["messages_received"] == 120
    assert snap["crystals_received"] == 100
    assert snap["reflections_received"] == 100 * 20 - 5
    assert snap["reflections_rejected"] == {"nonfinite_intensity": 3, "nonpositive_sigma": 2}
    assert snap["messages_rejected"] == expected_rejects
    assert snap["last_seq"] == 99
    assert snap["bytes_received"] == (sum(map(len, sent_good))
                                      + sum(len(b"".join(f)) for _, f in bad))
    spool.close()
    dead.close()
    letters = read_dead_letters(tmp_path / "dead.jsonl")
    assert [d["reason"] for d in letters] == [r for r, _ in bad]
    assert {d["source"] for d in letters} == {url}
    assert all(d["detail"] and d["truncated"] is False for d in letters)


def test_sub_endpoint_with_topic(tmp_path: Path) -> None:
    ctx = zmq.Context()
    pub = ctx.socket(zmq.XPUB)
    pub.setsockopt(zmq.LINGER, 0)
    pub.setsockopt(zmq.RCVTIMEO, TIMEOUT_MS)
    pub.bind(LOCAL)
    url = pub.getsockopt_string(zmq.LAST_ENDPOINT)
    counters = IngestCounters()
    ing = Ingestor([url], mode="sub", topic=b"crystal", counters=counters)
    try:
        ing.start()
        assert ing.bound_endpoints == [url]
        assert pub.recv() == b"\x01crystal"      # the subscription reached the publisher
        msgs = [crystal(i) for i in range(15)]
        for i, msg in enumerate(msgs):
            topic = b"crystal" if i % 3 else b"other"
            pub.send_multipart([topic, encode_crystal(msg)])
        items = collect(ing, 10)
        assert ing.get_batch(10, timeout=0.2) == []
    finally:
        pub.close()
        stop_quickly(ing)
        ctx.term()
    assert [seq for seq, _, _ in items] == list(range(10))
    for (_, got, _), want in zip(items, [m for i, m in enumerate(msgs) if i % 3]):
        assert_same(got, want)
    assert counters.messages_received == 10 and counters.crystals_received == 10


def test_backpressure_blocks_the_producer_and_loses_nothing(tmp_path: Path) -> None:
    counters = IngestCounters()
    spool = Spool(tmp_path / "spool", fsync="never")
    ing = Ingestor([LOCAL], queue_max_messages=5, rcvhwm=5, spool=spool, counters=counters)
    ing.start()
    ctx = zmq.Context()
    payload = [encode_crystal(crystal(i, n=2000)) for i in range(3)]   # ~40 kB each
    sock = push_socket(ctx, ing.bound_endpoints[0], sndhwm=5)
    sock.setsockopt(zmq.SNDTIMEO, 200)
    sock.setsockopt(zmq.SNDBUF, 64 * 1024)
    cap = 5000
    sent = 0
    blocked = False
    try:
        while sent < cap:
            try:
                sock.send(payload[sent % 3])
            except zmq.Again:
                blocked = True
                break
            sent += 1
        assert blocked, f"producer never blocked after {sent} messages"
        # the ingest thread holds one message while it waits for room in the queue
        assert wait_for(lambda: ing.queue_depth == 5 and counters.crystals_received == 6)
        time.sleep(0.2)
        assert ing.queue_depth == 5 and counters.crystals_received == 6
        assert spool.n_records == 6
        items = collect(ing, sent, timeout_s=20)
        assert ing.get_batch(10, timeout=0.2) == []
    finally:
        sock.close(linger=0)
        ctx.term()
        stop_quickly(ing)
    assert len(items) == sent
    assert [seq for seq, _, _ in items] == list(range(sent))
    assert counters.crystals_received == sent and counters.messages_received == sent
    assert spool.n_records == sent
    assert [p for _, p in spool.iter_records(sent - 3)] == [payload[i % 3]
                                                           for i in range(sent - 3, sent)]
    spool.close()


def test_stop_while_blocked_on_a_full_queue(tmp_path: Path) -> None:
    ing = Ingestor([LOCAL], queue_max_messages=2)
    ing.start()
    ctx = zmq.Context()
    sock = push_socket(ctx, ing.bound_endpoints[0])
    try:
        for i in range(10):
            sock.send(encode_crystal(crystal(i)))
        assert wait_for(lambda: ing.counters.crystals_received == 3)
        stop_quickly(ing)
        assert not ing.running
        # the third, counted and spooled while it waited for room, is queued at the stop:
        # every crystal counted is there for the consumer's last drain
        assert [s for s, _, _ in ing.get_batch(10, timeout=0.1)] == [0, 1, 2]
        t0 = time.monotonic()
        assert ing.get_batch(10, timeout=None) == []   # stopped and empty: no waiting
        assert time.monotonic() - t0 < 0.5
    finally:
        sock.close(linger=0)
        ctx.term()


def test_queue_bounded_by_bytes(tmp_path: Path) -> None:
    raw = encode_crystal(crystal(0, n=500))
    ing = Ingestor([LOCAL], queue_max_bytes=3 * len(raw))
    ing.start()
    ctx = zmq.Context()
    sock = push_socket(ctx, ing.bound_endpoints[0])
    try:
        for i in range(10):
            sock.send(encode_crystal(crystal(i, n=500)))
        assert wait_for(lambda: ing.queue_depth == 3)
        time.sleep(0.1)
        assert ing.queue_depth == 3 and ing.queue_bytes == 3 * len(raw)
        assert len(collect(ing, 10)) == 10
    finally:
        sock.close(linger=0)
        ctx.term()
        stop_quickly(ing)


def test_bind_errors_and_exposure_warning(caplog) -> None:
    ing = Ingestor([LOCAL])
    ing.start()
    try:
        with pytest.raises(ConfigError, match="cannot bind"):
            Ingestor([ing.bound_endpoints[0]]).start()
        with caplog.at_level(logging.WARNING, logger="streamvi.ingest.receiver"):
            wide = Ingestor(["tcp://0.0.0.0:*"])
            wide.start()
            stop_quickly(wide)
        assert "WITHOUT authentication" in caplog.text and "CURVE" in caplog.text
        assert "tcp://0.0.0.0:" in caplog.text
    finally:
        stop_quickly(ing)
    with pytest.raises(ConfigError, match="mode"):
        Ingestor([LOCAL], mode="router")


def test_replay_counts_only_what_the_checkpoint_had_not(tmp_path: Path) -> None:
    msgs = [crystal(i) for i in range(10)]
    with Spool(tmp_path) as spool:
        for m in msgs:
            spool.append(encode_crystal(m))
        checkpoint = IngestCounters()
        for seq, m in enumerate(msgs[:6]):      # counted before the "crash"
            checkpoint.record_accepted(m, nbytes=1, seq=seq)
        counters = IngestCounters()
        counters.load_state_dict(checkpoint.state_dict())
        replayed = list(replay_spool(spool, start=3, counters=counters))
    assert [seq for seq, _, _ in replayed] == list(range(3, 10))
    for (_, got, _), want in zip(replayed, msgs[3:]):
        assert_same(got, want)
    assert counters.crystals_received == 10 and counters.last_seq == 9


def test_curve_lets_in_listed_clients_only(tmp_path: Path) -> None:
    server_public, server_secret = zmq.curve_keypair()
    client_public, client_secret = zmq.curve_keypair()
    _, stranger_secret = zmq.curve_keypair()
    counters = IngestCounters()
    ing = Ingestor([LOCAL], counters=counters, curve_server_secret=server_secret,
                   curve_allowed_clients=[client_public])
    ing.start()
    try:
        url = ing.bound_endpoints[0]
        report = send_messages([crystal(i) for i in range(3)], url, timeout_s=2.0,
                               curve_server_public=server_public,
                               curve_client_secret=client_secret)
        assert report.sent == 3
        assert len(collect(ing, 3)) == 3
        with pytest.raises(TimeoutError, match="no service took anything"):
            send_messages([crystal(9)], url, timeout_s=0.3, curve_server_public=server_public,
                          curve_client_secret=stranger_secret)
        assert ing.get_batch(10, timeout=0.3) == []
        assert counters.messages_received == 3
    finally:
        stop_quickly(ing)


def test_dead_letter_truncates_rotates_and_never_raises(tmp_path: Path, caplog) -> None:
    path = tmp_path / "dl" / "dead.jsonl"
    with DeadLetter(path, max_payload_bytes=8, max_file_bytes=600) as dead:
        assert dead.write(source="tcp://a", reason="r1", detail="d", payload=b"0123456789")
        assert dead.write(source="tcp://a", reason="r2", detail="d", payload=b"0123")
        first = read_dead_letters(path)
        assert [(d["size"], d["truncated"]) for d in first] == [(10, True), (4, False)]
        assert first[0]["payload_b64"] == "MDEyMzQ1Njc="          # b"01234567"
        for i in range(6):
            dead.write(source="tcp://a", reason=f"x{i}", detail="d" * 50, payload=b"p")
        assert path.with_name("dead.jsonl.1").exists() and path.stat().st_size <= 600
        assert dead.written == 8 and dead.write_errors == 0
    blocked = tmp_path / "file"
    blocked.write_text("")
    broken = DeadLetter(blocked / "dead.jsonl")       # parent is a file: every write fails
    with caplog.at_level(logging.ERROR, logger="streamvi.ingest.deadletter"):
        assert broken.write(source="tcp://b", reason="r", detail="d", payload=b"x") is False
    assert broken.write_errors == 1 and "tcp://b" in caplog.text


def test_counters_state_round_trip() -> None:
    c = IngestCounters()
    m = crystal(1)
    m.rows_rejected = {"zero_miller": 2}
    c.record_accepted(m, nbytes=100, seq=4)
    c.record_rejected("missing_key", nbytes=7)
    c.add_duplicates(3)
    restored = IngestCounters()
    restored.load_state_dict(c.state_dict())
    assert restored.snapshot() == c.snapshot() == {
        "messages_received": 2, "crystals_received": 1, "reflections_received": 20,
        "bytes_received": 107, "duplicates": 3, "spool_write_errors": 0, "last_seq": 4,
        "duplicates_not_spooled": 0, "crystals_rejected": {},
        "messages_rejected": {"missing_key": 1},
        "reflections_rejected": {"zero_miller": 2}}
    with pytest.raises(ValueError, match="version"):
        restored.load_state_dict({"version": 99})


def test_a_frame_over_the_limit_is_refused_unread_and_its_producer_cut_off(
        tmp_path: Path, caplog) -> None:
    """ZeroMQ refuses a frame over max_message_bytes as its header arrives (MAXMSGSIZE):
    nothing of it is read, the producer is disconnected and counted, others go on."""
    counters = IngestCounters()
    dead = DeadLetter(tmp_path / "dead.jsonl")
    ing = Ingestor([LOCAL], counters=counters, dead_letter=dead, max_message_bytes=20_000)
    ing.start()
    ctx = zmq.Context()
    try:
        url = ing.bound_endpoints[0]
        with caplog.at_level(logging.INFO, logger="streamvi.ingest.receiver"):
            big = push_socket(ctx, url)
            big.send(b"\x00" * 40_000)
            assert wait_for(lambda: ing.producer_disconnects == 1)
            big.close(linger=0)
        assert "sent a frame over max_message_bytes (20000 bytes)" in caplog.text
        report = send_messages([crystal(i) for i in range(5)], url, timeout_s=5.0)
        assert report.sent == 5 and len(collect(ing, 5)) == 5
    finally:
        ctx.term()
        stop_quickly(ing)
    dead.close()
    snap = counters.snapshot()
    assert snap["messages_received"] == 5 and snap["messages_rejected"] == {}
    assert snap["bytes_received"] == report.bytes_sent        # the big frame was never read
    assert not (tmp_path / "dead.jsonl").exists()


def test_a_multipart_message_is_refused_without_keeping_its_parts(tmp_path: Path) -> None:
    counters = IngestCounters()
    dead = DeadLetter(tmp_path / "dead.jsonl")
    ing = Ingestor([LOCAL], counters=counters, dead_letter=dead)
    ing.start()
    ctx = zmq.Context()
    try:
        sock = push_socket(ctx, ing.bound_endpoints[0])
        parts = [bytes([i]) * (1000 + i) for i in range(50)]
        sock.send_multipart(parts)
        assert wait_for(lambda: counters.messages_received == 1)
        sock.close(linger=0)
    finally:
        ctx.term()
        stop_quickly(ing)
    dead.close()
    (letter,) = read_dead_letters(tmp_path / "dead.jsonl")
    assert letter["reason"] == "unexpected_multipart" and "50 frames" in letter["detail"]
    assert letter["size"] == len(parts[-1])               # the payload is the last part
    assert counters.snapshot()["bytes_received"] == sum(map(len, parts))


# ----------------------------------------------------------------------------- bounded logs


def test_rate_limited_log_counts_what_it_leaves_out(caplog) -> None:
    now = [0.0]
    limiter = RateLimitedLog(logging.getLogger("test.ratelimit"), burst=3, interval_s=10.0,
                             clock=lambda: now[0])
    with caplog.at_level(logging.INFO, logger="test.ratelimit"):
        logged = [limiter.log(logging.WARNING, "a", "line %d", i) for i in range(100)]
        assert logged == [True] * 3 + [False] * 97
        assert limiter.log(logging.WARNING, "b", "other kind")       # kinds are separate
        now[0] = 10.0                                                  # one token back
        assert limiter.log(logging.WARNING, "a", "line %d", 100)
        now[0] = 12.0
        assert not limiter.log(logging.WARNING, "a", "line %d", 101)
        now[0] = 30.0
        limiter.flush()
    lines = [r.getMessage() for r in caplog.records]
    assert lines[:4] == ["line 0", "line 1", "line 2", "other kind"]
    assert lines[4] == "line 100 (97 more like this were suppressed in the last 10 s)"
    assert lines[5] == "1 more line(s) like this (a) were suppressed in the last 18 s"
    assert len(lines) == 6 and limiter.suppressed_total == 98


def test_clip_marks_what_it_cuts() -> None:
    assert clip("short") == "short"
    cut = clip("x" * 20_000_000)
    assert cut.startswith("x" * 200) and cut.endswith("… [20,000,000 characters in all]")
    assert len(cut) < 250


def test_a_flood_of_bad_messages_is_counted_exactly_and_logged_sparingly(tmp_path, caplog):
    counters = IngestCounters()
    dead = DeadLetter(tmp_path / "dead.jsonl")
    ing = Ingestor([LOCAL], counters=counters, dead_letter=dead)
    ing.start()
    ctx = zmq.Context()
    huge = "<" + "f" * (20 * 2**20)              # the 20 MiB dtype string
    bad = [b"\xc1 not msgpack"] * 500 + [msgpack.packb(
        {**to_wire_dict(crystal(1)), "h": {"dtype": huge, "shape": [20], "data": b"\0" * 80}})]
    try:
        with caplog.at_level(logging.WARNING, logger="streamvi.ingest.receiver"):
            sock = push_socket(ctx, ing.bound_endpoints[0])
            for frame in bad:
                sock.send(frame)
            assert wait_for(lambda: counters.messages_received == len(bad), timeout_s=30)
            sock.close(linger=0)
    finally:
        ctx.term()
        stop_quickly(ing)
    dead.close()
    assert counters.snapshot()["messages_rejected"] == {"malformed_msgpack": 500,
                                                          "string_too_long": 1}
    rejected_lines = [r for r in caplog.records if "rejected a" in r.getMessage()]
    assert 10 <= len(rejected_lines) <= 12, len(rejected_lines)
    assert max(len(r.getMessage()) for r in caplog.records) < 2000
    letters = read_dead_letters(tmp_path / "dead.jsonl")
    assert len(letters) == len(bad)                     # every one is kept for inspection
    assert letters[-1]["reason"] == "string_too_long" and len(letters[-1]["detail"]) < 2000
    # the line holds the payload's first MiB (base64) and nothing more of the 20 MiB string
    assert (tmp_path / "dead.jsonl").stat().st_size < 2 * 2**20


def test_a_refused_curve_producer_that_keeps_trying_is_logged_sparingly(caplog) -> None:
    """200 connection attempts with an unknown CURVE key (a misconfigured producer started in
    a loop): every one refused and counted, ten or so log lines."""
    server_public, server_secret = zmq.curve_keypair()
    client_public, _ = zmq.curve_keypair()
    stranger_public, stranger_secret = zmq.curve_keypair()
    ing = Ingestor([LOCAL], curve_server_secret=server_secret,
                   curve_allowed_clients=[client_public])
    ctx = zmq.Context()
    socks = []
    with caplog.at_level(logging.WARNING, logger="streamvi.ingest.receiver"):
        ing.start()
        try:
            for _ in range(200):
                sock = ctx.socket(zmq.PUSH)
                sock.setsockopt(zmq.LINGER, 0)
                socks.append(sock)
                sock.curve_serverkey = server_public
                sock.curve_secretkey = stranger_secret
                sock.curve_publickey = stranger_public
                sock.connect(ing.bound_endpoints[0])
            assert wait_for(lambda: ing._allowed.refused >= 200, timeout_s=60)
        finally:
            for sock in socks:
                sock.close(linger=0)
            ctx.term()
            stop_quickly(ing)
    lines = [r.getMessage() for r in caplog.records if "refused a CURVE client" in
             r.getMessage()]
    print(f"\n{ing._allowed.refused} CURVE refusals, {len(lines)} log lines")
    assert 1 <= len(lines) <= 12
    assert ing.handshake_failures >= 200 and ing.producer_disconnects == 0
