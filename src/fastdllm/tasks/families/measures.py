"""Problem families about ages, percentages, units, areas, recipes, harvests and averages."""

from __future__ import annotations

import math

from ..solution import family
from ..vocabulary import CONVERSIONS, CURRENCIES, FRUIT_TREES, GROUPS, RECIPES, cap, people


@family
def ages_sum(rng, s):
    a, b, c = people(rng, 3)
    age, older = rng.randint(3, 40), rng.randint(2, 30)
    older += (age + older) % 2  # c is half of b's age
    b_age = s.step(f"{b.name}'s age", age, "+", older)
    c_age = s.step(f"{c.name}'s age", b_age, "/", 2)
    ab = s.step(f"{a.name} and {b.name}", age, "+", b_age)
    s.step("All three", ab, "+", c_age)
    return (f"{a.name} is {age} years old. {b.name} is {older} years older than {a.name}. "
            f"{c.name} is half as old as {b.name}. What is the sum of their ages?")


@family
def ages_future(rng, s):
    p = people(rng, 1)[0]
    parent = rng.choice(("mother", "father", "aunt", "uncle", "grandmother", "grandfather"))
    age, k, years = rng.randint(4, 15), rng.randint(3, 5), rng.randint(2, 20)
    now = s.step(f"{cap(parent)}'s age now", age, "*", k)
    s.step("Age then", now, "+", years)
    return (f"{p.name} is {age} years old and {p.his} {parent} is {k} times as old. "
            f"How old will {p.his} {parent} be in {years} years?")


@family
def percent_of_group(rng, s):
    p, pct = people(rng, 1)[0], rng.choice((10, 20, 25, 50, 75))
    noun, where, yes, no = rng.choice(GROUPS)
    unit = 100 // math.gcd(pct, 100)  # the group size must make pct% a whole number
    n = unit * rng.randint(max(1, 8 // unit), 40 // unit)
    some = s.step("Count times percent", n, "*", pct)
    hit = s.step(f"{cap(noun)} that {yes}", some, "/", 100)
    s.step(f"{cap(noun)} that {no}", n, "-", hit)
    return f"{p.name} counts {n} {noun} {where}. {pct}% of them {yes}. How many {noun} {no}?"


@family
def unit_conversion(rng, s):
    p = people(rng, 1)[0]
    big_unit, small_unit, factor, template = rng.choice(CONVERSIONS)
    big, small = rng.randint(2, 5), rng.randint(2, factor - 1)
    part = s.step(f"{cap(big_unit)} in {small_unit}", big, "*", factor)
    total = s.step(f"Total {small_unit}", part, "+", small)
    used = rng.randint(2, total - 1)
    s.step(f"{cap(small_unit)} left", total, "-", used)
    return template.format(name=p.name, He=cap(p.he), big=big, small=small, used=used)


@family
def dozens_needed(rng, s):
    p = people(rng, 1)[0]
    thing, use = rng.choice((("eggs", "uses"), ("rolls", "serves"), ("cookies", "sells"),
                             ("roses", "sells")))
    dozens, days = rng.randint(1, 6), rng.randint(2, 7)
    per_day = s.step(f"{cap(thing)} a day", dozens, "*", 12)
    need = s.step(f"{cap(thing)} needed", per_day, "*", days)
    have = rng.randint(2, need - 1)
    s.step("Still needed", need, "-", have)
    return (f"{p.name} {use} {dozens} dozen {thing} a day for {days} days. {cap(p.he)} already has "
            f"{have} {thing}. How many more {thing} does {p.he} need?")


@family
def floor_area_cost(rng, s):
    room = rng.choice(("bedroom", "kitchen", "hall", "studio", "classroom", "shop"))
    cover = rng.choice(("carpet", "tiling", "wood flooring"))
    length, width, price = rng.randint(2, 12), rng.randint(2, 10), rng.randint(2, 15)
    cur = rng.choice(CURRENCIES)
    area = s.step("Area", length, "*", width)
    s.step("Cost", area, "*", price)
    return (f"A {room} is {length} meters long and {width} meters wide. New {cover} costs {price} "
            f"{cur} per square meter. How much does it cost to cover the floor?")


@family
def fence_perimeter(rng, s):
    p, cur = people(rng, 1)[0], rng.choice(CURRENCIES)
    length, width, price = rng.randint(3, 40), rng.randint(2, 30), rng.randint(2, 9)
    two_l = s.step("Two long sides", length, "*", 2)
    two_w = s.step("Two short sides", width, "*", 2)
    fence = s.step("Perimeter", two_l, "+", two_w)
    s.step("Cost", fence, "*", price)
    return (f"{p.name}'s garden is a rectangle {length} meters long and {width} meters wide. "
            f"Fence costs {price} {cur} per meter. How much does a fence around it cost?")


@family
def garden_plants(rng, s):
    p = people(rng, 1)[0]
    plant = rng.choice(("tulips", "carrots", "onions", "roses", "beans", "herbs"))
    side, per_m2 = rng.randint(2, 9), rng.randint(2, 6)
    area = s.step("Area", side, "*", side)
    total = s.step(f"{cap(plant)} that fit", area, "*", per_m2)
    planted = rng.randint(1, total - 1)
    s.step("Still to plant", total, "-", planted)
    return (f"{p.name} has a square bed {side} meters on each side and plants {per_m2} {plant} per "
            f"square meter. {cap(p.he)} has planted {planted}. How many more can {p.he} plant?")


@family
def recipe_scaling(rng, s):
    p = people(rng, 1)[0]
    dish, a, b, unit = rng.choice(RECIPES)
    serves, times = rng.randint(2, 6), rng.randint(2, 5)
    qa, qb = rng.randint(2, 9), rng.randint(2, 9)
    k = s.step("Times the recipe", serves * times, "/", serves)
    na = s.step(f"{cap(unit)} of {a}", qa, "*", k)
    nb = s.step(f"{cap(unit)} of {b}", qb, "*", k)
    s.step("Total", na, "+", nb)
    return (f"A {dish} recipe for {serves} people needs {qa} {unit} of {a} and {qb} {unit} of {b}. "
            f"{p.name} cooks for {serves * times} people. How many {unit} of {a} and {b} "
            f"does {p.he} need in total?")


@family
def orchard_harvest(rng, s):
    tree, fruit = rng.choice(FRUIT_TREES)
    rows, per_row, per_tree = rng.randint(2, 8), rng.randint(2, 10), rng.randint(2, 12)
    bag = rng.choice([d for d in range(2, 13) if (rows * per_row * per_tree) % d == 0])
    trees = s.step("Trees", rows, "*", per_row)
    picked = s.step(f"{cap(fruit)}", trees, "*", per_tree)
    s.step("Bags", picked, "/", bag)
    return (f"An orchard has {rows} rows of {per_row} {tree} trees. Each tree gives {per_tree} "
            f"{fruit}. The {fruit} are packed in bags of {bag}. How many bags are filled?")


@family
def average_score(rng, s):
    p = people(rng, 1)[0]
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
