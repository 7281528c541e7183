"""Which condition (pump–probe: ``dark``, ``light``, …) each crystal belongs to.

A crystal's condition is its wire message's ``condition``.  Files do not carry one; it comes
from the user (docs/time-resolved.md):

- ``--condition NAME``: every crystal of an input (one name for all inputs, or one per input);
- ``--condition-field KEY --condition-map '0=dark,1=light'``: a per-chunk value the indexer
  copied into the stream (``indexamajig --copy-header``; the CrystFEL reader exposes it in
  ``msg.metadata[KEY]``, e.g. ``header/int//sim/pump_code``), mapped to names;
- ``--condition-file events.csv``: an event list (image file, event, condition), as a
  facility's event records give it.

A crystal whose field is missing, or whose value the map does not name, keeps no condition;
the merge then refuses it as ``unknown_condition`` and counts it.
"""
from __future__ import annotations

import os
from typing import Callable, Iterable, Mapping, Sequence

from streamvi.errors import ConfigError
from streamvi.wire import CrystalMessage


def parse_condition_map(text: str, *, key: str = "--condition-map") -> dict[str, str]:
    """``'0=dark,1=light'`` → ``{"0": "dark", "1": "light"}``.

    Raises
    ------
    ConfigError
        Naming ``key`` and the piece that is not ``VALUE=NAME``, or a value given twice.
    """
    out: dict[str, str] = {}
    for part in (p.strip() for p in str(text).split(",")):
        if not part:
            continue
        value, sep, name = (s.strip() for s in part.partition("="))
        if not sep or not value or not name:
            raise ConfigError(f"{key} {text!r}: {part!r} is not VALUE=NAME; give e.g. "
                              "'0=dark,1=light'")
        if value in out:
            raise ConfigError(f"{key} {text!r}: value {value!r} is mapped twice")
        out[value] = name
    if not out:
        raise ConfigError(f"{key} is empty; give e.g. '0=dark,1=light'")
    return out


def field_key(value: object) -> str:
    """The text a header value is looked up by in a condition map: integers (and floats
    that are whole numbers, as ``header/float`` fields are) without a decimal point."""
    if isinstance(value, bool):
        return str(int(value))
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    text = str(value).strip()
    try:
        number = float(text)
    except ValueError:
        return text
    return str(int(number)) if number.is_integer() else text


def label_by_field(msgs: Iterable[CrystalMessage], field: str,
                   mapping: Mapping[str, str]) -> list[CrystalMessage]:
    """Set each message's ``condition`` from ``msg.metadata[field]`` through ``mapping``
    (:func:`field_key` of the value); None where the field is missing or not mapped."""
    out = []
    for msg in msgs:
        value = (msg.metadata or {}).get(field)
        msg.condition = None if value is None else mapping.get(field_key(value))
        out.append(msg)
    return out


def label_all(msgs: Iterable[CrystalMessage], name: str) -> list[CrystalMessage]:
    """Set every message's ``condition`` to ``name``."""
    out = []
    for msg in msgs:
        msg.condition = name
        out.append(msg)
    return out


def condition_order(msgs: Iterable[CrystalMessage], reference: str | None = None
                    ) -> tuple[str, ...]:
    """The conditions present, the reference first (``reference``, else ``dark`` when
    present, else the first seen), then the others in the order first seen."""
    seen: list[str] = []
    for msg in msgs:
        if msg.condition and msg.condition not in seen:
            seen.append(msg.condition)
    if reference is None:
        reference = "dark" if "dark" in seen else (seen[0] if seen else None)
    if reference is None:
        return ()
    if reference not in seen:
        raise ConfigError(f"--reference-condition {reference!r}: no crystal has that "
                          f"condition (present: {', '.join(seen) or 'none'}); name one of "
                          "them")
    return (reference,) + tuple(c for c in seen if c != reference)


def per_input_names(names: Sequence[str], n_inputs: int, *,
                    key: str = "--condition") -> list[str]:
    """One condition name per input from ``names`` (one for all, or one per input)."""
    names = [n.strip() for n in names]
    if any(not n for n in names):
        raise ConfigError(f"{key}: an empty name; give e.g. {key} dark")
    if len(names) == 1:
        return names * n_inputs
    if len(names) != n_inputs:
        raise ConfigError(f"{key} given {len(names)} times for {n_inputs} inputs: give it "
                          "once (every input) or once per input, in the inputs' order")
    return list(names)


def read_condition_file(path: str | os.PathLike, *, key: str = "--condition-file"
                        ) -> dict[str, str]:
    """An event list: a CSV file with a header naming the columns ``image`` (the image file
    as the indexer wrote it in ``Image filename``), ``condition``, and optionally ``event``
    (as in the stream's ``Event:`` line, e.g. ``//12``).  Returns ``{image id: condition}``
    with the ids of :func:`streamvi_crystfel.messages.image_id`: ``image//event``, or the
    image alone (every event of that file).

    Raises
    ------
    ConfigError
        Naming the file and line: unreadable, no ``image``/``condition`` column, an empty
        field, or one image (and event) given two conditions.
    """
    import csv

    out: dict[str, str] = {}
    try:
        with open(path, newline="") as fh:
            rows = csv.DictReader(fh)
            cols = [c.strip() for c in (rows.fieldnames or [])]
            if "image" not in cols or "condition" not in cols:
                raise ConfigError(f"{key} {path}: the first line must name the columns image, "
                                  f"condition (and optionally event); it has {cols}")
            for line, row in enumerate(rows, start=2):
                row = {k.strip(): (v or "").strip() for k, v in row.items() if k}
                image, name = row.get("image", ""), row.get("condition", "")
                if not image or not name:
                    raise ConfigError(f"{key} {path}, line {line}: image and condition "
                                      "must both be given")
                event = row.get("event", "")
                ident = image if event.strip("/") == "" else f"{image}//{event}"
                if out.get(ident, name) != name:
                    raise ConfigError(f"{key} {path}, line {line}: {ident} is already "
                                      f"{out[ident]!r}, here {name!r}")
                out[ident] = name
    except OSError as exc:
        raise ConfigError(f"{key} {path}: cannot read it ({exc.strerror or exc})") from None
    if not out:
        raise ConfigError(f"{key} {path}: no rows; give one line per image (or event)")
    return out


def label_by_file(msgs: Iterable[CrystalMessage], mapping: Mapping[str, str]
                  ) -> list[CrystalMessage]:
    """Set each message's ``condition`` from an event list (:func:`read_condition_file`):
    its image id, else its image file (the part before ``//``), else None."""
    out = []
    for msg in msgs:
        name = mapping.get(msg.image)
        if name is None and "//" in msg.image:
            name = mapping.get(msg.image.split("//", 1)[0])
        msg.condition = name
        out.append(msg)
    return out


def condition_labeller(*, condition: Sequence[str] | None, field: str | None,
                       condition_map: str | None, n_inputs: int,
                       condition_file: str | None = None
                       ) -> Callable[[CrystalMessage, int], None] | None:
    """What ``send`` does to each crystal of input ``i`` before it goes on the wire: set its
    ``condition`` from ``--condition`` (one name, or one per input) or from
    ``--condition-field`` through ``--condition-map``; None without a condition option.

    Raises
    ------
    ConfigError
        As :func:`per_input_names` and :func:`parse_condition_map`; a field without a map,
        or a map without a field.
    """
    if condition:
        names = per_input_names(condition, n_inputs)

        def by_input(msg: CrystalMessage, index: int) -> None:
            msg.condition = names[index]
        return by_input
    if field:
        if not condition_map:
            raise ConfigError("--condition-field needs --condition-map, the conditions of its "
                              "values, e.g. --condition-map '0=dark,1=light'")
        mapping = parse_condition_map(condition_map)

        def by_field(msg: CrystalMessage, index: int) -> None:
            label_by_field((msg,), field, mapping)
        return by_field
    if condition_map:
        raise ConfigError("--condition-map needs --condition-field, the header value it maps")
    if condition_file:
        events = read_condition_file(condition_file)

        def by_file(msg: CrystalMessage, index: int) -> None:
            label_by_file((msg,), events)
        return by_file
    return None
