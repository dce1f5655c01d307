"""The results schema of a benchmark run folder: file names, column names and their order, the schema version.

* ``results.csv``: one tidy row per cell. The configuration columns (:data:`CONFIG_COLUMNS`) together are the cell's
  key; the measured columns (:data:`MEASURED_COLUMNS`) follow, then where the cell ran (:data:`RUN_COLUMNS`, since
  schema 2: ``host``; ``job_id`` and ``array_index`` of the Slurm array task or local job that ran it, empty for
  cells run inline).
* ``meta.json``: the configuration of the run, the environment, the seeds, the wall times.

``status`` is one of :data:`efficient_attn.vocab.STATUSES`. Numbers are empty (read back as NaN), never ``-1``, unless
the status is ``ok``; the one exception is ``predicted_mem_bytes``, a prediction rather than a measurement, which is
also kept for ``skipped_budget`` rows.

Units: ``time_ms``, ``time_iqr_ms``, ``compile_ms`` milliseconds per call; ``*_bytes`` bytes; ``flops_*`` FLOPs per
call (forward+backward for ``fwd_bwd``; see :mod:`efficient_attn.measure.flops`); ``flops_per_s`` =
``flops_computed / time``; ``tokens_per_s`` = ``batch_size * seq_len / time``; ``timed_runs`` = calls in the timed
window.

Inference modes (schema 4): a ``prefill`` row is one call over ``seq_len`` prompt tokens that fills a fresh decode
cache (``cache_bytes`` = the cache's exact bytes after it, ``new_tokens`` = ``seq_len``). A ``decode`` row is one new
token per sequence against a cache that holds ``seq_len`` tokens (the context): ``time_ms`` is the median of one
step, ``tokens_per_s`` = ``batch_size / time`` (new tokens per second), ``new_tokens`` = ``batch_size``,
``cache_bytes`` the cache at that context, ``bandwidth_bytes_per_s`` the bytes read plus written per second by a large
tensor copy with the same threads, measured in the same process (:mod:`efficient_attn.measure.bandwidth`), so a
report can put decode against the memory-bandwidth bound.

The schema only grows: a new column comes with a new :data:`SCHEMA_VERSION`, and readers fill the columns an older
run lacks with empty values (a resumed folder of an older version is rewritten with the new header, its rows keeping
empty values in the new columns).

Versions: 1 the first; 2 adds where a cell ran (:data:`RUN_COLUMNS`); 3 adds ``num_kv_heads`` (key/value heads of
grouped-query attention; empty = ``num_heads``, which is what every earlier row ran); 4 adds the inference columns
``cache_bytes``, ``new_tokens``, ``bandwidth_bytes_per_s`` (empty in every earlier row: no earlier mode had a cache)
and the packed-document configuration ``packing`` and ``documents`` (empty = an ordinary cell, which is what every
earlier row ran); 5 adds the ``hf`` level's ``transformers_version`` (installed transformers) and
``attn_implementation`` (what the model ran: ``sdpa``, ``eager``, ``flex_attention`` or
``efficient_attn:<key>(params)``), empty in every other row.

Packed documents (schema 4): ``documents`` lists the document lengths (``256,1024,...``); ``packing`` says how they
ran: ``packed`` (one sequence of ``seq_len`` = their sum, ``document_ids`` telling them apart), ``padded`` (a batch
of one sequence per document, padded to the longest, ``padded_len``, with a key padding mask) or ``alone`` (each
document on its own, one after the other: the time is the sum). All three rows have ``batch_size`` 1 and
``seq_len`` = the total tokens, so their times compare directly.
"""

from __future__ import annotations

__all__ = [
    "ALL_COLUMNS",
    "HF_COLUMNS",
    "MAX_LEN_NOTE",
    "COLUMNS_BY_VERSION",
    "CONFIG_COLUMNS",
    "CONFIG_COLUMNS_V1",
    "CONFIG_COLUMNS_V3",
    "MEASURED_COLUMNS",
    "MEASURED_COLUMNS_V3",
    "META_FILE",
    "NUMERIC_COLUMNS",
    "OLDER_COLUMNS",
    "RESULTS_FILE",
    "RUN_COLUMNS",
    "SCHEMA_VERSION",
    "TEXT_COLUMNS",
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
    "packing",
    "documents",
)
#: the configuration columns of schema 3 (no packed documents yet)
CONFIG_COLUMNS_V3: tuple[str, ...] = CONFIG_COLUMNS[: CONFIG_COLUMNS.index("packing")]
#: the configuration columns before schema 3 (no ``num_kv_heads``: every variant had as many key/value heads as heads)
CONFIG_COLUMNS_V1: tuple[str, ...] = tuple(c for c in CONFIG_COLUMNS_V3 if c != "num_kv_heads")
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
    "cache_bytes",
    "new_tokens",
    "bandwidth_bytes_per_s",
    "transformers_version",
    "attn_implementation",
)
#: the measured columns before schema 4 (no inference columns)
MEASURED_COLUMNS_V3: tuple[str, ...] = MEASURED_COLUMNS[: MEASURED_COLUMNS.index("cache_bytes")]
#: the ``hf`` level's columns (schema 5)
HF_COLUMNS: tuple[str, ...] = ("transformers_version", "attn_implementation")
#: where the cell ran (schema 2): the host, and for a cell run by a scheduler its job id and array index (empty inline)
RUN_COLUMNS: tuple[str, ...] = ("host", "job_id", "array_index")
ALL_COLUMNS: tuple[str, ...] = CONFIG_COLUMNS + MEASURED_COLUMNS + RUN_COLUMNS
#: measured columns that are text (the rest are numbers, left empty unless status is ok)
TEXT_COLUMNS: tuple[str, ...] = ("backend", "status", "note", *HF_COLUMNS)
NUMERIC_COLUMNS: tuple[str, ...] = tuple(c for c in MEASURED_COLUMNS if c not in TEXT_COLUMNS)
SCHEMA_VERSION = 5
#: the columns of each schema version (a run folder of an earlier one is upgraded when it is resumed; its rows get
#: the new columns empty). 2 added where a cell ran (:data:`RUN_COLUMNS`), 3 the grouped-query ``num_kv_heads``, 4 the
#: inference and packing columns, 5 the ``hf`` level's (:data:`HF_COLUMNS`).
COLUMNS_BY_VERSION: dict[int, tuple[str, ...]] = {
    1: CONFIG_COLUMNS_V1 + MEASURED_COLUMNS_V3,
    2: CONFIG_COLUMNS_V1 + MEASURED_COLUMNS_V3 + RUN_COLUMNS,
    3: CONFIG_COLUMNS_V3 + MEASURED_COLUMNS_V3 + RUN_COLUMNS,
    4: tuple(c for c in ALL_COLUMNS if c not in HF_COLUMNS),
    5: ALL_COLUMNS,
}
#: every header of an earlier version, which a run folder of this schema may find and upgrade (each a subsequence
#: of :data:`ALL_COLUMNS`)
OLDER_COLUMNS: tuple[tuple[str, ...], ...] = tuple(
    columns for version, columns in COLUMNS_BY_VERSION.items() if version < SCHEMA_VERSION
)

#: how the note of a cell cut by a suite's per-mode ``max_len`` begins (its status is ``skipped_budget``, like a cell
#: whose predicted memory is over the budget): the report tells the two apart by it
MAX_LEN_NOTE = "above this suite's max_len"
