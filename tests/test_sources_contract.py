"""The contract every registered source fulfils (streamvi.sources), one suite for all.

Each source registered in the entry-point group ``streamvi.sources`` needs a :class:`Case`
here: how to make it on valid input with exact expected counts, a broken variant, and the
input files a sender resumes through a position file.  A new source without a case fails
:func:`test_every_registered_source_has_a_case`.
"""
from __future__ import annotations

import json
import re
import shutil
import threading
import time
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import pytest
import zmq
from conftest import DIALS_EXPT, DIALS_REFL, LCLS_STREAM, requires_lcls

from streamvi.producers.send import send_files
from streamvi.sources import Rejected, available_sources, load_source
from streamvi.wire import CrystalMessage, decode_crystal, encode_crystal

LCLS = LCLS_STREAM    # GPL-3.0, from ../shared/data: the crystfel case skips where absent
REFL = DIALS_REFL     # MIT, carried in tests/data
EXPT = DIALS_EXPT
TIMEOUT_S = 10.0


@dataclass
class Case:
    """How one source is put through the contract.

    Attributes
    ----------
    make
        The source on valid input.
    messages, reflections
        Exact counts it must give (``reflections`` None: checked only for determinism).
    broken
        The source on a damaged copy of the input (made in the given directory); None when
        the source reads no input.
    broken_messages, broken_reasons
        What the damaged input must still give, and the reasons of its ``Rejected`` records.
    inputs
        The files ``streamvi send`` takes for this source (resume test); None: not a file.
    rate
        Images per second for the first, interrupted send of the resume test.
    """

    make: Callable[[], Iterable]
    messages: int
    reflections: int | None
    broken: Callable[[Path], Iterable] | None = None
    broken_messages: int = 0
    broken_reasons: tuple[str, ...] = ()
    inputs: list[Path] | None = None
    rate: float = 50.0


def _crystfel() -> Iterable:
    from streamvi_crystfel import CrystfelSource
    return CrystfelSource(LCLS)


def _crystfel_broken(tmp: Path) -> Iterable:
    from streamvi_crystfel import CrystfelSource
    text = LCLS.read_bytes()
    row = b" -13  -39  -22      45.43      99.45      96.00      48.46  818.1  672.2 q2a6\n"
    assert text.count(row) == 1
    path = tmp / "broken.stream"
    path.write_bytes(text.replace(row, row.replace(b"99.45", b"99.4#")))
    return CrystfelSource(path)


def _dials() -> Iterable:
    from streamvi_dials import DialsSource
    return DialsSource(REFL)


def _dials_broken(tmp: Path) -> Iterable:
    from streamvi_dials import DialsSource
    doc = json.loads(EXPT.read_text())
    del doc["experiment"][2]["crystal"]
    refl = tmp / "broken.refl"
    shutil.copy(REFL, refl)
    refl.with_suffix(".expt").write_text(json.dumps(doc))
    return DialsSource(refl)


def _sim() -> Iterable:
    from streamvi_sim import SimulatedSource, SimulationConfig
    return SimulatedSource(SimulationConfig(n_images=5, seed=11, n_atoms=40, n_sulfur=2,
                                            n_iodide=1, dmin=3.0))


CASES: dict[str, Case] = {
    "crystfel": Case(_crystfel, messages=32, reflections=7966, broken=_crystfel_broken,
                     broken_messages=31, broken_reasons=("bad_reflection_row",), inputs=[LCLS]),
    "dials": Case(_dials, messages=3, reflections=502, broken=_dials_broken, broken_messages=2,
                  broken_reasons=("missing_crystal",), inputs=[REFL], rate=5.0),
    "sim": Case(_sim, messages=5, reflections=None),
}
NAMES = sorted(available_sources())
#: NAMES for parametrize: the crystfel case reads the GPL stream, skipped where it is absent.
PARAMS = [pytest.param(n, marks=requires_lcls) if n == "crystfel" else n for n in NAMES]


@pytest.fixture(scope="module")
def items() -> dict[str, list]:
    """Every case's items, read once (sources are deterministic, checked below)."""
    return {name: list(CASES[name].make()) for name in NAMES
            if name in CASES and (name != "crystfel" or LCLS.is_file())}


def crystals(items: Iterable) -> list[CrystalMessage]:
    return [i for i in items if isinstance(i, CrystalMessage)]


def same(a: Any, b: Any) -> bool:
    """Equality that looks inside arrays, maps and sequences."""
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        return (isinstance(a, np.ndarray) and isinstance(b, np.ndarray) and a.shape == b.shape
                and a.dtype.kind == b.dtype.kind and np.array_equal(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return a == b


def differing_fields(a: CrystalMessage, b: CrystalMessage) -> list[str]:
    return [f.name for f in fields(CrystalMessage)
            if f.name != "rows_rejected" and not same(getattr(a, f.name), getattr(b, f.name))]


def test_every_registered_source_has_a_case():
    assert {"crystfel", "dials", "sim"} <= set(NAMES)
    missing = sorted(set(NAMES) - set(CASES))
    assert not missing, f"sources without a contract case in {__file__}: {missing}"


@pytest.mark.parametrize("name", PARAMS)
def test_source_is_the_registered_class(name):
    assert isinstance(CASES[name].make(), load_source(name))


@pytest.mark.parametrize("name", PARAMS)
def test_items_are_messages_or_rejected(name, items, tmp_path):
    case = CASES[name]
    everything = list(items[name])
    if case.broken is not None:
        everything += list(case.broken(tmp_path))
    assert everything
    assert all(isinstance(i, (CrystalMessage, Rejected)) for i in everything)


@pytest.mark.parametrize("name", PARAMS)
def test_exact_counts(name, items):
    case = CASES[name]
    msgs = crystals(items[name])
    assert len(msgs) == case.messages and len(items[name]) == case.messages
    assert len({m.key for m in msgs}) == case.messages
    if case.reflections is not None:
        assert sum(len(m) for m in msgs) == case.reflections


@pytest.mark.parametrize("name", PARAMS)
def test_messages_round_trip_on_the_wire(name, items):
    for msg in crystals(items[name]):
        back = decode_crystal(encode_crystal(msg))
        assert differing_fields(msg, back) == [], msg.key
        assert back.rows_rejected == {}   # the source already dropped what the wire drops


@pytest.mark.parametrize("name", PARAMS)
def test_iterating_twice_gives_the_same_messages(name):
    source = CASES[name].make()
    first, second = list(source), list(source)
    assert len(first) == len(second)
    for a, b in zip(first, second):
        assert type(a) is type(b)
        if isinstance(a, CrystalMessage):
            assert differing_fields(a, b) == [] and a.rows_rejected == b.rows_rejected
        else:
            assert a == b


@pytest.mark.parametrize("name", PARAMS)
def test_broken_input_is_rejected_and_the_rest_read(name, tmp_path):
    case = CASES[name]
    if case.broken is None:
        pytest.skip(f"{name} reads no input, so there is nothing to break")
    out = list(case.broken(tmp_path))
    bad = [i for i in out if isinstance(i, Rejected)]
    assert tuple(r.reason for r in bad) == case.broken_reasons
    for r in bad:
        assert r.source and str(tmp_path) in r.source
        assert r.position and re.fullmatch(r"[a-z][a-z0-9_]*", r.reason) and r.detail
    assert len(crystals(out)) == case.broken_messages


@pytest.mark.parametrize("name", PARAMS)
def test_nothing_sent_twice_after_a_restart(name, items, tmp_path):
    case = CASES[name]
    if case.inputs is None:
        pytest.skip(f"{name} is not read from files: there is no position to resume from")
    expected = sorted(m.key for m in crystals(items[name]))
    positions = tmp_path / "positions.json"
    ctx = zmq.Context()
    pull = ctx.socket(zmq.PULL)
    pull.setsockopt(zmq.LINGER, 0)
    pull.bind("tcp://127.0.0.1:*")
    url = pull.getsockopt_string(zmq.LAST_ENDPOINT)
    got: list[tuple[str, str, int]] = []

    def receive(until: int, quiet_ms: int = 300) -> None:
        deadline = time.monotonic() + TIMEOUT_S
        while len(got) < until and time.monotonic() < deadline:
            if pull.poll(20):
                got.append(decode_crystal(pull.recv()).key)
        while pull.poll(quiet_ms):
            got.append(decode_crystal(pull.recv()).key)

    try:
        stop = threading.Event()
        sender = threading.Thread(target=send_files, args=(case.inputs, url), kwargs=dict(
            position_file=positions, stop_event=stop, rate=case.rate, timeout_s=5.0),
            daemon=True)
        sender.start()
        receive(until=1, quiet_ms=0)
        stop.set()
        sender.join(TIMEOUT_S)
        assert not sender.is_alive()
        receive(until=0)
        first = len(got)
        assert 1 <= first < len(expected), "the first send was not interrupted"
        report = send_files(case.inputs, url, position_file=positions, timeout_s=5.0)
        receive(until=len(expected))
        assert report.sent == len(expected) - first
        assert sorted(got) == expected          # nothing twice, nothing missing
        assert send_files(case.inputs, url, position_file=positions, timeout_s=5.0).sent == 0
        (entry,) = json.loads(positions.read_text()).values()
        assert entry["sent"] == len(expected)
    finally:
        pull.close()
        ctx.term()
