"""The words the word problems are made of: people with their pronouns, shop items with
price ranges, currencies, collectibles, foods, chores, groups, recipes and unit conversions.

Tuples, never sets, so that `random.Random(seed).choice` picks the same word on every run.
"""

from __future__ import annotations

import random
from typing import NamedTuple


class Person(NamedTuple):
    name: str
    he: str
    his: str


GIRLS = ("Ava", "Mia", "Lily", "Emma", "Zoe", "Nora", "Ruth", "Ella", "Sofia", "Maya", "Lucy",
          "Hana", "Amara", "Ines", "Priya", "Leah", "Olga", "Rosa", "Tara", "Yuki", "Fatima",
          "Grace", "Chloe", "Jade", "Lena", "Mei", "Nadia", "Sara", "Vera", "Iris")
BOYS = ("Tom", "Ben", "Sam", "Leo", "Omar", "Raj", "Jack", "Liam", "Noah", "Ivan", "Carlos",
         "Kofi", "Hugo", "Eli", "Finn", "Marco", "Ali", "Jamal", "Kenji", "Luis", "Max", "Oscar",
         "Paul", "Ravi", "Theo", "Umar", "Victor", "Wei", "Yusuf", "Diego")
PEOPLE = tuple(Person(n, "she", "her") for n in GIRLS) + tuple(Person(n, "he", "his") for n in BOYS)

# (plural name, lowest price, highest price)
SHOP_ITEMS = (("pens", 2, 5), ("notebooks", 2, 9), ("apples", 2, 4), ("books", 5, 20),
               ("toy cars", 3, 12), ("shirts", 8, 25), ("cupcakes", 2, 5), ("pencils", 2, 3),
               ("bottles of juice", 2, 6), ("comic books", 3, 9), ("sandwiches", 4, 9),
               ("candles", 2, 8), ("balloons", 2, 4), ("mugs", 3, 10), ("plants", 4, 15),
               ("puzzles", 6, 18), ("socks", 2, 6), ("hats", 5, 14))
CURRENCIES = ("dollars", "euros", "pounds")
BIG_ITEMS = ("bike", "guitar", "tent", "watch", "skateboard", "camera", "scooter", "telescope")
COLLECTIBLES = ("marbles", "stickers", "stamps", "shells", "cards", "beads", "buttons",
                 "crayons", "rocks", "coins")
FOODS = ("cookies", "candies", "grapes", "strawberries", "cherries", "crackers", "muffins",
          "chocolates", "nuts", "pretzels")
CONTAINERS = ("boxes", "jars", "baskets", "crates", "packs", "tins")
FRUIT_TREES = (("apple", "apples"), ("orange", "oranges"), ("lemon", "lemons"),
                ("peach", "peaches"), ("plum", "plums"), ("pear", "pears"))
DISTANCE_UNITS = ("km", "miles")
# (verb, things, minutes each: divisors of 60, so the hours come out whole)
CHORES = (("washes", "cars", (10, 12, 15, 20, 30)), ("walks", "dogs", (15, 20, 30)),
           ("paints", "chairs", (12, 15, 20, 30)), ("cleans", "rooms", (10, 15, 20, 30)),
           ("bakes", "cakes", (20, 30)), ("repairs", "bikes", (10, 15, 20, 30)),
           ("plants", "trees", (5, 6, 10, 12, 15)), ("irons", "shirts", (5, 6, 10)))
# (noun, where, has the trait, lacks it)
GROUPS = (("students", "in a class", "wear glasses", "do not wear glasses"),
           ("cars", "in a parking lot", "are red", "are not red"),
           ("fish", "in a pond", "are goldfish", "are not goldfish"),
           ("people", "on a bus", "are children", "are not children"),
           ("books", "on a shelf", "are new", "are not new"),
           ("eggs", "in a basket", "are brown", "are not brown"),
           ("dogs", "in a park", "are puppies", "are not puppies"),
           ("birds", "in a tree", "are sparrows", "are not sparrows"),
           ("flowers", "in a garden", "are roses", "are not roses"))
# (dish, first ingredient, second ingredient, unit)
RECIPES = (("cake", "flour", "sugar", "cups"), ("soup", "carrots", "potatoes", "cups"),
            ("bread", "flour", "milk", "cups"), ("salad", "tomatoes", "beans", "cups"),
            ("pancake", "milk", "flour", "cups"), ("cookie", "butter", "sugar", "spoons"))
# (big unit, small unit, small units per big unit, question template)
CONVERSIONS = (
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


def people(rng: random.Random, k: int) -> list[Person]:
    return rng.sample(PEOPLE, k)


def cap(word: str) -> str:
    return word[0].upper() + word[1:]
