"""One toolkit for checking settings by name, used by the fine-tuning configuration (`xtl.config.RunConfig`)
and the pipeline's (`xtl.pipeline.config.PipelineConfig`): unknown keys (with the known ones named),
types (ints coerced to floats where a number is declared; NaN and infinities refused), choices and
ranges. Every error is one line naming the setting as the user gave it: `option --batch-size` on the
command line, `FILE: key 'batch_size'` in a configuration file (`label`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from types import UnionType
from typing import Any, Iterable, Mapping, Union, get_args, get_origin, get_type_hints

from xtl.errors import XtlError


def label(name: str, where: str) -> str:
    """How an error names a setting: `option --batch-size` on the CLI, `FILE: key 'batch_size'` in a file."""
    return f"option --{name.replace('_', '-')}" if where == "option" else f"{where}: key '{name}'"


def check_known(keys: Iterable[str], known: Iterable[str], where: str, listed: Iterable[str] | None = None) -> None:
    """`where: unknown key(s) a, b; known: ...` when `keys` holds a name not in `known`; `listed`: the
    known names to show, where some known ones may not be set there."""
    known = set(known)
    unknown = sorted(set(keys) - known)
    if unknown:
        shown = sorted(listed if listed is not None else known)
        raise XtlError(f"{where}: unknown key(s) {', '.join(unknown)}; known: {', '.join(shown)}")


# Upper bounds where one small number would cost unbounded memory or time (issue 28), each stated in
# the message: an input side (the decoded split and every activation grow with its square), the steps of a perturbation curve
# (each a forward pass per image and metric; past a few hundred the curve's area no longer moves),
# and a count (a method's samples, masks, path points; the grid pointing game's mosaics: each a forward or
# backward pass).
MAX_INPUT_SIZE = 1024
MAX_STEPS = 1000
MAX_COUNT = 100_000


@dataclass(frozen=True)
class Rule:
    """What a setting may hold beyond its type: one of `choices`, or a number in a range. `note` is
    said in parentheses after the range ("0: no clipping"), `none` what null means ("all")."""

    choices: tuple = ()
    above: float | None = None  # value > above
    at_least: float | None = None  # value >= at_least
    below: float | None = None  # value < below
    at_most: float | None = None  # value <= at_most
    note: str = ""
    none: str = ""

    def check(self, name: str, value: Any, where: str) -> None:
        if value is None:
            return
        if self.choices and value not in self.choices:
            raise XtlError(f"{label(name, where)} must be one of {', '.join(map(str, self.choices))}, not {value!r}")
        if _is_number(value) and not self._in_range(value):
            raise XtlError(f"{label(name, where)} must be {self.describe()}, not {value}")

    def _in_range(self, value: float) -> bool:
        return ((self.above is None or value > self.above) and (self.at_least is None or value >= self.at_least)
                and (self.below is None or value < self.below) and (self.at_most is None or value <= self.at_most))

    def describe(self) -> str:
        low = ("(", self.above) if self.above is not None else ("[", self.at_least) if self.at_least is not None else None
        high = (")", self.below) if self.below is not None else ("]", self.at_most) if self.at_most is not None else None
        if low and high:
            text = f"in {low[0]}{_number(low[1])}, {_number(high[1])}{high[0]}"
        elif low:
            text = f"{'>' if low[0] == '(' else '>='} {_number(low[1])}"
        elif high:
            text = f"{'<' if high[0] == ')' else '<='} {_number(high[1])}"
        else:
            text = "a number"
        return text + (f" ({self.note})" if self.note else "") + (f" or null ({self.none})" if self.none else "")


def check_settings(obj: Any, rules: Mapping[str, Rule], where: str = "option") -> None:
    """The dataclass `obj`'s types (`check_types`), then each named setting's `Rule`."""
    check_types(obj, where)
    for name, rule in rules.items():
        rule.check(name, getattr(obj, name), where)


def check_values(values: Mapping[str, Any], rules: Mapping[str, Rule], where: str = "option") -> None:
    """Settings given one by one (a command's options, by name): each number finite (not NaN, not an
    infinity), then within its `Rule`."""
    for name, value in values.items():
        if isinstance(value, float) and not math.isfinite(value):
            raise XtlError(f"{label(name, where)} must be a finite number, not {value}")
        rules[name].check(name, value, where)


def check_types(obj: Any, where: str = "option") -> None:
    """Every field of the dataclass `obj` holds a value of its annotated type; an int where a number
    (float) is declared becomes that float, and a number must be finite (not NaN, not an infinity)."""
    hints = get_type_hints(type(obj))
    for f in fields(obj):
        value, hint = getattr(obj, f.name), hints[f.name]
        if not _fits(value, hint):
            raise XtlError(f"{label(f.name, where)} must be {_type_name(hint)}, not {value!r}")
        if isinstance(value, float) and not math.isfinite(value):
            raise XtlError(f"{label(f.name, where)} must be a finite number, not {value}")
        if _is_number(value) and isinstance(value, int) and float in _members(hint) and int not in _members(hint):
            object.__setattr__(obj, f.name, float(value))


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _number(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


def _members(hint: Any) -> tuple:
    return get_args(hint) if get_origin(hint) in (Union, UnionType) else (hint,)


def _fits(value: Any, hint: Any) -> bool:
    origin, args = get_origin(hint), get_args(hint)
    if hint is Any:
        return True
    if origin in (Union, UnionType):
        return any(_fits(value, a) for a in args)
    if hint is type(None):
        return value is None
    if origin in (list, tuple):
        return isinstance(value, (list, tuple)) and all(_fits(v, args[0]) for v in value) if args else isinstance(value, (list, tuple))
    if origin is dict:
        return isinstance(value, dict)
    if hint is float:
        return _is_number(value)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, hint)


def _type_name(hint: Any) -> str:
    origin, args = get_origin(hint), get_args(hint)
    if origin in (Union, UnionType):
        named = [_type_name(a) for a in args if a is not type(None)]
        return " or ".join(named) + (" or null" if type(None) in args else "")
    if origin is dict:
        return "a mapping"
    if origin in (list, tuple):
        return f"a list of {_type_name(args[0])}" if args else "a list"
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string", dict: "a mapping"}.get(hint, str(hint))
