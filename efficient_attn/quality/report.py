"""The quality report: ``report.md`` plus figures, from a quality run folder.

Reads ``results.csv`` (training cells), ``errors.csv`` and ``diversity.csv`` (from
:func:`efficient_attn.quality.suite.run_metrics`) and writes, next to them, ``report.md`` and ``*.png``.

Rules applied in the text:

* accuracy is reported as mean +/- std over seeds, beside the majority-class baseline;
* a task *counts* only where ``full`` beats the majority baseline by at least :data:`COUNT_MARGIN` (20 points) at
  that length; otherwise the report says so and its accuracies are shown but not interpreted.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

__all__ = ["COUNT_MARGIN", "task_validity", "write_report", "recall_guess_baseline"]

#: ``full`` must beat the majority-class baseline by this much (accuracy fraction) for a task to count.
COUNT_MARGIN = 0.20


def _pct(x: float) -> str:
    return "" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.1f}"


def _mib(x: float) -> str:
    return "" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x / 2**20:.1f}"


def task_validity(results: Any) -> dict[tuple[str, int], tuple[bool, float, float]]:
    """Per ``(task, seq_len)``: (counts, full mean accuracy, majority accuracy). ``results``: default-head rows."""
    validity = {}
    ok = results[results["status"] == "ok"]
    for (task, seq_len), part in ok.groupby(["task", "seq_len"]):
        majority = float(part["majority_accuracy"].mean())
        full = part[part["variant"] == "full"]["accuracy"]
        full_acc = float(full.mean()) if len(full) else float("nan")
        counts = bool(len(full)) and full_acc - majority >= COUNT_MARGIN
        validity[(task, int(seq_len))] = (counts, full_acc, majority)
    return validity


def write_report(run_dir: str | Path, *, num_heads: int | None = None) -> Path:
    """Write ``report.md`` and the figures into ``run_dir``; returns the report path.

    ``num_heads``: the head count of the main grid (default: the most common one in ``results.csv``); rows with
    other head counts are the heads sweep and only feed the head-diversity section.
    """
    import pandas as pd

    from efficient_attn.quality import plots

    run_dir = Path(run_dir)
    results_all = pd.read_csv(run_dir / "results.csv", keep_default_na=True)
    if results_all.empty:
        raise ValueError(f"{run_dir}/results.csv has no rows")
    if num_heads is None:
        num_heads = int(results_all["num_heads"].mode().iloc[0])
    results = results_all[results_all["num_heads"] == num_heads]
    lines = ["# Quality report: how good is each attention variant?", ""]
    first = results.iloc[0]
    lines += [
        f"Backbone: `build_model(task=\"classify\")`, dim {first['dim']}, depth {first['depth']}, {num_heads} heads; "
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
              f"{100 * COUNT_MARGIN:.0f} points. For recall a second baseline matters: a model whose attention never "
              "links the query to the pairs can still guess among the values present (about 1 / number of pairs); "
              "only accuracy above that *guess* column is real long-range retrieval.", "",
              "| task | length | full accuracy | majority baseline | guess baseline | counts |",
              "|---|---|---|---|---|---|"]
    for (task, seq_len), (counts, full_acc, majority) in sorted(validity.items()):
        guess = _pct(recall_guess_baseline(seq_len)) if task == "recall" else ""
        lines.append(f"| {task} | {seq_len} | {_pct(full_acc)} | {_pct(majority)} | {guess} | "
                     f"{'yes' if counts else '**no**'} |")
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
                  f"{100 * COUNT_MARGIN:.0f} points within the budget, so differences between variants there say "
                  "nothing about long-range ability (they are shown, not interpreted).", ""]
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
    if len(ok):
        figures.append(plots.lra_chart(results, run_dir / "lra_chart.png"))
        figures.append(plots.accuracy_vs_length(results, run_dir / "accuracy_vs_length.png"))
        lines += ["![speed vs accuracy vs memory](lra_chart.png)", "", "![accuracy vs length](accuracy_vs_length.png)",
                  ""]
    # ---- errors
    errors_path = run_dir / "errors.csv"
    if errors_path.exists():
        errors = pd.read_csv(errors_path)
        lines += _error_section(errors)
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
    if len(pick):
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
