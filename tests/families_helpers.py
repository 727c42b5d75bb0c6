"""Helpers for the family tests: run the Python examples of the docs."""

from __future__ import annotations

import re
from pathlib import Path

DOCS = Path(__file__).resolve().parents[1] / "docs"


def doc_blocks(page: str) -> list[str]:
    """The ```python blocks of ``docs/<page>``, in order."""
    return re.findall(r"```python\n(.*?)```", (DOCS / page).read_text("utf-8"), flags=re.S)


def run_doc_blocks(
    page: str,
    containing: str | None = None,
    preset: dict | None = None,
    replace: dict[str, str] | None = None,
) -> dict:
    """Execute the blocks of ``docs/<page>`` in one namespace and return it.

    Parameters
    ----------
    containing : str, optional
        Run only the blocks that contain this text.
    preset : dict, optional
        Names defined before the first block (what the page asks the reader to set).
    replace : dict, optional
        Text replacements applied to the blocks first (e.g. fewer pairs for a test).
    """
    blocks = [b for b in doc_blocks(page) if containing is None or containing in b]
    assert blocks, f"docs/{page} has no python block" + (f" with {containing!r}" if containing else "")
    namespace: dict = {"__name__": f"docs_{page}", **(preset or {})}
    for block in blocks:
        for old, new in (replace or {}).items():
            assert old in block, f"{old!r} not in the block of docs/{page}"
            block = block.replace(old, new)
        exec(compile(block, str(DOCS / page), "exec"), namespace)  # noqa: S102 - our own docs
    return namespace
