"""The benchmark harness: suites, cells, workloads, the sweep and its run folder. Import the submodules you need."""
