"""The quality report: ``report.md`` plus figures, from a quality run folder.

Reads ``results.csv`` (training cells), ``errors.csv`` and ``diversity.csv`` (from
:func:`efficient_attn.quality.suite.run_metrics`) and writes, next to them, ``report.md`` and ``*.png``.

Rules applied in the text:

* accuracy is reported as mean +/- std over seeds, beside the majority-class baseline;
* a task *counts* only where ``full`` beats the majority baseline by at least :data:`COUNT_MARGIN` (20 points) at
  that length and ``full``'s standard deviation over seeds is at most :data:`STD_LIMIT` (5 points); otherwise the
  report says so and its accuracies are shown but not interpreted (and left out of the LRA-style chart);
* the main grid is the suite's own setting (its head count, its ``[params]`` and ``[task_params]``, read from
  ``meta.json``); the knob curves (``[[curves]]``) and the heads sweep have their own sections.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

__all__ = ["COUNT_MARGIN", "STD_LIMIT", "IMPROVE_MARGIN", "task_validity", "write_report", "recall_guess_baseline",
           "curve_tables", "heads_table", "stall_point", "heads_paragraph"]

#: ``full`` must beat the majority-class baseline by this much (accuracy fraction) for a task to count.
COUNT_MARGIN = 0.20
#: ... and ``full``'s sample standard deviation over seeds must be at most this (accuracy fraction).
STD_LIMIT = 0.05
#: more heads "improve" accuracy only when the mean gains more than this (accuracy fraction): one point.
IMPROVE_MARGIN = 0.01


def _pct(x: float) -> str:
    return "" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.1f}"


def _mib(x: float) -> str:
    return "" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x / 2**20:.1f}"


def task_validity(results: Any) -> dict[tuple[str, int], tuple[bool, float, float]]:
    """Per ``(task, seq_len)``: (counts, full mean accuracy, majority accuracy). ``results``: the main grid's rows.

    A task counts at a length when ``full`` beats the majority class by :data:`COUNT_MARGIN` and its seed standard
    deviation (with two or more seeds) is at most :data:`STD_LIMIT`."""
    validity = {}
    ok = results[results["status"] == "ok"]
    for (task, seq_len), part in ok.groupby(["task", "seq_len"]):
        majority = float(part["majority_accuracy"].mean())
        full = part[part["variant"] == "full"]["accuracy"]
        full_acc = float(full.mean()) if len(full) else float("nan")
        steady = len(full) < 2 or float(full.std()) <= STD_LIMIT + 1e-12
        counts = bool(len(full)) and full_acc - majority >= COUNT_MARGIN and steady
        validity[(task, int(seq_len))] = (counts, full_acc, majority)
    return validity


def _full_std(results: Any, task: str, seq_len: int) -> float:
    full = results[(results["status"] == "ok") & (results["variant"] == "full") & (results["task"] == task)
                   & (results["seq_len"] == seq_len)]["accuracy"]
    return float(full.std()) if len(full) > 1 else float("nan")


def _load_suite(run_dir: Path) -> Any:
    """The run's suite from ``meta.json`` (None when the folder has none, or one this version cannot rebuild)."""
    import json

    from efficient_attn.quality.suite import suite_from_config

    try:
        config = json.loads((run_dir / "meta.json").read_text())["config"]
        return suite_from_config(config)
    except (OSError, KeyError, TypeError, ValueError):
        return None


def _dumps(value: dict[str, Any]) -> str:
    import json

    return json.dumps(value, sort_keys=True)


def _grid_mask(results: Any, suite: Any, num_heads: int) -> Any:
    """Rows of the main grid: the suite's head count, and (when the suite is known) its params and task params."""
    mask = results["num_heads"] == num_heads
    if suite is None:
        return mask
    params = results["variant"].map(lambda v: _dumps(suite.params.get(v, {})))
    task_params = results["task"].map(lambda t: _dumps(suite.task_params.get(t, {})))
    return mask & (results["params_json"] == params) & (results["task_params_json"] == task_params)


def _seed_stats(part: Any) -> dict[str, Any]:
    accs = [float(a) for a in part.sort_values("seed")["accuracy"]]
    return {"mean": sum(accs) / len(accs) if accs else float("nan"),
            "std": float(part["accuracy"].std()) if len(accs) > 1 else float("nan"),
            "n": len(accs), "accuracies": accs,
            "train_s": float(part["train_s"].mean()) if len(accs) else float("nan"),
            "train_cpu_s": float(part["train_cpu_s"].mean()) if len(accs) else float("nan")}


def curve_tables(results: Any, suite: Any) -> tuple[Any, Any]:
    """(knob points, task-parameter points) of the suite's ``[[curves]]``, one row per value: variant, param, value,
    task, seq_len, label, status, note, mean, std, n, accuracies (per seed, in seed order), train_s, train_cpu_s."""
    import json

    import pandas as pd

    knob_rows, task_rows = [], []
    heads = suite.train.num_heads
    for curve in suite.curves:
        from efficient_attn.quality.curves import KNOBS

        param = curve.param if curve.param is not None else KNOBS[curve.variant].param
        task = curve.task or suite.tasks[0]
        seq_len = curve.seq_len or min(suite.lengths)
        for value, (attention, task_params) in zip(curve.values, suite.curve_points(curve)):
            part = results[(results["task"] == task) & (results["variant"] == curve.variant)
                           & (results["seq_len"] == seq_len) & (results["num_heads"] == heads)
                           & (results["params_json"] == _dumps(attention))
                           & (results["task_params_json"] == _dumps(task_params))]
            if part.empty:
                continue
            ok = part[part["status"] == "ok"]
            fixed = {k: v for k, v in (attention if curve.where == "task" else {}).items()}
            row = {"variant": curve.variant, "param": param, "value": value, "task": task, "seq_len": seq_len,
                   "label": curve.variant + (f" {json.dumps(fixed)}" if fixed else ""),
                   "status": "ok" if len(ok) else str(part["status"].iloc[0]),
                   "note": "" if len(ok) else str(part["note"].iloc[0]), **_seed_stats(ok)}
            (task_rows if curve.where == "task" else knob_rows).append(row)
    columns = ["variant", "param", "value", "task", "seq_len", "label", "status", "note", "mean", "std", "n",
               "accuracies", "train_s", "train_cpu_s"]
    return pd.DataFrame(knob_rows, columns=columns), pd.DataFrame(task_rows, columns=columns)


def heads_table(results: Any, suite: Any) -> Any:
    """The heads sweep's rows with head metrics, per head count: acc_mean, acc_std, n, accuracies, output_cosine,
    map_cosine, important_heads, max_drop (metric columns: means over seeds)."""
    import pandas as pd

    sweep = suite.heads_sweep if suite is not None else None
    columns = ["num_heads", "acc_mean", "acc_std", "n", "accuracies", "output_cosine", "map_cosine",
               "important_heads", "max_drop", "train_cpu_s"]
    if sweep is None or "max_drop" not in results:
        return pd.DataFrame([], columns=columns)
    rows = results[(results["task"] == sweep.task) & (results["variant"] == sweep.variant)
                   & (results["seq_len"] == sweep.seq_len) & (results["status"] == "ok")
                   & (results["params_json"] == _dumps(suite.params.get(sweep.variant, {})))
                   & (results["task_params_json"] == _dumps(suite.task_params.get(sweep.task, {})))
                   & results["num_heads"].isin(sweep.num_heads) & results["max_drop"].notna()]
    out = []
    for heads, part in rows.groupby("num_heads"):
        stats = _seed_stats(part)
        out.append({"num_heads": int(heads), "acc_mean": stats["mean"], "acc_std": stats["std"], "n": stats["n"],
                    "accuracies": stats["accuracies"], "output_cosine": float(part["output_cosine"].mean()),
                    "map_cosine": float(part["map_cosine"].mean()),
                    "important_heads": float(part["important_heads"].mean()),
                    "max_drop": float(part["max_drop"].mean()), "train_cpu_s": stats["train_cpu_s"]})
    return pd.DataFrame(out, columns=columns).sort_values("num_heads").reset_index(drop=True)


def stall_point(table: Any, margin: float = IMPROVE_MARGIN) -> int | None:
    """The smallest head count from which no larger count improves mean accuracy by more than ``margin``."""
    if table.empty:
        return None
    means = list(table.sort_values("num_heads")[["num_heads", "acc_mean"]].itertuples(index=False))
    for index, (heads, mean) in enumerate(means):
        if all(later <= mean + margin for _, later in means[index + 1:]):
            return int(heads)
    return int(means[-1][0])


def _pearson(xs: list[float], ys: list[float]) -> float:
    pairs = [(x, y) for x, y in zip(xs, ys) if x == x and y == y]
    if len(pairs) < 3:
        return float("nan")
    mx = sum(x for x, _ in pairs) / len(pairs)
    my = sum(y for _, y in pairs) / len(pairs)
    sxy = sum((x - mx) * (y - my) for x, y in pairs)
    sxx = sum((x - mx) ** 2 for x, _ in pairs)
    syy = sum((y - my) ** 2 for _, y in pairs)
    return sxy / math.sqrt(sxx * syy) if sxx > 0 and syy > 0 else float("nan")


def heads_paragraph(table: Any, variant: str = "full") -> str:
    """The heads question in words, every number computed from ``table`` (:func:`heads_table`)."""
    if table.empty:
        return ""
    table = table.sort_values("num_heads").reset_index(drop=True)
    stall = stall_point(table)
    at = table[table["num_heads"] == stall].iloc[0]
    accs = ", ".join(f"{int(r.num_heads)}: {100 * r.acc_mean:.1f}"
                     + ("" if r.acc_std != r.acc_std else f" ± {100 * r.acc_std:.1f}") for r in table.itertuples())
    text = (f"**Heads.** Mean accuracy ({variant}, width fixed) by head count: {accs}%. Accuracy stops improving "
            f"(no larger count gains more than {100 * IMPROVE_MARGIN:.0f} point) from **{stall} head"
            f"{'s' if stall != 1 else ''}**. ")
    if stall == 1 or at["output_cosine"] != at["output_cosine"]:
        text += "One head has no pair to compare, so there is no similarity at the stall point. "
    else:
        text += (f"There the heads' outputs have a mean pairwise cosine of {at['output_cosine']:.2f} and their "
                 f"attention maps {at['map_cosine']:.2f}; {at['important_heads']:.1f} of {stall} heads (mean over "
                 f"seeds) cost more than one point when removed (largest drop {100 * at['max_drop']:.1f} points). ")
    # does similarity predict the stall? the gain of the next head count against the similarity at this one
    gains = [float(table["acc_mean"].iloc[i + 1] - table["acc_mean"].iloc[i]) for i in range(len(table) - 1)]
    sims = [float(v) for v in table["output_cosine"].iloc[:-1]]
    r = _pearson(sims, gains)
    usable = sum(1 for s, g in zip(sims, gains) if s == s)
    if r != r:
        text += (f"Whether similarity predicts the stall cannot be tested here: {usable} head count(s) with both a "
                 "similarity and a next count (at least 3 are needed).")
    else:
        verdict = ("so higher similarity went with smaller gains from more heads: similarity does predict the stall"
                   if r <= -0.7 else
                   "so similarity does not predict the stall on these points" if r > -0.3 else
                   "a weak link: similarity only loosely predicts the stall")
        text += (f"Across the {usable} head counts with two or more heads, the Pearson correlation between the "
                 f"output similarity and the accuracy gain of the next head count is r = {r:+.2f}, {verdict} (few "
                 "points: read it as a description of this sweep, not a law).")
    return text


def write_report(run_dir: str | Path, *, num_heads: int | None = None) -> Path:
    """Write ``report.md`` and the figures into ``run_dir``; returns the report path.

    ``num_heads``: the head count of the main grid (default: the suite's, else the most common one in
    ``results.csv``); rows with other head counts are the heads sweep and only feed the heads sections.
    """
    import pandas as pd

    from efficient_attn.quality import plots

    run_dir = Path(run_dir)
    results_all = pd.read_csv(run_dir / "results.csv", keep_default_na=True)
    if results_all.empty:
        raise ValueError(f"{run_dir}/results.csv has no rows")
    if "task_params_json" not in results_all:
        results_all["task_params_json"] = "{}"  # a schema-1 table: every row ran with the generators' defaults
    suite = _load_suite(run_dir)
    if num_heads is None:
        num_heads = suite.train.num_heads if suite is not None else int(results_all["num_heads"].mode().iloc[0])
    results = results_all[_grid_mask(results_all, suite, num_heads)]
    if results.empty:
        results = results_all[results_all["num_heads"] == num_heads]
    lines = ["# Quality report: how good is each attention variant?", ""]
    first = results.iloc[0]
    from efficient_attn.quality.tasks import TASKS

    kinds = sorted({TASKS[t].kind for t in results["task"] if t in TASKS})
    lines += [
        f"Backbone: `build_model(task=...)` ({' and '.join(kinds)}), dim {first['dim']}, depth {first['depth']}, "
        f"{num_heads} head{'s' if num_heads != 1 else ''}; "
        f"AdamW, batch {first['batch_size']}, {first['steps_budget']} steps per cell, CPU. "
        f"Seeds per cell: {results.groupby(['task', 'variant', 'seq_len'])['seed'].nunique().max()}. "
        "Accuracy is on a held-out stream of generated examples. Speed (steps/s) was measured on a shared CPU: "
        "read it as a rough ranking. Peak memory is the exact peak of extra tensor bytes in one training step.",
        "",
    ]
    if "cell_s" in results_all and results_all["cell_s"].notna().any():
        lines += [
            f"Cost: {len(results_all)} training cells took {results_all['cell_s'].sum() / 60:.1f} min wall and "
            f"{results_all['cell_cpu_s'].sum() / 60:.1f} min of process CPU time (with one thread the CPU time "
            "approximates the wall time on a quiet machine).",
            "",
        ]
    # ---- tasks and their validity
    validity = task_validity(results)
    lines += ["## Do the tasks count?", "",
              f"A task counts at a length only where `full` beats the majority-class baseline by at least "
              f"{100 * COUNT_MARGIN:.0f} points and `full`'s standard deviation over seeds is at most "
              f"{100 * STD_LIMIT:.0f} points. For recall a second baseline matters: a model whose attention never "
              "links the query to the pairs can still guess among the values present (about 1 / number of pairs); "
              "only accuracy above that *guess* column is real long-range retrieval.", "",
              "| task | length | full accuracy | full seed std | majority baseline | guess baseline | counts |",
              "|---|---|---|---|---|---|---|"]
    for (task, seq_len), (counts, full_acc, majority) in sorted(validity.items()):
        guess = _pct(recall_guess_baseline(seq_len)) if task == "recall" else ""
        lines.append(f"| {task} | {seq_len} | {_pct(full_acc)} | {_pct(_full_std(results, task, seq_len))} | "
                     f"{_pct(majority)} | {guess} | {'yes' if counts else '**no**'} |")
    not_counting = [f"{t} at {n}" for (t, n), (c, _, _) in sorted(validity.items()) if not c]
    lines.append("")
    for (task, seq_len), (_, full_acc, _) in sorted(validity.items()):
        if task == "recall" and not math.isnan(full_acc):
            margin = full_acc - recall_guess_baseline(seq_len)
            verdict = ("so `full` does retrieve" if margin >= COUNT_MARGIN / 2 else
                       "so retrieval is not demonstrated at this budget: recall accuracies there mostly measure the "
                       "guess shortcut")
            lines.append(
                f"- Recall at {seq_len}: `full` is {100 * margin:+.1f} points from the guess baseline, {verdict}."
            )
    lines.append("")
    if not_counting:
        lines += [f"**Does not count: {', '.join(not_counting)}** -- `full` did not beat the majority class by "
                  f"{100 * COUNT_MARGIN:.0f} points with a seed std of at most {100 * STD_LIMIT:.0f} within the "
                  "budget, so differences between variants there say "
                  "nothing about long-range ability (they are shown, not interpreted).", ""]
    elif not validity:
        lines += ["No task has a finished `full` row yet, so none can be judged (nothing below is interpreted).", ""]
    else:
        lines += ["Every task counts at every length.", ""]
    # ---- accuracy table
    ok = results[results["status"] == "ok"]
    summary = (
        ok.groupby(["task", "seq_len", "variant"])
        .agg(mean=("accuracy", "mean"), std=("accuracy", "std"), n=("seed", "nunique"),
             sps=("steps_per_s", "mean"), peak=("peak_mem_bytes", "mean"))
        .reset_index()
    )
    lines += ["## Accuracy (%), mean ± std over seeds", "",
              "| task | length | variant | accuracy | seeds | steps/s | peak MiB |", "|---|---|---|---|---|---|---|"]
    for _, r in summary.sort_values(["task", "seq_len", "mean"], ascending=[True, True, False]).iterrows():
        std = "" if math.isnan(r["std"]) else f" ± {100 * r['std']:.1f}"
        lines.append(f"| {r['task']} | {r['seq_len']} | {r['variant']} | {_pct(r['mean'])}{std} | {r['n']} | "
                     f"{r['sps']:.2f} | {_mib(r['peak'])} |")
    bad = results[results["status"] != "ok"]
    if len(bad):
        lines += ["", "Cells that did not run:", ""]
        for _, r in bad.drop_duplicates(["task", "variant", "seq_len", "status", "note"]).iterrows():
            lines.append(f"- {r['task']} / {r['variant']} / n={r['seq_len']}: {r['status']} -- {r['note']}")
    lines.append("")
    figures = []
    counting = ok[[validity.get((t, int(n)), (False,))[0] for t, n in zip(ok["task"], ok["seq_len"])]]
    if len(counting):
        figures.append(plots.lra_chart(counting, run_dir / "lra_chart.png"))
        lines += ["The LRA-style chart shows only the tasks that count "
                  f"({', '.join(sorted(set(counting['task'])))}).", "",
                  "![speed vs accuracy vs memory](lra_chart.png)", ""]
    elif len(ok):
        lines += ["No task counts, so there is no LRA-style chart (its accuracies would mean nothing).", ""]
    if len(ok) and ok["seq_len"].nunique() > 1:
        figures.append(plots.accuracy_vs_length(results, run_dir / "accuracy_vs_length.png"))
        lines += ["![accuracy vs length](accuracy_vs_length.png)", ""]
    # ---- knob curves and the heads question
    if suite is not None and suite.curves:
        lines += _curves_section(results_all, results, suite, run_dir, figures)
    if suite is not None:
        lines += _heads_section(results_all, suite, run_dir, figures)
    # ---- errors
    errors_path = run_dir / "errors.csv"
    if errors_path.exists():
        errors = pd.read_csv(errors_path)
        lines += _error_section(errors)
        if suite is not None:
            used = {**suite.params}
            for curve in suite.curves:
                if curve.where == "attention" and curve.variant not in used and curve.variant not in suite.variants:
                    points = suite.curve_points(curve)
                    used[curve.variant] = points[len(points) // 2][0]
            shown = sorted(set(errors["variant"]) & set(used))
            if shown:
                lines += ["Parameters behind the table (a variant only on a knob curve: its first curve's middle "
                          "value): " + "; ".join(f"{v} `{_dumps(used[v])}`" for v in shown) + ".", ""]
        if len(errors[(errors["status"] == "ok") & (errors["variant"] != "full")]):
            figures.append(plots.error_plot(errors, run_dir / "errors.png"))
            lines += ["![relative error](errors.png)", ""]
    # ---- head diversity
    diversity_path = run_dir / "diversity.csv"
    if diversity_path.exists():
        diversity = pd.read_csv(diversity_path)
        if len(diversity):
            section, extra = _diversity_section(diversity, num_heads, run_dir)
            lines += section
            figures += extra
    path = run_dir / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def _curves_section(results_all: Any, grid: Any, suite: Any, run_dir: Path, figures: list[Path]) -> list[str]:
    from efficient_attn.quality import plots
    from efficient_attn.quality.tasks import TASKS

    knobs, task_curves = curve_tables(results_all, suite)
    if knobs.empty and task_curves.empty:
        return []
    task = suite.tasks[0]
    info = TASKS[task]
    chance = 1 / info.num_classes if info.kind == "lm" else None
    seq_len = min(suite.lengths)
    full = grid[(grid["variant"] == "full") & (grid["status"] == "ok") & (grid["task"] == task)
                & (grid["seq_len"] == seq_len)]
    ceiling = (float(full["accuracy"].mean()), float(full["accuracy"].std()) if len(full) > 1 else float("nan")) \
        if len(full) else None
    lines = ["## State-size curves", "",
             "Accuracy against each variant's own capacity knob (zoology, Arora et al. 2023, arXiv:2312.04927, "
             "fig. 2), every point the mean ± std over seeds, every seed listed; `full` (no knob) is the ceiling"
             + (f": {_pct(ceiling[0])}" + ("" if ceiling[1] != ceiling[1] else f" ± {_pct(ceiling[1])}")
                + f"% over {len(full)} seeds" if ceiling else "") + "."
             + (f" Chance is {_pct(chance)}%." if chance else ""), ""]
    for title, table in (("knob", knobs), ("task parameter", task_curves)):
        if table.empty:
            continue
        lines += [f"| variant | {title} | value | accuracy (%) | seeds | per seed (%) | train CPU s |",
                  "|---|---|---|---|---|---|---|"]
        for r in table.itertuples():
            if r.status != "ok":
                lines.append(f"| {r.label} | {r.param} | {r.value} | {r.status}: {r.note} | 0 | | |")
                continue
            std = "" if r.std != r.std else f" ± {100 * r.std:.1f}"
            lines.append(f"| {r.label} | {r.param} | {r.value} | {100 * r.mean:.1f}{std} | {r.n} | "
                         f"{' / '.join(f'{100 * a:.1f}' for a in r.accuracies)} | {r.train_cpu_s:.1f} |")
        lines.append("")
    # the separation, in words: each variant's smallest and largest knob against the ceiling
    if ceiling is not None and not knobs.empty:
        for variant, part in knobs[knobs["status"] == "ok"].groupby("variant", sort=False):
            part = part.sort_values("value")
            low, high = part.iloc[0], part.iloc[-1]
            lines.append(f"- {variant}: {100 * low['mean']:.1f}% at {low['param']} = {low['value']} "
                         f"({100 * (ceiling[0] - low['mean']):.1f} points below full), {100 * high['mean']:.1f}% at "
                         f"{high['value']}.")
        lines.append("")
    shown_knobs = knobs[(knobs["status"] == "ok")] if not knobs.empty else knobs
    if not shown_knobs.empty:
        figures.append(plots.state_size_curves(shown_knobs, run_dir / "state_size_curves.png", ceiling=ceiling,
                                               chance=chance))
        lines += ["![state-size curves](state_size_curves.png)", ""]
    shown_tasks = task_curves[task_curves["status"] == "ok"] if not task_curves.empty else task_curves
    if not shown_tasks.empty:
        figures.append(plots.pairs_curve(shown_tasks, run_dir / "pairs_curve.png", chance=chance))
        lines += ["![accuracy vs pairs](pairs_curve.png)", ""]
    unsupported = grid[grid["status"] == "unsupported"].drop_duplicates(["variant"])
    for r in unsupported.itertuples():
        lines.append(f"- {r.variant}: no curve ({r.note}).")
    if len(unsupported):
        lines.append("")
    return lines


def _heads_section(results_all: Any, suite: Any, run_dir: Path, figures: list[Path]) -> list[str]:
    from efficient_attn.quality import plots

    table = heads_table(results_all, suite)
    if table.empty:
        return []
    sweep = suite.heads_sweep
    stall = stall_point(table)
    lines = ["## How many heads help?", "",
             f"`{sweep.variant}` on {sweep.task} at {sweep.seq_len} tokens, width {suite.train.dim} fixed (so more "
             "heads are narrower heads), every head count trained with each seed. Similarity: mean pairwise cosine "
             "of the heads' outputs (through their slice of the output projection) and of their attention maps, "
             "mean over layers, on 16 held-out rows. Importance: each head zeroed alone at evaluation (Michel et al. "
             "2019, arXiv:1905.10650); a head is important when removing it costs more than one point.", "",
             "| heads | accuracy (%) | per seed (%) | output cosine | map cosine | important heads | largest drop "
             "(points) |", "|---|---|---|---|---|---|---|"]
    for r in table.itertuples():
        std = "" if r.acc_std != r.acc_std else f" ± {100 * r.acc_std:.1f}"
        cos = "" if r.output_cosine != r.output_cosine else f"{r.output_cosine:.2f}"
        maps = "" if r.map_cosine != r.map_cosine else f"{r.map_cosine:.2f}"
        lines.append(f"| {r.num_heads} | {100 * r.acc_mean:.1f}{std} | "
                     f"{' / '.join(f'{100 * a:.1f}' for a in r.accuracies)} | {cos} | {maps} | "
                     f"{r.important_heads:.1f} | {100 * r.max_drop:.1f} |")
    lines += ["", heads_paragraph(table, sweep.variant), ""]
    figures.append(plots.heads_figure(table, run_dir / "heads.png", variant=sweep.variant, stall=stall))
    lines += ["![heads](heads.png)", ""]
    return lines


def recall_guess_baseline(seq_len: int, rows: int = 256) -> float:
    """The no-retrieval guess accuracy of the recall task on the held-out stream of seed 0 at ``seq_len``."""
    from efficient_attn.quality.tasks import TASKS, recall_guess_accuracy
    from efficient_attn.quality.train import eval_seed

    batch = TASKS["recall"].generate(rows, seq_len, eval_seed(0))
    return recall_guess_accuracy(batch.tokens, batch.labels)


def _error_section(errors: Any) -> list[str]:
    lines = ["## Approximation error against full attention", "",
             "Relative error ||y - y_full|| / ||y_full|| of each variant's core on the same q, k, v: random Gaussian "
             "inputs (all variants, untrained parameters), and the q, k, v each trained model's layers produce "
             "(its own trained core; mean over layers; padded queries ignored). Exact sparse variants are exact on "
             "their pattern: their error comes only from the pairs outside it. On random inputs full attention is "
             "nearly uniform, so y_full is a small average and a variant that concentrates attention (a narrow "
             "window) can exceed 1; trained activations are the realistic case.", ""]
    ok = errors[errors["status"] == "ok"]
    table = ok.groupby(["source", "task", "variant", "seq_len"], dropna=False)["rel_error"].mean().reset_index()
    table["task"] = table["task"].fillna("")
    table["col"] = table.apply(
        lambda r: f"{r['source']}{' ' + r['task'] if r['task'] else ''} n={r['seq_len']}", axis=1
    )
    pivot = table.pivot(index="variant", columns="col", values="rel_error")
    cols = list(pivot.columns)
    lines += ["| variant | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for variant, r in pivot.iterrows():
        lines.append(f"| {variant} | " + " | ".join("" if math.isnan(v) else f"{v:.3f}" for v in r.values) + " |")
    failed = errors[errors["status"] != "ok"]
    for _, r in failed.iterrows():
        lines.append(f"\n- {r['variant']} n={r['seq_len']} ({r['source']}): {r['status']} -- {r['note']}")
    lines.append("")
    return lines


def _diversity_section(diversity: Any, num_heads: int, run_dir: Path) -> tuple[list[str], list[Path]]:
    from efficient_attn.quality import plots

    lines = ["## Head diversity", "",
             "Pairwise cosine similarity between heads, per layer, on held-out examples: of their outputs (each head's "
             "output through its slice of the output projection, so all heads share coordinates) and of their "
             "attention maps (exact variants only; low-rank and kernel variants define no n x n map). "
             "1 = identical heads, 0 = orthogonal. The table gives the mean over head pairs (off-diagonal).", ""]
    off = diversity[diversity["head_i"] != diversity["head_j"]]
    main = off[off["num_heads"] == num_heads]
    summary = main.groupby(["task", "variant", "seq_len", "kind", "layer"])["cosine"].mean().reset_index()
    lines += ["| task | variant | length | layer | outputs | maps |", "|---|---|---|---|---|---|"]
    wide = summary.pivot_table(index=["task", "variant", "seq_len", "layer"], columns="kind", values="cosine")
    for (task, variant, seq_len, layer), r in wide.iterrows():
        out_v = r.get("output", float("nan"))
        map_v = r.get("map", float("nan"))
        lines.append(f"| {task} | {variant} | {seq_len} | {layer} | {'' if math.isnan(out_v) else f'{out_v:.2f}'} | "
                     f"{'' if math.isnan(map_v) else f'{map_v:.2f}'} |")
    lines.append("")
    figures: list[Path] = []
    # Finding in words
    outputs = summary[summary["kind"] == "output"]["cosine"]
    maps = summary[summary["kind"] == "map"]["cosine"]
    if len(outputs):
        lines.append(
            f"**Finding.** Across the trained models, heads' outputs have a mean pairwise cosine similarity of "
            f"{outputs.mean():.2f} (range {outputs.min():.2f} to {outputs.max():.2f} over models and layers)"
            + (f", and their attention maps {maps.mean():.2f} (range {maps.min():.2f} to {maps.max():.2f})"
               if len(maps) else "")
            + ". " + _words(outputs.mean(), maps.mean() if len(maps) else float("nan"))
        )
        lines.append("")
    # Heat map of one model: full on the first task at the shortest length
    pick = diversity[(diversity["num_heads"] == num_heads)]
    if len(pick) and num_heads > 1:  # one head has no pair: its 1 x 1 self-similarity says nothing
        first = pick.sort_values(["seq_len"]).iloc[0]
        variant = "full" if "full" in set(pick["variant"]) else first["variant"]
        task = sorted(pick[pick["variant"] == variant]["task"].unique())[0]
        seq_len = int(pick[(pick["variant"] == variant) & (pick["task"] == task)]["seq_len"].min())
        one = pick[(pick["variant"] == variant) & (pick["task"] == task) & (pick["seq_len"] == seq_len)]
        figures.append(plots.head_similarity_heatmap(
            one, run_dir / "head_similarity.png",
            title=f"head similarity: {variant} on {task}, n = {seq_len}, {num_heads} heads (seed 0)"))
        lines += ["![head similarity](head_similarity.png)", ""]
    # Versus number of heads
    counts = sorted(off["num_heads"].unique())
    if len(counts) > 1:
        sweep_keys = off.groupby(["task", "variant", "seq_len"])["num_heads"].nunique()
        task, variant, seq_len = sweep_keys.idxmax()
        sweep = off[(off["task"] == task) & (off["variant"] == variant) & (off["seq_len"] == seq_len)]
        by_heads = sweep.groupby(["num_heads", "layer", "kind"])["cosine"].mean().reset_index(name="mean_cos")
        figures.append(plots.similarity_vs_heads(
            by_heads, run_dir / "similarity_vs_heads.png",
            title=f"head similarity vs number of heads: {variant} on {task}, n = {seq_len}", variant=variant))
        trend = by_heads[by_heads["kind"] == "output"].groupby("num_heads")["mean_cos"].mean()
        lines += ["How it changes with the number of heads (model width fixed, so more heads = smaller heads): "
                  "mean output similarity " + ", ".join(f"{h} heads {v:.2f}" for h, v in trend.items())
                  + " (one head has no pair to compare).", "",
                  "![similarity vs heads](similarity_vs_heads.png)", ""]
    return lines, figures


def _words(output_mean: float, map_mean: float) -> str:
    if output_mean > 0.7:
        text = "Heads are largely redundant: they write nearly the same thing into the residual stream."
    elif output_mean > 0.3:
        text = "Heads overlap partly: related, but not copies of each other."
    else:
        text = "Heads are diverse: their contributions are close to orthogonal, each writes something different."
    if not math.isnan(map_mean):
        text += (" Their attention maps overlap more than their outputs do, so heads that look at the same places "
                 "still extract different features." if map_mean > output_mean else
                 " Their attention maps overlap less than their outputs, so heads looking at different places still "
                 "write related content.")
    return text
