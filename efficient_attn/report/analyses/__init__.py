"""The analyses of a benchmark report: each takes the tidy frame (and the runs) and returns tables of text.

``fit`` (power-law fits, scaling exponents), ``crossover`` (where a variant overtakes a reference), ``budget``
(longest length within the memory budget), ``tables`` (ratios vs the baseline, LRA-style and published figures,
run against run), ``overview`` (environment, cell status, timing noise). None of them draws or writes anything.
"""
