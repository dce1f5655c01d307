"""The blocks a report is made of: the analyses become blocks (:mod:`.sections`), each renderer turns the same
list into its format (:mod:`.render_md`, :mod:`.render_html`), so the Markdown and the HTML never say different
things.

Text in a block may use three inline marks, rendered by both: ```code```, ``**bold**``, ``*italic*``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

__all__ = ["Block", "Bullets", "Heading", "Image", "Para", "Table"]


@dataclass(frozen=True)
class Heading:
    """A section heading; ``level`` 1 is the title."""

    level: int
    text: str


@dataclass(frozen=True)
class Para:
    """A paragraph."""

    text: str


@dataclass(frozen=True)
class Table:
    """A table: a header row and rows of cell texts."""

    header: list[str]
    rows: list[list[str]]


@dataclass(frozen=True)
class Bullets:
    """A bulleted list."""

    items: list[str]


@dataclass(frozen=True)
class Image:
    """A written figure, with its alt text and caption."""

    path: Path
    alt: str
    caption: str


Block = Heading | Para | Table | Bullets | Image
