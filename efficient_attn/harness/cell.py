"""One cell, from its configuration to its row: precheck (static status, prediction, budget), measure, row.

1. **Static checks** (:func:`static_status`): a variant that cannot be causal, a backend that cannot run on the
   device or cannot do backward (the module's ``unavailable_reason``), a peer at a level it cannot run at
   (``peer_info(name)["levels"]``) or causal without a causal mode -> ``unsupported`` with the reason; a length above
   the suite's per-mode ``max_len`` -> ``skipped_budget``. At level ``hf`` (a transformers model,
   :mod:`efficient_attn.harness.hf_workload`) ``hf_unsupported_reason`` decides first, and its peers are transformers'
   own implementations, checked there.
2. **Prediction** (:func:`efficient_attn.harness.predict.predict_cell`, CPU fake tensors, nothing allocated): a cell
   whose predicted total (setup + peak) exceeds the memory budget -> ``skipped_budget``, predicted bytes in the note
   (see :func:`efficient_attn.harness.host.budget_bytes`); an ``hf`` cell is not predicted (fake tensors cannot build
   a transformers model), it is measured with the reason in its note. Steps 1 and 2 are :func:`precheck`, the one
   check the sweep, ``effattn bench --dry-run`` and ``effattn predict`` share.
3. **Measurement** (:func:`measure_cell`), in this process or in a fresh one (:mod:`efficient_attn.harness.worker`):
   build, then one instrumented call that is also the warm-up, measuring the first call's peak memory and FLOPs
   together (:mod:`efficient_attn.measure.memory`; in a fresh process the peak RSS change around it is
   ``peak_rss_bytes``), then the timed runs (:mod:`efficient_attn.measure.timing`). One instrumented call per cell
   keeps slow cells cheap (a 16K SDPA forward+backward is 6.5 s per call on 2 cores). Compiled backends (flex)
   refuse dispatch modes: their first call compiles (``compile_ms``), a second warms up (and gives the allocator
   peak on CUDA). Nothing heavy precedes the measured calls. ``predicted_mem_bytes`` is the prediction of that same
   first call.

``torch.OutOfMemoryError`` -> ``oom``; a ``BackendUnavailableError`` (``auto`` on a device with nothing usable) or a
missing peer package -> ``unsupported``; any other exception -> ``error`` with its message (:func:`classify`).
:func:`make_row` turns the outcome into the cell's complete row (:mod:`efficient_attn.harness.schema`).
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch

from efficient_attn.errors import BackendUnavailableError
from efficient_attn.harness.host import free_memory
from efficient_attn.harness.plan import Cell, PlannedCell
from efficient_attn.harness.predict import Prediction, Predictor, is_sequential, predict_cell
from efficient_attn.harness.runfolder import format_value
from efficient_attn.harness.schema import (
    ALL_COLUMNS,
    CONFIG_COLUMNS,
    MAX_LEN_NOTE,
    MEASURED_COLUMNS,
    NUMERIC_COLUMNS,
    RUN_COLUMNS,
)
from efficient_attn.harness.workloads import DEFAULT_DECODE_STEPS, build_workload, parse_dtype
from efficient_attn.measure.memory import measure_call, rss_probe
from efficient_attn.measure.timing import time_call, time_callable
from efficient_attn.registry import get_spec
from efficient_attn.vocab import CACHE_MODES, GRAD_MODES, STATUSES

__all__ = [
    "UNCOUNTABLE_BACKENDS",
    "Precheck",
    "sequential_note",
    "Timing",
    "classify",
    "make_row",
    "measure_cell",
    "precheck",
    "run_cell",
    "static_status",
]

#: compiled backends that refuse to run under a dispatch mode (StorageTracker, FlopCounterMode, fake tensors): their
#: first call compiles (``compile_ms``), ``flops_computed`` falls back to the analytic useful count and
#: ``peak_mem_bytes`` is measured on CUDA only
UNCOUNTABLE_BACKENDS = frozenset({"flex"})
#: the note of a cell whose backend takes one Python step per token (:func:`is_sequential`)
SEQUENTIAL_NOTE = ("backend {backend!r} takes one Python step per token (for checking and decoding, not speed): its "
                   "time is per-op overhead, not a kernel's")
#: the note of an ``hf`` cell's empty ``predicted_mem_bytes``: the cell is measured, never refused for it
HF_NOT_PREDICTED = "memory not predicted: a transformers model (level 'hf') is measured only"


# ----------------------------------------------------------------------------------------------------- the row
def make_row(cell: Cell, *, status: str, note: str = "", **measured: Any) -> dict[str, str]:
    """A complete CSV row for ``cell``: configuration columns, then measured ones (missing ones empty).

    Numbers are blanked unless ``status == "ok"``, except ``predicted_mem_bytes``: a prediction rather than a
    measurement, also kept for ``skipped_budget`` rows (it is why the cell was skipped; the note repeats it).

    Raises:
        ValueError: unknown status or unknown column.
    """
    if status not in STATUSES:
        raise ValueError(f"status must be one of {', '.join(STATUSES)}; got {status!r}")
    unknown = [name for name in measured if name not in MEASURED_COLUMNS + RUN_COLUMNS]
    if unknown:
        raise ValueError(f"unknown measured column(s) {unknown}; allowed: {', '.join(MEASURED_COLUMNS + RUN_COLUMNS)}")
    values: dict[str, Any] = {c: getattr(cell, c) for c in CONFIG_COLUMNS}
    for column in MEASURED_COLUMNS + RUN_COLUMNS:
        values[column] = measured.get(column)
    if cell.level == "hf":  # what ran, whatever the status: the transformers version and the implementation
        for column, value in _hf_row_info(cell).items():
            values[column] = values[column] if values[column] is not None else value
    values["status"] = status
    values["note"] = " ".join(str(note).split())  # one line
    if status != "ok":
        for column in NUMERIC_COLUMNS:
            if column != "predicted_mem_bytes":
                values[column] = None
    return {c: format_value(values[c]) for c in ALL_COLUMNS}


def _hf_row_info(cell: Cell) -> dict[str, str | None]:
    """``transformers_version`` and ``attn_implementation`` of an ``hf`` cell; a value that cannot be known (no
    transformers installed, a peer that does not run at level hf) is left empty, the status says why."""
    import importlib.metadata

    from efficient_attn.harness import hf_workload  # lazy: it imports nothing of transformers itself

    try:
        version: str | None = importlib.metadata.version("transformers")
    except importlib.metadata.PackageNotFoundError:
        version = None
    try:
        implementation: str | None = hf_workload.implementation_name(cell)
    except ValueError:
        implementation = None
    return {"transformers_version": version, "attn_implementation": implementation}


def _gib(nbytes: float) -> str:
    return f"{nbytes / 2**30:.2f} GiB"


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"[:500]


def classify(error: BaseException) -> tuple[str, str]:
    """``(status, note)`` of a cell that raised ``error``: ``oom``, ``unsupported`` or ``error``."""
    if isinstance(error, torch.OutOfMemoryError):
        return "oom", _first_line(error)
    if isinstance(error, BackendUnavailableError) or type(error).__name__ == "PeerUnavailableError":
        return "unsupported", str(error)
    return "error", _first_line(error)


# ------------------------------------------------------------------------------------------------ the precheck
def static_status(planned: PlannedCell) -> tuple[str, str] | None:
    """``(status, note)`` when the cell must not run, decided without building anything; None when it may run."""
    cell = planned.cell
    if cell.packing is not None:
        if cell.level not in ("core", "layer") or cell.is_peer:
            where = "a peer" if cell.is_peer else f"level {cell.level!r}"
            return "unsupported", f"packed documents run at level core or layer of our variants, not {where}"
        if cell.mode in CACHE_MODES:
            return "unsupported", f"packed documents have no {cell.mode} cells (a decode cache holds one sequence)"
        if cell.packing == "packed" and not cell.is_peer:
            cls = get_spec(cell.variant).module_cls
            if not cls.supports_packing:
                return "unsupported", f"{cell.variant} does not accept document_ids (packing)"
            allowed = cls.packing_backends
            if allowed is not None and cell.backend_requested not in ("auto", *allowed):
                return "unsupported", (f"{cell.variant} packs documents with backend {' or '.join(allowed)}, not "
                                       f"{cell.backend_requested!r}")
    if cell.mode in CACHE_MODES:
        if cell.level not in ("core", "layer"):
            return "unsupported", (f"{cell.mode} cells run at level core or layer, not {cell.level!r} (the backbone "
                                   "generates with model.generate)")
        if not cell.causal:
            return "unsupported", (f"{cell.mode} needs causal attention (a non-causal output at t depends on later "
                                   "tokens, which a decoder has not seen): run it with causal = [true]")
    if cell.level == "hf":
        from efficient_attn.harness import hf_workload

        reason = hf_workload.hf_unsupported_reason(cell)
        if reason is not None:
            return "unsupported", reason
    if cell.is_peer and cell.level != "hf":  # at level hf a peer is transformers' own: checked above
        try:
            from efficient_attn.peers import TRANSFORMERS_PEERS, peer_info
        except ImportError as error:
            return "unsupported", f"efficient_attn.peers is not importable: {error}"
        if cell.variant in TRANSFORMERS_PEERS:  # e.g. a suite of level hf run with --level layer
            return "unsupported", (f"peer {cell.variant!r} (transformers' own attention implementation) runs at "
                                   f"level 'hf' only, not {cell.level!r}")
        info = peer_info(cell.variant)
        if cell.mode not in info["modes"]:
            return "unsupported", f"peer {cell.variant!r} runs modes {', '.join(info['modes'])}, not {cell.mode!r}"
        if cell.level not in info["levels"]:
            return "unsupported", f"peer {cell.variant!r} runs at level {' or '.join(info['levels'])}, not {cell.level!r}"
        if cell.causal and "causal" not in info["params"]:
            return "unsupported", f"peer {cell.variant!r} has no causal mode"
        if cell.kv_heads != cell.num_heads:
            return "unsupported", f"peer {cell.variant!r} runs num_heads key/value heads only (no grouped heads)"
    elif not cell.is_peer:
        spec = get_spec(cell.variant)
        reason = spec.module_cls.decode_unsupported_reason
        if cell.mode in CACHE_MODES and reason is not None:
            return "unsupported", f"{cell.variant} cannot decode incrementally: {reason}"
        if cell.mode == "decode" and cell.backend_requested != "auto":
            return "unsupported", (f"a decode step runs {cell.variant}'s own single-token step, not a backend: give "
                                   f"this variant backends = [\"auto\"] (backend {cell.backend_requested!r} asked)")
        if cell.causal and not spec.supports_causal:
            return "unsupported", f"{cell.variant} cannot be causal: {spec.module_cls.causal_unsupported_reason}"
        if cell.kv_heads != cell.num_heads and not spec.module_cls.supports_gqa:
            return "unsupported", (
                f"{cell.variant} does not support grouped key/value heads (num_kv_heads={cell.kv_heads} < "
                f"num_heads={cell.num_heads}) yet"
            )
        if cell.backend_requested != "auto":
            reason = spec.module_cls.unavailable_reason(
                cell.backend_requested, torch.device(cell.device), cell.mode in GRAD_MODES, parse_dtype(cell.dtype)
            )
            if reason is not None:
                return "unsupported", f"backend {cell.backend_requested!r}: {reason}"
        if spec.max_len_field is not None:
            bound = cell.params.get(spec.max_len_field)
            if bound is not None and cell.seq_len > bound:
                return "unsupported", f"seq_len {cell.seq_len} exceeds {spec.max_len_field}={bound} of the params"
    if planned.cap is not None and cell.seq_len > planned.cap:
        return "skipped_budget", f"{MAX_LEN_NOTE} for {cell.mode} ({planned.cap})"
    return None


@dataclass(frozen=True)
class Precheck:
    """What is decided about a cell before it is built for real.

    Attributes:
        status: the status the cell gets without being measured (``unsupported``, ``skipped_budget``); None when it
            may run.
        note: why (for a status), or that its memory could not be predicted (the cell still runs).
        prediction: the predicted memory; None when the static checks stopped the cell or the prediction failed.
    """

    status: str | None
    note: str = ""
    prediction: Prediction | None = None

    @property
    def predicted_bytes(self) -> int | None:
        """The predicted peak of the first call: the ``predicted_mem_bytes`` column."""
        return self.prediction.first_call_bytes if self.prediction is not None else None


def sequential_note(cell: Cell) -> str:
    """:data:`SEQUENTIAL_NOTE` for a cell of a sequential backend (a sweep that lists one measures a Python loop,
    and says so in the row), else ``""``."""
    return SEQUENTIAL_NOTE.format(backend=cell.backend_requested) if is_sequential(cell) else ""


def precheck(planned: PlannedCell, *, budget_bytes: int | None, seed: int = 0, depth: int = 2,
             predictor: Predictor | None = None) -> Precheck:
    """Static checks, then the memory prediction against ``budget_bytes`` (None: no budget); builds nothing real.

    ``predictor``: a :class:`efficient_attn.harness.predict.Predictor` shared by the cells of a sweep: a fake run up
    to its ``fake_max_len``, beyond it the growth fitted to the same configuration's shorter fake runs (which a
    sweep, lengths ascending, has mostly made already), so a long cell costs no fake run of its own length; None:
    a fake run at the cell's length. A sequential backend's cell (:func:`sequential_note`) says so in its note."""
    static = static_status(planned)
    if static is not None:
        return Precheck(*static)
    if planned.cell.level == "hf":
        return Precheck(None, HF_NOT_PREDICTED)
    how = sequential_note(planned.cell)
    try:
        if predictor is None or planned.cell.packing is not None:  # packed cells' shapes follow their documents
            prediction = predict_cell(planned.cell, seed=seed, depth=depth)
        else:
            estimate = predictor.predict(planned.cell)
            prediction = estimate.prediction
            if estimate.growth is not None:
                how = "; ".join(n for n in (how, f"memory extrapolated ({estimate.growth.describe()})") if n)
    except Exception as error:  # noqa: BLE001 - the real run decides the status
        return Precheck(None, "; ".join(n for n in (how, f"memory not predicted ({_first_line(error)[:120]})") if n))
    if budget_bytes is not None and prediction.total_bytes > budget_bytes:
        note = (f"predicted {_gib(prediction.total_bytes)} (peak {_gib(prediction.peak_bytes)} + setup "
                f"{_gib(prediction.setup_bytes)}) > budget {_gib(budget_bytes)}")
        return Precheck("skipped_budget", "; ".join(n for n in (note, how) if n), prediction)
    return Precheck(None, how, prediction)


# ------------------------------------------------------------------------------------------------- measurement
@dataclass
class Timing:
    """Timing options of a sweep (see :func:`efficient_attn.measure.timing.time_callable`)."""

    min_run_time: float = 0.5
    slow_call_s: float = 1.0
    slow_repeats: int = 3
    #: timed single-token steps of a decode cell (:func:`efficient_attn.harness.decoding.measure_decode`)
    decode_steps: int = DEFAULT_DECODE_STEPS


def measure_cell(cell: Cell, *, timing: Timing, seed: int = 0, depth: int = 2, rss: bool = False) -> dict[str, Any]:
    """Build and measure one cell in this process; returns the measured columns plus ``_window_s``.

    Raises whatever the cell raises (the caller turns it into a status).
    """
    work = build_workload(cell, seed=seed, depth=depth, decode_steps=timing.decode_steps)
    if cell.mode == "decode":
        return _measure_decode(cell, work, timing)
    hf = cell.level == "hf"
    if hf:
        # our modules are built by the model's first call: the backend is read after it (an explicit one is known)
        backend = cell.backend_requested if not cell.is_peer else "peer"
    elif work.attentions:
        backend = work.attentions[0].resolve_backend(
            torch.device(cell.device), cell.mode in GRAD_MODES, seq_len=cell.seq_len, dtype=parse_dtype(cell.dtype)
        )
    else:
        backend = "peer"
    notes: list[str] = []
    probe = contextlib.nullcontext() if not rss else rss_probe()
    compile_s = None
    # transformers' flex_attention is torch's flex too: a higher-order op the dispatch modes refuse
    uncountable = backend in UNCOUNTABLE_BACKENDS or (hf and cell.variant == "transformers-flex_attention")
    if uncountable:
        # compiled kernels refuse to run under a dispatch mode (tracker, FLOP counter): the first call compiles,
        # the second is the warm-up (and, on CUDA, the allocator's peak)
        with probe as rss_result:
            compile_s = time_call(work.run, cell.device)
        start = time.perf_counter()
        peak_bytes = measure_call(work.run, cell.device, count_flops=False).peak_bytes if cell.device == "cuda" else None
        if peak_bytes is None:
            time_call(work.run, cell.device)
        first_s = time.perf_counter() - start
        flops_computed = work.useful_flops
        what = "transformers' flex_attention" if cell.is_peer else backend
        notes.append(f"flops_computed is the pattern's count: FlopCounterMode cannot see {what}" if flops_computed
                     else f"flops_computed not counted: FlopCounterMode cannot see {what}")
        if peak_bytes is None:
            notes.append(f"peak_mem_bytes not measured: {what} cannot run under the storage tracker "
                         "(--isolate gives peak_rss_bytes)")
    else:
        # one instrumented call is the warm-up: peak memory and FLOPs of the first call, outside the timed runs
        with probe as rss_result:
            start = time.perf_counter()
            instrumented = measure_call(work.run, cell.device, count_flops=True)
            first_s = time.perf_counter() - start
        peak_bytes, flops_computed = instrumented.peak_bytes, instrumented.flops
    timed = time_callable(
        work.run, device=cell.device, min_run_time=timing.min_run_time, slow_call_s=timing.slow_call_s,
        slow_repeats=timing.slow_repeats, first_call_s=first_s,
    )
    if hf and not cell.is_peer:
        ran = sorted({a.last_backend for a in work.attentions})
        if len(ran) != 1 or backend not in ("auto", ran[0]):
            raise RuntimeError(f"backend {backend!r} asked, the model's attention layers ran {ran or 'none of ours'}")
        backend = ran[0]
    elif work.attentions and work.last_backend != backend:
        raise RuntimeError(f"backend resolved to {backend!r} before the run but {work.last_backend!r} ran")
    if work.note:
        notes.append(work.note)
    if cell.is_peer and getattr(work.module, "last_note", None):
        notes.append(work.module.last_note)  # e.g. HF BigBird's fallback to full attention, padding it added
    if timed.method == "slow_repeats":
        notes.append(f"slow cell ({timed.first_call_ms / 1e3:.1f} s first call): {timed.runs} timed calls")
    if rss and not rss_result.exact:
        notes.append("peak_rss_bytes is an upper bound (the call did not raise the process high-water mark)")
    seconds = timed.median_ms / 1e3
    measured: dict[str, Any] = {
        "backend": backend,
        "padded_len": work.last_padded_len if work.last_padded_len is not None else cell.seq_len,
        "time_ms": timed.median_ms,
        "time_iqr_ms": timed.iqr_ms,
        "compile_ms": compile_s * 1e3 if compile_s is not None else None,
        "tokens_per_s": work.tokens / seconds,
        "peak_mem_bytes": peak_bytes,
        "peak_rss_bytes": rss_result.peak_bytes if rss else None,
        "flops_useful": work.useful_flops,
        "flops_computed": flops_computed,
        "flops_per_s": flops_computed / seconds if flops_computed else None,
        "timed_runs": timed.runs,
        "cache_bytes": work.cache_bytes() if work.cache_bytes is not None else None,
        "new_tokens": cell.seq_len * cell.batch_size if cell.mode == "prefill" else None,
        "note": "; ".join(notes),
        "_window_s": timed.window_s,
    }
    del work  # tensors are freed by reference counting; no full collection on the success path
    free_memory(cell.device, collect=False)
    return measured


def _measure_decode(cell: Cell, work: Any, timing: Timing) -> dict[str, Any]:
    """The measured columns of a decode cell (see :mod:`efficient_attn.harness.decoding`)."""
    from efficient_attn.harness.decoding import DECODE_WARMUP, measure_decode

    measured, timed = measure_decode(work.run, cell, steps=timing.decode_steps)
    step = "peer's own step" if cell.is_peer else "the variant's single-token step"
    measured.update(
        backend="peer" if cell.is_peer else "decode",
        padded_len=cell.seq_len,
        cache_bytes=work.cache_bytes(),
        note=(f"decode: {step}, median of {timed.runs} steps after {DECODE_WARMUP} warm-up ones against a cache of "
              f"{cell.seq_len} random tokens (+1 per step); peak_mem_bytes is one step above the filled cache"),
        _window_s=timed.window_s,
    )
    del work
    free_memory(cell.device, collect=False)
    return measured


#: how a cell is measured: :func:`measure_cell` in this process, or
#: :func:`efficient_attn.harness.worker.measure_isolated` in a fresh one. Returns the measured columns plus
#: ``_window_s``, or ``{"_status": ..., "note": ...}`` for a failure it already classified.
Measure = Callable[..., dict[str, Any]]


def run_cell(
    planned: PlannedCell,
    *,
    budget_bytes: int | None,
    timing: Timing,
    seed: int = 0,
    depth: int = 2,
    measure: Measure | None = None,
    predictor: Predictor | None = None,
) -> tuple[dict[str, str], float]:
    """Run one cell through the precheck (with ``predictor``, see :func:`precheck`) and ``measure`` (default
    :func:`measure_cell`); returns its row and its timed window (s). Never raises for a failing cell: the failure is
    its status."""
    cell = planned.cell
    check = precheck(planned, budget_bytes=budget_bytes, seed=seed, depth=depth, predictor=predictor)
    predicted = check.predicted_bytes
    if check.status is not None:
        return make_row(cell, status=check.status, note=check.note, predicted_mem_bytes=predicted), 0.0
    notes = [check.note] if check.note else []
    measure = measure if measure is not None else measure_cell
    try:
        measured = measure(cell, timing=timing, seed=seed, depth=depth)
    except Exception as error:  # noqa: BLE001 - every failure becomes a recorded status, the sweep goes on
        free_memory(cell.device)
        status, note = classify(error)
        return make_row(cell, status=status, note="; ".join([note, *notes]), predicted_mem_bytes=predicted), 0.0
    if "_status" in measured:
        return make_row(cell, status=measured["_status"], note="; ".join([measured["note"], *notes]),
                        predicted_mem_bytes=predicted), 0.0
    window = float(measured.pop("_window_s"))
    note = "; ".join(n for n in [measured.pop("note"), *notes] if n)
    return make_row(cell, status="ok", note=note, predicted_mem_bytes=predicted, **measured), window
