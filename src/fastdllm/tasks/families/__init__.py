"""The problem families, one module per topic. Importing this package registers every family in
`FAMILIES`. The order of `TOPICS` is the order the generator cycles through, so it is part of
the data's definition: changing it changes every split (hence importlib, which no import sorter
reorders)."""

from importlib import import_module

TOPICS = ("money", "sharing", "rates", "measures")
for _topic in TOPICS:
    import_module(f"{__name__}.{_topic}")
