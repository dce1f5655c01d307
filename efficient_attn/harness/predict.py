"""Predict a cell's peak memory without allocating it: fake tensors plus the storage tracker.

Under ``torch._subclasses.fake_tensor.FakeTensorMode`` every op computes only metadata (shapes, dtypes, strides) and
returns tensors whose storages have real sizes but no memory; :class:`efficient_attn.measure.storage.StorageTracker`
counts those storages exactly as it counts real ones. The module and its inputs are built inside the fake mode
(parameters included); a module whose construction cannot run under it is built for real and its parameters and
buffers are converted to fake tensors.

Fake tensors live on the CPU here, whatever device the cell will run on. The ``meta`` device is *not* used: SDPA on
meta takes the math path and predicts the full score matrix (131 GB at 64K tokens instead of ~65 MB).

The workload is called twice: the first call's peak includes one-time state (caches, the optimizer's state) and is
what the harness measures (its instrumented call is the warm-up); the second is the steady state. :class:`Prediction`
keeps both. The harness's precheck (:func:`efficient_attn.harness.cell.precheck`) compares the prediction with the
memory budget before a cell runs; ``effattn predict`` searches the longest length that fits
(:func:`longest_fitting_length`).

A fake run still costs time that grows with the length (about 45 s per million tokens for the blocked backends on
2 cores: index plans are built for real), so long lengths are *extrapolated*: :func:`fit_growth` runs the cell on fake
tensors at doubling lengths (from 2048) and fits each memory figure (setup, first call, steady call) with a
polynomial in ``seq_len`` of the variant's known degree (1 for an efficient variant, 2 for dense attention or the
``naive`` backend) through the last samples; the fit is accepted once it also reproduces the sample one doubling
shorter (then the figures are in their asymptotic regime, where a maximum of two terms or a padding step no longer
switches). A linear fit that never checks out is retried as a quadratic (a variant that grows faster than promised is
then predicted as it grows, not as promised). :class:`Predictor` uses a fake run up to ``fake_max_len`` and the fit
beyond it, and says which (:attr:`Estimate.how`).

A *sequential* backend (one Python step per token: ``linear`` and ``retention``'s ``recurrent``, declared by the
variant's ``sequential_backends``, see :func:`is_sequential`) costs about 5-20 ms of fake run per token, so a fake
run at 16K would take minutes. Every step allocates and saves the same tensors, so its memory is a maximum of a few
affine functions of ``seq_len``: per-token tensors (the outputs, what autograd saves) against per-step transients
(a few states, ``head_dim x (head_dim + 1)`` per head). Which one is the peak settles once the per-token bytes
outweigh the transients, at lengths of order ``head_dim`` (measured: below ``head_dim`` with full heads, at
``2 * head_dim`` for grouped heads, whose step costs more transients). So :class:`Predictor` fake-runs a sequential
cell from ``head_dim`` (at least 32) up to ``8 * head_dim`` (at least 256) only, fitting as above, and extrapolates
from there: a few seconds per configuration at any length. ``tests/test_reliability_predict.py`` compares the fit
with real runs 8x longer than its longest sample.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from fractions import Fraction
from typing import Callable

import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode, unset_fake_temporarily

from efficient_attn.harness import workloads
from efficient_attn.harness.plan import Cell
from efficient_attn.measure.storage import StorageTracker

__all__ = [
    "DEFAULT_FAKE_MAX_LEN",
    "Estimate",
    "Growth",
    "Prediction",
    "Predictor",
    "expected_degree",
    "fit_growth",
    "is_sequential",
    "longest_fitting_length",
    "predict_cell",
]

#: the longest length :class:`Predictor` runs on fake tensors by default; longer ones are extrapolated
DEFAULT_FAKE_MAX_LEN = 1 << 15
#: the first length :func:`fit_growth` samples
FIT_START = 2048
#: a sequential backend (:func:`is_sequential`) is fake-run from ``head_dim`` (at least SEQUENTIAL_FIT_START) up to
#: SEQUENTIAL_HEAD_DIMS head dims (at least SEQUENTIAL_FAKE_MAX_LEN), see the module docstring
SEQUENTIAL_FAKE_MAX_LEN = 256
SEQUENTIAL_FIT_START = 32
SEQUENTIAL_HEAD_DIMS = 8
#: a fit checks out when every figure at the check length is within this fraction (plus 4 KiB) of the fake run
FIT_TOLERANCE = 1e-3


@dataclass(frozen=True)
class Prediction:
    """Predicted memory of one cell, in bytes.

    Attributes:
        peak_bytes: peak of a steady-state (second) call above what existed before it.
        first_call_bytes: peak of the first call (one-time state included): compare with ``peak_mem_bytes``.
        setup_bytes: parameters, buffers and inputs (alive before and during every call).
    """

    peak_bytes: int
    first_call_bytes: int
    setup_bytes: int

    @property
    def total_bytes(self) -> int:
        """What must fit in memory: setup plus the larger of the two call peaks (the budget check uses this)."""
        return self.setup_bytes + max(self.peak_bytes, self.first_call_bytes)


def _fakeify(module: nn.Module, mode: FakeTensorMode) -> None:
    """Replace every parameter and buffer of ``module`` with a fake tensor of the same metadata."""
    for sub in module.modules():
        for name, param in list(sub._parameters.items()):
            if param is not None:
                sub._parameters[name] = nn.Parameter(mode.from_tensor(param.detach()), requires_grad=param.requires_grad)
        for name, buf in list(sub._buffers.items()):
            if buf is not None:
                sub._buffers[name] = mode.from_tensor(buf)


def predict_cell(cell: Cell, *, seed: int = 0, depth: int = 2, vocab_size: int = 256) -> Prediction:
    """Predicted peak memory of ``cell`` (bytes), computed on CPU fake tensors; nothing of its size is allocated.

    Raises:
        ValueError: an ``hf`` cell (a transformers model is measured, not predicted).
        whatever building or running the workload raises (e.g. a data-dependent op fake tensors cannot run).
    """
    if cell.level == "hf":
        raise ValueError("level 'hf' is measured, not predicted (the fake-tensor predictor cannot build a "
                         "transformers model)")
    cpu_cell = replace(cell, device="cpu")
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    with mode:
        with StorageTracker() as setup:
            try:
                work = workloads.build_workload(cpu_cell, seed=seed, depth=depth, vocab_size=vocab_size)
            except (RuntimeError, NotImplementedError, TypeError) as fake_error:
                # built for real (outside the fake mode), then converted; the inputs are built fake again
                with unset_fake_temporarily():
                    torch.manual_seed(seed)
                    try:
                        module, attentions = workloads.build_cell_module(cpu_cell, depth=depth, vocab_size=vocab_size)
                    except Exception:
                        raise fake_error from None
                _fakeify(module, mode)
                work = workloads.build_workload(
                    cpu_cell, seed=seed, depth=depth, vocab_size=vocab_size, built=(module, attentions)
                )
        setup_bytes = setup.current_bytes
        with StorageTracker() as first:
            work.run()
        with StorageTracker() as steady:
            work.run()
    return Prediction(peak_bytes=steady.peak_bytes, first_call_bytes=first.peak_bytes, setup_bytes=setup_bytes)


_FIGURES = ("setup_bytes", "peak_bytes", "first_call_bytes")


def _lagrange(points: list[tuple[int, int]], n: int) -> Fraction:
    """The polynomial through ``points`` ((length, bytes), exact rationals) evaluated at ``n``."""
    total = Fraction(0)
    for i, (xi, yi) in enumerate(points):
        term = Fraction(yi)
        for j, (xj, _) in enumerate(points):
            if j != i:
                term *= Fraction(n - xj, xi - xj)
        total += term
    return total


@dataclass(frozen=True)
class Growth:
    """A cell's memory as a polynomial in ``seq_len`` through fake runs (see the module docstring).

    Attributes:
        degree: 1 or 2.
        samples: the fake runs the polynomial goes through (``degree + 1`` of them), by length.
        check_length: the fake run one doubling shorter it was checked against (None: too few samples).
        check_error: the largest relative error of a figure at ``check_length``.
        verified: the check passed (within :data:`FIT_TOLERANCE`).
    """

    degree: int
    samples: tuple[tuple[int, Prediction], ...]
    check_length: int | None
    check_error: float
    verified: bool

    def at(self, seq_len: int) -> Prediction:
        """The extrapolated figures at ``seq_len`` (rounded up, never below zero)."""
        values = {}
        for name in _FIGURES:
            points = [(n, getattr(p, name)) for n, p in self.samples]
            values[name] = max(0, math.ceil(_lagrange(points, seq_len)))
        return Prediction(**values)

    def describe(self) -> str:
        """``"linear through n=8192,16384; checked at 4096 (0.00%)"``."""
        kind = "linear" if self.degree == 1 else "quadratic"
        through = ",".join(str(n) for n, _ in self.samples)
        if self.check_length is None:
            return f"{kind} through n={through}; unchecked"
        state = "checked" if self.verified else "UNVERIFIED: off by"
        return f"{kind} through n={through}; {state} {self.check_error:.2%} at {self.check_length}"


def is_sequential(cell: Cell) -> bool:
    """True when ``cell`` runs a backend that takes one Python step per token: one its variant lists in
    ``sequential_backends`` (``recurrent`` of ``linear`` and ``retention``; exact, but slow to run and to fake-run,
    there for checking and decoding)."""
    if cell.is_peer:
        return False
    from efficient_attn.registry import get_spec

    return cell.backend_requested in get_spec(cell.variant).module_cls.sequential_backends


def expected_degree(cell: Cell) -> int:
    """The degree a cell's memory grows with: 2 for dense attention (``O(n^2)``), the ``naive`` backend and peers
    (unknown), 1 for the efficient variants."""
    if cell.is_peer or cell.backend_requested == "naive":
        return 2
    from efficient_attn.registry import get_spec

    return 2 if get_spec(cell.variant).complexity.replace(" ", "") == "O(n^2)" else 1


def _check(growth_samples: list[tuple[int, Prediction]], check: tuple[int, Prediction]) -> float:
    """The largest relative error, over the figures, of the polynomial through ``growth_samples`` at ``check``."""
    worst = 0.0
    n, fake = check
    for name in _FIGURES:
        points = [(m, getattr(p, name)) for m, p in growth_samples]
        actual = getattr(fake, name)
        error = abs(float(_lagrange(points, n)) - actual)
        if error > 4096:
            worst = max(worst, error / max(actual, 1))
    return worst


def fit_growth(
    cell: Cell,
    *,
    max_len: int = DEFAULT_FAKE_MAX_LEN,
    start: int = FIT_START,
    multiple: int = 256,
    seed: int = 0,
    depth: int = 2,
    on_sample: Callable[[int], None] | None = None,
    made: dict[int, Prediction] | None = None,
) -> Growth:
    """Fit ``cell``'s memory as a polynomial in ``seq_len`` from fake runs at ``start`` (or ``max_len / 8`` when
    shorter; rounded up to ``multiple``), doubling up to ``max_len``; stops at the first fit that checks out (see the module docstring).

    ``on_sample(n)`` is called before each fake run (progress); ``made`` (length -> prediction) holds fake runs
    already done and receives the new ones.

    Raises:
        ValueError: ``max_len`` leaves fewer than two sample lengths. Whatever :func:`predict_cell` raises.
    """
    made = {} if made is None else made
    # at least four doublings up to max_len when the multiple allows (a quadratic and its check)
    first = -(-max(min(start, max_len // 8), multiple) // multiple) * multiple
    lengths = []
    n = first
    while n <= max_len:
        lengths.append(n)
        n *= 2
    if len(lengths) < 2:
        raise ValueError(f"fit_growth: max_len={max_len} leaves fewer than two sample lengths from {first}")
    expected = expected_degree(cell)
    degrees = sorted({expected, 2})
    samples: list[tuple[int, Prediction]] = []
    candidates: list[Growth] = []
    for n in lengths:
        if n not in made:
            if on_sample is not None:
                on_sample(n)
            made[n] = predict_cell(replace(cell, seq_len=n), seed=seed, depth=depth)
        samples.append((n, made[n]))
        candidates = []
        for degree in degrees:
            if len(samples) < degree + 1:
                continue
            through = tuple(samples[-(degree + 1):])
            if len(samples) < degree + 2:
                candidates.append(Growth(degree, through, None, math.inf, False))
                continue
            check = samples[-(degree + 2)]
            error = _check(list(through), check)
            candidate = Growth(degree, through, check[0], error, error <= FIT_TOLERANCE)
            if candidate.verified:
                return candidate
            candidates.append(candidate)
    # none checked out up to max_len: the fit of the expected degree through the longest samples, marked unverified
    # (a quadratic replaces it only when the quadratic checks out: an unchecked one can swing far off, even below 0)
    return min(candidates, key=lambda g: (g.degree != expected, g.check_length is None, g.check_error))


@dataclass(frozen=True)
class Estimate:
    """A prediction and how it was obtained: ``how`` is ``"fake"`` (a fake-tensor run at that length) or
    ``"extrapolated"`` (from ``growth``)."""

    prediction: Prediction
    how: str
    growth: Growth | None = None

    @property
    def total_bytes(self) -> int:
        return self.prediction.total_bytes


@dataclass
class Predictor:
    """Predicted memory of cells of any length: a fake run up to ``fake_max_len`` (None: always), beyond it the
    growth fitted to fake runs of the same cell (one fit per cell configuration, cached). A sequential backend
    (:func:`is_sequential`) is fake-run only up to ``max(sequential_max_len, 8 * head_dim)`` (also below
    ``fake_max_len``) and fitted from ``max(sequential_fit_start, head_dim)`` on (see the module docstring);
    ``fake_max_len=None`` fake-runs every cell, sequential ones included.

    ``on_sample(cell, n)`` is called before every fake run (progress on a long search).
    """

    fake_max_len: int | None = DEFAULT_FAKE_MAX_LEN
    fit_start: int = FIT_START
    seed: int = 0
    depth: int = 2
    multiple: int = 256
    sequential_max_len: int = SEQUENTIAL_FAKE_MAX_LEN
    sequential_fit_start: int = SEQUENTIAL_FIT_START
    on_sample: Callable[[Cell, int], None] | None = None
    _fakes: dict[Cell, dict[int, Prediction]] = field(default_factory=dict, repr=False)
    _growths: dict[Cell, Growth] = field(default_factory=dict, repr=False)

    def _made(self, cell: Cell) -> dict[int, Prediction]:
        return self._fakes.setdefault(replace(cell, seq_len=0), {})

    def fake_limit(self, cell: Cell) -> int | None:
        """The longest length ``cell``'s configuration is fake-run at (None: every length)."""
        if self.fake_max_len is None:
            return None
        if not is_sequential(cell):
            return self.fake_max_len
        return min(self.fake_max_len, max(self.sequential_max_len, SEQUENTIAL_HEAD_DIMS * cell.head_dim))

    def fake(self, cell: Cell) -> Prediction:
        """The fake run of ``cell`` (cached)."""
        made = self._made(cell)
        if cell.seq_len not in made:
            if self.on_sample is not None:
                self.on_sample(cell, cell.seq_len)
            made[cell.seq_len] = predict_cell(cell, seed=self.seed, depth=self.depth)
        return made[cell.seq_len]

    def growth(self, cell: Cell) -> Growth:
        """The fitted growth of ``cell``'s configuration (cached)."""
        group = replace(cell, seq_len=0)
        if group not in self._growths:
            limit = self.fake_limit(cell)
            assert limit is not None
            start, multiple = self.fit_start, self.multiple
            if is_sequential(cell):  # short runs: a per-token loop has no padding multiple
                start = multiple = min(max(self.sequential_fit_start, cell.head_dim), limit)
            notify = None if self.on_sample is None else (lambda n: self.on_sample(cell, n))
            self._growths[group] = fit_growth(cell, max_len=limit, start=start, multiple=multiple, seed=self.seed,
                                              depth=self.depth, on_sample=notify, made=self._made(cell))
        return self._growths[group]

    def predict(self, cell: Cell) -> Estimate:
        """A fake run when ``cell.seq_len <=`` :meth:`fake_limit` (or it was already made), else the fitted growth."""
        made = self._made(cell)
        limit = self.fake_limit(cell)
        if limit is None or cell.seq_len <= limit or cell.seq_len in made:
            return Estimate(self.fake(cell), "fake")
        growth = self.growth(cell)
        return Estimate(growth.at(cell.seq_len), "extrapolated", growth)


def longest_fitting_length(
    cell: Cell,
    budget_bytes: int,
    *,
    start: int = 1024,
    limit: int = 1 << 22,
    multiple: int = 256,
    seed: int = 0,
    predictor: Predictor | None = None,
) -> tuple[int | None, dict[int, Estimate]]:
    """The longest ``seq_len`` (a multiple of ``multiple``, at most ``limit``) whose predicted total fits
    ``budget_bytes``: doubling from ``start``, then bisection between the last fit and the first miss.

    Lengths up to the predictor's ``fake_max_len`` are fake runs, longer ones extrapolated (default
    ``Predictor(seed=seed, multiple=multiple)``), so the search costs a few fake runs at any ``limit``.

    Returns:
        ``(length or None if even start does not fit, the estimates made by length)``.
    """
    if budget_bytes <= 0:
        raise ValueError(f"budget_bytes must be > 0, got {budget_bytes}")
    if start % multiple:
        raise ValueError(f"start={start} must be a multiple of multiple={multiple}")
    predictor = predictor if predictor is not None else Predictor(seed=seed, multiple=multiple)
    made: dict[int, Estimate] = {}

    def fits(length: int) -> bool:
        made[length] = predictor.predict(replace(cell, seq_len=length))
        return made[length].total_bytes <= budget_bytes

    if not fits(start):
        return None, made
    good, bad = start, None
    while good < limit:
        nxt = min(good * 2, limit)
        if fits(nxt):
            good = nxt
        else:
            bad = nxt
            break
    if bad is None:
        return good, made
    while bad - good > multiple:
        mid = (good + bad) // 2 // multiple * multiple
        if mid <= good:
            break
        if fits(mid):
            good = mid
        else:
            bad = mid
    return good, made
