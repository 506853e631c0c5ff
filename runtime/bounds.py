"""Bounds of numeric settings, declared on the field that declares the setting and checked at every way in.

A dataclass field carries its bound in its metadata, beside its help, and the dataclass's ``__post_init__`` calls
``check_bounds``: the command line, a config file and a Python caller share the one check. (Pydantic models declare
theirs with ``Field(ge=..., le=...)``; options that only the command line has, with typer's ``min``/``max``.) A value
outside its bound is a ``ConfigError`` naming the setting, before anything runs or is written.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from runtime.errors import ConfigError


@dataclass(frozen=True)
class Bound:
    """``low <= x <= high``; with ``open_low`` ``low < x``, with ``open_high`` ``x < high``; ``high`` infinite: a
    floor and no ceiling.

    >>> Bound(0, 1, open_low=True).holds(0), str(Bound(0, 1, open_low=True)), str(Bound(1, 50_000))
    (False, '0<x<=1', '1<=x<=50000')
    >>> str(Bound(1, math.inf))
    '1<=x'
    """

    low: float
    high: float
    open_low: bool = False
    open_high: bool = False

    def holds(self, value: float) -> bool:
        if math.isnan(value):
            return False
        above = value > self.low if self.open_low else value >= self.low
        below = value < self.high if self.open_high else value <= self.high
        return above and below

    def __str__(self) -> str:
        low = f"{_number(self.low)}{'<' if self.open_low else '<='}x"
        return low if math.isinf(self.high) else f"{low}{'<' if self.open_high else '<='}{_number(self.high)}"


def within(low: float, high: float, *, open_low: bool = False, open_high: bool = False) -> dict[str, Bound]:
    """A field's metadata entry for its bound: ``field(default=3, metadata={"help": "...", **within(1, 50)})``."""
    return {"bound": Bound(low, high, open_low, open_high)}


def check_bounds(settings: Any, *, options: bool = False) -> None:
    """Every bounded field of the dataclass ``settings`` (None: not set) inside its bound, else a ``ConfigError``
    naming it: as ``--the-option`` where ``options`` (settings a command's options fill), else by field name."""
    for f in dataclasses.fields(settings):
        bound, value = f.metadata.get("bound"), getattr(settings, f.name)
        if bound is None or value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int | float) or not bound.holds(value):
            name = "--" + f.name.replace("_", "-") if options else f.name
            raise ConfigError(f"{name} must be in the range {bound}, got {value!r}")


def _number(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else repr(x)
