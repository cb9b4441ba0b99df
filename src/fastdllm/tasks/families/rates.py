"""Problem families about rates and time: trips, fuel, reading, chores."""

from __future__ import annotations

from ..solution import family
from ..vocabulary import CHORES, CURRENCIES, DISTANCE_UNITS, cap, people


@family
def trip_distance(rng, s):
    p, unit = people(rng, 1)[0], rng.choice(DISTANCE_UNITS)
    v1, v2 = rng.randrange(30, 95, 5), rng.randrange(30, 95, 5)
    h1, h2 = rng.randint(2, 5), rng.randint(2, 5)
    d1 = s.step("First part", v1, "*", h1)
    d2 = s.step("Second part", v2, "*", h2)
    s.step("Total distance", d1, "+", d2)
    return (f"{p.name} drives {h1} hours at {v1} {unit} per hour, then {h2} hours at {v2} {unit} "
            f"per hour. How far does {p.he} drive?")


@family
def trip_time(rng, s):
    p, unit, speed = people(rng, 1)[0], rng.choice(DISTANCE_UNITS), rng.randrange(20, 125, 5)
    hours, stop = rng.randint(2, 8), rng.randint(2, 4)
    vehicle = rng.choice(("train", "bus", "truck", "boat", "ferry", "van"))
    driving = s.step("Hours moving", speed * hours, "/", speed)
    s.step("Total hours", driving, "+", stop)
    return (f"{p.name} takes a {vehicle} that travels {speed * hours} {unit} at {speed} {unit} per "
            f"hour and stops for {stop} hours on the way. How many hours does the trip take?")


@family
def fuel_cost(rng, s):
    p, cur = people(rng, 1)[0], rng.choice(CURRENCIES)
    km_per_liter, liters, price = rng.randint(8, 20), rng.randint(2, 12), rng.randint(2, 4)
    liters += (km_per_liter * liters) % 2  # the round trip must be an even number of km
    one_way = km_per_liter * liters // 2
    far = s.step("Round trip", one_way, "*", 2)
    used = s.step("Liters", far, "/", km_per_liter)
    s.step("Cost", used, "*", price)
    return (f"{p.name}'s car goes {km_per_liter} km on one liter of fuel. {cap(p.he)} drives to a "
            f"town {one_way} km away and back. Fuel costs {price} {cur} a liter. "
            "How much does the fuel cost?")


@family
def pages_per_day(rng, s):
    p = people(rng, 1)[0]
    per_day, days, read = rng.randint(5, 30), rng.randint(2, 12), rng.randint(10, 120)
    book = read + per_day * days
    rest = s.step("Pages left", book, "-", read)
    s.step("Days", rest, "/", per_day)
    return (f"A book has {book} pages. {p.name} has read {read} pages and reads {per_day} pages a day. "
            f"How many more days does {p.he} need to finish it?")


@family
def reading_week(rng, s):
    p = people(rng, 1)[0]
    mon, fewer = rng.randint(5, 40), rng.randint(1, 9)
    tue = s.step("Tuesday", mon, "*", 2)
    wed = s.step("Wednesday", tue, "-", fewer)
    two = s.step("Monday and Tuesday", mon, "+", tue)
    s.step("Total", two, "+", wed)
    return (f"{p.name} reads {mon} pages on Monday, twice as many on Tuesday and {fewer} fewer than "
            f"Tuesday on Wednesday. How many pages does {p.he} read in the three days?")


@family
def chores_time(rng, s):
    p = people(rng, 1)[0]
    verb, things, times = rng.choice(CHORES)
    minutes = rng.choice(times)
    n = 60 // minutes * rng.randint(1, 5)
    total = s.step("Minutes", n, "*", minutes)
    s.step("Hours", total, "/", 60)
    return (f"{p.name} {verb} {n} {things} and each takes {minutes} minutes. "
            f"How many hours does {p.he} spend?")
