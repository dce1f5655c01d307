"""The resumable quality sweep: tasks x variants x lengths x seeds (+ a head-count sweep), one tidy CSV row per cell.

A suite is a TOML file (``bench/quality/default.toml``)::

    description = "..."
    tasks = ["recall", "listops"]
    variants = "all"              # or a list of registry keys
    lengths = [256, 512]
    seeds = 3                     # seeds 0 .. seeds-1
    error_lengths = [256, 512, 1024]   # approximation error on random inputs
    [train]                       # fields of TrainConfig
    dim = 64
    steps = 150
    [params]                      # per-variant attention parameters
    window = { window_size = 32 }
    [heads_sweep]                 # optional: one variant/task/length trained with other head counts
    variant = "full"
    task = "recall"
    seq_len = 256
    num_heads = [1, 2, 8]

Running writes into ``out``: ``results.csv`` (one row per training cell, appended and flushed per cell),
``meta.json`` (the suite; resuming with a different suite is an error), ``models/`` (the seed-0 trained weights, which
the metrics use). Resuming skips every cell that already has a row, so a rerun never duplicates one.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from efficient_attn.quality.tasks import TASKS
from efficient_attn.quality.train import TrainConfig, build_task_model, train_and_evaluate
from efficient_attn.registry import build_config, get_spec, list_attentions

__all__ = [
    "QualitySuite",
    "Cell",
    "load_suite",
    "plan_cells",
    "run_suite",
    "run_metrics",
    "RESULT_COLUMNS",
    "model_path",
]

KEY_COLUMNS = ["task", "variant", "params_json", "seq_len", "seed", "num_heads"]
RESULT_COLUMNS = KEY_COLUMNS + [
    "dim",
    "depth",
    "batch_size",
    "steps_budget",
    "status",
    "note",
    "accuracy",
    "majority_accuracy",
    "steps",
    "train_s",
    "train_cpu_s",
    "steps_per_s",
    "peak_mem_bytes",
    "final_loss",
    "cell_s",
    "cell_cpu_s",
]
STATUSES = ("ok", "unsupported", "error")


@dataclass(kw_only=True)
class HeadsSweep:
    """Extra cells: ``variant`` on ``task`` at ``seq_len`` trained with each of ``num_heads``, seed 0 only (head
    diversity is measured on the seed-0 models)."""

    variant: str
    task: str
    seq_len: int
    num_heads: list[int]


@dataclass(kw_only=True)
class QualitySuite:
    """A quality suite; see the module docstring for the TOML form."""

    description: str = ""
    tasks: list[str] = field(default_factory=lambda: list(TASKS))
    variants: list[str] = field(default_factory=list)
    lengths: list[int] = field(default_factory=lambda: [256])
    seeds: int = 1
    error_lengths: list[int] = field(default_factory=lambda: [256, 512, 1024])
    train: TrainConfig = field(default_factory=TrainConfig)
    params: dict[str, dict[str, Any]] = field(default_factory=dict)
    heads_sweep: HeadsSweep | None = None

    def __post_init__(self) -> None:
        for task in self.tasks:
            if task not in TASKS:
                raise ValueError(f"unknown task {task!r} in suite; choose from {', '.join(TASKS)}")
        if not self.tasks:
            raise ValueError("suite tasks is empty")
        if not self.variants:
            self.variants = list_attentions()
        for key in self.variants:
            get_spec(key)  # KeyError naming the nearest key
        for name in ("lengths", "error_lengths"):
            values = getattr(self, name)
            if not values or any(isinstance(n, bool) or not isinstance(n, int) or n < 16 for n in values):
                raise ValueError(f"suite {name} must be a non-empty list of ints >= 16, got {values!r}")
        if isinstance(self.seeds, bool) or not isinstance(self.seeds, int) or self.seeds < 1:
            raise ValueError(f"suite seeds must be a positive int, got {self.seeds!r}")
        # Fail fast on a misspelt or invalid parameter of any variant that will run.
        for key in self.variants:
            self.validate_params(key, self.train.num_heads)
        if self.heads_sweep is not None:
            sweep = self.heads_sweep
            if sweep.task not in TASKS:
                raise ValueError(f"heads_sweep.task {sweep.task!r} unknown; choose from {', '.join(TASKS)}")
            get_spec(sweep.variant)
            for heads in sweep.num_heads:
                if self.train.dim % heads:
                    raise ValueError(f"heads_sweep.num_heads {heads} does not divide train.dim {self.train.dim}")
                self.validate_params(sweep.variant, heads)

    def validate_params(self, key: str, num_heads: int) -> None:
        params = dict(self.params.get(key, {}))
        spec = get_spec(key)
        if spec.max_len_field is not None:
            params.setdefault(spec.max_len_field, max(self.lengths))
        build_config(key, dim=self.train.dim, num_heads=num_heads, **params)

    def unused_params(self) -> list[str]:
        """Keys in ``params`` that name no variant of this run (reported, never silently dropped)."""
        return sorted(set(self.params) - set(self.variants))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class Cell:
    """One training run: the key columns of its result row."""

    task: str
    variant: str
    params_json: str
    seq_len: int
    seed: int
    num_heads: int

    def key(self) -> tuple[str, ...]:
        return tuple(str(getattr(self, c)) for c in KEY_COLUMNS)


def load_suite(path: str | Path, **overrides: Any) -> QualitySuite:
    """Read a suite TOML; ``overrides`` (non-None values) replace top-level fields, ``steps``/``budget_s`` the
    training budget. Unknown keys in the file are an error naming them."""
    with open(path, "rb") as handle:
        raw = tomllib.load(handle)
    allowed = {f.name for f in dataclasses.fields(QualitySuite)}
    unknown = sorted(set(raw) - allowed)
    if unknown:
        raise ValueError(f"unknown keys {unknown} in quality suite {path}; allowed: {sorted(allowed)}")
    train_fields = dict(raw.pop("train", {}))
    for name in ("steps", "budget_s"):
        if overrides.get(name) is not None:
            train_fields[name] = overrides.pop(name)
        overrides.pop(name, None)
    train_allowed = {f.name for f in dataclasses.fields(TrainConfig)}
    bad = sorted(set(train_fields) - train_allowed)
    if bad:
        raise ValueError(f"unknown [train] keys {bad} in {path}; allowed: {sorted(train_allowed)}")
    variants = raw.pop("variants", "all")
    if variants == "all":
        variants = []
    elif not isinstance(variants, list):
        raise ValueError(f"suite variants must be \"all\" or a list of keys, got {variants!r}")
    sweep = raw.pop("heads_sweep", None)
    fields_: dict[str, Any] = {**raw, "variants": variants, "train": TrainConfig(**train_fields)}
    if sweep is not None:
        fields_["heads_sweep"] = HeadsSweep(**sweep)
    for name, value in overrides.items():
        if value is None:
            continue
        if name not in allowed:
            raise ValueError(f"unknown suite override {name!r}")
        fields_[name] = value
    return QualitySuite(**fields_)


def plan_cells(suite: QualitySuite) -> list[Cell]:
    """Every training cell of the suite, in run order (cheap lengths first so partial runs are still useful)."""
    cells = []
    for seq_len in sorted(suite.lengths):
        for seed in range(suite.seeds):
            for task in suite.tasks:
                for key in suite.variants:
                    params = json.dumps(suite.params.get(key, {}), sort_keys=True)
                    cells.append(Cell(task, key, params, seq_len, seed, suite.train.num_heads))
    sweep = suite.heads_sweep
    if sweep is not None:
        params = json.dumps(suite.params.get(sweep.variant, {}), sort_keys=True)
        for heads in sweep.num_heads:
            cell = Cell(sweep.task, sweep.variant, params, sweep.seq_len, 0, heads)
            if cell not in cells:
                cells.append(cell)
    return cells


def model_path(out: Path, cell: Cell) -> Path:
    """Where the weights of a seed-0 cell are kept."""
    return out / "models" / f"{cell.task}__{cell.variant}__n{cell.seq_len}__h{cell.num_heads}.pt"


def read_rows(path: Path) -> list[dict[str, str]]:
    if not path.exists():
        return []
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def _check_meta(out: Path, suite: QualitySuite) -> None:
    meta_path = out / "meta.json"
    config = json.loads(json.dumps(suite.to_dict()))
    # The cell list may grow or shrink between resumes (more seeds, fewer variants); the training setup may not.
    fixed = {"train": config["train"], "params": config["params"]}
    if meta_path.exists():
        old = json.loads(meta_path.read_text())
        old_fixed = {"train": old["suite"]["train"], "params": old["suite"]["params"]}
        if old_fixed != fixed:
            raise ValueError(
                f"{out} holds a quality run with a different training setup or variant params; "
                f"use a new --out (old: {old_fixed}, new: {fixed})"
            )
    meta_path.write_text(
        json.dumps(
            {"suite": config, "torch": torch.__version__, "threads": torch.get_num_threads(),
             "unused_params": suite.unused_params()},
            indent=2,
        )
    )


def _train_config(suite: QualitySuite, cell: Cell) -> TrainConfig:
    return dataclasses.replace(suite.train, num_heads=cell.num_heads)


def run_cell(suite: QualitySuite, cell: Cell, out: Path, save_model: bool) -> dict[str, Any]:
    """Train and evaluate one cell; returns its result row (status ``unsupported``/``error`` with a note when it
    cannot run)."""
    config = _train_config(suite, cell)
    row: dict[str, Any] = {c: getattr(cell, c) for c in KEY_COLUMNS}
    row.update(dim=config.dim, depth=config.depth, batch_size=config.batch_size, steps_budget=config.steps)
    spec = get_spec(cell.variant)
    needs_padding = cell.task == "listops"
    if needs_padding and not spec.supports_key_padding:
        row.update(status="unsupported", note=f"{cell.variant} does not support key_padding_mask ({cell.task} pads)")
        return row
    started, cpu_started = time.perf_counter(), time.process_time()
    try:
        result = train_and_evaluate(
            cell.variant, cell.task, cell.seq_len, cell.seed, config, json.loads(cell.params_json)
        )
    except (ValueError, TypeError, RuntimeError) as exc:
        row.update(status="error", note=f"{type(exc).__name__}: {exc}")
        return row
    row.update(
        status="ok",
        note="",
        accuracy=result.accuracy,
        majority_accuracy=result.majority_accuracy,
        steps=result.steps,
        train_s=round(result.train_s, 3),
        train_cpu_s=round(result.train_cpu_s, 3),
        steps_per_s=result.steps_per_s,
        peak_mem_bytes=result.peak_mem_bytes,
        final_loss=result.final_loss,
        cell_s=round(time.perf_counter() - started, 3),
        cell_cpu_s=round(time.process_time() - cpu_started, 3),
    )
    if save_model:
        path = model_path(out, cell)
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(result.model.state_dict(), path)
    return row


def load_trained_model(suite: QualitySuite, cell: Cell, out: Path) -> torch.nn.Module:
    """Rebuild a saved seed-0 model (eval mode)."""
    config = _train_config(suite, cell)
    model = build_task_model(cell.variant, cell.task, cell.seq_len, config, json.loads(cell.params_json))
    model.load_state_dict(torch.load(model_path(out, cell), weights_only=True))
    return model.eval()


def run_suite(
    suite: QualitySuite,
    out: str | Path,
    *,
    progress: bool = True,
    on_row: Callable[[dict[str, Any]], None] | None = None,
) -> Path:
    """Run every unfinished cell of ``suite`` into ``out``; returns the path of ``results.csv``."""
    from tqdm import tqdm

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    _check_meta(out, suite)
    results = out / "results.csv"
    done = {tuple(r[c] for c in KEY_COLUMNS) for r in read_rows(results)}
    todo = [c for c in plan_cells(suite) if c.key() not in done]
    new_file = not results.exists()
    with open(results, "a", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=RESULT_COLUMNS)
        if new_file:
            writer.writeheader()
            handle.flush()
        bar = tqdm(todo, desc="quality", unit="cell", disable=not progress)
        for cell in bar:
            bar.set_postfix_str(f"{cell.task} {cell.variant} n={cell.seq_len} s={cell.seed} h={cell.num_heads}")
            row = run_cell(suite, cell, out, save_model=cell.seed == 0)
            writer.writerow({c: _fmt(row.get(c)) for c in RESULT_COLUMNS})
            handle.flush()
            if on_row is not None:
                on_row(row)
    return results


def _fmt(value: Any) -> Any:
    if value is None:
        return ""
    if isinstance(value, float):
        return "" if math.isnan(value) else f"{value:.6g}"
    return value


def run_metrics(
    suite: QualitySuite, out: str | Path, *, eval_rows: int = 4, progress: bool = True
) -> tuple[Path, Path]:
    """Approximation error and head diversity for a finished (or partial) run; writes ``errors.csv`` and
    ``diversity.csv`` in ``out`` (recomputed on every call: they derive from the saved seed-0 models).

    Errors: every variant on random inputs at ``suite.error_lengths``, and every saved model's own cores on the
    q, k, v its layers produce for ``eval_rows`` held-out examples. Diversity: every saved model, per layer.
    """
    from tqdm import tqdm

    from efficient_attn.quality.metrics import head_diversity, random_input_errors, trained_errors
    from efficient_attn.quality.train import eval_seed

    out = Path(out)
    heads = suite.train.num_heads
    error_rows = random_input_errors(
        suite.variants, suite.error_lengths, suite.params, num_heads=heads, head_dim=suite.train.dim // heads
    )
    diversity_rows: list[dict[str, Any]] = []
    finished = {
        tuple(r[c] for c in KEY_COLUMNS)
        for r in read_rows(out / "results.csv")
        if r["status"] == "ok" and r["seed"] == "0"
    }
    cells = [c for c in plan_cells(suite) if c.seed == 0 and c.key() in finished and model_path(out, c).exists()]
    for cell in tqdm(cells, desc="metrics", unit="model", disable=not progress):
        model = load_trained_model(suite, cell, out)
        batch = TASKS[cell.task].generate(eval_rows, cell.seq_len, eval_seed(0))
        padding = None if bool(batch.key_padding_mask.all()) else batch.key_padding_mask
        if cell.num_heads == heads:
            error_rows += trained_errors(model, batch.tokens, padding, task=cell.task, seq_len=cell.seq_len)
        for row in head_diversity(model, batch.tokens, padding):
            diversity_rows.append(
                {"task": cell.task, "variant": cell.variant, "seq_len": cell.seq_len, "num_heads": cell.num_heads,
                 **row}
            )
    errors_path, diversity_path = out / "errors.csv", out / "diversity.csv"
    _write_csv(
        errors_path, error_rows, ["source", "task", "variant", "seq_len", "layer", "rel_error", "status", "note"]
    )
    _write_csv(
        diversity_path,
        diversity_rows,
        ["task", "variant", "seq_len", "num_heads", "layer", "kind", "head_i", "head_j", "cosine"],
    )
    return errors_path, diversity_path


def _write_csv(path: Path, rows: list[dict[str, Any]], columns: list[str]) -> None:
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        for row in rows:
            writer.writerow({c: _fmt(row.get(c)) for c in columns})
