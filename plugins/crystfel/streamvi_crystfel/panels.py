"""Stable panel numbering for one stream: panel name → int16 index.

Numbering starts from the geometry file's panel order (so index *i* is CrystFEL's panel *i*)
and grows when a reflection names a panel the geometry did not list.  Every message of a
stream thus uses the same numbering and carries the same ``panel_names`` list.
"""
from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np

#: Names up to this many bytes are looked up as one 64-bit integer.
KEY_BYTES = 8
_MAX_PANELS = 32767  # int16 indices
_BYTES = np.arange(KEY_BYTES + 1)
#: Per name length: mask keeping the name's bytes, and filler (0x7f) for the rest.
_KEEP = np.array([(1 << (8 * n)) - 1 for n in _BYTES], dtype=np.uint64)
_FILL = np.array([0x7F7F7F7F7F7F7F7F & ~int(k) for k in _KEEP], dtype=np.uint64)
_LOW = np.uint64(0x2121212121212121)  # byte-wise 33: anything below is space/control
_HIGH = np.uint64(0x8080808080808080)


def _key(name: str) -> int | None:
    raw = name.encode("utf-8")
    return int.from_bytes(raw.ljust(KEY_BYTES, b"\0"), "little") if len(raw) <= KEY_BYTES \
        else None


def _multipliers() -> list[np.uint64]:
    """Fixed odd 64-bit multipliers (splitmix64 outputs) tried for the hash."""
    out, x = [], 0x9E3779B97F4A7C15
    for _ in range(16):
        x = (x + 0x9E3779B97F4A7C15) & (2**64 - 1)
        z = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & (2**64 - 1)
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & (2**64 - 1)
        out.append(np.uint64((z ^ (z >> 31)) | 1))
    return out


_MULTIPLIERS = _multipliers()


class _PerfectHash:
    """Collision-free multiplicative hash of a fixed set of keys (``None`` if none found)."""

    def __init__(self, keys: np.ndarray, ids: np.ndarray):
        self.ok = False
        n = keys.size
        if n == 0:
            return
        for bits in range(max(6, 2 * int(n).bit_length() + 1), 17):
            shift = np.uint64(64 - bits)
            for mult in _MULTIPLIERS:
                slots = (keys * mult) >> shift
                if np.unique(slots).size == n:
                    self.mult, self.shift = mult, shift
                    self.keys = np.zeros(1 << bits, dtype=np.uint64)  # 0 is no name
                    self.ids = np.zeros(1 << bits, dtype=np.int16)
                    self.keys[slots] = keys
                    self.ids[slots] = ids
                    self.ok = True
                    return

    def lookup(self, keys: np.ndarray) -> np.ndarray | None:
        """Ids of ``keys``, or ``None`` if one of them is not in the set."""
        slots = (keys * self.mult) >> self.shift
        if not (self.keys[slots] == keys).all():
            return None
        return self.ids[slots]


class PanelIndex:
    """Panel names and their indices.

    Parameters
    ----------
    names
        Initial names, in order (e.g. the geometry file's panels).

    Attributes
    ----------
    names
        Names by index.  The list is replaced, never changed in place, when names are added,
        so messages can share it.
    """

    def __init__(self, names: Iterable[str] = ()):
        self.names: list[str] = []
        self._index: dict[str, int] = {}
        self._keys = np.zeros(0, dtype=np.uint64)  # sorted
        self._ids = np.zeros(0, dtype=np.int16)  # index of each entry of _keys
        self._hash = _PerfectHash(self._keys, self._ids)
        self.add(names)

    def __len__(self) -> int:
        return len(self.names)

    def add(self, names: Iterable[str]) -> None:
        """Append the names not known yet, in the order given."""
        new = [n for n in dict.fromkeys(names) if n not in self._index]
        if not new:
            return
        if len(self.names) + len(new) > _MAX_PANELS:
            raise ValueError(f"more than {_MAX_PANELS} distinct panel names; panel indices "
                             "are int16 on the wire")
        for name in new:
            self._index[name] = len(self._index)
        self.names = self.names + new
        pairs = sorted((k, i) for name, i in self._index.items()
                       if (k := _key(name)) is not None)
        self._keys = np.array([k for k, _ in pairs], dtype=np.uint64)
        self._ids = np.array([i for _, i in pairs], dtype=np.int16)
        self._hash = _PerfectHash(self._keys, self._ids)

    def indices(self, names: Sequence[str]) -> np.ndarray:
        """Index of each name (new names are added)."""
        self.add(names)
        return np.array([self._index[n] for n in names], dtype=np.int16)

    def lookup_fixed(self, buf: np.ndarray, starts: np.ndarray,
                     lengths: np.ndarray) -> np.ndarray | None:
        """Indices of the names of ``lengths`` (1–8) bytes at ``starts`` in ``buf``.

        ``buf`` must extend at least 8 bytes past every start.  Returns ``None`` when a name
        holds whitespace or a control character (the caller then takes its general path).
        """
        windows = np.ndarray((buf.shape[0] - KEY_BYTES + 1, KEY_BYTES), dtype=np.uint8,
                             buffer=buf, strides=(1, 1))
        keys = windows[starts].view("<u8").ravel() & _KEEP[lengths]
        # Any byte below 33 (SWAR "has less than"), with the bytes past the name at 0x7f.
        probe = keys | _FILL[lengths]
        if ((probe - _LOW) & ~probe & _HIGH).any():
            return None
        for _ in range(2):
            if self._hash.ok:
                ids = self._hash.lookup(keys)
                if ids is not None:
                    return ids
            if self._keys.size:
                pos = np.minimum(np.searchsorted(self._keys, keys), self._keys.size - 1)
                known = self._keys[pos] == keys
                if known.all():
                    return self._ids[pos]
                unknown = keys[~known]
            else:
                unknown = keys
            # First sight of these names: add them in order of appearance.
            uniq, first = np.unique(unknown, return_index=True)
            self.add(int(k).to_bytes(KEY_BYTES, "little").rstrip(b"\0")
                     .decode("utf-8", errors="replace") for k in uniq[np.argsort(first)])
        return None  # pragma: no cover - the second pass always finds every key
