"""Configs that check themselves: rules a config's ``__post_init__`` applies to its fields, each failure ONE
``ValueError`` that names the class, the field, what is allowed and what was given::

    def __post_init__(self):
        check_choices(self)                                   # every Literal[...] field holds one of its values
        check_fields(self, {"env_steps": INT_AT_LEAST_1, "gamma": between(0, 1)})

A command line turns that ValueError into one line and exit status 2 (``rlnlp.cli.run``).
"""
from __future__ import annotations

import math
import typing
from dataclasses import fields
from typing import Callable, Literal

Rule = tuple[Callable[[object], bool], str]
"""(test, what is allowed): the test gets the field's value."""


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return (isinstance(v, (int, float)) and not isinstance(v, bool)) and math.isfinite(v)


FINITE: Rule = (_is_number, "a finite number")
INT_AT_LEAST_1: Rule = (lambda v: _is_int(v) and v >= 1, "an integer ≥ 1")
INT_AT_LEAST_0: Rule = (lambda v: _is_int(v) and v >= 0, "an integer ≥ 0")
POSITIVE: Rule = (lambda v: _is_number(v) and v > 0, "a finite number > 0")
NON_NEGATIVE: Rule = (lambda v: _is_number(v) and v >= 0, "a finite number ≥ 0")


def between(low: float, high: float, low_open: bool = False, high_open: bool = False) -> Rule:
    """A number in [low, high], with either end open."""
    test = lambda v: _is_number(v) and (v > low if low_open else v >= low) and (v < high if high_open else v <= high)
    return test, f"a number in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"


def optional(rule: Rule) -> Rule:
    """``rule``, or None."""
    test, want = rule
    return (lambda v: v is None or test(v)), f"None or {want}"


def check_fields(cfg, rules: dict[str, Rule]) -> None:
    """Raise ValueError naming the first field of ``rules`` whose value breaks its rule."""
    for name, (test, want) in rules.items():
        value = getattr(cfg, name)
        if not test(value):
            raise ValueError(f"{type(cfg).__name__}.{name} must be {want}, got {value!r}")


def choices(cls, name: str) -> tuple:
    """The values a ``Literal[...]`` field of dataclass ``cls`` allows (() when it is not a Literal)."""
    hint = typing.get_type_hints(cls).get(name)
    return typing.get_args(hint) if typing.get_origin(hint) is Literal else ()


def check_choices(cfg, names: typing.Iterable[str] | None = None) -> None:
    """Raise ValueError naming the first ``Literal[...]`` field (of ``names``; default every field) whose value is not
    one of its values."""
    hints = typing.get_type_hints(type(cfg))
    for name in names if names is not None else [f.name for f in fields(cfg)]:
        hint, value = hints.get(name), getattr(cfg, name)
        allowed = typing.get_args(hint) if typing.get_origin(hint) is Literal else ()
        if allowed and value not in allowed:
            raise ValueError(f"{type(cfg).__name__}.{name} must be one of {', '.join(map(repr, allowed))}, "
                             f"got {value!r}")
