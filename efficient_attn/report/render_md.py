"""Blocks to Markdown (``report.md``)."""

from __future__ import annotations

from pathlib import Path

from efficient_attn.report.blocks import Block, Bullets, Heading, Image, Para, Table

__all__ = ["to_markdown"]


def _md_cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def to_markdown(blocks: list[Block], out_dir: Path) -> str:
    """Markdown with images referenced relative to ``out_dir``."""
    lines: list[str] = []
    for block in blocks:
        if isinstance(block, Heading):
            lines += ["#" * block.level + " " + block.text, ""]
        elif isinstance(block, Para):
            lines += [block.text, ""]
        elif isinstance(block, Table):
            lines.append("| " + " | ".join(_md_cell(h) for h in block.header) + " |")
            lines.append("|" + "|".join("---" for _ in block.header) + "|")
            lines += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in block.rows]
            lines.append("")
        elif isinstance(block, Bullets):
            lines += [f"- {item}" for item in block.items]
            lines.append("")
        elif isinstance(block, Image):
            try:
                rel = block.path.resolve().relative_to(out_dir.resolve()).as_posix()
            except ValueError:
                rel = block.path.resolve().as_posix()
            lines += [f"![{block.alt}]({rel})", "", f"*{block.caption}*", ""]
    return "\n".join(lines)
