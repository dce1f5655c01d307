"""Train the shared backbone with one attention variant for a fixed budget on the CPU, then evaluate it.

The backbone is :func:`efficient_attn.build_model`: ``task="classify"`` (mean-pooled encoder classifier) for a
classification task, ``task="lm"`` (causal LM, loss and accuracy only at the scored positions, see
:data:`~efficient_attn.quality.tasks.IGNORE`) for an LM task such as ``mqar``. Every variant is trained in exactly
the same network with the same optimiser (AdamW, Loshchilov & Hutter 2019, arXiv:1711.05101), data stream and
budget. Training batches come from the task generator seeded with
``(seed, step)``; evaluation uses a held-out stream (a disjoint seed range), so no evaluation example is trained on.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import Tensor, nn

from efficient_attn.measure.storage import StorageTracker
from efficient_attn.model import POSITIONALS, TransformerModel, build_model
from efficient_attn.quality.tasks import IGNORE, TASKS, TaskBatch

__all__ = [
    "TrainConfig",
    "TrainResult",
    "train_and_evaluate",
    "train_seed",
    "eval_seed",
    "build_task_model",
    "task_generator",
    "task_loss",
    "count_correct",
    "evaluate",
]

#: Evaluation batches are drawn from seeds at or above this offset; training seeds stay below it.
EVAL_SEED_OFFSET = 1_000_003


@dataclass(kw_only=True)
class TrainConfig:
    """Backbone size and training budget.

    Attributes:
        dim, depth, num_heads: backbone width, blocks, heads.
        batch_size: training batch size.
        steps: optimiser steps (the budget).
        budget_s: optional wall-clock cap in seconds; training stops at whichever of ``steps``/``budget_s`` comes
            first (a time cap makes results depend on the machine; the default suite uses steps only).
        lr, weight_decay, warmup_steps: AdamW with linear warm-up then cosine decay to 10% of ``lr``.
        eval_size: held-out examples scored for accuracy.
        grad_clip: global gradient-norm clip.
        positional: the backbone's position encoding (``sinusoidal`` | ``learned`` | ``none``).
    """

    dim: int = 64
    depth: int = 2
    num_heads: int = 4
    batch_size: int = 16
    steps: int = 200
    budget_s: float | None = None
    lr: float = 2e-3
    weight_decay: float = 0.01
    warmup_steps: int = 20
    eval_size: int = 256
    grad_clip: float = 1.0
    positional: str = "sinusoidal"

    def __post_init__(self) -> None:
        for name in ("dim", "depth", "num_heads", "batch_size", "steps", "eval_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"TrainConfig.{name} must be a positive int, got {value!r}")
        if self.budget_s is not None and self.budget_s <= 0:
            raise ValueError(f"TrainConfig.budget_s must be > 0 or None, got {self.budget_s!r}")
        if self.lr <= 0:
            raise ValueError(f"TrainConfig.lr must be > 0, got {self.lr!r}")
        if self.warmup_steps < 0:
            raise ValueError(f"TrainConfig.warmup_steps must be >= 0, got {self.warmup_steps!r}")
        if self.positional not in POSITIONALS:
            raise ValueError(f"TrainConfig.positional must be one of {POSITIONALS}, got {self.positional!r}")


@dataclass
class TrainResult:
    """What one training run measured. ``model`` is the trained backbone (eval mode)."""

    accuracy: float
    majority_accuracy: float
    steps: int
    train_s: float
    train_cpu_s: float
    steps_per_s: float
    peak_mem_bytes: int
    final_loss: float
    model: TransformerModel = field(repr=False)


def train_seed(seed: int, step: int) -> int:
    """Seed of training batch ``step`` of run ``seed`` (below :data:`EVAL_SEED_OFFSET`)."""
    return (seed * 100_003 + step) % EVAL_SEED_OFFSET


def eval_seed(seed: int) -> int:
    """Seed of the held-out evaluation set of run ``seed``."""
    return EVAL_SEED_OFFSET + seed


def build_task_model(
    variant: str,
    task: str,
    seq_len: int,
    config: TrainConfig,
    attention_params: dict[str, Any],
    task_params: dict[str, Any] | None = None,
) -> TransformerModel:
    """The backbone for ``task`` at ``seq_len`` with attention ``variant``: a classifier for a ``"classify"``
    task, a causal LM over the task's vocabulary (with ``task_params``) for an ``"lm"`` task."""
    info = TASKS[task]
    head: dict[str, Any] = {"task": "lm"}
    if info.kind == "classify":
        head = {"task": "classify", "num_classes": info.num_classes}
    return build_model(
        variant,
        **head,
        vocab_size=info.vocab(task_params),
        dim=config.dim,
        depth=config.depth,
        num_heads=config.num_heads,
        max_len=seq_len,
        positional=config.positional,
        **attention_params,
    )


def _padding_arg(batch: TaskBatch) -> Tensor | None:
    """The key padding mask, or None when every token is real (variants without padding support still run)."""
    return None if bool(batch.key_padding_mask.all()) else batch.key_padding_mask


def _lr_factor(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def task_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """Cross-entropy of a classifier ``(batch, classes)`` vs ``(batch,)``, or of an LM ``(batch, seq, vocab)`` vs
    ``(batch, seq)`` averaged over the scored positions only (labels :data:`IGNORE` elsewhere)."""
    if logits.dim() == 3:
        return nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE)
    return nn.functional.cross_entropy(logits, labels)


def count_correct(logits: Tensor, labels: Tensor) -> tuple[int, int]:
    """(correct, scored) predictions: rows of a classifier, scored positions (labels != IGNORE) of an LM."""
    predicted = logits.argmax(-1)
    scored = labels != IGNORE
    return int(((predicted == labels) & scored).sum()), int(scored.sum())


@torch.no_grad()
def evaluate(model: nn.Module, batch: TaskBatch, chunk: int = 64) -> float:
    """Accuracy of ``model`` on ``batch`` (scored in chunks of ``chunk`` rows): the fraction of rows (classify)
    or of scored positions (LM) predicted right."""
    model.eval()
    correct = total = 0
    for start in range(0, batch.tokens.shape[0], chunk):
        part = TaskBatch(*(t[start : start + chunk] for t in batch))
        right, scored = count_correct(model(part.tokens, _padding_arg(part)), part.labels)
        correct, total = correct + right, total + scored
    if total == 0:
        raise ValueError("evaluate: the batch has no scored position")
    return correct / total


def majority_accuracy(train_labels: Tensor, eval_labels: Tensor) -> float:
    """Accuracy on ``eval_labels`` of always predicting the most frequent class of ``train_labels`` (only scored
    positions count, for LM labels)."""
    train, held = train_labels[train_labels != IGNORE], eval_labels[eval_labels != IGNORE]
    majority = Counter(train.tolist()).most_common(1)[0][0]
    return float((held == majority).float().mean())


def train_and_evaluate(
    variant: str,
    task: str,
    seq_len: int,
    seed: int,
    config: TrainConfig,
    attention_params: dict[str, Any] | None = None,
    *,
    task_fn: Callable[[int, int, int], TaskBatch] | None = None,
    task_params: dict[str, Any] | None = None,
    on_step: Callable[[int, float], None] | None = None,
) -> TrainResult:
    """Train ``variant`` on ``task`` at ``seq_len`` for the budget in ``config``, then score it on held-out data.

    Args:
        variant: registry key. task: a key of :data:`~efficient_attn.quality.tasks.TASKS`.
        seq_len: sequence length; seed: model init, data order and evaluation set.
        attention_params: the variant's own config fields (e.g. ``{"window_size": 32}``).
        task_fn: optional generator ``(batch_size, seq_len, seed) -> TaskBatch`` replacing the named task's
            (for tests with a trivial task); the named task still gives the vocabulary and class count.
        task_params: keyword arguments of the named task's generator (e.g. ``{"num_pairs": 4}`` for ``mqar``);
            the vocabulary follows them. Not combined with ``task_fn``.
        on_step: optional ``(step, loss)`` callback after every optimiser step (for calibration logs).

    Returns:
        :class:`TrainResult`; ``peak_mem_bytes`` is the peak of extra live tensor bytes during one training step
        (forward, backward, optimiser update) counted by :class:`StorageTracker`; ``steps_per_s`` excludes that
        tracked step and the evaluation. ``train_cpu_s`` is the process CPU time of the same steps: with one
        thread it approximates the wall time on a quiet machine, which is how a busy machine can still calibrate a
        suite's cost.
    """
    if task not in TASKS:
        raise KeyError(f"unknown task {task!r}; choose from {', '.join(TASKS)}")
    if task_fn is not None and task_params:
        raise ValueError("pass either task_fn or task_params, not both")
    generate = task_fn if task_fn is not None else task_generator(task, task_params)
    torch.manual_seed(seed)
    model = build_task_model(variant, task, seq_len, config, dict(attention_params or {}), task_params)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: _lr_factor(s, config.steps, config.warmup_steps)
    )

    def step(batch: TaskBatch) -> float:
        logits = model(batch.tokens, _padding_arg(batch))
        loss = task_loss(logits, batch.labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        optimizer.step()
        scheduler.step()
        return float(loss.detach())

    model.train()
    train_labels = []
    # Step 0 is measured for memory (the optimiser state is created inside it and counted) and not timed.
    batch = generate(config.batch_size, seq_len, train_seed(seed, 0))
    train_labels.append(batch.labels)
    with StorageTracker() as tracker:
        loss = step(batch)
    peak = tracker.peak_bytes
    steps_done, train_s = 1, 0.0
    started, cpu_started = time.perf_counter(), time.process_time()
    while steps_done < config.steps:
        batch = generate(config.batch_size, seq_len, train_seed(seed, steps_done))
        train_labels.append(batch.labels)
        loss = step(batch)
        steps_done += 1
        if on_step is not None:
            on_step(steps_done, loss)
        train_s = time.perf_counter() - started
        if config.budget_s is not None and train_s >= config.budget_s:
            break
    train_cpu_s = time.process_time() - cpu_started
    held_out = generate(config.eval_size, seq_len, eval_seed(seed))
    accuracy = evaluate(model, held_out)
    timed_steps = steps_done - 1
    return TrainResult(
        accuracy=accuracy,
        majority_accuracy=majority_accuracy(torch.cat(train_labels), held_out.labels),
        steps=steps_done,
        train_s=train_s,
        train_cpu_s=train_cpu_s,
        steps_per_s=timed_steps / train_s if train_s > 0 else float("nan"),
        peak_mem_bytes=peak,
        final_loss=loss,
        model=model,
    )


def task_generator(task: str, task_params: dict[str, Any] | None = None) -> Callable[[int, int, int], TaskBatch]:
    """``(batch_size, seq_len, seed) -> TaskBatch`` of the named task with generator parameters ``task_params``."""
    info = TASKS[task]
    params = dict(task_params or {})
    info.vocab(params)  # a misspelt parameter fails here, before any training

    def generate(batch_size: int, seq_len: int, seed: int) -> TaskBatch:
        return info.generate(batch_size, seq_len, seed, **params)

    return generate


def config_dict(config: TrainConfig) -> dict[str, Any]:
    """The config as a plain dict (for CSV columns and meta.json)."""
    return dataclasses.asdict(config)
