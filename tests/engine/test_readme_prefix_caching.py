"""The README's prefix-caching snippet runs as written, on a tiny checkpoint in place of "path/to/checkpoint"."""
import re
from pathlib import Path

import pytest
from tiny_models import save_tiny_checkpoint

README = Path(__file__).resolve().parents[2] / "README.md"


def snippet() -> str:
    section = README.read_text().split("## Prefix caching and parallel sampling (`n`)", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S)[1]


@pytest.mark.usefixtures("twins")
def test_the_readme_prefix_caching_snippet_runs_as_written(tmp_path, capsys):
    code = snippet()
    assert 'LLM("path/to/checkpoint")' in code
    checkpoint = save_tiny_checkpoint("llama", tmp_path / "ckpt")
    exec(compile(code.replace("path/to/checkpoint", str(checkpoint)), "README.md", "exec"), {})
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 3 * (1 + 3) + 1                  # per prompt: one line and its 3 completions; the stats
    computed, given = map(int, re.match(r"(\d+) of (\d+) prompt tokens computed", lines[-1]).groups())
    assert computed < given                               # the shared system prompt was computed once
