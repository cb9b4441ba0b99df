"""One solution line of arithmetic, and the registry of problem families.

Every solution line is `label: a op b = c` with one binary operation (+ - * /) on non-negative
integers; `c` is computed by `Solution.step`, never typed by hand, and `apply_op` refuses
inexact divisions and negative results, so a family that picks bad numbers fails loudly instead
of teaching the model wrong arithmetic.
"""

from __future__ import annotations

import random
from collections.abc import Callable


def apply_op(a: int, op: str, b: int) -> int:
    """`a op b` for non-negative integers; raises ValueError when the result would not be a
    non-negative integer, so a family that picks bad numbers fails loudly instead of teaching
    the model wrong arithmetic."""
    if op == "+":
        c = a + b
    elif op == "-":
        c = a - b
    elif op == "*":
        c = a * b
    elif op == "/":
        if b == 0 or a % b:
            raise ValueError(f"{a} / {b} is not an exact division")
        c = a // b
    else:
        raise ValueError(f"unknown operator {op!r}")
    if a < 0 or b < 0 or c < 0:
        raise ValueError(f"{a} {op} {b} = {c} leaves the non-negative integers")
    return c


class Solution:
    """Collects solution lines; the result of every line is computed here."""

    def __init__(self):
        self.lines: list[str] = []
        self.last: int | None = None

    def step(self, label: str, a: int, op: str, b: int) -> int:
        c = apply_op(a, op, b)
        self.lines.append(f"{label}: {a} {op} {b} = {c}")
        self.last = c
        return c

    def answer(self) -> str:
        return "\n".join([*self.lines, f"#### {self.last}"])


Family = Callable[[random.Random, Solution], str]  # fills the solution, returns the question
FAMILIES: dict[str, Family] = {}  # in registration order: the generator cycles through it


def family(fn: Family) -> Family:
    FAMILIES[fn.__name__] = fn
    return fn
