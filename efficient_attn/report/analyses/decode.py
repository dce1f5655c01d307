"""Decode analyses (issue 13): scaling exponents against the context, the prefill/decode split, full decode against
the memory-bandwidth bound, and ours against the transformers decode peer.

Rows: ``decode`` rows have ``seq_len`` = the context, ``time_ms`` = one step (one new token per sequence),
``cache_bytes`` and ``bandwidth_bytes_per_s`` (the copy bandwidth measured in the same process);
``prefill`` rows are one call over ``seq_len`` prompt tokens (see :mod:`efficient_attn.harness.schema`).

* **Exponents**: the log-log slope of step time and of cache bytes against the context (:func:`fit_power_law`):
  a window's and a recurrent state's about 0, a growing key/value cache's about 1.
* **Bandwidth bound**: a step of full attention must read every cached key and value once, ``2 * batch *
  kv_heads * context * head_dim * bytes per element``; divided by the recorded copy bandwidth that is the step's
  least time. The bound counts only the keys and values (not the projections, nor the cache's spare capacity).
* **Peer**: ``hf-llama-decode`` without ``window_size`` is compared with our ``full``, with ``window_size = w`` with
  our ``window`` of the same ``window_size``, at the same context and batch.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

from efficient_attn.report.analyses.fit import fit_power_law
from efficient_attn.report.format import format_bytes, format_ms, length_label

if TYPE_CHECKING:
    import pandas as pd

__all__ = [
    "DTYPE_BYTES",
    "bandwidth_rows",
    "decode_exponent_rows",
    "decode_rows",
    "is_full_decoder",
    "kv_read_bytes",
    "peer_rows",
    "split_rows",
]

#: bytes per element of each dtype name a suite may run
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "float64": 8}
#: the peer and the series of ours it is compared with
DECODE_PEER = "hf-llama-decode"


def _ratio(value: float) -> str:
    """A ratio in a table: ``1.6 -> "1.60x"``."""
    return f"{value:.2f}x"


def decode_rows(frame: pd.DataFrame, *, ok: bool = True) -> pd.DataFrame:
    """The ``decode`` rows (only those that ran, unless ``ok=False``)."""
    rows = frame[frame["mode"] == "decode"]
    return rows[rows["status"] == "ok"] if ok else rows


def _bandwidth(value: float) -> str:
    return f"{value / 1e9:.1f} GB/s"


def _rate(value: float) -> str:
    return f"{value:,.0f}"


def _fit(x: object, y: object) -> str:
    values = [float(v) for v in y]  # type: ignore[attr-defined]
    if values and min(values) > 0 and max(values) / min(values) < 1.01:
        return "0.00 (flat)"  # constant: R² is undefined
    try:
        fit = fit_power_law(x, y)  # type: ignore[arg-type]
    except ValueError:
        return "too few points"
    return f"{round(fit.exponent, 2) + 0.0:.2f} (R²={fit.r2:.2f})"  # + 0.0: no "-0.00"


def _batch(row: object) -> int:
    return int(getattr(row, "batch_size"))


def decode_exponent_rows(frame: pd.DataFrame) -> tuple[list[str], list[list[str]]]:
    """Per run, series and batch: contexts fitted, step-time exponent, cache-bytes exponent, time at the longest."""
    header = ["run", "series", "batch", "contexts", "time exponent", "cache exponent", "ms / token at longest"]
    rows = []
    data = decode_rows(frame)
    for (run, series, batch), group in data.groupby(["run", "series", "batch_size"], sort=False):
        group = group.sort_values("seq_len")
        longest = group.iloc[-1]
        rows.append([
            str(run), str(series), str(int(batch)),
            f"{length_label(group['seq_len'].min())}-{length_label(group['seq_len'].max())}",
            _fit(group["seq_len"], group["time_ms"]), _fit(group["seq_len"], group["cache_bytes"]),
            format_ms(float(longest["time_ms"])),
        ])
    return header, rows


def _key(row: pd.Series) -> tuple:
    return (row["run"], row["variant"], row["params_json"], bool(row["is_peer"]), int(row["batch_size"]))


def split_rows(frame: pd.DataFrame) -> tuple[list[str], list[list[str]]]:
    """Per variant, batch and prompt length where both ran: prefill time (and per token), the cache it left, a
    decode step at that context, and how many prefill tokens one decode step costs."""
    header = ["run", "variant", "batch", "prompt", "prefill", "prefill / token", "cache after prefill",
              "decode step", "decode tokens/s", "step / prefill token"]
    ok = frame[frame["status"] == "ok"]
    prefill = ok[ok["mode"] == "prefill"]
    decode = {(_key(r), int(r["seq_len"])): r for _, r in decode_rows(frame).iterrows()}
    rows = []
    for _, p in prefill.sort_values(["run", "variant", "batch_size", "seq_len"]).iterrows():
        d = decode.get((_key(p), int(p["seq_len"])))
        if d is None:
            continue
        per_token = float(p["time_ms"]) / (int(p["seq_len"]) * int(p["batch_size"]))
        step_per_seq = float(d["time_ms"]) / int(d["batch_size"])
        rows.append([
            str(p["run"]), str(p["series"]).split(":")[0], str(int(p["batch_size"])), length_label(p["seq_len"]),
            format_ms(float(p["time_ms"])), format_ms(per_token), format_bytes(float(p["cache_bytes"])),
            format_ms(float(d["time_ms"])), _rate(float(d["tokens_per_s"])),
            _ratio(step_per_seq / per_token),
        ])
    return header, rows


def kv_read_bytes(row: pd.Series) -> float:
    """Bytes of keys and values a full-attention step reads at the row's context (see the module docstring)."""
    kv = row.get("num_kv_heads")
    kv_heads = row["num_heads"] if kv is None or kv != kv or kv == "" else kv  # empty = as many as heads
    size = DTYPE_BYTES.get(str(row["dtype"]), 4)
    return 2.0 * int(row["batch_size"]) * int(kv_heads) * int(row["seq_len"]) * int(row["head_dim"]) * size


def is_full_decoder(row: pd.Series) -> bool:
    """Whether the row decodes with a growing key/value cache of full attention (ours, or the peer without window)."""
    if row["is_peer"]:
        return row["variant"] == DECODE_PEER and "window_size" not in json.loads(row["params_json"] or "{}")
    return row["variant"] == "full"


def bandwidth_rows(frame: pd.DataFrame, *, min_context: int = 0) -> tuple[list[str], list[list[str]]]:
    """Full decode (ours and the peer's) against the bandwidth bound at every context ``>= min_context``."""
    header = ["run", "series", "batch", "context", "keys+values read", "copy bandwidth", "bound", "measured",
              "measured / bound"]
    rows = []
    data = decode_rows(frame)
    data = data[data["seq_len"] >= min_context]
    for _, row in data.sort_values(["run", "is_peer", "batch_size", "seq_len"]).iterrows():
        bandwidth = float(row["bandwidth_bytes_per_s"])
        if not is_full_decoder(row) or not bandwidth == bandwidth:
            continue
        read = kv_read_bytes(row)
        bound_ms = 1e3 * read / bandwidth
        rows.append([
            str(row["run"]), str(row["series"]), str(int(row["batch_size"])), length_label(row["seq_len"]),
            format_bytes(read), _bandwidth(bandwidth), format_ms(bound_ms), format_ms(float(row["time_ms"])),
            _ratio(float(row["time_ms"]) / bound_ms),
        ])
    return header, rows


def _ours_for_peer(row: pd.Series) -> tuple[str, dict]:
    params = json.loads(row["params_json"] or "{}")
    if params.get("window_size") is None:
        return "full", {}
    return "window", {"window_size": params["window_size"]}


def peer_rows(frame: pd.DataFrame) -> tuple[list[str], list[list[str]]]:
    """Ours against the transformers decode peer at the same context and batch: step time and cache bytes."""
    header = ["run", "ours", "peer", "batch", "context", "ours / token", "peer / token", "peer / ours (time)",
              "ours cache", "peer cache"]
    data = decode_rows(frame)
    ours = data[~data["is_peer"]]
    rows = []
    for _, peer in data[data["is_peer"] & (data["variant"] == DECODE_PEER)].sort_values(
            ["run", "params_json", "batch_size", "seq_len"]).iterrows():
        variant, wanted = _ours_for_peer(peer)
        same = ours[(ours["run"] == peer["run"]) & (ours["variant"] == variant)
                    & (ours["batch_size"] == peer["batch_size"]) & (ours["seq_len"] == peer["seq_len"])]
        same = same[[all(json.loads(p or "{}").get(k) == v for k, v in wanted.items()) for p in same["params_json"]]]
        if same.empty:
            continue
        mine = same.iloc[0]
        rows.append([
            str(peer["run"]), str(mine["series"]), str(peer["series"]), str(int(peer["batch_size"])),
            length_label(peer["seq_len"]), format_ms(float(mine["time_ms"])), format_ms(float(peer["time_ms"])),
            _ratio(float(peer["time_ms"]) / float(mine["time_ms"])), format_bytes(float(mine["cache_bytes"])),
            format_bytes(float(peer["cache_bytes"])),
        ])
    return header, rows
