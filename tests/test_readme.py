"""The README's Python example runs as written (in a scratch folder, with its own image cache)."""

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_block_runs(tmp_path, monkeypatch, capsys):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert len(blocks) == 1, "the README has one Python example"
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("ERASEKIT_CACHE", str(tmp_path / "cache"))
    exec(compile(blocks[0], "README.md", "exec"), {})
    assert (tmp_path / "star-edit" / "edit.json").is_file()
    assert "'value':" in capsys.readouterr().out
