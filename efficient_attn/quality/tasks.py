"""Synthetic long-range tasks, generated on the fly from a seed (no downloads).

Every task returns a :class:`TaskBatch` ``(tokens, key_padding_mask, labels)`` with ``tokens`` long
``(batch, seq_len)`` and ``key_padding_mask`` bool ``(batch, seq_len)`` (True = real token). Two kinds
(:attr:`TaskInfo.kind`):

* ``"classify"`` (``recall``, ``listops``): ``labels`` long ``(batch,)`` in ``[0, num_classes)``, one per row, for
  the mean-pooled encoder classifier.
* ``"lm"`` (``mqar``): ``labels`` long ``(batch, seq_len)``, the next-token target at the positions that are scored
  and :data:`IGNORE` (-100, PyTorch's cross-entropy ``ignore_index``) everywhere else, for the causal LM backbone.

The tasks:

* ``recall`` -- associative recall (key-value retrieval; Ba et al. 2016 "Using fast weights", arXiv:1610.06258;
  the multi-query form of Arora et al. 2023 "Zoology", arXiv:2312.04927). The sequence opens with
  ``QUERY k*``; the rest is filler holding ``num_pairs`` key-value pairs ``k v`` with distinct keys; the label is the
  value paired with ``k*``. The queried pair sits ``distance`` tokens after the query key, drawn uniformly from
  ``[min_distance, max_distance]`` (default: the second half of the sequence), so the answer is always far away.
  Because the backbone pools by the mean over tokens, every token must learn the answer: a model whose tokens can
  see neither the opening query nor the far pair cannot solve it.
* ``listops`` -- ListOps-lite (Nangia & Bowman 2018, arXiv:1804.06028; LRA, Tay et al. 2021, arXiv:2011.04006):
  nested ``[MAX``, ``[MIN``, ``[MED``, ``[SM`` (sum mod 10) over digits, closed by ``]``; the label is the value of
  the expression (10 classes). The top-level operator takes arguments until the expression reaches a length drawn
  from ``[min_fill, 1] * seq_len``; arguments nest up to ``max_depth``; the rest is padding.
* ``mqar`` -- multi-query associative recall as language modelling (Arora et al. 2023 "Zoology", arXiv:2312.04927,
  section 3): the row opens with ``num_pairs`` key-value pairs ``k_1 v_1 ... k_P v_P`` (distinct keys); the rest of
  the row is a blank token with ``num_queries`` of those keys spread over it, each followed by its value. The model
  is scored (loss and accuracy) only on predicting the value token after each query key, so solving it needs the
  pair that may sit the whole sequence back: attention's induction-style lookup, which a fixed state or a window
  shorter than the distance cannot do.

Each generator is a pure function of its arguments (a CPU ``torch.Generator`` seeded with ``seed``); each has a
brute-force solver that reads the labels back from the tokens, which the tests use as the oracle.
"""

from __future__ import annotations

import random
from typing import Any, Callable, NamedTuple

import torch
from torch import Tensor

__all__ = [
    "TaskBatch",
    "TaskInfo",
    "TASKS",
    "make_batch",
    "recall_batch",
    "solve_recall",
    "recall_guess_accuracy",
    "listops_batch",
    "solve_listops",
    "evaluate_listops",
    "IGNORE",
    "mqar_batch",
    "solve_mqar",
    "mqar_vocab_size",
]

#: Label of an unscored position in an ``"lm"`` task (PyTorch cross-entropy's default ``ignore_index``).
IGNORE = -100


class TaskBatch(NamedTuple):
    """One batch: ``tokens`` long (batch, seq), ``key_padding_mask`` bool (batch, seq), ``labels`` long (batch,)
    for a classification task or (batch, seq) with :data:`IGNORE` at unscored positions for an LM task."""

    tokens: Tensor
    key_padding_mask: Tensor
    labels: Tensor


# ------------------------------------------------------------------------------------------------ associative recall
RECALL_PAD, RECALL_QUERY = 0, 1
RECALL_NUM_VALUES = 10
RECALL_PAIR_FORMATS = ("fused", "split")


def _recall_layout(num_keys: int, num_fill: int) -> tuple[int, int, int, int]:
    """First token id of keys, values and fused pairs, and the vocabulary size (fillers start at 2)."""
    key0 = 2 + num_fill
    value0 = key0 + num_keys
    pair0 = value0 + RECALL_NUM_VALUES
    return key0, value0, pair0, pair0 + num_keys * RECALL_NUM_VALUES


def recall_vocab_size(num_keys: int = 8, num_fill: int = 1) -> int:
    """Vocabulary size of :func:`recall_batch` with these parameters (both pair formats)."""
    return _recall_layout(num_keys, num_fill)[3]


def recall_batch(
    batch_size: int,
    seq_len: int,
    seed: int,
    *,
    num_pairs: int = 4,
    num_keys: int = 8,
    num_fill: int = 1,
    min_distance: int | None = None,
    max_distance: int | None = None,
    pair_format: str = "split",
) -> TaskBatch:
    """Associative-recall batch (see the module docstring).

    Layout per row: position 0 ``QUERY``, position 1 the queried key ``k*``; at position ``1 + distance`` the pair
    ``k* v``; ``num_pairs - 1`` distractor pairs with other keys at non-overlapping positions drawn from the *same*
    distance range (so a pair's position says nothing about whether it is the answer); filler tokens elsewhere. No
    padding (the mask is all True). A model that cannot see the query can still guess among the values present:
    :func:`recall_guess_accuracy` is that baseline (about ``1 / num_pairs``).

    Args:
        batch_size, seq_len: output shape ``(batch_size, seq_len)``.
        seed: the only source of randomness.
        num_pairs: key-value pairs per row (1..num_keys).
        num_keys: distinct key tokens; num_fill: distinct filler tokens (default 1, a constant background: with
            4 the small CPU budget learned more slowly).
        min_distance, max_distance: range of the distance (in tokens) from the query key to the queried key;
            default ``[seq_len // 2, seq_len - 3]``.
        pair_format: ``"split"`` (default) writes a pair as two tokens ``k v`` (the classic form: tag the value
            with its key, then match); ``"fused"`` writes it as one token standing for ``(k, v)``. On our CPU budget
            the fused form was not easier to learn (13% vs 23% after 300 steps of batch 8 at n=256).
    """
    if pair_format not in RECALL_PAIR_FORMATS:
        raise ValueError(f"pair_format must be one of {RECALL_PAIR_FORMATS}, got {pair_format!r}")
    _check_positive("batch_size", batch_size)
    _check_positive("num_keys", num_keys)
    _check_positive("num_fill", num_fill)
    if not 1 <= num_pairs <= num_keys:
        raise ValueError(f"num_pairs must be in [1, num_keys={num_keys}], got {num_pairs}")
    if seq_len < 4 + 2 * num_pairs:
        raise ValueError(f"seq_len must be >= 4 + 2 * num_pairs = {4 + 2 * num_pairs} for recall, got {seq_len}")
    lo = seq_len // 2 if min_distance is None else min_distance
    hi = seq_len - 3 if max_distance is None else max_distance
    if not 1 <= lo <= hi <= seq_len - 3:
        raise ValueError(
            f"need 1 <= min_distance <= max_distance <= seq_len - 3 = {seq_len - 3}, got [{lo}, {hi}]"
        )
    if hi - lo + 2 < 2 * num_pairs:
        raise ValueError(
            f"the distance range [{lo}, {hi}] holds {hi - lo + 2} positions, fewer than the 2 * num_pairs = "
            f"{2 * num_pairs} the pairs need; widen it or use fewer pairs"
        )
    key0, value0, pair0, _ = _recall_layout(num_keys, num_fill)
    fused = pair_format == "fused"
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(2, key0, (batch_size, seq_len), generator=gen)  # filler
    labels = torch.randint(0, RECALL_NUM_VALUES, (batch_size,), generator=gen)
    rng = random.Random(seed)
    for row in range(batch_size):
        keys = rng.sample(range(num_keys), num_pairs)
        query_pos = 1 + rng.randint(lo, hi)  # position of the queried key
        occupied = {0, 1, query_pos, query_pos + 1}
        tokens[row, 0] = RECALL_QUERY
        tokens[row, 1] = key0 + keys[0]
        _put_pair(tokens, row, query_pos, keys[0], int(labels[row]), fused, key0, value0, pair0)
        for key in keys[1:]:
            while True:
                pos = 1 + rng.randint(lo, hi)
                if not {pos, pos + 1} & occupied:
                    break
            occupied |= {pos, pos + 1}
            _put_pair(tokens, row, pos, key, rng.randrange(RECALL_NUM_VALUES), fused, key0, value0, pair0)
    return TaskBatch(tokens, torch.ones(batch_size, seq_len, dtype=torch.bool), labels)


def _put_pair(
    tokens: Tensor, row: int, pos: int, key: int, value: int, fused: bool, key0: int, value0: int, pair0: int
) -> None:
    if fused:
        tokens[row, pos] = pair0 + key * RECALL_NUM_VALUES + value
    else:
        tokens[row, pos] = key0 + key
        tokens[row, pos + 1] = value0 + value


def recall_guess_accuracy(tokens: Tensor, labels: Tensor, *, num_keys: int = 8, num_fill: int = 1) -> float:
    """Expected accuracy of guessing uniformly among the pairs' values in each row -- what attention that never
    connects the query to the pairs can reach (the local shortcut baseline of the recall task)."""
    key0, value0, pair0, vocab = _recall_layout(num_keys, num_fill)
    total = 0.0
    for row, label in zip(tokens.tolist(), labels.tolist()):
        values = [row[i + 1] - value0 for i in range(2, len(row) - 1) if key0 <= row[i] < value0]
        values += [(t - pair0) % RECALL_NUM_VALUES for t in row[2:] if pair0 <= t < vocab]
        total += values.count(label) / len(values)
    return total / len(labels)


def solve_recall(tokens: Tensor, *, num_keys: int = 8, num_fill: int = 1) -> Tensor:
    """Brute force: for each row, find the queried key after position 1 (a key token followed by its value, or a
    fused pair token) and read its value. ``(batch, seq)`` -> ``(batch,)``."""
    key0, value0, pair0, vocab = _recall_layout(num_keys, num_fill)
    answers = []
    for row in tokens.tolist():
        if row[0] != RECALL_QUERY:
            raise ValueError("recall row does not start with the QUERY token")
        key = row[1] - key0
        found = [row[i + 1] - value0 for i in range(2, len(row) - 1) if row[i] == row[1]]
        found += [
            (t - pair0) % RECALL_NUM_VALUES
            for t in row[2:]
            if pair0 <= t < vocab and (t - pair0) // RECALL_NUM_VALUES == key
        ]
        if len(found) != 1:
            raise ValueError(f"queried key occurs {len(found)} times after the query, expected once")
        answers.append(found[0])
    return torch.tensor(answers, dtype=torch.long)


# ------------------------------------------------------------------------------------------------------- ListOps-lite
LISTOPS_PAD = 0
LISTOPS_DIGIT0 = 1  # digits 0..9 -> tokens 1..10
LISTOPS_OPS = ("MAX", "MIN", "MED", "SM")
LISTOPS_OP0 = 11  # "[MAX" .. "[SM" -> 11..14
LISTOPS_CLOSE = 15
LISTOPS_VOCAB = 16


def _apply(op: str, values: list[int]) -> int:
    if op == "MAX":
        return max(values)
    if op == "MIN":
        return min(values)
    if op == "MED":
        ordered = sorted(values)
        return ordered[len(ordered) // 2]  # the upper median, so the result is always a digit
    if op == "SM":
        return sum(values) % 10
    raise ValueError(f"unknown ListOps operator {op!r}")


def _subtree(rng: random.Random, depth: int, max_depth: int, max_args: int, nest_prob: float) -> list[int]:
    """Tokens of one operator node with 2..max_args arguments (nested with ``nest_prob`` while depth allows)."""
    tokens = [LISTOPS_OP0 + rng.randrange(len(LISTOPS_OPS))]
    for _ in range(rng.randint(2, max_args)):
        if depth < max_depth and rng.random() < nest_prob:
            tokens += _subtree(rng, depth + 1, max_depth, max_args, nest_prob)
        else:
            tokens.append(LISTOPS_DIGIT0 + rng.randrange(10))
    tokens.append(LISTOPS_CLOSE)
    return tokens


def listops_batch(
    batch_size: int,
    seq_len: int,
    seed: int,
    *,
    max_depth: int = 2,
    max_args: int = 5,
    nest_prob: float = 0.5,
    min_fill: float = 0.5,
) -> TaskBatch:
    """ListOps-lite batch (see the module docstring).

    Each row is ``[OP a_1 ... a_m ]`` where the top-level operator keeps taking arguments (digits, or nested nodes of
    at most ``max_depth - 1`` further levels with 2..``max_args`` arguments each) until the next argument would pass
    a target length drawn uniformly from ``[min_fill * seq_len, seq_len]``; padding follows.
    """
    _check_positive("batch_size", batch_size)
    _check_positive("max_depth", max_depth)
    if max_args < 2:
        raise ValueError(f"max_args must be >= 2, got {max_args}")
    if not 0.0 <= nest_prob <= 1.0:
        raise ValueError(f"nest_prob must be in [0, 1], got {nest_prob}")
    if not 0.0 < min_fill <= 1.0:
        raise ValueError(f"min_fill must be in (0, 1], got {min_fill}")
    if seq_len < 8:
        raise ValueError(f"seq_len must be >= 8 for listops, got {seq_len}")
    rng = random.Random(seed)
    tokens = torch.full((batch_size, seq_len), LISTOPS_PAD, dtype=torch.long)
    mask = torch.zeros(batch_size, seq_len, dtype=torch.bool)
    for row in range(batch_size):
        target = rng.randint(max(4, int(min_fill * seq_len)), seq_len)
        expr = [LISTOPS_OP0 + rng.randrange(len(LISTOPS_OPS))]
        while True:
            if max_depth > 1 and rng.random() < nest_prob:
                arg = _subtree(rng, 2, max_depth, max_args, nest_prob)
            else:
                arg = [LISTOPS_DIGIT0 + rng.randrange(10)]
            if len(expr) + len(arg) + 1 > target:
                if len(expr) >= 3:  # operator and at least two arguments
                    break
                arg = [LISTOPS_DIGIT0 + rng.randrange(10)]
            expr += arg
        expr.append(LISTOPS_CLOSE)
        tokens[row, : len(expr)] = torch.tensor(expr)
        mask[row, : len(expr)] = True
    labels = torch.tensor([evaluate_listops(row) for row in tokens.tolist()], dtype=torch.long)
    return TaskBatch(tokens, mask, labels)


def evaluate_listops(row: list[int]) -> int:
    """Value of one tokenised expression (padding after it ignored), evaluated with an explicit stack."""
    stack: list[tuple[str, list[int]]] = []
    result: int | None = None
    for token in row:
        if token == LISTOPS_PAD:
            if not stack:
                continue
            raise ValueError("padding inside an unfinished ListOps expression")
        if result is not None:
            raise ValueError("tokens after a finished ListOps expression")
        if LISTOPS_OP0 <= token < LISTOPS_OP0 + len(LISTOPS_OPS):
            stack.append((LISTOPS_OPS[token - LISTOPS_OP0], []))
        elif token == LISTOPS_CLOSE:
            op, values = stack.pop()
            value = _apply(op, values)
            if stack:
                stack[-1][1].append(value)
            else:
                result = value
        elif LISTOPS_DIGIT0 <= token < LISTOPS_DIGIT0 + 10:
            if not stack:
                raise ValueError("digit outside any ListOps operator")
            stack[-1][1].append(token - LISTOPS_DIGIT0)
        else:
            raise ValueError(f"token {token} is not in the ListOps vocabulary")
    if result is None or stack:
        raise ValueError("unfinished ListOps expression")
    return result


def solve_listops(tokens: Tensor) -> Tensor:
    """Brute force: evaluate every row. ``(batch, seq)`` -> ``(batch,)``."""
    return torch.tensor([evaluate_listops(row) for row in tokens.tolist()], dtype=torch.long)


# -------------------------------------------------------------------------------------- multi-query associative recall
MQAR_BLANK = 0
MQAR_DEFAULTS = {"num_pairs": 4, "num_keys": 16, "num_values": 16, "num_queries": None}


def mqar_vocab_size(num_keys: int = MQAR_DEFAULTS["num_keys"], num_values: int = MQAR_DEFAULTS["num_values"]) -> int:
    """Vocabulary of :func:`mqar_batch`: the blank (0), keys ``1..num_keys``, then ``num_values`` value tokens."""
    return 1 + num_keys + num_values


def mqar_batch(
    batch_size: int,
    seq_len: int,
    seed: int,
    *,
    num_pairs: int = MQAR_DEFAULTS["num_pairs"],
    num_keys: int = MQAR_DEFAULTS["num_keys"],
    num_values: int = MQAR_DEFAULTS["num_values"],
    num_queries: int | None = MQAR_DEFAULTS["num_queries"],
) -> TaskBatch:
    """MQAR batch (see the module docstring); an ``"lm"`` task with no padding.

    Layout per row: positions ``0 .. 2P-1`` hold the pairs (key ``1 + key_index``, value
    ``1 + num_keys + value_index``); the rest is split into two-token slots ``(2P + 2j, 2P + 2j + 1)``, of which
    ``num_queries`` chosen uniformly hold a query ``k v`` (a key of the pairs, each queried at most once, in random
    order); unused slots are blank. Values are drawn uniformly with replacement, so a model that ignores the pairs
    is right with probability ``1 / num_values``. ``labels[b, t]`` is the value at ``t + 1`` where ``t`` is a query
    key, :data:`IGNORE` elsewhere (the pairs themselves are not scored: their values are unpredictable).

    Args:
        batch_size, seq_len: output shape ``(batch_size, seq_len)``.
        seed: the only source of randomness.
        num_pairs: key-value pairs per row (1..num_keys); num_keys, num_values: key and value vocabularies.
        num_queries: queries per row (1..num_pairs; default all pairs); the row must hold them:
            ``seq_len >= 2 * num_pairs + 2 * num_queries``.
    """
    _check_positive("batch_size", batch_size)
    _check_positive("num_keys", num_keys)
    _check_positive("num_values", num_values)
    _check_positive("num_pairs", num_pairs)
    if num_pairs > num_keys:
        raise ValueError(f"num_pairs must be in [1, num_keys={num_keys}], got {num_pairs}")
    queries = num_pairs if num_queries is None else num_queries
    _check_positive("num_queries", queries)
    if queries > num_pairs:
        raise ValueError(f"num_queries must be in [1, num_pairs={num_pairs}], got {queries}")
    slots = (seq_len - 2 * num_pairs) // 2
    if slots < queries:
        raise ValueError(
            f"seq_len={seq_len} holds {max(slots, 0)} query slots after {num_pairs} pairs, fewer than "
            f"num_queries={queries}; need seq_len >= {2 * num_pairs + 2 * queries}"
        )
    gen = torch.Generator().manual_seed(seed)
    key_ids = torch.rand(batch_size, num_keys, generator=gen).argsort(dim=1)[:, :num_pairs]  # distinct keys
    values = torch.randint(0, num_values, (batch_size, num_pairs), generator=gen)
    asked = torch.rand(batch_size, num_pairs, generator=gen).argsort(dim=1)[:, :queries]  # which pairs, in order
    slot_ids = torch.rand(batch_size, slots, generator=gen).argsort(dim=1)[:, :queries].sort(dim=1).values
    keys_tok = 1 + key_ids
    values_tok = 1 + num_keys + values
    tokens = torch.full((batch_size, seq_len), MQAR_BLANK, dtype=torch.long)
    tokens[:, 0 : 2 * num_pairs : 2] = keys_tok
    tokens[:, 1 : 2 * num_pairs : 2] = values_tok
    query_pos = 2 * num_pairs + 2 * slot_ids  # (batch, queries)
    tokens.scatter_(1, query_pos, keys_tok.gather(1, asked))
    tokens.scatter_(1, query_pos + 1, values_tok.gather(1, asked))
    labels = torch.full((batch_size, seq_len), IGNORE, dtype=torch.long)
    labels.scatter_(1, query_pos, values_tok.gather(1, asked))
    return TaskBatch(tokens, torch.ones(batch_size, seq_len, dtype=torch.bool), labels)


def solve_mqar(
    tokens: Tensor,
    *,
    num_pairs: int = MQAR_DEFAULTS["num_pairs"],
    num_keys: int = MQAR_DEFAULTS["num_keys"],
    num_values: int = MQAR_DEFAULTS["num_values"],
    num_queries: int | None = None,
) -> Tensor:
    """Brute force: every key token after the pairs is a query; look its key up among the pairs (never reading the
    token after the query) and answer the paired value. ``(batch, seq)`` -> labels ``(batch, seq)`` with
    :data:`IGNORE` at unscored positions. ``num_values`` and ``num_queries`` only check the input."""
    out = torch.full(tokens.shape, IGNORE, dtype=torch.long)
    for row_index, row in enumerate(tokens.tolist()):
        table: dict[int, int] = {}
        for i in range(0, 2 * num_pairs, 2):
            key, value = row[i], row[i + 1]
            if not (1 <= key <= num_keys and num_keys < value <= num_keys + num_values) or key in table:
                raise ValueError(f"row {row_index}: position {i} is not a fresh key-value pair")
            table[key] = value
        asked = 0
        for t in range(2 * num_pairs, len(row) - 1):
            if 1 <= row[t] <= num_keys:
                if row[t] not in table:
                    raise ValueError(f"row {row_index}: query key {row[t]} at {t} is in no pair")
                out[row_index, t] = table[row[t]]
                asked += 1
        if num_queries is not None and asked != num_queries:
            raise ValueError(f"row {row_index}: {asked} queries, expected {num_queries}")
    return out


# ----------------------------------------------------------------------------------------------------------- registry
class TaskInfo(NamedTuple):
    """A task: its batch generator, its brute-force solver, vocabulary size and number of classes.

    ``kind`` is ``"classify"`` (one label per row, encoder classifier) or ``"lm"`` (labels per position, causal LM).
    For an ``"lm"`` task ``num_classes`` is the number of possible answers (chance is ``1 / num_classes``).
    ``vocab_for(**params)`` gives the vocabulary for non-default generator parameters (None: it never changes).
    """

    name: str
    generate: Callable[..., TaskBatch]
    solve: Callable[[Tensor], Tensor]
    vocab_size: int
    num_classes: int
    description: str
    kind: str = "classify"
    vocab_for: Callable[..., int] | None = None

    def vocab(self, params: dict[str, Any] | None = None) -> int:
        """The vocabulary size with generator parameters ``params`` (a misspelt name is a ``TypeError``)."""
        if not params or self.vocab_for is None:
            return self.vocab_size
        return self.vocab_for(**params)


def _recall_vocab_for(
    *,
    num_pairs: int = 4,
    num_keys: int = 8,
    num_fill: int = 1,
    min_distance: int | None = None,
    max_distance: int | None = None,
    pair_format: str = "split",
) -> int:
    return recall_vocab_size(num_keys, num_fill)


def _mqar_vocab_for(
    *,
    num_pairs: int = MQAR_DEFAULTS["num_pairs"],
    num_keys: int = MQAR_DEFAULTS["num_keys"],
    num_values: int = MQAR_DEFAULTS["num_values"],
    num_queries: int | None = None,
) -> int:
    return mqar_vocab_size(num_keys, num_values)


TASKS: dict[str, TaskInfo] = {
    "recall": TaskInfo(
        "recall",
        recall_batch,
        solve_recall,
        recall_vocab_size(),
        RECALL_NUM_VALUES,
        "associative recall: value of the queried key, which sits in the second half of the sequence",
        vocab_for=_recall_vocab_for,
    ),
    "listops": TaskInfo(
        "listops",
        listops_batch,
        solve_listops,
        LISTOPS_VOCAB,
        10,
        "ListOps-lite: value of a nested MAX/MIN/MED/SUM-MOD-10 expression over digits",
    ),
    "mqar": TaskInfo(
        "mqar",
        mqar_batch,
        solve_mqar,
        mqar_vocab_size(),
        MQAR_DEFAULTS["num_values"],
        "multi-query associative recall (causal LM): the value after each query key, looked up among the pairs",
        kind="lm",
        vocab_for=_mqar_vocab_for,
    ),
}


def make_batch(task: str, batch_size: int, seq_len: int, seed: int) -> TaskBatch:
    """A batch of the named task with its default difficulty; ``KeyError`` naming the tasks when unknown."""
    if task not in TASKS:
        raise KeyError(f"unknown task {task!r}; choose from {', '.join(TASKS)}")
    return TASKS[task].generate(batch_size, seq_len, seed)


def _check_positive(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
