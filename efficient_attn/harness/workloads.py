"""The callable one benchmark cell times: a level (what runs) crossed with a mode (which passes run).

Levels:

* ``core``: ``attention.attend(q, k, v)`` on q, k, v ``(batch, heads, seq, head_dim)``: the algorithm, no projections.
* ``layer``: ``attention(x)`` on x ``(batch, seq, heads * head_dim)``: QKV and output projections included; the level
  peers (other libraries' implementations, :mod:`efficient_attn.peers`) are compared at.
* ``model``: the shared backbone of :func:`efficient_attn.build_model` (``depth`` blocks) on tokens ``(batch, seq)``:
  a causal LM when the cell is causal, an encoder classifier otherwise.
* ``hf``: a Hugging Face transformers ``LlamaModel`` (``depth`` layers, random weights) on tokens ``(batch, seq)``,
  its attention ours (registered through transformers' ``AttentionInterface``) or one of its own implementations
  (the ``transformers-*`` peers): :mod:`efficient_attn.harness.hf_workload`. Its output is the last hidden state,
  whose sum is the loss. No cache modes (the harness's prefill/decode protocol is ours, not transformers').

Modes:

* ``fwd``: forward under ``torch.no_grad()``.
* ``fwd_bwd``: forward, a scalar loss (the output's sum at core/layer level, cross-entropy at model level), backward.
  Gradients are cleared (set to None) at the start of every call, so calls do not accumulate.
* ``train_step``: ``fwd_bwd`` plus an AdamW step. At core level the optimised tensors are the module's parameters (if
  any) and q, k, v themselves. AdamW's state is created by the first (warm-up) call.
* ``prefill``, ``decode`` (core and layer level, causal): a call over the prompt that fills a fresh decode cache, and
  one single-token step against a cache filled to ``seq_len`` (:mod:`efficient_attn.harness.decoding`; the decode
  cache is made and filled when the workload is built, so it is setup, like the parameters).

Modules run in train mode (dropout is 0 unless a cell's params set it): HF BigBird uses no random blocks in eval
mode, so peers are timed in train mode, and our variants likewise for a like-for-like comparison.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch._subclasses.fake_tensor import FakeTensor, unset_fake_temporarily

from efficient_attn.harness.plan import Cell
from efficient_attn.measure.flops import useful_flops_for_mode
from efficient_attn.model import build_model
from efficient_attn.registry import build_attention, get_spec
from efficient_attn.vocab import CACHE_MODES, DTYPE_NAMES, GRAD_MODES, LEVELS, MODES

__all__ = [
    "DTYPES",
    "Workload",
    "attention_params_for",
    "build_cell_module",
    "build_workload",
    "parse_dtype",
]

#: timed single-token steps of a decode cell when a suite does not say (``decode_steps``)
DEFAULT_DECODE_STEPS = 32

#: the torch dtype of each name in :data:`efficient_attn.vocab.DTYPE_NAMES` (the names are torch's own)
DTYPES: dict[str, torch.dtype] = {name: getattr(torch, name) for name in DTYPE_NAMES}


def parse_dtype(name: str) -> torch.dtype:
    """``"float32" | "bfloat16" | "float16"`` -> the torch dtype; ``ValueError`` otherwise."""
    try:
        return DTYPES[name]
    except KeyError:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}; got {name!r}") from None


@dataclass
class Workload:
    """A built cell, ready to call.

    Attributes:
        run: one unit of work (no arguments).
        module: the module that runs (attention, peer or model).
        attentions: the attention modules inside (to read ``last_backend`` / ``last_padded_len``); empty for peers
            (a peer module records ``last_padded_len`` and ``last_note`` itself).
        tokens: ``batch * seq_len`` per call.
        mode: the cell's mode (for :attr:`useful_flops`).
    """

    run: Callable[[], None]
    module: nn.Module
    attentions: list[nn.Module]
    tokens: int
    mode: str
    seq_len: int
    batch_size: int
    #: the decode cache's exact bytes after the last call (prefill, decode); None for the other modes
    cache_bytes: Callable[[], int | None] | None = None
    #: the packed documents' lengths (empty for an ordinary cell): useful FLOPs are then each document's own
    documents: tuple[int, ...] = ()
    #: what a reader of the row must know about how it ran (e.g. how much a padded batch pads)
    note: str = ""

    @property
    def useful_flops(self) -> int | None:
        """Useful FLOPs of one ``run()``: the attention cores' ``useful_flops`` (summed over the model's layers),
        times 3 with a backward (see :mod:`efficient_attn.measure.flops`); None when a module cannot say (peers).
        Computed on demand: some patterns count their pairs with real tensors, which fake tensors cannot do."""
        if self.mode == "decode" or not self.attentions or not all(hasattr(a, "useful_flops") for a in self.attentions):
            return None  # a decode step's pairs are the cache's, not a sequence's: FlopCounterMode's count stands
        if self.documents:  # each document's own pairs, however the documents ran
            forward = sum(int(a.useful_flops(1, n)) for a in self.attentions for n in self.documents)
        else:
            forward = sum(int(a.useful_flops(self.batch_size, self.seq_len)) for a in self.attentions)
        return useful_flops_for_mode(forward, self.mode)

    @property
    def last_backend(self) -> str | None:
        return getattr(self.attentions[0], "last_backend", None) if self.attentions else None

    @property
    def last_padded_len(self) -> int | None:
        # our attention modules and peers alike record the length they padded to in their last call
        source = self.attentions[0] if self.attentions else self.module
        return getattr(source, "last_padded_len", None)


def attention_params_for(cell: Cell) -> dict:
    """The attention config fields for ``cell``: its params, plus ``max_len = seq_len`` for variants bounded by a
    ``max_len`` field (Linformer's projections) when the params do not set it."""
    params = dict(cell.params)
    spec = get_spec(cell.variant)
    if spec.max_len_field is not None and spec.max_len_field not in params:
        params[spec.max_len_field] = cell.seq_len
    if cell.num_kv_heads is not None:
        params["num_kv_heads"] = cell.num_kv_heads
    return params


def _move(module: nn.Module, device: torch.device, dtype: torch.dtype) -> None:
    """``module.to(device, dtype)`` for floating tensors; fake tensors (memory prediction) are replaced one by one,
    since ``nn.Module.to`` swaps tensor subclasses in place, which fake tensors tracked by weakrefs refuse."""
    tensors = list(module.parameters()) + list(module.buffers())
    if all(t.device == device and (not t.is_floating_point() or t.dtype == dtype) for t in tensors):
        return
    if not any(isinstance(t, FakeTensor) for t in tensors):
        module.to(device=device, dtype=dtype)
        return
    for sub in module.modules():
        for name, param in list(sub._parameters.items()):
            if param is not None:
                moved = param.detach().to(device=device, dtype=dtype if param.is_floating_point() else param.dtype)
                sub._parameters[name] = nn.Parameter(moved, requires_grad=param.requires_grad)
        for name, buf in list(sub._buffers.items()):
            if buf is not None:
                sub._buffers[name] = buf.to(device=device, dtype=dtype if buf.is_floating_point() else buf.dtype)


def _loss(out: Tensor) -> Tensor:
    return out.sum()


def build_cell_module(cell: Cell, *, depth: int = 2, vocab_size: int = 256) -> tuple[nn.Module, list[nn.Module]]:
    """The module ``cell`` runs (on CPU, float32, as built) and the attention modules inside it.

    Raises:
        ValueError: unknown level; or what the registry / peers raise for bad params.
    """
    if cell.level not in LEVELS:
        raise ValueError(f"level must be one of {', '.join(LEVELS)}; got {cell.level!r}")
    if cell.level == "hf":
        raise ValueError("an 'hf' cell's transformers model is built with its device, dtype and seed by "
                         "build_workload (hf_workload.build_hf_parts), not as a CPU module to convert")
    h, n = cell.num_heads, cell.seq_len
    if cell.is_peer:
        from efficient_attn.peers import build_peer, peer_info  # lazy: optional packages behind it

        levels = peer_info(cell.variant)["levels"]
        if cell.level not in levels:
            raise ValueError(f"peer {cell.variant!r} runs at level {' or '.join(levels)}, not {cell.level!r}")
        params = {**cell.params, "causal": True} if cell.causal else cell.params
        return build_peer(cell.variant, dim=cell.dim, num_heads=h, seq_len=n, params=params), []
    if cell.level == "model":
        model = build_model(
            cell.variant,
            task="lm" if cell.causal else "classify",
            vocab_size=vocab_size,
            dim=cell.dim,
            depth=depth,
            num_heads=h,
            max_len=n,
            num_classes=None if cell.causal else 2,
            num_kv_heads=cell.num_kv_heads,
            backend=cell.backend_requested,
            **cell.params,
        )
        return model, [block.attn for block in model.blocks]
    module = build_attention(
        cell.variant, dim=cell.dim, num_heads=h, causal=cell.causal, backend=cell.backend_requested,
        **attention_params_for(cell),
    )
    return module, [module]


def build_workload(
    cell: Cell,
    *,
    device: torch.device | str | None = None,
    seed: int = 0,
    depth: int = 2,
    vocab_size: int = 256,
    built: tuple[nn.Module, list[nn.Module]] | None = None,
    decode_steps: int = DEFAULT_DECODE_STEPS,
) -> Workload:
    """Build the module and inputs of ``cell`` and the callable to time.

    Args:
        cell: the cell (variant, level, mode, shape, dtype, ...).
        device: overrides ``cell.device`` (the memory predictor builds on CPU fake tensors).
        seed: seeds parameter init and inputs.
        depth, vocab_size: backbone size at ``model`` level.
        built: a module already built by :func:`build_cell_module` (the predictor converts one to fake tensors).
        decode_steps: timed steps a decode cell will make (its cache is made with room for them).

    Raises:
        ValueError: unknown level or mode, a cache mode at model level; or what the registry / peers raise for bad
            params.
    """
    if cell.mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}; got {cell.mode!r}")
    if cell.mode in CACHE_MODES and cell.level in ("model", "hf"):
        raise ValueError(f"{cell.mode} cells run at level core or layer (a whole model generates with "
                         f"model.generate); got level {cell.level!r}")
    device = torch.device(device if device is not None else cell.device)
    dtype = parse_dtype(cell.dtype)
    torch.manual_seed(seed)
    b, n, h, d = cell.batch_size, cell.seq_len, cell.num_heads, cell.head_dim
    grad = cell.mode in GRAD_MODES
    note = ""
    if cell.level == "hf":
        module, forward, leaves, attentions = _hf_parts(cell, device=device, dtype=dtype, seed=seed, depth=depth,
                                                        vocab_size=vocab_size)
        return _workload(cell, forward, leaves, module=module, attentions=attentions, note=note)
    module, attentions = built if built is not None else build_cell_module(cell, depth=depth, vocab_size=vocab_size)
    _move(module, device, dtype)  # at model level: embeddings and norms too; tokens stay long
    module.train()
    if cell.mode in CACHE_MODES:
        return _cache_workload(cell, module, attentions, device=device, dtype=dtype, seed=seed, steps=decode_steps)

    params = [p for p in module.parameters() if p.requires_grad]
    if cell.packing is not None:
        if cell.level not in ("core", "layer"):
            raise ValueError(f"packed documents run at level core or layer, not {cell.level!r}")
        forward, inputs, note = _document_forward(cell, module, device=device, dtype=dtype, grad=grad)
        leaves = params + (inputs if cell.level == "core" else [])
    elif cell.level == "core":
        kv = cell.kv_heads
        qkv = [torch.randn(b, heads, n, d, device=device, dtype=dtype, requires_grad=grad) for heads in (h, kv, kv)]
        leaves = params + qkv

        def forward() -> Tensor:
            return module.attend(*qkv)

    elif cell.level == "layer":
        x = torch.randn(b, n, cell.dim, device=device, dtype=dtype)
        leaves = params

        def forward() -> Tensor:
            return module(x)

    else:
        tokens = torch.randint(0, vocab_size, (b, n), device=device)
        labels = tokens if cell.causal else torch.randint(0, 2, (b,), device=device)
        leaves = params

        def forward() -> Tensor:
            logits = module(tokens)
            return F.cross_entropy(logits.flatten(0, -2).float(), labels.flatten())

    return _workload(cell, forward, leaves, module=module, attentions=attentions, note=note)


def _workload(cell: Cell, forward: Callable[[], Tensor], leaves: list[Tensor], *, module: nn.Module,
              attentions: list[nn.Module], note: str) -> Workload:
    """The :class:`Workload` that runs ``forward`` in ``cell``'s mode (``fwd``, ``fwd_bwd``, ``train_step`` on
    ``leaves``)."""

    def clear_grads() -> None:
        for leaf in leaves:
            leaf.grad = None

    if cell.mode == "fwd":

        def run() -> None:
            with torch.no_grad():
                forward()

    elif cell.mode == "fwd_bwd":

        def run() -> None:
            clear_grads()
            _loss(forward()).backward()

    else:
        if not leaves:
            raise ValueError("train_step needs trainable tensors; this module has none")
        optimizer = torch.optim.AdamW(leaves, lr=1e-4)

        def run() -> None:
            clear_grads()
            _loss(forward()).backward()
            optimizer.step()

    b, n = cell.batch_size, cell.seq_len
    return Workload(run=run, module=module, attentions=attentions, tokens=b * n, mode=cell.mode, seq_len=n,
                    batch_size=b, documents=cell.document_lengths, note=note)


def _hf_parts(cell: Cell, *, device: torch.device, dtype: torch.dtype, seed: int, depth: int,
              vocab_size: int) -> tuple[nn.Module, Callable[[], Tensor], list[Tensor], list[nn.Module]]:
    """``(module, forward, leaves, attentions)`` of an ``hf`` cell (:func:`hf_workload.build_hf_parts`, ``depth``
    decoder layers, in train mode like every other level).

    ``attentions`` starts empty and is filled by the first call with our attention modules that ran in it (none for
    transformers' own implementations): the registration builds them on first use and shares them between the
    models of one registration (cells of other lengths included), so the ones of this cell are those whose
    ``last_backend`` the call set (every module of the registration is reset to None first)."""
    from efficient_attn.harness import hf_workload  # lazy: transformers is imported on use

    module, forward_model, leaves = hf_workload.build_hf_parts(cell, device=device, dtype=dtype, seed=seed,
                                                               layers=depth, vocab_size=vocab_size)
    module.train()
    attentions: list[nn.Module] = []

    def forward() -> Tensor:
        if attentions or hf_workload.TRANSFORMERS_PEERS.get(cell.variant):
            return forward_model()
        for attn in hf_workload.attention_modules_for(cell):
            attn.last_backend = None
        out = forward_model()
        attentions.extend(a for a in hf_workload.attention_modules_for(cell) if a.last_backend is not None)
        return out

    return module, forward, leaves, attentions


def _document_forward(cell: Cell, module: nn.Module, *, device: torch.device, dtype: torch.dtype,
                      grad: bool) -> tuple[Callable[[], Tensor], list[Tensor], str]:
    """``(forward, input leaves, note)`` of a packed-documents cell (see :mod:`efficient_attn.harness.schema`):
    ``packed`` one sequence with ``document_ids``, ``padded`` one row per document padded to the longest with a key
    padding mask, ``alone`` each document on its own (the forward returns the sum of their outputs' sums)."""
    docs = cell.document_lengths
    total, longest = sum(docs), max(docs)
    h, kv, d = cell.num_heads, cell.kv_heads, cell.head_dim
    core = cell.level == "core"

    def make(batch: int, n: int) -> list[Tensor]:
        if core:
            return [torch.randn(batch, heads, n, d, device=device, dtype=dtype, requires_grad=grad)
                    for heads in (h, kv, kv)]
        return [torch.randn(batch, n, cell.dim, device=device, dtype=dtype, requires_grad=False)]  # as ordinary layer cells

    def call(inputs: list[Tensor], **kwargs: Tensor) -> Tensor:
        return module.attend(*inputs, **kwargs) if core else module(inputs[0], **kwargs)

    if cell.packing == "packed":
        inputs = make(1, total)
        # built from the lengths, as a real tensor even under the memory prediction's fake mode: a packed attend
        # reads the document boundaries (attention/packing.py), which a fake tensor does not hold
        with unset_fake_temporarily():
            ids = torch.cat([torch.full((n,), i, dtype=torch.long, device=device) for i, n in enumerate(docs)])[None]
        return (lambda: call(inputs, document_ids=ids)), inputs, ""
    if cell.packing == "padded":
        inputs = make(len(docs), longest)
        mask = torch.arange(longest, device=device)[None] < torch.tensor(docs, device=device)[:, None]
        note = (f"padded: {len(docs)} rows of {longest} tokens, {len(docs) * longest - total} of "
                f"{len(docs) * longest} padding")
        return (lambda: call(inputs, key_padding_mask=mask)), inputs, note
    if cell.packing == "alone":
        parts = [make(1, n) for n in docs]

        def alone() -> Tensor:
            return sum(call(part).sum() for part in parts)  # type: ignore[return-value]

        return alone, [t for part in parts for t in part], f"alone: {len(docs)} calls, one per document"
    raise ValueError(f"packing must be one of packed, padded, alone; got {cell.packing!r}")



def _cache_workload(cell: Cell, module: nn.Module, attentions: list[nn.Module], *, device: torch.device,
                    dtype: torch.dtype, seed: int, steps: int) -> Workload:
    """A prefill or decode workload (see :mod:`efficient_attn.harness.decoding`); the module runs in eval mode."""
    from efficient_attn.harness import decoding

    module.eval()
    b, n = cell.batch_size, cell.seq_len
    if cell.mode == "decode":
        run, cache_bytes = decoding.build_decode_run(cell, module, steps=steps, seed=seed, device=device, dtype=dtype)
        tokens = b
    else:
        if cell.level == "core":
            inputs = [torch.randn(b, heads, n, cell.head_dim, device=device, dtype=dtype)
                      for heads in (cell.num_heads, cell.kv_heads, cell.kv_heads)]
        else:
            inputs = [torch.randn(b, n, cell.dim, device=device, dtype=dtype)]
        run, cache_bytes = decoding.build_prefill_run(cell, module, inputs, device=device, dtype=dtype)
        tokens = b * n
    return Workload(run=run, module=module, attentions=attentions, tokens=tokens, mode=cell.mode, seq_len=n,
                    batch_size=b, cache_bytes=cache_bytes)
