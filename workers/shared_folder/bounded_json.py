"""JSON from peers we do not trust, parsed within bounds.

Python's json accepts NaN and Infinity, turns 1e999 into inf, builds integers of any size (float() of one
then raises OverflowError far from the read) and recurses once per nesting level, so a file of ten thousand
brackets ends in RecursionError. Here each is refused as a ValueError the folder's readers turn into a
skipped file. Integers are bounded by a float's range, not 64 bits: a task's metadata may hold big numbers.
"""

import json
import math
import re
from itertools import accumulate
from typing import Any

MAX_DEPTH = 64            # arrays and objects inside each other; the swarm's records nest 5 deep at most
FLOAT_DIGITS = 309        # digits of the largest float, 1.8e308: every number read must fit one
_ESCAPE = re.compile(r"\\.", re.DOTALL)
_NOT_BRACKET = re.compile(r"[^\[\]{}]+")
_STEP = {"[": 1, "{": 1, "]": -1, "}": -1}


class RefusedJSON(ValueError):
    """Valid JSON the swarm refuses (a number out of range, NaN, nesting too deep); the text says which."""


def too_deep(text: str) -> bool:
    """Arrays and objects nest deeper than MAX_DEPTH outside strings; linear in the text, whatever it holds."""
    if text.count("[") + text.count("{") <= MAX_DEPTH:
        return False
    # with the escapes gone every '"' opens or closes a string, so the even pieces lie outside strings
    outside = "".join(_ESCAPE.sub("", text).split('"')[::2])
    return max(accumulate(map(_STEP.__getitem__, _NOT_BRACKET.sub("", outside))), default=0) > MAX_DEPTH


def _beyond_float(text: str) -> RefusedJSON:
    return RefusedJSON(f"number {text[:24]}{'...' if len(text) > 24 else ''} is beyond a float's range")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise _beyond_float(text)
    return value


def _bounded_int(text: str) -> int:
    if len(text) < FLOAT_DIGITS:       # under 1e308 whatever its digits: the common case (token ids) takes one call
        return int(text)
    # the length first: int() of thousands of digits is slow (Python refuses past 4300 digits for that reason)
    if len(text.lstrip("-")) > FLOAT_DIGITS:
        raise _beyond_float(text)
    value = int(text)
    try:
        float(value)       # the readers turn numbers into floats: one past 1.8e308 would raise OverflowError there
    except OverflowError:
        raise _beyond_float(text) from None
    return value


def _no_constant(name: str) -> Any:
    raise RefusedJSON(f"{name} is not a number the swarm writes")


def loads(text: str) -> Any:
    """The JSON value of `text`; ValueError (RefusedJSON for the bounds above) when it is not one we accept."""
    if too_deep(text):
        raise RefusedJSON(f"arrays or objects nested deeper than {MAX_DEPTH} levels")
    return json.loads(text, parse_float=_finite_float, parse_int=_bounded_int, parse_constant=_no_constant)
