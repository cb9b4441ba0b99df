"""Problem families about shopping and money: change, two purchases, discounts, coins, wages,
savings, a pizza party.
"""

from __future__ import annotations

from ..solution import family
from ..vocabulary import BIG_ITEMS, CURRENCIES, SHOP_ITEMS, cap, people


@family
def shopping_change(rng, s):
    p, (item, lo, hi), cur = people(rng, 1)[0], rng.choice(SHOP_ITEMS), rng.choice(CURRENCIES)
    n, price = rng.randint(2, 9), rng.randint(lo, hi)
    paid = rng.choice([b for b in (10, 20, 50, 100, 200, 500) if b >= n * price][:2])
    cost = s.step(f"Cost of the {item}", n, "*", price)
    s.step("Change", paid, "-", cost)
    return (f"{p.name} buys {n} {item} for {price} {cur} each and pays with {paid} {cur}. "
            f"How much change does {p.he} get?")


@family
def shopping_two_items(rng, s):
    p, cur = people(rng, 1)[0], rng.choice(CURRENCIES)
    (a_item, a_lo, a_hi), (b_item, b_lo, b_hi) = rng.sample(SHOP_ITEMS, 2)
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
    return f"{p.name} has {budget} {cur}. {cap(p.he)} {buys} How much money is left?"


@family
def discount_sale(rng, s):
    p, (item, _, _), cur = people(rng, 1)[0], rng.choice(SHOP_ITEMS), rng.choice(CURRENCIES)
    pct = rng.choice((10, 20, 25, 50))
    price = rng.randint(1, 8) * (100 // pct)  # so that price * pct is a multiple of 100
    k = rng.randint(2, 5)
    off = s.step("Discount", s.step("Price times percent", price, "*", pct), "/", 100)
    new = s.step("Sale price", price, "-", off)
    s.step("Total", new, "*", k)
    return (f"{item.capitalize()} cost {price} {cur} each. They are on sale for {pct}% off. "
            f"{p.name} buys {k} of them. How much does {p.he} pay?")


@family
def coins_value(rng, s):
    p = people(rng, 1)[0]
    n, m, q = rng.randint(2, 12), rng.randint(2, 12), rng.randint(2, 8)
    five = s.step("Coins of five cents", n, "*", 5)
    ten = s.step("Coins of ten cents", m, "*", 10)
    both = s.step("Together", five, "+", ten)
    s.step("Total", both, "+", s.step("Coins of twenty-five cents", q, "*", 25))
    return (f"{p.name} has {n} coins of 5 cents, {m} coins of 10 cents and {q} coins of 25 cents. "
            f"How many cents does {p.he} have?")


@family
def wages_week(rng, s):
    p, cur = people(rng, 1)[0], rng.choice(CURRENCIES)
    w, h, d = rng.randint(6, 15), rng.randint(2, 8), rng.randint(2, 6)
    daily = s.step("Pay per day", w, "*", h)
    total = s.step("Pay for the week", daily, "*", d)
    spent = rng.randint(5, total - 1)
    s.step("Money left", total, "-", spent)
    return (f"{p.name} earns {w} {cur} an hour and works {h} hours a day for {d} days. "
            f"{cap(p.he)} spends {spent} {cur}. How much money does {p.he} have left?")


@family
def savings_goal(rng, s):
    p, item, cur = people(rng, 1)[0], rng.choice(BIG_ITEMS), rng.choice(CURRENCIES)
    weekly, weeks, has = rng.randint(3, 20), rng.randint(2, 12), rng.randint(5, 90)
    price = has + weekly * weeks
    rest = s.step("Still needed", price, "-", has)
    s.step("Weeks", rest, "/", weekly)
    return (f"{p.name} wants a {item} that costs {price} {cur}. {cap(p.he)} has {has} {cur} "
            f"and saves {weekly} {cur} a week. How many weeks until {p.he} can buy it?")


@family
def savings_total(rng, s):
    p, cur = people(rng, 1)[0], rng.choice(CURRENCIES)
    weekly, weeks, gift = rng.randint(2, 15), rng.randint(3, 10), rng.randint(5, 50)
    saved = s.step("Saved", weekly, "*", weeks)
    total = s.step("With the gift", saved, "+", gift)
    spent = rng.randint(2, total - 1)
    s.step("Money left", total, "-", spent)
    return (f"{p.name} saves {weekly} {cur} every week for {weeks} weeks and gets {gift} {cur} "
            f"as a gift. Then {p.he} spends {spent} {cur}. How much money does {p.he} have now?")


@family
def pizza_party(rng, s):
    p, cur = people(rng, 1)[0], rng.choice(CURRENCIES)
    slices_per, pizzas = rng.choice((6, 8)), rng.randint(2, 8)
    each = rng.choice([e for e in (2, 3, 4) if (slices_per * pizzas) % e == 0])
    friends, price = slices_per * pizzas // each, rng.randint(6, 15)
    slices = s.step("Slices", friends, "*", each)
    n = s.step("Pizzas", slices, "/", slices_per)
    s.step("Cost", n, "*", price)
    return (f"{p.name} has {friends} friends at a party and each eats {each} slices of pizza. "
            f"A pizza has {slices_per} slices and costs {price} {cur}. How much do the pizzas cost?")
