"""What a new user reads is tested: every Python block of README.md and docs/*.md runs as written.

A block that is deliberately a fragment is preceded by the line ``<!-- fragment -->`` and is skipped, by
name, in the report. The blocks of one page run in order in one namespace (a page reads top to bottom),
in a temporary working directory.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
_BLOCK = re.compile(r"(?P<marker><!-- fragment -->\s*\n)?```python\n(?P<code>.*?)```", re.S)


def _blocks(page: Path) -> list[tuple[int, bool, str]]:
    text = page.read_text()
    return [
        (text.count("\n", 0, m.start("code")) + 1, m.group("marker") is not None, m.group("code"))
        for m in _BLOCK.finditer(text)
    ]


def test_the_block_reader_finds_and_skips_fragments(tmp_path):
    page = tmp_path / "p.md"
    page.write_text("x\n```python\na = 1\n```\n<!-- fragment -->\n```python\nundefined\n```\n")
    assert [(fragment, code) for _, fragment, code in _blocks(page)] == [
        (False, "a = 1\n"),
        (True, "undefined\n"),
    ]


@pytest.mark.parametrize("page", [p for p in PAGES if _blocks(p)], ids=lambda p: p.name)
def test_python_blocks_run(page, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)  # doc snippets may use the global RNG; the library itself never does
    namespace: dict[str, object] = {"__name__": "__doc_snippet__"}
    ran = 0
    for line, fragment, code in _blocks(page):
        if fragment:
            continue
        try:
            exec(compile(code, f"{page.name}:{line}", "exec"), namespace)
        except Exception as e:  # report the page and line of the failing block
            pytest.fail(f"{page.name}, Python block at line {line} fails: {type(e).__name__}: {e}")
        ran += 1
    assert ran > 0 or all(f for _, f, _ in _blocks(page))
