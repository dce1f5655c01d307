"""State-size curves: accuracy against a variant's own capacity knob, or against the task's difficulty, over seeds.

Zoology (Arora et al. 2023, arXiv:2312.04927, figure 2) plots MQAR accuracy against the model's state size: attention
solves the task at every size, while a model whose state is smaller than what the pairs need falls off. Here each
efficient variant's state is its own knob (:data:`KNOBS`): the window's reach, BigBird's block size, Longformer's
window, Performer's random features; :func:`run_curve` trains the variant at each knob value for several seeds and
returns one tidy row per point (mean and sample std over seeds, and every seed's accuracy), and :func:`run_point`
gives a single point (e.g. ``full``, the ceiling, which has no knob). Sweeping a task parameter instead
(``where="task"``, e.g. ``num_pairs`` at a fixed knob) gives zoology's accuracy-against-pairs curve.

Non-causal variants on an LM task: Linformer (Wang et al. 2020) projects keys and values along the sequence axis and
Nystromformer (Xiong et al. 2021) builds landmarks from segment means of the whole sequence, so position ``t`` of
either would read tokens after ``t``; on a causal LM task such as ``mqar`` that leaks the answer token that follows
each query, so their points are ``status="unsupported"`` with the registry's reason, never a number. (MQAR posed
bidirectionally -- the answer token blanked and every variant, ``full`` included, run as an encoder with a per-token
head -- would admit them, but the backbone has no per-token encoder head: ``model.py`` offers ``lm`` and pooled
``classify`` only.)
"""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import dataclass, field
from typing import Any, Callable

from efficient_attn.quality.tasks import TASKS
from efficient_attn.quality.train import TrainConfig, TrainResult, train_and_evaluate
from efficient_attn.registry import build_config, get_spec

__all__ = ["Knob", "KNOBS", "CURVE_COLUMNS", "MQAR_SEQ_LEN", "MQAR_TRAIN", "run_point", "run_curve"]

#: The calibrated MQAR setting (``reports/quality/mqar_calibration.md``): 64 tokens with the task's default
#: difficulty (4 pairs over 16 keys, 16 values, every pair queried once), and this backbone and budget. One
#: 64-wide head: at this budget 2 or 4 heads of the same width stayed on the "guess a value not yet asked"
#: plateau (~52%) where one head found the lookup; batch 64: with batch 32 one seed in three stayed on that plateau
#: for 2,000 steps, with 64 the same seed left it after ~250.
MQAR_SEQ_LEN = 64
MQAR_TRAIN = TrainConfig(
    dim=64,
    depth=2,
    num_heads=1,
    batch_size=64,
    steps=1000,
    lr=3e-3,
    weight_decay=0.01,
    warmup_steps=50,
    eval_size=256,
    positional="sinusoidal",
)


@dataclass(frozen=True)
class Knob:
    """A variant's capacity knob: the attention parameter ``param`` swept, with ``fixed`` parameters held."""

    variant: str
    param: str
    fixed: dict[str, Any] = field(default_factory=dict)
    meaning: str = ""


#: The capacity knob of each efficient variant (what grows its "state").
KNOBS: dict[str, Knob] = {
    "window": Knob("window", "window_size", {}, "one-sided reach w: a query sees the w previous tokens"),
    "longformer": Knob("longformer", "window_size", {"global_tokens": 1}, "window reach, plus token 0 global"),
    "bigbird": Knob(
        "bigbird",
        "block_size",
        {"num_window_blocks": 1, "num_random_blocks": 1, "num_global_blocks": 1},
        "block size b: own block, one random block and the first block, 3b keys per query",
    ),
    "performer": Knob("performer", "num_features", {}, "random features m of the softmax-kernel estimate"),
    "linformer": Knob("linformer", "k", {}, "projected length k (non-causal)"),
    "nystrom": Knob("nystrom", "num_landmarks", {}, "landmarks m (non-causal)"),
}

#: Columns of a curve row, in order.
CURVE_COLUMNS = [
    "task",
    "variant",
    "knob",
    "value",
    "seq_len",
    "attention_params",
    "task_params",
    "status",
    "note",
    "seeds",
    "accuracy_mean",
    "accuracy_std",
    "accuracies",
    "majority_accuracy",
    "train_s_mean",
]

Trainer = Callable[..., TrainResult]


def _unsupported_reason(variant: str, task: str) -> str | None:
    spec = get_spec(variant)
    if TASKS[task].kind == "lm" and not spec.supports_causal:
        return f"{variant} cannot be causal ({spec.module_cls.causal_unsupported_reason}); {task} is a causal LM task"
    return None


def run_point(
    variant: str,
    *,
    seq_len: int,
    config: TrainConfig,
    seeds: int = 3,
    task: str = "mqar",
    attention_params: dict[str, Any] | None = None,
    task_params: dict[str, Any] | None = None,
    knob: str = "",
    value: Any = None,
    trainer: Trainer = train_and_evaluate,
) -> dict[str, Any]:
    """Train ``variant`` with seeds ``0 .. seeds-1`` and return one curve row (see :data:`CURVE_COLUMNS`).

    ``status`` is ``ok``; ``unsupported`` (a non-causal variant on an LM task; no training); or ``error`` (a
    parameter the variant's config refuses, or a failure while training; the message is the ``note``).
    ``accuracy_std`` is the sample standard deviation over seeds (NaN for one seed).
    """
    if task not in TASKS:
        raise KeyError(f"unknown task {task!r}; choose from {', '.join(TASKS)}")
    if isinstance(seeds, bool) or not isinstance(seeds, int) or seeds < 1:
        raise ValueError(f"seeds must be a positive int, got {seeds!r}")
    params = dict(attention_params or {})
    row: dict[str, Any] = {
        "task": task,
        "variant": variant,
        "knob": knob,
        "value": value,
        "seq_len": seq_len,
        "attention_params": json.dumps(params, sort_keys=True),
        "task_params": json.dumps(task_params or {}, sort_keys=True),
        "status": "ok",
        "note": "",
        "seeds": 0,
        "accuracy_mean": math.nan,
        "accuracy_std": math.nan,
        "accuracies": "[]",
        "majority_accuracy": math.nan,
        "train_s_mean": math.nan,
    }
    reason = _unsupported_reason(variant, task)
    if reason is not None:
        row.update(status="unsupported", note=reason)
        return row
    results = []
    try:
        spec = get_spec(variant)
        checked = dict(params)
        if spec.max_len_field is not None:
            checked.setdefault(spec.max_len_field, seq_len)
        build_config(variant, dim=config.dim, num_heads=config.num_heads, **checked)  # bad knob value: error row
        for seed in range(seeds):
            results.append(trainer(variant, task, seq_len, seed, config, params, task_params=task_params))
    except (ValueError, TypeError, RuntimeError) as exc:
        row.update(status="error", note=f"{type(exc).__name__}: {exc}")
        return row
    accuracies = [r.accuracy for r in results]
    row.update(
        seeds=len(results),
        accuracy_mean=statistics.fmean(accuracies),
        accuracy_std=statistics.stdev(accuracies) if len(accuracies) > 1 else math.nan,
        accuracies=json.dumps([round(a, 6) for a in accuracies]),
        majority_accuracy=statistics.fmean(r.majority_accuracy for r in results),
        train_s_mean=statistics.fmean(r.train_s for r in results),
    )
    return row


def run_curve(
    variant: str,
    values: list[Any],
    *,
    seq_len: int,
    config: TrainConfig,
    param: str | None = None,
    where: str = "attention",
    seeds: int = 3,
    task: str = "mqar",
    attention_params: dict[str, Any] | None = None,
    task_params: dict[str, Any] | None = None,
    trainer: Trainer = train_and_evaluate,
    on_row: Callable[[dict[str, Any]], None] | None = None,
) -> list[dict[str, Any]]:
    """One row per value of the swept parameter (each the mean +- std of ``seeds`` seeds), in the order given.

    Args:
        variant: registry key.
        values: the parameter's values, e.g. ``[4, 8, 16, 32, 64]``.
        param: the swept parameter; default the variant's capacity knob (:data:`KNOBS`), whose ``fixed``
            parameters are then added under ``attention_params``.
        where: ``"attention"`` (``param`` is an attention parameter) or ``"task"`` (a task-generator parameter,
            e.g. ``num_pairs``: accuracy against difficulty at a fixed knob).
        seq_len, config, seeds, task: as in :func:`run_point`; attention_params, task_params: held fixed.
        trainer: the training function (``train_and_evaluate``; tests may pass a cheaper one).
        on_row: called with each row as it is done (to print or append to a file).
    """
    if where not in ("attention", "task"):
        raise ValueError(f"where must be 'attention' or 'task', got {where!r}")
    if not values:
        raise ValueError("run_curve needs at least one value")
    base_attention = dict(attention_params or {})
    if param is None:
        if where == "task":
            raise ValueError("where='task' needs the task parameter to sweep (param=...)")
        if variant not in KNOBS:
            raise ValueError(f"{variant!r} has no capacity knob; pass param=..., knobs exist for {sorted(KNOBS)}")
        param = KNOBS[variant].param
        base_attention = {**KNOBS[variant].fixed, **base_attention}
    rows = []
    for value in values:
        attention = dict(base_attention)
        task_kw = dict(task_params or {})
        (attention if where == "attention" else task_kw)[param] = value
        row = run_point(
            variant,
            seq_len=seq_len,
            config=config,
            seeds=seeds,
            task=task,
            attention_params=attention,
            task_params=task_kw,
            knob=param,
            value=value,
            trainer=trainer,
        )
        rows.append(row)
        if on_row is not None:
            on_row(row)
    return rows
