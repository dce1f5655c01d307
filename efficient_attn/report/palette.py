"""One colour per variant key, shared by the benchmark report and the quality report.

:func:`variant_colour` maps a registry key (or a peer's name) to a hex colour that depends on the key alone, never
on which other keys a report holds, so ``window`` is the same blue in every figure of every report:

- the built-in variants have fixed hues (:data:`VARIANT_COLOURS`: full black, window blue, longformer orange,
  bigbird green, linformer red, performer purple, nystrom brown), and so do the variants announced next
  (linear, retention, moba);
- a peer takes the hue of the variant it implements (:data:`PEER_VARIANTS`; a peer not listed there, the hue of
  the longest variant key its name contains);
- any other key takes one of :data:`SPARE_COLOURS`, chosen by a CRC-32 of its name (stable across processes and
  machines, unlike ``hash``). Two unknown keys can share a spare colour; give a new variant its own entry in
  :data:`VARIANT_COLOURS` when it lands.

:func:`series_palette` colours the benchmark report's series (``variant:backend[params]``, peers): the series of
one variant are shades of its hue, in backend order, peers after ours.
"""

from __future__ import annotations

import colorsys
import zlib
from collections.abc import Iterable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import pandas as pd

__all__ = [
    "BACKEND_ORDER",
    "PEER_VARIANTS",
    "SHADES",
    "SPARE_COLOURS",
    "VARIANT_COLOURS",
    "peer_variant",
    "series_palette",
    "shade",
    "variant_colour",
    "variant_colours",
]

VARIANT_COLOURS: dict[str, str] = {
    "full": "#1a1a1a",
    "window": "#1f77b4",
    "longformer": "#ff7f0e",
    "bigbird": "#2ca02c",
    "linformer": "#d62728",
    "performer": "#9467bd",
    "nystrom": "#8c564b",
    # announced variants, fixed now so their first report already uses their own colour
    "linear": "#e377c2",
    "retention": "#17becf",
    "moba": "#bcbd22",
}
#: peer name -> the registry key it implements (PEERS.md; efficient_attn.peers.PEERS)
PEER_VARIANTS: dict[str, str] = {
    "local-attention": "window",
    "hf-longformer": "longformer",
    "hf-bigbird": "bigbird",
    "linformer": "linformer",
    "hf-llama-decode": "full",  # its window_size twin is told apart by its parameters in the series name
    "transformers-sdpa": "full",  # transformers' own attention implementations at the hf level
    "transformers-eager": "full",
    "transformers-flex_attention": "full",
}
#: colours for keys without an entry above: distinct from the fixed hues, picked by a hash of the key
SPARE_COLOURS: tuple[str, ...] = (
    "#7f7f7f",
    "#3a5fcd",
    "#b8860b",
    "#008b8b",
    "#c71585",
    "#556b2f",
    "#8b008b",
    "#cd5c5c",
    "#4682b4",
    "#6b4226",
)
#: order of a variant's backends when they share its hue (first = the pure hue)
BACKEND_ORDER: tuple[str, ...] = ("naive", "torch", "sdpa", "flex", "xformers")
#: lightness changes for the 1st, 2nd, ... series of one variant (0 = the hue itself)
SHADES: tuple[float, ...] = (0.0, 0.45, -0.35, 0.65, -0.55, 0.25)


def peer_variant(name: str) -> str | None:
    """The registry key a peer implements: from :data:`PEER_VARIANTS`, else the longest known key in its name."""
    if name in PEER_VARIANTS:
        return PEER_VARIANTS[name]
    lowered = name.lower()
    found = [key for key in VARIANT_COLOURS if key in lowered]
    return max(found, key=len) if found else None


def variant_colour(key: str, *, is_peer: bool = False) -> str:
    """The hex colour of a variant key (or, with ``is_peer``, of a peer's name); the same in every report."""
    if is_peer:
        key = peer_variant(key) or key
    if key in VARIANT_COLOURS:
        return VARIANT_COLOURS[key]
    return SPARE_COLOURS[zlib.crc32(key.encode("utf-8")) % len(SPARE_COLOURS)]


def variant_colours(keys: Iterable[str]) -> dict[str, str]:
    """``{key: variant_colour(key)}`` for the given variant keys."""
    return {key: variant_colour(key) for key in keys}


def shade(hex_colour: str, amount: float) -> str:
    """Lighter (``amount`` > 0, towards white) or darker (< 0) in HLS lightness; 0 keeps the colour."""
    r, g, b = (int(hex_colour[i : i + 2], 16) / 255 for i in (1, 3, 5))
    h, lightness, s = colorsys.rgb_to_hls(r, g, b)
    lightness = lightness + (1 - lightness) * amount if amount >= 0 else lightness * (1 + amount)
    r, g, b = colorsys.hls_to_rgb(h, min(max(lightness, 0.0), 0.85), s)
    return "#{:02x}{:02x}{:02x}".format(*(round(c * 255) for c in (r, g, b)))


def series_palette(frame: pd.DataFrame) -> dict[str, str]:
    """Series name -> hex colour, fixed for the whole report.

    The series of one variant (its backends, parameter sets and peers) are shades of :func:`variant_colour`:
    ours in :data:`BACKEND_ORDER`, then peers, the first one in the pure hue.
    """
    table = frame[["series", "variant", "series_backend", "is_peer"]].drop_duplicates("series")
    family: dict[str, list[tuple[int, str]]] = {}
    for row in table.itertuples(index=False):
        hue = variant_colour(row.variant, is_peer=bool(row.is_peer))
        order = BACKEND_ORDER.index(row.series_backend) if row.series_backend in BACKEND_ORDER else len(BACKEND_ORDER)
        family.setdefault(hue, []).append((order + (100 if row.is_peer else 0), row.series))
    palette: dict[str, str] = {}
    for hue, members in family.items():
        for i, (_, series) in enumerate(sorted(members)):
            palette[series] = shade(hue, SHADES[i % len(SHADES)])
    return palette
