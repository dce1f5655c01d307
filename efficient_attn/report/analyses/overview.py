"""What ran, where and how reliably: the environment table, the cell-status counts, the timing noise."""

from __future__ import annotations

from typing import TYPE_CHECKING

from efficient_attn import vocab
from efficient_attn.harness.schema import META_FILE
from efficient_attn.report.format import format_bytes, length_label
from efficient_attn.report.load import ABOVE_MAX_LEN
from efficient_attn.report.series import display_name, mode_sorted

if TYPE_CHECKING:
    import pandas as pd

    from efficient_attn.report.load import Run, RunInfo

NOISY_IQR = 0.2  # relative IQR above which a timing is called noisy
MISSING = "-"


def _bytes_text(value: float | None) -> str:
    return MISSING if value is None else f"{value:,.0f} ({format_bytes(value)})"


def _seconds_text(value: float | None) -> str:
    return MISSING if value is None else f"{value:g} s"


def _join(*parts: str | None) -> str:
    return ", ".join(p for p in parts if p) or MISSING


def _info_rows(info: RunInfo) -> dict[str, str]:
    """The environment a reader needs to judge the numbers; everything else stays in meta.json."""
    installed = [f"{name} {version}" for name, version in info.libraries.items() if version]
    missing = [name for name, version in info.libraries.items() if not version]
    libraries = ", ".join(installed) + (f" (not installed: {', '.join(missing)})" if missing else "")
    cpu = _join(info.cpu_model, f"{info.cpu_count} cores" if info.cpu_count else None)
    wall = _seconds_text(info.wall_s)
    if info.wall_s is not None:
        sessions = f"{info.sessions} session{'s' if info.sessions != 1 else ''}"
        wall += f" ({sessions}{', interrupted' if info.interrupted else ''})"
    return {
        "suite": info.suite or MISSING,
        "device model": info.device_name or MISSING,
        "CPU": cpu,
        "torch threads": str(info.torch_threads) if info.torch_threads else MISSING,
        "versions": _join(
            f"python {info.python}" if info.python else None,
            f"torch {info.torch}" if info.torch else None,
            f"CUDA {info.cuda}" if info.cuda else None,
            f"efficient_attn {info.efficient_attn}" if info.efficient_attn else None,
        ),
        "libraries": libraries or MISSING,
        "platform": info.platform or MISSING,
        "git commit": info.git_commit or MISSING,
        "memory budget": _bytes_text(info.budget_bytes),
        "device memory": _bytes_text(info.device_memory_bytes),
        "wall time": wall,
        "timed window": _seconds_text(info.timed_window_s),
    }


def environment_rows(frame: pd.DataFrame, runs: list[Run]) -> tuple[list[str], list[list[str]]]:
    """One column per run: what the data holds (cells, devices, dtypes, modes, lengths), then the machine, the
    versions, the commit, the budget and the wall time from its meta.json (the whole config stays there)."""
    columns: list[dict[str, str]] = []
    for run in runs:
        part = frame[frame["run"] == run.label]
        column = {
            "folder": str(run.path),
            "cells (ok / total)": f"{int((part['status'] == 'ok').sum())} / {len(part)}",
            "devices": ", ".join(sorted(set(part["device"]) - {""})) or MISSING,
            "dtypes": ", ".join(sorted(set(part["dtype"]) - {""})) or MISSING,
            "modes": ", ".join(dict.fromkeys(part["mode"])),
            "lengths": ", ".join(length_label(n) for n in sorted(set(part["seq_len"]))),
        }
        column.update(_info_rows(run.info))
        column["full configuration"] = f"`{run.path / META_FILE}`" if run.meta else "no meta.json"
        columns.append(column)
    header = ["", *[run.label for run in runs]]
    rows = [[key, *[column[key] for column in columns]] for key in columns[0]]
    return header, rows


def status_rows(frame: pd.DataFrame) -> tuple[list[str], list[list[str]], list[str]]:
    """Counts of each status per run and series, and the notes of every cell that did not run."""
    shown = (*vocab.STATUSES, ABOVE_MAX_LEN)
    present = [s for s in shown if (frame["shown_status"] == s).any()]
    header = ["run", "series", *present, "total"]
    rows = []
    for (run, series), group in frame.groupby(["run", "series"], sort=False):
        counts = group["shown_status"].value_counts()
        rows.append([str(run), str(series), *[str(int(counts.get(s, 0))) for s in present], str(len(group))])
    notes = []
    failed = mode_sorted(frame[frame["status"] != "ok"])
    for (run, condition, mode, series, status, note), group in failed.groupby(
        ["run", "condition", "mode", "series", "shown_status", "note"], sort=False
    ):
        lengths = ", ".join(length_label(n) for n in sorted(set(group["seq_len"])))
        where = f"{run}, {display_name(str(condition), str(series))}, {mode} at {lengths}"
        notes.append(f"{where}: **{status}**" + (f" - {note}" if note else ""))
    return header, rows, notes


def noise_rows(frame: pd.DataFrame) -> tuple[list[str], list[list[str]]]:
    """Relative spread of the timings (IQR / median) by length: how far small sizes can be trusted."""
    ok = frame[(frame["status"] == "ok") & frame["time_ms"].notna() & frame["time_iqr_ms"].notna()]
    header = ["run", "length", "cells", "median IQR / median", "worst", f"cells above {NOISY_IQR:.0%}"]
    rows = []
    for (run, n), group in ok.groupby(["run", "seq_len"]):
        rel = group["time_iqr_ms"] / group["time_ms"]
        rows.append(
            [
                str(run),
                length_label(n),
                str(len(rel)),
                f"{rel.median():.1%}",
                f"{rel.max():.1%}",
                str(int((rel > NOISY_IQR).sum())),
            ]
        )
    return header, rows
