"""Grade-school math word problems written by us, in the GSM8K layout.

This module owns the synthetic data the shipped tiny model is trained and tested on: a seeded
generator of short word problems (shopping, sharing, rates, ages, percentages, units, areas,
savings, recipes, ...) whose answers are step-by-step solutions in the GSM8K layout, without
GSM8K's `<<...>>` calculator annotations:

    Cost of the pens: 3 * 4 = 12
    Change: 20 - 12 = 8
    #### 8

Every solution line is `label: a op b = c` with one binary operation (+ - * /) on non-negative
integers, so a small model learns one piece of arithmetic per line, and `c` is computed by
`Solution.step` (`solution.py`), never typed by hand. Numbers are chosen so that divisions are
exact and every intermediate result is a non-negative integer; operands stay mostly below 1000.
Each family is one small function in `families/` registered in `FAMILIES`; a problem takes 2 to
5 steps. This module owns the problems and their splits; the words live in `vocabulary.py`.

Generation is deterministic per seed (`random.Random(seed)`, never the global generator);
`make_splits` returns disjoint, internally deduplicated train and test sets.
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from ..atomic import atomic_write_text
from ..errors import FastDLLMError
from . import families  # noqa: F401  (registers the families, in order)
from .solution import FAMILIES, Solution, apply_op  # noqa: F401  (apply_op: part of the API)


@dataclass(frozen=True)
class Problem:
    question: str
    answer: str  # solution lines, then "#### <final>"
    family: str
    final: int


def make_problem(family: str, rng: random.Random) -> Problem:
    solution = Solution()
    question = FAMILIES[family](rng, solution)
    return Problem(question, solution.answer(), family, solution.last)


def _stream(seed: int) -> Iterator[Problem]:
    """Problems cycling through the families in order, so every family is equally common."""
    rng = random.Random(seed)
    names = list(FAMILIES)
    i = 0
    while True:
        yield make_problem(names[i % len(names)], rng)
        i += 1


def generate_problems(n: int, seed: int) -> list[Problem]:
    """The first `n` problems for `seed` (may repeat a question; `make_splits` dedupes)."""
    if n < 0:
        raise FastDLLMError(f"n must be >= 0, got {n}", field="n")
    stream = _stream(seed)
    return [next(stream) for _ in range(n)]


def _unique(seed: int, n: int, exclude: set[str]) -> list[Problem]:
    seen, out = set(exclude), []
    stream, tries = _stream(seed), 0
    while len(out) < n:
        tries += 1
        if tries > 20 * n + 1000:  # far more than duplicates ever cost; the space ran out
            raise FastDLLMError(f"could only make {len(out)} distinct problems of {n} requested")
        p = next(stream)
        if p.question not in seen:
            seen.add(p.question)
            out.append(p)
    return out


# make_splits arguments of the shipped models' data (scripts/build_shipped_models.py): 200k train
# problems from seed 1, 2k held-out test problems from seed 2
SHIPPED_SPLIT = (200_000, 2_000, 1, 2)


def make_splits(n_train: int, n_test: int, train_seed: int,
                test_seed: int) -> tuple[list[Problem], list[Problem]]:
    """`n_train` and `n_test` distinct problems; no test question appears in train."""
    if n_train < 0 or n_test < 0:
        raise FastDLLMError(f"split sizes must be >= 0, got {n_train} and {n_test}")
    train = _unique(train_seed, n_train, set())
    test = _unique(test_seed, n_test, {p.question for p in train})
    return train, test


def write_jsonl(problems: list[Problem], path: str | os.PathLike) -> Path:
    """GSM8K-style lines `{"question": ..., "answer": ...}`, written atomically (temp + rename)."""
    lines = (json.dumps({"question": p.question, "answer": p.answer}) + "\n" for p in problems)
    return atomic_write_text(path, "".join(lines))
