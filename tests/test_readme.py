"""The README's Python examples run as written, and the values their comments show are right."""

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_has_examples():
    assert len(BLOCKS) >= 3


def test_readme_examples_run_and_print_what_they_say(capsys):
    namespace: dict = {}
    for block in BLOCKS:  # one namespace: later blocks build on the quickstart
        exec(compile(block, str(README), "exec"), namespace)
    printed = capsys.readouterr().out.splitlines()
    claimed = [
        m.group(1).split(":")[0].strip()
        for block in BLOCKS
        for line in block.splitlines()
        if line.lstrip().startswith("print(") and (m := re.search(r"#\s*(.+)$", line))
    ]
    assert len(printed) == len(claimed)
    for out, claim in zip(printed, claimed, strict=True):
        assert out.startswith(claim), f"README claims {claim!r}, the code printed {out!r}"


@pytest.mark.parametrize("command", ["python -m pytest", 'pip install -e ".[dev]"'])
def test_setup_commands_are_documented(command):
    assert command in README.read_text()
