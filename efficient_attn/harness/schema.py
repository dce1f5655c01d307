"""The results schema of a benchmark run folder: file names, column names and their order, the schema version.

* ``results.csv``: one tidy row per cell. The configuration columns (:data:`CONFIG_COLUMNS`) together are the cell's
  key; the measured columns (:data:`MEASURED_COLUMNS`) follow.
* ``meta.json``: the configuration of the run, the environment, the seeds, the wall times.

``status`` is one of :data:`efficient_attn.vocab.STATUSES`. Numbers are empty (read back as NaN), never ``-1``, unless
the status is ``ok``; the one exception is ``predicted_mem_bytes``, a prediction rather than a measurement, which is
also kept for ``skipped_budget`` rows.

Units: ``time_ms``, ``time_iqr_ms``, ``compile_ms`` milliseconds per call; ``*_bytes`` bytes; ``flops_*`` FLOPs per
call (forward+backward for ``fwd_bwd``; see :mod:`efficient_attn.measure.flops`); ``flops_per_s`` =
``flops_computed / time``; ``tokens_per_s`` = ``batch_size * seq_len / time``; ``timed_runs`` = calls in the timed
window.

The schema only grows: a new column comes with a new :data:`SCHEMA_VERSION`, and readers fill the columns an older
run lacks with empty values (a resumed folder of an older version is rewritten with the new header, its rows keeping
empty values in the new columns).

Versions: 1 the first; 2 adds ``num_kv_heads`` (key/value heads of grouped-query attention; empty = ``num_heads``,
which is what every version-1 row ran).
"""

from __future__ import annotations

__all__ = [
    "ALL_COLUMNS",
    "CONFIG_COLUMNS",
    "MEASURED_COLUMNS",
    "META_FILE",
    "NUMERIC_COLUMNS",
    "RESULTS_FILE",
    "SCHEMA_VERSION",
]

#: file names inside a run folder
RESULTS_FILE = "results.csv"
META_FILE = "meta.json"

CONFIG_COLUMNS: tuple[str, ...] = (
    "variant",
    "params_json",
    "backend_requested",
    "level",
    "mode",
    "causal",
    "device",
    "dtype",
    "batch_size",
    "seq_len",
    "num_heads",
    "head_dim",
    "is_peer",
    "num_kv_heads",
)
MEASURED_COLUMNS: tuple[str, ...] = (
    "backend",
    "status",
    "note",
    "padded_len",
    "time_ms",
    "time_iqr_ms",
    "compile_ms",
    "tokens_per_s",
    "peak_mem_bytes",
    "peak_rss_bytes",
    "predicted_mem_bytes",
    "flops_useful",
    "flops_computed",
    "flops_per_s",
    "timed_runs",
)
ALL_COLUMNS: tuple[str, ...] = CONFIG_COLUMNS + MEASURED_COLUMNS
#: measured columns that are numbers (left empty unless status is ok)
NUMERIC_COLUMNS: tuple[str, ...] = tuple(c for c in MEASURED_COLUMNS if c not in ("backend", "status", "note"))
SCHEMA_VERSION = 2
