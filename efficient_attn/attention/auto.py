"""What ``backend="auto"`` runs: one table, keyed by (variant family, device type, needs_grad).

``auto`` never changes *what* is computed (the pattern is the variant's); it only picks *how*. The first preference
that is available for the call (device, mode, input dtype, dropout) and whose minimum length the input reaches is
taken, and ``attend`` records it in ``last_backend`` (the harness writes it into every result row).

Families: ``full`` (non-causal), ``full-causal``, and the pattern variants by key (``window``, ``bigbird``,
``longformer``; causal or not, same row). A row lists :class:`Choice` entries in order of preference, and
``evidence`` says which measurement put them in that order (or ``"unmeasured"``).

The CPU rows come from forward timings on this machine class (2 cores, torch 2.13 CPU, batch 1, 4 heads,
head_dim 64, float32, ``effattn bench`` medians on a quiet machine; see each row's ``evidence``): the blocked
``torch`` backend leads every pattern row there, and ``sdpa`` every full-attention row. FlexAttention is
forward-only on CPU, so every CPU ``needs_grad=True`` row starts with a backend that has a backward. Where ``flex``
is preferred (the CUDA rows) it is only chosen from ``FLEX_MIN_LEN`` tokens on: each new shape costs seconds of
compilation, which a short input never earns back. ``backend="flex"`` always remains selectable explicitly.

With ``alibi=True`` a backend without ALiBi (``sdpa``, ``xformers``) is skipped, so every full-attention row ends
with the blocked ``torch`` backend as the fallback that adds it.

CUDA rows are *unmeasured* (no GPU was available): they follow the kernels' published behaviour (fused
FlashAttention-style kernels first, the blocked PyTorch backend last) until a GPU run replaces them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from efficient_attn.attention import flex as flex_backend
from efficient_attn.attention import xformers_backend

#: Shortest input for which ``auto`` compiles FlexAttention on CPU (compile 5-50 s per shape here).
FLEX_MIN_LEN = 2048


@dataclass(frozen=True)
class Choice:
    """One preference: run ``backend`` when the input has at least ``min_len`` tokens (and the backend is available)."""

    backend: str
    min_len: int = 0


@dataclass(frozen=True)
class AutoRow:
    """Ordered preferences of one (family, device type, needs_grad), and the evidence behind the order."""

    choices: tuple[Choice, ...]
    evidence: str


def _pattern_rows(key: str, cpu_forward: tuple[Choice, ...], evidence: str) -> dict[tuple[str, str, bool], AutoRow]:
    return {
        (key, "cpu", False): AutoRow(cpu_forward, evidence),
        (key, "cpu", True): AutoRow((Choice("torch"),), "only backend with a backward on CPU (flex is forward-only)"),
        (key, "cuda", False): AutoRow(_FLEX_THEN_TORCH, "unmeasured"),
        (key, "cuda", True): AutoRow(_FLEX_THEN_TORCH, "unmeasured"),
    }


_FLEX_THEN_TORCH = (Choice("flex", FLEX_MIN_LEN), Choice("torch"))

#: The table ``auto`` reads (see the module docstring). Evidence: forward ms, median (``[IQR]`` where given),
#: ``scripts/measure_auto_table.py`` on the quiet 2-core reference machine, 2026-12-02 (second session), nothing else
#: running, after issue 18's kernel changes (64-key window blocks, strided views everywhere, extra keys merged by
#: log-sum-exp, whole-block gathers; batch 1, 4 heads, head_dim 64, float32, default pattern parameters:
#: window/longformer ``window_size=256``, longformer 1 global token, bigbird block 64, 3 random, 2 global, 3 window).
#: On this CPU the blocked ``torch`` backend (per-chunk fused flash kernels) is faster than compiled FlexAttention at
#: 4K and 16K for every pattern (window at 4K, where flex led by 20% before these changes, included) and compiles
#: nothing, so it leads every CPU row. (The script times flex right after compiling it in the same process; its
#: torch figures at 16K read 20-40% above ``scripts/sparse_vs_sdpa.py``'s interleaved medians of the same code.)
#: (Measurements on a machine loaded by other jobs once favoured flex for window and longformer; they did not survive
#: a quiet rerun.)
AUTO_TABLE: dict[tuple[str, str, bool], AutoRow] = {
    ("full", "cpu", False): AutoRow(
        (Choice("sdpa"), Choice("torch")), "flex skips nothing for all pairs; not measured apart"
    ),
    ("full", "cpu", True): AutoRow((Choice("sdpa"), Choice("torch")), "sdpa has a fused backward; flex has none on CPU"),
    ("full", "cuda", False): AutoRow((Choice("sdpa"), Choice("xformers"), Choice("torch")), "unmeasured"),
    ("full", "cuda", True): AutoRow((Choice("sdpa"), Choice("xformers"), Choice("torch")), "unmeasured"),
    ("full-causal", "cpu", False): AutoRow(
        (Choice("sdpa"), Choice("torch")),
        "4K: sdpa 64.2 [1.4] vs flex 90.7 [2.2]; 16K: sdpa 1012 [24.5] vs flex 1191 [80.0]",
    ),
    ("full-causal", "cpu", True): AutoRow(
        (Choice("sdpa"), Choice("torch")), "sdpa has a fused backward; flex has none on CPU"
    ),
    ("full-causal", "cuda", False): AutoRow((Choice("sdpa"), Choice("flex"), Choice("torch")), "unmeasured"),
    ("full-causal", "cuda", True): AutoRow((Choice("sdpa"), Choice("flex"), Choice("torch")), "unmeasured"),
    **_pattern_rows(
        "window",
        (Choice("torch"),),
        "4K: torch 24.3 vs flex 27.1 (flex compile 1.4 s); 16K: torch 99.1 vs flex 117",
    ),
    **_pattern_rows(
        "bigbird", (Choice("torch"),), "4K: torch 41.5 vs flex 85.7 (flex compile 1.6 s); 16K: torch 153 vs flex 311"
    ),
    **_pattern_rows(
        "longformer", (Choice("torch"),), "4K: torch 32.3 vs flex 45.1 (flex compile 1.4 s); 16K: torch 120 vs flex 178"
    ),
}


def backend_unavailable_reason(
    backend: str, device: torch.device | str, needs_grad: bool, dtype: torch.dtype | None = None
) -> str | None:
    """Why a fused backend (``flex``, ``xformers``) cannot run here; None for it can and for every other backend."""
    if backend == "flex":
        return flex_backend.unavailable_reason(device, needs_grad, dtype)
    if backend == "xformers":
        return xformers_backend.unavailable_reason(device, needs_grad)
    return None


def choose_backend(
    family: str,
    device: torch.device | str,
    needs_grad: bool,
    *,
    seq_len: int | None,
    is_available: Callable[[str], bool],
) -> str:
    """The first preference of ``AUTO_TABLE[(family, device.type, needs_grad)]`` that runs this input.

    Args:
        family: ``"full"``, ``"full-causal"`` or a pattern variant key.
        device: where the inputs live.
        needs_grad: whether backward will run.
        seq_len: the input's length; None (unknown) skips every choice with a ``min_len``.
        is_available: ``backend -> bool`` for this call (device, mode, dtype, dropout).

    Raises:
        KeyError: no row for ``family`` on this device type (names the rows that exist).
        RuntimeError: no preference of the row is available.
    """
    device = torch.device(device)
    key = (family, device.type, needs_grad)
    if key not in AUTO_TABLE:
        known = sorted({f"{f}/{d}" for f, d, _ in AUTO_TABLE})
        raise KeyError(f"auto has no row for family {family!r} on {device.type!r}; rows: {', '.join(known)}")
    row = AUTO_TABLE[key]
    for choice in row.choices:
        long_enough = choice.min_len == 0 or (seq_len is not None and seq_len >= choice.min_len)
        if long_enough and is_available(choice.backend):
            return choice.backend
    tried = ", ".join(c.backend for c in row.choices)
    raise RuntimeError(f"auto found no available backend for {family!r} on {device.type} (tried {tried})")


class FusedBackendsMixin:
    """Gives a variant ``auto`` from :data:`AUTO_TABLE` and dtype-aware availability of ``flex`` / ``xformers``.

    Mix in before :class:`~efficient_attn.attention.base.Attention`. FlexAttention on CPU depends on the input's
    dtype (no float64 kernel) and only pays off for long inputs; ``Attention.resolve_backend`` passes both.
    """

    @property
    def auto_family(self) -> str:
        """The :data:`AUTO_TABLE` family of this module."""
        key = self.spec_key  # type: ignore[attr-defined]
        if key == "full":
            return "full-causal" if self.config.causal else "full"  # type: ignore[attr-defined]
        return key

    def auto_backend(
        self, device: torch.device, needs_grad: bool, *, seq_len: int | None = None, dtype: torch.dtype | None = None
    ) -> str:
        """The backend :data:`AUTO_TABLE` picks for this module, device, mode, length and dtype."""

        def is_available(backend: str) -> bool:
            if backend == "flex" and self.dropout_p > 0.0:  # type: ignore[attr-defined]
                return False  # FlexAttention has no attention dropout
            if self.config.alibi and backend not in self.alibi_backends:  # type: ignore[attr-defined]
                return False  # e.g. sdpa would need a dense bias
            return self.unavailable_reason(backend, device, needs_grad, dtype) is None

        return choose_backend(self.auto_family, device, needs_grad, seq_len=seq_len, is_available=is_available)

    @classmethod
    def unavailable_reason(
        cls, backend: str, device: torch.device | str, needs_grad: bool, dtype: torch.dtype | None = None
    ) -> str | None:
        """Why ``backend`` cannot run on ``device`` for ``dtype`` (None = any dtype); None when it can."""
        return backend_unavailable_reason(backend, torch.device(device), needs_grad, dtype)
