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
`_Solution.step`, never typed by hand. Numbers are chosen so that divisions are exact and every
intermediate result is a non-negative integer; operands stay mostly below 1000. Each family is one
small function registered in `FAMILIES`; a problem takes 2 to 5 steps.

Generation is deterministic per seed (`random.Random(seed)`, never the global generator);
`make_splits` returns disjoint, internally deduplicated train and test sets.
"""

from __future__ import annotations

import json
import math
import os
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from ..atomic import atomic_write_text
from ..errors import FastDLLMError


@dataclass(frozen=True)
class Problem:
    question: str
    answer: str  # solution lines, then "#### <final>"
    family: str
    final: int


class _Person(NamedTuple):
    name: str
    he: str
    his: str


_GIRLS = ("Ava", "Mia", "Lily", "Emma", "Zoe", "Nora", "Ruth", "Ella", "Sofia", "Maya", "Lucy",
          "Hana", "Amara", "Ines", "Priya", "Leah", "Olga", "Rosa", "Tara", "Yuki", "Fatima",
          "Grace", "Chloe", "Jade", "Lena", "Mei", "Nadia", "Sara", "Vera", "Iris")
_BOYS = ("Tom", "Ben", "Sam", "Leo", "Omar", "Raj", "Jack", "Liam", "Noah", "Ivan", "Carlos",
         "Kofi", "Hugo", "Eli", "Finn", "Marco", "Ali", "Jamal", "Kenji", "Luis", "Max", "Oscar",
         "Paul", "Ravi", "Theo", "Umar", "Victor", "Wei", "Yusuf", "Diego")
_PEOPLE = tuple(_Person(n, "she", "her") for n in _GIRLS) + tuple(_Person(n, "he", "his") for n in _BOYS)

# (plural name, lowest price, highest price)
_SHOP_ITEMS = (("pens", 2, 5), ("notebooks", 2, 9), ("apples", 2, 4), ("books", 5, 20),
               ("toy cars", 3, 12), ("shirts", 8, 25), ("cupcakes", 2, 5), ("pencils", 2, 3),
               ("bottles of juice", 2, 6), ("comic books", 3, 9), ("sandwiches", 4, 9),
               ("candles", 2, 8), ("balloons", 2, 4), ("mugs", 3, 10), ("plants", 4, 15),
               ("puzzles", 6, 18), ("socks", 2, 6), ("hats", 5, 14))
_CURRENCIES = ("dollars", "euros", "pounds")
_BIG_ITEMS = ("bike", "guitar", "tent", "watch", "skateboard", "camera", "scooter", "telescope")
_COLLECTIBLES = ("marbles", "stickers", "stamps", "shells", "cards", "beads", "buttons",
                 "crayons", "rocks", "coins")
_FOODS = ("cookies", "candies", "grapes", "strawberries", "cherries", "crackers", "muffins",
          "chocolates", "nuts", "pretzels")
_CONTAINERS = ("boxes", "jars", "baskets", "crates", "packs", "tins")
_FRUIT_TREES = (("apple", "apples"), ("orange", "oranges"), ("lemon", "lemons"),
                ("peach", "peaches"), ("plum", "plums"), ("pear", "pears"))
_DISTANCE_UNITS = ("km", "miles")
# (verb, things, minutes each: divisors of 60, so the hours come out whole)
_CHORES = (("washes", "cars", (10, 12, 15, 20, 30)), ("walks", "dogs", (15, 20, 30)),
           ("paints", "chairs", (12, 15, 20, 30)), ("cleans", "rooms", (10, 15, 20, 30)),
           ("bakes", "cakes", (20, 30)), ("repairs", "bikes", (10, 15, 20, 30)),
           ("plants", "trees", (5, 6, 10, 12, 15)), ("irons", "shirts", (5, 6, 10)))
# (noun, where, has the trait, lacks it)
_GROUPS = (("students", "in a class", "wear glasses", "do not wear glasses"),
           ("cars", "in a parking lot", "are red", "are not red"),
           ("fish", "in a pond", "are goldfish", "are not goldfish"),
           ("people", "on a bus", "are children", "are not children"),
           ("books", "on a shelf", "are new", "are not new"),
           ("eggs", "in a basket", "are brown", "are not brown"),
           ("dogs", "in a park", "are puppies", "are not puppies"),
           ("birds", "in a tree", "are sparrows", "are not sparrows"),
           ("flowers", "in a garden", "are roses", "are not roses"))
# (dish, first ingredient, second ingredient, unit)
_RECIPES = (("cake", "flour", "sugar", "cups"), ("soup", "carrots", "potatoes", "cups"),
            ("bread", "flour", "milk", "cups"), ("salad", "tomatoes", "beans", "cups"),
            ("pancake", "milk", "flour", "cups"), ("cookie", "butter", "sugar", "spoons"))
# (big unit, small unit, small units per big unit, question template)
_CONVERSIONS = (
    ("hours", "minutes", 60, "A movie lasts {big} hours and {small} minutes. {name} has watched "
     "{used} minutes. How many minutes are left?"),
    ("meters", "centimeters", 100, "{name} has a rope {big} meters and {small} centimeters long. "
     "{He} cuts off {used} centimeters. How many centimeters are left?"),
    ("feet", "inches", 12, "{name} has a board {big} feet and {small} inches long. {He} saws off "
     "{used} inches. How many inches are left?"),
    ("weeks", "days", 7, "{name}'s trip lasts {big} weeks and {small} days. {He} has been away "
     "{used} days. How many days are left?"),
    ("minutes", "seconds", 60, "A song lasts {big} minutes and {small} seconds. {name} has heard "
     "{used} seconds. How many seconds are left?"),
    ("days", "hours", 24, "{name}'s camp lasts {big} days and {small} hours. {He} has been there "
     "{used} hours. How many hours are left?"),
)


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


class _Solution:
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


Family = Callable[[random.Random, _Solution], str]  # fills the solution, returns the question
FAMILIES: dict[str, Family] = {}


def _family(fn: Family) -> Family:
    FAMILIES[fn.__name__] = fn
    return fn


def _people(rng: random.Random, k: int) -> list[_Person]:
    return rng.sample(_PEOPLE, k)


def _cap(word: str) -> str:
    return word[0].upper() + word[1:]


# --- shopping and money -------------------------------------------------------------------------

@_family
def shopping_change(rng, s):
    p, (item, lo, hi), cur = _people(rng, 1)[0], rng.choice(_SHOP_ITEMS), rng.choice(_CURRENCIES)
    n, price = rng.randint(2, 9), rng.randint(lo, hi)
    paid = rng.choice([b for b in (10, 20, 50, 100, 200, 500) if b >= n * price][:2])
    cost = s.step(f"Cost of the {item}", n, "*", price)
    s.step("Change", paid, "-", cost)
    return (f"{p.name} buys {n} {item} for {price} {cur} each and pays with {paid} {cur}. "
            f"How much change does {p.he} get?")


@_family
def shopping_two_items(rng, s):
    p, cur = _people(rng, 1)[0], rng.choice(_CURRENCIES)
    (a_item, a_lo, a_hi), (b_item, b_lo, b_hi) = rng.sample(_SHOP_ITEMS, 2)
    a, b = rng.randint(2, 6), rng.randint(2, 6)
    pa, pb = rng.randint(a_lo, a_hi), rng.randint(b_lo, b_hi)
    cost_a = s.step(f"Cost of the {a_item}", a, "*", pa)
    cost_b = s.step(f"Cost of the {b_item}", b, "*", pb)
    total = s.step("Total cost", cost_a, "+", cost_b)
    buys = f"buys {a} {a_item} at {pa} {cur} each and {b} {b_item} at {pb} {cur} each."
    if rng.random() < 0.5:
        return f"{p.name} {buys} How much does {p.he} spend?"
    budget = total + rng.randint(1, 60)
    s.step("Money left", budget, "-", total)
    return f"{p.name} has {budget} {cur}. {_cap(p.he)} {buys} How much money is left?"


@_family
def discount_sale(rng, s):
    p, (item, _, _), cur = _people(rng, 1)[0], rng.choice(_SHOP_ITEMS), rng.choice(_CURRENCIES)
    pct = rng.choice((10, 20, 25, 50))
    price = rng.randint(1, 8) * (100 // pct)  # so that price * pct is a multiple of 100
    k = rng.randint(2, 5)
    off = s.step("Discount", s.step("Price times percent", price, "*", pct), "/", 100)
    new = s.step("Sale price", price, "-", off)
    s.step("Total", new, "*", k)
    return (f"{item.capitalize()} cost {price} {cur} each. They are on sale for {pct}% off. "
            f"{p.name} buys {k} of them. How much does {p.he} pay?")


@_family
def coins_value(rng, s):
    p = _people(rng, 1)[0]
    n, m, q = rng.randint(2, 12), rng.randint(2, 12), rng.randint(2, 8)
    five = s.step("Coins of five cents", n, "*", 5)
    ten = s.step("Coins of ten cents", m, "*", 10)
    both = s.step("Together", five, "+", ten)
    s.step("Total", both, "+", s.step("Coins of twenty-five cents", q, "*", 25))
    return (f"{p.name} has {n} coins of 5 cents, {m} coins of 10 cents and {q} coins of 25 cents. "
            f"How many cents does {p.he} have?")


@_family
def wages_week(rng, s):
    p, cur = _people(rng, 1)[0], rng.choice(_CURRENCIES)
    w, h, d = rng.randint(6, 15), rng.randint(2, 8), rng.randint(2, 6)
    daily = s.step("Pay per day", w, "*", h)
    total = s.step("Pay for the week", daily, "*", d)
    spent = rng.randint(5, total - 1)
    s.step("Money left", total, "-", spent)
    return (f"{p.name} earns {w} {cur} an hour and works {h} hours a day for {d} days. "
            f"{_cap(p.he)} spends {spent} {cur}. How much money does {p.he} have left?")


@_family
def savings_goal(rng, s):
    p, item, cur = _people(rng, 1)[0], rng.choice(_BIG_ITEMS), rng.choice(_CURRENCIES)
    weekly, weeks, has = rng.randint(3, 20), rng.randint(2, 12), rng.randint(5, 90)
    price = has + weekly * weeks
    rest = s.step("Still needed", price, "-", has)
    s.step("Weeks", rest, "/", weekly)
    return (f"{p.name} wants a {item} that costs {price} {cur}. {_cap(p.he)} has {has} {cur} "
            f"and saves {weekly} {cur} a week. How many weeks until {p.he} can buy it?")


@_family
def savings_total(rng, s):
    p, cur = _people(rng, 1)[0], rng.choice(_CURRENCIES)
    weekly, weeks, gift = rng.randint(2, 15), rng.randint(3, 10), rng.randint(5, 50)
    saved = s.step("Saved", weekly, "*", weeks)
    total = s.step("With the gift", saved, "+", gift)
    spent = rng.randint(2, total - 1)
    s.step("Money left", total, "-", spent)
    return (f"{p.name} saves {weekly} {cur} every week for {weeks} weeks and gets {gift} {cur} "
            f"as a gift. Then {p.he} spends {spent} {cur}. How much money does {p.he} have now?")


@_family
def pizza_party(rng, s):
    p, cur = _people(rng, 1)[0], rng.choice(_CURRENCIES)
    slices_per, pizzas = rng.choice((6, 8)), rng.randint(2, 8)
    each = rng.choice([e for e in (2, 3, 4) if (slices_per * pizzas) % e == 0])
    friends, price = slices_per * pizzas // each, rng.randint(6, 15)
    slices = s.step("Slices", friends, "*", each)
    n = s.step("Pizzas", slices, "/", slices_per)
    s.step("Cost", n, "*", price)
    return (f"{p.name} has {friends} friends at a party and each eats {each} slices of pizza. "
            f"A pizza has {slices_per} slices and costs {price} {cur}. How much do the pizzas cost?")


# --- sharing, grouping and counting ------------------------------------------------------------

@_family
def sharing_equally(rng, s):
    p, food = _people(rng, 1)[0], rng.choice(_FOODS)
    friends, each, eaten = rng.randint(2, 9), rng.randint(2, 12), rng.randint(1, 15)
    total = friends * each + eaten
    rest = s.step(f"{_cap(food)} left", total, "-", eaten)
    s.step("Each friend gets", rest, "/", friends)
    return (f"{p.name} has {total} {food}. {_cap(p.he)} eats {eaten} of them and shares the rest "
            f"equally among {friends} friends. How many {food} does each friend get?")


@_family
def packing_boxes(rng, s):
    p, thing, box = _people(rng, 1)[0], rng.choice(_COLLECTIBLES), rng.choice(_CONTAINERS)
    n, k, bag = rng.randint(2, 9), rng.randint(4, 20), rng.randint(2, 6)
    total = n * k
    lost = total - bag * rng.randint(1, max(1, (total - 1) // bag))  # at least one is lost
    all_ = s.step(f"All {thing}", n, "*", k)
    left = s.step(f"{_cap(thing)} left", all_, "-", lost)
    s.step("Bags", left, "/", bag)
    return (f"{p.name} has {n} {box} with {k} {thing} in each. {_cap(p.he)} loses {lost} of them and "
            f"puts the rest in bags of {bag}. How many bags does {p.he} fill?")


@_family
def team_equipment(rng, s):
    p, cur = _people(rng, 1)[0], rng.choice(_CURRENCIES)
    gear, one = rng.choice((("balls", "ball"), ("cones", "cone"), ("rackets", "racket"),
                            ("helmets", "helmet"), ("ropes", "rope")))
    teams, size = rng.randint(2, 9), rng.randint(3, 8)
    per_team, price = rng.randint(2, 5), rng.randint(2, 9)
    n = s.step("Teams", teams * size, "/", size)
    b = s.step(_cap(gear), n, "*", per_team)
    s.step("Cost", b, "*", price)
    return (f"Coach {p.name} splits {teams * size} children into teams of {size}. Each team needs "
            f"{per_team} {gear} and a {one} costs {price} {cur}. How much do the {gear} cost?")


@_family
def bus_passengers(rng, s):
    start, off1, on1 = rng.randint(10, 50), rng.randint(1, 9), rng.randint(1, 20)
    after1 = start - off1 + on1
    off2 = rng.randint(1, after1)
    a = s.step("After some get off", start, "-", off1)
    b = s.step("After some get on", a, "+", on1)
    s.step("After the second stop", b, "-", off2)
    return (f"A bus has {start} passengers. At the first stop {off1} get off and {on1} get on. "
            f"At the second stop {off2} get off. How many passengers are on the bus now?")


@_family
def compare_collections(rng, s):
    a, b, c = _people(rng, 3)
    thing = rng.choice(_COLLECTIBLES)
    x, k = rng.randint(3, 40), rng.randint(2, 4)
    fewer = rng.randint(1, x * k - 1)
    bx = s.step(f"{b.name}", x, "*", k)
    cx = s.step(f"{c.name}", bx, "-", fewer)
    ab = s.step(f"{a.name} and {b.name}", x, "+", bx)
    s.step("All three", ab, "+", cx)
    return (f"{a.name} has {x} {thing}. {b.name} has {k} times as many as {a.name}. {c.name} has "
            f"{fewer} fewer than {b.name}. How many {thing} do they have in total?")


@_family
def collecting_daily(rng, s):
    p, thing = _people(rng, 1)[0], rng.choice(_COLLECTIBLES)
    start, per_day, days = rng.randint(5, 60), rng.randint(2, 12), rng.randint(2, 9)
    got = s.step("New ones", per_day, "*", days)
    total = s.step("In all", start, "+", got)
    given = rng.randint(1, total - 1)
    s.step("Left", total, "-", given)
    return (f"{p.name} has {start} {thing}. {_cap(p.he)} gets {per_day} more every day for {days} days, "
            f"then gives {given} away. How many {thing} does {p.he} have now?")


# --- rates and time ---------------------------------------------------------------------------

@_family
def trip_distance(rng, s):
    p, unit = _people(rng, 1)[0], rng.choice(_DISTANCE_UNITS)
    v1, v2 = rng.randrange(30, 95, 5), rng.randrange(30, 95, 5)
    h1, h2 = rng.randint(2, 5), rng.randint(2, 5)
    d1 = s.step("First part", v1, "*", h1)
    d2 = s.step("Second part", v2, "*", h2)
    s.step("Total distance", d1, "+", d2)
    return (f"{p.name} drives {h1} hours at {v1} {unit} per hour, then {h2} hours at {v2} {unit} "
            f"per hour. How far does {p.he} drive?")


@_family
def trip_time(rng, s):
    p, unit, speed = _people(rng, 1)[0], rng.choice(_DISTANCE_UNITS), rng.randrange(20, 125, 5)
    hours, stop = rng.randint(2, 8), rng.randint(2, 4)
    vehicle = rng.choice(("train", "bus", "truck", "boat", "ferry", "van"))
    driving = s.step("Hours moving", speed * hours, "/", speed)
    s.step("Total hours", driving, "+", stop)
    return (f"{p.name} takes a {vehicle} that travels {speed * hours} {unit} at {speed} {unit} per "
            f"hour and stops for {stop} hours on the way. How many hours does the trip take?")


@_family
def fuel_cost(rng, s):
    p, cur = _people(rng, 1)[0], rng.choice(_CURRENCIES)
    km_per_liter, liters, price = rng.randint(8, 20), rng.randint(2, 12), rng.randint(2, 4)
    liters += (km_per_liter * liters) % 2  # the round trip must be an even number of km
    one_way = km_per_liter * liters // 2
    far = s.step("Round trip", one_way, "*", 2)
    used = s.step("Liters", far, "/", km_per_liter)
    s.step("Cost", used, "*", price)
    return (f"{p.name}'s car goes {km_per_liter} km on one liter of fuel. {_cap(p.he)} drives to a "
            f"town {one_way} km away and back. Fuel costs {price} {cur} a liter. "
            "How much does the fuel cost?")


@_family
def pages_per_day(rng, s):
    p = _people(rng, 1)[0]
    per_day, days, read = rng.randint(5, 30), rng.randint(2, 12), rng.randint(10, 120)
    book = read + per_day * days
    rest = s.step("Pages left", book, "-", read)
    s.step("Days", rest, "/", per_day)
    return (f"A book has {book} pages. {p.name} has read {read} pages and reads {per_day} pages a day. "
            f"How many more days does {p.he} need to finish it?")


@_family
def reading_week(rng, s):
    p = _people(rng, 1)[0]
    mon, fewer = rng.randint(5, 40), rng.randint(1, 9)
    tue = s.step("Tuesday", mon, "*", 2)
    wed = s.step("Wednesday", tue, "-", fewer)
    two = s.step("Monday and Tuesday", mon, "+", tue)
    s.step("Total", two, "+", wed)
    return (f"{p.name} reads {mon} pages on Monday, twice as many on Tuesday and {fewer} fewer than "
            f"Tuesday on Wednesday. How many pages does {p.he} read in the three days?")


@_family
def chores_time(rng, s):
    p = _people(rng, 1)[0]
    verb, things, times = rng.choice(_CHORES)
    minutes = rng.choice(times)
    n = 60 // minutes * rng.randint(1, 5)
    total = s.step("Minutes", n, "*", minutes)
    s.step("Hours", total, "/", 60)
    return (f"{p.name} {verb} {n} {things} and each takes {minutes} minutes. "
            f"How many hours does {p.he} spend?")


# --- ages ----------------------------------------------------------------------------------

@_family
def ages_sum(rng, s):
    a, b, c = _people(rng, 3)
    age, older = rng.randint(3, 40), rng.randint(2, 30)
    older += (age + older) % 2  # c is half of b's age
    b_age = s.step(f"{b.name}'s age", age, "+", older)
    c_age = s.step(f"{c.name}'s age", b_age, "/", 2)
    ab = s.step(f"{a.name} and {b.name}", age, "+", b_age)
    s.step("All three", ab, "+", c_age)
    return (f"{a.name} is {age} years old. {b.name} is {older} years older than {a.name}. "
            f"{c.name} is half as old as {b.name}. What is the sum of their ages?")


@_family
def ages_future(rng, s):
    p = _people(rng, 1)[0]
    parent = rng.choice(("mother", "father", "aunt", "uncle", "grandmother", "grandfather"))
    age, k, years = rng.randint(4, 15), rng.randint(3, 5), rng.randint(2, 20)
    now = s.step(f"{_cap(parent)}'s age now", age, "*", k)
    s.step("Age then", now, "+", years)
    return (f"{p.name} is {age} years old and {p.his} {parent} is {k} times as old. "
            f"How old will {p.his} {parent} be in {years} years?")


# --- percentages ----------------------------------------------------------------------------

@_family
def percent_of_group(rng, s):
    p, pct = _people(rng, 1)[0], rng.choice((10, 20, 25, 50, 75))
    noun, where, yes, no = rng.choice(_GROUPS)
    unit = 100 // math.gcd(pct, 100)  # the group size must make pct% a whole number
    n = unit * rng.randint(max(1, 8 // unit), 40 // unit)
    some = s.step("Count times percent", n, "*", pct)
    hit = s.step(f"{_cap(noun)} that {yes}", some, "/", 100)
    s.step(f"{_cap(noun)} that {no}", n, "-", hit)
    return f"{p.name} counts {n} {noun} {where}. {pct}% of them {yes}. How many {noun} {no}?"



# --- units, areas and recipes ----------------------------------------------------------------

@_family
def unit_conversion(rng, s):
    p = _people(rng, 1)[0]
    big_unit, small_unit, factor, template = rng.choice(_CONVERSIONS)
    big, small = rng.randint(2, 5), rng.randint(2, factor - 1)
    part = s.step(f"{_cap(big_unit)} in {small_unit}", big, "*", factor)
    total = s.step(f"Total {small_unit}", part, "+", small)
    used = rng.randint(2, total - 1)
    s.step(f"{_cap(small_unit)} left", total, "-", used)
    return template.format(name=p.name, He=_cap(p.he), big=big, small=small, used=used)


@_family
def dozens_needed(rng, s):
    p = _people(rng, 1)[0]
    thing, use = rng.choice((("eggs", "uses"), ("rolls", "serves"), ("cookies", "sells"),
                             ("roses", "sells")))
    dozens, days = rng.randint(1, 6), rng.randint(2, 7)
    per_day = s.step(f"{_cap(thing)} a day", dozens, "*", 12)
    need = s.step(f"{_cap(thing)} needed", per_day, "*", days)
    have = rng.randint(2, need - 1)
    s.step("Still needed", need, "-", have)
    return (f"{p.name} {use} {dozens} dozen {thing} a day for {days} days. {_cap(p.he)} already has "
            f"{have} {thing}. How many more {thing} does {p.he} need?")


@_family
def floor_area_cost(rng, s):
    room = rng.choice(("bedroom", "kitchen", "hall", "studio", "classroom", "shop"))
    cover = rng.choice(("carpet", "tiling", "wood flooring"))
    length, width, price = rng.randint(2, 12), rng.randint(2, 10), rng.randint(2, 15)
    cur = rng.choice(_CURRENCIES)
    area = s.step("Area", length, "*", width)
    s.step("Cost", area, "*", price)
    return (f"A {room} is {length} meters long and {width} meters wide. New {cover} costs {price} "
            f"{cur} per square meter. How much does it cost to cover the floor?")


@_family
def fence_perimeter(rng, s):
    p, cur = _people(rng, 1)[0], rng.choice(_CURRENCIES)
    length, width, price = rng.randint(3, 40), rng.randint(2, 30), rng.randint(2, 9)
    two_l = s.step("Two long sides", length, "*", 2)
    two_w = s.step("Two short sides", width, "*", 2)
    fence = s.step("Perimeter", two_l, "+", two_w)
    s.step("Cost", fence, "*", price)
    return (f"{p.name}'s garden is a rectangle {length} meters long and {width} meters wide. "
            f"Fence costs {price} {cur} per meter. How much does a fence around it cost?")


@_family
def garden_plants(rng, s):
    p = _people(rng, 1)[0]
    plant = rng.choice(("tulips", "carrots", "onions", "roses", "beans", "herbs"))
    side, per_m2 = rng.randint(2, 9), rng.randint(2, 6)
    area = s.step("Area", side, "*", side)
    total = s.step(f"{_cap(plant)} that fit", area, "*", per_m2)
    planted = rng.randint(1, total - 1)
    s.step("Still to plant", total, "-", planted)
    return (f"{p.name} has a square bed {side} meters on each side and plants {per_m2} {plant} per "
            f"square meter. {_cap(p.he)} has planted {planted}. How many more can {p.he} plant?")


@_family
def recipe_scaling(rng, s):
    p = _people(rng, 1)[0]
    dish, a, b, unit = rng.choice(_RECIPES)
    serves, times = rng.randint(2, 6), rng.randint(2, 5)
    qa, qb = rng.randint(2, 9), rng.randint(2, 9)
    k = s.step("Times the recipe", serves * times, "/", serves)
    na = s.step(f"{_cap(unit)} of {a}", qa, "*", k)
    nb = s.step(f"{_cap(unit)} of {b}", qb, "*", k)
    s.step("Total", na, "+", nb)
    return (f"A {dish} recipe for {serves} people needs {qa} {unit} of {a} and {qb} {unit} of {b}. "
            f"{p.name} cooks for {serves * times} people. How many {unit} of {a} and {b} "
            f"does {p.he} need in total?")


@_family
def orchard_harvest(rng, s):
    tree, fruit = rng.choice(_FRUIT_TREES)
    rows, per_row, per_tree = rng.randint(2, 8), rng.randint(2, 10), rng.randint(2, 12)
    bag = rng.choice([d for d in range(2, 13) if (rows * per_row * per_tree) % d == 0])
    trees = s.step("Trees", rows, "*", per_row)
    picked = s.step(f"{_cap(fruit)}", trees, "*", per_tree)
    s.step("Bags", picked, "/", bag)
    return (f"An orchard has {rows} rows of {per_row} {tree} trees. Each tree gives {per_tree} "
            f"{fruit}. The {fruit} are packed in bags of {bag}. How many bags are filled?")


@_family
def average_score(rng, s):
    p = _people(rng, 1)[0]
    mean = rng.randint(60, 95)
    a, b = rng.randint(mean - 10, min(100, mean + 10)), rng.randint(mean - 10, min(100, mean + 10))
    c = 3 * mean - a - b
    if not 0 <= c <= 100:  # move the spread to a, keeping the mean
        a, c = a + c - mean, mean
    ab = s.step("First two", a, "+", b)
    total = s.step("All three", ab, "+", c)
    s.step("Average", total, "/", 3)
    return (f"{p.name} scores {a}, {b} and {c} points on three tests. "
            f"What is {p.his} average score?")


# --- generation -------------------------------------------------------------------------------

def make_problem(family: str, rng: random.Random) -> Problem:
    solution = _Solution()
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
