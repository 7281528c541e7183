"""The raw-message spool: framing, reopening, torn tails, damage, segments."""
from __future__ import annotations

import logging
import os
import random
import shutil
import tempfile
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from streamvi.errors import ConfigError
from streamvi.ingest.spool import HEADER_BYTES, MAGIC, Spool, segment_name


def payloads(n: int, *, seed: int = 0, lo: int = 0, hi: int = 400) -> list[bytes]:
    rng = random.Random(seed)
    return [rng.randbytes(rng.randint(lo, hi)) for _ in range(n)]


def fill(directory: Path, items: list[bytes], **kwargs) -> list[int]:
    """Append ``items`` to a fresh spool; returns the record start offsets (one segment)."""
    offsets, pos = [], 0
    with Spool(directory, **kwargs) as spool:
        for p in items:
            offsets.append(pos)
            pos += HEADER_BYTES + len(p)
            spool.append(p)
    return offsets


def read_all(directory: Path, start: int = 0) -> list[tuple[int, bytes]]:
    with Spool(directory) as spool:
        return list(spool.iter_records(start))


def test_round_trip_and_sequence(tmp_path: Path) -> None:
    items = payloads(50) + [b"", MAGIC * 3]
    with Spool(tmp_path / "s", fsync="always") as spool:
        seqs = [spool.append(p) for p in items]
        assert seqs == list(range(len(items)))
        assert spool.n_records == len(items)
        assert spool.bytes_total == sum(HEADER_BYTES + len(p) for p in items)
        assert list(spool.iter_records()) == list(enumerate(items))
    got = read_all(tmp_path / "s")
    assert got == list(enumerate(items))
    assert [p for _, p in read_all(tmp_path / "s", start=40)] == items[40:]


def test_reopen_continues_sequence(tmp_path: Path) -> None:
    first, second = payloads(7, seed=1), payloads(5, seed=2)
    fill(tmp_path, first)
    with Spool(tmp_path) as spool:
        assert spool.n_records == 7
        assert spool.torn_records == 0 and spool.corrupt_records == 0
        assert [spool.append(p) for p in second] == list(range(7, 12))
    assert read_all(tmp_path) == list(enumerate(first + second))


@pytest.mark.parametrize("cut", [1, 3, 4, 8, 11, 12, 13, 50, 99])
def test_torn_tail_is_truncated(tmp_path: Path, cut: int, caplog) -> None:
    items = payloads(5, lo=100, hi=100)
    offsets = fill(tmp_path, items)
    seg = tmp_path / segment_name(1)
    os.truncate(seg, offsets[-1] + cut)
    with caplog.at_level(logging.WARNING, logger="streamvi.ingest.spool"):
        with Spool(tmp_path) as spool:
            assert spool.n_records == 4
            assert spool.torn_records == 1
            assert spool.corrupt_records == 0
            assert seg.stat().st_size == offsets[-1]
            assert list(spool.iter_records()) == list(enumerate(items[:4]))
            assert spool.append(b"new") == 4
    assert "torn record" in caplog.text and segment_name(1) in caplog.text
    assert read_all(tmp_path) == list(enumerate(items[:4] + [b"new"]))
    with Spool(tmp_path) as spool:        # reopening does not count it again
        assert spool.torn_records == 0 and spool.n_records == 5


def test_cut_on_a_record_boundary_is_not_torn(tmp_path: Path) -> None:
    items = payloads(5)
    offsets = fill(tmp_path, items)
    os.truncate(tmp_path / segment_name(1), offsets[3])
    with Spool(tmp_path) as spool:
        assert spool.n_records == 3 and spool.torn_records == 0


def test_crc_mismatch_in_last_record_is_torn(tmp_path: Path) -> None:
    items = payloads(4, lo=50, hi=50)
    offsets = fill(tmp_path, items)
    seg = tmp_path / segment_name(1)
    data = bytearray(seg.read_bytes())
    data[offsets[-1] + HEADER_BYTES + 10] ^= 0xFF
    seg.write_bytes(bytes(data))
    with Spool(tmp_path) as spool:
        assert spool.n_records == 3 and spool.torn_records == 1


@pytest.mark.parametrize("where", [0, 3, 4, 6, 7, 8, 11, 12, 40, 99 + HEADER_BYTES])
def test_flipped_byte_mid_file_skips_exactly_that_record(tmp_path: Path, where: int,
                                                         caplog) -> None:
    items = payloads(5, lo=100, hi=100)
    offsets = fill(tmp_path, items)
    seg = tmp_path / segment_name(1)
    data = bytearray(seg.read_bytes())
    data[offsets[2] + where] ^= 0x5A
    seg.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING, logger="streamvi.ingest.spool"):
        with Spool(tmp_path) as spool:
            assert spool.n_records == 5
            assert spool.torn_records == 0
            assert spool.corrupt_records == 1
            got = list(spool.iter_records())
            assert spool.corrupt_records == 1       # seen again while reading: not recounted
            assert spool.append(b"after") == 5
    assert got == [(i, items[i]) for i in (0, 1, 3, 4)]
    assert f"byte {offsets[2]} of {segment_name(1)}" in caplog.text


def test_resync_ignores_magic_inside_payloads(tmp_path: Path) -> None:
    decoy = MAGIC + (20).to_bytes(4, "little") + b"\0\0\0\0" + b"x" * 40
    items = [b"a" * 30, decoy + decoy, b"b" * 30, decoy, b"c" * 30]
    offsets = fill(tmp_path, items)
    seg = tmp_path / segment_name(1)
    data = bytearray(seg.read_bytes())
    data[offsets[1]] ^= 0xFF          # damage the magic of the record holding decoys
    seg.write_bytes(bytes(data))
    got = read_all(tmp_path)
    assert got == [(0, items[0]), (2, items[2]), (3, items[3]), (4, items[4])]


def test_segments_roll_and_replay_across_them(tmp_path: Path) -> None:
    items = payloads(10, lo=300, hi=300)      # 312-byte records: 3 per 1000-byte segment
    with Spool(tmp_path, segment_bytes=1000) as spool:
        assert [spool.append(p) for p in items] == list(range(10))
        assert [p.name for p in spool.segments] == [segment_name(i) for i in (1, 2, 3, 4)]
        assert spool.bytes_total == 10 * 312
    assert (tmp_path / segment_name(1)).stat().st_size == 936
    assert (tmp_path / segment_name(4)).stat().st_size == 312
    with Spool(tmp_path, segment_bytes=1000) as spool:
        assert spool.n_records == 10
        assert list(spool.iter_records(5)) == [(i, items[i]) for i in range(5, 10)]
        assert list(spool.iter_records(2, 7)) == [(i, items[i]) for i in range(2, 7)]
        assert spool.append(b"z" * 300) == 10
        assert len(spool.segments) == 4
    assert (tmp_path / segment_name(4)).stat().st_size == 624


def test_oversized_record_gets_its_own_segment(tmp_path: Path) -> None:
    with Spool(tmp_path, segment_bytes=100) as spool:
        for p in (b"a" * 10, b"b" * 500, b"c" * 10):
            spool.append(p)
        assert len(spool.segments) == 3
    assert [p for _, p in read_all(tmp_path)] == [b"a" * 10, b"b" * 500, b"c" * 10]


def test_damage_in_one_segment_does_not_shift_later_numbers(tmp_path: Path) -> None:
    items = payloads(9, lo=300, hi=300)
    with Spool(tmp_path, segment_bytes=1000) as spool:
        for p in items:
            spool.append(p)
    seg = tmp_path / segment_name(1)
    data = bytearray(seg.read_bytes())
    data[312 + 5] ^= 0x01             # length field of record 1
    data[312 + 6] ^= 0x01
    seg.write_bytes(bytes(data))
    got = read_all(tmp_path)
    assert [s for s, _ in got] == [0, 2, 3, 4, 5, 6, 7, 8]
    assert all(items[s] == p for s, p in got)


def test_torn_tail_in_last_of_several_segments(tmp_path: Path) -> None:
    items = payloads(8, lo=300, hi=300)
    with Spool(tmp_path, segment_bytes=1000) as spool:
        for p in items:
            spool.append(p)
    os.truncate(tmp_path / segment_name(3), 312 + 100)
    with Spool(tmp_path, segment_bytes=1000) as spool:
        assert spool.n_records == 7 and spool.torn_records == 1
        assert [s for s, _ in spool.iter_records()] == list(range(7))


def test_bad_arguments_and_second_opener(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="fsync"):
        Spool(tmp_path, fsync="sometimes")
    with Spool(tmp_path) as spool:
        with pytest.raises(ConfigError, match="in use by another process"):
            Spool(tmp_path)
        spool.append(b"x")
    with Spool(tmp_path, fsync="never") as spool:    # the lock went with close()
        assert spool.n_records == 1


def test_fsync_policies_and_flush(tmp_path: Path) -> None:
    for policy in ("always", "batch", "never"):
        d = tmp_path / policy
        with Spool(d, fsync=policy, fsync_interval_s=0.0) as spool:
            spool.append(b"one")
            spool.maybe_sync()
            spool.flush()
            spool.append(b"two")
        assert read_all(d) == [(0, b"one"), (1, b"two")]


@settings(max_examples=40, deadline=None)
@given(sizes=st.lists(st.integers(0, 64), min_size=1, max_size=8), cut=st.integers(0, 10**6))
def test_any_cut_leaves_an_intact_prefix(sizes: list[int], cut: int) -> None:
    items = [bytes([i]) * n for i, n in enumerate(sizes)]
    d = Path(tempfile.mkdtemp())
    try:
        fill(d, items)
        seg = d / segment_name(1)
        size = seg.stat().st_size
        os.truncate(seg, cut % (size + 1))
        got = read_all(d)
        assert got == list(enumerate(items[:len(got)]))
    finally:
        shutil.rmtree(d)


def test_kill_9_while_appending_loses_no_acknowledged_record(tmp_path: Path) -> None:
    import signal
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from streamvi.ingest.spool import Spool\n"
        "s = Spool(sys.argv[1], segment_bytes=20000)\n"
        "i = 0\n"
        "while True:\n"
        "    assert s.append(i.to_bytes(4, 'little') * (1 + i % 50)) == i\n"
        "    if i == 200:\n"
        "        print('ready', flush=True)\n"
        "    i += 1\n")
    proc = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline() == "ready\n"
        time.sleep(0.1)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(5)
    with Spool(tmp_path, segment_bytes=20000) as spool:
        got = list(spool.iter_records())
        assert spool.corrupt_records == 0
    assert len(got) > 200 and len(spool.segments) > 1
    assert got == [(i, i.to_bytes(4, "little") * (1 + i % 50)) for i in range(len(got))]
