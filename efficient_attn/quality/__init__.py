"""Quality of each attention variant: synthetic long-range tasks, training, approximation error, head diversity.

Modules: ``tasks`` (seeded generators + brute-force solvers), ``train`` (fixed-budget CPU training of the shared
backbone), ``metrics`` (relative error against full attention, head similarity), ``suite`` (the resumable sweep),
``plots`` and ``report``. Nothing here registers anything; importing it has no side effects.
"""
