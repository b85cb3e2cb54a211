"""What the fuzz suite throws: JSON that Python or PostgreSQL chokes on
(integers of thousands of digits, nesting thousands deep, lone surrogates,
NUL, NaN), values of the wrong type, and mutations of valid bodies.

A `Raw` value is written into the body as it is, so a body can hold what
`json.dumps` refuses to write (an integer of 5,000 digits) or would never
write (a `\\ud800` escape standing alone)."""

from __future__ import annotations

import copy
import json
import os
from dataclasses import dataclass
from typing import Any

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

# Shared by every fuzz test: no example database (runs stay independent and
# leave no files), no per-example deadline (CI machines are slow and shared).
# FUZZ_SCALE multiplies the examples (2 doubles them) for a longer hunt.
SCALE = float(os.environ.get("FUZZ_SCALE", "1"))


def examples(count: int) -> int:
    return max(1, round(count * SCALE))


FUZZ = settings(
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


@dataclass(frozen=True)
class Raw:
    text: str


def dump(value: Any) -> str:
    """JSON text of `value`, `Raw` parts written verbatim."""
    if isinstance(value, Raw):
        return value.text
    if isinstance(value, dict):
        return "{" + ", ".join(f"{json.dumps(key)}: {dump(item)}" for key, item in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ", ".join(dump(item) for item in value) + "]"
    return json.dumps(value)


RAW_VALUES = [
    Raw("9" * 5000),  # over Python's 4300-digit int() limit: a plain ValueError
    Raw("-" + "1" * 4301),
    Raw("1" + "0" * 25),  # parses, but fits no PostgreSQL integer
    Raw("18446744073709551616"),
    Raw("1e999"),  # float('inf')
    Raw("-1e999"),
    Raw("NaN"),
    Raw("Infinity"),
    Raw("[" * 3000 + "]" * 3000),  # RecursionError in json.loads
    Raw('{"a": ' * 2000 + "1" + "}" * 2000),
    Raw("[" * 100 + "]" * 100),  # parses, deeper than any real body
    Raw('"\\ud800"'),  # lone high surrogate
    Raw('"x\\udfff"'),  # lone low surrogate
    Raw('"\\udfff\\ud800"'),  # the pair, backwards
    Raw('"\\u0000"'),
    Raw('"EUR\\u0000"'),
    Raw('"\\ud83d\\ude00"'),  # a valid pair: an emoji
]

ODD_CHARACTERS = st.one_of(
    st.sampled_from(
        ["\x00", "\ud800", "\udfff", "\ufffd", "\u202e", "\u0301", "é", "ß", "€", "\n", '"', "\\"]
    ),
    st.characters(),
)
ODD_TEXT = st.text(ODD_CHARACTERS, max_size=12) | st.sampled_from(
    ["", " ", "x" * 300, "TEE", "EUR", "9" * 5000, "-1", "1e999", "NaN", "true"]
)
WRONG_TYPES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.sampled_from([0, -1, 1, 2**31 - 1, 2**31, 2**63 - 1, 2**63, 101, 10**6]),
    st.floats(allow_nan=False, allow_infinity=False),
    ODD_TEXT,
    st.lists(st.integers(), max_size=3),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
)
NASTY = st.one_of(st.sampled_from(RAW_VALUES), WRONG_TYPES)

RAW_BODIES = st.one_of(
    st.sampled_from(
        [
            b"",
            b"null",
            b"[]",
            b"{",
            b'{"a": 1,}',
            b"\xff\xfe\x00",
            b"\xed\xa0\x80",  # a surrogate in raw UTF-8: not UTF-8 at all
            ("9" * 5000).encode(),
            ("[" * 5000 + "]" * 5000).encode(),
            b'"\\ud800"',
        ]
    ),
    st.binary(max_size=64),
)


def _locations(value: Any, here: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every place in a template: containers and leaves, the root included."""
    found = [here]
    if isinstance(value, dict):
        for key, item in value.items():
            found.extend(_locations(item, (*here, key)))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            found.extend(_locations(item, (*here, index)))
    return found


def _replace(document: Any, where: tuple[Any, ...], value: Any) -> Any:
    if not where:
        return value
    parent = document
    for step in where[:-1]:
        parent = parent[step]
    parent[where[-1]] = value
    return document


@st.composite
def mutated(draw: st.DrawFn, template: Any) -> bytes:
    """A valid body with one to three things replaced, added or removed; or
    now and then raw bytes that are hardly JSON at all."""
    if draw(st.integers(0, 9)) == 0:
        return draw(RAW_BODIES)
    document = copy.deepcopy(template)
    for _ in range(draw(st.integers(1, 3))):
        places = _locations(document)
        where = draw(st.sampled_from(places))
        target = _at(document, where)
        action = draw(st.sampled_from(["replace", "replace", "add", "drop"]))
        if action == "add" and isinstance(target, dict):
            target[draw(ODD_TEXT)] = draw(NASTY)
        elif action == "drop" and where and isinstance(_at(document, where[:-1]), dict):
            del _at(document, where[:-1])[where[-1]]
        else:
            document = _replace(document, where, draw(NASTY))
        if isinstance(document, Raw):
            break
    return dump(document).encode("utf-8", "surrogatepass")


def _at(document: Any, where: tuple[Any, ...]) -> Any:
    for step in where:
        if not isinstance(document, dict | list):
            return None
        document = document[step]
    return document
