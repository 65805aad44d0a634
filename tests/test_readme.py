"""The README's "Protect your own classifier" example runs as written (shipped artifacts)."""

from __future__ import annotations

import os
import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"
MARK = "<!-- readme-test: protect-your-own-classifier -->"


def _example() -> str:
    text = README.read_text()
    assert MARK in text, "the README lost its tested example"
    block = re.search(r"```python\n(.*?)```", text[text.index(MARK) :], re.S)
    assert block is not None
    return block.group(1)


def test_protect_your_own_classifier_example_runs(tmp_path: Path) -> None:
    code = _example()
    assert len(code.strip().splitlines()) <= 13  # "ten lines of Python", give or take
    cwd = os.getcwd()
    os.chdir(tmp_path)  # the example saves a folder where it runs
    try:
        namespace: dict[str, object] = {}
        exec(compile(code, "README example", "exec"), namespace)
    finally:
        os.chdir(cwd)
    decision = namespace["decision"]
    assert len(decision) == 100  # type: ignore[arg-type]
    assert (tmp_path / "my-defense" / "config.json").is_file()
