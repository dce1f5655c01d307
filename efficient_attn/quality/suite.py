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
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar

import torch

from efficient_attn import vocab
from efficient_attn.errors import require_positive_int, unknown_name_error
from efficient_attn.harness.runfolder import RunFolder, read_rows
from efficient_attn.harness.schema import META_FILE, RESULTS_FILE
from efficient_attn.harness.suite import SuiteError, check_keys, read_toml
from efficient_attn.quality.tasks import TASKS
from efficient_attn.quality.train import TrainConfig, build_task_model, train_and_evaluate
from efficient_attn.registry import build_config, get_spec, list_attentions

__all__ = [
    "KEY_COLUMNS",
    "RESULT_COLUMNS",
    "STATUSES",
    "QualitySuite",
    "TrainingCell",
    "load_suite",
    "model_path",
    "open_run_folder",
    "plan_cells",
    "run_metrics",
    "run_suite",
]

KEY_COLUMNS: tuple[str, ...] = ("task", "variant", "params_json", "seq_len", "seed", "num_heads")
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
)
#: the statuses a quality row can have: the subset of :data:`efficient_attn.vocab.STATUSES` that training reaches
#: (no memory budget skips a training cell)
STATUSES: tuple[str, ...] = tuple(s for s in vocab.STATUSES if s in ("ok", "unsupported", "error"))
#: the version of the quality table's columns (grows like the benchmark's :data:`~efficient_attn.harness.schema.SCHEMA_VERSION`)
SCHEMA_VERSION = 1
#: the parts of the suite a resume must not change (the cell list may grow or shrink: more seeds, fewer variants)
FIXED_CONFIG = ("train", "params")


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
        if self.heads_sweep is not None:
            sweep = self.heads_sweep
            _check_task(sweep.task, "heads_sweep.task")
            get_spec(sweep.variant)
            require_positive_int("heads_sweep.seq_len", sweep.seq_len)
            for heads in sweep.num_heads:
                require_positive_int("heads_sweep.num_heads", heads)
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


def _check_task(task: str, where: str) -> None:
    if task not in TASKS:
        raise ValueError(f"{where}: {unknown_name_error('task', task, list(TASKS), 'tasks', error=ValueError)}")


@dataclass(frozen=True)
class TrainingCell:
    """One training run: the key columns of its result row."""

    task: str
    variant: str
    params_json: str
    seq_len: int
    seed: int
    num_heads: int

    def key(self) -> tuple[str, ...]:
        """The key as the run folder holds it (its key columns, as written)."""
        return tuple(_fmt(getattr(self, c)) for c in KEY_COLUMNS)


_TOP_KEYS = tuple(f.name for f in dataclasses.fields(QualitySuite))
_TRAIN_KEYS = tuple(f.name for f in dataclasses.fields(TrainConfig))
_HEADS_SWEEP_KEYS = tuple(f.name for f in dataclasses.fields(HeadsSweep))


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
    fields_: dict[str, Any] = {**raw, "variants": raw_variants, "train": TrainConfig(**train_fields)}
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
    suite = QualitySuite(**fields_)
    suite.dropped_heads_sweep = dropped
    return suite


def plan_cells(suite: QualitySuite) -> list[TrainingCell]:
    """Every training cell of the suite, in run order (cheap lengths first so partial runs are still useful)."""
    cells = []
    for seq_len in sorted(suite.lengths):
        for seed in range(suite.seeds):
            for task in suite.tasks:
                for key in suite.variants:
                    params = json.dumps(suite.params.get(key, {}), sort_keys=True)
                    cells.append(TrainingCell(task, key, params, seq_len, seed, suite.train.num_heads))
    sweep = suite.heads_sweep
    if sweep is not None:
        params = json.dumps(suite.params.get(sweep.variant, {}), sort_keys=True)
        for heads in sweep.num_heads:
            cell = TrainingCell(sweep.task, sweep.variant, params, sweep.seq_len, 0, heads)
            if cell not in cells:
                cells.append(cell)
    return cells


def model_path(out: Path, cell: TrainingCell) -> Path:
    """Where the weights of a seed-0 cell are kept."""
    return out / "models" / f"{cell.task}__{cell.variant}__n{cell.seq_len}__h{cell.num_heads}.pt"


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
        return
    meta = {
        "schema_version": SCHEMA_VERSION,
        "config": {**old["suite"], "unused_params": old.get("unused_params", [])},
        "environment": {"torch": old.get("torch"), "torch_threads": old.get("threads")},
        "sessions": [],
        "wall_s": 0.0,
    }
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


def load_trained_model(suite: QualitySuite, cell: TrainingCell, out: Path) -> torch.nn.Module:
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
    """Run every unfinished cell of ``suite`` into ``out``; returns the path of ``results.csv``.

    Raises:
        efficient_attn.harness.runfolder.ConfigMismatchError: ``out`` holds a run with another training setup.
    """
    from tqdm import tqdm

    folder = open_run_folder(Path(out), suite)
    todo = [c for c in plan_cells(suite) if c.key() not in folder.finished]
    with folder.session() as session, tqdm(todo, desc="quality", unit="cell", disable=not progress) as bar:
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
    error_rows = random_input_errors(
        suite.variants, suite.error_lengths, suite.params, num_heads=heads, head_dim=suite.train.dim // heads
    )
    diversity_rows: list[dict[str, Any]] = []
    finished = {
        tuple(r[c] for c in KEY_COLUMNS)
        for r in read_rows(out / RESULTS_FILE)
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
