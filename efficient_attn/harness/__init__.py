"""The benchmark harness: a suite becomes cells, each cell a row of a run folder. Import the submodules you need.

Modules, each importing only those above it:

* ``schema``: results file names and columns, ``SCHEMA_VERSION`` (what the report reads);
* ``host``: device resolution, memory probing, the memory budget, the environment recorded in ``meta.json``;
* ``runfolder``: ``results.csv`` + ``meta.json`` of any tidy table (the benchmark's and the quality suite's);
* ``suite``: the TOML schema of ``bench/*.toml`` and its validation; ``overrides``: command-line changes to a suite;
* ``plan``: what a cell is and the cells of a suite, in run order;
* ``decoding``: the prefill and decode cells (a cache filled to the context, single-token steps);
* ``workloads``: the callable a cell times (level x mode); ``predict``: its peak memory on fake tensors;
* ``cell``: one cell: precheck (static status, prediction, budget), measurement, row;
* ``worker``: one cell measured in a fresh process (``--isolate``);
* ``sweep``: the loop over a suite's cells: resume, OOM skips, progress; the dry run.
"""
