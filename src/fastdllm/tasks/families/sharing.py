"""Problem families about sharing, grouping and counting: equal shares, packing, teams, bus
passengers, comparing and collecting.
"""

from __future__ import annotations

from ..solution import family
from ..vocabulary import COLLECTIBLES, CONTAINERS, CURRENCIES, FOODS, cap, people


@family
def sharing_equally(rng, s):
    p, food = people(rng, 1)[0], rng.choice(FOODS)
    friends, each, eaten = rng.randint(2, 9), rng.randint(2, 12), rng.randint(1, 15)
    total = friends * each + eaten
    rest = s.step(f"{cap(food)} left", total, "-", eaten)
    s.step("Each friend gets", rest, "/", friends)
    return (f"{p.name} has {total} {food}. {cap(p.he)} eats {eaten} of them and shares the rest "
            f"equally among {friends} friends. How many {food} does each friend get?")


@family
def packing_boxes(rng, s):
    p, thing, box = people(rng, 1)[0], rng.choice(COLLECTIBLES), rng.choice(CONTAINERS)
    n, k, bag = rng.randint(2, 9), rng.randint(4, 20), rng.randint(2, 6)
    total = n * k
    lost = total - bag * rng.randint(1, max(1, (total - 1) // bag))  # at least one is lost
    all_ = s.step(f"All {thing}", n, "*", k)
    left = s.step(f"{cap(thing)} left", all_, "-", lost)
    s.step("Bags", left, "/", bag)
    return (f"{p.name} has {n} {box} with {k} {thing} in each. {cap(p.he)} loses {lost} of them and "
            f"puts the rest in bags of {bag}. How many bags does {p.he} fill?")


@family
def team_equipment(rng, s):
    p, cur = people(rng, 1)[0], rng.choice(CURRENCIES)
    gear, one = rng.choice((("balls", "ball"), ("cones", "cone"), ("rackets", "racket"),
                            ("helmets", "helmet"), ("ropes", "rope")))
    teams, size = rng.randint(2, 9), rng.randint(3, 8)
    per_team, price = rng.randint(2, 5), rng.randint(2, 9)
    n = s.step("Teams", teams * size, "/", size)
    b = s.step(cap(gear), n, "*", per_team)
    s.step("Cost", b, "*", price)
    return (f"Coach {p.name} splits {teams * size} children into teams of {size}. Each team needs "
            f"{per_team} {gear} and a {one} costs {price} {cur}. How much do the {gear} cost?")


@family
def bus_passengers(rng, s):
    start, off1, on1 = rng.randint(10, 50), rng.randint(1, 9), rng.randint(1, 20)
    after1 = start - off1 + on1
    off2 = rng.randint(1, after1)
    a = s.step("After some get off", start, "-", off1)
    b = s.step("After some get on", a, "+", on1)
    s.step("After the second stop", b, "-", off2)
    return (f"A bus has {start} passengers. At the first stop {off1} get off and {on1} get on. "
            f"At the second stop {off2} get off. How many passengers are on the bus now?")


@family
def compare_collections(rng, s):
    a, b, c = people(rng, 3)
    thing = rng.choice(COLLECTIBLES)
    x, k = rng.randint(3, 40), rng.randint(2, 4)
    fewer = rng.randint(1, x * k - 1)
    bx = s.step(f"{b.name}", x, "*", k)
    cx = s.step(f"{c.name}", bx, "-", fewer)
    ab = s.step(f"{a.name} and {b.name}", x, "+", bx)
    s.step("All three", ab, "+", cx)
    return (f"{a.name} has {x} {thing}. {b.name} has {k} times as many as {a.name}. {c.name} has "
            f"{fewer} fewer than {b.name}. How many {thing} do they have in total?")


@family
def collecting_daily(rng, s):
    p, thing = people(rng, 1)[0], rng.choice(COLLECTIBLES)
    start, per_day, days = rng.randint(5, 60), rng.randint(2, 12), rng.randint(2, 9)
    got = s.step("New ones", per_day, "*", days)
    total = s.step("In all", start, "+", got)
    given = rng.randint(1, total - 1)
    s.step("Left", total, "-", given)
    return (f"{p.name} has {start} {thing}. {cap(p.he)} gets {per_day} more every day for {days} days, "
            f"then gives {given} away. How many {thing} does {p.he} have now?")
