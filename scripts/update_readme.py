"""Regenerate README.md's config reference from the schema (``make docs``)."""

from __future__ import annotations

import re
import sys
from pathlib import Path

from hiradix.config import config_reference_markdown

START, END = "<!-- config-reference:start -->", "<!-- config-reference:end -->"


def render(readme: str) -> str:
    block = f"{START}\n{config_reference_markdown().strip()}\n{END}"
    return re.sub(re.escape(START) + ".*?" + re.escape(END), lambda _: block, readme, flags=re.S)


if __name__ == "__main__":
    path = Path(sys.argv[1] if len(sys.argv) > 1 else "README.md")
    path.write_text(render(path.read_text()))
