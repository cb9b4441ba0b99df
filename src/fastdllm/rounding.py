"""Integer rounding to whole multiples (blocks of positions, padded vocabularies).

It sits below both of its users, the engine (positions in whole blocks) and training (the
vocabulary padded to a multiple), so neither depends on the other for arithmetic.
"""


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def round_down(n: int, multiple: int) -> int:
    return n // multiple * multiple
