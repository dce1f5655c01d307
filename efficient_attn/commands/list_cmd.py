"""``effattn list``: the registered variants, what they cost, what they support, which backends run here.

Beyond causal masking and key padding the table shows the capabilities of :func:`efficient_attn.attention.base.capabilities`:
grouped key/value heads (``gqa``), ALiBi (the backends that add it), packed documents (``packing``: yes, or the
backends that accept ``document_ids``) and cross-attention (``cross``: query length != key length).

A second table lists the peers a suite's ``[[peers]]`` can name (other libraries' implementations,
:mod:`efficient_attn.peers`, and at level ``hf`` transformers' own attention implementations), with the levels and
modes they run at.
"""

from __future__ import annotations

import argparse

import torch

from efficient_attn.attention.base import capabilities
from efficient_attn.errors import did_you_mean
from efficient_attn.registry import AttentionSpec, get_spec, list_attentions
from efficient_attn.vocab import DEVICES


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("pattern", nargs="?", default=None, help="glob filter on keys, e.g. '*former'")
    parser.add_argument(
        "--device", default="auto", type=device_name,
        help=f"device to check backend availability on: {', '.join(DEVICES)} (auto: cuda if present, else cpu)",
    )


def device_name(text: str) -> str:
    """A name of :data:`efficient_attn.vocab.DEVICES` (a typo is a one-line usage error naming the nearest)."""
    if text not in DEVICES:
        raise argparse.ArgumentTypeError(f"{text!r} is not a device{did_you_mean(text, DEVICES)} "
                                         f"(allowed: {', '.join(DEVICES)})")
    return text


def available_backends(spec: AttentionSpec, device: torch.device) -> tuple[list[str], list[str]]:
    """Backends of ``spec`` that can run forward on ``device``, and the others with their reasons."""
    usable, unusable = [], []
    for backend in spec.backends:
        reason = spec.module_cls.unavailable_reason(backend, device, False)
        if reason is None:
            usable.append(backend)
        else:
            unusable.append(f"{backend} ({reason})")
    return usable, unusable


def _yes_no_or_backends(value: object) -> str:
    if isinstance(value, tuple):
        return ",".join(value) if value else "no"
    return "yes" if value else "no"


def capability_cells(spec: AttentionSpec) -> list[str]:
    """The ``gqa``, ``alibi``, ``packing`` and ``cross`` cells of one variant's row."""
    caps = capabilities(spec.module_cls)
    return [_yes_no_or_backends(caps[name]) for name in ("gqa", "alibi", "packing", "cross")]


def format_table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths)), "  ".join("-" * w for w in widths)]
    lines += ["  ".join(str(c).ljust(w) for c, w in zip(row, widths)) for row in rows]
    return "\n".join(lines)


def peer_rows() -> list[list[str]]:
    """One row per peer: name, levels, modes, package (installed version or ``missing``), description."""
    import importlib.metadata

    from efficient_attn.peers import TRANSFORMERS_PEERS, list_peers, peer_info

    rows = []
    for name in list_peers():
        info = peer_info(name)
        rows.append([name, ",".join(info["levels"]), ",".join(info["modes"]),
                     f"{info['package']} {info['version'] or 'missing'}", info["description"]])
    try:
        version = importlib.metadata.version("transformers")
    except importlib.metadata.PackageNotFoundError:
        version = "missing"
    for name, implementation in TRANSFORMERS_PEERS.items():
        modes = "fwd" if implementation == "flex_attention" else "fwd,fwd_bwd,train_step"
        rows.append([name, "hf", modes + (" (cuda: all)" if implementation == "flex_attention" else ""),
                     f"transformers {version}",
                     f"transformers' own attn_implementation={implementation!r} in a LlamaModel (level hf)"])
    return rows


def run(args: argparse.Namespace) -> int:
    name = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    rows, notes = [], []
    for key in list_attentions(args.pattern):
        spec = get_spec(key)
        usable, unusable = available_backends(spec, device)
        rows.append(
            [
                key,
                spec.complexity,
                "exact" if spec.exact else "approx",
                "yes" if spec.supports_causal else "no",
                "yes" if spec.supports_key_padding else "no",
                *capability_cells(spec),
                ",".join(usable) or "-",
                spec.description,
            ]
        )
        notes += [f"  {key}: {u}" for u in unusable]
    header = ["key", "cost", "kind", "causal", "padding", "gqa", "alibi", "packing", "cross",
              f"backends on {device.type}", "description"]
    print(format_table(rows, header))
    if notes:
        print(f"\nbackends not available on {device.type}:")
        print("\n".join(notes))
    if args.pattern is None:
        print("\npeers (a suite's [[peers]], run with --peers):")
        print(format_table(peer_rows(), ["peer", "levels", "modes", "package", "description"]))
    return 0
