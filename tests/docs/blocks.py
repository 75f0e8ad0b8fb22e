"""The code blocks a document marks `<!-- tested: NAME -->`: tests run or parse exactly what a reader sees."""

from __future__ import annotations

import re
from pathlib import Path


def doc_block(doc: Path, name: str, language: str = "bash") -> str:
    """The ```language block right under `<!-- tested: NAME -->` in `doc`."""
    match = re.search(rf"<!-- tested: {re.escape(name)} -->\s*```{language}\n(.*?)```", doc.read_text(), re.S)
    assert match, f"{doc.name} has no tested {language} block {name}"
    return match.group(1)


def doc_blocks(doc: Path, prefix: str, language: str) -> dict[str, str]:
    """Every ```language block marked `<!-- tested: PREFIX... -->` in `doc`, by name."""
    found = re.findall(rf"<!-- tested: ({re.escape(prefix)}\S*) -->\s*```{language}\n(.*?)```", doc.read_text(), re.S)
    return dict(found)
