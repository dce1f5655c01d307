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
    [task_params]                 # per-task generator parameters (e.g. MQAR's difficulty)
    mqar = { num_pairs = 4 }
    [heads_sweep]                 # optional: one variant/task/length trained with other head counts
    variant = "full"
    task = "recall"
    seq_len = 256
    num_heads = [1, 2, 8]
    seeds = 1                     # seeds 0 .. seeds-1 (default 1)
    head_metrics = false          # true: record each sweep model's head similarity and ablation in its row
    [[curves]]                    # optional, repeatable: a knob sweep (zoology's state-size curve)
    variant = "window"
    values = [4, 8, 16, 32]       # of the variant's capacity knob (quality.curves.KNOBS), or of ``param``
    # param = "window_size"       # default: the variant's knob, whose fixed parameters are added
    # where = "task"              # sweep a task parameter instead, e.g. param = "num_pairs"
    # task = "mqar"               # default: the suite's first task; seq_len default: the shortest length
    # params = { ... }            # attention params held fixed (over the suite's [params] of the variant)

A curve's cells are ordinary training cells (its knob value lands in ``params_json`` or ``task_params_json``), run
with the suite's seeds. An LM task (``mqar``) on a variant that cannot be causal (Linformer, Nystrom) is
``unsupported`` with the registry's reason, never trained.

Running writes into ``out`` through the harness's run folder (:class:`efficient_attn.harness.runfolder.RunFolder`, the
same as the benchmark's): ``results.csv`` (one row per training cell, appended, flushed and fsync'ed per cell; a
half-written last row after a kill is cut off and its cell rerun), ``meta.json`` (the suite, the environment, the
sessions; resuming with another training setup or other variant params is an error, adding seeds, lengths or
variants is not), ``models/`` (the seed-0 trained weights, which the metrics use). Resuming skips every cell that
already has a row, so a rerun never duplicates one.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar

import torch

from efficient_attn import vocab
from efficient_attn.errors import require_positive_int, unknown_name_error
from efficient_attn.harness.runfolder import RunFolder, read_rows, write_shard
from efficient_attn.harness.schema import META_FILE, RESULTS_FILE
from efficient_attn.harness.suite import SuiteError, check_keys, read_toml
from efficient_attn.quality.curves import KNOBS
from efficient_attn.quality.tasks import TASKS
from efficient_attn.quality.train import TrainConfig, build_task_model, train_and_evaluate
from efficient_attn.registry import build_config, get_spec, list_attentions

__all__ = [
    "KEY_COLUMNS",
    "RESULT_COLUMNS",
    "STATUSES",
    "Curve",
    "HEAD_COLUMNS",
    "HeadsSweep",
    "QualitySuite",
    "TrainingCell",
    "suite_from_config",
    "unsupported_reason",
    "load_suite",
    "model_path",
    "QualityTaskRequest",
    "open_run_folder",
    "placeholder_row",
    "plan_cells",
    "run_cell_task",
    "run_metrics",
    "run_suite",
]

KEY_COLUMNS: tuple[str, ...] = ("task", "variant", "params_json", "seq_len", "seed", "num_heads", "task_params_json")
#: the head metrics a heads-sweep cell records when ``head_metrics`` is on (:func:`~efficient_attn.quality.metrics.heads_summary`)
HEAD_COLUMNS: tuple[str, ...] = ("output_cosine", "map_cosine", "important_heads", "max_drop")
RESULT_COLUMNS: tuple[str, ...] = KEY_COLUMNS + (
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
) + HEAD_COLUMNS
#: the columns of the first version (no task parameters, no head metrics): such a table is upgraded on resume
V1_KEY_COLUMNS: tuple[str, ...] = KEY_COLUMNS[:-1]
V1_COLUMNS: tuple[str, ...] = tuple(c for c in RESULT_COLUMNS if c not in ("task_params_json",) + HEAD_COLUMNS)
#: the statuses a quality row can have: the subset of :data:`efficient_attn.vocab.STATUSES` that training reaches
#: (no memory budget skips a training cell)
STATUSES: tuple[str, ...] = tuple(s for s in vocab.STATUSES if s in ("ok", "unsupported", "error"))
#: the version of the quality table's columns (grows like the benchmark's :data:`~efficient_attn.harness.schema.SCHEMA_VERSION`)
SCHEMA_VERSION = 2
#: the parts of the suite a resume must not change (the cell list may grow or shrink: more seeds, fewer variants)
FIXED_CONFIG = ("train", "params", "task_params")


@dataclass(kw_only=True)
class HeadsSweep:
    """Extra cells: ``variant`` on ``task`` at ``seq_len`` trained with each of ``num_heads``, seeds
    ``0 .. seeds-1``; with ``head_metrics`` each row records :data:`HEAD_COLUMNS` (similarity and ablation)."""

    variant: str
    task: str
    seq_len: int
    num_heads: list[int]
    seeds: int = 1
    head_metrics: bool = False


@dataclass(kw_only=True)
class Curve:
    """Extra cells: ``variant`` trained at each of ``values`` of ``param`` (an attention parameter, or with
    ``where="task"`` a task parameter), at ``seq_len`` on ``task``, with the suite's seeds."""

    variant: str
    values: list[Any]
    param: str | None = None
    where: str = "attention"
    task: str | None = None
    seq_len: int | None = None
    params: dict[str, Any] = field(default_factory=dict)


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
    task_params: dict[str, dict[str, Any]] = field(default_factory=dict)
    heads_sweep: HeadsSweep | None = None
    curves: list[Curve] = field(default_factory=list)
    #: why the suite's heads sweep is not run (the command-line filters left it out), or None; not a TOML key
    dropped_heads_sweep: ClassVar[str | None] = None

    def __post_init__(self) -> None:
        for task in self.tasks:
            _check_task(task, "suite tasks")
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
        require_positive_int("suite seeds", self.seeds)
        # Fail fast on a misspelt or invalid parameter of any variant that will run.
        for key in self.variants:
            self.validate_params(key, self.train.num_heads)
        for task, task_params in self.task_params.items():
            _check_task(task, "suite task_params")
            _check_task_params(f"suite task_params.{task}", task, min(self.lengths), task_params)
        for index, curve in enumerate(self.curves):
            self._check_curve(index, curve)
        if self.heads_sweep is not None:
            sweep = self.heads_sweep
            _check_task(sweep.task, "heads_sweep.task")
            get_spec(sweep.variant)
            require_positive_int("heads_sweep.seq_len", sweep.seq_len)
            require_positive_int("heads_sweep.seeds", sweep.seeds)
            for heads in sweep.num_heads:
                require_positive_int("heads_sweep.num_heads", heads)
                if self.train.dim % heads:
                    raise ValueError(f"heads_sweep.num_heads {heads} does not divide train.dim {self.train.dim}")
                self.validate_params(sweep.variant, heads)

    def validate_params(self, key: str, num_heads: int, params: dict[str, Any] | None = None) -> None:
        params = dict(self.params.get(key, {}) if params is None else params)
        spec = get_spec(key)
        if spec.max_len_field is not None:
            params.setdefault(spec.max_len_field, max(self.lengths))
        build_config(key, dim=self.train.dim, num_heads=num_heads, **params)

    def _check_curve(self, index: int, curve: Curve) -> None:
        where = f"curves[{index}] ({curve.variant})"
        get_spec(curve.variant)
        if curve.where not in ("attention", "task"):
            raise ValueError(f"{where}: where must be 'attention' or 'task', got {curve.where!r}")
        if not isinstance(curve.values, list) or not curve.values:
            raise ValueError(f"{where}: values must be a non-empty list, got {curve.values!r}")
        if curve.param is None and (curve.where == "task" or curve.variant not in KNOBS):
            raise ValueError(f"{where}: give param (no default knob: knobs exist for {sorted(KNOBS)})")
        if curve.task is not None:
            _check_task(curve.task, f"{where}.task")
        if curve.seq_len is not None:
            require_positive_int(f"{where}.seq_len", curve.seq_len)
        for attention, task_params in self.curve_points(curve):
            self.validate_params(curve.variant, self.train.num_heads, attention)
            _check_task_params(f"{where}: task params", curve.task or self.tasks[0],
                               curve.seq_len or min(self.lengths), task_params)

    def curve_points(self, curve: Curve) -> list[tuple[dict[str, Any], dict[str, Any]]]:
        """The (attention params, task params) of each of the curve's values, in order."""
        param = curve.param if curve.param is not None else KNOBS[curve.variant].param
        fixed = KNOBS[curve.variant].fixed if curve.param is None and curve.where == "attention" else {}
        base = {**self.params.get(curve.variant, {}), **fixed, **curve.params}
        points = []
        for value in curve.values:
            attention, task_params = dict(base), dict(self.task_params.get(curve.task or self.tasks[0], {}))
            (attention if curve.where == "attention" else task_params)[param] = value
            points.append((attention, task_params))
        return points

    def unused_params(self) -> list[str]:
        """Keys in ``params`` that name no variant of this run (reported, never silently dropped)."""
        return sorted(set(self.params) - set(self.variants))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def suite_from_config(config: dict[str, Any]) -> QualitySuite:
    """Rebuild the suite a run folder's ``meta.json`` ``config`` holds (:meth:`QualitySuite.to_dict`)."""
    fields_ = {k: v for k, v in config.items() if k in _TOP_KEYS}
    fields_["train"] = TrainConfig(**fields_.get("train", {}))
    if fields_.get("heads_sweep") is not None:
        fields_["heads_sweep"] = HeadsSweep(**fields_["heads_sweep"])
    fields_["curves"] = [Curve(**c) for c in fields_.get("curves", [])]
    return QualitySuite(**fields_)


def _check_task(task: str, where: str) -> None:
    if task not in TASKS:
        raise ValueError(f"{where}: {unknown_name_error('task', task, list(TASKS), 'tasks', error=ValueError)}")


def _check_task_params(where: str, task: str, seq_len: int, task_params: dict[str, Any]) -> None:
    """Generate one row with ``task_params``: a misspelt name or an impossible setting is an error naming ``where``."""
    if not task_params:
        return
    try:
        TASKS[task].generate(1, seq_len, 0, **task_params)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{where}: {exc}") from None


@dataclass(frozen=True)
class TrainingCell:
    """One training run: the key columns of its result row."""

    task: str
    variant: str
    params_json: str
    seq_len: int
    seed: int
    num_heads: int
    task_params_json: str = "{}"

    def key(self) -> tuple[str, ...]:
        """The key as the run folder holds it (its key columns, as written)."""
        return tuple(_fmt(getattr(self, c)) for c in KEY_COLUMNS)


_TOP_KEYS = tuple(f.name for f in dataclasses.fields(QualitySuite))
_TRAIN_KEYS = tuple(f.name for f in dataclasses.fields(TrainConfig))
_HEADS_SWEEP_KEYS = tuple(f.name for f in dataclasses.fields(HeadsSweep))
_CURVE_KEYS = tuple(f.name for f in dataclasses.fields(Curve))


def load_suite(
    path: str | Path,
    *,
    tasks: list[str] | None = None,
    variants: list[str] | None = None,
    lengths: list[int] | None = None,
    seeds: int | None = None,
    steps: int | None = None,
    budget_s: float | None = None,
) -> QualitySuite:
    """Read a suite TOML; the given (non-None) options replace the suite's ``tasks``, ``variants``, ``lengths``,
    ``seeds`` and the training budget (``steps``, ``budget_s``). An unknown key in the file is an error naming it and
    the nearest valid one (:func:`efficient_attn.harness.suite.check_keys`).

    The heads sweep follows the filters: when ``tasks``, ``variants`` or ``lengths`` is given and leaves out the
    sweep's task, variant or length, the sweep is dropped (:attr:`QualitySuite.dropped_heads_sweep` says why).
    """
    if not Path(path).is_file():
        known = sorted(p.name for p in Path(__file__).resolve().parents[2].joinpath("bench", "quality").glob("*.toml"))
        raise SuiteError(f"quality suite {path} does not exist (bench/quality has: {', '.join(known) or 'nothing'})")
    raw = read_toml(Path(path))
    check_keys(raw, _TOP_KEYS, f"quality suite {path}")
    train_fields = dict(raw.pop("train", {}))
    check_keys(train_fields, _TRAIN_KEYS, f"quality suite {path}: [train]")
    for name, value in (("steps", steps), ("budget_s", budget_s)):
        if value is not None:
            train_fields[name] = value
    raw_variants = raw.pop("variants", "all")
    if raw_variants == "all":
        raw_variants = []
    elif not isinstance(raw_variants, list):
        raise ValueError(f"suite variants must be \"all\" or a list of keys, got {raw_variants!r}")
    sweep = raw.pop("heads_sweep", None)
    curves = raw.pop("curves", [])
    if not isinstance(curves, list):
        raise ValueError(f"quality suite {path}: curves must be an array of tables ([[curves]]), got {curves!r}")
    for index, curve in enumerate(curves):
        check_keys(curve, _CURVE_KEYS, f"quality suite {path}: curves[{index}]")
    fields_: dict[str, Any] = {**raw, "variants": raw_variants, "train": TrainConfig(**train_fields),
                               "curves": [Curve(**c) for c in curves]}
    if sweep is not None:
        check_keys(sweep, _HEADS_SWEEP_KEYS, f"quality suite {path}: [heads_sweep]")
        fields_["heads_sweep"] = HeadsSweep(**sweep)
    for name, value in (("tasks", tasks), ("variants", variants), ("lengths", lengths), ("seeds", seeds)):
        if value is not None:
            fields_[name] = value
    dropped = None
    if isinstance(fields_.get("heads_sweep"), HeadsSweep):
        sweep = fields_["heads_sweep"]
        for option, given, wanted in (("--tasks", tasks, sweep.task), ("--variants", variants, sweep.variant),
                                      ("--lengths", lengths, sweep.seq_len)):
            if given is not None and wanted not in given:
                dropped = f"heads sweep left out: {option} does not include its {wanted!r}"
                del fields_["heads_sweep"]
                break
    if variants is not None:
        fields_["curves"] = [c for c in fields_["curves"] if c.variant in variants]
    suite = QualitySuite(**fields_)
    suite.dropped_heads_sweep = dropped
    return suite


def _json(value: dict[str, Any]) -> str:
    return json.dumps(value, sort_keys=True)


def plan_cells(suite: QualitySuite) -> list[TrainingCell]:
    """Every training cell of the suite, in run order (cheap lengths first so partial runs are still useful; then
    the curves, seed by seed, so that every point gets its first seeds before any gets its third; then the heads
    sweep)."""
    cells: list[TrainingCell] = []

    def add(cell: TrainingCell) -> None:
        if cell not in cells:
            cells.append(cell)

    heads = suite.train.num_heads
    for seq_len in sorted(suite.lengths):
        for seed in range(suite.seeds):
            for task in suite.tasks:
                task_params = _json(suite.task_params.get(task, {}))
                for key in suite.variants:
                    add(TrainingCell(task, key, _json(suite.params.get(key, {})), seq_len, seed, heads, task_params))
    for seed in range(suite.seeds):
        for curve in suite.curves:
            task, seq_len = curve.task or suite.tasks[0], curve.seq_len or min(suite.lengths)
            for attention, task_params in suite.curve_points(curve):
                add(TrainingCell(task, curve.variant, _json(attention), seq_len, seed, heads, _json(task_params)))
    sweep = suite.heads_sweep
    if sweep is not None:
        params, task_params = _json(suite.params.get(sweep.variant, {})), _json(suite.task_params.get(sweep.task, {}))
        for seed in range(sweep.seeds):
            for num_heads in sweep.num_heads:
                add(TrainingCell(sweep.task, sweep.variant, params, sweep.seq_len, seed, num_heads, task_params))
    return cells


def unsupported_reason(task: str, variant: str, needs_padding: bool = False) -> str | None:
    """Why ``variant`` cannot run ``task`` (None: it can): an LM task needs a causal variant, a padded one masks."""
    spec = get_spec(variant)
    if TASKS[task].kind == "lm" and not spec.supports_causal:
        return (f"{variant} cannot be causal ({spec.module_cls.causal_unsupported_reason}); "
                f"{task} is a causal LM task")
    if needs_padding and not spec.supports_key_padding:
        return f"{variant} does not support key_padding_mask ({task} pads)"
    return None


def model_path(out: Path, cell: TrainingCell) -> Path:
    """Where the weights of a seed-0 cell are kept."""
    name = f"{cell.task}__{cell.variant}__n{cell.seq_len}__h{cell.num_heads}"
    if cell.params_json != "{}" or cell.task_params_json != "{}":
        # a curve point: the same variant at several parameter values; a short digest keeps the names apart
        import hashlib

        name += "__" + hashlib.sha1(f"{cell.params_json}|{cell.task_params_json}".encode()).hexdigest()[:10]
    return out / "models" / f"{name}.pt"


def _upgrade_first_version_meta(out: Path) -> None:
    """A quality run written before the quality suite used the harness's run folder kept its suite under
    ``meta.json``'s ``suite`` key: move it to the run folder's layout, so the run can be resumed (rows unchanged)."""
    meta_path = out / META_FILE
    if not meta_path.exists():
        return
    try:
        old = json.loads(meta_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return  # the run folder names the file and says what to do
    if not isinstance(old, dict) or "config" in old or "suite" not in old:
        _upgrade_v1_table(out)
        return
    meta = {
        "schema_version": SCHEMA_VERSION,
        "config": {**old["suite"], "unused_params": old.get("unused_params", [])},
        "environment": {"torch": old.get("torch"), "torch_threads": old.get("threads")},
        "sessions": [],
        "wall_s": 0.0,
    }
    meta_path.write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    _upgrade_v1_table(out)


def _upgrade_v1_table(out: Path) -> None:
    """A schema-1 table (no ``task_params_json``, no head metrics): rewrite it once, atomically, with the task params
    ``{}`` (the generators' defaults, which is what those rows ran with) and the head metrics empty."""
    path = out / RESULTS_FILE
    if not path.exists():
        return
    with open(path, newline="") as handle:
        reader = csv.reader(handle)
        header = tuple(next(reader, ()))
        if header != V1_COLUMNS:
            return
        rows = [dict(zip(header, values)) for values in reader if len(values) == len(header)]
    tmp = path.with_suffix(".upgrade.tmp")
    with open(tmp, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=RESULT_COLUMNS, lineterminator="\n")
        writer.writeheader()
        for row in rows:
            writer.writerow({c: row.get(c, "{}" if c == "task_params_json" else "") for c in RESULT_COLUMNS})
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    meta_path = out / META_FILE
    if meta_path.exists():
        meta = json.loads(meta_path.read_text())
        meta["schema_version_was"], meta["schema_version"] = meta.get("schema_version"), SCHEMA_VERSION
        meta.setdefault("config", {}).setdefault("task_params", {})
        meta["config"].setdefault("curves", [])
        meta_path.write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")


def open_run_folder(out: Path, suite: QualitySuite) -> RunFolder:
    """The run folder of a quality run: its result columns keyed by :data:`KEY_COLUMNS`; a resume may change the
    cell list, not :data:`FIXED_CONFIG`.

    Raises:
        efficient_attn.harness.runfolder.ConfigMismatchError: ``out`` holds a run with another training setup or
            other variant params (a ``ValueError``).
    """
    _upgrade_first_version_meta(Path(out))
    config = {**suite.to_dict(), "unused_params": suite.unused_params()}
    return RunFolder(Path(out), config, columns=RESULT_COLUMNS, key_columns=KEY_COLUMNS, fixed=FIXED_CONFIG,
                     schema_version=SCHEMA_VERSION)


def _train_config(suite: QualitySuite, cell: TrainingCell) -> TrainConfig:
    return dataclasses.replace(suite.train, num_heads=cell.num_heads)


def run_cell(suite: QualitySuite, cell: TrainingCell, out: Path, save_model: bool) -> dict[str, Any]:
    """Train and evaluate one cell; returns its result row (status ``unsupported``/``error`` with a note when it
    cannot run)."""
    config = _train_config(suite, cell)
    row: dict[str, Any] = {c: getattr(cell, c) for c in KEY_COLUMNS}
    row.update(dim=config.dim, depth=config.depth, batch_size=config.batch_size, steps_budget=config.steps)
    reason = unsupported_reason(cell.task, cell.variant, needs_padding=cell.task == "listops")
    if reason is not None:
        row.update(status="unsupported", note=reason)
        return row
    task_params = json.loads(cell.task_params_json) or None
    started, cpu_started = time.perf_counter(), time.process_time()
    try:
        result = train_and_evaluate(
            cell.variant, cell.task, cell.seq_len, cell.seed, config, json.loads(cell.params_json),
            task_params=task_params,
        )
        if _wants_head_metrics(suite, cell):
            row.update(_head_metrics(result.model, cell, task_params, config))
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


def _wants_head_metrics(suite: QualitySuite, cell: TrainingCell) -> bool:
    sweep = suite.heads_sweep
    return (sweep is not None and sweep.head_metrics and (cell.task, cell.variant, cell.seq_len)
            == (sweep.task, sweep.variant, sweep.seq_len) and cell.num_heads in sweep.num_heads
            and cell.params_json == _json(suite.params.get(sweep.variant, {}))
            and cell.task_params_json == _json(suite.task_params.get(sweep.task, {})))


def _head_metrics(model: torch.nn.Module, cell: TrainingCell, task_params: dict[str, Any] | None,
                  config: TrainConfig) -> dict[str, Any]:
    """:data:`HEAD_COLUMNS` of a trained model on its held-out set: head similarity on 16 rows, ablation on all."""
    from efficient_attn.quality.metrics import heads_summary
    from efficient_attn.quality.train import eval_seed, evaluate, task_generator

    batch = task_generator(cell.task, task_params)(config.eval_size, cell.seq_len, eval_seed(cell.seed))
    padding = None if bool(batch.key_padding_mask.all()) else batch.key_padding_mask
    sample = batch.tokens[:16], None if padding is None else padding[:16]
    summary = heads_summary(model.eval(), sample[0], sample[1], lambda m: evaluate(m, batch))
    return {c: summary[c] for c in HEAD_COLUMNS}


def load_trained_model(suite: QualitySuite, cell: TrainingCell, out: Path) -> torch.nn.Module:
    """Rebuild a saved seed-0 model (eval mode)."""
    config = _train_config(suite, cell)
    model = build_task_model(cell.variant, cell.task, cell.seq_len, config, json.loads(cell.params_json),
                             json.loads(cell.task_params_json) or None)
    model.load_state_dict(torch.load(model_path(out, cell), weights_only=True))
    return model.eval()


@dataclass(frozen=True)
class QualityTaskRequest:
    """One training cell run by an executor's task (:func:`run_cell_task`): plain, picklable values."""

    folder: str
    config_id: str
    suite: QualitySuite
    cell: dict[str, Any]
    threads: int | None = None

    @property
    def key(self) -> tuple[str, ...]:
        return TrainingCell(**self.cell).key()


def run_cell_task(request: QualityTaskRequest) -> dict[str, str]:
    """What an array task (or local job) runs: train one cell, write its row to a shard of the run folder."""
    from efficient_attn.harness.executors.task import allocated_cpus, cell_digest, where_am_i

    started = time.time()
    _, job_id, array_index = where_am_i()
    torch.set_num_threads(request.threads or allocated_cpus())
    cell = TrainingCell(**request.cell)
    row = run_cell(request.suite, cell, Path(request.folder), save_model=cell.seed == 0)
    formatted = {c: _fmt(row.get(c)) for c in RESULT_COLUMNS}
    attempt = f"{job_id or 'nojob'}_{array_index or 0}.{os.getpid()}.{int(started * 1e3)}"
    write_shard(Path(request.folder), formatted, config=request.config_id, columns=RESULT_COLUMNS,
                name=f"{cell_digest(cell.key())}.{attempt}", extra={"started": started, "ended": time.time()})
    return formatted


def placeholder_row(record: Any, state: Any) -> dict[str, str]:
    """The row of a training task that ended without a result (an ``error``: quality rows have no ``oom``)."""
    from efficient_attn.harness.executors.driver import placeholder_note

    row = {c: "" for c in RESULT_COLUMNS}
    row.update({c: _fmt(record.cell[c]) for c in KEY_COLUMNS})
    row.update(status="error", note=placeholder_note(record, state))
    return row


def _run_parallel(suite: QualitySuite, folder: RunFolder, executor: Any, progress: bool,
                  on_row: Callable[[dict[str, Any]], None] | None) -> None:
    from efficient_attn.harness.executors.driver import CellKind, run_tasks, threads_per_task

    planned = {c.key(): c for c in plan_cells(suite)}
    threads = threads_per_task(executor)
    with folder.session() as session:
        session.executor = executor.describe()
        session.cells_run, _ = run_tasks(
            folder, list(planned),
            lambda key: QualityTaskRequest(folder=str(folder.path.resolve()), config_id=folder.config_id,
                                           suite=suite, cell=dataclasses.asdict(planned[key]), threads=threads),
            executor, kind=CellKind(task=run_cell_task, placeholder=placeholder_row), progress=progress,
            on_row=on_row,
        )


def run_suite(
    suite: QualitySuite,
    out: str | Path,
    *,
    progress: bool = True,
    on_row: Callable[[dict[str, Any]], None] | None = None,
    executor: Any = None,
) -> Path:
    """Run every unfinished cell of ``suite`` into ``out``; returns the path of ``results.csv``.

    ``executor`` (:class:`efficient_attn.harness.executors.ExecutorOptions`; default inline, in this process):
    with ``local`` or ``slurm`` every cell is a task that writes a shard, merged here as it finishes; a rerun
    collects an earlier submitter's tasks and resubmits the cells whose task ended without a result.

    Raises:
        efficient_attn.harness.runfolder.ConfigMismatchError: ``out`` holds a run with another training setup.
        efficient_attn.harness.runfolder.RunFolderBusyError: another process is writing ``out``.
    """
    from tqdm import tqdm

    folder = open_run_folder(Path(out), suite)
    if executor is not None and executor.parallel:
        try:
            _run_parallel(suite, folder, executor, progress, on_row)
        finally:
            folder.close()
        return folder.csv_path
    todo = [c for c in plan_cells(suite) if c.key() not in folder.finished]
    with folder.session() as session, tqdm(todo, desc="quality", unit="cell", disable=not progress) as bar:
        session.executor = {"name": "inline", "threads": torch.get_num_threads()}
        for cell in bar:
            bar.set_postfix_str(f"{cell.task} {cell.variant} n={cell.seq_len} s={cell.seed} h={cell.num_heads}")
            row = run_cell(suite, cell, folder.path, save_model=cell.seed == 0)
            folder.append({c: _fmt(row.get(c)) for c in RESULT_COLUMNS})
            session.cells_run += 1
            if on_row is not None:
                on_row(row)
    return folder.csv_path


def _fmt(value: Any) -> str:
    """How a quality value is written: None and NaN empty, floats with 6 digits."""
    if value is None:
        return ""
    if isinstance(value, float):
        return "" if math.isnan(value) else f"{value:.6g}"
    return str(value)


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
    # the grid's variants at their params; a variant only on a knob curve at the middle value of its first curve
    error_params, error_variants = dict(suite.params), list(suite.variants)
    for curve in suite.curves:
        if curve.where == "attention" and curve.variant not in error_variants:
            points = suite.curve_points(curve)
            error_params[curve.variant] = points[len(points) // 2][0]
            error_variants.append(curve.variant)
    error_rows = random_input_errors(
        error_variants, suite.error_lengths, error_params, num_heads=heads, head_dim=suite.train.dim // heads
    )
    diversity_rows: list[dict[str, Any]] = []
    finished = {
        tuple(r[c] for c in KEY_COLUMNS)
        for r in read_rows(out / RESULTS_FILE)
        if r["status"] == "ok" and r["seed"] == "0"
    }
    # the grid's and the heads sweep's models (a curve point's model is the same variant at another setting)
    cells = [c for c in plan_cells(suite) if c.seed == 0 and c.key() in finished and model_path(out, c).exists()
             and c.params_json == _json(suite.params.get(c.variant, {}))
             and c.task_params_json == _json(suite.task_params.get(c.task, {}))]
    for cell in tqdm(cells, desc="metrics", unit="model", disable=not progress):
        model = load_trained_model(suite, cell, out)
        batch = TASKS[cell.task].generate(eval_rows, cell.seq_len, eval_seed(0), **json.loads(cell.task_params_json))
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
