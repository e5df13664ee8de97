"""The README's library example runs as written and prints what it says."""

from __future__ import annotations

import contextlib
import io
import os
import re
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def test_readme_library_example(tmp_path: Path) -> None:
    code = re.search(r"## Use it as a library\n\n```python\n(.*?)```", README.read_text(), re.S)
    assert code is not None
    out = io.StringIO()
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        with contextlib.redirect_stdout(out):
            exec(compile(code.group(1), "README.md", "exec"), {})
    finally:
        os.chdir(cwd)
    assert out.getvalue().strip() == "512 ('cpu', 'cpu')"
    assert (tmp_path / "kvstore-data" / "data.mdb").exists()
