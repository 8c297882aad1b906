"""README's Python examples run as written (and print what their comments say)."""

import contextlib
import io
import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_has_examples():
    text = README.read_text()
    assert BLOCKS
    assert 'pip install -e ".[cuda12,test]"' in text
    assert "python -m cubsattn demo" in text and "python -m pytest -q" in text


#: What each example's comments promise it prints.
PROMISED = {0: ["1 (0, 32)", "density vs causal at 4096 tokens: 0.50", "head 0"], 1: ["(700, 8, 64) bfloat16"],
            2: ["(61, 256) [101 100]"]}


@pytest.mark.parametrize("index", range(len(BLOCKS)), ids=[f"block{i}" for i in range(len(BLOCKS))])
def test_readme_example_runs(index):
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        exec(compile(BLOCKS[index], str(README), "exec"), {})
    for expected in PROMISED.get(index, []):
        assert expected in buf.getvalue(), f"README block {index} promises {expected!r}"
